"""`vmoba` and `moba`: mixture-of-block attention for video, on the block-sparse kernel.

VMoBA (Wu et al., 2025) extends MoBA (Lu et al., 2025) to video with three changes, all here:

- **Layer-wise recurrent partitions.** Layer ``l`` cuts the video tokens into chunks along
  ``partitions[l % len(partitions)]``: ``"1d"`` temporal chunks of whole frames, ``"2d"`` spatial
  tiles inside a frame, ``"3d"`` cubes. Edge chunks of a grid that the chunk does not divide are
  smaller.
- **Global block selection.** Every (query block, key chunk) pair of a head is ranked together,
  not per query block: rows whose attention is concentrated keep few chunks, diffuse ones more.
- **Threshold selection.** Pairs are kept in order of their softmax-normalised similarity until
  the kept mass reaches ``threshold``, so density follows the content. ``selection="topk"``
  keeps ``topk`` chunks per query block on average instead, also ranked globally.

How a call runs:
1. The tokens are permuted so that each chunk is contiguous (:func:`vgen.kernels.tile_order`),
   except for 1D partitions, whose chunks are already contiguous.
2. A pair's similarity is the mean query of the query block dotted with the mean key of the
   chunk, times the attention scale, plus ``log(chunk tokens)``. That estimates the log of the
   attention mass the block would give the chunk.
3. Every query block keeps the chunks it overlaps. Text tokens attend and are attended by all.
4. The kept chunks become key blocks: a block is kept when it overlaps a kept chunk. This is a
   superset of the chunk selection, exact when chunks are made of whole blocks.
5. :func:`vgen.kernels.block_sparse_attention` runs, and the output is permuted back.

Selection runs under ``no_grad`` on the device, with no host synchronisation; gradients flow
through the permutation and the kernel. ``last_mask`` and ``last_density`` describe the last call.

``moba`` is the baseline: 1D chunks of ``chunk_tokens`` consecutive video tokens, and each query
block keeps its ``topk`` best chunks (per-row top-k).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vgen.attention.block_mask import BlockMask
from vgen.attention.common import block_starts, check_self_attention, key_lengths, run_block_sparse, text_blocks
from vgen.attention.layout import VideoLayout
from vgen.attention.registry import AttentionMethod, MethodConfig, SparsePlan, register_method
from vgen.kernels import block_sparse_attention, permute_tokens, unpermute_tokens
from vgen.kernels.permute import tile_order
from vgen.kernels.runtime import use_triton
from vgen.kernels.selection import global_cut, segment_means

__all__ = [
    "ChunkPlan",
    "MoBAConfig",
    "MoBAttention",
    "VMoBAConfig",
    "VMoBAttention",
    "chunk_plan",
    "select_blocks",
    "select_dense_blocks",
]

_PARTITIONS = ("1d", "2d", "3d")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(name: str, value: object, length: int) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != length:
        raise ValueError(f"{name} must be {length} positive ints, got {value!r}")
    if not all(_is_int(v) and v >= 1 for v in value):
        raise ValueError(f"{name} must be {length} positive ints, got {value!r}")
    return tuple(value)


def _check_block_size(value: object) -> tuple[int, int]:
    sizes = _int_tuple("block_size", value, 2)
    if any(size < 16 or size & (size - 1) for size in sizes):
        raise ValueError(f"block_size entries must be powers of two >= 16, got {value!r}")
    return sizes  # type: ignore[return-value]


def _check_selection(selection: str, threshold: float, topk: int) -> None:
    if selection not in ("threshold", "topk"):
        raise ValueError(f"selection must be 'threshold' or 'topk', got {selection!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if not _is_int(topk) or topk < 1:
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")


@dataclass(frozen=True)
class VMoBAConfig(MethodConfig):
    """Settings of :class:`VMoBAttention`; the defaults suit Wan2.1 at 480p (21 x 30 x 52 tokens).

    Args:
        temporal_chunk: frames per 1D chunk.
        spatial_chunk: ``(rows, columns)`` per 2D chunk (inside one frame).
        cube_chunk: ``(frames, rows, columns)`` per 3D chunk.
        partitions: the cycle of partitions over the self-attention layers.
        selection: ``"threshold"`` or ``"topk"``, both ranked over a head's pairs.
        threshold: kept share of the softmax-normalised similarity, in (0, 1].
        topk: with ``selection="topk"``, chunks kept per query block on average (>= 1).
        block_size: ``(query, key)`` kernel blocks in tokens.
    """

    temporal_chunk: int = 1
    spatial_chunk: tuple[int, int] = (8, 16)
    cube_chunk: tuple[int, int, int] = (2, 8, 8)
    partitions: tuple[str, ...] = _PARTITIONS
    selection: str = "threshold"
    threshold: float = 0.25
    topk: int = 8
    block_size: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.temporal_chunk) or self.temporal_chunk < 1:
            raise ValueError(f"temporal_chunk must be a positive int (frames), got {self.temporal_chunk!r}")
        object.__setattr__(self, "spatial_chunk", _int_tuple("spatial_chunk", self.spatial_chunk, 2))
        object.__setattr__(self, "cube_chunk", _int_tuple("cube_chunk", self.cube_chunk, 3))
        partitions = self.partitions
        if isinstance(partitions, str) or not partitions or any(p not in _PARTITIONS for p in partitions):
            raise ValueError(f"partitions must be a non-empty sequence of '1d', '2d', '3d', got {partitions!r}")
        object.__setattr__(self, "partitions", tuple(partitions))
        _check_selection(self.selection, self.threshold, self.topk)
        object.__setattr__(self, "block_size", _check_block_size(self.block_size))

    def tile(self, layer: int, layout: VideoLayout) -> tuple[int, int, int]:
        """The chunk of ``layer`` as a ``(frames, rows, columns)`` tile of ``layout``'s grid."""
        partition = self.partitions[layer % len(self.partitions)]
        grid = (layout.frames, layout.height, layout.width)
        if partition == "1d":
            tile, names = (self.temporal_chunk, layout.height, layout.width), ("temporal_chunk", None, None)
        elif partition == "2d":
            tile, names = (1, *self.spatial_chunk), (None, "spatial_chunk[0]", "spatial_chunk[1]")
        else:
            tile, names = self.cube_chunk, ("cube_chunk[0]", "cube_chunk[1]", "cube_chunk[2]")
        for size, extent, name, axis in zip(tile, grid, names, ("frames", "rows", "columns"), strict=True):
            if name is not None and size > extent:
                raise ValueError(
                    f"{name} = {size} is larger than the token grid's {extent} {axis} "
                    f"(grid {grid[0]}x{grid[1]}x{grid[2]}); use at most {extent}"
                )
        return tile  # type: ignore[return-value]


