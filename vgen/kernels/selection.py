"""Block-selection kernels: segment means, a head-global cut of ranked scores, row compaction.

Dynamic sparse methods pick their blocks on every call, so the picking must cost little next to
the attention it saves. In PyTorch it is some sixty small ops, whose launch overhead alone is
1.5-2 ms per call on an H200; these three kernels replace most of them:

- :func:`segment_means`: the mean of each run of consecutive tokens (``starts``, ``sizes``) of
  ``[B, S, H, D]``, in fp32, one program per (segment, batch x head).
- :func:`global_cut`: per (batch, head), which of its scores a ranking of all of them keeps, by
  the softmax mass the better ones hold (``threshold``) or by count (``count``), without a sort:
  a bisection over the scores' order-preserving integer keys finds the cut score exactly.
- :func:`count_levels`: several cuts by count of one ranking in one search (a ranking split into
  levels).
- :func:`compact_rows`: for bool rows, the number of True entries and their positions first,
  ascending, then the rest (what :class:`vgen.attention.BlockMask` stores).

Each has a PyTorch reference beside it; the Triton versions run on CUDA and under the interpreter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from vgen.kernels.runtime import use_triton

__all__ = [
    "compact_rows",
    "compact_rows_reference",
    "count_levels",
    "global_cut",
    "global_cut_reference",
    "segment_means",
    "segment_means_reference",
]


# ----------------------------------------------------------------------------- segment means


@triton.jit
def _segment_means_kernel(
    X, STARTS, SIZES, OUT, SPREAD,
    s_xb, s_xs, s_xh,
    H, C,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, WITH_SPREAD: tl.constexpr,
):  # fmt: skip
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    start = tl.load(STARTS + i_c)
    size = tl.load(SIZES + i_c)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    base = X + i_b.to(tl.int64) * s_xb + i_h * s_xh
    # sums of x - x[start]: keys share large offsets, and E|x|^2 - |E x|^2 would cancel them away in fp32
    b_ref = tl.load(base + start * s_xs + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_sum = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    b_sq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for t in range(0, size, BLOCK_T):
        o_t = t + tl.arange(0, BLOCK_T)
        tile = (o_t < size)[:, None] & m_d[None, :]
        b_x = tl.load(base + (start + o_t)[:, None] * s_xs + o_d[None, :], mask=tile, other=0.0).to(tl.float32)
        b_x = tl.where(tile, b_x - b_ref[None, :], 0.0)
        b_sum += b_x
        if WITH_SPREAD:
            b_sq += b_x * b_x
    count = tl.maximum(size, 1).to(tl.float32)
    b_shift = tl.sum(b_sum, 0) / count  # mean - x[start]
    tl.store(OUT + (i_bh * C + i_c) * D + o_d, b_shift + b_ref, mask=m_d)
    if WITH_SPREAD:  # mean squared distance to the mean, shift-invariant: E|y|^2 - |E y|^2 with y = x - x[start]
        spread = tl.sum(tl.sum(b_sq, 0), 0) / count - tl.sum(b_shift * b_shift, 0)
        tl.store(SPREAD + i_bh * C + i_c, tl.maximum(spread, 0.0))


def segment_means(
    x: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor, *, with_spread: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``[B, H, C, D]``: the mean of ``x[:, starts[c] : starts[c] + sizes[c]]`` for each ``c``.

    Args:
        x: ``[B, S, H, D]``, any strides with a unit last stride.
        starts, sizes: int ``[C]`` on ``x``'s device; every segment inside ``[0, S)``, sizes >= 1.
        with_spread: also return fp32 ``[B, H, C]``, each segment's mean squared distance to its mean.
    """
    if not use_triton(x):
        return segment_means_reference(x, starts, sizes, with_spread=with_spread)
    batch, _, heads, dim = x.shape
    chunks = starts.numel()
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(batch, heads, chunks, dim, device=x.device, dtype=torch.float32)
    spread = torch.empty(batch, heads, chunks, device=x.device, dtype=torch.float32) if with_spread else out
    _segment_means_kernel[(chunks, batch * heads)](
        x, starts, sizes, out, spread, x.stride(0), x.stride(1), x.stride(2), heads, chunks,
        D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_T=32, WITH_SPREAD=with_spread, num_warps=4,
    )  # fmt: skip
    return (out, spread) if with_spread else out


