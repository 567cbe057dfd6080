"""dQ in the dK/dV kernel (atomics, bulk reductions) against a dQ kernel of its own, behind
docs/benchmarks/h200-dq-s9.txt (run as ``PYTHONPATH=. python docs/benchmarks/dq_sweep.py D OUTDIR``
on one GPU): for each variant of the anchors suite at T=16384 (SWEEP_T), B=16384/T, H=2048/D, bf16,
forward+backward under ATTNGEN_DQ=0 with the default launch configs, then under each fused
mode (SWEEP_MODES, default "1 2") with each dK/dV config of SWEEP_DKDV (block_q x block_kv x
warps x stages; default: the default config), timed in turn in one process. Gradients are
checked against ATTNGEN_DQ=0's. SWEEP_MASKS=causal,document picks the variants; SWEEP_WARM=1
only compiles (run one such process per variant in parallel first).
Writes OUTDIR/dq_d<D>_t<T>.json."""
import json, os, sys
import torch, triton
from attngen import bench as AB
from attngen.tiles import LaunchConfig as L
from attngen.tune import shape_bucket

D = int(sys.argv[1]); out = sys.argv[2]
T = int(os.environ.get("SWEEP_T", "16384")); B = max(1, 16384 // T); H = 2048 // D
WARM = os.environ.get("SWEEP_WARM") == "1"
MODES = os.environ.get("SWEEP_MODES", "1 2").split()
CFGS = [L(*(int(x) for x in c.split("x"))) for c in os.environ.get("SWEEP_DKDV", "").split()]
rows = []
for name in os.environ.get("SWEEP_MASKS", "dense,causal,sliding_window,prefix_lm,document,alibi,softcap").split(","):
    op, q, k, v, do, inputs, fl = AB.anchors_case(name, B, H, T, D)
    dims = {"B": B, "H": H, "H_KV": H, "T_Q": T, "T_KV": T, "D_QK": D, "D_V": D}
    bucket = shape_bucket(dims, torch.bfloat16)
    default = op.config_for("dkdv", dims, torch.bfloat16, q.device)  # the dQ kernel's path (mode 0)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def fb():
        op(*leaves, **inputs).backward(do)

    ref = None
    for mode, cfg in [("0", default)] + [(m, c) for m in MODES for c in (CFGS or [default])]:
        os.environ["ATTNGEN_DQ"] = mode
        op.set_config("dkdv_dq" if mode != "0" else "dkdv", bucket, cfg)
        for x in leaves:  # do_bench leaves the last call's gradients behind
            x.grad = None
        c = (cfg.block_q, cfg.block_kv, cfg.num_warps, cfg.num_stages)
        try:
            fb()
        except Exception as e:  # e.g. a config that needs more shared memory than the GPU has
            print(f"{name} mode {mode} {c}: FAILED {type(e).__name__} {str(e)[:120]}", flush=True)
            continue
        grads = [x.grad.float() for x in leaves]
        if ref is None:
            ref = grads
        err = max(float((a - b).abs().max()) for a, b in zip(grads, ref))
        if not err < 0.1:
            print(f"{name} mode {mode} {c}: differs from mode 0 by {err}", flush=True)
            continue
        if WARM:
            continue
        ms = triton.testing.do_bench(fb, warmup=25, rep=100, grad_to_none=leaves)
        rows.append(dict(variant=name, D=D, T=T, B=B, mode=int(mode), dkdv=c, fwd_bwd_ms=ms,
                         fwd_bwd_tflops=3.5 * fl / ms / 1e9, max_diff=err))
        print(f"{name:15} D={D} T={T} B={B} dq mode {mode} dkdv {c}: fwd+bwd {ms:.4f} ms "
              f"{3.5 * fl / ms / 1e9:6.1f} TF/s   max diff {err:.1e}", flush=True)
    op.clear_config("dkdv", bucket)
    op.clear_config("dkdv_dq", bucket)
if not WARM:
    json.dump(rows, open(os.path.join(out, f"dq_d{D}_t{T}.json"), "w"), indent=1)
