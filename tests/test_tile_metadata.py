"""Device-side tile metadata for masks that read runtime inputs along the positions.

The metadata kernel's ranges are checked by brute force against the runtime comparisons
themselves, computed here with torch; the kernels that use them are checked against the
same kernels with skipping off and against the dense reference.
"""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

import attngen
from attngen.check import compare, format_rows, make_inputs
from attngen.tiles import LaunchConfig
from attngen.tune import shape_bucket
from helpers import DEVICE, dims, with_and_without_skipping

DOC = {"doc": {"dtype": "int32", "shape": ["B", "T_KV"]}}
KEEP = {"keep": {"dtype": "int32", "shape": ["B", "T_KV"]}}

#: mask -> (inputs, the runtime comparisons of its one data-dependent conjunct as a function
#: of (ids at q [B, T_Q, 1], ids at k [B, 1, T_KV]))
MASKS = {
    "doc[b, q] == doc[b, k] and k <= q": (DOC, lambda a, c: a == c),
    "doc[b, q] == doc[b, k]": (DOC, lambda a, c: a == c),
    "doc[b, q] != doc[b, k] and q - k < 20": (DOC, lambda a, c: a != c),
    "doc[b, k] <= doc[b, q] and k <= q": (DOC, lambda a, c: c <= a),
    "doc[b, q] == doc[b, k] and doc[b, k] >= 2": (DOC, lambda a, c: (a == c) & (c >= 2)),
    "keep[b, k] > 0 and k <= q": (KEEP, lambda a, c: c > 0),
}