def segment_means_reference(
    x: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor, *, with_spread: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    segments = [x[:, s : s + n].float() for s, n in zip(starts.tolist(), sizes.tolist(), strict=True)]
    means = torch.stack([seg.mean(1) for seg in segments], 1)  # [B, C, H, D]
    if not with_spread:
        return means.transpose(1, 2)
    spread = torch.stack([(seg - seg.mean(1, keepdim=True)).square().sum(-1).mean(1) for seg in segments], 1)
    return means.transpose(1, 2), spread.transpose(1, 2)  # [B, H, C, D], [B, H, C]


# ----------------------------------------------------------------------------- global cut


@triton.jit
def _order_key(x):
    """fp32 -> int32 with the same order (for finite values)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _mass_at_least(S, N, cut, peak, BY_MASS: tl.constexpr, BLOCK: tl.constexpr):
    """Softmax numerator (or count) of the scores whose key is >= ``cut``."""
    total = tl.zeros([BLOCK], tl.float32)
    for i in range(0, N, BLOCK):
        o = i + tl.arange(0, BLOCK)
        s = tl.load(S + o, mask=o < N, other=float("-inf"))
        hit = (_order_key(s) >= cut) & (o < N)
        if BY_MASS:
            total += tl.where(hit, tl.exp(s - peak), 0.0)
        else:
            total += hit.to(tl.float32)
    return tl.sum(total, 0)


@triton.jit
def _global_cut_kernel(
    S, KEEP, N, threshold, count,
    BY_MASS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    i_bh = tl.program_id(0)
    S += i_bh.to(tl.int64) * N
    KEEP += i_bh.to(tl.int64) * N
    # the peak and the softmax denominator, and the key range
    b_max = tl.full([BLOCK], float("-inf"), tl.float32)
    b_min = tl.full([BLOCK], float("inf"), tl.float32)
    for i in range(0, N, BLOCK):
        o = i + tl.arange(0, BLOCK)
        s = tl.load(S + o, mask=o < N, other=float("-inf"))
        b_max = tl.maximum(b_max, s)
        b_min = tl.minimum(b_min, tl.where(o < N, s, float("inf")))
    peak = tl.max(b_max, 0)
    if BY_MASS:
        goal = _mass_at_least(S, N, _order_key(tl.min(b_min, 0)), peak, BY_MASS, BLOCK) * threshold
    else:
        goal = count
    # largest key `lo` whose at-least set still reaches the goal; `hi` never does. 64-bit midpoints.
    lo = _order_key(tl.min(b_min, 0)).to(tl.int64)
    hi = _order_key(peak).to(tl.int64) + 1
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if _mass_at_least(S, N, mid.to(tl.int32), peak, BY_MASS, BLOCK) >= goal:
            lo = mid
        else:
            hi = mid
    cut = lo.to(tl.int32)
    for i in range(0, N, BLOCK):
        o = i + tl.arange(0, BLOCK)
        s = tl.load(S + o, mask=o < N, other=float("-inf"))
        tl.store(KEEP + o, (_order_key(s) >= cut).to(tl.int8), mask=o < N)


# Many programs per slice for large slices. The bisection above runs one program per [B, H] slice through
# some 33 sequential passes over the slice: at 40 heads x 591 query blocks x 630 chunks (Wan2.1-14B with
# 2D chunks) that took 5-9 ms on an H200. Here each pass evaluates PIVOTS cut candidates at once, spread
# evenly over the remaining key interval, with the slice split over many programs (their partial sums
# reduced in a fixed order, so the result is deterministic); PASSES passes narrow 2^32 keys to one.
# Tried and dropped (00a38dc): each pass also keeping every bucket's smallest and largest score, so that a search
# whose bracket held one distinct score could stop early. Three [SUB, PIVOTS] accumulators instead of one made
# every pass several times dearer, and the brackets at the Wan shapes rarely came down to one score early:
# 14B 2D selection 17.6 ms at a5646d3 against 5.6 ms at 8eba17f (`benchmarks/vmoba.py --parts 1,2`; the a5646d3
# GPU ran dense cuDNN 1.6x slower than usual, the selection 3.1x).
_PIVOTS = 64
_PASSES = 6  # 64^6 >= 2^32
_CHUNK = 2048
PARALLEL_CUT_ENTRIES = 65536  # slices at least this long take the many-program path


@triton.jit
def _key_value(key):
    """The fp32 whose ``_order_key`` is ``key`` (int32); the inverse map."""
    return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)


@triton.jit
def _pivots(LO, HI, i_bh, PIVOTS: tl.constexpr):
    lo = tl.load(LO + i_bh)
    hi = tl.load(HI + i_bh)
    j = tl.arange(0, PIVOTS).to(tl.int64)
    return lo + (j * (hi - lo) + PIVOTS - 1) // PIVOTS, hi  # pivot 0 is lo


@triton.jit
def _cut_partial_kernel(
    S, PEAK, LO, HI, PART, N, GOALS,
    CHUNK: tl.constexpr, SUB: tl.constexpr, PIVOTS: tl.constexpr, BY_MASS: tl.constexpr,
):  # fmt: skip
    # search i_bh looks for goal i_bh % GOALS of slice i_bh // GOALS (several cuts of one slice at once)
    i_bh, i_c = tl.program_id(0), tl.program_id(1)
    i_slice = i_bh // GOALS
    piv, _ = _pivots(LO, HI, i_bh, PIVOTS)
    # Scores are compared as floats with the pivots' values: one instruction, where int64 keys took
    # several. The same order as the keys', as the scores hold no -0.0 (each load adds +0.0).
    piv_value = _key_value(piv.to(tl.int32))
    peak = tl.load(PEAK + i_slice)
    base = S + i_slice.to(tl.int64) * N
    # a [SUB, PIVOTS] accumulator, reduced once at the end: a reduction per SUB scores (across warps,
    # through shared memory) cost more than the comparisons themselves
    acc = tl.zeros([SUB, PIVOTS], tl.float32)
    for start in range(0, CHUNK, SUB):
        o = i_c * CHUNK + start + tl.arange(0, SUB)
        m = (o < N) & (start + tl.arange(0, SUB) < CHUNK)  # (a chunk shorter than SUB ends inside the tile)
        s = tl.load(base + o, mask=m, other=0.0) + 0.0  # -0.0 -> +0.0: values then order as keys do
        if BY_MASS:
            w = tl.where(m, tl.exp(s - peak), 0.0)
        else:
            w = m.to(tl.float32)
        acc += tl.where(s[:, None] >= piv_value[None, :], w[:, None], 0.0)
    tl.store(PART + (i_bh.to(tl.int64) * tl.num_programs(1) + i_c) * PIVOTS + tl.arange(0, PIVOTS), tl.sum(acc, 0))


@triton.jit
def _cut_narrow_kernel(PART, LO, HI, GOAL, P, PIVOTS: tl.constexpr):
    """Sum the programs' partial masses per pivot (in program order) and keep the interval between the
    last pivot whose at-least mass reaches the goal and the next."""
    i_bh = tl.program_id(0)
    piv, hi = _pivots(LO, HI, i_bh, PIVOTS)
    mass = tl.zeros([PIVOTS], tl.float32)
    for p in range(0, P):
        mass += tl.load(PART + (i_bh.to(tl.int64) * P + p) * PIVOTS + tl.arange(0, PIVOTS))
    reach = mass >= tl.load(GOAL + i_bh)
    j = tl.maximum(tl.sum(reach.to(tl.int32), 0) - 1, 0)  # the at-least mass falls with the pivot
    o = tl.arange(0, PIVOTS)
    new_lo = tl.sum(tl.where(o == j, piv, 0), 0)
    new_hi = tl.where(j + 1 < PIVOTS, tl.sum(tl.where(o == j + 1, piv, 0), 0), hi)
    tl.store(LO + i_bh, new_lo)
    tl.store(HI + i_bh, new_hi)


@triton.jit
def _cut_stats_kernel(S, PMAX, PMIN, PSUM, N, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BY_MASS: tl.constexpr):
    """One chunk of one slice: its largest and smallest score and (BY_MASS) its sum of exp(score - largest)."""
    i_s, i_c = tl.program_id(0), tl.program_id(1)
    base = S + i_s.to(tl.int64) * N
    b_max = tl.full([BLOCK], float("-inf"), tl.float32)
    b_min = tl.full([BLOCK], float("inf"), tl.float32)
    for start in range(0, CHUNK, BLOCK):
        o = i_c * CHUNK + start + tl.arange(0, BLOCK)
        m = (o < N) & (start + tl.arange(0, BLOCK) < CHUNK)
        s = tl.load(base + o, mask=m, other=float("-inf")) + 0.0
        b_max = tl.maximum(b_max, s)
        b_min = tl.minimum(b_min, tl.where(m, s, float("inf")))
    top = tl.max(b_max, 0)
    total = 0.0
    if BY_MASS:
        b_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, CHUNK, BLOCK):
            o = i_c * CHUNK + start + tl.arange(0, BLOCK)
            m = (o < N) & (start + tl.arange(0, BLOCK) < CHUNK)
            s = tl.load(base + o, mask=m, other=float("-inf"))
            b_sum += tl.where(m, tl.exp(s - top), 0.0)
        total = tl.sum(b_sum, 0)
    at = i_s * tl.num_programs(1) + i_c
    tl.store(PMAX + at, top)
    tl.store(PMIN + at, tl.min(b_min, 0))
    tl.store(PSUM + at, total)


@triton.jit
def _cut_setup_kernel(
    PMAX, PMIN, PSUM, PEAK, LO, HI, GOAL, COUNTS, P, G, threshold,
    BLOCK_P: tl.constexpr, BY_MASS: tl.constexpr,
):  # fmt: skip
    """Per slice, from its chunks' statistics: the peak, and for each of its G searches the first bracket
    [key of the smallest score, key of the peak + 1) and the goal (the softmax numerator x threshold, or a count)."""
    i_s = tl.program_id(0)
    b_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    b_min = tl.full([BLOCK_P], float("inf"), tl.float32)
    for start in range(0, P, BLOCK_P):
        o = start + tl.arange(0, BLOCK_P)
        b_max = tl.maximum(b_max, tl.load(PMAX + i_s * P + o, mask=o < P, other=float("-inf")))
        b_min = tl.minimum(b_min, tl.load(PMIN + i_s * P + o, mask=o < P, other=float("inf")))
    peak = tl.max(b_max, 0)
    total = 0.0
    if BY_MASS:  # each chunk's sum, moved from its own largest score to the slice's peak
        b_sum = tl.zeros([BLOCK_P], tl.float32)
        for start in range(0, P, BLOCK_P):
            o = start + tl.arange(0, BLOCK_P)
            top = tl.load(PMAX + i_s * P + o, mask=o < P, other=0.0)
            b_sum += tl.where(o < P, tl.load(PSUM + i_s * P + o, mask=o < P, other=0.0) * tl.exp(top - peak), 0.0)
        total = tl.sum(b_sum, 0)
    tl.store(PEAK + i_s, peak)
    lo = _order_key(tl.min(b_min, 0)).to(tl.int64)  # its at-least set is everything
    hi = _order_key(peak).to(tl.int64) + 1  # nothing is at least this
    for g in range(0, G):
        tl.store(LO + i_s * G + g, lo)
        tl.store(HI + i_s * G + g, hi)
        if BY_MASS:
            tl.store(GOAL + i_s * G + g, total * threshold)
        else:
            tl.store(GOAL + i_s * G + g, tl.load(COUNTS + g))


@triton.jit
def _cut_apply_kernel(
    S, CUT, OUT, N, G, offset,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, LEVELS: tl.constexpr,
):  # fmt: skip
    """Each score against its slice's G cut keys: LEVELS, ``offset`` + the number of cuts that leave it out
    (int64); else whether the one cut keeps it (int8)."""
    i_s, i_c = tl.program_id(0), tl.program_id(1)
    base = i_s.to(tl.int64) * N
    for start in range(0, CHUNK, BLOCK):
        o = i_c * CHUNK + start + tl.arange(0, BLOCK)
        m = (o < N) & (start + tl.arange(0, BLOCK) < CHUNK)
        key = _order_key(tl.load(S + base + o, mask=m, other=0.0) + 0.0).to(tl.int64)
        below = tl.zeros([BLOCK], tl.int64)
        for g in range(0, G):
            below += (key < tl.load(CUT + i_s * G + g)).to(tl.int64)
        if LEVELS:
            tl.store(OUT + base + o, below + offset, mask=m)
        else:
            tl.store(OUT + base + o, (below == 0).to(tl.int8), mask=m)


def _cut_search(
    flat: torch.Tensor, chunk: int, *, threshold: float | None = None, counts: Sequence[int] = ()
) -> torch.Tensor:
    """int64 ``[BH, G]``: per slice of fp32 ``flat`` ``[BH, N]`` the largest key whose at-least set reaches each
    goal: the softmax mass ``threshold`` (G = 1), or each of ``counts``; all G cuts of a slice are searched at
    once, by the many-program pivot search (counts: by the radix select instead with RADIX_COUNT). No host
    synchronisation; -0.0 counts as +0.0 throughout."""
    if threshold is None and RADIX_COUNT:
        return _radix_count_search(flat, chunk, counts)
    slices, n = flat.shape
    by_mass = threshold is not None
    cuts = 1 if by_mass else len(counts)
    programs = triton.cdiv(n, chunk)
    device = flat.device
    stats = torch.empty(3, slices, programs, dtype=torch.float32, device=device)
    _cut_stats_kernel[(slices, programs)](flat, stats[0], stats[1], stats[2], n, CHUNK=chunk,
                                          BLOCK=min(1024, triton.next_power_of_2(chunk)), BY_MASS=by_mass,
                                          num_warps=4)  # fmt: skip
    peak = torch.empty(slices, dtype=torch.float32, device=device)
    lo, hi = (torch.empty(slices * cuts, dtype=torch.int64, device=device) for _ in range(2))
    goal = torch.empty(slices * cuts, dtype=torch.float32, device=device)
    goals = torch.empty(max(1, len(counts)), dtype=torch.float32, device=device)
    for i, c in enumerate(counts):  # fill_ stays on the device; `goals[i] = c` and a tensor from a list copy and sync
        goals[i : i + 1].fill_(float(c))
    _cut_setup_kernel[(slices,)](stats[0], stats[1], stats[2], peak, lo, hi, goal, goals, programs, cuts,
                                 float(threshold or 0.0), BLOCK_P=min(1024, triton.next_power_of_2(programs)),
                                 BY_MASS=by_mass, num_warps=4)  # fmt: skip
    part = torch.empty(slices * cuts, programs, _PIVOTS, dtype=torch.float32, device=device)
    for _ in range(_PASSES):
        _cut_partial_kernel[(slices * cuts, programs)](
            flat, peak, lo, hi, part, n, cuts, CHUNK=chunk, SUB=64, PIVOTS=_PIVOTS, BY_MASS=by_mass, num_warps=4,
        )  # fmt: skip
        _cut_narrow_kernel[(slices * cuts,)](part, lo, hi, goal, programs, PIVOTS=_PIVOTS, num_warps=2)
    return lo.view(slices, cuts)


# A cut by count is the key of a slice's c-th largest score: found exactly by a radix select, 8 bits a pass from
# the top (4 passes against the pivot search's 6), each pass one histogram of 256 bins per (slice, count) over the
# scores that share the bits chosen so far. Same cuts as the pivot search (tests check that). RADIX_COUNT picks it
# for counts (psa's levels, top-k cuts). H200, ac512c1, `benchmarks/profile_calls.py --only psa` without and with
# `--set selection.RADIX_COUNT=1` (results/profile_calls-psa-{pivot,radix}-ac512c1.md): the cut's kernels 10.81 ->
# 1.23 ms per 14B call (6 + 6 pivot launches -> 4 histograms), the whole psa call 79.69 -> 68.90 ms at 14B and
# 4.76 -> 4.29 ms at 1.3B. On by default; False gives the pivot search.
RADIX_COUNT = True


@triton.jit
def _radix_hist_kernel(
    S, PREFIX, HIST, N, G,
    SHIFT: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
):  # fmt: skip
    """Program (slice x count, chunk): adds to HIST[slice x count] the 256-bin histogram of the digit
    (key >> SHIFT) & 255 of the chunk's scores whose higher bits equal PREFIX[slice x count]. Keys are the
    scores' order keys as unsigned 32-bit values (in int64)."""
    i_sg, i_c = tl.program_id(0), tl.program_id(1)
    base = S + (i_sg // G).to(tl.int64) * N
    prefix = tl.load(PREFIX + i_sg)
    hist = tl.zeros([256], tl.int32)
    for start in range(0, CHUNK, SUB):
        o = i_c * CHUNK + start + tl.arange(0, SUB)
        m = (o < N) & (start + tl.arange(0, SUB) < CHUNK)
        key = _order_key(tl.load(base + o, mask=m, other=0.0) + 0.0).to(tl.int64) + 2147483648
        match = m & ((key >> (SHIFT + 8)) == prefix)
        hist += tl.histogram(((key >> SHIFT) & 255).to(tl.int32), 256, mask=match)
    tl.atomic_add(HIST + i_sg * 256 + tl.arange(0, 256), hist)


@triton.jit
def _radix_pick_kernel(PREFIX, NEED, HIST):
    """Per slice x count: the digit whose bin holds the NEED-th largest of the matching scores; the prefix
    takes it, and NEED drops by the scores in the bins above."""
    i_sg = tl.program_id(0)
    hist = tl.load(HIST + i_sg * 256 + tl.arange(0, 256)).to(tl.int64)
    need = tl.load(NEED + i_sg)
    at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # scores in this bin or above, falling with the bin
    digit = tl.sum((at_least >= need).to(tl.int64), 0) - 1
    above = tl.sum(tl.where(tl.arange(0, 256) > digit, hist, 0), 0)
    tl.store(PREFIX + i_sg, tl.load(PREFIX + i_sg) * 256 + digit)
    tl.store(NEED + i_sg, need - above)


def _radix_count_search(flat: torch.Tensor, chunk: int, counts: Sequence[int]) -> torch.Tensor:
    """int64 ``[BH, G]``: per slice of fp32 ``flat`` ``[BH, N]``, the order key of its ``counts[g]``-th largest
    score (each count in [1, N]), as :func:`_cut_search` finds it, by a radix select: 9 launches, no host
    synchronisation."""
    slices, n = flat.shape
    cuts = len(counts)
    device = flat.device
    prefix = torch.zeros(slices * cuts, dtype=torch.int64, device=device)
    need = torch.empty(cuts, dtype=torch.int64, device=device)
    for i, c in enumerate(counts):  # fill_ stays on the device (a tensor from a list would copy and sync)
        need[i : i + 1].fill_(int(c))
    need = need.repeat(slices)
    hist = torch.zeros(4, slices * cuts, 256, dtype=torch.int32, device=device)
    for i, shift in enumerate((24, 16, 8, 0)):
        _radix_hist_kernel[(slices * cuts, triton.cdiv(n, chunk))](flat, prefix, hist[i], n, cuts, SHIFT=shift,
                                                                    CHUNK=chunk, SUB=1024, num_warps=4)  # fmt: skip
        _radix_pick_kernel[(slices * cuts,)](prefix, need, hist[i], num_warps=1)
    return (prefix - 2147483648).view(slices, cuts)


def _apply_cuts(flat: torch.Tensor, cuts: torch.Tensor, chunk: int, levels: bool, offset: int = 0) -> torch.Tensor:
    """:func:`_cut_apply_kernel` over ``flat`` ``[BH, N]``: int64 levels, or the bool kept entries of one cut."""
    slices, n = flat.shape
    out = torch.empty(flat.shape, dtype=torch.int64 if levels else torch.int8, device=flat.device)
    _cut_apply_kernel[(slices, triton.cdiv(n, chunk))](flat, cuts, out, n, cuts.shape[1], offset, CHUNK=chunk,
                                                       BLOCK=min(1024, triton.next_power_of_2(chunk)), LEVELS=levels,
                                                       num_warps=4)  # fmt: skip
    return out if levels else out.view(torch.bool)


def _global_cut_parallel(flat: torch.Tensor, threshold: float | None, count: int | None, chunk: int = _CHUNK):
    """bool ``[BH, N]``: :func:`global_cut` of fp32 ``flat`` by the many-program pivot search (about 15 launches:
    chunk statistics, the searches' set-up, the passes, the keep test)."""
    flat = flat.contiguous()  # the kernels address slice i at i * N
    cuts = _cut_search(flat, chunk, threshold=threshold, counts=() if count is None else (count,))
    return _apply_cuts(flat, cuts, chunk, levels=False)


def global_cut(scores: torch.Tensor, *, threshold: float | None = None, count: int | None = None) -> torch.Tensor:
    """bool, ``scores``' shape: per ``[B, H]`` slice, the best scores of a ranking of all of its entries.

    Exactly one of:
        threshold: keep the best entries while the softmax mass (over the whole slice) of the
            entries better than them is below ``threshold``: the smallest best set whose mass
            reaches it. ``threshold`` in (0, 1].
        count: keep the ``count`` best entries.

    Ties at the cut are all kept (a sort would break them by position). ``scores``: fp32
    ``[B, H, ...]`` of finite values. Triton on CUDA or under the interpreter (one program per slice
    below ``PARALLEL_CUT_ENTRIES`` entries, many above), else :func:`global_cut_reference`.
    """
    if (threshold is None) == (count is None):
        raise ValueError("global_cut needs exactly one of threshold and count")
    n = scores[0, 0].numel() if scores.numel() else 0
    if (threshold is not None and threshold >= 1.0) or (count is not None and count >= n):
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)  # (fp32 sums lose a mass tail)
    if count is not None and count <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if not use_triton(scores):
        return global_cut_reference(scores, threshold=threshold, count=count)
    # the kernels address slice i at i * N: a strided view (scores[..., :q]) must become contiguous first
    flat = scores.reshape(scores.shape[0] * scores.shape[1], -1).float().contiguous()
    if n >= PARALLEL_CUT_ENTRIES:
        return _global_cut_parallel(flat, threshold, None if count is None else min(count, n)).view(scores.shape)
    # + 0.0 turns -0.0 into +0.0, as the parallel path does: both see one zero (the keys order -0.0 below +0.0)
    flat = flat + 0.0
    keep = torch.empty(flat.shape, dtype=torch.int8, device=scores.device)
    _global_cut_kernel[(flat.shape[0],)](
        flat, keep, n, 0.0 if threshold is None else float(threshold), 0.0 if count is None else float(min(count, n)),
        BY_MASS=threshold is not None, BLOCK=1024, num_warps=8,
    )  # fmt: skip
    return keep.view(scores.shape).bool()


def count_levels(scores: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """int64, ``scores``' shape: for each entry, how many of the cuts ``global_cut(scores, count=c)``
    (``c`` in ``counts``) leave it out. With ascending counts that is the index of the first cut that
    keeps it: a ranking split into levels (psa's pyramid levels) in one search.

    ``scores``: fp32 ``[B, H, ...]`` of finite values. Triton on CUDA or under the interpreter (the
    many-program search with every count at once), else one :func:`global_cut` per count.
    """
    counts = [int(c) for c in counts]
    n = scores[0, 0].numel() if scores.numel() else 0
    if not use_triton(scores) or not counts or not n:
        return sum((~global_cut(scores, count=c)).long() for c in counts) + torch.zeros(
            scores.shape, dtype=torch.long, device=scores.device)  # fmt: skip
    flat = scores.reshape(scores.shape[0] * scores.shape[1], -1).float().contiguous()  # (slice i at i * N)
    searched = [c for c in counts if 0 < c < n]  # the others keep everything or nothing
    offset = sum(c <= 0 for c in counts)
    if not searched:
        return torch.full(scores.shape, offset, dtype=torch.long, device=scores.device)
    cuts = _cut_search(flat, _CHUNK, counts=searched)  # [BH, G]
    return _apply_cuts(flat, cuts, _CHUNK, levels=True, offset=offset).view(scores.shape)


def global_cut_reference(
    scores: torch.Tensor, *, threshold: float | None = None, count: int | None = None
) -> torch.Tensor:
    """The same by a sort; as in the kernels, every entry tied with the last one kept is kept too (-0.0 and +0.0
    are one value)."""
    flat = scores.reshape(scores.shape[0], scores.shape[1], -1)
    order = flat.argsort(dim=-1, descending=True)
    if threshold is not None:
        mass = flat.softmax(-1).gather(-1, order)
        kept_sorted = (mass.cumsum(-1) - mass) < threshold
    else:
        kept_sorted = (torch.arange(flat.shape[-1], device=flat.device) < count).expand_as(flat)
    kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order, kept_sorted)
    cut = flat.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)
    return (kept.any(-1, keepdim=True) & (flat >= cut)).view(scores.shape)


