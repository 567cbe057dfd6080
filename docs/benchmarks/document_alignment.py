"""Document masking at B=1, H=16, T=16384, D=128, bf16, on one GPU: kernels with document-aligned
work items against fixed tiles (ATTNGEN_NO_ALIGN=1), in one process; forward, forward+backward
and the metadata kernels alone, at the default configs and three others, then the work-list
kernel alone at several chunk sizes. Run as `PYTHONPATH=. python docs/benchmarks/document_alignment.py`."""
import os, sys, torch, triton
import attngen
from attngen import bench as AB
from attngen.tiles import LaunchConfig as L
from attngen.tune import shape_bucket
B, H, T, D = 1, 16, 16384, 128
var = AB.VARIANTS["document"]
q, k, v, do, inputs = AB._case_inputs(var, B, H, T, D, "cuda")
dens = AB._density(var, T, inputs)
fl = 4.0 * B * H * T * T * D * dens
dims = {"B": B, "H": H, "H_KV": H, "T_Q": T, "T_KV": T, "D_QK": D, "D_V": D}
ops = {}
ops["aligned"] = attngen.compile(var.spec, **var.params(T))
os.environ["ATTNGEN_NO_ALIGN"] = "1"
ops["fixed"] = attngen.compile(var.spec, **var.params(T))
del os.environ["ATTNGEN_NO_ALIGN"]
print("aligned plan:", ops["aligned"].plan.fwd_ranges.meta.aligned, ops["fixed"].plan.fwd_ranges.meta.aligned)
ref = None
bucket = shape_bucket(dims, torch.bfloat16)
configs = [None, ("fwd", L(128, 32, 4, 3)), ("dq", L(64, 64, 4, 3)), ("dkdv", L(64, 128, 8, 2))]
from attngen.args import check_call
for name, op in ops.items():
    _, ordered = check_call(op.spec, q, k, v, inputs, constant_reads=op.spec.constant_reads())
    for cfgset in configs:
        if cfgset:
            op.set_config(cfgset[0], bucket, cfgset[1])
        o = op(q, k, v, **inputs)
        if ref is None: ref = o.float()
        err = float((o.float() - ref).abs().max())
        tf = triton.testing.do_bench(lambda: op(q, k, v, **inputs), warmup=25, rep=200)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        def fb():
            op(*leaves, **inputs).backward(do)
        fb()
        tfb = triton.testing.do_bench(fb, warmup=25, rep=200, grad_to_none=leaves)
        res = {}
        for var_, kern in (("k", "fwd"), ("q", "dkdv")):
            cfg = op.config_for(kern, dims, torch.bfloat16, q.device)
            run = lambda: op.tile_meta(var_, cfg.block_q, cfg.block_kv, ordered, dims, q.device)
            run()
            res[var_] = triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median") * 1e3
        print(f"{name:8s} {str(cfgset and (cfgset[0], (cfgset[1].block_q, cfgset[1].block_kv, cfgset[1].num_warps, cfgset[1].num_stages))):32s} fwd {tf*1e3:7.1f} us {fl/tf/1e9:6.1f} TF/s  fwd+bwd {tfb*1e3:7.1f} us {3.5*fl/tfb/1e9:6.1f} TF/s  meta k {res['k']:5.1f} us  meta q {res['q']:5.1f} us  err {err:.3g}", flush=True)
    # items kernel alone
    m = op.plan.fwd_ranges.meta
    if m.aligned:
        items = torch.empty((B, 200), dtype=torch.int32, device="cuda")
        kern = op.kernel(m.items_name, q.device)
        args = [*op._input_args(ordered), T, T, 0, 0]
        f = lambda: kern[(B,)](items, 199, *args, BLOCK_G=128, CHUNK=4096, num_warps=8)
        f()
        print("items kernel alone", triton.testing.do_bench_cudagraph(f, rep=100, return_mode="median") * 1e3, "us")
        for ch, nw in ((1024, 4), (2048, 4), (4096, 4), (8192, 8), (16384, 16)):
            f = lambda: kern[(B,)](items, 199, *args, BLOCK_G=128, CHUNK=ch, num_warps=nw)
            f()
            print(f"  items CHUNK={ch} warps={nw}", triton.testing.do_bench_cudagraph(f, rep=100, return_mode="median") * 1e3, "us", flush=True)
