"""Pooled correction of block-sparse attention (Rectified SpaAttn's second pass), one Triton kernel.

Given the block-sparse output ``o`` and its log-sum-exp over the kept blocks, each query token is
corrected with the pooled key/value blocks (``mean(k_j)``, ``mean(v_j)``, ``n_j`` keys): pooled
logits ``s_j = q . mean(k_j) * scale + log(n_j)``. A dropped block ``j`` is *taken* when the pooling
error is small, ``|q|^2 * spread_j * scale^2 / D < 2 ln 2 * tolerance`` (``spread_j``: the keys' mean
squared distance to their mean). Two ways to weigh the kept part:

- exact (``pooled_kept=False``): ``(o Z + sum_taken e^{s_j} mean(v_j)) / (Z + sum_taken e^{s_j})``
  with ``Z = e^{lse}``, the kept blocks' exact mass;
- pooled (``pooled_kept=True``, the paper's isolated pooling): ``o * P_kept / P_all +
  sum_taken e^{s_j} mean(v_j) / P_all`` with ``P`` the pooled masses of the kept and of all blocks.

One program per (query tile, batch x head) walks the pooled blocks in tiles with a running maximum,
so nothing of size ``S x M`` is stored. :func:`pooled_correction_reference` is the same in PyTorch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vgen.kernels.runtime import use_triton

__all__ = ["pooled_correction", "pooled_correction_reference"]

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _pooled_kernel(
    Q, SPARSE, LSE, KM, VM, LOGN, SPREAD, KEEP, OUT,
    s_qb, s_qs, s_qh,
    s_ob, s_os, s_oh,
    s_kb, s_kh, s_km, s_kn,
    H, S, M, scale, bound, shift,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_BLOCK: tl.constexpr,
    POOLED_KEPT: tl.constexpr, COMPENSATE: tl.constexpr, HALF: tl.constexpr, SPREAD_SHIFT: tl.constexpr = False,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < S, o_d < D
    tile = m_m[:, None] & m_d[None, :]
    b_q_in = tl.load(Q + i_b.to(tl.int64) * s_qb + i_h * s_qh + o_m[:, None] * s_qs + o_d[None, :], mask=tile,
                     other=0.0)  # fmt: skip
    b_q = b_q_in.to(tl.float32)
    b_o = tl.load(SPARSE + i_b.to(tl.int64) * s_ob + i_h * s_oh + o_m[:, None] * s_os + o_d[None, :], mask=tile,
                  other=0.0)  # fmt: skip
    b_o = b_o.to(tl.float32)
    b_lse = tl.load(LSE + i_bh * S + o_m, mask=m_m, other=0.0) * _LOG2E  # base 2 from here on
    b_q_norm2 = tl.sum(b_q * b_q, 1)
    rows = o_m // ROW_BLOCK  # the query block of each token, for its row of KEEP
    KM += i_bh * M * D
    VM += i_bh * M * D
    SPREAD += i_bh * M
    KEEP += i_b * s_kb + i_h * s_kh

    # running maximum shared by every sum; the kept part enters as one "value" o of log-mass lse (exact)
    if POOLED_KEPT:
        b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        b_kept = tl.zeros([BLOCK_M], tl.float32)
        b_all = tl.zeros([BLOCK_M], tl.float32)
        b_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    else:
        b_max = b_lse
        b_all = tl.full([BLOCK_M], 1.0, tl.float32)
        b_acc = b_o
    for start in range(0, M, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < M
        b_km = tl.load(KM + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        if HALF:  # tensor-core products in q's dtype, as the block-sparse kernel's logits
            b_qk = tl.dot(b_q_in, tl.trans(b_km.to(b_q_in.dtype)))
        else:
            b_qk = tl.dot(b_q, tl.trans(b_km), input_precision="ieee")
        b_s = (b_qk * scale + tl.load(LOGN + o_n, mask=m_n, other=0.0)[None, :]) * _LOG2E
        b_keep = tl.load(KEEP + rows[:, None] * s_km + o_n[None, :] * s_kn, mask=m_m[:, None] & m_n[None, :], other=0)
        b_keep = b_keep != 0
        if COMPENSATE or SPREAD_SHIFT:
            b_spread = tl.load(SPREAD + o_n, mask=m_n, other=float("inf"))
        if SPREAD_SHIFT:  # + sigma^2 / 2: the mean of exp over the block's logits, to second order
            b_s += tl.where(m_n[None, :], b_q_norm2[:, None] * b_spread[None, :], 0.0) * shift
        if COMPENSATE:
            b_take = ~b_keep & (b_q_norm2[:, None] * b_spread[None, :] < bound) & m_n[None, :]
        else:
            b_take = tl.zeros([BLOCK_M, BLOCK_N], tl.int1)
        if POOLED_KEPT:
            b_s_all = tl.where(m_n[None, :], b_s, float("-inf"))
        else:
            b_s_all = tl.where(b_take, b_s, float("-inf"))
        b_new = tl.maximum(b_max, tl.max(b_s_all, 1))
        b_safe = tl.where(b_new == float("-inf"), 0.0, b_new)
        b_alpha = tl.exp2(b_max - b_safe)
        b_p = tl.exp2(b_s_all - b_safe[:, None])
        b_all = b_all * b_alpha + tl.sum(b_p, 1)
        if POOLED_KEPT:
            b_kept = b_kept * b_alpha + tl.sum(tl.where(b_keep, b_p, 0.0), 1)
        b_p_take = tl.where(b_take, b_p, 0.0)
        b_vm = tl.load(VM + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        if HALF:
            b_pv = tl.dot(b_p_take.to(b_q_in.dtype), b_vm.to(b_q_in.dtype))
        else:
            b_pv = tl.dot(b_p_take, b_vm, input_precision="ieee")
        b_acc = b_acc * b_alpha[:, None] + b_pv
        b_max = b_new
    if POOLED_KEPT:
        b_res = (b_o * b_kept[:, None] + b_acc) / b_all[:, None]
    else:
        b_res = b_acc / b_all[:, None]
    tl.store(OUT + i_b.to(tl.int64) * s_ob + i_h * s_oh + o_m[:, None] * s_os + o_d[None, :],
             b_res.to(OUT.dtype.element_ty), mask=tile)  # fmt: skip


def _check(q, out, lse, k_mean, v_mean, log_counts, spread, keep, row_block):
    b, s, h, d = q.shape
    m = k_mean.shape[2]
    if out.shape != q.shape or lse.shape != (b, h, s):
        raise ValueError(f"out must be q's shape {tuple(q.shape)} and lse [B, H, S], got {tuple(out.shape)}, "
                         f"{tuple(lse.shape)}")  # fmt: skip
    if k_mean.shape != (b, h, m, d) or v_mean.shape != (b, h, m, d) or spread.shape != (b, h, m):
        raise ValueError("k_mean and v_mean must be [B, H, M, D] and spread [B, H, M]")
    if log_counts.shape != (m,) or keep.ndim != 4 or keep.shape[-1] != m or keep.shape[2] != -(-s // row_block):
        raise ValueError(f"log_counts must be [M] and keep [B|1, H|1, ceil(S / {row_block}), M]")


def pooled_correction(
    q: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    k_mean: torch.Tensor,
    v_mean: torch.Tensor,
    log_counts: torch.Tensor,
    spread: torch.Tensor,
    keep: torch.Tensor,
    *,
    row_block: int,
    scale: float,
    pooled_kept: bool = False,
    compensate: bool = True,
    tolerance: float = 1.0,
    spread_shift: bool = False,
) -> torch.Tensor:
    """The corrected output, ``q``'s shape and ``out``'s dtype (see the module docstring).

    Args:
        q, out: ``[B, S, H, D]``; out is the block-sparse output over the kept blocks.
        lse: fp32 ``[B, H, S]``, natural log-sum-exp of the kept logits (the kernel's).
        k_mean, v_mean: fp32 ``[B, H, M, D]`` pooled keys and values; log_counts: ``[M]`` log keys per block.
        spread: fp32 ``[B, H, M]``: mean squared distance of each block's keys to their mean.
        keep: bool ``[B|1, H|1, Mq, M]``, the kept blocks of each query block of ``row_block`` tokens.
    """
    _check(q, out, lse, k_mean, v_mean, log_counts, spread, keep, row_block)
    if torch.is_grad_enabled() and (q.requires_grad or out.requires_grad):
        raise ValueError("pooled_correction is forward only; use pooled_correction_reference to differentiate")
    if not use_triton(q):
        return pooled_correction_reference(
            q, out, lse, k_mean, v_mean, log_counts, spread, keep, row_block=row_block, scale=scale,
            pooled_kept=pooled_kept, compensate=compensate, tolerance=tolerance, spread_shift=spread_shift,
        ).to(out.dtype)
    q, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, out))
    b, s, h, d = q.shape
    m = k_mean.shape[2]
    keep8 = keep.to(torch.int8)
    result = torch.empty_like(out)
    bound = 2 * math.log(2) * tolerance * d / scale**2  # |q|^2 spread < bound  <=>  sigma^2 < 2 ln 2 tolerance
    shift = 0.5 * scale**2 / d * _LOG2E.value  # sigma^2 / 2 in base 2, per unit of |q|^2 spread
    # Half inputs: the products run on tensor cores in q's dtype (as the block-sparse kernel's do), in 32 x 32
    # tiles at 4 warps: ptxas for sm_90a at D = 128 (scripts/compile_kernels_sm90.py) spills nothing there, and
    # 28-404 B per thread at 64 x 32 (4 or 8 warps). fp32 inputs: exact ieee dots, which run as FMA loops and
    # need small tiles (64 x 32 at 4 warps spilled 21 KB per thread; 16 x 16 at 8 warps spills nothing). The
    # 16 x 16 ieee tiles took 14.5 ms at the 1.3B shape with bf16 inputs (profile at 7f5eeaf), against 8.2 ms
    # for the block-sparse pass it corrects.
    # (64 x 64 tiles at D = 64 were timed at 2a3e56d: no measurable change of rectified's time on the reference
    # model's q/k/v, and Triton 3.9's ptxas spills 280 B there.)
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half:
        block_m, block_n, warps = 32, 32, 4
    else:
        block_m, block_n, warps = min(16 if d > 64 else 32, max(16, triton.next_power_of_2(row_block))), 16, 8
    ks = [0 if keep8.shape[i] == 1 else keep8.stride(i) for i in range(2)]
    _pooled_kernel[(triton.cdiv(s, block_m), b * h)](
        q, out, lse.contiguous(), k_mean.contiguous(), v_mean.contiguous(), log_counts.float().contiguous(),
        spread.contiguous(), keep8, result,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        ks[0], ks[1], keep8.stride(2), keep8.stride(3),
        h, s, m, scale, bound, shift,
        D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n, ROW_BLOCK=row_block,
        POOLED_KEPT=pooled_kept, COMPENSATE=compensate, HALF=half, SPREAD_SHIFT=spread_shift, num_warps=warps,
    )  # fmt: skip
    return result


def pooled_correction_reference(
    q: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    k_mean: torch.Tensor,
    v_mean: torch.Tensor,
    log_counts: torch.Tensor,
    spread: torch.Tensor,
    keep: torch.Tensor,
    *,
    row_block: int,
    scale: float,
    pooled_kept: bool = False,
    compensate: bool = True,
    tolerance: float = 1.0,
    spread_shift: bool = False,
    head_group: int = 4,
) -> torch.Tensor:
    """The same in PyTorch, ``head_group`` heads at a time (memory ``B * group * S * M`` floats)."""
    _check(q, out, lse, k_mean, v_mean, log_counts, spread, keep, row_block)
    seq, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    rows = torch.arange(seq, device=q.device) // row_block
    result = torch.empty_like(out)
    for start in range(0, heads, head_group):
        h = slice(start, min(heads, start + head_group))
        qh = q[:, :, h].float().transpose(1, 2)  # [B, g, S, D]
        logits = qh @ k_mean[:, h].transpose(-1, -2) * scale + log_counts.float()  # [B, g, S, M]
        kept = keep[:, h][:, :, rows] if keep.shape[1] > 1 else keep[:, :, rows].expand(-1, qh.shape[1], -1, -1)
        o = out[:, :, h].float().transpose(1, 2)
        if spread_shift or compensate:
            sigma2 = qh.square().sum(-1, keepdim=True) * spread[:, h][:, :, None] * scale**2 / dim
        if spread_shift:
            logits = logits + sigma2 / 2
        if compensate:
            take = ~kept & (sigma2 < 2 * math.log(2) * tolerance)
        else:
            take = torch.zeros_like(kept)
        if pooled_kept:
            lse_all = logits.logsumexp(-1, keepdim=True)
            share = torch.exp(logits.masked_fill(~kept, float("-inf")).logsumexp(-1, keepdim=True) - lse_all)
            weights = torch.exp(logits - lse_all).masked_fill(~take, 0.0)
            o = o * share + weights @ v_mean[:, h]
        else:
            lse_kept = lse[:, h][..., None]
            peak = torch.maximum(lse_kept, logits.masked_fill(~take, float("-inf")).amax(-1, keepdim=True))
            kept_mass = torch.exp(lse_kept - peak)
            weights = torch.exp(logits - peak).masked_fill(~take, 0.0)
            o = (o * kept_mass + weights @ v_mean[:, h]) / (kept_mass + weights.sum(-1, keepdim=True))
        result[:, :, h] = o.transpose(1, 2).to(out.dtype)
    return result
