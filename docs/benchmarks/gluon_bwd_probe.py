"""A warp-specialised dK/dV kernel written by hand in Gluon, for Hopper (companion of
gluon_probe.py, which does the forward).

    PYTHONPATH=. python docs/benchmarks/gluon_bwd_probe.py OUT      # on the H200
    python docs/benchmarks/gluon_bwd_probe.py --compile             # sm_90 compile check, no GPU

One program per key tile of BLOCK_N = 128 keys and head holds K and V in shared memory and
walks the query tiles (FlashAttention-2's dK/dV loop, in FlashAttention-3's
producer/consumer form):

- a producer partition of one warp TMA-copies each query tile's Q and dO into a ring of
  ``STAGES`` buffers (ready and empty mbarriers per buffer, Q and dO apart);
- the default partition (8 warps: two warp groups of 64 keys) computes, per query tile of
  BLOCK_M rows, Sᵀ = K Qᵀ, Pᵀ = exp2(Sᵀ·scale·log2 e − lse₂), dV += Pᵀ dO, dPᵀ = V dOᵀ,
  dSᵀ = Pᵀ (dPᵀ − δ) and dK += dSᵀ Q, with Pᵀ and dSᵀ fed to the products from registers;
- with the causal mask, only query tiles that see a key of the tile are visited, and only
  the diagonal ones are masked.

Without DQ the probe asks how fast the four products of the dK/dV loop run when split this
way, and reports that loop's rate (4 products: twice the forward's FLOPs). With DQ (configs
named ``bwd``, added in the twelfth session and first run in the thirteenth:
h200-gluon-bwd-probe-dq-s13.txt) the loop also forms dQ's share of each key tile, dS K, and adds it to a float32
accumulator by atomics; its time includes zeroing that accumulator and converting it, and
its rate counts five products. Both are reported next to the whole backward of SDPA-cuDNN
and of attngen (5 products counted, as the anchors suite counts them), in the same run.
Correctness: dK, dV (and dQ) against SDPA's autograd gradients (relative error; above 1e-2
is WRONG). B = 1, H = 16, T = 16384, bf16. The twelfth session's run of the configs without
DQ is in h200-gluon-bwd-probe-s12.txt; every config compiles for sm_90 without a GPU
(``--compile``; the DQ configs spill 116-320 bytes at D = 128).
"""

import math
import os
import sys

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gluon_probe  # noqa: E402  (the wgmma layout and the sm_90 compile report)
import ws_probe  # noqa: E402  (the shared shape, FLOP count and process-per-config runner)

# (BLOCK_N, BLOCK_M, STAGES, num_warps, maxnreg, CAUSAL, EARLY_DP, D, DQ)
CONFIGS = [
    (128, 64, 2, 8, 168, 0, 0, 128, 0),
    (128, 64, 3, 8, 168, 0, 0, 128, 0),
    (128, 64, 2, 8, 168, 0, 1, 128, 0),
    (128, 64, 2, 8, 168, 1, 0, 128, 0),
    (128, 64, 2, 8, 168, 1, 1, 128, 0),
    (128, 64, 3, 8, 168, 0, 0, 64, 0),
    (128, 64, 3, 8, 168, 1, 0, 64, 0),
    # dQ too: dS through shared memory, dQ = dS K by both warp groups, float32 atomics
    (128, 64, 2, 8, 168, 0, 0, 128, 1),
    (128, 64, 2, 8, 168, 1, 0, 128, 1),
    (128, 64, 2, 8, 168, 1, 1, 128, 1),
    (128, 64, 3, 8, 168, 1, 0, 64, 1),
]


