"""Compiler passes over the IR graph, and the one ordered pipeline that runs them.

Each pass takes the graph, rewrites it in place, and returns it. Its docstring says what it
requires of the graph and what it establishes; :func:`verify` checks the invariants that hold
after every pass and runs between passes when ``ATTNGEN_VERIFY_IR=1`` (the tests set it).
"""

from __future__ import annotations

import math
from typing import Callable

import networkx as nx
import sympy

from . import config
from .classify import MAX_ATOMS, classify
from .errors import IRVerifyError, UnsupportedError
from .expr import SYMBOLS, FloorDiv
from .expr import bind_params as bind

LOG2E = 1.0 / math.log(2.0)

KNOWN_OPS = {"load", "dot", "scale", "score", "mask", "normalize", "store", "derivative", "load_input"}
EXPR_NODES = ("score", "mask", "dscore")
POSITION_SYMBOLS = {"q", "k", "b", "h", "T_Q", "T_KV"}


def bind_params(g: nx.DiGraph) -> nx.DiGraph:
    """Substitute every compile-time param by its value.

    Requires: expression nodes from :func:`attngen.lower.lower`.
    Establishes: no expression mentions a param symbol.
    """
    for node in EXPR_NODES:
        if node in g:
            g.nodes[node]["expr"] = bind(g.nodes[node]["expr"], g.graph["params"])
    g.graph["params_bound"] = True
    return g


def simplify_expressions(g: nx.DiGraph) -> nx.DiGraph:
    """Drop a mask that is always true and a score modification that is the identity.

    Requires: params bound.
    Establishes: a ``mask`` node exists only if some pair may be masked; a ``score`` node only
    if the score differs from ``s``.
    """
    if "mask" in g and g.nodes["mask"]["expr"] is sympy.true:
        _remove_through(g, "mask")
    if "score" in g and sympy.expand(g.nodes["score"]["expr"] - SYMBOLS["s"]) == 0:
        _remove_through(g, "score")
    return g


def derive_backward(g: nx.DiGraph) -> nx.DiGraph:
    """Add the derivative of the score modification with respect to ``s``.

    The backward pass needs ``d score / d s`` to carry ``dP`` back to ``dS`` (the chain rule
    through the score modification); sympy differentiates the expression symbolically.

    Requires: params bound.
    Establishes: a ``dscore`` node (op ``derivative``) whenever a ``score`` node exists and its
    derivative is not identically 1.
    """
    if "score" in g:
        d = sympy.diff(g.nodes["score"]["expr"], SYMBOLS["s"])
        if d.atoms(sympy.Derivative):
            raise UnsupportedError(
                f"score: cannot differentiate {g.nodes['score']['expr']} with respect to s "
                "(floor of the score has no useful derivative); rewrite the score modification"
            )
        if d != 1:
            g.add_node("dscore", op="derivative", expr=d, of="score")
            g.add_edge("score", "dscore")
    return g


def collect_input_loads(g: nx.DiGraph) -> nx.DiGraph:
    """Turn each distinct ``input[...]`` read into a ``load_input`` node and a symbol.

    Each load records the positions its indices depend on (``deps`` within ``q``, ``k``,
    ``b``, ``h``), so that codegen hoists it out of the loops it does not depend on.

    Requires: params bound.
    Establishes: no expression holds an ``Indexed`` node; each read is a symbol ``ld<i>``.
    """
    found: dict[sympy.Indexed, sympy.Symbol] = {}
    for node in EXPR_NODES:
        if node in g:
            for item in sorted(g.nodes[node]["expr"].atoms(sympy.Indexed), key=sympy.default_sort_key):
                if item not in found:
                    base = item.base
                    kind = "int" if base.label.is_integer else "float"
                    found[item] = sympy.Symbol(f"ld{len(found)}", integer=kind == "int", real=True)
    for item, sym in found.items():
        deps = {s.name for s in item.free_symbols if s.name in POSITION_SYMBOLS}
        g.add_node(
            f"load_input_{sym.name}",
            op="load_input",
            input=item.base.name,
            indices=tuple(item.indices),
            deps=frozenset(deps),
            symbol=sym,
        )
    for node in EXPR_NODES:
        if node in g:
            expr = g.nodes[node]["expr"]
            used = expr.atoms(sympy.Indexed)
            g.nodes[node]["expr"] = expr.xreplace({i: found[i] for i in used})
            for i in used:
                g.add_edge(f"load_input_{found[i].name}", node)
    return g


