"""Evaluate 4D reconstruction on held-out procedural sequences: IoU, Chamfer-L1, correspondence L2 per frame.

    python -m vgen.models.eval4d --model build/m4d/model --baseline build/m4d-frame/model --sequences 20 \\
        --out build/eval4d

Held-out sequences are :func:`vgen.data.deforming.sample_sequence` seeds from 2,000,000,000 on
(training uses ``seed`` x 1,000,003 + i for i below ``sequences``: the ranges do not meet for seeds
below 1,999). Each
model reconstructs every sequence from its input point clouds; the metrics are :mod:`vgen.metrics4d`'s,
averaged over frames, then over sequences. Writes ``eval4d.md`` (a table per model, side by side),
``eval4d.png`` (each metric against the frame index) and ``eval4d.json``. Two evaluations run apart (one
process per model) become one report with ``--merge DIR DIR --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vgen.data.deforming import sample_sequence
from vgen.metrics4d import chamfer_l1, correspondence_l2, inside_mesh, iou
from vgen.pipelines.motion4d import EmptySurfaceError, Motion4DPipeline

__all__ = ["HELD_OUT_SEED", "evaluate", "plot_per_frame", "write_report"]

HELD_OUT_SEED = 2_000_000_000


def evaluate(pipe: Motion4DPipeline, sequences: int = 20, frames: int = 17, *, points: int = 300, noise: float = 0.005,
             steps: int = 18, resolution: int = 64, chamfer_samples: int = 100_000) -> dict:  # fmt: skip
    """Mean IoU, Chamfer-L1 and correspondence L2 (and per sequence) over held-out sequences.

    A sequence whose predicted occupancy has no surface is a failure: IoU 0 in every frame (the
    truth is never empty), no Chamfer or correspondence distance (the means leave it out; ``failures``
    counts it)."""
    rows = []
    for i in tqdm(range(sequences), desc="sequences"):
        began = time.time()
        seq = sample_sequence(HELD_OUT_SEED + i, frames, points=points, noise=noise, queries=20_000,
                              near_surface=0.0, correspondences=20_000)  # fmt: skip
        try:
            recon = pipe(seq["inputs"], steps=steps, resolution=resolution, progress=False)
        except EmptySurfaceError:
            nan = [float("nan")] * frames
            rows.append({"seed": HELD_OUT_SEED + i, "kind": seq["kind"], "iou": 0.0, "chamfer_l1": nan[0],
                         "correspondence_l2": nan[0], "seconds": time.time() - began, "failed": True,
                         "per_frame": {"iou": [0.0] * frames, "chamfer_l1": nan, "correspondence_l2": nan}})
            continue
        ious = [iou(inside_mesh(recon.vertices[t], recon.faces, seq["queries"][t]), seq["occupancy"][t])
                for t in range(frames)]  # fmt: skip
        chamfers = [chamfer_l1(recon.vertices[t], recon.faces, seq["correspondences"][t], chamfer_samples)
                    for t in range(frames)]  # fmt: skip
        corr = correspondence_l2(recon.vertices, seq["correspondences"])
        rows.append({"seed": HELD_OUT_SEED + i, "kind": seq["kind"], "iou": float(np.mean(ious)),
                     "chamfer_l1": float(np.mean(chamfers)), "correspondence_l2": float(corr.mean()),
                     "seconds": time.time() - began, "failed": False,
                     "per_frame": {"iou": [float(x) for x in ious], "chamfer_l1": [float(x) for x in chamfers],
                                   "correspondence_l2": [float(x) for x in corr]}})  # fmt: skip
    keys = ("iou", "chamfer_l1", "correspondence_l2")
    with warnings.catch_warnings():  # every sequence failed: the distances' means are NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        # failures hold IoU 0 (counted) and NaN distances (which nanmean leaves out)
        per_frame = {key: np.nanmean([r["per_frame"][key] for r in rows], axis=0).tolist() for key in keys}
        means = {key: float(np.nanmean([r[key] for r in rows])) for key in keys}
    return means | {"failures": sum(r["failed"] for r in rows), "per_frame": per_frame, "sequences": rows}


def plot_per_frame(results: dict, path: str | Path) -> Path:
    """IoU, Chamfer-L1 and correspondence L2 against the frame index, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, label in zip(axes, ("iou", "chamfer_l1", "correspondence_l2"),
                              ("IoU (higher is better)", "Chamfer-L1", "correspondence L2"), strict=True):  # fmt: skip
        for r in results.values():
            name = "temporal attention" if r["temporal"] else "per frame (baseline)"
            ax.plot(r["per_frame"][key], marker="o", markersize=3, label=name)
        ax.set_title(label)
        ax.set_xlabel("frame")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def write_report(results: dict, out: str | Path, sequences: int, frames: int, steps: int, resolution: int) -> str:
    """``eval4d.md`` (a row per model), ``eval4d.png`` and ``eval4d.json`` under ``out``; returns the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{sequences} held-out procedural sequences of {frames} frames (seeds from {HELD_OUT_SEED}), "
             f"{steps} Heun steps, marching cubes at {resolution}^3. A reconstruction without a surface counts "
             "IoU 0 and stays out of the distances.", "",
             "| model | temporal attention | IoU | Chamfer-L1 | correspondence L2 | no surface |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results.values():
        lines.append(f"| {r['folder']} | {'yes' if r['temporal'] else 'no (per frame)'} | {r['iou']:.3f} | "
                     f"{r['chamfer_l1']:.4f} | {r['correspondence_l2']:.4f} | {r.get('failures', 0)} |")  # fmt: skip
    plot_per_frame(results, out / "eval4d.png")
    lines += ["", "![per frame](eval4d.png)"]
    (out / "eval4d.md").write_text("\n".join(lines) + "\n")
    (out / "eval4d.json").write_text(json.dumps({"sequences": sequences, "frames": frames, "steps": steps,
                                                 "resolution": resolution, "models": results}, indent=1))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained model folder")
    parser.add_argument("--baseline", help="a second model (e.g. trained with --no-temporal), side by side")
    parser.add_argument("--merge", nargs="+", metavar="DIR",
                        help="instead of evaluating: one report from earlier --out folders (evaluations run apart)")
    parser.add_argument("--sequences", type=int, default=20)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--device")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.merge:
        if args.model or args.baseline:
            parser.error("--merge reports earlier evaluations; it takes no --model or --baseline")
        runs = [json.loads((Path(d) / "eval4d.json").read_text()) for d in args.merge]
        keys = {(r["sequences"], r["frames"], r["steps"], r["resolution"]) for r in runs}
        if len(keys) != 1:
            raise ValueError(f"--merge: the evaluations differ in (sequences, frames, steps, resolution): {keys}")
        results = {f"{label}{i}": r for i, run in enumerate(runs) for label, r in run["models"].items()}
        print(write_report(results, args.out, *keys.pop()))
        return
    if not args.model:
        parser.error("--model is required (or --merge)")
    results = {}
    for label, folder in (("model", args.model), ("baseline", args.baseline)):
        if folder:
            pipe = Motion4DPipeline.from_pretrained(folder, device=args.device)
            temporal = pipe.config.deform_denoiser.temporal
            results[label] = {"folder": folder, "temporal": temporal} | evaluate(
                pipe, args.sequences, args.frames, steps=args.steps, resolution=args.resolution)
    print(write_report(results, args.out, args.sequences, args.frames, args.steps, args.resolution))


if __name__ == "__main__":
    main()
