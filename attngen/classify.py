"""Tile classification in closed form: which key tiles a query tile must visit, and which of
them need no per-element mask (and the transpose, for the dK/dV kernel).

The mask (params bound) is put in disjunctive normal form. In each conjunct, every atom that is
affine in the visited position ``var`` (``k`` for the forward and dQ kernels, ``q`` for the
dK/dV kernel) with coefficient ±1 -- or affine in ``var // c`` -- becomes an inclusive bound
``lo(given) <= var <= hi(given)`` that is monotone in the other position ``given``; atoms free of
``var`` whose value is monotone in ``given`` become guards decided per tile; any other atom
(periodic ``%`` tests, reads of runtime inputs along a position, ...) makes the conjunct
*inexact*: its tiles are visited but always masked element-wise.

For a tile of ``given`` positions ``[g_first, g_last]`` a conjunct visits
``[max lo(g at its min), min hi(g at its max)]`` and is FULL on
``[max lo(g at its max), min hi(g at its min)]`` when exact and every guard holds on the whole
tile. Bounds are evaluated only at the two ends of the tile, which monotonicity makes exact,
so classification is sound: a skipped tile has no visible pair and a FULL tile no masked one.
The kernels evaluate these formulas themselves (see :func:`range_statements`); nothing is
precomputed per sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import sympy

from .expr import SYMBOLS, FloorDiv

MAX_CONJUNCTS = 4
#: above this many comparisons the DNF (exponential in them) is not attempted
MAX_ATOMS = 10
SCALAR_SYMBOLS = {"b", "h", "T_Q", "T_KV"}


@dataclass(frozen=True)
class Bound:
    """An inclusive bound on ``var`` as a function of ``given``; ``sign`` is +1 if it is
    nondecreasing in ``given``, -1 if nonincreasing, 0 if constant."""

    expr: sympy.Expr
    sign: int


@dataclass(frozen=True)
class Guard:
    """A condition ``d(given) <rel> 0`` that does not involve ``var``."""

    expr: sympy.Expr
    rel: str
    sign: int


@dataclass(frozen=True)
class RuntimeAtom:
    """A comparison ``lhs <rel> rhs`` of runtime-input reads along the positions, decided per
    tile pair on the device from per-tile minima and maxima (:func:`runtime_tests`).

    Each side is a load symbol read along ``q`` or ``k`` (its range over a tile comes from
    the data) or an expression free of both positions (one value per tile pair)."""

    lhs: sympy.Expr
    rel: str
    rhs: sympy.Expr


@dataclass(frozen=True)
class Conjunct:
    """One ``and`` of the mask's DNF: bounds on ``var``, guards on ``given``, and comparisons
    of runtime inputs; ``exact`` when nothing else is in it (then FULL tiles exist)."""

    lows: tuple[Bound, ...]
    highs: tuple[Bound, ...]
    guards: tuple[Guard, ...]
    exact: bool
    runtime: tuple[RuntimeAtom, ...] = ()

    @property
    def bound_symbols(self) -> set[str]:
        """Names the bounds and guards read: besides the given position and params, ``b``,
        ``h`` or scalar runtime loads (``ld<i>``) make the tile ranges depend on the call."""
        return {s.name for b in (*self.lows, *self.highs, *self.guards) for s in b.expr.free_symbols}


@dataclass(frozen=True)
class TileRanges:
    """The closed-form classification of a mask for a loop over ``var`` tiles."""

    var: str
    given: str
    conjuncts: tuple[Conjunct, ...]

    @property
    def skips(self) -> bool:
        """Whether any tile can be skipped or run unmasked at all."""
        return any(c.lows or c.highs or c.guards or c.exact or c.runtime for c in self.conjuncts)

    @property
    def runtime(self) -> tuple[int, ...]:
        """Indices of the conjuncts whose tiles also depend on runtime-input data."""
        return tuple(j for j, c in enumerate(self.conjuncts) if c.runtime)


def classify(
    mask: sympy.Basic | None,
    var: str,
    scalar_loads: Iterable[str] = (),
    position_loads: dict[str, str] | None = None,
    batch_loads: Iterable[str] = (),
    row_symbols: Iterable[str] = (),
) -> TileRanges:
    """Classify ``mask`` for a loop over ``var`` (``"k"`` or ``"q"``).

    Args:
        mask: the boolean sympy mask with params bound and runtime-input reads replaced by
            load symbols, or ``None`` for no mask.
        var: the position the kernel loops over.
        scalar_loads: names of load symbols that are scalars in the kernel (their indices
            depend on neither position), which bounds may use.
        position_loads: integer load symbols read at exactly one position (``doc[b, k]``),
            name -> ``"q"`` or ``"k"``; comparisons among them and position-free values become
            :class:`RuntimeAtom` s, decided per tile from device-side metadata.
        batch_loads: the scalar loads that depend on nothing but ``b``, which the metadata
            kernel can read (and so runtime atoms may compare against).
        row_symbols: position-free symbols that still vary across the rows of the kernel's
            tile, so bounds and guards may not use them (``h`` in the decoding kernel, whose
            rows are every query head of one KV head); an atom using one is inexact.
    """
    given = "q" if var == "k" else "k"
    if mask is None or mask is sympy.true:
        return TileRanges(var, given, (Conjunct((), (), (), True),))
    if mask is sympy.false:
        return TileRanges(var, given, (Conjunct((), (), (Guard(sympy.Integer(1), "<", 0),), True),))
    allowed = (SCALAR_SYMBOLS - set(row_symbols)) | set(scalar_loads) | {given}
    expanded = _expand_abs(mask)
    if len(expanded.atoms(sympy.core.relational.Relational)) > MAX_ATOMS:
        return TileRanges(var, given, (Conjunct((), (), (), False),))
    dnf = sympy.to_dnf(expanded)
    terms = dnf.args if isinstance(dnf, sympy.Or) else (dnf,)
    if len(terms) > MAX_CONJUNCTS:
        return TileRanges(var, given, (Conjunct((), (), (), False),))
    pos_loads = {sympy.Symbol(n, integer=True, real=True) for n in (position_loads or {})}
    point = SCALAR_SYMBOLS - {"h"} | set(batch_loads)
    conjuncts = []
    for term in terms:
        atoms = term.args if isinstance(term, sympy.And) else (term,)
        conjuncts.append(_conjunct(atoms, SYMBOLS[var], SYMBOLS[given], allowed, pos_loads, point))
    return TileRanges(var, given, tuple(conjuncts))


def _expand_abs(expr: sympy.Basic) -> sympy.Basic:
    """Rewrite ``abs(x) <= c`` as ``-c <= x <= c`` (and the other comparisons likewise)."""

    def rewrite(rel):
        lhs, rhs, op = rel.lhs, rel.rhs, rel.rel_op
        if isinstance(rhs, sympy.Abs) and not isinstance(lhs, sympy.Abs):
            lhs, rhs, op = rhs, lhs, {"<": ">", "<=": ">=", ">": "<", ">=": "<="}.get(op, op)
        if not isinstance(lhs, sympy.Abs) or op not in ("<", "<=", ">", ">="):
            return rel
        x = lhs.args[0]
        if op in ("<", "<="):
            fn = sympy.Lt if op == "<" else sympy.Le
            return sympy.And(fn(x, rhs), fn(-rhs, x))
        fn = sympy.Gt if op == ">" else sympy.Ge
        return sympy.Or(fn(x, rhs), fn(-rhs, x))

    return expr.replace(lambda e: isinstance(e, sympy.core.relational.Relational), rewrite)


def monotone_sign(expr: sympy.Basic, g: sympy.Symbol) -> int | None:
    """+1 / -1 if ``expr`` is nondecreasing / nonincreasing in ``g``, 0 if free of it, None if
    neither can be shown."""
    if g not in expr.free_symbols:
        return 0
    if expr == g:
        return 1
    if isinstance(expr, sympy.Add):
        return _combine(monotone_sign(a, g) for a in expr.args)
    if isinstance(expr, sympy.Mul):
        coeff, rest = expr.as_coeff_Mul()
        if not coeff.is_Number or g not in rest.free_symbols or rest == expr:
            return None  # a product of the position with another symbol: sign unknown
        inner = monotone_sign(rest, g)
        return None if inner is None else int(inner * (1 if coeff > 0 else -1))
    if isinstance(expr, FloorDiv) and expr.args[1].is_Integer and expr.args[1] > 0:
        return monotone_sign(expr.args[0], g)
    if isinstance(expr, (sympy.Min, sympy.Max)):
        return _combine(monotone_sign(a, g) for a in expr.args)
    return None


def _combine(signs: Iterable[int | None]) -> int | None:
    seen = set(signs)
    if None in seen:
        return None
    seen.discard(0)
    if len(seen) > 1:
        return None
    return seen.pop() if seen else 0


def _runtime_atom(atom, pos_loads: set[sympy.Symbol], point: set[str]) -> RuntimeAtom | None:
    """``atom`` as a comparison of position loads and position-free values, if it is one."""
    if not isinstance(atom, sympy.core.relational.Relational) or not (atom.free_symbols & pos_loads):
        return None
    for side in (atom.lhs, atom.rhs):
        if side in pos_loads:
            continue
        if {s.name for s in side.free_symbols} - point or not side.is_integer:
            return None
    return RuntimeAtom(atom.lhs, atom.rel_op, atom.rhs)


def _conjunct(atoms, v, g, allowed: set[str], pos_loads=frozenset(), point=frozenset()) -> Conjunct:
    lows, highs, guards, runtime = [], [], [], []
    exact = True

    def usable(e: sympy.Basic) -> int | None:
        if {s.name for s in e.free_symbols} - allowed:
            return None
        return monotone_sign(e, g)

    for atom in atoms:
        rt = _runtime_atom(atom, pos_loads, point)
        if rt is not None:
            runtime.append(rt)
            continue
        if not isinstance(atom, sympy.core.relational.Relational):
            exact = False  # e.g. a boolean runtime input read directly
            continue
        d = sympy.expand(atom.lhs - atom.rhs)
        op = atom.rel_op
        if v not in d.free_symbols:
            sign = usable(d)
            if sign is None:
                exact = False
            else:
                guards.append(Guard(d, op, sign))
            continue
        solved = _solve(d, op, v)
        if solved is None:
            exact = False
            continue
        lo, hi = solved
        for bound, out in ((lo, lows), (hi, highs)):
            if bound is None:
                continue
            sign = usable(bound)
            if sign is None or not bound.is_integer:
                exact = False
            else:
                out.append(Bound(bound, sign))
    return Conjunct(tuple(lows), tuple(highs), tuple(guards), exact, tuple(runtime))


def _solve(d: sympy.Expr, op: str, v: sympy.Symbol):
    """Bounds ``(lo, hi)`` (either may be None) on ``v`` from ``d <op> 0``, or None."""
    if op == "!=":
        return None
    floor_terms = [t for t in d.atoms(FloorDiv) if v in t.free_symbols]
    if floor_terms:
        if len(floor_terms) != 1:
            return None
        f = floor_terms[0]
        c = f.args[1]
        if f.args[0] != v or not (c.is_Integer and c > 0):
            return None
        a = d.coeff(f)
        rest = sympy.expand(d - a * f)
        if a not in (1, -1) or v in rest.free_symbols:
            return None
        m, op = (-rest, op) if a == 1 else (rest, _flip(op))
        # f <op> m  ->  bounds on v
        return {
            "<": (None, c * m - 1),
            "<=": (None, c * m + c - 1),
            ">": (c * m + c, None),
            ">=": (c * m, None),
            "==": (c * m, c * m + c - 1),
        }[op]
    a = d.coeff(v)
    rest = sympy.expand(d - a * v)
    if not (a.is_Integer and a != 0) or v in rest.free_symbols:
        return None
    if a < 0:
        a, rest, op = -a, -rest, _flip(op)
    # a·v + rest <op> 0 with a > 0: v <op> -rest / a, rounded to the integers
    x = sympy.expand(-rest / a)
    if all(c.is_Integer for c in x.as_coefficients_dict().values()):  # a divides every term
        return {"<": (None, x - 1), "<=": (None, x), ">": (x + 1, None), ">=": (x, None), "==": (x, x)}[op]
    if not rest.is_integer:
        return None
    floor = FloorDiv(-rest, a)  # floor(-rest / a)
    ceil = -FloorDiv(rest, a)  # ceil(-rest / a)
    return {
        "<": (None, FloorDiv(-rest - 1, a)),
        "<=": (None, floor),
        ">": (-FloorDiv(rest - 1, a), None),
        ">=": (ceil, None),
        "==": (ceil, floor),
    }[op]


def _flip(op: str) -> str:
    return {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}[op]


# ----------------------------------------------------------------------------------------
# evaluation: one description, printed for the kernels and evaluated with torch for tools


def _endpoint(bound: Bound, want_max: bool) -> str:
    """Which end of the given tile makes the bound largest (``want_max``) or smallest."""
    increasing = bound.sign >= 0
    return "g_last" if increasing == want_max else "g_first"


def interval_exprs(conj: Conjunct, g: sympy.Symbol):
    """Sympy expressions (in symbols ``g_first``, ``g_last``, ``var_min``, ``var_max``) of one
    conjunct's visited and full intervals and its guard decisions."""
    gf, gl = sympy.Symbol("g_first", integer=True), sympy.Symbol("g_last", integer=True)
    vmin, vmax = sympy.Symbol("var_min", integer=True), sympy.Symbol("var_max", integer=True)
    at = {"g_first": gf, "g_last": gl}

    def ev(e, end):
        return e.xreplace({g: at[end]})

    vis_lo = sympy.Max(vmin, *[ev(b.expr, _endpoint(b, False)) for b in conj.lows])
    full_lo = sympy.Max(vmin, *[ev(b.expr, _endpoint(b, True)) for b in conj.lows])
    vis_hi = sympy.Min(vmax, *[ev(b.expr, _endpoint(b, True)) for b in conj.highs])
    full_hi = sympy.Min(vmax, *[ev(b.expr, _endpoint(b, False)) for b in conj.highs])
    nevers, alwayses = [], []
    for guard in conj.guards:
        lo = ev(guard.expr, "g_first" if guard.sign >= 0 else "g_last")  # smallest value of d
        hi = ev(guard.expr, "g_last" if guard.sign >= 0 else "g_first")  # largest value of d
        always, never = {
            "<": (sympy.Lt(hi, 0), sympy.Ge(lo, 0)),
            "<=": (sympy.Le(hi, 0), sympy.Gt(lo, 0)),
            ">": (sympy.Gt(lo, 0), sympy.Le(hi, 0)),
            ">=": (sympy.Ge(lo, 0), sympy.Lt(hi, 0)),
            "==": (sympy.And(sympy.Eq(lo, 0), sympy.Eq(hi, 0)), sympy.Or(sympy.Gt(lo, 0), sympy.Lt(hi, 0))),
            "!=": (sympy.Or(sympy.Gt(lo, 0), sympy.Lt(hi, 0)), sympy.And(sympy.Eq(lo, 0), sympy.Eq(hi, 0))),
        }[guard.rel]
        alwayses.append(always)
        nevers.append(never)
    never = sympy.Or(*nevers) if nevers else sympy.false
    always = sympy.And(*alwayses) if alwayses else sympy.true
    return vis_lo, vis_hi, full_lo, full_hi, never, always


