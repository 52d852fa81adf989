"""Quality reports: metrics against independent computations, per-layer recording, the CLI."""

import math

import numpy as np
import pytest
import torch

from vgen import VideoPipeline
from vgen.attention import AttentionMethod, registry
from vgen.cli import main
from vgen.pipelines.plumbing import record_attention
from vgen.pipelines.quality import psnr, quality_report, ssim


def naive_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM by explicit windows (one channel image at a time), as in Wang et al. 2004."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for f in range(a.shape[0]):
        for c in range(3):
            x, y = a[f, :, :, c], b[f, :, :, c]
            for i in range(x.shape[0] - size + 1):
                for j in range(x.shape[1] - size + 1):
                    px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
                    cov = (w * px * py).sum() - mx * my
                    c1, c2 = 0.01**2, 0.03**2
                    values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_metrics_match_independent_computations():
    rng = np.random.default_rng(0)
    a = rng.random((2, 16, 18, 3))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    assert psnr(b, a) == pytest.approx(10 * math.log10(1 / np.mean((a - b) ** 2)))
    assert psnr(a, a) == math.inf
    assert ssim(b, a) == pytest.approx(naive_ssim(b, a), abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)
    assert psnr((a * 255).round().astype(np.uint8), (a * 255).round().astype(np.uint8)) == math.inf
    with pytest.raises(ValueError, match="videos differ in shape"):
        psnr(a, a[:1])


class HalfZero(AttentionMethod):
    """Zeros as output, claiming half the work: a method whose damage is known."""

    def forward(self, q, k, v, *, layout, step, layer, scale, attn_mask):
        self.last_density = torch.tensor(0.5)
        return torch.zeros_like(q)


@pytest.fixture
def half_zero(monkeypatch):
    monkeypatch.setitem(registry._METHODS, "half-zero", HalfZero)
    HalfZero.name = "half-zero"


@pytest.fixture(scope="module")
def wan(tiny_dirs):
    return VideoPipeline.from_pretrained(tiny_dirs("wan"), device="cpu")


SIZE = {"num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 2}


def test_report_of_dense_is_exact(wan):
    report = quality_report(wan, "dense", {}, ["a red circle moves left"], [0, 1], **SIZE)
    assert len(report.clips) == 2 and all(c.psnr == math.inf and c.ssim == pytest.approx(1.0) for c in report.clips)
    assert report.density == 1.0
    assert [layer for layer, _, _ in report.layers()] == [0, 1]
    assert all(error < 1e-6 for _, _, error in report.layers())
    assert report.adherence("dense") is not None
    assert wan.attention_method is None


def test_report_records_density_and_error_of_a_method(wan, half_zero):
    report = quality_report(wan, "half-zero", {"dense_layers": [1]}, ["a red circle moves left"], [0], **SIZE)
    layers = {layer: (density, error) for layer, density, error in report.layers()}
    assert layers[0] == (pytest.approx(0.5), pytest.approx(1.0))  # zeros against dense: relative error 1
    assert layers[1] == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-6))  # a dense layer
    # two steps, classifier-free guidance in two calls, two layers
    assert len(report.calls) == 2 * 2 * 2
    assert math.isfinite(report.clips[0].psnr) and report.clips[0].ssim < 1
    assert "| 0 | 0.500 | 1.00e+00 |" in report.to_markdown()


def test_record_attention_needs_a_method(wan):
    with pytest.raises(ValueError, match="needs a method applied first"):
        with record_attention(wan.transformer):
            pass


def test_bench_quality_cli_writes_table_and_plot(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "q"
    code = main(["bench", "quality", "--model", str(tiny_dirs("wan")), "--attention", "dense",
                 "--sweep", "dense_steps=0,1", "--prompts", "1", "--frames", "5", "--height", "32", "--width", "32",
                 "--steps", "2", "--out", str(out)])
    assert code == 0
    text = (out / "quality.md").read_text()
    assert text.count("against dense") == 2 and "dense_steps=1" in text
    assert (out / "density_psnr.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "0"], "--prompts and --seeds must be >= 1"),
])
def test_bench_quality_bad_input(tiny_dirs, tmp_path, capsys, argv, message):
    code = main(["bench", "quality", "--model", str(tiny_dirs("wan")), "--attention", "dense",
                 "--out", str(tmp_path), *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_bench_quality_bad_sweep(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--model", ".", "--attention", "dense", "--out", ".", "--sweep", "dense_steps"])
    assert "--sweep expects KEY=V1,V2" in capsys.readouterr().err


class RenderingPipe:
    """Stands in for a VideoPipeline: returns the true render of the caption's clip (or noise)."""

    def __init__(self, noise: bool = False) -> None:
        from vgen.data import ShapesDataset

        held_out = ShapesDataset(6, 17, 64, 64, split="eval")
        self.clips = {held_out.clip(i).caption: held_out.clip(i) for i in range(6)}
        self.noise, self.enabled = noise, []

    def __call__(self, prompt, *, seed, progress, **generate):
        from vgen.data import render

        video = render(self.clips[prompt]).astype(np.float32) / 255
        return np.random.default_rng(seed).random(video.shape, dtype=np.float32) if self.noise else video

    def enable_sparse_attention(self, name, **config):
        self.enabled.append(name)

    def disable_sparse_attention(self):
        self.enabled.append(None)


def test_adherence_report_on_true_renders_and_noise(tmp_path):
    from vgen.pipelines.quality import adherence_report

    pipe = RenderingPipe()
    prompts = list(pipe.clips)
    report = adherence_report(pipe, prompts, [0, 1], method="window", sheet=tmp_path / "sheet.png", num_frames=17)
    assert len(report.clips) == 12 and report.rate() == 1.0 and report.rate("passed") == 1.0
    assert pipe.enabled == ["window", None] and (tmp_path / "sheet.png").stat().st_size > 0
    assert report.rate("follows") == 1.0 and "colour + position **100%**, colour + motion 100%" in report.to_markdown()
    noise = adherence_report(RenderingPipe(noise=True), prompts, [0])
    assert noise.rate() <= 0.2 and noise.rate("follows") <= 0.2 and noise.rate("passed") <= 0.2
    assert noise.method == "stock"
    with pytest.raises(ValueError, match="check must be"):
        report.rate("nope")
    with pytest.raises(ValueError):
        adherence_report(pipe, ["a purple elephant sings"], [0])


def test_bench_adherence_cli(tmp_path, tiny_dirs, capsys):
    out = tmp_path / "adh"
    argv = ["bench", "adherence", "--model", str(tiny_dirs("wan")), "--prompts", "2", "--frames", "5",
            "--height", "32", "--width", "32", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    text = (out / "adherence.md").read_text()
    assert text.count("| 0 |") == 2 and (out / "adherence.png").is_file()
    assert main([*argv[:-2], "--prompts", "0", "--out", str(out)]) == 2
    assert "--prompts and --seeds must be >= 1" in capsys.readouterr().err
    assert main([*argv, "--prompt", "hello world"]) == 2
    assert "hello" in capsys.readouterr().err
