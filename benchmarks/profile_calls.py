"""Where the time of vgen's slow paths goes, kernel by kernel (``torch.profiler``).

    python3 benchmarks/profile_calls.py --out $OUT/profile.md          # the GPU: about a minute
    python3 benchmarks/profile_calls.py --smoke --out build/profile.md  # the CPU, tiny shapes (a test runs it)
    python3 benchmarks/profile_calls.py --only psa --set selection.RADIX_COUNT=1 --out $OUT/radix.md  # a setting

The benchmarks time whole calls; when a call is slower than its kernel, this says which launches
the difference is made of. Random q/k/v (bf16 on the GPU), B = 1. Cases:

- VMoBA's selection alone (chunk scores, head-global cut, chunk-to-block overlap, mask compaction) at
  the 14B shape for the 2D and 3D partitions: 7-9 ms at 4a6defb, where the scores take 0.8 ms;
- the whole VMoBA and rectified (mass 0.7) calls at the 1.3B shape, and the block-sparse kernel on
  VMoBA's mask for comparison; the whole PSA call (default budget) and its plain variant at both shapes;
- dense INT8 quantised attention and the bf16 block-sparse kernel at density 1 at the 1.3B shape, and the
  quantisation of q/k/v alone (INT8 and FP8 PV) there.

For each case: milliseconds per call (do_bench median on the GPU, one call on the CPU), kernel
launches per call, and the kernels (CPU: operators) that take the most time, with their share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from attention import shape_of  # benchmarks/attention.py, beside this script
from torch.profiler import ProfilerActivity, profile

from vgen.attention import BlockMask, VideoLayout, create_method
from vgen.attention.vmoba import _chunk_scores, chunk_plan, select_dense_blocks
from vgen.kernels import block_sparse_attention, permute_tokens
from vgen.kernels.quantized import _quantize_for_kernel, quantized_attention

TOP = 12


def clock(fn: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=50))
    times = []
    for _ in range(2):
        began = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - began))
    return statistics.median(times)


def kernel_table(fn: Callable[[], Any], cuda: bool, calls: int = 3) -> tuple[int, list[dict[str, Any]]]:
    """(launches per call, the top entries by total time per call): GPU kernels on CUDA, else CPU
    operators (self time)."""
    fn()  # compiled and warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if cuda:
            if str(getattr(event, "device_type", "")).split(".")[-1] != "CUDA":
                continue
            us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        else:
            us = event.self_cpu_time_total
        rows.append({"name": event.key, "calls": event.count / calls, "ms": us / 1e3 / calls})
    total = sum(r["ms"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["ms"] / total
    rows.sort(key=lambda r: -r["ms"])
    launches = round(sum(r["calls"] for r in rows)) if cuda else 0
    return launches, rows[:TOP]


def random_qkv(heads: int, dim: int, layout: VideoLayout, device, dtype) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return tuple(torch.randn(1, layout.seq_len, heads, dim, device=device, dtype=dtype) for _ in range(3))


def cases(shapes: dict[str, tuple[int, int, VideoLayout]], device, dtype) -> list[tuple[str, Callable[[], Any]]]:
    """(label, zero-argument call) for every case; inputs are made when the case runs (one shape in memory)."""
    out: list[tuple[str, Callable[[], Any]]] = []

    def vmoba_selection(shape: str, layer: int) -> Callable[[], Any]:
        heads, dim, layout = shapes[shape]
        q, k, _ = random_qkv(heads, dim, layout, device, dtype)
        method = create_method("vmoba", selection="threshold", threshold=0.25)
        c = method.config
        plan = chunk_plan(layout, c.tile(layer, layout), c.block_size, q.device)
        qp, kp = (x if plan.perm is None else permute_tokens(x, plan.perm) for x in (q, k))
        scale = dim**-0.5

        def run():
            scores = _chunk_scores(qp, kp, plan, scale)
            dense = select_dense_blocks(scores, plan, selection="threshold", threshold=0.25)
            return BlockMask.from_dense(dense, plan.block_size, (layout.seq_len, layout.seq_len))

        return run

    def whole(shape: str, name: str, layer: int = 0, **config) -> Callable[[], Any]:
        heads, dim, layout = shapes[shape]
        q, k, v = random_qkv(heads, dim, layout, device, dtype)
        method = create_method(name, **config)
        return lambda: method(q, k, v, layout=layout, step=0, layer=layer, scale=None)

    def kernel_on_vmoba_mask(shape: str, layer: int) -> Callable[[], Any]:
        heads, dim, layout = shapes[shape]
        q, k, v = random_qkv(heads, dim, layout, device, dtype)
        method = create_method("vmoba", selection="threshold", threshold=0.25)
        method(q, k, v, layout=layout, step=0, layer=layer, scale=None)
        mask = method.last_mask
        return lambda: block_sparse_attention(q, k, v, mask)

    def on_full_mask(shape: str, call: Callable[..., Any]) -> Callable[[], Any]:
        """``call(q, k, v, mask)`` on random q/k/v with every block pair kept."""
        heads, dim, layout = shapes[shape]
        q, k, v = random_qkv(heads, dim, layout, device, dtype)
        n = layout.seq_len
        mask = BlockMask.full(1, heads, (n, n), (128, 128), device=q.device)
        return lambda: call(q, k, v, mask)

    def dense_pair(shape: str, quantised: bool) -> Callable[[], Any]:
        return on_full_mask(shape, quantized_attention if quantised else block_sparse_attention)

    def quantisation(shape: str, pv: str) -> Callable[[], Any]:
        return on_full_mask(shape, lambda q, k, v, mask: _quantize_for_kernel(q, k, v, mask, pv))

    big, small = list(shapes)[-1], list(shapes)[0]
    out.append((f"vmoba selection, {big}, 2D (layer 1)", lambda: vmoba_selection(big, 1)))
    out.append((f"vmoba selection, {big}, 3D (layer 2)", lambda: vmoba_selection(big, 2)))
    out.append((f"vmoba selection, {small}, 2D (layer 1)", lambda: vmoba_selection(small, 1)))
    out.append((f"vmoba whole call, {small}, 2D (layer 1)", lambda: whole(small, "vmoba", 1, threshold=0.25)))
    out.append((f"block-sparse kernel on that mask, {small}", lambda: kernel_on_vmoba_mask(small, 1)))
    for shape in (small, big):  # psa at its default budget, and its plain variant (the same pairs at full resolution)
        out.append((f"psa whole call, default budget, {shape}", lambda shape=shape: whole(shape, "psa")))
        out.append((f"psa plain variant whole call, {shape}",
                    lambda shape=shape: whole(shape, "psa", proportions=(1.0, 0.0, 0.0, 0.0))))  # fmt: skip
    out.append((f"rectified whole call, mass 0.7, {small}", lambda: whole(small, "rectified", mass=0.7)))
    out.append((f"int8 quantised attention, density 1, {small}", lambda: dense_pair(small, True)))
    for pv in ("int8", "fp8"):  # the quantisation of q/k/v alone: 20% of the FP8 call at density 0.25 (ca38e08)
        out.append((f"{pv} quantisation of q/k/v alone, {small}", lambda pv=pv: quantisation(small, pv)))
    out.append((f"bf16 block-sparse kernel, density 1, {small}", lambda: dense_pair(small, False)))
    return out


def set_flag(setting: str) -> None:
    """``MODULE.FLAG=0|1``: set the boolean ``vgen.kernels.MODULE.FLAG``; a clear error for anything else."""
    import importlib

    name, _, value = setting.partition("=")
    module, _, flag = name.rpartition(".")
    if not module or value not in ("0", "1"):
        raise SystemExit(f"--set takes MODULE.FLAG=0|1 (a vgen.kernels module's boolean), got {setting!r}")
    target = importlib.import_module(f"vgen.kernels.{module}")
    if not hasattr(target, flag) or not isinstance(getattr(target, flag), bool | None):
        raise SystemExit(f"--set: vgen.kernels.{module} has no boolean {flag!r} (a setting of True, False or None)")
    setattr(target, flag, value == "1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the markdown report (a .json beside it)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--only", help="run the cases whose label contains this text")
    parser.add_argument("--set", action="append", default=[], metavar="MODULE.FLAG=0|1",
                        help="a boolean setting of vgen.kernels.MODULE for the run, e.g. selection.RADIX_COUNT=1")
    args = parser.parse_args(argv)
    for setting in args.set:
        set_flag(setting)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        shapes = {name: shape_of(name) for name in ("wan1.3b-480p", "wan14b-720p")}
    else:
        shapes = {"tiny": (2, 32, VideoLayout(3, 16, 16)), "small": (2, 32, VideoLayout(4, 16, 16))}
    report: list[dict[str, Any]] = []
    began = time.time()
    for label, make in cases(shapes, device, dtype):
        if args.only and args.only not in label:
            continue
        with torch.no_grad():
            fn = make()
            ms = clock(fn, cuda)
            launches, top = kernel_table(fn, cuda)
        report.append({"case": label, "ms": ms, "launches": launches, "top": top})
        print(f"{label}: {ms:.3f} ms, {launches} launches; top: {top[0]['name'][:60] if top else '-'}", flush=True)
        del fn
        if cuda:
            torch.cuda.empty_cache()
    what = "GPU kernels (self device time)" if cuda else "CPU operators (self time)"
    lines = [f"### Kernel profile of slow paths ({'GPU' if cuda else 'CPU smoke'}), {time.strftime('%Y-%m-%d')}", "",
             f"Command: `python3 benchmarks/profile_calls.py{' --smoke' if args.smoke else ''}"
             f"{''.join(f' --set {x}' for x in args.set)}{f' --only {args.only!r}' if args.only else ''} --out ...`; "
             f"torch {torch.__version__}; {dtype} random q/k/v; {time.time() - began:.0f} s in all. "
             f"Per case: ms per call and the {TOP} {what} with the most time per call.", ""]  # fmt: skip
    for r in report:
        lines += [f"#### {r['case']}: {r['ms']:.3f} ms" + (f", {r['launches']} launches" if cuda else ""), "",
                  "| kernel | calls | ms | share |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| `{t['name'][:90]}` | {t['calls']:g} | {t['ms']:.3f} | {100 * t['share']:.1f}% |"
                  for t in r["top"]]  # fmt: skip
        lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
