"""Exact merging of partial attention results by their log-sum-exp."""

from __future__ import annotations

import torch


def merge_splits(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``S`` softmax-attention results over disjoint sets of keys into the result over
    their union: the combine step of split-KV decoding ("flash-decoding", Dao et al., 2023).

    ``o = Σ_s e^{lse_s} o_s / Σ_s e^{lse_s}`` and ``lse = log Σ_s e^{lse_s}``, computed
    stably (relative to the largest ``lse_s``). A part whose row saw no key
    (``lse_s = -inf``) contributes nothing, whatever its ``o_s`` holds; a row no part saw
    comes out 0 with lse ``-inf``. Differentiable.

    Args:
        o_parts: ``[..., S, D]``, the partial outputs, each normalised over its own keys.
        lse_parts: ``[..., S]``, their log-sum-exps, natural log.

    Returns:
        ``(o [..., D] in o_parts' dtype, lse [...])``: float32 lse (float64 when an input is
        float64, which is also the precision of the arithmetic then).

    Raises:
        ValueError: ``lse_parts`` is not ``o_parts``' shape without the last dim.
    """
    if o_parts.dim() < 2 or o_parts.shape[:-1] != lse_parts.shape:
        raise ValueError(
            f"merge_splits: o_parts {tuple(o_parts.shape)} and lse_parts {tuple(lse_parts.shape)}: "
            "lse_parts must be o_parts' shape without the last dim, the splits along the dim before it"
        )
    wide = torch.float64 if torch.float64 in (o_parts.dtype, lse_parts.dtype) else torch.float32
    lse = lse_parts.to(wide)
    m = lse.amax(dim=-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m_safe).unsqueeze(-1)
    zero = torch.zeros((), dtype=wide, device=o_parts.device)
    # a part with no weight contributes nothing, whatever its o holds (where, not 0 * o)
    total = w.sum(dim=-2)
    seen = total > 0
    total_safe = torch.where(seen, total, torch.ones_like(total))
    o = torch.where(w > 0, w * o_parts.to(wide), zero).sum(dim=-2) / total_safe
    lse_out = torch.where(seen, m_safe + torch.log(total_safe), torch.full_like(m, float("-inf"))).squeeze(-1)
    return o.to(o_parts.dtype), lse_out.to(torch.float64 if wide == torch.float64 else torch.float32)


def merge_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two softmax-attention results over disjoint sets of keys into the result over
    their union (:func:`merge_splits` with two parts).

    ``o = (e^{lse1} o1 + e^{lse2} o2) / (e^{lse1} + e^{lse2})`` and
    ``lse = log(e^{lse1} + e^{lse2})``, computed stably. A side whose row saw no key
    (``lse = -inf``) contributes nothing; if neither saw one, the row is 0 with lse ``-inf``.
    Differentiable.

    Args:
        o1: ``[..., T, D]``, the first partial output.
        lse1: ``[..., T]``, its log-sum-exp, natural log (float32 from attngen operators).
        o2: ``[..., T, D]``, the second partial output, o1's shape and dtype.
        lse2: ``[..., T]``, its log-sum-exp.

    Returns:
        ``(o [..., T, D] in o1's dtype, lse [..., T])``: float32 lse (float64 when an input is
        float64, which is also the precision of the arithmetic then).

    Raises:
        ValueError: mismatched shapes or dtypes of o1 and o2.
    """
    if o1.dtype != o2.dtype:
        raise ValueError(f"merge_states: o1 is {o1.dtype} but o2 is {o2.dtype}; cast one of them")
    if o1.shape != o2.shape or lse1.shape != lse2.shape or o1.shape[:-1] != lse1.shape:
        raise ValueError(
            f"merge_states: o1 {tuple(o1.shape)}, o2 {tuple(o2.shape)}, lse1 {tuple(lse1.shape)}, "
            f"lse2 {tuple(lse2.shape)}: o's must match and lse must be o's shape without the last dim"
        )
    wide = torch.promote_types(lse1.dtype, lse2.dtype)
    return merge_splits(torch.stack([o1, o2], dim=-2), torch.stack([lse1.to(wide), lse2.to(wide)], dim=-1))
