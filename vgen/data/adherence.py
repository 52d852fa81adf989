"""Prompt adherence of a shapes video, read from its pixels.

:func:`score_video` parses the caption (:func:`parse_caption`, the grammar of
:mod:`vgen.data.shapes`), finds the main object by its colour in every frame (hue, saturation
and value against the palette; the largest connected blob above a minimum size), tracks its
centroid, area and outline, and checks:

- ``colour_found``: the object's colour forms a blob in most frames (for "turns X": at the start);
- ``position_matches``: the centroid's path is the caption's: a straight move that way, a reversal
  for "bounces", staying in place for the motions that do not travel (grows, shrinks, rotates, turns);
- ``kind_matches``: the blob's outline reads as the caption's kind (circle, square, triangle, star);
- ``motion_matches``: the track does what the caption says (displacement, a reversal, area ratio,
  a turn of the outline in place, or the new colour at the end where the object was). For the
  travelling motions it is the position check; for the others it asks for the change itself.

Ground-truth renders pass, other captions and noise fail (see tests/test_data_shapes.py for the rates).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from vgen.data.shapes import BACKGROUNDS, COLOURS, KINDS, PALETTE, caption_words, draw_shape

__all__ = ["AdherenceResult", "CaptionSpec", "adherence_rate", "parse_caption", "score_video"]

# Pixel classes: a palette hue needs saturation and value; white needs neither hue nor saturation.
_MIN_SATURATION, _MIN_VALUE = 0.45, 0.35
_WHITE_MAX_SATURATION, _WHITE_MIN_VALUE = 0.2, 0.8
_MAX_HUE_ERROR = 20.0  # degrees, and never past halfway to the next palette hue
_MIN_BLOB = 0.002  # smallest blob, as a fraction of the frame's pixels
_PRESENT = 0.75  # fraction of frames (or of the first quarter, for "turns") in which the colour must be found
# Motion thresholds, as fractions of the canvas side along the axis (or of the start area / outline).
_MIN_TRAVEL = 0.1  # straight moves: net displacement
_MAX_SIDEWAYS = 0.5  # straight moves: sideways drift / displacement
_MAX_BACKTRACK = 0.25  # straight moves: largest step back / displacement
_MIN_LEG = 0.08  # bounces: the way out to the turning point and the way back
_GROW, _SHRINK = 1.5, 0.67  # area ratio last / first
_MAX_DRIFT = 0.08  # rotates and turns: the object stays in place
_MAX_TURN_IOU = 0.85  # rotates: the outline, centred, overlaps its start by less than this at some frame
_ROTATE_AREA = (0.7, 1.4)  # rotates: area ratio stays in this range


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks of its main object (the first one mentioned).

    Args:
        colour: palette colour name.
        kind: shape kind.
        motion: one of :data:`vgen.data.shapes.MOTIONS`.
        new_colour: for ``"turns"``, the colour it turns.
        background: the texture named by "on a ... background", if any.
    """

    colour: str
    kind: str
    motion: str
    new_colour: str | None = None
    background: str | None = None


def parse_caption(caption: str) -> CaptionSpec:
    """The main object of a caption in the grammar of :mod:`vgen.data.shapes`.

    Case and punctuation are ignored; "a"/"an" are interchangeable.

    Raises:
        ValueError: the caption is outside the grammar (the message names the word and what was expected).
    """
    words = caption_words(caption)
    position = 0

    def take(expected: Iterable[str], what: str) -> str:
        nonlocal position
        options = tuple(expected)
        word = words[position] if position < len(words) else None
        if word not in options:
            got = repr(word) if word is not None else "the end"
            raise ValueError(
                f"caption {caption!r} is outside the shapes grammar: expected {what} ({', '.join(options)}) "
                f"at word {position + 1}, got {got}"
            )
        position += 1
        return word

    def shape() -> tuple[str, str, str, str | None]:
        take(("a", "an"), "an article")
        colour = take(COLOURS, "a colour")
        kind = take(KINDS, "a kind")
        motion = take(("moves", "bounces", "rotates", "grows", "shrinks", "turns"), "a motion")
        if motion == "moves":
            return colour, kind, f"moves {take(('left', 'right', 'up', 'down'), 'a direction')}", None
        if motion == "turns":
            return colour, kind, motion, take(COLOURS, "a colour")
        return colour, kind, motion, None

    colour, kind, motion, new_colour = shape()
    if position < len(words) and words[position] == "while":
        position += 1
        shape()
    background = None
    if position < len(words):
        take(("on",), "'while', 'on' or the end")
        take(("a",), "an article")
        background = take(BACKGROUNDS, "a background")
        take(("background",), "the word")
    if position < len(words):
        take((), "the end")
    return CaptionSpec(colour, kind, motion, new_colour, background)


