"""Which key blocks each query block attends: the block mask every block-sparse kernel reads.

Building a mask never synchronises with the host: `BlockMask.from_dense` and the layout
builders are tensor ops on the mask's device, so they can run inside a denoising loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vgen.attention.layout import VideoLayout
from vgen.kernels.runtime import use_triton
from vgen.kernels.selection import compact_rows, compact_rows_reference
from vgen.kernels.window_mask import window_block_indices

__all__ = ["BlockMask", "frame_mask", "local_window_mask", "position_mask"]

# A text block's coordinate range on every axis: it meets every other block's range.
_UNBOUNDED = 1 << 29  # twice it still fits in int32


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_pair(name: str, value: object) -> tuple[int, int]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of positive ints, got {value!r}")
    if not all(_is_int(v) and v > 0 for v in value):
        raise ValueError(f"{name} must be a pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def _positive_int(name: str, value: object) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _reach(name: str, value: object, optional: bool = False) -> int | None:
    if (value is None and optional) or (_is_int(value) and value >= 0):
        return value
    raise ValueError(f"{name} must be a non-negative int{' or None' if optional else ''}, got {value!r}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)} on {value.device}"
    return type(value).__name__


def _num_blocks(seq_lens: tuple[int, int], block_size: tuple[int, int]) -> tuple[int, int]:
    """``(Mq, Mk)``: a ragged last block counts as a block."""
    return -(-seq_lens[0] // block_size[0]), -(-seq_lens[1] // block_size[1])


def _block_tokens(seq_len: int, block: int, device: torch.device) -> torch.Tensor:
    """Tokens in each of the ``ceil(seq_len / block)`` blocks, int64 ``[M]``: the last may be short."""
    starts = torch.arange(0, seq_len, block, device=device)
    return (seq_len - starts).clamp_(max=block)


def _compact(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Count and positions of the True entries along the last axis of bool ``dense`` ``[..., N]``.

    Returns int32 ``[...]`` and int32 ``[..., N]``: the kept positions first, ascending, then
    ``N - 1`` as padding. On CUDA one Triton launch; elsewhere a cumulative count and a binary
    search (the interpreter would crawl through one program per row).
    """
    if dense.is_cuda and dense.shape[-1] <= 16384:
        return compact_rows(dense)
    return compact_rows_reference(dense)