@gluon.jit
def _producer(q_desc, do_desc, q_bufs, do_bufs, q_ready, do_ready, q_empty, do_empty, head_row, j_first, n_tiles):
    """Worker partition: TMA copies of the query tiles j_first .. j_first + n_tiles - 1 of Q
    and dO into the ring, up to STAGES tiles ahead of use."""
    STAGES: gl.constexpr = q_bufs.type.shape[0]
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    for i in range(n_tiles):
        stage = i % STAGES
        phase = (i // STAGES) & 1
        row = head_row + (j_first + i) * BLOCK_M
        mbarrier.wait(q_empty.index(stage), phase ^ 1)  # a fresh barrier passes parity 1 at once
        mbarrier.expect(q_ready.index(stage), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [row, 0], q_ready.index(stage), q_bufs.index(stage))
        mbarrier.wait(do_empty.index(stage), phase ^ 1)
        mbarrier.expect(do_ready.index(stage), do_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(do_desc, [row, 0], do_ready.index(stage), do_bufs.index(stage))


@gluon.constexpr_function
def _dq_layout(num_warps, d):
    """Layout of a [BLOCK_M = 64, D] dQ share: one warp group's 64 rows, the warp groups
    side by side along D (a 64-row product cannot be split across warp groups by rows)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4], instr_shape=[16, d // (num_warps // 4), 16])


@gluon.jit
def _query_tile(i, j, k_smem, v_smem, q_bufs, do_bufs, q_ready, do_ready, q_empty, do_empty, LSE2, DELTA, head_row,
                k_start, dk, dv, qk_scale_log2, ds_smem, DQ_ACC, s_layout: gl.constexpr, g_layout: gl.constexpr,
                MASKED: gl.constexpr, EARLY_DP: gl.constexpr, DQ: gl.constexpr):
    """The i-th visited query tile (tile index j): adds its share to dK and dV. Products are
    issued so that the tensor cores have work while the warps compute: dPᵀ before dV, and
    dK while dV is still running (wgmma groups complete in issue order). EARLY_DP also
    issues dPᵀ right after Sᵀ, to run under the exponentials (more registers live).

    DQ: also this key tile's share of dQ (unscaled), dS K, added to the float32 DQ_ACC by
    atomics (FlashAttention-2's fused dQ; FlashAttention-3 reduces by TMA, which Gluon's
    Hopper API does not offer). dSᵀ goes through shared memory (ds_smem), which both warp
    groups read whole: a barrier of the partition before the product (every row written)
    and after its wait (nobody still reading when the next tile overwrites it)."""
    STAGES: gl.constexpr = q_bufs.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_bufs.type.shape[1]
    stage = i % STAGES
    phase = (i // STAGES) & 1
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=g_layout, k_width=2)
    cols = j * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))  # query positions
    lse2 = gl.load(LSE2 + head_row + cols)
    delta = gl.load(DELTA + head_row + cols)
    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)

    mbarrier.wait(q_ready.index(stage), phase)
    q_t = q_bufs.index(stage)
    s_t = warpgroup_mma(k_smem, q_t.permute((1, 0)), zero, use_acc=False, is_async=True)
    if EARLY_DP:
        mbarrier.wait(do_ready.index(stage), phase)
        do_t = do_bufs.index(stage)
        dp_t = warpgroup_mma(v_smem, do_t.permute((1, 0)), zero, use_acc=False, is_async=True)
        s_t = warpgroup_mma_wait(num_outstanding=1, deps=(s_t, ))  # Sᵀ done, dPᵀ may still run
    else:
        s_t = warpgroup_mma_wait(num_outstanding=0, deps=(s_t, ))
    p_t = gl.exp2(s_t * qk_scale_log2 - gl.expand_dims(lse2, 0))
    if MASKED:
        keys = k_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
        p_t = gl.where(gl.expand_dims(keys, 1) <= gl.expand_dims(cols, 0), p_t, 0.0)
    if not EARLY_DP:
        mbarrier.wait(do_ready.index(stage), phase)
        do_t = do_bufs.index(stage)
        dp_t = warpgroup_mma(v_smem, do_t.permute((1, 0)), zero, use_acc=False, is_async=True)
    dv = warpgroup_mma(gl.convert_layout(p_t.to(gl.bfloat16), op_layout), do_t, dv, is_async=True)
    dp_t = warpgroup_mma_wait(num_outstanding=1, deps=(dp_t, ))  # dPᵀ done, dV may still run
    ds_t = p_t * (dp_t - gl.expand_dims(delta, 0))
    if DQ:
        D: gl.constexpr = k_smem.type.shape[1]
        dq_layout: gl.constexpr = _dq_layout(gl.num_warps(), D)
        ds_smem.store(ds_t.to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()
        dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, gl.zeros([BLOCK_M, D], gl.float32, dq_layout), use_acc=False,
                           is_async=True)
    dk = warpgroup_mma(gl.convert_layout(ds_t.to(gl.bfloat16), op_layout), q_t, dk, is_async=True)
    if DQ:
        dv, dq, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dq, dk))
        gl.thread_barrier()
        mbarrier.arrive(do_empty.index(stage), count=1)
        mbarrier.arrive(q_empty.index(stage), count=1)
        rows = head_row + j * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, dq_layout))
        gl.atomic_add(DQ_ACC + gl.expand_dims(rows.to(gl.int64) * D, 1) + gl.expand_dims(cols, 0), dq, sem="relaxed")
    else:
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
        mbarrier.arrive(do_empty.index(stage), count=1)  # dPᵀ and dV have read dO
        mbarrier.arrive(q_empty.index(stage), count=1)  # Sᵀ and dK have read Q
    return dk, dv


@gluon.jit
def _consumer(k_smem, v_smem, kv_ready, q_bufs, do_bufs, q_ready, do_ready, q_empty, do_empty, LSE2, DELTA, head_row,
              k_start, j_first, n_masked, n_tiles, qk_scale_log2, ds_smem, DQ_ACC, D: gl.constexpr, CAUSAL: gl.constexpr,
              EARLY_DP: gl.constexpr, DQ: gl.constexpr, num_warps: gl.constexpr):
    """Default partition: dK (unscaled) and dV [BLOCK_N, D] in float32 over the visited query
    tiles; the first n_masked of them take the causal mask. Waits for K and V here, so that
    the producer's first copies overlap theirs."""
    BLOCK_N: gl.constexpr = k_smem.type.shape[0]
    BLOCK_M: gl.constexpr = q_bufs.type.shape[1]
    s_layout: gl.constexpr = gluon_probe._mma_layout(num_warps, BLOCK_M)
    g_layout: gl.constexpr = gluon_probe._mma_layout(num_warps, D)
    dk = gl.zeros([BLOCK_N, D], gl.float32, g_layout)
    dv = gl.zeros([BLOCK_N, D], gl.float32, g_layout)
    mbarrier.wait(kv_ready, 0)
    if CAUSAL:
        for i in range(n_masked):
            dk, dv = _query_tile(i, j_first + i, k_smem, v_smem, q_bufs, do_bufs, q_ready, do_ready, q_empty, do_empty,
                                 LSE2, DELTA, head_row, k_start, dk, dv, qk_scale_log2, ds_smem, DQ_ACC, s_layout, g_layout,
                                 True, EARLY_DP, DQ)
    for i in range(n_masked if CAUSAL else 0, n_tiles):
        dk, dv = _query_tile(i, j_first + i, k_smem, v_smem, q_bufs, do_bufs, q_ready, do_ready, q_empty, do_empty,
                             LSE2, DELTA, head_row, k_start, dk, dv, qk_scale_log2, ds_smem, DQ_ACC, s_layout, g_layout,
                             False, EARLY_DP, DQ)
    return dk, dv


@gluon.jit
def gluon_attn_dkdv(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, LSE2, DELTA, DQ_ACC, T, sm_scale, qk_scale_log2,
                    STAGES: gl.constexpr, CAUSAL: gl.constexpr, EARLY_DP: gl.constexpr, DQ: gl.constexpr,
                    num_warps: gl.constexpr):
    """dK and dV of attention over flattened [B * H * T, D] bf16 tensors; LSE2 [B * H * T]
    float32 is each row's log-sum-exp of the scaled scores in base 2, DELTA [B * H * T]
    float32 is rowsum(O · dO). One program per (key tile, head); T a multiple of both tiles
    and BLOCK_N of BLOCK_M. Causal programs run longest first: key tile 0 sees every query.
    DQ: dQ / sm_scale is added to DQ_ACC [B * H * T, D] float32 (zeroed by the caller)."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = k_desc.block_type.shape[1]
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    head_row = gl.program_id(1) * T
    k_start = gl.program_id(0) * BLOCK_N
    if CAUSAL:
        j_first = k_start // BLOCK_M  # the first query tile with a query at or after the tile's first key
        n_masked = BLOCK_N // BLOCK_M  # the query tiles that overlap the key tile hold the diagonal
    else:
        j_first = 0
        n_masked = 0
    n_tiles = T // BLOCK_M - j_first

    k_smem = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, v_desc.block_type.shape, v_desc.layout)
    q_bufs, do_bufs, q_ready, do_ready, q_empty, do_empty = gluon_probe.ring(q_desc, do_desc, STAGES, 1)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    ds_rows: gl.constexpr = BLOCK_N if DQ else 16  # dSᵀ's buffer (a token one without DQ)
    ds_smem = gl.allocate_shared_memory(gl.bfloat16, [ds_rows, BLOCK_M],
                                        gl.NVMMASharedLayout.get_default_for([ds_rows, BLOCK_M], gl.bfloat16))

    mbarrier.expect(kv_ready, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [head_row + k_start, 0], kv_ready, k_smem)
    tma.async_copy_global_to_shared(v_desc, [head_row + k_start, 0], kv_ready, v_smem)

    dk, dv = gl.warp_specialize([
        (_consumer, (k_smem, v_smem, kv_ready, q_bufs, do_bufs, q_ready, do_ready, q_empty, do_empty, LSE2, DELTA,
                     head_row, k_start, j_first, n_masked, n_tiles, qk_scale_log2, ds_smem, DQ_ACC, D, CAUSAL, EARLY_DP, DQ,
                     num_warps)),
        (_producer, (q_desc, do_desc, q_bufs, do_bufs, q_ready, do_ready, q_empty, do_empty, head_row, j_first,
                     n_tiles)),
    ], [1], [24])

    # K's and V's buffers are free once the loop is done: the gradients leave through them
    k_smem.store((dk * sm_scale).to(dk_desc.dtype))
    v_smem.store(dv.to(dv_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [head_row + k_start, 0], k_smem)
    tma.async_copy_shared_to_global(dv_desc, [head_row + k_start, 0], v_smem)
    tma.store_wait(pendings=0)


def _signature(bn: int, bm: int, d: int) -> dict:
    desc = lambda rows: f"tensordesc<bf16[{rows},{d}],{gluon_probe._layout([rows, d])!r}>"  # noqa: E731
    return {"q_desc": desc(bm), "k_desc": desc(bn), "v_desc": desc(bn), "do_desc": desc(bm), "dk_desc": desc(bn),
            "dv_desc": desc(bn), "LSE2": "*fp32", "DELTA": "*fp32", "DQ_ACC": "*fp32", "T": "i32", "sm_scale": "fp32",
            "qk_scale_log2": "fp32", "STAGES": "constexpr", "CAUSAL": "constexpr", "EARLY_DP": "constexpr",
            "DQ": "constexpr", "num_warps": "constexpr"}


def compile_only() -> None:
    """Compile every config for sm_90 without a GPU and print what gluon_probe reports."""
    for bn, bm, stages, warps, maxnreg, causal, early_dp, d, dq in CONFIGS:
        constexprs = {"STAGES": stages, "CAUSAL": bool(causal), "EARLY_DP": bool(early_dp), "DQ": bool(dq),
                      "num_warps": warps}
        report = gluon_probe.compile_report(gluon_attn_dkdv, _signature(bn, bm, d), constexprs, warps, maxnreg,
                                            aligned=("LSE2", "DELTA", "DQ_ACC", "T"))
        print(f"{bn}x{bm} stages={stages} causal={causal} early_dp={early_dp} D={d} dq={dq} warps={warps}: {report}")


def one(bn: int, bm: int, stages: int, warps: int, maxnreg: int, causal: int, early_dp: int, d: int, dq: int) -> None:
    """Child: dK and dV (and with dq, dQ) against SDPA's autograd gradients, then the time
    (RESULT line). With dq the time includes zeroing the float32 accumulator and converting it
    to dQ, and the FLOPs are the whole backward's five products."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, H, T = ws_probe.SHAPE["B"], ws_probe.SHAPE["H"], ws_probe.SHAPE["T"]
    assert T % bn == 0 and bn % bm == 0 and stages >= 1, "the kernel takes whole tiles, BLOCK_N a multiple of BLOCK_M"
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    sm_scale = 1 / math.sqrt(d)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    o = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=bool(causal))
    o.backward(do)
    ref_dq, ref_dk, ref_dv = leaves[0].grad, leaves[1].grad, leaves[2].grad
    # log-sum-exp per row in base 2, from float32 scores one head at a time (T x T per head)
    lse2 = torch.empty(B, H, T, device="cuda", dtype=torch.float32)
    hidden = torch.ones(T, T, device="cuda", dtype=torch.bool).triu(1) if causal else None
    for b in range(B):
        for h in range(H):
            scores = (q[b, h].float() @ k[b, h].float().T) * sm_scale
            if causal:
                scores.masked_fill_(hidden, float("-inf"))
            lse2[b, h] = torch.logsumexp(scores, dim=-1) * 1.4426950408889634
            del scores
    del hidden
    delta = (o.detach().float() * do.float()).sum(-1)
    dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    dq_acc = torch.zeros(B * H * T, d, device="cuda", dtype=torch.float32)
    out = {}
    flat = lambda x: x.reshape(B * H * T, d)  # noqa: E731
    descs = [TensorDescriptor.from_tensor(flat(x), [rows, d], gluon_probe._layout([rows, d]))
             for x, rows in ((q, bm), (k, bn), (v, bn), (do, bm), (dk, bn), (dv, bn))]

    def run():
        if dq:
            dq_acc.zero_()
        compiled = gluon_attn_dkdv[(T // bn, B * H)](*descs, lse2.reshape(-1), delta.reshape(-1), dq_acc, T, sm_scale,
                                                    sm_scale * 1.4426950408889634, STAGES=stages, CAUSAL=bool(causal),
                                                    EARLY_DP=bool(early_dp), DQ=bool(dq), num_warps=warps,
                                                    maxnreg=maxnreg)
        if dq:
            out["dq"] = (dq_acc * sm_scale).to(torch.bfloat16).view(B, H, T, d)
        return compiled

    compiled = run()
    print(f"compiled: {compiled.metadata.num_warps} warps, {compiled.metadata.shared} B shared", flush=True)
    torch.cuda.synchronize()
    pairs = [(dk, ref_dk), (dv, ref_dv)] + ([(out["dq"], ref_dq)] if dq else [])
    err = max(((x.float() - r.float()).norm() / r.float().norm()).item() for x, r in pairs)
    ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    # four products: twice the forward's two; with dQ five, as the anchors suite counts a backward
    flops = (2.5 if dq else 2) * ws_probe._flops(d, bool(causal))
    print(f"RESULT {ms:.4f} {flops / ms / 1e9:.1f} {err:.1e} {compiled.metadata.num_warps}", flush=True)


if __name__ == "__main__":
    ws_probe.main(__file__, CONFIGS, "gluon_bwd_probe.txt",
                  lambda c: f"{'bwd' if c[8] else 'dkdv'}{' causal' if c[5] else ''} {c[0]}x{c[1]} s{c[2]}{' edp' if c[6] else ''}",
                  one, masks=lambda c: c[5], baseline="bwd", compile_only=compile_only)
