"""The 4D training script end to end at a tiny size, and the evaluation with known geometry."""

import json

import numpy as np
import pytest
import torch

from vgen.models import eval4d, train4d
from vgen.pipelines.motion4d import Motion4DPipeline


def test_tiny_training_writes_a_loadable_model(tmp_path):
    train4d.main(["--out", str(tmp_path / "run"), "--config", "tiny", "--device", "cpu", "--no-temporal",
                  "--set", "steps=[4,4,4,4]"])  # fmt: skip
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [log[k]["steps"] for k in ("shape_vae", "deform_vae", "shape_diffusion", "deform_diffusion")] == [4] * 4
    assert (tmp_path / "run" / "loss.png").exists()
    latents = log["latents"]  # the diffusion stages saw posterior samples: their spread, and channels at the prior
    assert latents["shape_std"] > 0 and latents["deform_std"] > 0
    assert 0 <= latents["shape_prior_share"] <= 1 and 0 <= latents["deform_prior_share"] <= 1
    pipe = Motion4DPipeline.from_pretrained(tmp_path / "run" / "model", device="cpu")
    assert pipe.config.deform_denoiser.temporal is False
    assert pipe.config.shape_latent_std == pytest.approx(latents["shape_std"])
    weights = (tmp_path / "run" / "model" / "shape_vae.safetensors").stat().st_size
    parameters = sum(p.numel() for p in pipe.shape_vae.parameters())
    assert weights < 2 * parameters + 20_000  # stored in fp16


def test_ablation_baseline_shares_every_network_but_the_deformation_denoiser(tmp_path):
    train4d.main(["--out", str(tmp_path / "run"), "--config", "tiny", "--device", "cpu",
                  "--set", "steps=[3,3,3,5]", "--set", "baseline=true"])  # fmt: skip
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["deform_diffusion"]["steps"] == log["deform_diffusion_baseline"]["steps"] == 5
    temporal = Motion4DPipeline.from_pretrained(tmp_path / "run" / "model", device="cpu")
    frame = Motion4DPipeline.from_pretrained(tmp_path / "run" / "baseline" / "model", device="cpu")
    assert temporal.config.deform_denoiser.temporal and not frame.config.deform_denoiser.temporal
    assert not frame.config.deform_denoiser.frame_positions
    assert frame.config.shape_latent_std == temporal.config.shape_latent_std
    for name in ("shape_vae", "deform_vae", "shape_denoiser"):
        a, b = getattr(temporal, name).state_dict(), getattr(frame, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a, b = temporal.deform_denoiser.state_dict(), frame.deform_denoiser.state_dict()
    assert a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a)  # trained apart
    with pytest.raises(ValueError, match="baseline=True .* needs temporal"):
        train4d.Train4DSettings(config="tiny", temporal=False, baseline=True)


def test_evaluation_scores_an_oracle_reconstruction(monkeypatch, tmp_path):
    """With oracle decoders (a sphere of radius 0.25, no motion) every metric is computed and in range."""
    from tests.test_motion4d import CONFIG, oracle

    torch.manual_seed(0)
    pipe = Motion4DPipeline(CONFIG)
    oracle(pipe, radius=0.25, shift=(0.0, 0.0, 0.0))
    result = eval4d.evaluate(pipe, sequences=1, frames=2, points=32, steps=1, resolution=16, chamfer_samples=2000)
    assert 0.0 <= result["iou"] <= 1.0 and result["chamfer_l1"] > 0 and np.isfinite(result["correspondence_l2"])
    assert result["iou"] > 0  # a sphere inside the held-out shape's box overlaps it (outward-wound meshes)
    assert all(len(v) == 2 for v in result["per_frame"].values())
    assert result["per_frame"]["correspondence_l2"][0] == pytest.approx(result["sequences"][0]["per_frame"][
        "correspondence_l2"][0])  # fmt: skip
    picture = eval4d.plot_per_frame({"model": {"temporal": True, **result}}, tmp_path / "e.png")
    assert picture.stat().st_size > 1000


def test_a_reconstruction_without_surface_counts_as_a_failure_not_a_crash(tmp_path):
    """One sequence's predicted occupancy empty (everything outside): IoU 0 there, distances from the rest."""
    from tests.test_motion4d import CONFIG, oracle

    torch.manual_seed(0)
    pipe = Motion4DPipeline(CONFIG)
    oracle(pipe, radius=0.25, shift=(0.0, 0.0, 0.0))
    sphere = pipe.shape_vae.decode
    calls = iter(range(10))
    pipe.shape_vae.decode = lambda latent, q: sphere(latent, q) - (10.0 if next(calls) == 0 else 0.0)  # 1st: empty
    result = eval4d.evaluate(pipe, sequences=2, frames=2, points=32, steps=1, resolution=16, chamfer_samples=2000)
    first, second = result["sequences"]
    assert first["failed"] and first["iou"] == 0.0 and np.isnan(first["chamfer_l1"])
    assert not second["failed"] and second["iou"] > 0
    assert result["failures"] == 1 and result["iou"] == pytest.approx(second["iou"] / 2)
    assert result["chamfer_l1"] == pytest.approx(second["chamfer_l1"])  # the failure stays out of the distances
    table = eval4d.write_report({"model": {"folder": "m", "temporal": True, **result}}, tmp_path, 2, 2, 1, 16)
    row = table.splitlines()[4]
    assert row.startswith(f"| m | yes | {result['iou']:.3f} | {result['chamfer_l1']:.4f} |") and row.endswith("| 1 |")


