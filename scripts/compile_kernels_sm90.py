"""Compile vgen's newer Triton kernels for sm_90 (Hopper) on a machine without a GPU.

    python3 scripts/compile_kernels_sm90.py

The interpreter that runs the tests accepts things the compiler rejects (a plain global in a kernel,
say), so this catches compile errors before device time is spent. It prints OK or FAIL per kernel, the
shared memory each uses, and the registers and spills that Triton's bundled ptxas reports for sm_90a
(spills in a kernel's inner loop cost more than anything else in it). It needs no GPU.

Give every constexpr of a kernel, those with defaults too: compiled from a bare signature, a constexpr left
out does not take its default (a left-out FUSED_DQ compiled the fused branch; a left-out SPREAD_SHIFT
changed the registers).
"""

import glob
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vgen.kernels import block_sparse, fps, pooled, pyramid, quantized, selection, winding

POOLED = {"Q": "*bf16", "SPARSE": "*bf16", "LSE": "*fp32", "KM": "*fp32", "VM": "*fp32", "LOGN": "*fp32",
          "SPREAD": "*fp32", "KEEP": "*i8", "OUT": "*bf16", "scale": "fp32", "bound": "fp32",
          "shift": "fp32"}  # fmt: skip
QUANTIZE_INT = {"FP8": False, "ROUND_FP8": False, "SUB": quantized.QUANTIZE_SUB, "GIVEN": False,
                "RCP": quantized.QUANTIZE_RCP, "PADDED": False}
V_T = {"PADDED": quantized.QUANTIZE_PADDED, "s_os": 1}  # V written transposed: tokens at unit stride
QUANT_INT = {"PV_FP8": False, "ROUND_FP8": False, "FP8_ACC_IN_DOT": False, "PEEL": quantized.PEEL_RAGGED,
             "FOLD": quantized.INT_FOLD, "V_BLOCKWISE": not quantized.INT_FOLD, "ASM": True,
             "CODES16": quantized.INT_FOLD and quantized.INT_CODES16,
             "SUMS_MMA": quantized.INT_FOLD and quantized.INT_SUMS_MMA}  # INT8 PV
NO_CODES = {"CODES16": False, "SUMS_MMA": False, "ASM": True}  # FP8 PV: no integer codes
QUANTIZE = {"X": "*bf16", "MEAN": "*fp32", "OUT": "*i8", "SCALE": "*fp32", "levels": "fp32"}
POOLED_FP32 = {**POOLED, "Q": "*fp32", "SPARSE": "*fp32", "OUT": "*fp32"}
QUANT_FWD = {"Q": "*i8", "K": "*i8", "VT": "*i8", "QS": "*fp32", "KS": "*fp32", "VS": "*fp32", "OUT": "*bf16",
             "LSE": "*fp32", "KV_NUM": "*i32", "KV_IDX": "*i32", "qk_scale": "fp32", "p_levels": "fp32"}  # fmt: skip
PYRAMID = {**{f"{x}{p}": "*bf16" for x in "KV" for p in (1, 2, 4, 8)}, "Q": "*bf16", "OUT": "*bf16", "LSE": "*fp32",
           "NUM": "*i32", "IDX": "*i32", "qk_scale": "fp32"}  # fmt: skip
PYRAMID_BUILD = {"X": "*bf16", "X2": "*bf16", "X4": "*bf16", "X8": "*bf16"}
PYRAMID_STAGES = {"FULL_STAGES": pyramid.STAGES[0], "POOLED_STAGES": pyramid.STAGES[1]}
BLOCK_SPARSE = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "OUT": "*bf16", "LSE": "*fp32", "KV_NUM": "*i32",
                "KV_IDX": "*i32", "ORDER": "*i32", "qk_scale": "fp32"}
FWD_DEFAULTS = {"D": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 128, "MASK_M": 128, "MASK_N": 128,
                "DOT_PRECISION": "tf32", "USE_TMA": True, "WARP_SPECIALIZE": False, "CARRY_INDEX": True,
                "PEEL": block_sparse.PEEL_RAGGED, "INDEX_EARLY": block_sparse.INDEX_EARLY,
                "ONE_DESC": block_sparse.ONE_KV_DESC, "HEAVY_FIRST": False}
