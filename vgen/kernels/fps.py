"""Farthest-point sampling: one Triton program per point cloud runs the whole greedy loop.

The PyTorch loop (:func:`farthest_point_sample_reference`) issues about twenty small ops per chosen
point, so choosing 256 latents costs some 5,000 kernel launches per batch on a GPU: most of a small
vector-set autoencoder's training step. The kernel keeps the cloud and each point's distance to the
chosen set in registers and picks all ``count`` points in one launch. Ties go to the lowest index,
as ``torch.argmax`` does, so both give the same indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_KERNEL_POINTS", "farthest_point_sample", "farthest_point_sample_reference"]

MAX_KERNEL_POINTS = 16384  # one program holds the whole cloud in registers


@triton.jit
def _fps_kernel(P, OUT, N, COUNT, s_pb, s_pn, s_pc, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    valid = offs < N
    base = P + b * s_pb
    x = tl.load(base + offs * s_pn, mask=valid, other=0.0).to(tl.float32)
    y = tl.load(base + offs * s_pn + s_pc, mask=valid, other=0.0).to(tl.float32)
    z = tl.load(base + offs * s_pn + 2 * s_pc, mask=valid, other=0.0).to(tl.float32)
    nearest = tl.where(valid, float("inf"), float("-inf"))  # padding lanes are never picked
    out = OUT + b * COUNT
    tl.store(out, 0)
    last = 0
    for i in range(1, COUNT):
        lx = tl.load(base + last * s_pn).to(tl.float32)
        ly = tl.load(base + last * s_pn + s_pc).to(tl.float32)
        lz = tl.load(base + last * s_pn + 2 * s_pc).to(tl.float32)
        dx, dy, dz = x - lx, y - ly, z - lz
        distance = tl.where(valid, dx * dx + dy * dy + dz * dz, float("-inf"))
        nearest = tl.minimum(nearest, distance)
        last = tl.argmax(nearest, 0, tie_break_left=True)
        tl.store(out + i, last.to(tl.int64))


def _check(points: torch.Tensor, count: int) -> None:
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be [B, N, 3], got {tuple(points.shape)}")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= points.shape[1]:
        raise ValueError(f"count must be an int between 1 and the {points.shape[1]} points, got {count!r}")


def farthest_point_sample_reference(points: torch.Tensor, count: int) -> torch.Tensor:
    """int64 ``[B, count]`` indices of ``points`` ``[B, N, 3]``, each the farthest from those before (the
    first is point 0, so the result is deterministic); plain PyTorch."""
    _check(points, count)
    batch, n, _ = points.shape
    points = points.float()
    chosen = torch.zeros(batch, count, dtype=torch.long, device=points.device)
    nearest = torch.full((batch, n), float("inf"), device=points.device)
    last = torch.zeros(batch, dtype=torch.long, device=points.device)
    rows = torch.arange(batch, device=points.device)
    for i in range(1, count):
        distance = (points - points[rows, last][:, None]).square().sum(-1)
        nearest = torch.minimum(nearest, distance)
        last = nearest.argmax(-1)
        chosen[:, i] = last
    return chosen


def farthest_point_sample(points: torch.Tensor, count: int) -> torch.Tensor:
    """The same as :func:`farthest_point_sample_reference`, in one Triton launch. Clouds of more than
    :data:`MAX_KERNEL_POINTS` points do not fit one program: a ValueError names the reference."""
    _check(points, count)
    n = points.shape[1]
    if n > MAX_KERNEL_POINTS:
        raise ValueError(f"farthest_point_sample's kernel holds at most {MAX_KERNEL_POINTS} points per cloud, got "
                         f"{n}: subsample first, or call farthest_point_sample_reference")  # fmt: skip
    chosen = torch.empty(points.shape[0], count, dtype=torch.long, device=points.device)
    if points.shape[0] == 0:
        return chosen
    block = max(16, triton.next_power_of_2(n))
    _fps_kernel[(points.shape[0],)](
        points, chosen, n, count, points.stride(0), points.stride(1), points.stride(2),
        BLOCK_N=block, num_warps=4 if block <= 2048 else 8, enable_fp_fusion=False,  # no FMA: torch's rounding
    )  # fmt: skip
    return chosen
