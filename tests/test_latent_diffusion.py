"""EDM preconditioning and Heun sampling against an oracle, the interleaved-attention denoiser, bad input."""

import pytest
import torch

from vgen.models.latent_diffusion import EDM, DenoiserConfig, LatentSetDenoiser

TINY = DenoiserConfig(latent_dim=4, shape_dim=6, width=32, heads=2, layers=2, frequencies=2, point_tokens=4)


def test_heun_sampler_with_an_oracle_denoiser_lands_on_the_data():
    edm = EDM(sigma_data=0.5)
    target = torch.randn(2, 3, 5, 4)

    def oracle(scaled, c_noise):  # the raw output that makes D(x; sigma) = target exactly
        s = (4 * c_noise).exp().view(-1, 1, 1, 1)
        total = s**2 + edm.sigma_data**2
        x = scaled * total.sqrt()
        return (target - edm.sigma_data**2 / total * x) / (s * edm.sigma_data / total.sqrt())

    out = edm.sample(oracle, target.shape, steps=6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target, atol=1e-4, rtol=1e-4)
    sigmas = edm.sigmas(6)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002) and sigmas[-1] == 0


def test_denoiser_mixes_space_time_and_conditions():
    torch.manual_seed(0)
    model = LatentSetDenoiser(TINY)
    torch.nn.init.normal_(model.out[1].weight, std=0.1)  # the zero-initialised head would hide everything
    for block in model.blocks:
        torch.nn.init.normal_(block.modulation.weight, std=0.01)
    x, points, shape = torch.randn(1, 3, 5, 4), torch.rand(1, 3, 16, 3), torch.randn(1, 7, 6)
    c_noise = torch.tensor([0.1])
    base = model(x, c_noise, points, shape)
    assert base.shape == x.shape
    moved = x.clone()
    moved[0, 2, 4] += 1.0  # frame 2, latent 4
    changed = (model(moved, c_noise, points, shape) - base).abs().amax(-1)[0]
    assert changed[0, 4] > 1e-4  # temporal attention: frame 0, same index
    assert changed[2, 0] > 1e-4  # spatial attention: same frame, another index
    other_points = points.clone()
    other_points[0, 1] += 0.1
    assert (model(x, c_noise, other_points, shape) - base)[0, 1].abs().max() > 1e-4
    assert (model(x, c_noise, points, shape + 1) - base).abs().max() > 1e-4


def test_frame_positions_break_the_temporal_attention_s_blindness_to_order():
    """Without frame positions, reordering the frames (latents and point clouds) reorders the output; with
    them (once trained away from their zero start) it does not; a config saved before them loads without."""
    import dataclasses

    torch.manual_seed(1)
    x, points, shape = torch.randn(1, 4, 5, 4), torch.rand(1, 4, 16, 3), torch.randn(1, 7, 6)
    order = torch.tensor([3, 1, 0, 2])
    for positions in (False, True):
        model = LatentSetDenoiser(dataclasses.replace(TINY, frame_positions=positions))
        torch.nn.init.normal_(model.out[1].weight, std=0.1)
        if positions:
            assert (model.frame_in.weight == 0).all()  # no embedding until trained
            torch.nn.init.normal_(model.frame_in.weight, std=0.5)
        c_noise = torch.tensor([0.1])
        reordered = model(x[:, order], c_noise, points[:, order], shape)
        gap = (reordered - model(x, c_noise, points, shape)[:, order]).abs().max()
        assert (gap > 1e-3) if positions else (gap < 1e-5), (positions, gap)
    assert DenoiserConfig(**{k: v for k, v in dataclasses.asdict(TINY).items() if k != "frame_positions"}) == TINY


def test_edm_training_reduces_the_loss():
    torch.manual_seed(0)
    model = LatentSetDenoiser(TINY)
    edm = EDM(sigma_data=1.0)
    clean, points, shape = torch.randn(8, 2, 5, 4), torch.rand(8, 2, 16, 3), torch.randn(8, 7, 6)
    clean = clean * 0.1 + points.mean(2, keepdim=True)[..., :1]  # latents that depend on the points
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator_state = torch.get_rng_state()
    first = edm.loss(model, clean, points=points, shape=shape).item()
    for _ in range(150):
        loss = edm.loss(model, clean, points=points, shape=shape)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    torch.set_rng_state(generator_state)
    assert edm.loss(model, clean, points=points, shape=shape).item() < 0.5 * first


def test_bad_input_is_named():
    model = LatentSetDenoiser(TINY)
    with pytest.raises(ValueError, match=r"x must be \[B, T, M, 4\]"):
        model(torch.randn(1, 5, 4), torch.zeros(1), torch.rand(1, 1, 16, 3), torch.randn(1, 7, 6))
    with pytest.raises(ValueError, match="points must be"):
        model(torch.randn(1, 2, 5, 4), torch.zeros(1), torch.rand(1, 3, 16, 3), torch.randn(1, 7, 6))
    with pytest.raises(ValueError, match="at least point_tokens=4 points"):
        model(torch.randn(1, 2, 5, 4), torch.zeros(1), torch.rand(1, 2, 3, 3), torch.randn(1, 7, 6))
    with pytest.raises(ValueError, match="shape must be given exactly"):
        model(torch.randn(1, 2, 5, 4), torch.zeros(1), torch.rand(1, 2, 16, 3))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        EDM().sigmas(0)
