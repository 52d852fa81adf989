"""Attention kernels: Triton on CUDA, each op beside a plain-PyTorch reference.

A kernel knows nothing of diffusers or of the methods built on it.
"""

from vgen.kernels.block_sparse import block_sparse_attention, block_sparse_attention_reference
from vgen.kernels.merge import merge_attention, merge_attention_reference
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
from vgen.kernels.reference import attention_reference, dense_attention

__all__ = [
    "attention_reference",
    "axis_order",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "check_permutation",
    "curve_order",
    "dense_attention",
    "merge_attention",
    "merge_attention_reference",
    "permute_tokens",
    "permute_tokens_reference",
    "tile_order",
    "unpermute_tokens",
    "unpermute_tokens_reference",
]
