"""Quick check of the quantised kernel on one GPU: INT8 call, its quantisation, vgen's bf16 kernel, cuDNN.

    python benchmarks/quantized_quick.py [--sweep]

Random bf16 q/k/v at the Wan2.1-1.3B 480p (12 x 128, 32,760 tokens) and 14B 720p (40 x 128, 75,600)
shapes; random block masks (128-token blocks, the same count kept per row) at densities 1.0 and 0.25;
do_bench medians in ms; err_vs_bf16 = ||int8 - bf16 kernel|| / ||bf16 kernel||. The full study is
``benchmarks/paro.py``; this is the 1-minute version for kernel work. ``--sweep`` also times the INT8
call under each launch in ``LAUNCHES`` (rows per program, warps, stages: ``QUANT_LAUNCH``; K and V^T tiles
by TMA: ``QUANT_TMA``).
"""

import argparse

import torch
import torch.nn.functional as F
import triton

from vgen.attention import BlockMask
from vgen.kernels import block_sparse_attention, quantized
from vgen.kernels.quantized import _quantize_for_kernel, quantized_attention


def ms(fn) -> float:
    """Median ms over at least 300 ms and 8 calls (do_bench alone gives a 270 ms call one sample)."""
    fn()
    torch.cuda.synchronize()
    once = triton.testing.do_bench(fn, warmup=1, rep=1)
    return triton.testing.do_bench(fn, warmup=max(50, 2 * once), rep=max(300, 8 * once))


# (rows, warps, stages, TMA). ptxas for sm_90a (Triton 3.6): the register loads spill 456-864 B; by TMA 0-40 B.
LAUNCHES = [(128, 8, 3, False), (64, 4, 2, False), (128, 8, 3, True), (128, 8, 2, True), (64, 4, 2, True),
            (64, 4, 3, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    default, default_tma = dict(quantized.QUANT_LAUNCH), quantized.QUANT_TMA
    print(f"QUANT_LAUNCH {default} QUANT_TMA {default_tma}", flush=True)
    for heads, seq in ((12, 32760), (40, 75600)):
        q, k, v = (torch.randn(1, seq, heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        cudnn = ms(lambda qt=qt, kt=kt, vt=vt: F.scaled_dot_product_attention(qt, kt, vt))
        for density in (1.0, 0.25):
            blocks = -(-seq // 128)
            ranks = torch.rand(1, heads, blocks, blocks, device="cuda").argsort(-1)
            mask = BlockMask.from_dense(ranks < max(1, round(density * blocks)), (128, 128), (seq, seq))
            int8, bf16 = quantized_attention(q, k, v, mask), block_sparse_attention(q, k, v, mask)
            err = ((int8.float() - bf16.float()).norm() / bf16.float().norm()).item()
            t_int8 = ms(lambda m=mask, q=q, k=k, v=v: quantized_attention(q, k, v, m))
            t_quant = ms(lambda m=mask, q=q, k=k, v=v: _quantize_for_kernel(q, k, v, m, 8))
            t_bf16 = ms(lambda m=mask, q=q, k=k, v=v: block_sparse_attention(q, k, v, m))
            print(f"h{heads} s{seq} d{density}: int8 {t_int8:.2f} ms (quantise {t_quant:.2f}) bf16 {t_bf16:.2f} "
                  f"cudnn {cudnn:.2f} err_vs_bf16 {err:.2e}", flush=True)
            for rows, warps, stages, tma in LAUNCHES if args.sweep else ():
                quantized.QUANT_LAUNCH.update(rows=rows, warps=warps, stages=stages)
                quantized.QUANT_TMA = tma
                launch = f"rows {rows} warps {warps} stages {stages} tma {tma}"
                try:
                    same = torch.equal(quantized_attention(q, k, v, mask), int8)
                    took = ms(lambda m=mask, q=q, k=k, v=v: quantized_attention(q, k, v, m))
                    print(f"    {launch}: {took:.2f} ms, same output {same}", flush=True)
                except Exception as err:  # e.g. out of shared memory: report and go on
                    print(f"    {launch}: failed, {str(err)[:120]}", flush=True)
                finally:
                    quantized.QUANT_LAUNCH.update(default)
                    quantized.QUANT_TMA = default_tma


if __name__ == "__main__":
    main()