#: the residue class of a permuted tile (``position % stride``), a scalar of each program
PERM_R = sympy.Symbol("perm_r", integer=True, nonnegative=True)


def _periodic_stride(conjunct: sympy.Basic) -> int | None:
    """``c`` if the conjunct holds ``(q - k) % c == 0`` (either sign of ``q - k``), else None."""
    q, k = SYMBOLS["q"], SYMBOLS["k"]
    atoms = conjunct.args if isinstance(conjunct, sympy.And) else (conjunct,)
    for atom in atoms:
        if isinstance(atom, sympy.Eq) and atom.rhs == 0 and isinstance(atom.lhs, sympy.Mod):
            e, c = atom.lhs.args
            if c.is_Integer and c > 1 and sympy.expand(e) in (q - k, k - q):
                return int(c)
    return None


def split_periodic(g: nx.DiGraph) -> nx.DiGraph:
    """Split off the strided part of the mask so that it runs as dense tiles.

    A conjunct holding ``(q - k) % c == 0`` (Sparse Transformer strided heads, Child et al.,
    2019) keeps one key in ``c``: in natural order every tile it touches is PARTIAL. Ordered by
    residue (position ``p`` -> ``(p % c, p // c)``), the pairs it keeps fall in the diagonal
    blocks of one residue class, where ``q = r + c·j_q`` and ``k = r + c·j_k`` turn its other
    comparisons into comparisons of ``j_q`` and ``j_k`` -- often whole FULL tiles. The mask
    becomes ``natural or periodic`` with the periodic part stripped of what the natural part
    sees; the kernels run the natural part in natural order, then the periodic part in
    permuted order, and merge the two by log-sum-exp (the backward adds their gradients).

    Applies when every periodic conjunct has the same ``c`` and the mask reads no runtime
    input along a position. Requires: params bound, loads collected.
    Establishes: graph attribute ``periodic``: None, or ``{"stride", "natural", "perm",
    "perm_j"}`` (natural-order mask, permuted part in positions and in ``j`` with symbol
    ``perm_r`` for the residue).
    """
    g.graph["periodic"] = None
    if "mask" not in g:
        return g
    mask = g.nodes["mask"]["expr"]
    if any(d.get("op") == "load_input" and d["deps"] & {"q", "k"} for _, d in g.nodes(data=True)):
        return g
    if len(mask.atoms(sympy.core.relational.Relational)) > MAX_ATOMS:
        return g
    dnf = sympy.to_dnf(mask)
    stride_of = {t: _periodic_stride(t) for t in (dnf.args if isinstance(dnf, sympy.Or) else (dnf,))}
    strides = set(stride_of.values()) - {None}
    if len(strides) != 1:  # no strided conjunct, or two strides
        return g
    c = strides.pop()
    natural = sympy.Or(*[t for t, st in stride_of.items() if st is None])
    perm = sympy.And(sympy.Or(*[t for t, st in stride_of.items() if st is not None]), sympy.Not(natural))
    q, k = SYMBOLS["q"], SYMBOLS["k"]
    perm_j = perm.xreplace({q: PERM_R + c * q, k: PERM_R + c * k})
    g.graph["periodic"] = {"stride": c, "natural": natural, "perm": perm, "perm_j": perm_j}
    return g


def _read_symbols(g: nx.DiGraph, free_of: set[str]) -> list[sympy.Symbol]:
    """The symbols (``ld<i>``) of the runtime-input reads whose indices use none of the
    position symbols in ``free_of``."""
    return [d["symbol"] for _, d in g.nodes(data=True) if d.get("op") == "load_input" and not (d["deps"] & free_of)]


