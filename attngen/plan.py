"""Kernel plans: the flat, typed records that are all a template may see.

Every decision is made here or in the passes; templates only ``if``/``for`` over these fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import networkx as nx
import sympy
from sympy.logic.inference import satisfiable

from .classify import full_segments, masked_segments, range_statements, runtime_tests, segment_statements
from .expr import SYMBOLS, FloorDiv
from .errors import UnsupportedError
from .passes import ANCHOR
from .printer import TritonPrinter

#: Kernel variable of each position symbol. ``pos_q`` is ``[BLOCK_Q, 1]``, ``pos_k`` is
#: ``[1, BLOCK_KV]`` in every kernel, so one printed expression serves all of them.
KERNEL_NAMES = {
    "q": "pos_q",
    "k": "pos_k",
    "b": "off_b",
    "h": "off_h",
    "T_Q": "T_Q",
    "T_KV": "T_KV",
    "s": "s",
    "perm_r": "perm_r",
}


@dataclass(frozen=True)
class InputArg:
    """A runtime input tensor as kernel arguments: pointer, strides and sizes."""

    name: str
    rank: int


@dataclass(frozen=True)
class LoadPlan:
    """One read of a runtime input: ``var = input[indices]``, out-of-range reads give 0."""

    var: str
    input: str
    offset_terms: tuple[str, ...]
    bound_codes: tuple[str, ...]
    const_indices: tuple[tuple[int, int], ...]
    is_float: bool
    deps: frozenset[str]


@dataclass(frozen=True)
class GradLoad:
    """A float runtime-input read in the score that can take a gradient (a learnable bias or
    slope): the dQ kernel adds ``dL/dscore · dscore/d(read)`` at the read's address.
    ``reduce`` names the tile axes its address does not vary along (summed first)."""

    load: LoadPlan
    derivative: str
    reduce: str  # "all", "rows" (sum over keys), "cols" (sum over queries) or "none"


@dataclass(frozen=True)
class BiasSplit:
    """A softmax score ``s + R(q) + C(k)`` split by :func:`attngen.passes.split_score_bias`:
    ``row_code`` is ``R`` of ``pos_row`` (the program's query positions, a vector) and the
    anchor ``pos_a``, added to each row's log-sum-exp; ``col_code`` is ``C`` of ``pos_k``
    and ``pos_a``, added to the scaled ``q·k``. Both in natural units. ``slope_code``: where the
    column term is ``c · (pos_k - pos_a)`` with ``c`` the same for the whole program (ALiBi's
    slope), ``c``; a key tile's columns are then ``c`` times a lane index plus one scalar."""

    row_code: str
    col_code: str
    slope_code: str | None = None


@dataclass(frozen=True)
class KernelPlan:
    """Per kernel: which runtime-input loads sit outside its inner loop and which inside."""

    name: str
    outer_loads: tuple[LoadPlan, ...]
    inner_loads: tuple[LoadPlan, ...]


@dataclass(frozen=True)
class RangePlan:
    """The scalar statements that compute a kernel's tile loop bounds, and how many
    intervals (each a masked / unmasked / masked run of tiles) they produce."""

    statements: tuple[str, ...]
    count: int
    segment_statements: tuple[str, ...]
    masked: tuple[tuple[str, str], ...]
    full: tuple[tuple[str, str], ...]
    meta: "MetaPlan | None" = None


@dataclass(frozen=True)
class MetaPlan:
    """The metadata kernel of one loop direction: for every given tile, per conjunct with
    runtime atoms, the range of var tiles that may be visible and the run that is FULL,
    from per-tile minima and maxima of the runtime inputs read along each position."""

    name: str
    var: str
    given_loads: tuple[LoadPlan, ...]
    var_loads: tuple[LoadPlan, ...]
    batch_loads: tuple[LoadPlan, ...]
    tests: tuple[tuple[str, str], ...]

    @property
    def count(self) -> int:
        return len(self.tests)


@dataclass(frozen=True)
class DecodePlan:
    """The split-KV decoding kernel (``templates/decode.py.j2``, :mod:`attngen.decode`): one
    program per (split, KV head, sequence) whose rows are every query head of the KV head
    times every new token, over a contiguous or paged KV cache.

    It applies the whole mask (a strided part included, element-wise), so ``mask_code`` may
    differ from the forward kernel's; ``ranges`` classify its key tiles with ``h`` as a row
    variable (:func:`attngen.classify.classify`'s ``row_symbols``) and no metadata kernel."""

    name: str
    mask_code: str
    outer_loads: tuple[LoadPlan, ...]
    inner_loads: tuple[LoadPlan, ...]
    ranges: RangePlan


@dataclass(frozen=True)
class ModulePlan:
    """Everything the attention template renders: one module with the forward kernel, the
    backward preprocess, the dK/dV kernel and the dQ kernel."""

    spec_name: str
    spec_digest: str
    inputs: tuple[InputArg, ...]
    has_mask: bool
    mask_code: str
    has_score: bool
    score_code: str
    has_dscore: bool
    dscore_code: str
    fold_scale: bool
    sigmoid: bool
    saved: tuple[str, ...]
    dot_precision: tuple[tuple[str, str], ...]
    fwd: KernelPlan
    dkdv: KernelPlan
    dq: KernelPlan
    fwd_ranges: RangePlan
    dkdv_ranges: RangePlan
    #: > 0: this module runs in residue order (position p -> (p % stride, p // stride)) and
    #: merges into the natural-order module's outputs (see attngen.passes.split_periodic)
    perm_stride: int = 0
    #: the permuted module that follows this one, if the mask has a strided part
    perm: "ModulePlan | None" = None
    #: float inputs read in the score, which may require grad (learnable score parameters)
    grad_loads: tuple[GradLoad, ...] = ()
    #: the split-KV decoding kernel, rendered into a module of its own (natural part only)
    decode: DecodePlan | None = None
    #: this module's forward also writes P and its backward kernels read it (recompute: store_p)
    store_p: bool = False
    #: the store_p variant of this module (kernel names ending in ``_sp``), rendered after it
    stored: "ModulePlan | None" = None
    #: every position sees its own partner: the mask holds at q == k whatever the runtime
    #: inputs (:func:`sees_itself`), so no position is hidden from all partners when queries
    #: and keys cover the same positions, and the kernels may skip the unseen-row guards
    sees_itself: bool = False
    #: the score's tanh runs through the rendered ``_tanh`` helper (the spec's ``fast_tanh``)
    fast_tanh: bool = False
    #: the score is ``s`` plus a row term and a column term: the forward, dQ and dK/dV kernels
    #: (natural order, recompute ``lse``) take the columns per tile and the rows in the
    #: log-sum-exp for bf16 and fp16 launches (``BIAS_SPLIT``); float32 launches, the decoding
    #: kernel and P's writers and readers use ``score_code``
    bias_split: BiasSplit | None = None

    @property
    def needs_scores(self) -> bool:
        """Whether the backward needs the scores themselves, not only P: the score
        modification's derivative or a learnable input's gradient reads them."""
        return self.has_dscore or bool(self.grad_loads)

    @property
    def grad_inputs(self) -> tuple[str, ...]:
        """Names of the inputs with gradients, in the spec's declaration order (the order of
        the dQ kernel's ``<name>_grad_ptr`` arguments)."""
        used = {gl.load.input for gl in self.grad_loads}
        return tuple(i.name for i in self.inputs if i.name in used)


def make_plan(g: nx.DiGraph) -> ModulePlan:
    """Flatten a graph that went through :func:`attngen.passes.run_pipeline` into a plan."""
    spec = g.graph["spec"]
    loads_nodes = [d for _, d in g.nodes(data=True) if d.get("op") == "load_input"]
    names = dict(KERNEL_NAMES)
    names.update({d["symbol"].name: d["symbol"].name for d in loads_nodes})
    pr = TritonPrinter(names)
    # fast_tanh approximates the score's tanh (and its derivative's), never a mask's: a
    # mask decides which keys exist and must agree with the reference exactly
    pr_score = TritonPrinter(names, fast_tanh=spec.fast_tanh)
    loads = tuple(_load_plan(d, pr) for d in sorted(loads_nodes, key=lambda d: int(d["symbol"].name[2:])))

    def split(inner_dep: str, name: str) -> KernelPlan:
        return KernelPlan(
            name=name,
            outer_loads=tuple(ld for ld in loads if inner_dep not in ld.deps),
            inner_loads=tuple(ld for ld in loads if inner_dep in ld.deps),
        )

    def code(node: str) -> str:
        printer = pr_score if node in ("score", "dscore") else pr
        return printer(g.nodes[node]["expr"]) if node in g else ""

    score_code = code("score") or "s"
    if "score" in g and SYMBOLS["s"] not in g.nodes["score"]["expr"].free_symbols:
        # a score free of s (a bias alone) must still be a full tile: broadcast it
        score_code = f"tl.full(s.shape, 0.0, tl.float32) + ({score_code})"

    bias_split = None
    if g.graph.get("bias_split"):
        terms = g.graph["bias_split"]
        # the row term reads the program's query positions as a vector (pos_row), not pos_q's column
        pr_split = TritonPrinter({**names, ANCHOR.name: ANCHOR.name, "q": "pos_row"})
        bias_split = BiasSplit(pr_split(terms["row"]), pr_split(terms["col"]),
                               None if terms["slope"] is None else pr.flt(terms["slope"]))

    grad_loads = []
    if "score" in g:
        score = g.nodes["score"]["expr"]
        for ld in loads:
            sym = next(d["symbol"] for d in loads_nodes if d["symbol"].name == ld.var)
            if ld.is_float and sym in score.free_symbols:
                q_dep, k_dep = "q" in ld.deps, "k" in ld.deps
                reduce = {(False, False): "all", (True, False): "rows", (False, True): "cols", (True, True): "none"}[(q_dep, k_dep)]
                grad_loads.append(GradLoad(ld, pr_score(sympy.diff(score, sym)), reduce))

    def module(mask_code: str, tiles: str, perm_stride: int = 0, suffix: str = "") -> ModulePlan:
        return ModulePlan(
            spec_name=spec.name,
            spec_digest=spec.digest(),
            inputs=tuple(InputArg(i.name, len(i.shape)) for i in spec.inputs),
            has_mask="mask" in g,
            mask_code=mask_code,
            has_score="score" in g,
            score_code=score_code,
            has_dscore="dscore" in g,
            dscore_code=code("dscore"),
            fold_scale=g.graph["fold_scale"],
            sigmoid=g.graph["normalizer"] == "sigmoid",
            saved=g.graph["saved"],
            dot_precision=tuple(sorted(g.graph["dot_precision"].items())),
            # the forward and dQ kernels loop over key tiles; the dK/dV kernel over query tiles
            fwd=split("k", "attn_fwd" + suffix),
            dkdv=split("q", "attn_bwd_dkdv" + suffix),
            dq=split("k", "attn_bwd_dq" + suffix),
            fwd_ranges=_ranges(g.graph[tiles + "k"], pr, loads, g.graph["position_loads"], g.graph["batch_loads"]),
            dkdv_ranges=_ranges(g.graph[tiles + "q"], pr, loads, g.graph["position_loads"], g.graph["batch_loads"]),
            perm_stride=perm_stride,
            grad_loads=tuple(grad_loads),
            sees_itself=sees_itself(g),
            fast_tanh=spec.fast_tanh,
            bias_split=None if perm_stride else bias_split,  # residue order keeps the whole score
        )

    decode_loads = split("k", "attn_decode")  # its loop runs over key tiles, as the forward's
    decode = DecodePlan(
        name=decode_loads.name,
        mask_code=code("mask"),
        outer_loads=decode_loads.outer_loads,
        inner_loads=decode_loads.inner_loads,
        ranges=_ranges(g.graph["decode_tiles_k"], pr, loads, {}, ()),
    )
    split_ = g.graph.get("periodic")
    if not split_:
        main = dataclasses.replace(module(code("mask"), "tiles_"), decode=decode)
        if g.graph["recompute"] != "store_p":
            return main
        renamed = {f: dataclasses.replace(getattr(main, f), name=getattr(main, f).name + "_sp") for f in ("fwd", "dkdv", "dq")}
        # P's writer and readers compute whole scores against the true log-sum-exp
        return dataclasses.replace(main, stored=dataclasses.replace(main, store_p=True, bias_split=None, **renamed))
    if g.graph["recompute"] == "store_p":
        raise UnsupportedError(f"recompute: store_p with the strided mask of {spec.name!r}: its residue-order part "
                               "finishes each row's log-sum-exp after the natural part, so P cannot be written; use 'lse'")
    natural = split_["natural"]
    # an empty natural part visits no tile; its mask still has to be a valid expression
    natural_code = "(pos_k < 0)" if natural is sympy.false else pr(natural)
    main = module(natural_code, "natural_tiles_")
    perm = module(pr(split_["perm"]), "perm_tiles_", perm_stride=split_["stride"], suffix="_perm")
    return dataclasses.replace(main, perm=perm, decode=decode)


def sees_itself(g: nx.DiGraph) -> bool:
    """Whether the mask holds for every pair at the same position (``q == k``), for all
    values of the runtime inputs it reads, in the kernels' own arithmetic (int32 that wraps,
    float32 that rounds).

    Then, when a call's queries and keys cover the same positions (``T_Q == T_KV``, same
    offsets), every query sees at least one key and every key is seen by at least one query,
    so no position can hold garbage that the mask hides from all partners, and the kernels
    skip the guards that zero such rows inside masked tiles (``GUARD_UNSEEN``). Causal,
    windowed, chunked, strided, prefix-LM and document masks qualify; a padding condition
    such as ``q < n[b]`` does not.

    Each comparison of the mask is decided at ``q == k`` (a read of an input at ``k`` becomes
    the same read at ``q``) only when the kernel's result is certain:

    * both sides are the same integer computation (``doc[b, q] == doc[b, k]``,
      ``q // 8 == k // 8``): sums, products, ``//`` and ``%`` by constants, ``min``, ``max``
      and ``abs`` of positions, integer inputs and constants, compared as trees, never
      simplified first, so equal trees mean equal results even when a value wraps;
    * both sides take a constant value that wrapping cannot change: a sum or product of
      positions and constants (exact modulo 2³² in int32, so ``q - k`` is 0), then ``//`` or
      ``%`` by a nonzero constant, ``abs``, ``min`` or ``max`` of known values, every value
      and divisor within ±2³⁰ (``q - k < w`` is ``0 < w``). Input reads do not take part:
      a narrower integer tensor than declared (int8 for int32) wraps sooner.

    Everything else is unknown (float arithmetic, ``doc[b, q] < doc[b, k] + 1``, which wraps
    at the int32 maximum, conditions on one position), and the mask must hold for every
    value of the unknowns.
    """
    if "mask" not in g:
        return True
    expr = g.nodes["mask"]["expr"]
    q, k = SYMBOLS["q"], SYMBOLS["k"]
    loads = [d for _, d in g.nodes(data=True) if d.get("op") == "load_input" and d["symbol"] in expr.free_symbols]
    canonical: dict[tuple, sympy.Symbol] = {}
    same: dict[sympy.Symbol, sympy.Symbol] = {k: q}
    ints = {q, k, SYMBOLS["b"], SYMBOLS["h"], SYMBOLS["T_Q"], SYMBOLS["T_KV"]}
    for d in sorted(loads, key=lambda d: d["symbol"].name):
        if d["symbol"].is_integer:
            ints.add(d["symbol"])
            key = (d["input"], tuple(sympy.sympify(i).xreplace({k: q}) for i in d["indices"]))
            same[d["symbol"]] = canonical.setdefault(key, d["symbol"])
    limit = 2**30  # values and divisors this small leave the printed // and % no room to wrap
    commutative = (sympy.Add, sympy.Mul, sympy.Min, sympy.Max)

    def tree(e):
        """A hashable form of an integer computation with k read as q; None if unsure."""
        if isinstance(e, sympy.Symbol):
            return ("sym", same.get(e, e).name) if e in ints else None
        if isinstance(e, sympy.Integer):
            return ("int", int(e))
        if isinstance(e, (FloorDiv, sympy.Mod)) and not (isinstance(e.args[1], sympy.Integer) and e.args[1] != 0):
            return None
        if not isinstance(e, (*commutative, FloorDiv, sympy.Mod, sympy.Abs)):
            return None
        args = [tree(a) for a in e.args]
        if any(a is None for a in args):
            return None
        return (type(e).__name__, tuple(sorted(args)) if isinstance(e, commutative) else tuple(args))

    def ring(e) -> bool:
        """Only sums and products of positions and constants (exact modulo 2^32 in int32).
        Inputs are left out: an int8 tensor passed for an int32 input wraps at 8 bits."""
        if isinstance(e, sympy.Symbol):
            return e in (q, k)
        if isinstance(e, sympy.Integer):
            return True
        return isinstance(e, (sympy.Add, sympy.Mul)) and all(ring(a) for a in e.args)

    def value(e) -> int | None:
        """The value the kernel computes for e at q == k, when it is certain."""
        if ring(e):
            exact = sympy.expand(e.xreplace(same))
            return int(exact) if exact.is_Integer and abs(int(exact)) <= limit else None
        vals = [value(a) for a in e.args]
        if any(v is None for v in vals):
            return None
        if isinstance(e, (sympy.Add, sympy.Mul)):
            result = sum(vals) if isinstance(e, sympy.Add) else math.prod(vals)
        elif isinstance(e, (FloorDiv, sympy.Mod)) and vals[1] != 0:
            result = vals[0] // vals[1] if isinstance(e, FloorDiv) else vals[0] % vals[1]
        elif isinstance(e, sympy.Abs):
            result = abs(vals[0])
        elif isinstance(e, (sympy.Min, sympy.Max)):
            result = min(vals) if isinstance(e, sympy.Min) else max(vals)
        else:
            return None
        return result if abs(result) <= limit else None

    def decided(atom) -> bool | None:
        lt, rt = tree(atom.lhs), tree(atom.rhs)
        if lt is not None and lt == rt:
            return atom.rel_op in ("==", "<=", ">=")
        lv, rv = value(atom.lhs), value(atom.rhs)
        if lv is None or rv is None:
            return None
        return bool(atom.func(sympy.Integer(lv), sympy.Integer(rv)))

    values = {}
    for atom in expr.atoms(sympy.core.relational.Relational):
        d = decided(atom)
        values[atom] = sympy.Dummy("unknown") if d is None else sympy.true if d else sympy.false
    reduced = expr.xreplace(values)
    if reduced is sympy.true or reduced is sympy.false:
        return reduced is sympy.true
    try:
        return not satisfiable(sympy.Not(reduced))
    except (TypeError, ValueError, NotImplementedError):  # a form the SAT solver cannot take: keep the guards
        return False


def _ranges(ranges, pr: TritonPrinter, loads, position_loads: dict[str, str], batch_loads) -> RangePlan:
    names = dict(pr.names)
    names.update({n: n for n in ("g_first", "g_last", "var_min", "var_max")})
    n = len(ranges.conjuncts)
    meta = None
    if ranges.runtime:
        used = set()
        for j in ranges.runtime:
            for atom in ranges.conjuncts[j].runtime:
                used |= {s.name for s in atom.lhs.free_symbols | atom.rhs.free_symbols}
        by_var = {ld.var: ld for ld in loads if ld.var in used}
        meta = MetaPlan(
            name=f"attn_tile_ranges_{ranges.var}",
            var=ranges.var,
            given_loads=tuple(ld for v, ld in by_var.items() if position_loads.get(v) == ranges.given),
            var_loads=tuple(ld for v, ld in by_var.items() if position_loads.get(v) == ranges.var),
            batch_loads=tuple(ld for v, ld in by_var.items() if v in batch_loads),
            tests=tuple(runtime_tests(ranges, pr, position_loads)),
        )
    return RangePlan(
        statements=tuple(range_statements(ranges, TritonPrinter(names))),
        count=n,
        segment_statements=tuple(segment_statements(n)),
        masked=tuple(masked_segments(n)),
        full=tuple(full_segments(n)),
        meta=meta,
    )


def _load_plan(node: dict, pr: TritonPrinter) -> LoadPlan:
    """Pointer terms (int64 offsets) and bounds checks of one runtime-input read.

    Constant indices are checked against the tensor's size on the host at call time, so only
    computed indices get a bounds mask; an index outside the tensor reads 0.
    """
    name = node["input"]
    terms, bounds, consts = [], [], []
    for dim, index in enumerate(node["indices"]):
        stride = f"{name}_stride_{dim}"
        if index.is_Integer:
            terms.append(f"{int(index)} * {stride}")
            consts.append((dim, int(index)))
            continue
        code = pr(index)
        terms.append(f"({code}).to(tl.int64) * {stride}")
        bounds.append(f"(({code}) >= 0) & (({code}) < {name}_size_{dim})")
    return LoadPlan(
        var=node["symbol"].name,
        input=name,
        offset_terms=tuple(terms),
        bound_codes=tuple(bounds),
        const_indices=tuple(consts),
        is_float=not node["symbol"].is_integer,
        deps=node["deps"],
    )
