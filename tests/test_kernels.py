"""Generated kernels against the reference (three-way rule), forward and backward.

On a machine without a GPU these run under Triton's interpreter on tiny shapes.
"""

from pathlib import Path

import pytest
import torch

from helpers import DEVICE, SMALL_PARAMS, check_spec, dims, non_contiguous

ZOO = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "specs").glob("*.yaml"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_spec_matches_reference(name, dtype):
    shape = dims(B=2, H=3, H_KV=1, T_Q=37, T_KV=45, D_QK=24, D_V=16)
    check_spec(name, shape, dtype, params=SMALL_PARAMS.get(name))


@pytest.mark.parametrize("t_q, t_kv", [(1, 1), (1, 17), (17, 1), (63, 63), (100, 129), (129, 100), (8, 4)])
def test_lengths_that_are_not_tile_multiples(t_q, t_kv):
    check_spec("sliding_window", dims(T_Q=t_q, T_KV=t_kv), params={"window": 9})


@pytest.mark.parametrize("h, h_kv", [(3, 1), (6, 2), (5, 5), (10, 2)])
def test_gqa_groups(h, h_kv):
    check_spec("alibi", dims(H=h, H_KV=h_kv, T_Q=20, T_KV=33))


@pytest.mark.parametrize("d_qk, d_v", [(1, 1), (3, 5), (80, 80), (33, 64), (256, 8)])
def test_head_dims(d_qk, d_v):
    check_spec("causal", dims(T_Q=19, T_KV=19, D_QK=d_qk, D_V=d_v))


def test_top_left_alignment():
    check_spec({"name": "tl", "mask": "k <= q", "align": "top_left"}, dims(T_Q=12, T_KV=30))


def test_non_contiguous_and_expanded_inputs():
    check_spec("gemma2_local", dims(B=2, H=4, H_KV=2, T_Q=21, T_KV=26), params={"window": 7, "cap": 3.0}, layout=non_contiguous)


def test_non_contiguous_output_gradient():
    import attngen

    op = attngen.compile("causal")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 18, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    o = op(q, k, v)
    do_full = torch.randn(1, 18, 2, 32, generator=g).to(DEVICE)
    do = do_full.transpose(1, 2)[..., ::2]  # strides neither contiguous nor unit in the last dim
    assert not do.is_contiguous()
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attngen.reference("causal")(q64, k64, v64)
    grads64 = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for a, b in zip(grads, grads64):
        assert (a.double() - b).abs().max() < 1e-5


def test_lse_gradient_flows():
    import attngen

    op = attngen.compile("softcap", cap=2.0)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 15, 8, generator=g, dtype=torch.float64).float().to(DEVICE).requires_grad_() for _ in range(3))
    o, lse = op(q, k, v, return_lse=True)
    loss = (o * 0.3).sum() + (lse * torch.linspace(-1, 1, 15, device=DEVICE)).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attngen.reference("softcap", cap=2.0)(q64, k64, v64, return_lse=True)
    loss64 = (o64 * 0.3).sum() + (lse64 * torch.linspace(-1, 1, 15, device=DEVICE).double()).sum()
    grads64 = torch.autograd.grad(loss64, (q64, k64, v64))
    for a, b in zip(grads, grads64):
        assert (a.double() - b).abs().max() < 1e-5


def test_stride_zero_inputs_reach_the_kernel():
    # the three-way check must hand the kernels the caller's layout, not a contiguous copy
    import attngen
    from attngen.check import compare

    op = attngen.compile("causal")
    seen = []

    def spy(q, k, v, **kw):
        seen.append(k.stride())
        return op(q, k, v, **kw)

    spy.spec = op.spec
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 12, 8, generator=g).to(DEVICE)
    k = torch.randn(1, 1, 12, 8, generator=g).to(DEVICE).expand(2, 1, 12, 8)
    v = torch.randn(1, 1, 12, 8, generator=g).to(DEVICE).expand(2, 1, 12, 8)
    rows = compare(spy, attngen.reference("causal"), q, k, v, {})
    assert all(r.ok for r in rows) and seen[0][0] == 0
