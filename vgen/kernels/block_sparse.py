"""Block-sparse attention: Triton forward and backward over a BlockMask.

q, k, v are ``[B, S, H, D]`` (any strides with a unit last stride). Each program owns one
query tile and walks the key blocks its mask row keeps (the backward's dK/dV programs walk
the transposed mask). Ragged last blocks are masked in the kernel (with PEEL_RAGGED the forward
masks only the ragged last key block, walked after its loop). The softmax runs in
base 2 with the scale folded into one multiply; the log-sum-exp is returned in natural log.

File order: forward kernel, backward kernels, host launchers, autograd.Function, public function.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from vgen.kernels.runtime import use_triton

if TYPE_CHECKING:
    from vgen.attention.block_mask import BlockMask

__all__ = ["block_sparse_attention", "block_sparse_attention_reference"]

_LOG2E = 1.4426950408889634


@triton.jit
def _tile_start(p_idx, it, SUB: tl.constexpr, MASK: tl.constexpr, BLOCK: tl.constexpr):
    """First token of the ``it``-th tile of a mask row's kept blocks (each kept mask block holds SUB tiles): key
    tiles in the forward and dQ loops, query tiles in the dK/dV loop."""
    return tl.load(p_idx + it // SUB) * MASK + (it % SUB) * BLOCK


@triton.jit
def _peel_split(p_idx, n_blocks, S, M, MASK: tl.constexpr, SUB: tl.constexpr):
    """(the ragged last mask block, tiles of the unmasked loop) for a row keeping ``n_blocks`` blocks of ``p_idx``
    (an ascending list). The ragged block holds positions past S (M, the block count, when none does); when the row
    keeps it, it is the list's last entry, and its SUB tiles are left out of the loop, to be walked after it."""
    ragged = tl.where(S % MASK != 0, M - 1, M)
    last = tl.load(p_idx + tl.maximum(n_blocks - 1, 0))  # p_idx[0] exists in every row
    return ragged, (n_blocks - ((n_blocks > 0) & (last == ragged)).to(tl.int32)) * SUB


@triton.jit
def _out_of_place(blk, ragged):
    """1 for a block met in the unmasked loop that must not be there: the ragged block itself (a list out of order),
    or an index outside [0, M); else 0. The peeled kernels turn a row that met one into NaN."""
    return ((blk >= ragged) | (blk < 0)).to(tl.int32)


@triton.jit
def _load_tile(ptr, desc, start, stride, SK, o_d, m_d, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """[BLOCK_N, BLOCK_D] rows ``start ..`` of K or V; rows past SK and columns past D read as 0."""
    if USE_TMA:
        return desc.load([start, 0])
    o_n = start + tl.arange(0, BLOCK_N)
    return tl.load(ptr + o_n[:, None] * stride + o_d[None, :], mask=(o_n < SK)[:, None] & m_d[None, :], other=0.0)


@triton.jit
def _load_kv(K, V, desc_k, desc_v, start, s_ks, s_vs, SK, o_d, m_d, v_plane, BLOCK_N: tl.constexpr,
             USE_TMA: tl.constexpr, ONE_DESC: tl.constexpr):
    """The K and V tiles at key ``start``: from their own descriptors (or pointers), or from the two planes of one."""
    if ONE_DESC:
        b_k = desc_k.load([1 - v_plane, start, 0])
        b_v = desc_k.load([v_plane, start, 0])
        b_k = b_k.reshape(b_k.shape[1], b_k.shape[2])
        b_v = b_v.reshape(b_v.shape[1], b_v.shape[2])
    else:
        b_k = _load_tile(K, desc_k, start, s_ks, SK, o_d, m_d, BLOCK_N, USE_TMA)
        b_v = _load_tile(V, desc_v, start, s_vs, SK, o_d, m_d, BLOCK_N, USE_TMA)
    return b_k, b_v


@triton.jit
def _fwd_tile(b_q, b_k, b_v, start, b_m, b_l, b_acc, SK, qk_scale, BLOCK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the online softmax: the running maxima, row sums and accumulator after it. MASKED: 0, every
    key counts; 1, keys past SK take no weight, and a row may still have none (-inf maxima); 2, as 1 when the tile
    reaches past SK (a run-time branch per tile)."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
    if MASKED == 1:
        b_s = tl.where((start + tl.arange(0, BLOCK_N) < SK)[None, :], b_s, float("-inf"))
    elif MASKED == 2:
        if start + BLOCK_N > SK:  # only the ragged last tile has keys to mask
            b_s = tl.where((start + tl.arange(0, BLOCK_N) < SK)[None, :], b_s, float("-inf"))
    # maxima in scaled units, so the scale folds into one multiply-add per score
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)
    if MASKED:  # a tile whose keys are all past SK leaves -inf maxima: keep exp2 finite
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    else:
        b_m_safe = b_m_new
    b_p = tl.exp2(b_s * qk_scale - b_m_safe[:, None])
    b_alpha = tl.exp2(b_m - b_m_safe)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    # the rescaled accumulator goes into the MMA as its addend: no separate add pass
    b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], input_precision=DOT_PRECISION)
    return b_m_new, b_l, b_acc


