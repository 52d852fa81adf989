"""4D metrics on meshes whose answers are known: a sphere against its analytic occupancy and surface."""

import numpy as np
import pytest
import trimesh

from vgen.metrics4d import chamfer_l1, correspondence_l2, inside_mesh, iou, sample_surface


def test_winding_number_occupancy_and_iou_of_a_sphere():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    points = np.random.default_rng(0).uniform(-0.5, 0.5, size=(3000, 3))
    truth = np.linalg.norm(points, axis=1) <= 0.3
    inside = inside_mesh(sphere.vertices, sphere.faces, points)
    assert iou(inside, truth) > 0.97
    assert iou(inside_mesh(sphere.vertices + 0.2, sphere.faces, points), truth) < 0.6  # a shifted sphere
    assert iou(inside_mesh(sphere.vertices, sphere.faces[:, ::-1], points), truth) > 0.97  # wound the other way
    assert iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_chamfer_and_correspondence_of_known_meshes():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.3)
    truth = sample_surface(sphere.vertices, sphere.faces, 20000, seed=1)
    assert chamfer_l1(sphere.vertices, sphere.faces, truth, samples=20000) < 0.004
    bigger = chamfer_l1(sphere.vertices * 1.2, sphere.faces, truth, samples=20000)
    assert bigger == pytest.approx(0.06, abs=0.006)  # radius 0.36 against 0.3
    moved = np.stack([sphere.vertices, sphere.vertices + [0.1, 0, 0]])
    gt = np.stack([sphere.vertices, sphere.vertices + [0.1, 0, 0]])
    np.testing.assert_allclose(correspondence_l2(moved, gt), [0.0, 0.0], atol=1e-12)
    gt_wrong = np.stack([sphere.vertices, sphere.vertices])
    np.testing.assert_allclose(correspondence_l2(moved, gt_wrong), [0.0, 0.1], atol=1e-12)


def test_marching_cubes_meshes_wind_outward_and_contain_their_inside():
    from vgen.pipelines.motion4d import _BOX, _marching_cubes

    resolution = 24
    axis = np.linspace(-_BOX, _BOX, resolution)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)
    vertices, faces = _marching_cubes((0.35 - np.linalg.norm(grid, axis=-1)).astype(np.float32), resolution)
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.volume > 0  # outward normals: positive signed volume
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.35**3, rel=0.05)
    points = np.random.default_rng(2).uniform(-0.5, 0.5, size=(2000, 3))
    assert iou(inside_mesh(vertices, faces, points), np.linalg.norm(points, axis=1) <= 0.35) > 0.95
