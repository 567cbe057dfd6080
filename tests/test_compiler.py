"""The pure stages: lowering, passes, plans and rendering (no kernel runs)."""

from pathlib import Path

import pytest
import sympy

from attngen import IRVerifyError, build
from attngen.expr import SYMBOLS
from attngen.lower import lower
from attngen.passes import PIPELINE, run_pipeline, verify
from attngen.schema import load_spec

ZOO = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "specs").glob("*.yaml"))
#: linear attention skips the IR (attngen.linear plans it straight from the spec)
SCORE_ZOO = [name for name in ZOO if load_spec(name).normalizer != "linear"]


@pytest.mark.parametrize("name", SCORE_ZOO)
def test_pipeline_verifies_after_every_pass(name):
    g = run_pipeline(lower(load_spec(name)), check=True)
    assert g.graph["saved"] == ("q", "k", "v", "o", "lse")


def test_pipeline_is_one_ordered_list_of_documented_passes():
    names = [p.__name__ for p in PIPELINE]
    assert names == [
        "bind_params", "simplify_expressions", "derive_backward",
        "collect_input_loads", "split_periodic", "classify_tiles", "choose_numerics", "split_score_bias", "apply_recompute",
    ]  # fmt: skip
    for p in PIPELINE:
        assert "Requires" in p.__doc__ or "Establishes" in p.__doc__


def test_softcap_derivative_is_one_minus_tanh_squared():
    g = build("softcap", cap=30.0).graph
    s = SYMBOLS["s"]
    d = g.nodes["dscore"]["expr"]
    for value in (-150.0, -3.0, 0.0, 7.5, 150.0):
        expected = 1 - sympy.tanh(value / 30.0) ** 2
        assert abs(float(d.subs(s, value)) - float(expected)) < 1e-12


def test_identity_score_and_true_mask_are_dropped():
    g = build({"name": "x", "mask": "True", "score": "s + 0"}).graph
    assert "mask" not in g and "score" not in g and g.graph["fold_scale"]


def test_alibi_has_no_derivative_node_and_hoists_slopes():
    compiled = build("alibi")
    assert "dscore" not in compiled.graph  # d/ds (s - m (q - k)) == 1
    (load,) = compiled.plan.fwd.outer_loads
    assert load.input == "slopes" and load.deps == frozenset({"h"})
    assert compiled.plan.dkdv.outer_loads == (load,)


def test_document_loads_split_by_loop():
    plan = build("document").plan
    fwd_outer = {ld.deps for ld in plan.fwd.outer_loads}
    fwd_inner = {ld.deps for ld in plan.fwd.inner_loads}
    assert fwd_outer == {frozenset({"b", "q"})} and fwd_inner == {frozenset({"b", "k"})}
    assert {ld.deps for ld in plan.dkdv.inner_loads} == {frozenset({"b", "q"})}


def test_render_is_deterministic_and_hash_keyed():
    a, b = build("gemma2_local"), build("gemma2_local")
    assert a.rendered.source == b.rendered.source and a.rendered.digest == b.rendered.digest
    c = build("gemma2_local", window=1024)
    assert c.rendered.digest != a.rendered.digest
    assert "1024" in c.rendered.source


def test_verifier_catches_a_stray_symbol():
    g = run_pipeline(lower(load_spec("causal")))
    g.nodes["mask"]["expr"] = sympy.Symbol("mystery") > 0
    with pytest.raises(IRVerifyError, match="mystery"):
        verify(g, after="test")


def test_kernel_file_is_written_atomically_under_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    from attngen.load import write_kernel

    compiled = build("causal")
    path = write_kernel("causal", compiled.rendered)
    assert path.parent == tmp_path / "kernels" and path.read_text() == compiled.rendered.source
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


@pytest.mark.parametrize(
    "mask, inputs, expected",
    [
        ("k <= q", {}, True),
        ("k <= q and q - k < 7", {}, True),
        ("k <= q or k < 5", {}, True),  # prefix-LM
        ("q // 8 == k // 8", {}, True),  # chunk-local
        ("(q - k) % 4 == 0", {}, True),  # strided
        ("doc[b, q] == doc[b, k] and k <= q", {"doc": ["B", "T_Q"]}, True),
        ("k <= q and q - k < 0", {}, False),  # an empty window hides everything
        ("k < q", {}, False),  # a position does not see itself
        ("q < n[b] and k <= q", {"n": ["B"]}, False),  # padding
        ("k <= q and keep[b, k] != 0", {"keep": ["B", "T_KV"]}, False),
        ("doc[b, q] == doc[b, k]", {"doc": ["B", "T_Q"], "x": ["B", "T_KV"]}, True),
    ],
)
def test_masks_that_every_position_passes_with_itself(mask, inputs, expected):
    # Such masks hide no query and no key from every partner when T_Q == T_KV, which is what
    # lets the kernels drop the unseen-row guards; a wrong True would let padding garbage leak.
    spec = {"name": "m", "mask": mask, "inputs": {n: {"dtype": "int32", "shape": s} for n, s in inputs.items() if n in mask}}
    assert build(spec).plan.sees_itself is expected


