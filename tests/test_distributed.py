"""Context parallelism (ring attention) with two gloo processes on the CPU, against attngen
on one process: forward and every gradient, for causal, sliding window and document masks.

The gloo ranks run the kernels under Triton's interpreter, also on a GPU host (whose test
process imported Triton for the GPU): they start with ``TRITON_INTERPRET=1`` in their
environment, and every kernel access they make is checked by the address sanitizer."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attngen.distributed import block_visible, chunks, shard_sequence
from attngen.ring_bench import interpreted_children
from helpers import INTERPRETER_BROKEN

needs_gloo = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
needs_interpreter = pytest.mark.skipif(INTERPRETER_BROKEN is not None, reason=str(INTERPRETER_BROKEN))


def _spawn(fn, args, nprocs):
    """Run CPU ranks: processes that start under Triton's interpreter."""
    with interpreted_children("cpu"):
        ranks = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    while not ranks.join():
        pass

T, B, H, H_KV, D = 64, 1, 2, 1, 16
CASES = [("causal", {}, "zigzag"), ("sliding_window", {"window": 20}, "zigzag"),
         ("document", {}, "zigzag"), ("causal", {}, "contiguous"),
         ("prefix_lm", {"prefix": 20}, "zigzag"),  # an absolute key position: k < 20
         ("alibi", {}, "zigzag")]  # a score read at h and q - k  # fmt: skip


