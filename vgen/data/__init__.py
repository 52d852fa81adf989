"""Procedural data: captioned moving-shapes videos, and prompt adherence measured from pixels.

::

    from vgen.data import ShapesDataset, render, sample_clip, score_video
    clip = sample_clip(seed=0, frames=32, height=64, width=64)
    video = render(clip)                          # [32, 64, 64, 3] uint8
    score_video(video, clip.caption).passed       # True
    video, caption = ShapesDataset(1000, 32, 64, 64)[0]  # [3, 32, 64, 64] float32 in [-1, 1], str
"""

from vgen.data.adherence import AdherenceResult, CaptionSpec, adherence_rate, parse_caption, score_video
from vgen.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    MOTIONS,
    PALETTE,
    VOCABULARY,
    ShapeClip,
    ShapesDataset,
    ShapeTrack,
    caption_split,
    caption_words,
    draw_shape,
    render,
    sample_clip,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "KINDS",
    "MOTIONS",
    "PALETTE",
    "VOCABULARY",
    "AdherenceResult",
    "CaptionSpec",
    "ShapeClip",
    "ShapeTrack",
    "ShapesDataset",
    "adherence_rate",
    "caption_split",
    "caption_words",
    "draw_shape",
    "parse_caption",
    "render",
    "sample_clip",
    "score_video",
]
