"""Block-selection kernels (Triton, through the interpreter on the CPU) against their PyTorch references."""

import pytest
import torch

from vgen.kernels.selection import (
    compact_rows,
    compact_rows_reference,
    global_cut,
    global_cut_reference,
    segment_means,
    segment_means_reference,
)

pytestmark = pytest.mark.usefixtures("kernels_on_the_gpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_means_match_the_reference(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 300, 3, 40, dtype=dtype)[:, :, :, :40]  # head_dim below its power of two
    sizes = torch.tensor([1, 37, 64, 65, 100, 33])
    starts = torch.cumsum(sizes, 0) - sizes
    got = segment_means(x, starts, sizes)
    torch.testing.assert_close(got, segment_means_reference(x, starts, sizes), rtol=1e-5, atol=1e-5)
    strided = torch.randn(2, 3, 300, 40).transpose(1, 2)  # non-contiguous sequence stride
    torch.testing.assert_close(segment_means(strided, starts, sizes), segment_means_reference(strided, starts, sizes))
    offset = strided + 5.0  # a shared offset, as keys have: the spread must not lose it to cancellation
    means, spread = segment_means(offset, starts, sizes, with_spread=True)
    ref_means, ref_spread = segment_means_reference(offset, starts, sizes, with_spread=True)
    torch.testing.assert_close(means, ref_means)
    torch.testing.assert_close(spread, ref_spread, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 7), (2, 3, 37, 11), (1, 2, 64, 40)])
@pytest.mark.parametrize("threshold", [0.05, 0.25, 0.6, 1.0])
def test_global_cut_by_mass_matches_a_sort(shape, threshold):
    torch.manual_seed(len(shape) + int(threshold * 100))
    scores = torch.randn(shape) * 3
    got = global_cut(scores, threshold=threshold)
    if threshold == 1.0:  # everything; a sort's fp32 running sum can pass 1 early and drop the tail
        assert got.all()
    else:
        assert torch.equal(got, global_cut_reference(scores, threshold=threshold))
    assert got.flatten(2).any(-1).all()  # a positive threshold keeps at least the best entry


@pytest.mark.parametrize("count", [1, 5, 400])
def test_global_cut_by_count_matches_a_sort(count):
    torch.manual_seed(count)
    scores = torch.randn(2, 2, 30, 9)
    got = global_cut(scores, count=count)
    assert torch.equal(got, global_cut_reference(scores, count=min(count, 270)))
    assert (got.flatten(2).sum(-1) == min(count, 270)).all()


def test_global_cut_keeps_ties_and_needs_one_rule():
    scores = torch.tensor([[[3.0, 1.0, 3.0, -2.0]]])
    assert global_cut(scores, count=1).tolist() == [[[True, False, True, False]]]
    # the PyTorch path (a CPU without the interpreter) keeps them too
    assert global_cut_reference(scores, count=1).tolist() == [[[True, False, True, False]]]
    with pytest.raises(ValueError, match="exactly one of threshold and count"):
        global_cut(scores)


@pytest.mark.parametrize("n", [1, 13, 64, 300])
def test_compact_rows_match_the_reference(n):
    torch.manual_seed(n)
    dense = torch.rand(2, 3, 5, n) < 0.4
    dense[0, 0, 0] = False
    dense[0, 0, 1] = True
    count, indices = compact_rows(dense)
    ref_count, ref_indices = compact_rows_reference(dense)
    assert torch.equal(count, ref_count) and torch.equal(indices, ref_indices)


def test_global_cut_counts_at_the_ends():
    scores = torch.randn(1, 2, 4, 3)
    assert not global_cut(scores, count=0).any()
    assert global_cut(scores, count=12).all() and global_cut(scores, count=50).all()