BACKWARD = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "LSE": "*fp32", "DELTA": "*fp32", "DK": "*bf16",
            "DV": "*bf16", "DQ": "*bf16", "Q_NUM": "*i32", "Q_IDX": "*i32", "KV_NUM": "*i32", "KV_IDX": "*i32",
            "DQ_ACC": "*fp32", "ORDER": "*i32", "qk_scale": "fp32", "sm_scale": "fp32"}  # fmt: skip
BACKWARD_CONSTS = {"D": 128, "BLOCK_D": 128, "MASK_M": 128, "MASK_N": 128, "DOT_PRECISION": "tf32",
                   "PEEL": block_sparse.BWD_PEEL_RAGGED, "HEAVY_FIRST": False}
KERNELS = [
    # the forward at block_sparse.CUDA_TILES (CARRY_INDEX: the default) in index order (HEAVY_FIRST auto at 14B)
    (block_sparse._fwd_kernel, BLOCK_SPARSE, FWD_DEFAULTS, 8, 3),
    # rows heaviest first (HEAVY_FIRST auto at 1.3B; the order packs each row with its count: int64)
    (block_sparse._fwd_kernel, {**BLOCK_SPARSE, "ORDER": "*i64"}, {**FWD_DEFAULTS, "HEAVY_FIRST": True}, 8, 3),
    (block_sparse._heavy_first_kernel, {"NUM": "*i32", "ORDER": "*i64"}, {"BLOCK_I": 128, "BLOCK_J": 64}, 4, 1),
    # the two-kernel backward at block_sparse.CUDA_TILES (BWD_CARRY_INDEX auto: off here), and with it on (3 stages)
    (block_sparse._bwd_dkdv_kernel, BACKWARD, {**BACKWARD_CONSTS, "BLOCK_M": 64, "BLOCK_N": 64, "FUSED_DQ": False,
                                               "REDUCE_TMA": False, "CARRY_INDEX": False}, 4, 2),
    (block_sparse._bwd_dq_kernel, BACKWARD, {**BACKWARD_CONSTS, "BLOCK_M": 128, "BLOCK_N": 128,
                                             "CARRY_INDEX": False}, 8, 2),
    (block_sparse._bwd_dkdv_kernel, BACKWARD, {**BACKWARD_CONSTS, "BLOCK_M": 64, "BLOCK_N": 64, "FUSED_DQ": False,
                                               "REDUCE_TMA": False, "CARRY_INDEX": True}, 4, 3),
    # the backward in one kernel (block_sparse.FUSED_DQ): dQ by TMA reduce-add, at CUDA_TILES["fused"] with the
    # next tile's index carried and a third stage (BWD_CARRY_INDEX auto: on), and smaller tiles
    (block_sparse._bwd_dkdv_kernel, BACKWARD, {**BACKWARD_CONSTS, "BLOCK_M": 64, "BLOCK_N": 128, "FUSED_DQ": True,
                                               "REDUCE_TMA": True, "CARRY_INDEX": True}, 8, 3),
    (block_sparse._bwd_dkdv_kernel, BACKWARD, {**BACKWARD_CONSTS, "BLOCK_M": 64, "BLOCK_N": 64, "FUSED_DQ": True,
                                               "REDUCE_TMA": True, "CARRY_INDEX": True}, 4, 3),
    # rows heaviest first (block_sparse.HEAVY_FIRST; auto: the fused one at 1.3B): the fused dK/dV kernel, the
    # two-kernel ones
    (block_sparse._bwd_dkdv_kernel, {**BACKWARD, "ORDER": "*i64"},
     {**BACKWARD_CONSTS, "BLOCK_M": 64, "BLOCK_N": 128, "FUSED_DQ": True, "REDUCE_TMA": True, "CARRY_INDEX": True,
      "HEAVY_FIRST": True}, 8, 3),
    (block_sparse._bwd_dkdv_kernel, {**BACKWARD, "ORDER": "*i64"},
     {**BACKWARD_CONSTS, "BLOCK_M": 64, "BLOCK_N": 64, "FUSED_DQ": False, "REDUCE_TMA": False, "CARRY_INDEX": False,
      "HEAVY_FIRST": True}, 4, 2),
    (block_sparse._bwd_dq_kernel, {**BACKWARD, "ORDER": "*i64"},
     {**BACKWARD_CONSTS, "BLOCK_M": 128, "BLOCK_N": 128, "CARRY_INDEX": False, "HEAVY_FIRST": True}, 8, 2),
    (selection._segment_means_kernel, {"X": "*bf16", "STARTS": "*i64", "SIZES": "*i64", "OUT": "*fp32",
                                       "SPREAD": "*fp32"}, {"D": 128, "BLOCK_D": 128, "BLOCK_T": 32,
                                                            "WITH_SPREAD": True}, 4, 1),
    (selection._global_cut_kernel, {"S": "*fp32", "KEEP": "*i8", "threshold": "fp32", "count": "fp32"},
     {"BY_MASS": True, "BLOCK": 1024}, 8, 1),
    (selection._global_cut_kernel, {"S": "*fp32", "KEEP": "*i8", "threshold": "fp32", "count": "fp32"},
     {"BY_MASS": False, "BLOCK": 1024}, 8, 1),
    (selection._cut_partial_kernel, {"S": "*fp32", "PEAK": "*fp32", "LO": "*i64", "HI": "*i64", "PART": "*fp32"},
     {"CHUNK": 2048, "SUB": 64, "PIVOTS": 64, "BY_MASS": True}, 4, 1),
    (selection._cut_narrow_kernel, {"PART": "*fp32", "LO": "*i64", "HI": "*i64", "GOAL": "*fp32"},
     {"PIVOTS": 64}, 2, 1),
    # the many-program cut's set-up and keep test (selection._cut_search, _apply_cuts)
    (selection._cut_stats_kernel, {"S": "*fp32", "PMAX": "*fp32", "PMIN": "*fp32", "PSUM": "*fp32"},
     {"CHUNK": 2048, "BLOCK": 1024, "BY_MASS": True}, 4, 1),
    (selection._cut_setup_kernel, {"PMAX": "*fp32", "PMIN": "*fp32", "PSUM": "*fp32", "PEAK": "*fp32", "LO": "*i64",
                                   "HI": "*i64", "GOAL": "*fp32", "COUNTS": "*fp32", "threshold": "fp32"},
     {"BLOCK_P": 256, "BY_MASS": True}, 4, 1),
    (selection._cut_apply_kernel, {"S": "*fp32", "CUT": "*i64", "OUT": "*i64", "offset": "i32"},
     {"CHUNK": 2048, "BLOCK": 1024, "LEVELS": True}, 4, 1),
    (selection._cut_apply_kernel, {"S": "*fp32", "CUT": "*i64", "OUT": "*i8", "offset": "i32"},
     {"CHUNK": 2048, "BLOCK": 1024, "LEVELS": False}, 4, 1),
    # the radix select for cuts by count (selection.RADIX_COUNT, a candidate)
    (selection._radix_hist_kernel, {"S": "*fp32", "PREFIX": "*i64", "HIST": "*i32"},
     {"SHIFT": 16, "CHUNK": 2048, "SUB": 1024}, 4, 1),
    (selection._radix_pick_kernel, {"PREFIX": "*i64", "NEED": "*i64", "HIST": "*i32"}, {}, 1, 1),
    (selection._compact_rows_kernel, {"DENSE": "*i8", "COUNT": "*i32", "INDICES": "*i32"}, {"BLOCK": 256}, 4, 1),
    # half inputs: tensor-core tiles (pooled_correction's launch for bf16/fp16)
    (pooled._pooled_kernel, POOLED, {"D": 64, "BLOCK_D": 64, "BLOCK_M": 32, "BLOCK_N": 32, "ROW_BLOCK": 128,
                                     "POOLED_KEPT": False, "COMPENSATE": True, "HALF": True,
                                     "SPREAD_SHIFT": False}, 4, 1),
    (pooled._pooled_kernel, POOLED, {"D": 128, "BLOCK_D": 128, "BLOCK_M": 32, "BLOCK_N": 32, "ROW_BLOCK": 128,
                                     "POOLED_KEPT": True, "COMPENSATE": True, "HALF": True,
                                     "SPREAD_SHIFT": False}, 4, 1),
    (pooled._pooled_kernel, POOLED, {"D": 128, "BLOCK_D": 128, "BLOCK_M": 32, "BLOCK_N": 32, "ROW_BLOCK": 128,
                                     "POOLED_KEPT": False, "COMPENSATE": True, "HALF": True,
                                     "SPREAD_SHIFT": False}, 4, 1),
    # with the spread shift (RectifiedConfig.spread_shift)
    (pooled._pooled_kernel, POOLED, {"D": 64, "BLOCK_D": 64, "BLOCK_M": 32, "BLOCK_N": 32, "ROW_BLOCK": 128,
                                     "POOLED_KEPT": False, "COMPENSATE": True, "HALF": True,
                                     "SPREAD_SHIFT": True}, 4, 1),
    # fp32 inputs: exact ieee dots in small tiles
    (pooled._pooled_kernel, POOLED_FP32, {"D": 128, "BLOCK_D": 128, "BLOCK_M": 16, "BLOCK_N": 16, "ROW_BLOCK": 128,
                                          "POOLED_KEPT": False, "COMPENSATE": True, "HALF": False,
                                          "SPREAD_SHIFT": False}, 8, 1),
    # the quantiser at quantized.QUANTIZE_WARPS and QUANTIZE_SUB (whole blocks at 4 warps spilled 1,084-1,612 B), with
    # the unit stride a launch passes as a constant (Triton specialises an integer argument equal to 1): the
    # channels' for K (s_od), the tokens' for V^T (s_os; PADDED as the library launches it); V to float8 e4m3
    # (pv="fp8")
    (quantized._quantize_kernel, QUANTIZE, {"D": 128, "BLOCK_D": 128, "BLOCK": 128, "PER_CHANNEL": False,
                                            "SMOOTH": True, **QUANTIZE_INT, "s_od": 1}, quantized.QUANTIZE_WARPS, 1),
    (quantized._quantize_kernel, QUANTIZE, {"D": 128, "BLOCK_D": 128, "BLOCK": 128, "PER_CHANNEL": True,
                                            "SMOOTH": False, **QUANTIZE_INT, **V_T}, quantized.QUANTIZE_WARPS, 1),
    (quantized._quantize_kernel, {**QUANTIZE, "OUT": "*fp8e4nv"},
     {"D": 128, "BLOCK_D": 128, "BLOCK": 128, "PER_CHANNEL": True, "SMOOTH": False, **QUANTIZE_INT, "FP8": True,
      "GIVEN": True, **V_T}, quantized.QUANTIZE_WARPS, 1),
    # INT8 V against given scales per channel (pv="int8" with INT_FOLD)
    (quantized._quantize_kernel, QUANTIZE, {"D": 128, "BLOCK_D": 128, "BLOCK": 128, "PER_CHANNEL": True,
                                            "SMOOTH": False, **QUANTIZE_INT, "GIVEN": True, **V_T},
     quantized.QUANTIZE_WARPS, 1),
    (quantized._quant_fwd_kernel, QUANT_FWD, {"D": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 128,
                                              "ROWS": 128, "RETURN_LSE": False, "USE_TMA": False, **QUANT_INT}, 8, 3),
    (quantized._quant_fwd_kernel, QUANT_FWD, {"D": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 128,
                                              "ROWS": 128, "RETURN_LSE": True, "USE_TMA": False, **QUANT_INT}, 8, 3),
    # the library defaults: K and V^T tiles by TMA (quantized.QUANT_TMA), 64 rows, 4 warps; INT8 PV at 3 stages, FP8
    # PV at 2
    (quantized._quant_fwd_kernel, QUANT_FWD, {"D": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 128,
                                              "ROWS": 64, "RETURN_LSE": True, "USE_TMA": True, **QUANT_INT}, 4, 3,
     quantized.QUANT_LAUNCH["int"]["maxnreg"]),
    # INT4 PV: V scaled per key block and channel
    (quantized._quant_fwd_kernel, QUANT_FWD, {"D": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 128, "ROWS": 64,
                                              "RETURN_LSE": True, "USE_TMA": True, **QUANT_INT, "V_BLOCKWISE": True},
     4, 3, quantized.QUANT_LAUNCH["int"]["maxnreg"]),
    (quantized._quant_fwd_kernel, {**QUANT_FWD, "VT": "*fp8e4nv"},
     {"D": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 128, "ROWS": 64, "RETURN_LSE": True, "USE_TMA": True,
      "PV_FP8": True, "ROUND_FP8": False, "FP8_ACC_IN_DOT": False, "V_BLOCKWISE": False,
      "PEEL": quantized.PEEL_RAGGED, "FOLD": quantized.FOLD_MAGIC, **NO_CODES}, 4, 2,
     quantized.QUANT_LAUNCH["fp8"]["maxnreg"]),
    (quantized._quant_fwd_kernel, {**QUANT_FWD, "VT": "*fp8e4nv"},
     {"D": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 128, "ROWS": 128, "RETURN_LSE": False, "USE_TMA": True,
      "PV_FP8": True, "ROUND_FP8": False, "FP8_ACC_IN_DOT": False, "V_BLOCKWISE": False,
      "PEEL": quantized.PEEL_RAGGED, "FOLD": quantized.FOLD_MAGIC, **NO_CODES}, 8, 3),
    # the library default (pyramid.STAGES), and without TMA (K/V of unaligned strides)
    (pyramid._pyramid_fwd_kernel, PYRAMID, {"D": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 128,
                                            "RETURN_LSE": True, "USE_TMA": True, "POOLED": True,
                                            **PYRAMID_STAGES}, 8, 2),
    (pyramid._pyramid_fwd_kernel, PYRAMID, {"D": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 128,
                                            "RETURN_LSE": False, "USE_TMA": False, "POOLED": True,
                                            **PYRAMID_STAGES}, 8, 2),
    # a plain selection (no pyramid: the full level only)
    (pyramid._pyramid_fwd_kernel, PYRAMID, {"D": 128, "BLOCK_D": 128, "BLOCK_M": 128, "BLOCK_N": 128,
                                            "RETURN_LSE": False, "USE_TMA": True, "POOLED": False,
                                            **PYRAMID_STAGES}, 8, 2),
    (pyramid._pyramid_build_kernel, PYRAMID_BUILD, {"D": 128, "BLOCK_D": 128, "BLOCK": 128}, 4, 1),
    (fps._fps_kernel, {"P": "*fp32", "OUT": "*i64"}, {"BLOCK_N": 2048}, 4, 1),
    (winding._winding_kernel, {"P": "*fp32", "TRI": "*fp32", "OUT": "*fp32"}, {"BLOCK_Q": 64, "BLOCK_F": 32}, 8, 1),
]  # fmt: skip


