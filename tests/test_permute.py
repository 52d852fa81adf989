"""Token permutation: the Triton gather/scatter against the PyTorch reference, and the video token orders."""

import itertools

import pytest
import torch

from vgen.attention.layout import VideoLayout
from vgen.kernels.permute import (
    axis_order,
    check_permutation,
    curve_order,
    permute_tokens,
    permute_tokens_reference,
    tile_order,
    unpermute_tokens,
    unpermute_tokens_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, H = 2, 3


def _perm(S: int, per_head: bool, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(S, generator=g) for _ in range(H if per_head else 1)]
    perm = torch.stack(rows) if per_head else rows[0]
    return perm.to(dtype=dtype, device=DEVICE)


def _x(S: int, D: int, dtype: torch.dtype, layout: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(B, S, H, D, generator=g).to(DEVICE, dtype)
    if layout == "bhsd":  # a transposed view of [B, H, S, D]
        return torch.randn(B, H, S, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
    # every other element along D: no unit stride anywhere
    return torch.randn(B, S, H, 2 * D, generator=g).to(DEVICE, dtype)[..., ::2]


CASES = [
    pytest.param(S, D, dtype, layout, per_head, id=f"S{S}-D{D}-{dtype}-{layout}-{'head' if per_head else 'shared'}")
    for S, D, dtype, layout, per_head in [
        (200, 64, torch.float32, "contiguous", False),
        (200, 64, torch.float16, "bhsd", True),
        (77, 24, torch.float32, "bhsd", False),
        (77, 24, torch.float16, "contiguous", True),
        (130, 16, torch.float32, "strided", True),
        (1, 16, torch.float32, "contiguous", True),
    ]
]


@pytest.mark.parametrize("S, D, dtype, layout, per_head", CASES)
def test_kernel_matches_reference(S, D, dtype, layout, per_head):
    x = _x(S, D, dtype, layout, seed=S + D)
    for perm_dtype in (torch.int64, torch.int32):
        perm = _perm(S, per_head, perm_dtype, seed=S)
        out = permute_tokens(x, perm)
        assert out.is_contiguous() and out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, permute_tokens_reference(x, perm))
        back = unpermute_tokens(x, perm)
        assert back.is_contiguous()
        assert torch.equal(back, unpermute_tokens_reference(x, perm))
        assert torch.equal(unpermute_tokens(out, perm), x)
        assert torch.equal(permute_tokens(back, perm), x)


def test_reference_definition():
    x = _x(9, 4, torch.float32, "bhsd", seed=0)
    perm = _perm(9, True, torch.int64, seed=1)
    out, back = permute_tokens_reference(x, perm), unpermute_tokens_reference(x, perm)
    for b, i, h in itertools.product(range(B), range(9), range(H)):
        assert torch.equal(out[b, i, h], x[b, perm[h, i], h])
        assert torch.equal(back[b, perm[h, i], h], x[b, i, h])


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = _x(20, 8, torch.float32, "bhsd", seed=0).cpu()
    perm = _perm(20, True, torch.int64, seed=0).cpu()
    out = permute_tokens(x, perm)
    assert out.is_contiguous() and torch.equal(out, permute_tokens_reference(x, perm))
    assert torch.equal(unpermute_tokens(out, perm), x)


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "heads"])
@pytest.mark.parametrize("unpermute", [False, True], ids=["permute", "unpermute"])
def test_gradient_matches_reference(per_head, unpermute):
    S, D = 50, 24
    op, reference = (
        (unpermute_tokens, unpermute_tokens_reference) if unpermute else (permute_tokens, permute_tokens_reference)
    )
    x = _x(S, D, torch.float32, "bhsd", seed=3).detach().requires_grad_()
    perm = _perm(S, per_head, torch.int64, seed=4)
    dout = torch.randn(B, S, H, D, device=DEVICE)
    (dx,) = torch.autograd.grad(op(x, perm), x, dout)
    (dx_ref,) = torch.autograd.grad(reference(x, perm), x, dout)
    assert torch.equal(dx, dx_ref)
    # the backward is itself differentiable
    v = torch.randn_like(dout, requires_grad=True)
    (dx,) = torch.autograd.grad(op(x, perm), x, v, create_graph=True)
    (ddout,) = torch.autograd.grad(dx, v, dout)
    assert torch.equal(ddout, op(dout, perm))


