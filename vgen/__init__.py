"""vgen: fast video and 3D diffusion transformers.

Efficient vision attention as Triton kernels, plugged into diffusers video pipelines::

    from vgen import VideoPipeline
    pipe = VideoPipeline.from_pretrained("path/to/model")
    pipe.enable_sparse_attention("dense")
"""

from vgen.attention import VideoLayout, available_methods
from vgen.pipelines import (
    VideoPipeline,
    apply_sparse_attention,
    remove_sparse_attention,
)

__version__ = "0.1.0"

__all__ = [
    "VideoLayout",
    "VideoPipeline",
    "__version__",
    "apply_sparse_attention",
    "available_methods",
    "remove_sparse_attention",
]
