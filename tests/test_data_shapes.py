"""Procedural shapes clips (determinism, sizes, captions, splits) and the pixel-level adherence checker."""

import dataclasses

import numpy as np
import pytest
import torch

from vgen.data import (
    COLOURS,
    VOCABULARY,
    ShapeClip,
    ShapesDataset,
    ShapeTrack,
    adherence_rate,
    caption_split,
    caption_words,
    parse_caption,
    render,
    sample_clip,
    score_video,
)

SEEDS = range(40)
F, H, W = 32, 64, 64


@pytest.fixture(scope="module")
def clips() -> list[ShapeClip]:
    return [sample_clip(seed, F, H, W) for seed in SEEDS]


@pytest.fixture(scope="module")
def videos(clips) -> list[np.ndarray]:
    return [render(clip) for clip in clips]


def test_same_seed_same_clip_and_pixels():
    a, b = sample_clip(7, 9, 48, 64), sample_clip(7, 9, 48, 64)
    assert a == b and a.caption == b.caption
    assert np.array_equal(render(a), render(b))
    c = sample_clip(8, 9, 48, 64)
    assert c != a and not np.array_equal(render(c), render(a))


def test_different_seeds_differ():
    captions = {sample_clip(seed, 4, 32, 32).caption for seed in range(50)}
    assert len(captions) >= 45
    frames = {render(sample_clip(seed, 1, 32, 32)).tobytes() for seed in range(50)}
    assert len(frames) == 50


@pytest.mark.parametrize("size", [(1, 16, 16), (17, 48, 80), (5, 64, 64), (3, 90, 33)], ids=str)
def test_any_size(size):
    for seed in range(5):
        clip = sample_clip(seed, *size)
        video = render(clip)
        assert video.shape == (*size, 3) and video.dtype == np.uint8
        assert video.std() > 0
        if min(size[1:]) >= 48:
            assert score_video(video, clip.caption).found_fraction == 1.0


def test_objects_stay_inside_the_canvas():
    for seed in range(200):
        clip = sample_clip(seed, 2, 40, 72)
        for track in clip.shapes:
            for t in np.linspace(0.0, 1.0, 21):
                cx, cy, radius, _, _ = track.at(t, clip.height, clip.width)
                assert radius <= cx <= clip.width - radius and radius <= cy <= clip.height - radius


def test_bounce_reflects_at_the_wall():
    track = ShapeTrack("square", "red", "bounces", x=0.5, y=0.5, travel=1.0, heading=0.0)
    xs = [track.at(t, 64, 64)[0] for t in np.linspace(0.0, 1.0, 11)]
    turn = int(np.argmax(xs))
    assert turn == 5 and np.isclose(xs[turn], 64 - 0.15 * 64) and np.isclose(xs[0], xs[-1])
    assert all(np.diff(xs[: turn + 1]) > 0) and all(np.diff(xs[turn:]) < 0)


def test_dataset_items():
    data = ShapesDataset(3, 5, 32, 48, seed=1)
    video, caption = data[1]
    assert len(data) == 3 and video.shape == (3, 5, 32, 48) and video.dtype == torch.float32
    assert video.is_contiguous() and -1.0 <= video.min() < video.max() <= 1.0
    assert caption == data.clip(1).caption
    assert torch.equal(ShapesDataset(3, 5, 32, 48, seed=1)[1][0], video)
    expected = torch.from_numpy(render(data.clip(1))).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.allclose(video, expected)
    assert ShapesDataset(3, 5, 32, 48, seed=2).clip(1) != data.clip(1)


