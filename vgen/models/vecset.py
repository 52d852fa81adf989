"""Latent vector sets for 3D shapes and their motion (Motion2VecSets-style autoencoders).

- :class:`ShapeVAE`: a point cloud ``[B, N, 3]`` -> a set of ``M`` latent vectors: queries are the
  Fourier features of ``M`` farthest-point-sampled input points, which cross-attend to all input
  points; a KL bottleneck squeezes each vector to ``latent_dim`` channels. The decoder lifts them
  back, runs self-attention over the set, and answers occupancy queries at any 3D points by
  cross-attention from the query points to the set (one logit per point).
- :class:`DeformationVAE`: the motion from a reference frame to frame ``t`` as a latent set. Its
  input is corresponding points of both frames (position in the reference frame and displacement);
  its decoder maps reference-frame query points to their displacement at ``t``, which is how a
  mesh extracted once in the reference frame is carried to every frame with the same faces.

Both use PyTorch's SDPA for their attention (small sets; the video kernels of vgen do not apply).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vgen.kernels import fps

__all__ = ["DeformationVAE", "ShapeVAE", "VecSetConfig", "farthest_point_sample", "fourier_features"]


@dataclass(frozen=True)
class VecSetConfig:
    """Sizes of a vector-set autoencoder.

    Args:
        num_latents: vectors per set (``M``), chosen by farthest-point sampling of the input.
        width: transformer width; heads: attention heads.
        latent_dim: channels per vector after the KL bottleneck.
        decoder_layers: self-attention layers over the set in the decoder.
        frequencies: Fourier frequencies per coordinate of the point embedding.
    """

    num_latents: int = 256
    width: int = 256
    heads: int = 4
    latent_dim: int = 32
    decoder_layers: int = 4
    frequencies: int = 8

    def __post_init__(self) -> None:
        for name in ("num_latents", "width", "heads", "latent_dim", "decoder_layers", "frequencies"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")


def farthest_point_sample(points: torch.Tensor, count: int) -> torch.Tensor:
    """int64 ``[B, count]`` indices of ``points`` ``[B, N, 3]``, each the farthest from those before
    (the first is point 0, so the result is deterministic): :mod:`vgen.kernels.fps`'s one-launch Triton
    kernel on CUDA (clouds up to ``MAX_KERNEL_POINTS``), its PyTorch loop elsewhere (the same indices;
    the kernel's tests run it through Triton's interpreter)."""
    if points.is_cuda and points.shape[1] <= fps.MAX_KERNEL_POINTS:
        return fps.farthest_point_sample(points, count)
    return fps.farthest_point_sample_reference(points, count)


def fourier_features(points: torch.Tensor, frequencies: int) -> torch.Tensor:
    """``[..., 3 + 6 * frequencies]``: the points, and sin/cos of them times 2^k pi, k < frequencies."""
    scales = (2.0 ** torch.arange(frequencies, device=points.device, dtype=points.dtype)) * math.pi
    angles = (points[..., None] * scales).flatten(-2)
    return torch.cat([points, angles.sin(), angles.cos()], -1)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, context: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.context_norm = nn.LayerNorm(context or width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context or width, 2 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        c = h if context is None else self.context_norm(context)
        q = self.q(h).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.kv(c).chunk(2, -1))
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.mlp(x)


class _SetAutoencoder(nn.Module):
    """Shared body: encode ``features`` at ``points`` into a latent set; decode queries against it."""

    def __init__(self, config: VecSetConfig, in_features: int, out_features: int) -> None:
        super().__init__()
        self.config = config
        embed = 3 + 6 * config.frequencies
        self.point_in = nn.Linear(embed + in_features, config.width)
        self.query_in = nn.Linear(embed, config.width)
        self.encoder = _Attention(config.width, config.heads)
        self.to_moments = nn.Linear(config.width, 2 * config.latent_dim)
        with torch.no_grad():  # start near-deterministic (posterior std ~0.05): the KL term widens it as it must
            self.to_moments.bias[config.latent_dim :] = -6.0
        self.from_latent = nn.Linear(config.latent_dim, config.width)
        self.decoder = nn.ModuleList(_Attention(config.width, config.heads) for _ in range(config.decoder_layers))
        self.query_attention = _Attention(config.width, config.heads)
        self.head = nn.Sequential(nn.LayerNorm(config.width), nn.Linear(config.width, out_features))

    def _check(self, name: str, x: torch.Tensor, last: int) -> None:
        if x.ndim != 3 or x.shape[-1] != last:
            raise ValueError(f"{name} must be [B, N, {last}], got {list(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} holds NaN or infinite values")

    def posterior(self, points: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance ``[B, M, latent_dim]`` of the latent set's Gaussian posterior."""
        if points.shape[1] < self.config.num_latents:
            raise ValueError(f"need at least num_latents={self.config.num_latents} points, got {points.shape[1]}")
        fps = farthest_point_sample(points, self.config.num_latents)
        embedded = fourier_features(points, self.config.frequencies)
        tokens = self.point_in(torch.cat([embedded, features], -1))
        queries = torch.gather(tokens, 1, fps[..., None].expand(-1, -1, tokens.shape[-1]))
        mean, log_var = self.to_moments(self.encoder(queries, tokens)).chunk(2, -1)
        return mean, log_var.clamp(-20, 10)

    def encode_features(
        self, points: torch.Tensor, features: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent set ``[B, M, latent_dim]`` (a posterior sample, or its mean) and the KL term (mean over the
        batch). Channels that the KL term pushed to the prior carry unit noise in a sample and zero in the
        mean; a decoder trained on samples expects the noise, so latents to decode are samples."""
        mean, log_var = self.posterior(points, features)
        latent = mean + torch.randn_like(mean) * (0.5 * log_var).exp() if sample else mean
        kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum((1, 2)).mean()
        return latent, kl

    def decode(self, latent: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``[B, Q, out_features]`` at the query points ``[B, Q, 3]``."""
        self._check("queries", queries, 3)
        x = self.from_latent(latent)
        for layer in self.decoder:
            x = layer(x)
        q = self.query_in(fourier_features(queries, self.config.frequencies))
        return self.head(self.query_attention(q, x))


class ShapeVAE(_SetAutoencoder):
    """Occupancy of a shape from its point cloud through a latent vector set; see the module docstring."""

    def __init__(self, config: VecSetConfig | None = None) -> None:
        super().__init__(config or VecSetConfig(), in_features=0, out_features=1)

    def encode(self, points: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``points`` ``[B, N, 3]`` (N >= num_latents) -> latent set ``[B, M, latent_dim]``, KL term."""
        self._check("points", points, 3)
        return self.encode_features(points, points.new_zeros(*points.shape[:2], 0), sample)

    def forward(self, points: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Occupancy logits ``[B, Q]`` at ``queries`` and the KL term."""
        latent, kl = self.encode(points)
        return self.decode(latent, queries)[..., 0], kl


class DeformationVAE(_SetAutoencoder):
    """Displacements from a reference frame to frame t through a latent vector set."""

    def __init__(self, config: VecSetConfig | None = None) -> None:
        super().__init__(config or VecSetConfig(), in_features=3, out_features=3)

    def encode(
        self, reference: torch.Tensor, moved: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Corresponding points ``[B, N, 3]`` at the reference frame and at t -> latent set, KL term."""
        self._check("reference", reference, 3)
        self._check("moved", moved, 3)
        if reference.shape != moved.shape:
            raise ValueError(f"reference and moved must correspond point by point, got {list(reference.shape)} "
                             f"and {list(moved.shape)}")  # fmt: skip
        return self.encode_features(reference, moved - reference, sample)

    def forward(
        self, reference: torch.Tensor, moved: torch.Tensor, queries: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Displacements ``[B, Q, 3]`` of reference-frame ``queries`` at t, and the KL term."""
        latent, kl = self.encode(reference, moved)
        return self.decode(latent, queries), kl