@dataclass(frozen=True, eq=False, repr=False)
class BlockMask:
    """Kept (query block, key block) pairs of one attention call, in the form kernels read.

    Query block ``i`` covers query tokens ``[i * block_q, min((i + 1) * block_q, Sq))``;
    the last block of either side may be shorter than the block size. ``B`` or ``H`` of 1
    broadcasts over the batch or the heads (kernels read it with stride 0).

    Args:
        kv_num_blocks: int32 ``[B, H, Mq]``, how many key blocks each query block keeps.
        kv_indices: int32 ``[B, H, Mq, Mk]``, the kept key blocks first, ascending; the
            entries past ``kv_num_blocks`` are unspecified valid indices in ``[0, Mk)``.
        q_num_blocks: int32 ``[B, H, Mk]``, how many query blocks keep each key block.
        q_indices: int32 ``[B, H, Mk, Mq]``, those query blocks first, ascending (the
            transposed form, for the backward pass); same conventions as ``kv_indices``.
        seq_lens: ``(Sq, Sk)`` in tokens; ``Mq = ceil(Sq / block_q)``, ``Mk = ceil(Sk / block_k)``.
        block_size: ``(block_q, block_k)`` in tokens.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    q_num_blocks: torch.Tensor
    q_indices: torch.Tensor
    seq_lens: tuple[int, int]
    block_size: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        block_size = _int_pair("block_size", self.block_size)
        seq_lens = _int_pair("seq_lens", self.seq_lens)
        object.__setattr__(self, "block_size", block_size)
        object.__setattr__(self, "seq_lens", seq_lens)
        names = ("kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices")
        for name in names:
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int32:
                raise ValueError(f"BlockMask.{name} must be an int32 tensor, got {_describe(tensor)}")
        batch, heads = self.kv_num_blocks.shape[:2] if self.kv_num_blocks.ndim == 3 else (0, 0)
        mq, mk = _num_blocks(seq_lens, block_size)
        shapes = ((batch, heads, mq), (batch, heads, mq, mk), (batch, heads, mk), (batch, heads, mk, mq))
        for name, shape in zip(names, shapes, strict=True):
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape or not batch or not heads:
                raise ValueError(
                    f"BlockMask.{name} must have shape {list(shape)} (B, H >= 1) for seq_lens={seq_lens} "
                    f"and block_size={block_size}, got {list(tensor.shape)}"
                )
            if tensor.device != self.kv_num_blocks.device or not tensor.is_contiguous():
                raise ValueError(
                    f"BlockMask.{name} must be contiguous and on {self.kv_num_blocks.device}, got {_describe(tensor)}"
                )

    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        block_size: tuple[int, int] = (128, 128),
        seq_lens: tuple[int, int] | None = None,
    ) -> BlockMask:
        """The mask whose kept block pairs are the True entries of ``dense``.

        Args:
            dense: bool ``[B, H, Mq, Mk]``, or ``[Mq, Mk]`` for ``B = H = 1``.
            block_size: ``(block_q, block_k)`` in tokens.
            seq_lens: ``(Sq, Sk)`` in tokens, default ``(Mq * block_q, Mk * block_k)``;
                must give exactly ``Mq`` and ``Mk`` blocks.
        """
        if not isinstance(dense, torch.Tensor) or dense.dtype != torch.bool:
            raise ValueError(f"dense must be a bool tensor [B, H, Mq, Mk] or [Mq, Mk], got {_describe(dense)}")
        if dense.ndim not in (2, 4):
            raise ValueError(f"dense must have 4 dims [B, H, Mq, Mk] or 2 dims [Mq, Mk], got {list(dense.shape)}")
        if dense.ndim == 2:
            dense = dense[None, None]
        block_size = _int_pair("block_size", block_size)
        mq, mk = dense.shape[-2:]
        if seq_lens is None:
            seq_lens = (mq * block_size[0], mk * block_size[1])
        seq_lens = _int_pair("seq_lens", seq_lens)
        blocks = _num_blocks(seq_lens, block_size)
        if blocks != (mq, mk):
            raise ValueError(
                f"dense has {mq}x{mk} (query x key) blocks, but seq_lens={seq_lens} with "
                f"block_size={block_size} needs {blocks[0]}x{blocks[1]}"
            )
        kv_num_blocks, kv_indices = _compact(dense)
        q_num_blocks, q_indices = _compact(dense.mT)
        return cls(kv_num_blocks, kv_indices, q_num_blocks, q_indices, seq_lens, block_size)

    @classmethod
    def full(
        cls,
        batch: int,
        heads: int,
        seq_lens: tuple[int, int],
        block_size: tuple[int, int] = (128, 128),
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Every block pair kept: dense attention, ``[batch, heads]`` (1 broadcasts)."""
        batch, heads = _positive_int("batch", batch), _positive_int("heads", heads)
        block_size, seq_lens = _int_pair("block_size", block_size), _int_pair("seq_lens", seq_lens)
        mq, mk = _num_blocks(seq_lens, block_size)
        dense = torch.ones(batch, heads, mq, mk, dtype=torch.bool, device=device)
        return cls.from_dense(dense, block_size, seq_lens)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Mq, Mk)``."""
        return tuple(self.kv_indices.shape)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to(self, device: torch.device | str) -> BlockMask:
        """This mask with its tensors on ``device``."""
        return dataclasses.replace(
            self,
            kv_num_blocks=self.kv_num_blocks.to(device),
            kv_indices=self.kv_indices.to(device),
            q_num_blocks=self.q_num_blocks.to(device),
            q_indices=self.q_indices.to(device),
        )

    def to_dense(self) -> torch.Tensor:
        """bool ``[B, H, Mq, Mk]``: True where the query block attends the key block."""
        mk = self.shape[-1]
        kept = torch.arange(mk, device=self.device) < self.kv_num_blocks.unsqueeze(-1)
        # Entries past the count may repeat a kept index, so accumulate instead of assigning.
        hits = torch.zeros(self.shape, dtype=torch.int32, device=self.device)
        return hits.scatter_add_(-1, self.kv_indices.long(), kept.to(torch.int32)) > 0

    def expand_tokens(self) -> torch.Tensor:
        """bool ``[B, H, Sq, Sk]``: the token-level mask (for references and tests, small sizes)."""
        (block_q, block_k), (sq, sk) = self.block_size, self.seq_lens
        rows = self.to_dense().repeat_interleave(block_q, dim=-2)[..., :sq, :]
        return rows.repeat_interleave(block_k, dim=-1)[..., :sk]

    def density(self) -> float:
        """Fraction of the ``B * H * Sq * Sk`` query-key token pairs that are computed."""
        return self._density(self.to_dense())

    def _density(self, dense: torch.Tensor) -> float:
        rows = _block_tokens(self.seq_lens[0], self.block_size[0], self.device)
        cols = _block_tokens(self.seq_lens[1], self.block_size[1], self.device)
        kept = (dense * (rows[:, None] * cols)).sum()
        return kept.item() / (dense[..., 0, 0].numel() * self.seq_lens[0] * self.seq_lens[1])

    def to_string(self, batch: int = 0, head: int = 0, max_blocks: int = 64) -> str:
        """A picture of the pattern of one (batch, head): one line per query block,
        ``█`` kept and ``·`` dropped, under a header with shape, block size and density.

        When either side has more than ``max_blocks`` blocks, each character stands for a
        square of ``f x f`` blocks and is kept when any of them is.
        """
        b, h, mq, mk = self.shape
        if not _is_int(batch) or not 0 <= batch < b:
            raise ValueError(f"batch must be an int in [0, {b}), got {batch!r}")
        if not _is_int(head) or not 0 <= head < h:
            raise ValueError(f"head must be an int in [0, {h}), got {head!r}")
        max_blocks = _positive_int("max_blocks", max_blocks)
        dense = self.to_dense()
        header = (
            f"BlockMask(shape={self.shape}, block_size={self.block_size}, seq_lens={self.seq_lens}, "
            f"density={self._density(dense):.4f})"
        )
        picture = dense[batch, head]
        if b * h > 1:
            header += f" batch {batch} head {head}: density {self._density(picture[None, None]):.4f}"
        picture = picture.cpu()
        factor = -(-max(mq, mk) // max_blocks)
        if factor > 1:
            header += f", each character {factor}x{factor} blocks"
            rows, cols = _num_blocks((mq, mk), (factor, factor))
            padded = torch.zeros(rows * factor, cols * factor, dtype=torch.bool)
            padded[:mq, :mk] = picture
            picture = padded.view(padded.shape[0] // factor, factor, -1, factor).any(3).any(1)
        lines = ["".join("█" if kept else "·" for kept in row) for row in picture.tolist()]
        return "\n".join([header, *lines])

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return (
            f"BlockMask(shape={self.shape}, block_size={self.block_size}, seq_lens={self.seq_lens}, "
            f"device={self.device})"
        )


def _block_ranges(
    layout: VideoLayout, block: int, reach: dict[int, int], device: torch.device | str | None
) -> torch.Tensor:
    """Per block, for each axis in ``reach`` (0 = t, 1 = y, 2 = x, mapped to its window ``w``):
    ``w - min(c)`` and ``max(c)`` of that coordinate ``c`` over the block's video tokens.

    Returns int32 ``[2A, M]``: the ``w - min`` rows, then the ``max`` rows. A block holding a
    text token has ``_UNBOUNDED`` in every row, so it meets every block.
    """
    num_blocks = -(-layout.seq_len // block)
    # Each token's video index, clamped: text blocks are overwritten below, and the padding
    # of a ragged last block repeats the last video token, which that block holds.
    video = torch.arange(-layout.text_before, num_blocks * block - layout.text_before, dtype=torch.int32, device=device)
    video = video.clamp_(0, layout.num_video_tokens - 1)
    coords = []
    for axis in reach:
        if axis == 0:
            coords.append(video // layout.tokens_per_frame)
        elif axis == 1:
            coords.append(video // layout.width % layout.height)
        else:
            coords.append(video % layout.width)
    shifted = [w - c for w, c in zip(reach.values(), coords, strict=True)]
    ranges = torch.stack(shifted + coords).view(2 * len(reach), num_blocks, block).amax(-1)
    if layout.text_before:
        ranges[:, : -(-layout.text_before // block)] = _UNBOUNDED
    if layout.text_after:
        ranges[:, (layout.text_before + layout.num_video_tokens) // block :] = _UNBOUNDED
    return ranges


def _window_blocks_reference(
    layout: VideoLayout, reach: dict[int, int], block_size: tuple[int, int], device: torch.device | str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch form of :func:`vgen.kernels.window_mask.window_block_indices`, both directions."""
    q_ranges = _block_ranges(layout, block_size[0], reach, device)  # [2A, Mq]
    k_ranges = q_ranges if block_size[0] == block_size[1] else _block_ranges(layout, block_size[1], reach, device)
    # Keep iff on every axis lo_k - w <= hi_q and lo_q - w <= hi_k: one side's (w - lo) plus the
    # other side's hi is >= 0, for both pairings of rows.
    dense = (q_ranges[:, :, None] + k_ranges.roll(len(reach), 0)[:, None, :]).amin(0) >= 0  # [Mq, Mk]
    kv_num_blocks, kv_indices = _compact(dense)
    if block_size[0] == block_size[1]:
        # Equal blocks make the pattern symmetric: the transposed form is the same tensors.
        return kv_num_blocks, kv_indices, kv_num_blocks, kv_indices
    return kv_num_blocks, kv_indices, *_compact(dense.mT)


