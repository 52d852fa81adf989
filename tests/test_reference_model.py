"""The reference model: sizes, tokenizer, training/sampling consistency, and a tiny end-to-end training run."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline
from safetensors.torch import load_file

from vgen import VideoPipeline
from vgen.data import VOCABULARY, ShapesDataset
from vgen.models import (
    REFERENCE,
    TINY,
    ReferenceConfig,
    build_reference_pipeline,
    encode_prompts,
    parameter_counts,
    weight_bytes,
    word_tokenizer,
)
from vgen.models.train import _from_model, _plot, default_settings, flow_matching_loss, main

MB = 10**6


def test_reference_sizes():
    assert REFERENCE.clip_size == (33, 256, 256)
    assert REFERENCE.latent_shape() == (16, 9, 64, 64)
    assert REFERENCE.token_grid() == (9, 32, 32)
    assert REFERENCE.video_tokens() == 9216 >= 8000
    assert REFERENCE.token_grid(*REFERENCE.demo_size) == (5, 16, 16)
    counts = parameter_counts(REFERENCE)
    assert 18e6 <= counts["transformer"] <= 22e6
    sizes = weight_bytes(REFERENCE)
    assert sizes["total"] == 2 * sum(counts.values()) <= 60 * MB


def test_vae_compresses_4x_in_space_and_time():
    # TINY has the reference VAE's structure (dim_mult (1, 2, 4), temporal downsampling in both stages).
    assert TINY.vae_dim_mult == REFERENCE.vae_dim_mult
    assert TINY.vae_temporal_downsample == REFERENCE.vae_temporal_downsample
    vae = build_reference_pipeline(TINY).vae
    assert isinstance(vae, AutoencoderKLWan)
    assert (vae.config.scale_factor_spatial, vae.config.scale_factor_temporal) == (4, 4)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 33, 32, 32)).latent_dist.mode()
        assert z.shape == (1, 16, 9, 8, 8)
        assert vae.decode(z).sample.shape == (1, 3, 33, 32, 32)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="num_frames|frames - 1"):
        ReferenceConfig(num_frames=32)
    with pytest.raises(ValueError, match="height"):
        ReferenceConfig(height=100)
    with pytest.raises(ValueError, match="vae_temporal_downsample"):
        ReferenceConfig(vae_temporal_downsample=(True,))


def test_tokenizer_covers_the_caption_grammar():
    tokenizer = word_tokenizer()
    unk, eos = tokenizer.unk_token_id, tokenizer.eos_token_id
    assert len({tokenizer.convert_tokens_to_ids(w) for w in VOCABULARY}) == len(VOCABULARY)
    for caption in (ShapesDataset(50, 2, 16, 16).clip(i).caption for i in range(50)):
        ids = tokenizer(caption).input_ids
        assert unk not in ids and ids[-1] == eos and len(ids) == len(caption.split()) + 1
    assert tokenizer("A Red circle, moves left!").input_ids == tokenizer("a red circle moves left").input_ids
    assert tokenizer("a zebra").input_ids == [tokenizer.convert_tokens_to_ids("a"), unk, eos]
    assert tokenizer("").input_ids == [eos]


def test_build_is_deterministic():
    a, b, c = build_reference_pipeline(TINY, 3), build_reference_pipeline(TINY, 3), build_reference_pipeline(TINY, 4)
    for name in ("vae", "text_encoder", "transformer"):
        wa, wb, wc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_prompt_embeddings_match_the_pipeline():
    pipe = build_reference_pipeline(TINY)
    prompts = ["a red circle moves left while a blue square grows", "a white star bounces"]
    ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, [*prompts, ""], TINY.max_sequence_length)
    with torch.no_grad():
        theirs, negative = pipe.encode_prompt(prompts, max_sequence_length=TINY.max_sequence_length, device="cpu")
    torch.testing.assert_close(ours[:2], theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[2:], negative[:1], atol=1e-5, rtol=1e-5)


def test_flow_matching_loss_is_what_the_scheduler_inverts():
    x0 = torch.randn(2, 16, 3, 8, 8)

    def oracle(hidden_states, timestep, encoder_hidden_states, return_dict=False):
        # The exact velocity towards x0: (x_s - x0) / s, reading s from the timestep as trained.
        return ((hidden_states - x0) / (timestep.float() / 1000).view(-1, 1, 1, 1, 1),)

    loss = flow_matching_loss(oracle, x0, None, flow_shift=TINY.flow_shift, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    scheduler = build_reference_pipeline(TINY).scheduler
    scheduler.set_timesteps(8)
    x = torch.randn_like(x0)
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t.expand(2), None)[0], t, x).prev_sample
    assert (x - x0).abs().max() < 0.02  # integer timesteps: s is read to 1/1000


def test_first_frame_weight_weighs_the_first_latent_frame():
    """Errors only in latent frame 0: the weighted loss scales them by w / mean(weights) against the plain one."""
    x0 = torch.randn(2, 16, 3, 8, 8)

    def off_in_frame_0(hidden_states, timestep, encoder_hidden_states, return_dict=False):
        exact = (hidden_states - x0) / (timestep.float() / 1000).view(-1, 1, 1, 1, 1)
        exact[:, :, 0] += 1.0
        return (exact,)

    def loss(weight):
        return flow_matching_loss(off_in_frame_0, x0, None, flow_shift=TINY.flow_shift, first_frame_weight=weight,
                                  generator=torch.Generator().manual_seed(0)).item()  # fmt: skip

    plain = loss(1.0)
    assert plain == pytest.approx(1 / 3, rel=1e-4)  # one frame of three off by 1
    assert loss(4.0) == pytest.approx(4 / 6, rel=1e-4)  # weights (4, 1, 1): 4 * 1 / 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny training run (3 + 3 steps) on the CPU."""
    out = tmp_path_factory.mktemp("reference-run")
    assert main(["--out", str(out), "--config", "tiny", "--device", "cpu", "--workers", "0"]) == 0
    return out