def classify_tiles(g: nx.DiGraph) -> nx.DiGraph:
    """Classify (query tile, key tile) pairs in closed form (:mod:`attngen.classify`).

    Requires: params bound, runtime-input reads replaced by load symbols.
    Establishes: graph attributes ``tiles_k`` (key tiles per query tile, for the forward and
    dQ kernels) and ``tiles_q`` (query tiles per key tile, for the dK/dV kernel);
    with a periodic split also ``natural_tiles_*`` and ``perm_tiles_*`` (in ``j``);
    ``position_loads`` (integer reads at one position, ``doc[b, k]``, whose per-tile
    minimum and maximum the metadata kernels compute on the device) and ``batch_loads``;
    ``decode_tiles_k``: key tiles of the whole mask for the split-KV decoding kernel, whose
    rows hold every query head of a KV head (so ``h`` and reads that depend on it are not
    scalars there) and which has no metadata kernel (runtime atoms stay inexact).
    """
    mask = g.nodes["mask"]["expr"] if "mask" in g else None

    def loads_free_of(deps: set[str]) -> list[str]:
        return [sym.name for sym in _read_symbols(g, deps)]

    scalar_loads = loads_free_of({"q", "k"})
    position_loads = {}
    for _, d in g.nodes(data=True):
        if d.get("op") != "load_input" or not d["symbol"].is_integer:
            continue
        at = [i for i in d["indices"] if i in (SYMBOLS["q"], SYMBOLS["k"])]
        if len(at) == 1 and d["deps"] <= {at[0].name, "b"} and sum(at[0] in i.free_symbols for i in d["indices"]) == 1:
            position_loads[d["symbol"].name] = at[0].name
    batch_loads = [
        d["symbol"].name for _, d in g.nodes(data=True) if d.get("op") == "load_input" and d["deps"] <= {"b"}
    ]
    g.graph["position_loads"] = position_loads
    g.graph["batch_loads"] = batch_loads
    g.graph["decode_tiles_k"] = classify(mask, "k", loads_free_of({"q", "k", "h"}), row_symbols=("h",))
    for var in ("k", "q"):
        g.graph[f"tiles_{var}"] = classify(mask, var, scalar_loads, position_loads, batch_loads)
        split = g.graph.get("periodic")
        if split:  # the kernels' own classification: natural part, and the permuted part in j
            g.graph[f"natural_tiles_{var}"] = classify(split["natural"], var, scalar_loads)
            g.graph[f"perm_tiles_{var}"] = classify(split["perm_j"], var, [*scalar_loads, PERM_R.name])
    return g


def choose_numerics(g: nx.DiGraph) -> nx.DiGraph:
    """Fix the numerics of the softmax.

    Softmax runs in base 2 (``exp2``) with accumulators in float32. With no score
    modification the scale and ``log2(e)`` fold into one multiply of ``q·k``; otherwise the
    score is computed in natural units and multiplied by ``log2(e)`` afterwards. The sigmoid
    normaliser works in natural units (``sigmoid(score + bias)``), nothing folded. float32 inputs
    use IEEE dots (not TF32), so float32 is as exact as the reference.

    Establishes: graph attributes ``exp2``, ``fold_scale``, ``acc_dtype`` and
    ``dot_precision`` (per input dtype).
    """
    g.graph["dot_precision"] = {"float32": "ieee", "float16": "tf32", "bfloat16": "tf32"}
    softmax = g.graph["normalizer"] == "softmax"
    g.graph["exp2"] = softmax
    g.graph["fold_scale"] = softmax and "score" not in g
    g.graph["acc_dtype"] = "float32"
    return g


#: the position a kernel program measures a separable bias from (:func:`split_score_bias`): the
#: first query of the program's tile where the program owns query rows, the first key of
#: its tile in the dK/dV kernel
ANCHOR = sympy.Symbol("pos_a", integer=True)


