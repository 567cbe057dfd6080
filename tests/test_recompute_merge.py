"""Recompute policies, exact merging of partial results, chunked prefill."""

import math

import pytest
import torch

import attngen
from helpers import DEVICE


def _grads(op, q, k, v, inputs, do):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = op(*leaves, **inputs)
    return (o, *torch.autograd.grad(o, leaves, do))


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "rc_window", "mask": "k <= q and q - k < 9", "score": "4.0 * tanh(s / 4.0)"},
        {"name": "rc_alibi", "inputs": {"slopes": {"dtype": "float32", "shape": ["H"]}}, "mask": "k <= q", "score": "s - slopes[h] * (q - k)"},
        {"name": "rc_sigmoid", "normalizer": "sigmoid", "mask": "k <= q"},
    ],
)  # fmt: skip
def test_full_recompute_gives_the_same_gradients_as_lse(spec):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 30, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 2, 41, 16, generator=gen).to(DEVICE) for _ in range(2))
    do = torch.randn(1, 4, 30, 16, generator=gen).to(DEVICE)
    inputs = {"slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE)} if "inputs" in spec else {}
    by_lse = _grads(attngen.compile(spec), q, k, v, inputs, do)
    by_full = _grads(attngen.compile({**spec, "recompute": "full"}), q, k, v, inputs, do)
    for a, b in zip(by_lse, by_full):
        assert torch.equal(a, b)  # the rerun forward is deterministic: bit for bit


STORE_P_SPECS = [
    {"name": "sp_window", "mask": "k <= q and q - k < 9", "score": "4.0 * tanh(s / 4.0)"},  # reads s: recomputes q.kT
    {"name": "sp_alibi", "inputs": {"slopes": {"dtype": "float32", "shape": ["H"]}}, "mask": "k <= q", "score": "s - slopes[h] * (q - k)"},
    {"name": "sp_causal", "mask": "k <= q"},  # reads only P
    {"name": "sp_dense"},  # no mask: every tile FULL
    {"name": "sp_doc", "inputs": {"doc": {"dtype": "int32", "shape": ["B", "T_KV"]}}, "mask": "doc[b, q] == doc[b, k]"},
]  # fmt: skip


@pytest.mark.parametrize("spec", STORE_P_SPECS, ids=[s["name"] for s in STORE_P_SPECS])
@pytest.mark.parametrize("limit", [1 << 24, 100], ids=["stored", "over-limit"])
def test_store_p_gives_the_gradients_of_lse(spec, limit):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 30, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 2, 41, 16, generator=gen).to(DEVICE) for _ in range(2))
    do = torch.randn(1, 4, 30, 16, generator=gen).to(DEVICE)
    inputs = {"slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE)} if spec["name"] == "sp_alibi" else {}
    if spec["name"] == "sp_doc":
        inputs = {"doc": (torch.arange(41, device=DEVICE) // 9).to(torch.int32)[None]}
    by_lse = _grads(attngen.compile(spec), q, k, v, inputs, do)
    op = attngen.compile({**spec, "recompute": "store_p", "store_p_limit": limit})
    assert op.stores_p(30, 41) == (limit > 30 * 41)
    by_p = _grads(op, q, k, v, inputs, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), by_lse, by_p):
        # the same P in float32 (stored as q's dtype, here float32): equal to rounding
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (name, (a - b).abs().max().item())


def test_store_p_saves_p_and_reads_it_back_in_half_precision():
    # bf16: P is stored in bf16, so gradients differ from lse's by bf16 rounding of P only
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 2, 24, 16, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(4))
    spec = {"name": "sp_bf16", "mask": "k <= q"}
    ref = attngen.reference(spec)
    want = _grads(ref, q.double(), k.double(), v.double(), {}, do.double())
    got = _grads(attngen.compile({**spec, "recompute": "store_p"}), q, k, v, {}, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), want, got):
        assert (a - b.double()).abs().max().item() < 5e-2, name

    sizes = []

    def pack(t):
        sizes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attngen.compile({**spec, "recompute": "store_p"})(*(t.requires_grad_() for t in (q, k, v)))
    assert (1, 2, 24, 24) in sizes  # P, [B, H, T_Q, T_KV]


def test_store_p_stores_nothing_when_no_backward_can_follow():
    # inference with a store_p spec costs what lse costs: no P pass, no P memory
    op = attngen.compile({"name": "sp_inf", "mask": "k <= q", "recompute": "store_p"})
    q = torch.randn(1, 2, 20, 16).to(DEVICE)
    calls = []
    real = op.forward_impl

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(kwargs.get("want_p", False) and out[2] is not None)
        return out

    op.forward_impl = spy
    with torch.no_grad():
        op(q, q, q)
    op(q, q, q)  # nothing requires grad
    leaf = q.clone().requires_grad_()
    op(leaf, q, q)
    assert calls == [False, False, True]


def test_store_p_is_refused_where_it_cannot_apply():
    from attngen.errors import SpecError, UnsupportedError

    with pytest.raises(UnsupportedError, match="store_p"):
        attngen.compile({"name": "x", "normalizer": "sigmoid", "recompute": "store_p"})
    with pytest.raises(UnsupportedError, match="residue-order"):
        attngen.compile({**attngen.load_spec("strided").to_dict(), "recompute": "store_p"})
    with pytest.raises(SpecError, match="store_p_limit"):
        attngen.compile({"name": "x", "store_p_limit": 10})
    with pytest.raises(SpecError, match="store_p_limit"):
        attngen.compile({"name": "x", "recompute": "store_p", "store_p_limit": 0})


