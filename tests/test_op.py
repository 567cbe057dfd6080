"""The operator: call-time errors, torch.library registration, torch.compile."""

import pytest
import torch

import attngen
from attngen import ShapeError
from helpers import DEVICE


def tensors(B=1, H=2, H_KV=1, T=9, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype),
        torch.randn(B, H_KV, T, D, generator=g).to(DEVICE, dtype),
        torch.randn(B, H_KV, T, D, generator=g).to(DEVICE, dtype),
    )


def test_call_errors_name_the_argument():
    doc = attngen.compile("document")
    q, k, v = tensors()
    with pytest.raises(ShapeError, match=r"doc: missing runtime input.*op\(q, k, v, doc=...\)"):
        doc(q, k, v)
    with pytest.raises(ShapeError, match=r"doc: expected shape \[B, T_KV\] = \[1, 9\], got \[1, 8\]"):
        doc(q, k, v, doc=torch.zeros(1, 8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ShapeError, match="doc: dtype float32 does not fit the declared int32"):
        doc(q, k, v, doc=torch.zeros(1, 9, device=DEVICE))
    with pytest.raises(ShapeError, match="slopes: unknown keyword argument; the spec's runtime inputs are: doc"):
        doc(q, k, v, doc=torch.zeros(1, 9, dtype=torch.int32, device=DEVICE), slopes=torch.ones(2))
    causal = attngen.compile("causal")
    with pytest.raises(ShapeError, match="k: dtype float16 differs from q's float32"):
        causal(q, k.half(), v)
    with pytest.raises(ShapeError, match="q: dtype float64 is not supported"):
        causal(q.double(), k.double(), v.double())
    with pytest.raises(ShapeError, match="H_KV=3 must divide q's H=2"):
        causal(q, *tensors(H_KV=3)[1:])
    with pytest.raises(ShapeError, match=r"q: expected 4 dimensions"):
        causal(q[0], k, v)
    with pytest.raises(ShapeError, match="head dims from 1 to 256"):
        causal(*tensors(D=300))


def test_compiling_twice_reuses_the_kernel_file():
    a = attngen.compile("causal")
    b = attngen.compile("causal")
    assert a.kernel_file == b.kernel_file and a.module is b.module


def test_opcheck_passes():
    op = attngen.compile("alibi")
    q, k, v = (t.requires_grad_() for t in tensors(H=2, H_KV=1, T=12))
    slopes = torch.tensor([0.5, 0.25], device=DEVICE)
    torch.library.opcheck(torch.ops.attngen.attention_fwd.default, (q, k, v, [slopes], op.op_id))


def test_opcheck_passes_for_the_store_p_ops():
    op = attngen.compile({"name": "sp", "mask": "k <= q", "recompute": "store_p"})
    q, k, v = (t.requires_grad_() for t in tensors(H=2, H_KV=1, T=12))
    torch.library.opcheck(torch.ops.attngen.attention_fwd_p.default, (q, k, v, [], op.op_id))


@pytest.mark.parametrize("recompute", ["lse", "store_p"])
def test_torch_compile_fullgraph_forward_and_backward(recompute):
    op = attngen.compile({**attngen.load_spec("softcap").to_dict(), "recompute": recompute}, cap=2.0)
    q, k, v = (t.requires_grad_() for t in tensors(H=2, H_KV=1, T=12))

    def layer(q, k, v):
        return (op(q * 2.0, k, v) ** 2).sum()

    compiled = torch.compile(layer, fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_eager = layer(q, k, v)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    assert torch.allclose(loss, loss_eager)
    for a, b in zip(grads, grads_eager):
        assert torch.allclose(a, b)


def test_constant_index_out_of_range_is_refused_by_op_and_reference():
    spec = {"name": "w5", "inputs": {"w": {"dtype": "float32", "shape": [4]}}, "score": "s + w[5]"}
    q, k, v = tensors()
    w = torch.ones(4, device=DEVICE)
    for fn in (attngen.compile(spec), attngen.reference(spec)):
        with pytest.raises(ShapeError, match="w: the spec reads index 5 of dimension 0, which has size 4"):
            fn(q, k, v, w=w)


def test_gradient_through_the_log_sum_exp_alone_and_with_the_output():
    # the eager path (an autograd function) and the custom op under torch.compile must both
    # carry d lse: dS gains P * dlse, so the gradients equal the float64 reference's
    op = attngen.compile("causal")
    ref = attngen.reference("causal")
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    w = torch.randn(1, 2, 24, generator=gen, dtype=torch.float64)

    def grads(fn, dtype, only_lse):
        leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
        o, lse = fn(*leaves, return_lse=True)
        loss = (lse * w.to(DEVICE, lse.dtype)).sum() + (0 if only_lse else o.sum())
        got = torch.autograd.grad(loss, leaves, allow_unused=True)  # lse alone does not use v
        return [torch.zeros_like(x).double().cpu() if g is None else g.double().cpu() for g, x in zip(got, leaves)]

    for only_lse in (True, False):
        expected = grads(ref, torch.float64, only_lse)
        for fn in (op, torch.compile(op.__call__, fullgraph=True)):
            for got, want in zip(grads(fn, torch.float32, only_lse), expected):
                assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_double_backward_is_refused_not_silently_wrong():
    # a gradient penalty differentiates the attention gradient again; the kernels have no
    # second derivative, so that must raise rather than drop the attention's term
    op = attngen.compile("causal")
    q, k, v = tensors(H=2, H_KV=1, T=12)
    q = q.requires_grad_()
    (g,) = torch.autograd.grad(op(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((g * g).sum() + (q * q).sum(), q)


def test_attngen_stages_forces_the_pipelining_depth_and_rejects_garbage(monkeypatch):
    from attngen.op import AttentionOp
    from attngen.tiles import LaunchConfig

    cfg = LaunchConfig(64, 32, 4, 3)
    assert AttentionOp._launch(cfg)["num_stages"] == 3
    monkeypatch.setenv("ATTNGEN_STAGES", "1")
    assert AttentionOp._launch(cfg) == {"BLOCK_Q": 64, "BLOCK_KV": 32, "num_warps": 4, "num_stages": 1}
    monkeypatch.setenv("ATTNGEN_STAGES", "two")
    with pytest.raises(ValueError, match="ATTNGEN_STAGES"):
        AttentionOp._launch(cfg)


@pytest.mark.parametrize(("name", "value"), [("ATTNGEN_DQ", "atomic"), ("ATTNGEN_DESCRIPTORS", "8"),
                                             ("ATTNGEN_STAGES", "-1"), ("ATTNGEN_MIN_HEAD_BLOCK", "24"),
                                             ("ATTNGEN_POISON", "true"), ("ATTNGEN_VERIFY_IR", "on")])
def test_compile_rejects_a_bad_debug_switch_by_name(name, value, monkeypatch):
    # read when the spec compiles, not first at a launch (the backward, for ATTNGEN_DQ)
    monkeypatch.setenv(name, value)
    with pytest.raises(attngen.EnvError, match=f"^{name}: '{value}' is not") as info:
        attngen.compile("causal")
    assert info.value.name == name and isinstance(info.value, ValueError)
    monkeypatch.setenv(name, {"ATTNGEN_DQ": "auto", "ATTNGEN_DESCRIPTORS": "AUTO", "ATTNGEN_POISON": "1", "ATTNGEN_VERIFY_IR": "0"}.get(name, ""))
    attngen.compile("causal")


def test_torch_compile_of_a_model_does_not_recompile_when_only_the_length_changes():
    # issue 9: a whole (tiny) model under torch.compile(fullgraph=True); a new sequence
    # length must reuse the graph (the kernels take T at run time)
    from torch._dynamo.testing import CompileCounter

    op = attngen.compile("sliding_window", window=5)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(32, 3 * 32)
            self.out = torch.nn.Linear(32, 32)

        def forward(self, x):  # x [B, T, 32], two heads of 16
            b, t, _ = x.shape
            q, k, v = (y.view(b, t, 2, 16).transpose(1, 2) for y in self.qkv(x).chunk(3, dim=-1))
            return self.out(op(q, k, v).transpose(1, 2).reshape(b, t, 32))

    torch.manual_seed(0)
    model = Block().to(DEVICE)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for t in (16, 24, 9, 40):
        x = torch.randn(1, t, 32, device=DEVICE)
        torch._dynamo.mark_dynamic(x, 1)
        y = compiled(x)
        y.sum().backward()
        assert torch.allclose(y, model(x), atol=1e-5)
    assert counter.frame_count == 1, counter.frame_count
    torch._dynamo.reset()


def test_opcheck_passes_for_every_backward_op():
    op = attngen.compile({"name": "sp_all", "mask": "k <= q", "recompute": "store_p"})
    q, k, v = tensors(H=2, H_KV=1, T=12)
    do = torch.randn_like(q)
    o, lse, p = torch.ops.attngen.attention_fwd_p(q, k, v, [], op.op_id)
    torch.library.opcheck(torch.ops.attngen.attention_bwd.default, (do, None, q, k, v, o, lse, [], 0, op.op_id))
    torch.library.opcheck(torch.ops.attngen.attention_bwd_p.default, (do, None, q, k, v, o, lse, p, [], 0, op.op_id))
    torch.library.opcheck(torch.ops.attngen.attention_bwd_recompute.default, (do, lse, q, k, v, [], 0, op.op_id))


def test_attngen_min_head_block_pads_narrow_head_dims(monkeypatch):
    from attngen.tiles import head_block

    assert (head_block(5), head_block(24), head_block(80)) == (16, 32, 128)
    monkeypatch.setenv("ATTNGEN_MIN_HEAD_BLOCK", "32")
    assert (head_block(5), head_block(24), head_block(80)) == (32, 32, 128)
    op = attngen.compile("causal")  # results do not change with the padding
    q, k, v = tensors(H=2, H_KV=1, T=10, D=8)
    ref = attngen.reference("causal")(q.double(), k.double(), v.double())
    assert (op(q, k, v).double() - ref).abs().max() < 1e-5
    for bad in ("24", "8"):
        monkeypatch.setenv("ATTNGEN_MIN_HEAD_BLOCK", bad)
        with pytest.raises(ValueError, match="power of two of at least 16"):
            head_block(5)


def test_the_head_blocks_are_equal_whatever_the_head_dims():
    from attngen.tiles import head_blocks

    # the H200 computed wrong results or faulted with unequal blocks, either way round
    # (tests/regressions/test_gpu_fuzz_faults.py)
    assert head_blocks(33, 16) == (64, 64)
    assert head_blocks(24, 5) == (32, 32)
    assert head_blocks(16, 80) == (128, 128)
    assert head_blocks(32, 128) == (128, 128)
    assert head_blocks(80, 80) == (128, 128)
    assert head_blocks(1, 1) == (16, 16)
    op = attngen.compile("causal")
    q, k, v = tensors(H=2, H_KV=1, T=10, D=33)
    for narrow_v in (v[..., :16].contiguous(), torch.cat([v, v, v], -1)[..., :80].contiguous()):
        ref = attngen.reference("causal")(q.double(), k.double(), narrow_v.double())
        assert (op(q, k, narrow_v).double() - ref).abs().max() < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU run under the interpreter")
def test_interpreter_switched_on_after_triton_was_imported_is_named_not_a_crash():
    import subprocess
    import sys

    script = ("import os, torch, triton\nos.environ['TRITON_INTERPRET'] = '1'\nimport attngen\n"
              "q = torch.randn(1, 1, 8, 16)\ntry:\n    attngen.compile('causal')(q, q, q)\n"
              "except attngen.UnsupportedError as exc:\n    print(exc)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300).stdout
    assert "set after Triton was imported" in out and "before anything imports triton" in out


@pytest.mark.parametrize(
    "spec, t_q, t_kv, shard, guarded",
    [
        ("causal", 40, 40, None, False),  # every position sees itself: nothing can be hidden
        ("document", 40, 40, None, False),
        ("causal", 30, 40, None, True),  # bottom-right: keys before the first query's window
        ("sliding_window", 40, 70, None, True),
        ({"name": "pad", "inputs": {"n": {"dtype": "int32", "shape": ["B"]}}, "mask": "k <= q and q < n[b]"}, 40, 40, None, True),
        ("causal", 40, 40, (40, 0, 80), True),  # a shard of queries after its keys (ring attention): kept, conservatively
        ("causal", 40, 40, (40, 40, 80), False),  # the diagonal shard
    ],
)
def test_unseen_row_guards_are_skipped_only_when_queries_and_keys_share_positions(spec, t_q, t_kv, shard, guarded):
    from attngen.op import Shard

    op = attngen.compile(spec, window=8) if spec == "sliding_window" else attngen.compile(spec)
    q = torch.zeros(1, 2, t_q, 16)
    k = v = torch.zeros(1, 2, t_kv, 16)
    _, _, constexprs = op._common(q, k, v, None if shard is None else Shard(*shard))
    assert constexprs["GUARD_UNSEEN"] is guarded
