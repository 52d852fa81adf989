"""The `vgen` command: generate videos, inspect model folders."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

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
    import torch

    from vgen.pipelines.video import VideoPipeline

    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif", ".png"):
        raise ValueError(f"--out must end in .mp4, .gif or .png, got {args.out!r}")
    pipe = VideoPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype), device=args.device)
    if args.attention != "stock":
        pipe.enable_sparse_attention(args.attention, **dict(args.set))
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


def _info(args: argparse.Namespace) -> None:
    from vgen.pipelines.info import describe, describe_shape

    if (args.model is None) == (args.shape is None):
        raise ValueError("vgen info needs either a model folder or --shape NAME, not both")
    if args.shape is not None:
        print(describe_shape(args.shape))
    else:
        print(describe(args.model, args.frames, args.height, args.width, args.text_tokens))


def _tiny(args: argparse.Namespace) -> None:
    from vgen.pipelines.tiny import save_tiny_pipeline

    print(f"wrote a tiny random-weight {args.family} pipeline to {save_tiny_pipeline(args.family, args.out)}")


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
    gen.add_argument("--out", required=True, help="output file: .mp4, .gif or .png (contact sheet)")
    gen.add_argument("--sheet", action="store_true", help="also write a PNG contact sheet beside --out")
    gen.set_defaults(run=_generate)

    info = commands.add_parser("info", help="token grid, sequence length and FLOP split of a model folder")
    info.add_argument("model", nargs="?", help="diffusers-format model folder")
    info.add_argument("--shape", choices=shape_names(), help="a full-size preset instead of a folder")
    info.add_argument("--frames", type=int)
    info.add_argument("--height", type=int)
    info.add_argument("--width", type=int)
    info.add_argument("--text-tokens", type=int, help="text tokens (default: the pipeline's max_sequence_length)")
    info.set_defaults(run=_info)

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
