"""Block-sparse attention against SDPA (cuDNN, flash), FlexAttention and xformers on one GPU.

    python benchmarks/attention.py --out benchmarks/results/attention.md [--sweep]

For each shape (full-size presets from vgen/configs/shapes.yaml) and each density, with a
random and a local-3D block mask, it times the forward and forward+backward of vgen's kernel
and of FlexAttention with the identical mask, and the dense SDPA backends, in one process
(triton.testing.do_bench medians, bf16, B=1). Each mask is checked against FlexAttention
before timing: a row whose outputs disagree prints MISMATCH instead of a speedup.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
from torch.nn.attention.flex_attention import flex_attention

from vgen.attention import VideoLayout
from vgen.attention.block_mask import BlockMask, _window_mask, local_window_mask
from vgen.configs import load_shape
from vgen.kernels import block_sparse
from vgen.kernels.block_sparse import block_sparse_attention

DENSITIES = (1.0, 0.5, 0.25, 0.1)
BLOCK = 128


def commit_id() -> str:
    """The commit a benchmark records: ``VGEN_COMMIT`` (a device copy has no git), else git's short hash, else
    "unknown"."""
    return os.environ.get("VGEN_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip() or "unknown"


def ab_meta(flag: str, rounds: int) -> dict:
    """The header facts of an A/B report (`ab_forward.py`, `ab_backward.py`): date, commit, GPU, versions, command."""
    import triton

    return {"date": datetime.date.today().isoformat(), "commit": commit_id(), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "command": "python " + " ".join(sys.argv),
            "rounds": rounds, "flag": flag}  # fmt: skip


_SETTING_VALUES = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False, "none": None,
                   "auto": None}


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """``--set NAME=VALUE`` (repeatable): a boolean or auto (None) setting of vgen.kernels.block_sparse."""
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="set a boolean setting of vgen.kernels.block_sparse before timing, e.g. INDEX_EARLY=1 "
                             "(values 1/0/true/false/none)")  # fmt: skip


def apply_settings(parser: argparse.ArgumentParser, pairs: list[str]) -> dict:
    """Apply ``--set`` pairs to vgen.kernels.block_sparse; a bad name or value is a parser error naming it."""
    applied = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or value.lower() not in _SETTING_VALUES:
            parser.error(f"--set takes NAME=VALUE with VALUE one of {sorted(_SETTING_VALUES)}, got {pair!r}")
        if not hasattr(block_sparse, name) or not isinstance(getattr(block_sparse, name), bool | None):
            parser.error(f"--set must name a boolean setting of vgen.kernels.block_sparse, got {name!r}")
        setattr(block_sparse, name, _SETTING_VALUES[value.lower()])
        applied[name] = _SETTING_VALUES[value.lower()]
    return applied


def write_report(out: Path | None, text: str, meta: dict, rows: list[dict]) -> None:
    """Print the Markdown; with ``out``, write it there and the raw rows beside it as .json."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def bench(fn, calls: int = 8) -> float:
    """Median ms over at least 100 ms and at least ``calls`` calls (do_bench alone gives a 14B-sized call one
    sample)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end)
    return triton.testing.do_bench(fn, warmup=max(25, 2 * once), rep=max(100, calls * once), return_mode="median")


def paired(fn_a, fn_b, rounds: int = 3, calls: int = 8) -> tuple[float, float]:
    """Medians of ``bench(fn_a)`` and ``bench(fn_b)`` taken in turns (a, b, a, b, ...), so that a drift of
    the GPU's speed over the run (clocks under sustained load) weighs on both alike."""
    a, b = [], []
    for _ in range(rounds):
        a.append(bench(fn_a, calls))
        b.append(bench(fn_b, calls))
    return statistics.median(a), statistics.median(b)


