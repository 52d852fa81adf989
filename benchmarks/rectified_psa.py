"""Rectified SpaAttn (``rectified``) and Pyramid Sparse Attention (``psa``) against plain block-sparse, on one GPU.

    python benchmarks/rectified_psa.py --out benchmarks/results/rectified_psa.md [--parts 1,2,3] [--smoke]

Everything runs in one process; the tables go to ``--out`` (Markdown) and a ``.json`` beside it. The
question: at equal kept compute, does each method beat plain block-sparse attention with the same
selection in quality, and what does it cost in time against that plain variant, dense cuDNN and
FlexAttention? Target: higher PSNR than plain block-sparse at the same density, at no more than 15%
extra attention time.

The plain baselines keep each method's own selection and drop its correction:
- rectified: ``rectify_kept=False, compensate_dropped=False`` (its selection, then the block-sparse
  kernel on the kept blocks); "pooled" is the paper's isolated-pooling reallocation of the kept blocks
  with compensation (``rectify_kept=True``); "rectified" is the
  default.
- psa: ``proportions=(1, 0, 0, 0)`` at the same budget (the same ranking of pairs and Hilbert order,
  full-resolution pairs only; the same compute up to the diagonal and text pairs, which both read in
  full outside the ranking: both densities are reported).

1. **Real q/k/v.** q, k, v of every self-attention layer of the trained reference model
   (``assets/reference/model``, bf16) at the Wan2.1-1.3B 480p token grid (81 x 240 x 416 pixels ->
   21 x 30 x 52 = 32,760 tokens), captured exactly as ``benchmarks/vmoba.py`` part 1 does (its
   ``capture_reference``: a held-out shapes clip, encoded, noised to sigma 0.5, one transformer
   forward). Per layer:
   - rectified at mass 0.5 / 0.7 / 0.9 (0.9: the default): plain, pooled reallocation (the paper's), rectified
     (vgen's default);
   - psa at budget 0.1 / 0.2 / 0.25 / 0.3 (0.25: the default): plain, psa (default proportions 1 : 2 : 2 : 5);
   for each: the density (``method.last_density``), the relative error of its output against fp32
   dense attention, and the time of the whole method call (selection included); the extra time of
   each variant over its plain one in percent; and, with the plain variant's mask, vgen's
   block-sparse kernel alone and compiled FlexAttention (rectified: ``last_mask``; psa: the full
   pairs ``last_levels > 0`` as a ``BlockMask`` over the Hilbert-ordered tokens, where the levels
   live), and dense cuDNN SDPA (``[B, H, S, D]`` inputs). Flex's output is checked against the plain
   variant's: a row that disagrees prints MISMATCH.
2. **Wan shapes, random q/k/v** (wan1.3b-480p: 12 x 128 heads, 32,760 tokens; wan14b-720p: 40 x 128,
   75,600; bf16): times only, rectified (default mass) against its plain variant and psa (default budget)
   against its plain variant, with cuDNN dense, vgen's kernel and Flex with the plain mask. Random
   q/k give near-uniform pooled scores, so rectified keeps about ``mass`` of the blocks here.
3. **Video quality on the reference model** (bf16): ``quality_report`` for 3 held-out captions
   (seed 0) at 33 x 256 x 256 pixels (9 x 32 x 32 = 9,216 tokens), 20 steps: rectified (default mass)
   and its plain variant, psa (default budget) and its plain variant, each against dense: mean PSNR and
   SSIM, the density (mean over calls) and the attention output's relative error (mean over calls).

Kernel-level times are ``triton.testing.do_bench`` medians (ms); part 3 reports wall seconds.
"Extra" = method time / plain-variant time - 1; "vs kernel" = method time / time of vgen's bare
block-sparse kernel with the plain variant's mask - 1 (everything around the kernel: selection,
corrections, and for psa the permutation and the pyramid). Every part's tables are written as soon
as it ends, so a run cut short keeps the parts it finished.

``--smoke`` runs every part on the CPU at tiny sizes (Triton kernels under ``TRITON_INTERPRET=1``,
float32, one ``time.perf_counter`` call per timing, no cuDNN or Flex timing: "n/a"; part 1 on a
9 x 128 x 128 clip, 3 x 16 x 16 = 768 tokens (six 128-token blocks), the first 2 heads of its first
layer; part 2 on a 2 x 32 head shape of 3 x 16 x 16 tokens; part 3 on 1 caption, psa only, at
9 x 64 x 128 pixels (3 x 8 x 16 = 384 tokens), 1 step, guidance scale 1): a check that the script
works (about 2 minutes on 2 idle cores), not a measurement.

On the device machine: ``python3 benchmarks/rectified_psa.py --out $OUT/rectified_psa.md``.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton-using modules are imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from attention import flex_mask, shape_of  # benchmarks/attention.py, beside this script
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention
from vmoba import (  # benchmarks/vmoba.py: its part 1 capture and small helpers
    REFERENCE,
    Attention,
    capture_reference,
    fmt,
    free_memory,
    make_clock,
    rel_error,
    run_meta,
)

from vgen import VideoPipeline
from vgen.attention import BlockMask, PSAConfig, RectifiedConfig, VideoLayout, create_method
from vgen.cli import _held_out_captions
from vgen.kernels import block_sparse_attention, curve_order, dense_attention, permute_tokens
from vgen.pipelines.quality import quality_report

FLEX_TOLERANCE = 2e-2  # relative error between Flex (or vgen's kernel) and the plain variant above which: MISMATCH
TARGET_EXTRA = 15.0  # percent extra attention time over the plain variant
PLAIN_PSA = (1.0, 0.0, 0.0, 0.0)  # psa's plain variant: full-resolution pairs only
PLAIN_RECTIFIED = {"rectify_kept": False, "compensate_dropped": False}


@dataclass(frozen=True)
class QualityRun:
    """Part 3: one method, its setting and its plain variant's, and the generation settings."""

    method: str
    config: dict[str, Any]
    plain: dict[str, Any]
    generate: dict[str, Any]


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    device: torch.device
    dtype: torch.dtype
    clip: tuple[int, int, int]  # part 1: frames, height, width in pixels
    real_layers: int | None  # part 1: the first n layers (None: all)
    real_heads: int | None  # part 1: the first n heads of each (None: all)
    rectified: dict[str, Any]  # parts 1-2: rectified settings besides mass and the two switches
    psa: dict[str, Any]  # parts 1-2: psa settings besides budget and proportions
    masses: tuple[float, ...]
    budgets: tuple[float, ...]
    shapes: tuple[tuple[str, int, int, VideoLayout], ...]  # part 2: (name, heads, head_dim, grid)
    shape_mass: float
    shape_budget: float
    quality_prompts: int  # part 3
    quality: tuple[QualityRun, ...]


