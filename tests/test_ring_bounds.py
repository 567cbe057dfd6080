"""Every memory access of the kernel calls that ring attention (context parallelism) makes is
in bounds: the sharded calls (a key offset, queries and keys placed at global positions,
views of a rank's shard and of a received block) run under Triton's interpreter with an
address sanitizer (tests/sanitizer.py) that fails on any active lane outside the element
set of the kernel's tensor arguments as viewed.

The ring is run in one process: the real ``_RingAttention`` forward and backward of each
rank, with the transfer replaced by a stand-in that hands over what the previous rank would
send (the next owner's shard, in a fresh contiguous buffer); gradient accumulators arrive as
zeros, whose values no kernel reads. So the kernels see exactly the arguments that
``context_parallel`` gives them on each rank: the same shards, offsets, views and strides.
The bfloat16 and head-dim-128 cases use the default launch configs of the GPU run that
faulted (``python -m attngen bench --suite ring``).
"""

import pytest
import torch

import attngen
from attngen import distributed
from attngen.distributed import shard_sequence
from helpers import DEVICE
from sanitizer import OutOfBounds, sanitized

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the address sanitizer needs Triton's interpreter (CPU)")


def _ring_for(k, v, world, rank, layout):
    """A ``_Ring`` stand-in for ``rank``: hop n delivers owner ``rank - n``'s keys and values."""

    class Ring:
        def __init__(self, group):
            self.hops = 0

        def start(self, tensors, tag=0):
            if tag == 0:  # keys and values: the block the previous rank holds now
                self.hops += 1
                owner = (rank - self.hops) % world
                return [], [shard_sequence(x, world, owner, layout) for x in (k, v)]
            return [], [torch.zeros_like(t) for t in tensors]  # dK/dV accumulators

        @staticmethod
        def wait(requests):
            pass

    return Ring


def run_ring_ranks(op, q, k, v, do, inputs, world, layout, monkeypatch):
    """Forward and backward of every rank's ``_RingAttention`` in this process."""
    t = q.shape[2]
    ordered = list(inputs.values())
    for rank in range(world):
        monkeypatch.setattr(distributed, "_Ring", _ring_for(k, v, world, rank, layout))
        local = [shard_sequence(x, world, rank, layout).requires_grad_() for x in (q, k, v)]
        o, _ = distributed._RingAttention.apply(*local, op, None, layout, t, world, rank, *ordered)
        o.backward(shard_sequence(do, world, rank, layout))


CASES = [
    # spec, params, layout, world, T, D, dtype: shards several tiles long, some ending in a partial tile
    ("causal", {}, "zigzag", 2, 800, 128, torch.bfloat16),
    ("sliding_window", {"window": 150}, "zigzag", 2, 800, 128, torch.bfloat16),
    ("document", {}, "zigzag", 2, 800, 64, torch.float16),
    ("causal", {}, "contiguous", 2, 520, 16, torch.float32),
    ("document", {}, "zigzag", 4, 520, 16, torch.float32),
    ("sliding_window", {"window": 37}, "contiguous", 4, 520, 24, torch.float32),
]


@pytest.mark.parametrize("name, params, layout, world, t, d, dtype", CASES,
                         ids=[f"{c[0]}-{c[2]}-w{c[3]}-t{c[4]}-d{c[5]}-{str(c[6])[6:]}" for c in CASES])
def test_every_ring_kernel_access_is_in_bounds(name, params, layout, world, t, d, dtype, monkeypatch):
    op = attngen.compile(name, **params)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, t, d, generator=gen).to(dtype)
    k, v = (torch.randn(1, 1, t, d, generator=gen).to(dtype) for _ in range(2))
    do = torch.randn(1, 2, t, d, generator=gen).to(dtype)
    inputs = {"doc": (torch.arange(t) // 97).to(torch.int32)[None]} if name == "document" else {}
    with sanitized(strict=True) as log:
        run_ring_ranks(op, q, k, v, do, inputs, world, layout, monkeypatch)
    kernels = set(log.launches)
    # dQ: a kernel of its own at D = 128 (mask known at compile time), else added by the dK/dV
    # kernel's atomics into a float32 buffer that attn_bwd_dq_convert casts
    dq = "attn_bwd_dq" if op.dq_mode(d, d, q.device) == 0 else "attn_bwd_dq_convert"
    assert {"attn_fwd", "attn_bwd_dkdv", dq, "attn_bwd_preprocess"} <= kernels, kernels
    if name == "document":  # the tile-metadata kernels ran too
        assert any(k.startswith("attn_tile_ranges") for k in kernels), kernels
    assert log.lanes > 0


def test_the_sanitizer_catches_a_read_one_past_a_view():
    # a negative control: without it, the test above could pass with the checks switched off
    import triton
    import triton.language as tl

    @triton.jit
    def copy(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)

    buf = torch.arange(64.0)
    x, y = buf[8:24], torch.empty(16)
    with sanitized(strict=True):
        copy[(1,)](x, y, 16, BLOCK=32)  # in bounds
        with pytest.raises(Exception, match=r"OutOfBounds.*load in copy: 1 of 17 active lanes.*X\[16\] \+64 B"):
            copy[(1,)](x, y, 17, BLOCK=32)  # element 16 of a 16-element view: mapped memory, still out
    with sanitized(strict=False):
        copy[(1,)](x, y, 16, BLOCK=32)
        with pytest.raises(Exception, match="OutOfBounds.*store in copy"):
            copy[(1,)](x, y, 17, BLOCK=32)  # Y has no 17th element in its storage
    assert issubclass(OutOfBounds, AssertionError)
