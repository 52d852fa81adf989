"""A/B timing of the block-sparse backward with one `vgen.kernels.block_sparse` setting off and on.

    python benchmarks/ab_backward.py BWD_CARRY_INDEX --out benchmarks/results/ab-bwd.md [--rounds 3]

The backward's counterpart of `ab_forward.py`: at each shape, mask kind (random, local-3D) and density, the
setting off, on, and FlexAttention with the identical mask are timed in turns, ``--rounds`` times, forward
+ backward (``out.backward(grad)``) and forward alone (each setting's own); the backward alone is their
difference. Medians. The
gradients of the two settings are checked against each other first. The setting is put back at the end.
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
    ab_meta,
    add_set_option,
    apply_settings,
    bench,
    err_ratio,
    flex_mask,
    fwd_bwd,
    local_mask,
    random_mask,
    shape_of,
    write_report,
)

from vgen.kernels import block_sparse  # noqa: E402
from vgen.kernels.block_sparse import block_sparse_attention  # noqa: E402

DENSITIES = (1.0, 0.25, 0.1)


def run(flag: str, shapes: list[str], rounds: int, densities) -> list[dict]:
    device = torch.device("cuda")
    before = getattr(block_sparse, flag)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    try:
        for name in shapes:
            heads, head_dim, grid = shape_of(name)
            seq = grid.num_video_tokens
            q, k, v = (torch.randn(1, seq, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))  # fmt: skip
            grad = torch.randn_like(q)
            qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
            grad_t = grad.transpose(1, 2).contiguous()
            for kind in ("random", "local-3D"):
                for density in densities:
                    if kind == "local-3D" and density == 1.0:
                        continue
                    mask = random_mask(heads, seq, density, device) if kind == "random" else local_mask(
                        grid, density, device)[0]  # fmt: skip
                    fm = flex_mask(mask)

                    def ours(on: bool, mask=mask, q=q, k=k, v=v):
                        setattr(block_sparse, flag, on)
                        return block_sparse_attention(q, k, v, mask)

                    def theirs(fm=fm, qt=qt, kt=kt, vt=vt):
                        return flex(qt, kt, vt, block_mask=fm)

                    grads = []
                    for on in (False, True):
                        for x in (q, k, v):
                            x.grad = None
                        ours(on).backward(grad)
                        grads.append([x.grad.clone() for x in (q, k, v)])
                    err = max(err_ratio(a, b) for a, b in zip(*grads, strict=True))
                    del grads
                    calls = {"off": fwd_bwd(lambda: ours(False), (q, k, v), grad),
                             "on": fwd_bwd(lambda: ours(True), (q, k, v), grad),
                             "flex": fwd_bwd(theirs, (qt, kt, vt), grad_t)}  # fmt: skip
                    # each setting's own forward: a flag that changes the forward changes both terms
                    forwards = {"off": lambda: ours(False), "on": lambda: ours(True), "flex": theirs}
                    times = {key: [] for key in (*calls, *(f"{key} fwd" for key in forwards))}
                    for _ in range(rounds):
                        for key, call in calls.items():
                            times[key].append(bench(call))
                        with torch.no_grad():
                            for key, call in forwards.items():
                                times[f"{key} fwd"].append(bench(call))
                    med = {key: statistics.median(t) for key, t in times.items()}
                    row = {"shape": name, "kind": kind, "density": mask.density(), "grad_err_on_vs_off": err,
                           **{f"{key}_ms": ms for key, ms in med.items()},
                           "off_bwd_ms": med["off"] - med["off fwd"], "on_bwd_ms": med["on"] - med["on fwd"],
                           "flex_bwd_ms": med["flex"] - med["flex fwd"], "rounds": times}  # fmt: skip
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
            torch.cuda.empty_cache()
    finally:
        setattr(block_sparse, flag, before)
    return rows


def markdown(flag: str, meta: dict, rows: list[dict]) -> str:
    lines = [f"### Backward A/B: `block_sparse.{flag}` off / on, {meta['date']}, commit {meta['commit']}, "
             f"{meta['gpu']}", "", f"Command: `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}; "
             f"bf16, B=1; off, on and FlexAttention timed in turns, {meta['rounds']} rounds, medians in ms; "
             "backward = forward+backward - forward.", "",
             "| shape | mask | density | fwd+bwd off | fwd+bwd on | **on / off** | Flex fwd+bwd | bwd off | bwd on | "
             "Flex bwd | **Flex / vgen bwd (on)** | grads on vs off |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['shape']} | {r['kind']} | {r['density']:.3f} | {r['off_ms']:.2f} | {r['on_ms']:.2f} | "
                     f"{r['on_ms'] / r['off_ms']:.3f} | {r['flex_ms']:.2f} | {r['off_bwd_ms']:.2f} | "
                     f"{r['on_bwd_ms']:.2f} | {r['flex_bwd_ms']:.2f} | {r['flex_bwd_ms'] / r['on_bwd_ms']:.3f}x | "
                     f"{r['grad_err_on_vs_off']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flag", help="a boolean setting of vgen.kernels.block_sparse, e.g. BWD_CARRY_INDEX")
    parser.add_argument("--shapes", nargs="+", default=["wan1.3b-480p"])
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the Markdown here (and a .json beside it)")
    add_set_option(parser)
    args = parser.parse_args()
    apply_settings(parser, args.set)
    if not hasattr(block_sparse, args.flag) or not isinstance(getattr(block_sparse, args.flag), bool | None):
        parser.error(f"flag must name a boolean (or None: auto) setting of vgen.kernels.block_sparse, "
                     f"got {args.flag!r}")  # fmt: skip
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not all(0.0 < d <= 1.0 for d in args.densities):
        parser.error(f"--densities must lie in (0, 1], got {args.densities}")
    if not torch.cuda.is_available():
        sys.exit("ab_backward.py times the kernels on a GPU; none is available")
    meta = ab_meta(args.flag, args.rounds)
    rows = run(args.flag, args.shapes, args.rounds, args.densities)
    write_report(args.out, markdown(args.flag, meta, rows), meta, rows)


if __name__ == "__main__":
    main()
