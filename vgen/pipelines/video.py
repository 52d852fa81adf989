"""`VideoPipeline`: a diffusers video pipeline from a local folder, with vgen attention."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgen.attention import AttentionMethod, VideoLayout
from vgen.pipelines.plumbing import (
    apply_sparse_attention,
    patch_size,
    remove_sparse_attention,
    sparse_attention_method,
)

__all__ = [
    "SUPPORTED_PIPELINES",
    "VideoPipeline",
    "call_defaults",
    "contact_sheet",
    "read_model_index",
    "save_video",
    "token_grid",
    "video_factors",
]

SUPPORTED_PIPELINES = (
    "WanPipeline",
    "HunyuanVideoPipeline",
    "CogVideoXPipeline",
    "LTXPipeline",
    "MotifVideoPipeline",
    "SkyReelsV2DiffusionForcingPipeline",
)


def read_model_index(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Check that ``path`` is a diffusers-format folder of a supported pipeline; return its model_index.json."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"model path {str(folder)!r} is a file; expected a diffusers-format folder")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(
            f"{str(folder)!r} is not a diffusers-format folder: it has no model_index.json "
            "(save one with DiffusionPipeline.save_pretrained)"
        )
    index = json.loads(index_file.read_text())
    class_name = index.get("_class_name")
    if class_name not in SUPPORTED_PIPELINES:
        raise ValueError(
            f"{str(folder)!r} holds a {class_name} pipeline, which vgen does not support; "
            f"supported: {', '.join(SUPPORTED_PIPELINES)}"
        )
    return folder, index


def video_factors(pipeline: Any) -> tuple[int, int, int]:
    """(frame step, height multiple, width multiple) that sizes must respect: the VAE's
    temporal factor, and its spatial factor times the transformer's patch."""
    temporal = getattr(pipeline, "vae_scale_factor_temporal", None) or pipeline.vae_temporal_compression_ratio
    spatial = getattr(pipeline, "vae_scale_factor_spatial", None) or pipeline.vae_spatial_compression_ratio
    _, ph, pw = patch_size(pipeline.transformer.config)
    return int(temporal), int(spatial) * ph, int(spatial) * pw


def token_grid(pipeline: Any, num_frames: int, height: int, width: int) -> VideoLayout:
    """The video token grid the transformer sees for a clip of these sizes (sizes checked)."""
    temporal, mh, mw = video_factors(pipeline)
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if (num_frames - 1) % temporal:
        low = (num_frames - 1) // temporal * temporal + 1
        raise ValueError(
            f"num_frames must be 1 + a multiple of {temporal} (the VAE's temporal factor) for "
            f"{type(pipeline).__name__}; got {num_frames}, nearest valid: {low} or {low + temporal}"
        )
    for name, value, multiple in (("height", height, mh), ("width", width, mw)):
        if value % multiple:
            raise ValueError(
                f"{name} must be a multiple of {multiple} (VAE spatial factor x patch size) for "
                f"{type(pipeline).__name__}; got {value}, nearest valid: "
                f"{max(multiple, value // multiple * multiple)} or {(value // multiple + 1) * multiple}"
            )
    pt, ph, pw = patch_size(pipeline.transformer.config)
    latent_frames = (num_frames - 1) // temporal + 1
    return VideoLayout(-(-latent_frames // pt), height // mh, width // mw)


def call_defaults(pipeline: Any) -> dict[str, Any]:
    """Default arguments of the pipeline's ``__call__`` (sizes, ``max_sequence_length``, ...)."""
    parameters = inspect.signature(type(pipeline).__call__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def save_video(video: np.ndarray, path: str | Path, fps: int = 16) -> Path:
    """Write frames ``[F, H, W, 3]`` (float in [0, 1] or uint8) as .mp4, .gif or a .png contact sheet."""
    path = Path(path)
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be an array [frames, height, width, 3], got shape {video.shape}")
    frames = video if video.dtype == np.uint8 else (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4":
        import imageio.v2 as imageio

        with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(frame)
    elif suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)
    elif suffix == ".png":
        from PIL import Image

        Image.fromarray(contact_sheet(frames)).save(path)
    else:
        raise ValueError(f"path must end in .mp4, .gif or .png (a contact sheet), got {str(path)!r}")
    return path


def contact_sheet(frames: np.ndarray, max_frames: int = 16, columns: int = 8, gap: int = 2) -> np.ndarray:
    """Up to ``max_frames`` frames, evenly spaced over the clip, tiled in a grid on white."""
    picked = frames[np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))]
    n, h, w, c = picked.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    sheet = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, c), 255, dtype=np.uint8)
    for i, frame in enumerate(picked):
        r, col = divmod(i, cols)
        sheet[gap + r * (h + gap) : gap + r * (h + gap) + h, gap + col * (w + gap) : gap + col * (w + gap) + w] = frame
    return sheet