def test_float_input_in_the_mask_keeps_the_guards():
    for mask in ("x[b, q] == x[b, k]", "x[b, q] - x[b, k] < 1"):  # NaN != NaN; inf - inf is NaN
        spec = {"name": "m", "mask": mask, "inputs": {"x": {"dtype": "float32", "shape": ["B", "T_Q"]}}}
        assert build(spec).plan.sees_itself is False, mask


@pytest.mark.parametrize(
    "mask, inputs",
    [
        # found by review: each holds at q == k in exact arithmetic but hides a position in
        # the kernels' int32 / float32 arithmetic, where a skipped guard let NaN reach every row
        ("k <= q and doc[b, q] < doc[b, k] + 1", {"doc": ["B", "T_KV"]}),  # wraps at the int32 maximum
        ("q / n[b] == k / n[b]", {"n": ["B"]}),  # 0 / 0 is NaN
        ("q * 100000000.0 + 1.0 > k * 100000000.0", {}),  # float32 rounding
        ("q + 2147483647 > k + 2147483646", {}),  # int32 overflow
        ("k <= q and flag[b, q] != 0", {"flag": ["B", "T_Q"]}),  # a condition on one position
        # a second review: sympy's own simplification decided these before the check saw them
        ("doc[b, k] / doc[b, q] == 1", {"doc": ["B", "T_KV"]}),  # 0 / 0
        ("min(doc[b, q], doc[b, k] + 1) == doc[b, q] and k <= q", {"doc": ["B", "T_KV"]}),  # wraps
        ("abs(doc[b, q] * doc[b, k]) == doc[b, q] * doc[b, k] and k <= q", {"doc": ["B", "T_KV"]}),
        ("min(doc[b, q] * doc[b, k], 0) == 0 and k <= q", {"doc": ["B", "T_KV"]}),
        ("(1 if doc[b, q] < doc[b, k] + 1 else 0) == 1 and k <= q", {"doc": ["B", "T_KV"]}),
        ("floor((doc[b, q] + doc[b, k]) / 2) == doc[b, q] and k <= q", {"doc": ["B", "T_KV"]}),  # float32
        ("(doc[b, q] + 2 * doc[b, k]) % 3 == 0 and k <= q", {"doc": ["B", "T_KV"]}),  # 3 * doc wraps
        ("floor(sqrt(doc[b, q] * doc[b, k])) == abs(doc[b, q]) and k <= q", {"doc": ["B", "T_KV"]}),
        ("k / q <= 1", {}),  # query 0: 0 / 0
        ("min(q, k + 1) == q and k <= q", {}),  # k + 1 wraps at position 2^31 - 1
        # a third review: the printed // and % wrap with operands near 2^31, and an int8
        # tensor passed for an int32 input computes in int8
        ("k <= q and ((q - k - 2147483647) // 3 == -715827883 or k >= 8)", {}),
        ("k <= q and ((doc[b, q] - doc[b, k] + 100) * (doc[b, q] - doc[b, k] + 2) > 0 or k >= 8)", {"doc": ["B", "T_KV"]}),
    ],
)
def test_masks_that_pass_with_themselves_only_in_exact_arithmetic_keep_the_guards(mask, inputs):
    spec = {"name": "m", "mask": mask, "inputs": {n: {"dtype": "int32", "shape": s} for n, s in inputs.items()}}
    assert build(spec).plan.sees_itself is False


def test_reflexive_masks_with_conditions_that_stay_unknown():
    # q < 16 stays unknown, but the window's |q - k| <= 256 holds at q == k whatever it is
    assert build("longformer").plan.sees_itself is True
    for mask in ("(q - k) % 4 == 0 and k <= q", "abs(q - k) // 3 <= 2", "max(q - k, 0) < 5 and k <= q",
                 "min(doc[b, q], 7) == min(doc[b, k], 7)", "doc[b, q] // 4 == doc[b, k] // 4 and k <= q"):
        spec = {"name": "m", "mask": mask, "inputs": {"doc": {"dtype": "int32", "shape": ["B", "T_Q"]}} if "doc" in mask else {}}
        assert build(spec).plan.sees_itself is True, mask


def test_a_mask_that_keeps_no_pair_warns_at_compile_time():
    import warnings

    import attngen

    with pytest.warns(UserWarning, match="window=0 keeps no"):
        attngen.compile("sliding_window", window=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attngen.compile("sliding_window", window=1)  # the token itself: one pair per row
        attngen.compile("document")  # reads runtime inputs: no verdict, no warning


def test_params_and_inputs_no_expression_reads_warn_at_compile_time():
    import attngen

    spec = {"name": "x", "params": {"window": 3, "windw": 2}, "inputs": {"pad": {"dtype": "int32", "shape": ["B"]}},
            "mask": "k <= q and q - k < window"}
    with pytest.warns(UserWarning) as record:
        attngen.compile(spec)
    messages = [str(r.message) for r in record]
    assert any("params.windw is never read" in m for m in messages)
    assert any("inputs.pad is never read" in m and "must still pass it" in m for m in messages)
    assert not any("params.window " in m for m in messages)