def test_two_shape_share():
    """The share sets the fraction of two-object clips; None keeps the generator's own clips."""
    plain = ShapesDataset(400, 2, 16, 16, seed=3)
    assert [plain.clip(i) for i in range(20)] == [ShapesDataset(400, 2, 16, 16, seed=3, two_shape_share=None).clip(i)
                                                  for i in range(20)]
    for share in (0.0, 0.75, 1.0):
        data = ShapesDataset(400, 2, 16, 16, seed=3, two_shape_share=share)
        counts = [len(data.clip(i).shapes) for i in range(len(data))]
        two = sum(c == 2 for c in counts) / len(counts)
        assert set(counts) <= {1, 2} and abs(two - share) < 0.07, (share, two)
        assert {caption_split(data.clip(i).caption) for i in range(50)} == {"train"}
    assert all(len(sample_clip(seed, 2, 16, 16, min_shapes=2).shapes) == 2 for seed in range(30))


def test_vocabulary_covers_every_caption():
    assert list(VOCABULARY) == sorted(set(VOCABULARY))
    words = set()
    for seed in range(500):
        clip = sample_clip(seed, 2, 16, 16)
        words.update(caption_words(clip.caption))
        spec = parse_caption(clip.caption)
        main = clip.main
        assert (spec.colour, spec.kind, spec.motion, spec.new_colour) == (
            main.colour,
            main.kind,
            main.motion,
            main.new_colour,
        )
        assert spec.background == (clip.background if clip.mention_background else None)
    assert words == set(VOCABULARY)
    assert caption_words("A red Circle, moves left!") == ["a", "red", "circle", "moves", "left"]


def test_eval_captions_are_held_out():
    train = ShapesDataset(2000, 2, 16, 16, seed=0)
    held_out = ShapesDataset(100, 2, 16, 16, seed=0, split="eval")
    train_captions = {train.clip(i).caption for i in range(len(train))}
    eval_captions = {held_out.clip(i).caption for i in range(len(held_out))}
    assert len(eval_captions) >= 80
    assert not train_captions & eval_captions
    assert {caption_split(c) for c in train_captions} == {"train"}
    assert {caption_split(c) for c in eval_captions} == {"eval"}


def _wrong_caption(clips: list[ShapeClip], i: int) -> str:
    """The next clip's caption whose main object differs from clip ``i``'s in colour or motion."""
    spec = parse_caption(clips[i].caption)
    for j in range(1, len(clips)):
        other = clips[(i + j) % len(clips)].caption
        other_spec = parse_caption(other)
        if (other_spec.colour, other_spec.motion) != (spec.colour, spec.motion):
            return other
    raise AssertionError("every clip has the same main colour and motion")


def test_adherence_tells_true_from_wrong_captions(clips, videos):
    captions = [clip.caption for clip in clips]
    assert adherence_rate(videos, captions) >= 0.9
    placed = [score_video(v, c) for v, c in zip(videos, captions, strict=True)]
    assert np.mean([r.colour_found and r.position_matches for r in placed]) >= 0.95
    wrong = [_wrong_caption(clips, i) for i in range(len(clips))]
    assert adherence_rate(videos, wrong) <= 0.2
    noise = np.random.default_rng(0).integers(0, 256, size=(len(clips), F, H, W, 3), dtype=np.uint8)
    assert adherence_rate(noise, captions) <= 0.05


@pytest.mark.parametrize("change", ["colour", "kind", "motion", "position"])
def test_adherence_checks_each_part(clips, videos, change):
    """The right caption but one part changed: that check fails (almost always)."""
    rng = np.random.default_rng(1)
    failed = []
    for clip, video in zip(clips, videos, strict=True):
        main = clip.main
        used = {c for s in clip.shapes for c in (s.colour, s.new_colour)}
        if change == "colour":
            wrong = dataclasses.replace(main, colour=str(rng.choice([c for c in COLOURS if c not in used])))
        elif change == "kind":
            kinds = [k for k in ("square", "triangle", "star", "circle") if k != main.kind]
            wrong = dataclasses.replace(main, kind=kinds[0] if main.motion == "rotates" else str(rng.choice(kinds)))
        else:  # the path changes: a straight move is asked to bounce, anything else to move left
            motion = "bounces" if main.motion.startswith("moves") else "moves left"
            wrong = dataclasses.replace(main, motion=motion, new_colour=None)
        result = score_video(video, wrong.phrase)
        check = {"colour": "colour_found", "kind": "kind_matches", "motion": "motion_matches",
                 "position": "position_matches"}[change]
        failed.append(not getattr(result, check))
    assert np.mean(failed) >= 0.9


