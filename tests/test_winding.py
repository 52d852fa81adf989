"""The winding-number kernel against the fp64 PyTorch formula and against geometry with known answers."""

import math

import numpy as np
import pytest
import torch
import trimesh

from vgen.kernels.winding import winding_number, winding_number_cpu, winding_number_reference


def _torus(rng) -> trimesh.Trimesh:
    return trimesh.creation.torus(major_radius=0.3, minor_radius=rng.uniform(0.06, 0.12), major_sections=24,
                                  minor_sections=10)  # fmt: skip


@pytest.mark.parametrize("queries", [1, 63, 130])  # ragged against the 64-point blocks
def test_kernel_matches_the_fp64_formula_on_closed_and_open_meshes(queries):
    rng = np.random.default_rng(queries)
    mesh = _torus(rng)  # 480 faces, 443 with holes: ragged against the 32-face tiles
    faces = mesh.faces[rng.permutation(len(mesh.faces))[: len(mesh.faces) - 37]]  # holes: fractional numbers
    for f in (mesh.faces, faces):
        v = torch.tensor(mesh.vertices + rng.normal(scale=0.01, size=mesh.vertices.shape), dtype=torch.float32)
        f = torch.tensor(f)
        p = torch.tensor(rng.uniform(-0.5, 0.5, size=(queries, 3)), dtype=torch.float32)
        got, want = winding_number(v, f, p), winding_number_reference(v, f, p)
        assert got.dtype == torch.float32 and got.shape == (queries,)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_compiled_cpu_path_matches_the_eager_formula():
    """The compiled CPU path (chunks of 256 points) against the eager fp64 reference, ragged sizes, a mesh
    with holes; and the empty cases."""
    rng = np.random.default_rng(7)
    mesh = _torus(rng)
    v = torch.tensor(mesh.vertices + rng.normal(scale=0.01, size=mesh.vertices.shape), dtype=torch.float32)
    f = torch.tensor(mesh.faces[rng.permutation(len(mesh.faces))[:401]])
    p = torch.tensor(rng.uniform(-0.5, 0.5, size=(300, 3)), dtype=torch.float32)
    got = winding_number_cpu(v, f, p)
    assert got.dtype == torch.float64 and got.shape == (300,)
    torch.testing.assert_close(got, winding_number_reference(v, f, p), atol=1e-9, rtol=0)
    assert winding_number_cpu(v, f, p[:0]).shape == (0,) and winding_number_cpu(v, f[:0], p).eq(0).all()
    with pytest.raises(ValueError, match="faces must be integer"):
        winding_number_cpu(v, f.float(), p)


def test_winding_numbers_of_a_torus_are_one_inside_and_zero_outside():
    mesh = trimesh.creation.torus(major_radius=0.3, minor_radius=0.1, major_sections=48, minor_sections=24)
    rng = np.random.default_rng(0)
    points = rng.uniform(-0.45, 0.45, size=(200, 3))
    ring = np.sqrt(np.square(points[:, :2]).sum(1)) - 0.3
    distance = np.sqrt(ring**2 + points[:, 2] ** 2) - 0.1
    far = np.abs(distance) > 0.01  # the tessellation is within 0.01 of the analytic torus
    got = winding_number(torch.tensor(mesh.vertices), torch.tensor(mesh.faces), torch.tensor(points)).numpy()
    np.testing.assert_allclose(got[far], (distance[far] < 0).astype(float), atol=1e-3)
    assert (distance < 0).sum() > 5 and far.sum() > 150
    flipped_faces = torch.tensor(mesh.faces[:, ::-1].copy())
    flipped = winding_number(torch.tensor(mesh.vertices), flipped_faces, torch.tensor(points))
    np.testing.assert_allclose(flipped.numpy(), -got, atol=1e-5)


def test_empty_inputs_and_bad_shapes():
    v, f = torch.rand(4, 3), torch.tensor([[0, 1, 2], [0, 2, 3]])
    assert winding_number(v, f, torch.zeros(0, 3)).shape == (0,)
    assert winding_number(v, f[:0], torch.rand(5, 3)).eq(0).all()
    with pytest.raises(ValueError, match="points must be"):
        winding_number(v, f, torch.rand(5, 2))
    with pytest.raises(ValueError, match="faces index vertices 0..3"):
        winding_number(v, f + 2, torch.rand(5, 3))
    with pytest.raises(ValueError, match="faces must be integer"):
        winding_number(v, f.float(), torch.rand(5, 3))


def test_a_flat_square_seen_from_above_its_centre():
    """A unit square at height 1/2 below the point subtends 4 arcsin(1/2) = 2 pi / 3: winding number 1/6."""
    square = torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.5, 0.5, 0.0], [-0.5, 0.5, 0.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    point = torch.tensor([[0.0, 0.0, 0.5]])
    for number in (winding_number(square, faces, point), winding_number_reference(square, faces, point)):
        assert math.isclose(float(number.abs()), 1 / 6, rel_tol=1e-5)
