"""Linear attention: the plan, and the compiled operator over ``templates/linear.py.j2``.

Linear attention (``normalizer: linear``) replaces softmax weights by ``a_ij = φ(q_i)·φ(k_j)``
(Katharopoulos et al., 2020, "Transformers are RNNs: Fast Autoregressive Transformers with
Linear Attention"), so that

    o_i = Σ_j a_ij v_j / (Σ_j a_ij + eps)        (normalize: true)
    o_i = Σ_j a_ij v_j                           (normalize: false)

over the keys ``j`` the mask lets query ``i`` see. Associativity turns the sum into a state
``S = Σ_j φ(k_j)ᵀ v_j`` (``[F, D_V]``) and ``z = Σ_j φ(k_j)`` (``[F]``), so the work grows
linearly in the sequence length. The kernels never form a ``[T_Q, T_KV]`` matrix:

* non-causal (``mask: null``): one pass over the keys builds S and z, a second applies them;
* causal (``k <= q``) and chunk-local causal (``q // W == k // W and k <= q``): chunks of
  ``tiles.chunk`` positions, quadratic inside a chunk (``(φ(Q_c) φ(K_c)ᵀ ∘ M) V_c``), plus
  ``φ(Q_c) S`` for the keys of earlier chunks; the backward walks the chunks forwards for dQ
  and backwards for dK/dV with the reverse state ``R = Σ φ(q)ᵀ dnum``, ``r = Σ φ(q) dden``.

The softmax IR (lower, passes, tile classification) does not apply: a linear spec's plan is
made straight from the spec by :func:`make_linear_plan`.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from . import config
from .args import check_call, position_offset
from .errors import ShapeError, UnsupportedError
from .features import TAYLOR2_MAX_DIM, feature_count, feature_scale, performer_features
from .op import _custom_op, _new_output, _NoSecondDerivative, kernel_of
from .schema import DEFAULT_EPS, AttentionSpec, linear_mask_form
from .tiles import head_block

#: warps per program of the linear kernels (no tuner for them yet)
NUM_WARPS = 4

_REGISTRY: dict[str, "LinearAttentionOp"] = {}
_REGISTER_LOCK = threading.Lock()
_REGISTERED = False
_REVISION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]


@dataclass(frozen=True)
class LinearPlan:
    """Everything the linear template renders, decided from the spec.

    Attributes:
        spec_name, spec_digest: as in :class:`attngen.plan.ModulePlan`.
        feature_map: the feature map's kind.
        causal: whether key ``k`` is visible only to queries at positions ``q >= k``.
        local: chunk-local masks: the width ``W`` of ``q // W == k // W``; 0 otherwise.
        normalize: divide by the denominator ``Σ a_ij + eps``.
        eps: the denominator's ``eps`` (runtime argument).
        chunk: positions per chunk: ``tiles.chunk``'s first candidate (a GPU call may take a
            later one, see :meth:`LinearAttentionOp.chunk_for`).
        features: performer only: ``m``.
        performer_norm: ``1/sqrt(m)`` as Python source (``1.0`` for other maps).
    """

    spec_name: str
    spec_digest: str
    feature_map: str
    causal: bool
    local: int
    normalize: bool
    eps: float
    chunk: int
    features: int | None
    performer_norm: str


def make_linear_plan(spec: AttentionSpec) -> LinearPlan:
    """The plan of a validated linear spec.

    Raises:
        UnsupportedError: a mask the linear kernels cannot honour.
    """
    causal, local = linear_mask_form(spec)
    fm = spec.feature_map
    return LinearPlan(
        spec_name=spec.name,
        spec_digest=spec.digest(),
        feature_map=fm.kind,
        causal=causal,
        local=local,
        normalize=spec.normalize is not False,
        eps=spec.eps if spec.eps is not None else DEFAULT_EPS,
        chunk=spec.tiles.chunk[0],
        features=fm.features,
        performer_norm=repr(1.0 / math.sqrt(fm.features)) if fm.kind == "performer" else "1.0",
    )


class LinearAttentionOp:
    """A compiled linear-attention spec: call it like a function.

    ``op(q, k, v, *, return_lse=False)``

    Args (of a call):
        q: ``[B, H, T_Q, D_QK]``, float16, bfloat16 or float32, any strides.
        k: ``[B, H_KV, T_KV, D_QK]``, q's dtype; ``H % H_KV == 0`` (GQA: query head ``h``
            reads KV head ``h // (H // H_KV)``, and dK, dV sum over the group).
        v: ``[B, H_KV, T_KV, D_V]``, q's dtype.
        return_lse: not available: linear attention has no log-sum-exp.

    A call returns ``o [B, H, T_Q, D_V]`` in q's dtype and is differentiable in q, k and v
    (no second derivative). Under ``torch.compile`` it calls the custom ops
    ``attngen::linear_fwd`` / ``attngen::linear_bwd`` (fake implementations and registered
    autograd, so ``fullgraph=True`` traces through it); eager calls run the same
    implementations through a plain autograd function. Positions follow the spec's
    ``align``; a query that sees no key returns 0. Features, states and accumulators are
    float32; dot operands are bfloat16 for bfloat16 inputs and float32 otherwise (TF32 on
    the GPU for float16 inputs). With GQA the group's dK and dV shares are added with
    float32 atomics, so their last bits may vary run to run on a GPU.

    The performer map's random features ``W [m, D_QK]`` are drawn on the host from
    ``seed + draw`` (:func:`attngen.features.performer_features`): ``draw`` is 0 on every
    call with ``redraw: never`` and counts the calls with ``redraw: per_call``;
    ``op.last_draw`` is the draw of the latest call (pass it to the reference as
    ``draw=``), and the backward uses the features of its own forward.

    Raises (at call time):
        ShapeError: as :class:`~attngen.op.AttentionOp`; also ``D_QK`` over 32 with taylor2
            (``1 + D + D²`` features).
        UnsupportedError: ``return_lse=True``; CPU tensors without ``TRITON_INTERPRET=1``;
            ``redraw: per_call`` under ``torch.compile`` (a traced graph would keep one draw).
    """

    def __init__(self, spec: AttentionSpec, module: ModuleType, kernel_file: Path, plan: LinearPlan, source_digest: str) -> None:
        self.spec = spec
        self.module = module
        self.kernel_file = kernel_file
        self.plan = plan
        self.source_digest = source_digest
        self.last_draw: int | None = None
        self._calls = 0
        self._lock = threading.Lock()
        self._features: dict[tuple[str, int, int], torch.Tensor] = {}
        self.op_id = f"{spec.name}-{plan.spec_digest[:12]}-{Path(kernel_file).stem[-16:]}-{_REVISION}"
        _ensure_registered()
        _REGISTRY[self.op_id] = self

    def __repr__(self) -> str:
        return f"LinearAttentionOp({self.spec.name!r}, kernels={str(self.kernel_file)!r})"

    def __call__(self, q, k, v, *, return_lse: bool = False, **inputs):
        if return_lse:
            raise UnsupportedError("return_lse: linear attention has no log-sum-exp; call without return_lse")
        dims, _ = check_call(self.spec, q, k, v, inputs)
        if self.plan.feature_map == "taylor2" and dims["D_QK"] > TAYLOR2_MAX_DIM:
            raise ShapeError(
                f"D_QK={dims['D_QK']}: the taylor2 feature map expands a head dim D to 1 + D + D² features and supports "
                f"D_QK up to {TAYLOR2_MAX_DIM}; project q and k to a small dim first (Based uses 16)"
            )
        if torch.compiler.is_compiling():  # the custom op: traceable, with a fake implementation
            if self.spec.feature_map.redraw == "per_call":
                raise UnsupportedError("feature_map.redraw: per_call draws new features on the host at every call, which a "
                                       "compiled graph would freeze; use redraw: never under torch.compile")
            # w=None: the op's implementation fetches the fixed draw itself, outside the trace
            o, _ = torch.ops.attngen.linear_fwd(q, k, v, None, self.op_id)
            return o
        return _LinearAttention.apply(q, k, v, self._draw_features(dims["D_QK"], q.device), self.op_id)

    def _draw_features(self, d_qk: int, device: torch.device) -> torch.Tensor | None:
        """The performer's ``sqrt(s) W`` for this eager call (float32, contiguous), else None."""
        fm = self.spec.feature_map
        if fm.kind != "performer":
            return None
        with self._lock:
            draw = self._calls if fm.redraw == "per_call" else 0
            self._calls += 1
            self.last_draw = draw
        return self._features_for(d_qk, device, draw)

    def _features_for(self, d_qk: int, device: torch.device, draw: int) -> torch.Tensor:
        """``sqrt(s) W`` of one draw; draw 0 (``redraw: never``) is kept per head dim and device."""
        fm = self.spec.feature_map
        key = (str(device), d_qk, draw)
        with self._lock:
            w = self._features.get(key)
        if w is None:
            w = performer_features(fm.features, d_qk, (fm.seed or 0) + draw, device=device)
            w = (w * math.sqrt(feature_scale(self.spec, d_qk))).contiguous()
            if fm.redraw != "per_call":  # a per-call draw is used once
                with self._lock:
                    self._features[key] = w
        return w

    def kernel(self, name: str, device: torch.device):
        """The kernel ``name`` for tensors on ``device``.

        Raises:
            UnsupportedError: CPU tensors while Triton's interpreter is off.
        """
        return kernel_of(self.module, name, device)

    def _fixed(self, w, q) -> torch.Tensor | None:
        """``w``, or for a performer call made through the custom op (``w`` None) the fixed draw."""
        if w is None and self.plan.feature_map == "performer":
            return self._features_for(q.shape[3], q.device, 0)
        return w

    def chunk_for(self, dims: dict[str, int], dtype: torch.dtype, device: torch.device) -> int:
        """The chunk of a call: on a GPU the first of ``tiles.chunk``'s candidates whose
        estimated shared memory fits the device (:func:`shared_memory_estimate`), else the
        smallest; under the interpreter the first candidate."""
        candidates = self.spec.tiles.chunk
        if device.type != "cuda":
            return candidates[0]
        props = torch.cuda.get_device_properties(device)
        budget = getattr(props, "shared_memory_per_block_optin", 0) or 232448
        for chunk in candidates:
            if shared_memory_estimate(self.plan.feature_map, dims, dtype, chunk, self.plan.features) <= budget:
                return chunk
        return min(candidates)

    def _launch_args(self, q, k, v, w) -> tuple[list[Any], dict[str, Any]]:
        import triton.language as tl  # not at import: TRITON_INTERPRET is read when Triton loads

        B, H, T_Q, D_QK = q.shape
        H_KV, T_KV, D_V = k.shape[1], k.shape[2], v.shape[3]
        F = feature_count(self.plan.feature_map, D_QK, self.plan.features)
        bf16 = q.dtype == torch.bfloat16
        runtime = [H, T_Q, T_KV, position_offset(self.spec, T_Q, T_KV), feature_scale(self.spec, D_QK), self.plan.eps]
        constexprs = dict(
            GROUP=H // H_KV, D_QK=D_QK, D_V=D_V, F=F,
            BLOCK_DQK=head_block(D_QK), BLOCK_DV=head_block(D_V), BLOCK_F=head_block(F),
            CHUNK=self.chunk_for({"H": H, "H_KV": H_KV, "D_QK": D_QK, "D_V": D_V}, q.dtype, q.device),
            # as the softmax kernels: IEEE float32 for float32 inputs, TF32 (as precise as
            # float16) for the float32 operands of float16 inputs; bfloat16 operands ignore it
            DOT_DTYPE=tl.bfloat16 if bf16 else tl.float32, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            EMULATE_BF16_DOT=bf16 and config.interpret_all(), num_warps=NUM_WARPS,
        )  # fmt: skip
        return runtime, constexprs

    def forward_impl(self, q, k, v, w):
        """Run the forward kernel; return ``o [B, H, T_Q, D_V]`` (q's dtype) and the
        denominator ``[B, H, T_Q]`` (float32; an empty tensor without ``normalize``)."""
        B, H, T_Q, _ = q.shape
        w = self._fixed(w, q)
        o = _new_output((B, H, T_Q, v.shape[3]), q.dtype, q.device)
        den = _new_output((B, H, T_Q) if self.plan.normalize else (0,), torch.float32, q.device)
        runtime, constexprs = self._launch_args(q, k, v, w)
        self.kernel("linear_fwd", q.device)[(H, B)](
            q, k, v, o, den, den if w is None else w,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            *runtime, **constexprs,
        )  # fmt: skip
        return o, den

    def backward_impl(self, do, q, k, v, o, den, w):
        """dq, dk, dv (in the inputs' dtypes) for the output gradient ``do``."""
        H, H_KV = q.shape[1], k.shape[1]
        w = self._fixed(w, q)
        runtime, constexprs = self._launch_args(q, k, v, w)
        fw = den if w is None else w
        dq = _new_output(q.shape, q.dtype, q.device)
        self.kernel("linear_bwd_dq", q.device)[(H, q.shape[0])](
            q, k, v, o, den, fw, do, dq,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(),
            *runtime, **constexprs,
        )  # fmt: skip
        if H == H_KV:
            dk, dv = _new_output(k.shape, k.dtype, k.device), _new_output(v.shape, v.dtype, v.device)
        else:  # the group's query heads add their shares with float32 atomics
            dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
            dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        self.kernel("linear_bwd_dkdv", q.device)[(H, q.shape[0])](
            q, k, v, o, den, fw, do, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            *runtime, **constexprs,
        )  # fmt: skip
        return dq, dk.to(k.dtype), dv.to(v.dtype)


