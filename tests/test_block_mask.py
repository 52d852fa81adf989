"""BlockMask against brute-force Python references, and the VideoLayout builders against token-level masks."""

import pytest
import torch

from vgen.attention.block_mask import BlockMask, frame_mask, local_window_mask, position_mask
from vgen.attention.layout import VideoLayout


def _random_dense(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A random block pattern with an empty and a full query-block row, and an empty key-block column."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(shape, generator=g) < 0.4
    dense[..., 0, :] = False
    dense[..., -1, :] = True
    dense[..., :-1, 1 % shape[-1]] = False
    return dense


def _kept_lists(dense: torch.Tensor) -> list:
    """Per row of ``dense [..., N]``, the True positions, ascending, by a plain loop."""
    return [[j for j, kept in enumerate(row) if kept] for row in dense.reshape(-1, dense.shape[-1]).tolist()]


def _check_compact(num: torch.Tensor, indices: torch.Tensor, dense: torch.Tensor) -> None:
    """``num``/``indices`` hold exactly the kept positions of ``dense``, ascending, padded with valid ones."""
    n = dense.shape[-1]
    assert num.dtype == indices.dtype == torch.int32 and num.is_contiguous() and indices.is_contiguous()
    assert indices.shape == dense.shape and num.shape == dense.shape[:-1]
    expected = _kept_lists(dense)
    rows = indices.reshape(-1, n).tolist()
    assert num.flatten().tolist() == [len(kept) for kept in expected]
    for row, kept in zip(rows, expected, strict=True):
        assert row[: len(kept)] == kept
        assert all(0 <= j < n for j in row)


def _check_mask(mask: BlockMask, dense: torch.Tensor) -> None:
    _check_compact(mask.kv_num_blocks, mask.kv_indices, dense)
    _check_compact(mask.q_num_blocks, mask.q_indices, dense.mT)
    assert torch.equal(mask.to_dense(), dense)


@pytest.mark.parametrize(
    "shape, block_size, seq_lens",
    [
        ((2, 3, 5, 7), (16, 16), (80, 112)),
        ((2, 3, 5, 7), (16, 32), (70, 200)),  # both sides ragged
        ((1, 4, 6, 6), (128, 128), (700, 641)),  # batch broadcast
        ((3, 1, 4, 9), (64, 128), (193, 1025)),  # head broadcast
        ((1, 1, 1, 1), (128, 128), (5, 1)),  # one short block
    ],
    ids=["even", "ragged", "batch1", "heads1", "single"],
)
def test_from_dense_round_trip(shape, block_size, seq_lens):
    dense = _random_dense(shape, seed=sum(shape))
    mask = BlockMask.from_dense(dense, block_size, seq_lens)
    assert mask.shape == shape and mask.seq_lens == seq_lens and mask.block_size == block_size
    _check_mask(mask, dense)


def test_from_dense_defaults_and_2d():
    dense = _random_dense((4, 6), seed=1)
    mask = BlockMask.from_dense(dense)
    assert mask.shape == (1, 1, 4, 6) and mask.seq_lens == (512, 768) and mask.block_size == (128, 128)
    _check_mask(mask, dense[None, None])


def test_from_dense_accepts_strided_input():
    dense = _random_dense((2, 3, 12, 10), seed=2)
    view = dense.transpose(0, 1).contiguous().transpose(0, 1)[..., ::2, :]  # non-contiguous
    _check_mask(BlockMask.from_dense(view, (8, 8)), view.contiguous())


def test_full():
    mask = BlockMask.full(2, 1, (300, 130), (128, 64))
    assert mask.shape == (2, 1, 3, 3) and mask.to_dense().all() and mask.density() == 1.0
    assert mask.kv_indices.tolist() == [[[[0, 1, 2]] * 3]] * 2


def test_density_counts_ragged_blocks_by_their_size():
    block_size, seq_lens = (16, 32), (70, 200)
    dense = _random_dense((2, 3, 5, 7), seed=3)
    mask = BlockMask.from_dense(dense, block_size, seq_lens)
    kept = 0
    for *_, i, j in dense.nonzero().tolist():
        rows = min(block_size[0], seq_lens[0] - i * block_size[0])
        cols = min(block_size[1], seq_lens[1] - j * block_size[1])
        kept += rows * cols
    assert mask.density() == pytest.approx(kept / (2 * 3 * seq_lens[0] * seq_lens[1]), rel=1e-12)
    assert mask.density() == pytest.approx(mask.expand_tokens().double().mean().item(), rel=1e-12)


def test_expand_tokens():
    dense = _random_dense((1, 2, 3, 4), seed=4)
    tokens = BlockMask.from_dense(dense, (4, 8), (10, 27)).expand_tokens()
    assert tokens.shape == (1, 2, 10, 27)
    for q in range(10):
        for k in range(27):
            assert tokens[0, 1, q, k] == dense[0, 1, q // 4, k // 8]


def test_to_string_shows_the_pattern():
    dense = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    mask = BlockMask.from_dense(dense, (64, 64), (100, 150))
    header, *rows = str(mask).splitlines()
    assert rows == ["█··", "██·"]
    assert "(1, 1, 2, 3)" in header and "(64, 64)" in header and f"{mask.density():.4f}" in header
    assert "\n" not in repr(mask) and "(1, 1, 2, 3)" in repr(mask)


def test_to_string_of_one_head_and_downsampled():
    dense = torch.zeros(2, 3, 130, 130, dtype=torch.bool)
    dense[1, 2] = torch.eye(130, dtype=torch.bool)
    header, *rows = BlockMask.from_dense(dense, (16, 16)).to_string(batch=1, head=2, max_blocks=64).splitlines()
    assert "batch 1 head 2" in header and "3x3 blocks" in header
    assert rows == ["·" * i + "█" + "·" * (43 - i) for i in range(44)]
    with pytest.raises(ValueError, match="head must be an int in"):
        BlockMask.from_dense(dense).to_string(head=3)


def test_to_device_keeps_the_mask():
    dense = _random_dense((2, 1, 3, 5), seed=5)
    mask = BlockMask.from_dense(dense, (8, 8), (20, 33)).to("cpu")
    assert mask.seq_lens == (20, 33) and mask.device.type == "cpu"
    _check_mask(mask, dense)


@pytest.mark.parametrize(
    "dense, kwargs, match",
    [
        (torch.ones(2, 3, dtype=torch.int32), {}, "dense must be a bool tensor"),
        (torch.ones(1, 2, 3, dtype=torch.bool), {}, "dense must have 4 dims"),
        (torch.ones(2, 3, dtype=torch.bool), {"seq_lens": (256, 512)}, r"dense has 2x3 .* needs 2x4"),
        (torch.ones(2, 3, dtype=torch.bool), {"block_size": (0, 128)}, "block_size must be a pair of positive ints"),
        (torch.ones(2, 3, dtype=torch.bool), {"block_size": 128}, "block_size must be a pair"),
        (torch.ones(2, 3, dtype=torch.bool), {"seq_lens": (256, 300.0)}, "seq_lens must be a pair"),
    ],
    ids=["dtype", "ndim", "blocks", "block-zero", "block-int", "seq-float"],
)
def test_from_dense_rejects_bad_input(dense, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockMask.from_dense(dense, **kwargs)


def test_constructor_checks_fields():
    good = BlockMask.from_dense(torch.ones(1, 2, 3, 4, dtype=torch.bool), (8, 8))
    fields = [good.kv_num_blocks, good.kv_indices, good.q_num_blocks, good.q_indices]
    with pytest.raises(ValueError, match="kv_indices must be an int32 tensor"):
        BlockMask(fields[0], fields[1].long(), *fields[2:], seq_lens=(24, 32), block_size=(8, 8))
    with pytest.raises(ValueError, match=r"q_indices must have shape \[1, 2, 4, 3\]"):
        BlockMask(*fields[:3], fields[3][..., :2].contiguous(), seq_lens=(24, 32), block_size=(8, 8))
    with pytest.raises(ValueError, match=r"kv_num_blocks must have shape \[1, 2, 4\]"):
        BlockMask(*fields, seq_lens=(32, 32), block_size=(8, 8))
    with pytest.raises(ValueError, match="q_indices must be contiguous"):
        BlockMask(*fields[:3], fields[3].mT.contiguous().mT, seq_lens=(24, 32), block_size=(8, 8))


# Builders -------------------------------------------------------------------------------------------


def _token_coords(layout: VideoLayout) -> list:
    """(t, y, x) of each token in sequence order, None for a text token, by explicit loops."""
    video = [(t, y, x) for t in range(layout.frames) for y in range(layout.height) for x in range(layout.width)]
    return [None] * layout.text_before + video + [None] * layout.text_after


def _token_window_mask(layout: VideoLayout, window) -> torch.Tensor:
    """bool [S, S]: text attends and is attended by all; video pairs within the window per axis."""
    coords = _token_coords(layout)
    text = torch.tensor([c is None for c in coords])
    grid = torch.tensor([c if c is not None else (0, 0, 0) for c in coords])
    mask = text[:, None] | text[None, :]
    near = torch.ones_like(mask)
    for axis, reach in enumerate(window):
        if reach is not None:
            near &= (grid[:, None, axis] - grid[None, :, axis]).abs() <= reach
    return mask | near


def _or_pool(tokens: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """bool [Mq, Mk]: a block pair is True when any of its token pairs is."""
    (sq, sk), (bq, bk) = tokens.shape, block_size
    mq, mk = -(-sq // bq), -(-sk // bk)
    padded = torch.zeros(mq * bq, mk * bk, dtype=torch.bool)
    padded[:sq, :sk] = tokens
    return padded.view(mq, bq, mk, bk).any(3).any(1)


def _conservative_reference(layout: VideoLayout, window, block_size: tuple[int, int]) -> torch.Tensor:
    """bool [Mq, Mk] of the documented rule, by loops: keep a pair when either block holds text,
    or when on every bounded axis the gap between the blocks' coordinate ranges is within the window."""
    coords = _token_coords(layout)

    def ranges(block: int) -> list:
        out = []
        for start in range(0, len(coords), block):
            members = coords[start : start + block]
            if None in members:
                out.append(None)
            else:
                out.append([(min(c[a] for c in members), max(c[a] for c in members)) for a in range(3)])
        return out

    rows, cols = ranges(block_size[0]), ranges(block_size[1])
    dense = torch.zeros(len(rows), len(cols), dtype=torch.bool)
    for i, q in enumerate(rows):
        for j, k in enumerate(cols):
            dense[i, j] = (
                q is None
                or k is None
                or all(w is None or max(k[a][0] - q[a][1], q[a][0] - k[a][1]) <= w for a, w in enumerate(window))
            )
    return dense


BUILDER_CASES = [
    (VideoLayout(4, 6, 8), (1, 1, 2), (16, 16)),
    (VideoLayout(4, 6, 8, text_before=20, text_after=7), (1, 1, 2), (16, 16)),
    (VideoLayout(4, 6, 8, text_before=20, text_after=7), (0, 2, None), (16, 32)),
    (VideoLayout(5, 5, 7, text_after=13), (None, 1, 0), (24, 8)),
    (VideoLayout(3, 7, 9, text_before=5), (1, None, None), (64, 64)),  # blocks span frames
    (VideoLayout(6, 4, 4), (0, 0, 0), (5, 7)),  # ragged, odd sizes
    (VideoLayout(2, 3, 3, text_before=2, text_after=3), (0, 1, 1), (128, 128)),  # one block
]
BUILDER_IDS = ["video", "text", "text-mixed-blocks", "text-after", "span-frames", "odd-blocks", "one-block"]


@pytest.mark.parametrize("layout, window, block_size", BUILDER_CASES, ids=BUILDER_IDS)
def test_window_mask_covers_the_token_mask(layout, window, block_size):
    mask = local_window_mask(layout, window, block_size)
    dense = mask.to_dense()[0, 0]
    tokens = _token_window_mask(layout, window)
    pooled = _or_pool(tokens, block_size)
    assert mask.shape[:2] == (1, 1) and mask.seq_lens == (layout.seq_len, layout.seq_len)
    assert not (pooled & ~dense).any(), "a token pair inside the window was dropped"
    assert torch.equal(dense, _conservative_reference(layout, window, block_size))
    _check_mask(mask, dense[None, None])
    # Text is exact: a block holding text is kept in its whole row and column, as its tokens are.
    holds_text = [None in _token_coords(layout)[i : i + b] for b in block_size for i in range(0, layout.seq_len, b)]
    q_text = torch.tensor(holds_text[: dense.shape[0]])
    k_text = torch.tensor(holds_text[dense.shape[0] :])
    assert dense[q_text].all() and dense[:, k_text].all()
    assert torch.equal(dense[q_text], pooled[q_text]) and torch.equal(dense[:, k_text], pooled[:, k_text])


@pytest.mark.parametrize(
    "layout, window, block_size",
    [
        (VideoLayout(3, 4, 8, text_before=8), (1, 1, 2), (4, 4)),  # blocks inside one row
        (VideoLayout(3, 4, 8, text_after=3), (0, 1, 3), (8, 16)),  # blocks are whole rows
        (VideoLayout(4, 4, 6, text_before=24), (1, 1, 1), (24, 48)),  # blocks are whole frames
        (VideoLayout(3, 4, 5, text_before=3, text_after=9), (None, None, None), (16, 8)),
    ],
    ids=["in-row", "rows", "frames", "unbounded"],
)
def test_window_mask_is_exact_when_blocks_are_boxes(layout, window, block_size):
    dense = local_window_mask(layout, window, block_size).to_dense()[0, 0]
    assert torch.equal(dense, _or_pool(_token_window_mask(layout, window), block_size))


@pytest.mark.parametrize("frames", [0, 1, 2])
def test_frame_mask_with_one_frame_per_block_is_exact(frames):
    layout = VideoLayout(5, 3, 4, text_after=12)
    block_size = (layout.tokens_per_frame, layout.tokens_per_frame)
    mask = frame_mask(layout, frames, block_size)
    dense = mask.to_dense()[0, 0]
    assert torch.equal(dense, _or_pool(_token_window_mask(layout, (frames, None, None)), block_size))
    expected = torch.ones(6, 6, dtype=torch.bool)
    expected[:5, :5] = (torch.arange(5)[:, None] - torch.arange(5)).abs() <= frames
    assert torch.equal(dense, expected)


def test_stripe_builders_are_windows():
    layout = VideoLayout(4, 5, 6, text_before=7)
    for block_size in [(8, 8), (16, 8)]:
        for reach in [0, 1]:
            stripes = frame_mask(layout, reach, block_size).to_dense()
            assert torch.equal(stripes, local_window_mask(layout, (reach, None, None), block_size).to_dense())
            stripes = position_mask(layout, reach, block_size).to_dense()
            assert torch.equal(stripes, local_window_mask(layout, (None, reach, reach), block_size).to_dense())


def test_position_mask_pattern():
    # One block per row of a 3-frame, 4x4 video: a query row attends the same row in every frame.
    mask = position_mask(VideoLayout(3, 4, 4), 0, (4, 4))
    assert mask.density() == pytest.approx(1 / 4)
    assert str(mask).splitlines()[1:] == ["█···" * 3, "·█··" * 3, "··█·" * 3, "···█" * 3] * 3


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: local_window_mask(VideoLayout(2, 2, 2), (1, -1, 1)), r"window\[1\] must be a non-negative int"),
        (lambda: local_window_mask(VideoLayout(2, 2, 2), (1.5, 1, 1)), r"window\[0\] must be a non-negative int"),
        (lambda: local_window_mask(VideoLayout(2, 2, 2), (True, 1, 1)), r"window\[0\]"),
        (lambda: local_window_mask(VideoLayout(2, 2, 2), (1, 1)), "window must be a .* triple"),
        (lambda: local_window_mask(VideoLayout(2, 2, 2), 1), "window must be a .* triple"),
        (lambda: local_window_mask((2, 2, 2), (1, 1, 1)), "layout must be a VideoLayout"),
        (lambda: local_window_mask(VideoLayout(2, 2, 2), (1, 1, 1), (64,)), "block_size must be a pair"),
        (lambda: frame_mask(VideoLayout(2, 2, 2), block_size=(64, 0)), "block_size must be a pair of positive"),
        (lambda: frame_mask(VideoLayout(2, 2, 2), -1), "frames must be a non-negative int, got -1"),
        (lambda: frame_mask(VideoLayout(2, 2, 2), None), "frames must be a non-negative int, got None"),
        (lambda: position_mask(VideoLayout(2, 2, 2), 0.5), "radius must be a non-negative int"),
    ],
    ids=[
        "negative",
        "float",
        "bool",
        "short",
        "scalar",
        "layout",
        "block-len",
        "block-0",
        "frames",
        "frames-none",
        "radius",
    ],
)
def test_builders_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_building_does_not_synchronise():
    layout = VideoLayout(5, 12, 20, text_before=33, text_after=9)
    dense = _random_dense((2, 3, 10, 12), seed=6).cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks = [
            BlockMask.from_dense(dense, (16, 16), (150, 180)),
            BlockMask.full(1, 2, (300, 300), device="cuda"),
            local_window_mask(layout, (1, 2, 3), (16, 32), device="cuda"),
            frame_mask(layout, 1, (64, 64), device="cuda"),
            position_mask(layout, 1, (32, 32), device="cuda"),
        ]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu = local_window_mask(layout, (1, 2, 3), (16, 32))
    assert torch.equal(masks[2].to_dense().cpu(), cpu.to_dense())
    assert torch.equal(masks[0].to("cpu").to_dense(), dense.cpu())


@pytest.mark.parametrize("seed", range(6))
def test_window_kernel_matches_the_pytorch_builder(seed):
    from vgen.attention.block_mask import _window_blocks_reference
    from vgen.kernels.window_mask import window_block_indices

    g = torch.Generator().manual_seed(seed)
    frames, height, width, before, after = (int(v) for v in torch.randint(1, 7, (5,), generator=g))
    layout = VideoLayout(frames, height, width, text_before=before * (seed % 2), text_after=after * (seed % 3 == 0))
    block_size = ((16, 16), (16, 32), (32, 16))[seed % 3]
    reach = {axis: int(r) for axis, r in enumerate(torch.randint(0, 3, (3,), generator=g)) if seed % 4 != axis}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = _window_blocks_reference(layout, reach, block_size, device)
    grid = (frames, height, width)
    reaches = tuple(reach.get(axis) for axis in range(3))
    for (num, idx), (ref_num, ref_idx) in zip(
        [window_block_indices(layout.seq_len, block_size, grid, layout.text_before, reaches, device),
         window_block_indices(layout.seq_len, block_size[::-1], grid, layout.text_before, reaches, device)],
        [expected[:2], expected[2:]], strict=True,
    ):
        assert torch.equal(num, ref_num)
        for row, count in enumerate(num.tolist()):
            assert torch.equal(idx[row, :count], ref_idx[row, :count])
            assert sorted(idx[row].tolist()) == list(range(idx.shape[1]))
