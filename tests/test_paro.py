"""PAROAttention: block mass against explicit softmax pooling, order choice on a known pattern,
calibration end to end on a tiny model, the method against fp32 attention, mismatch errors, the CLI."""

import numpy as np
import pytest
import torch

from vgen import VideoPipeline
from vgen.attention import VideoLayout, create_method
from vgen.attention.paro import AXIS_ORDERS, ParoCalibration, _captured, block_mass, calibrate_paro
from vgen.cli import main
from vgen.kernels.permute import axis_order
from vgen.kernels.reference import attention_reference
from vgen.models import TINY, build_reference_pipeline, save_pipeline


def test_block_mass_pools_the_softmax():
    torch.manual_seed(0)
    layout = VideoLayout(frames=2, height=3, width=5, text_after=3)  # 33 tokens, ragged 8-blocks
    q, k = torch.randn(2, 33, 2, 8), torch.randn(2, 33, 2, 8)
    mass = block_mass(q, k, layout, block_size=8, query_chunk=7)
    p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 8**-0.5, -1).sum(0)  # [H, S, S]
    for o, order in enumerate(AXIS_ORDERS):
        perm = axis_order(layout, order)
        permuted = p[:, perm][:, :, perm]
        expected = torch.zeros(2, 5, 5, dtype=torch.float64)
        for i in range(33):
            for j in range(33):
                expected[:, i // 8, j // 8] += permuted[:, i, j]
        torch.testing.assert_close(mass[o].double(), expected, atol=1e-5, rtol=1e-5)
    assert mass.sum().item() == pytest.approx(6 * 2 * 2 * 33, rel=1e-5)


def test_temporal_heads_choose_a_pixel_major_order():
    layout = VideoLayout(frames=8, height=4, width=4)  # 128 tokens; a 16-block holds 2 pixels' 8 frames in "hwt"
    t, y, x = torch.meshgrid(torch.arange(8), torch.arange(4), torch.arange(4), indexing="ij")
    pixel = (y * 4 + x).flatten()
    q = torch.nn.functional.one_hot(pixel, 16).float()[None, :, None] * 6.0  # attends its own pixel over time
    mass = block_mass(q, q, layout, block_size=16)
    captured = _captured(mass[:, 0], keep=8)  # 8 of 64 blocks: the diagonal in the right order
    best = AXIS_ORDERS[int(captured.argmax())]
    assert best in ("hwt", "wht") and captured.max() > 0.9 > captured[AXIS_ORDERS.index("thw")]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_pipeline(build_reference_pipeline(TINY, seed=2), tmp_path_factory.mktemp("m") / "model",
                         dtype=torch.float32)  # fmt: skip


GENERATE = dict(num_frames=9, height=64, width=64, num_inference_steps=3)  # 3 x 8 x 8 = 192 tokens


@pytest.fixture(scope="module")
def calibration(tiny_model, tmp_path_factory):
    pipe = VideoPipeline.from_pretrained(tiny_model, torch_dtype=torch.float32, device="cpu")
    path = tmp_path_factory.mktemp("cal") / "paro.safetensors"
    calibrate_paro(pipe, ["a red circle moves left"], path, density=0.4, buckets=2, block_size=32, **GENERATE)
    return path


def test_calibration_file(calibration):
    cal = ParoCalibration.load(calibration)
    assert cal.orders.shape == (2, 2) and int(cal.orders.max()) < 6  # TINY: 2 layers x 2 heads
    assert cal.masks.shape == (2, 2, 2, 6, 6)
    assert cal.masks[..., torch.arange(6), torch.arange(6)].all()  # the diagonal is always kept
    assert cal.meta["grid"] == [3, 8, 8, 0, 0] and cal.meta["steps"] == 3 and cal.meta["density"] == 0.4
    kept = cal.masks.float().mean().item()
    assert 0.4 <= kept < 0.4 + 1 / 36 + 1e-6  # at least the target, at most one block over per head
    assert [cal.bucket(s) for s in range(5)] == [0, 0, 1, 1, 1]


def test_paro_matches_fp32_attention_under_its_masks(calibration):
    torch.manual_seed(1)
    cal = ParoCalibration.load(calibration)
    layout = VideoLayout(frames=3, height=8, width=8)
    q, k, v = (torch.randn(1, 192, 2, 16) for _ in range(3))
    method = create_method("paro", calibration=str(calibration), quant="none")
    quantized = create_method("paro", calibration=str(calibration))  # int8 by default
    fp8 = create_method("paro", calibration=str(calibration), quant="fp8")  # INT8 QK^T, FP8 PV
    for step, layer in ((0, 0), (2, 1)):
        out = method(q, k, v, layout=layout, step=step, layer=layer)
        int8 = quantized(q, k, v, layout=layout, step=step, layer=layer)
        assert ((int8 - out).norm() / out.norm()).item() < 0.03
        assert ((fp8(q, k, v, layout=layout, step=step, layer=layer) - out).norm() / out.norm()).item() < 0.05
        mask = torch.empty(1, 2, 192, 192, dtype=torch.bool)
        for h in range(2):
            perm = axis_order(layout, AXIS_ORDERS[int(cal.orders[layer, h])])
            blocks = cal.masks[cal.bucket(step), layer, h]
            tokens = blocks[torch.arange(192) // 32][:, torch.arange(192) // 32]
            mask[0, h, perm[:, None], perm[None, :]] = tokens
        torch.testing.assert_close(out, attention_reference(q, k, v, mask=mask), atol=3e-5, rtol=3e-5)
        assert method.last_density == pytest.approx(mask.float().mean().item())


def test_paro_in_the_pipeline_and_mismatches(tiny_model, calibration):
    pipe = VideoPipeline.from_pretrained(tiny_model, torch_dtype=torch.float32, device="cpu")
    dense = pipe("a blue square grows", progress=False, **GENERATE)
    pipe.enable_sparse_attention("paro", calibration=str(calibration))
    sparse = pipe("a blue square grows", progress=False, **GENERATE)
    assert np.isfinite(sparse).all() and 0 < np.abs(sparse - dense).mean()
    with pytest.raises(ValueError, match="calibration is for the token grid"):
        pipe("a blue square grows", progress=False, **dict(GENERATE, height=32))
    pipe.disable_sparse_attention()
    method = create_method("paro", calibration=str(calibration))
    q = torch.randn(1, 192, 3, 16)
    with pytest.raises(ValueError, match="a different model"):
        method(q, q, q, layout=VideoLayout(frames=3, height=8, width=8), step=0, layer=0)
    with pytest.raises(FileNotFoundError, match="vgen calibrate paro"):
        create_method("paro", calibration="/nonexistent.safetensors")
    with pytest.raises(ValueError, match="calibration must be the path"):
        create_method("paro")
    with pytest.raises(ValueError, match="quant must be one of"):
        create_method("paro", calibration=str(calibration), quant="int2")
    assert create_method("paro", calibration=str(calibration), quant="fp8").config.quant == "fp8"  # FP8 PV


def test_calibrate_cli(tiny_model, tmp_path, capsys):
    out = tmp_path / "cal.safetensors"
    argv = ["calibrate", "paro", "--model", str(tiny_model), "--out", str(out), "--prompts", "1", "--frames", "9",
            "--height", "64", "--width", "64", "--steps", "2", "--block-size", "16", "--buckets", "1"]  # fmt: skip
    assert main(argv) == 0
    assert "layer  1: orders" in capsys.readouterr().out and ParoCalibration.load(out).masks.shape[0] == 1
    assert main([*argv, "--density", "1.5"]) == 2
    assert "density must be in (0, 1]" in capsys.readouterr().err
    assert main([*argv, "--block-size", "24"]) == 2
    assert "block_size must be a power of two" in capsys.readouterr().err


def test_mask_at_density_adds_the_heaviest_blocks_until_the_budget():
    from vgen.attention.paro import _mask_at_density

    torch.manual_seed(4)
    mass = torch.rand(3, 5, 5)
    seq, block, density = 150, 32, 0.37  # ragged last block: pairs per block pair differ
    got = _mask_at_density(mass, seq, block, density)
    tokens = [min(block, seq - i) for i in range(0, seq, block)]
    for h in range(3):  # the rule, one block at a time
        keep = torch.eye(5, dtype=torch.bool)
        used = sum(tokens[i] ** 2 for i in range(5))
        for index in mass[h].flatten().argsort(descending=True).tolist():
            i, j = divmod(index, 5)
            if used >= density * seq * seq:
                break
            if not keep[i, j]:
                keep[i, j] = True
                used += tokens[i] * tokens[j]
        assert torch.equal(got[h], keep)


def test_pooled_budget_goes_to_spread_maps_and_keeps_the_total():
    from vgen.attention.paro import _mask_at_density, _pooled_masks

    m, block = 6, 32
    seq = m * block
    spread = torch.ones(m, m) + 0.01 * torch.rand(m, m)  # attention everywhere
    peaked = torch.eye(m) * 50 + torch.rand(m, m) * 0.5  # attention on the diagonal
    maps = torch.stack([spread, peaked]) * 100
    density = 0.4
    pooled = _pooled_masks(maps, seq, block, density)
    each = _mask_at_density(maps, seq, block, density)
    pairs = block * block
    budget = density * 2 * seq * seq
    used = pooled.sum() * pairs
    assert used >= budget - pairs and used <= budget + pairs  # the shared budget, to a block
    assert pooled[0].sum() > each[0].sum() and pooled[1].sum() < each[1].sum()  # moved to the spread map
    assert pooled[:, torch.arange(m), torch.arange(m)].all()  # diagonals always
    captured = lambda keep: (maps * keep).sum() / maps.sum()  # noqa: E731
    assert captured(pooled) > captured(each)
    # one map per slice is the per-head rule
    assert torch.equal(_pooled_masks(maps[:, None], seq, block, density).squeeze(1), each)


def _group_sum(x: torch.Tensor, dims: int) -> torch.Tensor:
    """``x`` ``[K, L, H]`` summed over all but its first ``dims`` dimensions (one budget group each)."""
    return x if dims == x.dim() else x.flatten(dims).sum(-1)


def test_shared_masks_keep_the_heaviest_blocks_within_each_budget():
    from vgen.attention.paro import _shared_masks

    torch.manual_seed(5)
    k, layers, heads, m, block = 2, 2, 3, 5, 32
    seq = m * block - 7  # ragged last block
    steps = [1, 3]  # bucket 1 has three denoising steps: its summed mass is three steps' worth
    per_step = torch.rand(k, layers, heads, m, m) + 20 * torch.eye(m)  # peaked maps ...
    per_step[0] = torch.rand(layers, heads, m, m) + 1.0  # ... except bucket 0's, which are spread
    mass = per_step * torch.tensor(steps, dtype=torch.float32).view(k, 1, 1, 1, 1)
    density = 0.45
    tokens = (seq - torch.arange(0, seq, block)).clamp(max=block).double()
    pair_count = tokens[:, None] * tokens  # [M, M] token pairs per block pair
    off = ~torch.eye(m, dtype=torch.bool)
    # (share, how many leading dims of [K, L, H] one budget group spans, each map's weight in the budget)
    for share, group_dims in (("head", 3), ("layer", 2), ("model", 1), ("run", 0)):
        masks = _shared_masks(mass, share, seq, block, density, steps)
        assert masks.shape == mass.shape and masks[..., torch.arange(m), torch.arange(m)].all()  # diagonal always
        uses = torch.tensor(steps if share == "run" else [1, 1], dtype=torch.float64).view(k, 1, 1)
        cost = (masks.double() * pair_count).sum((-1, -2)) * uses  # [K, L, H]
        budget = _group_sum(torch.ones(k, layers, heads, dtype=torch.float64) * uses, group_dims) * density * seq**2
        over = _group_sum(cost, group_dims) - budget
        assert ((over >= 0) & (over < block * block * max(steps))).all(), (share, over)  # to within one block
        # independent rule: within a group, no dropped block outweighs a kept one (per step for "run")
        weight = (per_step if share == "run" else mass).double()
        for index in torch.cartesian_prod(*[torch.arange(n) for n in (k, layers, heads)[:group_dims]]).reshape(
                -1, group_dims) if group_dims else [()]:  # fmt: skip
            kept_w = weight[tuple(index)][(masks[tuple(index)] & off)]
            dropped_w = weight[tuple(index)][(~masks[tuple(index)] & off)]
            if kept_w.numel() and dropped_w.numel():
                assert kept_w.min() >= dropped_w.max(), (share, index)
    run = _shared_masks(mass, "run", seq, block, density, steps)
    model = _shared_masks(mass, "model", seq, block, density, steps)
    assert run[0].sum() > model[0].sum() and run[1].sum() < model[1].sum()  # blocks move to the spread bucket
    # compared per step: equal per-step maps in buckets of 1 and 3 steps get the same blocks, to a tie
    same = per_step[1:].repeat(2, 1, 1, 1, 1) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1, 1)
    even = _shared_masks(same, "run", seq, block, density, steps)
    assert (even[0].sum() - even[1].sum()).abs() <= 1


def test_calibration_shared_over_the_run(tiny_model, tmp_path):
    pipe = VideoPipeline.from_pretrained(tiny_model, torch_dtype=torch.float32, device="cpu")
    path = tmp_path / "run.safetensors"
    cal = calibrate_paro(pipe, ["a red circle moves left"], path, density=0.4, buckets=2, block_size=32,
                         share="run", **GENERATE)  # fmt: skip
    assert cal.meta["share"] == "run" and len(cal.meta["bucket_density"]) == 2
    assert cal.masks[..., torch.arange(6), torch.arange(6)].all()
    steps = [cal.bucket(step) for step in range(GENERATE["num_inference_steps"])]  # 3 steps: buckets 0, 0, 1
    used = sum(cal.masks[b].sum().item() for b in steps)  # blocks computed over the run (all blocks whole)
    budget = 0.4 * len(steps) * 2 * 2 * 36  # steps x layers x heads x 6 x 6 blocks
    assert 0 <= used - budget < 2  # to within one block of the bucket with two steps
    kept = [cal.masks[b].float().mean().item() for b in range(2)]
    assert cal.meta["bucket_density"] == pytest.approx(kept)
    with pytest.raises(ValueError, match="share must be one of"):
        calibrate_paro(pipe, ["a red circle"], tmp_path / "x.safetensors", share="step", **GENERATE)


def test_calibration_with_a_density_schedule(tiny_model, tmp_path, capsys):
    """A density per timestep bucket: bucket k's masks keep density[k] of the token pairs (per model here, to
    within one block), the meta holds the schedule; a wrong length, a value out of (0, 1] or share "run" is a clear
    error, and the CLI takes the schedule comma-separated."""
    pipe = VideoPipeline.from_pretrained(tiny_model, torch_dtype=torch.float32, device="cpu")
    cal = calibrate_paro(pipe, ["a red circle moves left"], tmp_path / "s.safetensors", density=[1.0, 0.4],
                         buckets=2, block_size=32, share="model", **GENERATE)  # fmt: skip
    assert cal.meta["density"] == [1.0, 0.4] and cal.masks[0].all()  # 6 x 6 whole blocks: pairs = blocks
    assert 0 <= cal.masks[1].float().mean().item() - 0.4 < 1 / (2 * 2 * 36)
    assert cal.meta["bucket_density"] == pytest.approx([1.0, cal.masks[1].float().mean().item()])
    # one measurement (the dense generations) builds any calibration: the same as calibrate_paro's, to the bit
    from vgen.attention.paro import measure_paro

    measurement = measure_paro(pipe, ["a red circle moves left"], buckets=2, block_size=32, **GENERATE)
    again = measurement.calibration(None, density=[1.0, 0.4], share="model")
    assert torch.equal(again.orders, cal.orders) and torch.equal(again.masks, cal.masks) and again.meta == cal.meta
    flat = calibrate_paro(pipe, ["a red circle moves left"], tmp_path / "f.safetensors", density=0.4, buckets=2,
                          block_size=32, **GENERATE)  # fmt: skip
    built = measurement.calibration(tmp_path / "g.safetensors", density=0.4)
    assert torch.equal(built.masks, flat.masks) and built.meta == flat.meta
    assert torch.equal(ParoCalibration.load(tmp_path / "g.safetensors").masks, flat.masks)
    for density, match in (([0.5], "needs 2 values"), ([0.5, 0.0], "needs 2 values"), ("0.3", "a number in")):
        with pytest.raises(ValueError, match=match):
            calibrate_paro(pipe, ["a"], tmp_path / "x.safetensors", density=density, buckets=2, **GENERATE)
    with pytest.raises(ValueError, match="share 'run' cannot take one"):
        calibrate_paro(pipe, ["a"], tmp_path / "x.safetensors", density=[0.5, 0.3], buckets=2, share="run",
                       **GENERATE)  # fmt: skip
    from vgen.attention.paro import _schedule_of

    assert _schedule_of(np.array([1.0, 0.5]), 2, "model") == [1.0, 0.5] and _schedule_of(0.3, 2, "head") is None
    for bad in (["0.3", "0.5"], True, [[0.3], [0.5]]):
        with pytest.raises(ValueError, match="a number in"):
            _schedule_of(bad, 2, "model")
    from vgen.cli import _densities

    assert _densities("0.3") == 0.3 and _densities("1,0.2") == [1.0, 0.2]
    argv = ["calibrate", "paro", "--model", str(tiny_model), "--out", str(tmp_path / "cli.safetensors"), "--prompts",
            "1", "--frames", "9", "--height", "64", "--width", "64", "--steps", "2", "--block-size", "16", "--buckets",
            "2", "--share", "model", "--density", "1,0.5"]  # fmt: skip
    assert main(argv) == 0
    assert "density [1.0, 0.5]" in capsys.readouterr().out
    assert ParoCalibration.load(tmp_path / "cli.safetensors").meta["density"] == [1.0, 0.5]
    with pytest.raises(SystemExit):
        main(["calibrate", "paro", "--model", str(tiny_model), "--out", str(tmp_path / "c.safetensors"),
              "--density", "1,x"])  # fmt: skip
    assert "comma-separated numbers" in capsys.readouterr().err


def test_cli_shares_are_the_methods():
    from vgen.attention.paro import SHARES
    from vgen.cli import PARO_SHARES

    assert PARO_SHARES == SHARES


def _ring_worker(rank: int, world: int, port: int, calibration: str, out: str, quant: str) -> None:
    import os

    import torch.distributed as dist

    from vgen.ring import ring_method_attention

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 192, 2, 16) for _ in range(3))
    splits = [100, 92]  # canonical shards that cut the 32-token blocks
    mine = slice(sum(splits[:rank]), sum(splits[: rank + 1]))
    method = create_method("paro", calibration=calibration, quant=quant)
    layout = VideoLayout(3, 8, 8)
    results = [ring_method_attention(method, q[:, mine], k[:, mine], v[:, mine], layout=layout, step=step,
                                     layer=layer, splits=splits) for step, layer in ((0, 0), (2, 1))]  # fmt: skip
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.parametrize("quant", ["none", "int8", "fp8"])
def test_paro_as_a_ring_of_two_processes_matches_one(calibration, tmp_path, quant):
    """Per-head token orders go through the ring's re-cut (one all-to-all of (token, head) pairs); quantised,
    every ring step smooths its keys by the whole sequence's mean and returns a log-sum-exp to merge (close to one
    process for INT8 and FP8 PV, whose V scales are per step; equal without quantisation)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ring.pt"
    mp.spawn(_ring_worker, args=(2, port, str(calibration), str(out), quant), nprocs=2)
    gathered = torch.load(out)
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 192, 2, 16) for _ in range(3))
    method = create_method("paro", calibration=str(calibration), quant=quant)
    for i, (step, layer) in enumerate(((0, 0), (2, 1))):
        want = method(q, k, v, layout=VideoLayout(3, 8, 8), step=step, layer=layer)
        got = torch.cat([g[i] for g in gathered], 1)
        if quant != "none":  # each ring step scales its own V (FP8: and rounds P against its own running maximum)
            assert ((got - want).norm() / want.norm()).item() < {"int8": 0.02, "fp8": 0.05}[quant]
        else:
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
