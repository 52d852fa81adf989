"""The `window` method: against an fp32 reference with the token-expanded mask, through a pipeline, bad configs."""

import numpy as np
import pytest
import torch

from vgen import VideoPipeline
from vgen.attention import VideoLayout, create_method, local_window_mask
from vgen.kernels.reference import attention_reference
from vgen.models import TINY, build_reference_pipeline, save_pipeline


def _token_window(layout: VideoLayout, window) -> torch.Tensor:
    """Token-level window mask [S, S] built directly from coordinates (text rows/columns all kept)."""
    t, y, x = torch.meshgrid(*(torch.arange(n) for n in (layout.frames, layout.height, layout.width)), indexing="ij")
    coords = torch.stack([t.flatten(), y.flatten(), x.flatten()], 1)
    keep = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for axis, reach in enumerate(window):
        if reach is not None:
            keep &= (coords[:, None, axis] - coords[None, :, axis]).abs() <= reach
    full = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool)
    video = slice(layout.text_before, layout.text_before + len(coords))
    full[video, video] = keep
    return full


@pytest.mark.parametrize("text_before", [0, 5])
def test_window_matches_the_block_mask_reference(text_before):
    torch.manual_seed(text_before)
    layout = VideoLayout(frames=3, height=5, width=7, text_before=text_before)  # ragged: 105 or 110 tokens
    q, k, v = (torch.randn(2, layout.seq_len, 3, 32) for _ in range(3))
    method = create_method("window", window=(1, 1, 2), block_size=(16, 16))
    out = method(q, k, v, layout=layout, step=0, layer=0)
    mask = local_window_mask(layout, (1, 1, 2), (16, 16))
    expected = attention_reference(q, k, v, mask=mask.expand_tokens())
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    # blocks are a superset of the token window, and a real reduction
    tokens = mask.expand_tokens()[0, 0]
    assert tokens[_token_window(layout, (1, 1, 2))].all()
    assert method.last_density == pytest.approx(tokens.float().mean().item())
    assert 0.1 < method.last_density < 1.0


def test_unbounded_window_is_dense():
    layout = VideoLayout(frames=2, height=4, width=5)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16) for _ in range(3))
    method = create_method("window", window=(None, None, None), block_size=(16, 16))
    out = method(q, k, v, layout=layout, step=0, layer=0)
    torch.testing.assert_close(out, attention_reference(q, k, v), atol=2e-5, rtol=2e-5)
    assert method.last_density == 1.0


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref") / "model"
    return save_pipeline(build_reference_pipeline(TINY, seed=1), folder, dtype=torch.float32)


def test_window_in_a_pipeline(tiny_reference):
    pipe = VideoPipeline.from_pretrained(tiny_reference, torch_dtype=torch.float32, device="cpu")
    args = dict(num_frames=9, height=64, width=64, num_inference_steps=2, progress=False)  # 3 x 8 x 8 tokens
    dense = pipe("a red circle moves left", **args)
    pipe.enable_sparse_attention("window", window=[None, None, None], block_size=[16, 16])
    np.testing.assert_allclose(pipe("a red circle moves left", **args), dense, atol=1e-4)
    method = pipe.enable_sparse_attention("window", window=[0, 1, 1], block_size=[16, 16])
    sparse = pipe("a red circle moves left", **args)
    assert np.isfinite(sparse).all() and np.abs(sparse - dense).max() > 1e-3
    assert 0.0 < method.last_density < 0.6


def test_bad_window_configs_are_named():
    with pytest.raises(ValueError, match="window must be a"):
        create_method("window", window=(1, 2))
    with pytest.raises(ValueError, match="window reach along rows"):
        create_method("window", window=(1, -1, 2))
    with pytest.raises(ValueError, match="block_size entries must be powers of two"):
        create_method("window", block_size=(100, 128))
    method = create_method("window")
    layout = VideoLayout(frames=1, height=2, width=2)
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="bool key-padding mask"):
        method(q, q, q, layout=layout, step=0, layer=0, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout.s 4 tokens"):
        method(q[:, :3], q[:, :3], q[:, :3], layout=layout, step=0, layer=0)
