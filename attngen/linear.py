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
  and backwards for dK/dV with the reverse state ``R = Σ φ(q)ᵀ dnum``, ``r = Σ φ(q) dden``
  (``dden = −(do·o)/(den + eps)`` comes from ``linear_bwd_prep``, one pass over the rows).

The state need not fit one program: a launch (:class:`LinearLaunch`) splits the features
into blocks of ``block_f`` and the value head into blocks of ``block_v``, one program per
pair. Every output is linear in the per-feature products ``φ_f(q_i) φ_f(k_j)`` and in the
value columns of ``dA = dnum vᵀ``, so the programs' shares add up to it (taylor2's
``1 + D + D²`` features, 1057 at ``D_QK = 32``, run as up to nine blocks of 128).

The softmax IR (lower, passes, tile classification) does not apply: a linear spec's plan is
made straight from the spec by :func:`make_linear_plan`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from . import config
from .args import check_call, is_int, position_offset
from .errors import ShapeError, UnsupportedError
from .features import ELEMENTWISE_MAPS, TAYLOR2_MAX_DIM, feature_count, feature_scale, performer_features
from .op import _custom_op, _new_output, _NoSecondDerivative, kernel_of
from .schema import DEFAULT_EPS, AttentionSpec, linear_mask_form
from .tiles import head_block
from .tune import DeviceInfo

