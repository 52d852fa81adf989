"""Ring context parallelism's engine: block-aligned re-cuts between token orders, and the ring itself.

The design is in ``docs/ring.md``. This module holds the two collective steps that every method
shares, built on ``torch.distributed`` only:

- :func:`exchange`: one ``all_to_all_single`` that moves a sequence cut into contiguous per-rank
  shards in one token order into contiguous shards of another (a method's permutation, or back).
  :func:`block_splits` cuts at block boundaries, so that no mask block straddles two ranks.
- :func:`ring_attention`: each rank keeps its queries; the key/value shards travel around the ring
  (``batch_isend_irecv``, the next shard in flight while the current one is computed); every step
  runs :func:`vgen.kernels.block_sparse_attention` on the global mask's slice for (this rank's rows,
  that shard's columns) with ``return_lse=True`` and folds the result in by
  :func:`vgen.kernels.merge_attention`. Steps whose slice keeps no block skip the kernel.

Equal to one process's :func:`~vgen.kernels.block_sparse_attention` with the same global mask up to
rounding (the same blocks, merged in log-sum-exp space). Forward only: the collectives here carry no
gradients.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from vgen.attention.block_mask import BlockMask
from vgen.attention.layout import VideoLayout
from vgen.attention.registry import AttentionMethod
from vgen.kernels import block_sparse_attention, merge_attention

__all__ = ["block_splits", "exchange", "gather_tokens", "ring_attention", "ring_method_attention"]


def block_splits(seq_len: int, block: int, world: int) -> list[int]:
    """Tokens per rank: whole blocks, as even as possible (the first ranks take the extra blocks), the
    ragged last block on the last rank that has any. Raises if there are fewer blocks than ranks."""
    for name, value in (("seq_len", seq_len), ("block", block), ("world", world)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    blocks = -(-seq_len // block)
    if blocks < world:
        raise ValueError(f"{seq_len} tokens make {blocks} blocks of {block}: too few for {world} ranks")
    per, extra = divmod(blocks, world)
    splits = [(per + (r < extra)) * block for r in range(world)]
    splits[-1] -= blocks * block - seq_len
    return splits


def _offsets(splits: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *splits], device=device).cumsum(0)


def _exchange_plan(perm: torch.Tensor | None, src_splits: list[int], dst_splits: list[int], rank: int):
    """(source elements to send, in send order; send counts per rank; receive counts per rank; destination
    elements of the received ones, in receive order). An element is a token (``perm`` ``[N]`` or ``None``)
    or a (token, head) pair at ``token * H + head`` (``perm`` ``[H, N]``: an order per head)."""
    n = sum(dst_splits)
    src_off, dst_off = _offsets(src_splits, "cpu"), _offsets(dst_splits, "cpu")
    if perm is None:
        source = torch.arange(n)[:, None]  # [N, W]: destination position, head -> source position
    else:
        source = perm.cpu().long()[:, None] if perm.ndim == 1 else perm.cpu().long().T
    width = source.shape[1]
    owner = torch.searchsorted(src_off[1:], source, right=True).flatten()  # source rank of each destination element
    element = (source * width + torch.arange(width)).flatten()  # the source element of each destination element
    dest_rank = torch.searchsorted(dst_off[1:], torch.arange(n), right=True).repeat_interleave(width)
    mine_out = owner == rank  # destination elements fed by this rank, grouped by destination rank (ascending)
    send_index = element[mine_out] - src_off[rank] * width
    send_counts = torch.bincount(dest_rank[mine_out], minlength=len(dst_splits)).tolist()
    lo, hi = int(dst_off[rank]) * width, int(dst_off[rank + 1]) * width
    here = owner[lo:hi]
    order = torch.argsort(here, stable=True)  # received grouped by source rank, in destination order within
    recv_counts = torch.bincount(here, minlength=len(src_splits)).tolist()
    return send_index, send_counts, recv_counts, order


_PLANS: dict[tuple, tuple] = {}


def _cached_plan(perm, src_splits, dst_splits, rank, device):
    """:func:`_exchange_plan` on the device, computed once per (order, cuts): every layer of every step asks
    for the same few. The cache holds ``perm`` itself, so its address cannot be reused by another tensor."""
    key = (None if perm is None else (perm.data_ptr(), perm.device, tuple(perm.shape)), tuple(src_splits),
           tuple(dst_splits), rank, device)  # fmt: skip
    if key not in _PLANS:
        if len(_PLANS) >= 32:
            _PLANS.pop(next(iter(_PLANS)))
        send_index, send_counts, recv_counts, order = _exchange_plan(perm, src_splits, dst_splits, rank)
        _PLANS[key] = (send_index.to(device), send_counts, recv_counts, order.to(device), perm)
    return _PLANS[key][:4]


def exchange(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    src_splits: list[int],
    dst_splits: list[int],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Re-cut a sequence sharded over the ranks of ``group``.

    Args:
        x: ``[B, S_r, ...]``: this rank's shard of the source order, ``src_splits[rank]`` tokens.
        perm: int ``[N]``: the destination order's position ``p`` holds source position ``perm[p]``
            (a permutation of ``0..N-1``, the same on every rank), or ``[H, N]``, an order per head
            (``x``'s dim 2); ``None`` keeps the order (a re-cut).
        src_splits, dst_splits: tokens per rank before and after, each summing to ``N``.

    Returns:
        ``[B, dst_splits[rank], ...]``: this rank's shard of the destination order.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(src_splits) != world or len(dst_splits) != world or sum(src_splits) != sum(dst_splits):
        raise ValueError(f"src_splits {src_splits} and dst_splits {dst_splits} must have {world} entries with one sum")
    if x.shape[1] != src_splits[rank]:
        raise ValueError(f"x holds {x.shape[1]} tokens; src_splits says rank {rank} holds {src_splits[rank]}")
    n = sum(dst_splits)
    if perm is not None and perm.shape not in ((n,), (x.shape[2], n)):
        raise ValueError(f"perm must be [{n}] or [heads = {x.shape[2]}, {n}], got {tuple(perm.shape)}")
    send_index, send_counts, recv_counts, order = _cached_plan(perm, src_splits, dst_splits, rank, x.device)
    per_head = perm is not None and perm.ndim == 2
    # elements first (all_to_all_single splits along dim 0): tokens [S, B, H, ...] or (token, head) pairs
    elements = x.movedim(1, 0)
    if per_head:
        elements = elements.movedim(2, 1).flatten(0, 1)  # [S * H, B, ...]
    send = elements[send_index].contiguous()
    recv = torch.empty((len(order), *send.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group)
    out = torch.empty_like(recv)
    out[order] = recv
    if per_head:
        out = out.unflatten(0, (dst_splits[rank], x.shape[2])).movedim(1, 2)
    return out.movedim(0, 1)


def _blocks(tokens: tuple[int, int], block: int) -> slice:
    """The blocks of a token range that starts on a block boundary (a ragged last block included)."""
    return slice(tokens[0] // block, -(-tokens[1] // block))


def _slice_mask(mask: BlockMask, rows: tuple[int, int], cols: tuple[int, int], dense: torch.Tensor) -> BlockMask:
    """The mask of (tokens ``rows``) x (tokens ``cols``), both block-aligned at their start."""
    bq, bk = mask.block_size
    part = dense[..., _blocks(rows, bq), _blocks(cols, bk)]
    return BlockMask.from_dense(part, (bq, bk), (rows[1] - rows[0], cols[1] - cols[0]))


def _ring_step(q, k, v, mask, dense, rows, cols, scale, step_fn, valid):
    """``(out, lse)`` of the queries (tokens ``rows``) over one shard's keys (tokens ``cols``); with ``valid``,
    per batch element over the shard's first ``valid[b]`` keys (none: zeros and ``-inf``)."""
    bq, bk = mask.block_size

    def attend(q, k, v, cols, dense):
        result = step_fn(q, k, v, rows=_blocks(rows, bq), cols=_blocks(cols, bk)) if step_fn else None
        if result is None:
            result = block_sparse_attention(q, k, v, _slice_mask(mask, rows, cols, dense), scale=scale, return_lse=True)
        return result

    if valid is None or all(n == cols[1] - cols[0] for n in valid):
        return attend(q, k, v, cols, dense)
    outs, lses = [], []
    for b, n in enumerate(valid):
        if n == 0:  # every key of this shard is padding for this batch element
            outs.append(torch.zeros_like(q[b : b + 1]))
            lses.append(torch.full((1, q.shape[2], q.shape[1]), float("-inf"), device=q.device))
            continue
        o, o_lse = attend(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], (cols[0], cols[0] + n),
                          dense[b : b + 1] if dense.shape[0] > 1 else dense)  # fmt: skip
        outs.append(o)
        lses.append(o_lse)
    return torch.cat(outs), torch.cat(lses)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    splits: list[int],
    *,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    return_lse: bool = False,
    step_fn=None,
    key_lengths: list[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of this rank's queries over every rank's keys, passed around a ring.

    Args:
        q, k, v: ``[B, splits[rank], H, D]``: this rank's contiguous shard of the sequence (in the order
            the mask is written in).
        mask: the global block mask ``[B, H, M, M]`` over all ``sum(splits)`` tokens, the same on every
            rank.
        splits: tokens per rank, each a multiple of both block sizes except the last rank's.
        scale: softmax scale (default ``D ** -0.5``).
        step_fn: ``step_fn(q, k, v, rows=slice, cols=slice)`` (block ranges) returning
            ``(out, lse)`` or ``None``, to replace the block-sparse kernel of a step (PSA's pyramid);
            with it, the steps whose mask slice keeps nothing are skipped (one host sync per call); without
            it, every step runs on the kernel, which gives such rows zeros and ``-inf``, and the call
            does not synchronise with the host (key_lengths aside).
        key_lengths: per batch element, how many keys of the sequence are valid: the first ones, the rest
            padding (a padded prompt after the video). Each step then attends a shard's valid prefix, per
            batch element; ``None``: every key.

    Returns:
        ``[B, splits[rank], H, D]`` (and the log-sum-exp ``[B, H, splits[rank]]`` with ``return_lse``); rows
        that keep no block are 0 (log-sum-exp ``-inf``).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = sum(splits)
    if len(splits) != world:
        raise ValueError(f"splits {splits} must have one entry per rank ({world})")
    if {q.shape[1], k.shape[1], v.shape[1]} != {splits[rank]}:
        raise ValueError(f"q, k, v must hold splits[{rank}] = {splits[rank]} tokens, got {q.shape[1]}, {k.shape[1]}, "
                         f"{v.shape[1]}")  # fmt: skip
    if mask.seq_lens != (n, n):
        raise ValueError(f"mask must cover all {n} tokens both ways, got seq_lens {mask.seq_lens}")
    bq, bk = mask.block_size
    if any(s % bq or s % bk for s in splits[:-1]):
        raise ValueError(f"splits {splits} must be multiples of the mask blocks {mask.block_size} (but the last)")
    n_all = sum(splits)
    if key_lengths is not None and (len(key_lengths) != q.shape[0] or not all(0 < n <= n_all for n in key_lengths)):
        raise ValueError(f"key_lengths must give 1..{n_all} valid keys for each of the {q.shape[0]} batch "
                         f"elements, got {key_lengths}")  # fmt: skip
    offsets = _offsets(splits, "cpu").tolist()
    spans = [(offsets[r], offsets[r + 1]) for r in range(world)]  # each rank's tokens
    rows = spans[rank]
    dense = mask.to_dense()
    if step_fn is None:  # the kernel takes a shard with no kept block (zeros, -inf): no host sync to skip it
        keeps = [True] * world
    else:  # a method's own step may not: skip those shards (one host sync)
        row_blocks = dense[..., _blocks(rows, bq), :]
        keeps = torch.stack([row_blocks[..., _blocks(span, bk)].any() for span in spans]).tolist()
    def global_rank(r: int) -> int:  # point-to-point calls name the peer in the default group, whatever `group`
        return r if group is None else dist.get_global_rank(group, r)

    prev, nxt = global_rank((rank - 1) % world), global_rank((rank + 1) % world)
    out = lse = None
    k_cur, v_cur = k.contiguous(), v.contiguous()
    for step in range(world):
        src = (rank - step) % world
        pending = []
        if step < world - 1:  # the next shard (from rank - step - 1) in flight while this one is computed
            incoming = splits[(rank - step - 1) % world]
            k_next = k.new_empty((k.shape[0], incoming, *k.shape[2:]))
            v_next = v.new_empty((v.shape[0], incoming, *v.shape[2:]))
            ops = [dist.P2POp(dist.isend, k_cur, nxt, group), dist.P2POp(dist.isend, v_cur, nxt, group),
                   dist.P2POp(dist.irecv, k_next, prev, group),
                   dist.P2POp(dist.irecv, v_next, prev, group)]  # fmt: skip
            pending = dist.batch_isend_irecv(ops)
        if keeps[src]:
            cols = spans[src]
            valid = None if key_lengths is None else [min(max(n - cols[0], 0), cols[1] - cols[0]) for n in key_lengths]
            o, o_lse = _ring_step(q, k_cur, v_cur, mask, dense, rows, cols, scale, step_fn, valid)
            out, lse = (o, o_lse) if out is None else merge_attention(out, lse, o, o_lse)
        for request in pending:
            request.wait()
        if pending:
            k_cur, v_cur = k_next, v_next
    if out is None:  # no block anywhere for this rank's rows
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
    return (out, lse) if return_lse else out


def gather_tokens(x: torch.Tensor, splits: list[int], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``[B, sum(splits), ...]``: every rank's shard ``[B, splits[r], ...]`` concatenated, on every rank."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(splits) != world or x.shape[1] != splits[rank]:
        raise ValueError(f"x holds {x.shape[1]} tokens; splits {splits} say rank {rank} of {world} holds "
                         f"{splits[rank] if rank < len(splits) else '?'}")  # fmt: skip
    widest = max(splits)
    padded = x.new_zeros((x.shape[0], widest, *x.shape[2:]))
    padded[:, : x.shape[1]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:, :n] for p, n in zip(parts, splits, strict=True)], dim=1)