def local_window_mask(
    layout: VideoLayout,
    window: tuple[int | None, int | None, int | None],
    block_size: tuple[int, int] = (128, 128),
    device: torch.device | str | None = None,
) -> BlockMask:
    """Local 3D windows: a video query ``(t, y, x)`` attends the video keys ``(t', y', x')``
    with ``|t - t'| <= window[0]``, ``|y - y'| <= window[1]`` and ``|x - x'| <= window[2]``
    (``None``: unbounded on that axis); text tokens attend and are attended by all.

    A block pair is kept when, on every axis, the gap between the two blocks' coordinate
    ranges is within the window: a superset of the token-level mask, exact where blocks
    cover whole rows, whole frames or parts of one row.

    Args:
        layout: the token layout; ``Sq = Sk = layout.seq_len``.
        window: ``(frames, rows, columns)`` reach in tokens.
        block_size: ``(block_q, block_k)`` in tokens.
        device: where the mask's tensors are built.

    Returns:
        A :class:`BlockMask` of shape ``[1, 1, Mq, Mk]`` (the same for every batch and head),
        cached per arguments: treat its tensors as read-only.
    """
    if not isinstance(layout, VideoLayout):
        raise ValueError(f"layout must be a VideoLayout, got {type(layout).__name__}")
    if isinstance(window, str) or not isinstance(window, Sequence) or len(window) != 3:
        raise ValueError(f"window must be a (t, h, w) triple of non-negative ints or None, got {window!r}")
    window = tuple(_reach(f"window[{axis}]", value, optional=True) for axis, value in enumerate(window))
    block_size = _int_pair("block_size", block_size)
    return _window_mask(layout, window, block_size, torch.device("cpu" if device is None else device))


