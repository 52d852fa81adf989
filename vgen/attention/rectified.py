"""`rectified`: Rectified SpaAttn, sparse attention corrected by an implicit pooled full-attention reference.

Plain block-sparse attention normalises the softmax over the kept blocks only. That biases it in
two ways, which Liu et al. (2025) correct with pooled keys, ``s_ij = q_i . mean(k_j) * scale +
log(n_j)`` for token ``i`` and block ``j`` of ``n_j`` keys:

- **Dropped blocks get no weight.** Each dropped block contributes its pooled mass ``exp(s_ij)``
  times its mean value, but only where the expected gain exceeds the pooling error ("gain-aware").
  Pooling replaces a block's ``mean(exp(q.k))`` by ``exp(q.mean(k))``. For logits spread with
  standard deviation ``sigma`` (estimated from ``|q_i|`` and the block's key spread), that is off by
  about ``exp(sigma^2 / 2) - 1`` of the block's weight. A block is compensated when that relative
  error is below 1: ``sigma^2 < 2 ln 2``, scaled by ``error_tolerance``.
- **Kept (critical) blocks get too much weight.** Their share of the total mass must shrink by the
  compensated blocks' share. vgen's default takes the kept blocks' mass exactly, from the kernel's
  log-sum-exp, and normalises it jointly with the compensated blocks' pooled masses:
  ``out = (o_kept Z_kept + sum_j Z_j mean(v_j)) / (Z_kept + sum_j Z_j)``. The paper instead scales
  the sparse output by the kept blocks' *pooled* mass over all blocks' pooled mass ("isolated
  pooling"), ``rectify_kept=True``. On the reference model's q/k/v (layers 0, 2, 3, 5, 7 at 9,216 tokens,
  mass 0.5 and 0.7; ``scripts/rectified_variants.py``) the exact share had 0.32-0.79x plain
  block-sparse's error in every case, the pooled one 0.39-1.71x: pooling underestimates the kept
  blocks' mass most where their logits are peaked, which is why they were kept.

Selection: pooled queries (per query block) against pooled keys. Each query block keeps key
blocks in order of pooled softmax mass until ``mass`` of it is covered, its own diagonal block
always, and text blocks always.

The sparse part runs on :func:`vgen.kernels.block_sparse_attention`, which returns the LSE; the
pooled part on :func:`vgen.kernels.pooled.pooled_correction`, one Triton pass over the query tokens
(its PyTorch reference, heads in groups to bound memory, runs where Triton does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vgen.attention.block_mask import BlockMask
from vgen.attention.common import (
    block_means,
    block_moments,
    check_self_attention,
    diagonal_and_text_blocks,
    key_lengths,
)
from vgen.attention.layout import VideoLayout
from vgen.attention.registry import AttentionMethod, MethodConfig, SparsePlan, register_method
from vgen.kernels import block_sparse_attention
from vgen.kernels.pooled import pooled_correction, pooled_correction_reference
from vgen.kernels.runtime import use_triton

__all__ = ["RectifiedAttention", "RectifiedConfig", "rectified_attention"]


@dataclass(frozen=True)
class RectifiedConfig(MethodConfig):
    """Settings of :class:`RectifiedAttention`.

    Args:
        mass: share of each query block's pooled softmax mass its kept blocks cover, in (0, 1].
        block_size: query and key block size in tokens (a power of two >= 16).
        rectify_kept: the paper's isolated-pooling reallocation: rescale the kept blocks' attention by
            their pooled mass over all blocks' pooled mass (off: their exact mass, from the kernel's
            log-sum-exp, normalised jointly with the compensated blocks; see the module docstring).
        compensate_dropped: add pooled attention for dropped blocks (gain-aware rectification).
        error_tolerance: multiplies the gain-aware bound ``2 ln 2`` on the logit variance; 0 turns
            compensation off, larger values compensate blocks with more spread keys.
        spread_shift: raise each pooled logit by half its estimated variance, ``sigma^2 / 2`` (the gain test's
            ``sigma``): ``exp(q . mean(k))`` is at most the block's mean ``exp(q . k)`` (Jensen), and this is
            the second-order term of the difference, so compensated blocks are not under-weighted.
        head_group: heads per pooled-attention chunk (memory ``B * group * S * M`` floats).
    """

    mass: float = 0.9
    block_size: int = 128
    rectify_kept: bool = False
    compensate_dropped: bool = True
    error_tolerance: float = 1.0
    spread_shift: bool = False
    head_group: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.mass, bool) or not isinstance(self.mass, int | float) or not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {self.mass!r}")
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size!r}")
        if not isinstance(self.error_tolerance, int | float) or self.error_tolerance < 0:
            raise ValueError(f"error_tolerance must be >= 0, got {self.error_tolerance!r}")
        if not isinstance(self.head_group, int) or self.head_group < 1:
            raise ValueError(f"head_group must be a positive int, got {self.head_group!r}")


def _select(
    q_mean: torch.Tensor,
    k_mean: torch.Tensor,
    counts: torch.Tensor,
    scale: float,
    mass: float,
    always: torch.Tensor,
) -> torch.Tensor:
    """bool ``[B, H, M, M]``: per query block, key blocks by pooled mass until ``mass``, and the ``always``
    pairs (:func:`diagonal_and_text_blocks`)."""
    scores = torch.einsum("bhmd,bhnd->bhmn", q_mean, k_mean) * scale + counts.log()
    p = scores.softmax(-1)
    order = p.argsort(-1, descending=True)
    sorted_p = p.gather(-1, order)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < mass
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) | always


def rectified_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    rectify_kept: bool = False,
    compensate_dropped: bool = True,
    error_tolerance: float = 1.0,
    spread_shift: bool = False,
    head_group: int = 4,
    mask: BlockMask | None = None,
    k_moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sparse attention over the kept block pairs ``keep`` (bool ``[B, H, M, M]``), rectified.

    See the module docstring. With every block kept it equals exact attention. ``mask``: ``keep``
    as a :class:`BlockMask`, and ``k_moments``: ``block_moments(k, block_size)``, if the caller has them.
    """
    seq = q.shape[1]
    if mask is None:
        mask = BlockMask.from_dense(keep, (block_size, block_size), (seq, seq))
    out, lse = block_sparse_attention(q, k, v, mask, scale=scale, return_lse=True)  # lse [B, H, S]
    if not (rectify_kept or compensate_dropped):
        return out
    k_moments = block_moments(k, block_size) if k_moments is None else k_moments
    v_mean = block_means(v, block_size)[0]
    return _correct(q, out, lse, k_moments, v_mean, keep, block_size, scale, rectify_kept, compensate_dropped,
                    error_tolerance, spread_shift, head_group, differentiable=(q, k, v))  # fmt: skip


