"""Every video self-attention of all six diffusers transformers reaches the vgen method."""

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from vgen import apply_sparse_attention, remove_sparse_attention
from vgen.attention import AttentionMethod, VideoLayout, registry
from vgen.kernels import dense_attention
from vgen.pipelines.plumbing import self_attention_modules
from vgen.pipelines.tiny import TINY_FACTS, TINY_FAMILIES, build_tiny_pipeline, tiny_call_kwargs


class Probe(AttentionMethod):
    """Records each call; answers dense, or zeros when `zero` is set."""

    zero = False

    def __init__(self, config):
        super().__init__(config)
        self.calls = []

    def forward(self, q, k, v, *, layout, step, layer, scale, attn_mask):
        self.calls.append({"layer": layer, "step": step, "layout": layout, "shape": tuple(q.shape),
                           "mask": attn_mask})
        return torch.zeros_like(q) if self.zero else dense_attention(q, k, v, scale=scale, attn_mask=attn_mask)


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.setitem(registry._METHODS, "probe", Probe)
    Probe.name = "probe"
    return Probe


@pytest.fixture(scope="module")
def pipelines():
    cache = {}

    def get(family):
        if family not in cache:
            pipe = build_tiny_pipeline(family)
            pipe.set_progress_bar_config(disable=True)
            cache[family] = pipe
        return cache[family]

    return get


def generate(pipe, family):
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle moves left", generator=generator, **tiny_call_kwargs(family)).frames


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_dense_reproduces_stock_diffusers(pipelines, family):
    pipe = pipelines(family)
    stock = generate(pipe, family)
    apply_sparse_attention(pipe.transformer, "dense")
    try:
        dense = generate(pipe, family)
    finally:
        remove_sparse_attention(pipe.transformer)
    again = generate(pipe, family)
    assert abs(dense - stock).max() <= 1e-6
    assert abs(again - stock).max() == 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_self_attention_reaches_the_method(pipelines, probe, family):
    pipe = pipelines(family)
    facts = TINY_FACTS[family]
    assert [name for name, _ in self_attention_modules(pipe.transformer)] == list(facts["self_attention_modules"])
    method = apply_sparse_attention(pipe.transformer, "probe")
    try:
        generate(pipe, family)
    finally:
        remove_sparse_attention(pipe.transformer)
    calls = method.calls
    assert calls, "the method was never called"
    assert {c["layer"] for c in calls} == set(range(len(facts["self_attention_modules"])))
    steps = sorted({c["step"] for c in calls})
    assert steps == list(range(len(steps))) and len(steps) >= 2
    for call in calls:
        layout: VideoLayout = call["layout"]
        assert (layout.frames, layout.height, layout.width) == facts["video_token_grid"]
        assert call["shape"][1] == layout.seq_len
        assert (layout.text_before > 0, layout.text_after > 0) == (
            facts["text_position"] == "before", facts["text_position"] == "after")
    if family == "hunyuan":  # its padding mask over the text tokens must reach the method
        assert all(c["mask"] is not None and c["mask"].shape[-1] == c["shape"][1] for c in calls)


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan"])
def test_method_output_is_used_and_removal_restores_stock(pipelines, probe, family):
    pipe = pipelines(family)
    stock = generate(pipe, family)
    probe.zero = True
    try:
        apply_sparse_attention(pipe.transformer, "probe")
        zeroed = generate(pipe, family)
    finally:
        probe.zero = False
        remove_sparse_attention(pipe.transformer)
    assert abs(zeroed - stock).max() > 1e-3
    assert abs(generate(pipe, family) - stock).max() == 0


def test_dense_steps_and_layers_skip_the_method(pipelines, probe):
    pipe = pipelines("wan")
    method = apply_sparse_attention(pipe.transformer, "probe", dense_steps=1, dense_layers=[0])
    try:
        generate(pipe, "wan")
    finally:
        remove_sparse_attention(pipe.transformer)
    assert method.calls and all(c["step"] >= 1 and c["layer"] != 0 for c in method.calls)


def test_reapplying_replaces_the_method(pipelines, probe):
    pipe = pipelines("wan")
    first = apply_sparse_attention(pipe.transformer, "probe")
    second = apply_sparse_attention(pipe.transformer, "probe")
    try:
        generate(pipe, "wan")
    finally:
        remove_sparse_attention(pipe.transformer)
    assert not first.calls and second.calls


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_non_native_backend_is_an_error_not_a_silent_bypass(monkeypatch):
    # set_attention_backend also sets diffusers' process-wide default; put it back afterwards
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    pipe = build_tiny_pipeline("wan")
    apply_sparse_attention(pipe.transformer, "dense")
    pipe.transformer.set_attention_backend("flex")
    with pytest.raises(RuntimeError, match="scaled_dot_product_attention 0 times"):
        generate(pipe, "wan")


def test_unsupported_transformer_is_named():
    with pytest.raises(ValueError, match="transformer of class Linear is not supported; supported: .*Wan"):
        apply_sparse_attention(torch.nn.Linear(2, 2), "dense")


def test_gradients_flow_through_the_plumbing(pipelines):
    transformer = pipelines("wan").transformer
    torch.manual_seed(0)
    x = torch.randn(1, transformer.config.in_channels, 3, 4, 4)
    t = torch.tensor([500.0])
    text = torch.randn(1, 5, transformer.config.text_dim)

    def grads():
        transformer.zero_grad()
        transformer(x, t, text).sample.square().mean().backward()
        return [p.grad.clone() for p in transformer.parameters() if p.grad is not None]

    stock = grads()
    apply_sparse_attention(transformer, "dense")
    try:
        dense = grads()
    finally:
        remove_sparse_attention(transformer)
    assert len(stock) == len(dense) > 0
    for a, b in zip(stock, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    transformer.zero_grad()


@pytest.mark.parametrize("method", ["dense", "vmoba"])
def test_gradient_checkpointing_recomputes_through_the_method(method):
    """Checkpointed blocks re-run attention inside backward, after the transformer's forward returned."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).train()  # fmt: skip
    x = torch.randn(1, 4, 2, 8, 8)  # 2 x 4 x 4 = 32 tokens
    t, text = torch.tensor([500.0]), torch.randn(1, 5, 16)
    config = {"block_size": (16, 16), "spatial_chunk": (2, 2), "cube_chunk": (1, 2, 2)} if method == "vmoba" else {}

    def grads():
        transformer.zero_grad()
        transformer(x, t, text).sample.square().mean().backward()
        return [p.grad.clone() for p in transformer.parameters() if p.grad is not None]

    apply_sparse_attention(transformer, method, **config)
    try:
        plain = grads()
        transformer.enable_gradient_checkpointing()
        checkpointed = grads()
    finally:
        remove_sparse_attention(transformer)
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loaded_pipeline_round_trip_keeps_plumbing(tiny_dirs):
    pipe = DiffusionPipeline.from_pretrained(tiny_dirs("wan"))
    pipe.set_progress_bar_config(disable=True)
    stock = generate(pipe, "wan")
    apply_sparse_attention(pipe.transformer, "dense")
    assert abs(generate(pipe, "wan") - stock).max() <= 1e-6
