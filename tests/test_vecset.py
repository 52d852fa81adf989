"""Vector-set autoencoders: farthest-point sampling against brute force, learning occupancy and motion of a
procedural deforming shape, bad input."""

import numpy as np
import pytest
import torch

from vgen.data.deforming import sample_sequence
from vgen.models.vecset import DeformationVAE, ShapeVAE, VecSetConfig, farthest_point_sample, fourier_features

TINY = VecSetConfig(num_latents=32, width=64, heads=2, latent_dim=8, decoder_layers=1, frequencies=4)


def test_farthest_point_sampling_matches_brute_force():
    points = torch.rand(2, 60, 3)
    chosen = farthest_point_sample(points, 10)
    for b in range(2):
        expected = [0]
        for _ in range(9):
            distance = torch.cdist(points[b], points[b, expected]).min(1).values
            expected.append(int(distance.argmax()))
        assert chosen[b].tolist() == expected
    assert fourier_features(points, 4).shape == (2, 60, 27)


@pytest.mark.parametrize("n, count", [(1, 1), (37, 37), (300, 64), (2048, 40)])
def test_fps_kernel_picks_what_the_pytorch_loop_picks(n, count):
    from vgen.kernels.fps import farthest_point_sample as kernel
    from vgen.kernels.fps import farthest_point_sample_reference as reference

    points = torch.randn(3, n, 3) * torch.tensor([1.0, 0.5, 2.0])
    assert torch.equal(kernel(points, count), reference(points, count))
    strided = torch.randn(2, 3, n).transpose(1, 2)  # not contiguous
    assert torch.equal(kernel(strided, count), reference(strided, count))
    with pytest.raises(ValueError, match="count must be"):
        kernel(points, n + 1)
    with pytest.raises(ValueError, match=r"points must be \[B, N, 3\]"):
        kernel(points[..., :2], 1)


def iou(logits: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = logits > 0
    return ((predicted & labels).sum() / (predicted | labels).sum().clamp(min=1)).item()


def test_shape_vae_learns_occupancy_of_a_deforming_shape():
    torch.manual_seed(0)
    seq = sample_sequence(2, frames=2, kind="ellipsoid", points=256, queries=1024, correspondences=8)
    points = torch.from_numpy(seq["inputs"])  # two frames of one shape: a batch of 2
    queries, labels = torch.from_numpy(seq["queries"]), torch.from_numpy(seq["occupancy"])
    model = ShapeVAE(TINY)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    train, held = slice(0, 768), slice(768, None)
    for _ in range(150):
        logits, kl = model(points, queries[:, train])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[:, train].float()) + 1e-4 * kl
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        latent, _ = model.encode(points, sample=False)
        score = iou(model.decode(latent, queries[:, held])[..., 0], labels[:, held])
    assert score > 0.75, score


def test_deformation_vae_learns_a_motion():
    torch.manual_seed(0)
    seq = sample_sequence(4, frames=2, kind="box", points=8, queries=8, correspondences=512)
    corr = torch.from_numpy(seq["correspondences"])
    reference, moved = corr[:1], corr[1:]
    model = DeformationVAE(TINY)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(300):
        offsets, kl = model(reference, moved, reference[:, :384])
        loss = (offsets - (moved - reference)[:, :384]).square().sum(-1).mean() + 1e-5 * kl
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        latent, _ = model.encode(reference, moved, sample=False)
        error = (model.decode(latent, reference[:, 384:]) - (moved - reference)[:, 384:]).norm(dim=-1).mean()
    baseline = (moved - reference)[:, 384:].norm(dim=-1).mean()  # predicting no motion
    assert error < 0.3 * baseline, (error.item(), baseline.item())


def test_bad_input_is_named():
    model = ShapeVAE(TINY)
    with pytest.raises(ValueError, match=r"points must be \[B, N, 3\]"):
        model.encode(torch.rand(1, 64, 2))
    with pytest.raises(ValueError, match="NaN"):
        model.encode(torch.full((1, 64, 3), float("nan")))
    with pytest.raises(ValueError, match="at least num_latents=32 points"):
        model.encode(torch.rand(1, 10, 3))
    with pytest.raises(ValueError, match="correspond point by point"):
        DeformationVAE(TINY).encode(torch.rand(1, 64, 3), torch.rand(1, 63, 3))
    with pytest.raises(ValueError, match="multiple of heads"):
        VecSetConfig(width=30, heads=4)
    assert np.isfinite(model.encode(torch.rand(1, 64, 3))[1].item())
