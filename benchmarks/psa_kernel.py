"""The PSA kernel alone: `pyramid_attention` at the Wan shapes, its launch settings timed in turns.

    python benchmarks/psa_kernel.py --out benchmarks/results/psa-kernel.md [--rounds 3] [--baseline OLD.py]

For each shape (random bf16 q/k/v, B = 1) the levels come from the psa method's own selection at its default
budget (Hilbert order), and from its plain variant (the same budget, every kept pair at full resolution). Each
level map is timed with every setting of `pyramid.STAGES` and TMA on/off below, with vgen's block-sparse
kernel on the plain variant's pairs (the same work as the plain levels: how far the pyramid kernel's full level
is from the block-sparse forward), and with ``--baseline``: another copy of `vgen/kernels/pyramid.py` (say the
file at an older commit), loaded as a module. Settings are timed in turns, ``--rounds`` times; medians. Outputs
of every setting are checked against the first. The psa rows also time the call's parts: the K and V pyramids
(the Triton launch and PyTorch's level-by-level build) and the per-level block lists. "TMA" rows take the TMA
path where the library's `_use_tma` allows it (Hopper or newer, 16-byte aligned strides), as the library
does; elsewhere they run without.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench, commit_id, err_ratio, shape_of  # noqa: E402

from vgen.attention import BlockMask, PSAConfig, create_method  # noqa: E402
from vgen.kernels import block_sparse_attention, permute_tokens, pyramid  # noqa: E402

# (label, TMA, pyramid.STAGES). Dropped at cb7e6f7: pooled tiles stacked from TMA boxes (3.3x slower).
SETTINGS = [("TMA, stages (3, 3)", True, (3, 3)), ("TMA, stages (3, 2)", True, (3, 2)),
            ("no TMA, stages (3, 3)", False, (3, 3))]  # fmt: skip


BUILD_DIFF = "pyramid build, Triton vs PyTorch, max abs diff"


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("pyramid_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_settings(q, k, v, levels, scale, rounds, baseline, mask, settings, pooled) -> tuple[dict, dict]:
    """Each setting's times over ``rounds`` turns and its output's difference from the first setting's.

    ``pooled``: the levels hold pooled pairs (psa) or not (its plain variant: no pyramid built, as the method
    calls it). With pooled levels, the call's parts are timed too: the pyramids (one Triton launch each, and
    PyTorch's level-by-level build for comparison) and the per-level block lists."""
    use_tma, stages_before = pyramid._use_tma, pyramid.STAGES
    calls = {}
    for label, tma, stages in settings:

        def call(tma=tma, stages=stages):
            pyramid._use_tma = use_tma if tma else (lambda k, v: False)
            pyramid.STAGES = stages
            return pyramid.pyramid_attention(q, k, v, levels, scale=scale, check_levels=False, pooled=pooled)

        calls[label] = call
    if baseline is not None:
        calls["baseline"] = lambda: baseline.pyramid_attention(q, k, v, levels, scale=scale, check_levels=False)
    if mask is not None:
        calls["block-sparse kernel"] = lambda: block_sparse_attention(q, k, v, mask, scale=scale)
    try:
        with torch.no_grad():
            first, errors = None, {}
            for label, call in calls.items():
                out = call()
                first = out if first is None else first
                errors[label] = err_ratio(out, first)
            del out, first
            times = {label: [] for label in calls}
            for _ in range(rounds):
                for label, call in calls.items():
                    times[label].append(bench(call))
            if pooled:  # parts of the call; the Triton pyramids must equal PyTorch's (the same fp32 sums)
                for x in (k, v):
                    for a, b in zip(pyramid.build_pyramid(x, 128), pyramid.build_pyramid_reference(x, 128),
                                    strict=True):  # fmt: skip
                        errors[BUILD_DIFF] = max(
                            errors.get(BUILD_DIFF, 0.0),
                            (a.float() - b.float()).abs().max().item())  # fmt: skip
                parts = {"part: pyramids K+V (Triton)": lambda: (pyramid.build_pyramid(k, 128),
                                                                 pyramid.build_pyramid(v, 128)),
                         "part: pyramids K+V (PyTorch)": lambda: (pyramid.build_pyramid_reference(k, 128),
                                                                  pyramid.build_pyramid_reference(v, 128)),
                         "part: level lists": lambda: pyramid._level_lists(levels)}  # fmt: skip
                for label, part in parts.items():
                    times[label] = [bench(part) for _ in range(rounds)]
    finally:
        pyramid._use_tma, pyramid.STAGES = use_tma, stages_before
    return times, errors


