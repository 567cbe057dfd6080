"""The warp-specialised Hopper forward (attngen.warpspec, templates/attention_ws.py.j2).

Which specs it takes is checked everywhere; that its kernels compile for sm_90 (12 warps,
no register spills) is checked on any machine, GPU or not, by Triton's compiler and ptxas;
that it computes the right output and log-sum-exp, and that the backward kernels accept
them, only where a Hopper GPU runs it. Every GPU test also checks that the call really took
the warp-specialised kernel, so a silent fall-back to the Triton forward cannot pass for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attngen
from attngen import warpspec
from attngen.compiler import build
from helpers import SMALL_PARAMS, check_spec, dims

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the warp-specialised kernel runs on compute capability 9.x only")

#: zoo specs it takes: softmax, scores and masks of positions and runtime-input reads
TAKEN = ["alibi", "causal", "chunked", "dense", "document", "gemma2_local", "llama3_gqa", "longformer", "prefix_lm",
         "sliding_window", "softcap", "streaming_sinks"]
#: the anchors suite's softcap: the hardware's tanh.approx through the template's _tanh
SOFTCAP_FAST = {"name": "softcap_fast", "mask": "k <= q", "score": "cap * tanh(s / cap)", "params": {"cap": 30.0},
                "fast_tanh": True}


@pytest.mark.parametrize(
    ("name", "reason"),
    [(n, None) for n in TAKEN]
    + [(SOFTCAP_FAST, None), ("strided", "strided part"),
       ("dilated_window", "strided part"), ("sigmoid_causal", "sigmoid normaliser")],
)  # fmt: skip
def test_plan_supports_names_what_keeps_a_spec_out(name, reason):
    assert warpspec.plan_supports(build(name).plan) == reason


@pytest.mark.parametrize(("name", "default"), [("causal", True), ("alibi", True), ("document", False)])
def test_it_is_the_default_only_where_the_tile_ranges_are_closed_form(name, default):
    # document ranges come from the metadata kernel; there the H200 ran it slower
    assert warpspec.pays(build(name).plan) is default


def test_bound_names_follow_the_segments_of_the_plan():
    plan = build("longformer").plan  # two intervals: a window and the global tokens
    names = warpspec.bound_names(plan)
    r = plan.fwd_ranges
    assert names[:2] == ["n_masked", "n_full"]
    assert len(names) == 2 + 2 * len(r.masked) - 1 + 2 * len(r.full) - 1
    assert len(set(names)) == len(names)


_COMPILE = textwrap.dedent("""
    import re, subprocess, sys, tempfile, os
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from attngen import warpspec
    from attngen.compiler import build
    from attngen.load import load_module
    import name_here

    name, group = sys.argv[1], int(sys.argv[2])
    compiled = build(name if name != "softcap_fast" else SOFTCAP_FAST)
    plan = compiled.plan
    fn = getattr(load_module(warpspec.module_name(name), warpspec.render_ws(plan))[0], warpspec.KERNEL)

    def desc(rows):
        block = [1, 1, rows, 128]
        return f"tensordesc<bf16[{','.join(map(str, block))}],{gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)!r}>"

    extra = {}
    for inp in compiled.spec.inputs:
        extra[inp.name + "_ptr"] = "*fp32" if inp.dtype.startswith("float") else "*i32"
        for d in range(len(inp.shape)):
            extra[f"{inp.name}_stride_{d}"] = extra[f"{inp.name}_size_{d}"] = "i32"
    if plan.fwd_ranges.meta is not None:
        extra["META"] = "*i32"
    sig = {"q_desc": desc(warpspec.BLOCK_Q), "k_desc": desc(warpspec.BLOCK_KV), "v_desc": desc(warpspec.BLOCK_KV),
           "o_desc": desc(warpspec.BLOCK_Q // 2), "LSE": "*fp32", **extra, "H": "i32", "T_Q": "i32", "T_KV": "i32",
           "Q_OFFSET": "i32", "K_OFFSET": "i32", "sm_scale": "fp32", "qk_scale_log2": "fp32",
           "GROUP": "constexpr", "STAGES": "constexpr", "TILE_SKIP": "constexpr"}
    k = triton.compile(GluonASTSource(fn, sig, constexprs={"GROUP": group, "STAGES": warpspec.STAGES, "TILE_SKIP": True}),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warpspec.NUM_WARPS, "maxnreg": warpspec.MAXNREG})
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(k.asm["ptx"])
        report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", os.path.join(tmp, "k.ptx"), "-o",
                                 os.path.join(tmp, "k.cubin")], capture_output=True, text=True).stderr
    print("warps", k.metadata.num_warps)
    print("spills", " ".join(re.findall(r"(\\d+) bytes spill stores", report)))
