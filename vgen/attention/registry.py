"""Attention methods by name: a config dataclass and a callable per method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vgen.attention.block_mask import BlockMask
from vgen.attention.layout import VideoLayout
from vgen.kernels import dense_attention

__all__ = [
    "AttentionMethod",
    "MethodConfig",
    "SparsePlan",
    "available_methods",
    "create_method",
    "register_method",
]


@dataclass(frozen=True)
class MethodConfig:
    """Settings every method shares.

    Args:
        dense_steps: the first ``dense_steps`` denoising steps run dense attention.
        dense_layers: indices of self-attention layers that always run dense.
    """

    dense_steps: int = 0
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"dense_steps must be a non-negative int, got {self.dense_steps!r}")
        layers = self.dense_layers
        if isinstance(layers, int) or not all(isinstance(i, int) and i >= 0 for i in layers):
            raise ValueError(f"dense_layers must be a sequence of non-negative ints, got {layers!r}")
        object.__setattr__(self, "dense_layers", tuple(layers))


@dataclass(frozen=True)
class SparsePlan:
    """What a block-sparse method decided for one call, apart from running it: the token order it computes
    in and the block mask over that order. ``perm[i]`` is the token at position ``i`` of that order,
    ``perm[h, i]`` with an order per head (``None``: the layout's own order). Running it is
    ``block_sparse_attention`` on the permuted q/k/v,
    then the inverse permutation; ring parallelism (:mod:`vgen.ring`) runs it spread over ranks."""

    mask: BlockMask
    perm: torch.Tensor | None = None
    # what the method's ring_step / ring_finish read (computed once, on every rank); None: plain block-sparse
    extra: dict[str, Any] | None = None


def full_plan(seq_len: int, device: torch.device) -> SparsePlan:
    """Every block pair kept, in the layout's own order: dense attention as a :class:`SparsePlan`."""
    return SparsePlan(BlockMask.full(1, 1, (seq_len, seq_len), (128, 128), device=device))


class AttentionMethod:
    """A sparse (or dense) attention method over ``[B, S, H, D]`` tensors.

    Subclasses set ``config_class`` and implement :meth:`forward`; :meth:`__call__`
    routes dense warm-up steps and dense layers to exact dense attention. A sparse
    ``forward`` sets ``self.last_density`` (a float or a 0-d tensor, so that no host sync is
    needed) to the fraction of attention work it kept, for quality reports.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.last_density: float | torch.Tensor = 1.0

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: VideoLayout,
        step: int,
        layer: int,
        scale: float | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output ``[B, S, H, D]`` for q, k, v ``[B, S, H, D]``.

        ``attn_mask`` is what the model hands to SDPA (bool or additive, broadcastable
        to ``[B, H, S, S]``), e.g. HunyuanVideo's padding mask over text tokens.
        """
        if step < self.config.dense_steps or layer in self.config.dense_layers:
            self.last_density = 1.0
            return dense_attention(q, k, v, scale=scale, attn_mask=attn_mask)
        return self.forward(q, k, v, layout=layout, step=step, layer=layer, scale=scale, attn_mask=attn_mask)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: VideoLayout,
        step: int,
        layer: int,
        scale: float | None,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def plan(
        self, q: torch.Tensor, k: torch.Tensor, *, layout: VideoLayout, step: int, layer: int, scale: float | None
    ) -> SparsePlan:
        """The :class:`SparsePlan` of a call (no text padding): a full mask on dense warm-up steps and dense
        layers, else :meth:`sparse_plan`. Sets ``last_density`` as a call would."""
        if step < self.config.dense_steps or layer in self.config.dense_layers:
            self.last_density = 1.0
            return full_plan(q.shape[1], q.device)
        return self.sparse_plan(q, k, layout=layout, step=step, layer=layer, scale=scale)

    def plan_reads_qk(self, *, step: int, layer: int) -> bool:
        """Whether :meth:`plan` reads the values of q and k at this step and layer (a ring gathers them only
        then): not on dense warm-up steps and dense layers; subclasses whose mask follows from the layout
        alone (dense, window) say never."""
        return not (step < self.config.dense_steps or layer in self.config.dense_layers)

    def ring_finish(
        self, plan: SparsePlan, q: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
        blocks: slice, gather: Any,
    ) -> torch.Tensor:  # fmt: skip
        """Under ring parallelism, what the method does after the block-sparse part on a rank's shard
        (``q``, ``v``: the shard in the plan's order; ``out``, ``lse``: its block-sparse result over every
        rank's keys; ``blocks``: the shard's query blocks; ``gather(x)``: ``[B, H, m_r, ...]`` per-block
        values of every rank's shard, concatenated). Plain block-sparse methods return ``out``. Called for
        plans with ``extra`` only (a dense warm-up's :func:`full_plan` has none), as is :meth:`ring_step`."""
        return out

    def ring_step(
        self, plan: SparsePlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rows: slice, cols: slice,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """Under ring parallelism, one step: this rank's queries (query blocks ``rows`` of the plan's order)
        against one rank's keys (key blocks ``cols``), as ``(out, natural-log lse)``. ``None``: the
        block-sparse kernel on the plan's mask (the default)."""
        return None

    def sparse_plan(
        self, q: torch.Tensor, k: torch.Tensor, *, layout: VideoLayout, step: int, layer: int, scale: float | None
    ) -> SparsePlan:
        """Selection without execution, for methods whose execution is block-sparse attention (and,
        through :meth:`ring_finish`, a correction of its result)."""
        raise NotImplementedError(
            f"attention method {self.name!r} does not split into a block mask and a block-sparse run (its execution "
            "is not plain block-sparse attention), so ring parallelism cannot run it yet; see docs/ring.md"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


_METHODS: dict[str, type[AttentionMethod]] = {}


def register_method(name: str):
    """Class decorator: make an :class:`AttentionMethod` subclass available as ``name``."""

    def wrap(cls: type[AttentionMethod]) -> type[AttentionMethod]:
        if name in _METHODS:
            raise ValueError(f"attention method {name!r} is already registered by {_METHODS[name].__name__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    """Names accepted by :func:`create_method`, sorted."""
    return sorted(_METHODS)


def create_method(name: str, **config: Any) -> AttentionMethod:
    """Build the method registered as ``name`` from keyword settings.

    Raises:
        ValueError: unknown ``name`` (the valid names are listed) or unknown config key
            (the method's valid keys are listed), or a value its config rejects.
    """
    if name not in _METHODS:
        raise ValueError(f"unknown attention method {name!r}; available: {', '.join(available_methods())}")
    cls = _METHODS[name]
    fields = [f.name for f in dataclasses.fields(cls.config_class)]
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(map(repr, unknown))} for attention method {name!r}; "
            f"valid keys: {', '.join(fields)}"
        )
    return cls(cls.config_class(**config))