def test_psa_levels_by_cuts_match_levels_by_sorting(monkeypatch):
    import vgen.attention.psa as psa
    import vgen.kernels.selection as selection

    torch.manual_seed(3)
    importance = torch.rand(2, 3, 9, 9).flatten(-2).softmax(-1).view(2, 3, 9, 9)
    always = torch.eye(9, dtype=torch.bool)
    cases = ((0.1, (1.0, 2.0, 2.0, 5.0)), (0.3, (1.0, 0.0, 0.0, 0.0)), (0.7, (1.0, 1.0, 1.0, 1.0)))
    for budget, proportions in cases:
        by_cuts = psa.assign_levels(importance, budget, proportions, always)
        monkeypatch.setattr(selection, "use_triton", lambda _: False)
        by_sorting = psa.assign_levels(importance, budget, proportions, always)
        monkeypatch.undo()
        assert torch.equal(by_cuts, by_sorting), (budget, proportions)


def test_block_moments_kernel_and_pytorch_paths_agree(monkeypatch):
    import vgen.attention.common as common

    torch.manual_seed(4)
    x = torch.randn(1, 150, 2, 24) + 3.0  # ragged last block
    kernel = common.block_moments(x, 32)
    monkeypatch.setattr(common, "use_triton", lambda _: False)
    torch_path = common.block_moments(x, 32)
    for a, b in zip(kernel, torch_path, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_psa_levels_at_a_half_integer_bound_and_with_peaked_scores(monkeypatch):
    import vgen.attention.psa as psa
    import vgen.kernels.selection as selection

    torch.manual_seed(5)
    always = torch.zeros(5, 5, dtype=torch.bool)
    for scores in (torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 5) * 40):  # budget 0.3 of 25 pairs: bound 7.5
        by_cuts = psa.assign_levels(scores, 0.3, (1.0, 0.0, 0.0, 0.0), always)
        monkeypatch.setattr(selection, "use_triton", lambda _: False)
        by_sorting = psa.assign_levels(scores, 0.3, (1.0, 0.0, 0.0, 0.0), always)
        monkeypatch.undo()
        assert torch.equal(by_cuts, by_sorting)
        assert (by_cuts == 1).sum() == 2 * 8


@pytest.mark.parametrize("threshold, count", [(0.05, None), (0.3, None), (0.9, None), (None, 1), (None, 77)])
def test_many_program_cut_matches_a_sort(threshold, count):
    """The pivot search that large slices take (small chunks here, so that many programs share a slice)."""
    from vgen.kernels.selection import _global_cut_parallel

    torch.manual_seed(3 if count is None else count)
    scores = torch.randn(2, 3, 50, 41) * 4
    scores[0, 1, :5] = scores[0, 1, 5:10]  # ties in one slice
    flat = scores.reshape(6, -1)
    got = _global_cut_parallel(flat, threshold, count, chunk=256).view(scores.shape)
    assert torch.equal(got, global_cut_reference(scores, threshold=threshold, count=count) | (got & ties(scores, got)))
    assert got.flatten(2).any(-1).all()
    assert torch.equal(got, global_cut(scores, threshold=threshold, count=count))  # the one-program bisection


@pytest.mark.parametrize("radix", [False, True], ids=["pivots", "radix"])
@pytest.mark.parametrize("count", [3, 6, 9])
def test_cuts_treat_signed_zeros_as_one_value(count, radix, monkeypatch):
    """-0.0 and +0.0 are one score to every cut path (the parallel one compares values, the others keys)."""
    import vgen.kernels.selection as selection
    from vgen.kernels.selection import _global_cut_parallel

    monkeypatch.setattr(selection, "RADIX_COUNT", radix)

    scores = torch.tensor([1.0, 2.0, -0.0, 0.0, -0.0, 0.0, -1.0, -3.0, 0.5, -0.0]).repeat(2, 1, 1)
    expected = scores >= sorted(scores[0, 0].tolist(), reverse=True)[count - 1]  # ties at the cut all kept
    assert torch.equal(global_cut(scores, count=count), expected)
    assert torch.equal(global_cut_reference(scores, count=count), expected)
    parallel = _global_cut_parallel(scores.reshape(2, -1), None, count, chunk=4)
    assert torch.equal(parallel.view(scores.shape), expected)