#: warps per program of the linear kernels (no tuner for them yet)
NUM_WARPS = 4
#: the kernels whose launch is chosen per call (``linear_bwd_prep`` has no dot and fits anywhere)
KERNELS = ("linear_fwd", "linear_bwd_dq", "linear_bwd_dkdv")
#: pipeline depths tried for every chunk and block shape, deepest first (Triton's default on
#: sm_90 is 3); a depth of 1 (no pipelining) only once nothing fits with these
STAGES = (3, 2)
#: the widest feature or value block of one program: its float32 state [BLOCK_F, BLOCK_DV]
#: then takes 32 registers a thread at NUM_WARPS = 4, leaving room for the chunk's [CHUNK,
#: CHUNK] scores and [CHUNK, BLOCK] operands (128 x 128 states take 128 registers a thread for
#: the state alone, which spills); wider heads run as several programs whose shares add up
MAX_STATE_BLOCK = 64
#: programs per multiprocessor that splitting a causal walk into segments aims for
SEGMENT_WAVES = 2
#: the fewest chunks a segment of a causal walk takes
MIN_SEGMENT_CHUNKS = 4
#: bytes of shared memory a program may use on sm_90 (H100, H200) with the opt-in limit; the
#: interpreter plans for it, so a CPU run takes the launches an H200 would
SM90_SHARED_MEMORY = 232448
#: elements of one [rows, BLOCK_DV] tile of ``linear_bwd_prep``
PREP_TILE = 4096
#: a GPU compiles a candidate launch to check it unless its estimate exceeds the budget by
#: more than this factor (the estimate is rough, see :func:`shared_memory_estimate`; a
#: rejected compile costs its time once, as Triton keeps compiled kernels on disk)
ESTIMATE_SLACK = 1.2

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
        elementwise: the map works column by column (identity, elu1, relu), so feature ``f``
            is input column ``f`` and a program of a feature block reads only its columns.
        causal: whether key ``k`` is visible only to queries at positions ``q >= k``.
        local: chunk-local masks: the width ``W`` of ``q // W == k // W``; 0 otherwise.
        normalize: divide by the denominator ``Σ a_ij + eps``.
        eps: the denominator's ``eps`` (runtime argument).
        chunks: ``tiles.chunk``, the candidate positions per chunk in order of preference
            (a call takes the first that fits, see :func:`launch_candidates`).
        features: performer only: ``m``.
        performer_norm: ``1/sqrt(m)`` as Python source (``1.0`` for other maps).
    """

    spec_name: str
    spec_digest: str
    feature_map: str
    elementwise: bool
    causal: bool
    local: int
    normalize: bool
    eps: float
    chunks: tuple[int, ...]
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
        elementwise=fm.kind in ELEMENTWISE_MAPS,
        causal=causal,
        local=local,
        normalize=spec.normalize is not False,
        eps=spec.eps if spec.eps is not None else DEFAULT_EPS,
        chunks=tuple(spec.tiles.chunk),
        features=fm.features,
        performer_norm=repr(1.0 / math.sqrt(fm.features)) if fm.kind == "performer" else "1.0",
    )


@dataclass(frozen=True)
class LinearLaunch:
    """The launch parameters of one linear kernel.

    Attributes:
        chunk: positions per chunk (one of the spec's ``tiles.chunk``).
        block_f: features per program; a call has ``N_F = ceil(F / block_f)`` feature blocks.
        block_v: value columns per program; ``N_V = ceil(D_V / block_v)`` value blocks.
        num_stages: Triton's software-pipeline depth.
    """

    chunk: int
    block_f: int
    block_v: int
    num_stages: int

    def blocks(self, features: int, d_v: int) -> tuple[int, int]:
        """``(N_F, N_V)`` for ``features`` features and value head dim ``d_v``."""
        return _cdiv(features, self.block_f), _cdiv(d_v, self.block_v)


def launch_candidates(plan: LinearPlan, d_qk: int, d_v: int) -> list[LinearLaunch]:
    """Every launch a call's kernels may take, most preferred first.

    The spec's chunks in order; per chunk the block shapes ``(block_f, block_v)`` (powers of
    two from the padded feature count and ``D_V``, capped at :data:`MAX_STATE_BLOCK`, down to
    16, adjusted by :func:`_launchable`: the value block at least the feature block, and a
    feature block of 16 only with a value block of 16) with the fewest programs ``N_F · N_V``
    first, the wider feature block first among equals (value blocks keep the normalisation
    inside the forward kernel); per shape the depths of :data:`STAGES`. Then all of that
    again with one stage.
    """
    features = feature_count(plan.feature_map, d_qk, plan.features)
    shapes = sorted(
        {_launchable(f, v) for f, v in itertools.product(_halvings(features), _halvings(d_v))},
        key=lambda s: (_cdiv(features, s[0]) * _cdiv(d_v, s[1]), -s[0], s[1]),
    )
    return [
        LinearLaunch(chunk, block_f, block_v, stages)
        for depths in (STAGES, (1,))
        for chunk in plan.chunks
        for block_f, block_v in shapes
        for stages in depths
    ]


def _halvings(n: int) -> list[int]:
    """Block widths for ``n`` columns: ``head_block(n)`` capped at MAX_STATE_BLOCK, halved down to 16."""
    width, floor, out = min(head_block(n), MAX_STATE_BLOCK), head_block(1), []
    while width >= floor:
        out.append(width)
        width //= 2
    return out or [floor]


def _launchable(block_f: int, block_v: int) -> tuple[int, int]:
    """The block shape a launch takes for ``(block_f, block_v)``, around two Triton 3.6
    miscompiles seen on the H200:

    * a value block narrower than the feature block is raised to it (padding value
      columns): feature blocks of 64 or 128 against value blocks of 16 raised illegal memory
      accesses, as the softmax kernels did with BLOCK_DV < BLOCK_DQK
      (:func:`attngen.tiles.head_blocks`);
    * a feature block of 16 against a wider value block is raised to 32 (padding feature
      columns): with value blocks of 32, compute-sanitizer caught ``linear_bwd_dq`` making a
      512-byte read outside its shared memory in a ``tl.dot`` (relu features, D_QK = 8,
      D_V = 24), and the case faulted in 2 to 8 of 8 processes. Under the sanitizer 16 x 16
      and 32 x 64 read nothing outside it; 32 x 32, which this rule gives that case, ran
      clean in 8 of 8 processes but was not run under the sanitizer. Value blocks wider than
      32 against 16 features were never seen to fault; they are raised too, as a precaution.
      (Narrowing the value block to 16 instead would split the value columns over more
      programs: the one-key bf16 test, whose dq and dk must cancel to 1e-4, then fails at
      D_V = 80.)
    """
    if block_f == 16 and block_v > 16:
        block_f = 32
    return block_f, max(block_v, block_f)


def shared_memory_budget(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device``: a GPU's opt-in limit per
    block, read from the device; under the interpreter :data:`SM90_SHARED_MEMORY`."""
    if device.type != "cuda":
        return SM90_SHARED_MEMORY
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or SM90_SHARED_MEMORY


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
    float32; dot operands are bfloat16 for bfloat16 inputs and float32 otherwise (IEEE
    float32 products, also for float16 inputs).

    Each kernel runs with the first of :func:`launch_candidates` that fits the device's
    shared memory (:meth:`choose_launch`, :func:`shared_memory_budget`): on a GPU, the first
    whose compiled kernel needs no more than the device allows (Triton's own
    ``metadata.shared``; only candidates :func:`shared_memory_estimate` puts near enough are
    compiled), remembered per kernel, head dims, dtype and device; under the interpreter the
    first whose estimate fits sm_90. Where a launch splits the features or the value head over
    several programs, or with GQA, each program stores its share of an output in a float32
    slice and the host adds the slices up (no atomics: results do not vary run to run).

    The performer map's random features ``W [m, D_QK]`` are drawn on the host from
    ``seed + draw`` (:func:`attngen.features.performer_features`): ``draw`` is 0 on every
    call with ``redraw: never`` and counts the calls with ``redraw: per_call``;
    ``op.last_draw`` is the draw of the latest call (pass it to the reference as
    ``draw=``), and the backward uses the features of its own forward.

    Raises (at call time):
        ShapeError: as :class:`~attngen.op.AttentionOp`; also ``D_QK`` over 32 with taylor2
            (``1 + D + D²`` features).
        UnsupportedError: ``return_lse=True``; CPU tensors without ``TRITON_INTERPRET=1``;
            ``redraw: per_call`` under ``torch.compile`` (a traced graph would keep one draw);
            a GPU whose shared memory holds no launch of a kernel.
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
        self._launches: dict[tuple[str, int, int, torch.dtype, str], LinearLaunch] = {}
        self._blocks: tuple[int, int] | None = None
        self._segments: int | None = None
        self.op_id = f"{spec.name}-{plan.spec_digest[:12]}-{Path(kernel_file).stem[-16:]}-{_REVISION}"
        _ensure_registered()
        _REGISTRY[self.op_id] = self

    def __repr__(self) -> str:
        return f"LinearAttentionOp({self.spec.name!r}, kernels={str(self.kernel_file)!r})"

    def decode(self, *args, **kwargs):
        """Not available: split-KV decoding merges partial results by their log-sum-exp,
        which linear attention does not have.

        Raises:
            UnsupportedError: always, naming what to call instead.
        """
        raise UnsupportedError(
            f"decode: spec {self.spec.name!r} uses the linear normaliser; split-KV decoding merges partial results "
            "by their log-sum-exp, which only softmax attention has. Call the operator itself on the valid part of "
            "the cache: op(q, k_cache[:, :, :n], v_cache[:, :, :n])"
        )

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
            return torch.ops.attngen.linear_fwd(q, k, v, None, self.op_id)[0]
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

    def set_blocks(self, block_f: int | None, block_v: int | None = None) -> None:
        """Make every kernel take ``block_f`` features and ``block_v`` value columns per
        program (powers of two from 16 to 128; each kernel still picks the chunk and the
        pipeline depth that fit), or with None go back to :func:`launch_candidates`' order.
        For measuring launches against each other (``bench --suite linear --blocks``).

        Raises:
            ValueError: a block that is not a power of two from 16 to 128, a value block
                narrower than the feature block, or a feature block of 16 with a wider value
                block.
        """
        if block_f is None:
            self._blocks = None
        else:
            self._blocks = check_blocks(block_f, block_v)
        self._launches.clear()

    def _fixed(self, w, q) -> torch.Tensor | None:
        """``w``, or for a performer call made through the custom op (``w`` None) the fixed draw."""
        if w is None and self.plan.feature_map == "performer":
            return self._features_for(q.shape[3], q.device, 0)
        return w

    def choose_launch(
        self, name: str, d_qk: int, d_v: int, dtype: torch.dtype, budget: int, compiled_shared: Callable[[LinearLaunch], int] | None = None
    ) -> LinearLaunch:
        """The launch of kernel ``name`` (one of :data:`KERNELS`) for head dims ``d_qk``, ``d_v``
        and inputs of ``dtype`` under ``budget`` bytes of shared memory per program.

        Walks :func:`launch_candidates` in order, passing over those whose
        :func:`shared_memory_estimate` exceeds the budget by more than :data:`ESTIMATE_SLACK`
        (the estimate is rough: Triton's allocator decides). With ``compiled_shared`` (a launch
        -> ``metadata.shared`` of the kernel compiled for it, as a GPU call passes) the first
        candidate that needs at most ``budget`` when compiled; without it (the interpreter) the
        first whose estimate fits, else the last (the smallest).

        Raises:
            UnsupportedError: with ``compiled_shared``, no candidate fits the budget.
        """
        candidates = launch_candidates(self.plan, d_qk, d_v)
        if self._blocks is not None:
            candidates = [LinearLaunch(c, *self._blocks, stages) for stages in (*STAGES, 1) for c in self.plan.chunks]
        tried = []
        for launch in candidates:
            estimate = shared_memory_estimate(self.plan, name, d_qk, d_v, dtype, launch)
            if compiled_shared is None:
                if estimate <= budget:
                    return launch
            elif estimate <= budget * ESTIMATE_SLACK or launch == candidates[-1]:
                shared = compiled_shared(launch)
                if shared <= budget:
                    return launch
                tried.append(f"chunk {launch.chunk}, blocks {launch.block_f}x{launch.block_v}, {launch.num_stages} stages: {shared}")
        if compiled_shared is None:
            return candidates[-1]
        raise UnsupportedError(
            f"{name}: no launch fits the GPU's {budget} bytes of shared memory per program (compiled: {'; '.join(tried)}); "
            "use smaller head dims, or fewer features (taylor2's D_QK, performer's feature_map.features)"
        )

    def launch_for(self, name: str, d_qk: int, d_v: int, dtype: torch.dtype, device: torch.device) -> LinearLaunch:
        """The launch a call on ``device`` takes for kernel ``name``: the one chosen for an earlier
        call with these head dims and dtype, else :meth:`choose_launch` under
        :func:`shared_memory_budget` (checking compiled kernels on a GPU needs the call's
        tensors, so without an earlier call a GPU gets the estimate's choice here)."""
        chosen = self._launches.get((name, d_qk, d_v, dtype, str(device)))
        return chosen or self.choose_launch(name, d_qk, d_v, dtype, shared_memory_budget(device))

    def kernel_arguments(self, name: str, launch: LinearLaunch, q, k, v, *, w=None, den=None, dden=None, do=None,
                         init=None, n_seg: int = 1) -> tuple:
        """The launch of kernel ``name`` (one of :data:`KERNELS`, or a state kernel
        ``linear_state_fwd`` / ``linear_state_bwd``) with ``launch`` on these inputs, as
        ``(grid, args, constexprs, outputs)``, to run as ``kernel[grid](*args, **constexprs)``.

        ``n_seg`` segments of the sequence run side by side (:meth:`segment_count`); ``init``
        is then the ``(S0, Z0)`` states the segments start from (:meth:`initial_states`), and
        a state kernel's outputs are the per-segment sums ``(DS, DZ)``.

        ``w`` is the performer's ``sqrt(s) W`` (the fixed draw when None). ``den`` (the
        forward's denominator ``[B, H, T_Q]``), ``dden`` (``linear_bwd_prep``'s) and ``do`` are
        the backward kernels' inputs; left out, empty tensors of their shapes stand in (enough
        to compile a kernel ahead, not to run it).

        ``outputs`` are fresh buffers: the forward's ``(o, den)`` (``[N_F, ...]`` float32 shares
        when ``N_F > 1``); the backward kernels' ``dq`` or ``(dk, dv)``, each a ``(slices, out)``
        pair, with ``out`` the gradient itself where one program writes each element, else None
        and ``slices`` the float32 shares ``[N, B, H, T, D]``.
        """
        B, H, T_Q, D_QK = q.shape
        D_V = v.shape[3]
        F = feature_count(self.plan.feature_map, D_QK, self.plan.features)
        n_f, n_v = launch.blocks(F, D_V)
        rows = (B, H, T_Q) if self.plan.normalize else (0,)
        w = self._fixed(w, q)
        if den is None:
            den = torch.empty(rows, dtype=torch.float32, device=q.device)
        fw = den if w is None else w
        runtime = [H, T_Q, k.shape[2], position_offset(self.spec, T_Q, k.shape[2]), feature_scale(self.spec, D_QK), self.plan.eps]
        inputs = [*q.stride(), *k.stride(), *v.stride()]
        s0, z0 = init if init is not None else (den, den)  # unread placeholders with one segment
        if name not in ("linear_fwd", "linear_state_fwd"):  # the kernels that read the output gradient
            do = torch.empty((B, H, T_Q, D_V), dtype=q.dtype, device=q.device) if do is None else do
            dden = den if dden is None else dden
        save_o32 = False
        if name in ("linear_state_fwd", "linear_state_bwd"):
            width_f, width_v = n_f * launch.block_f, n_v * launch.block_v
            outputs = (torch.empty((n_seg, B, H, width_f, width_v), dtype=torch.float32, device=q.device),
                       torch.empty((n_seg, B, H, width_f), dtype=torch.float32, device=q.device))  # fmt: skip
            if name == "linear_state_fwd":
                args = [q, k, v, den, fw, *outputs, *inputs, *runtime]
            else:
                args = [q, k, v, den, fw, dden, do, *outputs, *inputs, *do.stride(), *runtime]
        elif name == "linear_fwd":
            if n_f == 1:  # o is final: normalised in the kernel
                o = _new_output((B, H, T_Q, D_V), q.dtype, q.device)
                slices, den_out = o.unsqueeze(0), _new_output(rows, torch.float32, q.device)
                save_o32 = self.plan.normalize and q.dtype != torch.float32
            else:  # each feature block's numerator and denominator, added up by forward_impl
                o = slices = _new_output((n_f, B, H, T_Q, D_V), torch.float32, q.device)
                den_out = _new_output((n_f, *rows) if self.plan.normalize else rows, torch.float32, q.device)
            o32 = _new_output(o.shape, torch.float32, q.device) if save_o32 else o.new_empty((0,), dtype=torch.float32)
            args = [q, k, v, den_out, fw, slices, o32 if save_o32 else slices, s0, z0, *inputs, *slices.stride(), *runtime]
            outputs = (o, den_out, o32)
        else:
            group = H // k.shape[1]
            shares = n_v if self.plan.elementwise else n_f * n_v  # slices of dq and dk
            if name == "linear_bwd_dq":
                outputs = _slices(shares, 1, q)
                out_args = [outputs[0], s0, z0, *inputs, *do.stride(), *outputs[0].stride()]
            else:
                outputs = (_slices(shares, group, k), _slices(n_f, group, v))
                dk, dv = outputs[0][0], outputs[1][0]
                out_args = [dk, dv, s0, z0, *inputs, *do.stride(), *dk.stride(), *dv.stride()]
            args = [q, k, v, den, fw, dden, do, *out_args, *runtime]

        bf16 = q.dtype == torch.bfloat16
        constexprs = dict(
            GROUP=H // k.shape[1], D_QK=D_QK, D_V=D_V, F=F,
            BLOCK_DQK=launch.block_f if self.plan.elementwise else head_block(D_QK), BLOCK_DV=launch.block_v,
            BLOCK_F=launch.block_f, N_V=n_v, N_F=n_f, CHUNK=launch.chunk,
            # IEEE float32 for the float32 operands of float32 and float16 inputs (bfloat16
            # operands ignore it): TF32 rounds the state and the features to 10 mantissa bits,
            # which left the performer's float16 outputs over the three-way bound on the H200
            # (zoo, D=128, T=1000: 7.7e-3 against 6.9e-3)
            DOT_DTYPE=_dot_dtype(q.dtype), DOT_PRECISION="ieee",
            EMULATE_BF16_DOT=bf16 and config.interpret_all(), N_SEG=n_seg, num_warps=NUM_WARPS, num_stages=launch.num_stages,
        )  # fmt: skip
        if name == "linear_fwd":
            constexprs["SAVE_O32"] = save_o32
        return (n_seg * n_f * n_v, H, B), args, constexprs, outputs

    def _run(self, name: str, q, k, v, **tensors):
        """Run kernel ``name`` with the call's launch (see the class) and return its outputs
        (as :meth:`kernel_arguments`, which also takes ``tensors``)."""
        D_QK, D_V = q.shape[3], v.shape[3]
        key = (name, D_QK, D_V, q.dtype, str(q.device))
        kernel = self.kernel(name, q.device)
        launch = self._launches.get(key)
        if launch is None:

            def compiled_shared(candidate: LinearLaunch) -> int:  # compiles without launching
                grid, args, constexprs, _ = self.kernel_arguments(name, candidate, q, k, v, **tensors)
                compiled = kernel.warmup(*args, grid=grid, **constexprs)
                return (compiled.result() if hasattr(compiled, "result") else compiled).metadata.shared

            gpu = q.device.type == "cuda"
            launch = self.choose_launch(name, D_QK, D_V, q.dtype, shared_memory_budget(q.device), compiled_shared if gpu else None)
            self._launches[key] = launch
        n_seg = self.segment_count(name, launch, q, k, v)
        init = self.initial_states(name, launch, n_seg, q, k, v, **tensors) if n_seg > 1 else None
        grid, args, constexprs, outputs = self.kernel_arguments(name, launch, q, k, v, init=init, n_seg=n_seg, **tensors)
        kernel[grid](*args, **constexprs)
        return outputs

    def segment_count(self, name: str, launch: LinearLaunch, q, k, v) -> int:
        """Segments of the sequence that kernel ``name`` runs side by side (1: one walk).

        Only causal maps without chunk-local blocks, whose carried state is a plain sum, are
        split. On a GPU, enough segments for about :data:`SEGMENT_WAVES` programs per
        multiprocessor when ``B · H · N_F · N_V`` programs alone would not fill it, each
        segment at least :data:`MIN_SEGMENT_CHUNKS` chunks long; on the CPU 1. The count set
        with :meth:`set_segments` (tests, measurements) overrides the choice.
        """
        if not self.plan.causal or self.plan.local:
            return 1
        B, H, T_Q, D_QK = q.shape
        T_KV = k.shape[2]
        offset = position_offset(self.spec, T_Q, T_KV)
        if name in ("linear_bwd_dkdv", "linear_state_bwd"):
            n_chunks = _cdiv(max(offset + T_Q, T_KV), launch.chunk)
        else:
            n_chunks = _cdiv(offset + T_Q - min(offset, 0), launch.chunk)
        if self._segments is not None:
            return max(1, min(self._segments, n_chunks))
        if q.device.type != "cuda":
            return 1
        n_f, n_v = launch.blocks(feature_count(self.plan.feature_map, D_QK, self.plan.features), v.shape[3])
        programs = B * H * n_f * n_v
        processors = DeviceInfo.of(q.device).sm_count
        if programs >= processors:
            return 1
        return max(1, min(SEGMENT_WAVES * processors // programs, n_chunks // MIN_SEGMENT_CHUNKS))

    def initial_states(self, name: str, launch: LinearLaunch, n_seg: int, q, k, v, **tensors) -> tuple:
        """``(S0, Z0)``: the state each of ``n_seg`` segments of kernel ``name`` starts from.

        A state kernel sums each segment's keys (``linear_state_fwd``, for the forward and dQ
        kernels) or queries (``linear_state_bwd``, for the reverse dK/dV walk) from zero, in
        float32; the host takes the exclusive prefix sum over the segments (suffix sum for
        the reverse walk), which is the walk's state where the segment begins.
        """
        reverse = name == "linear_bwd_dkdv"  # the later segments' queries: a suffix sum
        state = "linear_state_bwd" if reverse else "linear_state_fwd"
        grid, args, constexprs, (ds, dz) = self.kernel_arguments(state, launch, q, k, v, n_seg=n_seg, **tensors)
        self.kernel(state, q.device)[grid](*args, **constexprs)
        return _exclusive_sum(ds, reverse), _exclusive_sum(dz, reverse)

    def set_segments(self, n: int | None) -> None:
        """Make causal kernels split the sequence into ``n`` segments (at most one per chunk),
        or with None go back to :meth:`segment_count`'s choice.

        Raises:
            ValueError: ``n`` is not a positive int.
        """
        if n is not None and (not is_int(n) or n < 1):
            raise ValueError(f"segments={n!r}: pass a positive int, or None to choose per call")
        self._segments = None if n is None else int(n)

    def forward_impl(self, q, k, v, w):
        """Run the forward kernel; return ``o [B, H, T_Q, D_V]`` (q's dtype), the denominator
        ``[B, H, T_Q]`` (float32; an empty tensor without ``normalize``) and, for a normalised
        map with 16-bit inputs, ``o`` in float32 for the backward (else an empty tensor): the
        backward's ``do · o`` must cancel against ``do · v`` to float32 accuracy."""
        o, den, o32 = self._run("linear_fwd", q, k, v, w=w)
        if o.dim() == 5:  # the feature blocks' shares
            num = o.sum(0)
            if self.plan.normalize:
                den = den.sum(0)
                num = num / (den + self.plan.eps)[..., None]
            o = num.to(q.dtype)
            if self.plan.normalize and q.dtype != torch.float32:
                o32 = num
        return o, den, o32

    def backward_impl(self, do, q, k, v, o, den, w):
        """dq, dk, dv (in the inputs' dtypes) for the output gradient ``do``; ``o`` is the
        forward's float32 output where it kept one (see :meth:`forward_impl`)."""
        group = q.shape[1] // k.shape[1]
        tensors = dict(w=w, den=den, dden=self._denominator_grad(do, o, den), do=do)
        dq = self._run("linear_bwd_dq", q, k, v, **tensors)
        dk, dv = self._run("linear_bwd_dkdv", q, k, v, **tensors)
        return _added(dq, 1, q), _added(dk, group, k), _added(dv, group, v)

    def _denominator_grad(self, do, o, den) -> torch.Tensor:
        """``dden = -(do · o) / (den + eps)`` ``[B, H, T_Q]`` float32 from ``linear_bwd_prep``;
        without ``normalize`` ``den`` itself (an empty placeholder the kernels never read)."""
        if not self.plan.normalize:
            return den
        B, H, T_Q, D_V = o.shape
        block_dv = head_block(D_V)
        rows = max(16, min(128, PREP_TILE // block_dv))
        dden = torch.empty((B, H, T_Q), dtype=torch.float32, device=o.device)
        self.kernel("linear_bwd_prep", o.device)[(_cdiv(T_Q, rows), H, B)](
            o, do, den, dden, *o.stride(), *do.stride(), H, T_Q, self.plan.eps,
            D_V=D_V, BLOCK_T=rows, BLOCK_DV=block_dv, DOT_DTYPE=_dot_dtype(do.dtype), num_warps=NUM_WARPS,
        )  # fmt: skip
        return dden


def shared_memory_estimate(plan: LinearPlan, name: str, d_qk: int, d_v: int, dtype: torch.dtype, launch: LinearLaunch) -> int:
    """A rough estimate of the bytes of shared memory kernel ``name`` (one of :data:`KERNELS`)
    needs on sm_90 with ``launch``, for head dims ``d_qk``, ``d_v`` and inputs of ``dtype``:

    * 0.9 × (``num_stages`` − 1) × the tiles of one chunk that feed dots, in the inputs'
      dtype (Triton's software pipeline keeps that many copies of them in flight);
    * 0.8 × the second operands of the chunk's dots (``[CHUNK, BLOCK_F]``, ``[BLOCK_F,
      BLOCK_DV]``, ...) in the dot dtype (2 bytes for bfloat16 inputs, else 4);
    * 0.9 × the float32 operands of taylor2's feature selection and the performer's
      projection (``[CHUNK, BLOCK_DQK]``, ``[BLOCK_DQK, BLOCK_F]``).

    Fitted to Triton 3.6's ``metadata.shared`` of 1,941 kernels with chunk and blocks of at
    least 32 compiled for sm_90 without a GPU: half within 16%, 90% within 39%. Triton's
    allocator packs buffers by their lifetimes, and no closed form follows it closely, so a
    GPU call takes the compiled kernel's own number (:meth:`LinearAttentionOp.choose_launch`);
    the estimate only decides which candidates are worth compiling, and the interpreter's
    choice.
    """
    C, F, V = launch.chunk, launch.block_f, launch.block_v
    X = F if plan.elementwise else head_block(d_qk)  # the q and k columns a program reads
    if name == "linear_fwd":
        tiles = 2 * C * X + C * V if plan.causal else max(C * X + C * V, C * X)
        operands = F * C + F * V + 2 * C * V if plan.causal else C * V + F * V
    elif name == "linear_bwd_dq":
        x_q = 0 if plan.elementwise else C * X  # an elementwise map's q rows feed no dot here
        tiles = C * X + x_q + 2 * C * V if plan.causal else max(C * X + C * V, x_q + C * V)
        operands = 2 * C * V + V * F + C * F if plan.causal else C * V + V * F
    else:
        tiles = 2 * C * X + 2 * C * V if plan.causal else C * X + C * V
        operands = 2 * F * C + 3 * C * V + 2 * F * V if plan.causal else C * V + 2 * F * V
    mm32 = 0 if plan.elementwise else 4 * (C * X + X * F)
    dot_bytes = 2 if dtype == torch.bfloat16 else 4
    return int(0.9 * (launch.num_stages - 1) * tiles * dtype.itemsize + 0.8 * operands * dot_bytes + 0.9 * mm32)


def check_blocks(block_f: Any, block_v: Any) -> tuple[int, int]:
    """``(block_f, block_v)`` as ints, if both are powers of two from 16 to 128, the value
    block is at least the feature block, and a feature block of 16 comes with a value block
    of 16 (:func:`_launchable`; :meth:`LinearAttentionOp.set_blocks`, ``bench --blocks``).

    Raises:
        ValueError: naming the block and what it must be.
    """
    for name, b in (("block_f", block_f), ("block_v", block_v)):
        if not is_int(b) or b < 16 or b > 128 or b & (b - 1):
            raise ValueError(f"{name}={b!r}: pass a power of two from 16 to 128")
    if block_v < block_f:
        raise ValueError(f"block_v={block_v} < block_f={block_f}: the value block may not be narrower than the "
                         "feature block (such launches raised illegal memory accesses on the H200)")
    if (block_f, block_v) != _launchable(block_f, block_v):
        raise ValueError(f"block_v={block_v} with block_f={block_f}: a feature block of 16 takes a value block of 16; "
                         "use block_f=32 (16 x 32 read outside shared memory on the H200, Triton 3.6; wider value "
                         "blocks are refused as a precaution)")
    return int(block_f), int(block_v)


def _exclusive_sum(x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Along dim 0: the sum of the entries before each one (after it, with ``reverse``)."""
    if reverse:
        return _exclusive_sum(x.flip(0)).flip(0).contiguous()
    out = torch.zeros_like(x)
    out[1:] = torch.cumsum(x[:-1], 0)
    return out


def _dot_dtype(dtype: torch.dtype):
    """The kernels' dot operand dtype: bfloat16 for bfloat16 inputs, else float32."""
    import triton.language as tl  # not at import: TRITON_INTERPRET is read when Triton loads

    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _slices(n: int, group: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(slices, out)`` for the gradient of ``like``: where one program writes each element
    (``n == 1``, no GQA group) ``out`` is the gradient itself and ``slices`` its
    ``[1, B, H, T, D]`` view; else ``out`` is None and ``slices`` holds ``n`` float32 shares
    per query head, ``[n, B, H_KV · group, T, D]``, that :func:`_added` adds up."""
    if n == 1 and group == 1:
        out = _new_output(like.shape, like.dtype, like.device)
        return out.unsqueeze(0), out
    B, heads, T, D = like.shape
    return _new_output((n, B, heads * group, T, D), torch.float32, like.device), None


def _added(shares: tuple[torch.Tensor, torch.Tensor | None], group: int, like: torch.Tensor) -> torch.Tensor:
    """The gradient of ``like`` from :func:`_slices`: ``out``, or the sum of the slices over
    the shares and each KV head's group of query heads, in ``like``'s dtype."""
    slices, out = shares
    if out is not None:
        return out
    B, heads, T, D = like.shape
    return slices.view(slices.shape[0], B, heads, group, T, D).sum((0, 3)).to(like.dtype)

class _LinearAttention(torch.autograd.Function):
    """Eager calls of :class:`LinearAttentionOp`: the custom ops' implementations as a plain
    autograd function (no dispatcher cost per call). Saves q, k, v, o, the denominator and
    the performer features of the call."""

    @staticmethod
    def forward(ctx, q, k, v, w, op_id):
        o, den, o32 = _REGISTRY[op_id].forward_impl(q, k, v, w)
        _save(ctx, op_id, q, k, v, o, den, o32, w)
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


def _save(ctx, op_id: str, q, k, v, o, den, o32, w) -> None:
    """Save what the backward reads: the float32 output where the forward kept one, else o."""
    ctx.op_id = op_id
    ctx.save_for_backward(q, k, v, o32 if o32.numel() else o, den, w)


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor | None, op_id: str):
    return _REGISTRY[op_id].forward_impl(q, k, v, w)


def _fwd_fake(q, k, v, w, op_id):
    B, H, T_Q, _ = q.shape
    normalize = _REGISTRY[op_id].plan.normalize
    den = q.new_empty((B, H, T_Q) if normalize else (0,), dtype=torch.float32)
    o32 = q.new_empty((B, H, T_Q, v.shape[3]) if normalize and q.dtype != torch.float32 else (0,), dtype=torch.float32)
    return q.new_empty((B, H, T_Q, v.shape[3])), den, o32


def _bwd(do, q, k, v, o, den, w, op_id):
    return _REGISTRY[op_id].backward_impl(do, q, k, v, o, den, w)


def _bwd_fake(do, q, k, v, o, den, w, op_id):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, w, op_id = inputs
    _save(ctx, op_id, q, k, v, *output, w)


def _backward(ctx, do, dden, do32):
    q, k, v, o, den, w = ctx.saved_tensors
    dq, dk, dv = torch.ops.attngen.linear_bwd(do, q, k, v, o, den, w, ctx.op_id)
    return dq, dk, dv, None, None


def _ensure_registered() -> None:
    global _REGISTERED
    with _REGISTER_LOCK:
        if _REGISTERED:
            return
        fwd = _custom_op("linear_fwd", _fwd, _fwd_fake, "(Tensor q, Tensor k, Tensor v, Tensor? w, str op_id) -> (Tensor, Tensor, Tensor)")
        _custom_op(
            "linear_bwd", _bwd, _bwd_fake,
            "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor den, Tensor? w, str op_id) -> (Tensor, Tensor, Tensor)",
        )  # fmt: skip
        fwd.register_autograd(_backward, setup_context=_setup_context)
        _REGISTERED = True
