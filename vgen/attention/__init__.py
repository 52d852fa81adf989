"""Attention methods: token layouts, the method registry, and one module per method."""

from vgen.attention.dense import DenseAttention
from vgen.attention.layout import VideoLayout
from vgen.attention.registry import (
    AttentionMethod,
    MethodConfig,
    available_methods,
    create_method,
    register_method,
)

__all__ = [
    "AttentionMethod",
    "DenseAttention",
    "MethodConfig",
    "VideoLayout",
    "available_methods",
    "create_method",
    "register_method",
]
