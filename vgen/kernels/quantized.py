"""Quantised block-sparse attention (forward only): INT8 QK^T, and PV with INT8, INT4 or FP8 (e4m3) values.

This is how PAROAttention computes attention, also usable dense with a full mask. It has three
steps:

1. Quantise, once per call (:func:`quantize_blocks`). Q and K get one INT8 scale per (batch,
   head, mask block) from the block's absolute maximum. K is first smoothed: its mean over the
   tokens is subtracted per (batch, head). That shifts every logit of a query row by the same
   amount, so the softmax is unchanged, and it takes out the shared offset that would otherwise
   use up INT8's range. For INT8 PV, V gets one scale per (batch, head, channel) over all tokens
   (:func:`quantize_int8_channels`), values in [-127, 127]; for INT4, one per (batch, head, key
   block, channel), values in [-7, 7]; for FP8, one per (batch, head, channel) over all tokens
   (:func:`quantize_fp8_channels`), float8 e4m3 values.
2. Walk the kept key blocks with an online softmax, as in
   :func:`vgen.kernels.block_sparse_attention`:
   - The scores are ``dot(q_i8, k_i8) -> int32``, times the two scales.
   - INT8/INT4: the probabilities are quantised per row of each key tile against that row's
     maximum in the tile, to ``round(P * exp2(s - tile max))`` with P = 127 (INT8) or 7 (INT4),
     computed so from the exponent. They do not depend on the running maximum, and a tile far
     below the row's peak keeps its resolution; the tile's weight ``exp2(tile max - m) / P`` goes
     onto its row sums and its product. The codes are rounded through fp16 (``INT_CODES16``), and
     their row sums come exactly from one more small MMA with a column of ones (``INT_SUMS_MMA``), so
     that the sums are those of the rounded codes the product uses. ``dot(p_q, v_q) -> int32`` is
     accumulated in fp32 (INT4: dequantised per channel of the key block).
   - FP8: ``448 * exp2(s - m)`` (448 is e4m3's largest value; the factor sits in the exponent)
     is cast straight to e4m3 and ``dot(p8, v8)`` accumulates in fp32, one key tile at a time; the
     row sums use the unrounded p, and V's scales are applied once at the end.
3. Divide by the row sums, and store in q's dtype.

INT4 values run on the INT8 tensor cores: Hopper has no INT4 MMA, so INT4 saves storage and
shows the accuracy of 4-bit PV, not compute.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from vgen.kernels.block_sparse import (
    _check_inputs,
    _descriptor_scratch,
    _mask_strides,
    _out_of_place,
    _peel_split,
    _strides3,
    _tma_ok,
)
from vgen.kernels.runtime import interpreting, use_triton

if TYPE_CHECKING:
    from vgen.attention.block_mask import BlockMask

__all__ = ["quantize_blocks", "quantize_fp8_channels", "quantized_attention", "quantized_attention_reference"]

_LOG2E = 1.4426950408889634
_LEVELS = {8: 127, 4: 7}
_PV_BITS = {"int8": 8, "int4": 4, "fp8": None}


# The quantiser multiplies each value by its scale's exactly rounded reciprocal (one per channel and program; one
# multiply a value), or, with QUANTIZE_RCP False, divides it exactly rounded (div_rn, a dozen instructions a value).
# The PyTorch quantisers follow the setting, so the two stay equal to the bit either way; between the settings about
# 5 in 100,000 codes move by one (values at a rounding boundary). H200, 6b02325, `benchmarks/quantized_quick.py`
# (results/quantized-quick-6b02325.txt), quantisation of q/k/v in GPU ms, division -> reciprocal: INT8 0.602 ->
# 0.547 and FP8 0.607 -> 0.552 at 1.3B, 2.275 -> 1.743 and 2.078 -> 1.697 at 14B.
QUANTIZE_RCP = True


def _divide(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` as the Triton quantiser computes it (QUANTIZE_RCP: times ``1 / scale``)."""
    return x * (1.0 / scale) if QUANTIZE_RCP else x / scale


