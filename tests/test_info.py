"""`describe`: the FLOP estimate against torch's FLOP counter on real forwards."""

import inspect

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from vgen.attention import VideoLayout
from vgen.pipelines.info import describe, transformer_flops
from vgen.pipelines.plumbing import TRANSFORMER_SPECS, _forward_token_grid
from vgen.pipelines.tiny import TINY_FAMILIES, build_tiny_pipeline, tiny_call_kwargs

# torch's counter knows the CUDA SDPA kernels; teach it the CPU one (QK^T and PV: 4 * B * H * Sq * Sk * D).
if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default not in torch.utils.flop_counter.flop_registry:
    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_sdpa_flop(query_shape, key_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, sq, d = query_shape
        return 4 * b * h * sq * key_shape[-2] * d


def first_transformer_call(pipe, family):
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **dict(tiny_call_kwargs(family),
                                                                                 num_inference_steps=1))
    finally:
        handle.remove()
    return captured["call"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_flop_estimate_matches_flop_counter(family):
    pipe = build_tiny_pipeline(family)
    args, kwargs = first_transformer_call(pipe, family)
    transformer = pipe.transformer
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        transformer(*args, **kwargs)
    text = kwargs["encoder_hidden_states"].shape[1]
    batch = kwargs["encoder_hidden_states"].shape[0]
    counts = counter.get_flop_counts()["Global"]
    sdpa = sum(v for op, v in counts.items() if "scaled_dot_product" in str(op))
    total = sum(counts.values())

    bound = inspect.signature(type(transformer).forward).bind(transformer, *args, **kwargs).arguments
    spec = TRANSFORMER_SPECS[type(transformer).__name__]
    grid = VideoLayout(*_forward_token_grid(spec, transformer.config, bound))
    attention, estimate = transformer_flops(transformer, grid, text)
    self_sdpa = attention * batch
    # every SDPA of the model: self-attention exactly, cross-attention and text refiners on top
    assert self_sdpa <= sdpa + 1
    assert estimate * batch == pytest.approx(total, rel=0.1)


def test_describe_reads_configs_only(tiny_dirs):
    info = describe(tiny_dirs("wan"), 9, 32, 48, text_tokens=7)
    assert (info.grid.frames, info.grid.height, info.grid.width) == (3, 2, 3)
    assert info.self_attention_layers == 2 and info.text_tokens == 7
    assert 0 < info.self_attention_share < 1