FIELDS = ("t_lo", "t_hi", "ft_lo", "ft_hi")


def range_statements(ranges: TileRanges, print_expr) -> list[str]:
    """Triton statements that leave, per interval ``j`` (sorted, disjoint), the tile bounds
    ``s_j, fs_j, fe_j, e_j``: tiles ``[s_j, fs_j)`` and ``[fe_j, e_j)`` are visited with the
    mask, ``[fs_j, fe_j)`` without it. :func:`segment_statements` then lays the masked and the
    unmasked segments end to end, so each kernel runs exactly one masked and one unmasked loop.

    A conjunct with runtime atoms is further cut to the tile ranges of the metadata kernel
    (:func:`runtime_tests`), four int32 per such conjunct at ``meta_base``.

    The kernel must define scalars ``g_first``, ``g_last`` (the given tile's first and last
    valid positions), ``given_full`` (the given tile has no invalid rows), ``var_min``,
    ``var_max`` (position range of ``var``), ``VAR_OFF`` (position of index 0 of ``var``),
    ``N_VAR`` (its length) and ``BV`` (its tile size). ``print_expr`` prints sympy to Triton.
    """
    g = SYMBOLS[ranges.given]
    out = []
    for j, conj in enumerate(ranges.conjuncts):
        vis_lo, vis_hi, full_lo, full_hi, never, always = interval_exprs(conj, g)
        out += [
            f"vlo_{j} = {print_expr(vis_lo)} - VAR_OFF",
            f"vhi_{j} = {print_expr(vis_hi)} - VAR_OFF",
            f"flo_{j} = {print_expr(full_lo)} - VAR_OFF",
            f"fhi_{j} = {print_expr(full_hi)} - VAR_OFF",
        ]
        if never is not sympy.false:
            out.append(f"vhi_{j} = tl.where({print_expr(never)}, vlo_{j} - 1, vhi_{j})")
        out += [
            f"t_lo_{j} = tl.maximum(vlo_{j}, 0) // BV",
            f"t_hi_{j} = tl.where(vhi_{j} >= tl.maximum(vlo_{j}, 0), tl.minimum(vhi_{j}, N_VAR - 1) // BV + 1, t_lo_{j})",
            f"ft_lo_{j} = (tl.maximum(flo_{j}, 0) + BV - 1) // BV",
            f"ft_hi_{j} = tl.maximum(tl.minimum(fhi_{j}, N_VAR - 1) + 1, 0) // BV",
        ]
        if conj.runtime:  # intersect with the ranges the metadata kernel found in the data
            r = ranges.runtime.index(j)
            out += [
                f"t_lo_{j} = tl.maximum(t_lo_{j}, tl.load(meta_base + {4 * r}))",
                f"t_hi_{j} = tl.maximum(tl.minimum(t_hi_{j}, tl.load(meta_base + {4 * r + 1})), t_lo_{j})",
                f"ft_lo_{j} = tl.maximum(ft_lo_{j}, tl.load(meta_base + {4 * r + 2}))",
                f"ft_hi_{j} = tl.minimum(ft_hi_{j}, tl.load(meta_base + {4 * r + 3}))",
            ]
        full_ok = "given_full" if conj.exact else None
        if full_ok and always is not sympy.true:
            full_ok = f"given_full & ({print_expr(always)})"
        out.append(
            f"ft_hi_{j} = tl.where({full_ok}, ft_hi_{j}, ft_lo_{j})" if full_ok else f"ft_hi_{j} = ft_lo_{j}"
        )
    n = len(ranges.conjuncts)
    for i in range(n):  # sort the intervals by their first tile (a bubble network, unrolled)
        for a in range(n - 1 - i):
            b = a + 1
            out.append(f"swap = t_lo_{b} < t_lo_{a}")
            for f in FIELDS:
                out += [
                    f"tmp = tl.where(swap, {f}_{b}, {f}_{a})",
                    f"{f}_{b} = tl.where(swap, {f}_{a}, {f}_{b})",
                    f"{f}_{a} = tmp",
                ]
    out.append("covered = t_lo_0")
    for j in range(n):  # visit each interval minus what earlier ones covered
        out += [
            f"s_{j} = tl.maximum(t_lo_{j}, covered)",
            f"e_{j} = tl.maximum(t_hi_{j}, s_{j})",
            f"fs_{j} = tl.minimum(tl.maximum(ft_lo_{j}, s_{j}), e_{j})",
            f"fe_{j} = tl.maximum(tl.minimum(ft_hi_{j}, e_{j}), fs_{j})",
            "covered = tl.maximum(covered, e_{j})".replace("{j}", str(j)),
        ]
    return out


