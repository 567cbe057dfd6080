"""``python -m attngen bench --suite ring``: context-parallel attention over several GPUs
against one GPU (time, peak memory per GPU, scaling efficiency).

One process per GPU (``torch.multiprocessing``, NCCL). Times are medians over timed
iterations of a forward+backward step, each between two barriers so the slowest rank sets
it. The single-GPU baseline runs the same spec with plain ``op`` at ``T / W`` tokens.
Scaling efficiency compares per-GPU throughput of kept pairs: ``(pairs(T) / (W · t_W)) /
(pairs(T / W) / t_1)``; 1.0 means W GPUs do W times the work of one in the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
from pathlib import Path

from .timing import wall_times


def _pairs(spec_name: str, t: int, params: dict) -> float:
    """Kept (query, key) pairs of a causal-family mask at length ``t`` (closed form)."""
    from .tilemap import tile_counts

    c = tile_counts(spec_name, t, t, 1024, 1024, params)
    return float(c.visible_pairs if c.visible_pairs is not None else t * t)


def _worker(rank: int, world: int, cfg: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    import attngen
    from attngen.distributed import context_parallel, shard_sequence

    device = cfg["device"]
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"  # explicit everywhere: tensors, the generator, NCCL's device
    backend = "nccl" if device != "cpu" else "gloo"
    if world > 1:
        # a bound device (device_id) makes NCCL set up its communicator on this rank's GPU
        # at once, instead of guessing it from the rank at the first collective
        bound = {"device_id": torch.device(device)} if device != "cpu" else {}
        dist.init_process_group(backend, init_method=cfg["init"], rank=rank, world_size=world, **bound)
    dtype = getattr(torch, cfg["dtype"])
    op = attngen.compile(cfg["spec"], **cfg["params"])
    t, b, h, d = cfg["t"], cfg["b"], cfg["h"], cfg["d"]
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (b, h, t, d)
    if world == 1:  # the baseline: one GPU, plain attngen
        q, k, v, do = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(4))
    else:  # each rank draws the whole sequence's tensors from one seed, keeps its shard
        q, k, v, do = (shard_sequence(torch.randn(shape, device=device, dtype=dtype, generator=gen), world, rank) for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def step():
        o = op(*leaves) if world == 1 else context_parallel(op, *leaves)
        torch.autograd.grad(o, leaves, do)

    barrier = (lambda: dist.barrier()) if world > 1 else (lambda: None)
    kind = "cpu" if device == "cpu" else "cuda"
    wall_times(step, cfg["warmup"], kind, before=barrier, after=barrier)
    if kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = wall_times(step, cfg["iters"], kind, before=barrier, after=barrier)
    peak = torch.cuda.max_memory_allocated() if kind == "cuda" else 0
    Path(f"{out}.{rank}").write_text(json.dumps({"rank": rank, "ms": statistics.median(times), "peak_bytes": peak}))
    if world > 1:
        dist.destroy_process_group()


@contextlib.contextmanager
def interpreted_children(device: str):
    """Start processes for CPU work with ``TRITON_INTERPRET=1`` in their environment.

    CPU tensors run under Triton's interpreter, which Triton fixes when it is first imported,
    so the variable must be there when a spawned process starts (before it unpickles its
    target, which may import Triton). This process may be a GPU one that imported Triton
    without it: the variable is set only while the children start (spawn them with
    ``join=False`` inside the block), then restored."""
    if device != "cpu":
        yield
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def _launch(world: int, cfg: dict) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        cfg = {**cfg, "init": f"file://{tmp}/rendezvous"}
        with interpreted_children(cfg["device"]):
            ranks = mp.spawn(_worker, args=(world, cfg, f"{tmp}/result"), nprocs=world, join=False)
        while not ranks.join():
            pass
        return [json.loads(Path(f"{tmp}/result.{r}").read_text()) for r in range(world)]


def ring_scaling(t: int = 262_144, world: int = 2, *, spec: str = "causal", params: dict | None = None, b: int = 1, h: int = 8,
                 d: int = 128, dtype: str = "bfloat16", device: str = "cuda", warmup: int = 2, iters: int = 5) -> dict:
    """Forward+backward of ``spec`` at ``t`` tokens over ``world`` processes (one GPU each)
    against one process at ``t // world`` tokens; returns times, peak memory and efficiency.

    Raises:
        ValueError: fewer GPUs visible than ``world`` (on ``device="cuda"``).
    """
    import torch

    if device == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"--gpus {world}: only {torch.cuda.device_count()} CUDA devices are visible")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (KINDS.md)
    params = params or {}
    cfg = dict(spec=spec, params=params, t=t, b=b, h=h, d=d, dtype=dtype, device=device, warmup=warmup, iters=iters)
    one = {**_launch(1, {**cfg, "t": t // world})[0], "t": t // world}
    many = _launch(world, cfg)
    t_many = max(r["ms"] for r in many)
    efficiency = (_pairs(spec, t, params) / (world * t_many)) / (_pairs(spec, t // world, params) / one["ms"])
    return {"spec": spec, "params": params, "B": b, "H": h, "D": d, "dtype": dtype, "device": device, "world": world,
            "one_gpu": one, "ranks": many, "t": t, "ms": t_many, "efficiency": round(efficiency, 3)}


def report(result: dict) -> str:
    """A Markdown summary of :func:`ring_scaling`'s result."""
    one, gib = result["one_gpu"], 2**30
    lines = [f"{result['spec']} {result['params'] or ''}, B={result['B']}, H={result['H']}, D={result['D']}, {result['dtype']}, "
             "forward+backward, median of the timed steps",
             "", "| run | T | time (ms) | peak memory per GPU (GiB) |", "|---|---|---|---|",
             f"| 1 GPU | {one['t']} | {one['ms']:.1f} | {one['peak_bytes'] / gib:.2f} |"]
    for r in result["ranks"]:
        lines.append(f"| {result['world']} GPUs, rank {r['rank']} | {result['t']} | {r['ms']:.1f} | {r['peak_bytes'] / gib:.2f} |")
    lines += ["", f"Scaling efficiency (per-GPU throughput of kept pairs, {result['world']} GPUs at T={result['t']} "
              f"against 1 GPU at T={one['t']}): {result['efficiency']:.3f}"]
    return "\n".join(lines)
