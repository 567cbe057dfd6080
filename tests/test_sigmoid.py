"""Sigmoid attention (Ramapuram et al., 2024): o = sum_k sigmoid(score + bias) v_k."""

import math

import pytest
import torch

import attngen
from attngen import SpecError, UnsupportedError
from helpers import DEVICE, check_spec, dims, with_and_without_skipping


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "spec, shape",
    [
        ({"name": "sig_win", "normalizer": "sigmoid", "mask": "k <= q and q - k < 11", "score": "3.0 * tanh(s / 3.0)"}, dims(H=6, H_KV=2, T_Q=37, T_KV=50, D_QK=24, D_V=16)),
        ({"name": "sig_dense", "normalizer": "sigmoid", "bias": -2.5}, dims(B=2, H=5, H_KV=1, T_Q=1, T_KV=70, D_QK=80)),
        ({"name": "sig_alibi", "normalizer": "sigmoid", "inputs": {"slopes": {"dtype": "float32", "shape": ["H"]}},
          "mask": "k <= q", "score": "s - slopes[h] * (q - k)"}, dims(H=4, H_KV=4, T_Q=130, T_KV=130, D_QK=8)),
    ],
)  # fmt: skip
def test_sigmoid_matches_reference(spec, shape, dtype):
    check_spec(spec, shape, dtype)


def test_reference_is_the_quadratic_form():
    spec = {"name": "sig", "normalizer": "sigmoid", "mask": "k <= q"}
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 9, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    s = q @ k.transpose(-1, -2) / 2.0
    p = torch.sigmoid(s - math.log(9)) * torch.ones(9, 9, dtype=torch.bool).tril()
    assert torch.allclose(attngen.reference(spec)(q, k, v), p @ v)


def test_rows_that_see_no_key_are_zero_and_lse_is_refused():
    op = attngen.compile({"name": "sig_none", "normalizer": "sigmoid", "mask": "k <= q and q != 3", "align": "top_left"})
    q, k, v = (torch.randn(1, 1, 6, 8, device=DEVICE).requires_grad_() for _ in range(3))
    o = op(q, k, v)
    assert torch.all(o[0, 0, 3] == 0)
    dq = torch.autograd.grad(o.sum(), q)[0]
    assert torch.all(dq[0, 0, 3] == 0)
    with pytest.raises(UnsupportedError, match="no log-sum-exp"):
        op(q, k, v, return_lse=True)


def test_bias_is_only_for_sigmoid():
    with pytest.raises(SpecError) as info:
        attngen.load_spec({"name": "x", "bias": -1.0})
    assert info.value.field == "bias"


def test_skipping_does_not_change_sigmoid_results():
    op = attngen.compile({"name": "sig_skip", "normalizer": "sigmoid", "mask": "k <= q and q - k < 20"})
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 150, 16, generator=gen).to(DEVICE) for _ in range(3))

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = op(*leaves)
        return (o, *torch.autograd.grad(o.sum(), leaves))

    with_skip, without = with_and_without_skipping(run)
    for a, b in zip(with_skip, without):
        assert torch.allclose(a, b, atol=1e-5)
