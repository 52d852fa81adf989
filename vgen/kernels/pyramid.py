"""Pyramid sparse attention (PSA): every (query block, key block) pair reads its keys at one level.

The levels are full resolution, or keys and values mean-pooled over 2, 4 or 8 consecutive tokens,
or the pair is skipped. A pooled key stands for ``p`` keys: its logit gets ``+ ln p``, so the
softmax weighs it like the ``p`` keys it replaces, if they all had the mean key. The pyramids are
built once per call (:func:`build_pyramid`). One Triton program per query tile walks its kept
key blocks once per level, reading tiles of ``block / p`` pooled rows, with one online softmax
across all levels.

Pooling covers whole key blocks only. A ragged last key block is read at full resolution or
skipped.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vgen.kernels.block_sparse import _descriptor_scratch, _load_tile, _mask_strides, _strides3, _unit_last, _use_tma
from vgen.kernels.runtime import use_triton

__all__ = ["LEVELS", "build_pyramid", "build_pyramid_reference", "pyramid_attention", "pyramid_attention_reference"]

LEVELS: tuple[int, ...] = (1, 2, 4, 8)
"""Pool factors of the pyramid levels; a level map holds these values, or 0 for a skipped pair."""
_LOG2E = 1.4426950408889634
# K/V pipeline stages of the full level's loop (TMA tiles) and of the pooled levels' loops (gathered rows) on CUDA.
# `benchmarks/psa_kernel.py` on an H200, psa levels at budget 0.25, whole call ms at 1.3B / 14B: at cb7e6f7 (3, 3)
# 4.69 / 75.6 against (3, 2) 4.89 / 76.7, (2, 2) 5.09 / 80.6, (3, 1) 5.35 / 84.6, no TMA (3, 2) 4.99 / 77.8; at
# c79076f the kernel before (one loop form for every level, 2 stages, no TMA) 6.17 / 95.5. Tried and dropped
# (cb7e6f7): pooled tiles stacked from POOL TMA boxes of block / POOL rows (join, permute, reshape) instead of
# gathered pointer loads, 15.7 / 251 ms: the stacking goes through registers.
STAGES: tuple[int, int] = (3, 3)


def build_pyramid(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    """``x`` ``[B, S, H, D]`` mean-pooled over 1, 2, 4, 8 consecutive tokens of its whole key blocks.

    Returns one contiguous ``[B, (S // block) * block / p, H, D]`` tensor per level; level 1 is
    ``x`` itself (all S tokens). Each level is the mean of pairs of the level before, in fp32, cast
    to ``x``'s dtype. On CUDA (and under the interpreter) one Triton launch reads ``x`` once and writes
    the three pooled levels; elsewhere :func:`build_pyramid_reference`.
    """
    batch, seq, heads, dim = x.shape
    whole = seq // block * block
    if not use_triton(x) or whole == 0:
        return build_pyramid_reference(x, block)
    x = _unit_last(x)  # the kernel reads a row's head dims at unit stride
    pooled = [torch.empty(batch, whole // p, heads, dim, device=x.device, dtype=x.dtype) for p in LEVELS[1:]]
    _pyramid_build_kernel[(whole // block, batch * heads)](
        x, *pooled, *_strides3(x), *(s for t in pooled for s in _strides3(t)), heads,
        D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK=block, num_warps=4,
    )  # fmt: skip
    return [x.contiguous(), *pooled]


def build_pyramid_reference(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    """:func:`build_pyramid` in PyTorch: each level halves the one before, in fp32."""
    seq = x.shape[1]
    whole = seq // block * block
    levels = [x.contiguous()]
    pooled = x[:, :whole]
    for p, previous in zip(LEVELS[1:], LEVELS, strict=False):
        pooled = pooled.unflatten(1, (-1, p // previous)).sum(2, dtype=torch.float32) * (previous / p)
        levels.append(pooled.to(x.dtype).contiguous())
    return levels


@triton.jit
def _rows(X, first, step, s_xs, o_d, m_d, ROWS: tl.constexpr):
    """fp32 rows ``first, first + step, ..`` (ROWS of them) of X."""
    o_r = first + step * tl.arange(0, ROWS)
    return tl.load(X + o_r[:, None] * s_xs + o_d[None, :], mask=m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _put(X, x, first, step, s_xs, o_d, m_d, ROWS: tl.constexpr):
    """Store ``x`` ``[ROWS, BLOCK_D]`` as rows ``first, first + step, ..`` of X."""
    o_r = first + step * tl.arange(0, ROWS)
    tl.store(X + o_r[:, None] * s_xs + o_d[None, :], x.to(X.dtype.element_ty), mask=m_d[None, :])


@triton.jit
def _pyramid_build_kernel(
    X, X2, X4, X8, s_xb, s_xs, s_xh, s_2b, s_2s, s_2h, s_4b, s_4s, s_4h, s_8b, s_8s, s_8h, H,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One whole key block of one (batch, head), read once and written pooled 2x, 4x and 8x.

    The block is read as 8 interleaved row sets ``x_j`` (rows ``8 i + j``), so that every level is an
    elementwise mean of two register tiles, with no reshape: level-2 row ``4 i + j`` is the mean of
    ``x_2j`` and ``x_2j+1`` at ``i``, level-4 row ``2 i + j`` that of level-2 sets ``2 j``, ``2 j + 1``,
    level-8 row ``i`` that of the two level-4 sets."""
    R: tl.constexpr = BLOCK // 8
    i_blk, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    X += i_b * s_xb + i_h * s_xh + i_blk * BLOCK * s_xs
    X2 += i_b * s_2b + i_h * s_2h + i_blk * (BLOCK // 2) * s_2s
    X4 += i_b * s_4b + i_h * s_4h + i_blk * (BLOCK // 4) * s_4s
    X8 += i_b * s_8b + i_h * s_8h + i_blk * R * s_8s
    a0 = (_rows(X, 0, 8, s_xs, o_d, m_d, R) + _rows(X, 1, 8, s_xs, o_d, m_d, R)) * 0.5
    a1 = (_rows(X, 2, 8, s_xs, o_d, m_d, R) + _rows(X, 3, 8, s_xs, o_d, m_d, R)) * 0.5
    a2 = (_rows(X, 4, 8, s_xs, o_d, m_d, R) + _rows(X, 5, 8, s_xs, o_d, m_d, R)) * 0.5
    a3 = (_rows(X, 6, 8, s_xs, o_d, m_d, R) + _rows(X, 7, 8, s_xs, o_d, m_d, R)) * 0.5
    _put(X2, a0, 0, 4, s_2s, o_d, m_d, R)
    _put(X2, a1, 1, 4, s_2s, o_d, m_d, R)
    _put(X2, a2, 2, 4, s_2s, o_d, m_d, R)
    _put(X2, a3, 3, 4, s_2s, o_d, m_d, R)
    b0 = (a0 + a1) * 0.5
    b1 = (a2 + a3) * 0.5
    _put(X4, b0, 0, 2, s_4s, o_d, m_d, R)
    _put(X4, b1, 1, 2, s_4s, o_d, m_d, R)
    _put(X8, (b0 + b1) * 0.5, 0, 1, s_8s, o_d, m_d, R)


def _check_levels(levels: torch.Tensor, seq_k: int, block: int) -> None:
    if levels.dtype not in (torch.int8, torch.int32, torch.int64) or levels.ndim != 4:
        raise ValueError(f"levels must be an integer tensor [B, H, Mq, Mk], got {levels.dtype} {list(levels.shape)}")
    allowed = torch.tensor((0, *LEVELS), device=levels.device)
    if not bool(torch.isin(levels, allowed).all()):
        raise ValueError(f"levels must hold 0 (skip) or a pool factor in {LEVELS}")
    if seq_k % block and bool((levels[..., -1] > 1).any()):
        raise ValueError("the ragged last key block can only be read at full resolution (1) or skipped (0)")


@triton.jit
def _level_desc(X, rows, stride, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """TMA descriptor of one pyramid level ``[rows, D]``, boxes of ROWS rows."""
    return tl.make_tensor_descriptor(X, shape=[rows, D], strides=[stride, 1], block_shape=[ROWS, BLOCK_D])


@triton.jit
def _pyramid_level(
    b_q, b_m, b_l, b_acc, K, V, desc_k, desc_v, p_num, p_idx, s_ks, s_vs, SK, o_d, m_d, qk_scale,
    POOL: tl.constexpr, LOG2_POOL: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
    STAGES: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Walk one level's kept key blocks, updating the running max (in scaled base-2 units), sum and accumulator.

    A pooled key stands for POOL keys: its base-2 logit gets ``+ LOG2_POOL``. A pooled block has
    BLOCK_N / POOL rows; each step gathers POOL kept blocks into one tile of BLOCK_N rows, so that a
    pooled level costs its share of the work and not one full-tile step per block. The full level (POOL 1)
    reads whole key blocks, by TMA where it can (as the block-sparse forward does)."""
    ROWS: tl.constexpr = BLOCK_N // POOL
    n_blocks = tl.load(p_num)
    o_r = tl.arange(0, BLOCK_N)
    o_p = tl.arange(0, POOL)
    if POOL > 1:  # the first tile's block indices; each step loads the next tile's (see below)
        blk = tl.load(p_idx + o_p, mask=o_p < n_blocks, other=0)
    for first in tl.range(0, n_blocks, POOL, num_stages=STAGES):
        if POOL == 1:
            start = tl.load(p_idx + first) * BLOCK_N
            b_k = _load_tile(K, desc_k, start, s_ks, SK, o_d, m_d, BLOCK_N, USE_TMA)
            b_v = _load_tile(V, desc_v, start, s_vs, SK, o_d, m_d, BLOCK_N, USE_TMA)
            b_s = tl.dot(b_q, tl.trans(b_k))
            if start + BLOCK_N > SK:  # only the ragged last block has keys to mask
                b_s = tl.where((start + o_r < SK)[None, :], b_s, float("-inf"))
        else:  # rows p * ROWS .. of the tile: the ROWS pooled rows of kept block first + p
            m_p = first + o_p < n_blocks
            m_n = tl.reshape(tl.broadcast_to(m_p[:, None], [POOL, ROWS]), [BLOCK_N])
            # POOL block indices, not one per row; a slot past the row's blocks reads block 0's rows (they
            # exist: a pooled pair implies a whole key block) and its scores are masked below, so the loads
            # need a mask only for head dims short of BLOCK_D. (Its values get weight 0: a non-finite value
            # there, an fp16 overflow in block 0's pooled V, would turn the row's output into NaN.)
            o_n = tl.reshape(blk[:, None] * ROWS + tl.arange(0, ROWS)[None, :], [BLOCK_N])
            # The next tile's indices, carried into the next step. Loaded in the step that uses them, they
            # made the gathers an indirect load: Triton 3.6's pipeliner then spent a stage on the indices and
            # issued each step's K/V copies only one step ahead (2 buffers, the copy waited on at once at the
            # next step's top); carried, the gathers are direct loads, issued two steps ahead (3 buffers).
            blk = tl.load(p_idx + first + POOL + o_p, mask=first + POOL + o_p < n_blocks, other=0)
            if BLOCK_D == D:
                b_k = tl.load(K + o_n[:, None] * s_ks + o_d[None, :])
                b_v = tl.load(V + o_n[:, None] * s_vs + o_d[None, :])
            else:
                b_k = tl.load(K + o_n[:, None] * s_ks + o_d[None, :], mask=m_d[None, :], other=0.0)
                b_v = tl.load(V + o_n[:, None] * s_vs + o_d[None, :], mask=m_d[None, :], other=0.0)
            b_s = tl.dot(b_q, tl.trans(b_k))
            if first + POOL > n_blocks:  # only the last, partly filled tile has rows to mask
                b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        # raw products: the scale and the pool's bias fold into one multiply-add per score
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale + LOG2_POOL)
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.exp2(b_s * qk_scale - (b_m_safe - LOG2_POOL)[:, None])
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        # the rescaled accumulator goes into the MMA as its addend: no separate add pass
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None])
        b_m = b_m_new
    return b_m, b_l, b_acc


@triton.jit
def _pyramid_fwd_kernel(
    Q, K1, V1, K2, V2, K4, V4, K8, V8, OUT, LSE, NUM, IDX,
    s_qb, s_qs, s_qh,
    s_k1b, s_k1s, s_k1h, s_k2b, s_k2s, s_k2h, s_k4b, s_k4s, s_k4h, s_k8b, s_k8s, s_k8h,
    s_ob, s_os, s_oh,
    s_nl, s_nb, s_nh, s_nm,
    s_il, s_ib, s_ih, s_im,
    H, SQ, SK, qk_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RETURN_LSE: tl.constexpr,
    USE_TMA: tl.constexpr, POOLED: tl.constexpr, FULL_STAGES: tl.constexpr, POOLED_STAGES: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < SQ, o_d < D
    b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + o_m[:, None] * s_qs + o_d[None, :],
                  mask=m_m[:, None] & m_d[None, :], other=0.0)  # fmt: skip
    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_num = NUM + i_b * s_nb + i_h * s_nh + i_m * s_nm
    row_idx = IDX + i_b * s_ib + i_h * s_ih + i_m * s_im
    # the K and V pyramids share strides level by level (values are built like keys)
    K1 += i_b * s_k1b + i_h * s_k1h
    V1 += i_b * s_k1b + i_h * s_k1h
    desc_k = None
    desc_v = None
    if USE_TMA:  # the full level's whole key blocks by TMA
        desc_k = _level_desc(K1, SK, s_k1s, D, BLOCK_N, BLOCK_D)
        desc_v = _level_desc(V1, SK, s_k1s, D, BLOCK_N, BLOCK_D)
    b_m, b_l, b_acc = _pyramid_level(b_q, b_m, b_l, b_acc, K1, V1, desc_k, desc_v, row_num, row_idx, s_k1s, s_k1s, SK,
                                     o_d, m_d, qk_scale, 1, 0.0, BLOCK_N, USE_TMA, FULL_STAGES, D, BLOCK_D)  # fmt: skip
    if POOLED:  # False: a plain selection, no pyramid built
        K2 += i_b * s_k2b + i_h * s_k2h
        V2 += i_b * s_k2b + i_h * s_k2h
        K4 += i_b * s_k4b + i_h * s_k4h
        V4 += i_b * s_k4b + i_h * s_k4h
        K8 += i_b * s_k8b + i_h * s_k8h
        V8 += i_b * s_k8b + i_h * s_k8h
        b_m, b_l, b_acc = _pyramid_level(b_q, b_m, b_l, b_acc, K2, V2, None, None, row_num + s_nl,
                                         row_idx + s_il, s_k2s, s_k2s, SK, o_d, m_d, qk_scale, 2, 1.0, BLOCK_N,
                                         False, POOLED_STAGES, D, BLOCK_D)  # fmt: skip
        b_m, b_l, b_acc = _pyramid_level(b_q, b_m, b_l, b_acc, K4, V4, None, None, row_num + 2 * s_nl,
                                         row_idx + 2 * s_il, s_k4s, s_k4s, SK, o_d, m_d, qk_scale, 4, 2.0, BLOCK_N,
                                         False, POOLED_STAGES, D, BLOCK_D)  # fmt: skip
        b_m, b_l, b_acc = _pyramid_level(b_q, b_m, b_l, b_acc, K8, V8, None, None, row_num + 3 * s_nl,
                                         row_idx + 3 * s_il, s_k8s, s_k8s, SK, o_d, m_d, qk_scale, 8, 3.0, BLOCK_N,
                                         False, POOLED_STAGES, D, BLOCK_D)  # fmt: skip
    b_o = b_acc / tl.where(b_l == 0.0, 1.0, b_l)[:, None]
    p_o = OUT + i_b * s_ob + i_h * s_oh + o_m[:, None] * s_os + o_d[None, :]
    tl.store(p_o, b_o.to(OUT.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    if RETURN_LSE:  # natural log; -inf for a row that kept nothing
        b_log = (b_m + tl.log2(tl.where(b_l == 0.0, 1.0, b_l))) * 0.6931471805599453
        b_lse = tl.where(b_l == 0.0, float("-inf"), b_log)
        tl.store(LSE + i_bh * SQ + o_m, b_lse, mask=m_m)


def _level_lists(levels: torch.Tensor, factors=LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pool factor, the kept key blocks of each row: counts ``[F, B, H, Mq]``, indices ``[F, B, H, Mq, Mk]``."""
    from vgen.attention.block_mask import _compact

    factors = torch.tensor(factors, device=levels.device, dtype=levels.dtype).view(-1, 1, 1, 1, 1)
    counts, indices = _compact(levels[None] == factors)  # one compaction for all the factors
    return counts.contiguous(), indices.contiguous()


def pyramid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    levels: torch.Tensor,
    *,
    block: int = 128,
    scale: float | None = None,
    check_levels: bool = True,
    return_lse: bool = False,
    pooled: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention where pair (query block i, key block j) reads keys pooled by ``levels[b, h, i, j]``.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, H, D]`` (Sk may differ: a ring step reads another rank's
            keys), bf16/fp16/fp32, ``D`` at most 256.
        levels: integer ``[B or 1, H or 1, Mq, Mk]`` with 0 (skip) or a factor of :data:`LEVELS`.
        block: query and key block size, a power of two >= 128 (so that an 8x-pooled tile has 16 rows).
        scale: softmax scale (default ``D ** -0.5``).
        check_levels: validate ``levels``' values (two host synchronisations); callers that build
            valid levels themselves skip it.
        return_lse: also return the natural-log log-sum-exp ``[B, H, Sq]`` (fp32; ``-inf`` for a row
            with no kept pair), pooled keys counted with their ``+ ln p``.
        pooled: False promises that ``levels`` holds only 0 and 1 (a plain block-sparse selection): no
            pyramid is built and only full-resolution pairs are read (pooled ones would be skipped;
            ``check_levels`` rejects them).

    Returns:
        ``[B, Sq, H, D]`` in q's dtype (and the log-sum-exp); a row with no kept pair is 0. Forward only.
    """
    batch, seq, heads, dim = q.shape
    seq_k = k.shape[1]
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"q must be [B, Sq, H, D] and k, v one [B, Sk, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    if block < 128 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 128 (8x pooling needs 16-row tiles), got {block}")
    blocks, blocks_k = -(-seq // block), -(-seq_k // block)
    fits = levels.shape[-2:] == (blocks, blocks_k) and levels.shape[0] in (1, batch) and levels.shape[1] in (1, heads)
    if not fits:
        raise ValueError(f"levels must be [B or 1, H or 1, {blocks}, {blocks_k}], got {list(levels.shape)}")
    if check_levels:
        _check_levels(levels, seq_k, block)
        if not pooled and bool((levels > 1).any()):
            raise ValueError("pooled=False, but levels hold pooled pairs (factors above 1)")
    scale = dim**-0.5 if scale is None else scale
    if not use_triton(q):
        return pyramid_attention_reference(q, k, v, levels, block=block, scale=scale, return_lse=return_lse)
    if pooled:
        pk, pv = build_pyramid(k, block), build_pyramid(v, block)
    else:  # the kernel reads the full level only
        pk, pv = [k.contiguous()] * len(LEVELS), [v.contiguous()] * len(LEVELS)
    num, idx = _level_lists(levels, LEVELS if pooled else LEVELS[:1])
    use_tma = _use_tma(pk[0], pv[0])
    if use_tma:
        _descriptor_scratch(q.device)
    stages = STAGES if q.is_cuda else (1, 1)
    q = _unit_last(q)  # the kernel reads and writes a row's head dims at unit stride
    out = torch.empty(batch, seq, heads, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq), dtype=torch.float32, device=q.device) if return_lse else out
    key_strides = [s for x in pk for s in _strides3(x)]
    grid = (blocks, batch * heads)
    _pyramid_fwd_kernel[grid](
        q, pk[0], pv[0], pk[1], pv[1], pk[2], pv[2], pk[3], pv[3], out, lse, num, idx,
        *_strides3(q), *key_strides, *_strides3(out),
        num.stride(0), *_mask_strides(num[0]), idx.stride(0), *_mask_strides(idx[0]),
        heads, seq, seq_k, scale * _LOG2E,
        D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_M=block, BLOCK_N=block, RETURN_LSE=return_lse,
        USE_TMA=use_tma, POOLED=pooled, FULL_STAGES=stages[0], POOLED_STAGES=stages[1], num_warps=8 if q.is_cuda else 4,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def pyramid_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, levels: torch.Tensor, *, block: int = 128,
    scale: float | None = None, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """fp32 PyTorch: all pyramid keys side by side, each query row masked to the pooled keys its
    level map selects, logits of a ``p``-pooled key ``+ ln p``."""
    batch, seq, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    pk, pv = build_pyramid_reference(k.float(), block), build_pyramid_reference(v.float(), block)
    keys, values, biases, allowed = [], [], [], []
    rows = torch.arange(seq, device=q.device) // block
    full_levels = levels.expand(batch, heads, -1, -1)
    for p, kl, vl in zip(LEVELS, pk, pv, strict=True):
        columns = torch.arange(kl.shape[1], device=q.device) * p // block  # key block of each pooled key
        keys.append(kl)
        values.append(vl)
        biases.append(torch.full((kl.shape[1],), math.log(p), device=q.device))
        allowed.append(full_levels[:, :, rows][:, :, :, columns] == p)  # [B, H, Sq, Sk_p]
    k_all, v_all, bias, mask = torch.cat(keys, 1), torch.cat(values, 1), torch.cat(biases), torch.cat(allowed, -1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k_all) * scale + bias
    logits = logits.masked_fill(~mask, float("-inf"))
    top = logits.amax(-1, keepdim=True)
    top = torch.where(top == float("-inf"), 0.0, top)
    weights = torch.exp(logits - top)
    total = weights.sum(-1, keepdim=True)
    out = torch.einsum("bhqk,bkhd->bqhd", weights / torch.where(total == 0, 1.0, total), v_all).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(total == 0, float("-inf"), top + torch.log(torch.where(total == 0, 1.0, total)))[..., 0]
    return out, lse
