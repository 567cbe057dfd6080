"""Expressions: the whitelisted grammar, its types and errors, and its safety (no code runs)."""

import os

import pytest
import sympy
import torch

from attngen import SpecError, load_spec
from attngen.expr import FloorDiv, InputSignature, parse_expression
from attngen.printer import TorchEvaluator


def parse(text, params=None, inputs=None, allow_score=True):
    return parse_expression(text, field="mask", params=params or {}, inputs=inputs or {}, allow_score=allow_score)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('touch /tmp/attngen_pwned')",
        "s.__class__",
        "open('f')",
        "(lambda: 1)()",
        "q.real",
        "[x for x in (1, 2)]",
        "import os",
        "exec('1')",
        "getattr(q, 'x')",
        "q ** 2",
        "'a' == 'a'",
        "{1: 2}",
        "__builtins__",
    ],
)
def test_forbidden_constructs_raise_spec_error_and_run_nothing(text, tmp_path):
    marker = "/tmp/attngen_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    with pytest.raises(SpecError) as info:
        load_spec({"name": "evil", "mask": text})
    assert info.value.field == "mask"
    assert not os.path.exists(marker)


def test_unknown_name_lists_known_names():
    with pytest.raises(SpecError) as info:
        load_spec({"name": "x", "params": {"window": 4}, "mask": "q - k < widow"})
    msg = str(info.value)
    assert "widow" in msg and "window" in msg and "T_KV" in msg


def test_score_name_only_in_score():
    with pytest.raises(SpecError, match="only appear in 'score'"):
        load_spec({"name": "x", "mask": "s > 0"})


@pytest.mark.parametrize(
    "text, message",
    [
        ("q + (k < 3)", "expected a number"),
        ("q and k", "expected a boolean"),
        ("q", "not a condition"),
        ("q % 2.5 == 0", "take integers"),
        ("exp(q, k) > 0", "takes 1 arguments"),
        ("q // 0 == 1", "division by zero"),
        ("k <= q and", "syntax error"),
    ],
)
def test_type_and_syntax_errors(text, message):
    with pytest.raises(SpecError, match=message):
        load_spec({"name": "x", "mask": text})


def test_inputs_must_be_indexed_with_their_rank():
    spec = {"name": "x", "inputs": {"doc": {"dtype": "int32", "shape": ["B", "T_KV"]}}}
    with pytest.raises(SpecError, match="2 dimension"):
        load_spec({**spec, "mask": "doc[q] == doc[k]"})
    with pytest.raises(SpecError, match="must be indexed"):
        load_spec({**spec, "mask": "doc == 1"})
    with pytest.raises(SpecError, match="integer expression"):
        load_spec({**spec, "mask": "doc[b, q / 2] == 1"})


def test_types_of_expressions():
    assert parse("q - k").kind == "int"
    assert parse("q / 2").kind == "float"
    assert parse("k <= q < 5").kind == "bool"
    assert parse("s * 2").kind == "float"
    assert parse("max(q, 3)").kind == "int"
    assert parse("x[h] * 2", inputs={"x": InputSignature(1, "float")}).kind == "float"
    assert parse("1.0 if q > k else 2.0").kind == "float"


def test_chained_comparison_is_a_conjunction():
    q, k = sympy.symbols("q k", integer=True)
    parsed = parse("k <= q < k + 5")
    assert parsed.sym == sympy.And(sympy.Le(k, q), sympy.Lt(q, k + 5))


def test_floor_division_and_modulo_follow_python_on_negatives():
    values = torch.arange(-20, 21).view(-1, 1)
    divisors = torch.tensor([-7, -3, 3, 7]).view(1, -1)
    ev = TorchEvaluator({"q": values, "k": divisors}, indexed=None, dtype=torch.float64, device="cpu")
    q, k = sympy.symbols("q k", integer=True)
    got_div = ev(FloorDiv(q, k))
    got_mod = ev(sympy.Mod(q, k))
    for i, a in enumerate(values.flatten().tolist()):
        for j, d in enumerate(divisors.flatten().tolist()):
            assert got_div[i, j].item() == a // d
            assert got_mod[i, j].item() == a % d


def test_expression_length_is_bounded():
    with pytest.raises(SpecError, match="at most"):
        load_spec({"name": "x", "mask": " and ".join(["k <= q"] * 1000)})