def build_times(build, n: int = 200) -> tuple[float, float]:
    """(GPU ms, host ms) per call of ``build``, a mask build of one small kernel launch.

    do_bench times a call from its start event to its end event; for a call this small that is mostly
    the host's launch work with the GPU idle. Here the GPU is first held busy (torch.cuda._sleep) for
    longer than the host takes to enqueue ``n`` builds, so the events around them measure the builds'
    own GPU time back to back; the host's time per build is measured beside it.
    """
    build()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        build()
    torch.cuda.synchronize()
    host = (time.perf_counter() - t0) * 1000 / n
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    hold = n * host + 5  # ms of GPU sleep (cycles at 2 GHz; H200 clocks are lower, so at least this long)
    torch.cuda._sleep(int(2e6 * hold))
    t0 = time.perf_counter()
    start.record()
    for _ in range(n):
        build()
    end.record()
    enqueue = (time.perf_counter() - t0) * 1000
    torch.cuda.synchronize()
    gpu = start.elapsed_time(end) / n
    if enqueue > hold:  # the sleep may have run out before the last build was enqueued: flag it, not hide it
        print(f"build_times: enqueueing took {enqueue:.2f} ms; the GPU figure may include host gaps", flush=True)
    return gpu, host


def shape_of(name: str) -> tuple[int, int, VideoLayout]:
    preset = load_shape(name)
    cfg, clip, vae = preset["config"], preset["clip"], preset["vae"]
    patch = cfg["patch_size"][1] if isinstance(cfg["patch_size"], list) else cfg["patch_size"]
    grid = VideoLayout((clip["num_frames"] - 1) // vae["temporal"] + 1, clip["height"] // (vae["spatial"] * patch),
                       clip["width"] // (vae["spatial"] * patch))
    return cfg["num_attention_heads"], cfg["attention_head_dim"], grid


def random_mask(heads: int, seq: int, density: float, device) -> BlockMask:
    blocks = triton.cdiv(seq, BLOCK)
    keep = max(1, round(density * blocks))
    scores = torch.rand(1, heads, blocks, blocks, device=device)
    dense = scores >= scores.topk(keep, dim=-1).values[..., -1:]
    return BlockMask.from_dense(dense, block_size=(BLOCK, BLOCK), seq_lens=(seq, seq))


def local_mask(grid: VideoLayout, density: float, device) -> tuple[BlockMask, tuple[int, int, int]]:
    """The local-3D window whose block density is closest to ``density`` (bisection on its scale)."""
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(14):
        r = (lo + hi) / 2
        window = tuple(max(0, round(r * n)) for n in (grid.frames, grid.height, grid.width))
        mask = local_window_mask(grid, window, block_size=(BLOCK, BLOCK), device=device)
        d = mask.density()
        if best is None or abs(d - density) < abs(best[0] - density):
            best = (d, mask, window)
        lo, hi = (r, hi) if d < density else (lo, r)
    return best[1], best[2]


def flex_mask(mask: BlockMask) -> FlexBlockMask:
    """The same blocks as a FlexAttention BlockMask, all marked full (no mask_mod work)."""
    zeros = torch.zeros_like(mask.kv_num_blocks)
    return FlexBlockMask.from_kv_blocks(
        zeros, mask.kv_indices, mask.kv_num_blocks, mask.kv_indices, BLOCK_SIZE=mask.block_size,
        seq_lengths=mask.seq_lens,
    )


def err_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).square().mean().sqrt() / b.float().square().mean().sqrt()).item()


def fwd_bwd(fn, inputs, grad):
    def run():
        for x in inputs:
            x.grad = None
        fn().backward(grad)

    return run


SWEEP_CASES = (("wan1.3b-480p", 1.0), ("wan1.3b-480p", 0.25), ("wan1.3b-480p", 0.1), ("wan14b-720p", 0.5))


