"""Checking generated kernels against the reference: random inputs and the three-way rule.

The rule (as in FlexAttention's tests): compute the float64 reference, the reference in the
test dtype, and the kernel. The kernel's error against float64 may be at most
``FACTOR`` times the same-dtype reference's error, plus a small floor relative to the size of
the values (so float32, where both errors are tiny, is not judged on rounding noise).
NaN never passes; infinities must sit where the float64 reference has them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .schema import AttentionSpec

FACTOR = 4.0
#: error floor per dtype, relative to max |reference value| (at least 1). For the half types it is
#: four unit roundoffs (bf16 2^-8, fp16 2^-11): kernels round their matrix-product operands (P,
#: or feature maps and the linear-attention state) and their output to the dtype, so where the
#: same-dtype reference happens to be exact (one key per row gives o = v exactly; gradients that
#: cancel to zero) a floor of a roundoff or two fails right kernels; four is what the rule's
#: ``FACTOR`` allows when the reference rounds once
FLOOR = {torch.float32: 2e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}


@dataclass(frozen=True)
class ErrorRow:
    """One compared tensor: the kernel's and the same-dtype reference's max abs error
    against float64, the bound the kernel must meet, and the verdict."""

    name: str
    kernel_err: float
    ref_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.kernel_err <= self.bound


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference; equal infinities count 0, NaN or a misplaced infinity count inf."""
    x, ref = x.detach().double(), ref.detach().double()
    if torch.isnan(x).any():
        return math.inf
    same = (x == ref) | (torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref)))
    diff = torch.where(same, torch.zeros_like(x), (x - ref).abs())
    diff = torch.nan_to_num(diff, nan=math.inf, posinf=math.inf)
    return float(diff.max()) if diff.numel() else 0.0


def magnitude(ref: torch.Tensor) -> float:
    ref = ref.detach()
    finite = ref[torch.isfinite(ref)]
    return max(1.0, float(finite.abs().max())) if finite.numel() else 1.0


def alibi_slopes(h: int) -> torch.Tensor:
    """ALiBi's per-head slopes ``2^(-8 (i + 1) / H)`` (Press et al., 2022)."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)])


def make_inputs(
    spec: AttentionSpec,
    dims: dict[str, int],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator,
    doc_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Random q, k, v (standard normal) and runtime inputs for a spec.

    Runtime inputs: an input named ``slopes`` of shape ``[H]`` gets ALiBi slopes; other float
    inputs uniform [0, 1); int inputs indexed by a position (a ``T_Q`` or ``T_KV`` dimension)
    nondecreasing ids along their last dimension (packed documents: runs of ``doc_len``
    tokens if given, else random boundaries); other int inputs (per-sequence lengths such as
    ``n[b]`` in ``k < n[b]``) uniform in ``[0, max(T_Q, T_KV)]``; bool inputs Bernoulli(0.5).
    """
    B, H, H_KV, T_Q, T_KV, D_QK, D_V = (dims[n] for n in ("B", "H", "H_KV", "T_Q", "T_KV", "D_QK", "D_V"))

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    q, k, v = randn(B, H, T_Q, D_QK), randn(B, H_KV, T_KV, D_QK), randn(B, H_KV, T_KV, D_V)
    params = spec.param_values
    inputs = {}
    for decl in spec.inputs:
        shape = [dims.get(d, params.get(d, d)) if isinstance(d, str) else d for d in decl.shape]
        if decl.kind == "float":
            if decl.name == "slopes" and shape == [H]:
                t = alibi_slopes(H)
            else:
                t = torch.rand(*shape, generator=generator)
            t = t.to(getattr(torch, decl.dtype))
        elif decl.kind == "int":
            n = shape[-1]
            if not decl.along_positions:  # lengths: some keys kept, some masked
                ids = torch.randint(0, max(T_Q, T_KV) + 1, tuple(shape), generator=generator)
            elif doc_len:
                ids = (torch.arange(n) // doc_len).expand(*shape)
            else:
                ids = torch.randint(0, max(2, n // 8 + 1), tuple(shape), generator=generator).sort(dim=-1).values
            t = ids.to(getattr(torch, decl.dtype)).contiguous()
        else:
            t = torch.rand(*shape, generator=generator) < 0.5
        inputs[decl.name] = t.to(device)
    return q, k, v, inputs


def compare(
    op: Callable[..., Any],
    ref: Callable[..., Any],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: dict[str, torch.Tensor],
    *,
    backward: bool = True,
    generator: torch.Generator | None = None,
) -> list[ErrorRow]:
    """Compare ``op`` with ``ref`` on one input by the three-way rule.

    Returns:
        Rows for ``o``, ``lse`` and, with ``backward``, ``dq``, ``dk``, ``dv``.
    """
    dtype = q.dtype
    floor = FLOOR[dtype]
    has_lse = getattr(getattr(op, "spec", None), "normalizer", "softmax") == "softmax"

    def call(fn, args):
        if has_lse:
            return fn(*args, return_lse=True, **inputs)
        return fn(*args, **inputs), None

    # detach() keeps the caller's strides (clone() would make stride-0 inputs contiguous)
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    o, lse = call(op, leaves)
    wide = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    o64, lse64 = call(ref, wide)
    narrow = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
    o_lo, lse_lo = call(ref, narrow)

    def row(name, x, lo, ref64):
        ref_err = max_error(lo, ref64)
        if not math.isfinite(ref_err):
            ref_err = 0.0
        return ErrorRow(name, max_error(x, ref64), ref_err, FACTOR * ref_err + floor * magnitude(ref64))

    rows = [row("o", o, o_lo, o64)] + ([row("lse", lse, lse_lo, lse64)] if has_lse else [])
    if backward:
        g = torch.Generator().manual_seed(1234) if generator is None else generator
        do = torch.randn(o.shape, generator=g, dtype=torch.float32).to(device=o.device)
        # a gradient into the log-sum-exp as well, so both outputs' backward paths are checked
        dlse = torch.randn(o.shape[:-1], generator=g, dtype=torch.float32).to(device=o.device)
        def grad(outputs, inputs, seeds):
            # allow_unused: a score free of s makes o independent of q and k
            pairs = [(out, seed) for out, seed in zip(outputs, seeds) if out.requires_grad]
            if not pairs:
                return [torch.zeros_like(x) for x in inputs]
            got = torch.autograd.grad([p[0] for p in pairs], inputs, [p[1] for p in pairs], allow_unused=True)
            return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs)]

        outs = [(o, o64, o_lo)] + ([(lse, lse64, lse_lo)] if has_lse else [])
        seeds = [(do.to(dtype), do.double(), do.to(dtype))] + ([(dlse, dlse.double(), dlse)] if has_lse else [])
        grads = grad([x[0] for x in outs], leaves, [x[0] for x in seeds])
        grads64 = grad([x[1] for x in outs], wide, [x[1] for x in seeds])
        grads_lo = grad([x[2] for x in outs], narrow, [x[2] for x in seeds])
        for name, x, lo, r64 in zip(("dq", "dk", "dv"), grads, grads_lo, grads64):
            rows.append(row(name, x, lo, r64))
    return rows


def format_rows(rows: list[ErrorRow]) -> str:
    """A plain-text error table."""
    lines = [f"{'tensor':<6} {'kernel err':>11} {'ref err':>11} {'bound':>11}  verdict"]
    for r in rows:
        lines.append(
            f"{r.name:<6} {r.kernel_err:>11.3e} {r.ref_err:>11.3e} {r.bound:>11.3e}  {'ok' if r.ok else 'FAIL'}"
        )
    return "\n".join(lines)
