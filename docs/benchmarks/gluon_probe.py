"""A warp-specialised attention forward written by hand in Gluon, for Hopper.

    PYTHONPATH=. python docs/benchmarks/gluon_probe.py OUT          # on the H200
    python docs/benchmarks/gluon_probe.py --compile                 # sm_90 compile check, no GPU

Triton 3.6's automatic warp specialisation hangs on the H200 for attention loops
(ws_probe.py, docs/perf-notes.md). Gluon (``triton.experimental.gluon``) lets a kernel state
the split itself, as FlashAttention-3 does (Shah et al., 2024):

- a producer partition of one warp issues TMA copies of the K and V tiles into a ring of
  ``STAGES`` shared-memory buffers, each with a "ready" mbarrier that the copy completes and
  an "empty" mbarrier that the consumers arrive on once their product has read the tile;
- the default partition (``num_warps`` warps, 8: two warp groups of 64 query rows each)
  runs the online softmax: S = Q Kᵀ by ``warpgroup_mma`` from shared memory, base-2
  exponentials in registers, O += P V with P fed from registers;
- registers are split by ``setmaxnreg``: 24 for the producer, the rest of ``maxnreg`` ×
  warps for the consumers.

SPLIT gives each of the two consumer warp groups its own partition and 64 rows, so that
they run out of step (FlashAttention-3 also orders them with named barriers; this does not).

No mask or the causal one, B = 1, H = 16, T = 16384, bf16; each config in its own process
with a time limit, as in ws_probe.py, whose baselines (SDPA-cuDNN and attngen at the same
mask) it reuses. The twelfth session's run on the H200 is in h200-gluon-probe-s12.txt; the
split form became attngen's forward on Hopper (attngen/warpspec.py).
"""

import math
import os
import sys

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ws_probe  # noqa: E402  (the shared shape, FLOP count and process-per-config runner)

# (BLOCK_M, BLOCK_N, STAGES, num_warps, maxnreg, OVERLAP, CAUSAL, SPLIT, D); SPLIT takes num_warps 4
CONFIGS = [
    (128, 128, 2, 8, 168, 0, 0, 0, 128),
    (128, 128, 2, 8, 168, 1, 0, 0, 128),
    (128, 128, 3, 8, 168, 1, 0, 0, 128),
    (128, 64, 3, 8, 168, 0, 0, 0, 128),
    (128, 64, 3, 8, 168, 1, 0, 0, 128),
    (128, 128, 2, 4, 168, 1, 0, 1, 128),
    (128, 128, 3, 4, 168, 1, 0, 1, 128),
    (128, 128, 2, 8, 168, 1, 1, 0, 128),
    (128, 64, 3, 8, 168, 1, 1, 0, 128),
    (128, 128, 2, 4, 168, 1, 1, 1, 128),
    (128, 128, 3, 8, 168, 0, 0, 0, 64),
    (128, 128, 3, 8, 168, 1, 0, 0, 64),
    (128, 128, 3, 4, 168, 1, 0, 1, 64),
    (128, 128, 3, 8, 168, 1, 1, 0, 64),
]


