"""Tensor-descriptor loads against pointer loads, behind docs/benchmarks/h200-descriptors-s8.txt
(run as ``PYTHONPATH=. python docs/benchmarks/descriptor_sweep.py D OUTDIR`` on one GPU): for
each variant of the anchors suite at B=1, T=16384, H=2048/D, bf16, with default launch configs,
the forward and forward+backward under ATTNGEN_DESCRIPTORS=0 (pointer loads), 2 (rows of the
flattened [B*H*T, D] tensors) and 4 ([B, H, T, D] tensors), timed in turn in one process.
Outputs and gradients are checked against the pointer loads' (the reference of the suite's
own checks). SWEEP_MASKS=causal,document picks the variants; SWEEP_RANKS="0 2" the ranks;
SWEEP_WARM=1 only compiles (run one such process per variant in parallel first).
Writes OUTDIR/descriptors_d<D>.json."""
import json, os, sys
import triton
from attngen import bench as AB

D = int(sys.argv[1]); out = sys.argv[2]
T = 16384; B = 1; H = 2048 // D
WARM = os.environ.get("SWEEP_WARM") == "1"
RANKS = os.environ.get("SWEEP_RANKS", "0 2 4").split()
rows = []
for name in os.environ.get("SWEEP_MASKS", "dense,causal,sliding_window,prefix_lm,document,alibi,softcap").split(","):
    op, q, k, v, do, inputs, fl = AB.anchors_case(name, B, H, T, D)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def fb():
        op(*leaves, **inputs).backward(do)

    ref = None
    for rank in RANKS:
        os.environ["ATTNGEN_DESCRIPTORS"] = rank
        o = op(q, k, v, **inputs).float()
        for x in leaves:  # do_bench leaves the last call's gradients behind
            x.grad = None
        fb()
        grads = [x.grad.float() for x in leaves]
        if ref is None:
            ref = (o, grads)
        err = max(float((a - b).abs().max()) for a, b in zip([o, *grads], [ref[0], *ref[1]]))
        if not err < 0.1:
            raise RuntimeError(f"{name} rank {rank}: differs from rank {RANKS[0]} by {err}")
        if WARM:
            continue
        ms = triton.testing.do_bench(lambda: op(q, k, v, **inputs), warmup=25, rep=100)
        ms2 = triton.testing.do_bench(fb, warmup=25, rep=100, grad_to_none=leaves)
        rows.append(dict(variant=name, D=D, rank=int(rank), fwd_ms=ms, fwd_bwd_ms=ms2,
                         fwd_tflops=fl / ms / 1e9, fwd_bwd_tflops=3.5 * fl / ms2 / 1e9, max_diff=err))
        print(f"{name:15} D={D} rank {rank}: fwd {ms:.4f} ms {fl / ms / 1e9:6.1f} TF/s   "
              f"fwd+bwd {ms2:.4f} ms {3.5 * fl / ms2 / 1e9:6.1f} TF/s   max diff {err:.1e}", flush=True)
if not WARM:
    json.dump(rows, open(os.path.join(out, f"descriptors_d{D}.json"), "w"), indent=1)
