"""What a model folder will compute: token grid, sequence lengths, where the FLOPs go.

Reads configs only (weights are never loaded; the networks are built on the meta device),
so it answers in a second for a 14B model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vgen.attention import VideoLayout
from vgen.configs import load_shape
from vgen.pipelines.plumbing import self_attention_modules, transformer_spec
from vgen.pipelines.video import call_defaults, read_model_index, token_grid

__all__ = ["ModelInfo", "describe", "describe_shape", "transformer_flops"]

# Linear layers that act on text tokens only, in dual-stream blocks and embedders.
_TEXT_SIDE = re.compile(
    r"(add_[qkv]_proj|to_add_out|_context\b|context_|norm_added|text_embedder|text_proj|caption_projection)"
)
# Linear layers that act once per sample: timestep, guidance and pooled-text embeddings, AdaLN modulation.
_PER_SAMPLE = re.compile(r"(time|guidance|pooled|norm\w*\.linear$)")


@dataclass(frozen=True)
class ModelInfo:
    pipeline: str
    transformer: str
    num_frames: int
    height: int
    width: int
    grid: VideoLayout
    text_tokens: int
    self_attention_layers: int
    heads: int
    head_dim: int
    self_attention_flops: float
    total_flops: float

    @property
    def self_attention_share(self) -> float:
        return self.self_attention_flops / self.total_flops

    def __str__(self) -> str:
        rows = [
            ("pipeline", self.pipeline),
            ("transformer", self.transformer),
            ("clip", f"{self.num_frames} frames x {self.height} x {self.width}"),
            ("token grid (t, h, w)", f"{self.grid.frames} x {self.grid.height} x {self.grid.width}"),
            ("video tokens", f"{self.grid.num_video_tokens:,}"),
            ("text tokens", f"{self.text_tokens:,}"),
            ("self-attention sequence", f"{self.grid.seq_len:,} ({self.grid})"),
            ("self-attention layers", f"{self.self_attention_layers} x {self.heads} heads x {self.head_dim}"),
            ("transformer forward", f"{_flops(self.total_flops)} (estimate, batch 1)"),
            ("in self-attention", f"{_flops(self.self_attention_flops)} = {self.self_attention_share:.1%}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _flops(value: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:,.0f} FLOP"


def transformer_flops(transformer: torch.nn.Module, grid: VideoLayout, text_tokens: int) -> tuple[float, float]:
    """(self-attention FLOPs, total FLOPs) of one forward at batch 1.

    Self-attention is exact (``4 * S^2 * inner`` per layer for QK^T and PV); linear layers
    count ``2 * in * out`` per token they act on; cross-attention ``4 * S_video * S_text * inner``.
    Norms, activations and RoPE are left out (a few percent at most).
    """
    spec = transformer_spec(transformer)
    video = grid.num_video_tokens
    self_modules = dict(self_attention_modules(transformer))
    # Joint models whose blocks share one projection over [video, text] (no separate
    # text-stream weights) run every linear of that block on both.
    shared_blocks = {
        name.rsplit(".", 1)[0]
        for name, module in self_modules.items()
        if spec.text_position != "none" and getattr(module, "add_q_proj", None) is None
    }
    joint = video + (text_tokens if spec.text_position != "none" else 0)
    attention = sum(4 * joint * joint * module.to_q.out_features for module in self_modules.values())
    total = attention
    for name, module in transformer.named_modules():
        if name in self_modules or not hasattr(module, "to_q") or not hasattr(module, "to_k"):
            continue
        if any(name.startswith(prefix + ".") for prefix in self_modules) or "refiner" in name:
            continue
        total += 4 * video * text_tokens * module.to_q.out_features
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        block = next((b for b in shared_blocks if name.startswith(b + ".")), None)
        cross_kv = re.search(r"attn2\.to_[kv]$|cross_attn\.to_[kv]$|add_[kv]_proj$", name)
        if _PER_SAMPLE.search(name):
            tokens = 1
        elif block is not None:
            tokens = joint
        elif _TEXT_SIDE.search(name) or cross_kv or "refiner" in name:
            tokens = text_tokens
        else:
            tokens = video
        total += 2 * module.in_features * module.out_features * tokens
    return attention, total


def _meta_pipeline(folder: Path, index: dict[str, Any]) -> Any:
    """The pipeline object with its transformer and VAE built from their configs on the meta device."""
    import diffusers

    parts: dict[str, Any] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        library, class_name = entry
        if name in ("transformer", "vae"):
            model_class = getattr(diffusers, class_name)
            with torch.device("meta"):
                parts[name] = model_class.from_config(model_class.load_config(folder / name))
        elif name == "scheduler":
            parts[name] = getattr(diffusers, class_name).from_pretrained(folder / name)
        else:
            parts[name] = None
    return getattr(diffusers, index["_class_name"])(**parts)


def _model_info(pipeline: Any, name: str, num_frames: int, height: int, width: int, text_tokens: int) -> ModelInfo:
    grid = token_grid(pipeline, num_frames, height, width)
    transformer = pipeline.transformer
    spec = transformer_spec(transformer)
    context = text_tokens if spec.text_position != "none" else 0
    modules = self_attention_modules(transformer)
    first = modules[0][1]
    heads = int(first.heads)
    attention, total = transformer_flops(transformer, grid, text_tokens)
    return ModelInfo(
        pipeline=name,
        transformer=type(transformer).__name__,
        num_frames=num_frames,
        height=height,
        width=width,
        grid=grid.with_context(grid.num_video_tokens + context, spec.text_position),
        text_tokens=text_tokens,
        self_attention_layers=len(modules),
        heads=heads,
        head_dim=first.to_q.out_features // heads,
        self_attention_flops=float(attention),
        total_flops=float(total),
    )


def describe(
    path: str | Path,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    text_tokens: int | None = None,
) -> ModelInfo:
    """Token grid, sequence length and FLOP split of the model in ``path`` for a clip size.

    Sizes left as None take the pipeline's defaults; ``text_tokens`` defaults to its
    ``max_sequence_length``.
    """
    folder, index = read_model_index(path)
    pipeline = _meta_pipeline(folder, index)
    defaults = call_defaults(pipeline)
    return _model_info(
        pipeline,
        index["_class_name"],
        defaults["num_frames"] if num_frames is None else num_frames,
        defaults["height"] if height is None else height,
        defaults["width"] if width is None else width,
        int(defaults.get("max_sequence_length", 0)) if text_tokens is None else text_tokens,
    )


def describe_shape(name: str) -> ModelInfo:
    """:class:`ModelInfo` of a full-size preset from ``vgen/configs/shapes.yaml`` (e.g. ``wan1.3b-480p``)."""
    import diffusers

    preset = load_shape(name)
    model_class = getattr(diffusers, preset["transformer"])
    with torch.device("meta"):
        transformer = model_class(**preset["config"])
    stand_in = SimpleNamespace(
        transformer=transformer,
        vae_scale_factor_temporal=preset["vae"]["temporal"],
        vae_scale_factor_spatial=preset["vae"]["spatial"],
    )
    clip = preset["clip"]
    return _model_info(
        stand_in, f"preset {name}", clip["num_frames"], clip["height"], clip["width"], preset["text_tokens"]
    )
