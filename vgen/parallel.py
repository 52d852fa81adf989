"""Context parallelism on torch.distributed: one generation spread over several processes (GPUs).

vgen does not run its own communication. It turns on diffusers' context parallelism
(``ContextParallelConfig``, ``ModelMixin.enable_parallelism``): the transformer's hidden states
are split along the sequence across ranks, and every self-attention call goes through diffusers'
Ulysses all-to-all, which hands each rank *all* tokens of ``heads / ulysses`` heads. The SDPA
call inside that is what vgen's interceptor (:mod:`vgen.pipelines.plumbing`) routes to the
sparse method, so a method sees the whole sequence of its heads: block selection is the same as
on one GPU, and N ranks produce the same video as one, up to rounding. Methods that keep
per-head state (a PARO calibration) check the head count they are given.

Joint attention (HunyuanVideo, MotifVideo: text tokens after the video tokens in one sequence). vgen's
plans split the video tokens and keep the text whole on every rank, so after the all-to-all a rank
holds ``[video_0, text, video_1, text, ...]``: text keys N times over, and the model's key-padding
mask is built for one rank's length. The interceptor puts such a call back in single-GPU order
(:func:`canonical_tokens`: every video shard, then the text once, with the mask that order implies),
runs the method, and scatters the output to the rank-chunked order; the key-padding mask, which
diffusers all-gathers beside the tokens, is put in the same order. Blocks whose extra tokens are
themselves split (Motif's decoder layers attend to the video) gather every shard instead. Attention
modules whose keys are whole on every rank (cross-attention to the text, the text refiner) run
locally, without communication: their result needs no other rank's tokens.

Ring attention (``ring=N``; tested on Wan, HunyuanVideo and MotifVideo): diffusers splits the
sequence evenly, each self-attention call reaches vgen's interceptor with its rank's shard (with
``ulysses=U`` too, on ``U * N`` processes, after diffusers' Ulysses all-to-all: a contiguous run of
``U`` shards for ``heads / U`` heads), and :func:`vgen.ring.ring_method_attention` runs the method over
the ring's ranks: the selection on all-gathered queries and keys (so the same blocks as one GPU), then
key/value shards around the ring, merged by log-sum-exp. Every vgen method runs this way (quantised
paro's steps smooth their keys by the whole sequence's mean, so that their log-sum-exps merge);
Joint text-video attention (HunyuanVideo, Motif) runs as a ring with ``ulysses=1``: each rank takes
an even part of the whole text into the ring (:func:`joint_ring_order`) and gathers the text's output
back; a padded prompt's key mask becomes per-sample key counts; Motif's decoder layers bring their own
shard of the encoder's tokens. ``docs/ring.md`` has the design and what is left. Launch with
``torchrun --nproc-per-node N -m vgen.cli generate ...``; on CPUs (tests) the gloo backend works too.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from unittest import mock

import torch
import torch.distributed as dist

__all__ = [
    "PLANS",
    "ContextParallelState",
    "canonical_tokens",
    "enable_context_parallel",
    "init_from_environment",
    "is_main_process",
    "rank_chunked_tokens",
    "shutdown",
]


def init_from_environment(device: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1);
    returns whether this is a multi-process run. NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo
    when there is no GPU or ``device`` is ``"cpu"``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return True


def shutdown(wait: bool = True) -> None:
    """End a multi-process run: wait for every rank (``wait``; a group destroyed, or a process ending,
    under another rank's pending collective can abort it), then tear the process group down. After an
    error, ``wait=False``: a barrier the other ranks never reach would hang. No-op without a group."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, or no process group at all: the one process that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _resolve_on_cpu(model: torch.nn.Module, config):
    """diffusers' ``_resolve_parallel_config`` picks ``accelerator:rank % count``, which fails without an
    accelerator; the same on the CPU (gloo)."""
    from diffusers import ParallelConfig

    config = ParallelConfig(context_parallel_config=config)
    cp = config.context_parallel_config
    mesh = cp.mesh or dist.device_mesh.init_device_mesh(
        "cpu", mesh_shape=cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names
    )
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    return config


def _skyreels_v2_plan(transformer: torch.nn.Module) -> dict:
    """SkyReels-V2 ships no plan: Wan's layout (split the first block's tokens and the RoPE tables), with
    diffusion forcing's per-token modulation ``[B, 6, S, C]`` split for every block, and the tokens
    gathered after ``norm_out`` (its per-token shift and scale need the whole sequence)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    plan: dict = {
        "rope": {0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
                 1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)},
        "blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
        "norm_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }  # fmt: skip
    for i in range(len(transformer.blocks)):
        per_token = ContextParallelInput(split_dim=2, expected_dims=4, split_output=False)
        plan.setdefault(f"blocks.{i}", {})["temb"] = per_token
    return plan


def _joint_plan(transformer: torch.nn.Module) -> dict:
    """HunyuanVideo and MotifVideo: split the embedded video tokens (``x_embedder``'s output, before the
    model builds its attention mask and Motif copies them for its decoder layers) and the RoPE tables
    ``[S, D]``; keep the text whole; gather after ``proj_out``."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    if getattr(transformer.config, "image_condition_type", None) == "token_replace":
        raise NotImplementedError(
            "HunyuanVideo's token-replace image conditioning modulates the first frame's tokens by position; "
            "vgen's context-parallel plan covers text-to-video"
        )
    table = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    return {
        "rope": {0: table, 1: table},
        "x_embedder": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def _motif_split_context(transformer: torch.nn.Module) -> frozenset[str]:
    """Motif's decoder layers (the last ``num_decoder_layers`` single blocks) attend to the encoder's video
    tokens as their extra tokens: split over the ranks like the video, not whole like the text."""
    blocks = len(transformer.single_transformer_blocks)
    decoder = int(getattr(transformer.config, "num_decoder_layers", 0) or 0)
    return frozenset(f"single_transformer_blocks.{i}.attn" for i in range(blocks - decoder, blocks))


# Context-parallel plans for transformers whose diffusers class has none.
PLANS = {
    "SkyReelsV2Transformer3DModel": _skyreels_v2_plan,
    "HunyuanVideoTransformer3DModel": _joint_plan,
    "MotifVideoTransformer3DModel": _joint_plan,
}
# Self-attention modules whose extra (context) tokens are split over the ranks too.
SPLIT_CONTEXT = {"MotifVideoTransformer3DModel": _motif_split_context}


@dataclass(frozen=True)
class ContextParallelState:
    """What vgen's interceptor needs to know of a transformer spread by :func:`enable_context_parallel`.

    Args:
        world: ranks of the context-parallel group (all processes: Ulysses or the ring).
        split_context: self-attention modules whose extra tokens are split over the ranks (gathered in
            full); in the others the extra tokens are whole on every rank (one copy is kept).
        ring: ranks of the ring (1: Ulysses only). With a ring, each rank's self-attention sees its even
            shard of the sequence (after Ulysses' all-to-all when both run: a contiguous run of tokens for
            its heads) and vgen runs :func:`vgen.ring.ring_method_attention` on it.
        ring_group: the ring's process group (None: every process).
    """

    world: int
    split_context: frozenset[str] = frozenset()
    ring: int = 1
    ring_group: dist.ProcessGroup | None = None


def _chunk_parts(x: torch.Tensor, world: int, video: int, position: str, dim: int):
    """Split a rank-chunked sequence (dimension ``dim``) into per-rank (video, extra) pieces."""
    total = x.shape[dim]
    if total % world or video % world:
        raise ValueError(f"a context-parallel attention over {total} tokens with {video} video tokens does not "
                         f"split into {world} equal rank chunks")  # fmt: skip
    local_video, local_extra = video // world, total // world - video // world
    parts = []
    for chunk in x.split(total // world, dim=dim):
        if position == "before":
            extra, vid = chunk.split([local_extra, local_video], dim=dim)
        else:
            vid, extra = chunk.split([local_video, local_extra], dim=dim)
        parts.append((vid, extra))
    return parts


def canonical_tokens(x: torch.Tensor, world: int, video: int, position: str, split_context: bool,
                     dim: int = 2) -> torch.Tensor:  # fmt: skip
    """Rank-chunked ``[(video_r, extra_r) for r in ranks]`` (what Ulysses' all-to-all hands a rank) to the
    single-GPU order: all video shards, with the extra tokens ``"before"`` or ``"after"`` them, gathered
    from every rank when ``split_context`` else taken once (they are the same on every rank)."""
    parts = _chunk_parts(x, world, video, position, dim)
    vid = torch.cat([v for v, _ in parts], dim=dim)
    extra = torch.cat([e for _, e in parts], dim=dim) if split_context else parts[0][1]
    return torch.cat([extra, vid] if position == "before" else [vid, extra], dim=dim)


def rank_chunked_tokens(x: torch.Tensor, world: int, video: int, position: str, split_context: bool,
                        dim: int = 2) -> torch.Tensor:  # fmt: skip
    """The inverse of :func:`canonical_tokens`: single-GPU order back to rank chunks (whole extra tokens
    are copied into every chunk)."""
    total = x.shape[dim]
    extra_total = total - video
    local_video = video // world
    if position == "before":
        extra, vid = x.split([extra_total, video], dim=dim)
    else:
        vid, extra = x.split([video, extra_total], dim=dim)
    vids = vid.split(local_video, dim=dim)
    extras = extra.split(extra_total // world, dim=dim) if split_context else [extra] * world
    chunks = []
    for v, e in zip(vids, extras, strict=True):
        chunks.extend([e, v] if position == "before" else [v, e])
    return torch.cat(chunks, dim=dim)


@functools.lru_cache(maxsize=32)
def joint_ring_order(ring: int, video: int, extra: int, position: str, split_context: bool, device: torch.device):
    """How a joint text-video attention's tokens enter a ring of ``ring`` ranks, each holding ``video / ring``
    video tokens and ``extra`` extra tokens (after or before them): the whole text (every rank takes an even,
    contiguous part of it into the ring) or, with ``split_context``, its own shard of the extra tokens.

    Returns ``(source_perm, splits, parts)``: ``source_perm`` int64 ``[N]`` on ``device``, position ``p`` of
    the single-GPU order (all video, the extra tokens once, before or after) is position ``source_perm[p]`` of
    the ranks' shards laid end to end, each shard ``[video_r, own part]`` (``[own part, video_r]`` before);
    ``splits``: tokens per shard; ``parts``: each rank's own part as a ``(start, stop)`` range of its extra
    tokens. Cached (read-only)."""
    local_video = video // ring
    if split_context:
        parts = [(0, extra)] * ring
    else:
        sizes = [extra // ring + (r < extra % ring) for r in range(ring)]
        starts = [sum(sizes[:r]) for r in range(ring)]
        parts = [(s, s + n) for s, n in zip(starts, sizes, strict=True)]
    splits = [local_video + b - a for a, b in parts]
    shard_start = torch.tensor([0, *splits]).cumsum(0)[:-1]
    j = torch.arange(video)
    video_rank = j // local_video
    video_source = shard_start[video_rank] + j % local_video
    if split_context:
        t = torch.arange(extra * ring)
        extra_rank, within = t // extra, t % extra
    else:
        t = torch.arange(extra)
        extra_rank = torch.bucketize(t, torch.tensor([b for _, b in parts]), right=True)
        within = t - torch.tensor([a for a, _ in parts])[extra_rank] if extra else t
    extra_source = shard_start[extra_rank] + within
    if position == "after":
        source = torch.cat([video_source, extra_source + local_video])
    else:
        own = torch.tensor([b - a for a, b in parts])
        source = torch.cat([extra_source, video_source + own[video_rank]])
    return source.to(device), splits, parts


def canonical_mask(mask: torch.Tensor, world: int, video: int, position: str, split_context: bool) -> torch.Tensor:
    """A key-padding mask ``[..., 1, keys]`` in rank-chunked order (diffusers' Ulysses all-gathers each
    rank's mask to match its all-to-all) put in single-GPU order, like :func:`canonical_tokens`."""
    if mask.shape[-2] != 1:
        raise NotImplementedError(f"context parallelism supports key-padding masks ([..., 1, keys]), got "
                                  f"{tuple(mask.shape)}")  # fmt: skip
    return canonical_tokens(mask, world, video, position, split_context, dim=-1)


def _ulysses_only(parallel_config):
    """A copy of a transformer's ``ParallelConfig`` whose context-parallel part reads ``ring_degree=1``: the
    attention template then runs only the Ulysses all-to-all, over the same Ulysses groups."""
    import copy

    config = copy.copy(parallel_config)
    config.context_parallel_config = copy.copy(parallel_config.context_parallel_config)
    config.context_parallel_config.ring_degree = 1
    return config


def enable_context_parallel(transformer: torch.nn.Module, *, ulysses: int | None = None, ring: int = 1) -> None:
    """Spread ``transformer``'s sequence over the ranks of the default process group (Ulysses).

    Args:
        transformer: a diffusers transformer whose attention runs on the ``native`` backend
            (vgen's methods intercept it), with a context-parallel plan: diffusers' (Wan, LTX, ...)
            or vgen's (:data:`PLANS`: SkyReels-V2, HunyuanVideo, MotifVideo). Joint text-video
            attention goes through vgen's interceptor, with vgen's ``dense`` method if none is applied.
        ulysses: ranks that split the heads (default: the processes the ring leaves, ``world / ring``);
            must divide the heads.
        ring: ranks of the ring (default 1); ``ulysses * ring`` must be the number of processes. With
            both, diffusers' Ulysses all-to-all runs first (over groups of ``ulysses`` ranks), then vgen's
            ring over the ranks that hold the same heads.
    """
    from diffusers import ContextParallelConfig

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context parallelism needs torch.distributed initialised: launch with torchrun "
                           "(vgen.parallel.init_from_environment() does the rest)")  # fmt: skip
    world = dist.get_world_size()
    if not isinstance(ring, int) or isinstance(ring, bool) or ring < 1:
        raise ValueError(f"ring must be a positive int, got {ring!r}")
    if ulysses is None and world % ring:
        raise ValueError(f"ring={ring} must divide the number of processes ({world})")
    ulysses = world // ring if ulysses is None else ulysses
    if not isinstance(ulysses, int) or isinstance(ulysses, bool) or ulysses < 1:
        raise ValueError(f"ulysses must be a positive int, got {ulysses!r}")
    if ulysses * ring != world:
        raise ValueError(f"ulysses={ulysses} x ring={ring} must be the number of processes ({world})")
    heads = getattr(transformer.config, "num_attention_heads", None)
    if heads is not None and heads % ulysses:
        raise ValueError(f"ulysses={ulysses} must divide the transformer's {heads} attention heads")
    name = type(transformer).__name__
    plan = PLANS[name](transformer) if name in PLANS else None
    if plan is None and getattr(transformer, "_cp_plan", None) is None:
        raise ValueError(f"{name} has no context-parallel plan in diffusers or in vgen "
                         f"(vgen adds: {', '.join(sorted(PLANS))})")  # fmt: skip
    from vgen.pipelines.plumbing import TRANSFORMER_SPECS, apply_sparse_attention, sparse_attention_method

    spec = TRANSFORMER_SPECS.get(name)
    if ring > 1 and spec is None:
        raise NotImplementedError(f"ring parallelism runs through vgen's interceptor, which does not know {name}")
    if ring > 1 and ulysses > 1 and spec.text_position != "none":
        raise NotImplementedError(f"{name} has joint text-video attention: vgen runs it as a ring or with Ulysses, "
                                  f"not both (got ulysses={ulysses}, ring={ring})")  # fmt: skip
    config = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring)
    if torch.accelerator.device_count() == 0:
        from diffusers.models.modeling_utils import ModelMixin

        with mock.patch.object(ModelMixin, "_resolve_parallel_config", _resolve_on_cpu):
            transformer.enable_parallelism(config=config, cp_plan=plan)
    else:
        transformer.enable_parallelism(config=config, cp_plan=plan)
    if spec is not None:
        # Attention whose keys are whole on every rank (cross-attention to the text, a text refiner) needs no
        # other rank's tokens: it runs locally. Only the video self-attention goes through the all-to-all.
        # Under a ring, diffusers' own ring never runs: the video self-attention keeps Ulysses' all-to-all
        # (when ulysses > 1) and vgen's interceptor runs the ring on what it hands over.
        video_attention = re.compile(spec.self_attention)
        ulysses_only = _ulysses_only(transformer._parallel_config) if ring > 1 and ulysses > 1 else None
        for module_name, module in transformer.named_modules():
            processor = getattr(module, "processor", None)
            if getattr(processor, "_parallel_config", None) is not None:
                if not video_attention.fullmatch(module_name):
                    processor._parallel_config = None
                elif ring > 1:
                    processor._parallel_config = ulysses_only
        split = SPLIT_CONTEXT[name](transformer) if name in SPLIT_CONTEXT else frozenset()
        ring_group = transformer._parallel_config.context_parallel_config._ring_mesh.get_group() if ring > 1 else None
        transformer._vgen_context_parallel = ContextParallelState(world=world, split_context=split, ring=ring,
                                                                  ring_group=ring_group)  # fmt: skip
        if ring > 1 and sparse_attention_method(transformer) is None:
            apply_sparse_attention(transformer, "dense")  # the ring runs inside vgen's interceptor
        if spec.text_position != "none" and sparse_attention_method(transformer) is None:
            # Joint attention must be put back in single-GPU order, which vgen's interceptor does: route it
            # to vgen's exact dense method (SDPA on the whole sequence).
            apply_sparse_attention(transformer, "dense")
