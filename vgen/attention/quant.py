"""The `quant` method: dense attention through the quantised kernel (INT8 QK^T; INT8, INT4 or FP8 PV).

PAROAttention's arithmetic without its sparsity: every block pair is kept. It shows what the
quantisation alone costs in quality and gains in speed (:mod:`vgen.kernels.quantized`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vgen.attention.block_mask import BlockMask
from vgen.attention.common import check_self_attention, key_lengths, run_block_sparse
from vgen.attention.layout import VideoLayout
from vgen.attention.registry import AttentionMethod, MethodConfig, SparsePlan, register_method
from vgen.kernels.quantized import _PV_FORMATS, quantized_attention

__all__ = ["QuantAttention", "QuantConfig"]


@dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """Settings of :class:`QuantAttention`.

    Args:
        pv: ``"int8"``, ``"int4"`` or ``"fp8"``: the format of P and V in the PV product.
        block_size: ``(query, key)`` quantisation and kernel blocks, powers of two >= 32.
    """

    pv: str = "int8"
    block_size: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pv not in _PV_FORMATS:
            raise ValueError(f"pv must be one of {', '.join(map(repr, _PV_FORMATS))}, got {self.pv!r}")
        sizes = self.block_size
        if isinstance(sizes, str) or not isinstance(sizes, Sequence) or len(sizes) != 2 or any(
            not isinstance(n, int) or n < 32 or n & (n - 1) for n in sizes
        ):
            raise ValueError(f"block_size must be two powers of two >= 32, got {sizes!r}")
        object.__setattr__(self, "block_size", tuple(sizes))


@register_method("quant")
class QuantAttention(AttentionMethod):
    """Dense attention with INT8 QK^T and INT8, INT4 or FP8 PV."""

    config_class = QuantConfig
    config: QuantConfig

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
        seq = layout.seq_len
        self.last_density = 1.0
        if lengths is None:
            mask = BlockMask.full(1, 1, (seq, seq), self.config.block_size, q.device)
            return quantized_attention(q, k, v, mask, scale=scale, pv=self.config.pv)
        blocks = -(-seq // self.config.block_size[0]), -(-seq // self.config.block_size[1])
        dense = torch.ones(1, 1, *blocks, dtype=torch.bool, device=q.device)
        return run_block_sparse(q, k, v, dense, self.config.block_size, scale, lengths, pv=self.config.pv)

    def sparse_plan(self, q, k, *, layout, step, layer, scale) -> SparsePlan:
        """Every block pair, with what each ring step shares: the whole key sequence's mean, which the steps
        smooth their keys by (so that their logits share one shift and their log-sum-exps merge)."""
        check_self_attention(self.name, q, k, layout)
        self.last_density = 1.0
        seq = layout.seq_len
        mask = BlockMask.full(1, 1, (seq, seq), self.config.block_size, q.device)
        return SparsePlan(mask, None, {"k_mean": k.float().mean(1), "scale": scale})

    def ring_step(self, plan: SparsePlan, q, k, v, *, rows: slice, cols: slice):
        """One ring step through the quantised kernel, keys smoothed by the whole sequence's mean."""
        part = BlockMask.full(1, 1, (q.shape[1], k.shape[1]), self.config.block_size, q.device)
        return quantized_attention(q, k, v, part, scale=plan.extra["scale"], pv=self.config.pv,
                                   k_mean=plan.extra["k_mean"], return_lse=True)  # fmt: skip
