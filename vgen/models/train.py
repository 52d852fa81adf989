"""Train the reference text-to-video model on procedural shapes clips; resumable and time-bounded.

::

    python -m vgen.models.train --out build/train --minutes 14 --device cuda    # one run of 14 minutes
    python -m vgen.models.train --out build/train --minutes 9.5 --vae-minutes 3 --dit-minutes 10.5 --device cuda
    python -m vgen.models.train --out /tmp/t --config tiny --device cpu           # a CPU smoke run
    python -m vgen.models.train --out build/more --from-model assets/reference/model --decoder-steps 0 \
        --minutes 17 --set size_cycle=[1,3] --set demo_batch=96 --set lr=3e-4     # continue a saved model

Stages, each resumed from ``OUT`` when the command is run again:

1. ``vae``: the ``AutoencoderKLWan`` learns to reconstruct random crops (``vae_frames`` x
   ``vae_size``^2 windows of 33 x 256 x 256 renders: the pixel scale it will encode) with L1 + L2
   on pixels plus a small KL term, through diffusers' own chunked causal ``encode`` / ``decode``.
   It then stays frozen.
1b. ``decoder``: the decoder alone (encoder frozen, so latents do not change) learns whole clips at
   both sizes. Stage 1's short crops leave the decoder's causal convolutions, which reach many
   latent frames back, unused to long clips: without this stage reconstructions lose quality
   frame by frame (``psnr_by_frame`` in the log shows it).
2. ``cache``: ``clips`` training clips per training size, and ``eval_clips`` held-out clips (eval
   captions), are rendered and encoded once (posterior means, bf16) into ``OUT/cache``; the
   per-channel ``latents_mean`` / ``latents_std`` over the training latents go into the VAE's config,
   which is how ``WanPipeline`` un-normalises latents before decoding. Each clip is seen about
   ``(dit steps x batch) / clips`` times, so encoding once pays as soon as that exceeds one.
3. ``dit``: the transformer and the text encoder learn together by flow matching, the objective
   that ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)`` inverts:
   ``s = shift * u / (1 + (shift - 1) * u)`` with ``u ~ U(0, 1)`` (the scheduler's own shift),
   ``x_s = (1 - s) x0 + s noise``, the model gets timestep ``1000 s`` and the prompt embeddings
   exactly as ``WanPipeline.encode_prompt`` makes them, and regresses the velocity ``noise - x0``.
   10% of captions are replaced by ``""`` (the pipeline's default negative prompt), which is what
   classifier-free guidance needs. Steps cycle between the training size and the small demo size
   (``size_cycle``; the demo batch holds more clips). AdamW, linear warm-up then cosine decay, gradient clipping,
   an EMA of the weights (kept if its held-out loss is lower).
4. ``final``: ``OUT/model`` (bf16 safetensors, no file over 15 MB), then held-out prompts are
   generated from that folder at both sizes and scored with :func:`vgen.data.score_video`.

Why the text encoder trains: the captions' meaning is in word order ("a red circle ... while a blue
square ..."), and a random frozen UMT5 carries order only through random relative-position biases;
training it costs under 1% of a step, and the empty-prompt embedding used for guidance is learned too.

Time: ``--minutes M`` bounds this invocation: stage 3 stops ``final_reserve_s`` before its end
(a stage cut short keeps its checkpoint and resumes when the command is run again; a cut stage 3
still writes ``OUT/model``). Step counts left unset are calibrated: a stage times its first steps
(synchronised), then fixes its step count so that its cosine schedule fills ``--vae-minutes`` /
``--dit-minutes`` of training (default: ``vae_share`` of ``--minutes`` for stage 1, the rest of
this invocation for stage 3); the count is stored, so a schedule can span several invocations
(the second example: two commands of under 10 minutes each). Given step counts are followed
exactly, and the run is then reproducible from ``--seed`` up to GPU non-determinism.

``--from-model DIR`` starts from a saved pipeline instead of random weights: stage 1 is skipped,
stages 1b and 3 continue its weights with fresh optimisers unless given 0 steps, and the run's log
keeps the earlier runs' logs (``history``) so that ``loss.png`` shows the whole training. The shipped
``assets/reference`` model and the commands that made it are described in ``assets/reference/README.md``.

Outputs: ``OUT/model/``, ``OUT/log.json`` (settings, losses, throughput, eval), ``OUT/loss.png``,
``OUT/samples-*.png`` (held-out prompts, one row per clip), ``OUT/checkpoints/``, ``OUT/cache/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanPipeline
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vgen.data import ShapesDataset, render, score_video
from vgen.models.reference import (
    ReferenceConfig,
    build_reference_pipeline,
    encode_prompts,
    folder_bytes,
    parameter_counts,
    reference_config,
    save_pipeline,
)

__all__ = ["TrainSettings", "default_settings", "flow_matching_loss", "main", "train"]

_MANY_CLIPS = 10**9  # procedural datasets are indexed lazily; this is just their nominal length
_STAGE_KEYS = {"vae": 1, "dit": 2, "val": 3, "crop": 4, "decoder": 5}


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "str | None": (str, type(None)),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "int | None": (int, type(None)),
    "float | None": (int, float, type(None)),
    "tuple[int, int]": (tuple,),
    "tuple[float, float]": (tuple,),
    "tuple[tuple[int, int], ...]": (tuple, list),  # position_prior_at: checked on its own below
}


@dataclass
class TrainSettings:
    """Everything a training run depends on besides the :class:`ReferenceConfig`.

    Args:
        config: name of the :class:`ReferenceConfig` (``"reference"`` or ``"tiny"``).
        seed: seeds the initial weights, the data and every step's noise.
        device: ``"cuda"`` or ``"cpu"``; bf16 autocast on CUDA, float32 on CPU.
        minutes: wall-clock bound for this invocation (None: none).
        workers: DataLoader processes that render clips (0: in the main process).
        compile: ``torch.compile`` the transformer's blocks (optional; off by default).
        vae_steps: stage-1 steps (None: calibrated to ``vae_minutes``).
        vae_minutes: stage-1 training time that calibrated steps fill (None: ``vae_share`` x ``minutes``).
        vae_batch: stage-1 crops per step.
        vae_frames, vae_size: stage-1 crop: consecutive frames (``1 + 4k``), square side in pixels.
        vae_lr, vae_kl_weight: stage-1 peak learning rate and KL weight (per latent element,
            against mean per-pixel L1 + L2).
        vae_share: fraction of ``minutes`` for stage 1.
        vae_eval_clips: held-out full-size clips for the reconstruction PSNR.
        decoder_steps: stage-1b steps (None: calibrated to ``decoder_minutes``; 0: skip the stage).
        decoder_minutes: stage-1b training time that calibrated steps fill.
        decoder_batch, decoder_demo_batch: stage-1b whole clips per step at the training and the demo
            size (the steps alternate between the two sizes).
        decoder_lr: stage-1b peak learning rate.
        from_model: a saved pipeline folder to start from instead of random weights: stage 1 is
            skipped, stages 1b and 3 continue its weights (fresh optimisers) unless their steps are 0,
            and the latent normalisation stays the model's.
        clips: training clips encoded at the training size (stage 2).
        demo_clips: training clips encoded at the demo size (None: ``clips``); demo-size clips
            encode about 4x faster and are seen in larger batches, so a run that spends most steps
            on them wants more of them.
        two_shape_share: fraction of the stage-2 training clips with two objects (None: the
            generator's even odds); the held-out clips keep the generator's mix.
        clip_seed: seed of the stage-2 training clips (None: ``seed``); a continuation can draw
            fresh clips while its held-out clips, and so its validation loss, stay those of earlier runs.
        eval_clips: held-out clips encoded for the validation loss.
        shard_clips: clips per cache file.
        cache_batch: clips per encoder call.
        dit_steps: stage-3 steps (None: calibrated to ``dit_minutes``).
        dit_minutes: stage-3 training time that calibrated steps fill (None: the rest of ``minutes``).
        batch: stage-3 clips per step at the training size.
        lr, weight_decay, betas, warmup, grad_clip: AdamW and schedule (cosine to ``lr_floor`` x lr).
        lr_floor: final learning rate as a fraction of the peak, for both stages.
        caption_dropout: fraction of captions replaced by the empty prompt.
        first_frame_weight: stage-3 loss weight of the first latent frame against 1 for the others
            (:func:`flow_matching_loss`); the held-out loss stays unweighted.
        position_prior: added, when stage 3 starts afresh (not from its checkpoint), to the text encoder's
            relative-position bias (:func:`add_position_prior`), which weight decay then leaves alone; 0: off.
            Without it the encoder trained blind to word order (``scripts/text_encoder_order.py``). It adds to
            the weights it finds: a continuation that sets it again at the same pairs doubles those priors.
        position_prior_at: the (head, relative position) pairs that get ``position_prior``; the default is run 7's
            (head 0 at -1, head 1 at +1); run 8 added ``[[2, 2], [3, -2]]`` to run 7's, and run 9 added 50 more at
            all four, ``[[0, -1], [1, 1], [2, 2], [3, -2]]``.
        ema_decay: EMA decay of the stage-3 weights (0: no EMA).
        size_cycle: stage-3 steps at the training size, then at the demo size, per cycle (``(1, 1)``
            alternates; ``(1, 3)`` spends most steps on the cheap demo size; ``(1, 0)``: no demo size).
        demo_batch: clips per demo-size step (the reference's 32 x 1,280 tokens ~ half of 8 x 9,216).
        checkpoint_every, log_every, eval_every: in steps (eval: held-out loss).
        calibration_steps: (warm-up, timed) steps used to calibrate step counts and measure throughput.
        samples: held-out prompts generated per size at the end (0: skip).
        sample_steps: denoising steps for those at the training size (the demo size takes the config's).
        final_reserve_s: seconds kept for saving and sampling at the end of a time-bounded run.
    """

    config: str = "reference"
    seed: int = 0
    device: str = "cuda"
    minutes: float | None = None
    workers: int = 12
    compile: bool = False
    vae_steps: int | None = 2000
    vae_minutes: float | None = None
    vae_batch: int = 32
    vae_frames: int = 9
    vae_size: int = 128
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_share: float = 0.3
    vae_eval_clips: int = 4
    decoder_steps: int | None = 1000
    decoder_minutes: float | None = None
    decoder_batch: int = 2
    decoder_demo_batch: int = 8
    decoder_lr: float = 5e-4
    from_model: str | None = None
    clips: int = 6144
    demo_clips: int | None = None
    two_shape_share: float | None = None
    clip_seed: int | None = None
    eval_clips: int = 64
    shard_clips: int = 512
    cache_batch: int = 8
    dit_steps: int | None = 4000
    dit_minutes: float | None = None
    batch: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup: int = 100
    grad_clip: float = 1.0
    lr_floor: float = 0.1
    caption_dropout: float = 0.1
    first_frame_weight: float = 1.0
    position_prior: float = 0.0
    position_prior_at: tuple[tuple[int, int], ...] = ((0, -1), (1, 1))
    ema_decay: float = 0.999
    size_cycle: tuple[int, int] = (1, 1)
    demo_batch: int = 32
    checkpoint_every: int = 400
    log_every: int = 10
    eval_every: int = 250
    calibration_steps: tuple[int, int] = (4, 16)
    samples: int = 20
    sample_steps: int = 30
    final_reserve_s: float = 45.0

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        for setting in dataclasses.fields(self):
            value, kinds = getattr(self, setting.name), _FIELD_TYPES[setting.type]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"{setting.name} must be {setting.type}, got {value!r}")
            if setting.type in ("tuple[int, int]", "tuple[float, float]") and (
                    len(value) != 2 or not all(isinstance(v, int | float) for v in value)):
                raise ValueError(f"{setting.name} must be {setting.type}, got {value!r}")
        reference_config(self.config)
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
        for name in ("minutes", "vae_minutes", "dit_minutes", "decoder_minutes"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for stage in ("vae", "dit", "decoder"):
            steps = getattr(self, f"{stage}_steps")
            if steps is None and self.minutes is None and getattr(self, f"{stage}_minutes") is None:
                raise ValueError(
                    f"{stage}_steps may only be left unset (calibrated) when minutes or {stage}_minutes is set"
                )
            if steps is not None and steps < 0:
                raise ValueError(f"{stage}_steps must be an int >= 0, got {steps!r}")
        positive = ("vae_batch", "vae_frames", "vae_size", "clips", "eval_clips", "shard_clips", "cache_batch", "batch")
        positive += ("decoder_batch", "decoder_demo_batch")
        positive += ("checkpoint_every", "log_every", "eval_every", "vae_eval_clips", "sample_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("seed", "workers", "warmup", "demo_batch", "samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        config = reference_config(self.config)
        if (self.vae_frames - 1) % config.temporal_factor or self.vae_frames > config.num_frames:
            raise ValueError(
                f"vae_frames must be 1 + a multiple of {config.temporal_factor} and at most {config.num_frames}, "
                f"got {self.vae_frames}"
            )
        if self.vae_size % config.spatial_factor or self.vae_size > min(config.height, config.width):
            raise ValueError(
                f"vae_size must be a multiple of {config.spatial_factor} and at most "
                f"{min(config.height, config.width)}, got {self.vae_size}"
            )
        for name in ("caption_dropout", "ema_decay", "vae_share"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.lr_floor <= 1.0:
            raise ValueError(f"lr_floor must be in [0, 1], got {self.lr_floor!r}")
        if self.demo_clips is not None and self.demo_clips < 1:
            raise ValueError(f"demo_clips must be a positive int or None, got {self.demo_clips!r}")
        if not self.first_frame_weight > 0:
            raise ValueError(f"first_frame_weight must be > 0, got {self.first_frame_weight!r}")
        if not (isinstance(self.position_prior, int | float) and 0.0 <= self.position_prior < math.inf):
            raise ValueError(f"position_prior must be a finite number >= 0, got {self.position_prior!r}")
        pairs = self.position_prior_at
        if not (isinstance(pairs, list | tuple) and pairs):
            raise ValueError(f"position_prior_at must be (head >= 0, nonzero offset) pairs, got {pairs!r}")
        heads = buckets = None
        if self.position_prior:  # the encoder's heads and exact buckets (UMT5's 32: offsets up to 7)
            from transformers import UMT5Config

            heads, buckets = reference_config(self.config).text_heads, UMT5Config().relative_attention_num_buckets
        self.position_prior_at = _prior_pairs(pairs, "position_prior_at", heads, buckets or 0,
                                              f" for config {self.config!r}")
        if len(set(self.position_prior_at)) != len(pairs):
            raise ValueError(f"position_prior_at repeats a pair (it would add the prior twice): {pairs!r}")
        if self.two_shape_share is not None and not 0.0 <= self.two_shape_share <= 1.0:
            raise ValueError(f"two_shape_share must be None or in [0, 1], got {self.two_shape_share!r}")
        if not all(isinstance(n, int) and n >= 0 for n in self.size_cycle) or self.size_cycle[0] < 1:
            raise ValueError(
                f"size_cycle must be (training-size steps >= 1, demo-size steps >= 0), got {self.size_cycle!r}"
            )
        if self.from_model is not None and not (Path(self.from_model) / "model_index.json").is_file():
            raise ValueError(
                f"from_model must be a saved pipeline folder (with model_index.json), got {self.from_model!r}"
            )
        for name in ("lr", "vae_lr", "decoder_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        warm, timed = self.calibration_steps
        if warm < 0 or timed < 1:
            raise ValueError(f"calibration_steps must be (warm >= 0, timed >= 1), got {self.calibration_steps!r}")


_TINY_SETTINGS = {
    "config": "tiny",
    "workers": 0,
    "vae_steps": 3,
    "vae_batch": 2,
    "vae_frames": 5,
    "vae_size": 16,
    "vae_lr": 1e-3,
    "vae_eval_clips": 1,
    "decoder_steps": 2,
    "decoder_batch": 1,
    "decoder_demo_batch": 2,
    "clips": 4,
    "eval_clips": 2,
    "shard_clips": 2,
    "cache_batch": 2,
    "dit_steps": 3,
    "batch": 2,
    "lr": 1e-3,
    "warmup": 1,
    "size_cycle": (1, 1),
    "demo_batch": 4,
    "checkpoint_every": 2,
    "log_every": 1,
    "eval_every": 2,
    "calibration_steps": (1, 1),
    "samples": 2,
    "sample_steps": 2,
    "final_reserve_s": 5.0,
}


def default_settings(config: str = "reference", **overrides: Any) -> TrainSettings:
    """Settings that suit ``config`` (the tiny one trains a few steps on tiny clips), then ``overrides``."""
    reference_config(config)
    base = dict(_TINY_SETTINGS) if config == "tiny" else {"config": config}
    base["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainSettings)}
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    return TrainSettings(**{**base, **overrides})


# --------------------------------------------------------------------------------------------- data


class _Clips(Dataset):
    """Item ``i``: clip ``i`` of ``shapes`` as uint8 ``[3, F, H, W]`` and its caption; optionally a random window."""

    def __init__(self, shapes: ShapesDataset, crop: tuple[int, int] | None = None, seed: int = 0) -> None:
        self.shapes, self.crop, self.seed = shapes, crop, seed

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        clip = self.shapes.clip(index)
        video = render(clip)  # [F, H, W, 3]
        if self.crop is not None:
            frames, size = self.crop
            rng = np.random.default_rng([self.seed, _STAGE_KEYS["crop"], index])
            f0 = int(rng.integers(0, clip.frames - frames + 1))
            y0, x0 = (int(v) for v in rng.integers(0, (clip.height - size + 1, clip.width - size + 1)))
            video = video[f0 : f0 + frames, y0 : y0 + size, x0 : x0 + size]
        return torch.from_numpy(np.ascontiguousarray(video.transpose(3, 0, 1, 2))), clip.caption


def _one_render_thread(_: int) -> None:
    cv2.setNumThreads(1)  # each DataLoader process renders one clip at a time


def _loader(dataset: Dataset, indices: range, batch: int, settings: TrainSettings) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=indices,
        num_workers=settings.workers,
        pin_memory=settings.device == "cuda",
        worker_init_fn=_one_render_thread,
        prefetch_factor=4 if settings.workers else None,
    )


def _pixels(video: torch.Tensor, device: str) -> torch.Tensor:
    """uint8 ``[B, 3, F, H, W]`` -> float32 in [-1, 1] on ``device``."""
    return video.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------- helpers


def _seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _generator(device: str, seed: int, *keys: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(_seed(seed, *keys))


def _autocast(device: str) -> AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _lr(step: int, total: int | None, peak: float, warmup: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` to ``floor * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total is None:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, Any] | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def _size_name(size: Sequence[int]) -> str:
    return "x".join(str(v) for v in size)


class _Clock:
    """Step counting against a deadline, with an optional calibrated step count.

    The ``warm`` steps after the start are untimed (allocator, autotuning, compilation), the next
    ``timed`` steps are synchronised and timed per key; then, if no total was given, the total is set
    so that the remaining steps end at ``schedule_end`` (``time.monotonic()`` seconds). ``deadline``
    is the hard stop.
    """

    def __init__(
        self,
        start: int,
        total: int | None,
        deadline: float,
        schedule_end: float,
        calibration: tuple[int, int],
        device: str,
    ) -> None:
        self.step, self.total, self.deadline, self.schedule_end = start, total, deadline, schedule_end
        self.device = device
        self.warm_end = start + calibration[0]
        self.timed_end = self.warm_end + calibration[1]
        self.times: dict[str, list[float]] = {}
        self._t = 0.0

    @property
    def timing(self) -> bool:
        return self.warm_end <= self.step < self.timed_end

    def done(self) -> str | None:
        """Why the stage should stop now (``"steps"`` or ``"time"``), or None."""
        if self.total is not None and self.step >= self.total:
            return "steps"
        if time.monotonic() >= self.deadline:
            return "time"
        return None

    def begin(self) -> None:
        if self.timing:
            _sync(self.device)
            self._t = time.perf_counter()

    def end(self, key: str) -> None:
        if self.timing:
            _sync(self.device)
            self.times.setdefault(key, []).append(time.perf_counter() - self._t)
        self.step += 1
        if self.total is None and self.step == self.timed_end:
            per_step = sum(sum(v) for v in self.times.values()) / sum(len(v) for v in self.times.values())
            self.total = self.step + max(1, int(0.97 * (self.schedule_end - time.monotonic()) / per_step))

    def step_seconds(self) -> dict[str, float]:
        return {key: sum(v) / len(v) for key, v in self.times.items()}


def _update(loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, clip: float) -> None:
    """One optimiser step on ``loss`` with gradient-norm clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()


class _LossLog:
    """Running training loss of a stage: every ``log_every`` steps its mean goes into ``entry["loss"]``
    and the progress bar (one host sync per ``log_every`` steps); a non-finite mean stops the run."""

    def __init__(self, stage: str, entry: dict[str, Any], bar: tqdm, every: int) -> None:
        self.stage, self.entry, self.bar, self.every = stage, entry, bar, every
        self.running: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, clock: _Clock, lr: float) -> None:
        self.running.append(loss.detach())
        self.bar.total = clock.total
        self.bar.update()
        if clock.step % self.every == 0:
            value = torch.stack(self.running).mean().item()
            if not math.isfinite(value):
                raise FloatingPointError(f"{self.stage} loss is {value} at step {clock.step}")
            self.entry["loss"].append([clock.step, value])
            self.bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            self.running = []


# ---------------------------------------------------------------------------------------- stage 1


def _train_vae(
    vae: AutoencoderKLWan,
    config: ReferenceConfig,
    settings: TrainSettings,
    out: Path,
    deadline: float,
    schedule_end: float,
    log: dict[str, Any],
) -> bool:
    """Stage 1: train ``vae`` in place (resuming from OUT/checkpoints/vae.pt); leave it frozen on the device.

    Returns:
        Whether the stage is complete (else the deadline cut it; its checkpoint resumes it).
    """
    device, path = settings.device, out / "checkpoints" / "vae.pt"
    state = _load(path)
    entry = log.setdefault("vae", {"loss": []})
    if state is not None:
        vae.load_state_dict(state["model"])
        entry.update(state["log"])
    vae.to(device)
    if state is not None and state["done"]:
        vae.eval().requires_grad_(False)
        return True
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, betas=settings.betas, weight_decay=0.0)
    start, total = 0, settings.vae_steps
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        total = settings.vae_steps if settings.vae_steps is not None else state["total_steps"]
    clock = _Clock(start, total, deadline, schedule_end, settings.calibration_steps, device)
    shapes = ShapesDataset(_MANY_CLIPS, config.num_frames, config.height, config.width, seed=settings.seed + 2)
    dataset = _Clips(shapes, crop=(settings.vae_frames, settings.vae_size), seed=settings.seed)
    batch = settings.vae_batch
    loader = _loader(dataset, range(start * batch, _MANY_CLIPS), batch, settings)

    def save(done: bool) -> None:
        entry.update(steps=clock.step, total_steps=clock.total, step_seconds=clock.step_seconds())
        state = {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": clock.step}
        _save_atomic({**state, "total_steps": clock.total, "done": done, "log": entry}, path)

    began = time.monotonic()
    bar = tqdm(total=total, initial=start, desc="stage 1 vae", dynamic_ncols=True, mininterval=1.0)
    losses = _LossLog("stage 1", entry, bar, settings.log_every)
    stopped = clock.done()
    for video, _ in loader:
        if stopped:
            break
        x = _pixels(video, device)
        lr = _lr(clock.step, clock.total, settings.vae_lr, settings.warmup, settings.lr_floor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        clock.begin()
        with _autocast(device):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=_generator(device, settings.seed, _STAGE_KEYS["vae"], clock.step))
            reconstruction = vae.decode(z).sample.float()
        error = reconstruction - x
        kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
        loss = error.abs().mean() + error.square().mean() + settings.vae_kl_weight * kl
        _update(loss, optimizer, vae.parameters(), settings.grad_clip)
        clock.end("vae")
        losses.add(loss, clock, lr)
        stopped = clock.done()
        if clock.step % settings.checkpoint_every == 0 and not stopped:
            save(done=False)
    bar.close()
    seconds = time.monotonic() - began
    entry["stopped_by"] = stopped or "steps"
    entry["seconds"] = entry.get("seconds", 0.0) + seconds
    if "vae" in clock.step_seconds():
        entry["crops_per_second"] = batch / clock.step_seconds()["vae"]
    vae.eval().requires_grad_(False)
    if stopped == "time":
        save(done=False)
        return False
    entry.update(_vae_psnr(vae, config, settings))
    save(done=True)
    print(f"stage 1 vae: {clock.step} steps, held-out PSNR {entry['psnr']:.2f} dB at full size", file=sys.stderr)
    return True


@torch.no_grad()
def _vae_psnr(vae: AutoencoderKLWan, config: ReferenceConfig, settings: TrainSettings) -> dict[str, Any]:
    """Reconstruction PSNR (dB, pixels in [0, 1]) of held-out clips at the full training size.

    Returns:
        ``psnr`` (mean over clips) and ``psnr_by_frame`` (per frame, mean over clips): a causal VAE
        that has not learnt long clips loses quality frame by frame.
    """
    shapes = ShapesDataset(
        settings.vae_eval_clips, config.num_frames, config.height, config.width, seed=settings.seed, split="eval"
    )
    values, by_frame = [], []
    for i in range(len(shapes)):
        x = _pixels(_Clips(shapes)[i][0][None], settings.device)
        with _autocast(settings.device):
            reconstruction = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
        mse = ((reconstruction - x) / 2).square().mean(dim=(0, 1, 3, 4)).clamp_min(1e-10)  # [F]
        values.append(-10 * math.log10(mse.mean().item()))
        by_frame.append(-10 * torch.log10(mse))
    return {"psnr": sum(values) / len(values), "psnr_by_frame": torch.stack(by_frame).mean(0).tolist()}


def _train_decoder(
    vae: AutoencoderKLWan,
    config: ReferenceConfig,
    settings: TrainSettings,
    out: Path,
    deadline: float,
    schedule_end: float,
    log: dict[str, Any],
) -> bool:
    """Stage 1b: the decoder (and ``post_quant_conv``) learns whole clips; the encoder stays frozen.

    Stage 1 sees short crops, but the decoder's causal convolutions reach many latent frames back, so
    it has to see clips as long as it will decode. The encoder is not touched, so latents (and a
    transformer trained on them) stay valid. Steps alternate between the training and the demo size;
    the loss is L1 + L2 of the decoded posterior means. Resumes from OUT/checkpoints/decoder.pt.

    Returns:
        Whether the stage is complete (else the deadline cut it; its checkpoint resumes it).
    """
    device, path = settings.device, out / "checkpoints" / "decoder.pt"
    state = _load(path)
    entry = log.setdefault("decoder", {"loss": []})
    trained = [vae.decoder, vae.post_quant_conv]
    if state is not None:
        vae.load_state_dict(state["model"])
        entry.update(state["log"])
    vae.to(device).eval().requires_grad_(False)
    if settings.decoder_steps == 0 or (state is not None and state["done"]):
        return True
    params = [p for module in trained for p in module.parameters()]
    for module in trained:
        module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.decoder_lr, betas=settings.betas, weight_decay=0.0)
    start, total = 0, settings.decoder_steps
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        total = settings.decoder_steps if settings.decoder_steps is not None else state["total_steps"]
    clock = _Clock(start, total, deadline, schedule_end, settings.calibration_steps, device)
    sizes = {
        "train": (config.clip_size, settings.decoder_batch),
        "demo": (config.demo_size, settings.decoder_demo_batch),
    }
    loaders = {}
    for i, (name, (size, batch)) in enumerate(sizes.items()):
        shapes = ShapesDataset(_MANY_CLIPS, *size, seed=settings.seed + 10 + i)
        first = (start + 1 - i) // 2 * batch  # steps alternate: even steps train size, odd steps demo size
        loaders[name] = iter(_loader(_Clips(shapes), range(first, _MANY_CLIPS), batch, settings))

    def save(done: bool) -> None:
        entry.update(steps=clock.step, total_steps=clock.total, step_seconds=clock.step_seconds())
        state = {"model": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": clock.step}
        _save_atomic({**state, "total_steps": clock.total, "done": done, "log": entry}, path)

    began = time.monotonic()
    bar = tqdm(total=total, initial=start, desc="stage 1b decoder", dynamic_ncols=True, mininterval=1.0)
    losses = _LossLog("stage 1b", entry, bar, settings.log_every)
    stopped = clock.done()
    while not stopped:
        name = "train" if clock.step % 2 == 0 else "demo"
        video, _ = next(loaders[name])
        x = _pixels(video, device)
        lr = _lr(clock.step, clock.total, settings.decoder_lr, settings.warmup, settings.lr_floor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        clock.begin()
        with _autocast(device):
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mode()
            reconstruction = vae.decode(z).sample.float()
        error = reconstruction - x
        loss = error.abs().mean() + error.square().mean()
        _update(loss, optimizer, params, settings.grad_clip)
        clock.end(name)
        losses.add(loss, clock, lr)
        stopped = clock.done()
        if clock.step % settings.checkpoint_every == 0 and not stopped:
            save(done=False)
    bar.close()
    entry["stopped_by"] = stopped
    entry["seconds"] = entry.get("seconds", 0.0) + time.monotonic() - began
    vae.eval().requires_grad_(False)
    if stopped == "time":
        save(done=False)
        return False
    entry.update(_vae_psnr(vae, config, settings))
    save(done=True)
    print(f"stage 1b decoder: {clock.step} steps, held-out PSNR {entry['psnr']:.2f} dB at full size", file=sys.stderr)
    return True


# ---------------------------------------------------------------------------------------- stage 2


@dataclass
class _Latents:
    """Encoded clips of one size: ``latents`` bf16 ``[N, C, T, H, W]`` (raw posterior means) and captions."""

    latents: torch.Tensor
    captions: list[str] = field(default_factory=list)


@torch.no_grad()
def _encode_clips(
    vae: AutoencoderKLWan, shapes: ShapesDataset, folder: Path, settings: TrainSettings, desc: str
) -> _Latents:
    """Encode every clip of ``shapes`` into shard files under ``folder`` (kept ones reused); load them all."""
    count, per_shard = len(shapes), settings.shard_clips
    shards = [folder / f"{i:05d}.pt" for i in range(-(-count // per_shard))]
    first_missing = next((i for i, shard in enumerate(shards) if not shard.is_file()), len(shards))
    if first_missing < len(shards):
        batch = math.gcd(settings.cache_batch, per_shard)
        loader = _loader(_Clips(shapes), range(first_missing * per_shard, count), batch, settings)
        bar = tqdm(total=count, initial=first_missing * per_shard, desc=desc, dynamic_ncols=True, mininterval=1.0)
        latents, captions, shard = [], [], first_missing
        for video, caption in loader:
            with _autocast(settings.device):
                mean = vae.encode(_pixels(video, settings.device)).latent_dist.mean
            latents.append(mean.to(torch.bfloat16).cpu())
            captions.extend(caption)
            bar.update(len(caption))
            if len(captions) == min(per_shard, count - shard * per_shard):
                _save_atomic({"latents": torch.cat(latents), "captions": captions}, shards[shard])
                latents, captions, shard = [], [], shard + 1
        bar.close()
    parts = [_load(shard) for shard in shards]
    return _Latents(torch.cat([p["latents"] for p in parts]), [c for p in parts for c in p["captions"]])


def _cache(
    vae: AutoencoderKLWan, config: ReferenceConfig, settings: TrainSettings, out: Path, log: dict[str, Any]
) -> tuple[dict[tuple[int, int, int], _Latents], _Latents, torch.Tensor, torch.Tensor]:
    """Stage 2: the encoded training clips per size, the held-out clips, and the latents' mean and std ``[C]``."""
    began = time.monotonic()
    train_sizes = [config.clip_size, config.demo_size] if settings.size_cycle[1] else [config.clip_size]
    root = out / "cache"
    data = {}
    for i, size in enumerate(train_sizes):
        count = settings.clips if i == 0 or settings.demo_clips is None else settings.demo_clips
        clip_seed = settings.seed if settings.clip_seed is None else settings.clip_seed
        shapes = ShapesDataset(count, *size, seed=clip_seed + i, two_shape_share=settings.two_shape_share)
        data[size] = _encode_clips(vae, shapes, root / f"train-{_size_name(size)}", settings, f"stage 2 cache {size}")
    shapes = ShapesDataset(settings.eval_clips, *train_sizes[0], seed=settings.seed, split="eval")
    held_out = _encode_clips(vae, shapes, root / f"eval-{_size_name(train_sizes[0])}", settings, "stage 2 eval")
    stats_file = root / "stats.json"
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text())
    elif settings.from_model is not None:  # the transformer learnt the model's normalisation: keep it
        stats = {"latents_mean": list(vae.config.latents_mean), "latents_std": list(vae.config.latents_std)}
        stats_file.write_text(json.dumps(stats))
    else:
        main = data[train_sizes[0]].latents
        total = torch.zeros(config.z_dim, dtype=torch.float64, device=settings.device)
        squares = torch.zeros_like(total)
        for chunk in main.split(64):
            chunk = chunk.to(settings.device).double().transpose(0, 1).flatten(1)  # [C, n]
            total += chunk.sum(1)
            squares += chunk.square().sum(1)
        n = main.numel() // config.z_dim
        mean = total / n
        std = (squares / n - mean.square()).clamp_min(1e-12).sqrt()
        stats = {"latents_mean": mean.cpu().tolist(), "latents_std": std.cpu().tolist()}
        stats_file.write_text(json.dumps(stats))
    entry = log.setdefault("cache", {})
    entry.update(stats)
    entry["clips"] = {_size_name(s): len(d.captions) for s, d in data.items()} | {"eval": len(held_out.captions)}
    entry["seconds"] = entry.get("seconds", 0.0) + time.monotonic() - began
    vae.register_to_config(**stats)
    mean = torch.tensor(stats["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(stats["latents_std"]).view(1, -1, 1, 1, 1)
    return data, held_out, mean, std


# ---------------------------------------------------------------------------------------- stage 3


def flow_matching_loss(
    transformer: torch.nn.Module,
    x0: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    flow_shift: float,
    generator: torch.Generator | None = None,
    u: torch.Tensor | None = None,
    first_frame_weight: float = 1.0,
) -> torch.Tensor:
    """The rectified-flow loss that Wan's flow-prediction schedulers invert.

    Noise level ``s = shift * u / (1 + (shift - 1) * u)`` (``u ~ U(0, 1)`` per clip unless given),
    input ``x_s = (1 - s) x0 + s noise`` at timestep ``1000 s``, target velocity ``noise - x0``:
    a sampler then recovers ``x0 = x_s - s * velocity`` (``UniPCMultistepScheduler`` with
    ``prediction_type="flow_prediction"``, ``FlowMatchEulerDiscreteScheduler``).

    Args:
        transformer: a ``WanTransformer3DModel`` (or anything with its call signature).
        x0: normalised latents ``[B, C, T, H, W]``.
        encoder_hidden_states: prompt embeddings ``[B, L, D]``.
        flow_shift: the scheduler's shift.
        generator: for ``u`` and the noise.
        u: ``[B]`` in [0, 1], to fix the noise levels (e.g. for a held-out loss).
        first_frame_weight: weight of the first latent frame's squared errors against 1 for the others
            (the weights' mean normalises the loss). The Wan VAE encodes the first pixel frame alone into
            that latent frame, whose latents spread far less than the others': its errors are small
            in the plain mean, and the model learns that frame last.

    Returns:
        The (weighted) mean squared error, float32 scalar.
    """
    if u is None:
        u = torch.rand(x0.shape[0], device=x0.device, generator=generator)
    sigma = flow_shift * u / (1 + (flow_shift - 1) * u)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    s = sigma.view(-1, 1, 1, 1, 1)
    velocity = transformer(
        hidden_states=(1 - s) * x0 + s * noise,
        timestep=sigma * 1000,
        encoder_hidden_states=encoder_hidden_states,
        return_dict=False,
    )[0]
    if first_frame_weight == 1.0:
        return F.mse_loss(velocity.float(), noise - x0)
    weights = torch.ones(x0.shape[2], device=x0.device)
    weights[0] = first_frame_weight
    error = (velocity.float() - (noise - x0)).square().mean(dim=(0, 1, 3, 4))  # [T]
    return (weights * error).sum() / weights.sum()


class _Denoiser(torch.nn.Module):
    """The trained part of the pipeline: text encoder and transformer, one flow-matching loss."""

    def __init__(self, pipe: WanPipeline, config: ReferenceConfig) -> None:
        super().__init__()
        self.text_encoder, self.transformer = pipe.text_encoder, pipe.transformer
        self.tokenizer, self.config = pipe.tokenizer, config

    def loss(
        self, x0: torch.Tensor, captions: Sequence[str], generator: torch.Generator, u: torch.Tensor | None = None,
        first_frame_weight: float = 1.0,
    ) -> torch.Tensor:  # fmt: skip
        """:func:`flow_matching_loss` of the transformer, conditioned on ``captions``."""
        embeddings = encode_prompts(self.tokenizer, self.text_encoder, captions, self.config.max_sequence_length)
        return flow_matching_loss(self.transformer, x0, embeddings, flow_shift=self.config.flow_shift,
                                  generator=generator, u=u, first_frame_weight=first_frame_weight)  # fmt: skip


def _prior_pairs(
    pairs: Sequence[Sequence[int]], name: str, heads: int | None = None, buckets: int = 0, where: str = ""
) -> tuple[tuple[int, int], ...]:
    """``pairs`` as (head, offset) tuples of ints, head >= 0 and offset != 0, and, given the encoder's ``heads``
    and relative-position ``buckets``, a head it has and an exact T5 bucket (1 <= |offset| < buckets // 4); a
    ValueError naming ``name`` (and ``where``) else."""
    for pair in pairs:
        if not (isinstance(pair, list | tuple) and len(pair) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in pair) and pair[0] >= 0 and pair[1]):
            raise ValueError(f"{name} must be (head >= 0, nonzero offset) pairs of ints, got {pair!r} in {pairs!r}")
        if heads is not None and (pair[0] >= heads or abs(pair[1]) >= buckets // 4):
            raise ValueError(f"{name} pair {tuple(pair)} out of range{where}: heads 0..{heads - 1}, offsets "
                             f"1 <= |offset| < {buckets // 4}")
    return tuple((head, offset) for head, offset in pairs)


def add_position_prior(
    text_encoder: torch.nn.Module, prior: float, at: Sequence[Sequence[int]] = ((0, -1), (1, 1))
) -> None:
    """Add ``prior`` to the relative-position bias of every layer of a (U)MT5 encoder, for each (head, offset) in
    ``at``: by default head 0 at relative position -1 (each word toward the one before it) and head 1 at +1 (toward
    the one after). The reference encoder's attention is one-hot by content (T5 does not scale its logits) and its
    trained bias had a std of 0.06, so two captions with the same words in another order gave the same per-word
    outputs; a prior near the content logits (50 moves the shared words' outputs by 5-36%) makes a word's output
    depend on its neighbours. Offsets are exact T5 buckets: 1 <= |offset| < buckets // 4.

    Raises:
        ValueError: the encoder has no relative-position bias, or a head or offset it cannot take.
    """
    biases = [m.weight for n, m in text_encoder.named_modules() if n.endswith("relative_attention_bias")]
    if not biases:
        raise ValueError("add_position_prior needs a T5-style encoder with relative-position biases")
    buckets, heads = biases[0].shape  # bidirectional T5 buckets: -d -> d, +d -> buckets // 2 + d while d is exact
    at = _prior_pairs(at, "position prior", heads, buckets)
    with torch.no_grad():
        for weight in biases:
            for head, offset in at:
                weight[buckets // 2 + offset if offset > 0 else -offset, head] += prior


class _Ema:
    """Exponential moving average of parameters (float32), with the usual ``(1 + n) / (10 + n)`` warm-up."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call again to undo)."""
        for p, s in zip(self.params, self.shadow, strict=True):
            live = p.detach().clone()
            p.copy_(s)
            s.copy_(live)


@torch.no_grad()
def _held_out_loss(
    model: _Denoiser, held_out: _Latents, mean: torch.Tensor, std: torch.Tensor, settings: TrainSettings
) -> float:
    """Flow-matching loss on the held-out clips at fixed noise and evenly spread noise levels."""
    training = model.training
    model.eval()
    total, n = 0.0, len(held_out.captions)
    for start in range(0, n, settings.batch):
        stop = min(n, start + settings.batch)
        x0 = (held_out.latents[start:stop].float() - mean) / std
        u = (torch.arange(start, stop, device=x0.device, dtype=torch.float32) + 0.5) / n
        generator = _generator(settings.device, settings.seed, _STAGE_KEYS["val"], start)
        with _autocast(settings.device):
            total += model.loss(x0, held_out.captions[start:stop], generator, u=u).item() * (stop - start)
    model.train(training)
    return total / n


def _train_dit(
    pipe: WanPipeline,
    config: ReferenceConfig,
    settings: TrainSettings,
    out: Path,
    deadline: float,
    schedule_end: float,
    cache: tuple[dict[tuple[int, int, int], _Latents], _Latents, torch.Tensor, torch.Tensor],
    log: dict[str, Any],
) -> None:
    """Stage 3: train text encoder + transformer in place; they end with the weights to ship (EMA or live)."""
    device, path = settings.device, out / "checkpoints" / "dit.pt"
    data, held_out, mean, std = cache
    model = _Denoiser(pipe, config)
    state = _load(path)
    entry = log.setdefault("dit", {"loss": [], "held_out_loss": []})
    if state is not None:
        model.load_state_dict(state["model"])
        entry.update(state["log"])
    elif settings.position_prior:
        add_position_prior(model.text_encoder, settings.position_prior, settings.position_prior_at)
        entry["position_prior"] = settings.position_prior
        entry["position_prior_at"] = [list(pair) for pair in settings.position_prior_at]
    model.to(device).train().requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    def decays(name: str, p: torch.nn.Parameter) -> bool:  # matrices; with a position prior, not its biases
        return p.ndim >= 2 and not (settings.position_prior and "relative_attention_bias" in name)

    groups = [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": settings.weight_decay},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas)
    ema = _Ema(params, settings.ema_decay) if settings.ema_decay else None
    start, total = 0, settings.dit_steps
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state["ema"] is not None:
            ema.shadow = [s.to(device) for s in state["ema"]]
        start = state["step"]
        total = settings.dit_steps if settings.dit_steps is not None else state["total_steps"]
    if total is not None and start >= total:
        _choose_weights(model, ema, held_out, mean, std, settings, entry)
        return
    if settings.compile:
        model.transformer.compile_repeated_blocks()

    main_size, demo_size = config.clip_size, config.demo_size
    cycle = [main_size] * settings.size_cycle[0] + [demo_size] * settings.size_cycle[1]
    batches = {main_size: settings.batch, demo_size: settings.demo_batch}
    on_device = {s: data[s].latents.to(device) for s in set(cycle)}
    held_out = _Latents(held_out.latents.to(device), held_out.captions)
    mean, std = mean.to(device), std.to(device)
    clock = _Clock(start, total, deadline, schedule_end, settings.calibration_steps, device)

    def save(done: bool) -> None:
        entry.update(steps=clock.step, total_steps=clock.total, step_seconds=clock.step_seconds(), batches=batches_log)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": clock.step}
        shadow = [s.cpu() for s in ema.shadow] if ema is not None else None
        _save_atomic({**state, "ema": shadow, "total_steps": clock.total, "done": done, "log": entry}, path)

    batches_log = {_size_name(s): batches[s] for s in set(cycle)}
    seen = {_size_name(s): 0 for s in set(cycle)}
    began = time.monotonic()
    bar = tqdm(total=total, initial=start, desc="stage 3 dit", dynamic_ncols=True, mininterval=1.0)
    losses = _LossLog("stage 3", entry, bar, settings.log_every)
    stopped = clock.done()
    while not stopped:
        size = cycle[clock.step % len(cycle)]
        batch, latents = batches[size], on_device[size]
        picker = _generator("cpu", settings.seed, _STAGE_KEYS["dit"], clock.step)
        index = torch.randint(len(latents), (batch,), generator=picker)
        drop = (torch.rand(batch, generator=picker) < settings.caption_dropout).tolist()
        captions = ["" if d else data[size].captions[i] for d, i in zip(drop, index.tolist(), strict=True)]
        lr = _lr(clock.step, clock.total, settings.lr, settings.warmup, settings.lr_floor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        clock.begin()
        x0 = (latents[index.to(device)].float() - mean) / std
        with _autocast(device):
            loss = model.loss(x0, captions, _generator(device, settings.seed, _STAGE_KEYS["dit"], clock.step),
                              first_frame_weight=settings.first_frame_weight)  # fmt: skip
        _update(loss, optimizer, params, settings.grad_clip)
        if ema is not None:
            ema.update(clock.step)
        clock.end(_size_name(size))
        seen[_size_name(size)] += batch
        losses.add(loss, clock, lr)
        stopped = clock.done()
        if clock.step % settings.eval_every == 0 or stopped:
            entry["held_out_loss"].append([clock.step, _held_out_loss(model, held_out, mean, std, settings)])
        if clock.step % settings.checkpoint_every == 0 and not stopped:
            save(done=False)
    bar.close()
    seconds = time.monotonic() - began
    entry["stopped_by"] = stopped
    entry["seconds"] = entry.get("seconds", 0.0) + seconds
    entry["clips_seen"] = {k: entry.get("clips_seen", {}).get(k, 0) + v for k, v in seen.items()}
    entry["clips_per_second"] = {k: batches_log[k] / t for k, t in clock.step_seconds().items()}
    save(done=stopped == "steps")
    _choose_weights(model, ema, held_out, mean, std, settings, entry)
    model.eval().requires_grad_(False)


def _choose_weights(
    model: _Denoiser,
    ema: _Ema | None,
    held_out: _Latents,
    mean: torch.Tensor,
    std: torch.Tensor,
    settings: TrainSettings,
    entry: dict[str, Any],
) -> None:
    """Keep the EMA weights in ``model`` if their held-out loss is lower than the live weights'."""
    device = settings.device
    held_out = _Latents(held_out.latents.to(device), held_out.captions)
    mean, std = mean.to(device), std.to(device)
    model.to(device)
    live = _held_out_loss(model, held_out, mean, std, settings)
    entry["final_held_out_loss"] = {"live": live}
    entry["weights"] = "live"
    if ema is not None:
        ema.swap()
        averaged = _held_out_loss(model, held_out, mean, std, settings)
        entry["final_held_out_loss"]["ema"] = averaged
        if averaged <= live:
            entry["weights"] = "ema"
        else:
            ema.swap()


# ---------------------------------------------------------------------------------------- stage 4


@torch.no_grad()
def _sample(folder: Path, config: ReferenceConfig, settings: TrainSettings, out: Path) -> dict[str, Any]:
    """Generate held-out prompts from the saved ``folder`` at both sizes; score them; write contact sheets."""
    from PIL import Image

    from vgen.pipelines.video import contact_sheet

    dtype = torch.bfloat16 if settings.device == "cuda" else torch.float32
    pipe = WanPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True).to(settings.device)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    sizes = {"train": (*config.clip_size, settings.sample_steps), "demo": (*config.demo_size, config.demo_steps)}
    for name, (frames, height, width, steps) in sizes.items():
        shapes = ShapesDataset(settings.samples, frames, height, width, seed=settings.seed + 7, split="eval")
        captions = [shapes.clip(i).caption for i in range(len(shapes))]
        videos = []
        for start in range(0, len(captions), 8):
            output = pipe(
                prompt=captions[start : start + 8],
                num_frames=frames,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=config.demo_guidance,
                generator=torch.Generator("cpu").manual_seed(settings.seed + start),
                max_sequence_length=config.max_sequence_length,
                output_type="np",
            ).frames
            videos.extend(np.asarray(output, dtype=np.float32))
        scores = [score_video(v, c) for v, c in zip(videos, captions, strict=True)]
        rows = [contact_sheet((np.clip(v, 0, 1) * 255).round().astype(np.uint8), max_frames=8) for v in videos[:8]]
        sheet = out / f"samples-{name}.png"
        Image.fromarray(np.concatenate(rows)).save(sheet)
        results[name] = {
            "size": [frames, height, width],
            "steps": steps,
            "guidance": config.demo_guidance,
            "adherence": sum(s.passed for s in scores) / len(scores),
            "score": sum(s.score for s in scores) / len(scores),
            "sheet": sheet.name,
            "captions": captions[:8],
        }
    return results


def _plot(log: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [*log.get("history", []), log]
    titles = {"vae": "stage 1: VAE (L1 + L2 + KL)", "decoder": "stage 1b: decoder, whole clips (L1 + L2)"}
    titles["dit"] = "stage 3: flow matching"
    panels = [key for key in titles if any(run.get(key, {}).get("loss") for run in runs)] or ["dit"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        offset = 0
        for i, run in enumerate(runs):  # runs that continue a model go on where it stopped
            entry = run.get(key, {})
            label = f" (run {run.get('run', i + 1)})" if len(runs) > 1 else ""
            colour = f"C{i % 10}"  # one colour per run: its training loss faint, its held-out loss solid
            for series, style, alpha in (("loss", "-", 0.45), ("held_out_loss", "o-", 1.0)):
                if entry.get(series):
                    steps, values = zip(*entry[series], strict=True)
                    name = "train" if series == "loss" else "held out"
                    ax.plot([offset + s for s in steps], values, style, label=name + label, linewidth=1, markersize=3,
                            color=colour, alpha=alpha)
            offset += entry.get("steps", 0)
        ax.set(title=titles[key], xlabel="step", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
        if ax.lines:  # many runs make a long legend: small, two columns, top right (the losses fall)
            ax.legend(fontsize="x-small", ncols=2 if len(ax.lines) > 6 else 1, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- run


def _write_log(log: dict[str, Any], out: Path) -> None:
    (out / "log.json").write_text(json.dumps(log, indent=1))


_STAGES = ("vae", "decoder", "cache", "dit")


def _from_model(folder: str, log: dict[str, Any]) -> WanPipeline:
    """The pipeline saved in ``folder`` (float32, CPU).

    If the run that made it left its ``log.json`` beside the folder, that run (and the runs before
    it) go into ``log["history"]``, oldest first, so that the loss plot shows the whole training.
    ``log["run"]`` numbers this run one after that run's number (its place in the history when it
    has none), so that a run tried and not kept leaves a gap instead of shifting later numbers.
    """
    pipe = WanPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    log["from_model"] = str(folder)
    earlier = Path(folder).parent / "log.json"
    if earlier.is_file():
        previous = json.loads(earlier.read_text())
        run = {key: previous[key] for key in ("run", "settings", "from_model", *_STAGES) if key in previous}
        log["history"] = [*previous.get("history", []), run]
        log["run"] = run.get("run", len(log["history"])) + 1
    return pipe


def _step_offset(log: dict[str, Any], stage: str) -> int:
    """Steps that earlier runs (``log["history"]``) trained ``stage`` for."""
    return sum(run.get(stage, {}).get("steps", 0) for run in log.get("history", []))


def train(out: str | Path, settings: TrainSettings) -> dict[str, Any]:
    """Run (or resume) all stages into ``out``; return the log (also written to ``out/log.json``)."""
    started = time.monotonic()
    settings.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = reference_config(settings.config)
    end = started + (settings.minutes * 60 if settings.minutes is not None else math.inf)
    if settings.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    log: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "settings": dataclasses.asdict(settings),
        "parameters": parameter_counts(config),
        "video_tokens": {"train": config.video_tokens(), "demo": config.video_tokens(*config.demo_size)},
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if settings.device == "cuda" else "cpu",
    }
    stop = end - settings.final_reserve_s

    def stage_end(minutes: float | None) -> float:
        return time.monotonic() + minutes * 60 if minutes else stop

    if settings.from_model is not None:
        pipe = _from_model(settings.from_model, log)
    else:
        pipe = build_reference_pipeline(config, settings.seed)
        vae_minutes = settings.vae_minutes or (settings.vae_share * settings.minutes if settings.minutes else None)
        vae_end = stage_end(vae_minutes) if vae_minutes else math.inf
        if not _train_vae(pipe.vae, config, settings, out, stop, vae_end, log):
            _write_log(log, out)
            print("stage 1 stopped by --minutes; run the same command again to resume", file=sys.stderr)
            return log
        _write_log(log, out)
    if not _train_decoder(pipe.vae, config, settings, out, stop, stage_end(settings.decoder_minutes), log):
        _write_log(log, out)
        print("stage 1b stopped by --minutes; run the same command again to resume", file=sys.stderr)
        return log
    _write_log(log, out)
    if settings.from_model is None or settings.dit_steps != 0:
        cache = _cache(pipe.vae, config, settings, out, log)
        _write_log(log, out)
        _train_dit(pipe, config, settings, out, stop, stage_end(settings.dit_minutes), cache, log)
    folder = save_pipeline(pipe.to("cpu"), out / "model")
    log["model"] = {"folder": str(folder), **folder_bytes(folder)}
    _write_log(log, out)
    if settings.samples:
        log["samples"] = _sample(folder, config, settings, out)
    log["seconds"] = time.monotonic() - started
    _write_log(log, out)
    _plot(log, out / "loss.png")
    return log


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vgen.models.train",
        description="Train the reference Wan-format text-to-video model on procedural shapes clips (resumable).",
    )
    calibrated = "default: fitted to the stage's minutes if --minutes is given, else the config's"
    parser.add_argument("--out", required=True, help="run folder: model/, log.json, loss.png, checkpoints/, cache/")
    parser.add_argument("--config", default="reference", choices=["reference", "tiny"])
    parser.add_argument("--vae-steps", type=int, help=f"stage-1 steps ({calibrated})")
    parser.add_argument("--dit-steps", type=int, help=f"stage-3 steps ({calibrated})")
    parser.add_argument("--batch", type=int, help="stage-3 clips per step at the training size")
    parser.add_argument("--vae-batch", type=int, help="stage-1 crops per step")
    parser.add_argument("--clips", type=int, help="training clips encoded per size")
    parser.add_argument("--minutes", type=float, help="wall-clock bound for this invocation (it resumes)")
    parser.add_argument("--vae-minutes", type=float, help="stage-1 training time (default: vae_share x --minutes)")
    parser.add_argument("--dit-minutes", type=float, help="stage-3 training time (default: the rest of --minutes)")
    parser.add_argument("--decoder-steps", type=int, help="stage-1b steps (0: skip the stage)")
    parser.add_argument("--decoder-minutes", type=float, help="stage-1b training time that calibrated steps fill")
    parser.add_argument(
        "--from-model", help="continue this saved pipeline: skip stage 1; stages 1b and 3 run unless given 0 steps"
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workers", type=int, help="DataLoader processes rendering clips")
    parser.add_argument("--samples", type=int, help="held-out prompts generated per size at the end (0: none)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    parser.add_argument(
        "--set", action="append", type=_setting, default=[], metavar="KEY=VALUE",
        help="any other TrainSettings field, e.g. --set vae_lr=2e-4 (VALUE read as JSON when it parses)",
    )  # fmt: skip
    return parser.parse_args(argv)


def _as_tuples(value: Any) -> Any:
    """JSON lists from ``--set`` as tuples, nested ones too (settings hold tuples)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _arguments(argv)
    named = ("vae_steps", "dit_steps", "batch", "vae_batch", "clips", "minutes", "vae_minutes", "dit_minutes")
    named += ("device", "seed", "workers", "samples", "decoder_steps", "decoder_minutes", "from_model")
    overrides: dict[str, Any] = {name: getattr(args, name) for name in named if getattr(args, name) is not None}
    if args.compile:
        overrides["compile"] = True
    for stage in ("vae", "dit", "decoder"):  # unset step counts are calibrated to the time
        if getattr(args, f"{stage}_minutes") is not None or (args.minutes is not None and stage != "decoder"):
            overrides.setdefault(f"{stage}_steps", None)
    for key, value in args.set:
        overrides[key] = _as_tuples(value)
    try:
        settings = default_settings(args.config, **overrides)
        settings.check()
    except ValueError as err:
        print(f"vgen.models.train: error: {err}", file=sys.stderr)
        return 2
    log = train(args.out, settings)
    if "model" not in log:
        return 0  # stage 1 was cut by --minutes; train() said how to resume
    model = log["model"]
    print(f"wrote {model['folder']}: {model['bytes'] / 1e6:.1f} MB in {model['files']} files")
    for name, result in log.get("samples", {}).items():
        print(f"held-out adherence at the {name} size {result['size']}: {result['adherence']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
