import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from vgen.pipelines.tiny import TINY_FACTS, TINY_FAMILIES, build_tiny_pipeline, save_tiny_pipeline, tiny_call_kwargs


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_round_trip_generates_finite_video(family, tmp_path):
    path = save_tiny_pipeline(family, tmp_path / family)
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)

    facts = TINY_FACTS[family]
    assert type(pipe.transformer).__name__ == facts["transformer_class"]
    module_names = {name for name, _ in pipe.transformer.named_modules()}
    assert set(facts["self_attention_modules"]) <= module_names

    kwargs = tiny_call_kwargs(family)
    frames = pipe(prompt="a red circle moves left", generator=torch.Generator().manual_seed(0), **kwargs).frames

    frames = np.asarray(frames)
    assert frames.shape == (1, kwargs["num_frames"], kwargs["height"], kwargs["width"], 3)
    assert np.isfinite(frames).all()


def test_unknown_family_raises():
    with pytest.raises(ValueError, match="nope") as excinfo:
        build_tiny_pipeline("nope")
    assert all(family in str(excinfo.value) for family in TINY_FAMILIES)