def sweep(device) -> list[dict]:
    """Time candidate forward variants (tiles, TMA) on random masks at SWEEP_CASES; keep the one with the
    lowest summed time relative to the first candidate (so the 14B case weighs as much as each 1.3B one)."""
    # (BLOCK_M, BLOCK_N, warps, stages), TMA. Triton 3.6 ignores warp_specialize on Hopper (same SASS), so those
    # candidates are gone. 64-row tiles at 4 warps and 64-key tiles fit two programs per SM (115 KB of shared
    # memory each): while one waits on its QK^T product, the other's softmax runs, the overlap one 128-row
    # program at 8 warps cannot get. (64, 64, 4, 3) was 6-11% slower than the default at 93e1ed2, the other 64-row
    # or 64-key tiles slower still. Host-built descriptors and a persistent forward lost (see block_sparse.py).
    candidates = [((128, 128, 8, 3), True), ((128, 128, 8, 2), True), ((128, 128, 8, 3), False)]
    cases = []
    for name, density in SWEEP_CASES:
        heads, head_dim, grid = shape_of(name)
        seq = grid.num_video_tokens
        q, k, v = (torch.randn(1, seq, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        cases.append((f"{name} d{density}", q, k, v, random_mask(heads, seq, density, device)))
    rows = []
    best = None
    reference = {}
    for tiles, tma in candidates:
        block_sparse.CUDA_TILES["fwd"], block_sparse.USE_TMA = tiles, tma
        try:
            with torch.no_grad():
                # every candidate must agree with the first before its time counts
                for label, q, k, v, m in cases:
                    out = block_sparse_attention(q, k, v, m)
                    if label not in reference:
                        reference[label] = out
                    elif err_ratio(out, reference[label]) > 1e-2:
                        raise RuntimeError(f"output differs from the first candidate's at {label}")
                    del out
                times = {label: bench(lambda q=q, k=k, v=v, m=m: block_sparse_attention(q, k, v, m))
                         for label, q, k, v, m in cases}
        except Exception as err:  # a variant the compiler rejects on this GPU, or a wrong one
            error = str(err).splitlines()[0][:120]
            rows.append({"kernel": "fwd", "tiles": tiles, "tma": tma, "error": error})
            continue
        rows.append({"kernel": "fwd", "tiles": tiles, "tma": tma, "ms": times})
        print(json.dumps(rows[-1]), flush=True)
        score = sum(t / rows[0]["ms"][label] for label, t in times.items()) if "ms" in rows[0] else 0.0
        if best is None or score < best[0]:
            best = (score, tiles, tma)
    block_sparse.CUDA_TILES["fwd"], block_sparse.USE_TMA = best[1:3]
    del cases, reference
    torch.cuda.empty_cache()
    return rows


# Backward tiles per kernel, (BLOCK_M, BLOCK_N, warps, stages); the first is the library default. Per ptxas for
# sm_90a (Triton 3.6) the default dK/dV tiles spill about 400 B; 32 query rows spill about 130 B.
BWD_CANDIDATES = {"dkdv": [(64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2)],
                  "dq": [(128, 128, 8, 2), (128, 64, 8, 2)],
                  # dK/dV with dQ by TMA reduce-add in the same kernel (block_sparse.FUSED_DQ)
                  "fused": [(64, 128, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2)]}
BWD_CASES = (1.0, 0.25)  # densities of random masks at the wan1.3b-480p shape
GRAD_TOLERANCE = 2e-2  # a backward variant's gradients against the first variant's: max |diff| / max |ref|


def sweep_backward(device) -> list[dict]:
    """Time forward+backward with each backward kernel's candidate tiles at the 1.3B shape: the two-kernel
    backward (dK/dV first, then dQ, one kernel varied at a time), then the fused one; keep the fastest of each
    kernel, and the fused backward (``FUSED_DQ``) if its best beats the best two-kernel one. A variant whose
    gradients differ from the first variant's by more than GRAD_TOLERANCE is rejected."""
    heads, head_dim, grid = shape_of("wan1.3b-480p")
    seq = grid.num_video_tokens
    q, k, v = (torch.randn(1, seq, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    masks = [random_mask(heads, seq, d, device) for d in BWD_CASES]
    reference = None  # the first variant's gradients at the last mask

    def gradients_differ() -> float:
        nonlocal reference
        for x in (q, k, v):
            x.grad = None
        block_sparse_attention(q, k, v, masks[-1]).backward(grad)
        grads = [x.grad.float() for x in (q, k, v)]
        if reference is None:
            reference = grads
        return max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, reference, strict=True))

    rows = []
    best_total = {}
    for kind, candidates in BWD_CANDIDATES.items():
        block_sparse.FUSED_DQ = kind == "fused"
        best = None
        for tiles in candidates:
            block_sparse.CUDA_TILES[kind] = tiles
            try:
                error = gradients_differ()
                times = [bench(fwd_bwd(lambda m=m: block_sparse_attention(q, k, v, m), (q, k, v), grad), calls=10)
                         for m in masks]
            except Exception as err:  # a variant the compiler rejects on this GPU
                rows.append({"kernel": kind, "tiles": tiles, "error": str(err).splitlines()[0][:120]})
                continue
            if error > GRAD_TOLERANCE:
                rows.append({"kernel": kind, "tiles": tiles, "error": f"gradients differ: {error:.1e}"})
                continue
            rows.append({"kernel": kind, "tiles": tiles, "ms": dict(zip(map(str, BWD_CASES), times, strict=True)),
                         "grad_error": error})
            print(json.dumps(rows[-1]), flush=True)
            if best is None or sum(times) < best[0]:
                best = (sum(times), tiles)
        if best is not None:
            block_sparse.CUDA_TILES[kind] = best[1]
            best_total[kind] = best[0]
    # the two-kernel total is its dQ sweep's best (measured with the best dK/dV tiles)
    block_sparse.FUSED_DQ = "fused" in best_total and best_total["fused"] < best_total.get("dq", float("inf"))
    return rows


def run_shape(name: str, device, xformers, forward_only: bool) -> tuple[list[dict], list[dict]]:
    heads, head_dim, grid = shape_of(name)
    seq = grid.num_video_tokens
    q, k, v = (torch.randn(1, seq, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    grad_t = grad.transpose(1, 2).contiguous()
    flex = torch.compile(flex_attention, dynamic=False)
    pair_flops = 4 * heads * head_dim  # QK^T and PV per kept (query, key) pair

    dense_rows = []
    for label, backend in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("SDPA flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            with torch.no_grad():
                t_f = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
            t_fb = float("nan") if forward_only else bench(
                fwd_bwd(lambda: F.scaled_dot_product_attention(qt, kt, vt), (qt, kt, vt), grad_t))
        dense_rows.append({"shape": name, "method": label, "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
                           "fwd_tflops": pair_flops * seq * seq / t_f / 1e9})
    if xformers is not None:
        with torch.no_grad():
            t_f = bench(lambda: xformers.ops.memory_efficient_attention(q, k, v))
        t_fb = float("nan") if forward_only else bench(
            fwd_bwd(lambda: xformers.ops.memory_efficient_attention(q, k, v), (q, k, v), grad))
        dense_rows.append({"shape": name, "method": "xformers mem-efficient", "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
                           "fwd_tflops": pair_flops * seq * seq / t_f / 1e9})

    rows = []
    ours_dense = None
    for kind in ("random", "local-3D"):
        for density in DENSITIES:
            window = None
            if density == 1.0:
                mask = BlockMask.full(1, 1, (seq, seq), (BLOCK, BLOCK), device)
            elif kind == "random":
                mask = random_mask(heads, seq, density, device)
            else:
                mask, window = local_mask(grid, density, device)
            actual = mask.density()
            fmask = flex_mask(mask)
            with torch.no_grad():
                ours_out = block_sparse_attention(q, k, v, mask)
                flex_out = flex(qt, kt, vt, block_mask=fmask).transpose(1, 2)
                err = err_ratio(ours_out, flex_out)
                t_ours, t_flex = paired(lambda m=mask: block_sparse_attention(q, k, v, m),
                                        lambda m=fmask: flex(qt, kt, vt, block_mask=m))  # fmt: skip
            if forward_only:
                t_ours_fb = t_flex_fb = float("nan")
            else:
                t_ours_fb, t_flex_fb = paired(
                    fwd_bwd(lambda m=mask: block_sparse_attention(q, k, v, m), (q, k, v), grad),
                    fwd_bwd(lambda m=fmask: flex(qt, kt, vt, block_mask=m), (qt, kt, vt), grad_t), rounds=2, calls=5)
            # the build itself (the cache bypassed), and a cached call as every later layer and step makes it
            t_build, t_build_host = (None, None) if window is None else build_times(
                lambda w=window: _window_mask.__wrapped__(grid, w, (BLOCK, BLOCK), device))
            t_cached = (bench(lambda w=window: local_window_mask(grid, w, block_size=(BLOCK, BLOCK), device=device))
                        if window is not None else None)
            if density == 1.0:
                ours_dense = t_ours
            kept = actual * seq * seq
            rows.append({
                "shape": name, "mask": kind, "density": actual, "window": window, "err_vs_flex": err,
                "ours_fwd_ms": t_ours, "flex_fwd_ms": t_flex, "ours_fwd_bwd_ms": t_ours_fb,
                "flex_fwd_bwd_ms": t_flex_fb, "ours_fwd_tflops": pair_flops * kept / t_ours / 1e9,
                "flex_fwd_tflops": pair_flops * kept / t_flex / 1e9,
                "ours_fwd_bwd_tflops": 3.5 * pair_flops * kept / t_ours_fb / 1e9,
                "linearity": t_ours / (actual * ours_dense), "mask_build_ms": t_build,
                "mask_build_host_ms": t_build_host, "mask_cached_ms": t_cached,
            })
            print(json.dumps(rows[-1]), flush=True)
    return dense_rows, rows


def variant_table(title: str, lead: list[str], timed: list[str], rows: list[dict], lead_cells, times) -> list[str]:
    """Markdown lines of a sweep's variants: each row's ``lead_cells``, then its ``times`` or its error."""
    lines = ["", title, "", "| " + " | ".join(lead + timed) + " |", "|" + "---|" * (len(lead) + len(timed))]
    for r in rows:
        cells = ([f"failed: {r['error']}"] + [""] * (len(timed) - 1) if "error" in r
                 else [f"{t:.2f}" for t in times(r)])
        lines.append("| " + " | ".join(lead_cells(r) + cells) + " |")
    return lines


def markdown(meta: dict, sweep_rows: list[dict], dense_rows: list[dict], rows: list[dict],
             bwd_rows: list[dict] | None = None) -> str:
    lines = [f"### Attention kernels, {meta['date']}, commit {meta['commit']}, {meta['gpu']}",
             "", f"Command: `{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}; bf16, B=1, "
             "head_dim 128, do_bench medians (vgen and Flex timed in turns, 3 rounds forward, 2 forward+backward, "
             "median of the rounds). TFLOP/s count kept work only (4·H·D per kept pair forward; "
             "x3.5 forward+backward).", ""]
    lines += ["| shape | dense method | fwd ms | fwd TFLOP/s | fwd+bwd ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['method']} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.2f} |"
              for r in dense_rows]
    lines += ["", "| shape | mask | density | vgen fwd ms | Flex fwd ms | **fwd speedup vs Flex** | vgen TFLOP/s | "
              "time / (density x vgen dense) | vgen fwd+bwd ms | Flex fwd+bwd ms | **fwd+bwd speedup** | "
              "**bwd speedup** (fwd+bwd - fwd) | "
              "mask build: GPU (% of vgen fwd); host | err vs Flex |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r["err_vs_flex"] < 2e-2
        speed = f"{r['flex_fwd_ms'] / r['ours_fwd_ms']:.2f}x" if ok else "MISMATCH"
        speed_fb = f"{r['flex_fwd_bwd_ms'] / r['ours_fwd_bwd_ms']:.2f}x" if ok else "MISMATCH"
        speed_b = (f"{(r['flex_fwd_bwd_ms'] - r['flex_fwd_ms']) / (r['ours_fwd_bwd_ms'] - r['ours_fwd_ms']):.2f}x"
                   if ok else "MISMATCH")
        build = (f"{1000 * r['mask_build_ms']:.1f} us ({100 * r['mask_build_ms'] / r['ours_fwd_ms']:.2f}%); host "
                 f"{1000 * r['mask_build_host_ms']:.0f} us; cached {1000 * r['mask_cached_ms']:.0f} us"
                 if r["mask_build_ms"] is not None else "-")
        lines.append(
            f"| {r['shape']} | {r['mask']} | {r['density']:.3f} | {r['ours_fwd_ms']:.2f} | {r['flex_fwd_ms']:.2f} | "
            f"{speed} | {r['ours_fwd_tflops']:.0f} | {r['linearity']:.2f} | {r['ours_fwd_bwd_ms']:.2f} | "
            f"{r['flex_fwd_bwd_ms']:.2f} | {speed_fb} | {speed_b} | {build} | {r['err_vs_flex']:.1e} |")
    if sweep_rows:
        labels = [f"{name} d{density}" for name, density in SWEEP_CASES]
        lines += variant_table(
            "Forward variants (random masks; the one with the lowest summed time relative to the first was used "
            "above):", ["kernel", "(BLOCK_M, BLOCK_N, warps, stages)", "TMA"],
            [f"ms {x}" for x in labels], sweep_rows,
            lambda r: [r["kernel"], str(r["tiles"]), str(r["tma"])],
            lambda r: [r["ms"][x] for x in labels])
    if bwd_rows:
        lines += variant_table(
            "Backward variants (wan1.3b-480p, random masks, forward+backward ms; one kernel varied at a time, the "
            "fastest of each was used above; \"fused\": dQ accumulated in the dK/dV kernel, used above if its best "
            "beat the best two-kernel time):", ["kernel", "(BLOCK_M, BLOCK_N, warps, stages)"],
            [f"ms at {d}" for d in BWD_CASES], bwd_rows, lambda r: [r["kernel"], str(r["tiles"])],
            lambda r: [r["ms"][str(d)] for d in BWD_CASES])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["wan1.3b-480p", "wan14b-720p"])
    parser.add_argument("--sweep", action="store_true", help="time forward variants first and use the fastest")
    parser.add_argument("--forward-only", action="store_true", help="skip the forward+backward timings")
    parser.add_argument("--sweep-backward", action="store_true",
                        help="time backward tile variants first and use the fastest of each kernel")
    parser.add_argument("--out", type=Path, help="write the Markdown table here (and a .json beside it)")
    add_set_option(parser)
    args = parser.parse_args()
    settings = apply_settings(parser, args.set)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    device = torch.device("cuda")
    try:
        import xformers.ops
    except ImportError:
        xformers = None
        print("xformers not installed: its row is left out", flush=True)
    meta = {"date": datetime.date.today().isoformat(), "commit": commit_id(),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "command": "python " + " ".join(sys.argv), "settings": settings}
    sweep_rows = []
    if args.sweep:
        sweep_rows = sweep(device)
        meta["tiles"] = dict(block_sparse.CUDA_TILES)
        meta["tma"] = block_sparse.USE_TMA
    bwd_rows = []
    if args.sweep_backward:
        bwd_rows = sweep_backward(device)
        meta["tiles"] = dict(block_sparse.CUDA_TILES)
        meta["fused_dq"] = block_sparse.FUSED_DQ
        torch.cuda.empty_cache()
    dense_rows, rows = [], []
    for name in args.shapes:
        d, r = run_shape(name, device, xformers, args.forward_only)
        dense_rows += d
        rows += r
    text = markdown(meta, sweep_rows, dense_rows, rows, bwd_rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"meta": meta, "sweep": sweep_rows, "sweep_backward": bwd_rows, "dense": dense_rows, "rows": rows},
            indent=1, default=str))


if __name__ == "__main__":
    main()
