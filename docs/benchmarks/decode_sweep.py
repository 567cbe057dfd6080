"""The decoding launch sweep behind docs/benchmarks/h200-decode-sweep.txt (run as
``PYTHONPATH=. python docs/benchmarks/decode_sweep.py`` on one GPU): key tile, warps, stages and
split count of ``op.decode``'s kernel, B=8, H=32, H_KV=8, D=128, 32,768 cached positions, bf16,
contiguous and paged (block 256). Times are the two launches only (kernel and merge, the checks
done once outside the timing), do_bench medians; ``err`` is max |out - the default launch's out|."""
import itertools, torch, triton.testing
import attngen, attngen.decode as dec
from attngen.tiles import LaunchConfig

b, h, h_kv, d, t_kv = 8, 32, 8, 128, 32768
op = attngen.compile("causal")
g = torch.Generator(device="cuda").manual_seed(0)
dt = torch.bfloat16
q = torch.randn(b, h, 1, d, device="cuda", dtype=dt, generator=g)
k, v = (torch.randn(b, h_kv, t_kv, d, device="cuda", dtype=dt, generator=g) for _ in range(2))
lens = torch.full((b,), t_kv, dtype=torch.int32, device="cuda")
bs = 256
nb = t_kv // bs
perm = torch.randperm(b * nb, generator=torch.Generator().manual_seed(0)).cuda()
table = perm.view(b, nb).to(torch.int32)
kp = torch.empty(b * nb, bs, h_kv, d, device="cuda", dtype=dt); vp = torch.empty_like(kp)
kp[perm] = k.view(b, h_kv, nb, bs, d).permute(0, 2, 3, 1, 4).reshape(-1, bs, h_kv, d)
vp[perm] = v.view(b, h_kv, nb, bs, d).permute(0, 2, 3, 1, 4).reshape(-1, bs, h_kv, d)
floor = 2 * b * h_kv * t_kv * d * 2 / 4.27e12 * 1e3
ref = op.decode(q, k, v, lens)[0].float()
orig = dec.decode_config
rows = []
for bkv, nw, ns, sp in itertools.product([64, 128, 256], [4, 8], [2, 3, 4], [None, 4, 8, 16]):
    dec.decode_config = lambda dm, dtype, r, bkv=bkv, nw=nw, ns=ns: LaunchConfig(16, bkv, nw, ns)
    for paged in (False, True):
        try:
            f = dec.decode_launch(op, q, kp if paged else k, vp if paged else v, lens, block_table=table if paged else None,
                                  num_splits=sp, validate=False)
            err = (f()[0].float() - ref).abs().max().item()
            ms = triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
            rows.append((ms, bkv, nw, ns, sp, paged, err))
            print(f"bkv={bkv} warps={nw} stages={ns} splits={sp} paged={paged}: {ms:.4f} ms {ms/floor:.2f}x floor err {err:.2e}", flush=True)
        except Exception as e:
            print(f"bkv={bkv} warps={nw} stages={ns} splits={sp} paged={paged}: FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
dec.decode_config = orig
for paged in (False, True):
    best = sorted(r for r in rows if r[5] == paged)[:6]
    print("BEST paged" if paged else "BEST contiguous", [(round(r[0], 4), r[1:5]) for r in best])
