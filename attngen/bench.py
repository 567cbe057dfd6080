"""``python -m attngen bench``: attngen against FlexAttention and SDPA in one process.

Every attngen result is compared with a baseline's output before it is timed; a mismatch is
reported as wrong and not timed. Times are ``triton.testing.do_bench`` medians (ms); TFLOP/s
count only the pairs the mask keeps (forward ``4·B·H·T²·D·density``, forward+backward 3.5×).
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .check import alibi_slopes
from .timing import bench, command_line

TOKENS = 16384


@dataclass(frozen=True)
class Variant:
    """One benchmark row family: the attngen spec and FlexAttention's equivalent."""

    name: str
    spec: str | dict
    params: Callable[[int], dict] = lambda t: {}
    mask_mod: Callable[..., Any] | None = None  # flex mask_mod factory(inputs) -> mod
    score_mod: Callable[..., Any] | None = None  # flex score_mod factory(inputs) -> mod
    sdpa: dict | None = None  # how SDPA expresses it, if it can
    inputs: Callable[[int, int, int, str], dict] = lambda b, h, t, dev: {}
    flex: bool = True  # False: FlexAttention cannot express it (softmax only); checked against the reference
    note: str = ""  # printed under the suite's table when the variant ran


def _causal(_):
    return lambda b, h, q, k: q >= k