def test_time_budget_gives_each_stage_its_share():
    import time

    settings = train4d.Train4DSettings(config="tiny", minutes=20.0, shares=(0.3, 0.25, 0.15, 0.3))
    # 660 s gone (the first two stages' 55% of 1200 s): the third gets 0.15 / 0.45 of the 540 s left
    assert train4d._stage_seconds(settings, 2, began=time.time() - 660) == pytest.approx(180, abs=2)
    assert train4d._stage_seconds(settings, 3, began=time.time() - 840) == pytest.approx(360, abs=2)
    assert train4d._stage_seconds(settings, 0, began=time.time() - 2000) == 1.0  # overdue: a token second
    # with the baseline denoiser, a fifth stage as long as the fourth: the fourth gets half of what is left
    ablation = train4d.Train4DSettings(config="tiny", minutes=20.0, shares=(0.3, 0.25, 0.15, 0.3), baseline=True)
    assert train4d._stage_seconds(ablation, 3, began=time.time() - 840) == pytest.approx(180, abs=2)
    assert train4d._stage_seconds(ablation, 4, began=time.time() - 1020) == pytest.approx(180, abs=2)


def test_timed_stage_stops_at_its_deadline_and_decays_the_rate(monkeypatch):
    """--minutes: the stage runs until its time is spent (however slow its first steps), the rate falls."""
    clock = [1000.0]
    monkeypatch.setattr(train4d.time, "time", lambda: clock[0])
    settings = train4d.Train4DSettings(config="tiny", device="cpu", minutes=1.0, shares=(1.0, 1.0, 1.0, 1.0))
    weight = torch.nn.Parameter(torch.ones(3))
    rates = []

    def loss_fn():
        clock[0] += 30.0 if not rates else 1.0  # a slow first step (a compile), then 1 s a step
        rates.append(optimiser_rate())
        return weight.square().sum()

    optimiser_rate = lambda: None  # noqa: E731
    log = {}
    original = torch.optim.AdamW

    def spy(params, **kw):
        nonlocal optimiser_rate
        opt = original(params, **kw)
        optimiser_rate = lambda: opt.param_groups[0]["lr"]  # noqa: E731
        return opt

    monkeypatch.setattr(train4d.torch.optim, "AdamW", spy)
    train4d._run_stage("s", [weight], loss_fn, settings, 0, began=1000.0, log=log)
    # 60 s for four equal stages: this one gets 15 s, of which the first step took 30 -> one step only
    assert log["s"]["steps"] == 1
    settings = train4d.Train4DSettings(config="tiny", device="cpu", minutes=4.0, shares=(1.0, 1.0, 1.0, 1.0))
    clock[0], rates[:] = 1000.0, []
    train4d._run_stage("s", [weight], loss_fn, settings, 0, began=1000.0, log=log)
    assert log["s"]["steps"] == 31  # 60 s: 30 for the first step, then 30 of 1 s
    assert rates[0] == pytest.approx(settings.lr) and rates[-1] < 0.15 * settings.lr
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_evaluations_run_apart_merge_into_one_report(tmp_path):
    """Two --out folders (one model each) -> one table with both rows; differing settings are refused."""
    row = {"iou": 0.5, "chamfer_l1": 0.01, "correspondence_l2": 0.02,
           "per_frame": {"iou": [0.5, 0.5], "chamfer_l1": [0.01, 0.01], "correspondence_l2": [0.0, 0.04]}}
    eval4d.write_report({"model": {"folder": "a", "temporal": True, **row}}, tmp_path / "a", 3, 2, 18, 64)
    eval4d.write_report({"model": {"folder": "b", "temporal": False, **row, "iou": 0.25}}, tmp_path / "b", 3, 2, 18, 64)
    eval4d.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])
    table = (tmp_path / "m" / "eval4d.md").read_text()
    assert "| a | yes | 0.500 |" in table and "| b | no (per frame) | 0.250 |" in table
    assert len(json.loads((tmp_path / "m" / "eval4d.json").read_text())["models"]) == 2
    eval4d.write_report({"model": {"folder": "c", "temporal": False, **row}}, tmp_path / "c", 5, 2, 18, 64)
    with pytest.raises(ValueError, match="differ"):
        eval4d.main(["--merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "n")])