def split_score_bias(g: nx.DiGraph) -> nx.DiGraph:
    """Split a softmax score of the form ``s + R(q) + C(k)`` into a row term and a column term.

    Softmax is unchanged by a term that is the same across a row, so the kernels drop
    ``R(q)`` from the scores and add it back only to each row's log-sum-exp; ``C(k)`` is
    evaluated once per key tile as a vector. Each score then costs one fused multiply-add
    (``q·k · scale·log2 e + C``) instead of the whole expression per element. ALiBi's
    ``s - slope[h] (q - k)`` (Press et al., 2022) is the case in point.

    Both terms are measured from an anchor position ``pos_a`` of each program when ``C`` is
    affine in ``k`` (``R(q) + C(a)`` and ``C(k) - C(a)``, the same sum): near the anchor
    they stay as small as the original ``slope (q - k)``: no two large position terms
    cancel in float32 at long sequence lengths.

    Applies when the normaliser is softmax and every additive term of ``score - s`` is a
    per-program factor (numbers, params, the sequence lengths, runtime inputs read by batch
    entry and head only) times at most one factor of ``q`` or of ``k``: the position, or
    ``//``, ``%``, ``min``, ``max``, ``abs`` of affine integer expressions of it. The
    kernels take the split for bf16 and fp16 inputs only (``BIAS_SPLIT``): from the anchor,
    scores near the diagonal carry up to ``|c|·BLOCK_Q`` of bias, which adds a relative
    rounding of about ``|c|·BLOCK_Q·2⁻²⁴`` to P, below fp16's own rounding of P for slopes
    ``|c| < 64``, but visible next to float32's.

    Requires: loads collected, numerics chosen.
    Establishes: graph attribute ``bias_split``: None, or ``{"row": R, "col": C, "slope": c}``
    (sympy, in natural units; ``R`` of ``q`` and ``pos_a``, ``C`` of ``k`` and ``pos_a``; ``c``
    the per-program ``C = c (k - pos_a)`` when ``C`` is affine in ``k``, else None).
    """
    g.graph["bias_split"] = None
    if g.graph["normalizer"] != "softmax" or "score" not in g:
        return g
    s, q, k = SYMBOLS["s"], SYMBOLS["q"], SYMBOLS["k"]
    bias = sympy.expand(g.nodes["score"]["expr"] - s)
    if s in bias.free_symbols:
        return g
    per_program = set(_read_symbols(g, {"q", "k"}))
    known = per_program | {SYMBOLS[n] for n in ("q", "k", "b", "h", "T_Q", "T_KV")}
    if not bias.free_symbols <= known:
        return g  # a runtime input read along a position
    row, col = sympy.Integer(0), sympy.Integer(0)
    for term in sympy.Add.make_args(bias):
        if not _one_position_factor(term, q, k):
            return g
        if k in term.free_symbols:
            col += term
        else:
            row += term
    slope = None
    if col.is_polynomial(k) and sympy.degree(col, k) <= 1:
        at_anchor = col.subs(k, ANCHOR)
        row, col = row + at_anchor, col - at_anchor
        slope = sympy.diff(col, k)
    g.graph["bias_split"] = {"row": sympy.factor_terms(row), "col": sympy.factor_terms(col), "slope": slope}
    return g


#: position functions a split term may hold, of positions affine with integer coefficients
_POSITION_FUNCTIONS = (FloorDiv, sympy.Mod, sympy.Min, sympy.Max, sympy.Abs)


def _one_position_factor(term: sympy.Expr, q: sympy.Symbol, k: sympy.Symbol) -> bool:
    """Whether ``term`` is a per-program factor times at most one factor of one position:
    the position itself, or ``//``, ``%``, ``min``, ``max`` or ``abs`` of affine integer
    expressions of it. Such terms are finite wherever the per-program values are, and as
    small in int32 as the user wrote them (no expanded powers that wrap, no ``log q`` that
    is infinite on a row the mask empties)."""
    factors = [f for f in sympy.Mul.make_args(term) if f.free_symbols & {q, k}]
    if not factors:
        return True
    if len(factors) > 1 or (q in factors[0].free_symbols and k in factors[0].free_symbols):
        return False
    (f,) = factors
    if f in (q, k):
        return True
    if not isinstance(f, _POSITION_FUNCTIONS):
        return False
    for arg in f.args:
        poly = arg.as_poly(q, k)
        if poly is None or poly.total_degree() > 1 or not all(c.is_integer for c in poly.coeffs()):
            return False
    return True


