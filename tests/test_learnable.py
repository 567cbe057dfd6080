"""Learnable score parameters: float runtime inputs read in the score take gradients, summed
in the dQ kernel where each was read, checked against autograd on the float64 reference."""

from __future__ import annotations

import pytest
import torch

import attngen
from attngen.errors import UnsupportedError
from helpers import DEVICE

CASES = {
    # per-head slopes: one address per (b, h) program, summed over the whole tile
    "alibi": ({"name": "learn_alibi", "inputs": {"slopes": {"dtype": "float32", "shape": ["H"]}},
               "mask": "k <= q", "score": "s - slopes[h] * (q - k)"}, lambda g, B, H, T: {"slopes": torch.rand(H, generator=g)}),
    # a relative-position table indexed by q - k: an address per pair (T5 / Shaw-style bias)
    "relative": ({"name": "learn_rel", "params": {"r": 31}, "inputs": {"rel": {"dtype": "float32", "shape": ["H", 63]}},
                  "mask": "abs(q - k) <= r", "score": "s + rel[h, q - k + r]"}, lambda g, B, H, T: {"rel": torch.randn(H, 63, generator=g)}),
    # per-query and per-key biases: summed over keys / over queries first; a product with s
    "rows_cols": ({"name": "learn_rc", "inputs": {"qb": {"dtype": "float32", "shape": ["B", "T_Q"]},
                                                  "kg": {"dtype": "float32", "shape": ["B", "T_KV"]}},
                   "score": "s * kg[b, k] + qb[b, q]"},
                  lambda g, B, H, T: {"qb": torch.randn(B, T, generator=g), "kg": 1 + 0.1 * torch.randn(B, T, generator=g)}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_learnable_inputs_get_the_reference_gradients(case):
    spec, make = CASES[case]
    op, ref = attngen.compile(spec), attngen.reference(spec)
    B, H, T, D = 2, 2, 40, 16
    gen = torch.Generator().manual_seed(1)
    q, k, v, w = (torch.randn(B, H, T, D, generator=gen) for _ in range(4))
    inputs = make(gen, B, H, T)

    def grads(fn, dtype):
        leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
        ins = {n: t.to(DEVICE, dtype).requires_grad_() for n, t in inputs.items()}
        o = fn(*leaves, **ins)
        got = torch.autograd.grad((o * w.to(DEVICE, dtype)).sum(), [*leaves, *ins.values()])
        return [x.double().cpu() for x in got]

    for name, got, want in zip(["q", "k", "v", *inputs], grads(op, torch.float32), grads(ref, torch.float64)):
        scale = want.abs().max().item() + 1e-12
        assert (got - want).abs().max().item() <= 1e-5 * scale + 1e-6, name


def test_only_inputs_the_score_reads_take_gradients():
    doc = attngen.compile("document")
    q = k = v = torch.randn(1, 1, 8, 16, device=DEVICE)
    ids = torch.zeros(1, 8, device=DEVICE, dtype=torch.float32).requires_grad_()
    mask_only = attngen.compile({"name": "fmask", "inputs": {"w": {"dtype": "float32", "shape": ["B", "T_KV"]}}, "mask": "w[b, k] > 0.5"})
    with pytest.raises(UnsupportedError, match="w: requires grad, but only float inputs that the score reads"):
        mask_only(q, k, v, w=ids)
    assert doc.plan.grad_loads == ()


@pytest.mark.parametrize("recompute", ["lse", "full"])
def test_learnable_inputs_under_torch_compile(recompute):
    spec, make = CASES["relative"]
    spec = {**spec, "name": f"learn_rel_{recompute}", "recompute": recompute}
    op, ref = attngen.compile(spec), attngen.reference(spec)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen) for _ in range(3))
    rel = make(gen, 1, 2, 24)["rel"]

    def grads(fn, dtype):
        leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v, rel)]
        loss = (fn(*leaves[:3], rel=leaves[3]) ** 2).sum()
        return [x.double().cpu() for x in torch.autograd.grad(loss, leaves)]

    compiled = torch.compile(lambda q, k, v, rel: op(q, k, v, rel=rel), fullgraph=True)
    for name, got, want in zip("q k v rel".split(), grads(compiled, torch.float32), grads(ref, torch.float64)):
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item() + 1e-6, name
