"""Lowering: a validated spec becomes the IR graph of its forward pass.

The IR is a :class:`networkx.DiGraph`. Every node has an ``op`` attribute:

========== ==========================================================================
op         meaning and attributes
========== ==========================================================================
load       a tile of ``q``, ``k`` or ``v`` (``tensor``)
dot        ``q @ k^T`` (``name='qk'``) or ``p @ v`` (``name='pv'``)
scale      multiply by ``scale`` (``value``: number, or ``None`` for ``1/sqrt(D_QK)``)
score      the score modification (``expr``: sympy expression of ``s``)
mask       which pairs are visible (``expr``: sympy boolean); bounds are implicit
normalize  the normaliser (``kind='softmax'``)
store      ``o`` or ``lse`` (``tensor``)
========== ==========================================================================

Edges run from producer to consumer. Graph attributes hold what is not a node: ``spec``,
``params`` (name -> value), ``inputs`` (name -> :class:`~attngen.schema.InputSpec`),
``align``. Passes in :mod:`attngen.passes` then rewrite and annotate this graph.
"""

from __future__ import annotations

import networkx as nx

from .errors import UnsupportedError
from .schema import AttentionSpec


def lower(spec: AttentionSpec) -> nx.DiGraph:
    """Build the forward IR graph of a validated spec.

    Args:
        spec: a spec that passed :func:`attngen.schema.validate`.

    Returns:
        The graph described in this module's docstring.

    Raises:
        UnsupportedError: a linear spec, which has no score graph (its plan comes from
            :func:`attngen.linear.make_linear_plan`; :func:`attngen.build` routes it there).
    """
    if spec.normalizer == "linear":
        raise UnsupportedError(f"spec {spec.name!r}: linear attention is planned by attngen.linear.make_linear_plan, not lowered; use attngen.build")
    g = nx.DiGraph(
        spec=spec,
        params=spec.param_values,
        inputs={i.name: i for i in spec.inputs},
        align=spec.align,
        normalizer=spec.normalizer,
        recompute=spec.recompute,
    )
    for t in ("q", "k", "v"):
        g.add_node(f"load_{t}", op="load", tensor=t)
    g.add_node("qk", op="dot", name="qk")
    g.add_edges_from([("load_q", "qk"), ("load_k", "qk")])
    g.add_node("scale", op="scale", value=spec.scale)
    g.add_edge("qk", "scale")
    last = "scale"
    parsed_score = spec.parsed_score()
    if parsed_score is not None:
        g.add_node("score", op="score", expr=parsed_score.sym)
        g.add_edge(last, "score")
        last = "score"
    parsed_mask = spec.parsed_mask()
    if parsed_mask is not None:
        g.add_node("mask", op="mask", expr=parsed_mask.sym)
        g.add_edge(last, "mask")
        last = "mask"
    g.add_node("normalize", op="normalize", kind=spec.normalizer)
    g.add_edge(last, "normalize")
    g.add_node("pv", op="dot", name="pv")
    g.add_edges_from([("normalize", "pv"), ("load_v", "pv")])
    g.add_node("store_o", op="store", tensor="o")
    g.add_node("store_lse", op="store", tensor="lse")
    g.add_edges_from([("pv", "store_o"), ("normalize", "store_lse")])
    return g