@dataclass(frozen=True)
class MoBAConfig(MethodConfig):
    """Settings of :class:`MoBAttention`.

    Args:
        chunk_tokens: video tokens per chunk (consecutive in frame-major order).
        topk: chunks each query block keeps besides its own (its own are always kept).
        block_size: ``(query, key)`` kernel blocks in tokens.
    """

    chunk_tokens: int = 2048
    topk: int = 3
    block_size: tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.chunk_tokens) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive int, got {self.chunk_tokens!r}")
        _check_selection("topk", 1.0, self.topk)
        object.__setattr__(self, "block_size", _check_block_size(self.block_size))


@dataclass(frozen=True, eq=False)
class ChunkPlan:
    """Where the chunks of one partition are, for one layout, block size and device (cached).

    Args:
        perm: int64 ``[S]`` token order that makes chunks contiguous (None: the identity).
        starts, sizes: int64 ``[C]``, each chunk's first position in the permuted video tokens
            and its token count.
        own: bool ``[Mq, C]``, the chunks that each query block overlaps.
        overlap: ``[C, Mk]``, 1 where a chunk overlaps a key block; float16 on CUDA (tensor-core products of
            0/1 values, exact for the > 0 test), float32 elsewhere.
        text_queries: bool ``[Mq]``, query blocks holding a text token (they keep every key block).
        text_keys: bool ``[Mk]``, key blocks holding a text token (every query block keeps them).
        block_tokens: float32 ``([Mq], [Mk])``, tokens per block, for the density.
        log_sizes: float32 ``[C]``, the log of each chunk's token count (its score bonus).
    """

    perm: torch.Tensor | None
    starts: torch.Tensor
    sizes: torch.Tensor
    own: torch.Tensor
    overlap: torch.Tensor
    text_queries: torch.Tensor
    text_keys: torch.Tensor
    block_tokens: tuple[torch.Tensor, torch.Tensor]
    log_sizes: torch.Tensor
    layout: VideoLayout
    block_size: tuple[int, int]

    @property
    def num_chunks(self) -> int:
        return int(self.sizes.numel())


