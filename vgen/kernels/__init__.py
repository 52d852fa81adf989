"""Attention kernels: Triton on CUDA, each op beside a plain-PyTorch reference.

A kernel knows nothing of diffusers or of the methods built on it.
"""

from vgen.kernels.reference import attention_reference, dense_attention

__all__ = ["attention_reference", "dense_attention"]
