"""benchmarks/paro.py's oracle (an upper bound for calibrated masks, measured on the GPU): its per-call block mass
against the mass summed from the exact softmax, on ragged sizes, and the mask it builds from it."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import paro  # noqa: E402


def test_call_mass_is_the_softmax_summed_per_block_pair():
    torch.manual_seed(3)
    q, k = torch.randn(2, 200, 3, 16), torch.randn(2, 200, 3, 16) * 2  # 200 tokens: 6 blocks of 32 and one of 8
    mass = paro._call_mass(q, k, 32, 0.3, chunk=64)  # chunks of 64 rows: the last one ragged too
    p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.3, -1).sum(0)  # [H, S, S]
    padded = torch.nn.functional.pad(p, (0, 24, 0, 24)).view(3, 7, 32, 7, 32).sum((2, 4))
    torch.testing.assert_close(mass.double(), padded, atol=1e-5, rtol=1e-5)
    assert abs(mass.sum().item() - 2 * 3 * 200) < 1e-2  # every query row of each head and batch sums to 1
    # the oracle's mask per head at 0.3: the diagonal, then the heaviest blocks; it captures at least the mass of any
    # other mask with the diagonal and as many blocks off it
    keep = paro._pooled_masks(mass[:, None], 200, 32, 0.3).reshape(mass.shape)
    eye = torch.eye(7, dtype=torch.bool)
    assert keep[:, eye].all() and 0.25 < keep.float().mean() < 0.45
    for h in range(3):
        off = (~eye).flatten().nonzero()[:, 0]
        for _ in range(20):
            other = eye.flatten().clone()
            other[off[torch.randperm(off.numel())[: int((keep[h] & ~eye).sum())]]] = True
            assert mass[h][keep[h]].sum() >= mass[h].flatten()[other].sum() - 1e-6
