"""Procedural deforming shapes: exact occupancy against the sampled surface, correspondences, bounds, errors."""

import numpy as np
import pytest

from vgen.data.deforming import PRIMITIVES, make_shape, sample_sequence


@pytest.mark.parametrize("kind", [*PRIMITIVES, "chain"])
def test_surface_samples_sit_on_the_occupancy_boundary(kind):
    shape = make_shape(3, kind)
    rng = np.random.default_rng(0)
    rest = shape.rest_surface(400, rng)
    rest = rest[shape.on_surface(rest, np.linspace(0, 1, 5))]
    for t in (0.0, 0.37, 1.0):
        posed = shape.pose(rest, t)
        steps = rng.normal(size=(len(posed), 3))
        steps *= 2e-3 / np.linalg.norm(steps, axis=1, keepdims=True)
        # a small step off a surface point lands inside about half the time; a wrong inverse map would not
        inside = shape.inside(posed + steps, t).mean()
        assert 0.3 < inside < 0.7, (kind, t, inside)
        assert not shape.inside(np.full((1, 3), 0.549), t).any() or kind == "box"  # a cube corner is outside


@pytest.mark.parametrize("kind", ["twist", "chain"])
def test_deformations_invert_and_chains_stay_rigid(kind):
    if kind == "twist":
        shape = make_shape(5, "box")
        p = np.random.default_rng(1).uniform(-0.3, 0.3, size=(100, 3))
        for t in (0.1, 0.8):
            np.testing.assert_allclose(shape._undeform(shape._deform(p, t), t), p, atol=1e-12)
    else:
        shape = make_shape(6, "chain")
        rest = shape.rest_surface(200, np.random.default_rng(2))
        same = rest[:, 3] == 0
        a, b = shape.pose(rest, 0.0)[same], shape.pose(rest, 0.9)[same]
        np.testing.assert_allclose(np.linalg.norm(a[1:] - a[0], axis=1), np.linalg.norm(b[1:] - b[0], axis=1))
        assert np.abs(shape.pose(rest, 0.0) - shape.pose(rest, 0.9)).max() > 0.01  # it does move


def test_sequences_are_deterministic_bounded_and_labelled():
    seq = sample_sequence(11, frames=4, points=64, queries=256, correspondences=50)
    again = sample_sequence(11, frames=4, points=64, queries=256, correspondences=50)
    for key in ("inputs", "queries", "occupancy", "correspondences"):
        assert np.array_equal(seq[key], again[key])
    assert seq["inputs"].shape == (4, 64, 3) and seq["queries"].shape == (4, 256, 3)
    assert seq["occupancy"].shape == (4, 256) and seq["correspondences"].shape == (4, 50, 3)
    assert np.abs(seq["correspondences"]).max() <= 0.5 and np.abs(seq["inputs"]).max() < 0.53
    occupied = seq["occupancy"][:, 128:].mean()  # the uniform half
    assert 0.01 < occupied < 0.6 and seq["occupancy"][:, :128].mean() > occupied  # near-surface ones more often
    partial = sample_sequence(11, frames=2, points=64, partial=True, noise=0.0, queries=8, correspondences=8)
    assert partial["inputs"].shape == (2, 64, 3)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="kind must be one of"):
        make_shape(0, "cone")
    with pytest.raises(ValueError, match="frames must be an int >= 1"):
        sample_sequence(0, frames=0)
    with pytest.raises(ValueError, match="points must be an int >= 1"):
        sample_sequence(0, points=2.5)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        sample_sequence(0, noise=-1.0)