# parts 2 and 3 and the verdict measure each method at its default selection size
DEFAULT_MASS = RectifiedConfig().mass
DEFAULT_BUDGET = PSAConfig().budget


def with_default(values: tuple[float, ...], default: float) -> tuple[float, ...]:
    """``values`` with the method's default among them, in ascending order."""
    return tuple(sorted({*values, default}))


def gpu_sizes() -> Sizes:
    generate = {"num_frames": 33, "height": 256, "width": 256, "num_inference_steps": 20}
    return Sizes(
        device=torch.device("cuda"), dtype=torch.bfloat16, clip=(81, 240, 416), real_layers=None, real_heads=None,
        rectified={},
        psa={}, masses=with_default((0.5, 0.7, 0.9), DEFAULT_MASS),
        budgets=with_default((0.1, 0.2, 0.3), DEFAULT_BUDGET),
        shapes=tuple((name, *shape_of(name)) for name in ("wan1.3b-480p", "wan14b-720p")),
        shape_mass=DEFAULT_MASS, shape_budget=DEFAULT_BUDGET, quality_prompts=3,
        quality=(
            QualityRun("rectified", {"mass": DEFAULT_MASS}, {"mass": DEFAULT_MASS, **PLAIN_RECTIFIED}, generate),
            QualityRun("psa", {"budget": DEFAULT_BUDGET}, {"budget": DEFAULT_BUDGET, "proportions": PLAIN_PSA},
                       generate),
        ),
    )  # fmt: skip


def smoke_sizes() -> Sizes:
    # psa needs 128-token blocks: 9 x 128 x 128 pixels -> 3 x 16 x 16 = 768 tokens, six blocks
    # part 3: psa only (the interpreted kernels of rectified's 16-token blocks would take minutes more), on
    # 9 x 64 x 128 pixels -> 3 x 8 x 16 = 384 tokens (three 128-token blocks), 1 step, no classifier-free guidance
    psa_grid = {"num_frames": 9, "height": 64, "width": 128, "num_inference_steps": 1, "guidance_scale": 1.0}
    return Sizes(
        device=torch.device("cpu"), dtype=torch.float32, clip=(9, 128, 128), real_layers=1, real_heads=2,
        rectified={},
        psa={}, masses=with_default((0.5, 0.7, 0.9), DEFAULT_MASS),
        budgets=with_default((0.1, 0.2, 0.3), DEFAULT_BUDGET), shapes=(("tiny", 2, 32, VideoLayout(3, 16, 16)),),
        shape_mass=DEFAULT_MASS, shape_budget=DEFAULT_BUDGET, quality_prompts=1,
        quality=(QualityRun("psa", {"budget": DEFAULT_BUDGET}, {"budget": DEFAULT_BUDGET, "proportions": PLAIN_PSA},
                            psa_grid),),
    )  # fmt: skip


