"""A/B timing of the block-sparse forward with one `vgen.kernels.block_sparse` setting off and on.

    python benchmarks/ab_forward.py USE_TMA --out benchmarks/results/ab-use-tma.md [--rounds 5]

A sweep (`attention.py --sweep`) times each candidate once, one after another; a difference of 1-2% between
two candidates is then within the drift of the GPU's speed over a run. Here the two settings and
FlexAttention (the reference the issue's ratios are taken against) are timed in turns, ``--rounds`` times,
at every shape and density of `attention.py`'s table (random masks; `--masks random local-3D` adds the
local-3D windows), and the medians are reported with the
spread of the rounds. The outputs of the two settings are checked against each other first. The setting is
put back as it was at the end. (At cdb5451 it timed HOST_DESC, descriptors built on the host, since removed.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import (  # noqa: E402
    DENSITIES,
    ab_meta,
    add_set_option,
    apply_settings,
    bench,
    err_ratio,
    flex_mask,
    local_mask,
    random_mask,
    shape_of,
    write_report,
)

from vgen.kernels import block_sparse  # noqa: E402
from vgen.kernels.block_sparse import block_sparse_attention  # noqa: E402


def run(flag: str, shapes: list[str], rounds: int, densities: list[float], kinds: list[str]) -> list[dict]:
    device = torch.device("cuda")
    before = getattr(block_sparse, flag)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for name in shapes:
        heads, head_dim, grid = shape_of(name)
        seq = grid.num_video_tokens
        q, k, v = (torch.randn(1, seq, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        for kind, density in [(kind, d) for kind in kinds for d in densities if kind == "random" or d < 1.0]:
            mask = random_mask(heads, seq, density, device) if kind == "random" else local_mask(grid, density,
                                                                                                  device)[0]
            fm = flex_mask(mask)

            def ours(on: bool, q=q, k=k, v=v, mask=mask):
                setattr(block_sparse, flag, on)
                return block_sparse_attention(q, k, v, mask)

            def theirs(q=q, k=k, v=v, fm=fm):
                return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=fm).transpose(1, 2)

            with torch.no_grad():
                off_out, on_out = ours(False), ours(True)
                err = err_ratio(on_out, off_out)
                del off_out, on_out
                times = {"off": [], "on": [], "flex": []}
                for _ in range(rounds):
                    times["off"].append(bench(lambda: ours(False)))
                    times["on"].append(bench(lambda: ours(True)))
                    times["flex"].append(bench(theirs))
            setattr(block_sparse, flag, before)
            row = {"shape": name, "mask": kind, "density": mask.density(), "err_on_vs_off": err,
                   **{f"{key}_ms": statistics.median(t) for key, t in times.items()},
                   **{f"{key}_rounds": t for key, t in times.items()}}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def markdown(flag: str, meta: dict, rows: list[dict]) -> str:
    lines = [f"### Forward A/B: `block_sparse.{flag}` off / on, {meta['date']}, commit {meta['commit']}, {meta['gpu']}",
             "", f"Command: `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}; bf16, B=1; off, on "
             f"and FlexAttention timed in turns, {meta['rounds']} rounds; medians (range of the rounds).", "",
             "| shape | mask | density | off ms | on ms | **on / off** | Flex ms | off: Flex / vgen | on: Flex / vgen "
             "| on vs off output |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(r, key):
        t = r[f"{key}_rounds"]
        return f"{r[f'{key}_ms']:.2f} ({min(t):.2f}-{max(t):.2f})"

    for r in rows:
        lines.append(f"| {r['shape']} | {r.get('mask', 'random')} | {r['density']:.3f} | {cell(r, 'off')} | "
                     f"{cell(r, 'on')} | {r['on_ms'] / r['off_ms']:.3f} | {cell(r, 'flex')} | "
                     f"{r['flex_ms'] / r['off_ms']:.3f}x | {r['flex_ms'] / r['on_ms']:.3f}x | "
                     f"{r['err_on_vs_off']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flag", help="a boolean setting of vgen.kernels.block_sparse, e.g. USE_TMA")
    parser.add_argument("--shapes", nargs="+", default=["wan1.3b-480p", "wan14b-720p"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--masks", nargs="+", choices=["random", "local-3D"], default=["random"],
                        help="mask kinds (local-3D: the window closest to each density; density 1.0 random only)")
    parser.add_argument("--out", type=Path, help="write the Markdown here (and a .json beside it)")
    add_set_option(parser)
    args = parser.parse_args()
    apply_settings(parser, args.set)
    if not hasattr(block_sparse, args.flag) or not isinstance(getattr(block_sparse, args.flag), bool | None):
        parser.error(f"flag must name a boolean (or auto: None) setting of vgen.kernels.block_sparse, "
                     f"got {args.flag!r}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not all(0.0 < d <= 1.0 for d in args.densities):
        parser.error(f"--densities must lie in (0, 1], got {args.densities}")
    if not torch.cuda.is_available():
        sys.exit("ab_forward.py times the kernels on a GPU; none is available")
    meta = ab_meta(args.flag, args.rounds)
    rows = run(args.flag, args.shapes, args.rounds, args.densities, args.masks)
    write_report(args.out, markdown(args.flag, meta, rows), meta, rows)


if __name__ == "__main__":
    main()