@functools.lru_cache(maxsize=64)
def _window_mask(
    layout: VideoLayout, window: tuple[int | None, int | None, int | None], block_size: tuple[int, int],
    device: torch.device,
) -> BlockMask:
    """:func:`local_window_mask` after validation, cached: every layer and step of a generation asks for
    the same mask, so it is built once per (layout, window, block size, device)."""
    seq_lens = (layout.seq_len, layout.seq_len)
    extents = (layout.frames, layout.height, layout.width)
    # A reach of extent - 1 or more spans the whole axis: that axis constrains nothing.
    reach = {axis: w for axis, w in enumerate(window) if w is not None and w < extents[axis] - 1}
    if not reach:
        return BlockMask.full(1, 1, seq_lens, block_size, device)
    if use_triton(device):
        grid = (layout.frames, layout.height, layout.width)
        reaches = tuple(reach.get(axis) for axis in range(3))
        kv_num_blocks, kv_indices = window_block_indices(
            layout.seq_len, block_size, grid, layout.text_before, reaches, device)
        if block_size[0] == block_size[1]:  # a symmetric pattern: the transposed form is the same tensors
            q_num_blocks, q_indices = kv_num_blocks, kv_indices
        else:
            q_num_blocks, q_indices = window_block_indices(
                layout.seq_len, block_size[::-1], grid, layout.text_before, reaches, device)
    else:
        kv_num_blocks, kv_indices, q_num_blocks, q_indices = _window_blocks_reference(layout, reach, block_size, device)
    return BlockMask(
        kv_num_blocks[None, None],
        kv_indices[None, None],
        q_num_blocks[None, None],
        q_indices[None, None],
        seq_lens,
        block_size,
    )


def frame_mask(
    layout: VideoLayout,
    frames: int = 0,
    block_size: tuple[int, int] = (128, 128),
    device: torch.device | str | None = None,
) -> BlockMask:
    """Per-frame stripes: each video query attends the video keys of its own frame and of the
    ``frames`` frames on either side; window ``(frames, None, None)`` of :func:`local_window_mask`."""
    return local_window_mask(layout, (_reach("frames", frames), None, None), block_size, device)


def position_mask(
    layout: VideoLayout,
    radius: int = 0,
    block_size: tuple[int, int] = (128, 128),
    device: torch.device | str | None = None,
) -> BlockMask:
    """Per-position stripes: each video query ``(t, y, x)`` attends the video keys within
    ``radius`` of ``(y, x)`` (per axis) in every frame; window ``(None, radius, radius)`` of
    :func:`local_window_mask`."""
    radius = _reach("radius", radius)
    return local_window_mask(layout, (None, radius, radius), block_size, device)