def registers_and_spills(ptx: str) -> str:
    """ptxas -v's registers and spill bytes of one kernel's PTX for sm_90a ("" without ptxas)."""
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # the newer ptxas first: Triton may emit a PTX version the older one rejects
    found = glob.glob(os.path.join(folder, "ptxas-blackwell")) + glob.glob(os.path.join(folder, "ptxas"))
    if not found:
        return ""
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "k.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        info = subprocess.run([found[0], "-v", "--gpu-name", "sm_90a", source, "-o", os.path.join(folder, "k.cubin")],
                              capture_output=True, text=True).stderr  # fmt: skip
    registers = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return (f"{registers.group(1) if registers else '?'} registers, "
            f"spills {spills.group(1) if spills else '?'} / {spills.group(2) if spills else '?'} B")  # fmt: skip


SHARED_LIMIT = 232448  # bytes of shared memory a program may use on sm_90 (227 KB)


def compile_sm90(fn, types: dict, consts: dict, warps: int, stages: int, maxnreg: int | None = None):
    """Compiled for sm_90 as a launch at the Wan shapes specialises it: pointers and the tensors' strides
    (``s_*``) divisible by 16, not the block masks' and index lists' strides (``s_n*``, ``s_i*``: multiples of
    the block count, 591 at 14B). Without that, the compiler cannot prove 16-byte alignment and pointer loads
    stay synchronous (not pipelined), so registers, spills and schedules would not be those of the GPU."""
    signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if name not in consts and (signature[name].startswith("*") or (
                   name.startswith("s_") and not name.startswith(("s_n", "s_i"))))}  # fmt: skip
    return triton.compile(ASTSource(fn, signature, consts, attrs=aligned), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages,
                                   **({"maxnreg": maxnreg} if maxnreg else {})})  # fmt: skip


def main() -> int:
    failures = 0
    for fn, types, consts, warps, stages, *cap in KERNELS:
        try:
            kernel = compile_sm90(fn, types, consts, warps, stages, *cap)
            if kernel.metadata.shared > SHARED_LIMIT:  # the compiler does not check it; the launch would fail
                raise RuntimeError(f"shared memory {kernel.metadata.shared} B is over sm_90's {SHARED_LIMIT} B")
            print(f"OK   {fn.__name__} {consts} warps {warps} stages {stages}: shared {kernel.metadata.shared} B, "
                  f"{registers_and_spills(kernel.asm['ptx'])}")  # fmt: skip
        except Exception as err:  # report every kernel, then fail
            failures += 1
            print(f"FAIL {fn.__name__} {consts}: {str(err).splitlines()[-1][:300] if str(err) else repr(err)}")
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
