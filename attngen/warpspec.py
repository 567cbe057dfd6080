"""The warp-specialised forward for Hopper GPUs (``templates/attention_ws.py.j2``, Gluon).

Triton 3.6's automatic warp specialisation hangs on the H200 for attention loops
(docs/perf-notes.md, "Warp specialisation through Triton 3.6"). Gluon, Triton's lower-level
language, states the split by hand, as FlashAttention-3 does (Shah et al., 2024): one
producer warp copies K and V tiles by TMA into a ring of shared-memory buffers guarded by
mbarriers, and two consumer warp groups of 64 query rows each run the online softmax with
``warpgroup_mma``, each issuing the next tile's Q Kᵀ before this tile's softmax. The kernel
visits the same key tiles as the Triton forward (the plan's closed-form tile ranges, masked
tiles first) and writes the same ``o`` and log-sum-exp, so the backward kernels are shared.

It runs where :func:`plan_supports` accepts the spec, :func:`call_supports` the call and
:func:`pays` the spec; everything else takes the Triton forward. ``ATTNGEN_WS=0`` turns it
off, ``ATTNGEN_WS=1`` runs it wherever it can run, whether it pays or not.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from types import ModuleType

import torch

from . import config
from .plan import ModulePlan
from .render import RenderedModule, _render

TEMPLATE = "attention_ws.py.j2"
KERNEL = "attn_fwd_ws"
BLOCK_Q = 128  # two consumer warp groups of 64 rows
BLOCK_KV = 128
STAGES = 2
NUM_WARPS = 4  # the default partition: consumer warp group 0
MAXNREG = 168  # setmaxnreg then gives the consumers 240 registers and the producer 24

#: names a mask expression may read in this kernel: positions, and the functions Gluon shares
#: with Triton's language under the same names (runtime-input reads ``ld<i>`` are checked apart)
_MASK_NAMES = {"pos_q", "pos_k", "tl", "where", "minimum", "maximum", "abs", "True", "False"}
#: names a score expression may read: the scaled score, positions, the same functions and
#: exponentials, and the helpers the template defines (sigmoid, fast_tanh's _tanh)
_SCORE_NAMES = _MASK_NAMES | {"s", "exp", "exp2", "log", "log2", "sqrt", "sigmoid", "_tanh", "FAST_SIGMOID"}
#: names a runtime-input read's address and bounds may use besides the input's own arguments
_LOAD_NAMES = {"pos_q", "pos_k", "off_b", "off_h", "tl", "to", "int64"}
#: the spec's names of kernel variables, for messages
_SPEC_NAMES = {"off_h": "h", "off_b": "b"}


def _names(code: str) -> set[str]:
    """The names ``code`` reads: identifiers not after a dot (attributes) or inside a number
    (the ``e`` of ``1e-05``)."""
    return set(re.findall(r"(?<![\w.])[A-Za-z_]\w*", code))


def plan_supports(plan: ModulePlan) -> str | None:
    """Why ``plan``'s forward cannot run warp-specialised, or None when it can: softmax, no
    strided (residue-order) part, a mask every position passes with itself (else every
    masked call needs ``attn_fwd``'s guard for keys no query sees), and a mask and score
    modification built from the score ``s``, the positions, runtime-input reads indexed by
    batch entry, head and positions, and functions Gluon has. The tile ranges may depend on
    runtime inputs (documents) through the metadata kernel's output, but not on an input
    read once per program. Calls of a ``recompute: store_p`` spec that store P run
    ``attn_fwd_sp`` whatever this says."""
    if plan.sigmoid:
        return "sigmoid normaliser"
    if plan.perm is not None:
        return "strided part"
    if plan.has_mask and not plan.sees_itself:
        return "the mask can hide a position from itself, so masked calls need attn_fwd's guard for unseen keys"
    loads = plan.fwd.outer_loads + plan.fwd.inner_loads
    reads = {ld.var for ld in loads}
    # the partitions evaluate the tile ranges before any runtime input is read
    ranged = sorted({ld.input for ld in loads if ld.var in _names(" ".join(plan.fwd_ranges.statements))})
    if ranged:
        return f"tile ranges read runtime input {', '.join(map(repr, ranged))} once per program"
    for ld in loads:
        own = {f"{ld.input}_ptr"} | {f"{ld.input}_{kind}_{d}" for kind in ("stride", "size") for d in range(8)}
        names = _names(" ".join(ld.offset_terms + ld.bound_codes))
        if not names <= _LOAD_NAMES | own | reads:
            return f"runtime input {ld.input!r} read at {sorted(names - _LOAD_NAMES - own - reads)}"
    names = _names(plan.mask_code)
    if not names <= _MASK_NAMES | reads:
        return f"mask reads {sorted(names - _MASK_NAMES - reads)}"
    names = _names(plan.score_code) if plan.has_score else set()
    if not names <= _SCORE_NAMES | reads:
        return f"score reads {sorted(_SPEC_NAMES.get(n, n) for n in names - _SCORE_NAMES - reads)}"
    return None


def pays(plan: ModulePlan) -> bool:
    """Whether the kernel is the default for a spec it can run: not when the tile ranges come
    from runtime inputs (documents). On the H200, at B = 1, H = 16, T = 16384, D = 128 with
    1000-token documents, it ran the forward at 195.5 TFLOP/s. The Triton forward ran at
    219.4 in an earlier run on the same kind of host, and FlexAttention at 210.5 in the same
    run as this kernel (docs/perf-notes.md). Programs of about 8 key tiles leave the
    pipeline little to overlap."""
    return plan.fwd_ranges.meta is None


def bound_names(plan: ModulePlan) -> list[str]:
    """What the kernel's ``_tile_bounds`` returns: the loop counts, then the segment starts and
    offsets that map a masked or unmasked loop index to a key tile (``tile_of`` in macros.j2)."""
    r = plan.fwd_ranges
    return (["n_masked", "n_full"] + [seg[0] for seg in r.masked] + [f"mc_{j}" for j in range(1, len(r.masked))]
            + [seg[0] for seg in r.full] + [f"fc_{j}" for j in range(1, len(r.full))])  # fmt: skip


def input_arg_names(plan: ModulePlan) -> list[str]:
    """The runtime-input arguments of the kernels, in launch order (``input_args`` in
    macros.j2): per input its pointer, then a stride and a size per dimension."""
    names = []
    for inp in plan.inputs:
        names.append(f"{inp.name}_ptr")
        for d in range(inp.rank):
            names += [f"{inp.name}_stride_{d}", f"{inp.name}_size_{d}"]
    return names


def render_ws(plan: ModulePlan) -> RenderedModule:
    """Render the warp-specialised forward of a plan :func:`plan_supports` accepts.

    Raises:
        CodegenError: the template failed to render or produced text that is not Python.
    """
    args = input_arg_names(plan)
    extra = args + (["META"] if plan.fwd_ranges.meta is not None else [])
    ctx = args + [ld.var for ld in plan.fwd.outer_loads] + (["off_b", "off_h"] if plan.fwd.inner_loads else [])
    ctx += ["pos_a"] if plan.bias_split else []  # the separable bias's anchor
    ctx += ["slope2"] if plan.bias_split and plan.bias_split.slope_code else []
    context = dict(plan=plan, bounds=", ".join(bound_names(plan)), extra=", ".join(extra), ctx=ctx)
    return _render(TEMPLATE, plan.spec_name, [context])


def module_name(spec_name: str) -> str:
    """The name the warp-specialised module is written and imported under."""
    return f"{spec_name}_ws"


@functools.cache
def _gluon_available() -> bool:
    """Whether this Triton has Gluon's Hopper host side (Triton 3.5 and newer)."""
    try:
        return importlib.util.find_spec("triton.experimental.gluon.nvidia.hopper") is not None
    except ImportError:
        return False


def call_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, guard_unseen: bool, has_mask: bool) -> bool:
    """Whether a forward call can take the warp-specialised kernel (``ATTNGEN_WS`` aside): CUDA
    tensors on a compute-capability 9.x GPU (Hopper: wgmma, TMA, setmaxnreg), fp16 or bf16,
    head dims of 128 for q, k and v (at 64 the H200 probe found no gain, docs/perf-notes.md),
    16-byte aligned tensors with a contiguous last dimension (TMA), and, under a mask, no key
    hidden from every query of the call (the Triton forward zeroes such keys' values, which
    this kernel reads from shared memory untouched)."""
    if config.interpret_all() or q.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9 or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[-1] != 128 or k.shape[-1] != 128 or v.shape[-1] != 128 or (guard_unseen and has_mask):
        return False
    from .op import _tma_strides

    return all(_tma_strides(t) is not None for t in (q, k, v)) and _gluon_available()


