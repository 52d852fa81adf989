"""Procedural deforming shapes for 4D reconstruction: point-cloud sequences, occupancy, correspondences.

A :class:`DeformingShape` is a watertight solid whose occupancy is known exactly at every time
``t`` in [0, 1], with a map that carries rest-space surface points to any frame (so points keep
their identity across frames: correspondences). Two families:

- **Deformed primitives**: a sphere, ellipsoid, box, capsule or torus, deformed by a taper
  (``(x, y) * (1 + a z)``), a twist (``(x, y)`` rotated by ``k z``) and a bend (``x + c z^2``), each
  amount a smooth function of ``t``, then moved rigidly. Every step has an exact inverse, so the
  occupancy of a query ``p`` at ``t`` is the primitive's at the inverse image of ``p``.
- **Articulated capsule chains**: 2-4 capsules joined end to end, each joint turning about its own
  axis over time, posed by forward kinematics. Skinning is rigid (each surface point follows the
  one bone it was sampled on), and the occupancy is the union of the posed capsules, both exact.

:func:`sample_sequence` turns a shape into what a 4D reconstruction model trains on, per frame:
a sparse, noisy and optionally partial input point cloud (fresh surface samples each frame, as a
depth sensor would give), occupancy queries (uniform in the unit cube and near the surface) with
their labels, and ``correspondences`` (the same rest-space surface points, posed at every frame).
All coordinates lie in [-0.5, 0.5]^3 over the whole sequence. Everything is deterministic from a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PRIMITIVES", "DeformingShape", "make_shape", "sample_sequence"]

PRIMITIVES = ("sphere", "ellipsoid", "box", "capsule", "torus")
_BOX = 0.5  # every sequence fits in [-_BOX, _BOX]^3


# ----------------------------------------------------------------------------- primitives


def _capsule_inside(p: np.ndarray, half: float, radius: float) -> np.ndarray:
    """Inside a capsule along z from -half to +half."""
    z = np.clip(p[..., 2], -half, half)
    return np.square(p[..., :2]).sum(-1) + np.square(p[..., 2] - z) <= radius**2


def _primitive_inside(kind: str, size: np.ndarray, p: np.ndarray) -> np.ndarray:
    if kind == "sphere":
        return np.square(p).sum(-1) <= size[0] ** 2
    if kind == "ellipsoid":
        return np.square(p / size).sum(-1) <= 1.0
    if kind == "box":
        return (np.abs(p) <= size).all(-1)
    if kind == "capsule":
        return _capsule_inside(p, size[2], size[0])
    # torus around z: major radius size[0], minor size[1]
    ring = np.sqrt(np.square(p[..., :2]).sum(-1)) - size[0]
    return ring**2 + p[..., 2] ** 2 <= size[1] ** 2


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _primitive_surface(kind: str, size: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points on the surface, uniform in area (up to the ellipsoid's stretch)."""
    if kind in ("sphere", "ellipsoid"):
        return _unit(rng.normal(size=(n, 3))) * (size if kind == "ellipsoid" else size[0])
    if kind == "box":
        areas = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]]).repeat(2)
        face = rng.choice(6, size=n, p=areas / areas.sum())
        p = rng.uniform(-1, 1, size=(n, 3)) * size
        axis = face // 2
        p[np.arange(n), axis] = np.where(face % 2 == 0, -1.0, 1.0) * size[axis]
        return p
    if kind == "capsule":
        radius, half = size[0], size[2]
        side = 2 * math.pi * radius * 2 * half
        caps = 4 * math.pi * radius**2
        on_side = rng.uniform(size=n) < side / (side + caps)
        angle = rng.uniform(0, 2 * math.pi, size=n)
        p = np.stack([radius * np.cos(angle), radius * np.sin(angle), rng.uniform(-half, half, size=n)], -1)
        cap = _unit(rng.normal(size=(n, 3))) * radius
        cap[:, 2] += np.where(cap[:, 2] >= 0, half, -half)
        return np.where(on_side[:, None], p, cap)
    # torus: rejection on the tube angle for uniform area
    major, minor = size[0], size[1]
    out = np.empty((0, 3))
    while len(out) < n:
        u, w = rng.uniform(0, 2 * math.pi, size=(2, 2 * n))
        keep = rng.uniform(size=2 * n) < (major + minor * np.cos(w)) / (major + minor)
        ring = major + minor * np.cos(w[keep])
        pts = np.stack([ring * np.cos(u[keep]), ring * np.sin(u[keep]), minor * np.sin(w[keep])], -1)
        out = np.concatenate([out, pts])
    return out[:n]


