"""Plain-PyTorch attention: the dense path and the fp32 reference the kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_reference", "dense_attention"]


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention through SDPA (cuDNN/flash on GPU), bit-for-bit what diffusers'
    native backend computes.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, H, D]`` (any strides).
        scale: softmax scale, default ``D ** -0.5``.
        attn_mask: bool or additive, broadcastable to ``[B, H, Sq, Sk]``.

    Returns:
        ``[B, Sq, H, D]`` (a transposed view of SDPA's output).
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
    )
    return out.transpose(1, 2)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention computed in fp32 with explicit softmax: the independent reference.

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, H, D]``.
        mask: bool, True = attend, broadcastable to ``[B, H, Sq, Sk]``. A query row with
            no key kept gives a zero output and an LSE of ``-inf``.
        return_lse: also return the natural-log log-sum-exp ``[B, H, Sq]`` (fp32).

    Returns:
        ``[B, Sq, H, D]`` in q's dtype (and the LSE when asked).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    out = (probs @ vf).transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out
