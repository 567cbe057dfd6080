"""Host time of attngen calls on a GPU, piece by piece: a forward+backward of causal attention
(B=1, H=16, T=2048, D=128) and of document masking (T=16384), 100 calls each, with the time
spent in forward_impl, backward_impl, tile_meta, config_for, _common and in each Triton launch
(wall clock on the host, per call), then a grad-recording forward alone and a trivial torch
forward+backward for scale. Run as `PYTHONPATH=. python docs/benchmarks/host_overhead.py`."""
import time, collections, torch
import attngen
from attngen import op as OP
from attngen import bench as AB
T_LAUNCH = collections.defaultdict(float); N_LAUNCH = collections.Counter()
orig_kernel = OP.AttentionOp.kernel
class Timed:
    def __init__(self, k, name): self.k, self.name = k, name
    def __getitem__(self, grid):
        f = self.k[grid]
        def run(*a, **kw):
            t = time.perf_counter(); r = f(*a, **kw); T_LAUNCH[self.name] += time.perf_counter() - t; N_LAUNCH[self.name] += 1; return r
        return run
OP.AttentionOp.kernel = lambda self, name, device: Timed(orig_kernel(self, name, device), name)
T_IMPL = collections.defaultdict(float)
for meth in ("forward_impl", "backward_impl", "tile_meta", "config_for", "_common"):
    orig = getattr(OP.AttentionOp, meth)
    def wrap(self, *a, _o=orig, _m=meth, **kw):
        t = time.perf_counter(); r = _o(self, *a, **kw); T_IMPL[_m] += time.perf_counter() - t; return r
    setattr(OP.AttentionOp, meth, wrap)
for name, B, H, T, D in (("causal", 1, 16, 2048, 128), ("document", 1, 16, 16384, 128)):
    var = AB.VARIANTS[name]
    q, k, v, do, inputs = AB._case_inputs(var, B, H, T, D, "cuda")
    op = attngen.compile(var.spec, **var.params(T))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    fb = lambda: op(*leaves, **inputs).backward(do)
    for _ in range(5): fb()
    torch.cuda.synchronize()
    T_LAUNCH.clear(); N_LAUNCH.clear(); T_IMPL.clear()
    n = 100
    t = time.perf_counter()
    for _ in range(n): fb()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - t) / n * 1e6
    print(f"{name} T={T}: fwd+bwd host {host:.0f} us, with drain {total:.0f} us")
    print("  " + ", ".join(f"{m} {v/n*1e6:.0f}" for m, v in T_IMPL.items()))
    print("  launches: " + ", ".join(f"{k} {T_LAUNCH[k]/N_LAUNCH[k]*1e6:.0f} us x{N_LAUNCH[k]//n}" for k in T_LAUNCH))
    # the forward alone and an empty autograd round trip
    t = time.perf_counter()
    for _ in range(n): o = op(*leaves, **inputs)
    print(f"  fwd (grad-recording) host {(time.perf_counter()-t)/n*1e6:.0f} us")
    x = torch.randn(8, device="cuda", requires_grad=True)
    t = time.perf_counter()
    for _ in range(n): (x * 2).sum().backward()
    print(f"  trivial torch fwd+bwd host {(time.perf_counter()-t)/n*1e6:.0f} us", flush=True)
