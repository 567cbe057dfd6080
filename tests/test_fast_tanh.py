"""fast_tanh: the score's tanh through the GPU's tanh.approx.f32 (soft-capping, as in Gemma 2)."""

import math

import pytest
import torch

import attngen
from attngen import SpecError
from attngen.compiler import build
from helpers import check_spec, dims

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: tanh.approx.f32's largest relative error (PTX ISA: "maximum relative error 2^-10.987")
TANH_APPROX_REL = 2.0**-10.9


def softcap(cap: float, fast: bool) -> dict:
    spec = {"name": "cap_fast" if fast else "cap_exact", "mask": "k <= q", "score": "cap * tanh(s / cap)", "params": {"cap": cap}}
    return {**spec, "fast_tanh": True} if fast else spec


def test_fast_tanh_is_a_boolean_on_a_score_with_tanh():
    with pytest.raises(SpecError, match="fast_tanh.*true or false"):
        attngen.load_spec({**softcap(30.0, True), "fast_tanh": "yes"})
    with pytest.raises(SpecError, match="fast_tanh.*no tanh to approximate"):
        attngen.load_spec({"name": "plain", "mask": "k <= q", "fast_tanh": True})
    with pytest.raises(SpecError, match="fast_tanh.*no tanh to approximate"):
        attngen.load_spec({"name": "lin", "normalizer": "linear", "feature_map": "elu1", "mask": "k <= q", "fast_tanh": True})
    # the option changes the kernels, so it changes the digest; leaving it out hashes as before
    assert attngen.load_spec(softcap(30.0, True)).digest() != attngen.load_spec({**softcap(30.0, False), "name": "cap_fast"}).digest()
    assert "fast_tanh" not in attngen.load_spec(softcap(30.0, False)).to_dict()


def test_null_means_false_and_a_tanh_in_the_mask_stays_exact():
    assert attngen.load_spec({**softcap(30.0, False), "fast_tanh": None}).fast_tanh is False
    spec = {**softcap(30.0, True), "mask": "k <= q and tanh((q - k) / 8.0) < 0.9"}
    plan = build(spec).plan
    assert "_tanh(" not in plan.mask_code and "tl.sigmoid" in plan.mask_code
    assert "_tanh(" in plan.score_code and "_tanh(" in plan.dscore_code


def test_rendered_kernels_call_the_helper_only_with_fast_tanh():
    fast = build(softcap(30.0, True)).rendered.source
    exact = build(softcap(30.0, False)).rendered.source
    assert "def _tanh(" in fast and "_tanh((0.03333333333333333 * s), FAST_SIGMOID)" in fast
    assert "tanh.approx.f32 $0, $1;\", \"=r,r\", [x]" in fast
    assert "_tanh(" not in exact and "2.0 * tl.sigmoid(2.0 *" in exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_tanh_matches_the_reference(dtype):
    # on the CPU (Triton's interpreter) the helper takes the exact branch; on a GPU, bf16 takes
    # tanh.approx, whose error at cap 30 stays far inside the three-way rule's bf16 bound
    check_spec(softcap(30.0, True), dims(H=4, H_KV=2, T_Q=70, T_KV=70, D_QK=32), dtype)


@pytest.mark.gpu
@gpu
def test_fast_tanh_error_stays_within_its_documented_bound():
    # scores up to about +-12 against a cap of 4, so tanh saturates and its error is largest
    cap = 4.0
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, H, T, D = 2, 4, 384, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", generator=gen) for _ in range(3))
    q = q * 3.0
    do = torch.randn(B, H, T, D, device="cuda", generator=gen)
    ref = attngen.reference(softcap(cap, False))
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    o64 = ref(*leaves64)
    o64.backward(do.double())
    errs = {}
    for fast in (False, True):
        op = attngen.compile(softcap(cap, fast))
        leaves = [x.bfloat16().requires_grad_() for x in (q, k, v)]
        o = op(*leaves)
        o.backward(do.bfloat16())
        errs[fast] = [(o.double() - o64).abs().max().item()] + [
            ((x.grad.double() - y.grad).norm() / y.grad.norm()).item() for x, y in zip(leaves, leaves64)
        ]
    # each score is off by at most cap * 2^-10.9, so each weight by a factor within
    # exp(+-cap * 2^-10.9) and each normalised weight within exp(+-2 cap * 2^-10.9)
    eps = 2 * cap * TANH_APPROX_REL
    bound = errs[False][0] + math.expm1(eps) * v.abs().max().item() + 2.0**-8 * o64.abs().max().item()
    assert errs[True][0] <= bound, (errs, bound)
    # gradients: relative error of the same order as the exact kernel's in bf16
    for fast_err, exact_err in zip(errs[True][1:], errs[False][1:]):
        assert fast_err <= max(2 * exact_err, 2e-2), errs
