"""dQ computed inside the dK/dV kernel (float32 atomics or bulk reductions) against the
reference and against the dQ kernel of its own (``ATTNGEN_DQ=0``), and the rules that pick
between them (:meth:`attngen.AttentionOp.dq_mode`)."""

from __future__ import annotations

import pytest
import torch

import attngen
from attngen import config
from helpers import DEVICE, SMALL_PARAMS, check_spec, dims, needs_kernels

#: bulk reductions need the tensor memory accelerator, which Triton's interpreter lacks
MODES = ["0", "1"] + (["2"] if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9 else [])


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", ["causal", "document", "sliding_window", "sigmoid_causal", "dilated_window", "alibi"])
def test_every_dq_mode_matches_the_reference(spec, mode, monkeypatch):
    # 45 positions: the last query tile reaches past T_Q; GQA (two query heads per key head
    # add into dQ from one dK/dV program); D_V != D_QK; dilated_window has a residue-order part
    monkeypatch.setenv("ATTNGEN_DQ", mode)
    check_spec(spec, dims(B=2, H=4, H_KV=2, T_Q=45, T_KV=45, D_QK=16, D_V=32), params=SMALL_PARAMS.get(spec))


@needs_kernels
@pytest.mark.parametrize("mode", MODES)
def test_keys_no_query_sees_add_nothing_to_dq_even_when_infinite(mode, monkeypatch):
    # bottom-right alignment: the 8 queries sit at positions 37..44 and see keys from 18 on
    # (window 20), so keys 0..17 are hidden from every query; keys 16 and 17 share a key tile
    # with visible keys, where dS is 0 but the product dS K would read them
    monkeypatch.setenv("ATTNGEN_DQ", mode)
    op = attngen.compile("sliding_window", window=20)
    gen = torch.Generator().manual_seed(5)
    q, k, v, do = (torch.randn(1, 2, t, 16, generator=gen).to(DEVICE) for t in (8, 45, 45, 8))
    runs = []
    for fill in (0.0, float("inf")):
        k_in = k.clone()
        k_in[:, :, :18] = fill
        leaves = [x.clone().requires_grad_() for x in (q, k_in, v)]
        op(*leaves).backward(do)
        runs.append([x.grad for x in leaves])
    (dq0, dk0, dv0), (dq_inf, dk_inf, dv_inf) = runs
    assert torch.isfinite(dq_inf).all()
    torch.testing.assert_close(dq_inf, dq0, rtol=0, atol=0)
    torch.testing.assert_close(dv_inf, dv0, rtol=0, atol=0)
    assert (dk_inf[:, :, :18] == 0).all() and (dv_inf[:, :, :18] == 0).all()


def test_dq_mode_rules(monkeypatch):
    monkeypatch.delenv("ATTNGEN_DQ", raising=False)
    op = attngen.compile("causal")
    dev = torch.device(DEVICE)
    on_hopper = DEVICE == "cuda" and not config.interpret_all() and torch.cuda.get_device_capability()[0] >= 9
    assert op.dq_mode(16, 16, dev) == (2 if on_hopper else 1)
    assert op.dq_mode(6, 16, dev) == 1  # 24-byte float32 rows: no bulk reductions
    assert op.dq_mode(128, 128, dev) == 0  # D = 128, a mask known at compile time: the dQ kernel
    assert op.dq_mode(16, 128, dev) == 0  # the larger head dim decides
    assert attngen.compile("document").dq_mode(128, 128, dev) == 1  # runtime mask: atomics, no descriptor
    dense = attngen.compile("dense")
    assert dense.dq_mode(16, 16, dev) == 0  # no mask: the dQ kernel
    for keeps_all in ("k >= 0", "k < T_KV", "q - k < 1000000"):  # every tile FULL: the same
        op_all = attngen.compile({"name": "keeps_all", "mask": keeps_all})
        assert op_all.mask_class == "dense" and op_all.dq_mode(16, 16, dev) == 0, keeps_all
    monkeypatch.setenv("ATTNGEN_DQ", "auto")
    assert dense.dq_mode(16, 16, dev) == 0
    monkeypatch.setenv("ATTNGEN_DQ", "1")
    assert dense.dq_mode(16, 16, dev) == 1  # forcing still fuses
    monkeypatch.delenv("ATTNGEN_DQ")
    assert op.dq_mode(16, 16, dev, stored_p=True) == 0
    assert op.dq_mode(16, 16, dev, input_grads=True) == 0
    monkeypatch.setenv("ATTNGEN_DQ", "1")
    assert op.dq_mode(16, 16, dev) == 1
    assert op.dq_mode(128, 128, dev) == 1
    monkeypatch.setenv("ATTNGEN_DQ", "0")
    assert op.dq_mode(16, 16, dev) == 0
    monkeypatch.setenv("ATTNGEN_DQ", "2")
    assert op.dq_mode(16, 16, dev) == (2 if on_hopper else 1)
    monkeypatch.delenv("ATTNGEN_DQ")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert op.dq_mode(16, 16, dev) == 0
    finally:
        torch.use_deterministic_algorithms(was)
    monkeypatch.setenv("ATTNGEN_DQ", "atomic")
    with pytest.raises(ValueError, match="ATTNGEN_DQ"):
        op.dq_mode(16, 16, dev)


@needs_kernels
def test_deterministic_backward_repeats_bit_for_bit(monkeypatch):
    monkeypatch.delenv("ATTNGEN_DQ", raising=False)
    op = attngen.compile("causal")
    gen = torch.Generator().manual_seed(9)
    q, k, v, do = (torch.randn(1, 2, 45, 16, generator=gen).to(DEVICE) for _ in range(4))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            op(*leaves).backward(do)
            grads.append([x.grad for x in leaves])
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
