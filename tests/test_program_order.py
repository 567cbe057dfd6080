"""Longest programs first (attngen.tilemap.query_tile_order, the macro program_order): which
masks reorder their query grids, that every order still visits each (tile, head, batch
entry) exactly once, and that reordered kernels compute what the launch order computes."""

import pytest
import torch
import triton
import triton.language as tl

import attngen
from attngen.check import make_inputs
from attngen.tilemap import FIRST_TILE_FIRST, LAST_TILE_FIRST, LAUNCH_ORDER
from helpers import DEVICE, dims, needs_kernels

_program_order = None  # the rendered helper under test, set before each launch


@triton.jit
def _probe(OUT, SPAN, ORDER: tl.constexpr, POS_BYTES: tl.constexpr):
    tile, head, batch = _program_order(ORDER, SPAN, POS_BYTES)
    lin = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    tl.store(OUT + lin * 3, tile)
    tl.store(OUT + lin * 3 + 1, head)
    tl.store(OUT + lin * 3 + 2, batch)


#: keys at or after the query: the first query tiles visit the most key tiles
ANTI_CAUSAL = {"name": "anti_causal", "mask": "k >= q"}


@pytest.mark.parametrize("spec, order", [
    ("causal", LAST_TILE_FIRST),  # query tile i visits i + 1 key tiles
    ("prefix_lm", LAST_TILE_FIRST),
    (ANTI_CAUSAL, FIRST_TILE_FIRST),
    ("dense", LAUNCH_ORDER),  # every program the same length
    ("longformer", LAUNCH_ORDER),  # a band: the same length but at the ends
    ("document", LAUNCH_ORDER),  # classified from runtime inputs
])
def test_masks_whose_later_tiles_hold_more_work_run_them_first(spec, order):
    assert attngen.compile(spec).query_tile_order == order


@needs_kernels
@pytest.mark.parametrize("order", [LAUNCH_ORDER, FIRST_TILE_FIRST, LAST_TILE_FIRST])
@pytest.mark.parametrize("span, group", [(87381, 3), (1, 8), (10 ** 6, 1)])
def test_every_order_visits_each_program_once(order, span, group):
    """3 tiles x 4 heads x 2 batch entries; 32 bytes per position and an 8 MiB budget make
    groups of 3 heads (the last group short), of all 8, or of 1."""
    global _program_order
    _program_order = attngen.compile("specs/causal.yaml").module._program_order
    n_tiles, n_heads, n_batch = 3, 4, 2
    out = torch.full((n_tiles * n_heads * n_batch, 3), -1, dtype=torch.int32, device=DEVICE)
    _probe[(n_tiles, n_heads, n_batch)](out, span, ORDER=order, POS_BYTES=32)
    got = [tuple(r) for r in out.tolist()]
    every = {(t, h, b) for t in range(n_tiles) for h in range(n_heads) for b in range(n_batch)}
    assert sorted(got) == sorted(every)  # a bijection onto the grid
    if order == LAUNCH_ORDER:
        assert got == [(t, h, b) for b in range(n_batch) for h in range(n_heads) for t in range(n_tiles)]
        return
    heads = [b * n_heads + h for _, h, b in got]
    want = []  # groups of `group` heads in turn; within one, tile by tile across its heads
    for first in range(0, n_heads * n_batch, group):
        members = list(range(first, min(first + group, n_heads * n_batch)))
        tiles = range(n_tiles) if order == FIRST_TILE_FIRST else reversed(range(n_tiles))
        want += [(t, hb) for t in tiles for hb in members]
    assert list(zip((t for t, _, _ in got), heads)) == want


@needs_kernels
@pytest.mark.parametrize("spec", ["causal", "prefix_lm", ANTI_CAUSAL])
def test_reordered_kernels_match_the_launch_order(spec, monkeypatch):
    monkeypatch.setenv("ATTNGEN_POISON", "1")  # a row no program writes stays NaN
    op = attngen.compile(spec)
    assert op.query_tile_order != LAUNCH_ORDER
    shape = dims(B=2, H=3, H_KV=3, T_Q=40, T_KV=40)
    q, k, v, inputs = make_inputs(op.spec, shape, dtype=torch.float32, device=DEVICE, generator=torch.Generator().manual_seed(0))

    def run():
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        o = op(qq, kk, vv, **inputs)
        o.backward(torch.ones_like(o))
        return o.detach(), qq.grad, kk.grad, vv.grad

    reordered = run()
    monkeypatch.setenv("ATTNGEN_LAUNCH_ORDER", "1")
    for a, b in zip(reordered, run()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
