"""Prompt adherence of VAE round trips: the ceiling the reference model's VAE leaves for generation.

    python3 scripts/vae_roundtrip_adherence.py assets/reference/model [COUNT]

Renders the first 20 held-out shapes clips at the demo size (17 x 128 x 128), encodes (posterior
mode) and decodes each with the model's VAE on the CPU in fp32, and scores the true and the
round-tripped clips with vgen.data.score_video; prints one line per clip and the rates (colour + position,
the issue's measure; colour + motion; all three checks).
"""

import sys

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from vgen.data import ShapesDataset, render, score_video


def main(model: str, count: int = 20) -> None:  # count: the first held-out clips (the measure: 20)
    vae = AutoencoderKLWan.from_pretrained(model + "/vae").float().eval()
    held_out = ShapesDataset(count, frames=17, height=128, width=128, split="eval")
    true, trip = [], []
    for i in range(count):
        clip = held_out.clip(i)
        video = render(clip)
        x = torch.from_numpy(video).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        back = ((y[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        a, b = score_video(video, clip.caption), score_video(back, clip.caption)
        psnr = 10 * np.log10(255**2 / np.mean((back.astype(float) - video.astype(float)) ** 2))
        true.append(a)
        trip.append(b)
        flags = "".join(str(int(f)) for f in (b.colour_found, b.kind_matches, b.motion_matches, b.position_matches))
        print(f"{clip.caption[:70]:70s} round trip colour/kind/motion/position {flags}  PSNR {psnr:.1f} dB")
    for name, results in (("true renders", true), ("round trips", trip)):
        placed = np.mean([r.colour_found and r.position_matches for r in results])
        both = np.mean([r.colour_found and r.motion_matches for r in results])
        print(f"{name}: colour + position {placed:.0%}, colour + motion {both:.0%}, "
              f"all three {np.mean([r.passed for r in results]):.0%}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
