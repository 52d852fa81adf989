"""The `dense` method: exact attention through the same plumbing as every sparse one."""

from __future__ import annotations

import torch

from vgen.attention.layout import VideoLayout
from vgen.attention.registry import AttentionMethod, SparsePlan, full_plan, register_method
from vgen.kernels import dense_attention

__all__ = ["DenseAttention"]


@register_method("dense")
class DenseAttention(AttentionMethod):
    """Full attention, numerically what diffusers' native backend computes."""

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
        return dense_attention(q, k, v, scale=scale, attn_mask=attn_mask)

    def sparse_plan(
        self, q: torch.Tensor, k: torch.Tensor, *, layout: VideoLayout, step: int, layer: int, scale: float | None
    ) -> SparsePlan:
        return full_plan(q.shape[1], q.device)

    def plan_reads_qk(self, *, step: int, layer: int) -> bool:
        return False