def test_adherence_result(clips, videos):
    result = score_video(videos[0].astype(np.float32) / 255, clips[0].caption)
    assert result.passed and result.score == 1.0 and result.detected_kind == clips[0].main.kind
    assert result == score_video(videos[0], clips[0].caption)
    blank = score_video(np.zeros((4, 32, 32, 3), np.uint8), "a red circle grows")
    assert not blank.passed and blank.score == 0.0 and blank.detected_kind is None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sample_clip(0, 0, 32, 32), "frames must be an int >= 1"),
        (lambda: sample_clip(0, 4, 8, 32), "height must be an int >= 16"),
        (lambda: sample_clip(0, 4, 32, 15), "width must be an int >= 16"),
        (lambda: sample_clip(0, 4, 32.0, 32), "height must be an int"),
        (lambda: sample_clip(0, "4", 32, 32), "frames must be an int"),
        (lambda: sample_clip(-1, 4, 32, 32), "seed must be a non-negative int"),
        (lambda: sample_clip(0, 4, 32, 32, max_shapes=3), "max_shapes must be 1 or 2"),
        (lambda: ShapeTrack("hexagon", "red", "grows"), "ShapeTrack.kind must be one of circle"),
        (lambda: ShapeTrack("star", "pink", "grows"), "ShapeTrack.colour must be one of red"),
        (lambda: ShapeTrack("star", "red", "jumps"), "ShapeTrack.motion must be one of"),
        (lambda: ShapeTrack("star", "red", "turns"), "ShapeTrack.new_colour must be one of"),
        (lambda: ShapeTrack("star", "red", "turns", new_colour="red"), "other than colour 'red'"),
        (lambda: ShapeTrack("circle", "red", "rotates"), "must not be 'circle'"),
        (lambda: ShapeTrack("star", "red", "grows", size=0.2, scale=2.0), "size * scale <= 0.25"),
        (lambda: ShapeTrack("star", "red", "grows", x=1.5), "ShapeTrack.x must be in [0, 1]"),
        (
            lambda: ShapeClip(0, 4, 32, 32, (ShapeTrack("star", "red", "grows"), ShapeTrack("star", "red", "bounces"))),
            "distinct colours",
        ),
        (lambda: sample_clip(0, 4, 32, 32, max_shapes=1, min_shapes=2), "min_shapes must be 1 or 2 and at most"),
        (lambda: ShapesDataset(4, 4, 32, 32, two_shape_share=1.5), "two_shape_share must be None or a number"),
        (lambda: ShapesDataset(4, 4, 32, 32, max_shapes=1, two_shape_share=0.5), "with max_shapes=2"),
        (lambda: ShapesDataset(0, 4, 32, 32), "num_clips must be an int >= 1"),
        (lambda: ShapesDataset(4, 4, 12, 32), "height must be an int >= 16"),
        (lambda: ShapesDataset(4, 4, 32, 32, split="test"), "split must be 'train' or 'eval'"),
        (lambda: parse_caption("a pink circle moves left"), "expected a colour (red, orange"),
        (lambda: parse_caption("a red circle moves sideways"), "expected a direction (left, right, up, down)"),
        (lambda: parse_caption("a red circle"), "expected a motion (moves, bounces"),
        (lambda: parse_caption("a red circle grows quickly"), "got 'quickly'"),
        (lambda: score_video(np.zeros((4, 32, 32)), "a red circle grows"), "video must be [frames, height, width, 3]"),
        (lambda: score_video(np.full((2, 32, 32, 3), 2.0), "a red circle grows"), "finite values in [0, 1]"),
        (lambda: adherence_rate([np.zeros((2, 32, 32, 3), np.uint8)], []), "1 videos and 0 captions"),
        (lambda: adherence_rate([], []), "at least one video"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_bad_input(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)