LAYOUTS = [
    pytest.param(VideoLayout(3, 5, 7), id="3x5x7"),
    pytest.param(VideoLayout(2, 4, 6, text_before=5), id="5+2x4x6"),
    pytest.param(VideoLayout(4, 3, 2, text_after=4), id="4x3x2+4"),
    pytest.param(VideoLayout(1, 1, 1, text_before=2, text_after=3), id="2+1x1x1+3"),
]
ORDERS = ["thw", "twh", "htw", "hwt", "wth", "wht"]


def _all_orders(layout: VideoLayout) -> dict[str, torch.Tensor]:
    orders = {f"axis-{order}": axis_order(layout, order) for order in ORDERS}
    for tile in [(1, 1, 1), (1, 2, 4), (2, 3, 3), (5, 9, 9)]:
        orders[f"tile-{tile}"] = tile_order(layout, tile)
    orders["curve"] = curve_order(layout)
    return orders


@pytest.mark.parametrize("layout", LAYOUTS)
def test_orders_are_permutations_keeping_text_in_place(layout):
    video = torch.arange(layout.seq_len)[layout.video_slice]
    for name, perm in _all_orders(layout).items():
        assert perm.dtype == torch.int64 and perm.shape == (layout.seq_len,), name
        check_permutation(perm)
        assert torch.equal(perm[: layout.text_before], torch.arange(layout.text_before)), name
        assert torch.equal(perm[layout.video_slice].sort().values, video), name


@pytest.mark.parametrize("order", ORDERS)
def test_axis_order_enumerates_axes_slowest_first(order):
    layout = VideoLayout(2, 3, 4, text_before=1, text_after=2)
    sizes = {"t": layout.frames, "h": layout.height, "w": layout.width}
    expected = []
    for values in itertools.product(*(range(sizes[axis]) for axis in order)):
        coord = dict(zip(order, values, strict=True))
        expected.append(layout.text_before + (coord["t"] * layout.height + coord["h"]) * layout.width + coord["w"])
    assert axis_order(layout, order)[layout.video_slice].tolist() == expected


def test_axis_order_matches_a_grid_reshape():
    layout = VideoLayout(3, 4, 5, text_before=2)
    T, Hp, Wp = layout.frames, layout.height, layout.width
    x = _x(layout.seq_len, 8, torch.float32, "contiguous", seed=0)
    out = permute_tokens(x, axis_order(layout, "twh").to(DEVICE))
    grid = x[:, layout.video_slice].reshape(B, T, Hp, Wp, H, 8)
    assert torch.equal(out[:, layout.video_slice], grid.permute(0, 1, 3, 2, 4, 5).reshape(B, T * Hp * Wp, H, 8))
    assert torch.equal(out[:, : layout.text_before], x[:, : layout.text_before])
    assert torch.equal(axis_order(layout, "thw"), torch.arange(layout.seq_len))


@pytest.mark.parametrize("tile", [(1, 2, 3), (2, 2, 4), (3, 5, 7), (4, 1, 1)], ids=str)
def test_tile_order_groups_each_tile(tile):
    layout = VideoLayout(3, 5, 7, text_after=3)
    tt, th, tw = tile
    expected = []
    for t0, y0, x0 in itertools.product(range(0, 3, tt), range(0, 5, th), range(0, 7, tw)):
        inside = itertools.product(range(t0, min(t0 + tt, 3)), range(y0, min(y0 + th, 5)), range(x0, min(x0 + tw, 7)))
        expected += [(t * 5 + y) * 7 + x for t, y, x in inside]
    assert tile_order(layout, tile)[layout.video_slice].tolist() == expected