@gluon.constexpr_function
def _mma_layout(num_warps, n):
    """wgmma accumulator layout: warps stacked along the rows, instruction 16 × n × 16."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def ring(a_desc, b_desc, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
    """Shared-memory rings of STAGES tiles for two streamed operands (tiles as their
    descriptors' blocks), each stage with a ready mbarrier (completed by the TMA copy) and an
    empty one (completed by CONSUMERS arrivals). Returns bufs_a, bufs_b, ready_a, ready_b,
    empty_a, empty_b."""
    bufs_a = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    bufs_b = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    ready_a = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready_b = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_a = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty_b = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready_a.index(i), count=1)
        mbarrier.init(ready_b.index(i), count=1)
        mbarrier.init(empty_a.index(i), count=CONSUMERS)
        mbarrier.init(empty_b.index(i), count=CONSUMERS)
    return bufs_a, bufs_b, ready_a, ready_b, empty_a, empty_b


@gluon.jit
def _producer(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, kv_row, n_tiles):
    """Worker partition: TMA copies of K and V tiles into the ring, up to STAGES tiles ahead
    of use. K and V have their own "empty" barriers, so the next K tile can load as soon as
    Q Kᵀ has read the last one, while P V still reads V (as in FlashAttention-3)."""
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    for j in range(n_tiles):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        # a fresh mbarrier counts as having completed the phase before 0, so the first
        # pass over the ring does not wait
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BLOCK_N, 0], k_ready.index(stage), k_bufs.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * BLOCK_N, 0], v_ready.index(stage), v_bufs.index(stage))


@gluon.jit
def _softmax_step(s, row_max, row_sum, acc, qk_scale_log2, q_start, k_start,
                  s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr, MASKED: gl.constexpr):
    """One tile of the online softmax (base 2, scale folded in): the causal mask where
    MASKED (key k_start + c visible to query q_start + r when k <= q), the new row maxima and
    sums, the output rescaled, and P in bf16 as the register operand of the next product.
    Every row keeps at least its own key, so no row maximum stays -inf."""
    if MASKED:
        rows = q_start + gl.arange(0, s.shape[0], layout=gl.SliceLayout(1, s_layout))
        cols = k_start + gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1), s, float("-inf"))
    new_max = gl.maximum(row_max, gl.max(s, axis=1) * qk_scale_log2)
    p = gl.exp2(s * qk_scale_log2 - gl.expand_dims(new_max, 1))
    scale = gl.exp2(row_max - new_max)
    row_sum = row_sum * scale + gl.sum(p, axis=1)
    acc = acc * gl.expand_dims(gl.convert_layout(scale, gl.SliceLayout(1, o_layout)), 1)
    return gl.convert_layout(p.to(gl.bfloat16), p_layout), new_max, row_sum, acc


@gluon.jit
def _plain_tile(j, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, s_init, row_max, row_sum, acc,
                qk_scale_log2, q_start, s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                MASKED: gl.constexpr):
    """Key tile j without overlap: Q Kᵀ, softmax, P V, each waited before the next."""
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    stage = j % STAGES
    phase = (j // STAGES) & 1
    mbarrier.wait(k_ready.index(stage), phase)
    s = warpgroup_mma(q_smem, k_bufs.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    mbarrier.arrive(k_empty.index(stage), count=1)
    p_op, row_max, row_sum, acc = _softmax_step(s, row_max, row_sum, acc, qk_scale_log2, q_start, j * s.shape[1],
                                                s_layout, o_layout, p_layout, MASKED)
    mbarrier.wait(v_ready.index(stage), phase)
    acc = warpgroup_mma(p_op, v_bufs.index(stage), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    mbarrier.arrive(v_empty.index(stage), count=1)
    return row_max, row_sum, acc


@gluon.jit
def _overlapped_tile(j, s, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, s_init, row_max, row_sum, acc,
                     qk_scale_log2, q_start, s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                MASKED: gl.constexpr):
    """Key tile j with tile j + 1's Q Kᵀ issued before j's softmax; ``s`` holds tile j's
    scores, and the scores of tile j + 1 come back."""
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    stage = j % STAGES
    nxt = (j + 1) % STAGES
    mbarrier.wait(k_ready.index(nxt), ((j + 1) // STAGES) & 1)
    s_next = warpgroup_mma(q_smem, k_bufs.index(nxt).permute((1, 0)), s_init, use_acc=False, is_async=True)
    p_op, row_max, row_sum, acc = _softmax_step(s, row_max, row_sum, acc, qk_scale_log2, q_start, j * s.shape[1],
                                                s_layout, o_layout, p_layout, MASKED)
    mbarrier.wait(v_ready.index(stage), (j // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_bufs.index(stage), acc, is_async=True)
    s, acc = warpgroup_mma_wait(num_outstanding=0, deps=(s_next, acc))
    mbarrier.arrive(k_empty.index(nxt), count=1)
    mbarrier.arrive(v_empty.index(stage), count=1)
    return s, row_max, row_sum, acc


@gluon.jit
def _consumer(q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, n_full, n_tiles, q_start, qk_scale_log2,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, OVERLAP: gl.constexpr,
              CAUSAL: gl.constexpr, num_warps: gl.constexpr):
    """Consumer partition (the default one, or a worker in the SPLIT layout): online softmax
    over key tiles 0 .. n_tiles - 1, of which those from n_full on take the causal mask
    (CAUSAL; else n_full == n_tiles); returns the unnormalised output [BLOCK_M, D] (float32)
    and the row sums [BLOCK_M]. OVERLAP issues the next tile's Q Kᵀ before this tile's
    softmax, so that the exponentials run while the tensor cores work (FlashAttention-3's
    intra-warpgroup overlap). n_tiles >= 1; with CAUSAL the last tile is always masked. An
    arrive is one arrival per partition (thread 0, after the barrier the compiler puts
    before it)."""
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(num_warps, D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_max = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    row_sum = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    s_init = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    if OVERLAP:
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_init, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        last = n_tiles - 1
        for j in range(n_full if CAUSAL else last):
            s, row_max, row_sum, acc = _overlapped_tile(j, s, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                                                        s_init, row_max, row_sum, acc, qk_scale_log2, q_start,
                                                        s_layout, o_layout, p_layout, False)
        if CAUSAL:
            for j in range(n_full, last):
                s, row_max, row_sum, acc = _overlapped_tile(j, s, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty,
                                                            v_empty, s_init, row_max, row_sum, acc, qk_scale_log2,
                                                            q_start, s_layout, o_layout, p_layout, True)
        # the last tile: its scores are in s, nothing to prefetch
        p_op, row_max, row_sum, acc = _softmax_step(s, row_max, row_sum, acc, qk_scale_log2, q_start, last * BLOCK_N,
                                                    s_layout, o_layout, p_layout, CAUSAL)
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_bufs.index(last % STAGES), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(v_empty.index(last % STAGES), count=1)
    else:
        for j in range(n_full):
            row_max, row_sum, acc = _plain_tile(j, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, s_init,
                                                row_max, row_sum, acc, qk_scale_log2, q_start, s_layout, o_layout, p_layout, False)
        if CAUSAL:
            for j in range(n_full, n_tiles):
                row_max, row_sum, acc = _plain_tile(j, q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, s_init,
                                                    row_max, row_sum, acc, qk_scale_log2, q_start, s_layout, o_layout,
                                                    p_layout, True)
    return acc, gl.convert_layout(row_sum, gl.SliceLayout(1, o_layout))


@gluon.jit
def _split_partition(ROLE: gl.constexpr, OVERLAP: gl.constexpr, CAUSAL: gl.constexpr, q_smem, q_ready, k_desc, v_desc,
                     o_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, head_row, q_start, n_full, n_tiles,
                     qk_scale_log2):
    """SPLIT layout: ROLE 0 and 1 are consumers of 4 warps, each owning 64 of the query tile's
    rows (its own Q Kᵀ, softmax, P V and output store), so that the two warp groups run out
    of step and one's exponentials can overlap the other's products; ROLE 2 is the producer.
    One function for every role; workers take scalars and shared-memory descriptors only."""
    if ROLE == 2:
        _producer(k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, head_row, n_tiles)
    else:
        HALF: gl.constexpr = o_desc.block_type.shape[0]
        D: gl.constexpr = o_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
        gl.static_assert(2 * HALF == q_smem.type.shape[0] and HALF == 64, "SPLIT takes 128-row query tiles")
        mbarrier.wait(q_ready, 0)  # completed before the split; every consumer checks it, as FlashAttention-3 does
        q_half = q_smem.slice(ROLE * HALF, HALF)
        acc, row_sum = _consumer(q_half, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, n_full, n_tiles,
                                 q_start + ROLE * HALF, qk_scale_log2, HALF, BLOCK_N, D, OVERLAP, CAUSAL, 4)
        q_half.store((acc / gl.expand_dims(row_sum, 1)).to(o_desc.dtype))  # this half's Q rows are done with
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [head_row + q_start + ROLE * HALF, 0], q_half)
        tma.store_wait(pendings=0)


@gluon.jit
def gluon_attn_fwd(q_desc, k_desc, v_desc, o_desc, T, qk_scale_log2, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
                   CAUSAL: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr):
    """Attention forward over flattened [B * H * T, D] bf16 tensors, with no mask or the
    causal one (k <= q); one program per (query tile, head); T a multiple of both tiles and
    BLOCK_M of BLOCK_N. Causal programs run longest first (the last query tile has most
    keys) and visit only tiles that hold a visible pair; the mask is evaluated on the
    diagonal tiles alone. SPLIT (num_warps 4; o_desc's tile is half of q_desc's): two
    consumer partitions of 64 rows each (_split_partition), else one of num_warps warps."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    head_row = gl.program_id(1) * T
    if CAUSAL:
        q_start = (gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_M
        n_full = q_start // BLOCK_N
        n_tiles = (q_start + BLOCK_M) // BLOCK_N
    else:
        q_start = gl.program_id(0) * BLOCK_M
        n_full = T // BLOCK_N
        n_tiles = n_full
    q_row = head_row + q_start

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    # arrivals that free a stage: one per consumer partition
    k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty = ring(k_desc, v_desc, STAGES, 2 if SPLIT else 1)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)

    mbarrier.expect(q_ready, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_ready, q_smem)
    mbarrier.wait(q_ready, 0)

    if SPLIT:
        gl.static_assert(num_warps == 4, "SPLIT takes num_warps=4: each consumer partition is one warp group")
        args = (q_smem, q_ready, k_desc, v_desc, o_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, head_row,
                q_start, n_full, n_tiles, qk_scale_log2)
        # the constexpr flags go in the literal part of each tuple, where they stay constexpr
        gl.warp_specialize([(_split_partition, (0, OVERLAP, CAUSAL) + args), (_split_partition, (1, OVERLAP, CAUSAL) + args),
                            (_split_partition, (2, OVERLAP, CAUSAL) + args)], [4, 1], [240, 24])
    else:
        acc, row_sum = gl.warp_specialize([
            (_consumer, (q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, n_full, n_tiles, q_start,
                         qk_scale_log2, BLOCK_M, BLOCK_N, D, OVERLAP, CAUSAL, num_warps)),
            (_producer, (k_desc, v_desc, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, head_row, n_tiles)),
        ], [1], [24])
        o = acc / gl.expand_dims(row_sum, 1)
        q_smem.store(o.to(o_desc.dtype))  # Q's buffer is free once the loop is done
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
        tma.store_wait(pendings=0)


def _layout(block):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)


