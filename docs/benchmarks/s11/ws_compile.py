"""What Triton's automatic warp specialisation does to attention-shaped loops on Hopper,
found by compiling for sm_90 on the CPU (no GPU needed; Triton 3.6.0).

    python docs/benchmarks/s11/ws_compile.py

Compiles a minimal FlashAttention-2 forward (as in ../ws_probe.py) with the key loop written
as ``tl.range(..., warp_specialize=True)``, in the variants that decided whether attngen's
forward could take the pass:

- ``base``: q through a tensor descriptor, one key loop;
- ``q_ptr``: q loaded through pointers;
- ``two_loops``: the key range split into two loops, as attngen's masked and FULL loops;
- ``branch``: one loop with an ``if`` on the tile index inside it;
- ``where``: the same choice made without a branch (``tl.where``).

For each it prints whether compilation passed, the warps of the compiled kernel (12: one
producer and two consumer warp groups), the ``setmaxnreg`` values in its PTX, and the shape
of the output tile each partition stores (half the rows each at 128-row tiles; all 64 rows
each at 64-row tiles, so there every tile is computed twice). Results are quoted in docs/perf-notes.md,
"Warp specialisation through Triton 3.6".
"""

import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def _step(q, desc_k, desc_v, key_row, s_mask, row_max, row_sum, acc, qk_scale_log2, MASKED: tl.constexpr):
    """One key tile of the online softmax: scores, new row maxima and sums, and P @ V."""
    s = tl.dot(q, desc_k.load([key_row, 0]).T) * qk_scale_log2
    if MASKED:
        s = tl.where(s_mask, s, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(s, 1))
    p = tl.exp2(s - new_max[:, None])
    scale = tl.exp2(row_max - new_max)
    row_sum = row_sum * scale + tl.sum(p, 1)
    acc = tl.dot(p.to(tl.bfloat16), desc_v.load([key_row, 0]), acc * scale[:, None])
    return new_max, row_sum, acc


@triton.jit
def fwd(desc_q, desc_k, desc_v, O, T, qk_scale_log2,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, VARIANT: tl.constexpr):
    pid = tl.program_id(0)
    head_row = tl.program_id(1) * T
    rows = head_row + pid * BLOCK_M + tl.arange(0, BLOCK_M)
    if VARIANT == "q_ptr":
        q = tl.load(O + rows[:, None] * D + tl.arange(0, D)[None, :])
    else:
        q = desc_q.load([head_row + pid * BLOCK_M, 0])
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    diagonal = tl.arange(0, BLOCK_N)[None, :] <= tl.arange(0, BLOCK_M)[:, None]
    n_first = T // BLOCK_N if VARIANT != "two_loops" else T // BLOCK_N // 2
    for i in tl.range(0, n_first, warp_specialize=True):
        if VARIANT == "branch":
            if i == 0:
                row_max, row_sum, acc = _step(q, desc_k, desc_v, head_row + i * BLOCK_N, diagonal,
                                              row_max, row_sum, acc, qk_scale_log2, True)
            else:
                row_max, row_sum, acc = _step(q, desc_k, desc_v, head_row + i * BLOCK_N, diagonal,
                                              row_max, row_sum, acc, qk_scale_log2, False)
        else:
            row_max, row_sum, acc = _step(q, desc_k, desc_v, head_row + i * BLOCK_N, diagonal | (i > 0),
                                          row_max, row_sum, acc, qk_scale_log2, VARIANT == "where")
    if VARIANT == "two_loops":
        for i in tl.range(n_first, T // BLOCK_N, warp_specialize=True):
            row_max, row_sum, acc = _step(q, desc_k, desc_v, head_row + i * BLOCK_N, diagonal,
                                          row_max, row_sum, acc, qk_scale_log2, False)
    tl.store(O + rows[:, None] * D + tl.arange(0, D)[None, :], (acc / row_sum[:, None]).to(tl.bfloat16))


def compile_one(variant: str, bm: int, bn: int, d: int, warps: int, stages: int) -> str:
    sig = {"desc_q": f"tensordesc<bf16[{bm},{d}]>", "desc_k": f"tensordesc<bf16[{bn},{d}]>",
           "desc_v": f"tensordesc<bf16[{bn},{d}]>", "O": "*bf16", "T": "i32", "qk_scale_log2": "fp32",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "D": "constexpr", "VARIANT": "constexpr"}
    src = ASTSource(fwd, sig, constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "D": d, "VARIANT": variant})
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:  # the pass aborts with an MLIR pipeline failure
        return f"FAILED ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:60]})"
    regs = sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", k.asm["ptx"])), key=int)
    parts = re.split(r"\n\s*partition\d+\(", k.asm["ttgir"])
    stores = [re.findall(r"tt\.store .*: tensor<(\d+x\d+)x", p) for p in parts[1:]]
    return (f"compiled: {k.metadata.num_warps} warps, setmaxnreg {regs or '-'}, "
            f"output tile each worker partition stores {stores or '-'}")


if __name__ == "__main__":
    cases = [("base", 128, 128, 128, 4, 2), ("base", 128, 128, 128, 8, 2), ("base", 64, 128, 128, 4, 2),
             ("q_ptr", 128, 128, 128, 4, 2), ("two_loops", 128, 128, 128, 4, 2),
             ("branch", 128, 128, 128, 4, 2), ("where", 128, 128, 128, 4, 2)]
    for case in cases:
        # a failing pass prints its MLIR reproducer on stderr; keep the table readable
        print(f"{case[0]:<10} {case[1]}x{case[2]} D={case[3]} warps={case[4]} stages={case[5]}: {compile_one(*case)}",
              flush=True)
    sys.exit(0)
