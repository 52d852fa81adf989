"""Readers of real 4D data, on files written here in the published layouts from a procedural sequence."""

import numpy as np
import pytest

from vgen.data.deforming import sample_sequence
from vgen.data.real4d import read_anime, read_oflow_sequence, read_split, sample_anime_sequence


def write_oflow(folder, seq, rng):
    """Each frame stored in its own normalisation (random loc/scale), float16 points, packed occupancies."""
    (folder / "pcl_seq").mkdir(parents=True)
    (folder / "points_seq").mkdir()
    frames = []
    for t in range(len(seq["times"])):
        loc, scale = rng.normal(size=3).astype(np.float16), np.float64(rng.uniform(0.5, 2.0))
        frames.append((loc, scale))

        def stored(p, loc=loc, scale=scale):
            return ((p - loc.astype(np.float64)) / scale).astype(np.float16)

        np.savez(folder / "pcl_seq" / f"{t + 80:08d}.npz", points=stored(seq["correspondences"][t]), loc=loc,
                 scale=scale)  # fmt: skip
        np.savez(folder / "points_seq" / f"{t + 80:08d}.npz", points=stored(seq["queries"][t]), loc=loc,
                 scale=np.float16(scale), occupancies=np.packbits(seq["occupancy"][t]))  # fmt: skip
    return frames


def test_oflow_sequences_come_back_in_the_first_frames_space(tmp_path):
    rng = np.random.default_rng(0)
    seq = sample_sequence(1, frames=5, points=8, queries=300, correspondences=200)
    frames = write_oflow(tmp_path / "D-FAUST" / "s1", seq, rng)
    (tmp_path / "D-FAUST" / "train.lst").write_text("s1\n\n")
    assert read_split(tmp_path / "D-FAUST", "train") == ["s1"] and read_split(tmp_path / "D-FAUST", "val") == ["s1"]
    out = read_oflow_sequence(tmp_path / "D-FAUST" / "s1", start=1, frames=3, points=50, seed=0)
    loc0, scale0 = frames[1][0].astype(np.float64), frames[1][1]
    for i, t in enumerate(range(1, 4)):  # the world points, in frame 1's normalised space
        expected = (seq["correspondences"][t] - loc0) / scale0
        np.testing.assert_allclose(out["surface"][i], expected, atol=3e-3 * max(1, np.abs(expected).max()))
        assert np.array_equal(out["occupancy"][i], seq["occupancy"][t])
    assert out["inputs"].shape == (3, 50, 3) and out["queries"].shape == (3, 300, 3)
    with pytest.raises(ValueError, match="does not fit 5 frames"):
        read_oflow_sequence(tmp_path / "D-FAUST" / "s1", start=3, frames=3)


def write_anime(path, vertices, faces):
    with open(path, "wb") as f:
        np.array([len(vertices), vertices.shape[1], len(faces)], "<i4").tofile(f)
        vertices[0].astype("<f4").tofile(f)
        faces.astype("<i4").tofile(f)
        (vertices[1:] - vertices[:1]).astype("<f4").tofile(f)


def test_anime_files_round_trip_and_sample(tmp_path):
    rng = np.random.default_rng(1)
    vertices = rng.normal(size=(4, 10, 3)).astype(np.float32)
    faces = rng.integers(0, 10, size=(12, 3))
    write_anime(tmp_path / "a.anime", vertices, faces)
    read_vertices, read_faces = read_anime(tmp_path / "a.anime")
    np.testing.assert_allclose(read_vertices, vertices, atol=1e-6)
    assert np.array_equal(read_faces, faces)
    seq = sample_anime_sequence(tmp_path / "a.anime", frames=4, points=20, correspondences=100)
    assert seq["inputs"].shape == (4, 20, 3) and np.abs(seq["vertices"][0]).max() <= 0.5 + 1e-6
    # samples are barycentric points of their triangle in every frame: corresponding by construction
    assert seq["correspondences"].shape == (4, 100, 3)
    (tmp_path / "b.anime").write_bytes((tmp_path / "a.anime").read_bytes()[:-4])
    with pytest.raises(ValueError, match="bytes, but a header of 4 frames"):
        read_anime(tmp_path / "b.anime")
