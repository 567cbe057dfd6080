"""Launch configurations: one fixed, sound tile config per kernel, head dim and dtype.

Autotuning (choosing among the spec's ``tiles`` on the GPU at hand) replaces these defaults
per shape; until then every call uses them, so no call ever pauses to tune.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters of one kernel launch."""

    block_q: int
    block_kv: int
    num_warps: int
    num_stages: int


def head_block(d: int) -> int:
    """The padded head-dim block: the next power of two, at least 16 (``tl.dot``'s minimum),
    or at least ``ATTNGEN_MIN_HEAD_BLOCK`` when set (a debug switch for compiler faults with
    narrow tiles)."""
    from .config import min_head_block

    return max(16, min_head_block(), 1 << (d - 1).bit_length())


def head_blocks(d_qk: int, d_v: int) -> tuple[int, int]:
    """``(BLOCK_DQK, BLOCK_DV)`` of the attention and decoding kernels: each head dim padded by
    :func:`head_block`, then both raised to the wider of the two, so the blocks are equal.

    On the H200 (Triton 3.6, torch 2.11) kernels compiled with unequal blocks gave wrong
    outputs or gradients, and some raised illegal memory accesses, while the same kernels under
    Triton's interpreter, with every address checked, were right (the cases are in
    tests/regressions/test_gpu_fuzz_faults.py): with ``BLOCK_DV < BLOCK_DQK`` the forward and
    backward (ninth session), with ``BLOCK_DQK`` of 16 or 32 against a ``BLOCK_DV`` of 128
    the dQ kernel (tenth session, 72 cases replayed: faults or dQ off by up to 24 with
    tensor-descriptor loads, a fault with pointer loads and one pipeline stage). Every case
    with equal blocks ran right. The cost: for heads whose dims differ, the products over the
    narrower head dim run at the wider block (its padding columns are zeros).
    """
    block = max(head_block(d_qk), head_block(d_v))
    return block, block


#: Shared memory per block (bytes) from which the forward and dQ kernels at head dims up to
#: 128 take three pipeline stages and 8 warps (Hopper: 227 KiB; A100: 163 KiB; consumer
#: cards about 99 KiB). Measured on the H200 in docs/benchmarks/h200-config-sweep-d128.txt.
LARGE_SHARED_MEMORY = 200 * 1024


#: The kinds of mask (:func:`attngen.tilemap.mask_class`): :func:`default_config` tells
#: ``band`` and ``data_dependent`` from the rest, :func:`fuses_dq` also ``dense``.
MASK_CLASSES = ("band", "data_dependent", "dense", "other")


def fuses_dq(d_max: int, mask_class: str = "other") -> bool:
    """Whether a backward computes dQ inside the dK/dV kernel unless told otherwise
    (:meth:`attngen.op.AttentionOp.dq_mode`): at head dims up to 64 unless the mask class
    is ``dense`` (no mask, or one that keeps every pair), and up to 128 for masks classified
    from runtime inputs (documents).

    Measured on the H200 at T = 16384, bf16 (docs/benchmarks/h200-dq-s9.txt): at D = 64 the
    fused backward ran forward+backward 3-13% faster on every masked variant, and 1% (T =
    16384) and 5% (T = 4096, the anchors suite) slower with no mask, where every tile is FULL
    and the dQ kernel's loop carries no mask work to save; at D = 128 it ran 7-16% slower on
    dense, causal, prefix-LM, ALiBi, softcap and sliding-window masks, whose dK/dV programs
    hold two 128 x 128 float32 accumulators and so have no registers to spare for a dQ tile,
    and faster on documents, whose short programs gain most from dropping the dQ kernel's
    launch, metadata and recomputation."""
    if mask_class == "dense":
        return False
    return d_max <= 64 or (d_max <= 128 and mask_class == "data_dependent")


