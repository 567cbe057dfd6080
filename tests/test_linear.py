"""Linear attention (issue #6): o_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps).

Every kernel result is checked by the three-way rule against the float64 quadratic reference
(forward and the gradients of q, k and v through autograd on that reference).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attngen
import attngen.linear
from attngen import ShapeError, SpecError, UnsupportedError
from attngen.check import compare, format_rows
from attngen.features import apply_feature_map, performer_features
from attngen.linear import KERNELS, SM90_SHARED_MEMORY, LinearLaunch, launch_candidates, shared_memory_estimate
from helpers import DEVICE, non_contiguous

MAPS = ["identity", "elu1", "relu", "taylor2", "performer"]


def linear_spec(kind, mask="k <= q", normalize=True, chunk=16, **extra):
    fmap = {"kind": "performer", "features": 24, "seed": 7} if kind == "performer" else kind
    return {"name": f"lin_{kind}", "normalizer": "linear", "feature_map": fmap, "mask": mask, "normalize": normalize,
            "tiles": {"chunk": [chunk]}, **extra}  # fmt: skip


def check_linear(spec, B=1, H=2, H_KV=1, T_Q=37, T_KV=37, D_QK=12, D_V=8, dtype=torch.float32, seed=0, positive=False, layout=None):
    """Compile ``spec``, run it on random inputs, assert the three-way rule for o, dq, dk, dv."""
    op = attngen.compile(spec)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=gen) for s in ((B, H, T_Q, D_QK), (B, H_KV, T_KV, D_QK), (B, H_KV, T_KV, D_V)))
    if positive:  # identity features with a denominator: keep phi(q).phi(k) away from 0
        q, k = q.abs() + 0.1, k.abs() + 0.1
    q, k, v = (t.to(device=DEVICE, dtype=dtype) for t in (q, k, v))
    if layout is not None:
        q, k, v = layout(q, k, v)
    rows = compare(op, attngen.reference(op.spec), q, k, v, {}, generator=gen)
    assert [r.name for r in rows] == ["o", "dq", "dk", "dv"]
    assert all(r.ok for r in rows), f"{spec}\n{format_rows(rows)}"
    return op


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "plain"])
@pytest.mark.parametrize("mask", ["k <= q", None], ids=["causal", "noncausal"])
@pytest.mark.parametrize("kind", MAPS)
def test_every_feature_map_matches_reference(kind, mask, normalize):
    # T = 37 is not a multiple of the chunk of 16; T_Q != T_KV puts queries at an offset
    check_linear(linear_spec(kind, mask, normalize), T_Q=37, T_KV=45, positive=kind == "identity" and normalize)


@pytest.mark.parametrize("t_q, t_kv, align", [(1, 1, "bottom_right"), (1, 45, "bottom_right"), (45, 20, "bottom_right"),
                                              (20, 45, "top_left"), (64, 64, "bottom_right")])  # fmt: skip
def test_lengths_and_alignment(t_q, t_kv, align):
    check_linear(linear_spec("elu1", align=align), T_Q=t_q, T_KV=t_kv)


@pytest.mark.parametrize("width", [5, 16, 24, 40])
def test_chunk_local_masks(width):
    # chunk-local widths below, equal to, between and above the kernel chunk of 16
    spec = linear_spec("elu1", mask="q // w == k // w and k <= q", params={"w": width})
    check_linear(spec, T_Q=50, T_KV=50)


@pytest.mark.parametrize("kind", ["elu1", "taylor2"])
@pytest.mark.parametrize("h, h_kv", [(4, 2), (3, 1)])
def test_gqa(kind, h, h_kv):
    check_linear(linear_spec(kind), B=2, H=h, H_KV=h_kv, T_Q=30, T_KV=30)


@pytest.mark.parametrize("kind, d_qk, d_v", [("elu1", 16, 16), ("elu1", 24, 8), ("relu", 80, 80), ("performer", 5, 3),
                                             ("taylor2", 16, 24)])  # fmt: skip
def test_head_dims(kind, d_qk, d_v):
    check_linear(linear_spec(kind, mask=None if kind == "relu" else "k <= q"), T_Q=25, T_KV=25, D_QK=d_qk, D_V=d_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["elu1", "taylor2", "performer"])
def test_half_precision(kind, dtype):
    check_linear(linear_spec(kind), H=4, H_KV=2, T_Q=40, T_KV=40, D_QK=16, D_V=16, dtype=dtype)


def test_non_contiguous_inputs():
    check_linear(linear_spec("elu1"), B=2, H=2, H_KV=2, T_Q=21, T_KV=21, layout=non_contiguous)


def test_chunk_size_does_not_change_results():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=gen).to(DEVICE) for _ in range(3))
    outs = []
    for chunk in (16, 32, 64):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = attngen.compile(linear_spec("elu1", chunk=chunk))(*leaves)
        outs.append((o, *torch.autograd.grad(o.sum(), leaves)))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shift", [8.0, 40.0, 100.0])
def test_bf16_elu1_with_vanishing_features_stays_finite(shift):
    # large negative q and k: elu(x) + 1 = (exp(x) - 1) + 1 cancels in bf16 (and in float32 past
    # x = -17), phi(q).phi(k) vanishes against eps and underflows at the larger shifts; outputs
    # and gradients must stay finite and agree with the float32 reference on the same inputs
    op = attngen.compile(linear_spec("elu1"))
    gen = torch.Generator().manual_seed(2)
    q = (torch.randn(1, 2, 40, 16, generator=gen) * 0.5 - shift).to(torch.bfloat16)
    k = (torch.randn(1, 1, 40, 16, generator=gen) * 0.5 - shift).to(torch.bfloat16)
    v = torch.randn(1, 1, 40, 16, generator=gen).to(torch.bfloat16)
    do = torch.randn(1, 2, 40, 16, generator=gen)
    leaves = [t.clone().to(DEVICE).requires_grad_() for t in (q, k, v)]
    o = op(*leaves)
    got = (o, *torch.autograd.grad(o, leaves, do.to(DEVICE, torch.bfloat16)))
    wide = [t.float().requires_grad_() for t in (q, k, v)]
    o32 = attngen.reference(op.spec)(*wide)
    want = (o32, *torch.autograd.grad(o32, wide, do))
    for name, x, ref in zip(("o", "dq", "dk", "dv"), got, want):
        x = x.detach().float().cpu()
        assert torch.isfinite(x).all(), f"{name} has inf or nan at shift {shift}"
        ref = ref.detach()
        scale = max(float(ref.abs().max()), 1e-30)
        assert float((x - ref).abs().max()) <= 3e-2 * scale, f"{name}: {float((x - ref).abs().max())} vs max {scale}"


def test_reference_is_the_quadratic_form():
    spec = linear_spec("elu1")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 9, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    a = (torch.nn.functional.elu(q) + 1) @ (torch.nn.functional.elu(k) + 1).transpose(-1, -2)
    a = a * torch.ones(9, 9, dtype=torch.bool).tril()
    want = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    assert torch.allclose(attngen.reference(spec)(q, k, v), want)


def test_taylor2_features_expand_exp_to_second_order():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    s = 1 / math.sqrt(6)
    dot = float(apply_feature_map("taylor2", x, scale=s) @ apply_feature_map("taylor2", y, scale=s))
    t = s * float(x @ y)
    assert abs(dot - (1 + t + t * t / 2)) < 1e-12


def test_performer_features_estimate_exp():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 8, generator=gen, dtype=torch.float64) * 0.5
    s = 1 / math.sqrt(8)
    estimates = []
    for seed in range(4):
        w = performer_features(4096, 8, seed=seed).double()
        off_diagonal = w[:8] @ w[:8].T * (1 - torch.eye(8, dtype=torch.float64))  # one orthogonal block
        assert float(off_diagonal.abs().max()) < 1e-5
        estimates.append(float(apply_feature_map("performer", x, scale=s, w=w) @ apply_feature_map("performer", y, scale=s, w=w)))
    assert abs(sum(estimates) / len(estimates) / math.exp(s * float(x @ y)) - 1) < 0.05


def test_performer_redraw_per_call_uses_each_call_features():
    spec = {"name": "perf_redraw", "normalizer": "linear", "mask": "k <= q", "tiles": {"chunk": 16},
            "feature_map": {"kind": "performer", "features": 16, "seed": 5, "redraw": "per_call"}}  # fmt: skip
    op = attngen.compile(spec)
    ref = attngen.reference(spec)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 20, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (q, k, v)]
    o_first = op(*leaves)
    assert op.last_draw == 0
    o_second = op(*leaves)
    assert op.last_draw == 1
    assert not torch.allclose(o_first, o_second)
    for o, draw in ((o_first, 0), (o_second, 1)):
        wide = [t.clone().requires_grad_() for t in (q, k, v)]
        o64 = ref(*wide, draw=draw)
        assert torch.allclose(o.double().cpu(), o64, atol=1e-5)
        # the backward of each call uses that call's features
        grads = torch.autograd.grad(o.sum(), leaves)
        for g, g64 in zip(grads, torch.autograd.grad(o64.sum(), wide)):
            assert torch.allclose(g.double().cpu(), g64, atol=1e-4)


def test_return_lse_and_second_derivative_are_refused():
    op = attngen.compile(linear_spec("relu"))
    q, k, v = (torch.randn(1, 1, 8, 16, device=DEVICE).requires_grad_() for _ in range(3))
    with pytest.raises(UnsupportedError, match="no log-sum-exp"):
        op(q, k, v, return_lse=True)
    with pytest.raises(UnsupportedError, match="no log-sum-exp"):
        attngen.reference(op.spec)(q, k, v, return_lse=True)
    (dq,) = torch.autograd.grad(op(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        dq.sum().backward()


def test_taylor2_refuses_large_head_dims():
    op = attngen.compile(linear_spec("taylor2"))
    q, k, v = (torch.randn(1, 1, 4, 40, device=DEVICE) for _ in range(3))
    with pytest.raises(ShapeError, match="D_QK=40.*taylor2.*up to 32"):
        op(q, k, v)


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"feature_map": None}, "feature_map", "missing"),
        ({"feature_map": "softplus"}, "feature_map.kind", "not one of identity, elu1"),
        ({"feature_map": {"kind": "performer"}}, "feature_map.features", "number of random features"),
        ({"feature_map": {"kind": "performer", "features": 8, "redraw": "sometimes"}}, "feature_map.redraw", "never, per_call"),
        ({"feature_map": {"kind": "elu1", "features": 8}}, "feature_map.features", "only the performer"),
        ({"feature_map": {"kind": "elu1", "size": 8}}, "feature_map.size", "unknown key"),
        ({"score": "s * 2.0"}, "score", "no score"),
        ({"scale": 0.5}, "scale", "unscaled"),
        ({"normalize": False, "eps": 1e-3}, "eps", "remove eps"),
        ({"eps": -1.0}, "eps", "positive"),
        ({"normalize": "yes"}, "normalize", "true or false"),
        ({"recompute": "full"}, "recompute", "remove recompute"),
        ({"tiles": {"chunk": [48]}}, "tiles.chunk", "not one of"),
    ],
)  # fmt: skip
def test_spec_errors_name_the_field(change, field, message):
    spec = {**linear_spec("elu1"), **change}
    with pytest.raises(SpecError) as info:
        attngen.load_spec(spec)
    assert info.value.field == field
    assert message in str(info.value)


def test_linear_fields_on_other_normalizers_are_rejected():
    for key, value in (("feature_map", "elu1"), ("normalize", True), ("eps", 1e-6)):
        with pytest.raises(SpecError) as info:
            attngen.load_spec({"name": "x", key: value})
        assert info.value.field == key
    with pytest.raises(SpecError, match="only the linear normalizer has chunks"):
        attngen.load_spec({"name": "x", "tiles": {"chunk": 16}})


@pytest.mark.parametrize("mask", ["k <= q and q - k < 8", "k < q", "q // 8 == k // 8", "q != k"])
def test_masks_a_linear_kernel_cannot_honour(mask):
    with pytest.raises(UnsupportedError) as info:
        attngen.load_spec(linear_spec("elu1", mask=mask))
    assert "normalizer 'linear'" in str(info.value) and repr(mask) in str(info.value)


def test_custom_op_passes_opcheck_and_compiles_fullgraph():
    op = attngen.compile(linear_spec("performer"))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    torch.library.opcheck(torch.ops.attngen.linear_fwd.default, (q, k, v, None, op.op_id))

    def layer(q, k, v):
        return (op(q * 2.0, k, v) ** 2).sum()

    loss = torch.compile(layer, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_eager = layer(q, k, v)
    assert torch.allclose(loss, loss_eager)
    for a, b in zip(grads, torch.autograd.grad(loss_eager, (q, k, v))):
        assert torch.allclose(a, b)


def test_linear_bench_reports_fla_unavailable_and_formats_rows():
    from attngen.linear_bench import fla_kernel, report

    kernel, status = fla_kernel()
    if kernel is None:
        assert status.startswith("unavailable: ")
    rows = [{"D": 64, "T": 2048, "B": 8, "H": 16, "mode": "fwd", "attngen_ms": 0.5, "fla_ms": None, "fla": status},
            {"D": 64, "T": 2048, "B": 8, "H": 16, "mode": "fwd+bwd", "attngen_ms": 1.0, "fla_ms": 2.0, "fla": "available"}]  # fmt: skip
    launches = {"D=64, default": {"linear_fwd": "chunk 64, blocks 64x64, 3 stages"}}
    text = report({"meta": {"gpu": "H200", "dtype": "bfloat16", "tokens": 16384, "spec": "linear_elu", "launches": launches},
                   "rows": rows})  # fmt: skip
    assert f"| 64 | 2048 | 8 | 16 | fwd | default | 0.500 | — | — | {status} |" in text
    assert "| 64 | 2048 | 8 | 16 | fwd+bwd | default | 1.000 | 2.000 | 2.00 | available |" in text
    assert "- D=64, default: linear_fwd chunk 64, blocks 64x64, 3 stages" in text


@pytest.mark.parametrize(
    "kind, mask, normalize, h_kv",
    [("elu1", "k <= q", True, 1), ("elu1", None, False, 2), ("relu", "q // w == k // w and k <= q", True, 1),
     ("identity", "k <= q", False, 2), ("taylor2", "k <= q", True, 1), ("taylor2", None, True, 2),
     ("performer", "q // w == k // w and k <= q", False, 1), ("performer", None, True, 2)],
)  # fmt: skip
def test_features_and_value_columns_split_over_programs(monkeypatch, kind, mask, normalize, h_kv):
    # blocks of 16 features and 16 value columns: two or more feature blocks and three value
    # blocks, so every output is added up from several programs' shares (with GQA also
    # over each group's query heads)
    monkeypatch.setattr(attngen.linear, "MAX_STATE_BLOCK", 16)
    extra = {"params": {"w": 7}} if mask and "w" in mask else {}
    d_qk = 5 if kind == "taylor2" else 20  # taylor2: 31 features
    op = check_linear(linear_spec(kind, mask, normalize, **extra), H=2, H_KV=h_kv, T_Q=21, T_KV=26, D_QK=d_qk, D_V=40,
                      positive=kind == "identity" and normalize)  # fmt: skip
    features = 24 if kind == "performer" else 31 if kind == "taylor2" else d_qk
    for name in KERNELS:
        launch = op.launch_for(name, d_qk, 40, torch.float32, torch.device(DEVICE))
        assert launch.blocks(features, 40) == (2, 3), (name, launch)


def test_launch_candidates_take_the_spec_chunks_then_the_fewest_programs():
    L = LinearLaunch
    elu = launch_candidates(attngen.compile("linear_elu").plan, 128, 128)  # chunks 64, 32, 16
    # blocks of at most 64 (MAX_STATE_BLOCK), the value block at least the feature block
    assert elu[:6] == [L(64, 64, 64, 3), L(64, 64, 64, 2), L(64, 32, 64, 3), L(64, 32, 64, 2), L(64, 32, 32, 3),
                       L(64, 32, 32, 2)]  # fmt: skip
    assert elu[2 * len(elu) // 3] == L(64, 64, 64, 1) and elu[-1] == L(16, 16, 16, 1)  # then one stage
    assert all(c.block_v >= c.block_f for c in elu)
    # taylor2 at D_QK = 16: 273 features in five blocks of 64; D_V = 256 in four blocks of 64
    taylor = launch_candidates(attngen.compile("based_taylor").plan, 16, 256)  # chunks 32, 16
    assert taylor[0] == L(32, 64, 64, 3) and taylor[0].blocks(273, 256) == (5, 4)
    # a value head narrower than the features: its block is raised to the feature block's
    narrow = launch_candidates(attngen.compile("linear_elu").plan, 33, 16)
    assert narrow[0] == L(64, 64, 64, 3) and narrow[0].blocks(33, 16) == (1, 1)
    assert {(c.block_f, c.block_v) for c in narrow} == {(64, 64), (32, 32), (16, 16)}
    # a feature block of 16 takes only value blocks of 16; against wider ones it is raised to
    # 32 (16 x 32 read outside shared memory on the H200)
    relu = launch_candidates(attngen.compile("linear_relu").plan, 8, 24)
    assert {(c.block_f, c.block_v) for c in relu} == {(32, 32), (16, 16)} and relu[0].blocks(8, 24) == (1, 1)
    wide = launch_candidates(attngen.compile("linear_elu").plan, 32, 128)
    assert (32, 64) in {(c.block_f, c.block_v) for c in wide} and all(c.block_v == 16 for c in wide if c.block_f == 16)


def test_choose_launch_takes_the_first_candidate_whose_compiled_kernel_fits():
    op = attngen.compile("linear_elu")
    candidates = launch_candidates(op.plan, 64, 64)
    compiled = []

    def shared(launch):  # the first two candidates need too much
        compiled.append(launch)
        return SM90_SHARED_MEMORY + 1 if len(compiled) <= 2 else SM90_SHARED_MEMORY

    got = op.choose_launch("linear_fwd", 64, 64, torch.bfloat16, SM90_SHARED_MEMORY, shared)
    assert compiled == candidates[:3] and got == candidates[2]
    with pytest.raises(UnsupportedError, match=r"linear_bwd_dkdv: no launch fits the GPU's 1000 bytes .*16x16, 1 stages: 2000"):
        op.choose_launch("linear_bwd_dkdv", 64, 64, torch.bfloat16, 1000, lambda launch: 2000)
    # without compiled kernels (the interpreter): the estimate alone, else the smallest
    assert op.choose_launch("linear_fwd", 64, 64, torch.bfloat16, SM90_SHARED_MEMORY) == candidates[0]
    assert op.choose_launch("linear_fwd", 64, 64, torch.bfloat16, 1000) == candidates[-1]


def test_launch_for_reads_the_device_limit(monkeypatch):
    from types import SimpleNamespace

    op = attngen.compile("linear_elu")
    # an sm_86 GPU: 99 KB of shared memory per block
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(shared_memory_per_block_optin=101376))
    small = op.launch_for("linear_bwd_dkdv", 128, 128, torch.bfloat16, torch.device("cuda"))
    big = op.launch_for("linear_bwd_dkdv", 128, 128, torch.bfloat16, torch.device("cpu"))  # the interpreter plans for sm_90
    estimate = lambda launch: shared_memory_estimate(op.plan, "linear_bwd_dkdv", 128, 128, torch.bfloat16, launch)  # noqa: E731
    assert estimate(small) <= 101376 < estimate(big) <= SM90_SHARED_MEMORY


#: the largest shapes: taylor2 at D_QK = 16 (Based: 273 features) and 32 (1057) with value
#: heads up to 256, elu1 at the benchmark's D = 128 and at 256
SM90_CASES = [("based_taylor", d_qk, d_v) for d_qk in (16, 32) for d_v in (64, 128, 256)] + [
    ("linear_elu", 128, 128), ("linear_elu", 256, 256)]  # fmt: skip


def test_launches_an_h200_takes_fit_its_shared_memory():
    # An H200 takes, per kernel, the first candidate whose compiled kernel fits 232448 bytes
    # (choose_launch with Triton's metadata.shared). Here the kernels are compiled for sm_90
    # ahead, without a GPU, in a process without the interpreter: every walk must end in a
    # launch that fits, within a few compiles; the segmented kernels and the state kernels
    # compile for sm_90 with that launch and fit as well.
    pytest.importorskip("triton.backends.nvidia")
    cases = [(spec, d_qk, d_v, dtype) for spec, d_qk, d_v in SM90_CASES for dtype in ("bfloat16", "float32")]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = "import json, sys, test_linear; json.dump(test_linear.sm90_walks(json.load(sys.stdin)), sys.stdout)"
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(cases), capture_output=True, text=True,
                          cwd=Path(__file__).parent, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    # the allocation pass alone gives what the whole lowering to LLVM IR reports
    assert result["check"][0] == result["check"][1]
    assert len(result["walks"]) == len(cases) * len(KERNELS)
    for walk in result["walks"]:
        assert walk["shared"] <= SM90_SHARED_MEMORY, walk
        assert len(walk["compiled"]) <= 3, walk
    # both specs are causal: each kernel's launch with segments, and its state kernel, fit too
    assert len(result["segmented"]) == 2 * len(cases) * len(KERNELS)
    for case in result["segmented"]:
        assert case["shared"] <= SM90_SHARED_MEMORY, case


def sm90_walks(cases: list) -> dict:
    """For ``(spec, D_QK, D_V, dtype name)`` cases, per kernel: the launch an sm_90 GPU takes
    (:meth:`~attngen.linear.LinearAttentionOp.choose_launch` with the kernels compiled for
    sm_90 ahead), its shared memory, its estimate and every compile on the way (``walks``);
    and ``check``, one kernel's shared memory from :func:`_sm90_shared` and from Triton's
    whole lowering to LLVM IR. Runs without the interpreter."""
    walks, segmented = [], []
    for spec, d_qk, d_v, dtype_name in cases:
        op = attngen.compile(spec)
        dtype = getattr(torch, dtype_name)
        q, k = (torch.empty(1, 2, 256, d_qk, dtype=dtype) for _ in range(2))
        v = torch.empty(1, 2, 256, d_v, dtype=dtype)
        for name in KERNELS:
            compiled = {}

            def shared(launch, name=name, compiled=compiled):
                _, args, constexprs, _ = op.kernel_arguments(name, launch, q, k, v)
                compiled[launch] = _sm90_shared(getattr(op.module, name), args, constexprs)
                return compiled[launch]

            launch = op.choose_launch(name, d_qk, d_v, dtype, SM90_SHARED_MEMORY, shared)
            walks.append({"spec": spec, "D_QK": d_qk, "D_V": d_v, "dtype": dtype_name, "kernel": name, "launch": repr(launch),
                          "shared": compiled[launch], "estimate": shared_memory_estimate(op.plan, name, d_qk, d_v, dtype, launch),
                          "compiled": [[repr(c), s] for c, s in compiled.items()]})  # fmt: skip
            # the same launch split into 4 segments (causal specs), and the state kernel it reads
            if op.plan.causal and not op.plan.local:
                state = "linear_state_bwd" if name == "linear_bwd_dkdv" else "linear_state_fwd"
                for kernel in (name, state):
                    _, args, constexprs, _ = op.kernel_arguments(kernel, launch, q, k, v, n_seg=4)
                    segmented.append({"spec": spec, "D_QK": d_qk, "D_V": d_v, "dtype": dtype_name, "kernel": kernel,
                                      "launch": repr(launch), "shared": _sm90_shared(getattr(op.module, kernel), args, constexprs)})
    op = attngen.compile("linear_elu")
    x = torch.empty(1, 2, 256, 128, dtype=torch.bfloat16)
    _, args, constexprs, _ = op.kernel_arguments("linear_bwd_dkdv", LinearLaunch(64, 128, 128, 2), x, x, x)
    check = [_sm90_shared(op.module.linear_bwd_dkdv, args, constexprs, whole=whole) for whole in (False, True)]
    return {"walks": walks, "check": check, "segmented": segmented}


def _sm90_shared(fn, args, constexprs, whole: bool = False) -> int:
    """Triton's ``metadata.shared`` of ``fn`` compiled for sm_90 (ahead, no GPU) as a launch
    with these arguments would compile it (the same specialisation of the arguments): the
    ``ttg.shared`` that Triton 3.6's ``make_llir`` reads, here from its passes up to the
    shared-memory allocation; ``whole``: from ``make_llir`` itself, without LLVM's
    optimisation (which takes most of its time and leaves the allocation as it is)."""
    from unittest import mock

    from triton._C.libtriton import ir, nvidia, passes
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nvidia_compiler
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = {**constexprs, "debug": False}
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constants, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(fn, signature, constants, attrs)
    options = backend.parse_options(options.__dict__)
    stages = {}
    backend.add_stages(stages, options, source.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
    metadata = {"target": target, **options.__dict__}
    for stage in ("ttir", "ttgir"):
        module = stages[stage](module, metadata)
    if whole:
        with mock.patch.object(nvidia_compiler.llvm, "optimize_module", lambda *a, **k: None):
            stages["llir"](module, metadata)
        return metadata["shared"]
    pm = ir.pass_manager(module.context)  # make_llir's passes up to the allocation
    passes.ttgpuir.add_combine_tensor_select_and_if(pm)
    passes.ttgpuir.add_allocate_warp_groups(pm)
    passes.convert.add_scf_to_cf(pm)
    passes.gluon.add_inliner(pm)
    nvidia.passes.ttgpuir.add_allocate_shared_memory_nv(pm, 90, nvidia_compiler.get_ptx_version_from_options(options, 90))
    pm.run(module, "sm90_shared")
    return module.get_int_attr("ttg.shared")


def _run_with_grads(op, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = op(*leaves)
    return [o.detach(), *torch.autograd.grad(o, leaves, do)]


@pytest.mark.parametrize(
    "kind, normalize, t_q, t_kv, align, h_kv, blocks16",
    [("elu1", True, 70, 70, "bottom_right", 1, False), ("elu1", True, 45, 83, "bottom_right", 2, True),
     ("relu", False, 83, 45, "bottom_right", 1, False), ("performer", True, 61, 61, "top_left", 1, True),
     ("taylor2", True, 50, 50, "bottom_right", 1, False), ("identity", False, 33, 70, "top_left", 2, False)],
)  # fmt: skip
@pytest.mark.parametrize("segments", [2, 3, 7])
def test_segments_of_a_causal_walk_give_the_one_walk_result(monkeypatch, kind, normalize, t_q, t_kv, align, h_kv, blocks16, segments):
    # A causal walk split into segments that start from the summed states of the earlier ones
    # (forward and dQ) or the later ones (dK/dV) computes what one walk does: same o, dq, dk,
    # dv to float32 rounding, and both match the reference. Lengths not multiples of the
    # chunk (16), both alignments, T_Q above and below T_KV, GQA, several feature and value
    # blocks per head (blocks of 16), more segments than some walks have chunks.
    if blocks16:
        monkeypatch.setattr(attngen.linear, "MAX_STATE_BLOCK", 16)
    spec = linear_spec(kind, normalize=normalize, align=align)
    d_qk = 5 if kind == "taylor2" else 20
    op = attngen.compile(spec)
    gen = torch.Generator().manual_seed(segments)
    q = torch.randn(1, 2, t_q, d_qk, generator=gen)
    k = torch.randn(1, h_kv, t_kv, d_qk, generator=gen)
    v = torch.randn(1, h_kv, t_kv, 24, generator=gen)
    if kind == "identity":
        q, k = q.abs() + 0.1, k.abs() + 0.1
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    do = torch.randn(1, 2, t_q, 24, generator=gen).to(DEVICE)
    op.set_segments(1)
    one_walk = _run_with_grads(op, q, k, v, do)
    op.set_segments(segments)
    split = _run_with_grads(op, q, k, v, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), split, one_walk):
        scale = max(1.0, float(b.abs().max()))
        assert float((a - b).abs().max()) <= 1e-5 * scale, name
    rows = compare(op, attngen.reference(op.spec), q, k, v, {}, generator=gen)
    assert all(r.ok for r in rows), format_rows(rows)


def test_segment_count_policy_and_errors():
    op = attngen.compile(linear_spec("elu1", chunk=64))
    x = torch.zeros(1, 16, 16384, 128)
    launch = LinearLaunch(64, 64, 64, 3)
    assert op.segment_count("linear_fwd", launch, x, x, x) == 1  # the CPU: one walk
    op.set_segments(4)
    assert op.segment_count("linear_fwd", launch, x, x, x) == 4
    op.set_segments(np.int64(3))  # numpy integers are stored as Python ints (a kernel constexpr)
    assert type(op.segment_count("linear_fwd", launch, x, x, x)) is int
    assert op.segment_count("linear_fwd", launch, x[:, :, :100], x[:, :, :100], x[:, :, :100]) == 2  # two chunks
    op.set_segments(None)
    local = attngen.compile(linear_spec("elu1", mask="q // w == k // w and k <= q", params={"w": 7}))
    local.set_segments(4)
    assert local.segment_count("linear_fwd", launch, x, x, x) == 1  # chunk-local states are not plain sums
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="segments="):
            op.set_segments(bad)


def test_set_blocks_refuses_value_blocks_narrower_than_the_features():
    op = attngen.compile("linear_elu")
    with pytest.raises(ValueError, match="block_v=16 < block_f=64"):
        op.set_blocks(64, 16)
    with pytest.raises(ValueError, match="block_f=48"):
        op.set_blocks(48, 64)
    with pytest.raises(ValueError, match="block_v=32 with block_f=16: a feature block of 16 takes a value block of 16; use block_f=32"):
        op.set_blocks(16, 32)
    op.set_blocks(32, 128)
    op.set_blocks(16, 16)
    op.set_blocks(None)
