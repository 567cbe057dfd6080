"""Timing on the GPU against PyTorch's scaled_dot_product_attention, in the same process.

Times are ``triton.testing.do_bench`` medians in milliseconds. TFLOP/s count only the score
pairs the mask keeps: forward ``2·B·H·pairs·(D_QK + D_V)``, forward+backward 3.5 times that
(FlashAttention's accounting: the backward does 2.5 times the forward's matrix products).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .reference import mask_matrix


def bench(fn: Callable[[], Any], grads: list[torch.Tensor] | None = None) -> float:
    """Median time of ``fn`` in ms (``triton.testing.do_bench``, warmup 25 ms, rep 100 ms).

    Python's cyclic garbage collector is run first and kept off while timing: a process that
    has just compiled FlexAttention holds millions of objects, and a full collection that
    starts inside the timed loop stalls the host for hundreds of milliseconds, which shows up
    as GPU time when the timed calls are short. Reference counting still frees memory.
    """
    import gc

    import triton.testing

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")
    finally:
        if enabled:
            gc.enable()


def command_line() -> str:
    """The command that started this process, as a user would type it: ``python -m attngen
    ...`` when it runs as a module (``sys.argv[0]`` is then the package's ``__main__.py``)."""
    import sys
    from pathlib import Path

    head, args = sys.argv[0], sys.argv[1:]
    if Path(head).name == "__main__.py" and Path(head).parent.name == "attngen":
        head = "python -m attngen"
    return " ".join([head, *args])


def wall_times(fn: Callable[[], Any], iters: int, device: str, before: Callable[[], Any] | None = None,
               after: Callable[[], Any] | None = None) -> list[float]:
    """Wall-clock times (ms) of ``iters`` calls of ``fn``, the device synchronised around each
    call; ``before`` runs ahead of the clock (a barrier, zeroing gradients) and ``after`` inside
    it, after the call (a barrier, so the slowest rank sets the time). For whole steps that
    ``do_bench`` cannot time (several processes, a model's training step)."""
    import time

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(iters):
        if before is not None:
            before()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if after is not None:
            after()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def sdpa_mask(spec, dims, inputs, device) -> tuple[dict[str, Any] | None, float]:
    """How SDPA expresses the spec, and the mask's density (of batch 0, head 0).

    Returns:
        Keyword arguments for ``scaled_dot_product_attention`` (``None`` if the spec has a
        score modification SDPA cannot express), and the fraction of pairs kept.
    """
    mask = mask_matrix(spec, dims, inputs, device=device)
    density = float(mask.float().mean())
    if spec.score is not None or spec.normalizer != "softmax":
        return None, density
    if bool(mask.all()):
        return {}, density
    causal = torch.ones_like(mask).tril(dims["T_KV"] - dims["T_Q"])
    if dims["T_Q"] == dims["T_KV"] and torch.equal(mask, causal):
        return {"is_causal": True}, density
    if spec.parsed_mask() and ({"b", "h"} & {s.name for s in spec.parsed_mask().sym.free_symbols}):
        return None, density
    return {"attn_mask": mask}, density


def time_against_sdpa(op, q, k, v, inputs) -> str:
    """Time ``op`` forward and forward+backward next to SDPA's backends; return a table."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    B, H, T_Q, D_QK = q.shape
    H_KV, T_KV, D_V = k.shape[1], k.shape[2], v.shape[3]
    dims = {"B": B, "H": H, "H_KV": H_KV, "T_Q": T_Q, "T_KV": T_KV, "D_QK": D_QK, "D_V": D_V}
    kwargs, density = sdpa_mask(op.spec, dims, inputs, q.device)
    flops = 2.0 * B * H * T_Q * T_KV * density * (D_QK + D_V)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    do = torch.randn(B, H, T_Q, D_V, device=q.device, dtype=q.dtype)
    systems: list[tuple[str, Callable]] = [("attngen", lambda: op(*leaves, **inputs))]
    if kwargs is not None:
        gqa = {"enable_gqa": True} if H != H_KV else {}
        for name, backend in (
            ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
            ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
        ):

            def run(backend=backend):
                with sdpa_kernel([backend]):
                    return sdpa(*leaves, **kwargs, **gqa)

            systems.append((name, run))
    reference_o = None
    lines = [
        f"timing: density {density:.4f}, do_bench median",
        f"{'system':<15} {'fwd ms':>9} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8}  max|o - attngen|",
    ]
    for name, fn in systems:
        try:
            with torch.no_grad():
                out = fn()
            torch.cuda.synchronize()
        except Exception as exc:  # a backend that cannot run this shape
            lines.append(f"{name:<15} unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            continue
        if reference_o is None:
            reference_o = out.float()
            diff = "-"
        else:
            diff = f"{(out.float() - reference_o).abs().max().item():.2e}"
        fwd = bench(lambda: fn())
        fwd_bwd = bench(lambda: fn().backward(do), grads=leaves)
        lines.append(
            f"{name:<15} {fwd:>9.3f} {flops / fwd / 1e9:>8.1f} {fwd_bwd:>11.3f} {3.5 * flops / fwd_bwd / 1e9:>8.1f}  {diff}"
        )
    return "\n".join(lines)