def _doc_inputs(b, h, t, device, doc_len=1000):
    ids = (torch.arange(t, device=device) // doc_len).to(torch.int32)
    return {"doc": ids.expand(b, t).contiguous()}


VARIANTS = {
    "dense": Variant("dense", "dense", sdpa={}),
    "causal": Variant("causal", "causal", mask_mod=_causal, sdpa={"is_causal": True}),
    "sliding_window": Variant(
        "sliding_window", "sliding_window", params=lambda t: {"window": 1024},
        mask_mod=lambda _: (lambda b, h, q, k: (q >= k) & (q - k < 1024)),
    ),
    "prefix_lm": Variant(
        "prefix_lm", "prefix_lm", params=lambda t: {"prefix": t // 4},
        mask_mod=lambda ins: (lambda b, h, q, k: (k < ins["_prefix"]) | (q >= k)),
    ),
    "document": Variant(
        "document", "document", inputs=_doc_inputs,
        mask_mod=lambda ins: (lambda b, h, q, k: (ins["doc"][b, q] == ins["doc"][b, k]) & (q >= k)),
    ),
    "strided": Variant(
        "strided", "strided", params=lambda t: {"stride": 128},
        mask_mod=lambda _: (lambda b, h, q, k: (q >= k) & ((q - k < 128) | ((q - k) % 128 == 0))),
    ),
    "alibi": Variant(
        "alibi", "alibi", inputs=lambda b, h, t, dev: {"slopes": alibi_slopes(h).to(dev)},
        mask_mod=_causal,
        score_mod=lambda ins: (lambda s, b, h, q, k: s - ins["slopes"][h] * (q - k)),
    ),
    # tanh through the GPU's tanh.approx.f32 (the spec's fast_tanh), as FlashAttention soft-caps
    "softcap": Variant(
        "softcap", {"name": "softcap_fast", "mask": "k <= q", "score": "cap * tanh(s / cap)", "params": {"cap": 30.0},
                    "fast_tanh": True},
        mask_mod=_causal, score_mod=lambda ins: (lambda s, b, h, q, k: 30.0 * torch.tanh(s / 30.0)),
        note="softcap: attngen's spec sets fast_tanh: true (tanh.approx.f32, relative error below 2^-10.9; "
             "FlexAttention computes tanh exactly); `--variants softcap_exact` runs the same case with exact tanh",
    ),
    "softcap_exact": Variant(
        "softcap_exact", "softcap", params=lambda t: {"cap": 30.0}, mask_mod=_causal,
        score_mod=lambda ins: (lambda s, b, h, q, k: 30.0 * torch.tanh(s / 30.0)),
    ),
    "sigmoid": Variant("sigmoid", "sigmoid_causal", flex=False),
}  # fmt: skip

SUITES = {
    "anchors": (["dense", "causal", "sliding_window", "prefix_lm", "document", "alibi", "softcap"], (64, 128), (4096, 16384)),
    "sparse": (["causal", "sliding_window", "document", "prefix_lm", "strided"], (128,), (16384,)),
    # sigmoid attention (issue 6) against attngen's own softmax causal, same process
    "sigmoid": (["causal", "sigmoid"], (64, 128), (16384,)),
}

#: query rows (the last ones) of a case without a baseline checked against the float64 reference
REFERENCE_ROWS = 128


def _density(variant: Variant, t: int, inputs: dict) -> float:
    from .reference import mask_matrix
    from .schema import load_spec, with_params

    spec = with_params(load_spec(variant.spec), variant.params(t))
    if variant.name == "document":
        ids = inputs["doc"][0].long()
        counts = torch.bincount(ids).double()
        return float((counts * (counts + 1) / 2).sum() / (t * t))
    if spec.mask is None:
        return 1.0
    from .tilemap import tile_counts

    c = tile_counts(spec, t, t, 128, 128)
    if c.density is not None:
        return c.density
    return float(mask_matrix(spec, {"B": 1, "H": 1, "T_Q": t, "T_KV": t}).float().mean())


def run_suite(suite: str, *, out: Path | None, modes=("fwd", "fwd+bwd"), variants=None, dims=None, seqs=None,
              systems=("attngen", "flex", "sdpa-flash", "sdpa-cudnn"), command: str = "", resume: bool = False,
              name: str | None = None) -> dict:
    """Run a suite; return ``{"meta": ..., "rows": [...]}`` and write ``NAME.json``, ``NAME.md``
    and the plots (``name`` defaults to the suite's) under ``out`` if given, after every
    (variant, D, T), so an interrupted run keeps what it measured.

    With ``resume``, the cases already in ``out/NAME.json`` are kept and skipped, so a suite
    too long for one sitting runs in pieces; the pieces must come from the same card and
    versions (else ``ValueError``), and ``meta["command"]`` lists every piece's command.
    """
    import triton

    import attngen

    meta = {
        "card": torch.cuda.get_device_name(),
        "driver": _driver(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "attngen": attngen.__version__,
        "python": platform.python_version(),
        "suite": suite,
        "command": command or command_line(),
        "dtype": "bfloat16",
        "timing": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms",
        # the cases asked for (None: all of the suite's), so the report lists only those it missed
        "selection": {"variants": variants, "dims": dims, "seqs": seqs},
    }
    rows: list[dict] = []
    done: set[tuple] = set()
    name = name or suite
    previous = out / f"{name}.json" if out is not None else None
    if resume and previous is not None and previous.exists():
        old = json.loads(previous.read_text())
        for key in ("card", "driver", "torch", "triton", "attngen"):
            if old["meta"].get(key) != meta[key]:
                raise ValueError(f"--resume: {previous} has {key} {old['meta'].get(key)!r}, this run {meta[key]!r}; "
                                 "resume only on the same card and versions, or start a fresh file")
        rows = old["rows"]
        done = {(r["variant"], r["D"], r["T"]) for r in rows if r["mode"] == "compile"}
        meta["command"] = f"{old['meta']['command']}; then {meta['command']}"
    result = {"meta": meta, "rows": rows}

    device = "cuda"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    flex = _compiled_flex()
    # one case per (variant, D, T), in the suite's order
    for variant, d, t, b, h in _cases(suite, variants, dims, seqs):
        if (variant, d, t) in done:
            continue
        var = VARIANTS[variant]
        q, k, v, do, inputs = _case_inputs(var, b, h, t, d, device)
        density = _density(var, t, inputs)
        flops = 4.0 * b * h * t * t * d * density
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        # cold: render and load, then the first forward+backward (Triton compiles lazily)
        start = time.perf_counter()
        op = attngen.compile(var.spec, **var.params(t))
        op(*leaves, **inputs).backward(do)
        torch.cuda.synchronize()
        cold_compile = time.perf_counter() - start
        fns: dict[str, Callable] = {}
        fns["attngen"] = lambda: op(*leaves, **inputs)
        if "flex" in systems and var.flex:
            fns["flex"] = _flex_call(flex, var, b, t, inputs, leaves, device)
        if var.sdpa is not None:
            for sys_name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                if sys_name in systems:
                    def run(backend=backend, kw=var.sdpa):
                        with sdpa_kernel([backend]):
                            return sdpa(*leaves, **kw)
                    fns[sys_name] = run
        outputs = {}
        for sys_name, fn in fns.items():
            try:
                with torch.no_grad():
                    outputs[sys_name] = fn().float()
            except Exception as exc:  # a baseline that cannot run this case
                rows.append(dict(system=sys_name, variant=variant, D=d, T=t, mode="fwd", ms=None, tflops=None,
                                 status=f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"))
                continue
        baseline = next((outputs[s] for s in ("flex", "sdpa-cudnn", "sdpa-flash") if s in outputs), None)
        for sys_name, fn in fns.items():
            if sys_name not in outputs:
                continue
            status = "ok"
            if sys_name == "attngen":
                if baseline is not None:
                    err = (outputs["attngen"] - baseline).abs().max().item()
                else:  # no system computes it: the last rows against the float64 reference
                    err = _reference_rows_error(op, outputs["attngen"], q, k, v, inputs)
                if not math.isfinite(err) or err > 5e-2:
                    status = f"WRONG: max |attngen - {'baseline' if baseline is not None else 'reference'}| = {err:.3g}"
            for mode in modes:
                if status != "ok":
                    rows.append(dict(system=sys_name, variant=variant, D=d, T=t, mode=mode, ms=None, tflops=None, status=status))
                    continue
                if mode == "fwd":
                    ms = bench(fn)
                    work = flops
                else:
                    ms = bench(lambda: fn().backward(do), grads=leaves)
                    work = 3.5 * flops
                rows.append(dict(system=sys_name, variant=variant, D=d, T=t, mode=mode, ms=round(ms, 4),
                                 tflops=round(work / ms / 1e9, 1), status="ok", density=round(density, 5)))
        start = time.perf_counter()
        attngen.compile(var.spec, **var.params(t))
        warm_compile = time.perf_counter() - start
        extra = {}
        if op.plan.fwd_ranges.meta is not None and "fwd" in modes:
            # the device-side tile metadata of the forward, timed alone and as a share of it
            extra["metadata_ms"] = round(_metadata_ms(op, q, k, v, inputs), 4)
            fwd_ms = next(r["ms"] for r in rows if r["system"] == "attngen" and r["variant"] == variant
                          and r["D"] == d and r["T"] == t and r["mode"] == "fwd")
            if fwd_ms:
                extra["metadata_share"] = round(extra["metadata_ms"] / fwd_ms, 4)
        rows.append(dict(system="attngen", variant=variant, D=d, T=t, mode="compile", ms=None, tflops=None,
                         status="ok", cold_compile_s=round(cold_compile, 3), warm_compile_ms=round(warm_compile * 1e3, 2),
                         **extra))
        print(_line(rows, variant, d, t), flush=True)
        if out is not None:
            write_outputs(result, out, name)
    return result


def _cases(suite: str, variants=None, dims=None, seqs=None):
    """``(variant, D, T, B, H)`` of every case of a suite, in its order (16,384 tokens per
    batch, H = 2048 / D)."""
    names, suite_dims, suite_seqs = SUITES[suite]
    for d in dims or suite_dims:
        for t in seqs or suite_seqs:
            for name in variants or names:
                yield name, d, t, max(1, TOKENS // t), 2048 // d


def _suite_keys(suite: str | None, selection: dict | None = None) -> list[tuple[str, int, int]]:
    """``(variant, D, T)`` of every case of a named suite (none for an unknown name), or of
    the cases a run selected (``{"variants": ..., "dims": ..., "seqs": ...}``, None for all)."""
    if suite not in SUITES:
        return []
    return [(name, d, t) for name, d, t, _, _ in _cases(suite, **(selection or {}))]


def _case_inputs(var: Variant, b: int, h: int, t: int, d: int, device: str):
    """q, k, v, the output gradient and the runtime inputs of one case (seeded)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(b, h, t, d, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(4))
    return q, k, v, do, var.inputs(b, h, t, device)


def anchors_case(variant: str, b: int, h: int, t: int, d: int, device: str = "cuda"):
    """One case of the anchors suite, for experiment scripts (docs/benchmarks/*_sweep.py).

    Args:
        variant: a name of :data:`VARIANTS` (``causal``, ``document``, ...).
        b, h, t, d: batch, heads, sequence length and head dim.
        device: where the tensors go.

    Returns:
        ``(op, q, k, v, do, inputs, flops)``: the compiled op, bf16 ``[b, h, t, d]`` q, k, v and
        output gradient (seeded), the runtime inputs by name, and the forward's FLOPs
        counting only the pairs the mask keeps (``4·b·h·t²·d·density``).
    """
    import attngen

    var = VARIANTS[variant]
    q, k, v, do, inputs = _case_inputs(var, b, h, t, d, device)
    flops = 4.0 * b * h * t * t * d * _density(var, t, inputs)
    return attngen.compile(var.spec, **var.params(t)), q, k, v, do, inputs, flops


def _reference_rows_error(op, out: torch.Tensor, q, k, v, inputs: dict) -> float:
    """Max |out - reference| over the last ``REFERENCE_ROWS`` query rows, the reference in
    float64. With bottom-right alignment the last rows of q are the last query positions, so
    the reference runs on them alone (O(rows · T) memory, not O(T²))."""
    import attngen

    if op.spec.align != "bottom_right":
        raise ValueError(f"{op.spec.name}: a row-sampled check needs bottom-right alignment")
    rows = min(REFERENCE_ROWS, q.shape[2])
    ref = attngen.reference(op.spec)(q[:, :, -rows:].double(), k.double(), v.double(), **inputs)
    return (out[:, :, -rows:].double() - ref).abs().max().item()


def _compiled_flex():
    """``torch.compile(flex_attention)`` with the recompile limits raised, so that no case
    silently falls back to the eager (unfused) implementation."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.cache_size_limit = 1024
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 1024
    return torch.compile(flex_attention, dynamic=False)


def _flex_call(flex, var: Variant, b: int, t: int, inputs: dict, leaves, device: str) -> Callable:
    """FlexAttention's call for a case; the block mask is built here, outside any timing."""
    from torch.nn.attention.flex_attention import create_block_mask

    mod_inputs = {**inputs, "_prefix": var.params(t).get("prefix")}
    block_mask = None
    if var.mask_mod is not None:
        block_mask = create_block_mask(var.mask_mod(mod_inputs), b, None, t, t, device=device, _compile=True)
    score_mod = var.score_mod(mod_inputs) if var.score_mod else None
    return lambda: flex(*leaves, score_mod=score_mod, block_mask=block_mask)


def warm_flex(suite: str, *, shard: tuple[int, int] = (0, 1), variants=None, dims=None, seqs=None) -> int:
    """Compile FlexAttention's forward and backward for every ``shard[1]``-th case of a suite,
    starting at ``shard[0]``, without timing anything. Run in parallel processes before a
    suite, this fills Inductor's on-disk caches so that the timed run (one process, one GPU)
    does not spend most of its time compiling the baseline. Returns the number of cases."""
    flex = _compiled_flex()
    n = 0
    for i, (name, d, t, b, h) in enumerate(_cases(suite, variants, dims, seqs)):
        if i % shard[1] != shard[0]:
            continue
        var = VARIANTS[name]
        if not var.flex:
            continue
        q, k, v, do, inputs = _case_inputs(var, b, h, t, d, "cuda")
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        _flex_call(flex, var, b, t, inputs, leaves, "cuda")().backward(do)
        torch.cuda.synchronize()
        n += 1
    return n


def _metadata_ms(op, q, k, v, inputs: dict) -> float:
    """Median GPU time (ms) of the forward's metadata kernel alone, at the forward's tile
    config, replayed from a CUDA graph so that Python's launch overhead (hidden behind the
    GPU's queue in a real step) is not counted."""
    import triton

    from .args import check_call

    dims, ordered = check_call(op.spec, q, k, v, inputs, constant_reads=op.spec.constant_reads())
    cfg = op.config_for("fwd", dims, q.dtype, q.device)
    meta = torch.empty(1)

    def run():
        nonlocal meta
        meta = op.tile_meta("k", cfg.block_q, cfg.block_kv, ordered, dims, q.device)

    run()  # compile outside the graph
    return triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median")


def write_outputs(result: dict, out: Path, name: str) -> list[Path]:
    """Write ``NAME.json``, ``NAME.md`` and one ``NAME-d<D>.png`` plot per head dim."""
    from .load import write_atomic

    paths = [out / f"{name}.json", out / f"{name}.md"]
    write_atomic(paths[0], json.dumps(result, indent=1))
    write_atomic(paths[1], markdown(result))
    for d in sorted({r["D"] for r in result["rows"]}):
        paths.append(plot(result, d, out / f"{name}-d{d}.png"))
    return paths


def plot(result: dict, d: int, path: Path) -> Path:
    """Bar chart of forward and forward+backward TFLOP/s per variant and system at head dim
    ``d`` (one panel per mode), with the card and versions in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["D"] == d and r["mode"] in ("fwd", "fwd+bwd") and r.get("tflops")]
    systems = [s for s in ("attngen", "flex", "sdpa-flash", "sdpa-cudnn", "fla") if any(r["system"] == s for r in rows)]
    groups = sorted({(r["variant"], r["T"]) for r in rows}, key=lambda x: (x[1], x[0]))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(groups) * 2), 4.5), sharey=True)
    width = 0.8 / max(1, len(systems))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for i, system in enumerate(systems):
            values = []
            for variant, t in groups:
                hit = [r["tflops"] for r in rows if (r["system"], r["variant"], r["T"], r["mode"]) == (system, variant, t, mode)]
                values.append(hit[0] if hit else 0.0)
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=system)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
        ax.set_xticklabels([f"{v}\nT={t}" for v, t in groups], fontsize=7)
        ax.set_title(f"{mode}, D={d}", fontsize=9)
        ax.set_ylabel("TFLOP/s (kept pairs)")
    axes[0].legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"{meta['card']}, torch {meta['torch']}, Triton {meta['triton']}, {meta['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _driver() -> str:
    """The NVIDIA driver version (the first GPU's line: one line per GPU), or ``unknown``."""
    import subprocess

    try:
        lines = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20).stdout.split()
        return lines[0] if lines else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _line(rows, name, d, t) -> str:
    cells = []
    for r in rows:
        if r["variant"] == name and r["D"] == d and r["T"] == t and r["mode"] in ("fwd", "fwd+bwd"):
            cells.append(f"{r['system']} {r['mode']} " + (f"{r['tflops']}" if r["tflops"] else r["status"][:40]))
        if r["variant"] == name and r["D"] == d and r["T"] == t and r.get("metadata_ms") is not None:
            cells.append(f"metadata {1000 * r['metadata_ms']:.1f} us")
    return f"{name} D={d} T={t}: " + "; ".join(cells)


def _ratio(x: float) -> str:
    """A ratio to two decimals, or to three where two would round a ratio below 1 up to
    1.00 (0.998 is a miss of a ≥ 1.0 target, and the table must show it)."""
    return f"{x:.3f}" if x < 1 <= round(x, 2) else f"{x:.2f}"


def markdown(result: dict) -> str:
    """The rows as a Markdown table: forward / forward+backward TFLOP/s per system and the
    attngen/FlexAttention ratio."""
    rows = result["rows"]
    meta = result["meta"]
    keys = sorted({(r["variant"], r["D"], r["T"]) for r in rows}, key=lambda x: (x[1], x[2], x[0]))
    systems = [s for s in ("attngen", "flex", "sdpa-flash", "sdpa-cudnn") if any(r["system"] == s for r in rows)]

    def cell(system, variant, d, t, mode):
        for r in rows:
            if (r["system"], r["variant"], r["D"], r["T"], r["mode"]) == (system, variant, d, t, mode):
                return r
        return None

    lines = [
        f"Card: {meta['card']} (driver {meta['driver']}); torch {meta['torch']}, Triton {meta['triton']}, attngen {meta['attngen']}; {meta['dtype']}.",
        f"Command: `{meta['command']}`. Timing: {meta['timing']}.",
        "Cells: forward / forward+backward TFLOP/s counting only kept pairs; ratio = attngen / FlexAttention.",
        "",
        "| variant | D | T | density | " + " | ".join(systems) + " | ratio vs Flex | attngen cold / warm compile |",
        "|---|---|---|---|" + "---|" * len(systems) + "---|---|",
    ]
    for variant, d, t in keys:
        vals = []
        density = next((r.get("density") for r in rows if r["variant"] == variant and r["D"] == d and r["T"] == t and r.get("density")), None)
        for s in systems:
            f, fb = cell(s, variant, d, t, "fwd"), cell(s, variant, d, t, "fwd+bwd")
            if f is None and fb is None:
                vals.append("—")
            elif (f and f["tflops"] is None) or (fb and fb["tflops"] is None):
                vals.append((f or fb)["status"][:60])
            else:
                vals.append(f"{f['tflops'] if f else '—'} / {fb['tflops'] if fb else '—'}")
        ratio = "—"
        af, ab = cell("attngen", variant, d, t, "fwd"), cell("attngen", variant, d, t, "fwd+bwd")
        ff, fb_ = cell("flex", variant, d, t, "fwd"), cell("flex", variant, d, t, "fwd+bwd")
        if af and ff and af["ms"] and ff["ms"] and ab and fb_ and ab["ms"] and fb_["ms"]:
            ratio = f"{_ratio(ff['ms'] / af['ms'])} / {_ratio(fb_['ms'] / ab['ms'])}"
        comp = cell("attngen", variant, d, t, "compile")
        comp_s = f"{comp['cold_compile_s']} s / {comp['warm_compile_ms']} ms" if comp else "—"
        lines.append(f"| {variant} | {d} | {t} | {density if density is not None else '—'} | " + " | ".join(vals) + f" | {ratio} | {comp_s} |")
    suite = meta.get("suite") or next(iter(re.findall(r"--suite[ =](\w+)", meta.get("command", ""))), None)
    missing = [c for c in _suite_keys(suite, meta.get("selection")) if c not in set(keys)]
    if missing:
        lines += ["", f"Not measured in this run ({len(missing)} of the suite's cases; `--resume` adds them): "
                  + ", ".join(f"{v} D={d} T={t}" for v, d, t in missing) + "."]
    for d, t in sorted({(d, t) for v, d, t in keys if v == "sigmoid"}):
        sig = [cell("attngen", "sigmoid", d, t, m) for m in ("fwd", "fwd+bwd")]
        soft = [cell("attngen", "causal", d, t, m) for m in ("fwd", "fwd+bwd")]
        if all(c and c["tflops"] for c in sig + soft):
            lines += ["", f"Sigmoid against softmax (both causal, attngen, D={d}, T={t}): forward "
                      f"{sig[0]['tflops'] / soft[0]['tflops']:.2f}×, forward+backward {sig[1]['tflops'] / soft[1]['tflops']:.2f}× "
                      "the TFLOP/s."]
    notes = [VARIANTS[v].note for v in sorted({v for v, _, _ in keys}) if v in VARIANTS and VARIANTS[v].note]
    if notes:
        lines += [""] + [f"Note on {n}." for n in notes]
    if meta.get("note"):  # written by hand into a result file, e.g. when a variant was renamed after the run
        lines += ["", f"Note: {meta['note']}"]
    metas = [r for r in rows if r["mode"] == "compile" and r.get("metadata_ms") is not None]
    if metas:
        lines += ["", "Tile metadata of masks that read runtime inputs (the forward's metadata kernel alone, GPU time"
                  " from a CUDA-graph replay, against the forward's do_bench time):", ""]
        for r in metas:
            share = f" = {100 * r['metadata_share']:.1f}% of the forward" if r.get("metadata_share") else ""
            lines.append(f"- {r['variant']} D={r['D']} T={r['T']}: {1000 * r['metadata_ms']:.1f} µs{share}")
    return "\n".join(lines) + "\n"


def long_window(t: int = 1_048_576, window: int = 4096, h: int = 8, d: int = 128, samples: int = 64) -> str:
    """Causal sliding window at ``t`` tokens (B=1): time, peak memory against the tensors the
    call must hold, and sampled rows checked against a row-wise float64 reference."""
    import attngen

    device = "cuda"
    op = attngen.compile("sliding_window", window=window)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, h, t, d, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(1, h, t, d, device=device, dtype=torch.bfloat16, generator=gen)
    o, lse = op(q, k, v, return_lse=True)
    rows = torch.randint(0, t, (samples,), generator=torch.Generator().manual_seed(1)).tolist() + [0, t - 1]
    worst = 0.0
    for r in rows:
        lo = max(0, r - window + 1)
        s = (q[0, :, r, None].double() @ k[0, :, lo : r + 1].double().transpose(-1, -2)) / math.sqrt(d)
        ref = torch.softmax(s, -1) @ v[0, :, lo : r + 1].double()  # [H, 1, D]
        worst = max(worst, (o[0, :, r].double() - ref[:, 0]).abs().max().item())
    torch.autograd.grad(o, (q, k, v), do)
    del o, lse
    torch.cuda.synchronize()
    fwd = bench(lambda: op(q, k, v))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    def step():
        out = op(q, k, v)
        return torch.autograd.grad(out, (q, k, v), do)

    fwd_bwd = bench(step)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    elem = q.numel() * q.element_size()
    # beyond q, k, v, do (already allocated): o, dq, dk, dv and lse
    must_hold = 4 * elem + h * t * 4
    held_total = base + peak
    budget = 8 * elem + h * t * 4
    flops = 4.0 * h * d * (t * window - window * (window - 1) / 2)
    return (
        f"sliding_window {window} at T={t}, B=1, H={h}, D={d}, bf16\n"
        f"  sampled rows max |o - ref64| = {worst:.3e} over {len(rows)} rows\n"
        f"  forward {fwd:.2f} ms ({flops / fwd / 1e9:.0f} TFLOP/s), forward+backward {fwd_bwd:.2f} ms ({3.5 * flops / fwd_bwd / 1e9:.0f} TFLOP/s)\n"
        f"  peak memory of a forward+backward step {held_total / 2**30:.2f} GiB (allocations beyond q, k, v, do: {peak / 2**30:.2f} GiB; "
        f"outputs alone need {must_hold / 2**30:.2f} GiB); q, k, v, o, their gradients and lse: {budget / 2**30:.2f} GiB; "
        f"ratio {held_total / budget:.3f}"
    )


def recompute_table(seqs=(1024, 4096, 16384), spec: str = "causal", h: int = 16, d: int = 128, tokens: int = TOKENS) -> dict:
    """Forward+backward time and peak memory per recompute policy (``lse``, ``store_p``,
    ``full``) of ``spec`` at each ``T`` (``B = tokens / T``, bf16, on the current GPU).

    Peak memory is ``torch.cuda.max_memory_allocated`` during one step, less what was
    allocated before it (q, k, v and the output gradient). Every policy's gradients are
    checked against ``lse``'s before timing.
    """
    import triton

    import attngen
    from .schema import load_spec

    base = load_spec(spec).to_dict()
    rows = []
    for t in seqs:
        b = max(1, tokens // t)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
        leaves = [x.requires_grad_() for x in (q, k, v)]
        grads = {}
        for policy in ("lse", "store_p", "full"):
            op = attngen.compile({**base, "recompute": policy})

            def step():
                return torch.autograd.grad(op(*leaves), leaves, do)

            grads[policy] = step()
            err = max((a.float() - b_.float()).abs().max().item() for a, b_ in zip(grads[policy], grads["lse"]))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            ms = bench(step)
            rows.append(dict(policy=policy, T=t, B=b, ms=round(ms, 4), peak_gib=round(peak / 2**30, 3),
                             stores_p=bool(policy == "store_p" and op.stores_p(t, t)), max_grad_diff_vs_lse=err))
        del grads
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "spec": spec, "H": h, "D": d, "dtype": "bfloat16", "command": command_line()}
    return {"meta": meta, "rows": rows}


def recompute_markdown(result: dict) -> str:
    """The recompute table as Markdown."""
    meta = result["meta"]
    lines = [f"{meta['card']}; torch {meta['torch']}, Triton {meta['triton']}; spec {meta['spec']}, H={meta['H']}, "
             f"D={meta['D']}, {meta['dtype']}; 16,384 tokens per batch. Command: `{meta['command']}`.", "",
             "| T | B | policy | forward+backward (ms) | peak memory of the step (GiB) | P stored | max grad diff vs lse |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['T']} | {r['B']} | {r['policy']} | {r['ms']} | {r['peak_gib']} | {'yes' if r['stores_p'] else 'no'} | "
                     f"{r['max_grad_diff_vs_lse']:.2e} |")
    return "\n".join(lines) + "\n"


def decode_suite(b: int = 8, h: int = 32, h_kv: int = 8, d: int = 128, t_kv: int = 32768, t_q: int = 1,
                 block_size: int = 256, spec: str = "causal", device: str = "cuda", with_flex: bool = True, timing: bool = True) -> dict:
    """Decoding time of ``op.decode`` (contiguous and paged caches) against FlexAttention's
    decoding path (``torch.compile(flex_attention)`` with ``T_Q`` new tokens, GQA) and the
    memory floor: the bytes of K and V read, over the card's bandwidth (4.27 TB/s measured
    for the H200 device-to-device, counting reads and writes).

    Outputs are compared with FlexAttention's before timing. Times are ``do_bench`` medians
    (ms); ``x_floor`` is time / floor. ``with_flex=False`` and ``timing=False`` leave out
    FlexAttention and the timing (the layout and correctness checks still run, e.g. on the CPU).
    """
    import attngen

    from .decode import decode_launch
    from .timing import bench as median_ms

    op = attngen.compile(spec)
    gen = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16
    q = torch.randn(b, h, t_q, d, device=device, dtype=dt, generator=gen)
    k, v = (torch.randn(b, h_kv, t_kv, d, device=device, dtype=dt, generator=gen) for _ in range(2))
    lens = torch.full((b,), t_kv, dtype=torch.int32, device=device)
    # the paged layout: every sequence's blocks, shuffled over the pool
    n_blocks = t_kv // block_size
    perm = torch.randperm(b * n_blocks, generator=torch.Generator().manual_seed(0)).to(device)
    table = perm.view(b, n_blocks).to(torch.int32)
    k_pages = torch.empty(b * n_blocks, block_size, h_kv, d, device=device, dtype=dt)
    v_pages = torch.empty_like(k_pages)
    k_pages[perm] = k.view(b, h_kv, n_blocks, block_size, d).permute(0, 2, 3, 1, 4).reshape(-1, block_size, h_kv, d)
    v_pages[perm] = v.view(b, h_kv, n_blocks, block_size, d).permute(0, 2, 3, 1, 4).reshape(-1, block_size, h_kv, d)
    # the serving path skips reading the lengths to the host (validate=False), as FlexAttention
    # and FlashAttention's kvcache call do; "validated" rows pay the default check's device sync
    # and "launches only" the two kernels, the checks done once outside the timing
    launches = decode_launch(op, q, k, v, lens, validate=False)
    runs = {
        "attngen-contiguous": lambda: op.decode(q, k, v, lens, validate=False)[0],
        "attngen-paged": lambda: op.decode(q, k_pages, v_pages, lens, block_table=table, validate=False)[0],
        "attngen-contiguous validated": lambda: op.decode(q, k, v, lens)[0],
        "attngen-paged validated": lambda: op.decode(q, k_pages, v_pages, lens, block_table=table)[0],
        "attngen-contiguous launches only": lambda: launches()[0],
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        if not with_flex:
            raise RuntimeError("left out (with_flex=False)")
        flex = _compiled_flex()
        offset = t_kv - t_q
        mask = create_block_mask(lambda bb, hh, qi, ki: qi + offset >= ki, b, None, t_q, t_kv, device=device)
        runs["flex"] = lambda: flex(q, k, v, block_mask=mask, enable_gqa=True)
    except Exception as exc:  # reported, not hidden
        runs["flex"] = exc
    floor_ms = 2 * b * h_kv * t_kv * d * 2 / 4.27e12 * 1e3
    rows, want = [], None
    with torch.no_grad():
        for name in ("flex", *(n for n in runs if n != "flex")):
            fn = runs[name]
            if isinstance(fn, Exception):
                rows.append(dict(system=name, status=f"unavailable: {type(fn).__name__}: {str(fn)[:100]}"))
                continue
            out = fn().float()
            want = out if want is None else want
            err = (out - want).abs().max().item()
            if err > 2e-2:  # against the first system that ran (FlexAttention when it runs)
                rows.append(dict(system=name, status=f"WRONG: max |out - first| = {err:.3g}"))
                continue
            if not timing:
                rows.append(dict(system=name, status="ok", max_err_vs_first=err))
                continue
            ms = median_ms(fn)
            rows.append(dict(system=name, status="ok", ms=round(ms, 4), x_floor=round(ms / floor_ms, 3), max_err_vs_first=err))
    card = torch.cuda.get_device_name() if device == "cuda" else device
    meta = dict(card=card, torch=torch.__version__, B=b, H=h, H_KV=h_kv, D=d, T_KV=t_kv, T_Q=t_q,
                block_size=block_size, spec=spec, floor_ms=round(floor_ms, 4), command=command_line())
    return {"meta": meta, "rows": rows}


def decode_markdown(result: dict) -> str:
    """The decoding table as Markdown."""
    m = result["meta"]
    lines = [f"{m['card']}; torch {m['torch']}; {m['spec']} decoding, B={m['B']}, H={m['H']}, H_KV={m['H_KV']}, D={m['D']}, "
             f"T_KV={m['T_KV']}, T_Q={m['T_Q']}, bf16, paged block size {m['block_size']}; memory floor (K and V bytes at "
             f"4.27 TB/s) {m['floor_ms']} ms. Command: `{m['command']}`.", "",
             "| system | time (ms) | × floor |", "|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['system']} | {r.get('ms', r['status'])} | {r.get('x_floor', '')} |")
    return "\n".join(lines) + "\n"
