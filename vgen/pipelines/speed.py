"""Speed of an attention method against dense at full model size, with random weights.

``vgen bench speed --shape wan1.3b-480p --attention window`` builds the shape's transformer
(and, for Wan shapes, the whole pipeline: UMT5-XXL text encoder, Wan VAE, UniPC scheduler) from
the configs in ``vgen/configs/shapes.yaml`` with random weights, then times, side by side in one
process:

- the transformer forward on one clip's latents (median of ``repeats`` after ``warmup``), and
- the whole pipeline (text encoding, ``steps`` denoising steps with classifier-free guidance,
  VAE decoding) once per attention, after an untimed one-step run that warms every component.

Timings synchronise the device; the ratio is dense time / method time.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from vgen.attention import create_method
from vgen.configs import load_shape
from vgen.pipelines.plumbing import apply_sparse_attention, remove_sparse_attention

__all__ = ["SpeedReport", "Timing", "build_shape_pipeline", "build_shape_transformer", "speed_report", "timer"]


@dataclass(frozen=True)
class Timing:
    """One measured quantity, dense and with the method, in seconds."""

    what: str
    dense_s: float
    method_s: float

    @property
    def speedup(self) -> float:
        return self.dense_s / self.method_s


@dataclass
class SpeedReport:
    """The timings of one (shape, method, config) on one device."""

    shape: str
    attention: str
    config: dict[str, Any]
    device: str
    dtype: str
    grid: tuple[int, int, int]
    steps: int
    repeats: int
    density: float | None = None
    timings: list[Timing] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def to_markdown(self) -> str:
        config = ", ".join(f"{k}={v}" for k, v in self.config.items()) or "defaults"
        density = "n/a" if self.density is None else f"{self.density:.3f}"
        timed = f"transformer: median of {self.repeats}"
        if any(t.what.startswith("pipeline") for t in self.timings):
            timed += f"; pipeline: {self.steps} steps with guidance, once each"
        lines = [
            f"### {self.shape}: {self.attention} ({config}) vs dense",
            "",
            f"{self.device}, {self.dtype}, "
            f"video tokens {self.grid[0]}x{self.grid[1]}x{self.grid[2]} = {self.tokens:,}, "
            f"density {density} (mean over layers); {timed}",
            "",
            "| measured | dense (s) | method (s) | speedup |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [f"| {t.what} | {t.dense_s:.3f} | {t.method_s:.3f} | {t.speedup:.2f}x |" for t in self.timings]
        return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _defaults(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly on ``device`` in ``dtype`` (no float32 copy of a 14B model first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _shape(shape: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(shape, str):
        return shape, load_shape(shape)
    if not isinstance(shape, dict) or not {"transformer", "config", "clip", "vae", "text_tokens"} <= set(shape):
        raise ValueError("shape must be a preset name or a dict with transformer, config, clip, vae and text_tokens")
    return str(shape.get("name", "custom")), shape


def build_shape_transformer(shape: str | dict[str, Any], device: str | torch.device, dtype: torch.dtype) -> Any:
    """The shape's transformer with random weights on ``device``."""
    import diffusers

    _, preset = _shape(shape)
    if preset["transformer"] != "WanTransformer3DModel":
        raise ValueError(
            f"bench speed builds inputs for WanTransformer3DModel shapes; {preset['transformer']} is not supported yet"
        )
    with _defaults(torch.device(device), dtype):
        return getattr(diffusers, preset["transformer"])(**preset["config"]).eval().requires_grad_(False)


