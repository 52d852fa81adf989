"""Generalized winding number of a triangle mesh at many points, in one Triton launch.

The winding number at ``p`` is the sum over triangles of their signed solid angle seen from ``p``,
divided by 4 pi (Van Oosterom and Strackee's formula: ``tan(omega / 2) = det / denom`` with ``a, b,
c`` the corners relative to ``p``). It is 1 inside a closed, outward-wound mesh, 0 outside, and a
graceful fraction for meshes with holes or self-intersections, which is what evaluating reconstructed
meshes needs (each frame's mesh is a moved reference mesh and may fold over itself).

Written in PyTorch, every (point, triangle) pair materialises a dozen ``[points, triangles, 3]``
temporaries; the 4D evaluation (20,000 points x some 15,000 triangles x 17 frames a sequence) spent
nearly all its time there. The kernel keeps a block of points in registers, streams the triangles
through in tiles and accumulates the angles: nothing but the result goes to memory. It works in fp32:
the sum's rounding (about 1e-4 over 10^4 triangles) matters only for points within a hair of the
surface. :func:`winding_number_reference` is the fp64 PyTorch version the tests compare with;
:func:`winding_number_cpu` is the same formula compiled for the CPU, where there is no GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["winding_number", "winding_number_cpu", "winding_number_reference"]


@triton.jit
def _atan2(y, x):
    """atan2 from basic operations (Triton's interpreter has no libdevice): the ratio of the smaller to the
    larger magnitude, in [0, 1], is moved to [-tan(pi/8), tan(pi/8)] by atan(a) = pi/4 + atan((a-1)/(a+1))
    and its series summed to t^21 (error below 3e-9), then the octant is restored."""
    ax, ay = tl.abs(x), tl.abs(y)
    big, small = tl.maximum(ax, ay), tl.minimum(ax, ay)
    a = small / tl.where(big > 0, big, 1.0)
    shifted = a > 0.41421356237309503
    t = tl.where(shifted, (a - 1.0) / (a + 1.0), a)
    t2 = t * t
    series = 1.0 / 21.0
    for k in tl.static_range(9, -1, -1):  # Horner over (-1)^k t^(2k+1) / (2k+1)
        series = (1.0 - 2.0 * (k % 2)) / (2.0 * k + 1.0) + t2 * series
    r = t * series + tl.where(shifted, 0.7853981633974483, 0.0)
    r = tl.where(ay > ax, 1.5707963267948966 - r, r)
    r = tl.where(x < 0, 3.141592653589793 - r, r)
    return tl.where(y < 0, -r, r)


@triton.jit
def _winding_kernel(P, TRI, OUT, Q, F, BLOCK_Q: tl.constexpr, BLOCK_F: tl.constexpr):
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_q = offs_q < Q
    px = tl.load(P + offs_q * 3, mask=in_q, other=0.0)[:, None]
    py = tl.load(P + offs_q * 3 + 1, mask=in_q, other=0.0)[:, None]
    pz = tl.load(P + offs_q * 3 + 2, mask=in_q, other=0.0)[:, None]
    total = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for start in range(0, F, BLOCK_F):
        offs_f = start + tl.arange(0, BLOCK_F)
        in_f = offs_f < F
        row = TRI + offs_f * 9
        ax = tl.load(row + 0, mask=in_f, other=0.0)[None, :] - px
        ay = tl.load(row + 1, mask=in_f, other=0.0)[None, :] - py
        az = tl.load(row + 2, mask=in_f, other=0.0)[None, :] - pz
        bx = tl.load(row + 3, mask=in_f, other=0.0)[None, :] - px
        by = tl.load(row + 4, mask=in_f, other=0.0)[None, :] - py
        bz = tl.load(row + 5, mask=in_f, other=0.0)[None, :] - pz
        cx = tl.load(row + 6, mask=in_f, other=0.0)[None, :] - px
        cy = tl.load(row + 7, mask=in_f, other=0.0)[None, :] - py
        cz = tl.load(row + 8, mask=in_f, other=0.0)[None, :] - pz
        la = tl.sqrt(ax * ax + ay * ay + az * az)
        lb = tl.sqrt(bx * bx + by * by + bz * bz)
        lc = tl.sqrt(cx * cx + cy * cy + cz * cz)
        det = ax * (by * cz - bz * cy) + ay * (bz * cx - bx * cz) + az * (bx * cy - by * cx)
        ab = ax * bx + ay * by + az * bz
        bc = bx * cx + by * cy + bz * cz
        ca = cx * ax + cy * ay + cz * az
        denom = la * lb * lc + ab * lc + bc * la + ca * lb
        angle = _atan2(det, denom)
        total += tl.sum(tl.where(in_f[None, :], angle, 0.0), 1)
    tl.store(OUT + offs_q, total * (1.0 / (2.0 * math.pi)), mask=in_q)


def _check(vertices: torch.Tensor, faces: torch.Tensor, points: torch.Tensor) -> None:
    if vertices.ndim != 2 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be [V, 3], got {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3 or faces.dtype.is_floating_point:
        raise ValueError(f"faces must be integer [F, 3], got {tuple(faces.shape)} {faces.dtype}")
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"points must be [Q, 3], got {tuple(points.shape)}")
    if len(faces) and (int(faces.min()) < 0 or int(faces.max()) >= len(vertices)):
        raise ValueError(f"faces index vertices 0..{len(vertices) - 1}, got {int(faces.min())}..{int(faces.max())}")


def _winding_chunk(tri: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[q]``: winding numbers of points ``p`` ``[q, 3]`` for triangles ``tri`` ``[F, 3, 3]``."""
    a, b, c = (tri[None, :, i] - p[:, None] for i in range(3))  # [q, F, 3]
    la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
    det = (a * torch.cross(b, c, dim=-1)).sum(-1)
    denom = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
    return torch.atan2(det, denom).sum(-1) / (2 * math.pi)


def winding_number_reference(
    vertices: torch.Tensor, faces: torch.Tensor, points: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """float64 ``[Q]``: the winding number at each point, in PyTorch (chunked: by default about 1 GiB of
    float64 temporaries per chunk)."""
    _check(vertices, faces, points)
    tri = vertices.double()[faces.long()]  # [F, 3 corners, 3]
    chunk = chunk or max(1, 2**27 // (12 * max(1, len(faces))))
    out = [_winding_chunk(tri, points[start : start + chunk].double()) for start in range(0, len(points), chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=points.device)


_compiled_chunk = None


def winding_number_cpu(
    vertices: torch.Tensor, faces: torch.Tensor, points: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """float64 ``[Q]``: the reference's formula compiled by ``torch.compile`` for the CPU, which fuses the
    per-pair temporaries into one loop: about 1e8 (point, triangle) pairs a second on two cores, some 40x
    the eager reference (a 4D evaluation sequence, 17 frames: 1-2.5 minutes on one thread instead of
    about 18). Compiles once per
    process (about 10 s); needs a C++ compiler."""
    global _compiled_chunk
    _check(vertices, faces, points)
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_winding_chunk, dynamic=True)
    tri = vertices.double()[faces.long()].cpu()
    points = points.double().cpu()
    if len(points) == 0 or len(tri) == 0:
        return torch.zeros(len(points), dtype=torch.float64)
    return torch.cat([_compiled_chunk(tri, points[start : start + chunk]) for start in range(0, len(points), chunk)])


def winding_number(vertices: torch.Tensor, faces: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """float32 ``[Q]``: the winding number at each point (see the module docstring), one Triton launch;
    the tensors on one device (a GPU, or the CPU under ``TRITON_INTERPRET=1``)."""
    _check(vertices, faces, points)
    tri = vertices.float()[faces.long()].reshape(-1, 9).contiguous()
    points = points.float().contiguous()
    out = torch.empty(len(points), dtype=torch.float32, device=points.device)
    if len(points) == 0:
        return out
    if len(tri) == 0:
        return out.zero_()
    # 64 points x 32 triangles a step in 8 warps: 80 registers and no spills for sm_90 (ptxas, through
    # scripts/compile_kernels_sm90.py); 64 x 64 spilled 508 B a thread
    block_q = 64
    _winding_kernel[(triton.cdiv(len(points), block_q),)](points, tri, out, len(points), len(tri),
                                                          BLOCK_Q=block_q, BLOCK_F=32, num_warps=8)  # fmt: skip
    return out
