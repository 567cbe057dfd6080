"""The warp-specialised forward for Hopper GPUs (``templates/attention_ws.py.j2``, Gluon).

Triton 3.6's automatic warp specialisation hangs on the H200 for attention loops
(docs/perf-notes.md, "Warp specialisation through Triton 3.6"). Gluon, Triton's lower-level
language, states the split by hand, as FlashAttention-3 does (Shah et al., 2024): one
producer warp copies K and V tiles by TMA into a ring of shared-memory buffers guarded by
mbarriers, and two consumer warp groups of 64 query rows each run the online softmax with
``warpgroup_mma``, each issuing the next tile's Q Kᵀ before this tile's softmax. The kernel
visits the same key tiles as the Triton forward (the plan's closed-form tile ranges, masked
tiles first) and writes the same ``o`` and log-sum-exp, so the backward kernels are shared.

It runs where :func:`plan_supports` accepts the spec and :func:`call_supports` the call;
everything else takes the Triton forward. ``ATTNGEN_WS=0`` turns it off.
"""

from __future__ import annotations

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
#: with Triton's language under the same names
_MASK_NAMES = {"pos_q", "pos_k", "tl", "where", "minimum", "maximum", "abs"}
#: names a score expression may read: the scaled score, positions, the same functions and
#: exponentials, and the helpers the template defines (sigmoid, fast_tanh's _tanh)
_SCORE_NAMES = _MASK_NAMES | {"s", "exp", "exp2", "log", "log2", "sqrt", "sigmoid", "_tanh", "FAST_SIGMOID"}


def plan_supports(plan: ModulePlan) -> str | None:
    """Why ``plan``'s forward cannot run warp-specialised, or None when it can: softmax, no
    runtime inputs, no strided (residue-order) part or stored P, a mask of ``pos_q`` and
    ``pos_k`` alone classified in closed form, and a score modification (if any) of ``s``
    and the positions alone, built from functions Gluon has."""
    if plan.sigmoid:
        return "sigmoid normaliser"
    if plan.inputs or plan.fwd_ranges.meta is not None or plan.fwd.inner_loads or plan.fwd.outer_loads:
        return "runtime inputs"
    if plan.perm is not None or plan.perm_stride or plan.store_p:
        return "strided part or stored P"
    names = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", plan.mask_code))
    if not names <= _MASK_NAMES:
        return f"mask reads {sorted(names - _MASK_NAMES)}"
    names = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", plan.score_code)) if plan.has_score else set()
    if not names <= _SCORE_NAMES:
        return f"score reads {sorted(names - _SCORE_NAMES)}"
    return None


def bound_names(plan: ModulePlan) -> list[str]:
    """What the kernel's ``_tile_bounds`` returns: the loop counts, then the segment starts and
    offsets that map a masked or unmasked loop index to a key tile (``tile_of`` in macros.j2)."""
    r = plan.fwd_ranges
    return (["n_masked", "n_full"] + [seg[0] for seg in r.masked] + [f"mc_{j}" for j in range(1, len(r.masked))]
            + [seg[0] for seg in r.full] + [f"fc_{j}" for j in range(1, len(r.full))])  # fmt: skip


def render_ws(plan: ModulePlan) -> RenderedModule:
    """Render the warp-specialised forward of a plan :func:`plan_supports` accepts.

    Raises:
        CodegenError: the template failed to render or produced text that is not Python.
    """
    return _render(TEMPLATE, plan.spec_name, [dict(plan=plan, bounds=", ".join(bound_names(plan)))])


def module_name(spec_name: str) -> str:
    """The name the warp-specialised module is written and imported under."""
    return f"{spec_name}_ws"


def _gluon_available() -> bool:
    """Whether this Triton has Gluon's Hopper host side (Triton 3.5 and newer)."""
    try:
        return importlib.util.find_spec("triton.experimental.gluon.nvidia.hopper") is not None
    except ImportError:
        return False


def call_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, guard_unseen: bool, has_mask: bool) -> bool:
    """Whether a forward call can take the warp-specialised kernel: ``ATTNGEN_WS`` not 0, CUDA
    tensors on a compute-capability 9.x GPU (Hopper: wgmma, TMA, setmaxnreg), fp16 or bf16,
    head dims of 128 for q, k and v (at 64 the H200 probe found no gain, docs/perf-notes.md),
    16-byte aligned tensors with a contiguous last dimension (TMA), and, under a mask, no key
    hidden from every query of the call (the Triton forward zeroes such keys' values, which
    this kernel reads from shared memory untouched)."""
    if not config.warp_specialize() or config.interpret_all() or q.device.type != "cuda":
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


def launch(module: ModuleType, q, k, v, o, lse, runtime: list, group: int) -> None:
    """Run the warp-specialised forward: ``q [B, H, T_Q, 128]``, ``k, v [B, H_KV, T_KV, 128]``,
    ``o [B, H, T_Q, 128]`` (written) and ``lse [B, H, T_Q]`` float32 (written); ``runtime``
    is the Triton forward's ``[H, T_Q, T_KV, Q_OFFSET, K_OFFSET, scale, scale * log2 e]``."""
    B, H, T_Q, _ = q.shape
    _, _, T_KV, q_start, k_start, scale, qk_scale_log2 = runtime
    grid = (-(-T_Q // BLOCK_Q), H, B)
    getattr(module, KERNEL)[grid](
        _descriptor(q, BLOCK_Q), _descriptor(k, BLOCK_KV), _descriptor(v, BLOCK_KV), _descriptor(o, BLOCK_Q // 2), lse,
        H, T_Q, T_KV, q_start, k_start, scale, qk_scale_log2,
        GROUP=group, STAGES=STAGES, TILE_SKIP=config.tile_skipping(), num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )  # fmt: skip
