"""The `vgen` command: generate videos, reconstruct 4D meshes, inspect model folders, benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PARO_SHARES = ("head", "layer", "model", "run")  # vgen.attention.paro.SHARES, without importing torch here

__all__ = ["main"]

_DTYPES = ("float32", "float16", "bfloat16")


def _parse_setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _generate(args: argparse.Namespace) -> None:
    from vgen.parallel import init_from_environment, shutdown

    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif", ".png"):
        raise ValueError(f"--out must end in .mp4, .gif or .png, got {args.out!r}")
    parallel = init_from_environment(args.device)  # under torchrun: one process per GPU
    try:
        _generate_on(args, out, parallel)
    except BaseException:
        shutdown(wait=False)  # the other ranks' collectives fail instead of waiting for this one forever
        raise
    shutdown()


def _generate_on(args: argparse.Namespace, out: Path, parallel: bool) -> None:
    import torch

    from vgen.parallel import is_main_process
    from vgen.pipelines.video import VideoPipeline

    device = args.device
    if parallel and torch.cuda.is_available() and device in (None, "cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    pipe = VideoPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype), device=device)
    if args.attention != "stock":
        pipe.enable_sparse_attention(args.attention, **dict(args.set))
    if parallel:
        pipe.enable_parallelism(ulysses=args.ulysses, ring=args.ring)
    elif args.ulysses not in (None, 1) or args.ring != 1:
        raise ValueError(f"--ulysses {args.ulysses} / --ring {args.ring} need that many processes: launch with "
                         "torchrun --nproc-per-node")  # fmt: skip
    if not is_main_process():  # every rank generates (they share the work); rank 0 reports and writes
        pipe(args.prompt, num_frames=args.frames, height=args.height, width=args.width,
             num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, progress=False)  # fmt: skip
        return
    print(pipe, file=sys.stderr)
    video = pipe(
        args.prompt,
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
    )
    pipe.save(video, out, fps=args.fps)
    print(f"wrote {out} ({video.shape[0]} frames, {video.shape[1]}x{video.shape[2]})")
    if args.sheet:
        print(f"wrote {pipe.save(video, out.with_suffix('.png'))}")


def _reconstruct(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from vgen.pipelines.motion4d import Motion4DPipeline, check_point_sequence, render_strip

    source = Path(args.points)
    if not source.exists():
        raise ValueError(f"--points {args.points!r} does not exist")
    with np.load(source) as data:
        key = next((k for k in ("points", "inputs") if k in data), None)
        if key is None:
            raise ValueError(f"--points file must hold an array 'points' (or 'inputs') [frames, points, 3]; "
                             f"it has {sorted(data.files)}")  # fmt: skip
        points = check_point_sequence(data[key])
    model = Path(args.model)
    pipe = Motion4DPipeline.from_pretrained(model, device=args.device)
    recon = pipe(points, steps=args.steps, resolution=args.resolution, seed=args.seed)
    out = Path(args.out)
    paths = recon.save(out, args.format)
    Image.fromarray(render_strip(recon)).save(out / "frames.png")
    print(f"wrote {len(paths)} meshes ({recon.vertices.shape[1]} vertices, {len(recon.faces)} faces each) "
          f"and {out / 'frames.png'}")  # fmt: skip


def _info(args: argparse.Namespace) -> None:
    from vgen.pipelines.info import describe, describe_shape

    if (args.model is None) == (args.shape is None):
        raise ValueError("vgen info needs either a model folder or --shape NAME, not both")
    if args.shape is not None:
        print(describe_shape(args.shape))
    else:
        print(describe(args.model, args.frames, args.height, args.width, args.text_tokens))


def _parse_sweep(text: str) -> tuple[str, list[Any]]:
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"--sweep expects KEY=V1,V2,..., got {text!r}")
    return key, [_parse_setting(f"{key}={v}")[1] for v in values.split(",")]


def _bench_quality(args: argparse.Namespace) -> None:
    import torch

    from vgen.pipelines.quality import plot_density_psnr, quality_report
    from vgen.pipelines.video import VideoPipeline

    if args.prompts < 1 or args.seeds < 1:
        raise ValueError(f"--prompts and --seeds must be >= 1, got {args.prompts} and {args.seeds}")
    prompts = args.prompt or _held_out_captions(args.prompts)
    pipe = VideoPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype), device=args.device)
    base = dict(args.set)
    key, values = args.sweep if args.sweep else (None, [None])
    generate = {"num_frames": args.frames, "height": args.height, "width": args.width,
                "num_inference_steps": args.steps}
    reports, dense_videos = [], {}
    for value in values:
        config = dict(base, **({key: value} if key else {}))
        print(f"{args.attention} {config or ''}: {len(prompts)} prompts x {args.seeds} seeds", file=sys.stderr)
        reports.append(quality_report(pipe, args.attention, config, prompts, list(range(args.seeds)), dense_videos,
                                      **generate))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(r.to_markdown() for r in reports)
    (out / "quality.md").write_text(text)
    plot = plot_density_psnr(reports, out / "density_psnr.png")
    print(text)
    print(f"wrote {out / 'quality.md'} and {plot}")


def _bench_adherence(args: argparse.Namespace) -> None:
    import torch

    from vgen.pipelines.quality import adherence_report
    from vgen.pipelines.video import VideoPipeline

    if args.prompts < 1 or args.seeds < 1:
        raise ValueError(f"--prompts and --seeds must be >= 1, got {args.prompts} and {args.seeds}")
    prompts = args.prompt or _held_out_captions(args.prompts)
    pipe = VideoPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype), device=args.device)
    out = Path(args.out)
    generate = {"num_frames": args.frames, "height": args.height, "width": args.width,
                "num_inference_steps": args.steps, "guidance_scale": args.guidance}
    method = None if args.attention == "stock" else args.attention
    print(f"{len(prompts)} prompts x {args.seeds} seeds", file=sys.stderr)
    report = adherence_report(pipe, prompts, list(range(args.seeds)), method, dict(args.set),
                              sheet=out / "adherence.png", **generate)
    (out / "adherence.md").write_text(report.to_markdown())
    print(report.to_markdown())
    print(f"wrote {out / 'adherence.md'} and {out / 'adherence.png'}")


def _bench_speed(args: argparse.Namespace) -> None:
    import torch

    from vgen.pipelines.speed import speed_report

    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        raise ValueError(
            "bench speed times GPU kernels and torch sees no CUDA device; pass --device cpu to time the CPU"
        )
    reports = []
    for shape in args.shape:
        print(f"{shape}: dense vs {args.attention}", file=sys.stderr)
        reports.append(
            speed_report(
                shape,
                args.attention,
                dict(args.set),
                device=device,
                dtype=getattr(torch, args.dtype),
                repeats=args.repeats,
                warmup=args.warmup,
                steps=args.steps,
                pipeline=not args.no_pipeline,
            )
        )
        print(reports[-1].to_markdown())
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(r.to_markdown() for r in reports))
        print(f"wrote {out}")


def _densities(text: str) -> float | list[float]:
    """``--density``: one number, or comma-separated numbers (a schedule, one per timestep bucket)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _calibrate_paro(args: argparse.Namespace) -> None:
    import torch

    from vgen.attention.paro import _schedule_of, calibrate_paro
    from vgen.pipelines.video import VideoPipeline

    if args.prompts < 1 or args.seeds < 1:
        raise ValueError(f"--prompts and --seeds must be >= 1, got {args.prompts} and {args.seeds}")
    _schedule_of(args.density, args.buckets, args.share)  # before the model loads
    prompts = args.prompt or _held_out_captions(args.prompts)
    pipe = VideoPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype), device=args.device)
    generate = {"num_frames": args.frames, "height": args.height, "width": args.width,
                "num_inference_steps": args.steps}
    print(f"calibrating on {len(prompts)} prompts x {args.seeds} seeds (dense generations)", file=sys.stderr)
    calibration = calibrate_paro(pipe, prompts, args.out, density=args.density, buckets=args.buckets,
                                 block_size=args.block_size, seeds=tuple(range(args.seeds)), share=args.share,
                                 **generate)  # fmt: skip
    meta = calibration.meta
    orders = [[meta["orders"][int(o)] for o in row] for row in calibration.orders]
    print(f"token grid {meta['grid'][:3]} (text {meta['grid'][3:]}), {meta['steps']} steps in {meta['buckets']} "
          f"buckets, density {meta['density']} (shared per {meta.get('share', 'head')}), block {meta['block_size']}")
    print("kept token pairs per bucket: " + " ".join(f"{d:.3f}" for d in meta.get("bucket_density", [])))
    for layer, row in enumerate(orders):
        print(f"layer {layer:2d}: orders {' '.join(row)}; mass captured {meta['captured'][layer]}")
    print(f"wrote {args.out}")


