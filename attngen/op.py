"""The compiled operator: launches the generated kernels behind ``torch.library`` custom ops.

Two ops are registered (once, on the first compile, never at import):

* ``attngen::attention_fwd(q, k, v, inputs, op_id) -> (o, lse)``
* ``attngen::attention_bwd(do, dlse, q, k, v, o, lse, inputs, input_grads, op_id) -> (dq, dk, dv, grads)``
* ``attngen::attention_bwd_recompute(do, dlse, q, k, v, inputs, input_grads, op_id) -> (dq, dk, dv, grads)``
  (``recompute: full``: reruns the forward inside the op)

``grads`` holds one gradient per runtime input whose bit is set in ``input_grads`` (bit i for
input i; learnable score parameters).

``op_id`` names an :class:`AttentionOp` in this process's registry (spec, kernel source and
this file's revision). The ops have fake (meta)
implementations, so ``torch.compile(fullgraph=True)`` traces through them, and the forward
has a registered autograd formula that calls the backward op. Eager calls skip the custom-op
dispatcher and run the same implementations through a plain autograd function.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from . import config, warpspec
from .args import check_call, position_offset
from .errors import UnsupportedError
from .schema import AttentionSpec
from .tiles import LaunchConfig, default_config, fuses_dq, head_blocks
from .tune import DeviceInfo, TuneCache, cache_key, shape_bucket, tune

_REGISTRY: dict[str, "AttentionOp"] = {}
_REGISTER_LOCK = threading.Lock()
_REGISTERED = False

LOG2E = 1.0 / math.log(2.0)
_OPS_REVISION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]


#: Call signatures an op memoises before it forgets them all (see AttentionOp._common).
_MEMO_LIMIT = 1024


@dataclass(frozen=True)
class Shard:
    """Where a call's queries and keys sit in a longer sequence (context parallelism).

    Attributes:
        q_start: absolute position of query row 0.
        k_start: absolute position of key row 0.
        t_kv: the whole sequence's key count (sigmoid attention's default bias ``-log(T_KV)``).
    """

    q_start: int
    k_start: int
    t_kv: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kernel_of(module: ModuleType, name: str, device: torch.device):
    """The kernel ``name`` of a loaded kernel module, for tensors on ``device``.

    Raises:
        UnsupportedError: CPU tensors while Triton's interpreter is off.
    """
    if device.type == "cpu" and not config.interpret_all():
        raise UnsupportedError(
            "CPU tensors run under Triton's interpreter, which Triton fixes when it is first "
            "imported: start Python with TRITON_INTERPRET=1, or move q, k and v to a CUDA device"
        )
    if device.type == "cpu" and not _triton_interprets():
        raise UnsupportedError(
            "TRITON_INTERPRET=1 was set after Triton was imported, so Triton's own helpers were built for a GPU; "
            "set it before anything imports triton (at the top of the script, or TRITON_INTERPRET=1 python ...)"
        )
    return getattr(module, name)


def _triton_interprets() -> bool:
    """Whether Triton was imported in interpreter mode (its library functions are then
    interpreted; setting the variable later changes only kernels defined afterwards)."""
    import triton.language as tl

    return type(tl.zeros).__name__ != "JITFunction"


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _tma_strides(t: torch.Tensor) -> list[int] | None:
    """``t``'s strides as a tensor descriptor takes them (in elements; a size-1 dimension's
    stride, which no coordinate multiplies, replaced by an aligned one), or None when the
    tensor memory accelerator cannot address it: a base or stride not a multiple of 16 bytes,
    a zero stride on a longer dimension (a broadcast tensor), or a last dimension that is not
    contiguous."""
    align = 16 // t.element_size()
    if t.data_ptr() % 16:
        return None
    strides = list(t.stride())
    if t.shape[-1] > 1 and strides[-1] != 1:
        return None
    strides[-1] = 1
    for d in range(t.dim() - 2, -1, -1):
        if t.shape[d] == 1:
            strides[d] = -(-strides[d + 1] * t.shape[d + 1] // align) * align
        elif strides[d] <= 0 or strides[d] % align:
            return None
    return strides


def descriptor_rank(tensors: list[torch.Tensor], device: torch.device) -> int:
    """The rank of the tensor descriptors the attention kernels read tiles of ``tensors``
    (``[B, H, T, D]`` each) through, or 0 for pointer loads.

    Descriptors hand whole tiles to the tensor memory accelerator (TMA, NVIDIA Hopper and
    newer, compute capability 9.0): no per-element addresses or bound masks in the kernel.
    They need 16-byte aligned bases and strides and a contiguous last dimension; other
    tensors (odd head dims, broadcast or sliced tensors) and older GPUs take pointer loads.
    Rank 2 addresses the ``[B * H * T, D]`` rows when every tensor flattens to them (the
    usual contiguous layout; fewer than 2**31 rows), rank 4 any other aligned layout, such as
    a ``[B, T, H, D]`` tensor transposed. ``ATTNGEN_DESCRIPTORS`` forces 0, 2 or 4 (2 falls
    back to 4 where the tensors do not flatten). Triton's interpreter runs descriptors on any
    device, so CPU tests cover them.
    """
    return _descriptor_layouts(tensors, device)[0]


def _descriptor_layouts(tensors: list[torch.Tensor], device: torch.device) -> tuple[int, list[tuple[torch.Tensor, list[int]]]]:
    """:func:`descriptor_rank` and, per tensor, what its descriptor addresses at that rank:
    the tensor (rank 4) or its rows (rank 2), with their strides; no layouts for rank 0."""
    forced = config.descriptor_rank()
    if forced == 0:
        return 0, []
    if not config.interpret_all() and (device.type != "cuda" or _capability(device.index) < 9):
        return 0, []
    strides = [_tma_strides(t) for t in tensors]
    if any(st is None for st in strides):
        return 0, []
    if forced != 4:
        rows = [_rows(t) for t in tensors]
        if all(r is not None for r in rows):
            return 2, rows
    return 4, list(zip(tensors, strides))


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, list[int]] | None:
    """``t`` as ``[B * H * T, D]`` rows a rank-2 descriptor can address, with their strides,
    or None."""
    try:
        rows = t.view(-1, t.shape[-1])
    except RuntimeError:  # the batch, head and position dimensions do not flatten
        return None
    strides = _tma_strides(rows)
    if rows.shape[0] >= 2**31 or strides is None:
        return None
    return rows, strides


def _new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh output tensor; NaN-filled when ``ATTNGEN_POISON=1`` so unwritten elements show."""
    if config.poison_outputs():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


