"""VMoBA (vgen's ``vmoba`` method) on one GPU: density, error and speed, from one attention call to a training step.

    python benchmarks/vmoba.py --out benchmarks/results/vmoba.md [--parts 1,2,3,4] [--smoke]

Everything runs in one process; the tables go to ``--out`` (Markdown) and a ``.json`` beside it.

1. **Real q/k/v.** The trained reference model (``assets/reference/model``, bf16) runs one
   transformer forward on a held-out shapes clip at the Wan2.1-1.3B 480p token grid
   (81 x 240 x 416 pixels -> 21 x 30 x 52 = 32,760 tokens with its 4x VAE and (1, 2, 2) patch):
   the clip is rendered, encoded (posterior mode), normalised with the VAE's latents_mean / std as
   training does, noised to sigma 0.5 (``x = 0.5 x0 + 0.5 noise``, timestep 500), and its caption
   encoded as the pipeline does. A private attention method captures q, k, v of every
   self-attention layer (and answers with dense attention). Then, per layer, for thresholds
   0.1 / 0.25 / 0.5 and for ``selection="topk", topk=8``: the density vmoba keeps, its output's
   relative error against dense attention (fp32 norms), and the time of
   - the selection alone (chunk scores and block selection on the permuted q/k, as vmoba runs them),
   - the whole vmoba call (permutation, selection, kernel, un-permutation),
   - vgen's block-sparse kernel with that mask on the permuted q/k/v,
   - dense cuDNN SDPA (``[B, H, S, D]`` inputs), and
   - compiled FlexAttention with the identical mask (over the permuted tokens, where the mask lives;
     its output is checked against vgen's kernel: a row that disagrees prints MISMATCH).
2. **Wan shapes, random q/k/v** (wan1.3b-480p: 12 x 128 heads, 32,760 tokens; wan14b-720p:
   40 x 128, 75,600): the same quantities at the default threshold 0.25 and at top-k 8, for a layer
   of each partition (1D, 2D, 3D). Random queries and keys give near-uniform chunk scores, so these
   densities say little about real inputs; the times are what matter.
3. **Transformer forward**, dense vs vmoba (default config), random full-size weights, through
   :func:`vgen.pipelines.speed.speed_report` (density: mean over layers).
4. **Training step**: forward + backward of a random bf16 ``WanTransformer3DModel`` with the
   Wan2.1-1.3B config, gradient checkpointing on, at 24 x 36 x 64 = 55,296 tokens (latents
   ``[1, 16, 24, 72, 128]``, random text states ``[1, 512, 4096]``, loss = mean squared output),
   dense vs vmoba (default config); median of 3 after a warm-up, synchronised, with the peak memory;
   the density is the mean over layers of one untimed forward (``record_attention``).

Kernel-level times are ``triton.testing.do_bench`` medians (ms); whole-model times are seconds.
Speedups: "vmoba vs cuDNN" = dense cuDNN time / whole vmoba call; "kernel vs Flex" = Flex time /
vgen kernel time with the same mask; "selection share" = selection time / whole vmoba call.

``--smoke`` runs every part on the CPU at tiny sizes (Triton kernels under ``TRITON_INTERPRET=1``,
float32, one ``time.perf_counter`` call per timing, no cuDNN or Flex timing; part 1 on a 9 x 64 x 64
clip, 3 x 8 x 8 tokens, its first three layers, 16-token blocks, top-k 2; parts 2-4 on a tiny Wan
config): a check that the script works (about a minute on 2 cores), not a measurement.

On the device machine: ``python3 benchmarks/vmoba.py --out $OUT/vmoba.md``.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton-using modules are imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import datetime
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import triton
from attention import bench, build_times, commit_id, flex_mask  # benchmarks/attention.py, beside this script
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

from vgen.attention import VideoLayout, create_method, registry
from vgen.attention.vmoba import _chunk_scores, chunk_plan, select_blocks
from vgen.configs import load_shape
from vgen.data import ShapesDataset, render
from vgen.kernels import block_sparse_attention, dense_attention, permute_tokens
from vgen.models.reference import encode_prompts
from vgen.pipelines.plumbing import apply_sparse_attention, record_attention, remove_sparse_attention
from vgen.pipelines.speed import build_shape_transformer, speed_report, timer

REFERENCE = Path(__file__).resolve().parent.parent / "assets" / "reference" / "model"
CAPTURE = "_vmoba-bench-capture"  # registered only while part 1 captures q/k/v
PARTITIONS = ("1d", "2d", "3d")  # vmoba's default cycle: layer l uses PARTITIONS[l % 3]
FLEX_TOLERANCE = 2e-2  # relative error between Flex and vgen's kernel above which a row is a MISMATCH

# A WanTransformer3DModel small enough for the CPU (as in tests/test_speed.py): 9 x 64 x 64 pixels
# -> 3 x 8 x 8 latents -> 3 x 4 x 4 = 48 tokens, three 16-token blocks.
TINY_WAN = {
    "name": "tiny-wan",
    "transformer": "WanTransformer3DModel",
    "config": {
        "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
        "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 32,
    },
    "clip": {"num_frames": 9, "height": 64, "width": 64},
    "vae": {"temporal": 4, "spatial": 8},
    "text_tokens": 16,
}  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    device: torch.device
    dtype: torch.dtype
    clip: tuple[int, int, int]  # part 1: frames, height, width in pixels
    real_config: dict[str, Any]  # part 1: vmoba settings besides the selection
    real_layers: int | None  # part 1: the first n layers (None: all)
    thresholds: tuple[float, ...]
    topk: int
    shapes: tuple[tuple[str, dict[str, Any]], ...]  # parts 2 and 3
    shape_config: dict[str, Any]  # parts 2-4: vmoba settings besides the selection
    # parts 3-4: extra settings timed besides shape_config alone. Random weights give near-uniform
    # chunk scores, so the default threshold keeps far more there than on real q/k (part 1): the
    # lower threshold gives about the density that the default gives on the trained model's q/k.
    model_variants: tuple[dict[str, Any], ...]
    speed_repeats: tuple[int, ...]  # part 3, per shape
    train_name: str  # part 4
    train_shape: dict[str, Any]
    train_latents: tuple[int, ...]


def gpu_sizes() -> Sizes:
    return Sizes(
        device=torch.device("cuda"), dtype=torch.bfloat16, clip=(81, 240, 416), real_config={}, real_layers=None,
        thresholds=(0.1, 0.25, 0.5), topk=8,
        shapes=(("wan1.3b-480p", load_shape("wan1.3b-480p")), ("wan14b-720p", load_shape("wan14b-720p"))),
        shape_config={}, model_variants=({}, {"threshold": 0.1}), speed_repeats=(3, 1), train_name="wan1.3b-480p",
        train_shape=load_shape("wan1.3b-480p"), train_latents=(1, 16, 24, 72, 128),
    )  # fmt: skip


def smoke_sizes() -> Sizes:
    # 9 x 64 x 64 pixels -> 3 x 8 x 8 tokens of the reference model; three layers cover 1D, 2D and 3D chunks
    return Sizes(
        device=torch.device("cpu"), dtype=torch.float32, clip=(9, 64, 64),
        real_config={"block_size": (16, 16), "temporal_chunk": 1, "spatial_chunk": (4, 4), "cube_chunk": (2, 4, 4)},
        real_layers=3, thresholds=(0.1, 0.25, 0.5), topk=2, shapes=(("tiny-wan", TINY_WAN),),
        shape_config={"block_size": (16, 16), "temporal_chunk": 1, "spatial_chunk": (2, 2), "cube_chunk": (2, 2, 2)},
        model_variants=({}, {"threshold": 0.1}), speed_repeats=(1,), train_name="tiny-wan", train_shape=TINY_WAN,
        train_latents=(1, 4, 3, 8, 8),
    )  # fmt: skip


def selections(sizes: Sizes, thresholds: tuple[float, ...]) -> list[tuple[str, dict[str, Any]]]:
    """(label, vmoba selection settings): each threshold, then top-k."""
    rows = [(f"threshold {t}", {"selection": "threshold", "threshold": t}) for t in thresholds]
    return rows + [(f"topk {sizes.topk}", {"selection": "topk", "topk": sizes.topk})]


# ---------------------------------------------------------------------------------------- helpers


def make_clock(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Milliseconds of one call of ``fn``: do_bench's median on CUDA, one perf_counter call elsewhere."""
    if device.type == "cuda":
        return bench

    def once(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - start)

    return once


