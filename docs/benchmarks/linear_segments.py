"""The segment and block sweep of linear attention behind
docs/benchmarks/h200-linear-segments.txt (run as
``PYTHONPATH=. python docs/benchmarks/linear_segments.py OUTDIR`` on one GPU, with
flash-linear-attention installed): causal normalised elu+1 (``linear_elu``) at B=1, H=16,
T=16384, D=128, bf16, forward and forward+backward (``attngen.timing.bench`` medians) for
each forced (feature block, value block) and segment count (None: the default policy), next
to fla's ``chunk_linear_attn`` on features mapped in PyTorch. Errors are relative to the
first launch's outputs and gradients and to fla's output. Writes OUTDIR/linexp.json."""
import json, os, sys
import torch
import attngen
from attngen.linear_bench import fla_kernel, _fla_call
from attngen.timing import bench

B, H, T, D = 1, 16, 16384, 128
dt = torch.bfloat16
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dt, generator=g).requires_grad_() for _ in range(3))
do = torch.randn(B, H, T, D, device="cuda", dtype=dt, generator=g)
op = attngen.compile("linear_elu")
kern, status = fla_kernel()
print("fla", status, flush=True)
rows = []

def timed(fn, mode):
    if mode == "fwd":
        return lambda: fn()
    return lambda: torch.autograd.grad(fn(), (q, k, v), do)

ref = None
if kern is not None:
    theirs = _fla_call(kern, q, k, v)
    for mode in ("fwd", "fwd+bwd"):
        ms = bench(timed(theirs, mode), grads=[q, k, v])
        rows.append(("fla", mode, ms))
        print(f"fla {mode} {ms:.4f} ms", flush=True)
    with torch.no_grad():
        ref = theirs().float()
base = None
for blocks in (None, (64, 64), (128, 128), (32, 64)):
    op.set_blocks(*(blocks or (None,)))
    for seg in (None, 1, 16, 33, 66, 132, 264):
        op.set_segments(seg)
        label = f"blocks={blocks} seg={seg}"
        try:
            o = op(q, k, v)
            gr = torch.autograd.grad(o, (q, k, v), do)
            got = (o.detach().float(), *(x.float() for x in gr))
            if base is None:
                base = got
            errs = [float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30) for a, b in zip(got, base)]
            ferr = float((o.float() - ref).abs().max()) / float(ref.abs().max()) if ref is not None else -1
            res = [bench(timed(lambda: op(q, k, v), m), grads=[q, k, v]) for m in ("fwd", "fwd+bwd")]
        except Exception as e:
            print(label, "FAILED", type(e).__name__, str(e)[:300], flush=True)
            continue
        rows.append((label, res[0], res[1], errs, ferr))
        print(f"{label:32} fwd {res[0]:.4f} fwd+bwd {res[1]:.4f} | rel err vs first (o,dq,dk,dv) {['%.1e' % e for e in errs]} vs fla {ferr:.1e}", flush=True)
op.set_segments(None); op.set_blocks(None)
out = sys.argv[1] if len(sys.argv) > 1 else "."
json.dump(rows, open(os.path.join(out, "linexp.json"), "w"), indent=1)
