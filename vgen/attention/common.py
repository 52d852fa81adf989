"""Pieces the block-sparse methods share: input checks, key-padding masks, the kernel call."""

from __future__ import annotations

import functools

import torch

from vgen.attention.block_mask import BlockMask
from vgen.attention.layout import VideoLayout
from vgen.kernels import block_sparse_attention
from vgen.kernels.quantized import quantized_attention
from vgen.kernels.runtime import use_triton
from vgen.kernels.selection import segment_means

__all__ = [
    "block_means",
    "block_moments",
    "block_starts",
    "check_self_attention",
    "diagonal_and_text_blocks",
    "key_lengths",
    "run_block_sparse",
    "text_blocks",
]


_LENGTHS_CACHE: dict[tuple[int, int, tuple[int, ...]], tuple[torch.Tensor, list[int]]] = {}


def key_lengths(attn_mask: torch.Tensor | None, batch: int, layout: VideoLayout) -> list[int] | None:
    """Valid key counts per batch element of a key-padding mask, or None when every key is valid.

    Block-sparse methods take the one mask form the joint-attention models (HunyuanVideo, Motif)
    pass: bool ``[B or 1, 1, 1, S]`` (or ``[B, S]``) keeping a prefix of the keys, the padded text
    tokens at the end masked. Reading it costs one host sync per mask; the transformer passes the same
    mask tensor to every layer, so the answer is cached per tensor.
    """
    if attn_mask is None:
        return None
    seq_len = layout.seq_len
    key = (attn_mask.data_ptr(), attn_mask._version, tuple(attn_mask.shape))
    cached = _LENGTHS_CACHE.get(key)
    if cached is not None and cached[0] is attn_mask:
        lengths = cached[1]
    else:
        mask = attn_mask
        if mask.dtype != torch.bool or mask.shape[-1] != seq_len or mask.numel() not in (seq_len, batch * seq_len):
            raise ValueError(
                "block-sparse methods take only a bool key-padding mask [B, 1, 1, S] (the padded text of "
                f"HunyuanVideo or Motif); got {mask.dtype} {list(mask.shape)} for {seq_len} tokens"
            )
        rows = mask.reshape(-1, seq_len)
        counts = rows.sum(-1)
        prefix = torch.arange(seq_len, device=mask.device) < counts[:, None]
        if not bool((prefix == rows).all()):
            raise ValueError("block-sparse methods need the attention mask to keep a prefix of the keys in every row")
        lengths = counts.tolist()
        _LENGTHS_CACHE.clear()
        _LENGTHS_CACHE[key] = (attn_mask, lengths)
    lengths = lengths * batch if len(lengths) == 1 else lengths
    if min(lengths) < layout.text_before + layout.num_video_tokens:
        raise ValueError(
            f"the attention mask hides video tokens (it keeps {min(lengths)} keys of {seq_len}, of which "
            f"{layout.text_before + layout.num_video_tokens} are text before the video and video); "
            "block-sparse methods only drop padded text after the video"
        )
    return None if all(n == seq_len for n in lengths) else lengths


def check_self_attention(name: str, q: torch.Tensor, k: torch.Tensor, layout: VideoLayout) -> None:
    """For block-sparse methods: raise ValueError unless this is self-attention over ``layout``."""
    if q.shape[1] != layout.seq_len or k.shape[1] != layout.seq_len:
        raise ValueError(
            f"{name} needs query and key lengths equal to the layout's {layout.seq_len} tokens, "
            f"got {q.shape[1]} and {k.shape[1]}"
        )


