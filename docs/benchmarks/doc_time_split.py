"""Where the time of a document-masked call goes (docs/benchmarks/h200-doc-time-split-s10.txt):
for attngen and FlexAttention (its block mask built outside the timing) on the anchors suite's
document cases (1000-token documents, causal; B = 16384 / T, H = 2048 / D, bf16), the forward
and forward+backward three ways:

* ``bench``: triton.testing.do_bench's median, as the anchors suite times them;
* ``gpu``: 40 calls queued behind a ``torch.cuda._sleep`` of about 0.15 s, so the host runs
  ahead and the GPU never waits for it; CUDA events around the 40 calls, per call;
* ``host``: the host's time to issue one call (the same 40 calls, wall clock).

If ``gpu`` matches ``bench``, the call is bound by the GPU, not by launch overhead. Then, at
D = 128 and T = 16384, torch.profiler's device time per kernel over 10 forward+backward calls
of each, and cProfile of 200 attngen calls (OUTDIR/cprofile.txt).

    PYTHONPATH=. python docs/benchmarks/doc_time_split.py OUTDIR
"""
import cProfile, pstats, sys, time, io
import torch, triton
from attngen import bench as AB
out = sys.argv[1]
flex = AB._compiled_flex()

def gpu_ms(fn, n=40):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(3e8))
    s.record(); t = time.perf_counter()
    for _ in range(n): fn()
    host = (time.perf_counter() - t) / n * 1e3
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n, host

rows = []
for d, t in ((128, 16384), (64, 16384), (128, 4096)):
    b, h = 16384 // t, 2048 // d
    var = AB.VARIANTS["document"]
    op, q, k, v, do, inputs, fl = AB.anchors_case("document", b, h, t, d)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    fns = {"attngen": lambda: op(*leaves, **inputs), "flex": AB._flex_call(flex, var, b, t, inputs, leaves, "cuda")}
    for name, fn in fns.items():
        def fb(fn=fn):
            for x in leaves: x.grad = None
            fn().backward(do)
        with torch.no_grad():
            gf, hf = gpu_ms(fn)
        gb, hb = gpu_ms(fb)
        bf = triton.testing.do_bench(fn, warmup=25, rep=100)
        bb = triton.testing.do_bench(lambda: fn().backward(do), warmup=25, rep=100, grad_to_none=leaves)
        line = (f"doc D={d} T={t} {name:8} fwd: bench {bf*1e3:7.1f} us ({fl/bf/1e9:5.1f} TF/s) gpu {gf*1e3:7.1f} us ({fl/gf/1e9:5.1f}) host {hf*1e3:6.1f} us | "
                f"fwd+bwd: bench {bb*1e3:7.1f} us ({3.5*fl/bb/1e9:5.1f}) gpu {gb*1e3:7.1f} us ({3.5*fl/gb/1e9:5.1f}) host {hb*1e3:6.1f} us")
        print(line, flush=True); rows.append(line)
    if d == 128 and t == 16384:
        from torch.profiler import profile, ProfilerActivity
        for name, fn in fns.items():
            def fb(fn=fn):
                for x in leaves: x.grad = None
                fn().backward(do)
            for _ in range(3): fb()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                for _ in range(10): fb()
                torch.cuda.synchronize()
            print(f"== profiler {name}"); print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60), flush=True)
        fb = lambda: (setattr(leaves[0], "grad", None), setattr(leaves[1], "grad", None), setattr(leaves[2], "grad", None), op(*leaves, **inputs).backward(do))
        for _ in range(5): fb()
        torch.cuda.synchronize()
        pr = cProfile.Profile(); pr.enable()
        for _ in range(200): fb()
        pr.disable(); torch.cuda.synchronize()
        s = io.StringIO(); st = pstats.Stats(pr, stream=s); st.sort_stats("tottime").print_stats(35); st.sort_stats("cumtime").print_stats(45)
        open(f"{out}/cprofile.txt", "w").write(s.getvalue())
        print(s.getvalue()[:6000])
open(f"{out}/doc_host.txt", "w").write("\n".join(rows) + "\n")