def _descriptor(t: torch.Tensor, block_rows: int):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .op import _tma_strides

    block = [1, 1, block_rows, t.shape[-1]]
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for(block, dtype)
    return TensorDescriptor(t, list(t.shape), _tma_strides(t), block, layout)


def launch(module: ModuleType, q, k, v, o, lse, runtime: list, group: int, extra: list) -> None:
    """Run the warp-specialised forward: ``q [B, H, T_Q, 128]``, ``k, v [B, H_KV, T_KV, 128]``,
    ``o [B, H, T_Q, 128]`` (written) and ``lse [B, H, T_Q]`` float32 (written); ``runtime``
    is the Triton forward's ``[H, T_Q, T_KV, Q_OFFSET, K_OFFSET, scale, scale * log2 e]``;
    ``extra`` the runtime-input arguments and, for masks classified from runtime inputs, the
    metadata of query tiles of 128 against key tiles of 128 (``AttentionOp.tile_meta``)."""
    B, H, T_Q, _ = q.shape
    _, _, T_KV, q_start, k_start, scale, qk_scale_log2 = runtime
    grid = (-(-T_Q // BLOCK_Q), H, B)
    getattr(module, KERNEL)[grid](
        _descriptor(q, BLOCK_Q), _descriptor(k, BLOCK_KV), _descriptor(v, BLOCK_KV), _descriptor(o, BLOCK_Q // 2), lse, *extra,
        H, T_Q, T_KV, q_start, k_start, scale, qk_scale_log2,
        GROUP=group, STAGES=STAGES, TILE_SKIP=config.tile_skipping(), num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )  # fmt: skip
