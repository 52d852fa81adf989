"""Readers for real 4D data: Occupancy Flow's preprocessed D-FAUST layout and DeformingThings4D ``.anime``.

**Occupancy Flow / D-FAUST** (also Motion2VecSets' processed data). A sequence folder holds
subfolders of per-frame files ``%08d.npz`` (sorted by name):

- ``pcl_seq/``: ``points`` ``[N, 3]`` surface samples (float16) that correspond across frames
  (point ``i`` is the same surface point in every frame), ``loc`` ``[3]`` and ``scale`` ``[]``;
- ``points_seq/``: ``points`` ``[N, 3]`` uniform queries (independent per frame), ``occupancies``
  (``np.packbits`` of N booleans, or N booleans/floats), ``loc``, ``scale``.

Stored coordinates are ``(world - loc) / scale`` per frame. :func:`read_oflow_sequence` maps every
frame into the normalised frame of the window's first frame, ``(loc_t + scale_t p - loc_0) / scale_0``,
as Occupancy Flow does. Split lists are ``{split}.lst`` beside the sequence folders.

**DeformingThings4D** ``.anime``: little-endian int32 ``nf, nv, nt``, float32 ``[nv, 3]`` frame-0
vertices, int32 ``[nt, 3]`` faces (0-based), float32 ``[nf - 1, nv, 3]`` offsets of frames 1.. from
frame 0 (absolute, not cumulative). :func:`read_anime` returns all frames' vertices and the faces.

Both return the dict layout of :func:`vgen.data.deforming.sample_sequence` where they can, so the
same training and evaluation code reads synthetic and real sequences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["read_anime", "read_oflow_sequence", "read_split", "sample_anime_sequence", "surface_barycentrics"]


def read_split(category: str | Path, split: str) -> list[str]:
    """The sequence names of ``{category}/{split}.lst`` (one per line), or every subfolder when it is missing."""
    category = Path(category)
    if not category.is_dir():
        raise FileNotFoundError(f"no dataset category folder {category}")
    listing = category / f"{split}.lst"
    if listing.exists():
        return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    return sorted(p.name for p in category.iterdir() if p.is_dir())


def _frames(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz frames in {folder}")
    return files


def _load(file: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    with np.load(file) as data:
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"{file} lacks {missing} (has {sorted(data.files)})")
        return {k: np.asarray(data[k]) for k in keys}


def read_oflow_sequence(
    folder: str | Path,
    *,
    start: int = 0,
    frames: int = 17,
    points: int | None = 300,
    noise: float = 0.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One window of an Occupancy Flow sequence folder, in frame ``start``'s normalised space.

    Args:
        folder: the sequence folder (with ``pcl_seq/`` and ``points_seq/``).
        start, frames: the window, by sorted file position.
        points: input points per frame drawn from ``pcl_seq`` with one index set for all frames
            (so the inputs correspond, as Occupancy Flow draws them); None: all of them.
        noise: Gaussian noise added to the inputs.

    Returns:
        ``inputs`` ``[T, n, 3]``, ``surface`` ``[T, N, 3]`` (all pcl_seq points, corresponding),
        ``queries`` ``[T, Q, 3]``, ``occupancy`` bool ``[T, Q]``, ``times`` ``[T]`` (0..1), all float32.
    """
    folder = Path(folder)
    pcl_files, query_files = _frames(folder / "pcl_seq"), _frames(folder / "points_seq")
    if len(pcl_files) != len(query_files):
        raise ValueError(f"{folder}: {len(pcl_files)} pcl_seq frames but {len(query_files)} points_seq frames")
    if start < 0 or frames < 1 or start + frames > len(pcl_files):
        raise ValueError(f"window start={start}, frames={frames} does not fit {len(pcl_files)} frames in {folder}")

    def to_first(data: dict[str, np.ndarray], first: dict[str, np.ndarray]) -> np.ndarray:
        world = data["loc"].astype(np.float64) + data["scale"].astype(np.float64) * data["points"].astype(np.float64)
        return ((world - first["loc"].astype(np.float64)) / first["scale"].astype(np.float64)).astype(np.float32)

    surface, queries, occupancy = [], [], []
    first_pcl = first_query = None
    for i in range(start, start + frames):
        pcl = _load(pcl_files[i], ("points", "loc", "scale"))
        query = _load(query_files[i], ("points", "occupancies", "loc", "scale"))
        if first_pcl is None:
            first_pcl, first_query = pcl, query
        surface.append(to_first(pcl, first_pcl))
        queries.append(to_first(query, first_query))
        occ = query["occupancies"]
        count = len(query["points"])
        occ = np.unpackbits(occ)[:count] if occ.dtype == np.uint8 and len(occ) * 8 >= count > len(occ) else occ
        occupancy.append(np.asarray(occ).astype(np.float32) >= 0.5)
    surface_arr = np.stack(surface)
    if not np.isfinite(surface_arr).all():
        raise ValueError(f"{folder}: non-finite surface points")
    rng = np.random.default_rng(seed)
    chosen = slice(None) if points is None else rng.integers(0, surface_arr.shape[1], size=points)
    inputs = surface_arr[:, chosen] + rng.normal(scale=noise, size=surface_arr[:, chosen].shape).astype(np.float32)
    return {
        "inputs": inputs.astype(np.float32),
        "surface": surface_arr,
        "queries": np.stack(queries),
        "occupancy": np.stack(occupancy),
        "times": np.linspace(0, 1, frames, dtype=np.float32),
    }


