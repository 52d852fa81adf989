"""`vgen bench speed`: the harness on a tiny Wan shape on the CPU, and its errors."""

import pytest
import torch

from vgen.cli import main
from vgen.pipelines.speed import build_shape_pipeline, build_shape_transformer, speed_report

TINY_SHAPE = {
    "name": "tiny-wan",
    "transformer": "WanTransformer3DModel",
    "config": {
        "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
        "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 32,
    },
    "clip": {"num_frames": 9, "height": 64, "width": 64},
    "vae": {"temporal": 4, "spatial": 8},
    "text_tokens": 16,
    "pipeline": "WanPipeline",
    "text_encoder": {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_layers": 1, "num_heads": 2, "vocab_size": 300},
    "vae_config": {"base_dim": 8, "z_dim": 4, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4},
}  # fmt: skip


def test_speed_report_on_a_tiny_shape():
    # 9 x 64 x 64 pixels -> 3 x 8 x 8 latents -> 3 x 4 x 4 tokens: a 16-token block is one frame
    report = speed_report(
        TINY_SHAPE, "window", {"window": [0, 1, 1], "block_size": [16, 16]},
        device="cpu", dtype=torch.float32, repeats=2, steps=2,
    )  # fmt: skip
    assert report.grid == (3, 4, 4) and report.tokens == 48
    assert report.density == pytest.approx(1 / 3)  # each frame attends only itself
    assert [t.what for t in report.timings] == ["transformer forward", "pipeline, 2 steps"]
    assert all(t.dense_s > 0 and t.method_s > 0 for t in report.timings)
    table = report.to_markdown()
    assert "| transformer forward |" in table and "speedup" in table and "density 0.333" in table


def test_built_models_are_random_full_configs_on_the_device():
    transformer = build_shape_transformer(TINY_SHAPE, "cpu", torch.float16)
    assert transformer.dtype == torch.float16 and transformer.config.num_layers == 2
    assert torch.get_default_dtype() == torch.float32  # restored
    pipe = build_shape_pipeline(TINY_SHAPE, transformer, "cpu", torch.float16)
    assert pipe.text_encoder.dtype == torch.float16 and pipe.vae.config.z_dim == 4


def test_bad_speed_input_is_named(capsys):
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        speed_report(TINY_SHAPE, "dense", steps=0, device="cpu")
    with pytest.raises(ValueError, match="unknown attention method"):
        speed_report(TINY_SHAPE, "nope", device="cpu")
    with pytest.raises(ValueError, match="valid keys"):
        speed_report(TINY_SHAPE, "window", {"windw": 1}, device="cpu")
    with pytest.raises(ValueError, match="not supported yet"):
        build_shape_transformer({**TINY_SHAPE, "transformer": "HunyuanVideoTransformer3DModel"}, "cpu", torch.float32)
    with pytest.raises(ValueError, match="shape must be a preset name or a dict"):
        speed_report({"transformer": "x"}, "dense", device="cpu")
    assert main(["bench", "speed", "--shape", "wan1.3b-480p", "--attention", "dense", "--device", "cpu",
                 "--repeats", "0"]) == 2  # fmt: skip
    assert "repeats must be an int >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "speed", "--shape", "wan1.3b-480p", "--attention", "dense"]) == 2
        assert "--device cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "speed", "--shape", "nope", "--attention", "dense"])
