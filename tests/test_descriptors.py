"""Tiles loaded through tensor descriptors (the tensor memory accelerator) against pointer loads.

Each descriptor rank must give what the reference gives, and a rank-2 descriptor, which
addresses all heads' rows as one matrix, must never let a tile that reaches past the end of
a head read the next head's rows into the result.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import attngen
from attngen.op import descriptor_rank
from helpers import DEVICE, SMALL_PARAMS, check_spec, dims, needs_kernels

#: the zoo's softmax and sigmoid specs (linear attention's kernels always load through pointers)
ZOO = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "specs").glob("*.yaml")
             if "normalizer: linear" not in p.read_text())


@pytest.mark.parametrize("name", ZOO)
def test_zoo_spec_with_pointer_loads_and_the_dq_kernel_matches_the_reference(name, monkeypatch):
    # the interpreter takes descriptors wherever the tensors allow them, and fuses dQ into the
    # dK/dV kernel at these head dims, so the pointer loads of older GPUs and unaligned
    # tensors, and the dQ kernel of D = 128 on the H200 and of deterministic runs, get their
    # own pass over the zoo
    monkeypatch.setenv("ATTNGEN_DESCRIPTORS", "0")
    monkeypatch.setenv("ATTNGEN_DQ", "0")
    check_spec(name, dims(B=2, H=3, H_KV=1, T_Q=37, T_KV=45, D_QK=24, D_V=16), torch.float16,
               params=SMALL_PARAMS.get(name))


@needs_kernels
@pytest.mark.parametrize("rank", ["0", "2", "4"])
@pytest.mark.parametrize("spec", ["causal", "document", "sliding_window", "alibi", "prefix_lm"])
def test_every_descriptor_rank_matches_the_reference(spec, rank, monkeypatch):
    # 45 positions: every kernel's last tile reaches past the end of each head; GQA, D_V != D_QK
    monkeypatch.setenv("ATTNGEN_DESCRIPTORS", rank)
    check_spec(spec, dims(B=2, H=4, H_KV=2, T_Q=45, T_KV=45, D_QK=16, D_V=32), params=SMALL_PARAMS.get(spec))


@needs_kernels
def test_transposed_layout_takes_rank_four_and_matches_the_reference(monkeypatch):
    monkeypatch.delenv("ATTNGEN_DESCRIPTORS", raising=False)

    def bthd(q, k, v):  # [B, T, H, D] storage seen as [B, H, T, D], as after a projection
        return tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))

    probe = bthd(*(torch.zeros(2, 3, 20, 16, device=DEVICE) for _ in range(3)))
    assert descriptor_rank(list(probe[:2]), probe[0].device) == 4
    check_spec("causal", dims(B=2, H=4, H_KV=2, T_Q=45, T_KV=45, D_QK=16), layout=bthd)


@needs_kernels
def test_rank_two_never_reads_the_next_heads_rows(monkeypatch):
    B, H, T, D = 2, 2, 45, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(B, H, T, D, generator=gen).to(DEVICE) for _ in range(4))
    for x in (q, k, v, do):  # head 1 and batch 1 hold NaN: a stray read of their rows shows
        x[:, 1] = float("nan")
        x[1] = float("nan")
    monkeypatch.setenv("ATTNGEN_DESCRIPTORS", "2")
    assert descriptor_rank([k, v], k.device) == 2
    op = attngen.compile("causal")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    op(*leaves).backward(do)
    monkeypatch.setenv("ATTNGEN_DESCRIPTORS", "0")
    alone = [x[:1, :1].clone().requires_grad_() for x in (q, k, v)]  # batch 0, head 0 by itself
    o_alone = op(*alone)
    o_alone.backward(do[:1, :1])
    monkeypatch.setenv("ATTNGEN_DESCRIPTORS", "2")
    o = op(*[x.detach() for x in leaves])
    torch.testing.assert_close(o[:1, :1], o_alone, rtol=1e-5, atol=1e-5)
    for leaf, ref in zip(leaves, alone):
        torch.testing.assert_close(leaf.grad[:1, :1], ref.grad, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_descriptor_rank_follows_layout_alignment_and_the_switch(monkeypatch):
    monkeypatch.delenv("ATTNGEN_DESCRIPTORS", raising=False)
    dev = torch.device(DEVICE)
    x = torch.zeros(2, 3, 40, 16, device=DEVICE)
    assert descriptor_rank([x, x], dev) == 2
    assert descriptor_rank([x, torch.zeros(2, 40, 3, 16, device=DEVICE).transpose(1, 2)], dev) == 4
    assert descriptor_rank([x, torch.zeros(2, 3, 40, 5, device=DEVICE)], dev) == 0  # 20-byte rows
    assert descriptor_rank([x, x[:1].expand(2, -1, -1, -1)], dev) == 0  # broadcast over the batch
    assert descriptor_rank([x, torch.zeros(2, 3, 40, 17, device=DEVICE)[..., 1:]], dev) == 0  # unaligned base
    odd = torch.zeros(3 * 40 * 16 + 7, device=DEVICE).as_strided((1, 3, 40, 16), (7, 640, 16, 1))
    assert descriptor_rank([x, odd], dev) == 2  # a size-1 dimension's stride does not matter
    monkeypatch.setenv("ATTNGEN_DESCRIPTORS", "4")
    assert descriptor_rank([x, x], dev) == 4
    monkeypatch.setenv("ATTNGEN_DESCRIPTORS", "0")
    assert descriptor_rank([x, x], dev) == 0
    monkeypatch.setenv("ATTNGEN_DESCRIPTORS", "3")
    with pytest.raises(ValueError, match="ATTNGEN_DESCRIPTORS"):
        descriptor_rank([x, x], dev)
