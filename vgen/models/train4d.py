"""Train the 4D reconstruction model (:class:`vgen.pipelines.motion4d.Motion4DPipeline`) on procedural
deforming shapes (:mod:`vgen.data.deforming`); seeded and time-bounded.

    python -m vgen.models.train4d --out build/m4d --device cuda --minutes 20
    python -m vgen.models.train4d --out build/m4d-frame --device cuda --minutes 20 --no-temporal  # per-frame baseline
    python -m vgen.models.train4d --out /tmp/m4d --config tiny --device cpu                      # CPU smoke run

Stages, each given a share of the time (``--minutes``: the stage runs until its share is spent) or a step
count (``--set steps=[...]``):

1. data: ``sequences`` training sequences (seeds 0..) rendered once, in parallel processes;
2. ``shape_vae``: frame surfaces (``surface_points`` corresponding samples) -> occupancy at the
   frame's queries (half near the surface), binary cross-entropy + ``kl`` x KL;
3. ``deform_vae``: (frame 0, frame t) corresponding samples -> displacement of held-apart samples, L2 + KL;
4. latents: every sequence's shape posterior (frame 0) and deformation posteriors (frame 0 to each t);
   the diffusion stages draw fresh samples of them, divided by the samples' standard deviation (stored
   in the config). Samples, not means: channels that the KL term pushed to the prior are unit noise in
   what the decoders were trained on, and a decoder fed a mean there is off its training distribution
   (the first H200 run trained on means: shape BCE 0.44 from means against 0.29 from samples);
5. ``shape_diffusion`` (conditioned on frame 0's input points) and ``deform_diffusion``
   (conditioned on every frame's input points and the shape latent) with EDM's loss.

Outputs: ``OUT/model`` (``Motion4DPipeline.save_pretrained``), ``OUT/log.json``, ``OUT/loss.png``.

``--set baseline=true`` (with temporal attention) is the controlled ablation: after the temporal
deformation denoiser, a per-frame one (no temporal attention, no frame positions) is trained on the same
shape VAE, deformation VAE, shape denoiser and latents, for the same time or steps
(``deform_diffusion_baseline``), and saved with those shared networks as ``OUT/baseline/model``. The two
models then differ only in the deformation denoiser. (Trained as two separate runs, they differ in every
stage: the shape stage alone gave 0.07 IoU between two runs at frame 0.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vgen.data.deforming import sample_sequence
from vgen.models.latent_diffusion import DenoiserConfig
from vgen.models.vecset import VecSetConfig
from vgen.pipelines.motion4d import Motion4DConfig, Motion4DPipeline

__all__ = ["CONFIGS", "Train4DSettings", "train"]

CONFIGS: dict[str, Motion4DConfig] = {
    # 18.6M parameters: 37.2 MB in fp16, under the 40 MB that assets/ allows
    "small": Motion4DConfig(
        shape=VecSetConfig(num_latents=256, width=256, heads=4, latent_dim=32, decoder_layers=3, frequencies=8),
        deform=VecSetConfig(num_latents=256, width=256, heads=4, latent_dim=32, decoder_layers=3, frequencies=8),
        shape_denoiser=DenoiserConfig(latent_dim=32, width=192, heads=4, layers=5, point_tokens=64),
        deform_denoiser=DenoiserConfig(latent_dim=32, shape_dim=32, width=192, heads=4, layers=5, point_tokens=64),
    ),
    "tiny": Motion4DConfig(
        shape=VecSetConfig(num_latents=16, width=32, heads=2, latent_dim=4, decoder_layers=1, frequencies=2),
        deform=VecSetConfig(num_latents=16, width=32, heads=2, latent_dim=4, decoder_layers=1, frequencies=2),
        shape_denoiser=DenoiserConfig(latent_dim=4, width=32, heads=2, layers=1, frequencies=2, point_tokens=4),
        deform_denoiser=DenoiserConfig(latent_dim=4, shape_dim=4, width=32, heads=2, layers=1, frequencies=2,
                                       point_tokens=4),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Train4DSettings:
    """Data sizes, batches, steps and time shares of :func:`train` (see the module docstring)."""

    config: str = "small"
    seed: int = 0
    device: str = "cuda"
    minutes: float | None = None
    temporal: bool = True
    frame_positions: bool = True  # (with temporal) frame-index embeddings in the deformation denoiser
    baseline: bool = False  # also a per-frame deformation denoiser on the same shared stages (OUT/baseline/model)
    workers: int = 12
    sequences: int = 512
    frames: int = 17
    input_points: int = 300
    input_noise: float = 0.005
    surface_points: int = 2048
    queries: int = 2048
    batch: int = 16
    lr: float = 3e-4
    kl: float = 1e-4
    steps: tuple[int, int, int, int] = (3000, 3000, 3000, 3000)  # shape_vae, deform_vae, shape/deform diffusion
    # of the training time, with --minutes; the temporal deformation diffusion is the slowest step (817 steps
    # in its 30% of the first 13-minute run, still falling), the deformation VAE had flattened by then
    shares: tuple[float, float, float, float] = (0.3, 0.2, 0.1, 0.4)
    bf16: bool = True  # on CUDA: losses under bf16 autocast, other fp32 matmuls in TF32 (weights stay fp32)

    def __post_init__(self) -> None:
        if self.config not in CONFIGS:
            raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {self.config!r}")
        for name in ("sequences", "frames", "input_points", "surface_points", "queries", "batch", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "workers" else 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.frames < 2:
            raise ValueError("frames must be >= 2 (a motion needs two frames)")
        if self.baseline and not self.temporal:
            raise ValueError("baseline=True trains a per-frame denoiser beside the temporal one: it needs temporal")


TINY_SETTINGS = {"sequences": 8, "frames": 3, "input_points": 32, "surface_points": 64, "queries": 64, "batch": 4,
                 "steps": (3, 3, 3, 3), "workers": 0}  # fmt: skip


def _render(args: tuple[int, Train4DSettings]) -> dict[str, np.ndarray]:
    seed, s = args
    seq = sample_sequence(seed, s.frames, points=s.input_points, noise=s.input_noise, queries=s.queries,
                          correspondences=s.surface_points)  # fmt: skip
    return {k: v for k, v in seq.items() if k != "kind"}


def render_data(settings: Train4DSettings) -> dict[str, torch.Tensor]:
    """Every training sequence, stacked: inputs [S, T, n, 3], correspondences [S, T, C, 3], queries, occupancy."""
    jobs = [(settings.seed * 1_000_003 + i, settings) for i in range(settings.sequences)]
    if settings.workers:
        with ProcessPoolExecutor(settings.workers) as pool:
            seqs = list(tqdm(pool.map(_render, jobs, chunksize=8), total=len(jobs), desc="data"))
    else:
        seqs = [_render(job) for job in tqdm(jobs, desc="data")]
    return {k: torch.from_numpy(np.stack([s[k] for s in seqs])) for k in seqs[0]}


def _shares(settings: Train4DSettings) -> tuple[float, ...]:
    """The stages' time shares; with ``baseline`` a fifth stage, the per-frame denoiser, as long as the fourth."""
    return settings.shares + ((settings.shares[3],) if settings.baseline else ())