def _interval_test(rel: str, lhs: tuple[str, str], rhs: tuple[str, str]) -> tuple[str, str]:
    """Triton code of (always true, always false) for ``l <rel> r`` when ``l`` ranges over
    ``[lhs[0], lhs[1]]`` and ``r`` over ``[rhs[0], rhs[1]]``."""
    (l0, l1), (r0, r1) = lhs, rhs
    single = f"({l0} == {l1}) & ({r0} == {r1}) & ({l0} == {r0})"
    disjoint = f"(({l1} < {r0}) | ({r1} < {l0}))"
    return {
        "==": (single, disjoint),
        "!=": (disjoint, single),
        "<": (f"({l1} < {r0})", f"({l0} >= {r1})"),
        "<=": (f"({l1} <= {r0})", f"({l0} > {r1})"),
        ">": (f"({l0} > {r1})", f"({l1} <= {r0})"),
        ">=": (f"({l0} >= {r1})", f"({l1} < {r0})"),
    }[rel]


def runtime_tests(ranges: TileRanges, print_expr, position_loads: Iterable[str]) -> list[tuple[str, str]]:
    """Per conjunct with runtime atoms, Triton code of (may be visible, is FULL) for a pair of
    tiles, from the per-tile ranges ``<load>_lo``/``<load>_hi`` of every position load (scalars
    for the given tile, vectors over a chunk of var tiles in the metadata kernel). Sound by
    interval arithmetic: a pair called invisible has no pair that passes every runtime atom,
    one called FULL has none that fails one."""
    out, loads = [], set(position_loads)
    for j in ranges.runtime:
        always, never = [], []
        for atom in ranges.conjuncts[j].runtime:
            sides = []
            for side in (atom.lhs, atom.rhs):
                if isinstance(side, sympy.Symbol) and side.name in loads:
                    sides.append((f"{side.name}_lo", f"{side.name}_hi"))
                else:
                    code = f"({print_expr(side)})"
                    sides.append((code, code))
            a, n = _interval_test(atom.rel, *sides)
            always.append(a)
            never.append(n)
        out.append((f"(({' | '.join(never)}) == 0)", " & ".join(always)))
    return out