def run(shapes: list[str], rounds: int, baseline, settings=SETTINGS) -> list[dict]:
    device = torch.device("cuda")
    budget = PSAConfig().budget
    rows = []
    for name in shapes:
        heads, head_dim, layout = shape_of(name)
        seq = layout.num_video_tokens
        q, k, v = (torch.randn(1, seq, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        scale = head_dim**-0.5
        for variant, extra in (("psa", {}), ("plain", {"proportions": (1, 0, 0, 0)})):
            method = create_method("psa", budget=budget, **extra)
            perm = method._order(layout, device)
            pq, pk, pv = (permute_tokens(x, perm) for x in (q, k, v))
            with torch.no_grad():
                levels = method._levels(pq, pk, layout, scale)
            mask = BlockMask.from_dense(levels > 0, (128, 128), (seq, seq)) if variant == "plain" else None
            times, errors = time_settings(pq, pk, pv, levels, scale, rounds, baseline, mask, settings,
                                          pooled=variant == "psa")  # fmt: skip
            row = {"shape": name, "variant": variant, "budget": budget,
                   "density": float(method.last_density), "ms": {lb: statistics.median(t) for lb, t in times.items()},
                   "rounds": times, "err_vs_first": errors}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    labels = list(rows[0]["ms"])
    extra = [lb for lb in rows[-1]["ms"] if lb not in labels]
    labels += extra
    lines = [f"### PSA kernel settings, {meta['date']}, commit {meta['commit']}, {meta['gpu']}", "",
             f"Command: `{meta['command']}`; torch {meta['torch']}; bf16, B=1, random q/k/v, levels from the psa "
             f"method at budget {rows[0]['budget']} (plain: its pairs all at full resolution); times in turns, "
             f"{meta['rounds']} rounds, medians in ms; largest relative RMS difference of an output from the first "
             f"setting's: {max(e for r in rows for lb, e in r['err_vs_first'].items() if lb != BUILD_DIFF):.1e}; "
             f"largest difference of the Triton pyramids from PyTorch's: "
             f"{max(r['err_vs_first'].get(BUILD_DIFF, 0.0) for r in rows):.1e}.", "",
             "| shape | variant | density | " + " | ".join(labels) + " |",
             "|---" * (3 + len(labels)) + "|"]  # fmt: skip
    for r in rows:
        cells = [f"{r['ms'][lb]:.3f}" if lb in r["ms"] else "" for lb in labels]
        lines.append(f"| {r['shape']} | {r['variant']} | {r['density']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=["wan1.3b-480p", "wan14b-720p"])
    parser.add_argument("--baseline", type=Path, help="another pyramid.py to time beside (e.g. an older commit's)")
    parser.add_argument(
        "--default-only",
        action="store_true",
        help="time the library's setting only (TMA, pyramid.STAGES), not the other candidates",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/psa_kernel.py needs a CUDA GPU")
    if args.rounds < 1:
        sys.exit(f"--rounds must be >= 1, got {args.rounds}")
    baseline = load_module(args.baseline) if args.baseline else None
    default = [(f"default: TMA, stages {pyramid.STAGES}", True, pyramid.STAGES)]
    settings = default if args.default_only else SETTINGS
    rows = run(args.shapes, args.rounds, baseline, settings)
    meta = {"date": datetime.date.today().isoformat(), "commit": commit_id(),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rounds": args.rounds,
            "command": "python " + " ".join(sys.argv)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(meta, rows))
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
