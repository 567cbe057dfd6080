"""Longest programs first (attngen.tilemap.query_tile_order, the macro program_order): which
masks reorder their query grids, that every order still visits each (tile, head, batch
entry) exactly once, and that reordered kernels compute what the launch order computes."""

import pytest
import torch
import triton
import triton.language as tl

import attngen
from attngen.check import make_inputs
from attngen.tiles import LaunchConfig
from attngen.tune import shape_bucket
from attngen.tilemap import FIRST_TILE_FIRST, LAST_TILE_FIRST, LAUNCH_ORDER
from helpers import DEVICE, dims, needs_kernels

_program_order = None  # the rendered helper under test, set before each launch
BUDGET = 8 * 1024 * 1024


@triton.jit
def _probe(OUT, SPAN, ORDER: tl.constexpr, POS_BYTES: tl.constexpr, HEADS_PER_KV: tl.constexpr, L2_BUDGET: tl.constexpr):
    tile, head, batch = _program_order(ORDER, SPAN, POS_BYTES, HEADS_PER_KV, L2_BUDGET)
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
@pytest.mark.parametrize("span, heads_per_kv, group", [
    (87381, 1, 3),  # 8 MiB / 32 bytes / span: 3 KV heads; groups of 3, 3 and a short one of 2
    (87381, 2, 6),  # 3 KV heads of 2 query heads each: groups of 6 and 2
    (1, 1, 8),  # everything fits: one group of all 8 heads
    (10 ** 6, 2, 2),  # not even one KV head fits: one KV head (2 query heads) per group
    (10 ** 6, 1, 1),
])
def test_every_order_visits_each_program_once(order, span, heads_per_kv, group):
    """3 tiles x 4 heads x 2 batch entries, 32 bytes per KV-head position, an 8 MiB budget."""
    global _program_order
    _program_order = attngen.compile("specs/causal.yaml").module._program_order
    n_tiles, n_heads, n_batch = 3, 4, 2
    out = torch.full((n_tiles * n_heads * n_batch, 3), -1, dtype=torch.int32, device=DEVICE)
    _probe[(n_tiles, n_heads, n_batch)](out, span, ORDER=order, POS_BYTES=32, HEADS_PER_KV=heads_per_kv, L2_BUDGET=BUDGET)
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
@pytest.mark.parametrize("H, H_KV, kv_heads", [(4, 2, 1), (3, 3, 4)])  # groups of 2; of 4 and a short 2
@pytest.mark.parametrize("dq", ["0", "1"])  # a dQ kernel of its own (reordered too), or dQ fused
def test_reordered_kernels_match_the_launch_order(spec, H, H_KV, kv_heads, dq, monkeypatch):
    """Tiles of 16 make 3 query tiles of T = 40, and a budget of ``kv_heads`` KV heads' K and V
    deals the 6 heads (B = 2) out in groups, so the reordered grids differ from launch order."""
    monkeypatch.setenv("ATTNGEN_POISON", "1")  # a row no program writes stays NaN
    monkeypatch.setenv("ATTNGEN_DQ", dq)
    op = attngen.compile(spec)
    assert op.query_tile_order != LAUNCH_ORDER
    shape = dims(B=2, H=H, H_KV=H_KV, T_Q=40, T_KV=40)
    monkeypatch.setattr(op, "_configs", dict(op._configs))  # the op is shared: undo the configs below
    monkeypatch.setattr(op, "_picked", {})
    for kernel in ("fwd", "dkdv", "dkdv_dq", "dq"):
        op.set_config(kernel, shape_bucket(shape, torch.float32), LaunchConfig(16, 16, 4, 1))
    monkeypatch.setattr(op, "l2_budget", kv_heads * 40 * (16 + 16) * 4)  # T_KV positions of K and V rows, float32
    q, k, v, inputs = make_inputs(op.spec, shape, dtype=torch.float32, device=DEVICE, generator=torch.Generator().manual_seed(0))

    def run():
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        o = op(qq, kk, vv, **inputs)
        o.backward(torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.device))
        return o.detach(), qq.grad, kk.grad, vv.grad

    reordered = run()
    monkeypatch.setenv("ATTNGEN_LAUNCH_ORDER", "1")
    for a, b in zip(reordered, run()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
