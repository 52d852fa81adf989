"""The `vgen` command line."""

import subprocess
import sys

import pytest

from vgen.cli import main


def test_generate_writes_video_and_sheet(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code = main(["generate", "--model", str(tiny_dirs("wan")), "--prompt", "a blue square grows", "--frames", "5",
                 "--height", "32", "--width", "32", "--steps", "2", "--attention", "dense", "--out", str(out),
                 "--sheet"])
    assert code == 0
    assert out.stat().st_size > 0 and out.with_suffix(".png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_generate_shows_a_progress_bar(tiny_dirs, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vgen.cli", "generate", "--model", str(tiny_dirs("wan")), "--prompt", "a red circle",
         "--frames", "5", "--height", "32", "--width", "32", "--steps", "3", "--out", str(tmp_path / "a.gif")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "3/3" in result.stderr


def test_info_prints_grid_and_attention_share(tiny_dirs, capsys):
    assert main(["info", str(tiny_dirs("hunyuan")), "--frames", "9", "--height", "32", "--width", "48"]) == 0
    text = capsys.readouterr().out
    assert "HunyuanVideoPipeline" in text and "3 x 2 x 3" in text and "in self-attention" in text


def test_info_shape_preset(capsys):
    assert main(["info", "--shape", "wan1.3b-480p"]) == 0
    text = capsys.readouterr().out
    assert "21 x 30 x 52" in text and "32,760" in text


@pytest.mark.parametrize(
    "argv, message",
    [(["generate", "--model", "/no/such/dir", "--prompt", "x", "--out", "a.mp4"], "does not exist"),
     (["generate", "--model", ".", "--prompt", "x", "--out", "a.avi"], "--out must end in"),
     (["info"], "either a model folder or --shape"),
     (["tiny", "sdxl", "x"], "sdxl")],
)
def test_errors_are_one_line_messages(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_attention_is_rejected_with_choices(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", ".", "--prompt", "x", "--out", "a.mp4", "--attention", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
