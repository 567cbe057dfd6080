"""Checks of the tensors passed at call time, shared by the operator and the reference."""

from __future__ import annotations

import numbers
from typing import Any, Mapping

import torch

from .errors import ShapeError, UnsupportedError
from .schema import AttentionSpec

#: Appended to shape errors that a [B, T, H, D] tensor passed as [B, H, T, D] would cause.
LAYOUT_HINT = "q, k and v are [B, H, T, D] (a [B, T, H, D] tensor needs .transpose(1, 2))"


def is_int(value) -> bool:
    """Whether ``value`` is an integer (a Python or numpy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


#: dtypes the generated kernels take for q, k and v.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
UNSIGNED = tuple(getattr(torch, n) for n in ("uint8", "uint16", "uint32", "uint64") if hasattr(torch, n))


def position_offset(spec: AttentionSpec, t_q: int, t_kv: int) -> int:
    """Absolute position of query row 0: ``T_KV - T_Q`` for ``bottom_right``, else 0."""
    return t_kv - t_q if spec.align == "bottom_right" else 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_call(
    spec: AttentionSpec,
    q: Any,
    k: Any,
    v: Any,
    inputs: Mapping[str, Any],
    *,
    constant_reads: list[tuple[str, int, int]] = (),
    allow_float64: bool = False,
    grad_inputs: frozenset[str] | None = frozenset(),
) -> tuple[dict[str, int], list[torch.Tensor]]:
    """Validate ``q, k, v`` and the runtime inputs against each other and the spec.

    Args:
        spec: the validated spec.
        q: ``[B, H, T_Q, D_QK]``; k: ``[B, H_KV, T_KV, D_QK]``; v: ``[B, H_KV, T_KV, D_V]``.
        inputs: the runtime inputs passed by keyword.
        constant_reads: ``spec.constant_reads()``, computed once by the caller (it parses the
            spec's expressions, which has no place in a traced call).
        allow_float64: accept float64 (the reference does; the kernels do not).
        grad_inputs: the inputs that may require grad (float inputs the score reads, whose
            gradients the kernels compute); ``None`` allows every float input.

    Returns:
        The named dimensions (``B, H, H_KV, T_Q, T_KV, D_QK, D_V``) and the runtime inputs in
        the spec's declaration order.

    Raises:
        ShapeError: naming the argument, what was expected and what came.
        UnsupportedError: a runtime input requires grad that cannot take one (an integer or
            boolean input, or a float input the score does not read).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    layouts = {"q": "[B, H, T_Q, D_QK]", "k": "[B, H_KV, T_KV, D_QK]", "v": "[B, H_KV, T_KV, D_V]"}
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ShapeError(f"{name}: expected 4 dimensions {layouts[name]}, got shape {tuple(t.shape)}")
    allowed = KERNEL_DTYPES + ((torch.float64,) if allow_float64 else ())
    if q.dtype not in allowed:
        names = ", ".join(_dtype_name(d) for d in allowed)
        raise ShapeError(f"q: dtype {_dtype_name(q.dtype)} is not supported; use one of {names}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ShapeError(
                f"{name}: dtype {_dtype_name(t.dtype)} differs from q's {_dtype_name(q.dtype)}; "
                f"cast with {name}.to(q.dtype)"
            )
        if t.device != q.device:
            raise ShapeError(f"{name}: on {t.device} but q is on {q.device}; move all tensors to one device")
    B, H, T_Q, D_QK = q.shape
    _, H_KV, T_KV, _ = k.shape
    D_V = v.shape[3]
    if k.shape[0] != B or v.shape[0] != B:
        raise ShapeError(f"batch sizes differ: q has B={B}, k has {k.shape[0]}, v has {v.shape[0]}")
    if v.shape[1] != H_KV or v.shape[2] != T_KV:
        raise ShapeError(f"v: expected [B, H_KV={H_KV}, T_KV={T_KV}, D_V] like k, got shape {tuple(v.shape)}")
    if k.shape[3] != D_QK:
        raise ShapeError(f"k: head dim {k.shape[3]} differs from q's D_QK={D_QK}")
    if H_KV == 0 or H % H_KV != 0:
        raise ShapeError(f"k: H_KV={H_KV} must divide q's H={H} (grouped-query attention); {LAYOUT_HINT}")
    if T_Q < 1 or T_KV < 1 or B < 1 or H < 1:
        raise ShapeError(f"empty attention: B={B}, H={H}, T_Q={T_Q}, T_KV={T_KV}; every size must be at least 1")
    for name, d in (("D_QK", D_QK), ("D_V", D_V)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ShapeError(f"{name}={d}: head dims from 1 to {MAX_HEAD_DIM} are supported")
    dims = {"B": B, "H": H, "H_KV": H_KV, "T_Q": T_Q, "T_KV": T_KV, "D_QK": D_QK, "D_V": D_V}
    return dims, check_inputs(spec, inputs, dims, q.device, constant_reads=constant_reads, grad_inputs=grad_inputs)


def check_inputs(
    spec: AttentionSpec,
    inputs: Mapping[str, Any],
    dims: Mapping[str, int],
    device: torch.device,
    *,
    constant_reads: list[tuple[str, int, int]] = (),
    grad_inputs: frozenset[str] | None = frozenset(),
    call: str = "op(q, k, v, ...)",
) -> list[torch.Tensor]:
    """Validate the runtime inputs of a call against the spec's declarations.

    Args:
        spec: the validated spec.
        inputs: the runtime inputs passed by keyword.
        dims: the call's named dimensions (``B, H, H_KV, T_Q, T_KV, D_QK, D_V``), which
            declared shapes may name.
        device: where q lives; every input must live there too.
        constant_reads, grad_inputs: as for :func:`check_call`.
        call: how the caller's call reads, for the missing-input message.

    Returns:
        The runtime inputs in the spec's declaration order.

    Raises:
        ShapeError: a missing, unknown or misshaped input, or one of the wrong kind or device.
        UnsupportedError: an input requires grad that cannot take one.
    """
    declared = {i.name: i for i in spec.inputs}
    unknown = [name for name in inputs if name not in declared]
    if unknown:
        listed = ", ".join(declared) or "(none)"
        raise ShapeError(f"{unknown[0]}: unknown keyword argument; the spec's runtime inputs are: {listed}")
    ordered = []
    params = spec.param_values
    for name, decl in declared.items():
        expected = tuple(dims[d] if isinstance(d, str) and d in dims else params.get(d, d) for d in decl.shape)
        if name not in inputs:
            raise ShapeError(
                f"{name}: missing runtime input; the spec declares {name} ({decl.dtype}, shape "
                f"[{', '.join(map(str, decl.shape))}] = {list(expected)}); pass it as {call.replace('...', name + '=...')}"
            )
        t = inputs[name]
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ShapeError(f"{name}: on {t.device} but q is on {device}; move it with {name}.to(q.device)")
        if tuple(t.shape) != expected:
            raise ShapeError(
                f"{name}: expected shape [{', '.join(map(str, decl.shape))}] = {list(expected)}, got {list(t.shape)}"
                + (f"; {LAYOUT_HINT}" if decl.along_positions else "")
            )
        kind_ok = {
            "float": t.is_floating_point(),
            "int": not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
            "bool": t.dtype == torch.bool,
        }[decl.kind]
        if kind_ok and decl.kind == "int" and t.dtype in UNSIGNED:
            raise ShapeError(f"{name}: unsigned dtype {_dtype_name(t.dtype)} is not supported; cast with {name}.to(torch.int32)")
        if not kind_ok:
            raise ShapeError(
                f"{name}: dtype {_dtype_name(t.dtype)} does not fit the declared {decl.dtype}; "
                f"cast with {name}.to(torch.{decl.dtype})"
            )
        if t.requires_grad and not (grad_inputs is None or name in grad_inputs):
            raise UnsupportedError(
                f"{name}: requires grad, but only float inputs that the score reads take gradients "
                f"(learnable biases, slopes); pass {name}.detach()"
            )
        ordered.append(t)
    for name, dim, index in constant_reads:
        size = inputs[name].shape[dim]
        if not 0 <= index < size:
            raise ShapeError(f"{name}: the spec reads index {index} of dimension {dim}, which has size {size}")
    return ordered
