"""Does Triton's warp specialisation run, and pay, for an attention forward on this GPU?

    PYTHONPATH=. python docs/benchmarks/ws_probe.py OUT

A minimal FlashAttention-2 forward (no mask, B = 1, H = 16, T = 16384, bf16; q, k and v through
tensor descriptors, the output through pointers) is timed with its key loop written as
``tl.range(..., warp_specialize=WS)``. With WS on and 4 warps, Triton 3.6 rewrites the
kernel for Hopper into a producer warp group (TMA loads, 40 registers) and two consumer warp
groups (232 registers each, ``setmaxnreg``): the scheme of FlashAttention-3 and cuDNN. At
128-row tiles the consumers split the rows; at 64-row tiles each computes all of them
(s11/ws_compile.py). Each config runs in its own process under a time limit, since a kernel
that deadlocks never returns; a config that passes the limit is reported as a hang.
Baselines, in one process per head dim: SDPA with the cuDNN backend and attngen's own dense
forward (specs/dense.yaml, default configs) at the same shape. TFLOP/s count the forward's
4·B·H·T²·D FLOPs (T (T + 1) / 2 pairs instead of T² for the causal baselines of the Gluon
probes); err is ||o − sdpa|| / ||sdpa||, and a config above 1e-2 is reported WRONG. Prints a
table last and writes it to OUT/ws_probe.txt. Results:
docs/benchmarks/h200-warp-specialize-s11.txt. The Gluon probes (gluon_probe.py,
gluon_bwd_probe.py) reuse its runner, baselines and command line (main).
"""

import math
import os
import subprocess
import sys
import time

LIMIT_S = int(os.environ.get("PROBE_LIMIT_S", 40))  # per config; a kernel that deadlocks never returns
MAX_ERR = 1e-2  # relative error against SDPA above which a config is reported WRONG (bf16 P: about 1e-3)
SHAPE = dict(B=1, H=16, T=16384)
# (BLOCK_M, BLOCK_N, warps, stages, warp_specialize, D)
CONFIGS = [
    (128, 128, 4, 2, 1, 128),
    (128, 64, 4, 2, 1, 128),
    (128, 64, 4, 3, 1, 128),
    (64, 128, 4, 2, 1, 128),
    (128, 128, 8, 2, 0, 128),
    (128, 64, 8, 3, 0, 128),
    (128, 64, 4, 2, 1, 64),
    (128, 64, 4, 3, 0, 64),
]


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def probe_fwd(desc_q, desc_k, desc_v, O, T, qk_scale_log2,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, WS: tl.constexpr):
        # rows of the flattened [B * H * T, D] tensors; T is a multiple of both blocks
        pid = tl.program_id(0)
        head_row = tl.program_id(1) * T
        q = desc_q.load([head_row + pid * BLOCK_M, 0])
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start in tl.range(0, T, BLOCK_N, warp_specialize=WS):
            s = tl.dot(q, desc_k.load([head_row + start, 0]).T) * qk_scale_log2
            new_max = tl.maximum(row_max, tl.max(s, 1))
            p = tl.exp2(s - new_max[:, None])
            scale = tl.exp2(row_max - new_max)
            row_sum = row_sum * scale + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.bfloat16), desc_v.load([head_row + start, 0]), acc * scale[:, None])
            row_max = new_max
        rows = head_row + pid * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(O + rows[:, None] * D + tl.arange(0, D)[None, :], (acc / row_sum[:, None]).to(tl.bfloat16))

    return probe_fwd


def _flops(d: int, causal: bool = False) -> float:
    """FLOPs of the forward on the kept pairs (causal: T (T + 1) / 2 of them per head)."""
    T = SHAPE["T"]
    pairs = T * (T + 1) // 2 if causal else T * T
    return 4 * SHAPE["B"] * SHAPE["H"] * pairs * d


def one(bm: int, bn: int, warps: int, stages: int, ws: int, d: int) -> None:
    """Child: compile, check against SDPA (relative Frobenius error) and time one config."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    fwd = _kernel()
    B, H, T = SHAPE["B"], SHAPE["H"], SHAPE["T"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B * H * T, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = torch.full_like(q, float("nan"))
    descs = [TensorDescriptor.from_tensor(x, [b, d]) for x, b in ((q, bm), (k, bn), (v, bn))]
    scale = 1.4426950408889634 / math.sqrt(d)

    def run():
        return fwd[(T // bm, B * H)](*descs, o, T, scale, BLOCK_M=bm, BLOCK_N=bn, D=d, WS=bool(ws),
                                     num_warps=warps, num_stages=stages)

    compiled = run()
    print(f"compiled: {compiled.metadata.num_warps} warps, {compiled.metadata.shared} B shared", flush=True)
    torch.cuda.synchronize()
    check_and_time(run, q, k, v, o, d, compiled.metadata.num_warps)


def check_and_time(run, q, k, v, o, d: int, warps: int, causal: bool = False) -> None:
    """Child: o (written by ``run``) against SDPA on the flattened [B * H * T, D] q, k, v as
    a relative Frobenius error, then ``run``'s median time; prints one RESULT line."""
    import torch
    import triton

    B, H, T = SHAPE["B"], SHAPE["H"], SHAPE["T"]
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.view(B, H, T, d) for x in (q, k, v)),
                                                           is_causal=causal).view(-1, d)
    err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
    ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    print(f"RESULT {ms:.4f} {_flops(d, causal) / ms / 1e9:.1f} {err:.1e} {warps}", flush=True)


