"""vgen.ring on the CPU with gloo: re-cuts between token orders and the ring against one process."""

import os
import sys
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from test_parallel import free_port, leave_rank  # noqa: E402

from vgen.attention import VideoLayout, create_method  # noqa: E402
from vgen.attention.block_mask import BlockMask  # noqa: E402
from vgen.kernels.reference import attention_reference  # noqa: E402
from vgen.ring import block_splits, exchange, ring_attention, ring_method_attention  # noqa: E402
from vgen.ring import gather_tokens as original_gather  # noqa: E402


def _inputs(seed: int, n: int, block: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g) for _ in range(3))
    m = -(-n // block)
    dense = torch.rand(2, 3, m, m, generator=g) < 0.45
    dense[0, 0, 1] = False  # a query block that keeps nothing: zeros
    dense[1, 2, :, 1:] = False  # a head whose later steps keep no block for any row
    perm = torch.randperm(n, generator=g)
    return q, k, v, BlockMask.from_dense(dense, (block, block), (n, n)), perm


def _lengths(n: int) -> list[int]:
    return [n - 7, n // 2 + 3]


def worker(rank: int, world: int, port: int, n: int, block: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        q, k, v, mask, perm = _inputs(0, n, block)
        splits = block_splits(n, block, world)
        even = [n // world + (r < n % world) for r in range(world)]  # canonical shards: not block-aligned
        lo = sum(even[:rank])
        # canonical (even) shards -> the permuted order's block-aligned shards -> back
        shard = exchange(q[:, lo : lo + even[rank]], perm, even, splits)
        back = exchange(shard, torch.argsort(perm), splits, even)
        starts = [sum(splits[:r]) for r in range(world + 1)]
        mine = slice(starts[rank], starts[rank + 1])
        o, lse = ring_attention(q[:, mine], k[:, mine], v[:, mine], mask, splits, return_lse=True)
        # padded keys at the end: batch element 0 loses a few, element 1 most of rank 1's shard
        padded = ring_attention(q[:, mine], k[:, mine], v[:, mine], mask, splits, key_lengths=_lengths(n))
        gathered = [None] * world
        dist.all_gather_object(gathered, {"shard": shard, "back": back, "out": o, "lse": lse, "padded": padded})
        if rank == 0:
            torch.save({"parts": gathered, "splits": splits, "even": even}, out)
        leave_rank()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n", [200, 257])  # ragged last block; shards of 4 and 3 (5 and 4) blocks of 32
def test_two_ranks_match_one_process(n, tmp_path):
    block = 32
    out = tmp_path / "ring.pt"
    mp.spawn(worker, args=(2, free_port(), n, block, str(out)), nprocs=2)
    saved = torch.load(out)
    q, k, v, mask, perm = _inputs(0, n, block)
    parts = saved["parts"]
    assert [p["shard"].shape[1] for p in parts] == saved["splits"]
    torch.testing.assert_close(torch.cat([p["shard"] for p in parts], 1), q[:, perm], atol=0, rtol=0)
    torch.testing.assert_close(torch.cat([p["back"] for p in parts], 1), q, atol=0, rtol=0)
    want, want_lse = attention_reference(q, k, v, mask=mask.expand_tokens(), return_lse=True)  # fp32, token mask
    got = torch.cat([p["out"] for p in parts], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([p["lse"] for p in parts], 2), want_lse, atol=1e-5, rtol=0)
    assert got[0, 32:64, 0].eq(0).all()  # the query block that keeps nothing
    keys = torch.arange(n)[None, :] < torch.tensor(_lengths(n))[:, None]  # [B, keys]: the valid prefix
    token_mask = mask.expand_tokens() & keys[:, None, None, :]
    want_padded = attention_reference(q, k, v, mask=token_mask)
    torch.testing.assert_close(torch.cat([p["padded"] for p in parts], 1), want_padded, atol=1e-5, rtol=1e-5)


def test_block_splits_and_errors():
    assert block_splits(257, 32, 2) == [160, 97]
    assert block_splits(256, 32, 3) == [96, 96, 64]
    assert sum(block_splits(1000, 128, 7)) == 1000
    with pytest.raises(ValueError, match="too few for 4 ranks"):
        block_splits(300, 128, 4)
    with pytest.raises(ValueError, match="block must be a positive int"):
        block_splits(300, 0, 2)


VMOBA = {"block_size": (16, 16), "temporal_chunk": 1, "spatial_chunk": (4, 4), "cube_chunk": (2, 4, 4)}
# (method, config, layer, step): vmoba's three partitions (1D is in order; 2D and 3D permute the tokens),
# a dense warm-up step of vmoba, a static window, dense, rectified (the ring, then its pooled correction
# with every rank's pooled values; both ways of weighing the kept part), psa, dense warm-up steps of both,
# and the quantised dense method (every step smooths its keys by the whole sequence's mean; close to one process,
# not equal)
WINDOW = {"window": (1, 3, 3), "block_size": (16, 16)}
METHOD_CASES = [("vmoba", VMOBA, 0, 0), ("vmoba", VMOBA, 1, 0), ("vmoba", VMOBA, 2, 0),
                ("vmoba", {**VMOBA, "dense_steps": 1}, 1, 0), ("window", WINDOW, 0, 0),
                ("dense", {}, 0, 0), ("rectified", {"block_size": 16, "mass": 0.5}, 0, 0),
                ("rectified", {"block_size": 16, "mass": 0.5, "rectify_kept": True}, 0, 0),
                ("psa", {"budget": 0.5}, 0, 0), ("psa", {"budget": 0.5, "dense_steps": 1}, 0, 0),
                ("rectified", {"block_size": 16, "mass": 0.5, "dense_steps": 1}, 0, 0),
                ("quant", {"block_size": (32, 32)}, 0, 0), ("quant", {"block_size": (32, 64), "pv": "int4"}, 0, 0),
                ("quant", {"block_size": (32, 32), "dense_steps": 1}, 0, 0),
                ("quant", {"block_size": (32, 32), "pv": "fp8"}, 0, 0)]  # fmt: skip
LAYOUT = VideoLayout(4, 12, 10)  # 480 tokens: a ragged 128-token block


def method_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, LAYOUT.seq_len, 2, 16, generator=g) for _ in range(3))
        even = [250, 230]  # canonical shards that cut both the 16- and the 128-token blocks
        mine = slice(sum(even[:rank]), sum(even[: rank + 1]))
        results, gathers = [], []
        for name, config, layer, step in METHOD_CASES:
            method = create_method(name, **config)
            calls = []

            def counted(*args, calls=calls, **kwargs):
                calls.append(args[0].shape)
                return original_gather(*args, **kwargs)

            with mock.patch("vgen.ring.gather_tokens", counted):
                results.append(ring_method_attention(method, q[:, mine], k[:, mine], v[:, mine], layout=LAYOUT,
                                                     step=step, layer=layer, splits=even))  # fmt: skip
            gathers.append(len(calls))
        gathered = [None] * world
        dist.all_gather_object(gathered, (results, gathers))
        if rank == 0:
            torch.save(gathered, out)
        leave_rank()
    finally:
        dist.destroy_process_group()


def test_methods_over_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "methods.pt"
    mp.spawn(method_worker, args=(2, free_port(), str(out)), nprocs=2)
    gathered = torch.load(out)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, LAYOUT.seq_len, 2, 16, generator=g) for _ in range(3))
    for i, (name, config, layer, step) in enumerate(METHOD_CASES):
        method = create_method(name, **config)
        want = method(q, k, v, layout=LAYOUT, step=step, layer=layer)
        got = torch.cat([gathered[r][0][i] for r in range(2)], 1)
        # q and k are gathered only for a selection that reads them: not for dense, window or warm-up steps
        reads = name not in ("dense", "window") and step >= config.get("dense_steps", 0)
        assert (gathered[0][1][i] > 0) == reads, (name, config, gathered[0][1][i])
        # Quantised steps are close to one process, not equal: FP8 and INT8 PV scale V per channel in each step (FP8
        # also rounds P against the step's running maximum); and the keys' smoothing mean, summed from the gathered
        # keys in another order, can differ in its last bit, which moves a key's INT8 code at a rounding boundary
        # and with it a P level (INT4's 7 levels: one such flip is 8e-3 here). FP8 PV alone is about 4% from exact
        # attention on random inputs (test_quantized). The dense warm-up step is equal
        if name == "quant" and step >= config.get("dense_steps", 0):
            assert ((got - want).norm() / want.norm()).item() < 0.05, config
            continue
        torch.testing.assert_close(
            got, want, atol=2e-5, rtol=2e-5, msg=lambda m, n=name, c=config, i=layer: f"{n} {c} layer {i}: {m}"
        )
        if name in ("vmoba", "rectified", "psa") and not config.get("dense_steps"):
            assert 0 < float(method.last_density) < 1  # a sparse mask, not everything


def test_methods_without_a_block_sparse_plan_are_named():
    from vgen.attention import AttentionMethod

    class Opaque(AttentionMethod):
        name = "opaque"

    q = torch.randn(1, LAYOUT.seq_len, 2, 16)
    with pytest.raises(NotImplementedError, match="'opaque' does not split into a block mask"):
        Opaque(create_method("dense").config).sparse_plan(q, q, layout=LAYOUT, step=0, layer=0, scale=None)
