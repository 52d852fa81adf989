"""CPU check of the 4D latent fix: a shape denoiser trained on posterior samples (here, on the CPU)
against a model's own, trained on posterior means (the H200 run at commit 1dfefe6), both decoded by that
model's shape VAE; occupancy IoU on held-out sequences.

    python3 scripts/check4d_latents.py build/m4d-h200/temporal/model --seconds 1200
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from vgen.data.deforming import sample_sequence
from vgen.models.eval4d import HELD_OUT_SEED
from vgen.models.latent_diffusion import LatentSetDenoiser
from vgen.pipelines.motion4d import Motion4DPipeline


def _frame0(seed: int) -> tuple[np.ndarray, np.ndarray]:
    seq = sample_sequence(seed, 2, points=300, noise=0.005, queries=64, correspondences=2048)
    return seq["inputs"][0], seq["correspondences"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--seconds", type=float, default=1200)
    parser.add_argument("--sequences", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = Motion4DPipeline.from_pretrained(args.model, device="cpu")
    with ProcessPoolExecutor(2) as pool:
        data = list(pool.map(_frame0, range(args.sequences), chunksize=16))
    inputs = torch.from_numpy(np.stack([d[0] for d in data]))
    corr = torch.from_numpy(np.stack([d[1] for d in data]))
    with torch.no_grad():
        post = [pipe.shape_vae.posterior(corr[i : i + 64], corr[i : i + 64, :, :0]) for i in range(0, len(corr), 64)]
    mean, std = torch.cat([p[0] for p in post]), torch.cat([(0.5 * p[1]).exp() for p in post])
    spread = float((mean.square().mean() + std.square().mean()).sqrt())
    print(f"sample spread {spread:.3f}, means' std {float(mean.std()):.3f}")
    denoiser = LatentSetDenoiser(pipe.config.shape_denoiser)
    optimiser = torch.optim.AdamW(denoiser.parameters(), lr=3e-4, weight_decay=0.01)
    began, step = time.time(), 0
    while (progress := (time.time() - began) / args.seconds) < 1:
        for group in optimiser.param_groups:
            group["lr"] = 3e-4 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))
        s = torch.randint(0, len(mean), (32,))
        latent = (mean[s] + std[s] * torch.randn_like(mean[s])) / spread
        loss = pipe.edm.loss(denoiser, latent[:, None], points=inputs[s, None])
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        optimiser.step()
        step += 1
    denoiser.eval()
    s = pipe.config.shape
    for i in range(6):
        seq = sample_sequence(HELD_OUT_SEED + i, 2, points=300, noise=0.005, queries=20000, near_surface=0.0,
                              correspondences=64)  # fmt: skip
        points, queries, truth = torch.from_numpy(seq["inputs"])[None], torch.from_numpy(seq["queries"][:1]), seq[
            "occupancy"][0]  # fmt: skip
        ious = []
        for network, scale in ((pipe.shape_denoiser, pipe.config.shape_latent_std), (denoiser, spread)):
            with torch.no_grad():
                latent = pipe.edm.sample(network, (1, 1, s.num_latents, s.latent_dim), steps=18, device="cpu",
                                         generator=torch.Generator().manual_seed(0), points=points[:, :1])[:, 0]
                inside = (pipe.shape_vae.decode(latent * scale, queries)[0, :, 0] > 0).numpy()
            ious.append(float((inside & truth).sum() / max(1, (inside | truth).sum())))
        print(f"{seq['kind']:9s} IoU: the model's own {ious[0]:.3f}, on samples ({step} CPU steps) {ious[1]:.3f}")


if __name__ == "__main__":
    main()
