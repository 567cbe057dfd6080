"""``python -m attngen bench --suite linear``: attngen's linear-attention kernels against
flash-linear-attention (``fla``) on the GPU, in one process.

The case is causal elu(x) + 1 linear attention with normalisation (``specs/linear_elu.yaml``)
at 16,384 tokens per batch (B = 16384 / T). fla's ``chunk_linear_attn`` takes features
already mapped, so its timed call applies ``elu(x) + 1`` to q and k in PyTorch first and
then runs with ``scale=1`` and its own normalisation (eps 1e-5 against attngen's 1e-6;
the outputs are compared with a relative tolerance before anything is timed, and a mismatch
is reported as wrong, not timed). Without fla installed the suite still times attngen and
reports fla as unavailable, with the import error.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

TOKENS = 16384
SEQS = (2048, 8192)
DIMS = (64, 128)
HEADS = 16
#: max |attngen - fla| / max |fla| for the outputs to count as the same
TOLERANCE = 2e-2


def fla_kernel() -> tuple[Callable[..., Any] | None, str]:
    """fla's ``chunk_linear_attn`` and ``"available"``, or ``None`` and why it is not."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as exc:  # not installed, or it fails to import on this stack
        return None, f"unavailable: {type(exc).__name__}: {exc}"
    return chunk_linear_attn, "available"


def _fla_call(kernel, q, k, v) -> Callable[[], Any]:
    """fla on attngen's ``[B, H, T, D]`` tensors: elu(x) + 1 features, ``[B, T, H, D]`` layout."""
    import torch

    extra = {"head_first": False} if "head_first" in inspect.signature(kernel).parameters else {}

    def run():
        fq, fk = (torch.nn.functional.elu(t) + 1.0 for t in (q, k))
        o, _ = kernel(fq.transpose(1, 2), fk.transpose(1, 2), v.transpose(1, 2), scale=1.0, normalize=True, **extra)
        return o.transpose(1, 2)

    return run


def run_linear_suite(*, dims=None, seqs=None, dtype_name: str = "bfloat16", blocks=None) -> dict:
    """Time forward and forward+backward of attngen and fla per (D, T) on the current GPU.

    Args:
        dims, seqs: head dims and sequence lengths (default :data:`DIMS`, :data:`SEQS`).
        dtype_name: ``"bfloat16"`` etc.
        blocks: ``(block_f, block_v)`` pairs: attngen is also timed with each forced
            (:meth:`attngen.linear.LinearAttentionOp.set_blocks`), after its default launch.

    Returns:
        ``{"meta": {...}, "rows": [...]}``; each row holds ``D, T, B, H, mode``, ``blocks``
        (``"default"`` or ``"FxV"``), ``attngen_ms`` and ``fla_ms`` (None when fla is
        unavailable or its output differs; one fla timing per case, repeated on its forced
        rows) and ``fla`` (``"available"``, ``"unavailable: ..."`` or ``"wrong: ..."``);
        ``meta["launches"]`` maps ``"D=.., blocks"`` to the launch each attngen kernel took
        (:class:`attngen.linear.LinearLaunch`).
    """
    import torch

    from . import compile as compile_spec
    from .linear import KERNELS
    from .timing import bench

    dtype = getattr(torch, dtype_name)
    op = compile_spec("linear_elu")
    kernel, status = fla_kernel()
    rows, launches = [], {}
    for d in dims or DIMS:
        for t in seqs or SEQS:
            b = max(1, TOKENS // t)
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(b, HEADS, t, d, device="cuda", dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
            do = torch.randn(b, HEADS, t, d, device="cuda", dtype=dtype, generator=gen)
            ours = lambda: op(q, k, v)  # noqa: E731
            theirs, fla_state = None, status
            if kernel is not None:
                try:
                    theirs = _fla_call(kernel, q, k, v)
                    with torch.no_grad():  # a check, not a timed step: no graph, no grad-requiring scalars
                        ref, got = theirs().float(), ours().float()
                    err = float((ref - got).abs().max()) / max(float(ref.abs().max()), 1e-30)
                    if not err <= TOLERANCE:
                        theirs, fla_state = None, f"wrong: relative difference {err:.2e} from attngen"
                except Exception as exc:  # a failing baseline is reported, never hidden
                    theirs, fla_state = None, f"failed: {type(exc).__name__}: {exc}"

            def timed(fn, mode):
                if mode == "fwd":
                    return lambda: fn()
                return lambda: torch.autograd.grad(fn(), (q, k, v), do)

            fla_ms = {mode: bench(timed(theirs, mode), grads=[q, k, v]) if theirs is not None else None for mode in ("fwd", "fwd+bwd")}
            for forced in (None, *(blocks or ())):
                op.set_blocks(*(forced or (None,)))
                label = "default" if forced is None else f"{forced[0]}x{forced[1]}"
                try:
                    if forced is not None and theirs is not None:  # the forced launch must give the same output
                        with torch.no_grad():
                            err = float((theirs().float() - ours().float()).abs().max()) / max(float(ref.abs().max()), 1e-30)
                        if not err <= TOLERANCE:
                            raise RuntimeError(f"wrong: relative difference {err:.2e} from fla")
                    for mode in ("fwd", "fwd+bwd"):
                        rows.append({"D": d, "T": t, "B": b, "H": HEADS, "mode": mode, "blocks": label,
                                     "attngen_ms": bench(timed(ours, mode), grads=[q, k, v]), "fla_ms": fla_ms[mode], "fla": fla_state})
                    launches[f"D={d}, {label}"] = {name: _launch_text(op.launch_for(name, d, d, dtype, q.device)) for name in KERNELS}
                except Exception as exc:  # a forced launch that fails is reported, the others still run
                    launches[f"D={d}, {label}"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            op.set_blocks(None)
    meta = {"gpu": torch.cuda.get_device_name(), "dtype": dtype_name, "tokens": TOKENS, "spec": "linear_elu",
            "torch": torch.__version__, "launches": launches}  # fmt: skip
    return {"meta": meta, "rows": rows}


def report(result: dict) -> str:
    """A Markdown table of a :func:`run_linear_suite` result."""
    meta = result["meta"]
    lines = [
        f"# Linear attention: attngen against flash-linear-attention ({meta['gpu']}, {meta['dtype']})",
        "",
        f"Causal elu(x) + 1 linear attention, normalised (`{meta['spec']}`), {meta['tokens']} tokens per batch, medians in ms.",
        "",
        "| D | T | B | H | mode | attngen blocks | attngen ms | fla ms | fla / attngen | fla |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        fla_ms = f"{r['fla_ms']:.3f}" if r["fla_ms"] is not None else "—"
        ratio = f"{r['fla_ms'] / r['attngen_ms']:.2f}" if r["fla_ms"] is not None else "—"
        lines.append(f"| {r['D']} | {r['T']} | {r['B']} | {r['H']} | {r['mode']} | {r.get('blocks', 'default')} | "
                     f"{r['attngen_ms']:.3f} | {fla_ms} | {ratio} | {r['fla']} |")
    if meta.get("launches"):
        lines += ["", "attngen's launches:"]
        lines += [f"- {key}: " + "; ".join(f"{name} {text}" for name, text in kernels.items()) for key, kernels in meta["launches"].items()]
    return "\n".join(lines)


def _launch_text(launch) -> str:
    """``chunk 64, blocks 128x128, 3 stages`` (features x value columns per program)."""
    return f"chunk {launch.chunk}, blocks {launch.block_f}x{launch.block_v}, {launch.num_stages} stages"