class AttentionOp:
    """A compiled attention variant: call it like a function.

    ``op(q, k, v, *, return_lse=False, **inputs)``

    Args (of a call):
        q: ``[B, H, T_Q, D_QK]``, float16, bfloat16 or float32, any strides.
        k: ``[B, H_KV, T_KV, D_QK]``, q's dtype; ``H % H_KV == 0`` (GQA: query head ``h``
            reads KV head ``h // (H // H_KV)``).
        v: ``[B, H_KV, T_KV, D_V]``, q's dtype; ``D_V`` may differ from ``D_QK``.
        return_lse: also return the log-sum-exp.
        **inputs: the spec's runtime inputs by name.

    A call returns ``o [B, H, T_Q, D_V]`` in q's dtype; with ``return_lse`` also
    ``lse [B, H, T_Q]`` float32, natural log, ``-inf`` for a row that sees no key (whose
    output is 0). Sigmoid attention has no log-sum-exp (``return_lse`` raises
    ``UnsupportedError``). A call raises ``ShapeError`` for mismatched shapes or dtypes or a
    missing or misshaped runtime input, and ``UnsupportedError`` for a runtime input that
    requires grad but cannot take one (only float inputs the score reads can).

    CUDA tensors run the compiled Triton kernels; CPU tensors run the same kernels under
    Triton's interpreter. Gradients flow to q, k and v (FlashAttention-2 backward) and to
    float inputs the score reads that require grad (learnable slopes and bias tables).
    """

    def __init__(
        self, spec: AttentionSpec, module: ModuleType, kernel_file: Path, plan: Any, source_digest: str, autotune: bool = False,
        graph: Any = None,
    ) -> None:
        self.spec = spec
        self._graph = graph  # the IR, for mask_class
        self.module = module
        self.kernel_file = kernel_file
        self.plan = plan
        self.source_digest = source_digest
        self.autotune = autotune
        self._configs: dict[tuple[str, str], LaunchConfig | None] = {}
        # per-call host work memoised by call signature (lengths, dtype, device, debug switches):
        # every launch costs 50-100 us of host time on the H200 hosts, so the rest must not add to it
        self._picked: dict[tuple, LaunchConfig] = {}
        self._common_memo: dict[tuple, tuple[dict, list, dict]] = {}
        # the revision of this file is part of the id: graphs that torch.compile caches on disk
        # embed the id, so a changed autograd formula or op schema never meets a stale graph
        self.op_id = f"{spec.name}-{plan.spec_digest[:12]}-{Path(kernel_file).stem[-16:]}-{_OPS_REVISION}"
        self._constant_reads = spec.constant_reads()
        self._grad_inputs = frozenset(plan.grad_inputs)
        self._decode_module: ModuleType | None = None
        _ensure_registered()
        _REGISTRY[self.op_id] = self

    def __repr__(self) -> str:
        return f"AttentionOp({self.spec.name!r}, kernels={str(self.kernel_file)!r})"

    @functools.cached_property
    def mask_class(self) -> str:
        """How the mask shapes the key loops, for the default launch configs
        (:func:`attngen.tilemap.mask_class`; ``other`` for an op built without its IR).
        Counted in closed form on first use (5-20 ms), not at compile time."""
        if self._graph is None:
            return "other"
        from .tilemap import mask_class

        return mask_class(self.spec, self._graph, self.plan)

    @functools.cached_property
    def query_tile_order(self) -> int:
        """The order in which the forward and dQ grids take their query tiles
        (:func:`attngen.tilemap.query_tile_order`; launch order for an op built without its
        IR). Counted in closed form on first use, as :attr:`mask_class`."""
        if self._graph is None:
            return 0
        from .tilemap import query_tile_order

        return query_tile_order(self.spec, self._graph, self.plan)

    #: Bytes of L2 cache that the K and V of one group of heads may take in a reordered grid
    #: (:attr:`query_tile_order`). On the H200 a 24 MiB share ran the warp-specialised
    #: forward 4.5% slower than launch order and 8 MiB ran the Triton forward 6-10% faster
    #: (docs/perf-notes.md, "Longest programs first").
    l2_budget: int = 8 * 1024 * 1024

    def _order(self) -> dict:
        """The ``ORDER_Q`` and ``L2_BUDGET`` constexprs of a forward or dQ launch
        (``ATTNGEN_LAUNCH_ORDER=1``: order 0)."""
        return {"ORDER_Q": self.query_tile_order if config.tile_order() else 0, "L2_BUDGET": self.l2_budget}

    def __call__(self, q, k, v, *, return_lse: bool = False, **inputs):
        _, ordered = check_call(self.spec, q, k, v, inputs, constant_reads=self._constant_reads, grad_inputs=self._grad_inputs)
        if return_lse and self.plan.sigmoid:
            raise UnsupportedError("return_lse: sigmoid attention has no log-sum-exp; call without return_lse")
        learnable = any(t.requires_grad for t in ordered)
        if learnable:  # the gradient is added at the inputs' own strides: make them dense
            ordered = [t.contiguous() if t.requires_grad else t for t in ordered]
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *ordered))
        if torch.compiler.is_compiling() and self.plan.stored is not None and wants_grad:  # recompute: store_p
            o, lse, _ = torch.ops.attngen.attention_fwd_p(q, k, v, ordered, self.op_id)
        elif torch.compiler.is_compiling():  # the custom op: traceable, with a fake implementation
            o, lse = torch.ops.attngen.attention_fwd(q, k, v, ordered, self.op_id)
        else:  # eager: the same implementations without the dispatcher's per-call host cost
            o, lse = _EagerAttention.apply(q, k, v, (self.op_id, wants_grad), *ordered)
        return (o, lse) if return_lse else o

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
        *,
        block_table: torch.Tensor | None = None,
        num_splits: int | None = None,
        query_lens: torch.Tensor | None = None,
        validate: bool = True,
        **inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of a few new tokens per sequence against a KV cache (streaming inference).

        Split-KV decoding ("flash-decoding", Dao et al., 2023): the key tiles each sequence
        must visit (the spec's tile classification at the sequence's own positions, never past
        ``cache_seqlens[b]``) are divided among ``num_splits`` programs per KV head, whose
        partial outputs merge by log-sum-exp (:func:`attngen.merge.merge_splits`). One
        program's rows are every query head of its KV head times every new token (GQA
        packed). The cache is contiguous, or paged behind a block table (PagedAttention, Kwon
        et al., 2023; the vLLM / FlashAttention layout).

        Sequence ``b`` gets exactly what ``self(q[b:b+1, :, :n_q], k[:, :, :n_kv], v[:, :, :n_kv])``
        would give on its valid cache (``n_q = query_lens[b]``, ``n_kv = cache_seqlens[b]``):
        with the default ``align: bottom_right`` query ``i`` sits at absolute position
        ``cache_seqlens[b] - query_lens[b] + i``, and the mask, the score modification and
        runtime inputs see absolute positions, ``T_Q = query_lens[b]`` and
        ``T_KV = cache_seqlens[b]``.

        Args:
            q: ``[B, H, T_Q, D_QK]``, float16, bfloat16 or float32; 1 to 16 new tokens per
                sequence (shorter sequences padded at the end, see ``query_lens``).
            k_cache: contiguous ``[B, H_KV, T_max, D_QK]``, or paged
                ``[num_blocks, block_size, H_KV, D_QK]`` with ``block_table``; q's dtype.
            v_cache: ``[B, H_KV, T_max, D_V]`` or ``[num_blocks, block_size, H_KV, D_V]``.
            cache_seqlens: int32 ``[B]``, valid positions per sequence, the new tokens'
                keys and values already appended (``query_lens[b] <= cache_seqlens[b]``).
            block_table: int32 ``[B, max_blocks]``: position ``p`` of sequence ``b`` lives at
                ``k_cache[block_table[b, p // block_size], p % block_size]``. Only the first
                ``ceil(cache_seqlens[b] / block_size)`` entries of a row are read.
            num_splits: splits of each sequence's key tiles; ``None`` picks one from the
                longest cache and the number of (sequence, KV head) programs
                (:func:`attngen.decode.choose_num_splits`).
            query_lens: optional int32 ``[B]``, new tokens per sequence, 0 to ``T_Q`` (default:
                ``T_Q`` each); q rows at and past ``query_lens[b]`` are padding.
            validate: read ``cache_seqlens``, ``query_lens`` and the block table to the host
                and check their values (one device synchronisation per call). Pass False in a
                serving loop, where that synchronisation would stall the host; the check is
                also skipped while a CUDA graph is being captured. Without it, bad values give
                wrong rows but never a read outside the cache: lengths are clamped to the
                cache's capacity, and block-table entries outside the pool are never dereferenced
                (their positions read as zero keys and values).
            **inputs: the spec's runtime inputs; a declared ``T_KV`` dimension is the cache's
                capacity (``T_max``, or ``max_blocks * block_size``), indexed by position.

        Returns:
            ``(o, lse)``: ``o [B, H, T_Q, D_V]`` in q's dtype and ``lse [B, H, T_Q]``
                float32, natural log. Rows that see no key (padding rows, an empty sequence,
                masked rows) have ``o = 0`` and ``lse = -inf``.

        Inference only: no autograd graph is recorded, and a tensor that requires grad raises
        unless grad mode is off (``torch.no_grad()``). Validation reads ``cache_seqlens``,
        ``query_lens`` and the block table to the host once per call (unless ``validate`` is
        False); under ``torch.compile`` the call runs eagerly (a graph break). The splits are
        combined by a second kernel (the merge of :func:`attngen.merge.merge_splits`).

        Raises:
            ShapeError: mismatched shapes, dtypes or devices, ``T_Q`` outside 1 to 16,
                ``cache_seqlens`` smaller than the new tokens or larger than the cache, a
                block table of the wrong shape or dtype or with entries outside the cache (values
                are checked only with ``validate``), a bad ``num_splits``; each message names the argument and the fix.
            UnsupportedError: a normaliser other than softmax (sigmoid attention has no
                log-sum-exp to merge splits by); tensors that require grad under grad mode.
        """
        from .decode import decode

        return decode(self, q, k_cache, v_cache, cache_seqlens, block_table=block_table, num_splits=num_splits,
                      query_lens=query_lens, validate=validate, **inputs)  # fmt: skip

    def decode_kernel(self, device: torch.device, merge: bool = False):
        """The split-KV decoding kernel, or with ``merge`` the kernel that combines its splits;
        rendered and loaded on first use (their own module)."""
        if self._decode_module is None:
            from .load import load_module
            from .render import decode_module_name, render_decode

            self._decode_module, _ = load_module(decode_module_name(self.spec.name), render_decode(self.plan))
        return kernel_of(self._decode_module, "merge_splits" if merge else self.plan.decode.name, device)

    @functools.cached_property
    def ws_unsupported(self) -> str | None:
        """Why this spec's forward cannot take the warp-specialised Hopper kernel
        (:func:`attngen.warpspec.plan_supports`), or None."""
        return warpspec.plan_supports(self.plan)

    @functools.cached_property
    def ws_module(self) -> ModuleType:
        """The warp-specialised forward's module, rendered and loaded on first use."""
        from .load import load_module

        return load_module(warpspec.module_name(self.spec.name), warpspec.render_ws(self.plan))[0]

    def _warp_specialized(self, q, k, v, constexprs: dict) -> bool:
        """Whether this forward call runs the warp-specialised kernel (attngen.warpspec)."""
        forced = config.warp_specialize()
        if forced == 0 or self.ws_unsupported is not None or q.numel() == 0 or k.shape[2] == 0:
            return False
        if forced is None and not warpspec.pays(self.plan):
            return False
        return warpspec.call_supports(q, k, v, constexprs["GUARD_UNSEEN"], self.plan.has_mask)

    # -- kernel access -------------------------------------------------------------------
    def kernel(self, name: str, device: torch.device):
        """The kernel ``name`` for tensors on ``device``.

        Raises:
            UnsupportedError: CPU tensors while Triton's interpreter is off.
        """
        return kernel_of(self.module, name, device)

    # -- launch configs ------------------------------------------------------------------
    @staticmethod
    def _bucket_id(bucket: dict) -> str:
        return ",".join(f"{k}={bucket[k]}" for k in sorted(bucket))

    def set_config(self, kernel: str, bucket: dict, cfg: LaunchConfig) -> None:
        """Use ``cfg`` for ``kernel`` on calls in ``bucket`` (see :func:`attngen.tune.shape_bucket`)."""
        self._configs[(kernel, self._bucket_id(bucket))] = cfg
        self._picked.clear()

    def clear_config(self, kernel: str, bucket: dict) -> None:
        self._configs.pop((kernel, self._bucket_id(bucket)), None)
        self._picked.clear()

    def config_for(self, kernel: str, dims: dict[str, int], dtype: torch.dtype, device: torch.device) -> LaunchConfig:
        """The launch config of ``kernel`` for a call: a tuned one if this process set or the
        on-disk cache holds one for the call's shape bucket, else the default (tuning first
        when the op was compiled with ``autotune=True``)."""
        memo = (kernel, tuple(sorted(dims.items())), dtype, device)
        picked = self._picked.get(memo)
        if picked is None:
            if len(self._picked) >= _MEMO_LIMIT:
                self._picked.clear()
            picked = self._picked[memo] = self._pick_config(kernel, dims, dtype, device)
        return picked

    def _pick_config(self, kernel: str, dims: dict[str, int], dtype: torch.dtype, device: torch.device) -> LaunchConfig:
        smem = DeviceInfo.of(device).shared_memory if device.type == "cuda" else 0
        default = default_config(kernel, max(dims["D_QK"], dims["D_V"]), dtype, smem, self.mask_class)
        if kernel == "preprocess":
            return default
        bucket = shape_bucket(dims, dtype)
        slot = (kernel, self._bucket_id(bucket))
        if slot not in self._configs and device.type == "cuda":
            key = cache_key(self.plan.spec_digest, self.source_digest, DeviceInfo.of(device), kernel, bucket)
            self._configs[slot] = TuneCache().get(key)
            if self._configs[slot] is None and self.autotune:
                tune(self, dims, dtype, device, progress=False)
        return self._configs.get(slot) or default

    def scale_for(self, d_qk: int) -> float:
        return self.spec.scale if self.spec.scale is not None else 1.0 / math.sqrt(d_qk)

    def _input_args(self, inputs: list[torch.Tensor]) -> list[Any]:
        args: list[Any] = []
        for t in inputs:
            args.append(t)
            for d in range(t.dim()):
                args += [t.stride(d), t.shape[d]]
        return args

    def _common(self, q, k, v, shard: Shard | None = None):
        """``dims``, the runtime scalars and the constexprs of a call (memoised per call
        signature, with the debug switches read on every call; callers must not mutate them)."""
        memo = (q.shape, k.shape[1:3], v.shape[3], q.dtype, shard, config.tile_skipping(), config.interpret_all(),
                config.min_head_block())  # fmt: skip
        hit = self._common_memo.get(memo)
        if hit is None:
            if len(self._common_memo) >= _MEMO_LIMIT:  # many lengths (variable-length batches): start over
                self._common_memo.clear()
            hit = self._common_memo[memo] = self._signature(q, k, v, shard)
        return hit

    def _signature(self, q, k, v, shard: Shard | None):
        B, H, T_Q, D_QK = q.shape
        H_KV, T_KV, D_V = k.shape[1], k.shape[2], v.shape[3]
        scale = self.scale_for(D_QK)
        block_dqk, block_dv = head_blocks(D_QK, D_V)
        constexprs = dict(
            GROUP=H // H_KV,
            D_QK=D_QK,
            D_V=D_V,
            BLOCK_DQK=block_dqk,
            BLOCK_DV=block_dv,
            DOT_PRECISION=dict(self.plan.dot_precision)[str(q.dtype).replace("torch.", "")],
            EMULATE_BF16_DOT=q.dtype == torch.bfloat16 and config.interpret_all(),
            FAST_SIGMOID=config.fast_sigmoid(q.dtype),
            TILE_SKIP=config.tile_skipping(),
        )
        q_start, k_start, t_keys = self._placement(T_Q, T_KV, shard)
        # queries and keys at the same positions under a mask every position passes with
        # itself: nothing is hidden from all partners, so masked tiles need no guard
        constexprs["GUARD_UNSEEN"] = not (self.plan.sees_itself and T_Q == T_KV and q_start == k_start)
        # a separable bias's row term into the log-sum-exp (attngen.passes.split_score_bias) for
        # 16-bit inputs; float32 inputs keep the whole score, exact to float32's rounding
        constexprs["BIAS_SPLIT"] = self.plan.bias_split is not None and q.dtype in (torch.float16, torch.bfloat16)
        runtime = [H, T_Q, T_KV, q_start, k_start, scale, scale * LOG2E]
        if self.plan.sigmoid:
            runtime.append(self.spec.bias if self.spec.bias is not None else -math.log(t_keys))
        dims = {"B": B, "H": H, "H_KV": H_KV, "T_Q": T_Q, "T_KV": T_KV, "D_QK": D_QK, "D_V": D_V}
        return dims, runtime, constexprs

    def _placement(self, t_q: int, t_kv: int, shard: Shard | None) -> tuple[int, int, int]:
        """Absolute position of query row 0 and key row 0, and the whole sequence's key count."""
        if shard is None:
            return position_offset(self.spec, t_q, t_kv), 0, t_kv
        if shard.k_start and self.plan.perm is not None:
            raise UnsupportedError(f"spec {self.spec.name!r}: its strided part runs in residue order, which needs keys "
                                   "to start at position 0; it cannot run on a shard of the keys")
        return shard.q_start, shard.k_start, shard.t_kv

    def _descriptors(self, part, a: torch.Tensor, b: torch.Tensor, rows: int, constexprs: dict) -> dict:
        """The descriptor arguments of a natural-order kernel that reads tiles of ``rows``
        rows of ``a`` (head dim ``D_QK``) and ``b`` (``D_V``); none for residue-order kernels,
        which gather their rows.

        Masks classified from runtime inputs (documents) take pointer loads unless
        ``ATTNGEN_DESCRIPTORS`` forces a rank: on the H200 descriptors cut their
        forward+backward from 180 to 139 TFLOP/s at D = 128 (docs/perf-notes.md). Each
        descriptor argument adds host time to a launch (Triton builds the TMA descriptor on
        every launch); how much of the loss that explains is not isolated."""
        if part.perm_stride:
            return {}
        if config.descriptor_rank() is None and self.mask_class == "data_dependent":
            rank, layouts = 0, []
        else:
            rank, layouts = _descriptor_layouts([a, b], a.device)
        if rank == 0:
            return dict(DESC_RANK=0, DESC_A=None, DESC_B=None)
        from triton.tools.tensor_descriptor import TensorDescriptor

        lead = [1, 1] if rank == 4 else []  # rank 4: one batch entry and head per tile
        desc_a, desc_b = (TensorDescriptor(t, list(t.shape), strides, lead + [rows, cols])
                          for (t, strides), cols in zip(layouts, (constexprs["BLOCK_DQK"], constexprs["BLOCK_DV"])))
        return dict(DESC_RANK=rank, DESC_A=desc_a, DESC_B=desc_b)

    def dq_mode(self, d_qk: int, d_v: int, device: torch.device, stored_p: bool = False, input_grads: bool = False) -> int:
        """How a backward computes dQ.

        * 0: a dQ kernel of its own walks the key tiles of each query tile and recomputes
          P and dP (deterministic).
        * 1: the dK/dV kernel, which has P and dS of each tile at hand, multiplies dS by K
          and adds the result to a float32 dQ with atomics (FlashAttention-2, Dao 2023,
          section 3.2): two of the backward's seven tile products and a kernel's loads are
          saved, and the sum's order, so its last bits, vary run to run.
        * 2: as 1, the additions done by the tensor memory accelerator as one bulk
          reduction per tile (``cp.reduce.async.bulk``, NVIDIA Hopper and newer), as
          FlashAttention-3 does.

        Args:
            d_qk: the call's query/key head dim.
            d_v: its value head dim.
            device: where its tensors live.
            stored_p: the forward stored P (``recompute: store_p``).
            input_grads: learnable runtime inputs want gradients.

        0 whenever ``torch.use_deterministic_algorithms(True)`` is set, P is stored or
        learnable inputs want gradients (the dQ kernel sums them). Otherwise ``ATTNGEN_DQ``
        decides if set; else 0 where :func:`attngen.tiles.fuses_dq` says the dQ kernel ran
        faster (no mask, or one that keeps every pair; head dims above 64, unless the mask
        is classified from runtime inputs as documents are; :func:`attngen.tilemap.mask_class`),
        and among the fused modes 2 where bulk reductions run (not under Triton's interpreter,
        which has none; ``D_QK`` a multiple of 4 so that float32 rows are 16-byte aligned) and
        1 elsewhere.
        Masks classified from runtime inputs take 1: on the H200 mode 2 was no faster for
        them (within their run-to-run spread), and a descriptor adds host time per launch.

        Raises:
            EnvError: ``ATTNGEN_DQ`` holds a bad value.
        """
        forced = config.dq_mode()
        if stored_p or input_grads or torch.are_deterministic_algorithms_enabled() or forced == 0:
            return 0
        if forced is None and not fuses_dq(max(d_qk, d_v), self.mask_class):
            return 0
        bulk = (not config.interpret_all() and device.type == "cuda" and _capability(device.index) >= 9
                and d_qk % 4 == 0 and (forced == 2 or self.mask_class != "data_dependent"))  # fmt: skip
        return 2 if bulk and forced != 1 else 1

    def _fused_dq(self, part, mode: int, dq_acc: torch.Tensor | None, block_q: int, constexprs: dict) -> dict:
        """The fused-dQ arguments of a dK/dV launch (:meth:`dq_mode`): residue-order parts,
        whose query rows are not contiguous, add with atomics and take no descriptor."""
        if part.perm_stride:
            return dict(DQ_ACC=dq_acc, DQ_FUSED=min(mode, 1))
        desc = None
        if mode == 2:
            from triton.tools.tensor_descriptor import TensorDescriptor

            desc = TensorDescriptor(dq_acc, list(dq_acc.shape), list(dq_acc.stride()), [1, 1, block_q, constexprs["BLOCK_DQK"]])
        return dict(DQ_ACC=dq_acc, DQ_FUSED=mode, DESC_DQ=desc)

    @staticmethod
    def _launch(cfg: LaunchConfig) -> dict[str, int]:
        stages = config.forced_stages() or cfg.num_stages
        return dict(BLOCK_Q=cfg.block_q, BLOCK_KV=cfg.block_kv, num_warps=cfg.num_warps, num_stages=stages)

    # -- the work ------------------------------------------------------------------------
    def tile_meta(self, var: str, block_q: int, block_kv: int, inputs: list[torch.Tensor], dims: dict, device: torch.device,
                  shard: Shard | None = None) -> list:
        """Run the metadata kernel of a loop direction when the mask reads runtime inputs
        along the positions (``doc[b, q] == doc[b, k]``); return the kernel argument.

        Args:
            var: ``"k"`` for the forward and dQ kernels (given query tiles), ``"q"`` for dK/dV.
            block_q: the query tile size of the kernel that will read the metadata.
            block_kv: its key tile size.
            inputs: the runtime inputs, in the spec's order.
            dims: ``B, T_Q, T_KV`` (and the rest) of the call.
            device: where the inputs live.
            shard: where the call's queries and keys sit in a longer sequence (None: the
                spec's alignment).

        Returns:
            ``[]`` when the direction needs no metadata, else ``[meta]``: int32
            ``[B, n_given_tiles, n_conjuncts, 4]``, per given tile and data-dependent conjunct
            the visible var tiles ``[lo, hi)`` and the FULL run ``[flo, fhi)``. Computed in
            O(T) per given tile, on the device, with no host synchronisation.
        """
        ranges = self.plan.fwd_ranges if var == "k" else self.plan.dkdv_ranges
        if ranges.meta is None:
            return []
        B, T_Q, T_KV = dims["B"], dims["T_Q"], dims["T_KV"]
        bg, bv = (block_q, block_kv) if var == "k" else (block_kv, block_q)
        n_given = _cdiv(T_Q if var == "k" else T_KV, bg)
        import triton.language as tl  # not at import: TRITON_INTERPRET is read when Triton loads

        meta = torch.empty((B, n_given, ranges.meta.count, 4), dtype=torch.int32, device=device)
        # compare in int64 when any input holds int64 values (whatever its declared dtype)
        wide = any(t.dtype == torch.int64 for t in inputs)
        self.kernel(ranges.meta.name, device)[(n_given, B)](
            meta, *self._input_args(inputs), T_Q, T_KV, *self._placement(T_Q, T_KV, shard)[:2],
            BLOCK_G=bg, BLOCK_V=bv, CHUNK=max(1, 4096 // bv),
            ACC=tl.int64 if wide else tl.int32, BIG=2**62 if wide else 2**31 - 1, num_warps=4,
        )  # fmt: skip
        return [meta]

    @property
    def parts(self) -> list:
        """The module plans a call runs in order: natural order, then the residue-order part
        of a strided mask (:func:`attngen.passes.split_periodic`), which merges into it."""
        return [self.plan] if self.plan.perm is None else [self.plan, self.plan.perm]

    @staticmethod
    def _tiles(part, n: int, block: int) -> int:
        """Programs along a sequence of ``n`` positions in tiles of ``block``: in residue
        order, one run of tiles per residue class (each has at most ``ceil(n / c)``)."""
        c = part.perm_stride
        return _cdiv(n, block) if not c else c * _cdiv(_cdiv(n, c), block)

    def stores_p(self, t_q: int, t_kv: int) -> bool:
        """Whether a call of these lengths stores P (``recompute: store_p`` and
        ``T_Q * T_KV <= store_p_limit``)."""
        return self.plan.stored is not None and t_q * t_kv <= self.spec.store_p_limit

    def forward_impl(self, q, k, v, inputs, shard: Shard | None = None, want_p: bool = False):
        """Run the forward kernels; return ``o [B, H, T_Q, D_V]`` and ``lse [B, H, T_Q]``
        (float32, natural log). ``shard`` places q and k in a longer sequence (context
        parallelism); runtime inputs are then indexed by those absolute positions.

        With ``want_p`` a third value follows: P ``[B, H, T_Q, T_KV]`` in q's dtype when
        :meth:`stores_p` holds (only the tiles the mask keeps are written), else None."""
        dims, runtime, constexprs = self._common(q, k, v, shard)
        B, H, T_Q, D_V = dims["B"], dims["H"], dims["T_Q"], dims["D_V"]
        o = _new_output((B, H, T_Q, D_V), q.dtype, q.device)
        lse = _new_output((B, H, T_Q), torch.float32, q.device)
        p = None
        if want_p and shard is None and self.stores_p(T_Q, dims["T_KV"]):
            p = _new_output((B, H, T_Q, dims["T_KV"]), q.dtype, q.device)
        if p is None and self._warp_specialized(q, k, v, constexprs):
            meta = self.tile_meta("k", warpspec.BLOCK_Q, warpspec.BLOCK_KV, inputs, dims, q.device, shard)
            warpspec.launch(self.ws_module, q, k, v, o, lse, runtime, constexprs["GROUP"], self._input_args(inputs) + meta)
            return (o, lse, None) if want_p else (o, lse)
        cfg = self.config_for("fwd", dims, q.dtype, q.device)
        meta = self.tile_meta("k", cfg.block_q, cfg.block_kv, inputs, dims, q.device, shard)
        for part in [self.plan.stored] if p is not None else self.parts:
            grid = (self._tiles(part, T_Q, cfg.block_q), H, B)
            self.kernel(part.fwd.name, q.device)[grid](
                q, k, v, o, lse, *([p] if p is not None else []),
                *self._input_args(inputs), *meta,
                *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                *runtime,
                **constexprs, **self._order(), **self._launch(cfg), **self._descriptors(part, k, v, cfg.block_kv, constexprs),
            )  # fmt: skip
        return (o, lse, p) if want_p else (o, lse)

    def backward_impl(self, do, dlse, q, k, v, o, lse, inputs, input_grads: list[bool] | None = None,
                      shard: Shard | None = None, p: torch.Tensor | None = None):
        """dq, dk, dv and a list with, per runtime input, its gradient if ``input_grads``
        flags it (float32 summed by atomics in the dQ kernel, cast to the input's dtype),
        else None. ``o`` and ``lse`` may be those of a longer key sequence that ``k, v`` are a
        shard of (``shard``): the gradients are then this shard's share (ring attention).
        ``p``: P as :meth:`forward_impl` stored it (``recompute: store_p``); the kernels then
        read it instead of recomputing it."""
        parts = [self.plan.stored] if p is not None else self.parts
        p_arg = [p] if p is not None else []
        dims, runtime, constexprs = self._common(q, k, v, shard)
        B, H, H_KV, T_Q, T_KV, D_QK, D_V = (dims[n] for n in ("B", "H", "H_KV", "T_Q", "T_KV", "D_QK", "D_V"))
        wanted = any(input_grads or ())
        mode = self.dq_mode(D_QK, D_V, q.device, stored_p=p is not None, input_grads=wanted)
        dq_acc = None
        if mode:  # the dK/dV kernel adds into it; the preprocess kernel zeroes it (sigmoid: no preprocess)
            dq_acc = (torch.zeros if self.plan.sigmoid else torch.empty)((B, H, T_Q, D_QK), dtype=torch.float32, device=q.device)
        delta = _new_output((B, H, T_Q), torch.float32, q.device)
        if not self.plan.sigmoid:  # sigmoid attention's backward needs no delta
            pre = default_config("preprocess", D_V, q.dtype)
            self.kernel("attn_bwd_preprocess", q.device)[(_cdiv(T_Q, pre.block_q), H, B)](
                o, do, delta, dq_acc, *o.stride(), *do.stride(), H, T_Q,
                D_V=D_V, BLOCK_Q=pre.block_q, BLOCK_DV=constexprs["BLOCK_DV"], D_QK=D_QK, BLOCK_DQK=constexprs["BLOCK_DQK"],
                num_warps=pre.num_warps,
            )  # fmt: skip
            if dlse is not None:
                # d lse / d score = P, so an incoming lse gradient folds into delta: dS = P (dP - (delta - dlse))
                delta = delta - dlse.to(torch.float32)
        dq = _new_output(q.shape, q.dtype, q.device)
        dk = _new_output(k.shape, k.dtype, k.device)
        dv = _new_output(v.shape, v.dtype, v.device)
        input_args = self._input_args(inputs)
        cfg = self.config_for("dkdv_dq" if mode else "dkdv", dims, q.dtype, q.device)
        meta = self.tile_meta("q", cfg.block_q, cfg.block_kv, inputs, dims, q.device, shard)
        for part in parts:  # the residue-order part adds to what the natural part stored
            self.kernel(part.dkdv.name, q.device)[(self._tiles(part, T_KV, cfg.block_kv), H_KV, B)](
                q, k, v, do, lse, delta, dk, dv, *p_arg,
                *input_args, *meta,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
                *runtime,
                **constexprs, **self._launch(cfg), **self._descriptors(part, q, do, cfg.block_q, constexprs),
                **self._fused_dq(part, mode, dq_acc, cfg.block_q, constexprs),
            )  # fmt: skip
        if mode:
            pre = default_config("preprocess", D_QK, q.dtype)
            self.kernel("attn_bwd_dq_convert", q.device)[(_cdiv(T_Q, pre.block_q), H, B)](
                dq_acc, dq, *dq.stride(), H, T_Q, self.scale_for(D_QK),
                D_QK=D_QK, BLOCK_Q=pre.block_q, BLOCK_DQK=constexprs["BLOCK_DQK"], num_warps=pre.num_warps,
            )  # fmt: skip
            return dq, dk, dv, [None] * len(inputs)
        cfg = self.config_for("dq", dims, q.dtype, q.device)
        meta = self.tile_meta("k", cfg.block_q, cfg.block_kv, inputs, dims, q.device, shard)
        names = [i.name for i in self.spec.inputs]
        grads = {n: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for n, t in zip(names, inputs)
                 if wanted and n in self._grad_inputs}  # fmt: skip
        grad_args = [grads.get(n, t) for n, t in zip(names, inputs) if n in self._grad_inputs]
        extra = {"INPUT_GRAD": wanted} if self._grad_inputs else {}
        for part in parts:
            self.kernel(part.dq.name, q.device)[(self._tiles(part, T_Q, cfg.block_q), H, B)](
                q, k, v, do, lse, delta, dq, *p_arg,
                *input_args, *meta, *grad_args,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                *runtime,
                **constexprs, **extra, **self._order(), **self._launch(cfg), **self._descriptors(part, k, v, cfg.block_kv, constexprs),
            )  # fmt: skip
        in_grads = [grads[n].to(t.dtype) if n in grads and want else None
                    for n, t, want in zip(names, inputs, input_grads or [False] * len(inputs))]  # fmt: skip
        return dq, dk, dv, in_grads


# ----------------------------------------------------------------------------------------
# torch.library registration


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor], op_id: str):
    return _REGISTRY[op_id].forward_impl(q, k, v, inputs)


def _fwd_fake(q, k, v, inputs, op_id):
    B, H, T_Q, _ = q.shape
    o = q.new_empty((B, H, T_Q, v.shape[3]))
    lse = q.new_empty((B, H, T_Q), dtype=torch.float32)
    return o, lse


def _fwd_p(q, k, v, inputs, op_id):
    # recompute: store_p -- P as a third output (empty when the call is over the spec's limit)
    o, lse, p = _REGISTRY[op_id].forward_impl(q, k, v, inputs, want_p=True)
    return o, lse, p if p is not None else q.new_empty(0)


def _fwd_p_fake(q, k, v, inputs, op_id):
    o, lse = _fwd_fake(q, k, v, inputs, op_id)
    B, H, T_Q, _ = q.shape
    T_KV = k.shape[2]
    return o, lse, q.new_empty((B, H, T_Q, T_KV) if _REGISTRY[op_id].stores_p(T_Q, T_KV) else (0,))


def _wanted(mask: int, n: int) -> list[bool]:
    """The runtime inputs that want a gradient, from the ops' bit mask (bit i: input i)."""
    return [bool(mask >> i & 1) for i in range(n)]


def _bwd(do, dlse, q, k, v, o, lse, inputs, input_grads, op_id):
    wanted = _wanted(input_grads, len(inputs))
    dq, dk, dv, grads = _REGISTRY[op_id].backward_impl(do, dlse, q, k, v, o, lse, inputs, input_grads=wanted)
    return dq, dk, dv, [g for g in grads if g is not None]  # one per input flagged in input_grads


def _bwd_p(do, dlse, q, k, v, o, lse, p, inputs, input_grads, op_id):
    wanted = _wanted(input_grads, len(inputs))
    stored = p if p.numel() else None
    dq, dk, dv, grads = _REGISTRY[op_id].backward_impl(do, dlse, q, k, v, o, lse, inputs, input_grads=wanted, p=stored)
    return dq, dk, dv, [g for g in grads if g is not None]


def _bwd_p_fake(do, dlse, q, k, v, o, lse, p, inputs, input_grads, op_id):
    return _bwd_fake(do, dlse, q, k, v, o, lse, inputs, input_grads, op_id)


def _bwd_fake(do, dlse, q, k, v, o, lse, inputs, input_grads, op_id):
    wanted = [t.new_empty(t.shape) for t, want in zip(inputs, _wanted(input_grads, len(inputs))) if want]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), wanted