def _held_out_captions(count: int) -> list[str]:
    """Shapes captions from the evaluation split: never seen in training."""
    from vgen.data import ShapesDataset

    held_out = ShapesDataset(count, frames=1, height=16, width=16, split="eval")
    return [held_out.clip(i).caption for i in range(count)]


def _tiny(args: argparse.Namespace) -> None:
    from vgen.pipelines.tiny import save_tiny_pipeline

    print(f"wrote a tiny random-weight {args.family} pipeline to {save_tiny_pipeline(args.family, args.out)}")


def _generation_arguments(parser: argparse.ArgumentParser, *, required_method: bool, prompts: int) -> None:
    """Model, method, prompts, seeds, sizes, dtype and device: what the bench commands that generate share."""
    from vgen.attention import available_methods

    parser.add_argument("--model", required=True, help="diffusers-format model folder")
    if required_method:
        parser.add_argument("--attention", required=True, choices=available_methods())
    else:
        parser.add_argument("--attention", default="stock", choices=["stock", *available_methods()])
    parser.add_argument("--set", action="append", type=_parse_setting, default=[], metavar="KEY=VALUE",
                        help="method setting, repeatable")
    parser.add_argument("--prompt", action="append", help="prompt, repeatable (default: held-out shapes captions)")
    parser.add_argument("--prompts", type=int, default=prompts, help="how many held-out captions without --prompt")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per prompt")
    for name in ("--frames", "--height", "--width", "--steps"):
        parser.add_argument(name, type=int)
    parser.add_argument("--dtype", default="float32", choices=_DTYPES)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    from vgen import __version__
    from vgen.attention import available_methods
    from vgen.configs import shape_names

    parser = argparse.ArgumentParser(prog="vgen", description="Fast video diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"vgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate a video from a prompt")
    gen.add_argument("--model", required=True, help="diffusers-format model folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--frames", type=int, help="number of frames (default: the pipeline's)")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    gen.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--attention", default="stock", choices=["stock", *available_methods()],
        help="vgen attention method for video self-attention (default: stock diffusers)",
    )
    gen.add_argument("--set", action="append", type=_parse_setting, default=[], metavar="KEY=VALUE",
                     help="attention method setting, repeatable (VALUE read as JSON when it parses)")
    gen.add_argument("--dtype", default="float32", choices=_DTYPES)
    gen.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--fps", type=int, default=16)
    gen.add_argument("--ulysses", type=int,
                     help="Ulysses context-parallel degree under torchrun (default: processes / --ring)")  # fmt: skip
    gen.add_argument("--ring", type=int, default=1,
                     help="ring context-parallel degree under torchrun; --ulysses x --ring = processes (every "
                          "vgen method; joint text-video models such as HunyuanVideo with --ulysses 1)")  # fmt: skip
    gen.add_argument("--out", required=True, help="output file: .mp4, .gif or .png (contact sheet)")
    gen.add_argument("--sheet", action="store_true", help="also write a PNG contact sheet beside --out")
    gen.set_defaults(run=_generate)

    rec = commands.add_parser("reconstruct", help="meshes with shared faces from a point-cloud sequence (4D)")
    rec.add_argument("--points", required=True, help=".npz with 'points' [frames, points, 3] in [-0.5, 0.5]")
    rec.add_argument("--model", required=True, help="Motion4D model folder (Motion4DPipeline.save_pretrained)")
    rec.add_argument("--out", required=True, help="folder for frame_XXX.obj|ply and frames.png")
    rec.add_argument("--format", default="obj", choices=["obj", "ply"])
    rec.add_argument("--steps", type=int, default=18, help="Heun sampling steps")
    rec.add_argument("--resolution", type=int, default=64, help="occupancy grid per axis for marching cubes")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    rec.set_defaults(run=_reconstruct)

    info = commands.add_parser("info", help="token grid, sequence length and FLOP split of a model folder")
    info.add_argument("model", nargs="?", help="diffusers-format model folder")
    info.add_argument("--shape", choices=shape_names(), help="a full-size preset instead of a folder")
    info.add_argument("--frames", type=int)
    info.add_argument("--height", type=int)
    info.add_argument("--width", type=int)
    info.add_argument("--text-tokens", type=int, help="text tokens (default: the pipeline's max_sequence_length)")
    info.set_defaults(run=_info)

    bench = commands.add_parser("bench", help="measure attention methods").add_subparsers(dest="bench", required=True)
    quality = bench.add_parser("quality", help="a method against dense: PSNR/SSIM, adherence, per-layer error")
    _generation_arguments(quality, required_method=True, prompts=4)
    quality.add_argument("--sweep", type=_parse_sweep, metavar="KEY=V1,V2,...",
                         help="one report per value of one setting (a point each on the density-PSNR plot)")
    quality.add_argument("--out", required=True, help="folder for quality.md and density_psnr.png")
    quality.set_defaults(run=_bench_quality)

    adherence = bench.add_parser(
        "adherence", help="prompt adherence on held-out shapes captions (colour, kind, motion)"
    )
    _generation_arguments(adherence, required_method=False, prompts=20)
    adherence.add_argument("--guidance", type=float)
    adherence.add_argument("--out", required=True, help="folder for adherence.md and adherence.png")
    adherence.set_defaults(run=_bench_adherence)

    speed = bench.add_parser("speed", help="transformer forward and whole pipeline, dense vs a method, full size")
    speed.add_argument("--shape", action="append", required=True, choices=shape_names(),
                       help="full-size preset, repeatable (random weights)")
    speed.add_argument("--attention", required=True, choices=available_methods())
    speed.add_argument("--set", action="append", type=_parse_setting, default=[], metavar="KEY=VALUE",
                       help="method setting, repeatable")
    speed.add_argument("--repeats", type=int, default=3, help="timed transformer forwards per attention (median)")
    speed.add_argument("--warmup", type=int, default=1, help="untimed transformer forwards first")
    speed.add_argument("--steps", type=int, default=4, help="denoising steps of the timed pipeline runs")
    speed.add_argument("--no-pipeline", action="store_true", help="time the transformer forward only")
    speed.add_argument("--dtype", default="bfloat16", choices=_DTYPES)
    speed.add_argument("--device", help="default: cuda (an error without one unless --device cpu)")
    speed.add_argument("--out", help="also write the Markdown tables to this file")
    speed.set_defaults(run=_bench_speed)

    calibrate = commands.add_parser("calibrate", help="offline calibration of a method").add_subparsers(
        dest="method", required=True
    )
    paro = calibrate.add_parser("paro", help="PAROAttention: per-head token orders and block masks")
    paro.add_argument("--model", required=True, help="diffusers-format model folder")
    paro.add_argument("--out", required=True, help="calibration file to write (.safetensors)")
    paro.add_argument("--prompt", action="append", help="prompt, repeatable (default: held-out shapes captions)")
    paro.add_argument("--prompts", type=int, default=2, help="how many held-out captions without --prompt")
    paro.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per prompt")
    for name in ("--frames", "--height", "--width", "--steps"):
        paro.add_argument(name, type=int)
    paro.add_argument("--density", type=_densities, default=0.3,
                      help="kept share of token pairs, in (0, 1]; or one per timestep bucket, comma-separated, the "
                           "first for the noisiest steps (a schedule; not with --share run)")
    paro.add_argument("--buckets", type=int, default=4, help="timestep buckets with their own masks")
    paro.add_argument("--share", default="head", choices=PARO_SHARES,
                      help="what shares the density budget: each head, the heads of a layer, the whole model (per "
                           "timestep bucket), or the whole run (every bucket too)")
    paro.add_argument("--block-size", type=int, default=128, help="kernel block size in tokens")
    paro.add_argument("--dtype", default="float32", choices=_DTYPES)
    paro.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    paro.set_defaults(run=_calibrate_paro)

    tiny = commands.add_parser("tiny", help="write a tiny random-weight pipeline (for trying vgen out)")
    tiny.add_argument("family", help="wan, hunyuan, cogvideox, ltx, motif or skyreels")
    tiny.add_argument("out", help="folder to write")
    tiny.set_defaults(run=_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, NotImplementedError) as err:
        print(f"vgen {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