@dataclass(frozen=True)
class AdherenceResult:
    """How well a video follows its caption's main object.

    Args:
        spec: the parsed caption.
        colour_found: the main colour forms a blob in most frames (for "turns": at the start).
        kind_matches: the blob's outline reads as ``spec.kind``.
        motion_matches: the track shows ``spec.motion``.
        position_matches: the centroid's path is the caption's (moves that way, bounces, or stays
            in place); colour + position is the measure issue 4 names.
        detected_kind: what the outline reads as (None if no blob).
        found_fraction: fraction of frames with a blob of the main colour.
        displacement: centroid (dx, dy), start to end, as fractions of width and height.
        area_ratio: blob area, end / start.
    """

    spec: CaptionSpec
    colour_found: bool
    kind_matches: bool
    motion_matches: bool
    position_matches: bool
    detected_kind: str | None
    found_fraction: float
    displacement: tuple[float, float]
    area_ratio: float

    @property
    def passed(self) -> bool:
        return self.colour_found and self.kind_matches and self.motion_matches

    @property
    def score(self) -> float:
        """Fraction of the three checks passed, in [0, 1]."""
        return (self.colour_found + self.kind_matches + self.motion_matches) / 3


def _hue_windows() -> dict[str, tuple[float, float]]:
    """Palette hue (degrees) and the tolerance around it, for every colour but white."""
    hues = {name: 360.0 * colorsys.rgb_to_hsv(*np.divide(rgb, 255))[0] for name, rgb in PALETTE.items()}
    del hues["white"]
    windows = {}
    for name, hue in hues.items():
        gap = min(_hue_distance(hue, other) for other_name, other in hues.items() if other_name != name)
        windows[name] = (hue, min(_MAX_HUE_ERROR, gap / 2))
    return windows


def _hue_distance(a: np.ndarray | float, b: float) -> np.ndarray | float:
    d = np.abs(a - b) % 360.0
    return np.minimum(d, 360.0 - d)


_HUE_WINDOWS = _hue_windows()


def _colour_masks(hsv: np.ndarray, colour: str) -> np.ndarray:
    """Pixels of ``colour``: ``hsv [F, H, W, 3]`` (hue degrees, saturation, value in [0, 1]) -> ``[F, H, W]`` bool."""
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    if colour == "white":
        return (saturation <= _WHITE_MAX_SATURATION) & (value >= _WHITE_MIN_VALUE)
    centre, tolerance = _HUE_WINDOWS[colour]
    return (saturation >= _MIN_SATURATION) & (value >= _MIN_VALUE) & (_hue_distance(hue, centre) <= tolerance)


@dataclass(frozen=True)
class _Blob:
    mask: np.ndarray  # [H, W] bool
    x: float  # centroid, pixels
    y: float
    area: int


def _largest_blob(mask: np.ndarray, min_area: int) -> _Blob | None:
    """The largest 8-connected component of ``mask [H, W]`` with at least ``min_area`` pixels."""
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    if count < 2:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    area = int(stats[best, cv2.CC_STAT_AREA])
    if area < min_area:
        return None
    return _Blob(labels == best, float(centroids[best, 0]), float(centroids[best, 1]), area)


def _track(masks: np.ndarray, min_area: int) -> list[_Blob | None]:
    return [_largest_blob(m, min_area) for m in masks]


def _unit_area(kind: str) -> float:
    """Area of ``kind`` at circumradius 1."""
    if kind == "circle":
        return math.pi
    image = np.zeros((1024, 1024), dtype=np.uint8)
    draw_shape(image, kind, (512.0, 512.0), 500.0, 0.0, 1, antialias=False)
    return float(image.sum()) / 500.0**2


_UNIT_AREAS = {kind: _unit_area(kind) for kind in KINDS}
_SYMMETRY = {"circle": 360.0, "square": 90.0, "triangle": 120.0, "star": 72.0}  # degrees
_ANGLES = 24  # orientations tried per symmetry period


