"""Split-KV decoding (op.decode) against the dense reference on each sequence's valid cache.

Every expected value is computed independently of the decoding kernel: attngen.reference in
float64 (and in the test dtype, for the three-way rule) on the cache positions gathered by
hand, sequence by sequence, with the spec's bottom-right alignment.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attngen
from attngen import ShapeError, UnsupportedError
from attngen.check import FACTOR, FLOOR, alibi_slopes, magnitude, max_error
from attngen.decode import MAX_SPLITS, choose_num_splits
from attngen.strategies import masks, scores
from helpers import DEVICE, with_and_without_skipping

PAGE = 16


def make_cache(B, H_KV, T_max, D, seqlens, *, dtype=torch.float32, gen, D_V=None):
    """Random contiguous caches ``[B, H_KV, T_max, D]``; positions at and past ``seqlens[b]``
    hold NaN, so a kernel that used them could not pass."""
    k = torch.randn(B, H_KV, T_max, D, generator=gen)
    v = torch.randn(B, H_KV, T_max, D_V or D, generator=gen)
    for b, n in enumerate(seqlens):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    return k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def to_paged(k, v, *, gen, spare=2, page=PAGE):
    """The same caches as pages of ``page`` positions ``[num_blocks, page, H_KV, D]`` in a
    random order, with ``spare`` unused NaN blocks, and the int32 block table."""
    PAGE = page
    B, H_KV, T_max, _ = k.shape
    nb = -(-T_max // PAGE)
    perm = torch.randperm(B * nb + spare, generator=gen)
    pages = []
    for t in (k, v):
        padded = torch.full((B, H_KV, nb * PAGE, t.shape[3]), float("nan"), dtype=t.dtype, device=t.device)
        padded[:, :, :T_max] = t
        paged = torch.full((B * nb + spare, PAGE, H_KV, t.shape[3]), float("nan"), dtype=t.dtype, device=t.device)
        logical = padded.view(B, H_KV, nb, PAGE, -1).permute(0, 2, 3, 1, 4).reshape(B * nb, PAGE, H_KV, -1)
        paged[perm[: B * nb].to(t.device)] = logical
        pages.append(paged)
    table = perm[: B * nb].view(B, nb).to(torch.int32).to(k.device)
    return pages[0], pages[1], table


def sequence_inputs(spec, inputs, b, n_q, n_kv):
    """The runtime inputs of sequence ``b`` alone: batch and position dims cut to it."""
    out = {}
    for decl in spec.inputs:
        t = inputs[decl.name]
        for dim, name in enumerate(decl.shape):
            if name == "B":
                t = t.narrow(dim, b, 1)
            elif name in ("T_KV", "T_Q"):
                t = t.narrow(dim, 0, n_kv if name == "T_KV" else n_q)
        out[decl.name] = t
    return out


def reference_decode(spec, q, k, v, seqlens, query_lens=None, dtype=torch.float64, **inputs):
    """Per sequence: attngen.reference on the valid contiguous cache ``k[b, :, :n]``; padding
    rows (past ``query_lens[b]``) are 0 with log-sum-exp -inf."""
    B, H, T_Q, _ = q.shape
    ref = attngen.reference(spec)
    o = torch.zeros(B, H, T_Q, v.shape[3], dtype=dtype, device=q.device)
    lse = torch.full((B, H, T_Q), -math.inf, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=q.device)
    for b in range(B):
        n_kv = int(seqlens[b])
        n_q = T_Q if query_lens is None else int(query_lens[b])
        if n_q == 0:
            continue
        ob, lb = ref(
            q[b : b + 1, :, :n_q].to(dtype), k[b : b + 1, :, :n_kv].to(dtype), v[b : b + 1, :, :n_kv].to(dtype),
            return_lse=True, **sequence_inputs(spec, inputs, b, n_q, n_kv),
        )  # fmt: skip
        o[b, :, :n_q], lse[b, :, :n_q] = ob[0], lb[0]
    return o, lse


def assert_three_way(got, spec, q, k, v, seqlens, query_lens=None, **inputs):
    """The kernel's error against float64 is at most FACTOR times the same-dtype reference's
    plus the dtype's floor (tests/helpers' rule); NaN never passes."""
    exact = reference_decode(spec, q, k, v, seqlens, query_lens, **inputs)
    same = reference_decode(spec, q, k, v, seqlens, query_lens, dtype=q.dtype, **inputs)
    for name, x, ref64, ref in zip(("o", "lse"), got, exact, same):
        err, ref_err = max_error(x, ref64), max_error(ref, ref64)
        bound = FACTOR * (ref_err if math.isfinite(ref_err) else 0.0) + FLOOR[q.dtype] * magnitude(ref64)
        assert err <= bound, f"{name}: error {err:.3g} over the bound {bound:.3g} (reference in {q.dtype}: {ref_err:.3g})"


def run_case(spec, *, params=None, B=2, H=4, H_KV=2, T_Q=3, D=16, D_V=None, seqlens=(45, 100), paged=False,
             num_splits=None, query_lens=None, dtype=torch.float32, seed=0, inputs=None, strided_q=False,
             page=PAGE, validate=True):  # fmt: skip
    op = attngen.compile(spec, **(params or {}))
    gen = torch.Generator().manual_seed(seed)
    T_max = max(seqlens) + 7
    q = torch.randn(B, H, T_Q, D, generator=gen).to(DEVICE, dtype)
    if strided_q:  # [B, T_Q, H, D] storage seen as [B, H, T_Q, D]
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k, v = make_cache(B, H_KV, T_max, D, seqlens, dtype=dtype, gen=gen, D_V=D_V)
    lens = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    qlens = None if query_lens is None else torch.tensor(query_lens, dtype=torch.int32, device=DEVICE)
    inputs = inputs or {}
    if paged:
        kc, vc, table = to_paged(k, v, gen=gen, page=page)
    else:
        kc, vc, table = k, v, None
    with torch.no_grad():
        got = op.decode(q, kc, vc, lens, block_table=table, num_splits=num_splits, query_lens=qlens, validate=validate,
                        **inputs)
    assert got[0].shape == (B, H, T_Q, D_V or D) and got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_three_way(got, op.spec, q, k, v, seqlens, query_lens, **inputs)
    return got


ZOO = [
    ("causal", {}, {}),
    ("sliding_window", {"window": 13}, {}),  # the window is much smaller than the cache
    ("streaming_sinks", {"sinks": 2, "window": 9}, {}),
    ("alibi", {}, {"slopes": alibi_slopes(4).to(DEVICE)}),  # the score at absolute positions
]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("T_Q", [1, 3])
@pytest.mark.parametrize("spec, params, inputs", ZOO, ids=[z[0] for z in ZOO])
def test_decode_matches_the_reference(spec, params, inputs, T_Q, paged):
    run_case(spec, params=params, T_Q=T_Q, paged=paged, num_splits=2, inputs=inputs)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("T_Q", [1, 3])
@pytest.mark.parametrize("H, H_KV", [(6, 2), (9, 3)])
def test_gqa_groups_are_packed_into_one_program(H, H_KV, T_Q, paged):
    slopes = alibi_slopes(H).to(DEVICE)  # a per-head score: the rows of one program differ in h
    run_case("alibi", H=H, H_KV=H_KV, T_Q=T_Q, paged=paged, seqlens=(20, 77), num_splits=3, inputs={"slopes": slopes})


@pytest.mark.parametrize(
    "H, H_KV, T_Q",
    [(8, 1, 16), (10, 2, 16)],  # 128 and 80 rows per KV head: two row blocks of 64, the second part padding
)
def test_several_row_blocks_odd_head_dims_and_strided_q(H, H_KV, T_Q):
    run_case("causal", H=H, H_KV=H_KV, T_Q=T_Q, D=12, D_V=20, seqlens=(16, 50), num_splits=2, strided_q=True)
    run_case("sliding_window", params={"window": 13}, H=H, H_KV=H_KV, T_Q=T_Q, D=12, D_V=20, seqlens=(16, 50),
             paged=True, num_splits=2, query_lens=(16, 9))  # fmt: skip


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 12, None])
def test_any_number_of_splits_gives_the_same_result(num_splits):
    # 100 positions are 4 key tiles of 32 (float32): 7 and 12 splits leave some splits empty
    o, lse = run_case("sliding_window", params={"window": 50}, T_Q=2, paged=True, num_splits=num_splits)
    o1, lse1 = run_case("sliding_window", params={"window": 50}, T_Q=2, paged=True, num_splits=1)
    assert torch.allclose(o, o1, atol=1e-6) and torch.allclose(lse, lse1, atol=1e-6)


def test_other_specs_strided_document_softcap():
    gen = torch.Generator().manual_seed(5)
    run_case("strided", params={"stride": 6}, seqlens=(40, 61), paged=True, num_splits=2)  # periodic part, masked element-wise
    run_case("gemma2_local", params={"window": 13, "cap": 2.0}, seqlens=(40, 61), num_splits=2)
    doc = torch.cumsum(torch.rand(2, 80, generator=gen) < 0.1, dim=1).to(torch.int32).to(DEVICE)  # ids per paged position
    run_case("document", seqlens=(40, 61), paged=True, num_splits=2, inputs={"doc": doc})


def test_top_left_alignment_and_a_mask_that_reads_t_kv():
    # top_left: query i sits at position i whatever the cache holds; T_KV in an expression is
    # the sequence's own cache length
    run_case({"name": "top_left_causal", "align": "top_left", "mask": "k <= q"}, T_Q=3, seqlens=(5, 40), num_splits=2)
    run_case({"name": "recent", "mask": "k >= T_KV - 20 and k <= q"}, T_Q=3, seqlens=(12, 90), paged=True, num_splits=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    run_case("streaming_sinks", params={"sinks": 2, "window": 9}, H=6, H_KV=2, T_Q=3, paged=True, num_splits=2, dtype=dtype)


def test_bounded_streaming_cache_holds_only_sinks_and_window():
    # StreamingLLM: 300 positions, but the paged cache holds only the sink page and the pages
    # of the recent window; every other block-table entry points at one scratch page of NaN
    sinks, window, n, T_Q = 4, 40, 300, 2
    op = attngen.compile("streaming_sinks", sinks=sinks, window=window)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, T_Q, 16, generator=gen).to(DEVICE)
    k, v = make_cache(1, 2, n, 16, [n], gen=gen)
    n_pages = -(-n // PAGE)
    first_recent = (n - T_Q - window + 1) // PAGE  # the page of the oldest key the window sees
    kept = [0, *range(first_recent, n_pages)]
    k_pages = torch.full((len(kept) + 1, PAGE, 2, 16), float("nan"), device=DEVICE)
    v_pages = k_pages.clone()
    table = torch.full((1, n_pages), len(kept), dtype=torch.int32, device=DEVICE)  # the scratch page
    for slot, page in enumerate(kept):
        span = slice(page * PAGE, min((page + 1) * PAGE, n))
        k_pages[slot, : span.stop - span.start] = k[0, :, span].transpose(0, 1)
        v_pages[slot, : span.stop - span.start] = v[0, :, span].transpose(0, 1)
        table[0, page] = slot
    assert len(kept) + 1 < n_pages // 3
    lens = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        got = op.decode(q, k_pages, v_pages, lens, block_table=table, num_splits=3)
    assert_three_way(got, op.spec, q, k, v, [n])


def test_decoding_visits_only_the_sink_and_window_tiles():
    # the decoding kernel's key-tile ranges (plan.decode), evaluated with torch: 2 new tokens
    # at positions 298 and 299, 4 sinks and a window of 40, tiles of 32: tiles 0, 8 and 9 of 10
    from attngen.classify import evaluate_intervals

    ranges = attngen.build("streaming_sinks", sinks=4, window=40).graph.graph["decode_tiles_k"]
    env = dict(g_first=torch.tensor([298]), g_last=torch.tensor([299]), given_full=torch.tensor([True]),
               var_min=0, var_max=299, T_Q=2, T_KV=300, b=0, h=0)  # fmt: skip
    visited = set()
    for s, fs, fe, e in evaluate_intervals(ranges, env, n_var=300, block_var=32, var_off=0):
        visited |= set(range(int(s), int(e)))
    assert visited == {0, 8, 9}


def test_a_per_head_bound_is_not_a_scalar_of_the_packed_rows():
    # win[h] bounds the key tiles of one head in the forward kernel, but a decoding program's
    # rows span several heads: its tiles must cover every head's window
    spec = {"name": "head_window", "inputs": {"win": {"dtype": "int32", "shape": ["H"]}}, "mask": "k <= q and q - k < win[h]"}
    assert not attngen.build(spec).graph.graph["decode_tiles_k"].conjuncts[0].lows
    win = torch.tensor([3, 70, 5, 40, 1, 90], dtype=torch.int32, device=DEVICE)
    run_case(spec, H=6, H_KV=2, T_Q=3, seqlens=(60, 100), paged=True, num_splits=2, inputs={"win": win})


def test_issue_case_ragged_query_lengths_with_an_empty_sequence():
    # query lengths (1, 0, 1), cache lengths (3, 0, 5), H=9, H_KV=3
    op = attngen.compile("causal")
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(3, 9, 1, 16, generator=gen).to(DEVICE).requires_grad_()
    k, v = make_cache(3, 3, 8, 16, [3, 0, 5], gen=gen)  # the empty sequence's cache is all NaN
    lens = torch.tensor([3, 0, 5], dtype=torch.int32, device=DEVICE)
    qlens = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEVICE)
    with torch.inference_mode():
        o, lse = op.decode(q, k, v, lens, query_lens=qlens, num_splits=2)
    assert torch.all(o[1] == 0) and torch.all(lse[1] == -math.inf)
    assert not o.requires_grad and not lse.requires_grad and q.grad is None  # no graph, no gradient
    assert_three_way((o, lse), op.spec, q.detach(), k, v, [3, 0, 5], [1, 0, 1])
    with pytest.raises(UnsupportedError, match="inference only.*torch.no_grad"):
        op.decode(q, k, v, lens, query_lens=qlens)


def test_padding_rows_of_shorter_sequences_are_empty():
    o, lse = run_case("sliding_window", params={"window": 13}, B=3, H=6, H_KV=2, T_Q=4, seqlens=(9, 30, 4),
                      query_lens=(2, 4, 0), paged=True, num_splits=2)  # fmt: skip
    assert torch.all(o[0, :, 2:] == 0) and torch.all(lse[0, :, 2:] == -math.inf)


def test_rows_that_see_no_key_and_merging_splits():
    # a mask that hides every key from the first positions: sequence 0's rows see nothing, and
    # splits that get no visible key must merge cleanly into the unsplit result
    spec = {"name": "lagged", "mask": "k + 4 <= q"}
    o, lse = run_case(spec, T_Q=3, seqlens=(3, 9), num_splits=1)
    assert torch.all(o[0] == 0) and torch.all(lse[0] == -math.inf) and torch.isfinite(lse[1]).all()
    for splits in (2, 5):
        o_s, lse_s = run_case(spec, T_Q=3, seqlens=(3, 9), num_splits=splits)
        assert torch.allclose(o_s, o, atol=1e-6) and torch.equal(torch.isinf(lse_s), torch.isinf(lse))
        assert torch.allclose(lse_s[1], lse[1], atol=1e-6)


@pytest.mark.parametrize("page", [64, 128, 192], ids=["page=tile", "page=2tiles", "page=3tiles"])
def test_pages_that_hold_whole_key_tiles(page):
    # float32 key tiles are 64 positions at D=16 (attngen.tiles.decode_config), so each of these
    # pages holds whole tiles and the kernel reads one table entry per tile instead of one per key
    run_case("sliding_window", params={"window": 150}, T_Q=2, seqlens=(45, 400), paged=True, page=page, num_splits=2)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_unvalidated_calls_give_the_validated_result(paged):
    # validate=False skips reading the lengths to the host; with good values nothing changes,
    # including ragged query lengths and the splits chosen from the capacity
    kw = dict(T_Q=3, seqlens=(45, 100), paged=paged, query_lens=(2, 3))
    o, lse = run_case("causal", **kw)
    o_u, lse_u = run_case("causal", validate=False, **kw)
    assert torch.allclose(o_u, o, atol=1e-6) and torch.allclose(lse_u, lse, atol=1e-6)


@pytest.mark.skipif(DEVICE != "cpu", reason="the address sanitizer needs Triton's interpreter (CPU)")
def test_unvalidated_bad_values_never_read_outside_the_cache():
    # without validation, lengths past the capacity, negative lengths and block-table entries
    # outside the pool must give wrong rows at worst, never an address outside the tensors
    from sanitizer import sanitized

    op = attngen.compile("causal")
    gen = torch.Generator().manual_seed(3)
    B, H, H_KV, T_max, D = 3, 4, 2, 40, 16
    q = torch.randn(B, H, 2, D, generator=gen)
    k, v = (torch.randn(B, H_KV, T_max, D, generator=gen) for _ in range(2))
    kp, vp, table = to_paged(k, v, gen=gen, page=8, spare=0)
    table[0, 1], table[2, 0] = -1, kp.shape[0] + 5
    lens = torch.tensor([T_max + 100, -7, 30], dtype=torch.int32)
    qlens = torch.tensor([5, -1, 2], dtype=torch.int32)
    with torch.no_grad(), sanitized(strict=True) as log:
        o, lse = op.decode(q, k, v, lens, query_lens=qlens, validate=False)
        op.decode(q, kp, vp, lens, block_table=table, query_lens=qlens, validate=False)
    assert len(log.launches) == 4
    # a length past the capacity is the capacity; a negative one is an empty sequence
    clamped = torch.tensor([T_max, 0, 30], dtype=torch.int32)
    want, want_lse = op.decode(q, k, v, clamped, query_lens=torch.tensor([2, 0, 2], dtype=torch.int32))
    assert torch.allclose(o, want, atol=1e-6) and torch.equal(torch.isinf(lse), torch.isinf(want_lse))


def test_skipping_tiles_changes_nothing():
    def run():
        return run_case("streaming_sinks", params={"sinks": 2, "window": 9}, T_Q=3, seqlens=(70, 100), paged=True, num_splits=3)

    (o, lse), (o_all, lse_all) = with_and_without_skipping(run)
    assert torch.allclose(o, o_all, atol=1e-6) and torch.allclose(lse, lse_all, atol=1e-6)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_chunked_prefill_through_decode_equals_one_pass(paged):
    # two prompts of 45 and 38 tokens fed in chunks of up to 16 new tokens per step (ragged per
    # sequence) against the growing cache; the concatenated outputs equal one pass of the op
    op = attngen.compile("sliding_window", window=20)
    gen = torch.Generator().manual_seed(8)
    lengths, D = (45, 38), 16
    q = torch.randn(2, 4, 48, D, generator=gen).to(DEVICE)
    k_all, v_all = (torch.randn(2, 2, 48, D, generator=gen).to(DEVICE) for _ in range(2))
    k_cache, v_cache = (torch.full_like(k_all, float("nan")) for _ in range(2))
    steps = [(16, 5), (3, 16), (16, 1), (10, 16), (0, 0)]
    out = torch.zeros(2, 4, 48, D, device=DEVICE)
    done = [0, 0]
    for step in steps:
        n_new = [min(s, lengths[b] - done[b]) for b, s in enumerate(step)]
        for b in range(2):
            k_cache[b, :, done[b] : done[b] + n_new[b]] = k_all[b, :, done[b] : done[b] + n_new[b]]
            v_cache[b, :, done[b] : done[b] + n_new[b]] = v_all[b, :, done[b] : done[b] + n_new[b]]
        seqlens = [done[b] + n_new[b] for b in range(2)]
        q_step = torch.zeros(2, 4, 16, D, device=DEVICE)
        for b in range(2):
            q_step[b, :, : n_new[b]] = q[b, :, done[b] : seqlens[b]]
        kc, vc, table = to_paged(k_cache, v_cache, gen=gen) if paged else (k_cache, v_cache, None)
        with torch.no_grad():
            o, _ = op.decode(
                q_step, kc, vc, torch.tensor(seqlens, dtype=torch.int32, device=DEVICE), block_table=table,
                query_lens=torch.tensor(n_new, dtype=torch.int32, device=DEVICE), num_splits=2,
            )  # fmt: skip
        for b in range(2):
            out[b, :, done[b] : seqlens[b]] = o[b, :, : n_new[b]]
        done = seqlens
    assert done == list(lengths)
    for b in range(2):
        n = lengths[b]
        whole = op(q[b : b + 1, :, :n], k_all[b : b + 1, :, :n], v_all[b : b + 1, :, :n])
        exact = attngen.reference(op.spec)(*(t[b : b + 1, :, :n].double() for t in (q, k_all, v_all)))
        assert torch.allclose(out[b : b + 1, :, :n], whole, atol=1e-5)
        assert max_error(out[b : b + 1, :, :n], exact) < 2e-5


@settings(max_examples=12)
@given(
    mask=masks(),
    score=scores(),
    align=st.sampled_from(["bottom_right", "top_left"]),
    group=st.sampled_from([(1, 1), (3, 1), (6, 2)]),
    lens=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 70)), min_size=1, max_size=3),
    paged=st.booleans(),
    num_splits=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_random_specs_and_caches_match_the_reference(mask, score, align, group, lens, paged, num_splits, seed):
    spec = {"name": "fuzz_decode", "mask": mask, "align": align, **({"score": score} if score else {})}
    query_lens = [q_len if n else 0 for q_len, n in lens]
    seqlens = [max(n, q_len) for q_len, n in zip(query_lens, (n for _, n in lens))]
    H, H_KV = group
    run_case(spec, B=len(lens), H=H, H_KV=H_KV, T_Q=max(max(query_lens), 1), D=8, seqlens=tuple(seqlens),
             paged=paged, num_splits=num_splits, query_lens=tuple(query_lens), seed=seed)  # fmt: skip


def test_choose_num_splits():
    assert choose_num_splits(programs=8, n_tiles=1000, processors=132) == 33  # two waves, 264 programs
    assert choose_num_splits(programs=64, n_tiles=1000, processors=132) == 4  # 256: the second wave nearly full
    assert choose_num_splits(programs=100, n_tiles=1000, processors=132) == 2
    assert choose_num_splits(programs=8, n_tiles=6, processors=132) == 3  # at least 2 tiles a split
    assert choose_num_splits(programs=1, n_tiles=10**6, processors=132) == MAX_SPLITS
    assert choose_num_splits(programs=256, n_tiles=1000, processors=132) == 1  # one wave already
    assert choose_num_splits(programs=4, n_tiles=1000, processors=1) == 1  # the CPU interpreter


def test_decode_errors_name_the_argument_and_the_fix():
    op = attngen.compile("causal")
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, 3, 16, generator=gen).to(DEVICE)
    k, v = make_cache(2, 2, 40, 16, [10, 20], gen=gen)
    lens = torch.tensor([10, 20], dtype=torch.int32, device=DEVICE)
    kp, vp, table = to_paged(k, v, gen=gen)
    cases = [
        (dict(cache_seqlens=lens.long()), r"cache_seqlens: dtype int64; pass cache_seqlens.to\(torch.int32\)"),
        (dict(cache_seqlens=lens[:1]), r"cache_seqlens: expected shape \[B\] = \[2\], got \[1\]"),
        (dict(cache_seqlens=torch.tensor([2, 20], dtype=torch.int32, device=DEVICE)), r"cache_seqlens: sequence 0 has 2 cached positions but 3 new token\(s\); append"),
        (dict(cache_seqlens=torch.tensor([10, 41], dtype=torch.int32, device=DEVICE)), r"cache_seqlens: sequence 1 has 41 cached positions but the cache holds 40 per sequence; pass the number"),
        (dict(q=torch.randn(2, 4, 17, 16, device=DEVICE)), r"q: T_Q=17 new tokens per sequence; decode takes 1 to 16"),
        (dict(q=q.double()), r"q: dtype float64 is not supported"),
        (dict(k_cache=k.half()), r"k_cache: dtype float16 differs from q's float32"),
        (dict(k_cache=k[:, :, :, :8]), r"k_cache: head dim 8 differs from q's D_QK=16"),
        (dict(k_cache=k[:1], v_cache=v[:1]), r"k_cache: batch 1 differs from q's B=2.*pass block_table"),
        (dict(q=torch.randn(2, 3, 3, 16, device=DEVICE)), r"k_cache: H_KV=2 must divide q's H=3"),
        (dict(query_lens=torch.tensor([4, 1], dtype=torch.int32, device=DEVICE)), r"query_lens: sequence 0 has 4 new tokens; each must be from 0 to q's T_Q=3"),
        (dict(k_cache=kp, v_cache=vp, block_table=table.long()), r"block_table: dtype int64; pass block_table.to\(torch.int32\)"),
        (dict(k_cache=kp, v_cache=vp, block_table=table[:1]), r"block_table: expected an int32 tensor \[B, max_blocks\] with B=2"),
        (dict(k_cache=kp, v_cache=vp, block_table=table + 100), r"block_table: entries in use .* must index k_cache's 8 blocks"),
        (dict(k_cache=kp, v_cache=vp[:, :8], block_table=table), r"v_cache: expected \[num_blocks, block_size, H_KV, D_V\]"),
        (dict(num_splits=0), r"num_splits: 0; pass a positive int"),
        (dict(slopes=torch.ones(4, device=DEVICE)), r"slopes: unknown keyword argument"),
    ]
    for change, message in cases:
        call = {**dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens), **change}
        with pytest.raises(ShapeError, match=message), torch.no_grad():
            op.decode(call.pop("q"), call.pop("k_cache"), call.pop("v_cache"), call.pop("cache_seqlens"), **call)
    with pytest.raises(UnsupportedError, match="sigmoid normaliser.*log-sum-exp"):
        attngen.compile("sigmoid_causal").decode(q, k, v, lens)
    with pytest.raises(ShapeError, match=r"slopes: missing runtime input"), torch.no_grad():
        attngen.compile("alibi").decode(q, k, v, lens)


def test_merge_splits_equals_pairwise_merges():
    gen = torch.Generator().manual_seed(10)
    o = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=gen)
    lse = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen)
    lse[0, 0, 1] = -math.inf
    lse[1, 2] = -math.inf  # a row no part saw
    o[0, 0, 1] = float("nan")  # garbage in a part with no weight
    got_o, got_lse = attngen.merge_splits(o, lse)
    want_o, want_lse = o[..., 0, :], lse[..., 0]
    for s in range(1, 4):
        want_o, want_lse = attngen.merge_states(want_o, want_lse, o[..., s, :], lse[..., s])
    assert torch.allclose(got_o, want_o) and torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))
    assert torch.all(got_o[1, 2] == 0) and got_lse[1, 2] == -math.inf and torch.isfinite(got_o).all()
    finite = torch.isfinite(want_lse)
    assert torch.allclose(got_lse[finite], torch.logsumexp(lse, dim=-1)[finite])


def test_length_vectors_may_be_strided_or_expanded_views():
    # cache_seqlens and query_lens are read element by element from their start: a strided or
    # stride-0 view of them is copied first, so it gives what the plain tensor gives
    lens = torch.tensor([45, 0, 100, 0], dtype=torch.int32, device=DEVICE)[::2]
    qlens = torch.tensor([2, 3], dtype=torch.int32, device=DEVICE).unsqueeze(1).expand(2, 2)[:, 0]
    assert not lens.is_contiguous()
    op = attngen.compile("causal")
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 3, 16, generator=gen).to(DEVICE)
    k, v = make_cache(2, 2, 107, 16, (45, 100), gen=gen)
    with torch.no_grad():
        for validate in (True, False):
            got = op.decode(q, k, v, lens, query_lens=qlens, validate=validate)
            want = op.decode(q, k, v, lens.contiguous(), query_lens=qlens.contiguous(), validate=validate)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    same = torch.full((2,), 45, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        got = op.decode(q, k, v, torch.tensor([45], dtype=torch.int32, device=DEVICE).expand(2), validate=False)
        assert torch.equal(got[0], op.decode(q, k, v, same)[0])


def test_a_linear_op_has_no_decode():
    op = attngen.compile("linear_elu")
    with pytest.raises(UnsupportedError, match="decode: spec 'linear_elu' uses the linear normaliser"):
        op.decode(None, None, None, None)


def test_num_splits_takes_any_integer_type():
    import numpy as np

    got = run_case("causal", num_splits=np.int64(3))
    assert torch.allclose(got[0], run_case("causal", num_splits=3)[0])
