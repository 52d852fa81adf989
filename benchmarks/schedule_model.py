"""A model, not a measurement: the block-sparse forward's run time from its masks' row counts and launch order.

    python benchmarks/schedule_model.py [--shapes ...] [--densities 0.25 0.1] [--sms 132] [--fixed-us 3.8]
        [--tile-us 2.0]

The forward launches one program per (query row, head); each SM runs one at a time (1 CTA per SM: 192 KB of
K/V stages) and takes the next program in launch order when its own ends. A program costs a fixed part (the
prologue: query tile, descriptors, indices, first copy; the epilogue) plus a part per kept key block. The
defaults are fitted to the 1.3B rows of `attention.py`'s table: time = 0.088 ms + 12.28 ms x density, that is
3.8 us per program and wave and 2.0 us per kept block (128 x 128 x 128, bf16). The model list-schedules the
programs onto ``--sms`` SMs and reports time / (density x the dense mask's time), the quantity issue 3 bounds by
1.10, in index order and heaviest rows first within each head (`block_sparse.HEAVY_FIRST`; the kernel's launch
while one head's K and V fit in L2, as at the 1.3B shape).
It runs on a CPU; it says where a launch order can matter, the GPU says by how much.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import local_mask, random_mask, shape_of  # noqa: E402


def makespan(counts: list[int], sms: int, fixed_us: float, tile_us: float) -> float:
    """When the last SM finishes, the programs (kept-block counts, in launch order) taken greedily by free SMs."""
    free = [0.0] * sms
    for n in counts:
        heapq.heappush(free, heapq.heappop(free) + fixed_us + tile_us * n)
    return max(free)


def launch_orders(num: torch.Tensor, heads: int) -> dict[str, list[int]]:
    """Per program, its row's count: in index order (row fastest, then head) and heaviest first within each head."""
    per_head = num.expand(1, heads, -1)[0].tolist()
    return {"index order": [n for row in per_head for n in row],
            "heaviest first per head": [n for row in per_head for n in sorted(row, reverse=True)]}


def run(shapes: list[str], densities: list[float], sms: int, fixed_us: float, tile_us: float) -> list[dict]:
    rows = []
    for name in shapes:
        heads, _, grid = shape_of(name)
        seq = grid.num_video_tokens
        blocks = -(-seq // 128)
        dense = makespan([blocks] * (heads * blocks), sms, fixed_us, tile_us)
        for kind in ("random", "local-3D"):
            for density in densities:
                mask = random_mask(heads, seq, density, "cpu") if kind == "random" else local_mask(
                    grid, density, "cpu")[0]
                num = mask.kv_num_blocks[0]
                row = {"shape": name, "mask": kind, "density": mask.density(), "min": int(num.min()),
                       "max": int(num.max()), "std": float(num.float().std())}  # fmt: skip
                for order, counts in launch_orders(num[None], heads).items():
                    row[order] = makespan(counts, sms, fixed_us, tile_us) / (mask.density() * dense)
                rows.append(row)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Model (CPU): {args.sms} SMs, {args.fixed_us} us per program + {args.tile_us} us per kept block; "
             "predicted time / (density x dense).", "",
             "| shape | mask | density | kept blocks per row: min-max (std) | index order | heaviest first per head |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['mask']} | {r['density']:.3f} | {r['min']}-{r['max']} ({r['std']:.1f}) | "
                     f"{r['index order']:.3f} | {r['heaviest first per head']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["wan1.3b-480p", "wan14b-720p"])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.25, 0.1])
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--fixed-us", type=float, default=3.8)
    parser.add_argument("--tile-us", type=float, default=2.0)
    args = parser.parse_args()
    if args.sms < 1 or args.fixed_us < 0 or args.tile_us <= 0:
        parser.error(f"--sms must be >= 1, --fixed-us >= 0 and --tile-us > 0; got {args.sms}, {args.fixed_us}, "
                     f"{args.tile_us}")
    if not all(0.0 < d < 1.0 for d in args.densities):
        parser.error(f"--densities must lie in (0, 1), got {args.densities}")
    print(markdown(run(args.shapes, args.densities, args.sms, args.fixed_us, args.tile_us), args))


if __name__ == "__main__":
    main()