def _after_barrier(lines: list, i: int) -> bool:
    """Whether PTX instruction i is preceded by a ``bar.sync`` with only scalar arithmetic
    (no memory access, product or barrier operation) in between."""
    scalar = ("add.", "sub.", "mul.", "mad.", "and.", "or.", "xor.", "shl.", "shr.", "setp.", "selp.", "mov.", "cvt.")
    for line in reversed(lines[:i]):
        if line.startswith("bar.sync"):
            return True
        if not line.startswith(scalar):
            return False
    return False


def compile_report(fn, signature: dict, constexprs: dict, warps: int, maxnreg: int, aligned=("T", )) -> str:
    """Compile a Gluon kernel for sm_90 without a GPU; report its warps, shared memory,
    ``setmaxnreg`` values, ptxas's spill stores, and how many stage releases follow a barrier
    of their partition. ``aligned`` names the arguments that a launch will find divisible by
    16 (pointers and sizes), as Triton specialises them, so that the report is of the kernel
    that runs."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon._runtime import GluonASTSource

    attrs = {(fn.arg_names.index(a), ): [["tt.divisibility", 16]] for a in aligned}
    k = triton.compile(GluonASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "maxnreg": maxnreg})
    regs = sorted(set(int(r) for r in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", k.asm["ptx"])))
    with tempfile.TemporaryDirectory() as tmp:  # ptxas's own report: registers and spills
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True).stderr
    spills = re.findall(r"(\d+) bytes spill stores", report)
    # each release of a stage is one arrive by thread 0; it is safe only after a barrier of
    # the whole partition, which the compiler inserts: check it is there
    lines = [ln.strip() for ln in k.asm["ptx"].splitlines()
             if ln.strip() and not ln.strip().startswith(("//", ".loc"))]  # instructions only
    arrives = [i for i, ln in enumerate(lines) if "mbarrier.arrive.shared" in ln and "expect" not in ln]
    fenced = sum(_after_barrier(lines, i) for i in arrives)
    return (f"compiled, {k.metadata.num_warps} warps, {k.metadata.shared} B shared, setmaxnreg {regs}, "
            f"spill stores {spills[0] if spills else '?'} B, arrives after bar.sync {fenced}/{len(arrives)}")


def compile_only() -> None:
    """Compile every config for sm_90 without a GPU and print compile_report's line."""
    for bm, bn, stages, warps, maxnreg, overlap, causal, split, d in CONFIGS:
        bo = bm // 2 if split else bm  # the output tile: half the query tile when split
        sig = {"q_desc": f"tensordesc<bf16[{bm},{d}],{_layout([bm, d])!r}>",
               "k_desc": f"tensordesc<bf16[{bn},{d}],{_layout([bn, d])!r}>",
               "v_desc": f"tensordesc<bf16[{bn},{d}],{_layout([bn, d])!r}>",
               "o_desc": f"tensordesc<bf16[{bo},{d}],{_layout([bo, d])!r}>",
               "T": "i32", "qk_scale_log2": "fp32", "STAGES": "constexpr", "OVERLAP": "constexpr",
               "CAUSAL": "constexpr", "SPLIT": "constexpr", "num_warps": "constexpr"}
        constexprs = {"STAGES": stages, "OVERLAP": bool(overlap), "CAUSAL": bool(causal), "SPLIT": bool(split),
                      "num_warps": warps}
        report = compile_report(gluon_attn_fwd, sig, constexprs, warps, maxnreg)
        print(f"{bm}x{bn} stages={stages} overlap={overlap} causal={causal} split={split} D={d} warps={warps}: {report}")