def shared_memory_estimate(kind: str, dims: dict[str, int], dtype: torch.dtype, chunk: int, features: int | None = None) -> int:
    """Bytes of shared memory the dK/dV kernel (the largest of the three) needs on an sm_90
    GPU: the dot operands ``φ(Q_c), φ(K_c)`` ``[C, F]``, ``V_c, dnum`` ``[C, D_V]``, the state
    ``[F, D_V]`` and ``A, dA`` ``[C, C]`` in the dot dtype, taylor2's three float32 selection
    matrices, and with GQA the float32 dK, dV tiles of the atomics. Fitted to Triton 3.6's
    ``metadata.shared`` of the kernels compiled ahead for sm_90 without a GPU: on the eight
    cases measured it was between 0.3% under and 22% over."""
    block_dqk, block_dv = head_block(dims["D_QK"]), head_block(dims["D_V"])
    block_f = head_block(feature_count(kind, dims["D_QK"], features))
    width = 2 if dtype == torch.bfloat16 else 4
    elements = 2 * chunk * block_f + 2 * chunk * block_dv + block_f * block_dv + 2 * chunk * chunk
    extra = 3 * block_dqk * block_f * 4 if kind == "taylor2" else 0
    if dims["H"] != dims["H_KV"]:
        extra += 2 * chunk * max(block_dqk, block_dv) * 4
    return elements * width + extra