def test_full_recompute_saves_only_the_inputs():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))

    def saved_bytes(spec):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attngen.compile(spec)(q, k, v)
        return sum(sizes)

    lse_bytes = saved_bytes({"name": "mem", "mask": "k <= q"})
    full_bytes = saved_bytes({"name": "mem", "mask": "k <= q", "recompute": "full"})
    inputs = 3 * q.numel() * q.element_size()
    assert full_bytes == inputs and lse_bytes == inputs + q.numel() * 4 + 2 * 20 * 4


def test_merging_halves_equals_the_whole_with_rows_that_see_no_key():
    # bottom-right causal with 8 queries and 4 keys: query rows 0-3 sit before every key
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 8, 16, generator=gen).to(DEVICE)
    k, v = (torch.randn(1, 2, 4, 16, generator=gen).to(DEVICE) for _ in range(2))
    whole, lse = attngen.compile("causal")(q, k, v, return_lse=True)
    assert torch.all(whole[:, :, :4] == 0) and torch.all(lse[:, :, :4] == -math.inf)
    exact, exact_lse = attngen.reference("causal")(q.double(), k.double(), v.double(), return_lse=True)
    assert torch.allclose(whole.double(), exact, atol=1e-5) and torch.equal(torch.isinf(lse), torch.isinf(exact_lse))
    assert torch.allclose(lse[:, :, 4:].double(), exact_lse[:, :, 4:], atol=1e-5)
    # the same keys, split by position: positions stay absolute, so the mask stays right
    first = attngen.compile({"name": "first", "params": {"split": 2}, "mask": "k <= q and k < split"})
    second = attngen.compile({"name": "second", "params": {"split": 2}, "mask": "k <= q and k >= split"})
    o1, l1 = first(q, k, v, return_lse=True)
    o2, l2 = second(q, k, v, return_lse=True)
    assert torch.all(l2[:, :, 4:6] == -math.inf)  # rows 4 and 5 see only the first half
    merged, merged_lse = attngen.merge_states(o1, l1, o2, l2)
    assert torch.allclose(merged, whole, atol=1e-6) and torch.all(merged[:, :, :4] == 0)
    assert torch.equal(torch.isinf(merged_lse), torch.isinf(lse))
    assert torch.allclose(merged_lse[:, :, 4:], lse[:, :, 4:], atol=1e-6)


def test_merge_states_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="merge_states"):
        attngen.merge_states(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, 5), torch.zeros(1, 2, 3))


def test_chunked_prefill_equals_one_pass():
    """The issue's acceptance case: a 1000-token prompt in chunks of 128 against the growing
    cache (bottom-right positions) equals one pass. Under the interpreter (about 9 s on two
    cores) it runs with H=2 and D=16; model-sized heads are for the GPU. The decoding path's
    version (up to 16 new tokens a step) is in test_decode.py."""
    op = attngen.compile("causal")
    gen = torch.Generator().manual_seed(3)
    t, d = 1000, 16
    q, k, v = (torch.randn(1, 2, t, d, generator=gen).to(DEVICE) for _ in range(3))
    whole = op(q, k, v)
    chunks = [op(q[:, :, s : s + 128], k[:, :, : s + 128], v[:, :, : s + 128]) for s in range(0, t, 128)]
    assert torch.allclose(torch.cat(chunks, dim=2), whole, atol=1e-6)
    exact = attngen.reference("causal")(q.double(), k.double(), v.double())
    assert torch.allclose(whole.double(), exact, atol=2e-5)


def test_merge_states_ignores_the_output_of_an_empty_side_and_keeps_float64():
    o1 = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    lse1 = torch.tensor([[[0.5, -math.inf, 1.0]]], dtype=torch.float64)
    o2 = torch.full((1, 1, 3, 4), float("nan"), dtype=torch.float64)  # garbage where lse2 is -inf
    lse2 = torch.full((1, 1, 3), -math.inf, dtype=torch.float64)
    o, lse = attngen.merge_states(o1, lse1, o2, lse2)
    assert torch.equal(o[0, 0, 0], o1[0, 0, 0]) and torch.all(o[0, 0, 1] == 0)
    assert lse.dtype == torch.float64 and torch.equal(lse, lse1)
    a, b = (torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    la, lb = (torch.randn(2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *x: attngen.merge_states(*x), (a, la, b, lb))
    with pytest.raises(ValueError, match="cast one of them"):
        attngen.merge_states(o1.half(), lse1, o1, lse1)


def test_full_recompute_saves_only_inputs_under_torch_compile():
    # inductor's partitioner merged a backward rerun of attention_fwd with the forward's call
    # and saved O and lse after all; the rerun now lives inside one backward op
    op = attngen.compile({"name": "rc_compile", "mask": "k <= q", "recompute": "full"})
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    eager = torch.autograd.grad(op(q, k, v).sum(), (q, k, v))
    sizes = []

    def pack(t):
        sizes.append(tuple(t.shape))
        return t

    compiled = torch.compile(lambda q, k, v: op(q, k, v).sum(), fullgraph=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    assert (1, 2, 20) not in sizes  # no lse saved
    for a, b in zip(grads, eager):
        assert torch.allclose(a, b)
