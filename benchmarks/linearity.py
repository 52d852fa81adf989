"""How the block-sparse forward's time scales with density: sparse and dense timed in turns.

    python benchmarks/linearity.py --out benchmarks/results/linearity.md [--shapes ...] [--rounds 9]

Issue 3's target: the forward at density d takes at most 1.1 x d x (the same kernel's dense time), down to
d = 0.1. `attention.py` divides each row's time by the dense row's, timed earlier in the run; the GPU's speed
drifts over a run by a few percent (the two dense rows of a shape, identical work, differ by up to 3.5%), which
moves that ratio as much. Here each density's mask and the dense mask are timed in turns, ``--rounds`` times,
and the ratio is taken per round (sparse / (d x dense) of the same round); the table gives the median round's
ratio and the range over rounds.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import (  # noqa: E402
    add_set_option,
    apply_settings,
    bench,
    commit_id,
    local_mask,
    random_mask,
    shape_of,
    write_report,
)

from vgen.attention.block_mask import BlockMask  # noqa: E402
from vgen.kernels.block_sparse import block_sparse_attention  # noqa: E402


def in_turns(qkv: tuple[torch.Tensor, ...], full: BlockMask, mask: BlockMask, rounds: int):
    """Forward ms of the dense and the sparse mask, timed in turns, ``rounds`` of each."""
    dense_ms, sparse_ms = [], []
    with torch.no_grad():
        for _ in range(rounds):
            dense_ms.append(bench(lambda: block_sparse_attention(*qkv, full)))
            sparse_ms.append(bench(lambda: block_sparse_attention(*qkv, mask)))
    return dense_ms, sparse_ms


def run(shapes: list[str], densities: list[float], rounds: int, device: torch.device) -> list[dict]:
    rows = []
    for name in shapes:
        heads, head_dim, grid = shape_of(name)
        seq = grid.num_video_tokens
        q, k, v = (torch.randn(1, seq, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        full = BlockMask.full(1, heads, (seq, seq), device=device)
        for kind in ("random", "local-3D"):
            for density in densities:
                mask = random_mask(heads, seq, density, device) if kind == "random" else local_mask(
                    grid, density, device)[0]
                kept = mask.density()
                dense_ms, sparse_ms = in_turns((q, k, v), full, mask, rounds)
                ratios = [s / (kept * d) for s, d in zip(sparse_ms, dense_ms, strict=True)]
                row = {"shape": name, "mask": kind, "density": kept, "dense_ms": statistics.median(dense_ms),
                       "sparse_ms": statistics.median(sparse_ms), "linearity": statistics.median(ratios),
                       "linearity_min": min(ratios), "linearity_max": max(ratios), "dense_rounds": dense_ms,
                       "sparse_rounds": sparse_ms}  # fmt: skip
                rows.append(row)
                print(row, flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"### Forward time against density, {meta['date']}, commit {meta['commit']}, {meta['gpu']}", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}; bf16, B=1; the mask and "
             f"the dense mask (`BlockMask.full`) timed in turns, {meta['rounds']} rounds; linearity = sparse / "
             "(density x dense) per round, the median round (range over rounds). Target: at most 1.10.", "",
             "| shape | mask | density | dense ms | sparse ms | **linearity** | range |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['mask']} | {r['density']:.3f} | {r['dense_ms']:.2f} | "
                     f"{r['sparse_ms']:.3f} | **{r['linearity']:.3f}** | {r['linearity_min']:.3f}-"
                     f"{r['linearity_max']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["wan1.3b-480p", "wan14b-720p"])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, help="write the Markdown here (and a .json beside it)")
    add_set_option(parser)
    args = parser.parse_args()
    settings = apply_settings(parser, args.set)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not all(0.0 < d < 1.0 for d in args.densities):
        parser.error(f"--densities must lie in (0, 1), got {args.densities}")
    if not torch.cuda.is_available():
        sys.exit("linearity.py times the kernels on a GPU; none is available")
    meta = {"date": datetime.date.today().isoformat(), "commit": commit_id(), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "command": "python " + " ".join(sys.argv),
            "rounds": args.rounds, "settings": settings}  # fmt: skip
    rows = run(args.shapes, args.densities, args.rounds, torch.device("cuda"))
    write_report(args.out, markdown(meta, rows), meta, rows)


if __name__ == "__main__":
    main()
