"""Exact merge of two partial attentions over disjoint key sets, by their log-sum-exps.

If ``out_a, lse_a`` attend keys A and ``out_b, lse_b`` keys B (A and B disjoint), the
attention over A ∪ B is ``(w_a * out_a + w_b * out_b)`` with ``w_x = exp(lse_x - lse)``
and ``lse = logaddexp(lse_a, lse_b)``. This is what pooled compensation, cached
block-external attention and ring attention rest on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vgen.kernels.runtime import use_triton

__all__ = ["merge_attention", "merge_attention_reference"]


@triton.jit
def _merge_kernel(
    OA, LA, OB, LB, OUT, LSE,
    s_ab, s_as, s_ah,
    s_bb, s_bs, s_bh,
    H, S,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_s = o_s < S
    m_sd = m_s[:, None] & (o_d < D)[None, :]
    b_la = tl.load(LA + i_bh * S + o_s, mask=m_s, other=float("-inf"))
    b_lb = tl.load(LB + i_bh * S + o_s, mask=m_s, other=float("-inf"))
    b_max = tl.maximum(b_la, b_lb)
    # both sides empty: weights 0, LSE -inf
    b_max_safe = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_wa = tl.exp(b_la - b_max_safe)
    b_wb = tl.exp(b_lb - b_max_safe)
    b_sum = b_wa + b_wb
    b_inv = tl.where(b_sum == 0.0, 0.0, 1.0 / tl.where(b_sum == 0.0, 1.0, b_sum))
    b_oa = tl.load(OA + i_b * s_ab + i_h * s_ah + o_s[:, None] * s_as + o_d[None, :], mask=m_sd, other=0.0)
    b_ob = tl.load(OB + i_b * s_bb + i_h * s_bh + o_s[:, None] * s_bs + o_d[None, :], mask=m_sd, other=0.0)
    b_o = (b_oa.to(tl.float32) * (b_wa * b_inv)[:, None] + b_ob.to(tl.float32) * (b_wb * b_inv)[:, None])
    tl.store(OUT + (i_b * S + o_s[:, None]) * H * D + i_h * D + o_d[None, :], b_o.to(OUT.dtype.element_ty), mask=m_sd)
    b_lse = tl.where(b_sum == 0.0, float("-inf"), b_max_safe + tl.log(tl.where(b_sum == 0.0, 1.0, b_sum)))
    tl.store(LSE + i_bh * S + o_s, b_lse, mask=m_s)


def _launch_merge(out_a, lse_a, out_b, lse_b):
    b, s, h, d = out_a.shape
    out = torch.empty(b, s, h, d, device=out_a.device, dtype=out_a.dtype)
    lse = torch.empty(b, h, s, device=out_a.device, dtype=torch.float32)
    block_s = 64
    _merge_kernel[(triton.cdiv(s, block_s), b * h)](
        out_a, lse_a, out_b, lse_b, out, lse,
        out_a.stride(0), out_a.stride(1), out_a.stride(2), out_b.stride(0), out_b.stride(1), out_b.stride(2),
        h, s, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_S=block_s,
    )
    return out, lse


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_a, lse_a, out_b, lse_b):
        out, lse = _launch_merge(out_a, lse_a.contiguous(), out_b, lse_b.contiguous())
        ctx.save_for_backward(out_a, lse_a, out_b, lse_b, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        out_a, lse_a, out_b, lse_b, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.float()
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        # w_x = exp(lse_x - lse): d out_x = w_x dout, d lse_x = w_x (<dout, out_x - out> + dlse)
        grads = []
        for o_x, l_x in ((out_a, lse_a), (out_b, lse_b)):
            w = torch.exp(l_x - lse).nan_to_num(0.0)
            d_out = (dout * w.transpose(1, 2)[..., None]).to(o_x.dtype)
            d_lse = w * ((dout * (o_x.float() - out.float())).sum(-1).transpose(1, 2) + dlse)
            grads += [d_out, d_lse]
        return tuple(grads)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint keys into the attention over both.

    Args:
        out_a, out_b: ``[B, S, H, D]`` partial outputs (any strides with a unit last stride).
        lse_a, lse_b: ``[B, H, S]`` their natural-log log-sum-exps (fp32); ``-inf`` where a
            part attended no key.

    Returns:
        ``(out [B, S, H, D] in out_a's dtype, lse [B, H, S] fp32)``; differentiable.
    """
    if out_a.shape != out_b.shape or out_a.ndim != 4:
        raise ValueError(f"out_a and out_b must both be [B, S, H, D]; got {tuple(out_a.shape)}, {tuple(out_b.shape)}")
    b, s, h, _ = out_a.shape
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != (b, h, s):
            raise ValueError(f"{name} must be [B, H, S] = {(b, h, s)}, got {tuple(lse.shape)}")
    if use_triton(out_a):
        if out_a.stride(-1) != 1 or out_b.stride(-1) != 1:
            out_a, out_b = out_a.contiguous(), out_b.contiguous()
        return _Merge.apply(out_a, lse_a.float(), out_b, lse_b.float())
    return merge_attention_reference(out_a, lse_a, out_b, lse_b)


def merge_attention_reference(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge in plain fp32 PyTorch."""
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    safe = torch.where(torch.isneginf(lse), 0.0, lse)
    w_a = torch.exp(lse_a.float() - safe).transpose(1, 2)[..., None]
    w_b = torch.exp(lse_b.float() - safe).transpose(1, 2)[..., None]
    out = w_a * out_a.float() + w_b * out_b.float()
    return out.to(out_a.dtype), lse