def default_config(kernel: str, d_max: int, dtype: torch.dtype, shared_memory: int = 0, mask_class: str = "other") -> LaunchConfig:
    """A config that compiles and runs well on recent NVIDIA GPUs for any shape.

    Args:
        kernel: ``fwd``, ``dkdv``, ``dkdv_dq`` (the dK/dV kernel that also adds dQ,
            :func:`fuses_dq`), ``dq`` or ``preprocess``.
        d_max: the larger of ``D_QK`` and ``D_V``.
        dtype: the dtype of q, k and v; float32 tiles take twice the shared memory.
        shared_memory: bytes of shared memory a block may use on the target GPU (0: unknown,
            the interpreter); from :data:`LARGE_SHARED_MEMORY` on, 16-bit kernels take the
            deeper configs that the H200 ran fastest (docs/perf-notes.md).
        mask_class: how the mask shapes the key loops (:func:`attngen.tilemap.mask_class`):
            ``band`` (a bounded window of keys per query tile: short loops), ``data_dependent``
            (tiles classified from runtime inputs, such as documents), ``dense`` (no mask;
            configs as ``other``) or ``other`` (causal, prefix-LM). Only large shared memory
            tells them apart. Measured on the
            H200 at T = 16384 (docs/benchmarks/h200-config-sweep-s7.txt): at D = 128 a band
            forward ran 8% faster on 64 x 64 tiles, dK/dV on (64, 128, 8, 3) ran 5-15% faster
            than (32, 64, 4, 2) on all but bands, which took (64, 64, 4, 2) (6%); at D = 64 a
            band forward ran 10% faster with 8 warps and a document forward 6% faster on
            64 x 64 tiles.

    Raises:
        ValueError: an unknown kernel name or mask class.
    """
    if mask_class not in MASK_CLASSES:
        raise ValueError(f"unknown mask class {mask_class!r}: use one of {', '.join(MASK_CLASSES)}")
    wide = dtype == torch.float32
    large = shared_memory >= LARGE_SHARED_MEMORY and not wide
    band = large and mask_class == "band"
    if kernel == "preprocess":
        return LaunchConfig(64, 16, 4, 1)
    if kernel == "fwd":
        if d_max <= 64:
            if band:
                cfg = LaunchConfig(128, 64, 8, 3)
            elif large and mask_class == "data_dependent":
                cfg = LaunchConfig(64, 64, 4, 2)
            else:
                cfg = LaunchConfig(128, 64, 4, 3)
        elif d_max <= 128:
            cfg = LaunchConfig(64, 64, 4, 3) if band else LaunchConfig(128, 64, 8, 3 if large else 2)
        else:
            cfg = LaunchConfig(64, 32, 4, 2)
    elif kernel in ("dkdv", "dkdv_dq"):
        if d_max <= 64:
            # with dQ fused, 64 x 64 tiles ran 4-17% faster than (32, 128, 4, 3) (h200-dq-s9.txt)
            cfg = LaunchConfig(64, 64, 4, 2) if large and kernel == "dkdv_dq" else LaunchConfig(32, 128, 4, 3)
        elif d_max <= 128:
            if band:
                cfg = LaunchConfig(64, 64, 4, 2)
            else:
                cfg = LaunchConfig(64, 128, 8, 3) if large else LaunchConfig(32, 64, 4, 2)
        else:
            cfg = LaunchConfig(16, 32, 4, 1)
    elif kernel == "dq":
        if d_max <= 64:
            # (64, 64, 4, 3) ran 2-8% faster at D = 64 on the H200 but raised illegal memory
            # accesses there at D_QK = 5 and 8 (Triton 3.6; docs/perf-notes.md)
            cfg = LaunchConfig(128, 32, 4, 3)
        elif d_max <= 128:
            cfg = LaunchConfig(128, 64, 8, 3) if large else LaunchConfig(64, 32, 4, 2)
        else:
            cfg = LaunchConfig(32, 16, 4, 1)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    if wide:
        cfg = LaunchConfig(max(16, cfg.block_q // 2), max(16, cfg.block_kv // 2), cfg.num_warps, 1)
    return cfg


def decode_config(d_max: int, dtype: torch.dtype, rows: int) -> LaunchConfig:
    """The launch config of the split-KV decoding kernel (:mod:`attngen.decode`).

    Args:
        d_max: the larger of ``D_QK`` and ``D_V``.
        dtype: the dtype of q and the cache; float32 key tiles are halved.
        rows: query rows per KV head (``H // H_KV`` times the new tokens per sequence).

    Returns:
        ``block_q`` is the row block ``BLOCK_R`` (the next power of two >= ``rows``, at least
        16 for ``tl.dot``, at most 64, more row blocks beyond), ``block_kv`` the key tile: 128
        positions up to ``D = 128`` in 16-bit dtypes (two stages of K and V tiles, 128 KiB of
        shared memory), 4 warps, 2 stages. On the H200 (B=8, H=32, H_KV=8, D=128, 32,768
        cached positions, bf16) 128-position tiles read the cache at 1.01x the memory floor
        where 64-position tiles took 1.04x, and 3 or 4 stages were no faster (paged: slower).
    """
    block_r = min(64, max(16, 1 << (rows - 1).bit_length()))
    block_kv = 128 if d_max <= 128 else 64
    if dtype == torch.float32:
        block_kv //= 2
    return LaunchConfig(block_r, block_kv, 4, 2)
