"""ALiBi against plain causal attention in one process: the ratio issue 5 sets (ALiBi +
causal at >= 0.95 of attngen's own causal), without the anchors suite's baselines.

    PYTHONPATH=. python docs/benchmarks/alibi_vs_causal.py [OUT_FILE]      # on a GPU

B = 1, H = 16, bf16, D in {64, 128}, T in {4096, 16384}; forward and forward+backward times
by triton.testing.do_bench (median, warmup 25 ms, rep 100 ms), the two specs interleaved
per case; the anchors suite's ALiBi slopes (attngen.check.alibi_slopes).
"""

import sys

import torch
import triton

import attngen
from attngen.check import alibi_slopes

B, H = 1, 16


def _time(op, q, k, v, do, **inputs):
    fwd = triton.testing.do_bench(lambda: op(q, k, v, **inputs), warmup=25, rep=100)
    both = triton.testing.do_bench(lambda: torch.autograd.grad(op(q, k, v, **inputs), (q, k, v), do), warmup=25, rep=100)
    return fwd, both


def main(out: str | None) -> None:
    causal, alibi = attngen.compile("causal"), attngen.compile("alibi")
    slopes = alibi_slopes(H).to("cuda")  # the anchors suite's slopes
    lines = [f"# {torch.cuda.get_device_name()}; torch {torch.__version__}, Triton {triton.__version__}; B={B} H={H} bf16; "
             "ms (do_bench median); ratio = causal time / ALiBi time",
             f"{'D':>4} {'T':>6} {'causal fwd':>10} {'alibi fwd':>10} {'ratio':>6} {'causal f+b':>10} {'alibi f+b':>10} {'ratio':>6}"]
    for d in (64, 128):
        for t in (4096, 16384):
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(B, H, t, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                       for _ in range(3))
            do = torch.randn_like(q)
            for _ in range(2):  # interleaved; the second round is kept
                c = _time(causal, q, k, v, do)
                a = _time(alibi, q, k, v, do, slopes=slopes)
            lines.append(f"{d:>4} {t:>6} {c[0]:10.3f} {a[0]:10.3f} {c[0] / a[0]:6.3f} {c[1]:10.3f} {a[1]:10.3f} {c[1] / a[1]:6.3f}")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
