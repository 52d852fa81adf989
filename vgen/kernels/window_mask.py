"""Block masks of local 3D windows over a frame-major video, built by one Triton launch.

Each program takes one row of blocks: it derives every block's (t, y, x) coordinate range
from its token range (a run of consecutive frame-major tokens spans whole rows or frames
as soon as it crosses one), keeps the pairs whose gaps fit the window on every axis, and
writes the kept block indices first, ascending, by a prefix sum. Blocks holding a text
token are kept in their whole row and column.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["window_block_indices"]

UNBOUNDED = 1 << 30


@triton.jit
def _block_ranges(lo, hi, text_before, n_video, frames, height, width):
    """Per-axis (min, max) of the video coordinates of tokens lo..hi, and whether any is text."""
    is_text = (lo < text_before) | (hi >= text_before + n_video)
    a = tl.minimum(tl.maximum(lo - text_before, 0), n_video - 1)
    b = tl.minimum(tl.maximum(hi - text_before, 0), n_video - 1)
    hw = height * width
    t_lo, t_hi = a // hw, b // hw
    one_frame = t_lo == t_hi
    y_lo = tl.where(one_frame, a % hw // width, 0)
    y_hi = tl.where(one_frame, b % hw // width, height - 1)
    one_row = one_frame & (y_lo == y_hi)
    x_lo = tl.where(one_row, a % width, 0)
    x_hi = tl.where(one_row, b % width, width - 1)
    return is_text, t_lo, t_hi, y_lo, y_hi, x_lo, x_hi


@triton.jit
def _gap_fits(lo_a, hi_a, lo_b, hi_b, reach):
    return (lo_b - hi_a <= reach) & (lo_a - hi_b <= reach)


@triton.jit
def _window_mask_kernel(
    NUM, IDX,
    seq_len, n_cols, text_before, n_video, frames, height, width, reach_t, reach_y, reach_x,
    ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i_r = tl.program_id(0)
    r_lo = i_r * ROWS
    r_hi = tl.minimum(r_lo + ROWS, seq_len) - 1
    r_text, rt0, rt1, ry0, ry1, rx0, rx1 = _block_ranges(r_lo, r_hi, text_before, n_video, frames, height, width)

    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < n_cols
    c_lo = o_c * COLS
    c_hi = tl.minimum(c_lo + COLS, seq_len) - 1
    c_text, ct0, ct1, cy0, cy1, cx0, cx1 = _block_ranges(c_lo, c_hi, text_before, n_video, frames, height, width)

    b_keep = r_text | c_text | (
        _gap_fits(rt0, rt1, ct0, ct1, reach_t) & _gap_fits(ry0, ry1, cy0, cy1, reach_y)
        & _gap_fits(rx0, rx1, cx0, cx1, reach_x)
    )
    b_keep = (b_keep & m_c).to(tl.int32)
    b_count = tl.sum(b_keep, 0)
    b_before = tl.cumsum(b_keep, 0) - b_keep  # kept blocks left of each column
    # kept columns first in ascending order, then the dropped ones
    b_dest = tl.where(b_keep == 1, b_before, b_count + o_c - b_before)
    tl.store(IDX + i_r * n_cols + b_dest, o_c.to(tl.int32), mask=m_c)
    tl.store(NUM + i_r, b_count)


def window_block_indices(
    seq_len: int,
    block_size: tuple[int, int],
    grid: tuple[int, int, int],
    text_before: int,
    reach: tuple[int | None, int | None, int | None],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(count int32 [Mq], indices int32 [Mq, Mk]) of the key blocks each query block keeps.

    Args:
        seq_len: tokens on both sides (text included).
        block_size: (query block, key block) tokens.
        grid: (frames, height, width) of the frame-major video part.
        text_before: text tokens before the video part (any others sit after it).
        reach: per axis (t, y, x), the largest coordinate gap attended; None is unbounded.
        device: where the tensors are built.
    """
    rows, cols = block_size
    # plain integer arithmetic: triton.cdiv and next_power_of_2 cost microseconds a call on the host, and this
    # launch is all host time next to the tiny kernel
    m_rows, m_cols = -(-seq_len // rows), -(-seq_len // cols)
    frames, height, width = grid
    num = torch.empty(m_rows, dtype=torch.int32, device=device)
    idx = torch.empty(m_rows, m_cols, dtype=torch.int32, device=device)
    reach_t, reach_y, reach_x = (UNBOUNDED if r is None else int(r) for r in reach)
    _window_mask_kernel[(m_rows,)](
        num, idx, seq_len, m_cols, text_before, frames * height * width, frames, height, width,
        reach_t, reach_y, reach_x, ROWS=rows, COLS=cols, BLOCK_C=max(16, 1 << (m_cols - 1).bit_length()),
    )
    return num, idx
