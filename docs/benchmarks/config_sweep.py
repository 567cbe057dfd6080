"""The launch-config sweep behind docs/benchmarks/h200-config-sweep-d{64,128}.txt (run as
``PYTHONPATH=. python docs/benchmarks/config_sweep.py D OUTDIR [KERNEL ...]`` on one GPU;
KERNEL in fwd, dq, dkdv picks the kernels to sweep, the others keep their defaults): for causal,
document (1000-token documents), sliding window 1024 and dense masks at the anchors' shapes
(B=1, T=16384, H=2048/D, bf16), each kernel's default config and a few others, timed in
turn: the forward alone, then forward+backward for dQ and for dK/dV (the earlier kernel at
its winner). Times are do_bench medians with the gradients accumulating into the leaves;
forward outputs are checked against the first config's. SWEEP_MASKS=document,causal picks the
masks; SWEEP_FWD, SWEEP_DQ and SWEEP_DKDV replace a kernel's candidates (for example
SWEEP_FWD="128x64x8x3 64x64x4x3"); SWEEP_WARM=1 only compiles every candidate (run one such
process per mask in parallel first, so the timed run finds Triton's cache warm).
Writes OUTDIR/cfgsweep_d<D>.json."""
import json, os, sys
import torch, triton
import attngen
from attngen.tiles import LaunchConfig as L
from attngen.tune import shape_bucket
from attngen import bench as AB

D = int(sys.argv[1]); out = sys.argv[2]; only = set(sys.argv[3:]) or {"fwd", "dq", "dkdv"}
T = 16384; B = 1; H = 2048 // D
dt = torch.bfloat16
FWD = [L(128, 64, 8, 2), L(128, 64, 8, 3), L(128, 128, 8, 2), L(128, 64, 4, 3), L(64, 64, 4, 2), L(64, 64, 4, 3), L(128, 32, 4, 3)]
DQ = [L(128, 64, 8, 2), L(128, 64, 8, 3), L(128, 64, 8, 4), L(64, 64, 4, 3), L(128, 32, 4, 3)]
DKDV = [L(64, 64, 4, 2), L(64, 128, 8, 2), L(64, 128, 8, 3), L(32, 128, 4, 3), L(32, 64, 4, 2)]


def _given(env, default):
    text = os.environ.get(env, "").split()
    return [L(*(int(x) for x in c.split("x"))) for c in text] if text else default


FWD, DQ, DKDV = _given("SWEEP_FWD", FWD), _given("SWEEP_DQ", DQ), _given("SWEEP_DKDV", DKDV)
WARM = os.environ.get("SWEEP_WARM") == "1"
rows = []
for name in os.environ.get("SWEEP_MASKS", "causal,document,sliding_window,dense").split(","):
    var = AB.VARIANTS[name]
    q, k, v, do, inputs = AB._case_inputs(var, B, H, T, D, "cuda")
    dens = AB._density(var, T, inputs)
    fl = 4.0 * B * H * T * T * D * dens
    op = attngen.compile(var.spec, **var.params(T))
    dims = {"B": B, "H": H, "H_KV": H, "T_Q": T, "T_KV": T, "D_QK": D, "D_V": D}
    bucket = shape_bucket(dims, dt)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = op(q, k, v, **inputs).float()

    def fb():
        op(*leaves, **inputs).backward(do)

    def time_fwd():
        o = op(q, k, v, **inputs)
        if WARM:
            return float("nan")
        err = float((o.float() - ref).abs().max())
        if not err < 5e-2:
            raise RuntimeError(f"wrong: {err}")
        return triton.testing.do_bench(lambda: op(q, k, v, **inputs), warmup=25, rep=100)

    def time_fb():
        fb()
        if WARM:
            return float("nan")
        return triton.testing.do_bench(fb, warmup=25, rep=100, grad_to_none=leaves)

    res = {}
    for kern, cands, timer in (("fwd", FWD, time_fwd), ("dq", DQ, time_fb), ("dkdv", DKDV, time_fb)):
        dflt = op.config_for(kern, dims, dt, q.device)
        if kern not in only:
            continue
        cands = [dflt] + [c for c in cands if c != dflt]
        best = None
        for c in cands:
            op.set_config(kern, bucket, c)
            if kern == "dkdv":  # the dK/dV kernel with dQ fused, where the backward takes it
                op.set_config("dkdv_dq", bucket, c)
            try:
                ms = timer()
            except Exception as e:
                print(f"{name} D={D} {kern} {(c.block_q, c.block_kv, c.num_warps, c.num_stages)} FAILED {type(e).__name__} {str(e)[:120]}", flush=True)
                continue
            work = fl if kern == "fwd" else 3.5 * fl
            tag = " (default)" if c == dflt else ""
            print(f"{name:15} D={D} {kern:5} {(c.block_q, c.block_kv, c.num_warps, c.num_stages)} {ms:.4f} ms {work / ms / 1e9:6.1f} TF/s{tag}", flush=True)
            rows.append(dict(variant=name, D=D, kernel=kern, cfg=(c.block_q, c.block_kv, c.num_warps, c.num_stages), ms=ms, default=c == dflt))
            if best is None or ms < best[1] or WARM:
                best = (c, ms)
        op.set_config(kern, bucket, best[0])  # later kernels are timed with this one's winner
        if kern == "dkdv":
            op.set_config("dkdv_dq", bucket, best[0])
        print(f"  -> {name} D={D} {kern} best {(best[0].block_q, best[0].block_kv, best[0].num_warps, best[0].num_stages)} {best[1]:.4f} ms", flush=True)
    if not WARM:
        json.dump(rows, open(os.path.join(out, f"cfgsweep_d{D}.json"), "w"), indent=1)