def _classify(blob: _Blob) -> str:
    """The kind whose template fits the blob best (IoU): each drawn at the blob's centroid and area, best turn."""
    ys, xs = np.nonzero(blob.mask)
    margin = max(2, (ys.max() - ys.min()) // 2, (xs.max() - xs.min()) // 2)
    top, left = max(0, ys.min() - margin), max(0, xs.min() - margin)
    window = blob.mask[top : ys.max() + margin + 1, left : xs.max() + margin + 1]
    centre = (blob.x - left, blob.y - top)
    template = np.zeros(window.shape, dtype=np.uint8)
    best, best_iou = KINDS[0], -1.0
    for kind in KINDS:
        radius = math.sqrt(blob.area / _UNIT_AREAS[kind])
        for angle in np.arange(_ANGLES) * _SYMMETRY[kind] / _ANGLES if kind != "circle" else (0.0,):
            template[:] = 0
            draw_shape(template, kind, centre, radius, float(angle), 1, antialias=False)
            inside = template.view(bool)
            iou = np.count_nonzero(inside & window) / np.count_nonzero(inside | window)
            if iou > best_iou:
                best, best_iou = kind, iou
    return best


def _mode_kind(blobs: list[_Blob]) -> str:
    """Majority kind over the three largest blobs (the most pixels, the clearest outline)."""
    largest = sorted(blobs, key=lambda b: b.area, reverse=True)[:3]
    kinds = [_classify(b) for b in largest]
    return max(kinds, key=kinds.count)


def _ends(values: np.ndarray) -> tuple[float, float]:
    """Median of the first and of the last eighth of ``values`` (one value at least each)."""
    k = max(1, len(values) // 8)
    return float(np.median(values[:k])), float(np.median(values[-k:]))


def _straight(xs: np.ndarray, ys: np.ndarray, direction: tuple[int, int]) -> bool:
    """A move along ``direction`` (unit, x right, y down): far enough, mostly on-axis, never stepping back much."""
    along, across = (xs, ys) if direction[0] else (ys, xs)
    progress = (direction[0] or direction[1]) * along
    start, end = _ends(progress)
    travel = end - start
    sideways = abs(float(np.subtract(*_ends(across))))
    backtrack = float(np.max(np.maximum.accumulate(progress) - progress))
    return travel >= _MIN_TRAVEL and sideways <= _MAX_SIDEWAYS * travel and backtrack <= _MAX_BACKTRACK * travel


def _bounces(xs: np.ndarray, ys: np.ndarray) -> bool:
    """A reversal on either axis: out to a turning point and back, both legs long enough."""
    for along in (xs, ys):
        start, end = _ends(along)
        turn = int(np.argmax(np.abs(along - start)))
        if 0 < turn < len(along) - 1 and min(abs(along[turn] - start), abs(along[turn] - end)) >= _MIN_LEG:
            return True
    return False


def _centred_iou(a: _Blob, b: _Blob) -> float:
    """IoU of two blobs' masks after moving ``b``'s centroid onto ``a``'s."""
    stride = 3 * a.mask.shape[1]  # pixel (y, x) -> y * stride + x: unique for x in [-width, 2 * width)
    ya, xa = np.nonzero(a.mask)
    yb, xb = np.nonzero(b.mask)
    first = ya * stride + xa
    second = (yb + round(a.y - b.y)) * stride + xb + round(a.x - b.x)
    common = np.intersect1d(first, second, assume_unique=True).size
    return common / (first.size + second.size - common)


def _as_frames(video: np.ndarray) -> np.ndarray:
    """``video [F, H, W, 3]`` uint8, or float in [0, 1] -> uint8."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or min(video.shape) < 1:
        raise ValueError(f"video must be [frames, height, width, 3], got shape {video.shape}")
    if video.dtype == np.uint8:
        return video
    if not np.issubdtype(video.dtype, np.floating):
        raise ValueError(f"video must be uint8 or float in [0, 1], got dtype {video.dtype}")
    if not (np.isfinite(video).all() and video.min() >= 0.0 and video.max() <= 1.0):
        raise ValueError("a float video must hold finite values in [0, 1]")
    return np.round(video * 255).astype(np.uint8)


def score_video(video: np.ndarray, caption: str) -> AdherenceResult:
    """Check a video against its caption's main object.

    Args:
        video: ``[F, H, W, 3]`` RGB, uint8 or float in [0, 1]. Motion needs two frames at least;
            the clip is read as a whole (start and end are its first and last eighths).
        caption: a caption in the shapes grammar.

    Returns:
        the three checks, ``passed`` (all three) and ``score`` (their mean), with the measurements behind them.
    """
    spec = parse_caption(caption)
    frames = _as_frames(video)
    num_frames, height, width = frames.shape[:3]
    hsv = cv2.cvtColor(frames.reshape(-1, width, 3).astype(np.float32) / 255, cv2.COLOR_RGB2HSV)
    hsv = hsv.reshape(num_frames, height, width, 3)
    min_area = max(4, round(_MIN_BLOB * height * width))
    track = _track(_colour_masks(hsv, spec.colour), min_area)
    found = [b for b in track if b is not None]
    quarter = max(1, num_frames // 4)
    if spec.motion == "turns":
        colour_found = sum(b is not None for b in track[:quarter]) >= _PRESENT * quarter
    else:
        colour_found = len(found) >= _PRESENT * num_frames
    if not found:
        return AdherenceResult(spec, False, False, False, False, None, 0.0, (0.0, 0.0), 0.0)

    xs = np.array([b.x for b in found]) / width
    ys = np.array([b.y for b in found]) / height
    areas = np.array([b.area for b in found], dtype=np.float64)
    (x0, x1), (y0, y1), (a0, a1) = _ends(xs), _ends(ys), _ends(areas)
    area_ratio = a1 / a0
    in_place = abs(x1 - x0) <= _MAX_DRIFT and abs(y1 - y0) <= _MAX_DRIFT
    motion = spec.motion
    if motion.startswith("moves"):
        direction = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion.split()[1]]
        position_matches = _straight(xs, ys, direction)
    elif motion == "bounces":
        position_matches = _bounces(xs, ys)
    else:
        position_matches = in_place
    position_matches = position_matches and num_frames >= 2
    if num_frames < 2:
        motion_matches = False
    elif motion.startswith("moves") or motion == "bounces":
        motion_matches = position_matches
    elif motion == "grows":
        motion_matches = area_ratio >= _GROW
    elif motion == "shrinks":
        motion_matches = area_ratio <= _SHRINK
    elif motion == "rotates":
        turned = min((_centred_iou(found[0], b) for b in found[1:]), default=1.0) < _MAX_TURN_IOU
        motion_matches = in_place and _ROTATE_AREA[0] <= area_ratio <= _ROTATE_AREA[1] and turned
    else:  # turns: the new colour at the end, where the object started, and the old colour gone from there
        start = found[0]  # in the first quarter whenever colour_found
        new = [b for b in _track(_colour_masks(hsv[-quarter:], spec.new_colour), min_area) if b is not None]
        old_left = sum(int((b.mask & start.mask).sum()) for b in track[-quarter:] if b is not None)
        motion_matches = (
            len(new) >= _PRESENT * quarter
            and all(abs(b.x - start.x) <= _MAX_DRIFT * width and abs(b.y - start.y) <= _MAX_DRIFT * height for b in new)
            and old_left < 0.25 * sum(int((b.mask & start.mask).sum()) for b in new)
        )
    detected_kind = _mode_kind(found)
    return AdherenceResult(
        spec=spec,
        colour_found=colour_found,
        kind_matches=colour_found and detected_kind == spec.kind,
        motion_matches=colour_found and motion_matches,
        position_matches=colour_found and position_matches,
        detected_kind=detected_kind,
        found_fraction=len(found) / num_frames,
        displacement=(x1 - x0, y1 - y0),
        area_ratio=area_ratio,
    )


def adherence_rate(videos: Iterable[np.ndarray], captions: Iterable[str]) -> float:
    """Fraction of ``videos`` (each ``[F, H, W, 3]``) that pass :func:`score_video` against their caption."""
    videos, captions = list(videos), list(captions)
    if len(videos) != len(captions):
        raise ValueError(f"adherence_rate got {len(videos)} videos and {len(captions)} captions")
    if not videos:
        raise ValueError("adherence_rate needs at least one video")
    return sum(score_video(v, c).passed for v, c in zip(videos, captions, strict=True)) / len(videos)
