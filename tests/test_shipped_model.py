"""The shipped reference model in assets/reference: format, size, and that stock diffusers and vgen load it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from safetensors import safe_open

from vgen import VideoPipeline
from vgen.models import REFERENCE

MODEL = Path(__file__).resolve().parents[1] / "assets" / "reference" / "model"


def test_weights_are_small_bf16_safetensors():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 60 * 10**6
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"vae", "text_encoder", "transformer"}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth")]
    for path in weights:
        with safe_open(path, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, path


def test_config_is_the_reference_size():
    transformer = json.loads((MODEL / "transformer" / "config.json").read_text())
    vae = json.loads((MODEL / "vae" / "config.json").read_text())
    width = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    assert width == REFERENCE.heads * REFERENCE.head_dim
    assert vae["z_dim"] == REFERENCE.z_dim and vae["latents_std"] != [1.0] * REFERENCE.z_dim  # trained statistics
    assert REFERENCE.video_tokens() == 9216


@pytest.mark.parametrize("loader", ["diffusers", "vgen"])
def test_loads_and_generates(loader):
    args = dict(num_frames=5, height=32, width=32, num_inference_steps=2)
    if loader == "diffusers":
        pipe = WanPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        video = pipe("a red circle moves left", generator=torch.Generator().manual_seed(0), output_type="np", **args)
        video = video.frames[0]
    else:
        pipe = VideoPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, device="cpu")
        video = pipe("a red circle moves left", progress=False, **args)
    assert video.shape == (5, 32, 32, 3) and np.isfinite(video).all() and video.std() > 0.01