def _ids(b, t, gen, kind):
    if kind == "sorted":
        return torch.randint(0, max(2, t // 8), (b, t), generator=gen).sort(dim=-1).values.to(torch.int32)
    if kind == "binary":
        return (torch.rand(b, t, generator=gen) < 0.7).to(torch.int32)
    return torch.randint(0, 4, (b, t), generator=gen, dtype=torch.int32)  # unsorted


@settings(deadline=None, max_examples=25)
@given(
    mask=st.sampled_from(sorted(MASKS)),
    t_q=st.integers(1, 70),
    extra=st.integers(0, 30),
    bq=st.sampled_from([1, 4, 16]),
    bkv=st.sampled_from([2, 8, 16]),
    kind=st.sampled_from(["sorted", "binary", "unsorted"]),
    seed=st.integers(0, 1000),
)
def test_metadata_ranges_are_sound(mask, t_q, extra, bq, bkv, kind, seed):
    decls, runtime = MASKS[mask]
    op = attngen.compile({"name": "meta", "inputs": decls, "mask": mask})
    t_kv = t_q + extra  # bottom-right: query i sits at key position i + extra
    gen = torch.Generator().manual_seed(seed)
    ids = _ids(2, t_kv, gen, kind)
    d = dims(B=2, T_Q=t_q, T_KV=t_kv)
    rt = runtime(ids[:, extra:, None], ids[:, None, :]).expand(2, t_q, t_kv)  # [B, T_Q, T_KV]
    for var in ("k", "q"):
        (meta,) = op.tile_meta(var, bq, bkv, [ids.to(DEVICE)], d, torch.device(DEVICE))
        meta = meta.cpu()
        pairs = rt if var == "k" else rt.transpose(1, 2)  # [B, given, var]
        bg, bv = (bq, bkv) if var == "k" else (bkv, bq)
        n_g, n_v = -(-pairs.shape[1] // bg), -(-pairs.shape[2] // bv)
        assert meta.shape == (2, n_g, 1, 4)
        for b in range(2):
            for i in range(n_g):
                lo, hi, flo, fhi = meta[b, i, 0].tolist()
                rows = pairs[b, i * bg : (i + 1) * bg]
                hit = [bool(rows[:, j * bv : (j + 1) * bv].any()) for j in range(n_v)]
                every = [bool(rows[:, j * bv : (j + 1) * bv].all()) for j in range(n_v)]
                for j in range(n_v):
                    assert lo <= j < hi or not hit[j], f"{var}: tile ({i}, {j}) skipped but has a visible pair"
                    assert not (flo <= j < fhi) or every[j], f"{var}: tile ({i}, {j}) called FULL but has a masked pair"
                if any(hit) and kind == "sorted" and mask.startswith("doc[b, q] == doc[b, k]") and "2" not in mask:
                    # sorted ids: the range is the hull of the tiles with a visible pair
                    first = hit.index(True)
                    last = n_v - 1 - hit[::-1].index(True)
                    assert (lo, hi) == (first, last + 1)


def test_sorted_documents_get_exact_full_runs():
    op = attngen.compile("document")
    ids = (torch.arange(256) // 64).to(torch.int32).view(1, -1)
    (meta,) = op.tile_meta("k", 32, 16, [ids.to(DEVICE)], dims(T_Q=256, T_KV=256), torch.device(DEVICE))
    meta = meta.cpu()[0, :, 0]
    # query tile i (32 tokens) lies in document i // 2, whose keys are tiles 4·(i//2) .. +3
    for i in range(8):
        first = 4 * (i // 2)
        assert meta[i].tolist() == [first, first + 4, first, first + 4]


def _small_tiles(op, d, dtype):
    for kernel in ("fwd", "dkdv", "dkdv_dq", "dq"):
        op.set_config(kernel, shape_bucket(d, dtype), LaunchConfig(16, 16, 4, 1))


@settings(deadline=None, max_examples=6)
@given(
    mask=st.sampled_from(sorted(MASKS)),
    t_q=st.integers(1, 48),
    extra=st.integers(0, 16),
    kind=st.sampled_from(["sorted", "binary", "unsorted"]),
    seed=st.integers(0, 1000),
)
def test_kernels_with_metadata_match_the_reference_and_no_skipping(mask, t_q, extra, kind, seed):
    decls, _ = MASKS[mask]
    op = attngen.compile({"name": "meta", "inputs": decls, "mask": mask})
    d = dims(B=2, H=2, H_KV=1, T_Q=t_q, T_KV=t_q + extra)
    _small_tiles(op, d, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, _ = make_inputs(op.spec, d, dtype=torch.float32, device=DEVICE, generator=gen)
    inputs = {next(iter(decls)): _ids(2, t_q + extra, gen, kind).to(DEVICE)}
    rows = compare(op, attngen.reference(op.spec), q, k, v, inputs, backward=True, generator=gen)
    assert all(r.ok for r in rows), format_rows(rows)
    do = torch.randn(q.shape[:3] + (v.shape[3],), generator=gen).to(DEVICE)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse = op(*leaves, return_lse=True, **inputs)
        return (o, lse, *torch.autograd.grad(o, leaves, do))

    with_skip, without = with_and_without_skipping(run)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), with_skip, without):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name


def test_only_position_reads_get_metadata():
    # a per-head input cannot be summarised per batch row: no metadata, masked tiles instead
    per_head = attngen.compile(
        {"name": "ph", "inputs": {"doc": {"dtype": "int32", "shape": ["H", "T_KV"]}}, "mask": "doc[h, q] == doc[h, k]"}
    )
    assert per_head.plan.fwd_ranges.meta is None
    doc = attngen.compile("document")
    assert doc.plan.fwd_ranges.meta.count == 1 and doc.plan.dkdv_ranges.meta.count == 1


# ----------------------------------------------------------------------------------------
# strided masks: the periodic part runs in residue order, as dense tiles


def test_strided_part_is_classified_dense_in_residue_order():
    from attngen.compiler import build

    c = build("strided", stride=8)
    split = c.graph.graph["periodic"]
    assert split["stride"] == 8
    # in j = position // stride, the strided part of `k <= q and (q - k < s or (q - k) % s == 0)`
    # minus the band is `k_j < q_j`: one exact interval, so whole tiles are FULL
    (conj,) = c.graph.graph["perm_tiles_k"].conjuncts
    assert conj.exact and not conj.guards
    assert c.plan.perm is not None and c.plan.perm.fwd.name == "attn_fwd_perm"
    # a mask with no strided conjunct is not split
    assert build("causal").graph.graph["periodic"] is None


def test_strided_tiles_visited_in_residue_order_are_full():
    from attngen.classify import evaluate_intervals
    from attngen.compiler import build

    c = build("strided", stride=8)
    ranges = c.graph.graph["perm_tiles_k"]
    # residue 3, 64 queries of that class (j = 0..63) in tiles of 16, keys likewise
    j = torch.arange(0, 64, 16)
    env = {"g_first": j, "g_last": j + 15, "given_full": torch.ones(4, dtype=torch.bool),
           "var_min": torch.tensor(0), "var_max": torch.tensor(63), "T_Q": 512, "T_KV": 512,
           "b": 0, "h": 0, "perm_r": torch.tensor(3)}  # fmt: skip
    ((s, fs, fe, e),) = evaluate_intervals(ranges, env, n_var=64, block_var=16, var_off=0)
    # query tile i sees key tiles 0..i; all but the diagonal one are FULL
    assert s.tolist() == [0, 0, 0, 0] and e.tolist() == [1, 2, 3, 4]
    assert fs.tolist() == [0, 0, 0, 0] and fe.tolist() == [0, 1, 2, 3]


@settings(deadline=None, max_examples=6)
@given(
    stride=st.integers(2, 9),
    band=st.integers(0, 12),
    t_q=st.integers(1, 48),
    extra=st.integers(-16, 16),  # T_KV < T_Q puts the first queries at negative positions
    globals_=st.integers(0, 3),
    normalizer=st.sampled_from(["softmax", "sigmoid"]),
    seed=st.integers(0, 1000),
)
def test_strided_two_part_kernels_match_the_reference(stride, band, t_q, extra, globals_, normalizer, seed):
    mask = f"k <= q and (q - k < {band} or (q - k) % {stride} == 0 or k < {globals_})"
    op = attngen.compile({"name": "strided_fuzz", "mask": mask, "score": "3.0 * tanh(s / 3.0)", "normalizer": normalizer})
    assert op.plan.perm is not None
    d = dims(B=1, H=2, H_KV=1, T_Q=t_q, T_KV=max(1, t_q + extra))
    _small_tiles(op, d, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, inputs = make_inputs(op.spec, d, dtype=torch.float32, device=DEVICE, generator=gen)
    rows = compare(op, attngen.reference(op.spec), q, k, v, inputs, backward=True, generator=gen)
    assert all(r.ok for r in rows), format_rows(rows)


def _assert_matches_reference(spec, d, inputs=None):
    op = attngen.compile(spec)
    _small_tiles(op, d, torch.float32)
    gen = torch.Generator().manual_seed(0)
    q, k, v, drawn = make_inputs(op.spec, d, dtype=torch.float32, device=DEVICE, generator=gen)
    rows = compare(op, attngen.reference(op.spec), q, k, v, inputs or drawn, backward=True, generator=gen)
    assert all(r.ok for r in rows), format_rows(rows)


def test_strided_queries_at_negative_positions_get_their_strided_keys():
    # bottom-right with T_Q > T_KV: queries 0..9 sit at positions -10..-1 and see keys 2, 5, 8
    _assert_matches_reference({"name": "neg", "mask": "(q - k) % 3 == 0"}, dims(B=1, H=1, H_KV=1, T_Q=20, T_KV=10))


def test_int64_ids_in_an_input_declared_int32_are_compared_in_int64():
    # 2**32 truncated to int32 is 0: the metadata must not call the two documents one
    ids = torch.tensor([[0] * 16 + [2**32] * 16]).to(DEVICE)
    spec = {"name": "wide", "inputs": DOC, "mask": "doc[b, q] == doc[b, k]"}
    _assert_matches_reference(spec, dims(B=1, H=2, H_KV=1, T_Q=32, T_KV=32), {"doc": ids})
