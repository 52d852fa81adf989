"""One mechanism that routes every video self-attention of a diffusers transformer to a vgen method.

Data flow::

    pipeline step ──> transformer.forward ──(model hook: token grid, step index)──> blocks
        └─> self-attention module ──(module hook: layer index, enters SDPA interceptor)──>
            diffusers processor (projections, norms, RoPE) ──> SDPA call [B, H, S, D]
            └─ intercepted ──> method(q, k, v [B, S, H, D], layout, step, layer) ──> back to the processor

The processors stay diffusers' own: the interceptor catches their call to
``torch.nn.functional.scaled_dot_product_attention`` (diffusers' ``native`` backend, and
CogVideoX's processor, call it) through a ``TorchFunctionMode`` that is active only while a
self-attention module runs. Cross-attention and other modules are never touched.
"""

from __future__ import annotations

import inspect
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch.overrides import TorchFunctionMode

from vgen.attention import AttentionMethod, VideoLayout, create_method
from vgen.kernels import dense_attention

__all__ = [
    "TRANSFORMER_SPECS",
    "AttentionCall",
    "TransformerSpec",
    "apply_sparse_attention",
    "record_attention",
    "remove_sparse_attention",
    "self_attention_modules",
    "sparse_attention_method",
    "transformer_spec",
]

_HOOK = "vgen.sparse_attention"


@dataclass(frozen=True)
class TransformerSpec:
    """What vgen must know of one diffusers video transformer class.

    Args:
        self_attention: regex matching the qualified names of the modules that run
            self-attention over the video tokens (joint with text in some models).
        text_position: where extra context tokens sit in those attentions:
            ``"none"``, ``"before"`` or ``"after"`` the video part.
        latent: how the forward receives the latent video: ``"BCFHW"``, ``"BFCHW"``, or
            ``"packed"`` (``[B, S, C]`` with ``num_frames``/``height``/``width`` arguments).
    """

    self_attention: str
    text_position: str
    latent: str


TRANSFORMER_SPECS: dict[str, TransformerSpec] = {
    "WanTransformer3DModel": TransformerSpec(r"blocks\.\d+\.attn1", "none", "BCFHW"),
    "SkyReelsV2Transformer3DModel": TransformerSpec(r"blocks\.\d+\.attn1", "none", "BCFHW"),
    "LTXVideoTransformer3DModel": TransformerSpec(r"transformer_blocks\.\d+\.attn1", "none", "packed"),
    "CogVideoXTransformer3DModel": TransformerSpec(r"transformer_blocks\.\d+\.attn1", "before", "BFCHW"),
    "HunyuanVideoTransformer3DModel": TransformerSpec(
        r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn", "after", "BCFHW"
    ),
    "MotifVideoTransformer3DModel": TransformerSpec(
        r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn", "after", "BCFHW"
    ),
}


def transformer_spec(transformer: torch.nn.Module) -> TransformerSpec:
    """The :class:`TransformerSpec` of ``transformer``'s class, or a ValueError naming the supported ones."""
    name = type(transformer).__name__
    if name not in TRANSFORMER_SPECS:
        raise ValueError(
            f"transformer of class {name} is not supported; supported: {', '.join(sorted(TRANSFORMER_SPECS))}"
        )
    return TRANSFORMER_SPECS[name]


