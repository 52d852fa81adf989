"""Procedural text-to-video data: coloured shapes moving over textured backgrounds, with captions.

A clip is a :class:`ShapeClip`: a muted background texture and one or two :class:`ShapeTrack` s,
each a shape of one palette colour with one motion. Its caption comes from a small regular
grammar, the main object (the one drawn on top) first::

    caption    := object ["while" object] ["on a" texture "background"]
    object     := ("a" | "an") colour kind motion
    motion     := "moves left" | "moves right" | "moves up" | "moves down" | "bounces"
                | "rotates" | "grows" | "shrinks" | "turns" colour

e.g. "a red circle moves left while a blue square grows on a striped background". Positions,
sizes and travel are fractions of the canvas, so one clip renders at any resolution and frame
count; every colour in a clip is distinct and backgrounds stay far from the palette (low
saturation, mid-dark value), which is what lets :mod:`vgen.data.adherence` find objects by colour.
"""

from __future__ import annotations

import colorsys
import hashlib
import math
import re
from dataclasses import dataclass
from types import MappingProxyType

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "KINDS",
    "MOTIONS",
    "PALETTE",
    "VOCABULARY",
    "ShapeClip",
    "ShapeTrack",
    "ShapesDataset",
    "caption_split",
    "caption_words",
    "draw_shape",
    "render",
    "sample_clip",
]

PALETTE: MappingProxyType[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (230, 30, 30),
        "orange": (255, 128, 0),
        "yellow": (250, 230, 30),
        "green": (30, 200, 50),
        "cyan": (30, 215, 230),
        "blue": (40, 80, 255),
        "purple": (190, 40, 240),
        "white": (250, 250, 250),
    }
)
"""Named shape colours (RGB): seven hues at least 25 degrees apart, plus white."""
COLOURS: tuple[str, ...] = tuple(PALETTE)
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")
MOTIONS: tuple[str, ...] = (
    "moves left",
    "moves right",
    "moves up",
    "moves down",
    "bounces",
    "rotates",
    "grows",
    "shrinks",
    "turns",
)
"""Motion names; ``"turns"`` is followed by the new colour in captions ("turns blue")."""
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "cloudy")
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {"a", "an", "while", "on", "background", *COLOURS, *KINDS, *BACKGROUNDS}
        | {word for motion in MOTIONS for word in motion.split()}
    )
)
"""Every word a caption can contain, sorted: a word-level tokenizer's vocabulary."""

# Unit vector (x right, y down) of each straight motion.
_DIRECTIONS = {"moves left": (-1, 0), "moves right": (1, 0), "moves up": (0, -1), "moves down": (0, 1)}
_STAR_INNER = 0.5  # inner / outer radius of the five-pointed star
_TURN_WINDOW = (0.4, 0.6)  # fraction of the clip over which "turns" blends to the new colour
_EVAL_EVERY = 10  # one caption string in this many belongs to the evaluation split


