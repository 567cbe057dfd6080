"""The exact reference: dense attention computed straight from the spec's definition.

It materialises the ``[B, H, T_Q, T_KV]`` score matrix, so it is for checking, not for speed.
It runs in any dtype (float64 included) on any device and is differentiable with autograd.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .args import check_call, position_offset
from .errors import UnsupportedError
from .expr import bind_params
from .printer import TorchEvaluator
from .schema import load_spec, with_params


def gather_input(tensor: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
    """``tensor[indices]`` with broadcasting index tensors; an index outside the tensor reads 0
    (as the kernels do)."""
    shape = torch.broadcast_shapes(*[i.shape for i in indices])
    valid = torch.ones(shape, dtype=torch.bool, device=tensor.device)
    clamped = []
    for dim, idx in enumerate(indices):
        idx = idx.to(torch.int64)
        valid = valid & (idx >= 0) & (idx < tensor.shape[dim])
        clamped.append(idx.clamp(0, tensor.shape[dim] - 1).expand(shape))
    values = tensor[tuple(clamped)]
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))


def reference(spec: Any, **params: int | float) -> Callable[..., Any]:
    """The dense reference of a spec, as a function with the operator's calling convention.

    Args:
        spec: anything :func:`attngen.load_spec` takes.
        **params: overrides of the spec's params (as for :func:`attngen.compile`).

    Returns:
        ``f(q, k, v, *, return_lse=False, **inputs)`` with ``q [B, H, T_Q, D_QK]``,
        ``k [B, H_KV, T_KV, D_QK]``, ``v [B, H_KV, T_KV, D_V]``; it returns ``o [B, H, T_Q, D_V]``
        in q's dtype, and with ``return_lse`` also ``lse [B, H, T_Q]`` (natural log, float32,
        or float64 for float64 inputs). All arithmetic runs in q's dtype, so a float64 call is
        the exact answer and a bfloat16 call shows what bfloat16 arithmetic alone costs.

    Linear specs (``normalizer: linear``) get the quadratic form of
    :func:`_linear_reference` instead, with ``f(q, k, v, *, return_lse=False, draw=0)``.

    Raises:
        SpecError, ShapeError: as :func:`attngen.compile` and the operator do.
    """
    spec = with_params(load_spec(spec), params)
    if spec.normalizer == "linear":
        return _linear_reference(spec)
    mask = spec.parsed_mask()
    score = spec.parsed_score()
    values = spec.param_values
    constant_reads = spec.constant_reads()

    def run(q, k, v, *, return_lse: bool = False, **inputs):
        dims, ordered = check_call(spec, q, k, v, inputs, constant_reads=constant_reads, allow_float64=True, grad_inputs=None)
        B, H, T_Q, D_QK = q.shape
        H_KV, T_KV = k.shape[1], k.shape[2]
        dtype, device = q.dtype, q.device
        group = H // H_KV
        k_full = k.repeat_interleave(group, dim=1) if group > 1 else k
        v_full = v.repeat_interleave(group, dim=1) if group > 1 else v
        scale = spec.scale if spec.scale is not None else 1.0 / math.sqrt(D_QK)
        s = torch.matmul(q, k_full.transpose(-1, -2)) * scale
        ev = _evaluator(spec, q.dtype, q.device, dims, dict(zip([i.name for i in spec.inputs], ordered)), s=s)
        visible = None
        if mask is not None:
            visible = torch.as_tensor(ev(bind_params(mask.sym, values)), device=device).expand(B, H, T_Q, T_KV)
        if score is None:
            t = s
        else:
            if visible is not None:
                # masked pairs enter the score detached, so a non-finite derivative there
                # cannot turn their zero gradient into NaN (0 * inf)
                ev.env["s"] = torch.where(visible, s, s.detach())
            t = ev.flt(bind_params(score.sym, values)).to(dtype)
        t = t.expand(B, H, T_Q, T_KV)
        if visible is not None:
            t = torch.where(visible, t, torch.tensor(float("-inf"), dtype=dtype, device=device))
        if spec.normalizer == "sigmoid":
            bias = spec.bias if spec.bias is not None else -math.log(T_KV)
            p = torch.sigmoid(t + bias)  # -inf at masked pairs gives exactly 0
            o = torch.matmul(p, v_full)
            if return_lse:
                raise UnsupportedError("return_lse: sigmoid attention has no log-sum-exp; call without return_lse")
            return o
        m = t.amax(dim=-1, keepdim=True)
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=dtype, device=device))
        p = torch.exp(t - m_safe)
        l = p.sum(dim=-1, keepdim=True)
        has_key = l > 0
        l_safe = torch.where(has_key, l, torch.ones((), dtype=dtype, device=device))
        o = torch.matmul(p / l_safe, v_full)
        o = torch.where(has_key, o, torch.zeros((), dtype=dtype, device=device))
        if not return_lse:
            return o
        lse = torch.where(has_key, m_safe + torch.log(l_safe), torch.tensor(float("-inf"), dtype=dtype, device=device))
        lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return o, lse.squeeze(-1).to(lse_dtype)

    return run



def _linear_reference(spec) -> Callable[..., Any]:
    """The quadratic form of linear attention (Katharopoulos et al., 2020, eq. 4-6):
    materialise ``A = φ(Q) φ(K)ᵀ`` (``[B, H, T_Q, T_KV]``), zero the pairs the mask hides,
    and return ``A V / (A 1 + eps)`` (``normalize``) or ``A V``, all in q's dtype.

    The returned ``f(q, k, v, *, return_lse=False, draw=0)`` takes the operator's shapes;
    ``draw`` picks the performer's random features (seed ``seed + draw``; the operator
    reports the draw of its last call as ``op.last_draw``). ``return_lse`` raises
    ``UnsupportedError``: linear attention has no log-sum-exp.
    """
    from .features import apply_feature_map, feature_scale, performer_features
    from .schema import DEFAULT_EPS

    fm = spec.feature_map
    mask = spec.parsed_mask()
    normalize = spec.normalize is not False
    eps = spec.eps if spec.eps is not None else DEFAULT_EPS

    def run(q, k, v, *, return_lse: bool = False, draw: int = 0, **inputs):
        if return_lse:
            raise UnsupportedError("return_lse: linear attention has no log-sum-exp; call without return_lse")
        dims, _ = check_call(spec, q, k, v, inputs, allow_float64=True, grad_inputs=None)
        group = dims["H"] // dims["H_KV"]
        k_full = k.repeat_interleave(group, dim=1) if group > 1 else k
        v_full = v.repeat_interleave(group, dim=1) if group > 1 else v
        scale = feature_scale(spec, dims["D_QK"])
        w = None
        if fm.kind == "performer":
            w = performer_features(fm.features, dims["D_QK"], (fm.seed or 0) + draw, device=q.device)
        a = apply_feature_map(fm.kind, q, scale=scale, w=w) @ apply_feature_map(fm.kind, k_full, scale=scale, w=w).transpose(-1, -2)
        if mask is not None:
            ev = _evaluator(spec, q.dtype, q.device, dims, {})
            visible = torch.as_tensor(ev(bind_params(mask.sym, spec.param_values)), device=q.device)
            a = torch.where(visible, a, torch.zeros((), dtype=a.dtype, device=a.device))
        num = a @ v_full
        if not normalize:
            return num
        return num / (a.sum(-1, keepdim=True) + eps)

    return run


def _evaluator(spec, dtype, device, dims, tensors, *, s=None, b=None, h=None) -> TorchEvaluator:
    """A torch evaluator of the spec's expressions over the ``[B, H, T_Q, T_KV]`` grid (or one
    ``b``, ``h`` slice of it)."""
    T_Q, T_KV = dims["T_Q"], dims["T_KV"]
    env = {
        "q": (torch.arange(T_Q, device=device) + position_offset(spec, T_Q, T_KV)).view(1, 1, T_Q, 1),
        "k": torch.arange(T_KV, device=device).view(1, 1, 1, T_KV),
        "b": torch.arange(dims["B"], device=device).view(-1, 1, 1, 1) if b is None else b,
        "h": torch.arange(dims["H"], device=device).view(1, -1, 1, 1) if h is None else h,
        "T_Q": T_Q,
        "T_KV": T_KV,
        **spec.param_values,
    }
    if s is not None:
        env["s"] = s
    tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
    return TorchEvaluator(env, lambda name, idx: gather_input(tensors[name], idx), dtype, device)


def mask_matrix(spec: Any, dims: dict[str, int], inputs: dict[str, torch.Tensor] | None = None, *, b: int = 0, h: int = 0, device="cpu") -> torch.Tensor:
    """The spec's mask for one batch entry and query head, as a dense bool ``[T_Q, T_KV]``
    (bounds included: every entry is a real query-key pair).

    Args:
        spec: anything :func:`attngen.load_spec` takes.
        dims: at least ``B, H, T_Q, T_KV``.
        inputs: the runtime inputs the mask reads.
    """
    spec = load_spec(spec)
    T_Q, T_KV = dims["T_Q"], dims["T_KV"]
    parsed = spec.parsed_mask()
    if parsed is None:
        return torch.ones(T_Q, T_KV, dtype=torch.bool, device=device)
    ev = _evaluator(spec, torch.float64, device, dims, dict(inputs or {}), b=b, h=h)
    visible = torch.as_tensor(ev(bind_params(parsed.sym, spec.param_values)), device=device)
    return visible.expand(1, 1, T_Q, T_KV)[0, 0]
