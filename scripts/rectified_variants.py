"""Rectified SpaAttn's variants against exact attention on the reference model's own q/k/v, on the CPU.

    python3 scripts/rectified_variants.py [--layers 0 2 3 5 7] [--masses 0.5 0.7]

Captures q/k/v of every self-attention layer of ``assets/reference/model`` on one held-out clip at
33 x 256 x 256 pixels (9 x 32 x 32 = 9,216 tokens; ``benchmarks/vmoba.py``'s capture: encoded, noised
to sigma 0.5, one transformer forward), then per layer and mass prints the relative error against
exact fp32 attention of: plain block-sparse, the paper's pooled reallocation alone, the paper's full
rectification (``rectify_kept=True``), vgen's default (exact kept mass, jointly normalised with the
compensated blocks), and the default compensating every dropped block. About 5 minutes on 2 cores.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import vmoba  # noqa: E402  (benchmarks/vmoba.py: the capture)

from vgen.attention.common import block_means, diagonal_and_text_blocks  # noqa: E402
from vgen.attention.rectified import _select, rectified_attention  # noqa: E402

VARIANTS = {
    "plain": {"rectify_kept": False, "compensate_dropped": False},
    "pooled realloc": {"rectify_kept": True, "compensate_dropped": False},
    "paper": {"rectify_kept": True},
    "default": {},
    "default, all dropped": {"error_tolerance": 1e9},
    "default + spread shift": {"spread_shift": True},
    "all dropped + spread shift": {"error_tolerance": 1e9, "spread_shift": True},
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 2, 3, 5, 7])
    parser.add_argument("--masses", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    calls, info = vmoba.capture_reference(dataclasses.replace(vmoba.smoke_sizes(), clip=(33, 256, 256)))
    print(f"caption {info['caption']!r}, grid {info['grid']}")
    print("| layer | mass | density | " + " | ".join(VARIANTS) + " |")
    print("|---" * (3 + len(VARIANTS)) + "|")
    for layer in args.layers:
        call = calls[layer]
        q, k, v = (x.float() for x in (call.q, call.k, call.v))
        scale = q.shape[-1] ** -0.5
        exact = torch.empty_like(q)
        for h in range(q.shape[2]):  # one head at a time bounds the memory
            exact[:, :, h] = (q[:, :, h] @ k[:, :, h].mT * scale).softmax(-1) @ v[:, :, h]
        q_mean = block_means(q, args.block)[0]
        k_mean, counts = block_means(k, args.block)
        always = diagonal_and_text_blocks(call.layout, args.block, q.device)
        for mass in args.masses:
            keep = _select(q_mean, k_mean, counts, scale, mass, always)
            errors = [
                rel(rectified_attention(q, k, v, keep, block_size=args.block, scale=scale, **flags), exact)
                for flags in VARIANTS.values()
            ]
            cells = " | ".join(f"{e:.3f}" for e in errors)
            print(f"| {layer} | {mass} | {keep.float().mean().item():.2f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
