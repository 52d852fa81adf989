"""VMoBA and MoBA: selection against a brute-force float64 reference, outputs and gradients against
fp32 attention with the same mask, a few training steps of a tiny transformer, bad configs."""

import math

import pytest
import torch

from vgen.attention import VideoLayout, create_method
from vgen.kernels.reference import attention_reference


def chunk_major_order(layout, chunk_of_token):
    """Text in place, video tokens sorted by chunk (stable): each chunk contiguous."""
    begin, end = layout.text_before, layout.text_before + layout.num_video_tokens
    video = sorted(range(begin, end), key=lambda p: (chunk_of_token[p], p))
    return torch.tensor(list(range(begin)) + video + list(range(end, layout.seq_len)))


def brute_force_blocks(q, k, layout, chunk_of_token, block, *, selection, threshold=0.25, topk=1, per_row=False):
    """The selection, spelled out: chunk ids per token in the original order (-1 for text) -> kept block pairs.

    Returns (perm, dense bool [B, H, Mq, Mk]) in the permuted order that makes chunks contiguous.
    """
    seq = layout.seq_len
    perm = chunk_major_order(layout, chunk_of_token).tolist()
    chunk = [chunk_of_token[p] for p in perm]  # per permuted position
    chunks = max(chunk) + 1
    members = [[i for i in range(seq) if chunk[i] == c] for c in range(chunks)]
    qp, kp = q[:, perm].double(), k[:, perm].double()
    batch, _, heads, dim = q.shape
    mq, mk = -(-seq // block), -(-seq // block)
    scale = dim**-0.5
    dense = torch.zeros(batch, heads, mq, mk, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            scores = torch.empty(mq, chunks, dtype=torch.float64)
            for i in range(mq):
                q_mean = qp[b, i * block : (i + 1) * block, h].mean(0)
                for c in range(chunks):
                    k_mean = kp[b, members[c], h].mean(0)
                    scores[i, c] = q_mean @ k_mean * scale + math.log(len(members[c]))
            keep = torch.zeros(mq, chunks, dtype=torch.bool)
            if per_row:
                for i in range(mq):
                    keep[i, scores[i].argsort(descending=True)[:topk]] = True
            else:
                flat = scores.flatten()
                order = flat.argsort(descending=True)
                if selection == "threshold":
                    p = flat.softmax(0)
                    total = 0.0
                    for index in order.tolist():
                        if total >= threshold:
                            break
                        keep.view(-1)[index] = True
                        total += p[index].item()
                else:
                    keep.view(-1)[order[: topk * mq]] = True
            for i in range(mq):
                for j in range(mk):
                    qs = range(i * block, min((i + 1) * block, seq))
                    ks = range(j * block, min((j + 1) * block, seq))
                    own = {chunk[p] for p in qs if chunk[p] >= 0}
                    if any(chunk[p] < 0 for p in qs) or any(chunk[p] < 0 for p in ks):
                        dense[b, h, i, j] = True  # text rows and text keys stay dense
                    else:
                        dense[b, h, i, j] = any(keep[i, chunk[p]] or chunk[p] in own for p in ks)
    return torch.tensor(perm), dense


def tile_chunks(layout, tile):
    """Chunk id per token (original order) for (frames, rows, columns) tiles; -1 for text."""
    tt, th, tw = tile
    tiles_y, tiles_x = -(-layout.height // th), -(-layout.width // tw)
    ids = [-1] * layout.seq_len
    for t in range(layout.frames):
        for y in range(layout.height):
            for x in range(layout.width):
                p = layout.text_before + (t * layout.height + y) * layout.width + x
                ids[p] = ((t // tt) * tiles_y + y // th) * tiles_x + x // tw
    return ids


def token_mask(perm, dense, block, seq):
    """Token-level mask [B, H, S, S] in the original order from a block mask in the permuted order."""
    rows = torch.arange(seq) // block
    permuted = dense[:, :, rows][:, :, :, rows]
    out = torch.empty_like(permuted)
    out[:, :, perm[:, None], perm[None, :]] = permuted
    return out


CONFIG = dict(temporal_chunk=2, spatial_chunk=(3, 4), cube_chunk=(2, 3, 4), block_size=(16, 16))


@pytest.mark.parametrize("layer", [0, 1, 2])  # 1d, 2d, 3d
@pytest.mark.parametrize("text_before", [0, 7])
def test_vmoba_threshold_matches_brute_force(layer, text_before):
    torch.manual_seed(10 * layer + text_before)
    layout = VideoLayout(frames=5, height=7, width=9, text_before=text_before)  # ragged chunks and blocks
    q, k, v = (torch.randn(2, layout.seq_len, 2, 16) for _ in range(3))
    q = q + 2 * torch.randn(1, 1, 2, 16)  # a shared query direction: concentrated, content-dependent scores
    method = create_method("vmoba", threshold=0.4, **CONFIG)
    out = method(q, k, v, layout=layout, step=0, layer=layer)
    tile = [(2, 7, 9), (1, 3, 4), (2, 3, 4)][layer]
    perm, dense = brute_force_blocks(q, k, layout, tile_chunks(layout, tile), 16, selection="threshold", threshold=0.4)
    assert torch.equal(method.last_mask.to_dense(), dense)
    mask = token_mask(perm, dense, 16, layout.seq_len)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask=mask), atol=3e-5, rtol=3e-5)
    assert float(method.last_density) == pytest.approx(mask.float().mean().item())
    assert 0.0 < float(method.last_density) < 1.0


def test_vmoba_topk_and_moba_match_brute_force():
    torch.manual_seed(3)
    layout = VideoLayout(frames=4, height=6, width=8, text_before=0)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16) for _ in range(3))
    method = create_method("vmoba", selection="topk", topk=2, **CONFIG)
    method(q, k, v, layout=layout, step=0, layer=2)
    _, dense = brute_force_blocks(q, k, layout, tile_chunks(layout, (2, 3, 4)), 16, selection="topk", topk=2)
    assert torch.equal(method.last_mask.to_dense(), dense)

    moba = create_method("moba", chunk_tokens=24, topk=2, block_size=(16, 16))
    out = moba(q, k, v, layout=layout, step=0, layer=0)
    ids = [p // 24 for p in range(layout.seq_len)]
    perm, dense = brute_force_blocks(q, k, layout, ids, 16, selection="topk", topk=2, per_row=True)
    assert torch.equal(moba.last_mask.to_dense(), dense) and torch.equal(perm, torch.arange(layout.seq_len))
    torch.testing.assert_close(out, attention_reference(q, k, v, mask=token_mask(perm, dense, 16, 192)), atol=3e-5,
                               rtol=3e-5)  # fmt: skip


def test_threshold_one_keeps_everything_and_density_adapts():
    torch.manual_seed(0)
    layout = VideoLayout(frames=4, height=6, width=8)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16) for _ in range(3))
    full = create_method("vmoba", threshold=1.0, **CONFIG)
    torch.testing.assert_close(full(q, k, v, layout=layout, step=0, layer=1), attention_reference(q, k, v),
                               atol=3e-5, rtol=3e-5)  # fmt: skip
    densities = []
    for sharpness in (0.0, 4.0):  # the same keys; queries aligned with one key chunk concentrate the scores
        method = create_method("vmoba", threshold=0.5, **CONFIG)
        focus = k[:, :16].mean(1, keepdim=True) * sharpness
        method(q + focus, k, v, layout=layout, step=0, layer=1)
        densities.append(float(method.last_density))
    assert densities[1] < densities[0]


