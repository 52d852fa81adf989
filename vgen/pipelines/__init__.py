"""Pipelines: diffusers video pipelines wrapped by vgen, and the attention plumbing into them."""

from vgen.pipelines.plumbing import (
    TRANSFORMER_SPECS,
    apply_sparse_attention,
    remove_sparse_attention,
)
from vgen.pipelines.video import SUPPORTED_PIPELINES, VideoPipeline, save_video

__all__ = [
    "SUPPORTED_PIPELINES",
    "TRANSFORMER_SPECS",
    "VideoPipeline",
    "apply_sparse_attention",
    "remove_sparse_attention",
    "save_video",
]