def _block_membership(chunk_of_position: torch.Tensor, seq_len: int, block: int, chunks: int) -> torch.Tensor:
    """bool ``[M, C]``: block ``m`` (of ``block`` positions) holds a token of chunk ``c`` (-1: none)."""
    blocks = -(-seq_len // block)
    member = torch.zeros(blocks, chunks + 1, dtype=torch.bool)
    index = torch.arange(seq_len) // block
    member[index, chunk_of_position.clamp(min=-1) + 1] = True
    return member[:, 1:]


@functools.lru_cache(maxsize=64)
def _plan(layout: VideoLayout, chunk: tuple[int, ...], block_size: tuple[int, int], device: torch.device) -> ChunkPlan:
    """``chunk``: a ``(frames, rows, columns)`` tile, or ``(n,)`` for runs of n consecutive video tokens."""
    if len(chunk) == 1:
        chunk_of_video = torch.arange(layout.num_video_tokens) // chunk[0]
        perm = torch.arange(layout.seq_len)
    else:
        tt, th, tw = chunk
        t, y, x = torch.meshgrid(
            torch.arange(layout.frames), torch.arange(layout.height), torch.arange(layout.width), indexing="ij"
        )
        tiles_y, tiles_x = -(-layout.height // th), -(-layout.width // tw)
        chunk_of_video = (((t // tt) * tiles_y + y // th) * tiles_x + x // tw).reshape(-1)
        perm = tile_order(layout, chunk)
    identity = bool((perm == torch.arange(layout.seq_len)).all())
    video = perm[layout.text_before : layout.text_before + layout.num_video_tokens] - layout.text_before
    chunk_sorted = chunk_of_video[video]  # non-decreasing: tile_order sorts by chunk
    chunks = int(chunk_sorted.max()) + 1
    sizes = torch.bincount(chunk_sorted, minlength=chunks)
    starts = torch.cumsum(sizes, 0) - sizes
    chunk_of_position = torch.full((layout.seq_len,), -1, dtype=torch.int64)
    chunk_of_position[layout.text_before : layout.text_before + layout.num_video_tokens] = chunk_sorted
    own = _block_membership(chunk_of_position, layout.seq_len, block_size[0], chunks)
    overlap = _block_membership(chunk_of_position, layout.seq_len, block_size[1], chunks).T.float()
    text_queries, text_keys = (text_blocks(layout, b, device) for b in block_size)
    tokens = tuple(
        (layout.seq_len - torch.arange(0, layout.seq_len, b)).clamp(max=b).float() for b in block_size
    )
    return ChunkPlan(
        perm=None if identity else perm.to(device),
        starts=starts.to(device),
        sizes=sizes.to(device),
        own=own.to(device),
        overlap=overlap.to(device, torch.float16 if device.type == "cuda" else torch.float32),
        text_queries=text_queries,
        text_keys=text_keys,
        block_tokens=(tokens[0].to(device), tokens[1].to(device)),
        log_sizes=sizes.float().log().to(device),
        layout=layout,
        block_size=block_size,
    )


def chunk_plan(
    layout: VideoLayout,
    chunk: tuple[int, int, int] | int,
    block_size: tuple[int, int] = (128, 128),
    device: torch.device | str | None = None,
) -> ChunkPlan:
    """The :class:`ChunkPlan` of ``layout`` cut into chunks, cached per arguments.

    ``chunk`` is a ``(frames, rows, columns)`` tile (edge tiles may be smaller) or an int n:
    runs of n consecutive video tokens in frame-major order.
    """
    if not isinstance(layout, VideoLayout):
        raise ValueError(f"layout must be a VideoLayout, got {type(layout).__name__}")
    if _is_int(chunk):
        if not 1 <= chunk <= layout.num_video_tokens:
            raise ValueError(f"chunk must be between 1 and the {layout.num_video_tokens} video tokens, got {chunk}")
        key: tuple[int, ...] = (chunk,)
    else:
        key = _int_tuple("chunk", chunk, 3)
    device = torch.device("cpu" if device is None else device)
    return _plan(layout, key, _check_block_size(block_size), device)


_SCAN_RUN = 256


def _prefix_at(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp32 inclusive prefix sums of ``x`` ``[B, N, H, D]`` along N, at ``positions`` ``[P]``: ``[B, P, H, D]``.

    Two short scans instead of one over N: a scan along a non-innermost dimension runs one thread
    per (H, D) column sequentially over its length, which at N = 32,760 costs ~12 ms on an H200
    whatever the width. Runs of ``_SCAN_RUN`` tokens are scanned in parallel, then their totals.
    """
    batch, n, heads, dim = x.shape
    runs = -(-n // _SCAN_RUN)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, runs * _SCAN_RUN - n))
    within = padded.view(batch, runs, _SCAN_RUN, heads, dim).cumsum(2, dtype=torch.float32)
    totals = within[:, :, -1]
    offsets = totals.cumsum(1) - totals  # [B, runs, H, D]: sum of the runs before each run
    run, offset = positions // _SCAN_RUN, positions % _SCAN_RUN
    return within[:, run, offset] + offsets[:, run]


def _chunk_scores(q: torch.Tensor, k: torch.Tensor, plan: ChunkPlan, scale: float) -> torch.Tensor:
    """fp32 ``[B, H, Mq, C]``: mean query of each query block . mean key of each chunk x scale + log(size)."""
    begin = plan.layout.text_before
    video_k = k[:, begin : begin + plan.layout.num_video_tokens]
    if use_triton(q):  # two segment-mean launches
        q_mean = segment_means(q, *block_starts(q.shape[1], plan.block_size[0], q.device))  # [B, H, Mq, D]
        k_mean = segment_means(video_k, plan.starts, plan.sizes)  # [B, H, C, D]
        batch, heads, rows, dim = q_mean.shape
        scores = torch.baddbmm(plan.log_sizes, q_mean.view(-1, rows, dim), k_mean.flatten(0, 1).mT, alpha=scale)
        return scores.view(batch, heads, rows, -1)
    seq, block_q = q.shape[1], plan.block_size[0]
    full = seq // block_q * block_q  # block sums read q in place, accumulating in fp32
    q_sum = q[:, :full].unflatten(1, (seq // block_q, block_q)).sum(2, dtype=torch.float32)
    if full < seq:
        q_sum = torch.cat([q_sum, q[:, full:].sum(1, keepdim=True, dtype=torch.float32)], 1)
    q_mean = q_sum / plan.block_tokens[0].view(1, -1, 1, 1)
    ends = _prefix_at(video_k, plan.starts + plan.sizes - 1)
    before = _prefix_at(video_k, (plan.starts - 1).clamp(min=0)) * (plan.starts > 0).view(1, -1, 1, 1)
    k_mean = (ends - before) / plan.sizes.view(1, -1, 1, 1).float()
    scores = torch.einsum("bmhd,bchd->bhmc", q_mean, k_mean) * scale
    return scores + plan.log_sizes


def select_blocks(
    scores: torch.Tensor,
    plan: ChunkPlan,
    *,
    selection: str,
    threshold: float = 0.25,
    topk: int = 1,
    per_row: bool = False,
) -> BlockMask:
    """The block mask that keeps the selected (query block, chunk) pairs of ``scores``; see
    :func:`select_dense_blocks` for the arguments."""
    seq_len = plan.layout.seq_len
    dense = select_dense_blocks(scores, plan, selection=selection, threshold=threshold, topk=topk, per_row=per_row)
    return BlockMask.from_dense(dense, plan.block_size, (seq_len, seq_len))


def select_dense_blocks(
    scores: torch.Tensor,
    plan: ChunkPlan,
    *,
    selection: str,
    threshold: float = 0.25,
    topk: int = 1,
    per_row: bool = False,
) -> torch.Tensor:
    """The block mask that keeps the selected (query block, chunk) pairs of ``scores``.

    Args:
        scores: ``[B, H, Mq, C]`` from the pooled queries and keys.
        plan: where the chunks are.
        selection: ``"threshold"``: over each head's pairs ranked by score, keep the smallest
            prefix whose softmax mass reaches ``threshold``; ``"topk"``: keep the ``topk * Mq``
            best pairs of the head, or with ``per_row`` the ``topk`` best chunks of each row.
        threshold, topk: see ``selection``.
        per_row: rank per query block instead of over the whole head.

    Returns:
        bool ``[B, H, Mq, Mk]``: the kept block pairs. Every query block also keeps the chunks
        it overlaps, text rows keep everything and text key blocks are kept by every row.
    """
    rows, chunks = scores.shape[-2:]
    if per_row:
        if selection != "topk":
            raise ValueError("per-row ranking is implemented for top-k selection only")
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep.scatter_(-1, scores.topk(min(topk, chunks), dim=-1).indices, True)
    elif selection == "threshold":  # ranked over the whole head (a bisection on CUDA, a sort elsewhere)
        keep = global_cut(scores, threshold=threshold)
    else:
        keep = global_cut(scores, count=topk * rows)
    keep |= plan.own
    # [B, H, Mq, Mk]; sums of 0/1 products are > 0 exactly when one is 1, whatever the rounding of the sum
    blocks = (keep.to(plan.overlap.dtype) @ plan.overlap) > 0
    blocks |= plan.text_keys
    blocks |= plan.text_queries[:, None]
    return blocks


def _density(mask_dense: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """Kept fraction of query-key token pairs, a 0-d tensor (no host sync)."""
    rows, cols = plan.block_tokens
    kept = (mask_dense.float() * (rows[:, None] * cols)).sum()
    return kept / (mask_dense[..., 0, 0].numel() * plan.layout.seq_len**2)


class _ChunkAttention(AttentionMethod):
    """Shared body: plan -> scores -> selection -> kernel on permuted tokens."""

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self.last_mask: BlockMask | None = None

    def _plan(self, layout: VideoLayout, layer: int, device: torch.device) -> ChunkPlan:
        raise NotImplementedError

    def _select(self, scores: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
        """bool [B, H, Mq, Mk] kept block pairs."""
        raise NotImplementedError

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: VideoLayout,
        step: int,
        layer: int,
        scale: float | None,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        check_self_attention(self.name, q, k, layout)
        lengths = key_lengths(attn_mask, q.shape[0], layout)
        plan = self._plan(layout, layer, q.device)
        if plan.perm is not None:
            q, k, v = (permute_tokens(x, plan.perm) for x in (q, k, v))
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        dense = self._decide(q, k, plan, scale)
        if lengths is None:
            out = block_sparse_attention(q, k, v, self.last_mask, scale=scale)
        else:  # padded text keys sit at the end, in place under the permutation: drop them per batch element
            out = run_block_sparse(q, k, v, dense, plan.block_size, scale, lengths)
        return out if plan.perm is None else unpermute_tokens(out, plan.perm)

    def _decide(self, q: torch.Tensor, k: torch.Tensor, plan: ChunkPlan, scale: float) -> torch.Tensor:
        """bool ``[B, H, Mq, Mk]`` kept blocks of the permuted ``q``, ``k``; sets ``last_mask`` and
        ``last_density``."""
        with torch.no_grad():
            dense = self._select(_chunk_scores(q, k, plan, scale), plan)
            self.last_density = _density(dense, plan)
            seq = plan.layout.seq_len
            self.last_mask = BlockMask.from_dense(dense, plan.block_size, (seq, seq))
        return dense

    def sparse_plan(
        self, q: torch.Tensor, k: torch.Tensor, *, layout: VideoLayout, step: int, layer: int, scale: float | None
    ) -> SparsePlan:
        check_self_attention(self.name, q, k, layout)
        plan = self._plan(layout, layer, q.device)
        if plan.perm is not None:
            q, k = (permute_tokens(x, plan.perm) for x in (q, k))
        self._decide(q, k, plan, q.shape[-1] ** -0.5 if scale is None else scale)
        return SparsePlan(self.last_mask, plan.perm)


@register_method("vmoba")
class VMoBAttention(_ChunkAttention):
    """VMoBA: layer-wise 1D/2D/3D chunks, global threshold (or top-k) selection."""

    config_class = VMoBAConfig
    config: VMoBAConfig

    def _plan(self, layout: VideoLayout, layer: int, device: torch.device) -> ChunkPlan:
        return chunk_plan(layout, self.config.tile(layer, layout), self.config.block_size, device)

    def _select(self, scores: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
        c = self.config
        return select_dense_blocks(scores, plan, selection=c.selection, threshold=c.threshold, topk=c.topk)


@register_method("moba")
class MoBAttention(_ChunkAttention):
    """MoBA: 1D chunks of consecutive video tokens, per-query-block top-k."""

    config_class = MoBAConfig
    config: MoBAConfig

    def _plan(self, layout: VideoLayout, layer: int, device: torch.device) -> ChunkPlan:
        if self.config.chunk_tokens > layout.num_video_tokens:
            raise ValueError(
                f"chunk_tokens = {self.config.chunk_tokens} is larger than the {layout.num_video_tokens} video tokens "
                f"of the grid {layout.frames}x{layout.height}x{layout.width}"
            )
        return chunk_plan(layout, self.config.chunk_tokens, self.config.block_size, device)

    def _select(self, scores: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
        return select_dense_blocks(scores, plan, selection="topk", topk=self.config.topk, per_row=True)