# ----------------------------------------------------------------------------- motion


def _wave(params: np.ndarray, t: float | np.ndarray) -> np.ndarray:
    """amplitude * sin(2 pi (frequency t + phase)), rows of params = (amplitude, frequency, phase)."""
    t = np.asarray(t, dtype=np.float64)
    return params[..., 0] * np.sin(2 * math.pi * (params[..., 1] * t + params[..., 2]))


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """3 x 3 rotation about a unit axis (Rodrigues)."""
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


@dataclass(frozen=True)
class DeformingShape:
    """A solid that moves and deforms over t in [0, 1]; see the module docstring.

    Args:
        kind: one of :data:`PRIMITIVES`, or ``"chain"``.
        size: primitive half-extents / radii (chain: capsule radius).
        deform: ``[3, 3]`` (taper, twist, bend) x (amplitude, frequency, phase) waves (primitives).
        spin: ``[3]`` (axis angle amplitude, frequency, phase) of the rigid rotation; axis below.
        axis: unit rotation axis of the rigid motion.
        drift: ``[3, 3]`` per-coordinate (amplitude, frequency, phase) waves of the translation.
        bones: chain segment lengths; joints: ``[J, 3]`` waves of the joint angles, joint_axes: ``[J, 3]``.
        scale: uniform factor that keeps the whole sequence inside [-0.5, 0.5]^3.
    """

    kind: str
    size: np.ndarray
    deform: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    spin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    axis: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    drift: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    bones: np.ndarray = field(default_factory=lambda: np.zeros(0))
    joints: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    joint_axes: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    scale: float = 1.0

    # -- rigid part ---------------------------------------------------------------
    def _rigid(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        return _rotation(self.axis, float(_wave(self.spin, t))), _wave(self.drift, t)

    # -- chains: bone frames by forward kinematics --------------------------------
    def _bone_frames(self, t: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """(rotation, centre) of each capsule, whose local z runs along the bone."""
        frames = []
        rotation, joint = np.eye(3), np.array([0.0, 0.0, -self.bones.sum() / 2])
        for i, length in enumerate(self.bones):
            if i > 0:
                rotation = rotation @ _rotation(self.joint_axes[i - 1], float(_wave(self.joints[i - 1], t)))
            centre = joint + rotation @ np.array([0.0, 0.0, length / 2])
            frames.append((rotation, centre))
            joint = joint + rotation @ np.array([0.0, 0.0, length])
        return frames

    # -- primitives: the deformation and its exact inverse ------------------------
    def _amounts(self, t: float) -> np.ndarray:
        return _wave(self.deform, t)  # taper, twist, bend

    def _deform(self, p: np.ndarray, t: float) -> np.ndarray:
        taper, twist, bend = self._amounts(t)
        x, y, z = p[..., 0] * (1 + taper * p[..., 2]), p[..., 1] * (1 + taper * p[..., 2]), p[..., 2]
        c, s = np.cos(twist * z), np.sin(twist * z)
        x, y = c * x - s * y, s * x + c * y
        return np.stack([x + bend * z**2, y, z], -1)

    def _undeform(self, p: np.ndarray, t: float) -> np.ndarray:
        taper, twist, bend = self._amounts(t)
        x, y, z = p[..., 0] - bend * p[..., 2] ** 2, p[..., 1], p[..., 2]
        c, s = np.cos(twist * z), np.sin(twist * z)
        x, y = c * x + s * y, -s * x + c * y
        factor = 1 + taper * z
        return np.stack([x / factor, y / factor, z], -1)

    # -- public -------------------------------------------------------------------
    def inside(self, points: np.ndarray, t: float) -> np.ndarray:
        """bool ``[...]``: which of ``points`` ``[..., 3]`` lie inside the solid at time ``t``."""
        rotation, shift = self._rigid(t)
        local = ((points - shift) @ rotation) / self.scale  # rigid inverse: R^T (p - shift)
        if self.kind == "chain":
            radius = self.size[0]
            result = np.zeros(points.shape[:-1], dtype=bool)
            for (bone_rotation, centre), length in zip(self._bone_frames(t), self.bones, strict=True):
                result |= _capsule_inside((local - centre) @ bone_rotation, length / 2, radius)
            return result
        return _primitive_inside(self.kind, self.size, self._undeform(local, t))

    def rest_surface(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``[n, 4]``: rest-space surface samples; the last column is the bone index (chains) or 0."""
        if self.kind != "chain":
            return np.concatenate([_primitive_surface(self.kind, self.size, n, rng), np.zeros((n, 1))], -1)
        radius, lengths = self.size[0], self.bones
        areas = 2 * math.pi * radius * lengths + 4 * math.pi * radius**2
        bone = rng.choice(len(lengths), size=n, p=areas / areas.sum())
        points = np.empty((n, 3))
        for i, length in enumerate(lengths):
            chosen = bone == i
            capsule = np.array([radius, radius, length / 2])
            points[chosen] = _primitive_surface("capsule", capsule, int(chosen.sum()), rng)
        return np.concatenate([points, bone[:, None].astype(np.float64)], -1)

    def pose(self, rest: np.ndarray, t: float) -> np.ndarray:
        """``[n, 3]``: rest surface samples (from :meth:`rest_surface`) carried to time ``t``."""
        rotation, shift = self._rigid(t)
        if self.kind == "chain":
            local = np.empty((len(rest), 3))
            for i, (bone_rotation, centre) in enumerate(self._bone_frames(t)):
                on = rest[:, 3] == i
                local[on] = rest[on, :3] @ bone_rotation.T + centre
        else:
            local = self._deform(rest[:, :3], t)
        return (local * self.scale) @ rotation.T + shift

    def on_surface(self, rest: np.ndarray, times: np.ndarray, eps: float = 1e-3) -> np.ndarray:
        """bool ``[n]``: rest samples that stay on the outer surface at every time (a chain's capsule
        ends sink into their neighbours)."""
        if self.kind != "chain":
            return np.ones(len(rest), dtype=bool)
        keep = np.ones(len(rest), dtype=bool)
        for t in times:
            posed = self.pose(rest, t)
            rotation, shift = self._rigid(t)
            local = ((posed - shift) @ rotation) / self.scale
            for i, ((bone_rotation, centre), length) in enumerate(zip(self._bone_frames(t), self.bones, strict=True)):
                other = rest[:, 3] != i
                deeper = _capsule_inside((local - centre) @ bone_rotation, length / 2, self.size[0] - eps)
                keep &= ~(other & deeper)
        return keep


# ----------------------------------------------------------------------------- sampling


def _check_positive_int(name: str, value: object, low: int = 1) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def make_shape(seed: int, kind: str | None = None) -> DeformingShape:
    """A random deforming shape, deterministic from ``seed``; ``kind`` one of :data:`PRIMITIVES`,
    ``"chain"`` or None (any, chains one time in three)."""
    _check_positive_int("seed", seed, 0)
    if kind is not None and kind not in (*PRIMITIVES, "chain"):
        raise ValueError(f"kind must be one of {(*PRIMITIVES, 'chain')} or None, got {kind!r}")
    rng = np.random.default_rng([seed, 4])
    if kind is None:
        kind = "chain" if rng.uniform() < 1 / 3 else str(rng.choice(PRIMITIVES))
    spin = np.array([rng.uniform(0.1, 0.6), rng.uniform(0.3, 1.0), rng.uniform()])
    drift = np.stack([rng.uniform(0, 0.08, 3), rng.uniform(0.3, 1.0, 3), rng.uniform(size=3)], -1)
    axis = _unit(rng.normal(size=3))
    if kind == "chain":
        count = int(rng.integers(2, 5))
        joint_axes = _unit(np.concatenate([rng.normal(size=(count - 1, 2)), np.zeros((count - 1, 1))], -1))
        joints = np.stack(
            [rng.uniform(0.3, 1.0, count - 1), rng.uniform(0.5, 1.5, count - 1), rng.uniform(size=count - 1)], -1
        )
        shape = DeformingShape(
            kind, np.array([rng.uniform(0.06, 0.12)] * 3), spin=spin, axis=axis, drift=drift,
            bones=rng.uniform(0.25, 0.45, count), joints=joints, joint_axes=joint_axes,
        )  # fmt: skip
    else:
        size = {
            "sphere": lambda: np.array([rng.uniform(0.2, 0.35)] * 3),
            "ellipsoid": lambda: rng.uniform(0.12, 0.35, 3),
            "box": lambda: rng.uniform(0.1, 0.28, 3),
            "capsule": lambda: np.array([r := rng.uniform(0.08, 0.15), r, rng.uniform(0.1, 0.25)]),
            "torus": lambda: np.array([rng.uniform(0.18, 0.28), rng.uniform(0.05, 0.1), 0.0]),
        }[kind]()
        deform = np.stack(
            [[rng.uniform(0, 1.2), rng.uniform(0, 3.0), rng.uniform(0, 2.0)],  # taper, twist, bend amplitudes
             rng.uniform(0.3, 1.0, 3), rng.uniform(size=3)], -1,
        )  # fmt: skip
        shape = DeformingShape(kind, size, deform=deform, spin=spin, axis=axis, drift=drift)
    return _fit(shape, rng)


def _fit(shape: DeformingShape, rng: np.random.Generator) -> DeformingShape:
    """Scale the shape so that its surface stays inside the cube at 64 times across [0, 1]: the scale
    shrinks the shape, not its drift, so each coordinate is at most scale x (rotated extent) + |drift|."""
    rest = shape.rest_surface(4096, rng)
    times = np.linspace(0, 1, 64)
    drifts = [shape._rigid(t)[1] for t in times]
    extent = max(np.abs(shape.pose(rest, t) - drift).max() for t, drift in zip(times, drifts, strict=True))
    drift = max(np.abs(d).max() for d in drifts)
    return DeformingShape(**{**shape.__dict__, "scale": (0.95 * _BOX - drift) / extent})


def sample_sequence(
    seed: int,
    frames: int = 17,
    *,
    kind: str | None = None,
    points: int = 300,
    noise: float = 0.005,
    partial: bool = False,
    queries: int = 2048,
    near_surface: float = 0.5,
    correspondences: int = 1024,
) -> dict[str, np.ndarray | str]:
    """One training or evaluation sequence of :func:`make_shape` ``(seed, kind)``.

    Args:
        frames: frames at times ``linspace(0, 1, frames)``.
        points: input points per frame (fresh surface samples each frame, not corresponding).
        noise: standard deviation of the Gaussian noise on input points.
        partial: drop the input points that face away from a random view direction (one per sequence).
        queries: occupancy queries per frame; ``near_surface`` of them are surface samples moved by
            N(0, 0.025), the rest uniform in [-0.55, 0.55]^3.
        correspondences: rest-space surface samples posed at every frame.

    Returns:
        ``inputs`` float32 ``[T, points, 3]``, ``queries`` float32 ``[T, Q, 3]``, ``occupancy`` bool
        ``[T, Q]``, ``correspondences`` float32 ``[T, C, 3]``, ``times`` float32 ``[T]``, ``kind``.
    """
    _check_positive_int("frames", frames)
    for name, value in (("points", points), ("queries", queries), ("correspondences", correspondences)):
        _check_positive_int(name, value)
    if not (isinstance(noise, int | float) and noise >= 0) or not 0 <= near_surface <= 1:
        raise ValueError(f"noise must be >= 0 and near_surface in [0, 1], got {noise!r}, {near_surface!r}")
    shape = make_shape(seed, kind)
    rng = np.random.default_rng([seed, 5])
    times = np.linspace(0.0, 1.0, frames)
    view = _unit(rng.normal(size=3))

    def surface(n: int) -> np.ndarray:
        """``n`` rest samples that stay on the outer surface (chains drop the buried ones)."""
        out = np.empty((0, 4))
        while len(out) < n:
            rest = shape.rest_surface(2 * n, rng)
            out = np.concatenate([out, rest[shape.on_surface(rest, times)]])
        return out[:n]

    tracked = surface(correspondences)
    inputs, query_points, labels, corr = [], [], [], []
    for t in times:
        if partial:  # a depth view: keep the points on the side facing `view` (through the shape's centre)
            candidates = shape.pose(surface(4 * points), t)
            centre = candidates.mean(0)
            facing = (candidates - centre) @ view > 0
            cloud = candidates[facing][:points]
            if len(cloud) < points:  # a thin side: top up from the rest
                cloud = np.concatenate([cloud, candidates[~facing][: points - len(cloud)]])
        else:
            cloud = shape.pose(surface(points), t)
        inputs.append(cloud + rng.normal(scale=noise, size=cloud.shape))
        near = int(round(near_surface * queries))
        close = shape.pose(surface(max(near, 1)), t)[:near] + rng.normal(scale=0.025, size=(near, 3))
        uniform = rng.uniform(-0.55, 0.55, size=(queries - near, 3))
        q = np.concatenate([close, uniform])
        query_points.append(q)
        labels.append(shape.inside(q, t))
        corr.append(shape.pose(tracked, t))
    return {
        "inputs": np.stack(inputs).astype(np.float32),
        "queries": np.stack(query_points).astype(np.float32),
        "occupancy": np.stack(labels),
        "correspondences": np.stack(corr).astype(np.float32),
        "times": times.astype(np.float32),
        "kind": shape.kind,
    }