def test_gradients_match_the_masked_reference():
    torch.manual_seed(1)
    layout = VideoLayout(frames=3, height=5, width=6, text_before=4)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16, requires_grad=True) for _ in range(3))
    method = create_method("vmoba", **CONFIG)
    out = method(q, k, v, layout=layout, step=0, layer=2)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    perm = chunk_major_order(layout, tile_chunks(layout, (2, 3, 4)))
    mask = token_mask(perm, method.last_mask.to_dense(), 16, layout.seq_len)
    expected = torch.autograd.grad(attention_reference(q, k, v, mask=mask), (q, k, v), grad)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


def test_a_tiny_transformer_trains_with_vmoba():
    from diffusers import WanTransformer3DModel

    from vgen.pipelines.plumbing import apply_sparse_attention, remove_sparse_attention

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    )  # fmt: skip
    x = torch.randn(2, 4, 4, 12, 16)  # 4 x 6 x 8 = 192 video tokens
    text = torch.randn(2, 8, 16)
    target = torch.randn_like(x)

    def loss_and_grads():
        model.zero_grad()
        out = model(hidden_states=x, timestep=torch.tensor([100.0, 900.0]), encoder_hidden_states=text,
                    return_dict=False)[0]  # fmt: skip
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    method = apply_sparse_attention(model, "vmoba", **CONFIG)
    masks = []
    original = type(method).forward

    def recording(self, q, k, v, **kwargs):
        out = original(self, q, k, v, **kwargs)
        masks.append((kwargs["layout"], kwargs["layer"], self.last_mask))
        return out

    type(method).forward = recording
    try:
        loss, grads = loss_and_grads()
    finally:
        type(method).forward = original
    assert len(masks) == 3 and all(0 < m.density() < 1 for _, _, m in masks)

    class Replay(type(method)):
        """The same selection, as a dense token mask through the fp32 reference attention."""

        def forward(self, q, k, v, *, layout, step, layer, scale, attn_mask):
            _, _, mask = masks[layer]
            tile = self.config.tile(layer, layout)
            perm = chunk_major_order(layout, tile_chunks(layout, tile))
            return attention_reference(q, k, v, scale=scale, mask=token_mask(perm, mask.to_dense(), 16, q.shape[1]))

    from vgen.attention import registry

    registry._METHODS["vmoba-replay"] = Replay
    try:
        apply_sparse_attention(model, "vmoba-replay", **CONFIG)
        replay_loss, replay_grads = loss_and_grads()
    finally:
        del registry._METHODS["vmoba-replay"]
        remove_sparse_attention(model)
    assert loss == pytest.approx(replay_loss, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, replay_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    apply_sparse_attention(model, "vmoba", **CONFIG)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        value, _ = loss_and_grads()
        optimizer.step()
        losses.append(value)
    remove_sparse_attention(model)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_bad_vmoba_configs_are_named():
    with pytest.raises(ValueError, match="threshold must be in"):
        create_method("vmoba", threshold=0.0)
    with pytest.raises(ValueError, match="threshold must be in"):
        create_method("vmoba", threshold=1.5)
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        create_method("vmoba", selection="topk", topk=0)
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        create_method("moba", topk=0)
    with pytest.raises(ValueError, match="selection must be"):
        create_method("vmoba", selection="best")
    with pytest.raises(ValueError, match="partitions must be"):
        create_method("vmoba", partitions=("4d",))
    with pytest.raises(ValueError, match="cube_chunk must be 3 positive ints"):
        create_method("vmoba", cube_chunk=(2, 8))
    layout = VideoLayout(frames=2, height=8, width=5)
    q = torch.randn(1, layout.seq_len, 1, 16)
    with pytest.raises(ValueError, match=r"spatial_chunk\[1\] = 16 is larger than the token grid's 5 columns"):
        create_method("vmoba", block_size=(16, 16))(q, q, q, layout=layout, step=0, layer=1)
    with pytest.raises(ValueError, match="temporal_chunk = 3 is larger than the token grid's 2 frames"):
        create_method("vmoba", temporal_chunk=3)(q, q, q, layout=layout, step=0, layer=0)
    with pytest.raises(ValueError, match="chunk_tokens = 99 is larger than the 80 video tokens"):
        create_method("moba", chunk_tokens=99)(q, q, q, layout=layout, step=0, layer=0)
    with pytest.raises(ValueError, match="bool key-padding mask"):
        create_method("vmoba")(q, q, q, layout=layout, step=0, layer=0, attn_mask=torch.ones(80, 80, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_selection_does_not_synchronise_the_host():
    layout = VideoLayout(frames=6, height=16, width=24)
    q, k, v = (torch.randn(1, layout.seq_len, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    method = create_method("vmoba")
    for layer in range(3):  # builds and caches each partition's plan (once per layout, host to device copies)
        method(q, k, v, layout=layout, step=0, layer=layer)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(3):
            method(q, k, v, layout=layout, step=0, layer=layer)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("length", [1, 255, 256, 257, 700])
def test_two_level_prefix_sums_match_a_float64_cumsum(length):
    from vgen.attention.vmoba import _prefix_at

    x = torch.randn(2, length, 3, 8, dtype=torch.bfloat16)
    positions = torch.cat([torch.tensor([0, length - 1]), torch.randint(0, length, (9,))])
    expected = x.double().cumsum(1)[:, positions]
    torch.testing.assert_close(_prefix_at(x, positions).double(), expected, rtol=1e-5, atol=1e-4)
