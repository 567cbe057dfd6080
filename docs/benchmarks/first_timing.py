"""Is the first timing of the document forward in a process slow? (seventh session)

    PYTHONPATH=. python docs/benchmarks/first_timing.py

The sixth session's sparse suite and the seventh session's config sweep both timed the
document forward (B=1, H=16, T=16384, D=128, bf16, 1000-token documents) far slower the first
time it was timed in a process after other masks (0.89 ms against 0.31 ms). This runs the
dense forward+backward first, as the sweep did, then times the document forward five times
in a row with do_bench, and prints, for each, the host time per call (100 calls, no
synchronisation inside) and the GPU clocks."""
import subprocess, time
import torch, triton
import attngen
from attngen import bench as AB


def clocks() -> str:
    q = "clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu"
    return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()


def host_us(fn, n=100) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


B, H, T, D = 1, 16, 16384, 128
for name in ("dense", "document"):
    var = AB.VARIANTS[name]
    q, k, v, do, inputs = AB._case_inputs(var, B, H, T, D, "cuda")
    op = attngen.compile(var.spec, **var.params(T))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    op(*leaves, **inputs).backward(do)
    if name == "dense":
        ms = triton.testing.do_bench(lambda: op(*leaves, **inputs).backward(do), warmup=25, rep=100, grad_to_none=leaves)
        print(f"dense fwd+bwd {ms:.4f} ms | {clocks()}", flush=True)
        continue
    fwd = lambda: op(q, k, v, **inputs)
    for i in range(5):
        ms = triton.testing.do_bench(fwd, warmup=25, rep=100)
        print(f"document fwd #{i} {ms:.4f} ms, host {host_us(fwd):.0f} us/call | {clocks()}", flush=True)
    fb = lambda: op(*leaves, **inputs).backward(do)
    for i in range(3):
        ms = triton.testing.do_bench(fb, warmup=25, rep=100, grad_to_none=leaves)
        print(f"document fwd+bwd #{i} {ms:.4f} ms, host {host_us(fb):.0f} us/call | {clocks()}", flush=True)
