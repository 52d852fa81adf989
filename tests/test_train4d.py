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
    pipe = Motion4DPipeline.from_pretrained(tmp_path / "run" / "model", device="cpu")
    assert pipe.config.deform_denoiser.temporal is False and pipe.config.shape_latent_std > 0
    weights = (tmp_path / "run" / "model" / "shape_vae.safetensors").stat().st_size
    parameters = sum(p.numel() for p in pipe.shape_vae.parameters())
    assert weights < 2 * parameters + 20_000  # stored in fp16


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


def test_time_budget_gives_each_stage_its_share():
    import time

    settings = train4d.Train4DSettings(config="tiny", minutes=20.0, shares=(0.3, 0.25, 0.15, 0.3))
    # 660 s gone (the first two stages' 55% of 1200 s): the third gets 0.15 / 0.45 of the 540 s left
    steps = train4d._steps(settings, 2, step_seconds=0.1, began=time.time() - 660)
    assert abs(steps - 1800) <= 20
    assert train4d._steps(settings, 3, step_seconds=0.1, began=time.time() - 840) == pytest.approx(3600, abs=40)
