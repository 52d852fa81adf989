"""Attention kernels: Triton on CUDA, each op beside a plain-PyTorch reference.

A kernel knows nothing of diffusers or of the methods built on it.
"""

from vgen.kernels.block_sparse import block_sparse_attention, block_sparse_attention_reference
from vgen.kernels.merge import merge_attention, merge_attention_reference
from vgen.kernels.reference import attention_reference, dense_attention

__all__ = [
    "attention_reference",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "dense_attention",
    "merge_attention",
    "merge_attention_reference",
]
