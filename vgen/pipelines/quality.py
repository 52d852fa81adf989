"""Quality of an attention method against dense: same prompts, same seeds, side by side.

Per clip: PSNR and SSIM of the method's video against the dense one, and the prompt
adherence of both (when the prompt is a shapes caption the checker can read). Per layer:
the method's density and the relative error of its attention output against dense
attention on the same inputs (``record_attention``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vgen.pipelines.plumbing import AttentionCall, record_attention
from vgen.pipelines.video import VideoPipeline

__all__ = [
    "AdherenceReport",
    "ClipAdherence",
    "ClipQuality",
    "QualityReport",
    "adherence_report",
    "plot_density_psnr",
    "psnr",
    "quality_report",
    "ssim",
]


def _as_float(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"videos must be arrays [frames, height, width, 3], got shape {video.shape}")
    return video.astype(np.float64) / 255.0 if video.dtype == np.uint8 else video.astype(np.float64)


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of ``video`` against ``reference`` ([F, H, W, 3], [0, 1] or uint8);
    ``inf`` for identical videos."""
    a, b = _as_float(video), _as_float(reference)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(video: np.ndarray, reference: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity over frames and channels (Gaussian window, the usual constants)."""
    a, b = _as_float(video), _as_float(reference)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}")
    x = torch.from_numpy(a).permute(0, 3, 1, 2).reshape(-1, 1, *a.shape[1:3])
    y = torch.from_numpy(b).permute(0, 3, 1, 2).reshape(-1, 1, *b.shape[1:3])
    size = min(window, *a.shape[1:3])
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    kernel = g[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


def _adherence(video: np.ndarray, prompt: str) -> bool | None:
    """Whether the checker accepts ``video`` for ``prompt``; None when the prompt is no shapes caption."""
    from vgen.data import parse_caption, score_video

    try:
        parse_caption(prompt)
    except ValueError:
        return None
    return score_video(video, prompt).passed


@dataclass(frozen=True)
class ClipQuality:
    prompt: str
    seed: int
    psnr: float
    ssim: float
    adherence_dense: bool | None
    adherence_method: bool | None


@dataclass
class QualityReport:
    """Clips and per-layer statistics of one method configuration against dense."""

    method: str
    config: dict[str, Any]
    clips: list[ClipQuality] = field(default_factory=list)
    calls: list[AttentionCall] = field(default_factory=list)

    @property
    def density(self) -> float:
        """Mean kept fraction of attention work over every recorded call."""
        return float(np.mean([c.density for c in self.calls])) if self.calls else 1.0

    @property
    def mean_psnr(self) -> float:
        return float(np.mean([c.psnr for c in self.clips]))

    @property
    def mean_ssim(self) -> float:
        return float(np.mean([c.ssim for c in self.clips]))

    def adherence(self, which: str) -> float | None:
        """Share of clips the checker accepts, for ``"dense"`` or ``"method"`` (None without shapes captions)."""
        values = [getattr(c, f"adherence_{which}") for c in self.clips]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    def layers(self) -> list[tuple[int, float, float]]:
        """(layer, mean density, mean relative error) over steps and clips."""
        by_layer: dict[int, list[AttentionCall]] = defaultdict(list)
        for call in self.calls:
            by_layer[call.layer].append(call)
        return [(layer, float(np.mean([c.density for c in calls])), float(np.mean([c.rel_error for c in calls])))
                for layer, calls in sorted(by_layer.items())]

    def to_markdown(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.config.items()) or "defaults"

        def share(value: float | None) -> str:
            return "-" if value is None else f"{value:.0%}"

        lines = [
            f"#### {self.method} ({settings}) against dense",
            "",
            "| clips | density | PSNR (dB) | SSIM | adherence dense | adherence method |",
            "|---|---|---|---|---|---|",
            f"| {len(self.clips)} | {self.density:.3f} | {self.mean_psnr:.2f} | {self.mean_ssim:.4f} | "
            f"{share(self.adherence('dense'))} | {share(self.adherence('method'))} |",
            "",
            "| prompt | seed | PSNR (dB) | SSIM |",
            "|---|---|---|---|",
        ]
        lines += [f"| {c.prompt} | {c.seed} | {c.psnr:.2f} | {c.ssim:.4f} |" for c in self.clips]
        lines += ["", "| layer | density | attention relative error |", "|---|---|---|"]
        lines += [f"| {layer} | {d:.3f} | {e:.2e} |" for layer, d, e in self.layers()]
        return "\n".join(lines) + "\n"


def quality_report(
    pipe: VideoPipeline,
    method: str,
    config: dict[str, Any],
    prompts: list[str],
    seeds: list[int],
    dense_cache: dict[Any, np.ndarray] | None = None,
    **generate: Any,
) -> QualityReport:
    """Generate every (prompt, seed) dense and with ``method(**config)``; compare.

    Args:
        pipe: the pipeline; its attention is left as it was found (stock).
        method: a registered method name; config: its settings.
        prompts, seeds: every combination is generated twice.
        dense_cache: a dict shared across calls with the same pipeline and ``generate``, so that
            the dense videos of a sweep are generated once.
        **generate: sizes and steps passed to ``pipe(...)`` (``num_frames``, ``height``, ...).
    """
    if not prompts or not seeds:
        raise ValueError("quality_report needs at least one prompt and one seed")
    report = QualityReport(method, dict(config))
    bar = tqdm(total=len(prompts) * len(seeds), desc=f"quality {method}", unit="clip", leave=False)
    for prompt in prompts:
        for seed in seeds:
            key = (prompt, seed, tuple(sorted(generate.items())))
            if dense_cache is not None and key in dense_cache:
                dense = dense_cache[key]
            else:
                pipe.disable_sparse_attention()
                dense = pipe(prompt, seed=seed, progress=False, **generate)
                if dense_cache is not None:
                    dense_cache[key] = dense
            pipe.enable_sparse_attention(method, **config)
            try:
                with record_attention(pipe.transformer) as calls:
                    video = pipe(prompt, seed=seed, progress=False, **generate)
            finally:
                pipe.disable_sparse_attention()
            report.calls += calls
            report.clips.append(ClipQuality(prompt, seed, psnr(video, dense), ssim(video, dense),
                                            _adherence(dense, prompt), _adherence(video, prompt)))
            bar.update(1)
    bar.close()
    return report


def plot_density_psnr(reports: list[QualityReport], path: str | Path) -> Path:
    """Scatter of mean density against mean PSNR, one point per report (identical videos plot at the top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r.mean_psnr for r in reports if math.isfinite(r.mean_psnr)]
    ceiling = (max(finite) + 5.0) if finite else 60.0
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for r in reports:
        value = r.mean_psnr if math.isfinite(r.mean_psnr) else ceiling
        ax.scatter(r.density, value, marker="o" if math.isfinite(r.mean_psnr) else "^")
        label = ", ".join(f"{k}={v}" for k, v in r.config.items()) or r.method
        ax.annotate(label, (r.density, value), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("density (kept attention work)")
    ax.set_ylabel("PSNR against dense (dB)")
    ax.set_title(f"{reports[0].method}: quality against density" if reports else "")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class ClipAdherence:
    """One generated clip scored against its caption (:func:`vgen.data.score_video`)."""

    prompt: str
    seed: int
    colour: bool
    kind: bool
    motion: bool
    position: bool

    @property
    def follows(self) -> bool:
        """Colour and motion (the path, or the growth, rotation or colour change) both as captioned."""
        return self.colour and self.motion

    @property
    def placed(self) -> bool:
        """Colour and position (the centroid's path: moves, bounces or stays) as captioned: issue 4's measure."""
        return self.colour and self.position

    @property
    def passed(self) -> bool:
        """All three checks, the outline's kind too."""
        return self.colour and self.kind and self.motion


@dataclass
class AdherenceReport:
    """Prompt adherence of a pipeline (optionally under an attention method) on shapes captions."""

    method: str
    config: dict[str, Any]
    generate: dict[str, Any]
    clips: list[ClipAdherence] = field(default_factory=list)

    def rate(self, check: str = "placed") -> float:
        """Fraction of clips passing ``check``: ``placed`` (colour + position), ``follows`` (colour +
        motion), ``passed`` (colour, kind and motion), or one of ``colour``, ``kind``, ``motion``, ``position``."""
        checks = ("placed", "follows", "passed", "colour", "kind", "motion", "position")
        if check not in checks:
            raise ValueError(f"check must be one of {', '.join(checks)}, got {check!r}")
        return sum(bool(getattr(c, check)) for c in self.clips) / max(1, len(self.clips))

    def to_markdown(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.generate.items() if v is not None)
        config = ", ".join(f"{k}={v}" for k, v in self.config.items())
        mark = {True: "yes", False: "no"}
        lines = [
            f"### Prompt adherence: {self.method}{f' ({config})' if config else ''}; {settings}",
            "",
            f"{len(self.clips)} clips: colour + position **{self.rate():.0%}**, colour + motion "
            f"{self.rate('follows'):.0%}, colour + kind + motion {self.rate('passed'):.0%} "
            f"(colour {self.rate('colour'):.0%}, position {self.rate('position'):.0%}, "
            f"kind {self.rate('kind'):.0%}, motion {self.rate('motion'):.0%})",
            "",
            "| prompt | seed | colour | position | kind | motion |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c.prompt} | {c.seed} | {mark[c.colour]} | {mark[c.position]} | {mark[c.kind]} | {mark[c.motion]} |"
            for c in self.clips
        ]
        return "\n".join(lines) + "\n"


def adherence_report(
    pipe: VideoPipeline,
    prompts: list[str],
    seeds: list[int],
    method: str | None = None,
    config: dict[str, Any] | None = None,
    sheet: str | Path | None = None,
    **generate: Any,
) -> AdherenceReport:
    """Generate every (prompt, seed) and score it against its caption.

    Args:
        pipe: the pipeline; its attention is left stock afterwards.
        prompts: shapes captions (:func:`vgen.data.parse_caption` must read them).
        seeds: generation seeds.
        method, config: an attention method to generate with (None: stock attention).
        sheet: if given, a PNG with one row of frames per clip.
        **generate: sizes, steps and guidance passed to ``pipe(...)``.
    """
    from vgen.data import parse_caption, score_video
    from vgen.pipelines.video import contact_sheet

    if not prompts or not seeds:
        raise ValueError("adherence_report needs at least one prompt and one seed")
    for prompt in prompts:
        parse_caption(prompt)  # a clear error for a prompt the checker cannot read, before any generation
    report = AdherenceReport(method or "stock", dict(config or {}), dict(generate))
    rows = []
    try:
        if method is not None:
            pipe.enable_sparse_attention(method, **(config or {}))
        bar = tqdm(total=len(prompts) * len(seeds), desc="adherence", unit="clip", leave=False)
        for prompt in prompts:
            for seed in seeds:
                video = pipe(prompt, seed=seed, progress=False, **generate)
                bar.update(1)
                result = score_video(video, prompt)
                report.clips.append(
                    ClipAdherence(prompt, seed, result.colour_found, result.kind_matches, result.motion_matches,
                                  result.position_matches)
                )
                if sheet is not None:
                    rows.append(contact_sheet((np.clip(video, 0, 1) * 255).round().astype(np.uint8), max_frames=8))
        bar.close()
    finally:
        pipe.disable_sparse_attention()
    if sheet is not None:
        from PIL import Image

        Path(sheet).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows)).save(sheet)
    return report
