"""Ulysses context parallelism on the CPU: 2 gloo processes give what one process gives, dense and vmoba."""

import os
import socket
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VMOBA = {"block_size": (16, 16), "temporal_chunk": 1, "spatial_chunk": (4, 4), "cube_chunk": (2, 4, 4)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_rank() -> None:
    """End a worker that did its work: meet the other ranks, tear the group down, and exit without the
    interpreter's teardown. Now and then in CI a worker aborted ("terminate called without an active
    exception", from gloo's C++ threads, it seems at exit): a barrier before the teardown did not stop it."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def tiny_wan():
    """A 4-head Wan transformer and its inputs, the same in every process."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ).eval()  # fmt: skip
    inputs = {"hidden_states": torch.randn(1, 4, 3, 16, 16), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 8, 32), "return_dict": False}  # fmt: skip
    return model, inputs


def transformer_worker(rank: int, world: int, port: int, method: str | None, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from vgen.attention import registry
        from vgen.parallel import enable_context_parallel
        from vgen.pipelines.plumbing import apply_sparse_attention

        model, inputs = tiny_wan()
        heads_seen = []
        if method:
            instance = registry.create_method(method, **VMOBA)
            original = instance.forward

            def spy(q, k, v, **kwargs):
                heads_seen.append(q.shape[2])
                assert q.shape[1] == kwargs["layout"].seq_len  # every rank sees the whole sequence
                return original(q, k, v, **kwargs)

            instance.forward = spy
            apply_sparse_attention(model, instance)
        enable_context_parallel(model)
        with torch.no_grad():
            result = model(**inputs)[0]
        if rank == 0:
            torch.save({"out": result, "heads": heads_seen}, out)
        leave_rank()
    finally:
        dist.destroy_process_group()


def spawn_and_compare(worker, method: str | None, tmp_path, world: int = 2) -> dict:
    """The tiny Wan's output in one process (stock attention or ``method``) against ``worker`` run on
    ``world`` ranks; returns what rank 0 saved."""
    from vgen.pipelines.plumbing import apply_sparse_attention

    model, inputs = tiny_wan()
    if method:
        apply_sparse_attention(model, method, **VMOBA)
    with torch.no_grad():
        single = model(**inputs)[0]
    out = tmp_path / "out.pt"
    mp.spawn(worker, args=(world, free_port(), method, str(out)), nprocs=world)
    saved = torch.load(out)
    torch.testing.assert_close(saved["out"], single, atol=1e-5, rtol=1e-5)
    return saved


@pytest.mark.parametrize("method", [None, "vmoba"])
def test_two_processes_match_one(method, tmp_path):
    saved = spawn_and_compare(transformer_worker, method, tmp_path)
    if method:
        assert saved["heads"] == [2, 2]  # 4 heads over 2 ranks, one call per layer


def pipeline_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from vgen import VideoPipeline

        pipe = VideoPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
        pipe.enable_sparse_attention("vmoba", **VMOBA)
        pipe.enable_parallelism(ulysses=2)
        video = pipe("a red circle moves left", num_frames=9, height=64, width=64, num_inference_steps=2,
                     progress=False)  # fmt: skip
        np.save(out.replace(".npy", f"-{rank}.npy"), video)
        leave_rank()
    finally:
        dist.destroy_process_group()


def test_video_pipeline_in_two_processes_and_errors(tmp_path):
    from vgen import VideoPipeline
    from vgen.models import TINY, build_reference_pipeline, save_pipeline
    from vgen.parallel import enable_context_parallel, is_main_process

    folder = save_pipeline(build_reference_pipeline(TINY, seed=3), tmp_path / "m", dtype=torch.float32)
    pipe = VideoPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    pipe.enable_sparse_attention("vmoba", **VMOBA)
    single = pipe("a red circle moves left", num_frames=9, height=64, width=64, num_inference_steps=2, progress=False)
    mp.spawn(pipeline_worker, args=(2, free_port(), str(folder), str(tmp_path / "v.npy")), nprocs=2)
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"v-{rank}.npy"), single, atol=1e-4)
    assert is_main_process()  # no process group: this process writes
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        enable_context_parallel(pipe.transformer)