def _bwd_recompute(do, dlse, q, k, v, inputs, input_grads, op_id):
    # one opaque op, so no graph compiler can merge this forward with the original one
    op = _REGISTRY[op_id]
    o, lse = op.forward_impl(q, k, v, inputs)
    return _bwd(do, dlse, q, k, v, o, lse, inputs, input_grads, op_id)


def _bwd_recompute_fake(do, dlse, q, k, v, inputs, input_grads, op_id):
    return _bwd_fake(do, dlse, q, k, v, None, None, inputs, input_grads, op_id)


def _save(ctx, op_id: str, q, k, v, o, lse, ins, p=None) -> None:
    """Save what the recompute policy keeps for the backward: O and lse (and P under
    ``store_p``), or only the inputs."""
    ctx.op_id = op_id
    ctx.keeps_output = "o" in _REGISTRY[op_id].plan.saved
    ctx.keeps_p = p is not None
    ctx.save_for_backward(q, k, v, *((o, lse) if ctx.keeps_output else ()), *((p,) if ctx.keeps_p else ()), *ins)


def _saved(ctx):
    """``(q, k, v, o, lse, p, ins)``; ``o`` and ``lse`` are None under ``recompute: full``,
    ``p`` is None unless ``store_p`` stored it."""
    q, k, v, *rest = ctx.saved_tensors
    o, lse = (rest.pop(0), rest.pop(0)) if ctx.keeps_output else (None, None)
    p = rest.pop(0) if ctx.keeps_p else None
    return q, k, v, o, lse, p, rest