def rectified_variants(mass: float, base: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("plain", {**base, "mass": mass, **PLAIN_RECTIFIED}),
        ("pooled", {**base, "mass": mass, "rectify_kept": True}),
        ("rectified", {**base, "mass": mass}),
    ]


def psa_variants(budget: float, base: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("plain", {**base, "budget": budget, "proportions": PLAIN_PSA}), ("psa", {**base, "budget": budget})]


# ---------------------------------------------------------------------------------------- helpers


def extra(ms: float | None, plain_ms: float | None) -> float | None:
    """Percent extra time of ``ms`` over ``plain_ms``."""
    return None if ms is None or plain_ms is None else 100.0 * (ms / plain_ms - 1.0)


def mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows]
    return None if any(v is None for v in values) else statistics.fmean(values)


def yes_no(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "**no**")


def prepare(call: Attention, clock, cuda: bool, reference: bool) -> None:
    """The fp32 dense output (the error reference, when ``reference``) and, on CUDA, the cuDNN SDPA time."""
    with torch.no_grad():
        if reference:
            call.dense = dense_attention(call.q.float(), call.k.float(), call.v.float(), scale=call.scale)
        if cuda:
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (call.q, call.k, call.v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                call.cudnn_ms = clock(lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=call.scale))


def run_variant(name: str, config: dict[str, Any], call: Attention, clock) -> tuple[dict[str, Any], Any, torch.Tensor]:
    """(density, relative error, ms) of one method setting on one call; the method and its output."""
    method = create_method(name, **config)
    result: dict[str, torch.Tensor] = {}

    def fn() -> None:
        result["out"] = method(call.q, call.k, call.v, layout=call.layout, step=0, layer=call.layer, scale=call.scale)

    with torch.no_grad():
        ms = clock(fn)  # on CUDA do_bench calls fn many times; its outputs are the same each time
    out = result.pop("out")
    error = None if call.dense is None else rel_error(out, call.dense)
    return {"density": float(method.last_density), "rel_error": error, "ms": ms}, method, out


def same_mask(q, k, v, mask: BlockMask, scale: float, plain_out: torch.Tensor, clock, flex) -> dict[str, Any]:
    """vgen's block-sparse kernel and Flex with the plain variant's mask; their agreement with its output."""
    with torch.no_grad():
        result: dict[str, torch.Tensor] = {}

        def kernel() -> None:
            result["out"] = block_sparse_attention(q, k, v, mask, scale=scale)

        row = {"kernel_ms": clock(kernel), "kernel_rel_error": rel_error(result.pop("out"), plain_out)}
        fmask = flex_mask(mask)
        row["flex_mask_matches"] = torch.equal(fmask.to_dense().bool(), mask.to_dense())
        row["flex_ms"] = row["flex_rel_error"] = None
        if flex is not None:
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            flex_out = flex(qt, kt, vt, block_mask=fmask, scale=scale).transpose(1, 2)
            row["flex_rel_error"] = rel_error(flex_out, plain_out)
            del flex_out
            row["flex_ms"] = clock(lambda: flex(qt, kt, vt, block_mask=fmask, scale=scale))
    for key in ("kernel_rel_error", "flex_rel_error"):
        if row[key] is not None and row[key] > FLEX_TOLERANCE:
            print(f"warning: {key} {row[key]:.2e} against the plain variant", flush=True)
    if not row["flex_mask_matches"]:
        print("warning: the Flex mask differs from vgen's", flush=True)
    return row


def measure_rectified(call: Attention, mass: float, base: dict[str, Any], clock, flex) -> dict[str, Any]:
    row: dict[str, Any] = {"layer": call.layer, "mass": mass}
    for label, config in rectified_variants(mass, base):
        stats, method, out = run_variant("rectified", config, call, clock)
        row.update({f"{label}_{key}": value for key, value in stats.items()})
        if label == "plain":
            mask, plain_out = method.last_mask, out
        del out
    scale = call.q.shape[-1] ** -0.5 if call.scale is None else call.scale
    row.update(same_mask(call.q, call.k, call.v, mask, scale, plain_out, clock, flex))
    row["cudnn_ms"] = call.cudnn_ms
    row["pooled_extra_pct"] = extra(row["pooled_ms"], row["plain_ms"])
    row["rectified_extra_pct"] = extra(row["rectified_ms"], row["plain_ms"])
    return row


