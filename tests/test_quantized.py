"""Quantised attention: the Triton kernel against its PyTorch reference (same arithmetic), both against
exact fp32 attention, key smoothing, the `quant` method, bad arguments."""

import pytest
import torch

from vgen.attention import BlockMask, VideoLayout, create_method
from vgen.kernels import quantized
from vgen.kernels.quantized import quantize_blocks, quantized_attention, quantized_attention_reference
from vgen.kernels.reference import attention_reference


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_mask(heads, sq, sk, block, density, seed):
    g = torch.Generator().manual_seed(seed)
    mq, mk = -(-sq // block[0]), -(-sk // block[1])
    dense = torch.rand(1, heads, mq, mk, generator=g) < density
    dense[..., 0, :] = False  # a query block that keeps nothing: zeros, not NaN
    dense[..., 1:, 0] = True
    return BlockMask.from_dense(dense, block, (sq, sk))


@pytest.mark.parametrize("tma", [False, True], ids=["loads", "tma"])
@pytest.mark.parametrize("pv", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("sq,sk,dim,block", [(100, 100, 48, (32, 32)), (70, 130, 64, (32, 64))])
def test_kernel_matches_its_reference(monkeypatch, tma, pv, sq, sk, dim, block):
    # tma: K and V^T tiles by tensor descriptors (quantized.QUANT_TMA on the GPU), forced in the interpreter;
    # head_dim 48 reads past D (those columns must read as zeros: they enter QK^T) and the 130 keys have a ragged
    # last tile (masked by the scores; the interpreter reads e4m3 0x7F as 480, not NaN, so what V^T's padding
    # holds cannot be seen here)
    monkeypatch.setattr(quantized, "_use_quant_tma", lambda k8, vt: tma)
    torch.manual_seed(sq + {"int8": 8, "int4": 4, "fp8": 3}[pv])  # int8/int4: the seeds before fp8 came
    q, k, v = torch.randn(2, sq, 2, dim), torch.randn(2, sk, 2, dim) + 2.0, torch.randn(2, sk, 2, dim)
    mask = random_mask(2, sq, sk, block, 0.6, seed=sq)
    out = quantized_attention(q, k, v, mask, pv=pv)
    torch.testing.assert_close(out, quantized_attention_reference(q, k, v, mask, pv=pv), atol=1e-5, rtol=1e-5)
    assert (out[:, :block[0]] == 0).all()  # the empty query block
    exact = attention_reference(q, k, v, mask=mask.expand_tokens())
    error = rel(out[:, block[0]:], exact[:, block[0]:])
    assert error < {"int8": 0.03, "int4": 0.35, "fp8": 0.05}[pv]


@pytest.mark.parametrize("pv", ["int8", "int4", "fp8"])
def test_key_parts_with_one_smoothing_mean_merge_into_the_whole(pv):
    """What a ring step does: keys in two block-aligned parts, smoothed by the whole sequence's mean, each
    returning its log-sum-exp; merged, they give the one-pass result. The kernel's LSE matches the reference's."""
    from vgen.kernels import merge_attention

    torch.manual_seed(11 + {"int8": 8, "int4": 4, "fp8": 3}[pv])
    q, k, v = torch.randn(1, 100, 2, 32), torch.randn(1, 160, 2, 32) + 1.5, torch.randn(1, 160, 2, 32)
    mask = random_mask(2, 100, 160, (32, 32), 0.7, seed=4)
    whole = quantized_attention(q, k, v, mask, pv=pv)
    k_mean = k.float().mean(1)  # [B, H, D]: the whole key sequence's
    dense = mask.to_dense()
    parts = []
    for cols in (slice(0, 96), slice(96, 160)):  # 3 key blocks, then 2 (the last one whole)
        blocks = slice(cols.start // 32, -(-cols.stop // 32))
        part = BlockMask.from_dense(dense[..., blocks].contiguous(), (32, 32), (100, cols.stop - cols.start))
        out, lse = quantized_attention(q, k[:, cols], v[:, cols], part, pv=pv, k_mean=k_mean, return_lse=True)
        ref_out, ref_lse = quantized_attention_reference(q, k[:, cols], v[:, cols], part, pv=pv, k_mean=k_mean,
                                                         return_lse=True)  # fmt: skip
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
        parts.append((out, lse))
    merged, merged_lse = merge_attention(*parts[0], *parts[1])
    if pv in ("fp8", "int8"):  # each part scales its own V (per channel over its tokens): close, not equal
        torch.testing.assert_close(merged_lse, quantized_attention(q, k, v, mask, pv=pv, return_lse=True)[1],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
        exact = attention_reference(q, k, v, mask=mask.expand_tokens())
        assert rel(merged, exact) < 0.05 and rel(whole, exact) < 0.05
    else:
        torch.testing.assert_close(merged, whole, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="k_mean must be"):
        quantized_attention(q, k, v, mask, k_mean=k_mean[0])


def test_int8_is_close_and_smoothing_matters():
    torch.manual_seed(0)
    q, v = torch.randn(1, 256, 2, 64), torch.randn(1, 256, 2, 64)
    k = torch.randn(1, 256, 2, 64) + 8.0 * torch.randn(1, 1, 2, 64)  # a large shared key offset
    full = BlockMask.full(1, 1, (256, 256), (64, 64), "cpu")
    exact = attention_reference(q, k, v)
    assert rel(quantized_attention(q, k, v, full), exact) < 0.02
    # the same arithmetic without smoothing: the offset eats INT8's range
    q8, qs = quantize_blocks(q, 64)
    k8, ks = quantize_blocks(k, 64)  # not smoothed
    s = torch.einsum("bqhd,bkhd->bhqk", q8.float() * qs.repeat_interleave(64, -1).transpose(1, 2)[..., None],
                     k8.float() * ks.repeat_interleave(64, -1).transpose(1, 2)[..., None]) / 8  # fmt: skip
    unsmoothed = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    assert rel(unsmoothed, exact) > 2 * rel(quantized_attention(q, k, v, full), exact)


def test_quantize_blocks():
    x = torch.randn(2, 70, 3, 8)
    values, scales = quantize_blocks(x, 32)
    assert values.dtype == torch.int8 and scales.shape == (2, 3, 3) and values.abs().max() <= 127
    restored = values.float() * scales.repeat_interleave(32, -1)[..., :70].transpose(1, 2)[..., None]
    assert (restored - x).abs().max() <= scales.max() / 2 + 1e-6
    values4, scales4 = quantize_blocks(x, 32, bits=4, per_channel=True)
    assert values4.abs().max() <= 7 and scales4.shape == (2, 3, 3, 8)
    smoothed, _ = quantize_blocks(x + 100, 32, smooth=True)
    assert torch.equal(smoothed, quantize_blocks(x - x.mean(1, keepdim=True), 32)[0])


def test_quant_method_and_errors():
    torch.manual_seed(2)
    layout = VideoLayout(frames=2, height=6, width=8, text_after=4)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 32) for _ in range(3))
    method = create_method("quant", block_size=(32, 32))
    assert rel(method(q, k, v, layout=layout, step=0, layer=0), attention_reference(q, k, v)) < 0.03
    padded = (torch.arange(layout.seq_len) < layout.seq_len - 3)[None, None, None]
    out = method(q, k, v, layout=layout, step=0, layer=0, attn_mask=padded)
    assert rel(out, attention_reference(q, k, v, mask=padded)) < 0.03
    full = BlockMask.full(1, 1, (100, 100), (32, 32), "cpu")
    x = torch.randn(1, 100, 1, 16)
    with pytest.raises(ValueError, match="pv must be one of 'int8', 'int4', 'fp8'"):
        quantized_attention(x, x, x, full, pv=8)
    with pytest.raises(ValueError, match="at least 32 tokens"):
        quantized_attention(x, x, x, BlockMask.full(1, 1, (100, 100), (16, 16), "cpu"))
    with pytest.raises(ValueError, match="pv must be one of"):
        create_method("quant", pv="int2")
    with pytest.raises(ValueError, match="block_size must be two powers of two >= 32"):
        create_method("quant", block_size=(16, 16))


@pytest.mark.parametrize("rcp", [False, True], ids=["div", "rcp"])  # quantized.QUANTIZE_RCP
@pytest.mark.parametrize("block", [32, 128])  # 128: the kernel walks a block in tiles of 32 tokens
@pytest.mark.parametrize("per_channel,smooth,transpose,bits", [
    (False, False, False, 8), (False, True, False, 8), (True, False, True, 8), (True, False, True, 4)])
def test_triton_quantiser_matches_quantize_blocks(monkeypatch, per_channel, smooth, transpose, bits, block, rcp):
    monkeypatch.setattr(quantized, "QUANTIZE_RCP", rcp)
    from vgen.kernels.quantized import _quantize_triton

    torch.manual_seed(bits + 2 * smooth)
    x = torch.randn(2, 77 + block, 3, 40) * 3 + 1  # ragged last block, head_dim below its power of two
    x = x.cuda() if torch.cuda.is_available() else x  # the kernel itself: compiled on a GPU, interpreted here
    expected, expected_scales = quantize_blocks(x, block, bits, per_channel=per_channel, smooth=smooth)
    values, scales = _quantize_triton(x, block, bits, per_channel=per_channel, smooth=smooth, transpose=transpose)
    torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)
    assert torch.equal(values.permute(0, 3, 1, 2) if transpose else values, expected)
    if transpose:  # rows padded to whole blocks, for aligned loads
        padded = -(-(77 + block) // block) * block
        assert values.shape == (2, 3, 40, 77 + block) and values.stride(2) == padded
        # QUANTIZE_PADDED: the padding is written too (unmasked wide stores), with the codes of zeros
        assert (values.as_strided((2, 3, 40, padded), values.stride())[..., 77 + block:] == 0).all()


def test_triton_fp8_quantiser_matches_pytorch():
    """V as float8 e4m3 against one scale per (batch, head, channel), written transposed: the Triton pass
    (its rounding under the interpreter emulates the GPU's round-to-nearest-even) against PyTorch's cast."""
    from vgen.kernels.quantized import _quantize_triton, quantize_fp8_channels

    torch.manual_seed(5)
    x = torch.randn(2, 77, 3, 40) * torch.logspace(-4, 1, 40)  # channels from tiny (e4m3 subnormals) to large
    x = x.cuda() if torch.cuda.is_available() else x
    expected, expected_scales = quantize_fp8_channels(x)
    assert expected.dtype == torch.float8_e4m3fn and expected_scales.shape == (2, 3, 40)
    assert expected.float().abs().amax(1).sub(448).abs().max() == 0  # every channel's maximum at e4m3's largest
    restored = expected.float() * expected_scales[:, None]
    assert ((restored - x).abs() <= x.abs() / 16 + expected_scales[:, None] * 2**-9).all()
    values, scales = _quantize_triton(x, 128, 8, transpose=True, fp8=True)  # in tiles of 32 tokens
    torch.testing.assert_close(scales, expected_scales, rtol=0, atol=0)
    assert values.shape == (2, 3, 40, 77) and values.dtype == torch.float8_e4m3fn
    assert torch.equal(values.permute(0, 3, 1, 2).float(), expected.float())


def test_triton_int8_channel_quantiser_matches_pytorch():
    """V as INT8 against one scale per (batch, head, channel) over all tokens (pv="int8"), written transposed: the
    Triton pass against quantize_int8_channels, which rounds to within half a step of the input."""
    from vgen.kernels.quantized import _quantize_triton, quantize_int8_channels

    torch.manual_seed(6)
    x = torch.randn(2, 77, 3, 40) * torch.logspace(-3, 1, 40) + 0.5
    expected, expected_scales = quantize_int8_channels(x)
    assert expected.dtype == torch.int8 and expected_scales.shape == (2, 3, 40)
    assert (expected.float().abs().amax(1) == 127).all()  # every channel's maximum at the top level
    assert ((expected.float() * expected_scales[:, None] - x).abs() <= expected_scales[:, None] * 0.5001).all()
    values, scales = _quantize_triton(x, 32, 8, transpose=True, channels=True)
    torch.testing.assert_close(scales, expected_scales, rtol=0, atol=0)
    assert values.shape == (2, 3, 40, 77) and values.dtype == torch.int8
    assert torch.equal(values.permute(0, 3, 1, 2), expected)


def test_fp8_reference_follows_the_kernels_visiting_order():
    """FP8 PV rounds P against the running maximum, which depends on the order the key blocks are walked in
    (the mask's index lists): with each row's list reversed the kernel still matches its reference, and the
    result differs from the ascending walk's by more than float rounding."""
    import dataclasses

    torch.manual_seed(9)
    q, k, v = torch.randn(1, 128, 2, 32), torch.randn(1, 192, 2, 32) * 2, torch.randn(1, 192, 2, 32)
    mask = random_mask(2, 128, 192, (32, 32), 0.8, seed=5)
    indices, counts = mask.kv_indices.clone(), mask.kv_num_blocks
    for row in counts.flatten().nonzero()[:, 0].tolist():
        h, m = divmod(row, counts.shape[-1])
        indices[0, h, m, : counts[0, h, m]] = indices[0, h, m, : counts[0, h, m]].flip(0)
    walked_back = dataclasses.replace(mask, kv_indices=indices)
    out = quantized_attention(q, k, v, walked_back, pv="fp8")
    torch.testing.assert_close(out, quantized_attention_reference(q, k, v, walked_back, pv="fp8"), atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    assert (out - quantized_attention(q, k, v, mask, pv="fp8")).abs().max() > 1e-4


@pytest.mark.parametrize("pv", ["int8", "int4", "fp8"])
def test_peeled_ragged_tile_and_folded_offset(monkeypatch, pv):
    """PEEL_RAGGED masks only the ragged last key tile, after the loop: the output is the one of masking every
    tile, to the bit. FOLD_MAGIC (FP8) moves the integer scores' offset into the exponent's bias, INT_FOLD
    (INT8/INT4) also quantises P through it: either way the kernel matches the reference, which follows whichever
    arithmetic is set; INT8 and INT4 stay within their accuracy of exact attention both ways."""
    torch.manual_seed(21)
    q, k, v = torch.randn(1, 90, 2, 32), torch.randn(1, 150, 2, 32) + 1.0, torch.randn(1, 150, 2, 32)
    mask = random_mask(2, 90, 150, (32, 32), 0.7, seed=3)  # 150 keys: the fifth key block holds 22
    outputs = {}
    exact = attention_reference(q, k, v, mask=mask.expand_tokens())[:, 32:]  # query block 0 keeps nothing
    for peel in (False, True):
        for fold in (False, True):
            monkeypatch.setattr(quantized, "PEEL_RAGGED", peel)
            monkeypatch.setattr(quantized, "FOLD_MAGIC" if pv == "fp8" else "INT_FOLD", fold)
            outputs[peel, fold] = out = quantized_attention(q, k, v, mask, pv=pv)
            torch.testing.assert_close(out, quantized_attention_reference(q, k, v, mask, pv=pv), atol=1e-5,
                                       rtol=1e-5)  # fmt: skip
            assert rel(out[:, 32:], exact) < {"int8": 0.03, "int4": 0.35, "fp8": 0.05}[pv]
    for fold in (False, True):
        assert torch.equal(outputs[True, fold], outputs[False, fold])
        assert not torch.equal(outputs[True, fold], outputs[True, not fold])
    assert (mask.to_dense()[..., -1]).any()  # some rows walk the ragged tile


@pytest.mark.parametrize("pv", ["int8", "fp8"])
def test_ragged_tile_out_of_order_gives_nan_not_a_wrong_output(monkeypatch, pv):
    """The peeled kernel relies on BlockMask's ascending index lists (the ragged last key block, when kept, comes
    last). A row whose list has it elsewhere gets NaN (output and log-sum-exp); a list out of order with the ragged
    block still last is fine (it matches the reference, which walks the same order); the other rows are unaffected."""
    import dataclasses

    monkeypatch.setattr(quantized, "PEEL_RAGGED", True)
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 96, 1, 32), torch.randn(1, 100, 1, 32), torch.randn(1, 100, 1, 32)
    dense = torch.ones(1, 1, 3, 4, dtype=torch.bool)  # 100 keys in blocks of 32: the last holds 4
    mask = BlockMask.from_dense(dense, (32, 32), (96, 100))
    indices = mask.kv_indices.clone()
    indices[0, 0, 1] = indices[0, 0, 1].flip(0)  # query block 1 walks the ragged block first
    indices[0, 0, 2, :3] = indices[0, 0, 2, :3].flip(0)  # query block 2: out of order, the ragged block still last
    shuffled = dataclasses.replace(mask, kv_indices=indices)
    good = quantized_attention(q, k, v, mask, pv=pv)
    out, lse = quantized_attention(q, k, v, shuffled, pv=pv, return_lse=True)
    assert torch.isnan(out[:, 32:64]).all() and torch.isnan(lse[..., 32:64]).all()
    assert torch.equal(out[:, :32], good[:, :32]) and not torch.isnan(lse[..., :32]).any()
    torch.testing.assert_close(out[:, 64:], quantized_attention_reference(q, k, v, shuffled, pv=pv)[:, 64:],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("codes16,sums_mma", [(True, True), (False, False), (True, False), (False, True)])
def test_int_codes_through_fp16_and_sums_by_mma(monkeypatch, codes16, sums_mma):
    """INT_CODES16 (P's codes rounded through fp16) and INT_SUMS_MMA (row sums of the codes by an MMA), each alone,
    both and neither: the kernel matches the reference and stays within INT8's (INT4's) accuracy of exact attention.
    The keys' logits grow block by block, so that the running maximum rises in most tiles."""
    for name, value in (("INT_CODES16", codes16), ("INT_SUMS_MMA", sums_mma)):
        monkeypatch.setattr(quantized, name, value)
    torch.manual_seed(31)
    q, k, v = torch.randn(1, 64, 2, 32), torch.randn(1, 170, 2, 32), torch.randn(1, 170, 2, 32)
    k = k * (1.0 + 1.5 * (torch.arange(170) // 32)).view(1, -1, 1, 1)  # 6 key blocks, the last one ragged
    mask = BlockMask.from_dense(torch.ones(1, 2, 2, 6, dtype=torch.bool), (32, 32), (64, 170))
    for pv in ("int8", "int4"):
        out = quantized_attention(q, k, v, mask, pv=pv)
        torch.testing.assert_close(out, quantized_attention_reference(q, k, v, mask, pv=pv), atol=1e-5, rtol=1e-5)
        exact = attention_reference(q, k, v, mask=mask.expand_tokens())
        assert rel(out, exact) < {"int8": 0.03, "int4": 0.35}[pv]


@pytest.mark.parametrize("pv", ["int8", "int4", "fp8"])
def test_outlier_channels_keep_p_at_its_top_level(pv):
    """Large Q/K scales (an outlier channel) make the folded bias about 1.5 * 2^23 * c with c above 0.01, where its
    fp32 rounding alone would lift a tile's largest p past the top level (INT8: 128, which wraps to -128 in int8;
    FP8: past 448). The kernel matches its reference and stays within the quantisation's error of exact
    attention, as the unfolded kernel does."""
    from vgen.kernels.quantized import _LOG2E

    torch.manual_seed(0)
    for amp in (1, 8):
        q, k, v = torch.randn(1, 64, 1, 64), torch.randn(1, 64, 1, 64), torch.randn(1, 64, 1, 64)
        q[..., 0] *= amp * 10
        k[..., 0] *= amp * 10
        q, k = q / amp**0.5, k / amp**0.5
        c = (quantize_blocks(q, 32)[1].max() * quantize_blocks(k, 32, smooth=True)[1].max() * 64**-0.5 * _LOG2E)
        assert c > 0.01  # the regime where the rounding of the bias matters
        mask = BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), (32, 32), (64, 64))
        exact = attention_reference(q, k, v)
        out = quantized_attention(q, k, v, mask, pv=pv)
        torch.testing.assert_close(out, quantized_attention_reference(q, k, v, mask, pv=pv), atol=1e-5, rtol=1e-5)
        assert rel(out, exact) < {"int8": 0.1, "int4": 0.5, "fp8": 0.1}[pv], (amp, rel(out, exact))


def test_index_out_of_range_gives_nan_not_a_wrong_output(monkeypatch):
    """An index outside [0, Mk) met in the peeled kernel's unmasked loop: that row gets NaN, the others are
    unaffected (as the bf16 forward)."""
    import dataclasses

    monkeypatch.setattr(quantized, "PEEL_RAGGED", True)
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 96, 1, 32), torch.randn(1, 100, 1, 32), torch.randn(1, 100, 1, 32)
    dense = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    dense[..., :2] = True
    mask = BlockMask.from_dense(dense, (32, 32), (96, 100))
    indices = mask.kv_indices.clone()
    indices[0, 0, 1, :2] = torch.tensor([4, 0])  # query block 1: a block past the keys, then block 0
    out = quantized_attention(q, k, v, dataclasses.replace(mask, kv_indices=indices), pv="int8")
    assert torch.isnan(out[:, 32:64]).all()
    good = quantized_attention(q, k, v, mask, pv="int8")
    assert torch.equal(out[:, :32], good[:, :32]) and torch.equal(out[:, 64:], good[:, 64:])