def quantize_blocks(
    x: torch.Tensor, block: int, bits: int = 8, *, per_channel: bool = False, smooth: bool = False,
    mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantisation of ``x`` ``[B, S, H, D]`` in blocks of ``block`` tokens.

    Args:
        x: the tensor; ``block``: tokens per scale (the last block may be short).
        bits: 8 (values in [-127, 127]) or 4 (values in [-7, 7], stored in int8).
        per_channel: one scale per channel of each block instead of one per block.
        smooth: subtract the mean over all tokens (per batch and head) first.
        mean: with ``smooth``, fp32 ``[B, H, D]`` to subtract instead of ``x``'s own mean.

    Returns:
        int8 ``[B, S, H, D]`` values and fp32 scales ``[B, H, M]`` (or ``[B, H, M, D]`` per channel).
    """
    if bits not in _LEVELS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    levels = _LEVELS[bits]
    xf = x.float()
    if smooth:
        xf = xf - (xf.mean(1, keepdim=True) if mean is None else mean.float()[:, None])
    batch, seq, heads, dim = xf.shape
    blocks = -(-seq // block)
    padded = torch.nn.functional.pad(xf, (0, 0, 0, 0, 0, blocks * block - seq)).view(batch, blocks, block, heads, dim)
    amax = padded.abs().amax(dim=(2,) if per_channel else (2, 4), keepdim=True)  # [B, M, 1, H, D or 1]
    scale = (amax / levels).clamp_min(1e-12)
    scaled = _divide(padded, scale)
    # half away from zero, as the Triton quantiser rounds
    values = (scaled.sign() * (scaled.abs() + 0.5).floor()).clamp_(-levels, levels).to(torch.int8)
    values = values.view(batch, blocks * block, heads, dim)
    scales = scale.squeeze(2).permute(0, 2, 1, 3)  # [B, H, M, D or 1]
    return values[:, :seq].contiguous(), (scales if per_channel else scales[..., 0]).contiguous()


def channel_scales(x: torch.Tensor, top: float) -> torch.Tensor:
    """fp32 ``[B, H, D]``: each channel's absolute maximum over the tokens of ``x`` ``[B, S, H, D]``, over ``top``
    (the largest code: 448 for float8 e4m3, 127 for INT8)."""
    low, high = torch.aminmax(x, dim=1)  # one pass, no |x| written out
    return (torch.maximum(high.float(), -low.float()) / top).clamp_min(1e-12).contiguous()


def quantize_fp8_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[B, S, H, D]`` as float8 e4m3 values (rounded to nearest, ties to even) against one scale per
    (batch, head, channel) over all tokens (:func:`channel_scales`). Returns the values and the scales."""
    scales = channel_scales(x, 448.0)
    return _divide(x.float(), scales[:, None]).to(torch.float8_e4m3fn), scales


def quantize_int8_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[B, S, H, D]`` as INT8 values in [-127, 127] (rounded half away from zero, as
    :func:`quantize_blocks`) against one scale per (batch, head, channel) over all tokens. Returns the values and
    the fp32 ``[B, H, D]`` scales."""
    scales = channel_scales(x, 127.0)
    scaled = _divide(x.float(), scales[:, None])
    return (scaled.sign() * (scaled.abs() + 0.5).floor()).clamp_(-127, 127).to(torch.int8), scales


# 1.5 * 2^23: adding it to a float in (-2^22, 2^22) leaves the integer nearest to it (ties to even) in
# the low mantissa bits, so int <-> float conversions become one add and one integer add. The
# conversion instructions run at a fraction of the FMA rate and would otherwise outweigh the 8-bit
# MMAs (a 128 x 128 tile converts 16K scores and 16K outputs per key tile).
_MAGIC_F = tl.constexpr(12582912.0)
_MAGIC_I = tl.constexpr(0x4B400000)


@triton.jit
def _i32_to_f32(x):
    """int32 ``|x| < 2^22`` to fp32, exactly."""
    return (x + _MAGIC_I).to(tl.float32, bitcast=True) - _MAGIC_F


_LOG2_448 = tl.constexpr(8.807354922057604)


@triton.jit
def _round_e4m3(x):
    """fp32 ``|x| <= 448`` rounded to the nearest float8 e4m3 value (ties to even), as the GPU's ``cvt.rn``
    and PyTorch's cast do: 3 mantissa bits for normals (>= 2^-6), multiples of 2^-9 below."""
    b_a = tl.abs(x)
    b_bits = b_a.to(tl.int32, bitcast=True)
    b_normal = ((b_bits + 0x7FFFF + ((b_bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    b_sub = ((b_a * 512.0 + _MAGIC_F) - _MAGIC_F) * 0.001953125
    b_y = tl.where(b_a >= 0.015625, b_normal, b_sub)
    return tl.where(x < 0, -b_y, b_y)


@triton.jit
def _quantize_rows(X, MEAN, o_s, o_d, m_d, S, s_xs, SMOOTH: tl.constexpr):
    """Rows ``o_s`` of one (batch, head) of X as fp32, smoothed by MEAN; zeros outside."""
    tile = (o_s < S)[:, None] & m_d[None, :]
    b_x = tl.load(X + o_s[:, None] * s_xs + o_d[None, :], mask=tile, other=0).to(tl.float32)
    if SMOOTH:
        b_x = tl.where(tile, b_x - tl.load(MEAN + o_d, mask=m_d, other=0.0)[None, :], 0.0)
    return b_x


@triton.jit
def _quantize_kernel(
    X, MEAN, OUT, SCALE,
    s_xb, s_xs, s_xh,
    s_ob, s_os, s_oh, s_od,
    H, S, M, levels,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, PER_CHANNEL: tl.constexpr, SMOOTH: tl.constexpr,
    FP8: tl.constexpr = False, ROUND_FP8: tl.constexpr = False, SUB: tl.constexpr = 32, GIVEN: tl.constexpr = False,
    RCP: tl.constexpr = False, PADDED: tl.constexpr = False,
):
    """One (block of tokens, batch x head): what :func:`quantize_blocks` computes, or, with ``GIVEN`` scales per
    (batch, head, channel), :func:`quantize_int8_channels` (or with ``FP8`` :func:`quantize_fp8_channels`); the
    output strides may transpose (V is written ``[B, H, D, S]`` for the PV product). The block is walked in tiles
    of SUB tokens: twice for scales per block (its maximum, then the values: the second reads hit L2), once with
    GIVEN scales, so that a program holds little and many run per SM. ``PADDED``: OUT has rows up to M x BLOCK
    (whole blocks), and the rows past S take the codes of zeros."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    X += i_b.to(tl.int64) * s_xb + i_h * s_xh
    OUT += i_b.to(tl.int64) * s_ob + i_h * s_oh
    MEAN += i_bh * D
    # every division rounded exactly (div_rn; the values' too without RCP), as PyTorch's: compiled '/' is
    # approximate on NVIDIA GPUs, and a code at a .5 boundary would then differ by one from quantize_blocks
    if GIVEN:  # values against the given scale per (batch, head, channel): e4m3 (FP8) or INT8
        b_scale = tl.load(SCALE + i_bh * D + o_d, mask=m_d, other=1.0)
    else:  # the block's maximum first
        b_amax = tl.zeros([BLOCK_D], tl.float32)
        for i_t in range(BLOCK // SUB):
            o_s = i_m * BLOCK + i_t * SUB + tl.arange(0, SUB)
            b_amax = tl.maximum(b_amax, tl.max(tl.abs(_quantize_rows(X, MEAN, o_s, o_d, m_d, S, s_xs, SMOOTH)), 0))
        if PER_CHANNEL:
            b_scale = tl.maximum(tl.math.div_rn(b_amax, levels), 1e-12)
            tl.store(SCALE + (i_bh * M + i_m) * D + o_d, b_scale, mask=m_d)
        else:
            b_scale = tl.maximum(tl.math.div_rn(tl.max(b_amax, 0), levels), 1e-12) + tl.zeros_like(b_amax)
            tl.store(SCALE + i_bh * M + i_m, tl.max(b_scale, 0))
    if RCP:
        b_rcp = tl.math.div_rn(tl.full([BLOCK_D], 1.0, tl.float32), b_scale)  # exactly rounded, per channel
    for i_t in range(BLOCK // SUB):
        o_s = i_m * BLOCK + i_t * SUB + tl.arange(0, SUB)
        b_x = _quantize_rows(X, MEAN, o_s, o_d, m_d, S, s_xs, SMOOTH)
        if RCP:  # a fused multiply-add with +0: rounded once, never contracted into the rounding's + 0.5 below
            b_y = tl.fma(b_x, tl.broadcast_to(b_rcp[None, :], [SUB, BLOCK_D]), tl.zeros([SUB, BLOCK_D], tl.float32))
        else:
            b_y = tl.math.div_rn(b_x, b_scale[None, :])
        p_o = OUT + o_s[:, None] * s_os + o_d[None, :] * s_od
        if PADDED:  # rows past S lie in the output's padding (zeros in, codes 0 out): no token mask, wide stores
            m_o = (o_s < M * BLOCK)[:, None] & m_d[None, :]  # (always true for the tokens: it gives the mask a shape)
        else:
            m_o = (o_s < S)[:, None] & m_d[None, :]
        if FP8:
            if ROUND_FP8:  # the interpreter's cast truncates
                b_y = _round_e4m3(b_y)
            tl.store(p_o, b_y.to(tl.float8e4nv), mask=m_o)
        else:
            b_r = tl.where(b_y >= 0, tl.floor(b_y + 0.5), -tl.floor(0.5 - b_y))
            tl.store(p_o, tl.minimum(tl.maximum(b_r, -levels), levels).to(tl.int8), mask=m_o)


# The quantiser's launch: warps, and the tokens of a block it holds at once (QUANTIZE_SUB, a divisor of the block;
# INT8/INT4 walk the block twice). Up to 99705e6 it held a whole [128, 128] block at 8 warps (240-255 registers, one
# program per SM; at 4 warps it spilled 1,084-1,612 B). `quantized_quick.py --quantiser` at a89e975, the whole
# quantisation of q/k/v in ms, INT8 / FP8 PV (the FP8 V scales by one aminmax pass since a89e975):
#   (warps, tokens)  1.3B: (4, 32) 0.66 / 0.72-0.76, (8, 32) 0.80 / 0.85, (4, 64) 0.51 / 0.61-0.66,
#                    (8, 64) 0.57 / 0.64, (8, 128) 0.49-0.50 / 0.59;
#                    14B: (4, 32) 2.35 / 2.19, (8, 32) 3.71 / 3.29, (4, 64) 2.23 / 2.08, (8, 64) 2.72 / 2.38,
#                    (8, 128) 2.52 / 2.38.
# (4, 64): the fastest at 14B (12% under (8, 128); the one-pass kernel before took 2.27 / 2.62 ms at 16ecb6a), and
# within 0.02-0.07 ms of (8, 128) at 1.3B (the one-pass kernel: 0.47 / 0.61 ms); 159-168 registers.
# (Tried and dropped, H200 at 5c27033, `benchmarks/quantized_quick.py --quantiser`: the quantisation in two kernels,
# each block's per-channel maximum, minimum and sum first, then one program per 64-token tile deriving its scale
# from them, so that K's mean and V's channel scales came from the block statistics instead of PyTorch reductions.
# GPU ms for Q / K / V at 1.3B: 0.172 / 0.245 / 0.209 against this kernel's 0.070 / 0.125 / 0.128; at 14B 1.24 /
# 1.70 / 1.30 against 0.44 / 0.69 / 0.60. One tensor is 100 MB in bf16 at 1.3B and 774 MB at 14B: this kernel reads
# each block from DRAM once and again from L2, near the memory's speed at 14B; the split read DRAM twice.)
QUANTIZE_WARPS = 4
QUANTIZE_SUB = 64
# V^T's rows (tokens) are padded to whole blocks (see _quantize_triton): stored without a token mask (PADDED), the
# codes of a thread's consecutive tokens go out in wide stores. With the mask `token < S` (S = 32,760 is not a
# multiple of 16, so Triton cannot prove the mask constant over a vector), ptxas for sm_90a emitted one byte store
# per code (64 STG.U8 per tile and thread); padded, four 128-bit stores. H200, 1908a99, `benchmarks/quantized_quick.py`:
# the quantisation of q/k/v at 1.3B, GPU ms, masked -> padded: INT8 0.548 -> 0.334, FP8 0.552 -> 0.322 (the INT8
# call at density 0.25: 2.89 -> 2.70 ms); at 14B (S = 75,600, a multiple of 16: wide stores either way) unchanged.
QUANTIZE_PADDED = True


def _quantize_triton(
    x: torch.Tensor, block: int, bits: int, *, per_channel: bool = False, smooth: bool = False,
    transpose: bool = False, mean: torch.Tensor | None = None, fp8: bool = False, channels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_blocks` in one Triton pass; ``transpose`` writes the values ``[B, H, D, S]`` (a view
    of rows padded to whole blocks). ``fp8``: :func:`quantize_fp8_channels` instead (``bits`` unused);
    ``channels``: :func:`quantize_int8_channels`; either way the scales come from one PyTorch reduction."""
    batch, seq, heads, dim = x.shape
    blocks = -(-seq // block)
    dtype = torch.float8_e4m3fn if fp8 else torch.int8
    if transpose:
        # rows padded to whole blocks: Triton loads V^T tiles in wide vectors only when the row stride is a
        # multiple of 16 bytes. S = 32,760 (the 1.3B shape) is not, and there the kernel took 2.2x the time
        # per key tile that it takes at S = 75,600 (profile at 7f5eeaf)
        values = torch.empty(batch, heads, dim, blocks * block, dtype=dtype, device=x.device)[..., :seq]
        strides = (values.stride(0), values.stride(3), values.stride(1), values.stride(2))
    else:
        values = torch.empty(batch, seq, heads, dim, dtype=dtype, device=x.device)
        strides = (values.stride(0), values.stride(1), values.stride(2), values.stride(3))
    if channels and (fp8 or bits != 8):
        raise ValueError(f"channels=True quantises to INT8 (bits=8, fp8=False), got bits={bits}, fp8={fp8}")
    if fp8 or channels:
        scales = channel_scales(x, 448.0 if fp8 else 127.0)
    else:
        scales = torch.empty((batch, heads, blocks, dim) if per_channel else (batch, heads, blocks), device=x.device)
    if smooth:  # [B, H, D]: the tokens' own mean, or the one given (a ring step smooths by the whole sequence's)
        mean = (x.mean(1, dtype=torch.float32) if mean is None else mean.float()).contiguous()
    else:
        mean = scales  # unused
    x = x if x.stride(-1) == 1 else x.contiguous()
    _quantize_kernel[(blocks, batch * heads)](
        x, mean, values, scales, *_strides3(x), *strides, heads, seq, blocks, float(_LEVELS.get(bits, 0)),
        D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK=block, PER_CHANNEL=per_channel, SMOOTH=smooth,
        FP8=fp8, ROUND_FP8=fp8 and not x.is_cuda, SUB=math.gcd(QUANTIZE_SUB if x.is_cuda else 32, block),
        GIVEN=fp8 or channels, RCP=QUANTIZE_RCP, PADDED=transpose and QUANTIZE_PADDED,
        num_warps=QUANTIZE_WARPS if x.is_cuda else 4,
    )  # fmt: skip
    return values, scales


# Launch of the forward kernel on the GPU, and K / V^T tiles by TMA (device-built descriptors, as the bf16
# forward's) instead of register loads, which stage every tile through registers (no tile pipeline).
# H200, `benchmarks/quantized_quick.py --sweep` at c7a5733, INT8, ms (rows/warps/stages, TMA or not):
#   1.3B dense:  64/4/3 TMA 15.00, 64/4/2 TMA 15.68, 128/8/3 TMA 17.91, 128/8/3 26.78, 64/4/2 31.20
#   1.3B 0.25:   64/4/3 TMA 4.17,  64/4/2 TMA 4.34,  128/8/3 TMA 4.92,  128/8/3 7.00
#   14B dense:   64/4/3 TMA 249.0, 64/4/2 259.0, 64/4/2 TMA 259.6, 128/8/3 270.2, 128/8/3 TMA 286.4
#   14B 0.25:    64/4/3 TMA 64.6,  64/4/2 67.3,  64/4/2 TMA 67.3,  128/8/3 69.8
# (ptxas for sm_90a, scripts/compile_kernels_sm90.py: with TMA, 40 B of spills at 128/8/3.)
# pv="fp8" at 16ecb6a (`quantized_quick.py --sweep`, ms; 64 rows and 4 warps, TMA): 2 stages 10.36 / 3.01 / 173.3 /
# 47.2 at 1.3B dense / 1.3B 0.25 / 14B dense / 14B 0.25; 3 stages 11.97 / 3.38 / 182.2 / 47.9; 4 stages and 128 rows
# at 8 warps slower everywhere. INT8 kept its launch (3 stages 15.66 / 4.33 / 254.2 / 65.8; 2 stages 15.78 / 4.32 /
# 266.2 / 67.7).
# maxnreg: a register cap for ptxas (None: its choice). Left alone, ptxas gives the INT8 kernel 240 registers and,
# with PEEL_RAGGED, the FP8 kernel 234 (165 before): two programs of 4 warps per SM. Capped at 168 neither spills
# (scripts/compile_kernels_sm90.py), the loop keeps its code, and three programs fit (74 KB of shared memory each).
# H200, ac512c1, `benchmarks/quantized_quick.py` (results/quantized-quick-ac512c1.txt), ms at 1.3B dense / 1.3B 0.25 /
# 14B dense / 14B 0.25:
#   FP8, peeled and folded: capped 8.77 / 2.64 / 149.45 / 40.70, uncapped 10.07 / 3.03 / 185.52 / 45.04;
#   INT8, peeled: capped 13.25 / 3.74 / 224.79 / 58.26, uncapped 14.84 / 4.18 / 256.50 / 65.66.
QUANT_LAUNCH = {"int": {"rows": 64, "warps": 4, "stages": 3, "maxnreg": 168},
                "fp8": {"rows": 64, "warps": 4, "stages": 2, "maxnreg": 168}}
QUANT_TMA = True
# pv="fp8": accumulate in the MMA (one instruction less per output, but Hopper's FP8 MMAs sum in reduced precision)
# or add each key tile's product in fp32 (as SageAttention2 does). At 16ecb6a (3 stages) within 4% either way; at the
# 2-stage default (a89e975) 5-18% slower in the MMA; the same error against bf16. The fp32 sum stays.
FP8_ACC_IN_DOT = False


# The ragged last key tile alone takes the key mask: with PEEL_RAGGED, the loop walks the other tiles unmasked and
# that tile, the last of an ascending index list (BlockMask's contract), runs once after it. Masking every tile cost
# a select per score and the column indices per tile: the FP8 loop, per tile and thread at 64 rows, is 807 sm_90
# instructions masked, 678 peeled, 622 peeled and folded (below); INT8's 1417 and 1224.
PEEL_RAGGED = True
# pv="fp8": the integer scores stay as the magic-number floats (the add folds into the MMA's accumulator); their
# offset goes into the exponent's per-row bias, one subtraction per score fewer. The bias is the fp32 sum of a
# term near 1.5 * 2^23 * c and the row maximum, so the exponent moves by up to ~1 unit of the integer score
# (hundreds of units below INT8's own rounding of q and k); the reference follows it exactly. At large scales
# (c above about 0.01, outlier channels) that rounding alone could lift the largest p past 448 (INT8's past 127,
# which wraps in int8): _folded_exp2 raises the bias past every rounding, so it cannot.
# H200, ac512c1 (`benchmarks/quantized_quick.py`), FP8 ms at 1.3B dense / 0.25, 14B dense / 0.25, capped at 168
# registers: peeled and folded 8.77 / 2.64 / 149.45 / 40.70; peeled only 9.09 / 2.71 / 157.26 / 42.20; neither
# (and uncapped, as before) 10.10 / 2.97 / 165.00 / 45.52.
FOLD_MAGIC = True
# pv="int8"/"int4": the same fold, and P quantised through the exponent: its bias holds the tile's maximum logit,
# so p comes out as p / max x P in [0, P] (P = 127 or 7) with no maximum of p, no ratio and no integer subtraction;
# INT8's row sums took p unrounded (as FP8's; INT_SUMS_MMA now sums the codes), and its V has one scale per
# (batch, head, channel) over all tokens (as FP8's), applied at the end, so that each output takes two fused
# multiply-adds per key tile. INT4 keeps a V scale per key block and channel, and sums the rounded p. On random inputs
# (interpreter) INT8's error against exact attention goes 0.57% -> 0.60% and 0.30% -> 0.32%; INT4's is unchanged. The
# sm_90 loop: 1417 -> 864 instructions per tile and thread (FP8: 622). False: P against the tile maximum of p taken from
# p itself, rounded row sums, V per key block (as before).
INT_FOLD = True
# pv="int8"/"int4" with INT_FOLD: P's codes rounded through half precision. Each group of four p (fp32, from the
# exponent) goes to fp16 in pairs (one F2FP a pair), is rounded to an integer by a half-precision magic add (1.5 *
# 2^10, one HADD2 a pair), and the four low bytes are packed into the int8 operand by one byte permute: 1.25
# instructions a p where the fp32 magic add and the byte extraction take 2 (sm_90a, ptxas: one FADD and one PRMT a
# p). The fp16 rounding moves p by at most 2^-11 of it (0.03 at the top code), so the largest code stays P. Without
# INT_SUMS_MMA the row sums stay those of p unrounded in fp32. ex2.approx.f16x2 for the exponent itself was compiled
# too: ptxas splits it into two MUFU.EX2.F16 and repacks the halves, so it saves nothing.
# H200, `benchmarks/quantized_quick.py`, INT8 calls in ms at 1.3B dense / 1.3B 0.25 / 14B dense / 14B 0.25, against
# the loop before both flags (1908a99's): at 362f8cc, both on 9.32 / 2.62 / 162.0 / 45.37 against 9.55 / 2.68 / 169.8
# / 45.84; at 93ee971, both on 9.28 / 2.63 / 161.1 / 42.4, INT_CODES16 alone 9.29 / 2.62 / 163.7 / 45.1, neither
# 9.50 / 2.68 / 169.0 / 45.9. sm_90a loop instructions per tile and thread: 871 neither, 839 INT_CODES16 alone, 835
# INT_SUMS_MMA alone, 803 both.
INT_CODES16 = True
# pv="int8"/"int4" with INT_FOLD: each row's sum of the rounded codes of a key tile by one more small MMA, the codes
# times a [BLOCK_N, 16] int8 matrix whose first column is ones (the MMA sums exactly in int32), instead of a sum of
# p over the tile's columns in fp32 (a FADD a score and the shuffles). The sums are then those of the rounded codes,
# as the PV product uses them (INT4's always were): the output is a convex combination of V's values. The MMA waits
# on its own (Triton waits after every dot), yet it is faster than the sums in fp32 (times above).
INT_SUMS_MMA = True
# (Tried and dropped, H200 at 362f8cc, `benchmarks/quantized_quick.py`: INT8's running maximum moved only when a
# tile's maximum passed it by more than 8 bits, as FlashAttention-4 does, and the accumulator rescaled only in a tile
# where some row's maximum moved, by one branch for the program; the PV product converted by I2FP and added by one
# fused multiply-add. The branch is rarely taken, yet the call got slower: 9.32 -> 10.13 ms at 1.3B dense, 162.0 ->
# 174.2 at 14B dense, 2.62 -> 2.84 and 45.4 -> 46.1 at density 0.25. ptxas spilled 4 B at the 168-register cap.)
# (Tried for INT8 and dropped, untimed: P against the running maximum rounded up to a whole number (base 2), so that
# every tile's codes share one scale and the PV products add up in the MMA's own int32 accumulator across key tiles,
# shifted right when that reference rises; no per-tile conversion of the products. It matched its step-by-step
# reference (1e-7) but erred 20-25% more against exact attention (1.74 / 1.93 / 1.15% against 1.37 / 1.56 / 0.98% on
# small random cases), and Triton 3.6's sm_90a code for it is longer: 1,174-1,248 loop instructions per tile and
# thread against 874, at 226 registers. ptxas put the int32 accumulator and the score tile's fragment in overlapping
# registers and copied the accumulator in and out around every PV product (~290 IMAD.MOV + ~290 MOV), with the shift
# or without it.)


@triton.jit
def _folded_exp2(b_x, c, b_peak, top_log2):
    """``exp2(x * c - peak + top)`` from the magic-number scores ``b_x`` (1.5 * 2^23 + x, exact): the offset goes
    into a per-row bias, and both fused multiply-adds are explicit (one rounding each, on the GPU and in the
    interpreter alike). The bias is then raised past its rounding: the fp32 bias (about 1.5 * 2^23 * c), the peak's
    and the final exponent's roundings and exp2's error could otherwise lift the row's largest p above the top level
    (p = P * 2^0.006 rounds INT8's 127 to 128, which wraps to -128; FP8's 448 to 480). Those roundings add up to
    at most (|bias| + |peak| + log2 P) * 2^-23 + 2^-21.5; the bias is raised by twice that, so the largest p
    stays at most P (or 448). The price: it comes out a little under P, so INT8's top code is 127 for c up to
    about 0.0015 (the reference model's c is at most 0.001), 126 at 0.002 and 124 at 0.01; FP8's stays 448 up to
    c of about 0.017. The same factor scales a tile's weights and its row sums. :func:`_folded_reference` repeats
    it."""
    b_bias = tl.fma(tl.full(b_peak.shape, _MAGIC_F, tl.float32), tl.broadcast_to(c, b_peak.shape), b_peak - top_log2)
    b_bias += (tl.abs(b_bias) + tl.abs(b_peak) + top_log2) * 2.384185791015625e-07 + 9.5367431640625e-07
    return tl.exp2(tl.fma(b_x, tl.broadcast_to(c, b_x.shape), tl.broadcast_to(-b_bias[:, None], b_x.shape)))


_HALF_MAGIC = tl.constexpr(1536.0)  # 1.5 * 2^10: fp16 values in [1024, 2048) are the integers


@triton.jit
def _codes16(b_p, ASM: tl.constexpr):
    """int8 ``round(p)`` for fp32 ``p`` in [0, 127.5) (INT_CODES16): p rounded to fp16, then to an integer by the
    half-precision magic add, whose low byte is that integer (``1536 + k`` is ``0x6600 + k`` for ``k < 256``).
    ``ASM``: by PTX on the GPU, four per instance; else the same roundings in tl ops (the interpreter)."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 h0, h1, m;
            mov.b32 m, 0x66006600;
            cvt.rn.f16x2.f32 h0, $2, $1;
            cvt.rn.f16x2.f32 h1, $4, $3;
            add.rn.f16x2 h0, h0, m;
            add.rn.f16x2 h1, h1, m;
            prmt.b32 $0, h0, h1, 0x6420;
            }""",
            constraints="=r,r,r,r,r", args=[b_p], dtype=tl.int8, is_pure=True, pack=4,
        )  # fmt: skip
    b_s = b_p.to(tl.float16) + tl.full(b_p.shape, _HALF_MAGIC, tl.float16)  # rounded to the integer, ties to even
    return (b_s.to(tl.float32) - _HALF_MAGIC).to(tl.int8)


@triton.jit
def _quant_tile(
    b_q, K, VT, desc_k, desc_vt, KS, VS, j, q_scale, b_m, b_l, b_acc, o_d, m_d, s_ks, s_vd, i_bh, SK, MK, p_levels,
    log2_levels, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, PV_FP8: tl.constexpr, ROUND_FP8: tl.constexpr, FP8_ACC_IN_DOT: tl.constexpr,
    MASKED: tl.constexpr, FOLD: tl.constexpr, V_BLOCKWISE: tl.constexpr, CODES16: tl.constexpr = False,
    SUMS_MMA: tl.constexpr = False, ASM: tl.constexpr = False, b_ones=None,
):
    """One key tile ``j`` of the online softmax: the running maxima, row sums and accumulator after it."""
    o_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < SK
    # V^T tiles [D, N]: the PV product's B operand with its reduction axis contiguous, the only
    # layout Hopper's 8-bit tensor-core instructions take from shared memory
    if USE_TMA:
        b_k = desc_k.load([j * BLOCK_N, 0])
        b_vt = desc_vt.load([0, j * BLOCK_N])
    else:
        b_k = tl.load(K + o_n[:, None] * s_ks + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0)
        b_vt = tl.load(VT + o_d[:, None] * s_vd + o_n[None, :], mask=m_d[:, None] & m_n[None, :], other=0.0)
    # |q8 . k8| <= 127^2 * 256 < 2^22: the exact magic-number conversion applies
    # the integer scores; their scale c > 0 is applied to the row maxima and inside the exponent's multiply-add
    # (max(x) * c rounds to max(x * c): the same values as scaling every score first, one multiply fewer each)
    c = q_scale * tl.load(KS + i_bh * MK + j)
    if FOLD:  # 1.5 * 2^23 + x as floats (exact); the offset is taken out of the row maxima and the bias
        b_x = (tl.dot(b_q, tl.trans(b_k), out_dtype=tl.int32) + _MAGIC_I).to(tl.float32, bitcast=True)
        if MASKED:
            b_x = tl.where(m_n[None, :], b_x, float("-inf"))
        b_tmax = (tl.max(b_x, 1) - _MAGIC_F) * c  # the tile's largest logit per row (base 2)
        b_m_new = tl.maximum(b_m, b_tmax)
    else:
        b_x = _i32_to_f32(tl.dot(b_q, tl.trans(b_k), out_dtype=tl.int32))
        if MASKED:
            b_x = tl.where(m_n[None, :], b_x, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_x, 1) * c)
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_alpha = tl.exp2(b_m - b_m_safe)
    if PV_FP8:
        # p * 448 (e4m3's largest value; the factor is folded into the exponent and cancels in the final
        # division) straight to e4m3: no per-tile scale, no integer conversion; the row sums use p
        # unrounded, V's per-channel scale is applied once at the end
        if FOLD:
            b_p = _folded_exp2(b_x, c, b_m_safe, _LOG2_448)
        else:
            b_p = tl.exp2(b_x * c - (b_m_safe - _LOG2_448)[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if ROUND_FP8:  # the interpreter's float -> e4m3 cast truncates; round as the GPU's cvt.rn does
            b_p = _round_e4m3(b_p)
        if FP8_ACC_IN_DOT:  # accumulated by the MMA itself (Hopper's FP8 MMAs add in reduced precision)
            b_acc = tl.dot(b_p.to(tl.float8e4nv), tl.trans(b_vt), b_acc * b_alpha[:, None])
        else:  # each tile's product on its own, added in fp32
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(tl.float8e4nv), tl.trans(b_vt))
    elif FOLD:
        # p / (the row's maximum in the tile) x P, in [0, P], straight from the exponent: the bias holds the tile's
        # maximum logit instead of the running one, so no maximum of p is taken and no ratio applied; the weight of
        # the tile, exp2(tile max - running max) / P, goes onto the row sums and the product
        b_p = _folded_exp2(b_x, c, b_tmax, log2_levels)
        if CODES16:  # rounded through half precision, four per PTX instance (INT_CODES16)
            b_pq = _codes16(b_p, ASM)
            if V_BLOCKWISE and not SUMS_MMA:  # INT4: sums of the rounded p
                b_p = b_pq.to(tl.float32)
        else:
            # rounded to an integer by the magic add; its low byte is that integer (the magic's low 22 bits are zero)
            b_shifted = b_p + _MAGIC_F
            b_pq = b_shifted.to(tl.int32, bitcast=True).to(tl.int8)
            if V_BLOCKWISE:  # INT4: sums of the rounded p (at 7 levels many round to 0)
                b_p = b_shifted - _MAGIC_F
        # the weight with its last two mantissa bits cleared: 1.5 * 2^23 times it is then exact, so the product's
        # conversion below (pv * w - 1.5 * 2^23 * w in one fused multiply-add) rounds only once
        b_pscale = (tl.exp2(b_tmax - b_m_safe) / p_levels).to(tl.int32, bitcast=True)
        b_pscale = (b_pscale & -4).to(tl.float32, bitcast=True)
        if SUMS_MMA:  # the rounded codes' row sums by an MMA with a column of ones (exact in int32)
            b_sum = tl.sum(tl.dot(b_pq, b_ones, out_dtype=tl.int32), 1).to(tl.float32)
        else:
            b_sum = tl.sum(b_p, 1)  # INT8: p unrounded, as FP8's sums (INT4: rounded)
        b_l = b_l * b_alpha + b_sum * b_pscale
        # |p8 . v8| <= 127^2 * BLOCK_N < 2^22 for key tiles up to 256
        b_pv = (tl.dot(b_pq, tl.trans(b_vt), out_dtype=tl.int32) + _MAGIC_I).to(tl.float32, bitcast=True)
        if V_BLOCKWISE:  # V scaled per channel of each key block (INT4)
            v_scale = tl.load(VS + (i_bh * MK + j) * D + o_d, mask=m_d, other=0.0)
            b_acc = b_acc * b_alpha[:, None] + (b_pv - _MAGIC_F) * (b_pscale[:, None] * v_scale[None, :])
        else:  # per channel over all tokens, applied at the end: two fused multiply-adds per output
            b_acc = tl.fma(b_acc, tl.broadcast_to(b_alpha[:, None], [BLOCK_M_ROWS, BLOCK_D]),
                           tl.fma(b_pv, tl.broadcast_to(b_pscale[:, None], [BLOCK_M_ROWS, BLOCK_D]),
                                  tl.broadcast_to(-(b_pscale * _MAGIC_F)[:, None], [BLOCK_M_ROWS, BLOCK_D])))
    else:
        b_p = tl.exp2(b_x * c - b_m_safe[:, None])
        # P is quantised per (row, key tile) against the tile row's maximum: p / max does not depend on
        # the running maximum, and tiles far below the row's maximum keep their resolution
        b_pmax = tl.maximum(tl.max(b_p, 1), 1e-30)
        b_ratio = tl.math.div_rn(p_levels + tl.zeros_like(b_pmax), b_pmax)  # exact, as the reference's
        b_shifted = b_p * b_ratio[:, None] + _MAGIC_F  # rounds p / max * P to an integer in [0, P]
        b_pt = b_shifted - _MAGIC_F  # that integer as fp32, for the row sums
        b_pq = (b_shifted.to(tl.int32, bitcast=True) - _MAGIC_I).to(tl.int8)  # and as int8, for the MMA
        b_pscale = b_pmax / p_levels
        b_l = b_l * b_alpha + tl.sum(b_pt, 1) * b_pscale
        v_scale = tl.load(VS + (i_bh * MK + j) * D + o_d, mask=m_d, other=0.0)
        # |p8 . v8| <= 127^2 * BLOCK_N < 2^22 for key tiles up to 256
        b_pv = _i32_to_f32(tl.dot(b_pq, tl.trans(b_vt), out_dtype=tl.int32))
        b_acc = b_acc * b_alpha[:, None] + b_pv * (b_pscale[:, None] * v_scale[None, :])
    return b_m_new, b_l, b_acc


@triton.jit
def _quant_fwd_kernel(
    Q, K, VT, QS, KS, VS, OUT, LSE, KV_NUM, KV_IDX,
    s_qb, s_qs, s_qh,
    s_kb, s_ks, s_kh,
    s_vb, s_vh, s_vd,
    s_ob, s_os, s_oh,
    s_nb, s_nh, s_nm,
    s_ib, s_ih, s_im,
    H, SQ, SK, MQ, MK, qk_scale, p_levels, log2_levels,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    RETURN_LSE: tl.constexpr, USE_TMA: tl.constexpr = False, PV_FP8: tl.constexpr = False,
    ROUND_FP8: tl.constexpr = False, FP8_ACC_IN_DOT: tl.constexpr = False, PEEL: tl.constexpr = False,
    FOLD: tl.constexpr = False, V_BLOCKWISE: tl.constexpr = True, CODES16: tl.constexpr = False,
    SUMS_MMA: tl.constexpr = False, ASM: tl.constexpr = False,
):
    # one program: ROWS query tokens of a mask block of BLOCK_M (a divisor: half a 128-row block keeps the
    # int32 score tile, P and the fp32 accumulator in registers)
    i_r, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_m = (i_r * ROWS) // BLOCK_M  # the mask row (query block)
    o_m = i_r * ROWS + tl.arange(0, ROWS)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < SQ, o_d < D
    b_q = tl.load(Q + i_b * s_qb + i_h * s_qh + o_m[:, None] * s_qs + o_d[None, :], mask=m_m[:, None] & m_d[None, :],
                  other=0)  # fmt: skip
    q_scale = tl.load(QS + i_bh * MQ + i_m) * qk_scale  # the softmax scale (in base 2) folded in

    n_it = tl.load(KV_NUM + i_b * s_nb + i_h * s_nh + i_m * s_nm)
    p_idx = KV_IDX + i_b * s_ib + i_h * s_ih + i_m * s_im
    K += i_b * s_kb + i_h * s_kh
    VT += i_b * s_vb + i_h * s_vh
    desc_k = None
    desc_vt = None
    if USE_TMA:  # tiles past SK or D read as zeros, as the masked loads below
        desc_k = tl.make_tensor_descriptor(K, shape=[SK, D], strides=[s_ks, 1], block_shape=[BLOCK_N, BLOCK_D])
        desc_vt = tl.make_tensor_descriptor(VT, shape=[D, SK], strides=[s_vd, 1], block_shape=[BLOCK_D, BLOCK_N])
    b_m = tl.full([ROWS], float("-inf"), tl.float32)
    b_l = tl.zeros([ROWS], tl.float32)
    b_acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    b_ones = None
    if SUMS_MMA:  # [BLOCK_N, 16] int8: ones in the first column, so that codes @ b_ones holds the row sums there
        b_ones = tl.where(tl.arange(0, 16)[None, :] == 0, 1, 0).to(tl.int8) + tl.zeros([BLOCK_N, 16], tl.int8)
    # PEEL: the ragged last key block, when kept, is the list's last entry (ascending lists); it alone is masked,
    # after the loop. Met anywhere else in the loop (a list out of order), or an index outside [0, MK) met there, the
    # row's output becomes NaN, not silently wrong.
    n_loop = n_it
    if PEEL:  # (a key tile is a mask block here)
        ragged, n_loop = _peel_split(p_idx, n_it, SK, MK, BLOCK_N, 1)
    misplaced = n_it * 0
    for it in range(n_loop):
        j = tl.load(p_idx + it)
        if PEEL:
            misplaced += _out_of_place(j, ragged)
        b_m, b_l, b_acc = _quant_tile(
            b_q, K, VT, desc_k, desc_vt, KS, VS, j, q_scale, b_m, b_l, b_acc, o_d, m_d, s_ks, s_vd, i_bh, SK, MK,
            p_levels, log2_levels, D=D, BLOCK_D=BLOCK_D, BLOCK_M_ROWS=ROWS, BLOCK_N=BLOCK_N, USE_TMA=USE_TMA,
            PV_FP8=PV_FP8, ROUND_FP8=ROUND_FP8, FP8_ACC_IN_DOT=FP8_ACC_IN_DOT, MASKED=not PEEL, FOLD=FOLD,
            V_BLOCKWISE=V_BLOCKWISE, CODES16=CODES16, SUMS_MMA=SUMS_MMA, ASM=ASM, b_ones=b_ones,
        )
    if PEEL:
        if n_loop < n_it:
            b_m, b_l, b_acc = _quant_tile(
                b_q, K, VT, desc_k, desc_vt, KS, VS, ragged, q_scale, b_m, b_l, b_acc, o_d, m_d, s_ks, s_vd, i_bh,
                SK, MK, p_levels, log2_levels, D=D, BLOCK_D=BLOCK_D, BLOCK_M_ROWS=ROWS, BLOCK_N=BLOCK_N,
                USE_TMA=USE_TMA, PV_FP8=PV_FP8, ROUND_FP8=ROUND_FP8, FP8_ACC_IN_DOT=FP8_ACC_IN_DOT, MASKED=True,
                FOLD=FOLD, V_BLOCKWISE=V_BLOCKWISE, CODES16=CODES16, SUMS_MMA=SUMS_MMA, ASM=ASM, b_ones=b_ones,
            )
        b_l = tl.where(misplaced > 0, float("nan"), b_l)
    if not V_BLOCKWISE:  # V's scales per (batch, head, channel), applied once
        b_acc *= tl.load(VS + i_bh * D + o_d, mask=m_d, other=0.0)[None, :]
    b_o = b_acc / tl.where(b_l == 0.0, 1.0, b_l)[:, None]
    p_o = OUT + i_b * s_ob + i_h * s_oh + o_m[:, None] * s_os + o_d[None, :]
    tl.store(p_o, b_o.to(OUT.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    if RETURN_LSE:  # natural log of the (quantised) softmax mass, logits of the smoothed keys; -inf: nothing kept
        b_log = b_m + tl.log2(tl.where(b_l == 0.0, 1.0, b_l))
        if PV_FP8:  # the sums carry the factor 448
            b_log -= _LOG2_448
        b_log *= 0.6931471805599453
        tl.store(LSE + i_bh * SQ + o_m, tl.where(b_l == 0.0, float("-inf"), b_log), mask=m_m)


def _use_quant_tma(k8: torch.Tensor, vt: torch.Tensor) -> bool:
    """QUANT_TMA on a GPU of compute capability 9+, with 16-byte aligned rows (a function, so the tests can run
    the TMA path in the interpreter)."""
    return k8.is_cuda and QUANT_TMA and all(_tma_ok(x) for x in (k8, vt))


_PV_FORMATS = tuple(_PV_BITS)


def _f32(x: float) -> float:
    """``x`` rounded to fp32 (what the kernel receives of a float argument)."""
    return torch.tensor(x, dtype=torch.float32).item()


def _check_pv(pv: str) -> None:
    if pv not in _PV_FORMATS:
        raise ValueError(f"pv must be one of {', '.join(map(repr, _PV_FORMATS))}, got {pv!r}")


def _quantize_all(q, k, v, block_mask, pv, k_mean=None):
    """The reference's quantisation (PyTorch): Q, smoothed K, V per channel (per key block for INT8/INT4,
    over all tokens for FP8), all ``[B, S, H, D]``."""
    block_m, block_n = block_mask.block_size
    q8, q_scale = quantize_blocks(q, block_m, 8)
    k8, k_scale = quantize_blocks(k, block_n, 8, smooth=True, mean=k_mean)
    if pv == "fp8":
        vq, v_scale = quantize_fp8_channels(v)
    elif _v_channels(pv):
        vq, v_scale = quantize_int8_channels(v)
    else:
        vq, v_scale = quantize_blocks(v, block_n, _PV_BITS[pv], per_channel=True)
    return q8, q_scale, k8, k_scale, vq, v_scale


def _v_channels(pv: str) -> bool:
    """Whether V has one scale per (batch, head, channel) over all tokens (else per key block and channel)."""
    return pv == "fp8" or (pv == "int8" and INT_FOLD)


def _quantize_for_kernel(q, k, v, block_mask, pv, k_mean=None):
    """The same values in three Triton passes, V written transposed ``[B, H, D, S]``."""
    block_m, block_n = block_mask.block_size
    q8, q_scale = _quantize_triton(q, block_m, 8)
    k8, k_scale = _quantize_triton(k, block_n, 8, smooth=True, mean=k_mean)
    vt, v_scale = _quantize_triton(v, block_n, _PV_BITS[pv], per_channel=True, transpose=True, fp8=pv == "fp8",
                                   channels=_v_channels(pv) and pv != "fp8")  # fmt: skip
    return q8, q_scale, k8, k_scale, vt, v_scale


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    pv: str = "int8",
    k_mean: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention with INT8 QK^T and an INT8, INT4 or FP8 PV product; forward only (no autograd).

    Args:
        q, k, v: ``[B, S, H, D]`` in bf16, fp16 or fp32; ``D`` at most 256.
        block_mask: the kept blocks; its block sizes are also the quantisation blocks (>= 32 each).
        scale: softmax scale (default ``D ** -0.5``).
        pv: ``"int8"`` (P quantised per row and key tile, V per channel over all tokens), ``"int4"`` (the same
            with V per channel and key block), or ``"fp8"`` (P and V in float8 e4m3, V scaled per channel over
            all tokens).
        k_mean: fp32 ``[B, H, D]`` the keys are smoothed by (default: their own mean). Calls over parts
            of one key sequence (ring steps) pass the whole sequence's, so that their logits share one
            shift and their log-sum-exps merge.
        return_lse: also return the natural-log log-sum-exp ``[B, H, Sq]`` (fp32) of the logits of the
            smoothed keys (``-inf`` for a row with no kept key).

    Returns:
        ``[B, Sq, H, D]`` in q's dtype (and the log-sum-exp). Triton on CUDA or under
        ``TRITON_INTERPRET=1``, else :func:`quantized_attention_reference`.

    The kernel relies on BlockMask's ascending index lists (with PEEL_RAGGED): a row whose list holds the ragged last
    key block anywhere but last, or an index outside ``[0, Mk)`` before the last, gets NaN (output and log-sum-exp),
    not a silently wrong result (a repeated index is not detected). The reference walks any order and never gives
    NaN.
    """
    _check_inputs(q, k, v, block_mask)
    _check_pv(pv)
    if min(block_mask.block_size) < 32 or block_mask.block_size[1] > 256:
        raise ValueError(
            f"quantized attention needs mask blocks of at least 32 tokens and key blocks of at most 256 "
            f"(exact integer products), got block_size={block_mask.block_size}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k_mean is not None and tuple(k_mean.shape) != (q.shape[0], q.shape[2], q.shape[3]):
        raise ValueError(f"k_mean must be [B, H, D] = {[q.shape[0], q.shape[2], q.shape[3]]}, got {list(k_mean.shape)}")
    if not use_triton(q):
        return quantized_attention_reference(q, k, v, block_mask, scale=scale, pv=pv, k_mean=k_mean,
                                             return_lse=return_lse)  # fmt: skip
    q8, q_scale, k8, k_scale, vt, v_scale = _quantize_for_kernel(q, k, v, block_mask, pv, k_mean)
    batch, sq, heads, dim = q.shape
    sk = k.shape[1]
    block_m, block_n = block_mask.block_size
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, sq), dtype=torch.float32, device=q.device) if return_lse else out
    # On the GPU, QUANT_LAUNCH's rows per program (a divisor of the mask block) and warps; half blocks under
    # the interpreter, so that the tests cover the sub-tiling.
    launch = QUANT_LAUNCH["fp8" if pv == "fp8" else "int"]
    levels = float(_LEVELS.get(_PV_BITS[pv], 1))
    codes = pv != "fp8" and INT_FOLD  # P as integer codes through the exponent
    if q.is_cuda:
        rows = launch["rows"] if block_m % launch["rows"] == 0 else block_m
    else:
        rows = block_m // 2
    grid = (triton.cdiv(sq, rows), batch * heads)
    use_tma = _use_quant_tma(k8, vt)
    if use_tma:
        _descriptor_scratch(q.device)
    _quant_fwd_kernel[grid](
        q8, k8, vt, q_scale, k_scale, v_scale, out, lse, block_mask.kv_num_blocks, block_mask.kv_indices,
        *_strides3(q8), *_strides3(k8), *_strides3(vt), *_strides3(out),
        *_mask_strides(block_mask.kv_num_blocks), *_mask_strides(block_mask.kv_indices),
        heads, sq, sk, q_scale.shape[-1], k_scale.shape[-1], scale * _LOG2E, levels, float(_f32(math.log2(levels))),
        D=dim, BLOCK_D=max(32, triton.next_power_of_2(dim)), BLOCK_M=block_m, BLOCK_N=block_n, ROWS=rows,
        RETURN_LSE=return_lse, USE_TMA=use_tma, PV_FP8=pv == "fp8", ROUND_FP8=pv == "fp8" and not q.is_cuda,
        FP8_ACC_IN_DOT=FP8_ACC_IN_DOT, PEEL=PEEL_RAGGED, FOLD=FOLD_MAGIC if pv == "fp8" else INT_FOLD,
        V_BLOCKWISE=not _v_channels(pv), CODES16=codes and INT_CODES16, SUMS_MMA=codes and INT_SUMS_MMA,
        ASM=q.is_cuda and not interpreting(),  # the interpreter runs no inline PTX
        num_warps=launch["warps"] if q.is_cuda else 4, num_stages=launch["stages"] if q.is_cuda else 1,
        **({"maxnreg": launch["maxnreg"]} if q.is_cuda and launch.get("maxnreg") else {}),
    )  # fmt: skip
    return (out, lse) if return_lse else out


def _running_max(tile_max: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """Per (row, key tile) maxima ``[B, H, Sq, Mk]`` -> the running maximum the kernel holds once it has
    walked that tile: the maximum over the row's kept tiles up to it, in the order of the mask's index lists."""
    batch, heads, sq, blocks = tile_max.shape
    rows = torch.arange(sq, device=tile_max.device) // block_mask.block_size[0]
    index = block_mask.kv_indices[:, :, rows].long().expand(batch, heads, -1, -1)
    count = block_mask.kv_num_blocks[:, :, rows].expand(batch, heads, -1)
    walked = torch.arange(index.shape[-1], device=tile_max.device) < count[..., None]
    index = torch.where(walked, index, 0)
    running = tile_max.gather(-1, index).masked_fill(~walked, float("-inf")).cummax(-1).values
    running = running.masked_fill(~walked, float("-inf"))  # the unwalked entries all point at block 0
    out = torch.full_like(tile_max, float("-inf"))
    return out.scatter_reduce_(-1, index, running, reduce="amax")


def quantized_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float | None = None,
    pv: str = "int8",
    k_mean: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same quantisation in PyTorch with an exact softmax, so that the kernel and this differ only by
    float rounding. INT8/INT4: P is quantised per (row, key block) against its maximum there, as the kernel
    does. FP8: P is rounded as ``448 * exp2(s - m)`` with ``m`` the kernel's running maximum at that tile
    (:func:`_running_max`), in base-2 logits from the integer products, as the kernel computes them."""
    _check_pv(pv)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q8, q_scale, k8, k_scale, vq, v_scale = _quantize_all(q, k, v, block_mask, pv, k_mean)
    block_m, block_n = block_mask.block_size
    sq, sk = q.shape[1], k.shape[1]
    rows, cols = torch.arange(sq, device=q.device) // block_m, torch.arange(sk, device=q.device) // block_n
    batch, heads = q.shape[0], q.shape[2]
    blocks = -(-sk // block_n)
    if pv == "fp8" or INT_FOLD:
        if not _v_channels(pv):  # per key block and channel -> per key token and channel
            v_scale = v_scale[:, :, cols].transpose(1, 2)
        return _folded_reference(q8, q_scale[:, :, rows], k8, k_scale[:, :, cols], vq, v_scale, block_mask,
                                 scale * _LOG2E, return_lse, q.dtype, pv)  # fmt: skip
    qd = q8.float() * q_scale[:, :, rows].transpose(1, 2)[..., None]  # [B, S, H, 1] scales
    kd = k8.float() * k_scale[:, :, cols].transpose(1, 2)[..., None]
    vd = vq.float() * v_scale[:, :, cols].transpose(1, 2)  # per channel
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    s = s.masked_fill(~block_mask.expand_tokens(), float("-inf"))
    m = s.amax(-1, keepdim=True)
    peak = torch.where(m == float("-inf"), 0.0, m)
    p = torch.exp(s - peak)
    levels = _LEVELS[_PV_BITS[pv]]
    tiles = torch.nn.functional.pad(p, (0, blocks * block_n - sk)).view(batch, heads, sq, blocks, block_n)
    tile_max = tiles.amax(-1, keepdim=True).clamp_min(1e-30)
    # rounded to the nearest level, ties to even, as the kernel's magic-number add does
    pq = ((tiles * (levels / tile_max)).round() * tile_max / levels).flatten(-2)[..., :sk]
    denom = pq.sum(-1, keepdim=True)
    out = torch.einsum("bhqk,bkhd->bqhd", pq / torch.where(denom == 0, 1.0, denom), vd).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(denom == 0, float("-inf"), peak + torch.log(torch.where(denom == 0, 1.0, denom)))
    return out, lse[..., 0]


def _folded_reference(q8, q_scale, k8, k_scale, vq, v_scale, block_mask, qk_scale, return_lse, dtype, pv):
    """:func:`quantized_attention_reference` for FP8 PV (and INT8/INT4 with INT_FOLD): the kernel's arithmetic.
    Q/K scales already per token ``[B, H, S]``; V's ``[B, H, D]`` per channel or ``[B, Sk, H, D]``."""
    sq, sk = q8.shape[1], k8.shape[1]
    block_n = block_mask.block_size[1]
    blocks = -(-sk // block_n)
    # the integer products are exact in fp32 (|q8 . k8| < 2^24), scaled as the kernel scales them
    products = torch.einsum("bqhd,bkhd->bhqk", q8.float(), k8.float())
    c = (q_scale * torch.tensor(qk_scale, dtype=torch.float32))[..., None] * k_scale[:, :, None, :]
    kept = block_mask.expand_tokens()
    s = (products * c).masked_fill(~kept, float("-inf"))
    batch, heads = s.shape[:2]

    def tiled(x, fill):
        padded = torch.nn.functional.pad(x, (0, blocks * block_n - sk), value=fill)
        return padded.view(batch, heads, sq, blocks, block_n)

    tiles = tiled(s, float("-inf"))
    tile_max = tiles.amax(-1, keepdim=True)  # [B, H, Sq, Mk, 1]; -inf: a tile the row does not keep
    running = _running_max(tile_max[..., 0], block_mask)[..., None]
    peak = running.amax(-2, keepdim=True)  # the row's maximum: the running maximum after the last tile
    running, peak = (torch.where(x == float("-inf"), 0.0, x) for x in (running, peak))
    fp8 = pv == "fp8"
    if fp8:  # 448 * exp2(s - running maximum), rounded to e4m3
        peak_term, top, levels = running, _LOG2_448.value, 448.0
    else:  # levels * exp2(s - the tile's maximum), rounded to an integer
        levels = float(_LEVELS[_PV_BITS[pv]])
        peak_term, top = torch.where(tile_max == float("-inf"), 0.0, tile_max), _f32(math.log2(levels))
    offset = peak_term - top
    if FOLD_MAGIC if fp8 else INT_FOLD:  # fp32 fused multiply-adds (exact in fp64, rounded once to fp32)
        c_tile = tiled(c, 1.0)[..., :1].double()  # one scale per (row, key tile)
        bias = (_MAGIC_F.value * c_tile + offset.double()).float()
        bias = bias + ((bias.abs() + peak_term.abs() + top) * 2.0**-22 + 2.0**-20)  # as _folded_exp2
        logits = ((tiled(products, 0.0) + _MAGIC_F.value).double() * c_tile - bias.double()).float()
        logits = logits.masked_fill(tiles == float("-inf"), float("-inf"))
    else:
        logits = tiles - offset
    p = torch.exp2(logits)
    # each tile's weight, in units of levels * exp2(s - peak): FP8 after the running maximum's rescales; INT8/INT4
    # the tile maximum's distance to the peak, over the levels
    rescale = torch.exp2(running - peak) if fp8 else torch.exp2(tile_max - peak) / levels
    if fp8:
        rounded = p.to(torch.float8_e4m3fn).float()
    else:  # ties to even, as the magic add; INT_CODES16 rounds p to fp16 first, as _codes16
        rounded = (p.half().float() if INT_FOLD and INT_CODES16 else p).round()
    weights = (rounded * rescale).flatten(-2)[..., :sk]
    # the sums of p unrounded, as the kernel's; of the rounded codes for INT4 and with INT_SUMS_MMA
    rounded_sums = not fp8 and (pv == "int4" or (INT_FOLD and INT_SUMS_MMA))
    denom = ((rounded if rounded_sums else p) * rescale).flatten(-2)[..., :sk].sum(-1, keepdim=True)
    vd = vq.float() * (v_scale[:, None] if v_scale.ndim == 3 else v_scale)  # [B, Sk, H, D]
    out = torch.einsum("bhqk,bkhd->bqhd", weights / torch.where(denom == 0, 1.0, denom), vd).to(dtype)
    if not return_lse:
        return out
    unit = 448.0 if fp8 else 1.0
    log2_mass = peak[..., 0, 0] + torch.log2(torch.where(denom == 0, unit, denom)[..., 0] / unit)
    return out, torch.where(denom[..., 0] == 0, float("-inf"), log2_mass * math.log(2.0))
