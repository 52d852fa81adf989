"""The `window` method: local 3D window attention on the block-sparse kernel.

Each query block attends the key blocks whose (frame, row, column) ranges lie within the
window's reach of its own (:func:`vgen.attention.local_window_mask`); text tokens attend and
are attended by all. The mask depends only on the layout, so it is built once per generation
and cached. It is the simplest static sparse pattern and the baseline the adaptive methods
(VMoBA, PAROAttention, ...) have to beat at equal density.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vgen.attention.block_mask import local_window_mask
from vgen.attention.common import check_self_attention, key_lengths, run_block_sparse
from vgen.attention.layout import VideoLayout
from vgen.attention.registry import AttentionMethod, MethodConfig, SparsePlan, register_method
from vgen.kernels import block_sparse_attention

__all__ = ["WindowAttention", "WindowConfig"]


@dataclass(frozen=True)
class WindowConfig(MethodConfig):
    """Settings of :class:`WindowAttention`.

    Args:
        window: ``(frames, rows, columns)`` reach in tokens (``None``: the whole axis); a query
            block keeps the key blocks within that reach on every axis.
        block_size: ``(query, key)`` block sizes in tokens, powers of two of at least 16.
    """

    window: tuple[int | None, int | None, int | None] = (2, 8, 8)
    block_size: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        super().__post_init__()
        window = self.window
        if isinstance(window, str) or not isinstance(window, Sequence) or len(window) != 3:
            raise ValueError(f"window must be a (frames, rows, columns) triple of ints >= 0 or None, got {window!r}")
        for axis, reach in zip(("frames", "rows", "columns"), window, strict=True):
            if reach is not None and (not isinstance(reach, int) or isinstance(reach, bool) or reach < 0):
                raise ValueError(f"window reach along {axis} must be an int >= 0 or None, got {reach!r}")
        sizes = self.block_size
        if isinstance(sizes, str) or not isinstance(sizes, Sequence) or len(sizes) != 2:
            raise ValueError(f"block_size must be a (query, key) pair, got {sizes!r}")
        for size in sizes:
            if not isinstance(size, int) or isinstance(size, bool) or size < 16 or size & (size - 1):
                raise ValueError(f"block_size entries must be powers of two >= 16, got {sizes!r}")
        object.__setattr__(self, "window", tuple(window))
        object.__setattr__(self, "block_size", tuple(sizes))


@register_method("window")
class WindowAttention(AttentionMethod):
    """Block-sparse attention over a local 3D window of each query block."""

    config_class = WindowConfig
    config: WindowConfig

    def __init__(self, config: WindowConfig) -> None:
        super().__init__(config)
        self._densities: dict[tuple[VideoLayout, torch.device], float] = {}

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
        lengths = key_lengths(attn_mask, q.shape[0], layout)
        mask = self.sparse_plan(q, k, layout=layout, step=step, layer=layer, scale=scale).mask
        if lengths is None:
            return block_sparse_attention(q, k, v, mask, scale=scale)
        return run_block_sparse(q, k, v, mask.to_dense(), self.config.block_size, scale, lengths)

    def sparse_plan(
        self, q: torch.Tensor, k: torch.Tensor, *, layout: VideoLayout, step: int, layer: int, scale: float | None
    ) -> SparsePlan:
        mask = local_window_mask(layout, self.config.window, self.config.block_size, device=q.device)
        key = (layout, q.device)
        if key not in self._densities:  # the mask is cached, so this host sync happens once per layout
            self._densities[key] = mask.density()
        self.last_density = self._densities[key]
        return SparsePlan(mask)

    def plan_reads_qk(self, *, step: int, layer: int) -> bool:
        return False  # the window's mask follows from the layout alone