def test_run_writes_logs_and_a_small_model(run):
    log = json.loads((run / "log.json").read_text())
    for stage in ("vae", "dit"):
        assert log[stage]["steps"] == 3
        assert all(math.isfinite(value) for _, value in log[stage]["loss"])
    assert (run / "loss.png").stat().st_size > 0 and (run / "samples-demo.png").is_file()
    files = [p for p in (run / "model").rglob("*") if p.is_file()]
    assert max(p.stat().st_size for p in files) <= 15 * MB
    assert log["model"]["bytes"] == sum(p.stat().st_size for p in files)
    vae_config = json.loads((run / "model" / "vae" / "config.json").read_text())
    assert vae_config["latents_mean"] == pytest.approx(log["cache"]["latents_mean"])
    assert vae_config["latents_std"] != [1.0] * 16 and min(vae_config["latents_std"]) > 0
    assert 0.0 <= log["samples"]["demo"]["adherence"] <= 1.0


def test_training_changed_every_network(run):
    initial = build_reference_pipeline(TINY, default_settings("tiny").seed)
    for name in ("vae", "text_encoder", "transformer"):
        saved = {}
        for shard in (run / "model" / name).glob("*.safetensors"):
            saved.update(load_file(shard))
        assert all(tensor.dtype == torch.bfloat16 for tensor in saved.values())
        start = getattr(initial, name).state_dict()
        changed = [k for k, v in saved.items() if not torch.equal(v, start[k].to(torch.bfloat16))]
        assert changed, f"{name} weights did not change"