# ----------------------------------------------------------------------------- row compaction


@triton.jit
def _compact_rows_kernel(DENSE, COUNT, INDICES, N, BLOCK: tl.constexpr):
    i_row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK)
    m = o < N
    kept = tl.load(DENSE + i_row * N + o, mask=m, other=0) != 0
    k = kept.to(tl.int32)
    before = tl.cumsum(k, 0) - k  # kept entries before each position
    total = tl.sum(k, 0)
    # kept entry j goes to slot `before`; a dropped one to total + (dropped entries before it), valued N - 1
    slot = tl.where(kept, before, total + o - before)
    tl.store(INDICES + i_row * N + slot, tl.where(kept, o, N - 1), mask=m)
    tl.store(COUNT + i_row, total)


def compact_rows(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Count and positions of the True entries along the last axis of bool ``dense`` ``[..., N]``.

    Returns int32 ``[...]`` and int32 ``[..., N]``: the kept positions first, ascending, then
    ``N - 1`` as padding. One program per row (rows up to 16K entries).
    """
    n = dense.shape[-1]
    if n > 16384:
        raise ValueError(f"compact_rows handles rows of at most 16384 entries, got {n}")
    if not use_triton(dense):
        return compact_rows_reference(dense)
    rows = dense.reshape(-1, n).contiguous()
    count = torch.empty(rows.shape[0], dtype=torch.int32, device=dense.device)
    indices = torch.empty(rows.shape, dtype=torch.int32, device=dense.device)
    if rows.shape[0]:
        _compact_rows_kernel[(rows.shape[0],)](
            rows.view(torch.int8), count, indices, n, BLOCK=max(16, triton.next_power_of_2(n)), num_warps=4
        )
    return count.view(dense.shape[:-1]), indices.view(dense.shape)


def compact_rows_reference(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A cumulative count and a binary search."""
    n = dense.shape[-1]
    running = dense.cumsum(-1, dtype=torch.int32).contiguous()
    ranks = torch.arange(n, dtype=torch.int32, device=dense.device).expand(running.shape).contiguous()
    # The rank-r kept position is the first whose running count exceeds r; N for ranks past the count.
    indices = torch.searchsorted(running, ranks, right=True, out_int32=True).clamp_(max=n - 1)
    return running[..., -1].contiguous(), indices
