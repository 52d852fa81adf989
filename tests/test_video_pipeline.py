"""VideoPipeline over the six diffusers pipelines: load, generate, save, errors."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from vgen import VideoPipeline
from vgen.pipelines.tiny import TINY_FAMILIES, tiny_call_kwargs
from vgen.pipelines.video import contact_sheet


def sizes(family):
    kwargs = tiny_call_kwargs(family)
    extra = {k: v for k, v in kwargs.items() if k not in ("num_frames", "height", "width", "num_inference_steps",
                                                           "guidance_scale", "output_type")}
    return kwargs, extra


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_round_trip_generates_like_diffusers(tiny_dirs, family):
    kwargs, extra = sizes(family)
    pipe = VideoPipeline.from_pretrained(tiny_dirs(family), device="cpu")
    assert type(pipe.pipeline).__name__ == type(DiffusionPipeline.from_pretrained(tiny_dirs(family))).__name__
    video = pipe("a red circle moves left", num_frames=kwargs["num_frames"], height=kwargs["height"],
                 width=kwargs["width"], num_inference_steps=kwargs["num_inference_steps"],
                 guidance_scale=kwargs.get("guidance_scale"), seed=3, progress=False, **extra)
    assert video.dtype == np.float32 and video.ndim == 4 and video.shape[-1] == 3
    assert video.shape[1:3] == (kwargs["height"], kwargs["width"])
    assert np.isfinite(video).all() and video.min() >= 0 and video.max() <= 1

    stock = DiffusionPipeline.from_pretrained(tiny_dirs(family))
    stock.set_progress_bar_config(disable=True)
    expected = stock("a red circle moves left", generator=torch.Generator().manual_seed(3), **kwargs).frames[0]
    np.testing.assert_allclose(video, expected, atol=1e-6, rtol=0)

    pipe.enable_sparse_attention("dense")
    assert pipe.attention_method.name == "dense" and "attention=dense" in repr(pipe)
    dense = pipe("a red circle moves left", num_frames=kwargs["num_frames"], height=kwargs["height"],
                 width=kwargs["width"], num_inference_steps=kwargs["num_inference_steps"],
                 guidance_scale=kwargs.get("guidance_scale"), seed=3, progress=False, **extra)
    np.testing.assert_allclose(dense, expected, atol=1e-6, rtol=0)
    pipe.disable_sparse_attention()
    assert pipe.attention_method is None


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".png"])
def test_save_formats(tmp_path, suffix):
    rng = np.random.default_rng(0)
    video = rng.random((5, 32, 48, 3), dtype=np.float32)
    path = VideoPipeline.save(video, tmp_path / f"clip{suffix}")
    assert path.stat().st_size > 0
    if suffix == ".png":
        from PIL import Image

        sheet = np.asarray(Image.open(path))
        assert sheet.shape == (2 + 34, 2 + 5 * 50, 3)
        np.testing.assert_array_equal(sheet[2:34, 2:50], (video[0] * 255).round().astype(np.uint8))
    else:
        import imageio.v3 as iio

        frames = iio.imread(path, index=None)
        assert frames.shape[0] == 5 and frames.shape[1:3] == (32, 48)


def test_contact_sheet_picks_evenly_spaced_frames():
    frames = np.stack([np.full((2, 2, 3), i, np.uint8) for i in range(40)])
    sheet = contact_sheet(frames, max_frames=4, columns=2, gap=1)
    assert sheet.shape == (7, 7, 3)
    assert [sheet[1, 1, 0], sheet[1, 4, 0], sheet[4, 1, 0], sheet[4, 4, 0]] == [0, 13, 26, 39]


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"path must end in \.mp4, \.gif or \.png"):
        VideoPipeline.save(np.zeros((2, 8, 8, 3)), tmp_path / "clip.avi")
    with pytest.raises(ValueError, match=r"video must be an array \[frames, height, width, 3\]"):
        VideoPipeline.save(np.zeros((8, 8, 3)), tmp_path / "clip.mp4")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoPipeline.from_pretrained(tmp_path / "nope")


def test_folder_not_in_diffusers_format(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers-format folder: it has no model_index.json"):
        VideoPipeline.from_pretrained(tmp_path)


def test_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline pipeline, which vgen does not support; "
                                         "supported: WanPipeline"):
        VideoPipeline.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def wan(tiny_dirs):
    return VideoPipeline.from_pretrained(tiny_dirs("wan"), device="cpu")


@pytest.mark.parametrize(
    "size, match",
    [({"num_frames": 8}, r"num_frames must be 1 \+ a multiple of 4 .* got 8, nearest valid: 5 or 9"),
     ({"height": 20}, r"height must be a multiple of 16 .* got 20, nearest valid: 16 or 32"),
     ({"width": 8}, r"width must be a multiple of 16 .* got 8, nearest valid: 16 or 16"),
     ({"num_frames": 0}, r"num_frames must be a positive int")],
)
def test_sizes_that_do_not_fit_are_named(wan, size, match):
    args = dict({"num_frames": 9, "height": 32, "width": 32}, **size)
    with pytest.raises(ValueError, match=match):
        wan("a red circle", num_inference_steps=1, progress=False, **args)


def test_token_grid(wan):
    grid = wan.token_grid(9, 32, 48)
    assert (grid.frames, grid.height, grid.width) == (3, 2, 3)


def test_unknown_method_and_key(wan):
    with pytest.raises(ValueError, match="unknown attention method 'nope'; available: dense"):
        wan.enable_sparse_attention("nope")
    with pytest.raises(ValueError, match="unknown config key"):
        wan.enable_sparse_attention("dense", topk=3)


def test_empty_prompt(wan):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        wan("  ")