def test_reloads_with_stock_diffusers(run):
    pipe = WanPipeline.from_pretrained(run / "model", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        "a red circle moves left",
        num_frames=9,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames
    assert frames.shape == (1, 9, 32, 32, 3) and np.isfinite(frames).all()


def test_reloads_with_video_pipeline(run):
    pipe = VideoPipeline.from_pretrained(run / "model", torch_dtype=torch.float32, device="cpu")
    video = pipe("a blue square grows", num_frames=9, height=32, width=32, num_inference_steps=2, progress=False)
    assert video.shape == (9, 32, 32, 3) and np.isfinite(video).all()
    # vgen's own layout arithmetic agrees with the config (the tiny model has the reference's factors)
    assert pipe.token_grid(*REFERENCE.clip_size).seq_len == REFERENCE.video_tokens()


def _weights(folder, name):
    saved = {}
    for shard in (folder / name).glob("*.safetensors"):
        saved.update(load_file(shard))
    return saved


def test_decoder_stage_leaves_the_encoder_alone(run):
    log = json.loads((run / "log.json").read_text())
    assert log["decoder"]["steps"] == 2
    assert len(log["decoder"]["psnr_by_frame"]) == TINY.num_frames
    stage_1 = torch.load(run / "checkpoints" / "vae.pt", weights_only=True)["model"]
    saved = _weights(run / "model", "vae")
    trained = ("decoder.", "post_quant_conv.")
    changed = {k for k, v in saved.items() if not torch.equal(v, stage_1[k].to(torch.bfloat16))}
    assert changed and all(k.startswith(trained) for k in changed), sorted(changed)[:5]


def test_from_model_continues_the_transformer(run, tmp_path):
    out = tmp_path / "continued"
    argv = ["--out", str(out), "--config", "tiny", "--device", "cpu", "--from-model", str(run / "model")]
    assert main([*argv, "--decoder-steps", "0", "--dit-steps", "2", "--samples", "0"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert log["from_model"] == str(run / "model") and len(log["history"]) == 1 and log["run"] == 2
    assert log["history"][0]["dit"]["steps"] >= 3 and log["dit"]["steps"] == 2
    assert "vae" not in log and (out / "loss.png").is_file()
    vae_before, vae_after = _weights(run / "model", "vae"), _weights(out / "model", "vae")
    assert vae_after.keys() == vae_before.keys()
    assert all(torch.equal(v, vae_before[k]) for k, v in vae_after.items())  # no decoder steps: VAE untouched
    before, after = _weights(run / "model", "transformer"), _weights(out / "model", "transformer")
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    old = json.loads((run / "model" / "vae" / "config.json").read_text())
    new = json.loads((out / "model" / "vae" / "config.json").read_text())
    assert new["latents_mean"] == old["latents_mean"] and new["latents_std"] == old["latents_std"]


def test_run_numbers_continue_the_shipped_log_and_label_the_plot(run, tmp_path, monkeypatch):
    folder = tmp_path / "shipped"
    shutil.copytree(run / "model", folder / "model")
    earlier = {"run": 1, "dit": {"loss": [[1, 0.4]], "steps": 1}}  # run 2 was tried and not kept
    shipped = {"run": 3, "history": [earlier], "dit": {"loss": [[1, 0.3]], "steps": 1}}
    (folder / "log.json").write_text(json.dumps(shipped))
    log: dict = {}
    _from_model(str(folder / "model"), log)
    assert log["run"] == 4 and [r["run"] for r in log["history"]] == [1, 3]
    log["dit"] = {"loss": [[1, 0.2]], "held_out_loss": [[1, 0.25]], "steps": 1}
    figures = []
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda fig, *a, **k: figures.append(fig))
    _plot(log, tmp_path / "loss.png")
    labels = [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()]
    assert labels == ["train (run 1)", "train (run 3)", "train (run 4)", "held out (run 4)"]


def test_resume_continues_stage_3_only(run):
    before = json.loads((run / "log.json").read_text())
    assert main(["--out", str(run), "--config", "tiny", "--device", "cpu", "--dit-steps", "5", "--samples", "0"]) == 0
    after = json.loads((run / "log.json").read_text())
    assert after["vae"]["loss"] == before["vae"]["loss"]
    assert after["dit"]["steps"] == 5
    assert after["dit"]["loss"][:3] == before["dit"]["loss"] and len(after["dit"]["loss"]) == 5


def test_bad_arguments_are_named(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--config", "tiny", "--vae-steps", "-1"]) == 2
    assert "vae_steps" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--config", "tiny", "--set", "lr=fast"]) == 2
    assert "lr must be float" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch"):
        default_settings("tiny", batch=0).check()
    with pytest.raises(ValueError, match="vae_frames"):
        default_settings("tiny", vae_frames=6).check()
    with pytest.raises(ValueError, match="unknown settings: nope"):
        default_settings("tiny", nope=1)
    with pytest.raises(ValueError, match="minutes"):
        default_settings("tiny", dit_steps=None).check()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--config", "nope"])
    assert main(["--out", str(tmp_path), "--config", "tiny", "--from-model", str(tmp_path / "missing")]) == 2
    assert "from_model must be a saved pipeline folder" in capsys.readouterr().err


def test_position_prior_makes_the_text_encoder_see_word_order():
    """add_position_prior (TrainSettings.position_prior) adds its prior at relative positions -1 (head 0) and +1
    (head 1) of every layer, or at the (head, offset) pairs given (position_prior_at); with a prior as large as
    content logits can be, two captions with the same words in another order give other outputs for their shared
    words. Bad values are named."""
    from vgen.models.train import TrainSettings, add_position_prior

    pipe = build_reference_pipeline(TINY, 0)
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    a, b = "a red square moves left while a blue circle grows", "a blue square moves left while a red circle grows"

    def shared_word_difference() -> float:
        with torch.no_grad():
            e = encode_prompts(tokenizer, encoder, [a, b], 32)
        return ((e[0, 2] - e[1, 2]).norm() / e[0, 2].norm()).item()  # "square"

    before = {n: m.weight.detach().clone() for n, m in encoder.named_modules() if n.endswith("relative_attention_bias")}
    assert before
    difference = shared_word_difference()
    add_position_prior(encoder, 50.0)
    buckets = next(iter(before.values())).shape[0]
    for name, module in encoder.named_modules():
        if name in before:
            change = module.weight.detach() - before[name]
            assert change[1, 0] == 50.0 and change[buckets // 2 + 1, 1] == 50.0 and change.abs().sum() == 100.0
    assert shared_word_difference() > max(3 * difference, 0.05)
    # other (head, offset) pairs, as a continuation of run 7 adds them: +2 is bucket buckets // 2 + 2, -2 bucket 2
    heads = next(iter(before.values())).shape[1]
    added = {n: m.weight.detach().clone() for n, m in encoder.named_modules() if n in before}
    add_position_prior(encoder, 7.0, [(heads - 1, 2), (0, -2)])
    for name, module in encoder.named_modules():
        if name in before:
            change = module.weight.detach() - added[name]
            assert change[buckets // 2 + 2, heads - 1] == 7.0 and change[2, 0] == 7.0 and change.abs().sum() == 14.0
    settings = TrainSettings(device="cpu", position_prior=50.0, position_prior_at=[[2, 2], [3, -2]])
    settings.check()
    assert settings.position_prior_at == ((2, 2), (3, -2))
    with pytest.raises(ValueError, match="position_prior"):
        TrainSettings(device="cpu", position_prior=-1.0).check()
    for bad in ([[0, 0]], [[-1, 1]], [[0, 1.5]], [], [[0, 1, 2]], [[0, True]], [[2, 2], [2, 2]]):
        with pytest.raises(ValueError, match="position_prior_at"):
            TrainSettings(device="cpu", position_prior_at=bad).check()
    for bad in ([[4, 1]], [[0, 8]], [[0, -8]]):  # the reference encoder: 4 heads, exact buckets up to 7
        with pytest.raises(ValueError, match="out of range for config 'reference'"):
            TrainSettings(device="cpu", position_prior=1.0, position_prior_at=bad).check()
    TrainSettings(device="cpu", position_prior=1.0, position_prior_at=[[3, 7], [0, -7]]).check()
    for bad in ([(heads, 1)], [(0, buckets // 4)]):
        with pytest.raises(ValueError, match="out of range"):
            add_position_prior(encoder, 1.0, bad)
    for bad in ([(True, 1)], [3], [(0, 1, 2)]):
        with pytest.raises(ValueError, match="pairs of ints"):
            add_position_prior(encoder, 1.0, bad)
    with pytest.raises(ValueError, match="relative-position"):
        add_position_prior(torch.nn.Linear(2, 2), 1.0)