def read_anime(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All frames' vertices ``[nf, nv, 3]`` (float32) and the faces ``[nt, 3]`` (int64) of a ``.anime`` file."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 12:
        raise ValueError(f"{path} is too short for a .anime header ({len(raw)} bytes)")
    nf, nv, nt = (int(x) for x in np.frombuffer(raw, "<i4", count=3))
    if nf < 1 or nv < 1 or nt < 0:
        raise ValueError(f"{path}: bad .anime header frames={nf}, vertices={nv}, triangles={nt}")
    expected = 12 + 4 * (nv * 3 + nt * 3 + (nf - 1) * nv * 3)
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but a header of {nf} frames, {nv} vertices and {nt} "
                         f"triangles needs {expected}")  # fmt: skip
    offset = 12
    base = np.frombuffer(raw, "<f4", count=nv * 3, offset=offset).reshape(nv, 3)
    offset += nv * 12
    faces = np.frombuffer(raw, "<i4", count=nt * 3, offset=offset).reshape(nt, 3).astype(np.int64)
    offset += nt * 12
    moves = np.frombuffer(raw, "<f4", count=(nf - 1) * nv * 3, offset=offset).reshape(nf - 1, nv, 3)
    if nt and (faces.min() < 0 or faces.max() >= nv):
        raise ValueError(f"{path}: face indices outside [0, {nv})")
    vertices = np.concatenate([base[None], base[None] + moves]).astype(np.float32)
    return vertices, faces


def surface_barycentrics(
    vertices: np.ndarray, faces: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points uniform in area on the mesh, as triangle indices ``[count]`` and barycentric
    weights ``[count, 3]``: the same (triangle, weights) name the same surface point in every frame."""
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if area.sum() <= 0:
        raise ValueError("the mesh has no area to sample")
    chosen = rng.choice(len(faces), size=count, p=area / area.sum())
    u, v = rng.uniform(size=(2, count))
    flip = u + v > 1  # fold the far half of the unit square back into the triangle
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    return chosen, np.stack([1 - u - v, u, v], -1)


def sample_anime_sequence(
    path: str | Path,
    *,
    start: int = 0,
    frames: int = 17,
    points: int = 512,
    noise: float = 0.0,
    correspondences: int = 2048,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A window of a ``.anime`` file as a point-cloud sequence in the window's normalised space.

    Surface samples are drawn once (triangle by area at the first frame, barycentric weights) and
    carried through the frames by the mesh's vertex correspondence. Coordinates are normalised by
    the first frame's bounding box (centre to 0, longest side to 1), as Occupancy Flow does.
    Occupancy is not derived here (the meshes need not be watertight).

    Returns ``inputs`` ``[T, points, 3]`` (one index set for all frames), ``correspondences``
    ``[T, C, 3]``, ``vertices`` ``[T, nv, 3]``, ``faces`` ``[nt, 3]``, ``times`` ``[T]``.
    """
    vertices, faces = read_anime(path)
    if start < 0 or frames < 1 or start + frames > len(vertices):
        raise ValueError(f"window start={start}, frames={frames} does not fit {len(vertices)} frames of {path}")
    if len(faces) == 0:
        raise ValueError(f"{path} has no triangles to sample")
    vertices = vertices[start : start + frames]
    low, high = vertices[0].min(0), vertices[0].max(0)
    vertices = (vertices - (low + high) / 2) / (high - low).max()
    rng = np.random.default_rng(seed)
    chosen, weights = surface_barycentrics(vertices[0], faces, correspondences, rng)
    corr = (vertices[:, faces[chosen]] * weights[None, :, :, None]).sum(2)  # [T, C, 3]
    picks = rng.integers(0, correspondences, size=points)
    inputs = corr[:, picks] + rng.normal(scale=noise, size=(frames, points, 3))
    return {
        "inputs": inputs.astype(np.float32),
        "correspondences": corr.astype(np.float32),
        "vertices": vertices.astype(np.float32),
        "faces": faces,
        "times": np.linspace(0, 1, frames, dtype=np.float32),
    }