def run_block_sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: torch.Tensor,
    block_size: tuple[int, int],
    scale: float | None,
    lengths: list[int] | None,
    pv: str | None = None,
) -> torch.Tensor:
    """:func:`vgen.kernels.block_sparse_attention` over the kept block pairs ``blocks`` (bool
    ``[B or 1, H or 1, Mq, Mk]``), per batch element over its first ``lengths[b]`` keys when given;
    with ``pv`` (``"int8"``, ``"int4"`` or ``"fp8"``) the quantised kernel
    :func:`vgen.kernels.quantized.quantized_attention`."""
    seq = q.shape[1]

    def attend(q, k, v, mask):
        if pv is None:
            return block_sparse_attention(q, k, v, mask, scale=scale)
        return quantized_attention(q, k, v, mask, scale=scale, pv=pv)

    if lengths is None:
        return attend(q, k, v, BlockMask.from_dense(blocks, block_size, (seq, seq)))
    outs = []
    for b, n in enumerate(lengths):
        kept = blocks[b : b + 1] if blocks.shape[0] > 1 else blocks
        mask = BlockMask.from_dense(kept[..., : -(-n // block_size[1])].contiguous(), block_size, (seq, n))
        outs.append(attend(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], mask))
    return torch.cat(outs)


@functools.lru_cache(maxsize=64)
def block_starts(seq: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 first token and token count of each run of ``block`` tokens (cached; read-only)."""
    starts = torch.arange(0, seq, block)
    return starts.to(device), (seq - starts).clamp(max=block).to(device)


def block_means(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each run of ``block`` tokens of ``x`` ``[B, S, H, D]`` as fp32 ``[B, H, M, D]``, and the
    token count of each block ``[M]`` (the last block may be short)."""
    batch, seq, heads, dim = x.shape
    blocks = -(-seq // block)
    starts, counts = block_starts(seq, block, x.device)
    if use_triton(x):  # one launch, no fp32 copy of x
        return segment_means(x, starts, counts), counts.float()
    counts = counts.float()
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, blocks * block - seq))
    means = padded.view(batch, blocks, block, heads, dim).sum(2) / counts.view(1, -1, 1, 1)
    return means.transpose(1, 2), counts


def block_moments(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`block_means`' means ``[B, H, M, D]`` and counts ``[M]``, and each block's mean squared
    distance of its tokens to their mean, fp32 ``[B, H, M]`` (one Triton pass where Triton runs)."""
    if use_triton(x):
        starts, counts = block_starts(x.shape[1], block, x.device)
        means, spread = segment_means(x, starts, counts, with_spread=True)
        return means, counts.float(), spread
    means, counts = block_means(x, block)
    batch, seq, heads, dim = x.shape
    blocks = means.shape[2]
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, blocks * block - seq))
    tiles = padded.view(batch, blocks, block, heads, dim) - means.transpose(1, 2)[:, :, None]
    valid = (torch.arange(blocks * block, device=x.device) < seq).view(1, blocks, block, 1)
    spread = ((tiles.square().sum(-1) * valid).sum(2) / counts.view(1, -1, 1)).transpose(1, 2)
    return means, counts, spread


@functools.lru_cache(maxsize=64)
def text_blocks(layout: VideoLayout, block: int, device: torch.device) -> torch.Tensor:
    """bool ``[ceil(S / block)]``: the blocks of ``block`` tokens that hold a text token (cached per layout;
    read-only)."""
    position = torch.arange(layout.seq_len)
    is_text = (position < layout.text_before) | (position >= layout.text_before + layout.num_video_tokens)
    blocks = torch.zeros(-(-layout.seq_len // block), dtype=torch.bool)
    blocks[position[is_text] // block] = True
    return blocks.to(device)


@functools.lru_cache(maxsize=64)
def diagonal_and_text_blocks(layout: VideoLayout, block: int, device: torch.device) -> torch.Tensor:
    """bool ``[M, M]`` block pairs that pooled-selection methods always read: the diagonal, every pair of
    a text query block and every pair with a text key block (cached per layout; read-only)."""
    text = text_blocks(layout, block, device)
    return torch.eye(len(text), dtype=torch.bool, device=device) | text[:, None] | text[None, :]