def one(bm: int, bn: int, stages: int, warps: int, maxnreg: int, overlap: int, causal: int, split: int,
        d: int) -> None:
    """Child: compile, check against SDPA and time one config (prints a RESULT line)."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, H, T = ws_probe.SHAPE["B"], ws_probe.SHAPE["H"], ws_probe.SHAPE["T"]
    assert T % bm == 0 and bm % bn == 0 and stages >= 1, "the kernel takes whole tiles, BLOCK_M a multiple of BLOCK_N"
    assert not split or (bm == 128 and warps == 4), "SPLIT takes 128-row query tiles and num_warps=4"
    torch.manual_seed(0)
    q, k, v = (torch.randn(B * H * T, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = torch.full_like(q, float("nan"))
    bo = bm // 2 if split else bm
    descs = [TensorDescriptor.from_tensor(x, [b, d], _layout([b, d])) for x, b in ((q, bm), (k, bn), (v, bn), (o, bo))]
    scale = 1.4426950408889634 / math.sqrt(d)

    def run():
        return gluon_attn_fwd[(T // bm, B * H)](*descs, T, scale, STAGES=stages, OVERLAP=bool(overlap),
                                                CAUSAL=bool(causal), SPLIT=bool(split), num_warps=warps, maxnreg=maxnreg)

    compiled = run()
    print(f"compiled: {compiled.metadata.num_warps} warps, {compiled.metadata.shared} B shared", flush=True)
    torch.cuda.synchronize()
    ws_probe.check_and_time(run, q, k, v, o, d, compiled.metadata.num_warps, causal=bool(causal))


if __name__ == "__main__":
    ws_probe.main(__file__, CONFIGS, "gluon_probe.txt",
                  lambda c: f"{'causal' if c[6] else 'gluon'} {c[0]}x{c[1]} s{c[2]} ov{c[5]}{' split' if c[7] else ''}",
                  one, masks=lambda c: c[6], compile_only=compile_only)
