"""Autotuning: choose each kernel's tile config for the GPU at hand, and keep the choice in a
persistent, per-GPU cache.

The search space is the spec's ``tiles`` (``block_q``, ``block_kv``, ``num_warps``,
``num_stages``), pruned before anything compiles: shared-memory and register estimates
against the device's limits, and head-dim fit. A candidate that fails to compile or launch
scores infinity and is reported; if every one fails, :class:`~attngen.TuneError` lists why.

Cache entries are JSON files, one per key, under ``<cache dir>/tune/``. The key hashes the
spec, the rendered kernel source, the GPU's name and compute capability, the Triton and
attngen versions, the kernel, and a shape bucket (the longer of ``T_Q`` and ``T_KV`` rounded
up to a power of two, the head dims, the dtype and the GQA group size). Writes are atomic
(temporary file and rename) under a file lock, so concurrent tuners never leave a torn file;
a corrupt or foreign file is ignored with a warning and rewritten by the next tune.
Calls with no cached config use :func:`attngen.tiles.default_config`; tuning happens only
when asked (``attngen.compile(spec, autotune=True)`` or ``python -m attngen tune``).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from . import config
from .errors import TuneError, UnsupportedError
from .schema import BLOCK_SIZES, WARPS
from .tiles import LaunchConfig, default_config, head_blocks

if TYPE_CHECKING:
    from .op import AttentionOp

KERNELS = ("fwd", "dq", "dkdv")
FORMAT = "attngen-tune-1"
#: fp32 accumulator values one thread may hold before the compiler spills (estimate). 192:
#: the dK/dV configs the H200 ran fastest at D = 128, (64, 128, 8, 3) and (64, 64, 4, 2), hold
#: 192 by this count (docs/benchmarks/h200-config-sweep-s7.txt), and are the defaults
MAX_ACC_PER_THREAD = 192


@dataclass(frozen=True)
class DeviceInfo:
    """What pruning and cache keys need to know of the device."""

    name: str
    capability: str
    shared_memory: int  # bytes a block may use
    sm_count: int

    @classmethod
    def of(cls, device: torch.device | str) -> "DeviceInfo":
        device = torch.device(device)
        if device.type != "cuda":
            return cls("triton-interpreter", "cpu", 228 * 1024, 1)
        return _cuda_info(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _cuda_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 48 * 1024)
    return DeviceInfo(props.name, f"{props.major}.{props.minor}", int(smem), props.multi_processor_count)


def shape_bucket(dims: dict[str, int], dtype: torch.dtype) -> dict[str, Any]:
    """The shape key of a call: lengths rounded up to a power of two, exact head dims, dtype,
    GQA group size."""
    t = max(dims["T_Q"], dims["T_KV"])
    return {
        "T": 1 << max(0, (t - 1).bit_length()),
        "D_QK": dims["D_QK"],
        "D_V": dims["D_V"],
        "dtype": str(dtype).replace("torch.", ""),
        "group": dims["H"] // dims["H_KV"],
    }


def cache_key(spec_digest: str, source_digest: str, device: DeviceInfo, kernel: str, bucket: dict) -> str:
    """The hex key of one cache entry."""
    import triton

    from . import __version__

    payload = {
        "format": FORMAT,
        "spec": spec_digest,
        "source": source_digest,
        "gpu": device.name,
        "capability": device.capability,
        "triton": triton.__version__,
        "attngen": __version__,
        "kernel": kernel,
        "bucket": bucket,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class TuneCache:
    """Tuned configs on disk, one JSON file per key.

    Args:
        root: the folder; default ``<cache dir>/tune``.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else config.cache_dir() / "tune"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> LaunchConfig | None:
        """The cached config, or None if absent; a corrupt or foreign file warns and reads as
        absent (the next :meth:`put` rewrites it)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
                raise ValueError("not an attngen tuning entry for this key")
            cfg = LaunchConfig(**data["config"])
            legal = (
                cfg.block_q in BLOCK_SIZES and cfg.block_kv in BLOCK_SIZES
                and cfg.num_warps in WARPS and isinstance(cfg.num_stages, int) and 1 <= cfg.num_stages <= 8
            )  # fmt: skip
            if not legal:
                raise ValueError(f"config {cfg} is not a legal tile config")
            return cfg
        except (OSError, ValueError, TypeError, KeyError) as exc:
            warnings.warn(f"ignoring unreadable tuning cache file {path}: {exc}; it will be rewritten", stacklevel=2)
            return None

    def put(self, key: str, cfg: LaunchConfig, record: dict | None = None) -> Path:
        """Write an entry atomically under a file lock; return its path."""
        from filelock import FileLock

        from .load import write_atomic

        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"format": FORMAT, "key": key, "config": asdict(cfg), **(record or {})}
        with FileLock(str(path) + ".lock"):
            write_atomic(path, json.dumps(body, indent=1, sort_keys=True))
        return path


def estimate(kernel: str, cfg: LaunchConfig, d_qk: int, d_v: int, dtype: torch.dtype) -> tuple[int, float]:
    """Shared memory (bytes) and fp32 accumulator values per thread of one config
    (``dkdv_dq``: the dK/dV kernel that also forms each tile's dQ share)."""
    elem = torch.finfo(dtype).bits // 8
    bdqk, bdv = head_blocks(d_qk, d_v)
    stages = max(1, cfg.num_stages)
    threads = 32 * cfg.num_warps
    if kernel == "fwd":
        smem = elem * (cfg.block_q * bdqk + stages * cfg.block_kv * (bdqk + bdv))
        acc = cfg.block_q * (bdv + cfg.block_kv)
    elif kernel == "dq":
        smem = elem * (cfg.block_q * (bdqk + bdv) + stages * cfg.block_kv * (bdqk + bdv))
        acc = cfg.block_q * (bdqk + 2 * cfg.block_kv)
    else:  # dkdv, dkdv_dq
        smem = elem * (cfg.block_kv * (bdqk + bdv) + stages * cfg.block_q * (bdqk + bdv))
        acc = cfg.block_kv * (bdqk + bdv + 2 * cfg.block_q) + (cfg.block_q * bdqk if kernel == "dkdv_dq" else 0)
    return smem, acc / threads


def candidates(kernel: str, tiles, d_qk: int, d_v: int, dtype: torch.dtype, device: DeviceInfo):
    """The spec's tile space for one kernel, pruned.

    Returns:
        ``(kept, pruned)``: configs to try, and ``(config, reason)`` for those dropped.
    """
    kept, pruned = [], []
    for bq, bkv, warps, stages in itertools.product(tiles.block_q, tiles.block_kv, tiles.num_warps, tiles.num_stages):
        cfg = LaunchConfig(bq, bkv, warps, stages)
        smem, acc = estimate(kernel, cfg, d_qk, d_v, dtype)
        if smem > device.shared_memory:
            pruned.append((cfg, f"needs about {smem // 1024} KiB of shared memory, the device has {device.shared_memory // 1024}"))
        elif acc > MAX_ACC_PER_THREAD:
            pruned.append((cfg, f"about {acc:.0f} fp32 accumulators per thread would spill registers"))
        else:
            kept.append(cfg)
    return kept, pruned


@dataclass(frozen=True)
class KernelResult:
    kernel: str
    best: LaunchConfig
    best_ms: float
    default: LaunchConfig
    default_ms: float
    failures: tuple[tuple[LaunchConfig, str], ...]
    pruned: tuple[tuple[LaunchConfig, str], ...]
    cached: bool

    @property
    def speedup(self) -> float:
        return self.default_ms / self.best_ms if self.best_ms and math.isfinite(self.default_ms) else float("nan")


def tune(
    op: "AttentionOp",
    dims: dict[str, int],
    dtype: torch.dtype,
    device: torch.device | str = "cuda",
    *,
    timer: Callable[[Callable[[], Any]], float] | None = None,
    cache: TuneCache | None = None,
    kernels: Iterable[str] = KERNELS,
    progress: bool = True,
    generator: torch.Generator | None = None,
    doc_len: int | None = None,
) -> list[KernelResult]:
    """Tune ``op``'s kernels for one shape bucket on ``device`` and cache the winners.

    Args:
        op: an :class:`~attngen.op.AttentionOp`.
        dims: ``B, H, H_KV, T_Q, T_KV, D_QK, D_V`` of a representative call.
        dtype: float16, bfloat16 or float32.
        timer: ``timer(fn) -> ms``; default ``triton.testing.do_bench`` median. Tests inject one.
        cache: default :class:`TuneCache` under the cache dir.
        doc_len: integer runtime inputs (document ids) as runs of this many tokens, so that a
            data-dependent mask is tuned on the sparsity it will see; default random runs
            (see :func:`attngen.check.make_inputs`).

    Returns:
        One result per kernel: the winner, its time, the default config's time, failures.
        The kernels tuned are those that a call of this shape runs by default: those that
        write and read P where the spec stores P at these lengths
        (:meth:`~attngen.op.AttentionOp.stores_p`), and the backward that
        :meth:`~attngen.op.AttentionOp.dq_mode` picks without input gradients. Where it fuses
        dQ, ``dkdv`` is tuned as ``dkdv_dq`` (the fused kernel, with the dQ share in its
        register estimate) and ``dq`` gets no result, since no dQ kernel runs.

    Raises:
        TuneError: every candidate of a kernel failed (the message lists each reason).
        UnsupportedError: a linear-attention op (its kernels have no tuner yet).
    """
    if getattr(op.spec, "normalizer", None) == "linear":
        raise UnsupportedError(f"tune: spec {op.spec.name!r} is linear attention, whose kernels have no tuner yet; "
                               "set its chunk with tiles.chunk in the spec")
    from .check import make_inputs
    from .timing import bench

    timer = timer or bench
    cache = cache or TuneCache()
    info = DeviceInfo.of(device)
    bucket = shape_bucket(dims, dtype)
    runs: dict[str, Callable[[], Any]] = {}

    def make_runs() -> None:
        # inputs only once some kernel misses the cache, so that a full hit returns at once
        gen = generator or torch.Generator().manual_seed(0)
        q, k, v, inputs = make_inputs(op.spec, dims, dtype=dtype, device=device, generator=gen, doc_len=doc_len)
        ordered = [inputs[i.name] for i in op.spec.inputs]
        o, lse, p = op.forward_impl(q, k, v, ordered, want_p=True)  # p: None unless stored
        do = torch.randn_like(o)
        # with stored P the calls run the kernels that write and read P: time those
        runs["fwd"] = lambda: op.forward_impl(q, k, v, ordered, want_p=stored_p)
        runs["dq"] = runs["dkdv"] = runs["dkdv_dq"] = lambda: op.backward_impl(do, None, q, k, v, o, lse, ordered, p=p)

    stored_p = op.stores_p(dims["T_Q"], dims["T_KV"])
    fused_dq = op.dq_mode(dims["D_QK"], dims["D_V"], torch.device(device), stored_p=stored_p) != 0
    results = []
    for kernel in kernels:
        if kernel == "dq" and fused_dq:
            continue
        if kernel == "dkdv" and fused_dq:
            kernel = "dkdv_dq"
        key = cache_key(op.plan.spec_digest, op.source_digest, info, kernel, bucket)
        default = default_config(kernel, max(dims["D_QK"], dims["D_V"]), dtype,
                                 0 if info.capability == "cpu" else info.shared_memory, op.mask_class)
        hit = cache.get(key)
        if hit is not None:
            op.set_config(kernel, bucket, hit)
            results.append(KernelResult(kernel, hit, float("nan"), default, float("nan"), (), (), True))
            continue
        if not runs:
            make_runs()
        kept, pruned = candidates(kernel, op.spec.tiles, dims["D_QK"], dims["D_V"], dtype, info)
        if default not in kept:
            kept.append(default)
        times: dict[LaunchConfig, float] = {}
        failures = []
        iterator = kept
        bar = None
        if progress:
            from rich.progress import Progress

            bar = Progress(transient=True)
            bar.start()
            task = bar.add_task(f"tuning {op.spec.name}:{kernel}", total=len(kept))
        try:
            for cfg in iterator:
                op.set_config(kernel, bucket, cfg)
                try:
                    ms = float(timer(runs[kernel]))
                    if not math.isfinite(ms) or ms <= 0:
                        raise RuntimeError(f"the timer returned {ms} ms")
                    times[cfg] = ms
                except Exception as exc:  # a config that fails to compile or launch
                    times[cfg] = math.inf
                    failures.append((cfg, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
                if bar is not None:
                    bar.advance(task)
        finally:
            if bar is not None:
                bar.stop()
            op.clear_config(kernel, bucket)
        best = min(times, key=times.get)
        if not math.isfinite(times[best]):
            listed = "; ".join(f"{c}: {why}" for c, why in failures + pruned)
            raise TuneError(f"every config of {op.spec.name}:{kernel} failed: {listed}")
        cache.put(key, best, {"ms": times[best], "default_ms": times.get(default), "bucket": bucket, "gpu": info.name})
        op.set_config(kernel, bucket, best)
        results.append(KernelResult(kernel, best, times[best], default, times.get(default, math.inf), tuple(failures), tuple(pruned), False))
    return results