def _setup_context(ctx, inputs, output):
    q, k, v, ins, op_id = inputs
    _save(ctx, op_id, q, k, v, *output[:2], ins, p=output[2] if len(output) > 2 else None)
    ctx.input_grads = [t.requires_grad for t in ins]  # learnable score parameters


def _backward(ctx, do, dlse, dp=None):
    q, k, v, o, lse, p, ins = _saved(ctx)
    mask = sum(1 << i for i, want in enumerate(ctx.input_grads) if want)
    if p is not None:  # recompute: store_p (an empty p: the call was over the limit)
        dq, dk, dv, got = torch.ops.attngen.attention_bwd_p(do, dlse, q, k, v, o, lse, p, ins, mask, ctx.op_id)
    elif ctx.keeps_output:
        dq, dk, dv, got = torch.ops.attngen.attention_bwd(do, dlse, q, k, v, o, lse, ins, mask, ctx.op_id)
    else:  # recompute: full -- the backward op reruns the forward for O and the log-sum-exp
        dq, dk, dv, got = torch.ops.attngen.attention_bwd_recompute(do, dlse, q, k, v, ins, mask, ctx.op_id)
    got = iter(got)
    return dq, dk, dv, [next(got) if want else None for want in ctx.input_grads], None


class _EagerAttention(torch.autograd.Function):
    """Eager calls: the forward and backward of the custom ops (same implementations, same
    saved tensors per recompute policy), as a plain autograd function. The custom ops'
    Python dispatch costs tens of microseconds of host time per call, which short calls
    (a sparse mask at moderate length) cannot hide; under ``torch.compile`` the custom ops
    are used, so graphs stay traceable."""

    @staticmethod
    def forward(ctx, q, k, v, call, *ins):
        # call: (op_id, whether a backward can follow); P is stored only then, so no_grad and
        # inference calls of a store_p spec skip its pass and its memory
        op_id, wants_grad = call
        op = _REGISTRY[op_id]
        if wants_grad:
            o, lse, p = op.forward_impl(q, k, v, list(ins), want_p=True)
        else:
            (o, lse), p = op.forward_impl(q, k, v, list(ins)), None
        ctx.set_materialize_grads(False)
        _save(ctx, op_id, q, k, v, o, lse, ins, p=p)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        op = _REGISTRY[ctx.op_id]
        q, k, v, o, lse, p, ins = _saved(ctx)
        if o is None:  # recompute: full
            o, lse = op.forward_impl(q, k, v, ins)
        if do is None:  # only the log-sum-exp was used
            do = torch.zeros_like(o)
        dq, dk, dv, in_grads = op.backward_impl(do, dlse, q, k, v, o, lse, ins, input_grads=list(ctx.needs_input_grad[4:]), p=p)
        if torch.is_grad_enabled():  # create_graph=True: a second derivative must fail loudly
            dq, dk, dv = _NoSecondDerivative.apply(dq, dk, dv, q, k, v)
        return (dq, dk, dv, None, *in_grads)