@dataclass(frozen=True)
class ShapeTrack:
    """One shape and its motion over a clip.

    The centre is given in the shape's free range: ``x = 0`` puts it as far left as it can go
    with its largest extent inside the canvas, ``x = 1`` as far right (``y`` likewise, 0 at the
    top), so a track in [0, 1] never leaves the canvas at any resolution.

    Args:
        kind: one of :data:`KINDS`.
        colour: one of :data:`COLOURS`.
        motion: one of :data:`MOTIONS`.
        x: start centre, horizontal, in [0, 1] of the free range.
        y: start centre, vertical, in [0, 1] of the free range.
        size: circumradius as a fraction of ``min(height, width)``, in (0, 0.25].
        angle: start orientation, degrees counter-clockwise.
        travel: "moves ..." and "bounces": distance over the clip in free-range units
            (a straight mover stops at the wall; a bouncer reflects off it).
        heading: "bounces": direction, degrees counter-clockwise from rightwards.
        spin: "rotates": turn over the clip, degrees counter-clockwise.
        scale: "grows" and "shrinks": final size / start size.
        new_colour: "turns": the colour at the end of the clip.
    """

    kind: str
    colour: str
    motion: str
    x: float = 0.5
    y: float = 0.5
    size: float = 0.15
    angle: float = 0.0
    travel: float = 0.0
    heading: float = 0.0
    spin: float = 0.0
    scale: float = 1.0
    new_colour: str | None = None

    def __post_init__(self) -> None:
        for name, options in (("kind", KINDS), ("colour", COLOURS), ("motion", MOTIONS)):
            if getattr(self, name) not in options:
                raise ValueError(f"ShapeTrack.{name} must be one of {', '.join(options)}; got {getattr(self, name)!r}")
        for name in ("x", "y"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ShapeTrack.{name} must be in [0, 1] (free-range units), got {getattr(self, name)!r}")
        if not 0.0 < self.size <= 0.25:
            raise ValueError(f"ShapeTrack.size must be in (0, 0.25] of min(height, width), got {self.size!r}")
        if not 0.0 < self.scale or self.size * max(1.0, self.scale) > 0.25:
            raise ValueError(f"ShapeTrack.scale must be > 0 with size * scale <= 0.25, got {self.scale!r}")
        if self.motion == "turns":
            if self.new_colour not in COLOURS or self.new_colour == self.colour:
                raise ValueError(
                    f"ShapeTrack.new_colour must be one of {', '.join(COLOURS)} other than colour "
                    f"{self.colour!r} when motion is 'turns'; got {self.new_colour!r}"
                )
        elif self.new_colour is not None:
            raise ValueError(f"ShapeTrack.new_colour is only for motion 'turns', got {self.new_colour!r}")
        if self.motion == "rotates" and self.kind == "circle":
            raise ValueError("ShapeTrack.kind must not be 'circle' when motion is 'rotates' (a circle looks the same)")

    @property
    def phrase(self) -> str:
        """This object in caption words, e.g. "an orange star turns blue"."""
        article = "an" if self.colour[0] in "aeiou" else "a"
        motion = f"turns {self.new_colour}" if self.motion == "turns" else self.motion
        return f"{article} {self.colour} {self.kind} {motion}"

    def at(self, t: float, height: int, width: int) -> tuple[float, float, float, float, np.ndarray]:
        """State at clip time ``t`` in [0, 1] on a ``height`` x ``width`` canvas.

        Returns:
            (centre x, centre y, circumradius, angle) in pixels and degrees, and the RGB colour ``[3]`` float.
        """
        extent = min(height, width)
        radius = self.size * extent
        reach = radius * max(1.0, self.scale)  # largest circumradius over the clip
        u, v = self.x, self.y
        if self.motion in _DIRECTIONS:
            dx, dy = _DIRECTIONS[self.motion]
            u = min(max(u + dx * self.travel * t, 0.0), 1.0)
            v = min(max(v + dy * self.travel * t, 0.0), 1.0)
        elif self.motion == "bounces":
            heading = math.radians(self.heading)
            u = _reflect(u + math.cos(heading) * self.travel * t)
            v = _reflect(v - math.sin(heading) * self.travel * t)
        if self.motion in ("grows", "shrinks"):
            radius *= self.scale**t
        colour = np.array(PALETTE[self.colour], dtype=np.float64)
        if self.motion == "turns":
            start, stop = _TURN_WINDOW
            w = min(max((t - start) / (stop - start), 0.0), 1.0)
            w = w * w * (3 - 2 * w)  # smoothstep
            colour = (1 - w) * colour + w * np.array(PALETTE[self.new_colour], dtype=np.float64)
        cx = reach + u * (width - 2 * reach)
        cy = reach + v * (height - 2 * reach)
        return cx, cy, radius, self.angle + self.spin * t, colour


def _reflect(u: float) -> float:
    """``u`` folded into [0, 1] by reflection at both ends (a triangle wave)."""
    m = u % 2.0
    return m if m <= 1.0 else 2.0 - m


@dataclass(frozen=True)
class ShapeClip:
    """Everything needed to render one clip and caption it.

    Args:
        seed: the seed it was sampled from (also seeds the cloudy texture).
        frames, height, width: clip size; frames >= 1, height and width >= 16.
        shapes: one or two tracks, the main object first (it is drawn on top and
            mentioned first); all their colours, new colours included, are distinct.
        background: texture, one of :data:`BACKGROUNDS`.
        background_colours: the texture's two muted RGB colours.
        background_period: stripe / checker / cloud size as a fraction of ``min(height, width)``.
        background_angle: stripe direction, degrees.
        mention_background: whether the caption names the texture.
    """

    seed: int
    frames: int
    height: int
    width: int
    shapes: tuple[ShapeTrack, ...]
    background: str = "plain"
    background_colours: tuple[tuple[int, int, int], tuple[int, int, int]] = ((60, 60, 60), (90, 90, 90))
    background_period: float = 0.2
    background_angle: float = 0.0
    mention_background: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", tuple(self.shapes))  # a list works too, and is frozen here
        _check_size(self.frames, self.height, self.width, prefix="ShapeClip.")
        if not 1 <= len(self.shapes) <= 2 or not all(isinstance(s, ShapeTrack) for s in self.shapes):
            raise ValueError(f"ShapeClip.shapes must be one or two ShapeTracks, got {self.shapes!r}")
        colours = [c for s in self.shapes for c in (s.colour, s.new_colour) if c is not None]
        if len(set(colours)) != len(colours):
            raise ValueError(f"ShapeClip.shapes must use distinct colours (new colours included), got {colours}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"ShapeClip.background must be one of {', '.join(BACKGROUNDS)}; got {self.background!r}")
        if not self.background_period > 0:
            raise ValueError(f"ShapeClip.background_period must be > 0, got {self.background_period!r}")

    @property
    def main(self) -> ShapeTrack:
        """The main object: first in the caption, drawn on top."""
        return self.shapes[0]

    @property
    def caption(self) -> str:
        """The clip in words, e.g. "a yellow triangle bounces on a striped background"."""
        text = " while ".join(s.phrase for s in self.shapes)
        return f"{text} on a {self.background} background" if self.mention_background else text


def _check_size(frames: object, height: object, width: object, prefix: str = "") -> None:
    for name, value, low in (("frames", frames, 1), ("height", height, 16), ("width", width, 16)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
            raise ValueError(f"{prefix}{name} must be an int >= {low}, got {value!r}")


def caption_words(caption: str) -> list[str]:
    """The caption's words, lower-cased, punctuation dropped: ``"A red circle."`` -> ``["a", "red", "circle"]``."""
    return re.findall(r"[a-z]+", caption.lower())


def caption_split(caption: str) -> str:
    """``"eval"`` for the held-out tenth of caption strings (by a stable hash), else ``"train"``."""
    digest = hashlib.blake2b(caption.encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % _EVAL_EVERY == 0 else "train"


def _sample_track(rng: np.random.Generator, colour: str, new_colour: str) -> ShapeTrack:
    """A random track of ``colour``; ``new_colour`` is used if the motion drawn is "turns"."""
    kind = str(rng.choice(KINDS))
    motions = [m for m in MOTIONS if not (m == "rotates" and kind == "circle")]
    motion = str(rng.choice(motions))
    x, y = (float(v) for v in rng.uniform(0.0, 1.0, size=2))
    common = {"kind": kind, "colour": colour, "motion": motion, "angle": float(rng.uniform(0.0, 360.0))}
    if motion in _DIRECTIONS:
        travel = rng.uniform(0.6, 1.0)
        start = rng.uniform(0.0, 1.0 - travel)  # from the wall it leaves, so that the whole travel fits
        dx, dy = _DIRECTIONS[motion]
        if dx:
            x = start if dx > 0 else 1.0 - start
        else:
            y = start if dy > 0 else 1.0 - start
        return ShapeTrack(**common, x=x, y=y, size=rng.uniform(0.12, 0.18), travel=travel)
    if motion == "bounces":
        horizontal = rng.random() < 0.5
        start = x if horizontal else y
        # head for the farther wall, so the bounce comes at least halfway along, then come back part-way
        towards_high = start < 0.5
        travel = max(start, 1.0 - start) + rng.uniform(0.4, 0.9)
        heading = (0.0 if towards_high else 180.0) if horizontal else (270.0 if towards_high else 90.0)
        return ShapeTrack(**common, x=x, y=y, size=rng.uniform(0.12, 0.18), travel=travel, heading=heading)
    if motion == "rotates":
        spin = rng.uniform(120.0, 240.0) * float(rng.choice((-1.0, 1.0)))
        return ShapeTrack(**common, x=x, y=y, size=rng.uniform(0.14, 0.2), spin=spin)
    if motion == "grows":
        return ShapeTrack(**common, x=x, y=y, size=rng.uniform(0.09, 0.12), scale=rng.uniform(1.7, 2.0))
    if motion == "shrinks":
        return ShapeTrack(**common, x=x, y=y, size=rng.uniform(0.16, 0.2), scale=rng.uniform(0.45, 0.6))
    return ShapeTrack(**common, x=x, y=y, size=rng.uniform(0.12, 0.18), new_colour=new_colour)


def _rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(255 * red), round(255 * green), round(255 * blue)


def sample_clip(
    seed: int, frames: int, height: int, width: int, *, max_shapes: int = 2, min_shapes: int = 1
) -> ShapeClip:
    """A random clip, fully determined by ``seed``.

    Args:
        seed: non-negative int for ``numpy.random.Generator``.
        frames, height, width: clip size (frames >= 1, height and width >= 16); the
            motion is spread over the clip whatever its length.
        max_shapes: 1 or 2 objects at most.
        min_shapes: 1 or 2 objects at least (at most ``max_shapes``).
    """
    _check_size(frames, height, width)
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if max_shapes not in (1, 2) or isinstance(max_shapes, bool):
        raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes!r}")
    if min_shapes not in (1, 2) or isinstance(min_shapes, bool) or min_shapes > max_shapes:
        raise ValueError(f"min_shapes must be 1 or 2 and at most max_shapes={max_shapes}, got {min_shapes!r}")
    rng = np.random.default_rng(seed)
    count = int(rng.integers(min_shapes, max_shapes + 1))
    colours = [str(c) for c in rng.permutation(COLOURS)[: 2 * count]]  # a colour and a spare new colour per shape
    shapes = [_sample_track(rng, colours[0], colours[1])]
    if count == 2:
        # keep the second object clear of the main one at the start (up to a few tries)
        cx, cy, radius = shapes[0].at(0.0, height, width)[:3]
        for _ in range(10):
            other = _sample_track(rng, colours[2], colours[3])
            ox, oy, other_radius = other.at(0.0, height, width)[:3]
            if math.hypot(cx - ox, cy - oy) >= radius + other_radius:
                break
        shapes.append(other)
    hue, saturation, value = rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.35)
    dark = _rgb(hue, saturation, value)
    light = _rgb(hue, saturation, value + rng.uniform(0.12, 0.25))
    return ShapeClip(
        seed=int(seed),
        frames=frames,
        height=height,
        width=width,
        shapes=tuple(shapes),
        background=str(rng.choice(BACKGROUNDS)),
        background_colours=(dark, light),
        background_period=float(rng.uniform(0.1, 0.25)),
        background_angle=float(rng.choice((0.0, 45.0, 90.0, 135.0))),
        mention_background=bool(rng.random() < 0.5),
    )


def _background(clip: ShapeClip) -> np.ndarray:
    """The static texture, ``[height, width, 3]`` uint8."""
    h, w = clip.height, clip.width
    period = clip.background_period * min(h, w)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    if clip.background == "plain":
        mix = np.zeros((h, w))
    elif clip.background == "striped":
        angle = math.radians(clip.background_angle)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        mix = 0.5 + 1.5 * np.sin(2 * math.pi * phase)  # soft-edged stripes after clipping
    elif clip.background == "checkered":
        mix = 0.5 + 2.0 * np.sin(math.pi * xs / period) * np.sin(math.pi * ys / period)
    else:  # cloudy: smooth value noise, one random value per cell of the period's size
        cells = (max(2, round(h / period)) + 1, max(2, round(w / period)) + 1)
        grid = np.random.default_rng([clip.seed, 1]).uniform(0.0, 1.0, size=cells)
        mix = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    mix = np.clip(mix, 0.0, 1.0)[..., None]
    dark, light = (np.array(c, dtype=np.float64) for c in clip.background_colours)
    return np.round((1 - mix) * dark + mix * light).astype(np.uint8)


_SHIFT = 4  # OpenCV fixed-point fraction bits: sub-pixel positions


def draw_shape(
    image: np.ndarray,
    kind: str,
    centre: tuple[float, float],
    radius: float,
    angle: float,
    colour: float | tuple[float, ...],
    *,
    antialias: bool = True,
) -> None:
    """Fill one shape into ``image [H, W, C]`` or ``[H, W]`` (uint8), in place.

    Args:
        kind: one of :data:`KINDS`.
        centre: (x, y) in pixels, x right, y down; sub-pixel positions are kept.
        radius: circumradius in pixels (the star's inner corners sit at half of it).
        angle: orientation, degrees counter-clockwise; at 0 the triangle and the star point up
            and the square is axis-aligned.
        colour: the fill, one value per channel.
        antialias: blend the edge pixels by coverage; otherwise a hard edge.
    """
    line = cv2.LINE_AA if antialias else cv2.LINE_8
    one = 1 << _SHIFT
    cx, cy = centre
    if kind == "circle":
        cv2.circle(image, (round(cx * one), round(cy * one)), round(radius * one), colour, -1, line, _SHIFT)
        return
    if kind == "square":
        angles, radii = angle + 45.0 + 90.0 * np.arange(4), np.full(4, radius)
    elif kind == "triangle":
        angles, radii = angle + 90.0 + 120.0 * np.arange(3), np.full(3, radius)
    else:  # star: five points, outer and inner corners alternating
        angles = angle + 90.0 + 36.0 * np.arange(10)
        radii = np.where(np.arange(10) % 2 == 0, radius, _STAR_INNER * radius)
    theta = np.radians(angles)
    corners = np.stack([cx + radii * np.cos(theta), cy - radii * np.sin(theta)], axis=-1)
    cv2.fillPoly(image, [np.round(corners * one).astype(np.int32)], colour, line, _SHIFT)


def render(clip: ShapeClip) -> np.ndarray:
    """The clip's pixels, ``[frames, height, width, 3]`` uint8 RGB.

    Shapes are drawn with anti-aliased edges at sub-pixel positions, the main object last (on top).
    """
    background = _background(clip)
    video = np.empty((clip.frames, clip.height, clip.width, 3), dtype=np.uint8)
    for f in range(clip.frames):
        t = f / (clip.frames - 1) if clip.frames > 1 else 0.0
        frame = background.copy()
        for track in reversed(clip.shapes):
            cx, cy, radius, angle, colour = track.at(t, clip.height, clip.width)
            draw_shape(frame, track.kind, (cx, cy), radius, angle, tuple(float(c) for c in np.round(colour)))
        video[f] = frame
    return video


_COUNT_KEY = 7919  # keys the per-index object-count draw apart from the clip seeds


class ShapesDataset(Dataset):
    """``num_clips`` procedural clips: item ``i`` is ``(video [3, frames, height, width] float32 in [-1, 1], caption)``.

    Clip ``i`` is drawn from a seed derived from ``(seed, split, i)``, so items are reproducible
    and independent of each other. The splits hold disjoint caption strings: a draw whose caption
    belongs to the other split (:func:`caption_split`) is redrawn, so no evaluation caption is
    ever seen in training.

    Args:
        num_clips: number of items, >= 1.
        frames, height, width: clip size (frames >= 1, height and width >= 16).
        seed: dataset seed.
        split: ``"train"`` or ``"eval"``.
        max_shapes: 1 or 2 objects per clip at most.
        two_shape_share: with ``max_shapes=2``, the fraction of clips that hold two objects
            (None: each clip draws one or two with equal odds, as :func:`sample_clip` does). A
            training set can weigh the harder two-object captions up without changing the
            evaluation split's mix.
    """

    def __init__(
        self,
        num_clips: int,
        frames: int,
        height: int,
        width: int,
        seed: int = 0,
        *,
        split: str = "train",
        max_shapes: int = 2,
        two_shape_share: float | None = None,
    ) -> None:
        if not isinstance(num_clips, int) or isinstance(num_clips, bool) or num_clips < 1:
            raise ValueError(f"num_clips must be an int >= 1, got {num_clips!r}")
        _check_size(frames, height, width)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if max_shapes not in (1, 2) or isinstance(max_shapes, bool):
            raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes!r}")
        if two_shape_share is not None and (
            isinstance(two_shape_share, bool) or not isinstance(two_shape_share, int | float)
            or not 0.0 <= two_shape_share <= 1.0 or max_shapes != 2
        ):
            raise ValueError(f"two_shape_share must be None or a number in [0, 1] with max_shapes=2, "
                             f"got {two_shape_share!r} (max_shapes={max_shapes})")
        self.two_shape_share = two_shape_share
        self.num_clips, self.frames, self.height, self.width = num_clips, frames, height, width
        self.seed, self.split, self.max_shapes = seed, split, max_shapes

    def __len__(self) -> int:
        return self.num_clips

    def clip(self, index: int) -> ShapeClip:
        """Item ``index``'s parameters and caption, without rendering it."""
        if not -self.num_clips <= index < self.num_clips:
            raise IndexError(f"index {index} out of range for {self.num_clips} clips")
        index %= self.num_clips
        shapes = (1, self.max_shapes)
        if self.two_shape_share is not None:  # one draw per index decides one object or two
            entropy = (self.seed, ("train", "eval").index(self.split), index, _COUNT_KEY)
            two = np.random.default_rng(entropy).random() < self.two_shape_share
            shapes = (2, 2) if two else (1, 1)
        for attempt in range(1000):
            entropy = (self.seed, ("train", "eval").index(self.split), index, attempt)
            seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
            clip = sample_clip(seed, self.frames, self.height, self.width, min_shapes=shapes[0], max_shapes=shapes[1])
            if caption_split(clip.caption) == self.split:
                return clip
        raise RuntimeError(f"no {self.split} caption in 1000 draws for clip {index}")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        clip = self.clip(index)
        video = np.ascontiguousarray(render(clip).transpose(3, 0, 1, 2))  # [3, F, H, W]
        return torch.from_numpy(video).float().div_(127.5).sub_(1.0), clip.caption
