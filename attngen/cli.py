"""``python -m attngen``: the command line.

``run SPEC``   compile, run forward and backward on random inputs, print the error table
               against the reference, and on a GPU time it against PyTorch's SDPA.
``show SPEC``  print the normalised spec, the IR after every pass, and the rendered kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from . import config


class UsageError(Exception):
    """A command-line mistake: printed as ``error: ...`` with exit status 2."""


def _params(pairs: Sequence[str]) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--param {pair!r}: write NAME=VALUE, e.g. --param window=1024")
        try:
            out[name] = int(value)
        except ValueError:
            try:
                out[name] = float(value)
            except ValueError:
                raise UsageError(f"--param {pair!r}: {value!r} is not a number") from None
    return out


def _blocks(text: str) -> tuple[int, int]:
    """``FxV`` -> ``(F, V)``, checked as :func:`attngen.linear.check_blocks` checks them."""
    from .linear import check_blocks

    try:
        f, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FxV, e.g. 64x64") from None
    try:
        return check_blocks(f, v)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _shape(text: str) -> dict[str, int]:
    try:
        nums = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if len(nums) == 5:
        b, h, h_kv, t, d = nums
        nums = [b, h, h_kv, t, t, d]
    if len(nums) != 6:
        raise argparse.ArgumentTypeError(f"{text!r}: expected B,H,H_KV,T,D or B,H,H_KV,T_Q,T_KV,D")
    return dict(zip(("B", "H", "H_KV", "T_Q", "T_KV", "D_QK"), nums))


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attngen", description="attngen: an attention compiler")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compile a spec, check it against the reference, time it on a GPU")
    run.add_argument("spec", help="a YAML file or the name of a zoo spec (specs/)")
    run.add_argument("--shape", type=_shape, default=None,
                     help="B,H,H_KV,T,D or B,H,H_KV,T_Q,T_KV,D; default 2,4,2,100,64 on the CPU, 2,8,2,1000,128 on a GPU")
    run.add_argument("--dv", type=int, default=None, help="value head dim D_V (default: D)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    run.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override a spec param")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--doc-len", type=int, default=None,
                     help="int runtime inputs along positions: documents of this many tokens (default: sorted random ids, "
                          "about 8 tokens a document); inputs without a position dimension are drawn as lengths in [0, T]")
    run.add_argument("--no-time", action="store_true", help="skip timing on the GPU")

    zoo = sub.add_parser("zoo", help="check every zoo spec against the reference, forward and backward")
    zoo.add_argument("--shape", type=_shape, default=None,
                     help="B,H,H_KV,T,D (D is replaced by each --dims); default 2,4,2,100,64 on the CPU, 2,8,2,1000,128 on a GPU")
    zoo.add_argument("--dims", type=int, nargs="+", default=None, help="head dims to check (default: the shape's)")
    zoo.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["bf16", "fp16", "fp32"])
    zoo.add_argument("--device", choices=("cuda", "cpu"), default=None)
    zoo.add_argument("--jobs", type=int, default=4, help="worker processes")
    zoo.add_argument("--spec", nargs="+", default=None, help="only these specs")
    zoo.add_argument("--seed", type=int, default=0)

    fuzz = sub.add_parser("fuzz", help="fuzz generated kernels against the reference with hypothesis")
    fuzz.add_argument("spec", nargs="?", default=None, help="fuzz shapes, dtypes and layouts of this spec")
    fuzz.add_argument("--random", action="store_true", help="also draw random masks and score modifications")
    fuzz.add_argument("--examples", type=int, default=100)
    fuzz.add_argument("--seed", type=int, default=0)
    fuzz.add_argument("--device", choices=("cuda", "cpu"), default=None)
    fuzz.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=None, help="default: bf16 fp16 on a GPU, fp32 on the CPU")
    fuzz.add_argument("--max-t", type=int, default=None, help="longest T_Q / T_KV drawn (default 300 on a GPU, 64 on the CPU)")
    fuzz.add_argument("--replay", default=None, help="run one reproduction file written by a failing fuzz run")
    fuzz.add_argument("--jobs", type=int, default=1, metavar="N",
                      help="split the examples over N processes (worker i draws with seed SEED+i; on a GPU host the workers take the "
                           "visible GPUs in turn); kernel compiles dominate a GPU run")
    fuzz.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)

    tune = sub.add_parser("tune", help="tune a spec's kernels for this GPU and cache the winners")
    tune.add_argument("spec", help="a YAML file or the name of a zoo spec (specs/)")
    tune.add_argument("--gpu-shapes", type=_shape, nargs="+", required=True, metavar="B,H,H_KV,T,D")
    tune.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    tune.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    tune.add_argument("--doc-len", type=int, default=None, help="int runtime inputs: documents of this many tokens")

    bench = sub.add_parser("bench", help="time attngen against FlexAttention and SDPA on the GPU")
    bench.add_argument("--suite", choices=("anchors", "sparse", "sigmoid", "long", "ring", "recompute", "llama", "decode", "linear"), default="anchors")
    bench.add_argument("--gpus", type=int, default=2, help="ring suite: GPUs (processes) the sequence is sharded over")
    bench.add_argument("--out", default=None, help="write NAME.json, NAME.md and NAME-d<D>.png here (e.g. docs/benchmarks)")
    bench.add_argument("--variants", nargs="+", default=None, help="only these variants of the suite (default: all)")
    bench.add_argument("--dims", type=int, nargs="+", default=None, help="only these head dims (default: the suite's)")
    bench.add_argument("--seqs", type=int, nargs="+", default=None, help="only these sequence lengths (default: the suite's)")
    bench.add_argument("--name", default=None, help="file stem of the outputs under --out (default: the suite's name), e.g. h200")
    bench.add_argument("--resume", action="store_true", help="keep and skip the cases already in OUT/NAME.json (run a long suite in pieces)")
    bench.add_argument("--warm-jobs", type=int, default=0, metavar="N",
                       help="first compile FlexAttention for the suite's cases in N parallel processes (fills Inductor's caches; nothing is timed there)")
    bench.add_argument("--warm-shard", default=None, metavar="I/N", help=argparse.SUPPRESS)
    bench.add_argument("--blocks", type=_blocks, nargs="+", default=None, metavar="FxV",
                       help="linear suite: also time attngen with F features x V value columns per program, e.g. 64x64 128x128")

    zoo_docs = sub.add_parser("zoo-docs", help="write the spec zoo page and its tile-map pictures")
    zoo_docs.add_argument("--out", default="docs")

    show = sub.add_parser("show", help="print the normalised spec, the IR and the rendered kernel path")
    show.add_argument("spec", help="a YAML file or the name of a zoo spec (specs/)")
    show.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    show.add_argument("--source", action="store_true", help="also print the rendered kernel source")
    show.add_argument("--tiles", action="store_true", help="print the tile classification at --t-q, --t-kv")
    show.add_argument("--t-q", type=int, default=4096, help="with --tiles: query length (default 4096)")
    show.add_argument("--t-kv", type=int, default=None, help="with --tiles: key length (default: --t-q)")
    show.add_argument("--block-q", type=int, default=128,
                      help="with --tiles: query tile size (default 128; any size classifies, the kernels use powers of two "
                           "from 16 to 256, and the forward's default at head dims up to 128 is 128 x 64)")
    show.add_argument("--block-kv", type=int, default=128, help="with --tiles: key tile size (default 128)")
    show.add_argument("--png", default=None, help="with --tiles: write a picture of the tile map here")
    return parser


def _plain_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one ``warning: ...`` line, like the ``error: ...`` lines (no source line)."""
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import AttngenError

    warnings.formatwarning = _plain_warning

    try:
        from . import config

        config.check_switches()  # a bad ATTNGEN_* switch stops every command here, not mid-run
        if args.command == "show":
            return _show(args)
        if args.command == "zoo":
            return _zoo(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "fuzz":
            return _fuzz(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "zoo-docs":
            from .tilemap import write_zoo_page

            print(write_zoo_page(args.out))
            return 0
        return _run(args)
    except (AttngenError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _warm_commands(args) -> list[list[str]]:
    """The command lines of ``bench --warm-jobs N``'s worker processes: the same suite and
    selection, one shard each."""
    extra: list[str] = []
    for flag, values in (("--variants", args.variants), ("--dims", args.dims), ("--seqs", args.seqs)):
        if values:
            extra += [flag, *map(str, values)]
    return [
        [sys.executable, "-m", "attngen", "bench", "--suite", args.suite, "--warm-shard", f"{i}/{args.warm_jobs}", *extra]
        for i in range(args.warm_jobs)
    ]


def _check_doc_len(doc_len: int | None, spec) -> None:
    """``--doc-len`` must be positive and apply to some integer runtime input."""
    if doc_len is None:
        return
    if doc_len < 1:
        raise UsageError(f"--doc-len {doc_len}: a document has at least 1 token")
    if not any(i.kind == "int" for i in spec.inputs):
        raise UsageError(f"--doc-len: spec {spec.name!r} has no integer runtime input to fill with document ids; drop the flag")


def _show_tiles(args) -> int:
    import time

    from .tilemap import plot_tile_map, tile_counts, tile_map

    params = _params(args.param)
    t_kv = args.t_q if args.t_kv is None else args.t_kv
    for name, value in (("--t-q", args.t_q), ("--t-kv", t_kv), ("--block-q", args.block_q), ("--block-kv", args.block_kv)):
        if value < 1:
            raise UsageError(f"{name} {value}: must be at least 1")
    start = time.perf_counter()
    c = tile_counts(args.spec, args.t_q, t_kv, args.block_q, args.block_kv, params)
    took = time.perf_counter() - start
    total = c.q_tiles * c.kv_tiles
    print(f"T_Q={args.t_q} T_KV={t_kv} block_q={args.block_q} block_kv={args.block_kv}: {c.q_tiles} x {c.kv_tiles} = {total} tiles")
    for name, n in (("EMPTY", c.empty), ("PARTIAL", c.partial), ("FULL", c.full)):
        print(f"  {name:<8} {n:>14,}  {n / total:8.4%}")
    if c.density is not None:
        print(f"  density  {c.density:.6f}  ({c.visible_pairs:,} of {c.total_pairs:,} pairs)")
    else:
        lo, hi = c.visible_bounds
        print(f"  density  between {lo / c.total_pairs:.6f} and {hi / c.total_pairs:.6f} (this mask's visible pairs have no closed-form count)")
    print(f"  computed in {took:.2f} s")
    from .compiler import build

    g = build(args.spec, **params).graph.graph
    if g["tiles_k"].runtime:
        print("  note: this mask reads runtime inputs along a position; without their data its tiles are drawn as")
        print("        PARTIAL here, while at run time the metadata kernel skips the tiles the data rules out")
    if g.get("periodic"):
        print(f"  note: the (q - k) % {g['periodic']['stride']} == 0 part runs in residue order, where its tiles are FULL;")
        print("        this map is the natural order of the whole mask")
    if args.png:
        if total > 4096 * 4096:
            print(f"  (--png skipped: {total:,} tiles is too many to draw; use smaller lengths or larger tiles)")
        else:
            plot_tile_map(tile_map(args.spec, args.t_q, t_kv, args.block_q, args.block_kv, params), args.png,
                          f"{args.spec} T_Q={args.t_q} T_KV={t_kv} tiles {args.block_q}x{args.block_kv}")
            print(f"  wrote {args.png}")
    return 0


def _show(args) -> int:
    from .compiler import build
    from .load import write_kernel
    from .render import decode_module_name, render_decode

    if args.png and not args.tiles:
        raise UsageError("--png draws the tile map: add --tiles")
    if args.tiles:
        return _show_tiles(args)
    compiled = build(args.spec, **_params(args.param))
    print("# spec (normalised)")
    print(compiled.spec.to_yaml().rstrip())
    if compiled.spec.normalizer == "linear":  # no IR: the plan comes straight from the spec
        return _show_linear(compiled, args.source)
    print("\n# IR after the pass pipeline")
    for key in ("exp2", "fold_scale", "acc_dtype", "saved"):
        print(f"graph.{key} = {compiled.graph.graph.get(key)}")
    split = compiled.graph.graph.get("bias_split")
    if split:  # the score is s + row + column: rows go to the log-sum-exp (passes.split_score_bias)
        # in the spec's words: each ld<i> back as the input read it stands for
        import sympy

        reads = {d["symbol"]: sympy.Indexed(d["input"], *d["indices"])
                 for _, d in compiled.graph.nodes(data=True) if d.get("op") == "load_input"}
        row, col, slope = (None if split[key] is None else split[key].xreplace(reads) for key in ("row", "col", "slope"))
        print(f"graph.bias_split = row {row}, column {col}, slope {slope} (pos_a: the program's anchor position)")
    for node, data in compiled.graph.nodes(data=True):
        attrs = ", ".join(f"{k}={v}" for k, v in data.items() if k != "op")
        succ = ", ".join(compiled.graph.successors(node))
        print(f"  {node:<20} {data['op']:<11} {attrs}" + (f"  -> {succ}" if succ else ""))
    _show_program_order(compiled)
    path = write_kernel(compiled.spec.name, compiled.rendered)
    print("\n# rendered kernels")
    names = []
    for part in (compiled.plan, compiled.plan.perm):
        if part is None:
            continue
        # in launch order; a backward runs the dQ kernel or, with dQ fused, the conversion
        names += [part.fwd.name] + ([] if part.perm_stride else ["attn_bwd_preprocess"]) + [part.dkdv.name, part.dq.name]
        names += [] if part.perm_stride else ["attn_bwd_dq_convert"]
        names += [r.meta.name for r in (part.fwd_ranges, part.dkdv_ranges) if r.meta is not None]
    decode = render_decode(compiled.plan)  # its own module, for op.decode
    print(f"  {compiled.plan.decode.name:<24} {write_kernel(decode_module_name(compiled.spec.name), decode)}")
    _show_warp_specialized(compiled)
    for name in names:
        print(f"  {name:<24} {path}")
    if args.source:
        print()
        print(compiled.rendered.source)
        from . import warpspec

        if warpspec.plan_supports(compiled.plan) is None:
            print(warpspec.render_ws(compiled.plan).source)
    return 0


def _show_program_order(compiled) -> None:
    """How the attn_fwd and attn_bwd_dq grids order their programs (attngen.tilemap.query_tile_order)."""
    from .tilemap import FIRST_TILE_FIRST, LAST_TILE_FIRST, LAUNCH_ORDER, query_tile_order

    order = query_tile_order(compiled.spec, compiled.graph, compiled.plan)
    print("\n# program order (attn_fwd and attn_bwd_dq grids; ATTNGEN_LAUNCH_ORDER=1 keeps launch order)")
    if order == LAST_TILE_FIRST:
        print("  last query tile first, heads in groups: later query tiles visit more key tiles")
    elif order == FIRST_TILE_FIRST:
        print("  first query tile first, heads in groups: earlier query tiles visit more key tiles")
    else:
        print("  launch order: no query tile visits much more than another, or the tile bounds read runtime inputs")
    if order != LAUNCH_ORDER and compiled.plan.perm is not None:
        print("  (the residue-order kernels of the strided part keep launch order)")


def _show_warp_specialized(compiled) -> None:
    """The Hopper forward (attngen.warpspec): its file, or why this spec takes attn_fwd."""
    from . import config, warpspec
    from .load import write_kernel

    why = warpspec.plan_supports(compiled.plan)
    if why is not None:
        print(f"  {'attn_fwd_ws':<24} not used ({why}): every forward runs attn_fwd")
        return
    path = write_kernel(warpspec.module_name(compiled.spec.name), warpspec.render_ws(compiled.plan))
    print(f"  {'attn_fwd_ws':<24} {path}")
    pad = " " * 26
    pays = warpspec.pays(compiled.plan)
    print(f"{pad}replaces attn_fwd on compute capability 9.x for fp16/bf16 and head dim 128, "
          + ("by default" if pays else "only with ATTNGEN_WS=1"))
    if not pays:
        print(f"{pad}(its tile ranges come from runtime inputs, where it ran slower on the H200)")
    if compiled.plan.has_mask:
        print(f"{pad}(masked calls: only when T_Q == T_KV, queries and keys at the same positions)")
    if compiled.plan.stored is not None:
        print(f"{pad}(recompute: store_p: calls that store P run attn_fwd_sp)")
    forced = config.warp_specialize()
    if forced is not None:
        print(f"{pad}(ATTNGEN_WS={forced} is set: " + ("every forward runs attn_fwd)" if forced == 0 else
                                                      "every call it can run takes it)"))


def _show_linear(compiled, source: bool) -> int:
    from dataclasses import asdict

    from .load import write_kernel

    print("\n# linear plan (no IR graph: attngen.linear.make_linear_plan)")
    for key, value in asdict(compiled.plan).items():
        print(f"plan.{key} = {value}")
    path = write_kernel(compiled.spec.name, compiled.rendered)
    print("\n# rendered kernels")
    kernels = ("linear_fwd", "linear_bwd_prep", "linear_bwd_dq", "linear_bwd_dkdv", "linear_state_fwd", "linear_state_bwd")
    for name in kernels:  # the prep kernel only with normalize, the state kernels only for causal walks
        if f"def {name}(" in compiled.rendered.source:
            print(f"  {name:<24} {path}")
    print(f"  {'attn_fwd_ws':<24} not used (linear attention): the Hopper forward is for softmax specs")
    if source:
        print()
        print(compiled.rendered.source)
    return 0


def _pick_device(requested: str | None, command: str | None = None) -> str:
    """The device to run on; switches the interpreter on for the CPU (before Triton loads).
    ``command``: a subcommand that runs only on a GPU (it has no ``--device``).

    Where :func:`main` is called in a process that has already imported Triton without the
    interpreter (a script or test on a GPU host), this process cannot interpret kernels, but
    the worker processes of ``fuzz --jobs N`` can (:func:`_fuzz_parallel` starts them with
    ``TRITON_INTERPRET=1``): the device stays ``cpu``, and a kernel this process runs on CPU
    tensors raises :class:`~attngen.errors.UnsupportedError` naming the fix."""
    import torch

    if command and not torch.cuda.is_available():
        raise UsageError(f"{command} times kernels and needs a CUDA GPU; on the CPU use run, zoo or fuzz")
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not config.interpret_all() and "triton" not in sys.modules:
        config.enable_interpreter()
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible; use --device cpu")
    return device


def _zoo_task(name: str, dims: dict[str, int], dtype_name: str, device: str, seed: int):
    """One zoo check (runs in a worker process); returns the error rows or the exception text."""
    import torch

    from . import compile as compile_spec
    from .check import compare, make_inputs
    from .reference import reference

    try:
        op = compile_spec(name)
        gen = torch.Generator().manual_seed(seed)
        dtype = getattr(torch, DTYPES[dtype_name])
        q, k, v, inputs = make_inputs(op.spec, dims, dtype=dtype, device=device, generator=gen)
        return compare(op, reference(op.spec), q, k, v, inputs, generator=gen), None
    except Exception as exc:  # reported in the table, never hidden
        return None, f"{type(exc).__name__}: {exc}"


def _head_dims(dims: dict[str, int]) -> str:
    """``D`` of a zoo row, or ``D_QK/D_V`` where they differ."""
    return str(dims["D_QK"]) if dims["D_QK"] == dims["D_V"] else f"{dims['D_QK']}/{dims['D_V']}"


def default_shape(device: str) -> dict[str, int]:
    """The shape ``run`` and ``zoo`` check without ``--shape``: small under Triton's
    interpreter (the CPU), the issue-sized one on a GPU."""
    if device == "cpu":
        return {"B": 2, "H": 4, "H_KV": 2, "T_Q": 100, "T_KV": 100, "D_QK": 64}
    return {"B": 2, "H": 8, "H_KV": 2, "T_Q": 1000, "T_KV": 1000, "D_QK": 128}


def _zoo(args) -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from . import resources
    from .features import TAYLOR2_MAX_DIM
    from .schema import load_spec

    device = _pick_device(args.device)
    names = args.spec or sorted(p.stem for p in resources.zoo_dir().glob("*.yaml"))
    base = args.shape or default_shape(device)
    head_dims = args.dims or [base["D_QK"]]
    taylor = {n for n in names if getattr(load_spec(n).feature_map, "kind", None) == "taylor2"}
    tasks = []
    for d in head_dims:
        for dtype_name in args.dtype:
            for name in names:
                # taylor2 expands D_QK to 1 + D + D² features: such specs project q and k to a few
                # dims (Based uses 16) and keep the full value head dim
                d_qk = min(d, 16) if name in taylor and d > TAYLOR2_MAX_DIM else d
                tasks.append((name, {**base, "D_QK": d_qk, "D_V": d}, dtype_name))
    print(f"checking {len(tasks)} cases on {device}: shape {base} with D in {head_dims}, dtypes {args.dtype}")
    ctx = multiprocessing.get_context("spawn")
    failures = 0
    header = f"{'spec':<16} {'dtype':<5} {'D':>6}  " + "  ".join(f"{n:>18}" for n in ("o", "lse", "dq", "dk", "dv")) + "  verdict"
    lines = [header]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_zoo_task, n, dims, dt, device, args.seed) for n, dims, dt in tasks]
        for (name, dims, dtype_name), fut in zip(tasks, futures):
            rows, error = fut.result()
            if error is not None:
                failures += 1
                lines.append(f"{name:<16} {dtype_name:<5} {_head_dims(dims):>6}  ERROR {error[:120]}")
                continue
            ok = all(r.ok for r in rows)
            failures += not ok
            by_name = {r.name: r for r in rows}
            cells = "  ".join(
                (f"{by_name[n].kernel_err:>8.1e}/{by_name[n].bound:<8.1e}"[:18] if n in by_name else "—").rjust(18)
                for n in ("o", "lse", "dq", "dk", "dv")
            )
            lines.append(f"{name:<16} {dtype_name:<5} {_head_dims(dims):>6}  {cells}  {'ok' if ok else 'FAIL'}")
    print("cells: kernel error / bound (max abs error against float64; bound = 4 x same-dtype reference error + floor)")
    print("\n".join(lines))
    print(f"{len(tasks) - failures} passed, {failures} failed")
    return 0 if failures == 0 else 1


def _fuzz(args) -> int:
    import time

    import yaml

    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise UsageError("attngen fuzz needs hypothesis: pip install 'attngen[fuzz]'") from None
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    device = _pick_device(args.device)
    from .check import format_rows
    from .strategies import Case, cases, run_case

    if args.replay:
        try:
            data = yaml.safe_load(open(args.replay).read())
        except OSError as exc:
            raise UsageError(f"--replay {args.replay}: {exc.strerror}") from None
        case = Case(**data)
        rows = run_case(case, device)
        print(format_rows(rows))
        ok = all(r.ok for r in rows)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    if not args.spec and not args.random:
        raise UsageError("name a SPEC to fuzz its shapes, or pass --random to draw specs too")
    if args.jobs < 1 or args.examples < 1:
        raise UsageError(f"--jobs {args.jobs}, --examples {args.examples}: both must be at least 1")
    if args.max_t is not None and args.max_t < 1:
        raise UsageError(f"--max-t {args.max_t}: the longest T_Q / T_KV drawn must be at least 1")
    spec = None
    if args.spec:  # loaded here, so a bad spec is a usage error before any worker starts
        from .schema import load_spec

        spec = load_spec(args.spec).to_dict()
    if args.jobs > 1:
        return _fuzz_parallel(args, device)
    dtypes = [DTYPES[d] for d in (args.dtype or (["bf16", "fp16"] if device == "cuda" else ["fp32"]))]
    max_t = args.max_t if args.max_t is not None else (300 if device == "cuda" else 64)
    failures: list[tuple[Case, str]] = []
    start = time.perf_counter()
    progress = Progress(TextColumn("fuzz"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                        disable=args.worker)
    task = progress.add_task("", total=args.examples)

    @settings(
        max_examples=args.examples,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate, Phase.shrink],
    )
    @hypothesis_seed(args.seed)
    @given(cases(dtypes=tuple(dtypes), max_t=max_t, spec=spec))
    def check(case):
        try:
            rows = run_case(case, device)
            problem = None if all(r.ok for r in rows) else format_rows(rows)
        except Exception as exc:  # a kernel or compiler error is a finding too
            problem = f"{type(exc).__name__}: {exc}"
            if device == "cuda" and _cuda_context_lost(exc):
                # every later call in this process fails the same way, so shrinking would
                # only find the smallest case that runs after the fault: report this one as is
                path = _write_repro(case)
                print(f"FAIL (CUDA fault; not shrunk: this process's CUDA context is lost):\n"
                      f"{yaml.safe_dump(case.to_dict(), sort_keys=False)}{problem}\nreproduction: {path}\n"
                      f"replay with: python -m attngen fuzz --replay {path} --device cuda", flush=True)
                os._exit(1)
        if not failures:
            progress.advance(task)
            if args.worker:  # the parent of --jobs counts these lines for its progress bar
                print(WORKER_TICK, flush=True)
        if problem is not None:
            failures.append((case, problem))
            progress.update(task, description=f"failure found, shrinking ({len(failures)} tries)")
            raise AssertionError(problem)

    with progress:
        try:
            check()
        except AssertionError:
            pass
    took = time.perf_counter() - start
    if not failures:
        print(f"{args.examples} examples passed in {took:.0f} s (seed {args.seed}, {device}, {', '.join(dtypes)}, T up to {max_t})")
        return 0
    case, problem = failures[-1]  # hypothesis replays the minimal failing example last
    text = yaml.safe_dump(case.to_dict(), sort_keys=False)
    path = _write_repro(case)
    print(f"FAIL after {took:.0f} s; minimal failing case:\n{text}{problem}")
    print(f"reproduction: {path}\nreplay with: python -m attngen fuzz --replay {path} --device {device}")
    return 1


WORKER_TICK = "@attngen-fuzz-example"


def _cuda_context_lost(exc: BaseException) -> bool:
    """Whether an exception is a sticky CUDA fault (illegal address, launch failure) after
    which no later CUDA call in the process can succeed."""
    text = f"{type(exc).__name__}: {exc}"
    return "AcceleratorError" in text or "illegal memory access" in text or "unspecified launch failure" in text


def _write_repro(case) -> Path:
    """Write a fuzz case as a self-contained YAML reproduction under the cache dir (atomically)."""
    import hashlib
    import json

    import yaml

    from .load import write_atomic

    text = yaml.safe_dump(case.to_dict(), sort_keys=False)
    path = config.cache_dir() / "fuzz" / f"repro-{hashlib.sha256(json.dumps(case.to_dict(), sort_keys=True).encode()).hexdigest()[:12]}.yaml"
    write_atomic(path, text)
    return path


def _fuzz_commands(args, device: str) -> list[list[str]]:
    """The worker command lines of ``fuzz --jobs N``: the examples split as evenly as they go,
    worker ``i`` seeded with ``SEED + i`` (so a run is repeated by the same seed and jobs)."""
    share, extra = divmod(args.examples, args.jobs)
    common = ["--device", device, "--worker"]
    if args.spec:
        common.insert(0, args.spec)
    if args.random:
        common.append("--random")
    if args.dtype:
        common += ["--dtype", *args.dtype]
    if args.max_t:
        common += ["--max-t", str(args.max_t)]
    return [
        [sys.executable, "-m", "attngen", "fuzz", *common, "--examples", str(share + (i < extra)), "--seed", str(args.seed + i)]
        for i in range(args.jobs)
        if share + (i < extra) > 0
    ]


def _worker_envs(device: str, n: int) -> list[dict[str, str]]:
    """The environments of ``n`` fuzz workers. CPU workers interpret the kernels: Triton reads
    ``TRITON_INTERPRET`` when it loads, so each worker gets it from the start (this process
    may have imported Triton without it). GPU workers take the visible GPUs in turn (worker
    ``i`` sees only GPU ``i mod count`` of ``CUDA_VISIBLE_DEVICES``, or of all GPUs)."""
    if device == "cpu":
        return [{**os.environ, "TRITON_INTERPRET": "1"} for _ in range(n)]
    import torch

    visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    gpus = visible or [str(i) for i in range(max(1, torch.cuda.device_count()))]
    return [{**os.environ, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(n)]


def _fuzz_parallel(args, device: str) -> int:
    """Run ``fuzz --jobs N``: N worker processes, one progress bar, each worker's report."""
    import subprocess
    import threading
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    commands = _fuzz_commands(args, device)
    start = time.perf_counter()
    progress = Progress(TextColumn(f"fuzz x{len(commands)}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        disable=not sys.stdout.isatty())
    task = progress.add_task("", total=args.examples)
    reports: list[list[str]] = [[] for _ in commands]

    plain = not sys.stdout.isatty()  # a log file gets a line per tenth instead of a live bar
    done = [0]
    lock = threading.Lock()

    def pump(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if line.strip() != WORKER_TICK:
                reports[i].append(line)
                if plain:  # shown as it comes, so a run cut short still shows what was found
                    print(f"[worker {i}] {line}", end="", flush=True)
                continue
            progress.advance(task)
            with lock:
                done[0] += 1
                if plain and done[0] % max(1, args.examples // 10) == 0:
                    print(f"fuzz: {done[0]}/{args.examples} examples passed, {time.perf_counter() - start:.0f} s", flush=True)

    envs = _worker_envs(device, len(commands))
    with progress:
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for cmd, env in zip(commands, envs)]  # fmt: skip
        threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
        for t in threads:
            t.start()
        codes = [p.wait() for p in procs]
        for t in threads:
            t.join()
    failed = [i for i, c in enumerate(codes) if c != 0]
    for i in failed:
        print(f"worker {i} (seed {args.seed + i}, exit {codes[i]})" + ("" if plain else ":\n" + "".join(reports[i])))
    took = time.perf_counter() - start
    if failed:
        print(f"FAIL: {len(failed)} of {len(commands)} workers found a failure ({took:.0f} s)")
        return 1
    dtypes = args.dtype or (["bf16", "fp16"] if device == "cuda" else ["fp32"])
    print(f"{args.examples} examples passed in {took:.0f} s ({len(commands)} processes, seeds {args.seed}..{args.seed + len(commands) - 1}, "
          f"{device}, {', '.join(dtypes)})")
    return 0


def _tune(args) -> int:
    import time

    import torch

    _pick_device("cuda", "tune")
    from . import compile as compile_spec
    from .tune import tune

    op = compile_spec(args.spec, **_params(args.param))
    _check_doc_len(args.doc_len, op.spec)
    dtype = getattr(torch, DTYPES[args.dtype])
    for dims in args.gpu_shapes:
        dims["D_V"] = dims["D_QK"]
        start = time.perf_counter()
        results = tune(op, dims, dtype, "cuda", doc_len=args.doc_len)
        print(f"{op.spec.name} {dims} {args.dtype}: {time.perf_counter() - start:.1f} s")
        if not any(r.kernel == "dq" for r in results):
            print("  dq    not tuned: this shape's backward adds dQ in the dK/dV kernel (ATTNGEN_DQ=0 keeps a dQ kernel)")
        for r in results:
            if r.cached:
                print(f"  {r.kernel:<5} cache hit: {r.best}")
                continue
            print(f"  {r.kernel:<5} best {r.best} {r.best_ms:.3f} ms; default {r.default} {r.default_ms:.3f} ms; "
                  f"speed-up {r.speedup:.2f}x; {len(r.failures)} failed, {len(r.pruned)} pruned")
            for cfg, why in r.failures:
                print(f"        failed {cfg}: {why}")
    return 0


def _print_and_write(args, default_name: str, result: dict, text: str) -> int:
    """Print a suite's Markdown; with ``--out``, also write ``NAME.json`` and ``NAME.md``
    there (atomically)."""
    import json

    from .load import write_atomic

    if args.out:
        name = args.name or default_name
        write_atomic(Path(args.out) / f"{name}.json", json.dumps(result, indent=1))
        write_atomic(Path(args.out) / f"{name}.md", text)
    print(text)
    return 0


def _bench(args) -> int:
    from . import bench

    if args.resume and not args.out:
        raise UsageError("--resume needs --out DIR: the suite's JSON there (NAME.json) says which cases are done")
    if args.blocks and args.suite != "linear":  # before the GPU check: a mistake on any machine
        raise UsageError(f"--blocks: only the linear suite forces linear-attention blocks, not --suite {args.suite}")
    _pick_device("cuda", "bench")
    if args.suite == "long":
        print(bench.long_window())
        return 0
    if args.suite == "decode":  # split-KV decoding against Flex's decoding path and the memory floor
        result = bench.decode_suite(t_kv=args.seqs[0] if args.seqs else 32768)
        return _print_and_write(args, "decode", result, bench.decode_markdown(result))
    if args.suite == "llama":  # a transformers training step per attention implementation
        from . import model_bench

        result = model_bench.training_step(t=args.seqs[0] if args.seqs else 8192)
        return _print_and_write(args, "llama", result, model_bench.markdown(result))
    if args.suite == "recompute":  # time and peak memory per recompute policy
        result = bench.recompute_table(tuple(args.seqs) if args.seqs else (1024, 4096, 16384))
        return _print_and_write(args, "recompute", result, bench.recompute_markdown(result))
    if args.suite == "ring":  # context parallelism: W GPUs at T against one at T / W
        from . import ring_bench

        result = ring_bench.ring_scaling(args.seqs[0] if args.seqs else 262_144, args.gpus)
        result["command"] = "python -m attngen " + " ".join(sys.argv[1:])
        return _print_and_write(args, "ring", result, ring_bench.report(result) + f"\n\nCommand: `{result['command']}`\n")
    if args.suite == "linear":  # linear attention against flash-linear-attention (if installed)
        from . import linear_bench

        result = linear_bench.run_linear_suite(dims=args.dims, seqs=args.seqs, blocks=args.blocks)
        result["meta"]["command"] = "python -m attngen " + " ".join(sys.argv[1:])
        return _print_and_write(args, "linear", result, linear_bench.report(result) + f"\n\nCommand: `{result['meta']['command']}`\n")
    selection = dict(variants=args.variants, dims=args.dims, seqs=args.seqs)
    if args.warm_shard:  # one worker of --warm-jobs
        i, n = (int(x) for x in args.warm_shard.split("/"))
        print(f"warmed FlexAttention for {bench.warm_flex(args.suite, shard=(i, n), **selection)} cases (shard {i}/{n})")
        return 0
    if args.warm_jobs < 0:
        raise UsageError(f"--warm-jobs {args.warm_jobs}: give a number of processes, 0 for none")
    if args.warm_jobs:
        import subprocess
        import time

        start = time.perf_counter()
        workers = [subprocess.Popen(cmd) for cmd in _warm_commands(args)]
        failed = [w.args for w in workers if w.wait() != 0]
        print(f"warm-up: {args.warm_jobs} processes, {time.perf_counter() - start:.0f} s" + (f"; {len(failed)} failed (the suite compiles what they missed)" if failed else ""))
    result = bench.run_suite(
        args.suite, out=Path(args.out) if args.out else None, variants=args.variants, dims=args.dims, seqs=args.seqs,
        command="python -m attngen " + " ".join(sys.argv[1:]), resume=args.resume, name=args.name,
    )
    print(bench.markdown(result))
    return 0


def _run(args) -> int:
    import torch

    device = _pick_device(args.device)

    from . import compile as compile_spec
    from .check import compare, format_rows, make_inputs
    from .reference import reference

    params = _params(args.param)
    op = compile_spec(args.spec, **params)
    spec = op.spec
    _check_doc_len(args.doc_len, spec)
    dims = args.shape or default_shape(device)
    dims["D_V"] = args.dv or dims["D_QK"]
    dtype = getattr(torch, DTYPES[args.dtype])
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v, inputs = make_inputs(spec, dims, dtype=dtype, device=device, generator=gen, doc_len=args.doc_len)
    print(f"spec {spec.name}" + (f": {spec.description}" if spec.description else ""))
    if spec.params:
        print("params: " + ", ".join(f"{n}={v}" for n, v in spec.params))
    print(f"shape {dims}, {args.dtype}, {device}" + (" (Triton interpreter)" if config.interpret_all() else ""))
    print(f"kernels: {op.kernel_file}")

    pairs = dims["B"] * dims["H"] * dims["T_Q"] * dims["T_KV"]
    limit = 2**28 if device == "cuda" else 2**24
    checked = pairs <= limit
    if checked:
        rows = compare(op, reference(spec), q, k, v, inputs, generator=gen)
        print(format_rows(rows))
        print("(max abs errors against a float64 reference: of the kernel, and of the reference run in the same "
              "dtype; ok when the kernel's is within bound = 4 x the reference's + a per-dtype floor)")
        ok = all(r.ok for r in rows)
    else:
        print(f"reference skipped: {pairs:,} score pairs is over the dense reference's limit of {limit:,}")
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o = op(*leaves)
        grads = torch.autograd.grad(o, leaves, torch.randn_like(o))
        ok = all(bool(torch.isfinite(t).all()) for t in (o, *grads))
        print(f"kernels ran forward and backward; outputs and gradients {'finite' if ok else 'NOT finite'}")
    if device == "cuda" and not args.no_time:
        from .timing import time_against_sdpa

        print(time_against_sdpa(op, q, k, v, inputs))
    if not checked:
        print("NOT CHECKED against the reference" + ("" if ok else "; FAIL: non-finite values"))
    else:
        print("PASS" if ok else "FAIL")
    return 0 if ok else 1
