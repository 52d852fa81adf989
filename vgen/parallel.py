"""Context parallelism on torch.distributed: one generation spread over several processes (GPUs).

vgen does not run its own communication. It turns on diffusers' context parallelism
(``ContextParallelConfig``, ``ModelMixin.enable_parallelism``): the transformer's hidden states
are split along the sequence across ranks, and every self-attention call goes through diffusers'
Ulysses all-to-all, which hands each rank *all* tokens of ``heads / ulysses`` heads. The SDPA
call inside that is what vgen's interceptor (:mod:`vgen.pipelines.plumbing`) routes to the
sparse method, so a method sees the whole sequence of its heads: block selection is the same as
on one GPU, and N ranks produce the same video as one, up to rounding. Methods that keep
per-head state (a PARO calibration) check the head count they are given.

Ring attention (key/value shards passed around) is not offered: selection over a shard would
not see the whole sequence, and diffusers' native backend, which vgen intercepts, has no ring
path. Launch with ``torchrun --nproc-per-node N -m vgen.cli generate ...``; on CPUs (tests) the
gloo backend works too.
"""

from __future__ import annotations

import os
from unittest import mock

import torch
import torch.distributed as dist

__all__ = ["PLANS", "enable_context_parallel", "init_from_environment", "is_main_process"]


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


# Context-parallel plans for transformers whose diffusers class has none.
PLANS = {"SkyReelsV2Transformer3DModel": _skyreels_v2_plan}


def enable_context_parallel(transformer: torch.nn.Module, *, ulysses: int | None = None, ring: int = 1) -> None:
    """Spread ``transformer``'s sequence over the ranks of the default process group (Ulysses).

    Args:
        transformer: a diffusers transformer whose attention runs on the ``native`` backend
            (vgen's methods intercept it), with a context-parallel plan (Wan, CogVideoX, LTX, ...).
        ulysses: ranks that split the heads (default: the whole world); must divide the heads.
        ring: must be 1 (see the module docstring).
    """
    from diffusers import ContextParallelConfig

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context parallelism needs torch.distributed initialised: launch with torchrun "
                           "(vgen.parallel.init_from_environment() does the rest)")  # fmt: skip
    world = dist.get_world_size()
    ulysses = world if ulysses is None else ulysses
    if not isinstance(ring, int) or ring != 1:
        raise NotImplementedError(f"ring={ring!r}: vgen offers Ulysses context parallelism only (ring=1); "
                                  "block selection must see the whole sequence")  # fmt: skip
    if not isinstance(ulysses, int) or isinstance(ulysses, bool) or ulysses < 1 or ulysses != world:
        raise ValueError(f"ulysses must equal the number of processes ({world}), got {ulysses!r}")
    heads = getattr(transformer.config, "num_attention_heads", None)
    if heads is not None and heads % ulysses:
        raise ValueError(f"ulysses={ulysses} must divide the transformer's {heads} attention heads")
    name = type(transformer).__name__
    plan = PLANS[name](transformer) if name in PLANS else None
    if plan is None and getattr(transformer, "_cp_plan", None) is None:
        raise ValueError(f"{name} has no context-parallel plan in diffusers or in vgen "
                         f"(vgen adds: {', '.join(sorted(PLANS))})")  # fmt: skip
    config = ContextParallelConfig(ulysses_degree=ulysses)
    if torch.accelerator.device_count() == 0:
        from diffusers.models.modeling_utils import ModelMixin

        with mock.patch.object(ModelMixin, "_resolve_parallel_config", _resolve_on_cpu):
            transformer.enable_parallelism(config=config, cp_plan=plan)
    else:
        transformer.enable_parallelism(config=config, cp_plan=plan)
