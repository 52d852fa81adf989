"""Rectified SpaAttn: against a float64 spelled-out reference, exact at full mass, the error it removes
on block-structured keys, the method in a pipeline, bad configs."""

import math

import numpy as np
import pytest
import torch

from vgen import VideoPipeline
from vgen.attention import VideoLayout, create_method
from vgen.attention.rectified import rectified_attention
from vgen.kernels.reference import attention_reference
from vgen.models import TINY, build_reference_pipeline, save_pipeline


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def spelled_out(q, k, v, keep, block, scale, tolerance=1.0, pooled_kept=False, spread_shift=False):
    """Float64, token by token and block by block, as the module docstring describes it."""
    q, k, v = q.double(), k.double(), v.double()
    batch, seq, heads, dim = q.shape
    blocks = -(-seq // block)
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            members = [list(range(j * block, min(seq, (j + 1) * block))) for j in range(blocks)]
            k_mean = [k[b, m, h].mean(0) for m in members]
            v_mean = [v[b, m, h].mean(0) for m in members]
            spread = [(k[b, m, h] - k_mean[j]).square().sum(-1).mean() for j, m in enumerate(members)]
            for i in range(seq):
                row = keep[b if keep.shape[0] > 1 else 0, h if keep.shape[1] > 1 else 0, i // block]
                kept_keys = [t for j in range(blocks) if row[j] for t in members[j]]
                logits = q[b, i, h] @ k[b, kept_keys, h].T * scale
                sparse = torch.softmax(logits, 0) @ v[b, kept_keys, h]
                pooled = torch.stack(
                    [q[b, i, h] @ k_mean[j] * scale + math.log(len(members[j])) for j in range(blocks)]
                )
                sigma2 = [q[b, i, h].square().sum() * spread[j] / dim * scale**2 for j in range(blocks)]
                if spread_shift:  # the second-order term of mean(exp) over exp(mean)
                    pooled = pooled + torch.stack(sigma2) / 2
                taken = [j for j in range(blocks) if not row[j] and sigma2[j] < 2 * math.log(2) * tolerance]
                if pooled_kept:  # the paper: kept share from pooled masses, compensation in pooled-full units
                    full = torch.logsumexp(pooled, 0)
                    o = sparse * torch.exp(torch.logsumexp(pooled[row], 0) - full)
                    o = o + sum((torch.exp(pooled[j] - full) * v_mean[j] for j in taken), torch.zeros(dim).double())
                else:  # exact kept mass, normalised together with the compensated blocks' pooled masses
                    kept_mass = torch.exp(torch.logsumexp(logits, 0))
                    weighted = sparse * kept_mass
                    total = kept_mass
                    for j in taken:
                        weighted = weighted + torch.exp(pooled[j]) * v_mean[j]
                        total = total + torch.exp(pooled[j])
                    o = weighted / total
                out[b, i, h] = o
    return out


def clustered(seq=160, heads=2, dim=16, block=32, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(1, -(-seq // block), heads, dim, generator=g) * 1.5
    k = centers.repeat_interleave(block, 1)[:, :seq] + noise * torch.randn(1, seq, heads, dim, generator=g)
    return torch.randn(1, seq, heads, dim, generator=g), k, torch.randn(1, seq, heads, dim, generator=g)


def test_matches_the_spelled_out_reference():
    q, k, v = clustered(seq=150)  # ragged last block
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(1, 2, 5, 5, generator=g) < 0.4
    keep |= torch.eye(5, dtype=torch.bool)
    out = rectified_attention(q, k, v, keep, block_size=32, scale=0.25)
    torch.testing.assert_close(out.double(), spelled_out(q, k, v, keep, 32, 0.25), atol=2e-5, rtol=2e-5)
    paper = rectified_attention(q, k, v, keep, block_size=32, scale=0.25, rectify_kept=True)
    torch.testing.assert_close(paper.double(), spelled_out(q, k, v, keep, 32, 0.25, pooled_kept=True), atol=2e-5,
                               rtol=2e-5)  # fmt: skip
    shifted = rectified_attention(q, k, v, keep, block_size=32, scale=0.25, spread_shift=True)
    expected = spelled_out(q, k, v, keep, 32, 0.25, spread_shift=True)
    torch.testing.assert_close(shifted.double(), expected, atol=2e-5, rtol=2e-5)
    assert (shifted - out).abs().max() > 1e-3  # the shift changes the compensated rows


def test_full_mass_is_exact_and_rectification_removes_error():
    layout = VideoLayout(frames=5, height=4, width=8)  # 160 tokens
    q, k, v = clustered()
    exact = attention_reference(q, k, v)
    full = create_method("rectified", mass=1.0, block_size=32)
    torch.testing.assert_close(full(q, k, v, layout=layout, step=0, layer=0), exact, atol=3e-5, rtol=3e-5)
    errors = {}
    variants = {"plain": (False, False), "kept": (True, False), "paper": (True, True), "default": (False, True)}
    for name, flags in variants.items():
        method = create_method("rectified", mass=0.5, block_size=32, rectify_kept=flags[0], compensate_dropped=flags[1])
        errors[name] = rel(method(q, k, v, layout=layout, step=0, layer=0), exact)
        assert float(method.last_density) < 0.8
    assert errors["paper"] < 0.5 * errors["kept"] and errors["kept"] < errors["plain"]
    assert errors["default"] < 0.5 * errors["plain"]
    assert create_method("rectified").config.rectify_kept is False
    # widely spread keys: gain-aware compensation declines, so it cannot do worse than plain attention
    q, k, v = clustered(noise=3.0)
    kept_only = create_method("rectified", mass=0.5, block_size=32, compensate_dropped=False)
    both = create_method("rectified", mass=0.5, block_size=32)
    exact = attention_reference(q, k, v)
    assert rel(both(q, k, v, layout=layout, step=0, layer=0), exact) <= rel(
        kept_only(q, k, v, layout=layout, step=0, layer=0), exact) + 1e-6  # fmt: skip


def test_rectified_in_a_pipeline_and_errors(tmp_path):
    folder = save_pipeline(build_reference_pipeline(TINY, seed=3), tmp_path / "m", dtype=torch.float32)
    pipe = VideoPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    args = dict(num_frames=9, height=64, width=64, num_inference_steps=2, progress=False)
    dense = pipe("a red circle moves left", **args)
    method = pipe.enable_sparse_attention("rectified", mass=0.5, block_size=16)
    video = pipe("a red circle moves left", **args)
    assert np.isfinite(video).all() and 0 < np.abs(video - dense).mean() and float(method.last_density) < 1
    with pytest.raises(ValueError, match="mass must be in"):
        create_method("rectified", mass=0)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        create_method("rectified", block_size=48)
    with pytest.raises(ValueError, match="error_tolerance must be >= 0"):
        create_method("rectified", error_tolerance=-1)
    layout = VideoLayout(frames=1, height=4, width=8, text_after=4)
    x = torch.randn(1, 36, 1, 16)
    padded = (torch.arange(36) < 34)[None, None, None]
    with pytest.raises(ValueError, match="does not take padded text"):
        create_method("rectified", block_size=16)(x, x, x, layout=layout, step=0, layer=0, attn_mask=padded)


@pytest.mark.parametrize("pooled_kept,compensate,shift", [(False, True, False), (True, True, False),
                                                          (True, False, False), (False, True, True),
                                                          (True, True, True)])  # fmt: skip
@pytest.mark.parametrize("heads_in_keep", [1, 2])
@pytest.mark.usefixtures("kernels_on_the_gpu")
def test_pooled_correction_kernel_matches_its_reference(pooled_kept, compensate, shift, heads_in_keep):
    from vgen.attention.common import block_means, block_moments
    from vgen.kernels.pooled import pooled_correction, pooled_correction_reference

    torch.manual_seed(int(pooled_kept) + 2 * int(compensate) + heads_in_keep)
    q, k, v = (torch.randn(2, 150, 2, 40) for _ in range(3))  # ragged last block, head_dim 40
    out, lse = torch.randn(2, 150, 2, 40), torch.randn(2, 2, 150)
    k_mean, counts, spread = block_moments(k, 32)
    spread = spread * torch.rand(2, 2, 5) * 0.5  # some blocks pass the gain test
    keep = torch.rand(2, heads_in_keep, 5, 5) < 0.5
    args = (q, out, lse, k_mean, block_means(v, 32)[0], counts.log(), spread, keep)
    kwargs = dict(row_block=32, scale=0.3, pooled_kept=pooled_kept, compensate=compensate, tolerance=2.0,
                  spread_shift=shift)  # fmt: skip
    expected = pooled_correction_reference(*args, **kwargs)
    torch.testing.assert_close(pooled_correction(*args, **kwargs), expected, atol=1e-5, rtol=1e-5)
    # half inputs take the tensor-core path (products in q's dtype): against the fp32 reference on the same
    # values (fp16: the Triton interpreter's bf16 dot is broken on the CPU)
    q16, out16 = q.half(), out.half()
    expected16 = pooled_correction_reference(q16.float(), out16.float(), *args[2:], **kwargs)
    got16 = pooled_correction(q16, out16, *args[2:], **kwargs)
    assert got16.dtype == torch.float16
    torch.testing.assert_close(got16.float(), expected16, atol=3e-2, rtol=3e-2)


def test_pooled_kernel_refuses_gradients():
    from vgen.attention.common import block_moments
    from vgen.kernels.pooled import pooled_correction

    q = torch.randn(1, 64, 1, 16, requires_grad=True)
    k_mean, counts, spread = block_moments(torch.randn(1, 64, 1, 16), 32)
    with pytest.raises(ValueError, match="forward only"):
        pooled_correction(q, torch.randn(1, 64, 1, 16), torch.randn(1, 1, 64), k_mean, k_mean, counts.log(), spread,
                          torch.ones(1, 1, 2, 2, dtype=torch.bool), row_block=32, scale=0.25)  # fmt: skip