def masked_segments(count: int) -> list[tuple[str, str]]:
    """The (start, end) variable names of the masked segments, in visiting order."""
    out = []
    for j in range(count):
        out += [(f"s_{j}", f"fs_{j}"), (f"fe_{j}", f"e_{j}")]
    return out


def full_segments(count: int) -> list[tuple[str, str]]:
    """The (start, end) variable names of the unmasked (FULL) segments."""
    return [(f"fs_{j}", f"fe_{j}") for j in range(count)]


def segment_statements(count: int) -> list[str]:
    """Statements defining ``n_masked`` and ``n_full`` and the cumulative offsets ``mc_i`` /
    ``fc_i`` at which each segment starts in the concatenated loop index."""
    out = []
    for prefix, segs, total in (("mc", masked_segments(count), "n_masked"), ("fc", full_segments(count), "n_full")):
        out.append(f"{prefix}_0 = zero")
        for i, (a, b) in enumerate(segs):
            out.append(f"{prefix}_{i + 1} = {prefix}_{i} + ({b} - {a})")
        out.append(f"{total} = {prefix}_{len(segs)}")
    return out


def evaluate_intervals(ranges: TileRanges, env: dict, *, n_var: int, block_var: int, var_off: int):
    """The same computation as :func:`range_statements`, on torch tensors of given tiles.

    Args:
        env: torch values of ``g_first``, ``g_last``, ``given_full`` (one entry per given tile),
            ``var_min``, ``var_max``, ``T_Q``, ``T_KV``, ``b``, ``h`` and any scalar loads.

    Returns:
        Per interval ``(s, fs, fe, e)`` int64 tensors over the given tiles.
    """
    import torch

    from .printer import TorchEvaluator

    ev = TorchEvaluator(env, indexed=None, dtype=torch.float64, device=env["g_first"].device)
    g = SYMBOLS[ranges.given]
    ivs = []
    for conj in ranges.conjuncts:
        vis_lo, vis_hi, full_lo, full_hi, never, always = interval_exprs(conj, g)
        shape = env["g_first"].shape
        vlo = ev.t(ev(vis_lo)).expand(shape) - var_off
        vhi = ev.t(ev(vis_hi)).expand(shape) - var_off
        flo = ev.t(ev(full_lo)).expand(shape) - var_off
        fhi = ev.t(ev(full_hi)).expand(shape) - var_off
        vhi = torch.where(ev.t(ev(never)).expand(shape), vlo - 1, vhi)
        t_lo = vlo.clamp(min=0) // block_var
        t_hi = torch.where(vhi >= vlo.clamp(min=0), vhi.clamp(max=n_var - 1) // block_var + 1, t_lo)
        ft_lo = (flo.clamp(min=0) + block_var - 1) // block_var
        ft_hi = (fhi.clamp(max=n_var - 1) + 1).clamp(min=0) // block_var
        # without the runtime data, a tile that depends on it is visited and masked
        exact = conj.exact and not conj.runtime
        full_ok = env["given_full"] & ev.t(ev(always)).expand(shape) if exact else torch.zeros_like(t_lo, dtype=torch.bool)
        ft_hi = torch.where(full_ok, ft_hi, ft_lo)
        ivs.append((t_lo, t_hi, ft_lo, ft_hi))
    stacked = [torch.stack([iv[i] for iv in ivs]) for i in range(4)]  # [n_intervals, n_given]
    order = torch.argsort(stacked[0], dim=0, stable=True)
    t_lo, t_hi, ft_lo, ft_hi = (x.gather(0, order) for x in stacked)
    covered = t_lo[0]
    out = []
    for j in range(len(ivs)):
        s = torch.maximum(t_lo[j], covered)
        e = torch.maximum(t_hi[j], s)
        fs = torch.minimum(torch.maximum(ft_lo[j], s), e)
        fe = torch.maximum(torch.minimum(ft_hi[j], e), fs)
        covered = torch.maximum(covered, e)
        out.append((s, fs, fe, e))
    return out
