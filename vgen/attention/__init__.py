"""Attention methods: token layouts, the method registry, and one module per method."""

from vgen.attention.block_mask import BlockMask, frame_mask, local_window_mask, position_mask
from vgen.attention.dense import DenseAttention
from vgen.attention.layout import VideoLayout
from vgen.attention.paro import PAROAttention, PAROConfig
from vgen.attention.psa import PSAConfig, PyramidSparseAttention
from vgen.attention.quant import QuantAttention, QuantConfig
from vgen.attention.rectified import RectifiedAttention, RectifiedConfig
from vgen.attention.registry import (
    AttentionMethod,
    MethodConfig,
    available_methods,
    create_method,
    register_method,
)
from vgen.attention.vmoba import MoBAConfig, MoBAttention, VMoBAConfig, VMoBAttention
from vgen.attention.window import WindowAttention, WindowConfig

__all__ = [
    "AttentionMethod",
    "BlockMask",
    "DenseAttention",
    "MethodConfig",
    "MoBAConfig",
    "MoBAttention",
    "PAROAttention",
    "PAROConfig",
    "PSAConfig",
    "PyramidSparseAttention",
    "QuantAttention",
    "QuantConfig",
    "RectifiedAttention",
    "RectifiedConfig",
    "VMoBAConfig",
    "VMoBAttention",
    "VideoLayout",
    "WindowAttention",
    "WindowConfig",
    "available_methods",
    "create_method",
    "frame_mask",
    "local_window_mask",
    "position_mask",
    "register_method",
]