class _NoSecondDerivative(torch.autograd.Function):
    """Ties attention gradients built with ``create_graph=True`` to q, k and v, so that
    differentiating them again (a gradient penalty) raises instead of silently treating the
    attention's gradient as a constant."""

    @staticmethod
    def forward(ctx, dq, dk, dv, q, k, v):
        return dq.clone(), dk.clone(), dv.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "attngen: the attention kernels have no second derivative, so a gradient of an attngen gradient "
            "(create_graph=True, e.g. a gradient penalty) cannot be taken; compute that term with "
            "attngen.reference(spec), which is plain PyTorch"
        )


def _custom_op(name: str, impl, fake, schema: str):
    op = torch.library.custom_op(f"attngen::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def _ensure_registered() -> None:
    global _REGISTERED
    with _REGISTER_LOCK:
        if _REGISTERED:
            return
        grads = "(Tensor, Tensor, Tensor, Tensor[])"
        fwd = _custom_op("attention_fwd", _fwd, _fwd_fake, "(Tensor q, Tensor k, Tensor v, Tensor[] inputs, str op_id) -> (Tensor, Tensor)")
        _custom_op(
            "attention_bwd", _bwd, _bwd_fake,
            "(Tensor do, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor[] inputs, int input_grads, str op_id) -> " + grads,
        )  # fmt: skip
        _custom_op(
            "attention_bwd_recompute", _bwd_recompute, _bwd_recompute_fake,
            "(Tensor do, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor[] inputs, int input_grads, str op_id) -> " + grads,
        )  # fmt: skip
        fwd.register_autograd(_backward, setup_context=_setup_context)
        fwd_p = _custom_op("attention_fwd_p", _fwd_p, _fwd_p_fake,
                           "(Tensor q, Tensor k, Tensor v, Tensor[] inputs, str op_id) -> (Tensor, Tensor, Tensor)")
        _custom_op(
            "attention_bwd_p", _bwd_p, _bwd_p_fake,
            "(Tensor do, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor p, Tensor[] inputs, int input_grads, str op_id) -> " + grads,
        )  # fmt: skip
        fwd_p.register_autograd(_backward, setup_context=_setup_context)
        _REGISTERED = True