def test_torchrun_generate_writes_once(tmp_path):
    import subprocess
    import sys

    from vgen.models import TINY, build_reference_pipeline, save_pipeline

    folder = save_pipeline(build_reference_pipeline(TINY, seed=3), tmp_path / "m", dtype=torch.float32)
    out = tmp_path / "clip.png"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "vgen.cli", "generate", "--model", str(folder), "--prompt",
               "a red circle moves left", "--frames", "9", "--height", "64", "--width", "64", "--steps", "2",
               "--device", "cpu", "--attention", "vmoba", "--set", "block_size=[16,16]", "--set",
               "spatial_chunk=[4,4]", "--set", "cube_chunk=[2,4,4]", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.exists() and result.stdout.count("wrote") == 1
    # the same generation as a ring over the two processes: the same picture
    ring_out = tmp_path / "clip-ring.png"
    ring = command[: command.index("--out")] + ["--ring", "2", "--out", str(ring_out)]
    result = subprocess.run(ring, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    import imageio.v3 as iio

    difference = np.abs(iio.imread(ring_out).astype(int) - iio.imread(out).astype(int))
    assert difference.max() <= 2, difference.max()  # 8-bit rounding of the same video
    single = [sys.executable, "-m", "vgen.cli", "generate", "--model", str(folder), "--prompt", "x", "--ulysses", "2",
              "--out", str(out)]  # fmt: skip
    bad = subprocess.run(single, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "need that many processes" in bad.stderr
    # an error after the process group is up ends every rank with it (no rank left waiting at a barrier)
    failing = command[: command.index("--attention")] + ["--attention", "vmoba", "--set", "block_size=[5,5]",
                                                          "--out", str(tmp_path / "never.png")]  # fmt: skip
    bad = subprocess.run(failing, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "block_size" in bad.stderr and not (tmp_path / "never.png").exists()


def skyreels_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from vgen import VideoPipeline
        from vgen.pipelines.tiny import tiny_call_kwargs

        pipe = VideoPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
        pipe.enable_parallelism()
        kwargs = {k: v for k, v in tiny_call_kwargs("skyreels").items() if k != "output_type"}
        np.save(out.replace(".npy", f"-{rank}.npy"), pipe("a red circle moves left", progress=False, **kwargs))
        leave_rank()
    finally:
        dist.destroy_process_group()


def test_vgen_plan_for_skyreels_diffusion_forcing(tmp_path):
    """SkyReels-V2 ships no context-parallel plan; vgen's handles its per-token (diffusion forcing) modulation."""
    from vgen import VideoPipeline
    from vgen.pipelines.tiny import save_tiny_pipeline, tiny_call_kwargs

    folder = save_tiny_pipeline("skyreels", tmp_path / "sky")
    kwargs = {k: v for k, v in tiny_call_kwargs("skyreels").items() if k != "output_type"}
    pipe = VideoPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    single = pipe("a red circle moves left", progress=False, **kwargs)
    mp.spawn(skyreels_worker, args=(2, free_port(), str(folder), str(tmp_path / "v.npy")), nprocs=2)
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"v-{rank}.npy"), single, atol=1e-5)


def test_a_token_count_the_ranks_cannot_split_is_named(tmp_path):
    from vgen import VideoPipeline
    from vgen.models import TINY, build_reference_pipeline, save_pipeline

    folder = save_pipeline(build_reference_pipeline(TINY, seed=3), tmp_path / "m", dtype=torch.float32)
    pipe = VideoPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    pipe._parallel_ranks = 7  # as enable_parallelism records it
    with pytest.raises(ValueError, match="do not split over 7 processes"):
        pipe("a red circle moves left", num_frames=9, height=64, width=64, num_inference_steps=1, progress=False)


JOINT_VMOBA = {"block_size": (16, 16), "temporal_chunk": 1, "spatial_chunk": (1, 1), "cube_chunk": (1, 1, 1),
               "threshold": 0.5}  # fmt: skip


def tiny_joint(family: str):
    """A 2-head HunyuanVideo or MotifVideo transformer (Motif with a decoder layer, whose extra tokens are the
    split video) and a batch of two prompts with different padding, the same in every process."""
    from vgen.pipelines.tiny import _TEXT_DIM, build_tiny_pipeline

    transformer = build_tiny_pipeline(family, 0).transformer
    if family == "motif":
        torch.manual_seed(1)
        # (without the config's `_use_default_values`, which names num_decoder_layers and would make
        # from_config ignore the value given here)
        config = {k: v for k, v in transformer.config.items() if k != "_use_default_values"}
        transformer = type(transformer).from_config({**config, "num_single_layers": 2, "num_decoder_layers": 1})
        assert transformer.config.num_decoder_layers == 1
    transformer.eval()
    torch.manual_seed(2)
    channels = transformer.config.in_channels
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    inputs = {"hidden_states": torch.randn(2, channels, 3, 4, 4), "timestep": torch.tensor([500, 500]),
              "encoder_hidden_states": torch.randn(2, 8, _TEXT_DIM), "encoder_attention_mask": mask,
              "return_dict": False}  # fmt: skip
    if family == "hunyuan":
        inputs.update(pooled_projections=torch.randn(2, _TEXT_DIM), guidance=torch.tensor([6000.0, 6000.0]))
    return transformer, inputs


def joint_worker(rank: int, world: int, port: int, family: str, method: str | None, out: str,
                 ring: int = 1) -> None:  # fmt: skip
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from vgen.parallel import enable_context_parallel
        from vgen.pipelines.plumbing import apply_sparse_attention, sparse_attention_method

        model, inputs = tiny_joint(family)
        if method:
            apply_sparse_attention(model, method, **JOINT_VMOBA)
        enable_context_parallel(model, ring=ring)
        applied = sparse_attention_method(model).name
        from vgen.ring import ring_attention as original_ring

        lengths = []

        def spy(*args, **kwargs):  # the joint attention goes around the ring, padded keys counted per sample
            lengths.append((sum(args[4]), kwargs.get("key_lengths")))  # (tokens, valid keys per sample)
            return original_ring(*args, **kwargs)

        with mock.patch("vgen.ring.ring_attention", spy), torch.no_grad():
            result = model(**inputs)[0]
        if rank == 0:
            torch.save({"out": result, "method": applied, "ring_calls": lengths}, out)
        leave_rank()
    finally:
        dist.destroy_process_group()


def joint_ring_worker(rank: int, world: int, port: int, family: str, method: str | None, out: str) -> None:
    joint_worker(rank, world, port, family, method, out, ring=world)


@pytest.mark.parametrize("family", ["hunyuan", "motif"])
@pytest.mark.parametrize("method,ring", [(None, False), ("vmoba", False), ("vmoba", True)])
def test_joint_attention_models_match_one_process(family, method, ring, tmp_path):
    """vgen's plans for HunyuanVideo and MotifVideo: text whole on every rank, padded prompts, Motif's decoder;
    with Ulysses, and as a ring (each rank takes part of the text into the ring; the padded prompt becomes
    per-sample key counts). (The ring cuts at 16-token blocks here: dense's 128-token blocks would leave the
    tiny model's 20 tokens one block, too few for two ranks.)"""
    from vgen.pipelines.plumbing import apply_sparse_attention

    model, inputs = tiny_joint(family)
    if method:
        apply_sparse_attention(model, method, **JOINT_VMOBA)
    with torch.no_grad():
        single = model(**inputs)[0]
    out = tmp_path / "out.pt"
    mp.spawn(joint_ring_worker if ring else joint_worker, args=(2, free_port(), family, method, str(out)), nprocs=2)
    saved = torch.load(out)
    torch.testing.assert_close(saved["out"], single, atol=2e-5, rtol=2e-5)
    # Without a method the joint attention still goes through vgen (its dense method), to be reordered.
    assert saved["method"] == (method or "dense")
    if ring:
        # the joint calls: 12 video tokens and 8 text tokens, the second prompt with 3 of them valid; Motif's
        # decoder layer: 12 video tokens and the encoder's 12 (split over the ranks too), no mask
        text, decoder = (20, [20, 15]), (24, None)
        assert saved["ring_calls"] == ([text, text, decoder] if family == "motif" else [text, text])
    else:
        assert not saved["ring_calls"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("split_context", [False, True])
def test_rank_chunked_and_single_gpu_orders_are_inverse(world, position, split_context):
    from vgen.parallel import canonical_tokens, rank_chunked_tokens

    video, extra = 6 * world, 5
    tokens = torch.randn(2, 3, video + extra * (world if split_context else 1), 4)  # single-GPU order
    if position == "before":
        ctx, vid = tokens.split([tokens.shape[2] - video, video], dim=2)
    else:
        vid, ctx = tokens.split([video, tokens.shape[2] - video], dim=2)
    # What Ulysses hands a rank: each rank's (video shard, its extra tokens), rank after rank.
    ctxs = ctx.chunk(world, dim=2) if split_context else [ctx] * world
    chunks = [(c, v) if position == "before" else (v, c) for v, c in zip(vid.chunk(world, dim=2), ctxs, strict=True)]
    chunked = torch.cat([x for pair in chunks for x in pair], dim=2)
    order = (world, video, position, split_context)
    assert torch.equal(canonical_tokens(chunked, *order), tokens)
    assert torch.equal(rank_chunked_tokens(tokens, *order), chunked)
    with pytest.raises(ValueError, match="does not split into"):
        canonical_tokens(chunked[:, :, :-1], *order)


def test_ring_settings_it_cannot_run_are_refused_with_a_pointer_to_its_design():
    from vgen.parallel import enable_context_parallel

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        model, _ = tiny_wan()
        with pytest.raises(ValueError, match=r"ring=2 must divide the number of processes \(1\)"):
            enable_context_parallel(model, ring=2)
        with pytest.raises(ValueError, match=r"ulysses=2 x ring=1 must be the number of processes \(1\)"):
            enable_context_parallel(model, ulysses=2)
        with pytest.raises(ValueError, match="ring must be a positive int"):
            enable_context_parallel(model, ring=0)
        with pytest.raises(ValueError, match="ulysses must be a positive int"):
            enable_context_parallel(model, ulysses=0)
    finally:
        dist.destroy_process_group()


def ring_worker(rank: int, world: int, port: int, method: str | None, out: str, ulysses: int = 1) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from vgen.parallel import enable_context_parallel
        from vgen.pipelines.plumbing import apply_sparse_attention
        from vgen.ring import ring_attention as original_ring

        model, inputs = tiny_wan()
        if method:
            apply_sparse_attention(model, method, **VMOBA)
        enable_context_parallel(model, ulysses=ulysses, ring=world // ulysses)
        shards = []

        def spy(q, *args, **kwargs):  # every self-attention goes around the ring, on block-aligned shards
            shards.append((q.shape[1], q.shape[2]))  # (tokens, heads)
            return original_ring(q, *args, **kwargs)

        with mock.patch("vgen.ring.ring_attention", spy), torch.no_grad():
            result = model(**inputs)[0]
        if rank == 0:
            torch.save({"out": result, "shards": shards}, out)
        leave_rank()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", [None, "vmoba"])
def test_ring_of_two_processes_matches_one(method, tmp_path):
    saved = spawn_and_compare(ring_worker, method, tmp_path)
    # rank 0's block-aligned shard in each of the two layers: 192 tokens in 128-token blocks (dense) or 16
    assert saved["shards"] == ([(96, 4)] * 2 if method else [(128, 4)] * 2)


def ulysses_ring_worker(rank: int, world: int, port: int, method: str | None, out: str) -> None:
    ring_worker(rank, world, port, method, out, ulysses=2)


def test_ulysses_and_ring_on_four_processes_match_one(tmp_path):
    """ulysses=2 x ring=2: diffusers' all-to-all hands each rank 2 of the 4 heads and half the tokens, and
    vgen's ring runs over the two ranks holding the same heads."""
    saved = spawn_and_compare(ulysses_ring_worker, "vmoba", tmp_path, world=4)
    assert saved["shards"] == [(96, 2)] * 2  # 192 tokens over a ring of 2 (16-token blocks), 2 of the 4 heads
