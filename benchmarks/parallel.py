"""Context parallelism: the Wan transformer forward on 1 and on N GPUs, dense and vmoba, in one run.

    torchrun --nproc-per-node 2 benchmarks/parallel.py --out $OUT/parallel.md
    torchrun --nproc-per-node 2 benchmarks/parallel.py --ring --out $OUT/parallel-ring.md          # ring instead
    torchrun --nproc-per-node 2 benchmarks/parallel.py --smoke --out build/parallel.md   # CPU, gloo, tiny
    torchrun --nproc-per-node 2 benchmarks/parallel.py --ring --profile --shapes wan1.3b-720p --out $OUT/p.md

Every rank builds the same random-weight transformer (Wan2.1-1.3B config) and inputs. First rank 0
alone times the forward on one GPU (dense, then vmoba with its defaults), while the other ranks
wait; then :func:`vgen.parallel.enable_context_parallel` spreads the model over all ranks and the
same forwards are timed together (synchronised; rank 0's clock). Speedup = 1-GPU time / N-GPU
time; efficiency = speedup / N. The all-to-all cost is measured on its own (one layer moves q, k,
v and the output), and the table for 4 and 8 GPUs is a prediction: compute / N plus that cost
scaled to N (each rank sends (N - 1) / N of its shard), not a measurement; it models Ulysses, so
with ``--ring`` read only the measured columns.
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
import torch.distributed as dist

from vgen.parallel import enable_context_parallel, init_from_environment
from vgen.pipelines.plumbing import apply_sparse_attention, remove_sparse_attention, sparse_attention_method
from vgen.pipelines.speed import _latent_grid, _shape, build_shape_transformer, timer

SMOKE_SHAPE = {
    "name": "tiny-wan",
    "transformer": "WanTransformer3DModel",
    "config": {"patch_size": [1, 2, 2], "num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 4,
               "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2},
    "clip": {"num_frames": 9, "height": 64, "width": 64},
    "vae": {"temporal": 4, "spatial": 4},
    "text_tokens": 8,
}  # fmt: skip
SMOKE_VMOBA = {"block_size": (16, 16), "temporal_chunk": 1, "spatial_chunk": (4, 4), "cube_chunk": (2, 4, 4)}


def synced_seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - start


def profile_forward(fn, device: torch.device, rows: int) -> str:
    """torch.profiler's table of one call of ``fn`` on this rank: operators, kernels and collectives by total
    device time (CPU time without a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if dist.is_initialized():
        dist.barrier()
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (compilation, autotuning, caches)
    return statistics.median(synced_seconds(fn, device) for _ in range(repeats))


def all_to_all_seconds(tokens: int, heads: int, dim: int, device: torch.device, dtype: torch.dtype) -> float:
    """One all-to-all of a rank's [tokens / N, heads, dim] shard (what Ulysses does 4 times per layer)."""
    world = dist.get_world_size()
    shard = torch.randn(tokens // world * heads * dim, device=device, dtype=dtype)
    out = torch.empty_like(shard)
    return median_time(lambda: dist.all_to_all_single(out, shard), device, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["wan1.3b-480p", "wan1.3b-720p"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (gloo; TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, help="Markdown table here (rank 0), a .json beside it")
    parser.add_argument("--ring", action="store_true", help="ring attention over every rank instead of Ulysses")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one N-GPU forward per shape and method (torch.profiler; rank 0's "
                             "kernels and collectives by total time, in the report)")  # fmt: skip
    parser.add_argument("--profile-rows", type=int, default=25, help="rows of each profile table (default 25)")
    args = parser.parse_args()
    if not init_from_environment():
        sys.exit("launch with torchrun --nproc-per-node N (N >= 2)")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = [SMOKE_SHAPE] if args.smoke else args.shapes
    vmoba = SMOKE_VMOBA if args.smoke else {}
    rows = []
    profiles: list[tuple[str, str, str]] = []  # (shape, method, the profiler's table on this rank)
    for shape in shapes:
        name, preset = _shape(shape)
        torch.manual_seed(0)
        model = build_shape_transformer(preset, device, dtype)
        grid = _latent_grid(preset)
        generator = torch.Generator(device).manual_seed(0)
        inputs = {
            "hidden_states": torch.randn(1, model.config.in_channels, *grid, generator=generator, device=device,
                                         dtype=dtype),
            "timestep": torch.tensor([500.0], device=device),
            "encoder_hidden_states": torch.randn(1, preset["text_tokens"], model.config.text_dim, generator=generator,
                                                 device=device, dtype=dtype),
            "return_dict": False,
        }  # fmt: skip

        def forward(model=model, inputs=inputs) -> torch.Tensor:
            with torch.inference_mode():
                return model(**inputs)[0]

        single: dict[str, float] = {}
        densities: dict[str, float] = {}
        outputs: dict[str, torch.Tensor] = {}  # rank 0's one-GPU outputs, to compare with the N-GPU ones
        for method in ("dense", "vmoba"):  # one GPU: rank 0 alone, the others wait at the barrier
            if method == "vmoba":
                apply_sparse_attention(model, "vmoba", **vmoba)
            if rank == 0:
                outputs[method] = forward().float().cpu()
                alone = timer(device)  # this rank only: the others wait at the barrier below
                single[method] = statistics.median(alone(forward) for _ in range(args.repeats))
                instance = sparse_attention_method(model)
                densities[method] = 1.0 if instance is None else float(instance.last_density)
            dist.barrier()
            remove_sparse_attention(model)
        enable_context_parallel(model, ring=world if args.ring else 1)
        parallel: dict[str, float] = {}
        error: dict[str, float] = {}  # N GPUs against one: max |difference| / max |one-GPU output|
        for method in ("dense", "vmoba"):
            if method == "vmoba":
                apply_sparse_attention(model, "vmoba", **vmoba)
            spread = forward()  # every rank takes part; rank 0 compares
            if rank == 0:
                difference = (spread.float().cpu() - outputs[method]).abs().max()
                error[method] = float(difference / outputs[method].abs().max())
            parallel[method] = median_time(forward, device, args.repeats)
            if args.profile:  # every rank profiles one more forward (the collectives need all); rank 0 reports
                profiles.append((name, method, profile_forward(forward, device, args.profile_rows)))
            remove_sparse_attention(model)
        patch = model.config.patch_size
        tokens = (grid[0] // patch[0]) * (grid[1] // patch[1]) * (grid[2] // patch[2])
        cfg = model.config
        heads, dim, layers = cfg.num_attention_heads, cfg.attention_head_dim, cfg.num_layers
        a2a = all_to_all_seconds(tokens, heads, dim, device, dtype)
        if rank == 0:
            for method in ("dense", "vmoba"):
                comm = 4 * layers * a2a  # q, k, v and the output of every layer, measured at N = world
                # an all-to-all sends (N - 1) / N of a T / N shard per rank: bytes ~ (N - 1) / N^2
                predicted = {n: single[method] / n + comm * ((n - 1) / n**2) / ((world - 1) / world**2)
                             for n in (4, 8)}  # fmt: skip
                row = {
                    "shape": name, "method": method, "tokens": tokens, "density": densities[method],
                    "gpus": world, "single_s": single[method], "parallel_s": parallel[method],
                    "speedup": single[method] / parallel[method], "max_rel_error": error[method], "a2a_ms": 1000 * a2a,
                    "comm_s": comm, "predicted_s": predicted,
                }  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        text = markdown(rows, args, device)
        for name, method, table in profiles:
            text += f"\n#### Profile of one {world}-GPU forward, {name}, {method} (rank 0)\n\n```\n{table}\n```\n"
        print(text)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
            args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


def markdown(rows: list[dict], args: argparse.Namespace, device: torch.device) -> str:
    commit = os.environ.get("VGEN_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()  # fmt: skip
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo)"
    world = rows[0]["gpus"] if rows else "?"
    mode = "Ring" if args.ring else "Ulysses"
    lines = [
        f"### {mode} context parallelism, {datetime.date.today().isoformat()}, commit {commit or 'unknown'}, "
        f"{world} x {gpu}", "",
        f"Command: `torchrun --nproc-per-node {world} benchmarks/parallel.py {' '.join(sys.argv[1:])}`; torch "
        f"{torch.__version__}; transformer forward, random weights, median of {args.repeats} after a warm-up; "
        "max error = max |N-GPU output - one-GPU output| / max |one-GPU output|. "
        "The 4- and 8-GPU columns are predictions (compute / N + the measured all-to-all cost scaled to N), "
        "not measurements.", "",
        f"| shape | tokens | method | density (last layer) | 1 GPU s | {world} GPUs s | **speedup** | efficiency | "
        "max error vs 1 GPU | all-to-all ms (one) | predicted 4 GPUs s | predicted 8 GPUs s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tokens']:,} | {r['method']} | {r['density']:.3f} | {r['single_s']:.3f} | "
            f"{r['parallel_s']:.3f} | {r['speedup']:.2f}x | {r['speedup'] / r['gpus']:.0%} | "
            f"{r['max_rel_error']:.1e} | {r['a2a_ms']:.2f} | "
            f"{r['predicted_s'][4]:.3f} | {r['predicted_s'][8]:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
