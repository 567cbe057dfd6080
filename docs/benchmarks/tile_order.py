"""Longest programs first against launch order, in one process (attngen.tilemap.query_tile_order;
``ATTNGEN_LAUNCH_ORDER=1`` is the launch order).

    PYTHONPATH=. python docs/benchmarks/tile_order.py [OUT_FILE] [VARIANT ...]     # on a GPU

The anchors suite's cases (attngen.bench.anchors_case): B = 1, H = 16, bf16, D in {64, 128},
T in {4096, 16384}; forward and forward+backward by triton.testing.do_bench (median, warmup
10 ms, rep 40 ms) in ROUNDS rounds that alternate the two orders, each order's fastest round
kept: on the H200 two timings of the same kernel in one process moved by up to 15%
(docs/benchmarks/h200-tile-order-s14.txt, first table). Each case's outputs and gradients
under the two orders are compared first (max abs difference).
"""

import os
import sys
from pathlib import Path

import torch
import triton

from attngen.bench import anchors_case

B, H = 1, 16
VARIANTS = ("causal", "alibi", "softcap", "prefix_lm", "sliding_window", "dense")


def _run(op, q, k, v, do, inputs):
    out = op(q, k, v, **inputs)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


ROUNDS = 5


def _time(op, q, k, v, do, inputs):
    fwd = triton.testing.do_bench(lambda: op(q, k, v, **inputs), warmup=10, rep=40)
    both = triton.testing.do_bench(lambda: torch.autograd.grad(op(q, k, v, **inputs), (q, k, v), do), warmup=10, rep=40)
    return fwd, both


def _with_order(launch: bool, fn):
    os.environ["ATTNGEN_LAUNCH_ORDER"] = "1" if launch else "0"
    try:
        return fn()
    finally:
        del os.environ["ATTNGEN_LAUNCH_ORDER"]


def main(out: str | None, variants) -> None:
    lines = [f"# {torch.cuda.get_device_name()}; torch {torch.__version__}, Triton {triton.__version__}; B={B} H={H} bf16; "
             f"ms (fastest of {ROUNDS} alternating do_bench medians); gain = launch-order time / longest-first time",
             f"{'variant':<15} {'D':>4} {'T':>6} {'orders':>7} {'launch fwd':>10} {'longest':>8} {'gain':>6} "
             f"{'launch f+b':>10} {'longest':>8} {'gain':>6} {'max diff':>8}"]
    for name in variants:
        for d in (64, 128):
            for t in (4096, 16384):
                op, q, k, v, do, inputs, _ = anchors_case(name, B, H, t, d)
                q, k, v = (x.requires_grad_() for x in (q, k, v))
                a = _with_order(True, lambda: _run(op, q, k, v, do, inputs))
                b = _with_order(False, lambda: _run(op, q, k, v, do, inputs))
                diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))
                rounds = [(_with_order(True, lambda: _time(op, q, k, v, do, inputs)),
                           _with_order(False, lambda: _time(op, q, k, v, do, inputs))) for _ in range(ROUNDS)]
                launch = [min(r[0][i] for r in rounds) for i in (0, 1)]
                longest = [min(r[1][i] for r in rounds) for i in (0, 1)]
                lines.append(f"{name:<15} {d:>4} {t:>6} {op.query_tile_order:>7} {launch[0]:10.3f} {longest[0]:8.3f} "
                             f"{launch[0] / longest[0]:6.3f} {launch[1]:10.3f} {longest[1]:8.3f} {launch[1] / longest[1]:6.3f} "
                             f"{diff:8.1e}")
                print(lines[-1], flush=True)
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:] or VARIANTS)