class VideoPipeline:
    """A diffusers text-to-video pipeline loaded from a local folder, with vgen attention.

    Example::

        pipe = VideoPipeline.from_pretrained("path/to/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
        pipe.enable_sparse_attention("dense")
        video = pipe("a red circle moves left", num_frames=33, height=480, width=832, seed=0)
        pipe.save(video, "out.mp4")
    """

    def __init__(self, pipeline: Any) -> None:
        if type(pipeline).__name__ not in SUPPORTED_PIPELINES:
            raise ValueError(
                f"pipeline of class {type(pipeline).__name__} is not supported; "
                f"supported: {', '.join(SUPPORTED_PIPELINES)}"
            )
        self.pipeline = pipeline

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> VideoPipeline:
        """Load the diffusers-format folder ``path`` (no download: local files only).

        Args:
            path: folder with model_index.json, as written by ``save_pretrained``.
            torch_dtype: weights' dtype (e.g. ``torch.bfloat16``); default as saved.
            device: where to run; default CUDA when available, else CPU.
            **kwargs: passed to the pipeline class's ``from_pretrained``.
        """
        import diffusers

        folder, index = read_model_index(path)
        pipeline_class = getattr(diffusers, index["_class_name"])
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        pipeline = pipeline_class.from_pretrained(folder, local_files_only=True, **kwargs)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(pipeline.to(device))

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def device(self) -> torch.device:
        return self.pipeline.transformer.device

    def token_grid(self, num_frames: int, height: int, width: int) -> VideoLayout:
        """Video token grid for a clip of these sizes; a ValueError names a size the model cannot take."""
        return token_grid(self.pipeline, num_frames, height, width)

    def __call__(
        self,
        prompt: str,
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        progress: bool = True,
        **kwargs: Any,
    ) -> np.ndarray:
        """Generate one clip; returns frames ``[F, H, W, 3]`` as float32 in [0, 1].

        Sizes left as None take the pipeline's defaults; other keyword arguments go to the
        diffusers pipeline unchanged (e.g. ``negative_prompt``, ``max_sequence_length``).
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        defaults = call_defaults(self.pipeline)
        sizes = {"num_frames": num_frames, "height": height, "width": width}
        sizes = {k: defaults[k] if v is None else v for k, v in sizes.items()}
        grid = self.token_grid(**sizes)
        ranks = getattr(self, "_parallel_ranks", 1)
        if grid.num_video_tokens % ranks:
            raise ValueError(
                f"{grid.num_video_tokens} video tokens ({grid.frames}x{grid.height}x{grid.width}) do not split over "
                f"{ranks} processes: pick num_frames/height/width whose token count {ranks} divides"
            )
        args = dict(sizes, **kwargs)
        if num_inference_steps is not None:
            args["num_inference_steps"] = num_inference_steps
        if guidance_scale is not None:
            args["guidance_scale"] = guidance_scale
        self.pipeline.set_progress_bar_config(disable=not progress)
        self.transformer._reset_stateful_cache()
        generator = torch.Generator("cpu").manual_seed(seed)
        frames = self.pipeline(prompt=prompt, generator=generator, output_type="np", **args).frames
        return np.asarray(frames[0], dtype=np.float32)

    def enable_sparse_attention(self, name: str, **config: Any) -> AttentionMethod:
        """Route the transformer's video self-attention to vgen method ``name``; returns the method."""
        return apply_sparse_attention(self.transformer, name, **config)

    def enable_parallelism(self, *, ulysses: int | None = None, ring: int = 1) -> None:
        """Spread each transformer over the ranks of torch.distributed's default group: Ulysses context
        parallelism through diffusers (default), ring attention run by vgen with ``ring=N`` (:mod:`vgen.ring`;
        video-only self-attention, block-sparse methods), or both (``ulysses * ring`` ranks); see
        :mod:`vgen.parallel`.
        Every rank runs the pipeline with the same arguments and gets the same video; only rank 0 should
        write it."""
        from vgen.parallel import enable_context_parallel

        for name in ("transformer", "transformer_2"):
            model = getattr(self.pipeline, name, None)
            if model is not None:
                enable_context_parallel(model, ulysses=ulysses, ring=ring)
        self._parallel_ranks = torch.distributed.get_world_size()

    def disable_sparse_attention(self) -> None:
        """Back to stock diffusers attention, exactly."""
        remove_sparse_attention(self.transformer)

    @property
    def attention_method(self) -> AttentionMethod | None:
        """The vgen method in use, or None for stock attention."""
        return sparse_attention_method(self.transformer)

    @staticmethod
    def save(video: np.ndarray, path: str | Path, fps: int = 16) -> Path:
        """Write ``video`` by the path's suffix: .mp4, .gif, or .png (a contact sheet)."""
        return save_video(video, path, fps=fps)

    def __repr__(self) -> str:
        method = self.attention_method
        return (
            f"VideoPipeline({type(self.pipeline).__name__}, transformer={type(self.transformer).__name__}, "
            f"attention={method.name if method else 'stock'}, device={self.device})"
        )