""")


def test_score_reading_anything_but_the_score_and_positions_keeps_a_spec_out():
    spec = {"name": "head_bias", "mask": "k <= q", "score": "s + 0.1 * h"}
    assert warpspec.plan_supports(build(spec).plan).startswith("score reads")


def test_a_number_in_exponent_form_is_not_a_name():
    spec = {"name": "tiny_scale", "mask": "k <= q", "score": "s * 0.00001"}  # printed as 1e-05 * s
    assert "e-05" in build(spec).plan.score_code
    assert warpspec.plan_supports(build(spec).plan) is None


@pytest.mark.parametrize("spec", [
    {"name": "prefix_per_example", "mask": "k <= q or k < np[b]", "inputs": {"np": {"dtype": "int32", "shape": ["B"]}}},
    {"name": "sinks_per_head", "mask": "k <= q and (k < ns[h] or q - k < 128)",
     "inputs": {"ns": {"dtype": "int32", "shape": ["H"]}}},
])  # fmt: skip
def test_tile_ranges_that_read_a_runtime_input_keep_a_spec_out(spec):
    # the partitions evaluate the ranges before the consumers read any input (the producer
    # never does): such a kernel would not compile
    name = next(iter(spec["inputs"]))
    assert warpspec.plan_supports(build(spec).plan) == f"tile ranges read runtime input {name!r} once per program"


@pytest.mark.parametrize("mask", ["k < q", "False"])
def test_a_mask_that_can_hide_a_position_from_itself_keeps_a_spec_out(mask):
    # every masked call of such a spec guards keys no query sees, which this kernel cannot
    reason = warpspec.plan_supports(build({"name": "strict", "mask": mask}).plan)
    assert reason.startswith("the mask can hide a position from itself")


def test_reasons_name_the_spec_s_variables():
    assert warpspec.plan_supports(build({"name": "head_bias", "mask": "k <= q", "score": "s + 0.1 * h"}).plan) == (
        "score reads ['h']")


@pytest.mark.parametrize(("name", "group", "max_spill"),
                         [("sliding_window", 1, 0), ("llama3_gqa", 4, 0), ("softcap_fast", 1, 0), ("alibi", 1, 8),
                          ("document", 1, 64)])  # fmt: skip
def test_kernel_compiles_for_sm90_into_three_partitions_without_spills(name, group, max_spill, tmp_path):
    # documents keep each key's document id in registers as well: ptxas spilled 24 bytes;
    # ALiBi's split bias keeps its anchor beside the slope: 4 bytes
    # compiled in a child process: this one may run Triton's interpreter, which Triton fixes
    # at import; no GPU is needed to compile for sm_90
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ATTNGEN_CACHE_DIR"] = str(tmp_path)
    script = tmp_path / "compile.py"
    script.write_text(_COMPILE.replace("import name_here", f"SOFTCAP_FAST = {SOFTCAP_FAST!r}"))
    out = subprocess.run([sys.executable, str(script), name, str(group)], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    # 4 warps per consumer warp group, 1 producer warp padded to a warp group
    assert lines["warps"] == "12"
    assert lines["spills"] and max(map(int, lines["spills"].split())) <= max_spill


@pytest.fixture
def launches(monkeypatch):
    """Counts the warp-specialised kernel's launches."""
    calls = []
    real = warpspec.launch

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(warpspec, "launch", counted)
    return calls


@needs_hopper
@pytest.mark.parametrize("name", TAKEN)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zoo_spec_matches_the_reference(name, dtype, launches, monkeypatch):
    if name == "document":  # not the default there (warpspec.pays): force it
        monkeypatch.setenv("ATTNGEN_WS", "1")
    # 333 positions: the last query and key tiles are partial; 2 query heads per KV head
    check_spec(name, dims(B=2, H=4, H_KV=2, T_Q=333, T_KV=333, D_QK=128), dtype, params=SMALL_PARAMS.get(name))
    assert launches, "the forward did not take the warp-specialised kernel"


@needs_hopper
def test_fast_tanh_softcap_matches_the_reference(launches):
    check_spec(SOFTCAP_FAST, dims(B=1, H=4, H_KV=1, T_Q=450, T_KV=450, D_QK=128), torch.bfloat16)
    assert launches


@needs_hopper
@pytest.mark.parametrize(("t_q", "t_kv"), [(300, 4096), (1000, 77), (1, 129), (128, 128)])
def test_dense_with_other_query_and_key_lengths_matches_the_reference(t_q, t_kv, launches):
    check_spec("dense", dims(B=1, H=3, H_KV=1, T_Q=t_q, T_KV=t_kv, D_QK=128), torch.bfloat16)
    assert launches


@needs_hopper
def test_without_tile_skipping_gives_what_skipping_gives(launches, monkeypatch):
    op = attngen.compile("sliding_window", window=200)
    q, k, v = (torch.randn(1, 2, 700, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o, lse = op.forward_impl(q, k, v, [])
    monkeypatch.setenv("ATTNGEN_NO_SKIP", "1")
    o2, lse2 = op.forward_impl(q, k, v, [])
    assert len(launches) == 2
    torch.testing.assert_close(o, o2, atol=2e-2, rtol=0)
    torch.testing.assert_close(lse, lse2, atol=1e-4, rtol=1e-5)


@needs_hopper
def test_switch_off_sends_calls_to_the_triton_forward(launches, monkeypatch):
    monkeypatch.setenv("ATTNGEN_WS", "0")
    check_spec("causal", dims(B=1, H=2, H_KV=2, T_Q=200, T_KV=200, D_QK=128), torch.bfloat16)
    assert not launches


@needs_hopper
def test_documents_take_the_triton_forward_unless_forced(launches, monkeypatch):
    monkeypatch.delenv("ATTNGEN_WS", raising=False)
    check_spec("document", dims(B=1, H=2, H_KV=2, T_Q=300, T_KV=300, D_QK=128), torch.bfloat16)
    assert not launches


@needs_hopper
def test_calls_it_cannot_take_fall_back(launches):
    # head dim 64, fp32, and keys hidden from every query (T_Q != T_KV under a mask)
    check_spec("causal", dims(B=1, H=2, H_KV=2, T_Q=200, T_KV=200, D_QK=64), torch.bfloat16)
    check_spec("causal", dims(B=1, H=2, H_KV=2, T_Q=200, T_KV=200, D_QK=128), torch.float32)
    check_spec("causal", dims(B=1, H=2, H_KV=2, T_Q=100, T_KV=300, D_QK=128), torch.bfloat16)
    assert not launches