def _correct(q, out, lse, k_moments, v_mean, keep, block_size, scale, rectify_kept, compensate_dropped,
             error_tolerance, spread_shift, head_group, differentiable) -> torch.Tensor:  # fmt: skip
    """The pooled correction of ``out`` (rows of ``keep``: ``q``'s blocks; pooled keys and values: all)."""
    k_mean, counts, k_spread = k_moments
    # the kernel is forward only: training (gradients wanted) takes the PyTorch path
    differentiate = torch.is_grad_enabled() and any(x.requires_grad for x in differentiable)
    kernel = use_triton(q) and not differentiate
    correct = pooled_correction if kernel else pooled_correction_reference
    extra = {} if kernel else {"head_group": head_group}
    return correct(
        q, out, lse, k_mean, v_mean, counts.log(), k_spread, keep, row_block=block_size, scale=scale,
        pooled_kept=rectify_kept, compensate=compensate_dropped, tolerance=error_tolerance, spread_shift=spread_shift,
        **extra,
    )  # fmt: skip


@register_method("rectified")
class RectifiedAttention(AttentionMethod):
    """Rectified SpaAttn: the block-sparse kernel, then the pooled correction kernel."""

    config_class = RectifiedConfig
    config: RectifiedConfig

    def __init__(self, config: RectifiedConfig) -> None:
        super().__init__(config)
        self.last_mask: BlockMask | None = None

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
        if key_lengths(attn_mask, q.shape[0], layout) is not None:
            raise ValueError(
                "rectified does not take padded text yet (HunyuanVideo, Motif): list those layers in dense_layers"
            )
        c = self.config
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        keep, k_moments = self._keep(q, k, layout, scale)
        return rectified_attention(
            q, k, v, keep, block_size=c.block_size, scale=scale, rectify_kept=c.rectify_kept,
            compensate_dropped=c.compensate_dropped, error_tolerance=c.error_tolerance, spread_shift=c.spread_shift,
            head_group=c.head_group, mask=self.last_mask, k_moments=k_moments,
        )  # fmt: skip

    def _keep(self, q, k, layout, scale):
        """(bool ``[B, H, M, M]`` kept blocks, the keys' block moments); sets ``last_mask``, ``last_density``."""
        c = self.config
        block, seq = c.block_size, layout.seq_len
        k_moments = block_moments(k, block)  # with gradients: the pooled correction reads them too
        k_mean, counts = k_moments[:2]
        with torch.no_grad():
            q_mean = block_means(q, block)[0]
            always = diagonal_and_text_blocks(layout, block, q.device)
            keep = _select(q_mean, k_mean, counts, scale, c.mass, always)
            tokens = counts.double()
            self.last_density = (keep.double() * (tokens[:, None] * tokens)).sum() / (keep[..., 0, 0].numel() * seq**2)
        self.last_mask = BlockMask.from_dense(keep, (block, block), (seq, seq))
        return keep, k_moments

    def sparse_plan(self, q, k, *, layout, step, layer, scale) -> SparsePlan:
        """The kept blocks, with the pooled keys :meth:`ring_finish` corrects with (raster order)."""
        check_self_attention(self.name, q, k, layout)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        keep, k_moments = self._keep(q, k, layout, scale)
        return SparsePlan(self.last_mask, None, {"keep": keep, "k_moments": k_moments, "scale": scale})

    def ring_finish(self, plan, q, v, out, lse, *, blocks, gather) -> torch.Tensor:
        c = self.config
        if not (c.rectify_kept or c.compensate_dropped):
            return out
        v_mean = gather(block_means(v, c.block_size)[0])  # every rank's value blocks, pooled: [B, H, M, D]
        keep = plan.extra["keep"][..., blocks, :]
        return _correct(q, out, lse, plan.extra["k_moments"], v_mean, keep, c.block_size, plan.extra["scale"],
                        c.rectify_kept, c.compensate_dropped, c.error_tolerance, c.spread_shift, c.head_group,
                        (q, v))  # fmt: skip
