"""Hypothesis: random masks and score modifications against the reference."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import check_spec, dims

OPS = ["<", "<=", ">", ">=", "==", "!="]


@st.composite
def atoms(draw):
    kind = draw(st.sampled_from(["diff", "q", "k", "mod", "div"]))
    op = draw(st.sampled_from(OPS))
    c = draw(st.integers(-6, 30))
    if kind == "diff":
        return f"q - k {op} {c}"
    if kind in ("q", "k"):
        return f"{kind} {op} {c}"
    m = draw(st.integers(1, 7))
    if kind == "mod":
        return f"(q - k) % {m} {op} {draw(st.integers(0, m - 1))}"
    return f"q // {m} {op} k // {m}"


@st.composite
def masks(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        return draw(atoms())
    joiner = draw(st.sampled_from(["and", "or"]))
    left, right = draw(masks(depth=depth - 1)), draw(masks(depth=depth - 1))
    neg = "not " if draw(st.booleans()) else ""
    return f"{neg}({left}) {joiner} ({right})"


SCORES = st.sampled_from([None, "s * 1.5", "3.0 * tanh(s / 3.0)", "s - 0.25 * abs(q - k)", "s + sigmoid(s)", "max(s, -1.0)"])


@given(
    mask=masks(),
    score=SCORES,
    t_q=st.integers(1, 40),
    t_kv=st.integers(1, 40),
    group=st.sampled_from([(1, 1), (2, 1), (3, 3), (6, 2)]),
    d=st.sampled_from([(8, 8), (5, 12), (16, 3)]),
    align=st.sampled_from(["bottom_right", "top_left"]),
    seed=st.integers(0, 2**16),
)
def test_random_specs_match_reference(mask, score, t_q, t_kv, group, d, align, seed):
    spec = {"name": "fuzz", "mask": mask, "align": align}
    if score:
        spec["score"] = score
    h, h_kv = group
    check_spec(spec, dims(B=1, H=h, H_KV=h_kv, T_Q=t_q, T_KV=t_kv, D_QK=d[0], D_V=d[1]), torch.float32, seed=seed)
