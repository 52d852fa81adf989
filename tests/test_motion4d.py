"""4D reconstruction pipeline: geometry through marching cubes and per-vertex motion, files, CLI, bad input."""

import numpy as np
import pytest
import torch

from vgen.models.latent_diffusion import DenoiserConfig
from vgen.models.vecset import VecSetConfig
from vgen.pipelines.motion4d import Motion4DConfig, Motion4DPipeline, check_point_sequence, render_strip

SET = VecSetConfig(num_latents=16, width=32, heads=2, latent_dim=4, decoder_layers=1, frequencies=2)
CONFIG = Motion4DConfig(
    shape=SET, deform=SET,
    shape_denoiser=DenoiserConfig(latent_dim=4, width=32, heads=2, layers=1, frequencies=2, point_tokens=4),
    deform_denoiser=DenoiserConfig(latent_dim=4, shape_dim=4, width=32, heads=2, layers=1, frequencies=2,
                                   point_tokens=4),
)  # fmt: skip


def oracle(pipe: Motion4DPipeline, radius: float = 0.3, shift=(0.05, 0.0, -0.02)) -> None:
    """Replace the decoders by a known sphere and a known motion: t-th frame moved by t * shift."""
    pipe.shape_vae.decode = lambda latent, q: (radius - q.norm(dim=-1, keepdim=True))
    move = torch.tensor(shift)
    calls = iter(range(1, 100))
    pipe.deform_vae.decode = lambda latent, q: move * next(calls) + torch.zeros_like(q)


def test_sphere_and_motion_come_out_with_shared_faces(tmp_path):
    torch.manual_seed(0)
    pipe = Motion4DPipeline(CONFIG)
    oracle(pipe)
    points = np.random.default_rng(0).uniform(-0.3, 0.3, size=(3, 32, 3)).astype(np.float32)
    recon = pipe(points, steps=2, resolution=24, progress=False)
    assert recon.vertices.shape[0] == 3 and recon.faces.shape[1] == 3
    radii = np.linalg.norm(recon.vertices[0], axis=1)
    assert np.abs(radii - 0.3).max() < 1.1 / 23  # within a grid cell of the sphere
    np.testing.assert_allclose(recon.vertices[2] - recon.vertices[0], np.tile([0.1, 0.0, -0.04], (len(radii), 1)),
                               atol=1e-6)  # fmt: skip
    import trimesh

    paths = recon.save(tmp_path / "obj")
    back = trimesh.load(paths[1], process=False)
    np.testing.assert_allclose(back.vertices, recon.vertices[1], atol=1e-5)
    assert np.array_equal(back.faces, recon.faces)
    assert recon.save(tmp_path / "ply", "ply")[0].suffix == ".ply"
    strip = render_strip(recon, size=64)
    assert strip.shape == (64, 192, 3) and strip.std() > 5  # something was drawn


def test_save_and_load_give_the_same_reconstruction(tmp_path):
    torch.manual_seed(1)
    pipe = Motion4DPipeline(CONFIG)
    folder = pipe.save_pretrained(tmp_path / "m")
    again = Motion4DPipeline.from_pretrained(folder, device="cpu")
    for name, module in pipe.modules().items():
        for (k, a), b in zip(module.state_dict().items(), again.modules()[name].state_dict().values(), strict=True):
            assert torch.equal(a, b), (name, k)
    oracle(pipe)
    oracle(again)
    points = np.random.default_rng(0).uniform(-0.3, 0.3, size=(2, 32, 3))
    np.testing.assert_array_equal(pipe(points, steps=2, resolution=16, progress=False).vertices,
                                  again(points, steps=2, resolution=16, progress=False).vertices)  # fmt: skip


def test_reconstruct_cli(tmp_path, monkeypatch):
    from vgen import cli

    Motion4DPipeline(CONFIG).save_pretrained(tmp_path / "m")
    real = Motion4DPipeline.from_pretrained

    def patched(folder, device=None):
        pipe = real(folder, device)
        oracle(pipe)
        return pipe

    monkeypatch.setattr(Motion4DPipeline, "from_pretrained", staticmethod(patched))
    np.savez(tmp_path / "seq.npz", points=np.random.default_rng(0).uniform(-0.3, 0.3, size=(3, 40, 3)))
    assert cli.main(["reconstruct", "--points", str(tmp_path / "seq.npz"), "--model", str(tmp_path / "m"),
                     "--out", str(tmp_path / "out"), "--steps", "2", "--resolution", "16"]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "frame_000.obj", "frame_001.obj", "frame_002.obj", "frames.png"]  # fmt: skip


def test_bad_point_sequences_are_named():
    with pytest.raises(ValueError, match="same number of points"):
        check_point_sequence([np.zeros((5, 3)), np.zeros((6, 3))])
    with pytest.raises(ValueError, match="NaN"):
        check_point_sequence(np.full((2, 5, 3), np.nan))
    with pytest.raises(ValueError, match=r"\[frames, points, 3\]"):
        check_point_sequence(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 10 points"):
        check_point_sequence(np.zeros((2, 5, 3)), min_points=10)
