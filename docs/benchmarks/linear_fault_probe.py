"""The linear-attention fault case of the sixth session (relu features, no normalisation,
D_QK = 8, D_V = 24, T = 100, bf16, causal): REPS forward+backward calls on the GPU.

    PYTHONPATH=. python docs/benchmarks/linear_fault_probe.py STAGES SEED BLOCKS REPS

STAGES 0 keeps the default pipeline depths; BLOCKS is FxV (feature x value block, bypassing
the checks of set_blocks, to probe shapes it refuses) or "default". Run it under
`CUDA_LAUNCH_BLOCKING=1`, or under `compute-sanitizer --tool memcheck` to see reads outside
shared memory (h200-linear-fault-s6.txt)."""
import sys, torch, attngen, attngen.linear as L
st, seed = int(sys.argv[1]), int(sys.argv[2])  # st 0: the default depths
blocks = tuple(int(x) for x in sys.argv[3].split("x")) if len(sys.argv) > 3 and sys.argv[3] != "default" else None
reps = int(sys.argv[4]) if len(sys.argv) > 4 else 20
if st:
    L.STAGES = (st,)
spec = {"name": "r", "normalizer": "linear", "feature_map": "relu", "mask": "k <= q", "normalize": False}
op = attngen.compile(spec)
if blocks:
    op._blocks = blocks  # bypasses check_blocks, to probe shapes it refuses
    op._launches.clear()
gen = torch.Generator(device="cuda").manual_seed(seed)
for rep in range(reps):
    q, k = (torch.randn(1, 1, 100, 8, device="cuda", generator=gen).bfloat16().requires_grad_() for _ in range(2))
    v = torch.randn(1, 1, 100, 24, device="cuda", generator=gen).bfloat16().requires_grad_()
    o = op(q, k, v)
    torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    torch.cuda.synchronize()
print("ok", {k[0]: v for k, v in op._launches.items()})