def rel_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """||out - reference|| / ||reference|| in fp32."""
    reference = reference.float()
    return ((out.float() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_CPU_TIMING = "times are single perf_counter calls; cuDNN and Flex are not timed on the CPU"


def run_meta(device: torch.device, dtype: torch.dtype, smoke: bool, parts: set[int], gpu_timing: str) -> dict[str, Any]:
    """What a benchmark's header records: date, commit (``VGEN_COMMIT`` or git), device, versions, command."""
    cuda = device.type == "cuda"
    return {
        "date": datetime.date.today().isoformat(), "commit": commit_id(),
        "gpu": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__, "triton": triton.__version__, "command": "python " + " ".join(sys.argv),
        "dtype": str(dtype).removeprefix("torch."), "smoke": smoke, "parts": sorted(parts),
        "timing": gpu_timing if cuda else _CPU_TIMING,
    }  # fmt: skip


def grid_of(preset: dict[str, Any]) -> tuple[int, int, VideoLayout]:
    """(heads, head_dim, token grid) of a Wan shape preset."""
    cfg, clip, vae = preset["config"], preset["clip"], preset["vae"]
    patch = cfg["patch_size"]
    layout = VideoLayout(
        ((clip["num_frames"] - 1) // vae["temporal"] + 1) // patch[0],
        clip["height"] // (vae["spatial"] * patch[1]),
        clip["width"] // (vae["spatial"] * patch[2]),
    )
    return cfg["num_attention_heads"], cfg["attention_head_dim"], layout


def fmt(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def config_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "defaults"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


# ---------------------------------------------------------------------------------------- one attention call


@dataclass
class Attention:
    """One self-attention call's inputs, and its dense output and cuDNN time (shared by every selection)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: VideoLayout
    layer: int
    scale: float | None
    dense: torch.Tensor | None = None
    cudnn_ms: float | None = None


def prepare_dense(call: Attention, clock, cuda: bool) -> None:
    """The dense output (the error reference) and, on CUDA, the cuDNN SDPA time on ``[B, H, S, D]`` inputs."""
    with torch.no_grad():
        call.dense = dense_attention(call.q, call.k, call.v, scale=call.scale)
        if cuda:
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (call.q, call.k, call.v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                call.cudnn_ms = clock(lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=call.scale))


def measure(call: Attention, config: dict[str, Any], clock, flex) -> dict[str, Any]:
    """Density, error and times of vmoba with ``config`` on one attention call (see the module docstring)."""
    method = create_method("vmoba", **config)
    c = method.config
    q, k, v, layout, layer = call.q, call.k, call.v, call.layout, call.layer
    result: dict[str, torch.Tensor] = {}

    def vmoba() -> None:
        result["out"] = method(q, k, v, layout=layout, step=0, layer=layer, scale=call.scale)

    with torch.no_grad():
        vmoba_ms = clock(vmoba)
        mask = method.last_mask
        row = {
            "layer": layer, "partition": c.partitions[layer % len(c.partitions)],
            "density": float(method.last_density), "rel_error": rel_error(result.pop("out"), call.dense),
        }  # fmt: skip

        # the selection as _ChunkAttention.forward runs it: on the chunk-contiguous (permuted) tokens
        plan = chunk_plan(layout, c.tile(layer, layout), c.block_size, q.device)
        qp, kp, vp = (x if plan.perm is None else permute_tokens(x, plan.perm) for x in (q, k, v))
        scale = q.shape[-1] ** -0.5 if call.scale is None else call.scale

        def select():
            scores = _chunk_scores(qp, kp, plan, scale)
            return select_blocks(scores, plan, selection=c.selection, threshold=c.threshold, topk=c.topk)

        select_ms = clock(select)
        scores_ms = clock(lambda: _chunk_scores(qp, kp, plan, scale))  # the pooling part of the selection
        select_gpu = vmoba_gpu = None
        if q.is_cuda:  # GPU time alone, the queue held busy: what the call costs when the host runs ahead
            select_gpu = build_times(select, n=40)[0]
            vmoba_gpu = build_times(vmoba, n=10)[0]
            result.clear()
        row["selection_matches"] = torch.equal(select().to_dense(), mask.to_dense())
        kernel_ms = clock(lambda: block_sparse_attention(qp, kp, vp, mask, scale=scale))

        fmask = flex_mask(mask)
        row["flex_mask_matches"] = torch.equal(fmask.to_dense().bool(), mask.to_dense())
        flex_ms = flex_error = None
        if flex is not None:
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (qp, kp, vp))
            ours = block_sparse_attention(qp, kp, vp, mask, scale=scale)
            flex_error = rel_error(flex(qt, kt, vt, block_mask=fmask, scale=scale).transpose(1, 2), ours)
            flex_ms = clock(lambda: flex(qt, kt, vt, block_mask=fmask, scale=scale))
    row.update({
        "selection_ms": select_ms, "selection_scores_ms": scores_ms, "vmoba_ms": vmoba_ms, "kernel_ms": kernel_ms,
        "selection_gpu_ms": select_gpu, "vmoba_gpu_ms": vmoba_gpu,
        "cudnn_ms": call.cudnn_ms, "flex_ms": flex_ms, "flex_rel_error": flex_error,
    })  # fmt: skip
    for name in ("selection_matches", "flex_mask_matches"):
        if not row[name]:
            print(f"warning: layer {layer}, {config}: {name} is False", flush=True)
    return row


def summarise(label: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over rows (layers) and the speedups of the mean times."""

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows]
        return None if any(v is None for v in values) else statistics.fmean(values)

    summary = {"selection": label, "layers": len(rows)}
    for key in ("density", "rel_error", "selection_ms", "selection_scores_ms", "vmoba_ms", "kernel_ms", "cudnn_ms",
                "flex_ms", "selection_gpu_ms", "vmoba_gpu_ms"):
        summary[key] = mean(key)
    summary["selection_gpu_share"] = ratio(summary["selection_gpu_ms"], summary["vmoba_gpu_ms"])
    summary["speedup_vs_cudnn"] = ratio(summary["cudnn_ms"], summary["vmoba_ms"])
    summary["kernel_speedup_vs_flex"] = ratio(summary["flex_ms"], summary["kernel_ms"])
    summary["selection_share"] = summary["selection_ms"] / summary["vmoba_ms"]
    errors = [r["flex_rel_error"] for r in rows if r["flex_rel_error"] is not None]
    summary["flex_max_rel_error"] = max(errors) if errors else None
    return summary


# ---------------------------------------------------------------------------------------- part 1


class _Capture(registry.AttentionMethod):
    """Keeps every self-attention call's q, k, v and layout; answers with dense attention."""

    def __init__(self, config: registry.MethodConfig) -> None:
        super().__init__(config)
        self.calls: list[Attention] = []

    def forward(self, q, k, v, *, layout, step, layer, scale, attn_mask):
        self.calls.append(Attention(q.detach().clone(), k.detach().clone(), v.detach().clone(), layout, layer, scale))
        return dense_attention(q, k, v, scale=scale, attn_mask=attn_mask)


def capture_reference(sizes: Sizes) -> tuple[list[Attention], dict[str, Any]]:
    """q, k, v of every self-attention layer of the reference model on one noised clip (sigma 0.5)."""
    from diffusers import WanPipeline

    device, dtype = sizes.device, sizes.dtype
    pipe = WanPipeline.from_pretrained(REFERENCE, torch_dtype=dtype, local_files_only=True).to(device)
    frames, height, width = sizes.clip
    clip = ShapesDataset(1, frames, height, width, split="eval").clip(0)
    pixels = torch.from_numpy(np.ascontiguousarray(render(clip).transpose(3, 0, 1, 2)))[None]  # [1, 3, F, H, W]
    pixels = pixels.to(device).float().div(127.5).sub(1.0).to(dtype)
    vae_config = pipe.vae.config
    mean = torch.tensor(vae_config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae_config.latents_std, device=device).view(1, -1, 1, 1, 1)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        x0 = (pipe.vae.encode(pixels).latent_dist.mode().float() - mean) / std
        noise = torch.randn(x0.shape, generator=generator, device=device)
        latents = (0.5 * x0 + 0.5 * noise).to(dtype)  # flow matching at sigma 0.5
        text = encode_prompts(pipe.tokenizer, pipe.text_encoder, [clip.caption], 512)

    registry._METHODS[CAPTURE] = _Capture
    _Capture.name = CAPTURE
    try:
        capture = apply_sparse_attention(pipe.transformer, CAPTURE)
        with torch.no_grad():
            pipe.transformer(
                hidden_states=latents, timestep=torch.tensor([500.0], device=device), encoder_hidden_states=text,
                return_dict=False,
            )  # fmt: skip
        remove_sparse_attention(pipe.transformer)
    finally:
        del registry._METHODS[CAPTURE]
    cfg = pipe.transformer.config
    info = {
        "caption": clip.caption, "pixels": list(sizes.clip), "latents": list(latents.shape),
        "grid": [capture.calls[0].layout.frames, capture.calls[0].layout.height, capture.calls[0].layout.width],
        "layers": len(capture.calls), "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
    }  # fmt: skip
    del pipe, pixels, x0, noise, latents, text
    return capture.calls, info


def part_real(sizes: Sizes, clock, flex) -> dict[str, Any]:
    calls, info = capture_reference(sizes)
    free_memory()
    if sizes.real_layers is not None:
        calls = calls[: sizes.real_layers]
    info["layers_measured"] = len(calls)
    chunks = asdict(create_method("vmoba", **sizes.real_config).config)
    info["vmoba"] = {k: v for k, v in chunks.items() if k not in ("selection", "threshold", "topk")}
    print(json.dumps(info, default=str), flush=True)
    rows, summaries = [], []
    for call in calls:
        prepare_dense(call, clock, sizes.device.type == "cuda")
    for label, selection in selections(sizes, sizes.thresholds):
        group = []
        for call in calls:
            row = {"selection": label, **measure(call, {**sizes.real_config, **selection}, clock, flex)}
            print(json.dumps(row), flush=True)
            group.append(row)
        rows += group
        summaries.append(summarise(label, group))
    del calls
    free_memory()
    return {"info": info, "rows": rows, "summary": summaries}


# ---------------------------------------------------------------------------------------- part 2


def part_shapes(sizes: Sizes, clock, flex) -> dict[str, Any]:
    rows = []
    for name, preset in sizes.shapes:
        heads, head_dim, layout = grid_of(preset)
        torch.manual_seed(0)
        q, k, v = (
            torch.randn(1, layout.seq_len, heads, head_dim, device=sizes.device, dtype=sizes.dtype) for _ in range(3)
        )
        for layer in range(len(PARTITIONS)):  # one layer of each partition
            call = Attention(q, k, v, layout, layer, None)
            prepare_dense(call, clock, sizes.device.type == "cuda")
            for label, selection in selections(sizes, (0.25,)):
                row = {
                    "shape": name,
                    "heads": heads,
                    "head_dim": head_dim,
                    "tokens": layout.seq_len,
                    "selection": label,
                    **measure(call, {**sizes.shape_config, **selection}, clock, flex),
                }
                row["speedup_vs_cudnn"] = ratio(row["cudnn_ms"], row["vmoba_ms"])
                row["kernel_speedup_vs_flex"] = ratio(row["flex_ms"], row["kernel_ms"])
                row["selection_share"] = row["selection_ms"] / row["vmoba_ms"]
                row["selection_gpu_share"] = ratio(row["selection_gpu_ms"], row["vmoba_gpu_ms"])
                print(json.dumps(row), flush=True)
                rows.append(row)
            del call
        del q, k, v
        free_memory()
    return {"config": sizes.shape_config, "rows": rows}


# ---------------------------------------------------------------------------------------- part 3


def part_forward(sizes: Sizes) -> dict[str, Any]:
    rows = []
    for (name, preset), repeats in zip(sizes.shapes, sizes.speed_repeats, strict=True):
        for variant in sizes.model_variants:
            config = {**sizes.shape_config, **variant}
            report = speed_report(
                {"name": name, **preset}, "vmoba", config, device=sizes.device, dtype=sizes.dtype,
                repeats=repeats, pipeline=False,
            )  # fmt: skip
            timing = report.timings[0]
            row = {
                "shape": name, "grid": list(report.grid), "tokens": report.tokens, "density_last_layer": report.density,
                "vmoba_config": config_text(config), "repeats": repeats, "dense_s": timing.dense_s,
                "vmoba_s": timing.method_s, "speedup": timing.speedup,
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            del report
            free_memory()
    return {"rows": rows}


# ---------------------------------------------------------------------------------------- part 4


def part_training(sizes: Sizes) -> dict[str, Any]:
    device, dtype = sizes.device, sizes.dtype
    torch.manual_seed(0)
    model = build_shape_transformer(sizes.train_shape, device, dtype).train().requires_grad_(True)
    model.enable_gradient_checkpointing()
    cfg = model.config
    latents = torch.randn(sizes.train_latents, device=device, dtype=dtype)
    text = torch.randn(1, sizes.train_shape["text_tokens"], cfg.text_dim, device=device, dtype=dtype)
    timestep = torch.tensor([500.0], device=device)
    grid = [n // p for n, p in zip(sizes.train_latents[2:], cfg.patch_size, strict=True)]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        out.float().square().mean().backward()

    def median_step() -> tuple[float, float | None]:
        """Median seconds of 3 steps after a warm-up, and the peak GiB allocated (CUDA)."""
        step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        measure = timer(device)
        median = statistics.median(measure(step) for _ in range(3))
        return median, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    remove_sparse_attention(model)
    dense_s, dense_gib = median_step()
    rows = []
    for variant in sizes.model_variants:
        config = {**sizes.shape_config, **variant}
        apply_sparse_attention(model, "vmoba", **config)
        vmoba_s, vmoba_gib = median_step()
        model.zero_grad(set_to_none=True)
        # every layer's density, from one untimed forward (no checkpointing without grad)
        with torch.no_grad(), record_attention(model) as calls:
            model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)
        densities = [c.density for c in calls]
        row = {
            "shape": sizes.train_name, "latents": list(sizes.train_latents), "grid": grid,
            "tokens": int(np.prod(grid)), "vmoba_config": config_text(config),
            "density_mean": statistics.fmean(densities), "density_per_layer": densities, "dense_s": dense_s,
            "vmoba_s": vmoba_s, "speedup": dense_s / vmoba_s, "dense_peak_gib": dense_gib, "vmoba_peak_gib": vmoba_gib,
            "note": "",
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        remove_sparse_attention(model)
    return {"rows": rows}


# ---------------------------------------------------------------------------------------- report


def pct_or_na(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown(meta: dict[str, Any], results: dict[str, Any]) -> str:
    lines = [
        f"### VMoBA, {meta['date']}, commit {meta['commit']}, {meta['gpu']}", "",
        f"Command: `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}; {meta['dtype']}, B=1; "
        f"{meta['timing']}. Speedups: *vmoba vs cuDNN* = dense cuDNN SDPA / the whole vmoba call; "
        "*kernel vs Flex* = FlexAttention / vgen's kernel with the identical mask; *selection share* = "
        "selection / whole vmoba call (target < 10%), in wall time of calls timed alone (the host's launches "
        "included) and in GPU time (*GPU*: calls enqueued back to back behind a `torch.cuda._sleep`, so that "
        "only the kernels count, as in a model forward where the host runs ahead).", "",
    ]  # fmt: skip
    if meta["smoke"]:
        lines += ["**Smoke run** (CPU, Triton interpreter, tiny sizes): checks the script, measures nothing.", ""]
    header = ("| density | rel. error vs dense | selection ms (scores) | vmoba ms | vgen kernel ms | cuDNN dense ms | "
              "Flex ms (same mask) | **vmoba vs cuDNN** | **kernel vs Flex** | selection share | selection GPU ms / "
              "**share (GPU)** |")  # fmt: skip

    def cells(r: dict[str, Any], error_key: str) -> str:
        flex_speed = fmt(r["kernel_speedup_vs_flex"], ".2f", "x")
        if r[error_key] is not None and r[error_key] > FLEX_TOLERANCE:
            flex_speed = "MISMATCH"
        return (
            f"{r['density']:.3f} | {r['rel_error']:.2e} | {fmt(r['selection_ms'])} "
            f"({fmt(r.get('selection_scores_ms'))}) | {fmt(r['vmoba_ms'])} | "
            f"{fmt(r['kernel_ms'])} | {fmt(r['cudnn_ms'])} | {fmt(r['flex_ms'])} | "
            f"{fmt(r['speedup_vs_cudnn'], '.2f', 'x')} | {flex_speed} | {100 * r['selection_share']:.1f}% | "
            f"{fmt(r.get('selection_gpu_ms'))} / {pct_or_na(r.get('selection_gpu_share'))} |"
        )

    if "real" in results:
        real = results["real"]
        info = real["info"]
        vm = info["vmoba"]
        grid = "x".join(map(str, info["grid"]))
        lines += [
            "#### 1. Real q/k/v: the reference model, one forward at sigma 0.5", "",
            f"Held-out clip \"{info['caption']}\", {'x'.join(map(str, info['pixels']))} pixels -> latents "
            f"{info['latents']} -> {grid} = {int(np.prod(info['grid'])):,} tokens; timestep 500; "
            f"{info['heads']} heads x {info['head_dim']}; {info['layers_measured']} of {info['layers']} "
            f"self-attention layers (partitions cycle {'/'.join(vm['partitions'])}). vmoba: temporal_chunk "
            f"{vm['temporal_chunk']}, spatial_chunk {vm['spatial_chunk']}, cube_chunk {vm['cube_chunk']}, blocks "
            f"{vm['block_size']}. Means over layers.", "",
            "| selection " + header, "|---" * 12 + "|",
        ]  # fmt: skip
        lines += [f"| {s['selection']} | " + cells(s, "flex_max_rel_error") for s in real["summary"]]
        labels = [s["selection"] for s in real["summary"]]
        lines += [
            "",
            "Per layer: density / rel. error vs dense.",
            "",
            "| layer | partition | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels),
        ]
        by_layer: dict[int, dict[str, dict[str, Any]]] = {}
        for r in real["rows"]:
            by_layer.setdefault(r["layer"], {})[r["selection"]] = r
        for layer, row in sorted(by_layer.items()):
            first = next(iter(row.values()))
            lines.append(
                f"| {layer} | {first['partition']} | "
                + " | ".join(f"{row[s]['density']:.3f} / {row[s]['rel_error']:.1e}" for s in labels)
                + " |"
            )
        lines.append("")
    if "shapes" in results:
        lines += [
            "#### 2. Wan shapes, random q/k/v", "",
            "Random queries and keys give near-uniform chunk scores: densities (and errors) differ from real "
            "inputs; the times are the point. One layer per partition; vmoba "
            f"{config_text(results['shapes']['config'])}.", "",
            "| shape | heads x dim, tokens | selection | partition " + header, "|---" * 15 + "|",
        ]  # fmt: skip
        for r in results["shapes"]["rows"]:
            lines.append(
                f"| {r['shape']} | {r['heads']} x {r['head_dim']}, {r['tokens']:,} | {r['selection']} | "
                f"{r['partition']} | " + cells(r, "flex_rel_error")
            )
        lines.append("")
    if "forward" in results:
        lines += [
            "#### 3. Transformer forward, random weights (`vgen.pipelines.speed.speed_report`)",
            "",
            "The density is the mean over self-attention layers (what `speed_report` records).",
            "",
            "| shape | tokens | vmoba config | density (mean over layers) | timed | dense s | vmoba s | **speedup** |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results["forward"]["rows"]:
            lines.append(
                f"| {r['shape']} | {'x'.join(map(str, r['grid']))} = {r['tokens']:,} | {r['vmoba_config']} | "
                f"{r['density_last_layer']:.3f} | median of {r['repeats']} | {r['dense_s']:.3f} | "
                f"{r['vmoba_s']:.3f} | {r['speedup']:.2f}x |"
            )
        lines.append("")
    if "training" in results:
        lines += [
            "#### 4. Training step: forward + backward, gradient checkpointing, random weights",
            "",
            "Loss = mean squared output; median of 3 after a warm-up. Density: mean over layers, from one "
            "untimed forward.",
            "",
            "| model config | latents | tokens | vmoba config | density | dense s | vmoba s | **speedup** | "
            "peak GiB dense / vmoba |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["training"]["rows"]:
            lines.append(
                f"| {r['shape']} | {r['latents']} | {'x'.join(map(str, r['grid']))} = {r['tokens']:,} | "
                f"{r['vmoba_config']} | {r['density_mean']:.3f} | {r['dense_s']:.3f} | {r['vmoba_s']:.3f} | "
                f"{r['speedup']:.2f}x | {fmt(r['dense_peak_gib'], '.1f')} / "
                f"{fmt(r['vmoba_peak_gib'], '.1f')} |"
            )
            if r["note"]:
                lines += ["", f"Note: {r['note']}."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the Markdown here (and a .json beside it)")
    parser.add_argument("--parts", default="1,2,3,4", help="comma-separated parts to run (default 1,2,3,4)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    if not parts <= {1, 2, 3, 4}:
        sys.exit(f"--parts takes numbers from 1 to 4, got {args.parts!r}")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/vmoba.py needs a CUDA GPU (or --smoke for a CPU check)")
    sizes = smoke_sizes() if args.smoke else gpu_sizes()
    cuda = sizes.device.type == "cuda"
    timing = "kernel times are do_bench medians in ms, model times synchronised seconds"
    meta = run_meta(sizes.device, sizes.dtype, args.smoke, parts, timing)
    print(json.dumps(meta), flush=True)
    clock = make_clock(sizes.device)
    flex = torch.compile(flex_attention, dynamic=False) if cuda else None
    torch.manual_seed(0)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    runs = {
        1: ("real", lambda: part_real(sizes, clock, flex)),
        2: ("shapes", lambda: part_shapes(sizes, clock, flex)),
        3: ("forward", lambda: part_forward(sizes)),
        4: ("training", lambda: part_training(sizes)),
    }
    for part in sorted(parts):
        key, run = runs[part]
        results[key] = run()
        free_memory()  # each part's tensors and models are gone with its frame
    meta["seconds"] = round(time.perf_counter() - started, 1)
    text = markdown(meta, results)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=1, default=str))


if __name__ == "__main__":
    main()
