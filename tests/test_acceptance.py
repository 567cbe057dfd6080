"""The edge cases the core issue names, each checked against values computed independently."""

import math

import pytest
import torch

import attngen
from helpers import DEVICE


def leaf(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()


def test_fully_masked_row_is_zero_with_lse_minus_inf_and_no_gradient():
    spec = {"name": "row5", "mask": "k <= q and q != 5", "align": "top_left"}
    op = attngen.compile(spec)
    gen = torch.Generator().manual_seed(0)
    q, k, v = leaf(1, 2, 6, 8, gen=gen), leaf(1, 2, 10, 8, gen=gen), leaf(1, 2, 10, 8, gen=gen)
    do = torch.randn(1, 2, 6, 8, generator=gen).to(DEVICE)
    o, lse = op(q, k, v, return_lse=True)
    assert torch.all(o[:, :, 5] == 0)
    assert torch.all(lse[:, :, 5] == -math.inf)
    assert torch.isfinite(lse[:, :, :5]).all()
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    assert torch.all(dq[:, :, 5] == 0)

    # the same problem without row 5: identical key and value gradients
    q5 = q[:, :, :5].detach().clone().requires_grad_()
    k5, v5 = (t.detach().clone().requires_grad_() for t in (k, v))
    o5 = op(q5, k5, v5)
    dq5, dk5, dv5 = torch.autograd.grad(o5, (q5, k5, v5), do[:, :, :5])
    assert torch.equal(o[:, :, :5], o5)
    assert torch.allclose(dk, dk5, rtol=0, atol=1e-6) and torch.allclose(dv, dv5, rtol=0, atol=1e-6)
    assert torch.equal(dq[:, :, :5], dq5)


@pytest.mark.parametrize("poison", [1e10, math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masked_keys_change_nothing_even_when_huge_inf_or_nan(poison, dtype):
    op = attngen.compile({"name": "key0", "mask": "k == 0"})
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 2, 16, generator=gen).to(DEVICE, dtype)
    k = torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE, dtype)
    v = torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE, dtype)
    do = torch.randn(1, 2, 2, 16, generator=gen).to(DEVICE, dtype)

    def run(k_in):
        leaves = [t.clone().requires_grad_() for t in (q, k_in, v)]
        o, lse = op(*leaves, return_lse=True)
        return (o, lse, *torch.autograd.grad(o, leaves, do))

    clean = run(k)
    dirty_k = k.clone()
    dirty_k[:, :, 7, 3] = poison
    dirty_k[:, :, 19, :] = poison
    dirty = run(dirty_k)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), clean, dirty):
        if name == "dk":  # the poisoned rows of dK are gradients of masked keys: exactly 0
            assert torch.all(b[:, :, 1:] == 0)
        assert torch.equal(a, b), name
    # and the clean result is right: both queries see key 0 only
    assert torch.allclose(clean[0].float(), v[:, :, :1].float().expand(1, 2, 2, 16), atol=0)


def test_causal_window_of_four_sees_exactly_four_keys():
    op = attngen.compile("sliding_window", window=4)
    gen = torch.Generator().manual_seed(2)
    q, k = leaf(1, 1, 16, 16, gen=gen), leaf(1, 1, 16, 16, gen=gen)
    v = torch.eye(16).view(1, 1, 16, 16).to(DEVICE)  # one-hot rows: o[i] is row i's weights
    weights = op(q, k, v)[0, 0]
    for i in range(16):
        seen = set(torch.nonzero(weights[i] > 0).flatten().tolist())
        assert seen == set(range(max(0, i - 3), i + 1)), i
    assert set(torch.nonzero(weights[10] > 0).flatten().tolist()) == {7, 8, 9, 10}
    assert torch.allclose(weights.sum(-1), torch.ones(16, device=DEVICE), atol=1e-6)


@pytest.mark.parametrize("t_kv", [1, 17, 255, 257, 300])
def test_zero_query_averages_values(t_kv):
    op = attngen.compile("dense")
    gen = torch.Generator().manual_seed(t_kv)
    q = torch.zeros(1, 1, 1, 32, device=DEVICE)
    k = torch.randn(1, 1, t_kv, 32, generator=gen).to(DEVICE)
    v = torch.randn(1, 1, t_kv, 32, generator=gen).to(DEVICE)
    o, lse = op(q, k, v, return_lse=True)
    assert torch.allclose(o[0, 0, 0], v[0, 0].mean(0), atol=1e-5)
    assert abs(lse.item() - math.log(t_kv)) < 1e-5


def test_alibi_weight_falls_with_distance():
    op = attngen.compile("alibi")
    H, T = 4, 16
    q = torch.zeros(1, H, T, 16, device=DEVICE)
    k = torch.randn(1, H, T, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    v = torch.eye(T).expand(1, H, T, T).contiguous().to(DEVICE)
    slopes = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)], device=DEVICE)
    weights = op(q, k, v, slopes=slopes)[0]
    for h in range(H):
        row = weights[h, T - 1]  # the last query sees keys 0..15 at distances 15..0
        assert torch.all(row[1:] > row[:-1]), h  # nearer keys weigh more
        expected = torch.softmax(-slopes[h] * torch.arange(T - 1, -1, -1, device=DEVICE).float(), 0)
        assert torch.allclose(row, expected, atol=1e-6)
