"""Test set-up: Triton through its interpreter when there is no GPU; unwritten outputs read as NaN."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

_empty, _empty_like = torch.empty, torch.empty_like


def _nan_filled(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point() and tensor.numel():
        with torch.no_grad():  # (torch.compile's own set-up asks for empty leaves that require grad)
            tensor.fill_(float("nan"))
    return tensor


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """`torch.empty` returns NaN-filled memory, so an output a kernel forgets to write fails loudly."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _nan_filled(_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _nan_filled(_empty_like(*a, **k)))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Saved tiny random-weight pipelines, one folder per family, built once per session."""
    from vgen.pipelines.tiny import save_tiny_pipeline

    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = save_tiny_pipeline(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


@pytest.fixture
def kernels_on_the_gpu():
    """On a GPU machine, tensors a test makes without a device go to the GPU, so that the kernels run there
    (CPU tensors take the PyTorch path on such a machine, and a kernel test would compare the reference with
    itself). Under the interpreter, nothing changes."""
    if not torch.cuda.is_available():
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device("cpu")
