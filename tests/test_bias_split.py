"""Separable score biases (attngen.passes.split_score_bias): the split itself, and kernels
that take it against the reference, which always evaluates the whole score per pair."""

import pytest
import sympy
import torch

import attngen
from attngen import build
from attngen.expr import SYMBOLS
from attngen.passes import ANCHOR

from helpers import check_spec, dims

q, k, s = SYMBOLS["q"], SYMBOLS["k"], SYMBOLS["s"]


def _bias(g):
    return sympy.expand(g.nodes["score"]["expr"] - s)


def test_alibi_splits_into_rows_and_columns_measured_from_the_anchor():
    g = build("alibi").graph
    split = g.graph["bias_split"]
    row, col = split["row"], split["col"]
    assert k not in row.free_symbols and q not in col.free_symbols
    assert sympy.expand(row + col - _bias(g)) == 0  # the same sum, whatever the anchor
    assert col.subs(k, ANCHOR) == 0  # zero at the anchor: no large position terms to cancel
    (slope,) = [sym for sym in row.free_symbols if sym.name.startswith("ld")]
    assert sympy.expand(col - slope * (k - ANCHOR)) == 0
    assert split["slope"] == slope  # per program: a key tile's columns are slope · lane + one scalar


def test_a_column_term_that_is_not_affine_in_k_has_no_anchor():
    g = build({"name": "bent", "mask": "k <= q", "score": "s + 0.01 * min(k, 40) - 0.5 * q + 2"}).graph
    split = g.graph["bias_split"]
    assert sympy.expand(split["col"] - sympy.Min(k, 40) / 100) == 0
    assert sympy.expand(split["row"] - (2 - q / 2)) == 0
    assert split["slope"] is None


@pytest.mark.parametrize("spec", [
    {"name": "abs_alibi", "score": "s - slopes[h] * abs(q - k)", "inputs": {"slopes": {"dtype": "float32", "shape": ["H"]}}},
    {"name": "per_key_bias", "mask": "k <= q", "score": "s + kb[k]", "inputs": {"kb": {"dtype": "float32", "shape": ["T_KV"]}}},
    {"name": "scaled", "mask": "k <= q", "score": "2 * s + q"},
    {"name": "capped", "mask": "k <= q", "score": "30 * tanh(s / 30)"},
    {"name": "sig", "mask": "k <= q", "score": "s + 0.1 * k", "normalizer": "sigmoid"},
    # terms that could wrap in int32 once expanded, or be infinite on a row the mask empties
    {"name": "square", "mask": "k <= q", "score": "s + 0.0005 * k * k"},
    {"name": "fifth", "mask": "k <= q", "score": "s + 1e-9 * (q + 1) * (q + 1) * (q + 1) * (q + 1) * (q + 1)"},
    {"name": "log_row", "mask": "k < q", "score": "s - log(q)"},
    {"name": "inverse", "mask": "k <= q", "score": "s + 1 / (T_Q - q)"},
])  # fmt: skip
def test_scores_that_are_not_s_plus_a_separable_bias_keep_the_whole_expression(spec):
    plan = build(spec).plan
    assert build(spec).graph.graph["bias_split"] is None and plan.bias_split is None


def test_only_the_natural_order_lse_kernels_take_the_split():
    plan = build({"name": "alibi_sp", "mask": "k <= q", "score": "s - slopes[h] * (q - k)", "recompute": "store_p",
                  "inputs": {"slopes": {"dtype": "float32", "shape": ["H"]}}}).plan  # fmt: skip
    assert plan.bias_split is not None and plan.stored.bias_split is None
    strided = build({"name": "strided_alibi", "mask": "k <= q and ((q - k) % 4 == 0 or q - k < 3)",
                     "score": "s + 0.1 * (k - q)"}).plan  # fmt: skip
    assert strided.bias_split is not None and strided.perm.bias_split is None


@pytest.mark.parametrize("spec, shape", [
    # ALiBi bottom-right with more keys than queries, and with more queries than keys
    ("alibi", dims(H=4, H_KV=2, T_Q=37, T_KV=150)),
    ("alibi", dims(H=3, H_KV=1, T_Q=150, T_KV=37)),
    # a row term with // and %, a column term that is not affine (no anchor), the lengths
    ({"name": "mixed", "mask": "k <= q + 3", "score": "s + 0.02 * (q // 7) - 0.3 * (q % 5) + 0.01 * min(k, 50) - k / T_KV"},
     dims(H=2, H_KV=1, T_Q=70, T_KV=90)),
    # a steep slope: from the anchor, scores near the diagonal carry up to 30 · 63 of bias
    ({"name": "steep", "mask": "k <= q", "score": "s - 30 * (q - k)"}, dims(T_Q=100, T_KV=100)),
    # a constant slope in k and a head term (per program, so it joins the rows)
    ({"name": "const_slope", "mask": "k <= q + 2", "score": "s + 0.3 * (k - q) + 0.1 * h"}, dims(H=3, H_KV=1, T_Q=60, T_KV=75)),
    # a row term alone: every score of a row moves together; only the log-sum-exp sees it
    ({"name": "row_only", "mask": "k <= q", "score": "s + 0.25 * q + 1.5"}, dims(T_Q=50, T_KV=50)),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_kernels_match_the_reference(spec, shape, dtype):
    assert build(spec).plan.bias_split is not None
    check_spec(spec, shape, dtype)


def test_scores_that_keep_the_whole_expression_still_match_the_reference():
    for spec in ({"name": "log_row", "mask": "k < q", "score": "s - log(q)"},
                 {"name": "fifth", "mask": "k <= q", "score": "s + 1e-9 * (q + 1) * (q + 1) * (q + 1) * (q + 1) * (q + 1)"}):
        check_spec(spec, dims(T_Q=100, T_KV=100))


@pytest.mark.parametrize(("dtype", "split"), [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)])
def test_only_16_bit_launches_take_the_split(dtype, split):
    # float32 keeps the whole score: from the anchor, the split's scores carry |slope| · BLOCK_Q
    # of bias, whose rounding float32's comparison with the reference would see
    op = attngen.compile("alibi")
    q = torch.zeros(1, 2, 8, 16, dtype=dtype)
    assert op._common(q, q, q)[2]["BIAS_SPLIT"] is split
    assert attngen.compile("causal")._common(q, q, q)[2]["BIAS_SPLIT"] is False