@pytest.mark.parametrize("tile", [(1, 8, 16), (2, 8, 8)], ids=str)
def test_tile_order_runs_of_128_are_cubes(tile):
    layout = VideoLayout(4, 16, 32, text_before=7)
    video = tile_order(layout, tile)[layout.video_slice] - layout.text_before
    t, y, x = video // (16 * 32), video // 32 % 16, video % 32
    for run in range(0, layout.num_video_tokens, 128):
        chunk = slice(run, run + 128)
        extent = tuple(int(c[chunk].max() - c[chunk].min()) + 1 for c in (t, y, x))
        assert extent == tile
        assert int(t[chunk].min()) % tile[0] == 0 and int(y[chunk].min()) % tile[1] == 0


def _coords(layout: VideoLayout, perm: torch.Tensor) -> torch.Tensor:
    video = perm[layout.video_slice] - layout.text_before
    t, y, x = video // layout.tokens_per_frame, video // layout.width % layout.height, video % layout.width
    return torch.stack([t, y, x], dim=1)


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16])
def test_curve_order_steps_to_a_neighbour_on_power_of_two_cubes(size):
    layout = VideoLayout(size, size, size, text_before=3, text_after=1)
    coords = _coords(layout, curve_order(layout))
    assert coords[0].tolist() == [0, 0, 0]
    assert bool(((coords[1:] - coords[:-1]).abs().sum(1) == 1).all())


def test_curve_order_on_ragged_grids_is_local():
    layout = VideoLayout(3, 6, 10)
    coords = _coords(layout, curve_order(layout))
    steps = (coords[1:] - coords[:-1]).abs().sum(1)
    # the enclosing 16-cube's curve leaves the grid and comes back: jumps are rare and short
    assert float((steps == 1).float().mean()) > 0.8
    assert int(steps.max()) <= 16


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 5, 3), torch.arange(5)), r"x must be \[B, S, H, D\]"),
        ((torch.zeros(2, 5, 3, 4), torch.arange(5.0)), "perm must be an int32 or int64"),
        ((torch.zeros(2, 5, 3, 4), torch.arange(6)), r"perm must be \[S\] = \[5\] or \[H, S\] = \[3, 5\]"),
        ((torch.zeros(2, 5, 3, 4), torch.arange(5).expand(2, 5)), r"got \(2, 5\)"),
        ((torch.zeros(2, 5, 3, 4), torch.arange(5).expand(1, 3, 5)), r"perm must be \[S\]"),
    ],
    ids=["x-3d", "perm-float", "perm-length", "perm-heads", "perm-3d"],
)
@pytest.mark.parametrize("op", [permute_tokens, unpermute_tokens], ids=["permute", "unpermute"])
def test_bad_arguments(op, args, match):
    with pytest.raises(ValueError, match=match):
        op(*args)


def test_bad_orders_and_permutations():
    layout = VideoLayout(2, 3, 4)
    with pytest.raises(ValueError, match="unknown axis order 'tyx'; valid orders: thw, twh, htw, hwt, wth, wht"):
        axis_order(layout, "tyx")
    for tile in [(0, 2, 2), (1, -1, 2), (1, 2), (1.5, 2, 2)]:
        with pytest.raises(ValueError, match=r"tile must be three positive ints \(tt, th, tw\)"):
            tile_order(layout, tile)
    with pytest.raises(ValueError, match=r"not a permutation of range\(4\)"):
        check_permutation(torch.tensor([[0, 1, 2, 3], [0, 1, 1, 3]]))
    with pytest.raises(ValueError, match=r"not a permutation of range\(3\)"):
        check_permutation(torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="integer"):
        check_permutation(torch.arange(3.0))
