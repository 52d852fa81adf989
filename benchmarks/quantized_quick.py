"""Quick check of the quantised kernel on one GPU: the INT8 and FP8-PV calls, the quantisation, vgen's bf16
kernel, cuDNN.

    python benchmarks/quantized_quick.py [--sweep]

First, at a small shape, the GPU kernel against its PyTorch reference and exact attention for each PV
format (the tests run the kernel in the interpreter only). Then random bf16 q/k/v at the Wan2.1-1.3B 480p
(12 x 128, 32,760 tokens) and 14B 720p (40 x 128, 75,600) shapes; random block masks (128-token blocks,
the same count kept per row) at densities 1.0 and 0.25; do_bench medians in ms (the quantisation also in GPU
and host time, as `attention.py` times the mask build); err_vs_bf16 =
||quantised - bf16 kernel|| / ||bf16 kernel||. Each format's kernel is also timed under the settings in
``VARIANTS`` (now INT8's codes through fp16 and row sums by an MMA, each off), with its output
compared to the default's. The small check also runs FP8 accumulated in the MMA (``FP8_ACC_IN_DOT``). The full study is
``benchmarks/paro.py``; this is the few-minute version for kernel work. ``--sweep`` also times the INT8
and FP8 calls under each launch in ``LAUNCHES`` (rows per program, warps, stages: ``QUANT_LAUNCH``, per format; K and
V^T tiles by TMA: ``QUANT_TMA``).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import build_times  # noqa: E402  (benchmarks/attention.py, beside this script)

from vgen.attention import BlockMask  # noqa: E402
from vgen.kernels import block_sparse_attention, quantized  # noqa: E402
from vgen.kernels.quantized import (  # noqa: E402
    _quantize_for_kernel,
    quantized_attention,
    quantized_attention_reference,
)
from vgen.kernels.reference import attention_reference  # noqa: E402


def ms(fn) -> float:
    """Median ms over at least 300 ms and 8 calls (do_bench alone gives a 270 ms call one sample)."""
    fn()
    torch.cuda.synchronize()
    once = triton.testing.do_bench(fn, warmup=1, rep=1)
    return triton.testing.do_bench(fn, warmup=max(50, 2 * once), rep=max(300, 8 * once))


# (rows, warps, stages, TMA). ptxas for sm_90a (Triton 3.6): the register loads spill 456-864 B; by TMA 0-40 B.
LAUNCHES = [(128, 8, 3, True), (128, 8, 2, True), (64, 4, 2, True), (64, 4, 3, True), (64, 4, 4, True)]


# the quantiser's (warps, tokens held at once); (8, 128) is closest to the one-pass launch it had up to 99705e6
QUANTISER_LAUNCHES = [(4, 32), (8, 32), (4, 64), (8, 64), (8, 128)]


# Kernel variants timed beside each format's default (module settings of vgen.kernels.quantized; maxnreg is the
# format's QUANT_LAUNCH register cap). None: the default itself.
FLAGS = ("PEEL_RAGGED", "FOLD_MAGIC", "INT_FOLD", "QUANTIZE_RCP", "QUANTIZE_PADDED", "INT_CODES16", "INT_SUMS_MMA")
DEFAULTS = {**{name: getattr(quantized, name) for name in FLAGS},
            "maxnreg": {key: launch["maxnreg"] for key, launch in quantized.QUANT_LAUNCH.items()}}
# (the quantiser's QUANTIZE_RCP and QUANTIZE_PADDED variants were timed at 6b02325 and 1908a99)
VARIANTS = {
    ("int8", None): {},
    ("int8", "sums of p unrounded, no ones MMA (INT_SUMS_MMA off)"): {"INT_SUMS_MMA": False},
    ("int8", "fp32 codes and sums (1908a99's loop)"): {"INT_CODES16": False, "INT_SUMS_MMA": False},
    ("fp8", None): {},
}


def apply(settings: dict, pv: str) -> None:
    for name in FLAGS:
        setattr(quantized, name, settings[name])
    for key, cap in settings["maxnreg"].items():
        quantized.QUANT_LAUNCH[key]["maxnreg"] = cap


def settings_text(settings: dict, pv: str) -> str:
    key = "fp8" if pv == "fp8" else "int"
    fold = settings["FOLD_MAGIC"] if pv == "fp8" else settings["INT_FOLD"]
    codes = f", INT_CODES16 {settings['INT_CODES16']}, INT_SUMS_MMA {settings['INT_SUMS_MMA']}" if pv != "fp8" else ""
    return (f"PEEL_RAGGED {settings['PEEL_RAGGED']}, fold {fold}, QUANTIZE_RCP {settings['QUANTIZE_RCP']}, "
            f"QUANTIZE_PADDED {settings['QUANTIZE_PADDED']}, maxnreg {settings['maxnreg'][key]}{codes}")


def quantiser_pieces(q, k, v, pv: str) -> str:
    """GPU ms of each step of the quantisation (_quantize_for_kernel's launches, one at a time)."""
    v_channels = quantized._v_channels(pv) and pv != "fp8"
    steps = {
        "Q": lambda: quantized._quantize_triton(q, 128, 8),
        "K mean": lambda: k.mean(1, dtype=torch.float32),
        "K": lambda: quantized._quantize_triton(k, 128, 8, smooth=True, mean=k.mean(1, dtype=torch.float32)),
        "V scales": lambda: quantized.channel_scales(v, 448.0 if pv == "fp8" else 127.0),
        "V": lambda: quantized._quantize_triton(v, 128, quantized._PV_BITS[pv], per_channel=True, transpose=True,
                                                fp8=pv == "fp8", channels=v_channels),
    }
    times = {name: build_times(fn, n=40)[0] for name, fn in steps.items()}
    times["K"] -= times["K mean"]  # (the K step recomputes its mean)
    if pv == "fp8" or v_channels:
        times["V"] -= times["V scales"]
    return ", ".join(f"{name} {t:.3f}" for name, t in times.items())


def bits(x: torch.Tensor) -> torch.Tensor:
    """8-bit values (int8 or float8) as int8, to compare exactly; other tensors as they are."""
    return x.view(torch.int8) if x.element_size() == 1 else x


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_small() -> None:
    """The compiled kernel against its reference (same arithmetic) and exact attention, ragged sizes."""
    torch.manual_seed(0)
    q = torch.randn(2, 1000, 3, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 1100, 3, 128, device="cuda", dtype=torch.bfloat16) + 1.0
    v = torch.randn(2, 1100, 3, 128, device="cuda", dtype=torch.bfloat16)
    dense = torch.rand(2, 3, 8, 9, device="cuda") < 0.6
    dense[..., 0] = True
    mask = BlockMask.from_dense(dense, (128, 128), (1000, 1100))
    exact = attention_reference(q.float(), k.float(), v.float(), mask=mask.expand_tokens())
    for pv in ("int8", "int4", "fp8"):
        for acc_in_dot in (False, True) if pv == "fp8" else (False,):
            quantized.FP8_ACC_IN_DOT = acc_in_dot
            out = quantized_attention(q, k, v, mask, pv=pv)
            ref = quantized_attention_reference(q.float(), k.float(), v.float(), mask, pv=pv)
            print(
                f"check {pv}{' acc_in_dot' if acc_in_dot else ''}: vs reference max abs "
                f"{(out.float() - ref).abs().max().item():.2e} rel {rel(out, ref):.2e}; vs exact rel "
                f"{rel(out, exact):.3e} (reference vs exact {rel(ref, exact):.3e})",
                flush=True,
            )
    quantized.FP8_ACC_IN_DOT = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--quantiser", action="store_true", help="also time the quantisation at QUANTISER_LAUNCHES")
    args = parser.parse_args()
    default = {key: dict(launch) for key, launch in quantized.QUANT_LAUNCH.items()}
    default_tma = quantized.QUANT_TMA
    print(f"QUANT_LAUNCH {default} QUANT_TMA {default_tma}", flush=True)
    check_small()
    for heads, seq in ((12, 32760), (40, 75600)):
        q, k, v = (torch.randn(1, seq, heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        cudnn = ms(lambda qt=qt, kt=kt, vt=vt: F.scaled_dot_product_attention(qt, kt, vt))
        for density in (1.0, 0.25):
            blocks = -(-seq // 128)
            ranks = torch.rand(1, heads, blocks, blocks, device="cuda").argsort(-1)
            mask = BlockMask.from_dense(ranks < max(1, round(density * blocks)), (128, 128), (seq, seq))
            bf16 = block_sparse_attention(q, k, v, mask)
            t_bf16 = ms(lambda m=mask, q=q, k=k, v=v: block_sparse_attention(q, k, v, m))
            print(f"h{heads} s{seq} d{density}: bf16 {t_bf16:.2f} ms, cudnn dense {cudnn:.2f} ms", flush=True)
            for pv, variant in VARIANTS:
                settings = {**DEFAULTS, **VARIANTS[pv, variant]} if variant else dict(DEFAULTS)
                apply(settings, pv)
                out = quantized_attention(q, k, v, mask, pv=pv)
                took = ms(lambda m=mask, q=q, k=k, v=v, pv=pv: quantized_attention(q, k, v, m, pv=pv))
                name = f"{pv} {variant or 'default'}"
                if variant:  # the whole call under the variant's settings, against the default's output
                    gpu_quant, _ = build_times(
                        lambda m=mask, q=q, k=k, v=v, pv=pv: _quantize_for_kernel(q, k, v, m, pv), n=40
                    )
                    codes = _quantize_for_kernel(q, k, v, mask, pv)
                    apply(DEFAULTS, pv)
                    same = torch.equal(quantized_attention(q, k, v, mask, pv=pv), out)
                    usual = _quantize_for_kernel(q, k, v, mask, pv)
                    # (None: another quantisation layout, e.g. V per key block instead of per channel)
                    differ = None if any(a.shape != b.shape for a, b in zip(codes, usual, strict=True)) else sum(
                        int((bits(a) != bits(b)).sum()) for a, b in zip(codes, usual, strict=True))
                    print(f"    {name} ({settings_text(settings, pv)}): {took:.2f} ms (quantise GPU {gpu_quant:.3f}), "
                          f"vs cudnn dense {cudnn / took:.3f}x, output equal to the default's {same}, quantised "
                          f"values and scales differing {differ}", flush=True)
                    del codes, usual
                    continue
                t_quant = ms(lambda m=mask, q=q, k=k, v=v, pv=pv: _quantize_for_kernel(q, k, v, m, pv))
                # alone, a call's quantisation may wait on the host's launches; in the whole call the host runs
                # ahead of the previous call's kernel, so its GPU time is what the call pays
                gpu_quant, host_quant = build_times(
                    lambda m=mask, q=q, k=k, v=v, pv=pv: _quantize_for_kernel(q, k, v, m, pv), n=40
                )
                usual = _quantize_for_kernel(q, k, v, mask, pv)
                if density == 1.0:
                    print(f"    quantise {pv} by step, GPU ms: {quantiser_pieces(q, k, v, pv)}", flush=True)
                for warps, sub in QUANTISER_LAUNCHES if args.quantiser else ():
                    before = quantized.QUANTIZE_WARPS, quantized.QUANTIZE_SUB
                    quantized.QUANTIZE_WARPS, quantized.QUANTIZE_SUB = warps, sub
                    try:
                        again = _quantize_for_kernel(q, k, v, mask, pv)
                        same = all(torch.equal(bits(a), bits(b)) for a, b in zip(again, usual, strict=True))
                        spent = ms(lambda m=mask, q=q, k=k, v=v, pv=pv: _quantize_for_kernel(q, k, v, m, pv))
                        gpu, _ = build_times(lambda m=mask, q=q, k=k, v=v, pv=pv: _quantize_for_kernel(q, k, v, m, pv))
                        print(
                            f"        quantise {pv}, {warps} warps, {sub} tokens at once: {spent:.3f} ms "
                            f"(GPU {gpu:.3f}), same values {same}",
                            flush=True,
                        )
                    finally:
                        quantized.QUANTIZE_WARPS, quantized.QUANTIZE_SUB = before
                del usual
                print(
                    f"    {name} ({settings_text(settings, pv)}): {took:.2f} ms (quantise {t_quant:.2f}: GPU "
                    f"{gpu_quant:.3f}, host {host_quant:.3f}), vs bf16 kernel {t_bf16 / took:.3f}x, "
                    f"vs cudnn dense {cudnn / took:.3f}x, err_vs_bf16 {rel(out, bf16):.2e}",
                    flush=True,
                )
                for rows, warps, stages, tma in LAUNCHES if args.sweep else ():
                    key = "fp8" if pv == "fp8" else "int"
                    # 4 warps keep the register cap (three programs per SM); 8 warps get ptxas' choice
                    quantized.QUANT_LAUNCH[key].update(rows=rows, warps=warps, stages=stages,
                                                       maxnreg=default[key]["maxnreg"] if warps == 4 else None)
                    quantized.QUANT_TMA = tma
                    launch = f"rows {rows} warps {warps} stages {stages} tma {tma}"
                    try:
                        same = torch.equal(quantized_attention(q, k, v, mask, pv=pv), out)
                        took = ms(lambda m=mask, q=q, k=k, v=v, pv=pv: quantized_attention(q, k, v, m, pv=pv))
                        print(f"        {launch}: {took:.2f} ms, same output {same}", flush=True)
                    except Exception as err:  # e.g. out of shared memory: report and go on
                        print(f"        {launch}: failed, {str(err)[:120]}", flush=True)
                    finally:
                        quantized.QUANT_LAUNCH.update({key: dict(launch) for key, launch in default.items()})
                        quantized.QUANT_TMA = default_tma
                apply(DEFAULTS, pv)


if __name__ == "__main__":
    main()
