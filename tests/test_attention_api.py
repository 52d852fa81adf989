"""VideoLayout, the method registry and config validation."""

import pytest
import torch

from vgen.attention import MethodConfig, VideoLayout, available_methods, create_method
from vgen.kernels import attention_reference, dense_attention


def test_layout_counts_and_context():
    grid = VideoLayout(3, 4, 5)
    assert grid.num_video_tokens == 60 and grid.tokens_per_frame == 20 and grid.seq_len == 60
    before = grid.with_context(70, "before")
    assert (before.text_before, before.text_after, before.video_slice) == (10, 0, slice(10, 70))
    after = grid.with_context(66, "after")
    assert (after.text_before, after.text_after, after.video_slice, after.seq_len) == (0, 6, slice(0, 60), 66)
    assert str(after) == "3x4x5 video tokens + 6 text = 66"


@pytest.mark.parametrize(
    "args, match",
    [((0, 4, 5), "frames"), ((3, -1, 5), "height"), ((3, 4, 2.5), "width"), ((3, 4, 5, -1), "text_before")],
)
def test_layout_rejects_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        VideoLayout(*args)


@pytest.mark.parametrize("seq_len, position", [(59, "after"), (61, "none")])
def test_layout_rejects_sequences_that_do_not_fit(seq_len, position):
    with pytest.raises(ValueError, match="does not fit a video grid of 3x4x5"):
        VideoLayout(3, 4, 5).with_context(seq_len, position)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown attention method 'vmobaa'; available: .*dense"):
        create_method("vmobaa")
    assert "dense" in available_methods()


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'threshold' .*'dense'.*dense_steps, dense_layers"):
        create_method("dense", threshold=0.2)


@pytest.mark.parametrize(
    "config, match",
    [({"dense_steps": -1}, "dense_steps"), ({"dense_steps": 1.5}, "dense_steps"), ({"dense_layers": 3}, "dense_layers"),
     ({"dense_layers": [0, -2]}, "dense_layers")],
)
def test_config_values_are_checked(config, match):
    with pytest.raises(ValueError, match=match):
        create_method("dense", **config)


def test_config_normalises_layers():
    assert create_method("dense", dense_layers=[2, 0]).config == MethodConfig(dense_layers=(2, 0))


@pytest.mark.parametrize("seq", [1, 37, 64])
def test_dense_attention_matches_fp64_reference(seq):
    torch.manual_seed(seq)
    q, k, v = (torch.randn(2, seq, 3, 16, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, seq, seq) > 0.3
    mask[..., 0] = True
    out = dense_attention(q, k, v, scale=0.3, attn_mask=mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attention_reference(q, k, v, scale=0.3, mask=mask), expected.float().double(),
                               rtol=1e-5, atol=1e-5)


def test_reference_lse_and_empty_rows():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    mask = torch.ones(1, 2, 8, 8, dtype=torch.bool)
    mask[:, :, 3] = False
    out, lse = attention_reference(q, k, v, mask=mask, return_lse=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.5
    assert torch.isneginf(lse[:, :, 3]).all() and (out[:, 3] == 0).all()
    torch.testing.assert_close(lse[:, :, 4], torch.logsumexp(scores, -1)[:, :, 4].float())