class _LinearAttention(torch.autograd.Function):
    """Eager calls of :class:`LinearAttentionOp`: the custom ops' implementations as a plain
    autograd function (no dispatcher cost per call). Saves q, k, v, o, the denominator and
    the performer features of the call."""

    @staticmethod
    def forward(ctx, q, k, v, w, op_id):
        o, den = _REGISTRY[op_id].forward_impl(q, k, v, w)
        _save(ctx, op_id, q, k, v, o, den, w)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, den, w = ctx.saved_tensors
        dq, dk, dv = _REGISTRY[ctx.op_id].backward_impl(do, q, k, v, o, den, w)
        if torch.is_grad_enabled():  # create_graph=True: a second derivative must fail loudly
            dq, dk, dv = _NoSecondDerivative.apply(dq, dk, dv, q, k, v)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------
# torch.library registration (once, on the first compile of a linear spec)


def _save(ctx, op_id: str, q, k, v, o, den, w) -> None:
    ctx.op_id = op_id
    ctx.save_for_backward(q, k, v, o, den, w)


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor | None, op_id: str):
    return _REGISTRY[op_id].forward_impl(q, k, v, w)


def _fwd_fake(q, k, v, w, op_id):
    B, H, T_Q, _ = q.shape
    den = q.new_empty((B, H, T_Q) if _REGISTRY[op_id].plan.normalize else (0,), dtype=torch.float32)
    return q.new_empty((B, H, T_Q, v.shape[3])), den


def _bwd(do, q, k, v, o, den, w, op_id):
    return _REGISTRY[op_id].backward_impl(do, q, k, v, o, den, w)


def _bwd_fake(do, q, k, v, o, den, w, op_id):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, w, op_id = inputs
    _save(ctx, op_id, q, k, v, *output, w)


def _backward(ctx, do, dden):
    q, k, v, o, den, w = ctx.saved_tensors
    dq, dk, dv = torch.ops.attngen.linear_bwd(do, q, k, v, o, den, w, ctx.op_id)
    return dq, dk, dv, None, None


def _ensure_registered() -> None:
    global _REGISTERED
    with _REGISTER_LOCK:
        if _REGISTERED:
            return
        fwd = _custom_op("linear_fwd", _fwd, _fwd_fake, "(Tensor q, Tensor k, Tensor v, Tensor? w, str op_id) -> (Tensor, Tensor)")
        _custom_op(
            "linear_bwd", _bwd, _bwd_fake,
            "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor den, Tensor? w, str op_id) -> (Tensor, Tensor, Tensor)",
        )  # fmt: skip
        fwd.register_autograd(_backward, setup_context=_setup_context)
        _REGISTERED = True
