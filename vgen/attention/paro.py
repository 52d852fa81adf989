"""`paro`: PAROAttention's pattern-aware token reordering with offline-calibrated block masks.

Attention heads of video transformers tend to follow one axis: some attend along a row, some a
column, some across frames at the same pixel. In frame-major order those patterns are scattered
stripes. Reordering one head's tokens along its axis order makes its attention a few dense
blocks, which a block mask can keep at low density.

Calibration (:func:`calibrate_paro`, ``vgen calibrate paro``) runs dense denoising passes and,
per self-attention call, accumulates the block-pooled attention mass ``sum softmax(q k^T)`` under
each of the six axis orders of (frame, row, column) (:func:`block_mass`). Two choices follow from
that mass:
- The order of each (layer, head): the one whose ``density`` share of heaviest blocks captures
  the most mass.
- The mask of each (timestep bucket, layer, head): the heaviest blocks in that order until
  ``density`` of the token pairs is kept, the diagonal blocks always included. With ``share="layer"``
  or ``"model"`` the heads of a layer (or of the model) share that budget, heaviest blocks first;
  with ``"run"`` the timestep buckets share it too, so the steps whose attention is spread get more.
  ``density`` may also be a schedule, one value per timestep bucket: the first, noisiest steps move
  the video most, and on the reference model a schedule that starts dense and thins out keeps
  0.3 of the pairs over the run at 24 dB against dense, where a flat 0.3 gives 19 dB.

Both go into one safetensors file with JSON metadata, which names the model and the token grid it
was calibrated for. ``enable_sparse_attention("paro", calibration=FILE)`` loads it. At run time,
each head's q/k/v are permuted into its order, the block-sparse kernel runs with the head's mask,
and the output is permuted back. Text tokens stay in place and dense. A grid, model or layer
count that does not match the file gets a clear error.

By default the kernel is the quantised one (:mod:`vgen.kernels.quantized`: INT8 QK^T with
smoothed keys, and INT8 or INT4 PV); ``quant="none"`` runs the bf16/fp16 block-sparse kernel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vgen.attention.block_mask import BlockMask
from vgen.attention.common import check_self_attention, key_lengths, run_block_sparse
from vgen.attention.layout import VideoLayout
from vgen.attention.registry import AttentionMethod, MethodConfig, SparsePlan, register_method
from vgen.kernels import permute_tokens, unpermute_tokens
from vgen.kernels.permute import axis_order
from vgen.kernels.quantized import _PV_FORMATS, quantized_attention

__all__ = [
    "AXIS_ORDERS", "ParoCalibration", "ParoMeasurement", "PAROAttention", "PAROConfig", "block_mass", "calibrate_paro",
    "measure_paro",
]

AXIS_ORDERS: tuple[str, ...] = ("thw", "twh", "htw", "hwt", "wth", "wht")
_FORMAT = "vgen-paro-calibration/1"
SHARES = ("head", "layer", "model", "run")  # over what calibrate_paro's density budget is shared
_QUANTS = (*_PV_FORMATS, "none")  # a PV format of the quantised kernel, or the bf16/fp16 kernel


def _block_of(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Block index of each token (original position) when tokens are laid out in ``perm`` order."""
    position = torch.empty_like(perm)
    position[perm] = torch.arange(perm.numel(), device=perm.device)
    return position // block


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    block_size: int = 128,
    scale: float | None = None,
    query_chunk: int = 1024,
) -> torch.Tensor:
    """Attention mass per (order, head, query block, key block), summed over the batch.

    Args:
        q, k: ``[B, S, H, D]`` with ``S = layout.seq_len``.
        layout: the token grid (text tokens stay in place in every order).
        block_size: tokens per block on both sides.
        scale: softmax scale (default ``D ** -0.5``).
        query_chunk: query rows per softmax evaluation (bounds the memory to ``B*H*chunk*S``).

    Returns:
        fp32 ``[6, H, M, M]`` over :data:`AXIS_ORDERS`, ``M = ceil(S / block_size)``; each query
        row contributes 1 in total, so the whole tensor sums to ``6 * B * H * S``.
    """
    batch, seq, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    blocks = -(-seq // block_size)
    perms = [axis_order(layout, order).to(q.device) for order in AXIS_ORDERS]
    block_ids = torch.stack([_block_of(p, block_size) for p in perms])  # [6, S]
    columns = torch.nn.functional.one_hot(block_ids, blocks).to(torch.float32)  # [6, S, M]
    mass = torch.zeros(len(AXIS_ORDERS), heads, blocks, blocks, dtype=torch.float32, device=q.device)
    kt = k.transpose(1, 2).float()  # [B, H, S, D]
    for start in range(0, seq, query_chunk):
        rows = slice(start, min(seq, start + query_chunk))
        p = torch.softmax(q[:, rows].transpose(1, 2).float() @ kt.transpose(-1, -2) * scale, dim=-1)  # [B, H, r, S]
        p = p.sum(0)  # [H, r, S]
        for o in range(len(AXIS_ORDERS)):
            per_key_block = p @ columns[o]  # [H, r, M]
            mass[o].index_add_(1, block_ids[o, rows], per_key_block)
    return mass


def _captured(mass: torch.Tensor, keep: int) -> torch.Tensor:
    """Share of each head's mass in its ``keep`` heaviest blocks: ``[..., H]`` from ``[..., H, M, M]``."""
    flat = mass.flatten(-2)
    return flat.topk(keep, dim=-1).values.sum(-1) / flat.sum(-1).clamp_min(1e-30)


def _token_counts(seq: int, block: int) -> torch.Tensor:
    return (seq - torch.arange(0, seq, block)).clamp(max=block).to(torch.float64)


def _kept_pairs(masks: torch.Tensor, seq: int, block: int) -> torch.Tensor:
    """fp64 ``[...]``: the share of the ``seq`` x ``seq`` token pairs each block mask ``[..., M, M]`` keeps."""
    tokens = _token_counts(seq, block)
    return (masks.double() * (tokens[:, None] * tokens)).sum((-1, -2)) / (seq * seq)


def _mask_at_density(mass: torch.Tensor, seq: int, block: int, density: float) -> torch.Tensor:
    """bool ``[..., M, M]``: per leading slice (one head), the diagonal, then the heaviest blocks, until
    ``density`` of the token pairs."""
    return _pooled_masks(mass[..., None, :, :], seq, block, density).squeeze(-3)


def _pooled_masks(
    mass: torch.Tensor, seq: int, block: int, density: float, uses: torch.Tensor | None = None
) -> torch.Tensor:
    """bool ``[..., G, M, M]``: the G maps of each leading slice share one budget of ``density`` x G x
    ``seq``^2 token pairs: every diagonal block, then the heaviest blocks of any of the G maps, best first.

    The maps' masses are comparable (each sums softmax rows over the same query tokens), so a map whose
    attention is spread gets more blocks and a concentrated one fewer, for the same total kept work.
    ``uses`` (``[G]``, default ones) counts how often each map runs, say the denoising steps of its timestep
    bucket: a block then costs its token pairs times that count, and the budget is ``density`` x sum(uses) x
    ``seq``^2, so that the work kept over all the runs is ``density`` (the masses should then be per run).
    """
    *lead, groups, m, _ = mass.shape
    flat = mass.reshape(-1, groups * m * m).double()
    tokens = _token_counts(seq, block)
    uses = torch.ones(groups, dtype=torch.float64) if uses is None else uses.to(torch.float64)
    pairs = ((tokens[:, None] * tokens[None, :]).flatten()[None] * uses[:, None]).flatten()  # cost per block pair
    diagonal = torch.eye(m, dtype=torch.bool).flatten().repeat(groups)
    order = flat.argsort(-1, descending=True)  # [slices, G*M*M]
    on_diagonal = diagonal[order]
    added = torch.where(on_diagonal, 0.0, pairs[order])  # pairs each non-diagonal block adds, best first
    used_before = pairs[diagonal].sum() + added.cumsum(-1) - added
    kept_sorted = on_diagonal | (used_before < density * uses.sum() * seq * seq)  # add blocks while under budget
    keep = torch.zeros(flat.shape, dtype=torch.bool).scatter_(1, order, kept_sorted)
    return keep.view(*lead, groups, m, m)


def _bucket_of(step: int, steps: int, buckets: int) -> int:
    """Timestep bucket of denoising step ``step`` of ``steps`` split evenly into ``buckets`` (steps past the
    last use the last bucket)."""
    return min(buckets - 1, step * buckets // steps)


def _shared_masks(
    mass: torch.Tensor, share: str, seq: int, block: int, density: float | list[float], steps: list[int]
) -> torch.Tensor:
    """bool ``[K, L, H, M, M]`` masks from the block masses ``[K, L, H, M, M]`` (per timestep bucket, layer and
    head; each bucket's summed over its denoising steps, of which there are ``steps[k]``), with the ``density``
    budget shared as ``share`` says (:data:`SHARES`). For ``"run"`` the buckets are compared per step and a
    bucket's blocks cost its step count, so that the run keeps ``density`` of its work; the other shares keep it
    in every bucket (one bucket at a time, which bounds the memory), or ``density[k]`` in bucket k (a list)."""
    if share == "run":
        uses = torch.tensor(steps, dtype=torch.float64).view(-1, 1, 1).expand(mass.shape[:3])  # [K, L, H]
        per_step = mass.double() / uses[..., None, None]
        return _pooled_masks(per_step.flatten(0, 2)[None], seq, block, density, uses.flatten()).view(mass.shape)
    masks = torch.empty(mass.shape, dtype=torch.bool)
    for k, bucket in enumerate(mass):  # [L, H, M, M]
        sharing = {"head": bucket[..., None, :, :], "layer": bucket, "model": bucket.flatten(0, 1)}[share]
        budget = density[k] if isinstance(density, list) else density
        masks[k] = _pooled_masks(sharing, seq, block, budget).view(bucket.shape)
    return masks


@dataclass(frozen=True, eq=False)
class ParoCalibration:
    """Per-head orders and per-(bucket, layer, head) block masks, and what they were made for.

    Args:
        orders: int64 ``[L, H]``, indices into :data:`AXIS_ORDERS`.
        masks: bool ``[K, L, H, M, M]`` for ``K`` timestep buckets, in each head's order.
        meta: model class and transformer sizes, grid, text placement, block size, density,
            calibration steps and bucket bounds.
    """

    orders: torch.Tensor
    masks: torch.Tensor
    meta: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"orders": self.orders.to(torch.int64).contiguous(), "masks": self.masks.to(torch.uint8).contiguous()}
        save_file(tensors, str(path), metadata={"format": _FORMAT, "meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> ParoCalibration:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"calibration file {str(path)!r} does not exist; make one with `vgen calibrate paro`"
            )
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a vgen PARO calibration (format {metadata.get('format')!r})")
            orders, masks = f.get_tensor("orders"), f.get_tensor("masks").bool()
        return cls(orders, masks, json.loads(metadata["meta"]))

    def bucket(self, step: int) -> int:
        """Timestep bucket of denoising step ``step`` (steps past the calibrated ones use the last)."""
        return _bucket_of(step, self.meta["steps"], self.masks.shape[0])

    def check(self, layout: VideoLayout, layer: int, heads: int) -> None:
        """Raise ValueError unless this call (grid, layer, heads) is one the file was calibrated for."""
        grid = (layout.frames, layout.height, layout.width, layout.text_before, layout.text_after)
        if list(grid) != self.meta["grid"]:
            raise ValueError(
                f"the PARO calibration is for the token grid {self.meta['grid'][:3]} with text "
                f"{self.meta['grid'][3:]} (before, after), but this call has {list(grid[:3])} with text "
                f"{list(grid[3:])}: calibrate for this size ({self.meta['model']})"
            )
        if layer >= self.orders.shape[0] or heads != self.orders.shape[1]:
            raise ValueError(
                f"the PARO calibration has {self.orders.shape[0]} layers x {self.orders.shape[1]} heads "
                f"({self.meta['model']}); this call is layer {layer} with {heads} heads: a different model"
            )


@dataclass(frozen=True)
class PAROConfig(MethodConfig):
    """Settings of :class:`PAROAttention`.

    Args:
        calibration: path of a calibration file (``vgen calibrate paro``).
        quant: ``"int8"`` (INT8 QK^T and PV), ``"int4"`` (INT8 QK^T, INT4 PV), ``"fp8"`` (INT8 QK^T,
            float8 e4m3 PV) or ``"none"``
            (the bf16/fp16 kernel); see :func:`vgen.kernels.quantized.quantized_attention`.
    """

    calibration: str = ""
    quant: str = "int8"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant not in _QUANTS:
            raise ValueError(f"quant must be one of {', '.join(_QUANTS)}, got {self.quant!r}")
        if not isinstance(self.calibration, str | Path) or not str(self.calibration):
            raise ValueError("calibration must be the path of a file made by `vgen calibrate paro`")
        object.__setattr__(self, "calibration", str(self.calibration))


@register_method("paro")
class PAROAttention(AttentionMethod):
    """Per-head axis reordering and a calibrated block mask per (timestep bucket, layer, head)."""

    config_class = PAROConfig
    config: PAROConfig

    def __init__(self, config: PAROConfig) -> None:
        super().__init__(config)
        self.calibration = ParoCalibration.load(config.calibration)
        self._device_cache: dict[tuple[Any, ...], Any] = {}
        self._pv = None if config.quant == "none" else config.quant  # the quantised kernel's PV format

    def _perm(self, layout: VideoLayout, layer: int, device: torch.device) -> torch.Tensor:
        key = ("perm", layout, layer, device)
        if key not in self._device_cache:
            perms = [axis_order(layout, AXIS_ORDERS[int(o)]) for o in self.calibration.orders[layer]]
            self._device_cache[key] = torch.stack(perms).to(device)  # [H, S]
        return self._device_cache[key]

    def _mask(self, bucket: int, layer: int, seq: int, device: torch.device) -> tuple[torch.Tensor, float]:
        key = ("mask", bucket, layer, device)
        if key not in self._device_cache:
            dense = self.calibration.masks[bucket, layer][None]  # [1, H, M, M]
            block = self.calibration.meta["block_size"]
            self._device_cache[key] = (dense.to(device), float(_kept_pairs(dense[0], seq, block).mean()))
        return self._device_cache[key]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: VideoLayout,
        step: int,
        layer: int,
        scale: float | None,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        check_self_attention(self.name, q, k, layout)
        self.calibration.check(layout, layer, q.shape[2])
        lengths = key_lengths(attn_mask, q.shape[0], layout)
        perm = self._perm(layout, layer, q.device)
        dense, density = self._mask(self.calibration.bucket(step), layer, layout.seq_len, q.device)
        self.last_density = density
        block = self.calibration.meta["block_size"]
        q, k, v = (permute_tokens(x, perm) for x in (q, k, v))
        out = run_block_sparse(q, k, v, dense, (block, block), scale, lengths, pv=self._pv)
        return unpermute_tokens(out, perm)

    def sparse_plan(
        self, q: torch.Tensor, k: torch.Tensor, *, layout: VideoLayout, step: int, layer: int, scale: float | None
    ) -> SparsePlan:
        """The calibrated order per head and mask (no q/k statistics needed). Quantised, also what every ring
        step shares: the whole key sequence's mean (``extra["k_mean"]``), which the steps smooth their keys
        by, so that their logits share one shift and their log-sum-exps merge."""
        check_self_attention(self.name, q, k, layout)
        self.calibration.check(layout, layer, q.shape[2])
        dense, density = self._mask(self.calibration.bucket(step), layer, layout.seq_len, q.device)
        self.last_density = density
        block = self.calibration.meta["block_size"]
        mask = BlockMask.from_dense(dense, (block, block), (layout.seq_len, layout.seq_len))
        extra = None
        if self.config.quant != "none":
            extra = {"k_mean": k.float().mean(1), "dense": dense, "scale": scale}  # [B, H, D]; order-free
        return SparsePlan(mask, self._perm(layout, layer, q.device), extra)

    def ring_step(self, plan: SparsePlan, q, k, v, *, rows: slice, cols: slice):
        """Quantised: one ring step through the quantised kernel, keys smoothed by the whole sequence's mean."""
        if self.config.quant == "none":
            return None
        block = plan.mask.block_size
        part = BlockMask.from_dense(plan.extra["dense"][..., rows, cols].contiguous(), block, (q.shape[1], k.shape[1]))
        return quantized_attention(q, k, v, part, scale=plan.extra["scale"], pv=self._pv,
                                   k_mean=plan.extra["k_mean"], return_lse=True)  # fmt: skip


class _Calibrator(AttentionMethod):
    """Dense attention that accumulates :func:`block_mass` per (timestep bucket, layer) as it goes,
    on the device (a few GB at Wan2.1-1.3B 480p: 4 buckets x 30 layers x 6 orders x 12 heads x 256^2)."""

    name = "paro-calibration"

    def __init__(self, config: MethodConfig, block_size: int, query_chunk: int, steps: int, buckets: int) -> None:
        super().__init__(config)
        self.block_size, self.query_chunk, self.steps, self.buckets = block_size, query_chunk, steps, buckets
        self.mass: dict[tuple[int, int], torch.Tensor] = {}
        self.layouts: set[VideoLayout] = set()

    def forward(self, q, k, v, *, layout, step, layer, scale, attn_mask):
        from vgen.kernels import dense_attention

        self.layouts.add(layout)
        with torch.no_grad():
            mass = block_mass(q, k, layout, self.block_size, scale, self.query_chunk)
        key = (_bucket_of(step, self.steps, self.buckets), layer)
        self.mass[key] = self.mass[key] + mass if key in self.mass else mass
        return dense_attention(q, k, v, scale=scale, attn_mask=attn_mask)


def _schedule_of(density: Any, buckets: int, share: str) -> list[float] | None:
    """Check ``density`` (a number in (0, 1], or one per bucket) against ``buckets`` and ``share``; the schedule,
    or None for one number."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    values = density.tolist() if hasattr(density, "tolist") else density  # numpy arrays and tensors as lists
    if not (number(values) or (isinstance(values, Sequence) and not isinstance(values, str)
                               and all(number(d) for d in values))):  # fmt: skip
        raise ValueError(f"density must be a number in (0, 1] or one per bucket, got {density!r}")
    if share not in SHARES:
        raise ValueError(f"share must be one of {', '.join(map(repr, SHARES))}, got {share!r}")
    if number(values):
        if not 0.0 < values <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        return None
    schedule = [float(d) for d in values]
    if len(schedule) != buckets or not all(0.0 < d <= 1.0 for d in schedule):
        raise ValueError(f"density as a schedule needs {buckets} values (one a bucket) in (0, 1], got {density!r}")
    if share == "run":
        raise ValueError("a density schedule fixes each bucket's budget; share 'run' cannot take one (use 'head', "
                         "'layer' or 'model')")  # fmt: skip
    return schedule


@dataclass(frozen=True, eq=False)
class ParoMeasurement:
    """What :func:`measure_paro`'s dense generations saw: the block mass per (timestep bucket, layer) under every
    axis order, and what a calibration file records of the model and the grid. :meth:`calibration` builds
    calibrations from it at any density and share without generating again.

    Args:
        mass: ``{(bucket, layer): fp32 [6, H, M, M]}`` on the CPU, summed over the steps of the bucket.
        layout: the token grid generated at.
        steps: denoising steps; ``buckets``: timestep buckets; ``block_size``: tokens per block.
        model: the meta of the model (``"model"`` class name and ``"transformer"`` sizes).
        prompts: generations measured (prompts x seeds).
    """

    mass: dict[tuple[int, int], torch.Tensor]
    layout: VideoLayout
    steps: int
    buckets: int
    block_size: int
    model: dict[str, Any]
    prompts: int

    def steps_in(self, bucket: int) -> int:
        """Denoising steps that fall in ``bucket``."""
        return sum(_bucket_of(step, self.steps, self.buckets) == bucket for step in range(self.steps))

    def calibration(
        self, out: str | Path | None, *, density: float | Sequence[float] = 0.3, share: str = "head"
    ) -> ParoCalibration:
        """The calibration at ``density`` shared as ``share`` (as :func:`calibrate_paro`), written to ``out``
        unless it is None."""
        schedule = _schedule_of(density, self.buckets, share)
        density = float(density) if schedule is None else schedule  # (numpy and torch values as Python numbers)
        layout, block_size, buckets = self.layout, self.block_size, self.buckets
        layers = 1 + max(layer for _, layer in self.mass)
        heads = next(iter(self.mass.values())).shape[1]
        blocks = -(-layout.seq_len // block_size)
        seen = sorted({b for b, _ in self.mass})
        # a schedule's orders are chosen at its mean density over the steps
        mean_density = density if schedule is None else sum(
            schedule[b] * self.steps_in(b) for b in range(buckets)) / self.steps  # fmt: skip
        keep = max(1, math.ceil(mean_density * blocks * blocks))
        # [L, 6, H, M, M]: every bucket's mass per layer
        total = torch.stack([sum(self.mass[(b, layer)] for b in seen) for layer in range(layers)])
        orders = _captured(total, keep).argmax(1)  # [L, H]
        sources = [b if b in seen else max(s for s in seen if s <= b) if any(s <= b for s in seen) else seen[0]
                   for b in range(buckets)]  # fmt: skip
        # [K', L, H, M, M]: each measured bucket's mass per head, in the head's chosen order; a bucket that no step
        # reached (fewer steps than buckets) takes the masks of the last measured one before it
        chosen = torch.stack([
            torch.stack([self.mass[(b, layer)][orders[layer], torch.arange(heads)] for layer in range(layers)])
            for b in seen
        ])  # fmt: skip
        budget = density if schedule is None else [schedule[b] for b in seen]
        measured = _shared_masks(chosen, share, layout.seq_len, block_size, budget, [self.steps_in(b) for b in seen])
        masks = measured[[seen.index(source) for source in sources]]
        inside = torch.zeros(layers, heads, dtype=torch.float64)  # each head's mass inside its masks, and in all
        whole = torch.zeros(layers, heads, dtype=torch.float64)
        for mass, kept_blocks in zip(chosen, measured, strict=True):
            inside += torch.where(kept_blocks, mass, 0).double().sum((-1, -2))
            whole += mass.double().sum((-1, -2))
        captured = inside / whole.clamp_min(1e-30)
        kept = _kept_pairs(masks, layout.seq_len, block_size)  # [K, L, H]
        meta = {
            **self.model,
            "grid": [layout.frames, layout.height, layout.width, layout.text_before, layout.text_after],
            "block_size": block_size,
            "density": density,
            "share": share,
            "steps": self.steps,
            "buckets": buckets,
            "orders": list(AXIS_ORDERS),
            "prompts": self.prompts,
            "captured": captured.tolist(),  # [L, H]: share of each head's mass inside its masks, over the buckets
            "bucket_density": kept.mean((1, 2)).tolist(),  # [K]: kept token pairs per bucket (differ with "run")
        }
        calibration = ParoCalibration(orders, masks, meta)
        if out is not None:
            calibration.save(out)
        return calibration


def measure_paro(
    pipe: Any,
    prompts: list[str],
    *,
    buckets: int = 4,
    block_size: int = 128,
    seeds: tuple[int, ...] = (0,),
    query_chunk: int = 1024,
    **generate: Any,
) -> ParoMeasurement:
    """The dense generations of :func:`calibrate_paro` (same arguments), kept as a :class:`ParoMeasurement` so
    that calibrations at several densities or shares need them once."""
    from vgen.pipelines.plumbing import apply_sparse_attention, remove_sparse_attention
    from vgen.pipelines.video import call_defaults

    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    if not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be an int >= 1, got {buckets!r}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    steps = generate.get("num_inference_steps") or call_defaults(pipe.pipeline).get("num_inference_steps")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"calibration needs the number of denoising steps (num_inference_steps), got {steps!r}")
    calibrator = _Calibrator(MethodConfig(), block_size, query_chunk, steps, buckets)
    apply_sparse_attention(pipe.transformer, calibrator)
    try:
        for prompt in prompts:
            for seed in seeds:
                pipe(prompt, seed=seed, progress=False, **generate)
    finally:
        remove_sparse_attention(pipe.transformer)
    if len(calibrator.layouts) != 1:
        raise ValueError(f"calibration saw {len(calibrator.layouts)} token grids; generate at one size")
    config = pipe.transformer.config
    model = {
        "model": type(pipe.transformer).__name__,
        "transformer": {k: config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim")
                        if k in config},  # fmt: skip
    }
    return ParoMeasurement(
        mass={key: value.cpu() for key, value in calibrator.mass.items()}, layout=next(iter(calibrator.layouts)),
        steps=steps, buckets=buckets, block_size=block_size, model=model, prompts=len(prompts) * len(seeds),
    )  # fmt: skip


def calibrate_paro(
    pipe: Any,
    prompts: list[str],
    out: str | Path,
    *,
    density: float | Sequence[float] = 0.3,
    buckets: int = 4,
    block_size: int = 128,
    seeds: tuple[int, ...] = (0,),
    query_chunk: int = 1024,
    share: str = "head",
    **generate: Any,
) -> ParoCalibration:
    """Run dense generations with ``pipe`` (a :class:`vgen.VideoPipeline`) and write a calibration
    (:func:`measure_paro`, then :meth:`ParoMeasurement.calibration`).

    Args:
        pipe: the pipeline; its attention is stock afterwards.
        prompts: calibration prompts; ``seeds``: seeds per prompt.
        out: the file to write (safetensors with JSON metadata).
        density: kept share of token pairs, in (0, 1]: per (bucket, layer, head), or over what ``share`` says.
            A sequence of ``buckets`` values is a schedule: bucket k keeps ``density[k]`` (the first bucket
            holds the first, noisiest steps, which move the video most); not with share ``"run"``, which
            moves the budget between buckets itself.
        buckets: timestep buckets (the denoising steps are split evenly).
        block_size: kernel block size in tokens (a power of two >= 16).
        query_chunk: query rows per softmax evaluation while measuring.
        share: over what the ``density`` budget is shared: ``"head"`` (every head keeps ``density`` in
            every timestep bucket, as the paper), ``"layer"`` (the heads of a layer share it: spread
            heads get more blocks), ``"model"`` (all heads of all layers share it, per bucket) or
            ``"run"`` (all heads, layers and buckets share it: a bucket's density follows how spread
            its attention is; each bucket's maps are weighed per denoising step). The kept work of the
            whole run is the same.
        **generate: sizes and steps for ``pipe(...)``; the file is valid for that token grid only.
    """
    if not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be an int >= 1, got {buckets!r}")
    _schedule_of(density, buckets, share)  # before the generations: a bad budget fails at once
    measurement = measure_paro(pipe, prompts, buckets=buckets, block_size=block_size, seeds=seeds,
                               query_chunk=query_chunk, **generate)  # fmt: skip
    return measurement.calibration(out, density=density, share=share)

