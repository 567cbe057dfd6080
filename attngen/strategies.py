"""Hypothesis strategies for attention variants, shapes, layouts and inputs.

Importable by users (``from attngen.strategies import cases``) to fuzz their own code, and
used by ``python -m attngen fuzz`` and the test suite. Requires ``hypothesis``.

Masks are drawn from a grammar of comparisons of ``q``, ``k``, ``q - k``, ``//`` and ``%``
by constants, joined by ``and``/``or``/``not``; score modifications from biases, ALiBi-style
distance penalties, soft-capping and their combinations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

OPS = ("<", "<=", ">", ">=", "==", "!=")


@st.composite
def atoms(draw) -> str:
    """One comparison of positions."""
    kind = draw(st.sampled_from(["diff", "q", "k", "mod", "div", "scaled"]))
    op = draw(st.sampled_from(OPS))
    c = draw(st.integers(-6, 40))
    if kind == "diff":
        return f"q - k {op} {c}"
    if kind == "scaled":
        return f"{draw(st.integers(1, 3))} * q - {draw(st.integers(1, 3))} * k {op} {c}"
    if kind in ("q", "k"):
        return f"{kind} {op} {c}"
    m = draw(st.integers(1, 9))
    if kind == "mod":
        return f"(q - k) % {m} {op} {draw(st.integers(0, m - 1))}"
    return f"q // {m} {op} k // {m}"


@st.composite
def masks(draw, depth: int = 2) -> str:
    """A boolean mask expression."""
    if depth == 0 or draw(st.booleans()):
        return draw(atoms())
    joiner = draw(st.sampled_from(["and", "or"]))
    left, right = draw(masks(depth=depth - 1)), draw(masks(depth=depth - 1))
    neg = "not " if draw(st.booleans()) else ""
    return f"{neg}({left}) {joiner} ({right})"


SCORES = (
    None,
    "s * 1.5",
    "s + 0.5",
    "3.0 * tanh(s / 3.0)",
    "30.0 * tanh(s / 30.0)",
    "s - 0.25 * abs(q - k)",
    "s - 0.1 * (q - k)",
    "5.0 * tanh(s / 5.0) - 0.05 * abs(q - k)",
    "s + sigmoid(s)",
    "max(s, -1.0)",
    "s if q >= k else s - 1.0",
)


def scores():
    """A score modification (``None`` for plain ``s``)."""
    return st.sampled_from(SCORES)


LINEAR_MASKS = (None, "k <= q", "q // 4 == k // 4 and k <= q", "q // 7 == k // 7 and k <= q")


@st.composite
def linear_specs(draw) -> dict:
    """A linear-attention spec: the masks a linear kernel honours (none, causal, chunk-local
    causal), a feature map (elu1, relu, or performer with a few features), normalised or not."""
    kind = draw(st.sampled_from(["elu1", "relu", "performer"]))
    feature_map = {"kind": "performer", "features": draw(st.sampled_from([8, 16])), "seed": draw(st.integers(0, 3))} if kind == "performer" else kind
    return {"name": "fuzz_linear", "normalizer": "linear", "feature_map": feature_map, "mask": draw(st.sampled_from(LINEAR_MASKS)),
            "normalize": kind != "relu" or draw(st.booleans()), "align": draw(st.sampled_from(["bottom_right", "top_left"]))}


@st.composite
def specs(draw) -> dict:
    """A spec dict: mask, optional score modification, alignment, normaliser (softmax; sigmoid
    a quarter of the time; linear attention, with its own masks, one time in eight)."""
    if draw(st.integers(0, 7)) == 0:
        return draw(linear_specs())
    spec = {"name": "fuzz", "mask": draw(masks()), "align": draw(st.sampled_from(["bottom_right", "top_left"]))}
    score = draw(scores())
    if score is not None:
        spec["score"] = score
    if draw(st.integers(0, 3)) == 0:
        spec["normalizer"] = "sigmoid"
    return spec


@st.composite
def shapes(draw, max_t: int = 80, groups=((1, 1), (2, 1), (3, 3), (6, 2), (5, 1), (8, 1)), head_dims=(8, 16, 5, 24, 33, 64, 80)) -> dict:
    """Named dimensions: GQA groups 1, 2, 3, 5, 8; lengths from 1; odd head dims and D_QK != D_V."""
    h, h_kv = draw(st.sampled_from(groups))
    d_qk = draw(st.sampled_from(head_dims))
    d_v = draw(st.sampled_from((d_qk,) + tuple(head_dims)))
    return {
        "B": draw(st.integers(1, 2)),
        "H": h,
        "H_KV": h_kv,
        "T_Q": draw(st.integers(1, max_t)),
        "T_KV": draw(st.integers(1, max_t)),
        "D_QK": d_qk,
        "D_V": d_v,
    }


LAYOUTS = ("contiguous", "bthd", "expanded")


@dataclass(frozen=True)
class Case:
    """One fuzz case: everything needed to replay it."""

    spec: dict
    dims: dict
    dtype: str
    layout: str
    scale: float
    seed: int

    def to_dict(self) -> dict:
        return {"spec": self.spec, "dims": self.dims, "dtype": self.dtype, "layout": self.layout, "scale": self.scale, "seed": self.seed}


@st.composite
def cases(draw, dtypes=("float32",), max_t: int = 80, spec: dict | None = None) -> Case:
    """A full fuzz case. ``scale`` multiplies q and k (30 makes fp16 logits overflow if a
    kernel forms them naively). A taylor2 spec draws head dims it supports (up to 32)."""
    from .features import TAYLOR2_MAX_DIM

    feature_map = (spec or {}).get("feature_map")
    head_dims = (8, 16, 5, 24, 33, 64, 80)
    if (feature_map.get("kind") if isinstance(feature_map, dict) else feature_map) == "taylor2":
        head_dims = tuple(d for d in head_dims if d <= TAYLOR2_MAX_DIM)
    return Case(
        spec=spec if spec is not None else draw(specs()),
        dims=draw(shapes(max_t=max_t, head_dims=head_dims)),
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.sampled_from((1.0, 4.0, 30.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def apply_layout(layout: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Re-lay q, k, v: ``bthd`` views of ``[B, T, H, D]`` buffers, ``expanded`` k and v
    broadcast over the batch with stride 0 (both stay the same values for batch 0)."""
    if layout == "bthd":
        return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    if layout == "expanded":
        return q, k[:1].expand_as(k), v[:1].expand_as(v)
    return q, k, v


def run_case(case: Case, device: str = "cpu"):
    """Compile and check one case by the three-way rule; return the error rows."""
    import attngen
    from attngen.check import compare, make_inputs

    op = attngen.compile(case.spec)
    gen = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    q, k, v, inputs = make_inputs(op.spec, case.dims, dtype=dtype, device=device, generator=gen)
    q, k = (q.float() * case.scale ** 0.5).to(dtype), (k.float() * case.scale ** 0.5).to(dtype)
    q, k, v = apply_layout(case.layout, q, k, v)
    return compare(op, attngen.reference(op.spec), q, k, v, inputs, generator=gen)
