"""Streaming inference: attention of a few new tokens per sequence against a KV cache.

:meth:`attngen.AttentionOp.decode` runs here. The method is split-KV decoding
("flash-decoding", Dao, Haziza, Massa and Sizov, 2023): the key tiles a sequence must visit
are divided among ``num_splits`` programs per KV head, each writes a partial output and
log-sum-exp, and :func:`attngen.merge.merge_splits` combines them. The cache is contiguous
``[B, H_KV, T_max, D]`` or paged ``[num_blocks, block_size, H_KV, D]`` behind a block table
(PagedAttention, Kwon et al., 2023; the layout vLLM and FlashAttention use). Grouped-query
attention is packed: one program's rows are every query head of its KV head times every new
token, so each key tile is read once per group.

Decoding is inference only: it records no autograd graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import triton

from . import config
from .args import KERNEL_DTYPES, MAX_HEAD_DIM, _dtype_name, check_inputs, is_int
from .errors import ShapeError, UnsupportedError
from .tiles import decode_config, head_blocks

#: the most new tokens per sequence a decoding call takes (speculative decoding, chunked
#: prefill steps); longer chunks go through the operator itself
MAX_DECODE_TOKENS = 16
#: the most splits :func:`choose_num_splits` picks
MAX_SPLITS = 64
#: programs per multiprocessor :func:`choose_num_splits` aims for
WAVES = 2
#: a split should have at least this many key tiles to be worth its launch and merge
MIN_TILES_PER_SPLIT = 2


@dataclass(frozen=True)
class DecodeCall:
    """A validated decoding call: its dimensions and the tensors the kernel takes.

    ``capacity`` is the number of positions the cache can hold per sequence (``T_max``, or
    ``max_blocks * block_size`` for a paged cache); ``page_size`` is 0 for a contiguous cache.
    ``cache_seqlens`` is int32 ``[B]`` on q's device, and so is ``query_lens``, or None for
    ``T_Q`` new tokens in every sequence; ``max_seqlen`` is the longest cache length (read once
    on the host while validating), or the capacity when the values were not read."""

    dims: dict[str, int]
    capacity: int
    page_size: int
    cache_seqlens: torch.Tensor
    query_lens: torch.Tensor | None
    block_table: torch.Tensor | None
    max_seqlen: int
    inputs: list[torch.Tensor]


def _int32_vector(name: str, t: Any, B: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{name}: expected an int32 torch.Tensor of shape [B] = [{B}], got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise ShapeError(f"{name}: dtype {_dtype_name(t.dtype)}; pass {name}.to(torch.int32)")
    if tuple(t.shape) != (B,):
        raise ShapeError(f"{name}: expected shape [B] = [{B}], got {list(t.shape)}")
    if t.device != device:
        raise ShapeError(f"{name}: on {t.device} but q is on {device}; move it with {name}.to(q.device)")
    return t.contiguous()  # the kernel reads element b at offset b (a strided or expanded view is copied)


def check_decode_call(op, q, k_cache, v_cache, cache_seqlens, block_table, query_lens, inputs,
                      validate: bool = True) -> DecodeCall:
    """Validate a decoding call (see :meth:`attngen.AttentionOp.decode` for the arguments).

    Shapes, dtypes and devices are always checked (on the host, no synchronisation). With
    ``validate`` it also reads ``cache_seqlens``, ``query_lens`` and the block table to the
    host in one transfer, to check their values (one device synchronisation on a GPU);
    without it ``max_seqlen`` is the cache's capacity, and ``query_lens`` stays None when not
    given (the kernel then takes ``T_Q`` new tokens per sequence).

    Raises:
        ShapeError: naming the argument, what was expected, what came, and the fix.
        UnsupportedError: a normaliser other than softmax; tensors that require grad while
            grad mode is on.
    """
    if op.spec.normalizer != "softmax":
        raise UnsupportedError(
            f"decode: spec {op.spec.name!r} uses the {op.spec.normalizer} normaliser; split-KV decoding "
            "merges partial results by their log-sum-exp, which only softmax attention has. Call the "
            "operator itself on the valid part of the cache: op(q, k_cache[:, :, :n], v_cache[:, :, :n])"
        )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    paged = block_table is not None
    layouts = {
        "q": "[B, H, T_Q, D_QK]",
        "k_cache": "[num_blocks, block_size, H_KV, D_QK]" if paged else "[B, H_KV, T_max, D_QK]",
        "v_cache": "[num_blocks, block_size, H_KV, D_V]" if paged else "[B, H_KV, T_max, D_V]",
    }
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ShapeError(f"{name}: expected 4 dimensions {layouts[name]}, got shape {tuple(t.shape)}")
    if q.dtype not in KERNEL_DTYPES:
        names = ", ".join(_dtype_name(d) for d in KERNEL_DTYPES)
        raise ShapeError(f"q: dtype {_dtype_name(q.dtype)} is not supported; use one of {names}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ShapeError(f"{name}: dtype {_dtype_name(t.dtype)} differs from q's {_dtype_name(q.dtype)}; cast with {name}.to(q.dtype)")
        if t.device != q.device:
            raise ShapeError(f"{name}: on {t.device} but q is on {q.device}; move all tensors to one device")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache, *inputs.values()) if isinstance(t, torch.Tensor)):
        raise UnsupportedError(
            "decode: a tensor requires grad, but decoding is inference only and records no autograd graph; "
            "call it under torch.no_grad() or torch.inference_mode(), or pass detached tensors"
        )
    B, H, T_Q, D_QK = q.shape
    if not 1 <= T_Q <= MAX_DECODE_TOKENS:
        raise ShapeError(
            f"q: T_Q={T_Q} new tokens per sequence; decode takes 1 to {MAX_DECODE_TOKENS} (pad shorter sequences "
            "and pass query_lens); process longer chunks with op(q, k, v) against the cache"
        )
    if paged:
        _, page_size, H_KV, _ = k_cache.shape
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != B:
            got = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
            raise ShapeError(f"block_table: expected an int32 tensor [B, max_blocks] with B={B}, got {got}")
        if block_table.dtype != torch.int32:
            raise ShapeError(f"block_table: dtype {_dtype_name(block_table.dtype)}; pass block_table.to(torch.int32)")
        if block_table.device != q.device:
            raise ShapeError(f"block_table: on {block_table.device} but q is on {q.device}; move it with block_table.to(q.device)")
        if page_size < 1 or k_cache.shape[0] < 1:
            raise ShapeError(f"k_cache: a paged cache needs at least one block of at least one position, got shape {tuple(k_cache.shape)}")
        capacity = block_table.shape[1] * page_size
        kv_shape = (k_cache.shape[0], page_size, H_KV)
        if tuple(v_cache.shape[:3]) != kv_shape:
            raise ShapeError(f"v_cache: expected [num_blocks, block_size, H_KV, D_V] = {[*kv_shape, 'D_V']} like k_cache, got {list(v_cache.shape)}")
    else:
        if k_cache.shape[0] != B:
            raise ShapeError(
                f"k_cache: batch {k_cache.shape[0]} differs from q's B={B}; a contiguous cache is [B, H_KV, T_max, D_QK] "
                "(for a paged cache [num_blocks, block_size, H_KV, D_QK], pass block_table)"
            )
        _, H_KV, capacity, _ = k_cache.shape
        page_size = 0
        if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
            raise ShapeError(f"v_cache: expected [B, H_KV, T_max, D_V] = {[*k_cache.shape[:3], 'D_V']} like k_cache, got {list(v_cache.shape)}")
    if k_cache.shape[3] != D_QK:
        raise ShapeError(f"k_cache: head dim {k_cache.shape[3]} differs from q's D_QK={D_QK}")
    D_V = v_cache.shape[3]
    if H_KV == 0 or H % H_KV != 0:
        raise ShapeError(f"k_cache: H_KV={H_KV} must divide q's H={H} (grouped-query attention)")
    if B < 1 or H < 1:
        raise ShapeError(f"empty decoding call: B={B}, H={H}; both must be at least 1")
    for name, d in (("D_QK", D_QK), ("D_V", D_V)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ShapeError(f"{name}={d}: head dims from 1 to {MAX_HEAD_DIM} are supported")

    seqlens = _int32_vector("cache_seqlens", cache_seqlens, B, q.device)
    if query_lens is not None:
        query_lens = _int32_vector("query_lens", query_lens, B, q.device)
    dims = {"B": B, "H": H, "H_KV": H_KV, "T_Q": T_Q, "T_KV": capacity, "D_QK": D_QK, "D_V": D_V}
    ordered = check_inputs(op.spec, inputs, dims, q.device, constant_reads=op._constant_reads, grad_inputs=None,
                           call="op.decode(q, k_cache, v_cache, cache_seqlens, ...)")
    if not validate:
        return DecodeCall(dims, capacity, page_size, seqlens, query_lens, block_table if paged else None, capacity, ordered)
    if query_lens is None:
        query_lens = torch.full((B,), T_Q, dtype=torch.int32, device=q.device)
    # one transfer to the host for every value check
    host = torch.cat([seqlens, query_lens, *([block_table.reshape(-1)] if paged else [])]).cpu().long()
    lens, qlens = host[:B], host[B : 2 * B]
    bad = (qlens < 0) | (qlens > T_Q)
    if bad.any():
        b = int(bad.nonzero()[0])
        raise ShapeError(f"query_lens: sequence {b} has {int(qlens[b])} new tokens; each must be from 0 to q's T_Q={T_Q}")
    over = lens > capacity
    if over.any():
        b = int(over.nonzero()[0])
        raise ShapeError(
            f"cache_seqlens: sequence {b} has {int(lens[b])} cached positions but the cache holds {capacity} per sequence; "
            f"pass the number of positions filled, at most {capacity}, or a larger cache"
        )
    short = lens < qlens
    if short.any():
        b = int(short.nonzero()[0])
        raise ShapeError(
            f"cache_seqlens: sequence {b} has {int(lens[b])} cached positions but {int(qlens[b])} new token(s); append "
            f"the new tokens' keys and values to the cache first, so that query_lens[b] <= cache_seqlens[b]"
        )
    if paged:
        used = torch.arange(block_table.shape[1]) < ((lens + page_size - 1) // page_size)[:, None]
        entries = host[2 * B :].view(B, -1)[used]
        if entries.numel() and (entries.min() < 0 or entries.max() >= k_cache.shape[0]):
            raise ShapeError(
                f"block_table: entries in use (the first ceil(cache_seqlens / {page_size}) of each row) must index "
                f"k_cache's {k_cache.shape[0]} blocks, found {int(entries.min())} to {int(entries.max())}"
            )
    return DecodeCall(dims, capacity, page_size, seqlens, query_lens, block_table if paged else None, int(lens.max()), ordered)


def choose_num_splits(programs: int, n_tiles: int, processors: int) -> int:
    """Splits per (sequence, KV head) so that the launch fills the device about twice.

    A program of the decoding kernel takes most of a multiprocessor's shared memory, so the
    programs run in waves of one per multiprocessor; the split count is rounded down so that
    the last wave is nearly full. On the H200 (132 multiprocessors; 64 programs before
    splitting: B=8, H_KV=8, D=128, 32,768 cached positions, bf16) 4 splits (256 programs, two
    waves) read the cache at 1.01x the memory floor, 8 splits at 1.01x, while 3 splits (192
    programs) took 1.05x and 5 splits (320 programs, a third wave of 56) 1.32x.

    Args:
        programs: programs without splitting (sequences × KV heads × row blocks).
        n_tiles: key tiles of the longest sequence.
        processors: streaming multiprocessors (1 on the CPU, where the interpreter runs
            programs one after another and splitting only adds work).

    Returns:
        ``min(floor(WAVES * processors / programs), ceil(n_tiles / MIN_TILES_PER_SPLIT),
        MAX_SPLITS)``, at least 1: no splitting once the programs alone fill the device.
    """
    if programs >= processors:
        return 1
    return max(1, min(WAVES * processors // programs, -(-n_tiles // MIN_TILES_PER_SPLIT), MAX_SPLITS))


def decode_launch(op, q, k_cache, v_cache, cache_seqlens, *, block_table=None, num_splits=None, query_lens=None,
                  validate=True, **inputs):
    """Check a decoding call and return a function of no arguments that runs it: the
    split-KV kernel, then the merge kernel, returning ``(o, lse)``.

    The checks run once, here; each call of the returned function only launches the two
    kernels (into fresh outputs), so a benchmark can time the launches apart from the checks.
    See :meth:`attngen.AttentionOp.decode` for the arguments.
    """
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    call = check_decode_call(op, q, k_cache, v_cache, cache_seqlens, block_table, query_lens, inputs,
                             validate=validate and not capturing)
    dims = call.dims
    B, H, H_KV, T_Q, D_QK, D_V = (dims[n] for n in ("B", "H", "H_KV", "T_Q", "D_QK", "D_V"))
    group = H // H_KV
    cfg = decode_config(max(D_QK, D_V), q.dtype, group * T_Q)
    row_blocks = -(-group * T_Q // cfg.block_q)
    if num_splits is None:
        processors = torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda" else 1
        num_splits = choose_num_splits(B * H_KV * row_blocks, -(-call.max_seqlen // cfg.block_kv), processors)
    elif not is_int(num_splits) or num_splits < 1:
        raise ShapeError(f"num_splits: {num_splits!r}; pass a positive int, or None to choose from the cache length")
    num_splits = int(num_splits)
    scale = op.scale_for(D_QK)
    block_dqk, block_dv = head_blocks(D_QK, D_V)
    if call.page_size:  # [num_blocks, block_size, H_KV, D]: page, head, slot, dim
        kv_strides = [t.stride(i) for t in (k_cache, v_cache) for i in (0, 2, 1, 3)]
        bt, bt_strides = call.block_table, call.block_table.stride()
    else:  # [B, H_KV, T_max, D]
        kv_strides = [*k_cache.stride(), *v_cache.stride()]
        bt, bt_strides = call.cache_seqlens, (0, 0)  # an unread placeholder
    kernel = op.decode_kernel(q.device)[(num_splits, H_KV * row_blocks, B)]
    merge = op.decode_kernel(q.device, merge=True)[(B * H * T_Q,)]
    head = [q, k_cache, v_cache]
    tail = [
        call.cache_seqlens, call.query_lens if call.query_lens is not None else call.cache_seqlens, bt,
        *op._input_args(call.inputs),
        *q.stride(), *kv_strides, *bt_strides,
    ]
    # the kernel never reads past the cache, whatever the values of cache_seqlens and the block
    # table (clamped to the capacity; pages outside the pool are not dereferenced, their positions read as zeros)
    constexprs = dict(
        GROUP=group, BOTTOM_RIGHT=op.spec.align == "bottom_right",
        D_QK=D_QK, D_V=D_V, BLOCK_R=cfg.block_q, BLOCK_KV=cfg.block_kv,
        BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        PAGED=bool(call.page_size), PAGE_SIZE=max(call.page_size, 1),
        HAS_QUERY_LENS=call.query_lens is not None,
        DOT_PRECISION=dict(op.plan.dot_precision)[_dtype_name(q.dtype)],
        EMULATE_BF16_DOT=q.dtype == torch.bfloat16 and config.interpret_all(),
        FAST_SIGMOID=config.fast_sigmoid(q.dtype),
        TILE_SKIP=config.tile_skipping(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    n_blocks = k_cache.shape[0] if call.page_size else 1
    poison = config.poison_outputs()

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            o_part = torch.empty((B, H, T_Q, num_splits, D_V), dtype=torch.float32, device=q.device)
            lse_part = torch.empty((B, H, T_Q, num_splits), dtype=torch.float32, device=q.device)
            if poison:
                o_part.fill_(float("nan"))
                lse_part.fill_(float("nan"))
            kernel(*head, o_part, lse_part, *tail, *o_part.stride(), H, T_Q, num_splits, call.capacity, n_blocks,
                   scale, scale / math.log(2.0), **constexprs)
            o = torch.empty((B, H, T_Q, D_V), dtype=q.dtype, device=q.device)
            lse = torch.empty((B, H, T_Q), dtype=torch.float32, device=q.device)
            merge(o_part, lse_part, o, lse, num_splits, D_V,
                  BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=triton.next_power_of_2(D_V))
        return o, lse

    return run


@torch.compiler.disable  # host-side checks and raw Triton launches: torch.compile runs it eagerly
def decode(op, q, k_cache, v_cache, cache_seqlens, *, block_table=None, num_splits=None, query_lens=None,
           validate=True, **inputs):
    """Split-KV decoding with a compiled attention op; see :meth:`attngen.AttentionOp.decode`."""
    return decode_launch(op, q, k_cache, v_cache, cache_seqlens, block_table=block_table, num_splits=num_splits,
                         query_lens=query_lens, validate=validate, **inputs)()
