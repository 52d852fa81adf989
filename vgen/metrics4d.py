"""4D reconstruction metrics, as Occupancy Flow defines them, per frame in the data's normalised space.

- **IoU**: which of the ground truth's occupancy query points lie inside the predicted mesh
  (generalized winding number >= 1/2, exact for watertight meshes) against their labels.
- **Chamfer-L1**: points sampled uniformly on the predicted mesh against the ground-truth surface
  samples; the mean of accuracy (prediction -> truth) and completeness (truth -> prediction), each a
  mean Euclidean nearest-neighbour distance (Occupancy Networks' convention).
- **Correspondence L2**: each predicted vertex is matched once, at frame 0, to its nearest ground-truth
  surface sample; at frame t the error is the mean distance between the vertex and that same sample
  (which the ground truth carries through time).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from vgen.data.real4d import surface_barycentrics

__all__ = ["chamfer_l1", "correspondence_l2", "inside_mesh", "iou", "sample_surface"]


def inside_mesh(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """bool ``[Q]``: |generalized winding number| of the mesh at each point >= 1/2, whichever way its
    triangles wind (torch, on the GPU when there is one; chunked: by default about 1 GiB of float64
    temporaries per chunk)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chunk = chunk or max(1, 2**27 // (12 * max(1, len(faces))))
    tri = torch.as_tensor(np.ascontiguousarray(vertices), dtype=torch.float64, device=device)
    tri = tri[torch.as_tensor(np.ascontiguousarray(faces), device=device)]
    out = []
    for start in range(0, len(points), chunk):
        p = torch.as_tensor(points[start : start + chunk], dtype=torch.float64, device=device)
        a, b, c = (tri[None, :, i] - p[:, None] for i in range(3))  # [q, F, 3]
        la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
        det = (a * torch.cross(b, c, dim=-1)).sum(-1)
        denom = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
        winding = torch.atan2(det, denom).sum(-1) / (2 * np.pi)  # solid angle / (4 pi)
        out.append((winding.abs() >= 0.5).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean vectors (1 when both are empty)."""
    union = np.logical_or(predicted, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, truth).sum() / union)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` points uniform in area on the mesh."""
    chosen, weights = surface_barycentrics(vertices, faces, count, np.random.default_rng(seed))
    return (vertices[faces[chosen]] * weights[:, :, None]).sum(1)


def chamfer_l1(vertices: np.ndarray, faces: np.ndarray, truth: np.ndarray, samples: int = 100_000) -> float:
    """(accuracy + completeness) / 2 between the mesh's surface and ground-truth surface points."""
    predicted = sample_surface(vertices, faces, samples)
    accuracy = cKDTree(truth).query(predicted)[0].mean()
    completeness = cKDTree(predicted).query(truth)[0].mean()
    return float((accuracy + completeness) / 2)


def correspondence_l2(vertices: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[T]``: mean distance per frame between predicted vertices ``[T, V, 3]`` and the ground-truth
    samples ``[T, C, 3]`` they were matched to at frame 0."""
    if vertices.shape[0] != truth.shape[0]:
        raise ValueError(f"vertices have {vertices.shape[0]} frames, the ground truth {truth.shape[0]}")
    match = cKDTree(truth[0]).query(vertices[0])[1]
    return np.linalg.norm(vertices - truth[:, match], axis=-1).mean(1)