def _worker(rank: int, world: int, init: str, results: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set before this process imported anything
    from sanitizer import sanitized

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    lines = []
    with sanitized(strict=True) as log:  # any kernel access outside its tensor arguments raises
        for name, params, layout in CASES:
            lines += _ring_errors(name, params, layout, world, rank)
    lines.append(f"launches {len(log.launches)}")
    dist.destroy_process_group()
    with open(f"{results}.{rank}", "w") as f:
        f.write("\n".join(lines))


def _ring_errors(name, params, layout, world, rank) -> list[str]:
    """This rank's max error of the ring against one process, per output and gradient."""
    import attngen
    from attngen.distributed import context_parallel, gather_sequence

    op = attngen.compile(name, **params)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=gen)
    k, v = (torch.randn(B, H_KV, T, D, generator=gen) for _ in range(2))
    do = torch.randn(B, H, T, D, generator=gen)
    inputs = {"document": {"doc": (torch.arange(T) // 23).to(torch.int32).expand(B, T).contiguous()},
              "alibi": {"slopes": torch.tensor([0.5, 0.125])}}.get(name, {})
    # one process, whole sequence: the result to match
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = op(*leaves, return_lse=True, **inputs)
    o_ref.backward(do)
    # this rank's shard, through the ring
    local = [shard_sequence(x, world, rank, layout).requires_grad_() for x in (q, k, v)]
    o, lse = context_parallel(op, *local, layout=layout, return_lse=True, **inputs)
    o.backward(shard_sequence(do, world, rank, layout))
    got = {"o": gather_sequence(o.detach(), layout=layout), "lse": gather_sequence(lse.detach(), layout=layout),
           "dq": gather_sequence(local[0].grad, layout=layout), "dk": gather_sequence(local[1].grad, layout=layout),
           "dv": gather_sequence(local[2].grad, layout=layout)}
    want = {"o": o_ref, "lse": lse_ref, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    return [f"{rank} {name} {layout} {key} {(got[key] - want[key].detach()).abs().max().item():.3e}" for key in got]


def _single_rank(rank: int, init: str, results: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import attngen
    from attngen.distributed import context_parallel
    from attngen.errors import UnsupportedError

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=1)
    op = attngen.compile("causal")
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 16, 16, generator=gen) for _ in range(3))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    context_parallel(op, *leaves).sum().backward()  # a ring of one: no transfer to itself
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    op(*ref).sum().backward()
    errs = [(a.grad - b.grad).abs().max().item() for a, b in zip(leaves, ref)]
    alibi = attngen.compile("alibi")
    try:
        context_parallel(alibi, q, k, v, slopes=torch.tensor([0.5], requires_grad=True))
        msg = "no error"
    except UnsupportedError as exc:
        msg = str(exc)
    dist.destroy_process_group()
    with open(results, "w") as f:
        f.write(f"{max(errs)}\n{msg}")


@needs_gloo
@needs_interpreter
def test_a_ring_of_one_rank_gives_one_process_gradients_and_learnable_inputs_are_refused_clearly(tmp_path):
    results = str(tmp_path / "one")
    _spawn(_single_rank, (f"file://{tmp_path / 'rendezvous'}", results), 1)
    err, msg = open(results).read().split("\n", 1)
    assert float(err) < 1e-6
    assert "slopes requires grad" in msg and "slopes.detach()" in msg


@needs_gloo
@needs_interpreter
def test_ring_attention_on_two_gloo_ranks_matches_one_process(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    results = str(tmp_path / "errors")
    _spawn(_worker, (2, init, results), 2)
    for rank in range(2):
        *rows, launches = open(f"{results}.{rank}").read().splitlines()
        assert int(launches.split()[1]) > 0  # the sanitizer saw the kernels
        assert len(rows) == len(CASES) * 5
        for row in rows:
            *what, err = row.split()
            assert float(err) < 2e-5, row  # float32, same kernels: only the merge order differs


def test_zigzag_chunks_cover_the_sequence_once_and_balance_causal_work():
    t, world = 64, 4
    owned = sorted(p for r in range(world) for s, n in chunks(t, world, r) for p in range(s, s + n))
    assert owned == list(range(t))
    # causal pairs per rank: equal under zigzag, unequal when contiguous
    def work(layout):
        return [sum(p + 1 for s, n in chunks(t, world, r, layout) for p in range(s, s + n)) for r in range(world)]
    assert len(set(work("zigzag"))) == 1 and len(set(work("contiguous"))) == world
    x = torch.arange(t).view(1, 1, t, 1)
    assert shard_sequence(x, world, 1).flatten().tolist() == list(range(8, 16)) + list(range(48, 56))


def test_chunks_reject_a_length_the_layout_cannot_split():
    from attngen.errors import ShapeError

    with pytest.raises(ShapeError, match="multiple of 8"):
        chunks(100, 4, 0, "zigzag")
    with pytest.raises(ValueError, match="layout"):
        chunks(64, 4, 0, "striped")


def test_blocks_in_a_causal_future_are_skipped_in_closed_form():
    import attngen

    causal = attngen.compile("causal")
    assert block_visible(causal, 32, 16, 0, 16)          # keys before the queries
    assert block_visible(causal, 16, 16, 16, 16)         # the diagonal block
    assert not block_visible(causal, 0, 16, 16, 16)      # keys after every query: skipped
    window = attngen.compile("sliding_window", window=8)
    assert not block_visible(window, 48, 16, 0, 16)      # further back than the window reaches
    assert block_visible(window, 16, 16, 0, 16)          # the window reaches 7 back from 16
    doc = attngen.compile("document")                    # reads document ids: decided by the kernels
    assert block_visible(doc, 48, 16, 0, 16) and not block_visible(doc, 0, 16, 32, 16)


def test_context_parallel_without_a_process_group_says_how_to_start_one():
    import attngen
    from attngen.distributed import context_parallel
    from attngen.errors import UnsupportedError

    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(UnsupportedError, match="init_process_group"):
        context_parallel(attngen.compile("causal"), q, q, q)


@needs_gloo
@needs_interpreter
def test_ring_scaling_benchmark_runs_end_to_end_on_gloo():
    # the GPU benchmark's code path (spawned ranks, barriers, the one-process baseline),
    # here on the CPU with two gloo ranks and a tiny causal sequence
    from attngen.ring_bench import report, ring_scaling

    result = ring_scaling(32, 2, h=1, d=16, dtype="float32", device="cpu", warmup=0, iters=1)
    assert result["one_gpu"]["t"] == 16 and result["t"] == 32 and len(result["ranks"]) == 2
    assert all(r["ms"] > 0 for r in result["ranks"]) and result["efficiency"] > 0
    assert "Scaling efficiency" in report(result)