@pytest.mark.parametrize("radix", [False, True], ids=["pivots", "radix"])
@pytest.mark.parametrize("counts", [(3, 40, 41, 200), (0, 7, 7, 500), (-2, 1, 1000, 2000)])
def test_count_levels_matches_one_cut_per_count(counts, radix, monkeypatch):
    """Several cuts in one search (the pivot search, or the radix select: RADIX_COUNT): the same levels as one
    global_cut per count, ties at a cut kept."""
    import vgen.kernels.selection as selection
    from vgen.kernels.selection import count_levels

    monkeypatch.setattr(selection, "RADIX_COUNT", radix)

    torch.manual_seed(sum(counts) % 97)
    scores = torch.randn(2, 3, 30, 41)
    scores[1, 2, :4] = scores[1, 2, 4:8]  # ties
    got = count_levels(scores, counts)
    expected = sum((~global_cut(scores, count=c)).long() for c in counts)
    assert got.dtype == torch.long and torch.equal(got, expected)
    monkeypatch.setattr(selection, "use_triton", lambda _: False)  # the PyTorch path
    assert torch.equal(count_levels(scores, counts), expected)


def ties(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Entries equal to the smallest kept score of their slice (a sort breaks such ties by position)."""
    flat = scores.flatten(2)
    weakest = torch.where(keep.flatten(2), flat, torch.inf).amin(-1, keepdim=True)
    return (flat == weakest).view(scores.shape)


def test_many_program_cut_with_more_chunks_than_one_setup_tile():
    """A slice split into more chunks than the set-up kernel reads at once (1,050 > 1,024): the peak, the
    smallest score and the softmax sum are combined over every chunk."""
    from vgen.kernels.selection import _global_cut_parallel

    torch.manual_seed(11)
    scores = torch.randn(1, 1, 2100) * 3
    scores[0, 0, 2099] = 9.0  # the peak in the last chunk
    got = _global_cut_parallel(scores.reshape(1, -1), 0.7, None, chunk=2).view(scores.shape)
    assert torch.equal(got, global_cut_reference(scores, threshold=0.7))


def test_cuts_of_a_strided_view(monkeypatch):
    """Scores that are a view with a row stride other than N (the first Q' query blocks of a [B, H, Q, C]
    tensor): both the many-program cut and count_levels read the view's own entries."""
    import vgen.kernels.selection as selection

    torch.manual_seed(13)
    scores = torch.randn(2, 2, 40, 30)[:, :, :30]  # row stride 1200, 900 entries per slice
    assert not scores.is_contiguous()
    levels = selection.count_levels(scores, [10, 300])
    assert torch.equal(levels, (~global_cut_reference(scores, count=10)).long()
                       + (~global_cut_reference(scores, count=300)).long())  # fmt: skip
    monkeypatch.setattr(selection, "PARALLEL_CUT_ENTRIES", 512)  # the many-program path at this size
    assert torch.equal(global_cut(scores, threshold=0.5), global_cut_reference(scores, threshold=0.5))


@pytest.mark.parametrize("counts", [(1,), (1, 2, 600, 1999, 2000), (7, 7, 1500)])
def test_radix_count_search_finds_the_pivot_searchs_cuts(counts, monkeypatch):
    """The radix select (8 bits a pass) and the pivot search give the same key for every count: ties, signed
    zeros, a constant slice, values of every magnitude and sign."""
    import vgen.kernels.selection as selection
    from vgen.kernels.selection import _cut_search, _radix_count_search

    monkeypatch.setattr(selection, "RADIX_COUNT", False)  # _cut_search: the pivot search

    torch.manual_seed(len(counts))
    flat = torch.randn(4, 2000) * 4
    flat[0, :300] = flat[0, 300:600]  # ties
    flat[1, ::3] = 0.0
    flat[1, 1::3] = -0.0
    flat[2] = 1.5  # one value throughout
    flat[3] = torch.randn(2000) * torch.logspace(-30, 30, 2000)  # tiny to huge, both signs
    radix = _radix_count_search(flat, 256, counts)
    assert radix.shape == (4, len(counts)) and torch.equal(radix, _cut_search(flat, 256, counts=counts))
    # the key is that of the count-th largest score
    for i, c in enumerate(counts):
        value = (flat + 0.0).sort(-1, descending=True).values[:, c - 1]
        keys = value.view(torch.int32).long()
        assert torch.equal(radix[:, i], torch.where(keys < 0, keys ^ 0x7FFFFFFF, keys))