def ring_method_attention(
    method: AttentionMethod,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: VideoLayout,
    step: int,
    layer: int,
    splits: list[int],
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    source_perm: torch.Tensor | None = None,
    key_lengths: list[int] | None = None,
) -> torch.Tensor:
    """One call of a block-sparse ``method`` with the sequence spread over the ranks of ``group``.

    ``q``, ``k``, ``v``: ``[B, splits[rank], H, D]``, this rank's shard of the layout's token order (any
    cut, e.g. diffusers' even one), or of another order of the same tokens: with ``source_perm`` (int
    ``[N]``), position ``p`` of the layout's order is position ``source_perm[p]`` of the ranks' shards laid
    end to end (joint text-video models hold ``[video_r, their part of the text]``). ``key_lengths``: per
    batch element, the valid keys of the layout's order, a prefix (a padded prompt after the video); the
    methods' orders keep such text in place. The method's selection sees the whole sequence: this first version
    all-gathers ``q`` and ``k`` (docs/ring.md plans pooled statistics instead), so every rank computes the
    same :class:`~vgen.attention.SparsePlan`. The tokens are then re-cut into block-aligned shards of the
    method's order, attended around the ring, and sent back. Returns this rank's shard of the output,
    equal to the one-process call's rows up to rounding.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = sum(splits)
    if n != layout.seq_len:
        raise ValueError(f"splits {splits} add up to {n} tokens; the layout has {layout.seq_len}")
    if source_perm is not None and tuple(source_perm.shape) != (n,):
        raise ValueError(f"source_perm must be [{n}], got {tuple(source_perm.shape)}")
    # one collective each where three would do: q and k gathered together, q, k and v re-cut together
    if method.plan_reads_qk(step=step, layer=layer):
        qk = gather_tokens(torch.cat([q, k], dim=-1), splits, group)
        if source_perm is not None:
            qk = qk[:, source_perm.to(qk.device)]
        q_full, k_full = qk.split([q.shape[-1], k.shape[-1]], -1)
        del qk
    else:  # a plan from the layout alone (dense, window, warm-up steps): the shapes, without a collective
        q_full, k_full = (x[:, :1].expand(-1, n, -1, -1) for x in (q, k))
    plan = method.plan(q_full, k_full, layout=layout, step=step, layer=layer, scale=scale)
    del q_full, k_full
    custom = plan.extra is not None
    if key_lengths is not None and custom:
        raise NotImplementedError(f"{method.name} runs its own ring steps, which take no padded keys: "
                                  "a padded prompt under a ring needs a plain block-sparse method")  # fmt: skip
    perm = plan.perm
    if source_perm is not None:  # the method's order straight from the ranks' shards
        source = source_perm.to(q.device)
        perm = source if perm is None else source[perm]
    bq, bk = plan.mask.block_size
    block = bq * bk // math.gcd(bq, bk)
    shards = block_splits(n, block, world)
    widths = [q.shape[-1], k.shape[-1], v.shape[-1]]
    moved = exchange(torch.cat([q, k, v], dim=-1), perm, splits, shards, group).split(widths, -1)
    # A plan without extras is plain block-sparse attention: a method's own step and finish read its extras,
    # and a dense warm-up step or layer (full_plan) has none.
    out, lse = ring_attention(*moved, plan.mask, shards, scale=scale, group=group, return_lse=True,
                              step_fn=functools.partial(method.ring_step, plan) if custom else None,
                              key_lengths=key_lengths)  # fmt: skip
    start = sum(shards[:rank])
    blocks = _blocks((start, start + shards[rank]), bq)
    counts = [-(-s // bq) for s in shards]  # query blocks per rank

    def gather(x: torch.Tensor) -> torch.Tensor:  # [B, H, m_r, ...] per rank -> [B, H, M, ...]
        return gather_tokens(x.movedim(2, 1), counts, group).movedim(1, 2)

    if custom:
        out = method.ring_finish(plan, moved[0], moved[2], out, lse, blocks=blocks, gather=gather)
    back = None if perm is None else torch.argsort(perm, dim=-1)
    return exchange(out, back, shards, splits, group)