def baselines(d: int, causal: bool = False, mode: str = "fwd") -> None:
    """Child: SDPA-cuDNN and attngen at the probe's shape and mask: the forward, or with
    mode ``bwd`` the backward alone (``torch.autograd.grad`` replayed on one forward's graph;
    FLOPs counted as 2.5 times the forward's, as the anchors suite counts them)."""
    import torch
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attngen

    B, H, T = SHAPE["B"], SHAPE["H"], SHAPE["T"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = "causal" if causal else "dense"
    op = attngen.compile(f"specs/{mask}.yaml")
    systems = {f"sdpa-cudnn{'-causal' if causal else ''}": lambda *x: torch.nn.functional.scaled_dot_product_attention(
        *x, is_causal=causal), f"attngen-{mask}": op}
    for name, fn in systems.items():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            fn(q, k, v)
            ms = triton.testing.do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
            flops = _flops(d, causal)
            if mode == "bwd":  # the backward alone, replayed on one forward's graph
                leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                out, do = fn(*leaves), torch.randn_like(q)
                ms = triton.testing.do_bench(lambda: torch.autograd.grad(out, leaves, do, retain_graph=True),
                                             warmup=25, rep=100, return_mode="median")
                flops, name = 2.5 * flops, name + "-bwd"
        print(f"BASE {name} {ms:.4f} {flops / ms / 1e9:.1f}", flush=True)


def run_all(script: str, configs, out: str, filename: str, name, masks=lambda c: 0, baseline: str = "fwd") -> None:
    """Parent: the baselines for every head dim in ``configs`` (last field D) and mask
    (``masks(config)``: 1 causal, 0 none), then each config through
    ``python script --one *config`` in its own process under LIMIT_S; prints the table last
    and writes it to OUT/filename. ``name(config)`` labels a row."""
    os.makedirs(out, exist_ok=True)
    lines = []
    for d, causal in sorted({(c[-1], masks(c)) for c in configs}, reverse=True):
        try:
            res = subprocess.run([sys.executable, __file__, "--baselines", str(d), str(causal), baseline],
                                 capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            lines.append(f"{d:>4} baselines ({'causal' if causal else 'no mask'}): no result in 300 s")
            continue
        for line in res.stdout.splitlines():
            if line.startswith("BASE"):
                _, base, ms, tf = line.split()
                lines.append(f"{d:>4} {base:<28} {'-':>6} {float(ms):8.3f} {float(tf):7.1f} {'-':>8}  ok")
        if res.returncode:
            lines.append(f"{d:>4} baselines ({'causal' if causal else 'no mask'}) failed: {res.stderr.strip().splitlines()[-1:]}")
    for cfg in configs:
        d, label = cfg[-1], name(cfg)
        t0 = time.time()
        try:
            res = subprocess.run([sys.executable, script, "--one", *map(str, cfg)],
                                 capture_output=True, text=True, timeout=LIMIT_S)
        except subprocess.TimeoutExpired as exc:
            partial = exc.stdout or b""  # bytes even with text=True
            partial = partial.decode() if isinstance(partial, bytes) else partial
            compiled = [ln for ln in partial.splitlines() if ln.startswith("compiled")]
            lines.append(f"{d:>4} {label:<28} {'-':>6} {'-':>8} {'-':>7} {'-':>8}  HANG (no result in {LIMIT_S} s; "
                         f"{compiled[0] if compiled else 'not compiled'})")
            continue
        result = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT")]
        if res.returncode or not result:
            tail = (res.stderr.strip().splitlines() or ["?"])[-1][:100]
            lines.append(f"{d:>4} {label:<28} {'-':>6} {'-':>8} {'-':>7} {'-':>8}  FAIL rc={res.returncode}: {tail}")
            continue
        _, ms, tf, err, nw = result[0].split()
        status = "ok" if float(err) < MAX_ERR else "WRONG"  # a NaN error is WRONG too
        lines.append(f"{d:>4} {label:<28} {nw:>6} {float(ms):8.3f} {float(tf):7.1f} {err:>8}  {status} ({time.time() - t0:.0f} s)")
    head = (f"# {os.path.basename(script)}: B={SHAPE['B']} H={SHAPE['H']} T={SHAPE['T']} bf16, no mask unless named causal; "
            f"TF/s on kept pairs and err (relative, against SDPA) as the probe's docstring defines them; "
            f"warps = warps the compiled kernel launches\n"
            f"{'D':>4} {'kernel / config':<28} {'warps':>6} {'ms':>8} {'TF/s':>7} {'err':>8}  status")
    text = head + "\n" + "\n".join(lines)
    with open(os.path.join(out, filename), "w") as f:
        f.write(text + "\n")
    print(text)


def main(script: str, configs, filename: str, name, one_config, masks=lambda c: 0, baseline: str = "fwd",
         compile_only=None) -> None:
    """Command line of a probe: ``OUT`` runs every config (run_all), ``--one FIELDS...`` one
    config in this process, ``--baselines D CAUSAL MODE`` the baselines, ``--compile`` the
    probe's compile check where it has one."""
    if sys.argv[1] == "--one":
        one_config(*map(int, sys.argv[2:2 + len(configs[0])]))
    elif sys.argv[1] == "--baselines":
        baselines(int(sys.argv[2]), bool(int(sys.argv[3])), sys.argv[4])
    elif sys.argv[1] == "--compile" and compile_only is not None:
        compile_only()
    else:
        run_all(script, configs, sys.argv[1], filename, name, masks, baseline)


if __name__ == "__main__":
    main(__file__, CONFIGS, "ws_probe.txt", lambda c: f"{c[0]}x{c[1]} w{c[2]} s{c[3]} ws{c[4]}", one)
