"""Pyramid sparse attention: the Triton kernel against its reference and exact attention, the level
assignment under a budget, the method, bad input."""

import pytest
import torch

from vgen.attention import VideoLayout, create_method
from vgen.attention.psa import _shares, assign_levels
from vgen.kernels.pyramid import (
    LEVELS,
    build_pyramid,
    build_pyramid_reference,
    pyramid_attention,
    pyramid_attention_reference,
)
from vgen.kernels.reference import attention_reference


@pytest.mark.parametrize("seq,broadcast", [(300, False), (256, True)])
def test_kernel_matches_reference_and_exact(seq, broadcast):
    torch.manual_seed(seq)
    q, k, v = (torch.randn(2, seq, 2, 32) for _ in range(3))
    blocks = -(-seq // 128)
    g = torch.Generator().manual_seed(0)
    shape = (1, 1, blocks, blocks) if broadcast else (2, 2, blocks, blocks)
    levels = torch.tensor((0, *LEVELS))[torch.randint(0, 5, shape, generator=g)]
    if seq % 128:
        levels[..., -1] = levels[..., -1].clamp(max=1)
    levels[..., 0, :] = 0  # an empty query block: zeros
    out = pyramid_attention(q, k, v, levels, block=128)
    torch.testing.assert_close(out, pyramid_attention_reference(q, k, v, levels, block=128), atol=2e-5, rtol=2e-5)
    assert (out[:, :128] == 0).all()
    full = torch.ones(1, 1, blocks, blocks, dtype=torch.int64)
    torch.testing.assert_close(pyramid_attention(q, k, v, full, block=128), attention_reference(q, k, v), atol=2e-5,
                               rtol=2e-5)  # fmt: skip


def test_kernel_gathers_several_pooled_blocks_per_tile():
    """Rows with more pooled blocks at a level than one tile gathers (POOL blocks a tile), the last tile partial."""
    torch.manual_seed(5)
    seq = 1300  # 10 whole key blocks and a ragged one
    q, k, v = (torch.randn(1, seq, 2, 16) for _ in range(3))
    g = torch.Generator().manual_seed(1)
    levels = torch.tensor((0, 1, 2, 4, 8))[torch.randint(0, 5, (1, 2, 11, 11), generator=g)]
    for row, p in enumerate((2, 4, 8)):  # 10 blocks at one level: 5, 3 (4 + 4 + 2) and 2 (8 + 2) tiles
        levels[:, :, row, :10] = p
    levels[..., -1] = levels[..., -1].clamp(max=1)
    out = pyramid_attention(q, k, v, levels, block=128)
    torch.testing.assert_close(out, pyramid_attention_reference(q, k, v, levels, block=128), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("seq_k", [1300, 1280])
def test_kernel_full_level_by_tma(monkeypatch, seq_k):
    """The full level's TMA loads (the default on a Hopper GPU), forced in the interpreter: a ragged last key
    block read in full or not, pooled levels beside it, keys of another length than the queries."""
    import vgen.kernels.pyramid as pyramid

    monkeypatch.setattr(pyramid, "_use_tma", lambda k, v: True)
    torch.manual_seed(seq_k)
    q, (k, v) = torch.randn(1, 1000, 2, 32), (torch.randn(1, seq_k, 2, 32) for _ in range(2))
    g = torch.Generator().manual_seed(2)
    blocks_k = -(-seq_k // 128)
    levels = torch.tensor((0, 1, 1, 2, 4, 8))[torch.randint(0, 6, (1, 2, 8, blocks_k), generator=g)]
    if seq_k % 128:
        levels[..., -1] = 1  # the ragged block, read in full
    out = pyramid_attention(q, k, v, levels, block=128)
    torch.testing.assert_close(out, pyramid_attention_reference(q, k, v, levels, block=128), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pyramid_build_kernel_matches_reference(dtype):
    """The one-launch pyramid (Triton) against PyTorch's level-by-level halving: the same fp32 sums, so equal
    bit for bit in fp32; strided input (a head slice), a ragged tail left out, a head dim short of its power
    of two. In bf16 within one unit in the last place: Triton's interpreter casts fp32 to bf16 by truncation
    (a GPU rounds to nearest even, as PyTorch)."""
    torch.manual_seed(7)
    x = torch.randn(2, 300, 3, 24, dtype=dtype)[:, :, 1:]  # strided: [2, 300, 2, 24] of a 3-head tensor
    got, want = build_pyramid(x, 128), build_pyramid_reference(x, 128)
    assert [t.shape[1] for t in got] == [300, 128, 64, 32]
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype and a.is_contiguous()
        torch.testing.assert_close(a, b, atol=0, rtol=0 if dtype == torch.float32 else 2**-7)
    assert [t.shape[1] for t in build_pyramid(x[:, :100], 128)] == [100, 0, 0, 0]  # no whole block: empty levels


def test_kernel_with_a_head_dim_short_of_its_tile():
    """Head dim 24 in 32-wide tiles: the pooled gathers' column mask."""
    torch.manual_seed(8)
    q, k, v = (torch.randn(1, 640, 2, 24) for _ in range(3))
    g = torch.Generator().manual_seed(3)
    levels = torch.tensor((0, *LEVELS))[torch.randint(0, 5, (1, 2, 5, 5), generator=g)]
    out = pyramid_attention(q, k, v, levels, block=128)
    torch.testing.assert_close(out, pyramid_attention_reference(q, k, v, levels, block=128), atol=2e-5, rtol=2e-5)


def test_inputs_whose_head_dims_are_strided():
    """q, k, v with a head-dim stride other than 1 (views of [B, D, S, H] storage): the kernels read a row's head
    dims at unit stride, so such inputs are made so first (both the pyramid build and the attention)."""
    torch.manual_seed(10)
    q, k, v = (torch.randn(1, 32, 300, 2).permute(0, 2, 3, 1) for _ in range(3))  # [1, 300, 2, 32], stride(-1) 600
    assert k.stride(-1) != 1
    for a, b in zip(build_pyramid(k, 128), build_pyramid_reference(k, 128), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    g = torch.Generator().manual_seed(5)
    levels = torch.tensor((0, *LEVELS))[torch.randint(0, 5, (1, 2, 3, 3), generator=g)]
    levels[..., -1] = levels[..., -1].clamp(max=1)
    out = pyramid_attention(q, k, v, levels, block=128)
    torch.testing.assert_close(out, pyramid_attention_reference(q, k, v, levels, block=128), atol=2e-5, rtol=2e-5)


def test_plain_levels_without_a_pyramid():
    """pooled=False (a plain selection): no pyramid, the same output as with one; pooled pairs are refused."""
    torch.manual_seed(9)
    q, k, v = (torch.randn(1, 400, 2, 32) for _ in range(3))
    g = torch.Generator().manual_seed(4)
    levels = torch.randint(0, 2, (1, 2, 4, 4), generator=g)
    out = pyramid_attention(q, k, v, levels, block=128, pooled=False)
    torch.testing.assert_close(out, pyramid_attention(q, k, v, levels, block=128), atol=0, rtol=0)
    torch.testing.assert_close(out, pyramid_attention_reference(q, k, v, levels, block=128), atol=2e-5, rtol=2e-5)
    levels[0, 0, 0, 0] = 2
    with pytest.raises(ValueError, match="pooled=False"):
        pyramid_attention(q, k, v, levels, block=128, pooled=False)


def test_kernel_with_other_keys_and_lse():
    """Keys of another length (a ring step reads another rank's shard), the log-sum-exp, an empty row."""
    torch.manual_seed(3)
    q, (k, v) = torch.randn(1, 256, 2, 32), (torch.randn(1, 300, 2, 32) for _ in range(2))
    g = torch.Generator().manual_seed(1)
    levels = torch.tensor((0, *LEVELS))[torch.randint(0, 5, (1, 2, 2, 3), generator=g)]
    levels[..., -1] = levels[..., -1].clamp(max=1)
    levels[0, 1, 1] = 0  # head 1's second query block keeps nothing
    out, lse = pyramid_attention(q, k, v, levels, block=128, return_lse=True)
    want, want_lse = pyramid_attention_reference(q, k, v, levels, block=128, return_lse=True)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
    assert lse.shape == (1, 2, 256) and torch.isneginf(lse[0, 1, 128:]).all() and out[0, 128:, 1].eq(0).all()
    full = torch.ones(1, 1, 2, 3, dtype=torch.int64)  # full resolution everywhere: exact attention's lse
    _, exact_lse = attention_reference(q, k, v, return_lse=True)
    torch.testing.assert_close(pyramid_attention(q, k, v, full, block=128, return_lse=True)[1], exact_lse, atol=2e-5,
                               rtol=2e-5)  # fmt: skip


def test_pooled_keys_stand_for_their_tokens():
    # keys and values constant over each 8-token run: pooling is exact, so every level gives exact attention
    torch.manual_seed(1)
    q = torch.randn(1, 256, 1, 16)
    k, v = (torch.randn(1, 32, 1, 16).repeat_interleave(8, 1) for _ in range(2))
    for p in LEVELS:
        levels = torch.full((1, 1, 2, 2), p)
        torch.testing.assert_close(pyramid_attention(q, k, v, levels, block=128), attention_reference(q, k, v),
                                   atol=2e-5, rtol=2e-5)  # fmt: skip
    assert [x.shape[1] for x in build_pyramid(k, 128)] == [256, 128, 64, 32]


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.3125, 0.6, 1.0])
def test_shares_cost_the_budget(budget):
    shares = _shares(budget, (1.0, 2.0, 2.0, 5.0))
    assert sum(s / p for s, p in zip(shares, LEVELS, strict=True)) == pytest.approx(budget)
    assert all(s >= 0 for s in shares) and sum(shares) <= 1 + 1e-12
    if budget == 1.0:
        assert shares == pytest.approx([1.0, 0.0, 0.0, 0.0])


def test_levels_follow_importance():
    torch.manual_seed(2)
    importance = torch.rand(1, 2, 16, 16)
    levels = assign_levels(importance, 0.2, (1.0, 2.0, 2.0, 5.0), torch.zeros(16, 16, dtype=torch.bool))
    finest_first = {1: 0, 2: 1, 4: 2, 8: 3, 0: 4}
    for h in range(2):
        ranked = levels[0, h].flatten()[importance[0, h].flatten().argsort(descending=True)]
        order = torch.tensor([finest_first[int(x)] for x in ranked])
        assert bool((order[1:] >= order[:-1]).all())
    cost = (1 / levels.clamp(min=1).float() * (levels > 0)).mean().item()
    assert cost == pytest.approx(0.2, abs=1 / 256)


def test_psa_method():
    torch.manual_seed(3)
    layout = VideoLayout(frames=4, height=16, width=32)  # 2,048 tokens, 16 blocks
    q, k, v = (torch.randn(1, layout.seq_len, 2, 32) for _ in range(3))
    exact = attention_reference(q, k, v)
    full = create_method("psa", budget=1.0)
    torch.testing.assert_close(full(q, k, v, layout=layout, step=0, layer=0), exact, atol=3e-5, rtol=3e-5)
    method = create_method("psa", budget=0.25)
    out = method(q, k, v, layout=layout, step=0, layer=0)
    assert torch.isfinite(out).all() and 0.25 <= float(method.last_density) <= 0.25 + 1 / 16 + 1e-6
    raster = create_method("psa", budget=0.25, order="raster")
    assert not torch.allclose(raster(q, k, v, layout=layout, step=0, layer=0), out)


def test_bad_psa_input():
    with pytest.raises(ValueError, match="budget must be in"):
        create_method("psa", budget=0)
    with pytest.raises(ValueError, match="proportions must be four shares"):
        create_method("psa", proportions=(1, 2, 3))
    with pytest.raises(ValueError, match="block_size must be a power of two >= 128"):
        create_method("psa", block_size=64)
    with pytest.raises(ValueError, match="order must be"):
        create_method("psa", order="zigzag")
    q = torch.randn(1, 300, 1, 16)
    with pytest.raises(ValueError, match="ragged last key block"):
        pyramid_attention(q, q, q, torch.full((1, 1, 3, 3), 2), block=128)
    with pytest.raises(ValueError, match="levels must hold 0"):
        pyramid_attention(q, q, q, torch.full((1, 1, 3, 3), 3), block=128)
    with pytest.raises(ValueError, match="levels must be"):
        pyramid_attention(q, q, q, torch.ones(1, 1, 2, 2, dtype=torch.int64), block=128)
    layout = VideoLayout(frames=1, height=16, width=16, text_after=4)
    x = torch.randn(1, 260, 1, 16)
    with pytest.raises(ValueError, match="does not take padded text"):
        padded = (torch.arange(260) < 258)[None, None, None]
        create_method("psa")(x, x, x, layout=layout, step=0, layer=0, attn_mask=padded)
