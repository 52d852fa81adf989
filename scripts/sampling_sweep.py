"""Prompt adherence of the reference model over sampling settings: the scheduler's flow shift x guidance.

    python3 scripts/sampling_sweep.py --model assets/reference/model --prompts 80 --shifts 1 3 6 12 \
        --guidance 5 --device cuda --out build/sweep.md

Each (shift, guidance) generates the same held-out captions (seed 0, the demo's size and steps) and scores
them with `vgen.data.score_video`, as `vgen bench adherence` does; the first 20 captions (the issue's measure)
and all of them are reported side by side, with single- and two-object captions apart. The flow shift is the
scheduler's `flow_shift` (the shipped model's config has 3.0): larger values spend more of the steps at high
noise, where the layout (which object goes where) is decided.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vgen.cli import _held_out_captions
from vgen.pipelines.quality import adherence_report
from vgen.pipelines.video import VideoPipeline


def set_flow_shift(pipe: VideoPipeline, shift: float) -> None:
    scheduler = pipe.pipeline.scheduler
    pipe.pipeline.scheduler = type(scheduler).from_config(scheduler.config, flow_shift=shift)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="assets/reference/model")
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--shifts", type=float, nargs="+", default=[3.0])
    parser.add_argument("--guidance", type=float, nargs="+", default=[5.0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.prompts < 1 or any(s <= 0 for s in args.shifts) or any(g < 1 for g in args.guidance):
        parser.error("--prompts >= 1, --shifts > 0 and --guidance >= 1 expected")
    prompts = _held_out_captions(args.prompts)
    two = [" while " in p for p in prompts]
    pipe = VideoPipeline.from_pretrained(args.model, torch_dtype=torch.float32, device=args.device)
    lines = [f"### Adherence over sampling settings: {args.model}, {args.prompts} held-out captions, seed 0, "
             f"{args.frames} x {args.size} x {args.size}, {args.steps} steps, fp32",
             "", f"Command: `python3 {' '.join(sys.argv)}`", "",
             "| flow shift | guidance | colour + position, first 20 | all | single-object | two-object | "
             "colour + motion, all | s |", "|---|---|---|---|---|---|---|---|"]
    for shift in args.shifts:
        set_flow_shift(pipe, shift)
        for guidance in args.guidance:
            began = time.perf_counter()
            report = adherence_report(pipe, prompts, [0], num_frames=args.frames, height=args.size,
                                      width=args.size, num_inference_steps=args.steps, guidance_scale=guidance)
            ok = [c.placed for c in report.clips]
            motion = [c.follows for c in report.clips]
            single = [o for o, t in zip(ok, two, strict=True) if not t]
            double = [o for o, t in zip(ok, two, strict=True) if t]
            row = (f"| {shift:g} | {guidance:g} | {sum(ok[:20])} / {min(20, len(ok))} | {sum(ok)} / {len(ok)} "
                   f"({100 * sum(ok) / len(ok):.0f}%) | {sum(single)} / {len(single)} | {sum(double)} / {len(double)} "
                   f"| {100 * sum(motion) / len(motion):.0f}% | {time.perf_counter() - began:.0f} |")
            print(row, flush=True)
            lines.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
