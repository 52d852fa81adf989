"""Key-padding masks (HunyuanVideo, Motif) in the block-sparse methods: against fp32 attention with the
same masks, through the tiny pipelines against dense, and the errors for masks they cannot take."""

import numpy as np
import pytest
import torch

from vgen.attention import VideoLayout, create_method
from vgen.attention.common import key_lengths
from vgen.kernels.reference import attention_reference
from vgen.pipelines.plumbing import apply_sparse_attention, remove_sparse_attention
from vgen.pipelines.tiny import build_tiny_pipeline, tiny_call_kwargs


def padding_mask(lengths, seq):
    return (torch.arange(seq) < torch.tensor(lengths)[:, None])[:, None, None, :]


def test_key_lengths_reads_prefix_masks():
    layout = VideoLayout(frames=2, height=3, width=4, text_after=8)  # 24 video + 8 text = 32
    assert key_lengths(None, 2, layout) is None
    assert key_lengths(padding_mask([32, 32], 32), 2, layout) is None
    assert key_lengths(padding_mask([30, 27], 32), 2, layout) == [30, 27]
    assert key_lengths(padding_mask([29], 32), 3, layout) == [29, 29, 29]  # broadcast over the batch
    holes = padding_mask([30, 27], 32).clone()
    holes[0, ..., 3] = False
    with pytest.raises(ValueError, match="keep a prefix of the keys"):
        key_lengths(holes, 2, layout)
    with pytest.raises(ValueError, match="hides video tokens"):
        key_lengths(padding_mask([30, 20], 32), 2, layout)
    with pytest.raises(ValueError, match="bool key-padding mask"):
        key_lengths(torch.zeros(2, 1, 1, 32), 2, layout)


@pytest.mark.parametrize("name", ["window", "vmoba"])
def test_padded_keys_match_the_masked_reference(name):
    torch.manual_seed(0)
    layout = VideoLayout(frames=3, height=6, width=8, text_after=20)  # 144 video + 20 text
    q, k, v = (torch.randn(2, layout.seq_len, 2, 16) for _ in range(3))
    lengths = [layout.seq_len - 3, layout.seq_len - 17]
    config = {"window": (1, 2, 2)} if name == "window" else {"spatial_chunk": (3, 4), "cube_chunk": (2, 3, 4)}
    method = create_method(name, block_size=(16, 16), **config)
    out = method(q, k, v, layout=layout, step=0, layer=2, attn_mask=padding_mask(lengths, layout.seq_len))
    # the same selection without padding, as a token mask, then the padded keys removed
    unpadded = create_method(name, block_size=(16, 16), **config)
    reference_out = unpadded(q, k, v, layout=layout, step=0, layer=2)
    assert not torch.allclose(out, reference_out, atol=1e-3)  # padding changes the result
    selection = (unpadded.last_mask if name == "vmoba" else None)
    if selection is None:
        from vgen.attention import local_window_mask

        selection = local_window_mask(layout, (1, 2, 2), (16, 16))
    tokens = selection.expand_tokens().expand(2, 2, -1, -1)
    if name == "vmoba":
        from vgen.attention.vmoba import chunk_plan

        perm = chunk_plan(layout, (2, 3, 4), (16, 16)).perm
        restored = torch.empty_like(tokens)
        restored[:, :, perm[:, None], perm[None, :]] = tokens
        tokens = restored
    tokens = tokens & padding_mask(lengths, layout.seq_len)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask=tokens), atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("family", ["hunyuan", "motif"])
def test_padded_text_models_match_dense_at_full_selection(family):
    pipe = build_tiny_pipeline(family, 0)
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs(family)
    prompts = ["a red circle moves left while a blue square grows", "a cat"]  # different text lengths

    def generate():
        return pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kwargs).frames

    dense = generate()
    method = apply_sparse_attention(pipe.transformer, "vmoba", threshold=1.0, temporal_chunk=1, spatial_chunk=(1, 1),
                                    cube_chunk=(1, 1, 1), block_size=(16, 16))  # fmt: skip
    try:
        sparse = generate()
    finally:
        remove_sparse_attention(pipe.transformer)
    assert method.last_mask is not None
    np.testing.assert_allclose(sparse, dense, atol=2e-4)
