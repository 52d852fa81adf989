"""Where an op runs: its Triton kernel on CUDA or under Triton's interpreter, else its PyTorch reference."""

from __future__ import annotations

import os

import torch

__all__ = ["interpreting", "use_triton"]


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET=1``, the tests' way on a CPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(device: torch.device | torch.Tensor) -> bool:
    """True on CUDA, and on any device when ``TRITON_INTERPRET=1`` (the tests' way of running kernels on a CPU)."""
    device = device.device if isinstance(device, torch.Tensor) else torch.device(device)
    return device.type == "cuda" or interpreting()