def apply_recompute(g: nx.DiGraph) -> nx.DiGraph:
    """Apply the recompute policy of the backward pass.

    ``lse`` (FlashAttention-2): the forward saves O and the log-sum-exp; the backward
    recomputes P tile by tile from them. ``full`` (gradient checkpointing of the attention
    itself): the forward saves only its inputs, and the backward first reruns the forward to
    get O and the log-sum-exp back -- the least activation memory, one more forward of time.
    ``store_p``: the forward also writes P (a second pass over its tiles once the row's
    log-sum-exp is known) and the backward reads it instead of recomputing ``q·kᵀ`` and the
    exponentials -- O(T_Q·T_KV) memory, for short sequences.

    Establishes: graph attribute ``saved`` (the tensors the forward keeps for the backward).
    """
    saved = {"lse": ("q", "k", "v", "o", "lse"), "store_p": ("q", "k", "v", "o", "lse", "p"), "full": ("q", "k", "v")}
    if g.graph["recompute"] not in saved:
        raise IRVerifyError(f"recompute policy {g.graph['recompute']!r} has no pass")
    g.graph["saved"] = saved[g.graph["recompute"]]
    return g


PIPELINE: list[Callable[[nx.DiGraph], nx.DiGraph]] = [
    bind_params,
    simplify_expressions,
    derive_backward,
    collect_input_loads,
    split_periodic,
    classify_tiles,
    choose_numerics,
    split_score_bias,
    apply_recompute,
]


def run_pipeline(g: nx.DiGraph, *, check: bool | None = None) -> nx.DiGraph:
    """Run :data:`PIPELINE` in order; verify after each pass when ``check`` (default: the
    ``ATTNGEN_VERIFY_IR`` setting)."""
    check = config.verify_ir() if check is None else check
    if check:
        verify(g, after="lower")
    for p in PIPELINE:
        g = p(g)
        if check:
            verify(g, after=p.__name__)
    return g


def verify(g: nx.DiGraph, *, after: str) -> None:
    """Check the invariants of the IR graph.

    Raises:
        IRVerifyError: naming the pass after which the invariant broke.
    """

    def fail(msg: str) -> IRVerifyError:
        return IRVerifyError(f"after {after}: {msg}")

    if not nx.is_directed_acyclic_graph(g):
        raise fail("the graph has a cycle")
    for node, data in g.nodes(data=True):
        if data.get("op") not in KNOWN_OPS:
            raise fail(f"node {node!r} has unknown op {data.get('op')!r}")
    for required in ("load_q", "load_k", "load_v", "qk", "normalize", "pv", "store_o", "store_lse"):
        if required not in g:
            raise fail(f"node {required!r} is missing")
    if not nx.has_path(g, "qk", "store_o"):
        raise fail("the output does not depend on q·k")
    params = set(g.graph["params"])
    loads = {d["symbol"].name for _, d in g.nodes(data=True) if d.get("op") == "load_input"}
    for node in EXPR_NODES:
        if node not in g:
            continue
        expr = g.nodes[node]["expr"]
        names = {s.name for s in expr.free_symbols if isinstance(s, sympy.Symbol)}
        allowed = POSITION_SYMBOLS | loads | ({"s"} if node != "mask" else set())
        if not g.graph.get("params_bound"):
            allowed |= params
        if expr.atoms(sympy.Indexed):
            allowed |= {i.base.name for i in expr.atoms(sympy.Indexed)} | {
                str(i.base.label) for i in expr.atoms(sympy.Indexed)
            }
        stray = names - allowed
        if stray:
            raise fail(f"{node} expression {expr} names {sorted(stray)}")


def _remove_through(g: nx.DiGraph, node: str) -> None:
    """Remove ``node`` and connect its predecessors to its successors."""
    preds, succs = list(g.predecessors(node)), list(g.successors(node))
    g.remove_node(node)
    g.add_edges_from((p, s) for p in preds for s in succs)