def self_attention_modules(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The video self-attention modules of ``transformer``, in layer order."""
    pattern = re.compile(transformer_spec(transformer).self_attention)
    return [(name, module) for name, module in transformer.named_modules() if pattern.fullmatch(name)]


def patch_size(config: Any) -> tuple[int, int, int]:
    """(t, h, w) patch of a transformer config, whichever way the model spells it."""
    size = config.patch_size
    if isinstance(size, (tuple, list)):
        return tuple(int(s) for s in size)
    return (int(getattr(config, "patch_size_t", None) or 1), int(size), int(size))


def _forward_token_grid(spec: TransformerSpec, config: Any, arguments: dict[str, Any]) -> tuple[int, int, int]:
    """(frames, height, width) in tokens for one forward call's bound arguments."""
    pt, ph, pw = patch_size(config)
    if spec.latent == "packed":
        f, h, w = (int(arguments[k]) for k in ("num_frames", "height", "width"))
    else:
        shape = arguments["hidden_states"].shape
        f, h, w = (shape[2], shape[3], shape[4]) if spec.latent == "BCFHW" else (shape[1], shape[3], shape[4])
    return f // pt, h // ph, w // pw


class _CallCount(BaseState):
    def __init__(self) -> None:
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0


@dataclass(frozen=True)
class AttentionCall:
    """One self-attention call seen by :func:`record_attention`.

    ``rel_error`` is ``||out - dense|| / ||dense||`` over the whole call; ``density`` the
    fraction of attention work the method kept (``AttentionMethod.last_density``).
    """

    step: int
    layer: int
    density: float
    rel_error: float


class _Run:
    """What the self-attention hooks read during one transformer forward."""

    def __init__(self, spec: TransformerSpec, method: AttentionMethod, transformer: torch.nn.Module) -> None:
        self.spec = spec
        self.method = method
        self.transformer = transformer  # read for its context-parallel state (vgen.parallel)
        self.grid: VideoLayout | None = None
        self.step = 0
        self.record: list[AttentionCall] | None = None
        self.last: tuple[VideoLayout, int] | None = None  # the last forward's grid and step, for recomputation

    def attend(
        self,
        layer: int,
        module_name: str,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        grid, step = self.grid, self.step
        if grid is None and self.last is not None and torch._C._current_graph_task_id() != -1:
            # Gradient checkpointing recomputes the block inside the backward pass, after the transformer's
            # forward returned: it belongs to the most recent forward.
            grid, step = self.last
        if grid is None:
            raise RuntimeError(f"{module_name} ran outside its transformer's forward; vgen cannot place its tokens")
        if dropout_p or is_causal:
            raise NotImplementedError(
                f"{module_name}: vgen methods compute non-causal attention without dropout "
                f"(got dropout_p={dropout_p}, is_causal={is_causal})"
            )
        if key.shape[1] != query.shape[1] or key.shape[2] != query.shape[2]:
            raise NotImplementedError(
                f"{module_name}: vgen methods need self-attention with as many key as query heads and tokens; "
                f"got query {tuple(query.shape)}, key {tuple(key.shape)} ([B, H, S, D])"
            )
        parallel = getattr(self.transformer, "_vgen_context_parallel", None)
        if parallel is not None and parallel.ring > 1:
            if self.spec.text_position != "none":
                return self._attend_joint_ring(layer, step, grid, parallel, module_name in parallel.split_context,
                                               query, key, value, attn_mask, scale)  # fmt: skip
            return self._attend_ring(layer, step, grid, parallel, query, key, value, attn_mask, scale)
        if parallel is not None and parallel.world > 1 and self.spec.text_position != "none":
            # Joint attention under Ulysses: rank-chunked tokens -> single-GPU order -> method -> back.
            from vgen.parallel import canonical_mask, canonical_tokens, rank_chunked_tokens

            order = (parallel.world, grid.num_video_tokens, self.spec.text_position,
                     module_name in parallel.split_context)  # fmt: skip
            query, key, value = (canonical_tokens(x, *order) for x in (query, key, value))
            if attn_mask is not None:
                attn_mask = canonical_mask(attn_mask, *order)
            out = self._attend(layer, step, grid, query, key, value, attn_mask, scale)
            return rank_chunked_tokens(out, *order)
        return self._attend(layer, step, grid, query, key, value, attn_mask, scale)

    def _attend_ring(self, layer, step, grid, parallel, query, key, value, attn_mask, scale) -> torch.Tensor:
        """This rank's even shard of a video-only self-attention (after Ulysses' all-to-all, if any: a
        contiguous run of tokens for this rank's heads), attended over the ring (vgen.ring)."""
        from vgen.ring import ring_method_attention

        if attn_mask is not None:
            raise NotImplementedError("ring parallelism takes self-attention without a mask")
        ring = parallel.ring
        tokens = query.shape[2] * ring
        if tokens != grid.seq_len:
            raise ValueError(f"a ring of {ring} ranks holds {tokens} tokens; the video grid has {grid.seq_len}")
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = ring_method_attention(self.method, q, k, v, layout=grid, step=step, layer=layer,
                                    splits=[query.shape[2]] * ring, scale=scale,
                                    group=parallel.ring_group)  # fmt: skip
        return out.transpose(1, 2)

    def _attend_joint_ring(self, layer, step, grid, parallel, split_context, query, key, value, attn_mask,
                           scale) -> torch.Tensor:  # fmt: skip
        """Joint text-video attention over the ring. A rank holds its video shard and extra tokens: the whole
        text (each rank then takes an even part of it into the ring, and the text's output is gathered
        back), or, in ``split_context`` modules (Motif's decoder), its own shard of them. The method sees the
        single-GPU sequence; a padded prompt (a prefix key mask) becomes per-sample key counts."""
        import torch.distributed as dist

        from vgen.attention.common import key_lengths
        from vgen.parallel import joint_ring_order
        from vgen.ring import gather_tokens, ring_method_attention

        ring, group = parallel.ring, parallel.ring_group
        rank = dist.get_rank(group)
        position, local = self.spec.text_position, query.shape[2]
        video = grid.num_video_tokens
        if video % ring:
            raise ValueError(f"{video} video tokens do not split into {ring} equal ring shards")
        local_video = video // ring
        extra = local - local_video
        source_perm, splits, parts = joint_ring_order(ring, video, extra, position, split_context, query.device)
        lo, hi = parts[rank]  # this rank's own extra tokens, within its local ones
        lengths = None
        if attn_mask is not None:
            if position != "after" or split_context:
                raise NotImplementedError("ring parallelism takes a key mask only for padded text after the video")
            # the local tokens: this rank's video shard (any grid of that many tokens) and the text after it
            local_layout = VideoLayout(1, 1, local_video, text_after=extra)
            local_lengths = key_lengths(attn_mask, query.shape[0], local_layout)
            lengths = None if local_lengths is None else [video + n - local_video for n in local_lengths]
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, S_local, H, D]

        def mine(x):  # [video_r, own extra] or [own extra, video_r], the ranks' shards' layout
            vid, ext = (x[:, :local_video], x[:, local_video:]) if position == "after" else (x[:, extra:], x[:, :extra])
            return torch.cat([vid, ext[:, lo:hi]] if position == "after" else [ext[:, lo:hi], vid], dim=1)

        layout = grid.with_context(len(source_perm), position)
        out = ring_method_attention(self.method, mine(q), mine(k), mine(v), layout=layout, step=step, layer=layer,
                                    splits=splits, scale=scale, group=group, source_perm=source_perm,
                                    key_lengths=lengths)  # fmt: skip
        if position == "after":
            vid, own = out[:, :local_video], out[:, local_video:]
        else:
            own, vid = out[:, : hi - lo], out[:, hi - lo :]
        if not split_context:  # the whole text's output, the same on every rank
            own = gather_tokens(own, [b - a for a, b in parts], group)
        return torch.cat([vid, own] if position == "after" else [own, vid], dim=1).transpose(1, 2)

    def _attend(self, layer, step, grid, query, key, value, attn_mask, scale) -> torch.Tensor:
        layout = grid.with_context(query.shape[2], self.spec.text_position)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out = self.method(q, k, v, layout=layout, step=step, layer=layer, scale=scale, attn_mask=attn_mask)
        if self.record is not None:
            dense = dense_attention(q, k, v, scale=scale, attn_mask=attn_mask).float()
            error = (out.float() - dense).norm() / dense.norm().clamp_min(1e-30)
            self.record.append(AttentionCall(step, layer, float(self.method.last_density), error.item()))
        return out.transpose(1, 2)


class _Interceptor(TorchFunctionMode):
    """Sends the SDPA call of one self-attention module to the run's method."""

    def __init__(self, run: _Run, layer: int, module_name: str) -> None:
        super().__init__()
        self.run, self.layer, self.module_name = run, layer, module_name
        self.calls = 0

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        return self.run.attend(self.layer, self.module_name, *args, **kwargs)


class _TransformerHook(ModelHook):
    """Reads the token grid and the denoising step from each transformer call.

    The step is the pipeline's ``cache_context(step_index=...)`` when it gives one, else the
    number of earlier calls in the same cache context ("cond", "uncond", or none), so
    classifier-free guidance in separate calls counts once per step. Pipelines reset it at
    the end of each generation (``maybe_free_model_hooks``).
    """

    _is_stateful = True

    def __init__(self, run: _Run) -> None:
        super().__init__()
        self.run = run
        self.contexts = StateManager(_CallCount)
        self.calls: dict[str, int] = defaultdict(int)
        self.signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.signature = inspect.signature(type(module).forward)
        return module

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        bound = self.signature.bind(module, *args, **kwargs).arguments
        self.run.grid = VideoLayout(*_forward_token_grid(self.run.spec, module.config, bound))
        try:
            context = self.contexts.context
        except ValueError:
            context = None
        if context is not None and context.step_index is not None:
            self.run.step = int(context.step_index)
        else:
            key = context.name if context is not None else ""
            self.run.step = self.calls[key]
            self.calls[key] += 1
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.run.last = (self.run.grid, self.run.step)
        self.run.grid = None
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.calls.clear()
        self.contexts.reset()
        return module


class _SelfAttentionHook(ModelHook):
    """Runs one self-attention module with its SDPA call routed to the method."""

    def __init__(self, run: _Run, layer: int, module_name: str) -> None:
        super().__init__()
        self.run, self.layer, self.module_name = run, layer, module_name

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        interceptor = _Interceptor(self.run, self.layer, self.module_name)
        with interceptor:
            out = self.fn_ref.original_forward(*args, **kwargs)
        if interceptor.calls != 1:
            raise RuntimeError(
                f"{self.module_name} called torch's scaled_dot_product_attention {interceptor.calls} times "
                "(expected once): vgen needs the module's processor to compute attention through SDPA, "
                "i.e. diffusers' 'native' attention backend (see transformer.reset_attention_backend())"
            )
        return out


def apply_sparse_attention(
    transformer: torch.nn.Module, name: str | AttentionMethod, **config: Any
) -> AttentionMethod:
    """Route every video self-attention of ``transformer`` to the method registered as ``name``.

    Works on the diffusers video transformers in :data:`TRANSFORMER_SPECS`. Applying again
    replaces the previous method; :func:`remove_sparse_attention` restores the stock model.

    Args:
        transformer: a diffusers video transformer, e.g. ``WanTransformer3DModel``.
        name: a registered method (``vgen.attention.available_methods()``), or a method instance
            (e.g. a measuring one that is not registered; then ``config`` must be empty).
        **config: the method's settings, checked by its config dataclass.

    Returns:
        The method instance (its config, and any statistics it keeps).
    """
    spec = transformer_spec(transformer)
    if isinstance(name, AttentionMethod):
        if config:
            raise ValueError("pass settings to the method instance's constructor, not to apply_sparse_attention")
        method = name
    else:
        method = create_method(name, **config)
    modules = self_attention_modules(transformer)
    if not modules:
        raise ValueError(f"{type(transformer).__name__} has no module matching {spec.self_attention!r}")
    remove_sparse_attention(transformer)
    run = _Run(spec, method, transformer)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_TransformerHook(run), _HOOK)
    for layer, (module_name, module) in enumerate(modules):
        HookRegistry.check_if_exists_or_initialize(module).register_hook(
            _SelfAttentionHook(run, layer, module_name), _HOOK
        )
    return method


def sparse_attention_method(transformer: torch.nn.Module) -> AttentionMethod | None:
    """The method applied to ``transformer``, or None."""
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(_HOOK) if registry is not None else None
    return hook.run.method if hook is not None else None


@contextmanager
def record_attention(transformer: torch.nn.Module) -> Iterator[list[AttentionCall]]:
    """Within the block, also compute dense attention beside every method call and record the
    method's density and relative error per (step, layer); yields the growing list.

    Costs a dense attention per call and a host sync: a measurement tool, not for production.
    """
    method = sparse_attention_method(transformer)
    if method is None:
        raise ValueError("record_attention needs a method applied first (apply_sparse_attention)")
    run = transformer._diffusers_hook.get_hook(_HOOK).run
    run.record = []
    try:
        yield run.record
    finally:
        run.record = None


def remove_sparse_attention(transformer: torch.nn.Module) -> None:
    """Undo :func:`apply_sparse_attention`: every module runs stock diffusers code again."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(_HOOK, recurse=True)