def measure_psa(call: Attention, budget: float, base: dict[str, Any], clock, flex) -> dict[str, Any]:
    row: dict[str, Any] = {"layer": call.layer, "budget": budget}
    for label, config in psa_variants(budget, base):
        stats, method, out = run_variant("psa", config, call, clock)
        row.update({f"{label}_{key}": value for key, value in stats.items()})
        if label == "plain":
            plain, plain_out = method, out
        del out
    c = plain.config
    seq = call.layout.seq_len
    mask = BlockMask.from_dense(plain.last_levels > 0, (c.block_size, c.block_size), (seq, seq))
    q, k, v = call.q, call.k, call.v
    if c.order == "hilbert":  # the levels index blocks of the Hilbert-ordered tokens
        perm = curve_order(call.layout).to(q.device)
        q, k, v, plain_out = (permute_tokens(x, perm) for x in (q, k, v, plain_out))
    scale = q.shape[-1] ** -0.5 if call.scale is None else call.scale
    row.update(same_mask(q, k, v, mask, scale, plain_out, clock, flex))
    row["cudnn_ms"] = call.cudnn_ms
    row["psa_extra_pct"] = extra(row["psa_ms"], row["plain_ms"])
    return row


def summarise(rows: list[dict[str, Any]], key: str, labels: tuple[str, ...]) -> dict[str, Any]:
    """Means over layers; extra time from the mean times; error ratios against the plain variant."""
    summary: dict[str, Any] = {key: rows[0][key], "layers": len(rows)}
    for name in ("cudnn_ms", "kernel_ms", "flex_ms"):
        summary[name] = mean(rows, name)
    for label in labels:
        for name in ("density", "rel_error", "ms"):
            summary[f"{label}_{name}"] = mean(rows, f"{label}_{name}")
    for label in labels[1:]:
        summary[f"{label}_extra_pct"] = extra(summary[f"{label}_ms"], summary["plain_ms"])
        if summary["plain_rel_error"] is not None:
            summary[f"{label}_error_ratio"] = summary[f"{label}_rel_error"] / summary["plain_rel_error"]
            summary[f"{label}_layers_better"] = sum(r[f"{label}_rel_error"] < r["plain_rel_error"] for r in rows)
    summary[f"{labels[-1]}_extra_vs_kernel_pct"] = extra(summary[f"{labels[-1]}_ms"], summary["kernel_ms"])
    errors = [r["flex_rel_error"] for r in rows if r["flex_rel_error"] is not None]
    summary["flex_max_rel_error"] = max(errors) if errors else None
    summary["kernel_max_rel_error"] = max(r["kernel_rel_error"] for r in rows)
    return summary


# ---------------------------------------------------------------------------------------- part 1