@triton.jit
def _heavy_first_kernel(NUM, ORDER, s_nb, s_nh, s_nm, MH, M, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """ORDER[g, rank] = row | count << 32 for the M rows of group g (one (batch, head) of the mask), ranked by
    descending count, ties in row order: rank(i) = #{j: c_j > c_i} + #{j < i: c_j == c_i}."""
    g, i_c = tl.program_id(0), tl.program_id(1)
    p_num = NUM + (g // MH) * s_nb + (g % MH) * s_nh
    o_i = i_c * BLOCK_I + tl.arange(0, BLOCK_I)
    m_i = o_i < M
    # a count below 0 (a malformed mask) ranks as 0, as its walk in index order would be empty
    c_i = tl.maximum(tl.load(p_num + o_i * s_nm, mask=m_i, other=0), 0)
    rank = tl.zeros([BLOCK_I], tl.int32)
    for j0 in range(0, M, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = o_j < M
        c_j = tl.maximum(tl.load(p_num + o_j * s_nm, mask=m_j, other=0), 0)
        before = (c_j[None, :] > c_i[:, None]) | ((c_j[None, :] == c_i[:, None]) & (o_j[None, :] < o_i[:, None]))
        rank += tl.sum((before & m_j[None, :]).to(tl.int32), 1)  # rows past M rank nothing
    tl.store(ORDER + g * M + rank, o_i.to(tl.int64) | (c_i.to(tl.int64) << 32), mask=m_i)


@triton.jit
def _ordered(ORDER, i_b, i_h, s_rb, s_rh, pid, SUB: tl.constexpr, BLOCK: tl.constexpr, S):
    """(tile, its row's count) for program ``pid`` of a (batch, head) when rows go heaviest first: the row ranked
    pid // SUB in ORDER (row | count << 32), and its sub-tile pid % SUB (SUB tiles of BLOCK per mask block). A
    tile wholly past the sequence's S positions (the last mask block's second tile, say, which this launch also
    runs) gets a count of 0: it walks nothing and stores nothing."""
    packed = tl.load(ORDER + i_b * s_rb + i_h * s_rh + pid // SUB)
    tile = (packed & 0xFFFFFFFF).to(tl.int32) * SUB + pid % SUB
    return tile, tl.where(tile * BLOCK < S, (packed >> 32).to(tl.int32), 0)


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, KV_NUM, KV_IDX, ORDER,
    s_qb, s_qs, s_qh,
    s_kb, s_ks, s_kh,
    s_vb, s_vs, s_vh,
    s_ob, s_os, s_oh,
    s_nb, s_nh, s_nm,
    s_ib, s_ih, s_im,
    s_nrb, s_nrh,
    H, SQ, SK, MK, qk_scale, kv_gap, v_plane,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, CARRY_INDEX: tl.constexpr, PEEL: tl.constexpr = False,
    INDEX_EARLY: tl.constexpr = False, ONE_DESC: tl.constexpr = False, HEAVY_FIRST: tl.constexpr = False,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    if HEAVY_FIRST:  # program i_m of a head takes a tile of the row ranked i_m // SUB_M by kept blocks, and its count
        i_m, n_blocks = _ordered(ORDER, i_b, i_h, s_nrb, s_nrh, i_m, MASK_M // BLOCK_M, BLOCK_M, SQ)
    i_row = i_m * BLOCK_M // MASK_M
    SUB: tl.constexpr = MASK_N // BLOCK_N

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < SQ, o_d < D
    p_q = Q + i_b * s_qb + i_h * s_qh + o_m[:, None] * s_qs + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)

    if not HEAVY_FIRST:
        n_blocks = tl.load(KV_NUM + i_b * s_nb + i_h * s_nh + i_row * s_nm)
    n_it = n_blocks * SUB
    p_idx = KV_IDX + i_b * s_ib + i_h * s_ih + i_row * s_im
    K += i_b * s_kb + i_h * s_kh
    V += i_b * s_vb + i_h * s_vh
    desc_k = None
    desc_v = None
    if USE_TMA and not ONE_DESC:  # (ONE_DESC builds its one descriptor after the index loads, below)
        desc_k = tl.make_tensor_descriptor(K, shape=[SK, D], strides=[s_ks, 1], block_shape=[BLOCK_N, BLOCK_D])
        if not INDEX_EARLY:
            desc_v = tl.make_tensor_descriptor(V, shape=[SK, D], strides=[s_vs, 1], block_shape=[BLOCK_N, BLOCK_D])

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # PEEL: the ragged last mask block (keys past SK), when kept, is the list's last entry (ascending lists); its
    # tiles alone are masked, after the loop. Met anywhere else in the loop (a list out of order), or an index
    # outside [0, MK) met there, the row's output becomes NaN, not silently wrong (a repeated index is not
    # detected, with or without PEEL). Without PEEL every tile checks whether it reaches past SK.
    n_loop = n_it
    if PEEL:
        ragged, n_loop = _peel_split(p_idx, n_blocks, SK, MK, MASK_N, SUB)
    misplaced = n_it * 0
    if CARRY_INDEX:  # the first tile's start; each step loads the next one's (p_idx[0] exists in every row)
        start_next = _tile_start(p_idx, 0, SUB, MASK_N, BLOCK_N)
    if ONE_DESC:  # K and V as the two planes of one [2, SK, D] view: plane v_plane is V, kv_gap elements apart
        desc_k = tl.make_tensor_descriptor(K - kv_gap * (1 - v_plane), shape=[2, SK, D], strides=[kv_gap, s_ks, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_D])
        desc_v = desc_k
    elif USE_TMA and INDEX_EARLY:  # see INDEX_EARLY: the row's index loads above are in flight while this is built
        desc_v = tl.make_tensor_descriptor(V, shape=[SK, D], strides=[s_vs, 1], block_shape=[BLOCK_N, BLOCK_D])
    for it in tl.range(0, n_loop, warp_specialize=WARP_SPECIALIZE):
        if CARRY_INDEX:
            start = start_next
            start_next = _tile_start(p_idx, tl.minimum(it + 1, n_loop - 1), SUB, MASK_N, BLOCK_N)
        else:
            start = _tile_start(p_idx, it, SUB, MASK_N, BLOCK_N)
        b_k, b_v = _load_kv(K, V, desc_k, desc_v, start, s_ks, s_vs, SK, o_d, m_d, v_plane, BLOCK_N, USE_TMA,
                            ONE_DESC)
        if PEEL:
            misplaced += _out_of_place(start // MASK_N, ragged)
        b_m, b_l, b_acc = _fwd_tile(b_q, b_k, b_v, start, b_m, b_l, b_acc, SK, qk_scale, BLOCK_N, DOT_PRECISION,
                                    MASKED=0 if PEEL else 2)  # fmt: skip
    if PEEL:
        if n_loop < n_it:  # the ragged block's tiles (past SK: no weight)
            for t in tl.static_range(SUB):
                start = ragged * MASK_N + t * BLOCK_N
                b_k, b_v = _load_kv(K, V, desc_k, desc_v, start, s_ks, s_vs, SK, o_d, m_d, v_plane, BLOCK_N,
                                    USE_TMA, ONE_DESC)
                b_m, b_l, b_acc = _fwd_tile(b_q, b_k, b_v, start, b_m, b_l, b_acc, SK, qk_scale, BLOCK_N,
                                            DOT_PRECISION, MASKED=1)  # fmt: skip
        b_l = tl.where(misplaced > 0, float("nan"), b_l)

    b_empty = b_l == 0.0
    b_o = b_acc / tl.where(b_empty, 1.0, b_l)[:, None]
    # natural-log LSE: (m + log2 l) / log2(e); a row with no key kept gets -inf
    b_lse = tl.where(b_empty, float("-inf"), (b_m + tl.log2(tl.where(b_empty, 1.0, b_l))) * 0.6931471805599453)
    p_o = OUT + i_b * s_ob + i_h * s_oh + o_m[:, None] * s_os + o_d[None, :]
    tl.store(p_o, b_o.to(OUT.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(LSE + i_bh * SQ + o_m, b_lse, mask=m_m)


@triton.jit
def _bwd_preprocess_kernel(
    OUT, DO, DLSE, DELTA,
    s_ob, s_os, s_oh,
    s_db, s_ds, s_dh,
    H, SQ,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_md = (o_m < SQ)[:, None] & (o_d < D)[None, :]
    b_o = tl.load(OUT + i_b * s_ob + i_h * s_oh + o_m[:, None] * s_os + o_d[None, :], mask=m_md, other=0.0)
    b_do = tl.load(DO + i_b * s_db + i_h * s_dh + o_m[:, None] * s_ds + o_d[None, :], mask=m_md, other=0.0)
    # delta = rowsum(dO * O) - dLSE: the softmax backward's row term, with the LSE's own gradient folded in
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    if HAS_DLSE:
        b_delta -= tl.load(DLSE + i_bh * SQ + o_m, mask=o_m < SQ, other=0.0)
    tl.store(DELTA + i_bh * SQ + o_m, b_delta, mask=o_m < SQ)


@triton.jit
def _dkdv_tile(Q, DO, LSE, DELTA, DQ_ACC, desc_dq, b_k, b_v, b_dk, b_dv, start, o_d, s_qs, s_ds, s_as, SQ, qk_scale,
               D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr,
               REDUCE_TMA: tl.constexpr, MASKED: tl.constexpr):
    """One query tile of a key tile's dK and dV (and its dQ share with FUSED_DQ). The loads always mask rows past
    SQ; MASKED: 0, P is not masked (enough: see the kernel's PEEL); 2, P of queries past SQ is zero when the tile
    reaches past SQ."""
    o_m = start + tl.arange(0, BLOCK_M)
    m_m = o_m < SQ
    m_md = m_m[:, None] & (o_d < D)[None, :]
    b_q = tl.load(Q + o_m[:, None] * s_qs + o_d[None, :], mask=m_md, other=0.0)
    b_do = tl.load(DO + o_m[:, None] * s_ds + o_d[None, :], mask=m_md, other=0.0)
    b_lse = tl.load(LSE + o_m, mask=m_m, other=0.0) * 1.4426950408889634
    b_delta = tl.load(DELTA + o_m, mask=m_m, other=0.0)
    # [BLOCK_N, BLOCK_M]: P^T recomputed from the saved LSE; padded queries contribute nothing
    b_pt = tl.exp2(tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * qk_scale - b_lse[None, :])
    if MASKED == 2:
        if start + BLOCK_M > SQ:  # only the ragged last tile has queries to mask
            b_pt = tl.where(m_m[None, :], b_pt, 0.0)
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
    if FUSED_DQ:
        b_dq = tl.dot(tl.trans(b_dst.to(b_k.dtype)), b_k, input_precision=DOT_PRECISION)  # [BLOCK_M, D]
        if REDUCE_TMA:
            desc_dq.atomic_add([start, 0], b_dq)
        else:
            tl.atomic_add(DQ_ACC + o_m[:, None] * s_as + o_d[None, :], b_dq, mask=m_md, sem="relaxed")
    return b_dk, b_dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_NUM, Q_IDX, DQ_ACC, ORDER,
    s_qb, s_qs, s_qh,
    s_kb, s_ks, s_kh,
    s_vb, s_vs, s_vh,
    s_db, s_ds, s_dh,
    s_dkb, s_dks, s_dkh,
    s_nb, s_nh, s_nm,
    s_ib, s_ih, s_im,
    s_ab, s_as, s_ah,
    s_nrb, s_nrh,
    H, SQ, SK, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FUSED_DQ: tl.constexpr = False, REDUCE_TMA: tl.constexpr = False, CARRY_INDEX: tl.constexpr = False,
    PEEL: tl.constexpr = False, HEAVY_FIRST: tl.constexpr = False,
):
    # FUSED_DQ: also add each tile's dS K into the fp32 dQ accumulator DQ_ACC ([B, S, H, D], unscaled), by a
    # TMA reduce (REDUCE_TMA) or element atomics, so that no second kernel recomputes P for dQ. PEEL: P takes no
    # query mask at all. It needs none: a query past SQ loads q = dO = 0 and LSE = delta = 0, so its P is 1 and
    # every product it enters is zero (its dQ rows, with FUSED_DQ, are not stored). The walk's order then does not
    # matter either, so unlike the forward and the dQ kernel there is nothing to peel or to check
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    if HEAVY_FIRST:  # key columns by descending count of kept query blocks (see the forward)
        i_n, n_q = _ordered(ORDER, i_b, i_h, s_nrb, s_nrh, i_n, MASK_N // BLOCK_N, BLOCK_N, SK)
    i_col = i_n * BLOCK_N // MASK_N

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_nd = (o_n < SK)[:, None] & (o_d < D)[None, :]
    b_k = tl.load(K + i_b * s_kb + i_h * s_kh + o_n[:, None] * s_ks + o_d[None, :], mask=m_nd, other=0.0)
    b_v = tl.load(V + i_b * s_vb + i_h * s_vh + o_n[:, None] * s_vs + o_d[None, :], mask=m_nd, other=0.0)

    if not HEAVY_FIRST:
        n_q = tl.load(Q_NUM + i_b * s_nb + i_h * s_nh + i_col * s_nm)
    p_idx = Q_IDX + i_b * s_ib + i_h * s_ih + i_col * s_im
    Q += i_b * s_qb + i_h * s_qh
    DO += i_b * s_db + i_h * s_dh
    LSE += i_bh * SQ
    DELTA += i_bh * SQ

    b_dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    desc_dq = None
    if FUSED_DQ:
        DQ_ACC += i_b.to(tl.int64) * s_ab + i_h * s_ah
        if REDUCE_TMA:  # rows past SQ are clipped by the descriptor's bounds
            desc_dq = tl.make_tensor_descriptor(DQ_ACC, shape=[SQ, D], strides=[s_as, 1],
                                                block_shape=[BLOCK_M, BLOCK_D])  # fmt: skip
    SUB: tl.constexpr = MASK_M // BLOCK_M
    # one flat loop over query tiles (SUB per kept mask block), as in the forward: the pipeliner prefetches
    # the next tile's q and dO while this one computes, which a nested loop over sub-tiles prevented
    if CARRY_INDEX:  # the first tile's start; each step loads the next one's (see the forward's CARRY_INDEX)
        start_next = _tile_start(p_idx, 0, SUB, MASK_M, BLOCK_M)
    for it in range(n_q * SUB):
        if CARRY_INDEX:
            start = start_next
            start_next = _tile_start(p_idx, tl.minimum(it + 1, n_q * SUB - 1), SUB, MASK_M, BLOCK_M)
        else:
            start = _tile_start(p_idx, it, SUB, MASK_M, BLOCK_M)
        b_dk, b_dv = _dkdv_tile(Q, DO, LSE, DELTA, DQ_ACC, desc_dq, b_k, b_v, b_dk, b_dv, start, o_d, s_qs, s_ds, s_as,
                                SQ, qk_scale, D, BLOCK_M, DOT_PRECISION, FUSED_DQ, REDUCE_TMA,
                                MASKED=0 if PEEL else 2)  # fmt: skip

    p_dk = DK + i_b * s_dkb + i_h * s_dkh + o_n[:, None] * s_dks + o_d[None, :]
    p_dv = DV + i_b * s_dkb + i_h * s_dkh + o_n[:, None] * s_dks + o_d[None, :]
    tl.store(p_dk, (b_dk * sm_scale).to(DK.dtype.element_ty), mask=m_nd)
    tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=m_nd)


@triton.jit
def _dq_tile(K, V, b_q, b_do, b_lse, b_delta, b_dq, start, o_d, m_d, s_ks, s_vs, SK, qk_scale, BLOCK_N: tl.constexpr,
             DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of a query tile's dQ; the loads always mask keys past SK, MASKED as in :func:`_dkdv_tile`."""
    o_n = start + tl.arange(0, BLOCK_N)
    m_n = o_n < SK
    m_nd = m_n[:, None] & m_d[None, :]
    b_k = tl.load(K + o_n[:, None] * s_ks + o_d[None, :], mask=m_nd, other=0.0)
    b_v = tl.load(V + o_n[:, None] * s_vs + o_d[None, :], mask=m_nd, other=0.0)
    b_p = tl.exp2(tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale - b_lse[:, None])
    if MASKED == 1:
        b_p = tl.where(m_n[None, :], b_p, 0.0)
    elif MASKED == 2:
        if start + BLOCK_N > SK:  # only the ragged last tile has keys to mask
            b_p = tl.where(m_n[None, :], b_p, 0.0)
    b_ds = b_p * (tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION) - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_NUM, KV_IDX, ORDER,
    s_qb, s_qs, s_qh,
    s_kb, s_ks, s_kh,
    s_vb, s_vs, s_vh,
    s_db, s_ds, s_dh,
    s_dqb, s_dqs, s_dqh,
    s_nb, s_nh, s_nm,
    s_ib, s_ih, s_im,
    s_nrb, s_nrh,
    H, SQ, SK, MK, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_M: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, CARRY_INDEX: tl.constexpr = False,
    PEEL: tl.constexpr = False, HEAVY_FIRST: tl.constexpr = False,
):
    # PEEL: as the forward's (the ragged last key block walked last, with the key mask on P; the loads keep their
    # masks); a misplaced ragged block, or an index outside [0, MK) met in the loop, makes the row's dQ NaN. (The
    # key mask matters only when a row's LSE is below about -88: a key past SK loads as zeros, so its P is
    # exp(-lse), finite above that, and its products are zero.)
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    if HEAVY_FIRST:  # query rows by descending count of kept key blocks (see the forward)
        i_m, n_kv = _ordered(ORDER, i_b, i_h, s_nrb, s_nrh, i_m, MASK_M // BLOCK_M, BLOCK_M, SQ)
    i_row = i_m * BLOCK_M // MASK_M

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < SQ, o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + o_m[:, None] * s_qs + o_d[None, :], mask=m_md, other=0.0)
    b_do = tl.load(DO + i_b * s_db + i_h * s_dh + o_m[:, None] * s_ds + o_d[None, :], mask=m_md, other=0.0)
    b_lse = tl.load(LSE + i_bh * SQ + o_m, mask=m_m, other=0.0) * 1.4426950408889634
    b_delta = tl.load(DELTA + i_bh * SQ + o_m, mask=m_m, other=0.0)

    if not HEAVY_FIRST:
        n_kv = tl.load(KV_NUM + i_b * s_nb + i_h * s_nh + i_row * s_nm)
    p_idx = KV_IDX + i_b * s_ib + i_h * s_ih + i_row * s_im
    K += i_b * s_kb + i_h * s_kh
    V += i_b * s_vb + i_h * s_vh

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    SUB: tl.constexpr = MASK_N // BLOCK_N
    n_it = n_kv * SUB
    n_loop = n_it
    if PEEL:
        ragged, n_loop = _peel_split(p_idx, n_kv, SK, MK, MASK_N, SUB)
    misplaced = n_it * 0
    if CARRY_INDEX:
        start_next = _tile_start(p_idx, 0, SUB, MASK_N, BLOCK_N)
    for it in range(n_loop):  # one flat loop over key tiles, as in the dK/dV kernel
        if CARRY_INDEX:
            start = start_next
            start_next = _tile_start(p_idx, tl.minimum(it + 1, n_loop - 1), SUB, MASK_N, BLOCK_N)
        else:
            start = _tile_start(p_idx, it, SUB, MASK_N, BLOCK_N)
        if PEEL:
            misplaced += _out_of_place(start // MASK_N, ragged)
        b_dq = _dq_tile(K, V, b_q, b_do, b_lse, b_delta, b_dq, start, o_d, m_d, s_ks, s_vs, SK, qk_scale, BLOCK_N,
                        DOT_PRECISION, MASKED=0 if PEEL else 2)  # fmt: skip
    if PEEL:
        if n_loop < n_it:  # the ragged key block's tiles (past SK: no weight)
            for t in tl.static_range(SUB):
                b_dq = _dq_tile(K, V, b_q, b_do, b_lse, b_delta, b_dq, ragged * MASK_N + t * BLOCK_N, o_d, m_d, s_ks,
                                s_vs, SK, qk_scale, BLOCK_N, DOT_PRECISION, MASKED=1)  # fmt: skip
        b_dq = tl.where(misplaced > 0, float("nan"), b_dq)

    p_dq = DQ + i_b * s_dqb + i_h * s_dqh + o_m[:, None] * s_dqs + o_d[None, :]
    tl.store(p_dq, (b_dq * sm_scale).to(DQ.dtype.element_ty), mask=m_md)


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seq, head) strides of a [B, S, H, D] tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def _mask_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, block) strides of a [B, H, M, ...] mask tensor; 0 on a broadcast dimension."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel on CUDA, capped by the mask's block sizes
# (chosen by benchmarks/attention.py --sweep --sweep-backward on an H200; the backward at c7a5733, forward +
# backward at the 1.3B shape, density 1.0 / 0.25: dK/dV (64, 64, 4, 2) 62.9 / 15.0 ms against (64, 128, 8, 2)
# 67.1 / 15.3; then dQ (128, 128, 8, 2) 59.4 / 14.8 against (128, 64, 8, 2) 62.9 / 15.0).
CUDA_TILES: dict[str, tuple[int, int, int, int]] = {
    "fwd": (128, 128, 8, 3),
    "dkdv": (64, 64, 4, 2),
    "dq": (128, 128, 8, 2),
    "fused": (64, 128, 8, 2),  # dK/dV with dQ accumulated in the same kernel (FUSED_DQ)
}
# The backward in one kernel: each (query tile, key tile) pair's dS K goes into an fp32 dQ accumulator by a TMA
# reduce (element atomics without TMA), instead of a second kernel that recomputes P and dP for dQ (7 matrix
# products per pair -> 5). True / False force it; None (auto) fuses while one head's accumulator (Sq x D fp32)
# fits in FUSED_DQ_BYTES, so that it stays in L2 while the programs of that head add into it. H200,
# `benchmarks/attention.py --sweep-backward`, forward + backward ms:
#   1.3B (Sq x D x 4 = 16.8 MB), density 1.0 / 0.25: fused 58.0 / 14.6 against two kernels 60.8 / 14.9 (2a3e56d);
#   14B (38.7 MB), backward alone, dense: fused 786 ms (2a3e56d) against two kernels 763 ms (c7a5733).
# The fused dQ sums in fp32 in whatever order the programs' reduce-adds arrive, so it can differ from run to
# run in the last bits; FUSED_DQ = False gives the deterministic two-kernel backward.
FUSED_DQ: bool | None = None
FUSED_DQ_BYTES = 24 * 2**20


# K and V tiles through tensor-memory-accelerator descriptors on Hopper and newer GPUs.
USE_TMA = True
# Triton's warp-specialised (producer/consumer) lowering of the forward's key loop; a --sweep candidate.
WARP_SPECIALIZE = False
# The forward's key loop loads the next tile's block index one step ahead, carried in the loop, instead of in the
# step that issues the tile's copies (where the issuing thread waits for it). In the PSA kernel's gathered levels
# this turned an indirect load, which Triton 3.6 pipelined one step ahead only, into a direct one (3 buffers);
# here (TMA) the copies are pipelined either way, and what it saves is the index load's wait. H200, bb402ee,
# `benchmarks/ab_forward.py CARRY_INDEX --rounds 5`, on / off: 0.981-1.001 at 1.3B, 0.989-0.994 at 14B (every
# density), outputs equal; Flex / vgen at 14B density 0.1: 1.220x on, 1.207x off.
CARRY_INDEX = True
# The forward's key loop walks its tiles unmasked; the ragged last mask block (keys past the sequence), which an
# ascending index list (BlockMask's contract) keeps last, is walked after it with the key mask. Before, every tile
# took a run-time test of whether it reached past the keys, and ptxas for sm_90a if-converted the mask into the
# loop: 64 FSEL, 33 ISETP and 27 VIADD per tile and thread of ~620 (scripts/compile_kernels_sm90.py). A row whose
# list holds the ragged block anywhere but last (or an index outside [0, MK) before the last) gets NaN (output and
# LSE), never a silently wrong result. Peeled, the loop is ~500 instructions and 200 registers (229 before). H200,
# 3aa9e08, `benchmarks/ab_forward.py PEEL_RAGGED`, on / off: 0.951-0.979 at 1.3B (5 rounds), 0.964-0.968 at 14B
# (2 rounds), outputs equal; Flex / vgen 1.22-1.31x.
PEEL_RAGGED = True
# The forward's prologue, before its first key tile, ran one step after another: the query tile's loads, the K
# descriptor, the V descriptor, then the row's block indices (the ragged check's p_idx[n - 1] after the count, and
# p_idx[0]), then the first TMA copy. A descriptor built on the device ends in a global atomic and a wait on every
# outstanding load (sm_90a: ATOMG.EXCH, DEPBAR {5,4,3,2,1,0}), so loads issued before it cannot overlap it and
# loads after it wait for it. INDEX_EARLY issues the index loads between the two descriptor builds: they are in
# flight while the V descriptor is built, one round trip less per program. Each program pays this prologue once,
# which weighs most on short rows (1.3B at density 0.1: 26 key tiles per program). H200, `benchmarks/ab_forward.py
# INDEX_EARLY --shapes wan1.3b-480p`, on / off: 0.981 at density 0.102 and 0.997-1.020 at 0.25-1.0 (ead6290, 5
# rounds); 0.990 at 0.102 and 1.002 dense (78004f1, 15 rounds: on below off at every rank of the sorted rounds but
# the highest). Outputs equal.
INDEX_EARLY = True
# One descriptor for K and V instead of two: a [2, S, D] view whose planes are K and V (their strides equal, their
# bases a multiple of 16 bytes apart), so the prologue builds one (one global atomic and wait fewer); K and V with
# other strides get one each, as before. Meant for the prologue, it is faster at every density: H200, 94da717,
# `benchmarks/ab_forward.py ONE_KV_DESC --densities 1.0 0.1`, on / off: 0.981 dense and 0.975 at 0.102 at 1.3B (11
# rounds in turns), 0.959 dense and 0.975 at 0.1 at 14B (2 rounds, 211.1 against 220.1 ms dense); outputs equal.
# (sm_90a: 196 registers against 200, 1,704 loop instructions per tile and thread against 1,725.)
ONE_KV_DESC = True
# (Also tried: the query tile's loads after the K descriptor, so that the block count's load overlaps the K
# descriptor's round trip instead of waiting behind the query tile. H200, ead6290, `ab_forward.py Q_LATE --set
# INDEX_EARLY=1 --shapes wan1.3b-480p`: on / off 0.998 / 1.015 / 1.028 / 1.000 at densities 1.0 / 0.5 / 0.25 /
# 0.102; removed.)
# Programs take a head's rows heaviest first: the grid stays (row rank, batch x head), and the program of rank r
# reads the row ranked r by kept blocks (and its count) from an order built per call by one small kernel
# (`_heavy_first`): query rows by kept key blocks in the forward and the dQ kernel, key columns by kept query
# blocks in the dK/dV kernel (fused or not). With tiles smaller than the mask block, a row's tiles go together.
# Rows launched in index order put whatever rows come last at the end of the run; with uneven counts (local
# windows: 9 to 75 kept blocks per row at the 1.3B shape, density 0.1) the last wave then has long rows on a few
# SMs while the rest idle. A list-scheduling model of the launch (132 SMs, a row costing 3.8 us + 2 us per kept
# block, fitted to the 1.3B table; `benchmarks/schedule_model.py`) gives time / (density x dense) 1.114 in index
# order and 1.059 heaviest first for that mask, no change for random masks (equal counts). H200, 89bcc31,
# `benchmarks/ab_forward.py HEAVY_FIRST --masks random local-3D --shapes wan1.3b-480p --densities 1.0 0.25 0.1
# --rounds 5`, on / off: local-3D 0.961 at 0.100 and 0.980 at 0.238; random 0.991-1.007; outputs equal.
# `benchmarks/linearity.py --set HEAVY_FIRST=1 --shapes wan1.3b-480p --rounds 11`: 1.3B at density 0.1 from
# 1.105-1.113 (local-3D) and 1.080 (random) to 1.067 and 1.076. The backward too: `benchmarks/ab_backward.py
# HEAVY_FIRST --shapes wan1.3b-480p wan14b-720p` (3 rounds in turns, spread under 1%), backward alone on / off
# 0.950-0.966 at 1.3B densities 0.1-0.25, 0.992 dense. It costs where a head's K/V do not sit in L2: at 14B (38.7 MB
# a head) local-3D forward 1.034 at 0.245 and 1.012 at 0.105, backward 1.041 and 1.022; random neutral (forward)
# and 0.973-0.975 (backward). Likely L2: in index order the programs in flight hold neighbouring windows, which
# share K/V blocks; ranked, they do not. True / False force it; None (auto) takes rows heaviest first while one
# head's K and V fit in HEAVY_FIRST_KV_BYTES (the 1.3B shape, not the 14B).
HEAVY_FIRST: bool | None = None
HEAVY_FIRST_KV_BYTES = 24 * 2**20
# (Loading the query tile by TMA instead, Q_TMA, lost its A/B at a89e975, `ab_forward.py Q_TMA --rounds 3`: on / off
# 1.008-1.033 at 1.3B, 0.995-1.003 at 14B; removed.)
# The same for the backward's loops (dK/dV over query tiles, dQ over key tiles), and one more pipeline stage for
# the dK/dV kernel (3: 214 KB of shared memory fused, 132 KB not). Their gathers are pointer loads after an index
# loaded in the step; at 2 stages the sm_90 code issues each step's copies after its products and waits for them
# at the top of the next. H200, ff251cb, `benchmarks/ab_backward.py BWD_CARRY_INDEX --densities 1.0 0.1`, 1.3B
# (the fused backward), backward ms off / on: 45.49 / 43.89 dense, 4.94 / 4.84 random 0.1, 5.10 / 5.00 local-3D
# 0.1 (Flex 5.01). True / False force it; None (auto) uses it with the fused backward only: with the two-kernel
# backward (14B) it is slower, backward ms off / on 774.8 / 926.0 dense (16ecb6a; Flex 836.1), 78.5 / 93.6 random
# 0.1 and 79.7 / 96.3 local-3D 0.1 (ca38e08; Flex 85.9, 88.5).
BWD_CARRY_INDEX: bool | None = None
# The forward's PEEL_RAGGED for the dQ kernel's loop over key tiles; the dK/dV kernel's loop over query tiles drops
# its query mask on P outright (it needs none: see the kernel). Only P's mask leaves the loops: the loads keep
# theirs (pointer loads, which an index out of range would take out of bounds). ptxas for sm_90a, per tile and
# thread: the dQ loop has 64 FSEL, 33 ISETP and 32 LOP3 of its mask in ~650 instructions. H200, ead6290,
# `benchmarks/ab_backward.py BWD_PEEL_RAGGED --shapes wan1.3b-480p wan14b-720p` (3 rounds in turns), forward +
# backward on / off: 0.991-0.997 at 1.3B (the fused kernel), 0.964-0.970 at 14B (two kernels), random and local-3D
# masks, densities 1.0 to 0.1; gradients equal at 14B, within 3.4e-5 at 1.3B (the fused dQ's reduce order).
BWD_PEEL_RAGGED = True
# Tried for the forward and dropped (`benchmarks/attention.py --sweep`, `benchmarks/ab_forward.py`, H200):
# - K/V TMA descriptors built once on the host instead of by every program: as [B, S, H, D] with [1, N, 1, D]
#   blocks, 12.34 / 3.18 / 117.09 ms against 12.17 / 3.20 / 110.72 (1.3B dense, 1.3B at 0.25, 14B at 0.5;
#   c7a5733); over a 3D [groups, S, width] view with [1, N, D] blocks, even at 1.3B (-2.3% to +1.2%) and 3.4-5.6%
#   slower at 14B (cdb5451, 5 rounds in turns).
# - A persistent forward (one program per SM, one flat loop over (query tile, key tile) pairs so that the K/V
#   pipeline runs across query tiles): 19.32 / 4.24 / 1.79 / 150.93 ms against 12.59 / 3.23 / 1.40 / 114.80 (1.3B
#   at 1.0 / 0.25 / 0.1, 14B at 0.5; 66980f2). Triton copies the loop-carried queries to shared memory before
#   every QK^T product, and its pipeline kept two K/V stages instead of three.


def _tma_ok(x: torch.Tensor) -> bool:
    """TMA needs compute capability 9+, 16-byte aligned rows and base."""
    return (torch.cuda.get_device_capability(x.device)[0] >= 9 and x.stride(1) * x.element_size() % 16 == 0
            and x.stride(0) * x.element_size() % 16 == 0 and x.stride(2) * x.element_size() % 16 == 0
            and x.data_ptr() % 16 == 0)


def _descriptor_scratch(device: torch.device) -> None:
    """Device-side TMA descriptors live in a scratch buffer Triton asks for; give it one on ``device``."""
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))


def _use_tma(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the forward loads K/V tiles by TMA (a function, so the tests can run those paths in the interpreter)."""
    return k.is_cuda and USE_TMA and all(_tma_ok(x) for x in (k, v))


def _heavy_first(num: torch.Tensor) -> torch.Tensor:
    """int64 [MB, MH, M]: per (batch, head) of a mask's ``kv_num_blocks`` [MB, MH, M], its rows ranked by
    descending count (ties in row order), each as row | count << 32. One launch, no host synchronisation."""
    mb, mh, m = num.shape
    order = torch.empty(mb, mh, m, dtype=torch.int64, device=num.device)
    block_i = min(128, max(16, triton.next_power_of_2(m)))
    _heavy_first_kernel[(mb * mh, triton.cdiv(m, block_i))](num, order, *num.stride(), mh, m, BLOCK_I=block_i,
                                                            BLOCK_J=64)
    return order


def _row_schedule(num: torch.Tensor, length: int, block: int, mask_block: int, heavy: bool):
    """(order, its (batch, head) strides, programs per (batch, head)) of a launch over the rows of ``num``
    ([MB, MH, M] counts) in tiles of ``block``: heaviest first when ``heavy`` (every row's tiles, M x
    mask_block / block programs; tiles past ``length`` load and store nothing), else index order (``num`` stands
    in for the unused order)."""
    if not heavy:
        return num, (0, 0), triton.cdiv(length, block)
    order = _heavy_first(num)
    return order, _mask_strides(order)[:2], num.shape[-1] * (mask_block // block)


def _kv_planes(k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    """(gap, V's plane) for reading K and V through one descriptor over a [2, S, D] view: their strides equal, their
    bases a multiple of 16 bytes apart, and at least a plane's rows apart (S x the row stride: separate tensors,
    or two slices of one [2, ...] buffer; V's plane is 1 when it lies above K, else 0). (0, 0) otherwise, and then
    each gets its own descriptor: K and V interleaved row by row (split from one [B, S, 2, H, D] tensor, say) give
    a plane stride below the row stride, which the GPU runs have not covered."""
    gap_bytes = v.data_ptr() - k.data_ptr()
    plane_bytes = k.shape[1] * k.stride(1) * k.element_size()
    if k.stride() != v.stride() or gap_bytes % 16 or not plane_bytes <= abs(gap_bytes) < 2**40:
        return 0, 0
    return abs(gap_bytes) // k.element_size(), int(gap_bytes > 0)


def _use_fused_dq(q: torch.Tensor) -> bool:
    """FUSED_DQ, read at call time; None: fused while one head's fp32 dQ (Sq x D) fits in FUSED_DQ_BYTES."""
    if FUSED_DQ is None:
        return q.shape[1] * q.shape[3] * 4 <= FUSED_DQ_BYTES
    return FUSED_DQ


def _heavy_first_on(*xs: torch.Tensor) -> bool:
    """HEAVY_FIRST, read at call time; None: heaviest rows first while the pair that the programs in flight share
    fits in HEAVY_FIRST_KV_BYTES: one head's K and V (2 x Sk x D) in the forward, and in the backward, whose dK/dV
    programs share Q and dO, the larger of those and K and V (the same for self-attention). Launches shorter than a
    wave gain nothing from the order and pay its one small launch; this does not tell them apart."""
    if HEAVY_FIRST is None:
        return max(2 * x.shape[1] * x.shape[3] * x.element_size() for x in xs) <= HEAVY_FIRST_KV_BYTES
    return HEAVY_FIRST


def _dot_precision(x: torch.Tensor) -> str:
    """fp32 inputs get exact fp32 products (no TF32); half types ignore it."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _tiles(kind: str, mask_m: int, mask_n: int, is_cuda: bool) -> tuple[int, int, int, int]:
    if not is_cuda:  # the interpreter: one tile per mask block is fastest
        return mask_m, mask_n, 4, 1
    block_m, block_n, warps, stages = CUDA_TILES[kind]
    return min(block_m, mask_m), min(block_n, mask_n), warps, stages


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [B, S, H, D], got shape {tuple(x.shape)}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == block_mask.kv_indices.device):
        raise ValueError("q, k, v and block_mask must be on one device")
    b, sq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"k and v must be [B, Sk, H, D] with q's B, H, D; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if d > 256:
        raise ValueError(f"head_dim must be at most 256, got {d}")
    if block_mask.seq_lens != (sq, k.shape[1]):
        raise ValueError(f"block_mask covers seq_lens {block_mask.seq_lens}, but q, k have {(sq, k.shape[1])}")
    mb, mh = block_mask.kv_num_blocks.shape[:2]
    if mb not in (1, b) or mh not in (1, h):
        raise ValueError(f"block_mask batch/heads {(mb, mh)} do not broadcast to q's {(b, h)}")
    for name, size in zip(("query", "key"), block_mask.block_size, strict=True):
        if size < 16 or size & (size - 1):
            raise ValueError(f"block_mask {name} block size must be a power of two >= 16, got {size}")


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_forward(q, k, v, block_mask, scale):
    b, sq, h, d = q.shape
    sk = k.shape[1]
    mask_m, mask_n = block_mask.block_size
    block_m, block_n, warps, stages = _tiles("fwd", mask_m, mask_n, q.is_cuda)
    use_tma = _use_tma(k, v)
    if use_tma:
        _descriptor_scratch(q.device)
    kv_gap, v_plane = _kv_planes(k, v) if use_tma and ONE_KV_DESC else (0, 0)
    heavy = _heavy_first_on(k)
    order, order_strides, programs = _row_schedule(block_mask.kv_num_blocks, sq, block_m, mask_m, heavy)
    out = torch.empty(b, sq, h, d, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
    _fwd_kernel[(programs, b * h)](
        q, k, v, out, lse, block_mask.kv_num_blocks, block_mask.kv_indices, order,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        *_mask_strides(block_mask.kv_num_blocks), *_mask_strides(block_mask.kv_indices), *order_strides,
        h, sq, sk, triton.cdiv(sk, mask_n), scale * _LOG2E, kv_gap, v_plane,
        D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n, MASK_M=mask_m,
        MASK_N=mask_n, DOT_PRECISION=_dot_precision(q), USE_TMA=use_tma,
        WARP_SPECIALIZE=WARP_SPECIALIZE and q.is_cuda, CARRY_INDEX=CARRY_INDEX, PEEL=PEEL_RAGGED,
        INDEX_EARLY=INDEX_EARLY, ONE_DESC=kv_gap > 0, HEAVY_FIRST=heavy,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def _launch_backward(q, k, v, out, lse, dout, dlse, block_mask, scale):
    b, sq, h, d = q.shape
    sk = k.shape[1]
    mask_m, mask_n = block_mask.block_size
    block_d = max(16, triton.next_power_of_2(d))
    dout = _unit_last(dout)
    if dlse is not None:  # read as [B, H, Sq] rows: a loss such as lse.sum() hands back a stride-0 expanded tensor
        dlse = dlse.contiguous()
    delta = torch.empty_like(lse)
    pre_m = 64
    _bwd_preprocess_kernel[(triton.cdiv(sq, pre_m), b * h)](
        out, dout, dlse if dlse is not None else lse, delta, *_strides3(out), *_strides3(dout), h, sq,
        D=d, BLOCK_D=block_d, BLOCK_M=pre_m, HAS_DLSE=dlse is not None,
    )
    dk = torch.empty(b, sk, h, d, device=q.device, dtype=k.dtype)
    dv = torch.empty(b, sk, h, d, device=q.device, dtype=v.dtype)
    fused = _use_fused_dq(q)
    dq_acc = torch.zeros(b, sq, h, d, device=q.device, dtype=torch.float32) if fused else dk
    reduce_tma = fused and q.is_cuda and _tma_ok(dq_acc)
    if reduce_tma:
        _descriptor_scratch(q.device)
    block_m, block_n, warps, stages = _tiles("fused" if fused else "dkdv", mask_m, mask_n, q.is_cuda)
    carry = fused if BWD_CARRY_INDEX is None else BWD_CARRY_INDEX
    if carry and q.is_cuda:  # with direct gathers a third stage prefetches two steps ahead (sm_90: fits)
        stages += 1
    heavy = _heavy_first_on(q, k)
    order, order_strides, programs = _row_schedule(block_mask.q_num_blocks, sk, block_n, mask_n, heavy)
    _bwd_dkdv_kernel[(programs, b * h)](
        q, k, v, dout, lse, delta, dk, dv, block_mask.q_num_blocks, block_mask.q_indices, dq_acc, order,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dk),
        *_mask_strides(block_mask.q_num_blocks), *_mask_strides(block_mask.q_indices),
        *(_strides3(dq_acc) if fused else (0, 0, 0)), *order_strides,
        h, sq, sk, scale * _LOG2E, scale,
        D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, MASK_M=mask_m, MASK_N=mask_n,
        DOT_PRECISION=_dot_precision(q), FUSED_DQ=fused, REDUCE_TMA=reduce_tma, CARRY_INDEX=carry,
        PEEL=BWD_PEEL_RAGGED, HEAVY_FIRST=heavy, num_warps=warps, num_stages=stages,
    )
    if fused:
        return (dq_acc * scale).to(q.dtype), dk, dv
    dq = torch.empty(b, sq, h, d, device=q.device, dtype=q.dtype)
    block_m, block_n, warps, stages = _tiles("dq", mask_m, mask_n, q.is_cuda)
    order, order_strides, programs = _row_schedule(block_mask.kv_num_blocks, sq, block_m, mask_m, heavy)
    _bwd_dq_kernel[(programs, b * h)](
        q, k, v, dout, lse, delta, dq, block_mask.kv_num_blocks, block_mask.kv_indices, order,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dq),
        *_mask_strides(block_mask.kv_num_blocks), *_mask_strides(block_mask.kv_indices), *order_strides,
        h, sq, sk, triton.cdiv(sk, mask_n), scale * _LOG2E, scale,
        D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, MASK_M=mask_m, MASK_N=mask_n,
        DOT_PRECISION=_dot_precision(q), CARRY_INDEX=carry, PEEL=BWD_PEEL_RAGGED, HEAVY_FIRST=heavy,
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


class BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_mask, scale):
        q, k, v = (_unit_last(x) for x in (q, k, v))
        out, lse = _launch_forward(q, k, v, block_mask, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block_mask, ctx.scale = block_mask, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:  # only the LSE was used
            dout = torch.zeros_like(out)
        dq, dk, dv = _launch_backward(q, k, v, out, lse, dout, dlse, ctx.block_mask, ctx.scale)
        return dq, dk, dv, None, None



def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query block to the key blocks ``block_mask`` keeps.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, H, D]``; float16, bfloat16 or float32, any
            strides with a unit last stride (others are copied). D up to 256.
        block_mask: a :class:`~vgen.attention.BlockMask` with ``seq_lens == (Sq, Sk)``,
            batch and heads equal to q's or 1 (broadcast), block sizes powers of two >= 16.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp ``[B, H, Sq]`` (fp32); a row
            with no key kept has output 0 and LSE ``-inf``. Gradients flow through both.

    Returns:
        ``[B, Sq, H, D]`` in q's dtype (and the LSE when asked).

    Runs the Triton kernels on CUDA (and under ``TRITON_INTERPRET=1``); elsewhere the
    PyTorch reference, which expands the mask to tokens (small sizes only).

    The forward relies on BlockMask's ascending index lists (with ``PEEL_RAGGED``): a row whose
    list holds the ragged last key block anywhere but last, or an index outside ``[0, Mk)`` before the last, gets
    NaN (output and LSE), not a silently wrong result (a repeated index is not detected). Every
    mask vgen builds keeps its lists ascending.
    """
    _check_inputs(q, k, v, block_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if use_triton(q):
        out, lse = BlockSparseAttention.apply(q, k, v, block_mask, scale)
    else:
        out, lse = block_sparse_attention_reference(q, k, v, block_mask, scale=scale, return_lse=True)
    return (out, lse) if return_lse else out


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 PyTorch block-sparse attention: the token-level mask applied to dense scores."""
    from vgen.kernels.reference import attention_reference

    return attention_reference(q, k, v, scale=scale, mask=block_mask.expand_tokens(), return_lse=return_lse)
