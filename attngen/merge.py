"""Exact merging of partial attention results by their log-sum-exp."""

from __future__ import annotations

import torch


def merge_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two softmax-attention results over disjoint sets of keys into the result over
    their union (the combine step of split-KV decoding, "flash-decoding", Dao et al., 2023).

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
    wide = torch.float64 if torch.float64 in (o1.dtype, lse1.dtype, lse2.dtype) else torch.float32
    lse1, lse2 = lse1.to(wide), lse2.to(wide)
    m = torch.maximum(lse1, lse2)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(lse1 - m_safe), torch.exp(lse2 - m_safe)
    total = w1 + w2
    seen = total > 0
    total_safe = torch.where(seen, total, torch.ones_like(total))
    zero = torch.zeros((), dtype=wide, device=o1.device)
    # a side with no weight contributes nothing, whatever its o holds (where, not 0 * o)
    part1 = torch.where(w1.unsqueeze(-1) > 0, w1.unsqueeze(-1) * o1.to(wide), zero)
    part2 = torch.where(w2.unsqueeze(-1) > 0, w2.unsqueeze(-1) * o2.to(wide), zero)
    o = (part1 + part2) / total_safe.unsqueeze(-1)
    lse = torch.where(seen, m_safe + torch.log(total_safe), torch.full_like(m, float("-inf")))
    return o.to(o1.dtype), lse.to(torch.float64 if wide == torch.float64 else torch.float32)