def _stage_seconds(settings: Train4DSettings, stage: int, began: float) -> float:
    """With --minutes: this stage's share of the time the stages from here on have left."""
    remaining = settings.minutes * 60 - (time.time() - began)
    shares = _shares(settings)
    return max(1.0, remaining * shares[stage] / sum(shares[stage:]))


def _run_stage(name, params, loss_fn, settings, stage, began, log) -> None:
    """AdamW with cosine decay to 10%, over ``steps[stage]`` steps, or with --minutes over this stage's
    time (the decay follows the elapsed time, so Triton compiles in the first steps or a GPU shared with
    another job shorten the stage instead of throwing its schedule off)."""
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    losses, step = [], 0
    timed = settings.minutes is not None
    seconds = _stage_seconds(settings, stage, began) if timed else None
    total = None if timed else settings.steps[min(stage, 3)]  # the baseline denoiser: the fourth stage's steps
    bar = tqdm(desc=name, total=None if timed else total)
    t0 = time.time()
    while True:
        progress = (time.time() - t0) / seconds if timed else step / total
        if progress >= 1:
            break
        for group in optimiser.param_groups:
            group["lr"] = settings.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=settings.bf16 and settings.device.startswith("cuda")):
            loss = loss_fn()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        step += 1
        if step % 10 == 0 or not timed:  # .item() syncs: not every step
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.update(1)
    bar.close()
    if not losses:
        losses.append(loss.item())
    log[name] = {"steps": step, "seconds": time.time() - t0, "loss": losses[:: max(1, len(losses) // 500)],
                 "final": float(np.mean(losses[-20:]))}


def train(settings: Train4DSettings, out: str | Path) -> Path:
    """Run every stage; returns the saved model folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    if settings.bf16 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    began = time.time()
    config = dataclasses.replace(
        CONFIGS[settings.config],
        deform_denoiser=dataclasses.replace(CONFIGS[settings.config].deform_denoiser, temporal=settings.temporal,
                                            frame_positions=settings.temporal and settings.frame_positions),
    )
    pipe = Motion4DPipeline(config, device)
    data = {k: v.to(device) for k, v in render_data(settings).items()}
    sequences, frames = data["inputs"].shape[:2]
    log: dict = {"settings": dataclasses.asdict(settings), "data_seconds": time.time() - began}
    rng = torch.Generator(device).manual_seed(settings.seed)

    def pick(n: int) -> torch.Tensor:
        return torch.randint(0, sequences, (n,), generator=rng, device=device)

    for module in pipe.modules().values():
        module.train()

    def shape_loss() -> torch.Tensor:
        s, t = pick(settings.batch), torch.randint(0, frames, (settings.batch,), generator=rng, device=device)
        logits, kl = pipe.shape_vae(data["correspondences"][s, t], data["queries"][s, t])
        return F.binary_cross_entropy_with_logits(logits, data["occupancy"][s, t].float()) + settings.kl * kl

    _run_stage("shape_vae", list(pipe.shape_vae.parameters()), shape_loss, settings, 0, began, log)
    half = settings.surface_points // 2

    def deform_loss() -> torch.Tensor:
        s, t = pick(settings.batch), torch.randint(1, frames, (settings.batch,), generator=rng, device=device)
        ref, moved = data["correspondences"][s, 0], data["correspondences"][s, t]
        offsets, kl = pipe.deform_vae(ref[:, :half], moved[:, :half], ref[:, half:])  # predict held-apart samples
        return (offsets - (moved - ref)[:, half:]).square().sum(-1).mean() + settings.kl * kl

    _run_stage("deform_vae", list(pipe.deform_vae.parameters()), deform_loss, settings, 1, began, log)

    corr = data["correspondences"]
    with torch.no_grad():  # every sequence's posteriors (mean, std), kept in bf16
        def moments(vae, points, features):
            mean, log_var = vae.posterior(points, features)
            return torch.stack([mean, (0.5 * log_var).exp()]).bfloat16()

        shape_post = torch.cat([moments(pipe.shape_vae, corr[i : i + 64, 0], corr[i : i + 64, 0, :, :0])
                                for i in range(0, sequences, 64)], 1)  # fmt: skip
        deform_post = torch.stack([
            torch.cat([moments(pipe.deform_vae, corr[i : i + 64, 0, :half], corr[i : i + 64, t, :half] -
                               corr[i : i + 64, 0, :half]) for i in range(0, sequences, 64)], 1)
            for t in range(frames)], 2)  # fmt: skip  # [2, S, T, M, C]

    def spread(post: torch.Tensor) -> float:  # the standard deviation of posterior samples
        return float((post[0].float().square().mean() + post[1].float().square().mean()).sqrt())

    def draw(post: torch.Tensor, s: torch.Tensor, std: float) -> torch.Tensor:
        """Fresh posterior samples of sequences ``s``, normalised: the diffusion models learn the latents
        the decoders were trained on (channels at the prior included), not the posterior means."""
        mean, sigma = post[0, s].float(), post[1, s].float()
        return (mean + sigma * torch.randn(mean.shape, generator=rng, device=device)) / std

    shape_std, deform_std = spread(shape_post), spread(deform_post)
    log["latents"] = {"shape_std": shape_std, "deform_std": deform_std,
                      "shape_prior_share": float((shape_post[1].float() > 0.5).float().mean()),
                      "deform_prior_share": float((deform_post[1].float() > 0.5).float().mean())}  # fmt: skip
    pipe.config = config = dataclasses.replace(config, shape_latent_std=shape_std, deform_latent_std=deform_std)

    def shape_diffusion_loss() -> torch.Tensor:
        s = pick(settings.batch)
        return pipe.edm.loss(pipe.shape_denoiser, draw(shape_post, s, shape_std)[:, None], points=data["inputs"][s, :1])

    _run_stage("shape_diffusion", list(pipe.shape_denoiser.parameters()), shape_diffusion_loss, settings, 2, began,
               log)  # fmt: skip

    def deform_diffusion_loss(denoiser: torch.nn.Module) -> torch.Tensor:
        s = pick(settings.batch)
        return pipe.edm.loss(denoiser, draw(deform_post, s, deform_std), points=data["inputs"][s],
                             shape=draw(shape_post, s, shape_std))

    _run_stage("deform_diffusion", list(pipe.deform_denoiser.parameters()),
               lambda: deform_diffusion_loss(pipe.deform_denoiser), settings, 3, began, log)  # fmt: skip
    if settings.baseline:  # the same shared networks, a fresh per-frame deformation denoiser
        frame = dataclasses.replace(config.deform_denoiser, temporal=False, frame_positions=False)
        baseline = Motion4DPipeline(dataclasses.replace(config, deform_denoiser=frame), device)
        for name in ("shape_vae", "deform_vae", "shape_denoiser"):
            getattr(baseline, name).load_state_dict(getattr(pipe, name).state_dict())
        baseline.deform_denoiser.train()
        _run_stage("deform_diffusion_baseline", list(baseline.deform_denoiser.parameters()),
                   lambda: deform_diffusion_loss(baseline.deform_denoiser), settings, 4, began, log)  # fmt: skip
        baseline.to(device)
        print(f"wrote {baseline.save_pretrained(out / 'baseline' / 'model', dtype=torch.float16)}")
    pipe.to(device)  # eval mode
    folder = pipe.save_pretrained(out / "model", dtype=torch.float16)
    log["seconds"] = time.time() - began
    (out / "log.json").write_text(json.dumps(log, indent=1))
    _plot(log, out / "loss.png")
    print(f"wrote {folder} in {log['seconds']:.0f} s")
    return folder


def _plot(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [name for name in ("shape_vae", "deform_vae", "shape_diffusion", "deform_diffusion",
                                "deform_diffusion_baseline") if name in log]  # fmt: skip
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2))
    for ax, name in zip(axes, stages, strict=True):
        losses = log[name]["loss"]
        ax.plot(np.linspace(0, log[name]["steps"], len(losses)), losses)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--no-temporal", action="store_true", help="per-frame baseline: no temporal attention")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a Train4DSettings field")
    args = parser.parse_args(argv)
    overrides = dict(TINY_SETTINGS) if args.config == "tiny" else {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(Train4DSettings)}:
            raise ValueError(f"--set {key!r}: not a Train4DSettings field")
        parsed = json.loads(value)
        overrides[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    settings = Train4DSettings(config=args.config, device=args.device, minutes=args.minutes,
                               temporal=not args.no_temporal, **overrides)  # fmt: skip
    train(settings, args.out)


if __name__ == "__main__":
    main()