def build_shape_pipeline(
    shape: str | dict[str, Any], transformer: Any, device: str | torch.device, dtype: torch.dtype
) -> Any:
    """The shape's whole pipeline around ``transformer``, random weights (text encoder, VAE) on ``device``."""
    import diffusers
    from transformers import UMT5Config, UMT5EncoderModel

    from vgen.models.reference import word_tokenizer

    name, preset = _shape(shape)
    if preset.get("pipeline") != "WanPipeline" or "text_encoder" not in preset:
        raise ValueError(f"shape {name!r} names no Wan pipeline (pipeline, text_encoder, vae_config) to time")
    with _defaults(torch.device(device), dtype):
        text_encoder = UMT5EncoderModel(UMT5Config(**preset["text_encoder"])).eval()
        vae = diffusers.AutoencoderKLWan(**preset.get("vae_config", {})).eval()
    tokenizer = word_tokenizer(model_max_length=preset["text_tokens"])
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
    )
    pipe = diffusers.WanPipeline(tokenizer, text_encoder, vae, scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latent_grid(preset: dict[str, Any]) -> tuple[int, int, int]:
    clip, factors = preset["clip"], preset["vae"]
    frames = (clip["num_frames"] - 1) // factors["temporal"] + 1
    return frames, clip["height"] // factors["spatial"], clip["width"] // factors["spatial"]


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def measure(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return measure


def _mean_density(method: Any, forward: Callable[[], None]) -> float:
    """Mean ``last_density`` over every self-attention call of one more (untimed) forward."""
    densities: list[float | torch.Tensor] = []
    compute = method.forward

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = compute(*args, **kwargs)
        densities.append(method.last_density)
        return out

    method.forward = recording  # the instance attribute shadows the class's method for this forward only
    try:
        forward()
    finally:
        del method.forward
    if not densities:  # every layer ran dense (dense_layers / dense_steps)
        return 1.0
    return float(torch.stack([torch.as_tensor(d, dtype=torch.float32).cpu() for d in densities]).mean())


def speed_report(
    shape: str | dict[str, Any],
    attention: str,
    config: dict[str, Any] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 3,
    warmup: int = 1,
    steps: int = 4,
    pipeline: bool = True,
    seed: int = 0,
) -> SpeedReport:
    """Time the transformer forward (and the whole pipeline) dense and with ``attention``.

    Args:
        shape: a preset of ``vgen/configs/shapes.yaml`` (e.g. ``"wan1.3b-480p"``) or such a dict.
        attention: a registered method name.
        config: the method's settings.
        device: default ``cuda`` when available.
        dtype: weights and activations.
        repeats, warmup: timed and untimed transformer forwards per attention.
        steps: denoising steps of the timed pipeline runs.
        pipeline: also time the whole pipeline (Wan shapes).
        seed: for the random weights and inputs.

    Returns:
        A :class:`SpeedReport`; ``to_markdown()`` gives its table.
    """
    config = dict(config or {})
    create_method(attention, **config)  # unknown names and bad settings fail before anything is built
    for label, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("steps", steps, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name, preset = _shape(shape)
    torch.manual_seed(seed)
    transformer = build_shape_transformer(preset, device, dtype)
    grid = _latent_grid(preset)
    patch = transformer.config.patch_size
    tokens = (grid[0] // patch[0], grid[1] // patch[1], grid[2] // patch[2])
    generator = torch.Generator(device).manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(
            1, transformer.config.in_channels, *grid, generator=generator, device=device, dtype=dtype
        ),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": torch.randn(
            1, preset["text_tokens"], transformer.config.text_dim, generator=generator, device=device, dtype=dtype
        ),
        "return_dict": False,
    }
    measure = timer(device)
    dtype_name = str(dtype).removeprefix("torch.")
    report = SpeedReport(name, attention, config, str(device), dtype_name, tokens, steps, repeats)

    def forward() -> None:
        with torch.inference_mode():
            transformer(**inputs)

    def forward_times() -> float:
        for _ in range(warmup):
            forward()
        return statistics.median(measure(forward) for _ in range(repeats))

    remove_sparse_attention(transformer)
    dense_forward = forward_times()
    method = apply_sparse_attention(transformer, attention, **config)
    method_forward = forward_times()
    report.density = _mean_density(method, forward)
    report.timings.append(Timing("transformer forward", dense_forward, method_forward))

    if pipeline:
        pipe = build_shape_pipeline(preset, transformer, device, dtype)
        clip = preset["clip"]

        def generate(num_steps: int) -> None:
            with torch.inference_mode():
                pipe(
                    prompt="a red circle moves left",
                    num_frames=clip["num_frames"],
                    height=clip["height"],
                    width=clip["width"],
                    num_inference_steps=num_steps,
                    guidance_scale=5.0,
                    max_sequence_length=preset["text_tokens"],
                    generator=torch.Generator(device).manual_seed(seed),
                    output_type="np",
                )

        remove_sparse_attention(transformer)
        generate(1)  # warm every component (VAE convolutions, text encoder) before timing either
        dense_pipeline = measure(lambda: generate(steps))
        apply_sparse_attention(transformer, attention, **config)
        method_pipeline = measure(lambda: generate(steps))
        report.timings.append(Timing(f"pipeline, {steps} steps", dense_pipeline, method_pipeline))
    remove_sparse_attention(transformer)
    return report