def part_real(sizes: Sizes, clock, flex) -> dict[str, Any]:
    # capture_reference reads device, dtype and clip of vmoba's Sizes only
    calls, info = capture_reference(SimpleNamespace(device=sizes.device, dtype=sizes.dtype, clip=sizes.clip))
    free_memory()
    if sizes.real_layers is not None:
        calls = calls[: sizes.real_layers]
    if sizes.real_heads is not None:
        for call in calls:
            call.q, call.k, call.v = (x[:, :, : sizes.real_heads].contiguous() for x in (call.q, call.k, call.v))
    info["layers_measured"] = len(calls)
    info["heads_measured"] = calls[0].q.shape[2]
    info["rectified"] = {k: v for k, v in asdict(create_method("rectified", **sizes.rectified).config).items()
                         if k not in ("mass", "rectify_kept", "compensate_dropped")}  # fmt: skip
    info["psa"] = {k: v for k, v in asdict(create_method("psa", **sizes.psa).config).items()
                   if k not in ("budget", "proportions")}  # fmt: skip
    print(json.dumps(info, default=str), flush=True)
    cuda = sizes.device.type == "cuda"
    for call in calls:
        prepare(call, clock, cuda, reference=True)
    rectified_rows, psa_rows, rectified_summary, psa_summary = [], [], [], []
    for mass in sizes.masses:
        group = []
        for call in calls:
            group.append(measure_rectified(call, mass, sizes.rectified, clock, flex))
            print(json.dumps(group[-1]), flush=True)
        rectified_rows += group
        rectified_summary.append(summarise(group, "mass", ("plain", "pooled", "rectified")))
    for budget in sizes.budgets:
        group = []
        for call in calls:
            group.append(measure_psa(call, budget, sizes.psa, clock, flex))
            print(json.dumps(group[-1]), flush=True)
        psa_rows += group
        psa_summary.append(summarise(group, "budget", ("plain", "psa")))
    del calls
    free_memory()
    return {
        "info": info, "rectified_rows": rectified_rows, "rectified_summary": rectified_summary, "psa_rows": psa_rows,
        "psa_summary": psa_summary,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------- part 2


def part_shapes(sizes: Sizes, clock, flex) -> dict[str, Any]:
    rows = []
    cuda = sizes.device.type == "cuda"
    for name, heads, head_dim, layout in sizes.shapes:
        torch.manual_seed(0)
        q, k, v = (
            torch.randn(1, layout.seq_len, heads, head_dim, device=sizes.device, dtype=sizes.dtype) for _ in range(3)
        )
        call = Attention(q, k, v, layout, 0, None)
        prepare(call, clock, cuda, reference=False)
        shape = {"shape": name, "heads": heads, "head_dim": head_dim, "tokens": layout.seq_len}
        row = {**shape, "method": "rectified", "setting": f"mass {sizes.shape_mass}",
               **measure_rectified(call, sizes.shape_mass, sizes.rectified, clock, flex)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        free_memory()
        row = {**shape, "method": "psa", "setting": f"budget {sizes.shape_budget}",
               **measure_psa(call, sizes.shape_budget, sizes.psa, clock, flex)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        del call, q, k, v
        free_memory()
    return {"rectified": sizes.rectified, "psa": sizes.psa, "rows": rows}


# ---------------------------------------------------------------------------------------- part 3


def part_quality(sizes: Sizes) -> dict[str, Any]:
    started = time.perf_counter()
    pipe = VideoPipeline.from_pretrained(REFERENCE, torch_dtype=sizes.dtype, device=str(sizes.device))
    prompts = _held_out_captions(sizes.quality_prompts)
    info = {"load_s": time.perf_counter() - started, "prompts": prompts, "seeds": [0]}
    rows = []
    for run in sizes.quality:
        gen = run.generate
        grid = pipe.token_grid(gen["num_frames"], gen["height"], gen["width"])
        for variant, config in (("plain", run.plain), (run.method, run.config)):
            started = time.perf_counter()
            report = quality_report(pipe, run.method, config, prompts, [0], **gen)
            row = {
                "method": run.method, "variant": variant, "config": {k: v for k, v in config.items()},
                "generate": dict(gen), "grid": [grid.frames, grid.height, grid.width], "tokens": grid.seq_len,
                "density": report.density, "psnr": report.mean_psnr, "ssim": report.mean_ssim,
                "clip_psnr": [c.psnr for c in report.clips],
                "attention_rel_error": float(np.mean([c.rel_error for c in report.calls])),
                "adherence_dense": report.adherence("dense"), "adherence_method": report.adherence("method"),
                "seconds": time.perf_counter() - started,
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
            free_memory()
    del pipe
    return {"info": info, "rows": rows}


# ---------------------------------------------------------------------------------------- report


def flex_cell(value: float | None, error: float | None) -> str:
    return "MISMATCH" if error is not None and error > FLEX_TOLERANCE else fmt(value)


def pct(value: float | None) -> str:
    return fmt(value, "+.1f", "%")


def markdown(meta: dict[str, Any], results: dict[str, Any]) -> str:
    lines = [
        f"### Rectified SpaAttn and PSA against plain block-sparse, {meta['date']}, commit {meta['commit']}, "
        f"{meta['gpu']}", "",
        f"Command: `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}; {meta['dtype']}, B=1; "
        f"{meta['timing']}; {meta['seconds']} s in all. Plain variants keep each method's selection without "
        "its correction (rectified: `rectify_kept=False, compensate_dropped=False`; psa: "
        "`proportions=(1, 0, 0, 0)` at the same budget). *Extra* = method time / plain-variant time - 1 "
        f"(target <= {TARGET_EXTRA:.0f}%); *kernel* and *Flex* = vgen's block-sparse kernel and compiled "
        "FlexAttention with the plain variant's mask; *vs kernel* = method time / kernel time - 1.", "",
    ]  # fmt: skip
    if meta["smoke"]:
        lines += ["**Smoke run** (CPU, Triton interpreter, tiny sizes): checks the script, measures nothing.", ""]
    if "real" in results:
        real = results["real"]
        info = real["info"]
        rc, pc = info["rectified"], info["psa"]
        lines += [
            "#### 1. Real q/k/v: the reference model, one forward at sigma 0.5", "",
            f"Held-out clip \"{info['caption']}\", {'x'.join(map(str, info['pixels']))} pixels -> latents "
            f"{info['latents']} -> {'x'.join(map(str, info['grid']))} = {int(np.prod(info['grid'])):,} tokens; "
            f"timestep 500; {info['heads_measured']} of {info['heads']} heads x {info['head_dim']}; "
            f"{info['layers_measured']} of "
            f"{info['layers']} self-attention layers. rectified: blocks {rc['block_size']}, error_tolerance "
            f"{rc['error_tolerance']}; psa: blocks {pc['block_size']}, order {pc['order']}. Errors: relative to "
            "fp32 dense attention; means over layers.", "",
            "Rectified SpaAttn (the three variants share one selection, so one density):", "",
            "| mass | density | rel. error plain / pooled / rectified | error vs plain (pooled, rectified) | "
            "layers better than plain | plain ms | pooled ms | rectified ms | extra pooled | **extra rectified** "
            "| kernel ms | rectified vs kernel | cuDNN dense ms | Flex ms |",
            "|---" * 14 + "|",
        ]  # fmt: skip
        for s in real["rectified_summary"]:
            lines.append(
                f"| {s['mass']} | {s['plain_density']:.3f} | {s['plain_rel_error']:.2e} / "
                f"{s['pooled_rel_error']:.2e} / {s['rectified_rel_error']:.2e} | {s['pooled_error_ratio']:.2f}x, "
                f"{s['rectified_error_ratio']:.2f}x | {s['pooled_layers_better']}, {s['rectified_layers_better']} "
                f"of {s['layers']} | {fmt(s['plain_ms'])} | {fmt(s['pooled_ms'])} | {fmt(s['rectified_ms'])} | "
                f"{pct(s['pooled_extra_pct'])} | {pct(s['rectified_extra_pct'])} | {fmt(s['kernel_ms'])} | "
                f"{pct(s['rectified_extra_vs_kernel_pct'])} | "
                f"{fmt(s['cudnn_ms'])} | {flex_cell(s['flex_ms'], s['flex_max_rel_error'])} |"
            )
        lines += [
            "",
            "PSA (density: the compute used, as a fraction of dense):",
            "",
            "| budget | density plain / psa | rel. error plain / psa | error vs plain | layers better than plain | "
            "plain ms | psa ms | **extra psa** | kernel ms | psa vs kernel | cuDNN dense ms | Flex ms |",
            "|---" * 12 + "|",
        ]
        for s in real["psa_summary"]:
            lines.append(
                f"| {s['budget']} | {s['plain_density']:.3f} / {s['psa_density']:.3f} | {s['plain_rel_error']:.2e} "
                f"/ {s['psa_rel_error']:.2e} | {s['psa_error_ratio']:.2f}x | {s['psa_layers_better']} of "
                f"{s['layers']} | {fmt(s['plain_ms'])} | {fmt(s['psa_ms'])} | {pct(s['psa_extra_pct'])} | "
                f"{fmt(s['kernel_ms'])} | {pct(s['psa_extra_vs_kernel_pct'])} | {fmt(s['cudnn_ms'])} | "
                f"{flex_cell(s['flex_ms'], s['flex_max_rel_error'])} |"
            )
        masses = [s["mass"] for s in real["rectified_summary"]]
        budgets = [s["budget"] for s in real["psa_summary"]]
        lines += [
            "",
            "Per layer: rel. error plain -> corrected (rectified: full rectified; psa: psa).",
            "",
            "| layer | " + " | ".join(f"rectified mass {m}" for m in masses) + " | "
            + " | ".join(f"psa budget {b}" for b in budgets) + " |",
            "|---" * (1 + len(masses) + len(budgets)) + "|",
        ]  # fmt: skip
        by_layer: dict[int, list[str]] = {}
        for r in real["rectified_rows"]:
            by_layer.setdefault(r["layer"], []).append(f"{r['plain_rel_error']:.1e} -> {r['rectified_rel_error']:.1e}")
        for r in real["psa_rows"]:
            by_layer.setdefault(r["layer"], []).append(f"{r['plain_rel_error']:.1e} -> {r['psa_rel_error']:.1e}")
        lines += [f"| {layer} | " + " | ".join(cells) + " |" for layer, cells in sorted(by_layer.items())]
        lines.append("")
    if "shapes" in results:
        lines += [
            "#### 2. Wan shapes, random q/k/v (times)", "",
            "Random queries and keys give near-uniform pooled scores: rectified keeps about `mass` of the "
            "blocks, and the errors say little; the times are the point.", "",
            "| shape | heads x dim, tokens | method | density plain / method | plain ms | method ms | **extra** | "
            "kernel ms | method vs kernel | cuDNN dense ms | Flex ms | method vs cuDNN | method vs Flex |",
            "|---" * 13 + "|",
        ]  # fmt: skip
        for r in results["shapes"]["rows"]:
            name = r["method"]
            method_ms = r[f"{name}_ms"]
            flex_speed = fmt(None if r["flex_ms"] is None else r["flex_ms"] / method_ms, ".2f", "x")
            if r["flex_rel_error"] is not None and r["flex_rel_error"] > FLEX_TOLERANCE:
                flex_speed = "MISMATCH"
            lines.append(
                f"| {r['shape']} | {r['heads']} x {r['head_dim']}, {r['tokens']:,} | {name} {r['setting']} | "
                f"{r['plain_density']:.3f} / {r[f'{name}_density']:.3f} | {fmt(r['plain_ms'])} | {fmt(method_ms)} | "
                f"{pct(r[f'{name}_extra_pct'])} | {fmt(r['kernel_ms'])} | {pct(extra(method_ms, r['kernel_ms']))} | "
                f"{fmt(r['cudnn_ms'])} | "
                f"{flex_cell(r['flex_ms'], r['flex_rel_error'])} | "
                f"{fmt(None if r['cudnn_ms'] is None else r['cudnn_ms'] / method_ms, '.2f', 'x')} | {flex_speed} |"
            )
        lines.append("")
    if "quality" in results:
        quality = results["quality"]
        lines += [
            "#### 3. Video quality on the reference model (`quality_report`, against dense generations)", "",
            f"Held-out captions: {len(quality['info']['prompts'])}, seed 0. Density and attention error: means over "
            "every self-attention call (layers, steps, clips).", "",
            "| method | variant | config | pixels (frames x h x w), steps[, guidance] | tokens | density | PSNR dB | "
            "SSIM | attention rel. error | adherence dense / method | wall s |",
            "|---" * 11 + "|",
        ]  # fmt: skip
        for r in quality["rows"]:
            g = r["generate"]
            config = ", ".join(f"{k}={v}" for k, v in r["config"].items())
            guidance = f", {g['guidance_scale']}" if "guidance_scale" in g else ""
            adherence = " / ".join("-" if a is None else f"{a:.0%}" for a in (r["adherence_dense"],
                                                                               r["adherence_method"]))  # fmt: skip
            lines.append(
                f"| {r['method']} | {r['variant']} | {config} | {g['num_frames']}x{g['height']}x{g['width']}, "
                f"{g['num_inference_steps']}{guidance} | {r['tokens']:,} | {r['density']:.3f} | {r['psnr']:.2f} | "
                f"{r['ssim']:.4f} | {r['attention_rel_error']:.2e} | {adherence} | {r['seconds']:.1f} |"
            )
        lines += ["", "Prompts: " + "; ".join(f'"{p}"' for p in quality["info"]["prompts"]) + ".", ""]
    verdicts = verdict(results)
    if verdicts:
        lines += [f"#### Against the target (higher PSNR than plain, <= {TARGET_EXTRA:.0f}% extra time)", ""]
        lines += ["| method | PSNR plain -> method (part 3) | higher | extra time, real q/k/v (part 1) | "
                  "extra time, Wan shapes (part 2) | within target |", "|---|---|---|---|---|---|"]  # fmt: skip
        lines += verdicts + [""]
    return "\n".join(lines)


def verdict(results: dict[str, Any]) -> list[str]:
    """One line per method: part 3's PSNR against plain, the extra times of parts 1 and 2 at its setting."""
    rows = []
    for name, key, setting in (("rectified", "mass", DEFAULT_MASS), ("psa", "budget", DEFAULT_BUDGET)):
        psnr_text, higher, times = "n/a", None, []
        by_variant = {r["variant"]: r for r in results.get("quality", {}).get("rows", []) if r["method"] == name}
        if by_variant:
            plain, method = by_variant["plain"]["psnr"], by_variant[name]["psnr"]
            clips = list(zip(by_variant["plain"]["clip_psnr"], by_variant[name]["clip_psnr"], strict=True))
            better = sum(m > p for p, m in clips)
            psnr_text = f"{plain:.2f} -> {method:.2f} (higher in {better} of {len(clips)} clips)"
            higher = method > plain
            setting = by_variant[name]["config"].get(key, setting)  # the times at part 3's setting
        real_text = shape_text = "n/a"
        if "real" in results:
            summary = next((s for s in results["real"][f"{name}_summary"] if s[key] == setting), None)
            if summary is not None and summary[f"{name}_extra_pct"] is not None:
                times.append(summary[f"{name}_extra_pct"])
                real_text = f"{pct(times[-1])} ({key} {setting})"
        if "shapes" in results:
            values = [r[f"{name}_extra_pct"] for r in results["shapes"]["rows"] if r["method"] == name
                      and r.get(key, setting) == setting]
            if values and all(v is not None for v in values):
                times += values
                shape_text = ", ".join(pct(v) for v in values)
        fast = all(t <= TARGET_EXTRA for t in times) if times else None
        if higher is None:  # no quality part: the time half of the target only
            within = "n/a" if fast is None else f"time only: {yes_no(fast)}"
        elif fast is None:  # no time at this setting: the quality half only
            within = f"PSNR only: {yes_no(higher)}"
        else:
            within = yes_no(higher and fast is not False)
        rows.append(f"| {name} | {psnr_text} | {yes_no(higher)} | {real_text} | {shape_text} | {within} |")
    return rows


# settings of the selection's size: they go to the plain variant too, so that both keep one density
SHARED_SETTINGS = {("rectified", "mass"), ("psa", "budget")}


def quality_runs(runs: tuple[QualityRun, ...], methods: list[str] | None, settings: list[str]) -> tuple:
    """Part 3's runs, narrowed to ``methods`` and with ``METHOD.KEY=VALUE`` settings (JSON values, or strings);
    rectified.mass and psa.budget apply to the plain variant as well (SHARED_SETTINGS)."""
    runs = tuple(r for r in runs if methods is None or r.method in methods)
    for item in settings:
        name, _, value = item.partition("=")
        method, _, key = name.partition(".")
        if not key or not value or method not in {r.method for r in runs}:
            sys.exit(f"--set takes METHOD.KEY=VALUE for a method of part 3, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        shared = (method, key) in SHARED_SETTINGS
        runs = tuple(dataclasses.replace(r, config={**r.config, key: parsed},
                                         plain={**r.plain, key: parsed} if shared else r.plain)
                     if r.method == method else r for r in runs)  # fmt: skip
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the Markdown here (and a .json beside it)")
    parser.add_argument("--parts", default="1,2,3", help="comma-separated parts to run (default 1,2,3)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--captions", type=int, help="part 3: held-out captions (default 3; 1 with --smoke)")
    parser.add_argument("--quality-methods", nargs="+", choices=("rectified", "psa"),
                        help="part 3: only these methods (default: both)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="part 3: a setting of the method's variant (not its plain one, except the selection "
                             "sizes rectified.mass and psa.budget), e.g. rectified.spread_shift=true; repeatable")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    if not parts <= {1, 2, 3}:
        sys.exit(f"--parts takes numbers from 1 to 3, got {args.parts!r}")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/rectified_psa.py needs a CUDA GPU (or --smoke for a CPU check)")
    sizes = smoke_sizes() if args.smoke else gpu_sizes()
    if args.captions is not None:
        if args.captions < 1:
            sys.exit(f"--captions must be >= 1, got {args.captions}")
        sizes = dataclasses.replace(sizes, quality_prompts=args.captions)
    sizes = dataclasses.replace(sizes, quality=quality_runs(sizes.quality, args.quality_methods, args.set))
    cuda = sizes.device.type == "cuda"
    meta = run_meta(sizes.device, sizes.dtype, args.smoke, parts, "kernel times are do_bench medians in ms")
    print(json.dumps(meta), flush=True)
    clock: Callable[[Callable[[], Any]], float] = make_clock(sizes.device)
    flex = torch.compile(flex_attention, dynamic=False) if cuda else None
    torch.manual_seed(0)
    results: dict[str, Any] = {}
    text = ""
    started = time.perf_counter()
    runs = {
        1: ("real", lambda: part_real(sizes, clock, flex)),
        2: ("shapes", lambda: part_shapes(sizes, clock, flex)),
        3: ("quality", lambda: part_quality(sizes)),
    }
    for part in sorted(parts):
        key, run = runs[part]
        part_started = time.perf_counter()
        results[key] = run()
        meta[f"part{part}_s"] = round(time.perf_counter() - part_started, 1)
        meta["seconds"] = round(time.perf_counter() - started, 1)
        print(f"part {part}: {meta[f'part{part}_s']} s", flush=True)
        free_memory()
        text = markdown(meta, results)
        if args.out:  # after every part, so that a run cut short keeps the parts it finished
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
            args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, **results}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
