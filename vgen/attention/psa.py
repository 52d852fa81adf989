"""`psa`: Pyramid Sparse Attention, where important block pairs are read in full and others from pooled keys.

Each (query block, key block) pair of a head gets a level: full keys, keys mean-pooled over 2, 4
or 8 tokens, or skip (:func:`vgen.kernels.pyramid_attention` reads the right tile per level).

How pairs get their levels:
1. Importance is each pair's pooled softmax mass: ``mean(q) . mean(k) * scale + log(n)``, as a
   softmax over the head's pairs.
2. A head's pairs are ranked by importance. The top share is read in full, the next shares at
   2x, 4x and 8x pooling, and the rest is skipped. The shares keep the ratio ``proportions``
   (default 1 : 2 : 2 : 5) and are scaled so that the compute is ``budget`` of dense; a pair at
   pool p costs 1/p.
3. The diagonal pairs and the text blocks are always read in full.

Tokens are first put in 3D Hilbert-curve order (:func:`vgen.kernels.curve_order`), so that the 2,
4 or 8 consecutive tokens a pooled key averages are spatial neighbours. ``last_density`` is the
compute actually used, as a fraction of dense.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vgen.attention.block_mask import BlockMask
from vgen.attention.common import block_means, check_self_attention, diagonal_and_text_blocks, key_lengths
from vgen.attention.layout import VideoLayout
from vgen.attention.registry import AttentionMethod, MethodConfig, SparsePlan, register_method
from vgen.kernels import permute_tokens, unpermute_tokens
from vgen.kernels.permute import curve_order
from vgen.kernels.pyramid import LEVELS, pyramid_attention
from vgen.kernels.selection import count_levels

__all__ = ["PSAConfig", "PyramidSparseAttention", "assign_levels"]


@dataclass(frozen=True)
class PSAConfig(MethodConfig):
    """Settings of :class:`PyramidSparseAttention`.

    Args:
        budget: compute as a fraction of dense attention, in (0, 1].
        proportions: relative shares of pairs read at 1x, 2x, 4x and 8x pooling.
        block_size: query and key block size, a power of two >= 128.
        order: ``"hilbert"`` (3D Hilbert curve) or ``"raster"`` (frame-major, no permutation).
    """

    budget: float = 0.25
    proportions: tuple[float, float, float, float] = (1.0, 2.0, 2.0, 5.0)
    block_size: int = 128
    order: str = "hilbert"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.budget, bool) or not isinstance(self.budget, int | float) or not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget!r}")
        shares = self.proportions
        if isinstance(shares, str) or not isinstance(shares, Sequence) or len(shares) != 4 or any(
            not isinstance(s, int | float) or s < 0 for s in shares
        ) or not sum(shares) > 0:  # fmt: skip
            raise ValueError(f"proportions must be four shares >= 0 (1x, 2x, 4x, 8x), not all 0, got {shares!r}")
        object.__setattr__(self, "proportions", tuple(float(s) for s in shares))
        if not isinstance(self.block_size, int) or self.block_size < 128 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 128, got {self.block_size!r}")
        if self.order not in ("hilbert", "raster"):
            raise ValueError(f"order must be 'hilbert' or 'raster', got {self.order!r}")


def _shares(budget: float, proportions: tuple[float, ...]) -> list[float]:
    """Fractions of pairs per level (1x, 2x, 4x, 8x) that cost ``budget`` of dense.

    Up to the budget that keeps every pair in ``proportions``, the shares keep that ratio. Above it,
    the full share grows and the pooled shares shrink in their ratio, up to all pairs full at budget 1.
    """
    total = sum(proportions)
    cost_per_pair = sum(p / level for p, level in zip(proportions, LEVELS, strict=True)) / total
    if budget <= cost_per_pair:
        return [p * budget / (cost_per_pair * total) for p in proportions]
    pooled = sum(proportions[1:])
    if pooled == 0:
        return [1.0, 0.0, 0.0, 0.0]
    pooled_cost = sum(p / level for p, level in zip(proportions[1:], LEVELS[1:], strict=True)) / pooled
    full = (budget - pooled_cost) / (1.0 - pooled_cost)
    return [full, *((1.0 - full) * p / pooled for p in proportions[1:])]


def assign_levels(
    importance: torch.Tensor, budget: float, proportions: tuple[float, ...], always_full: torch.Tensor
) -> torch.Tensor:
    """int64 ``[B, H, M, M]`` pool factors (0: skip) from importance ``[B, H, M, M]`` (see module doc): any
    score with the importance's order (psa passes the pooled logits; their softmax has the same order).

    ``always_full``: bool ``[M, M]`` pairs read in full whatever their rank.
    """
    rows, cols = importance.shape[-2:]
    # rank r (0 = best) sits at level index #{bounds < r + 0.5} (bucketize, right=False): level j holds the
    # top floor(bound_j + 0.5) pairs, so each level is one cut by count (a bisection on CUDA, a sort elsewhere)
    bounds = itertools.accumulate(share * rows * cols for share in _shares(budget, proportions))
    index = count_levels(importance, [max(0, math.floor(b + 0.5)) for b in bounds])  # one search for all cuts
    factors = _level_factors(importance.device)[index]
    return torch.where(always_full, torch.ones_like(factors), factors)


@functools.lru_cache(maxsize=8)
def _level_factors(device: torch.device) -> torch.Tensor:
    """int64 pool factor of each level index, 0 (skip) last (cached; read-only)."""
    return torch.tensor((*LEVELS, 0), device=device)


@register_method("psa")
class PyramidSparseAttention(AttentionMethod):
    """Per-pair levels of a pooled key/value pyramid under a compute budget."""

    config_class = PSAConfig
    config: PSAConfig

    def __init__(self, config: PSAConfig) -> None:
        super().__init__(config)
        self.last_levels: torch.Tensor | None = None
        self._orders: dict[tuple[VideoLayout, torch.device], torch.Tensor] = {}

    @property
    def _pooled(self) -> bool:
        """Whether any pair can get a pooled level (the plain variant, proportions 1 : 0 : 0 : 0, or budget 1:
        none, and no pyramid is built)."""
        return any(share > 0 for share in _shares(self.config.budget, self.config.proportions)[1:])

    def _order(self, layout: VideoLayout, device: torch.device) -> torch.Tensor | None:
        if self.config.order == "raster":
            return None
        key = (layout, device)
        if key not in self._orders:
            self._orders[key] = curve_order(layout).to(device)
        return self._orders[key]

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
                "psa does not take padded text yet (HunyuanVideo, Motif): list those layers in dense_layers"
            )
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        perm = self._order(layout, q.device)
        if perm is not None:
            q, k, v = (permute_tokens(x, perm) for x in (q, k, v))
        levels = self._levels(q, k, layout, scale)
        out = pyramid_attention(q, k, v, levels, block=self.config.block_size, scale=scale, check_levels=False,
                                pooled=self._pooled)  # fmt: skip (valid by construction)
        return out if perm is None else unpermute_tokens(out, perm)

    def _levels(self, q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, scale: float) -> torch.Tensor:
        """int64 ``[B, H, M, M]`` level of each pair, for ``q`` and ``k`` in the method's order; sets
        ``last_levels`` and ``last_density``."""
        c = self.config
        seq, block = layout.seq_len, c.block_size
        with torch.no_grad():
            q_mean, counts = block_means(q, block)
            k_mean = block_means(k, block)[0]
            scores = torch.einsum("bhmd,bhnd->bhmn", q_mean, k_mean) * scale + counts.log()
            always = diagonal_and_text_blocks(layout, block, q.device)
            # ranked by the pooled logits: the same order as their softmax, without the ties of underflowed zeros
            levels = assign_levels(scores, c.budget, c.proportions, always)
            if seq % block:  # the ragged last key block is read in full or not at all
                last = levels[..., -1]
                levels[..., -1] = torch.where(last > 1, torch.ones_like(last), last)
            pairs = counts[:, None] * counts
            cost = (pairs / levels.clamp(min=1).float()) * (levels > 0)
            self.last_density = cost.sum() / (levels[..., 0, 0].numel() * seq * seq)
        self.last_levels = levels
        return levels

    def sparse_plan(self, q, k, *, layout, step, layer, scale) -> SparsePlan:
        """The Hilbert order and each pair's level (``extra["levels"]``); the mask keeps the pairs read at
        any level, so that a ring skips the steps with none."""
        check_self_attention(self.name, q, k, layout)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        perm = self._order(layout, q.device)
        if perm is not None:
            q, k = (permute_tokens(x, perm) for x in (q, k))
        levels = self._levels(q, k, layout, scale)
        seq, block = layout.seq_len, self.config.block_size
        mask = BlockMask.from_dense(levels > 0, (block, block), (seq, seq))
        return SparsePlan(mask, perm, {"levels": levels, "scale": scale})

    def ring_step(self, plan, q, k, v, *, rows: slice, cols: slice):
        """One ring step: this rank's query blocks ``rows`` against the key blocks ``cols``, at their levels."""
        levels = plan.extra["levels"][..., rows, cols]
        return pyramid_attention(q, k, v, levels, block=self.config.block_size, scale=plan.extra["scale"],
                                 check_levels=False, return_lse=True, pooled=self._pooled)  # fmt: skip
