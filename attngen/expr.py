"""Mask and score expressions: a whitelisted Python-syntax grammar parsed into sympy.

Spec text is parsed with :mod:`ast` and converted node by node; nothing is ever handed to
``eval``, ``sympify`` or ``parse_expr``. Every name, operator and function must be on the
whitelist below, and every subexpression is typed (``int``, ``float`` or ``bool``) so that
``and`` cannot join numbers and ``+`` cannot add booleans.

Grammar (Python syntax):

* names: ``q``, ``k`` (absolute query and key positions), ``b``, ``h`` (batch and query-head
  index), ``s`` (the scaled score, in ``score`` only), ``T_Q``, ``T_KV``, every param, and
  every runtime input indexed with ``[]`` (``doc[b, q]``, ``slopes[h]``);
* operators: ``+ - * / // %``, comparisons (chained too), ``and or not``, ``x if c else y``;
* functions: ``abs min max exp log sqrt tanh sigmoid floor``.

``//`` and ``%`` take integers and follow Python's floor semantics on negative operands.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Literal, Mapping

import sympy

from .errors import SpecError

Kind = Literal["int", "float", "bool"]

#: Positions, indices and lengths every expression may name.
POSITION_NAMES: dict[str, Kind] = {
    "q": "int",
    "k": "int",
    "b": "int",
    "h": "int",
    "T_Q": "int",
    "T_KV": "int",
}
SCORE_NAME = "s"
RESERVED_NAMES = frozenset([*POSITION_NAMES, SCORE_NAME])

#: Allowed functions: name -> (min args, max args).
FUNCTIONS: dict[str, tuple[int, int]] = {
    "abs": (1, 1),
    "min": (2, 8),
    "max": (2, 8),
    "exp": (1, 1),
    "log": (1, 1),
    "sqrt": (1, 1),
    "tanh": (1, 1),
    "sigmoid": (1, 1),
    "floor": (1, 1),
}

MAX_EXPRESSION_CHARS = 4000
MAX_DEPTH = 40


class FloorDiv(sympy.Function):
    """Integer floor division ``a // b`` with Python semantics (rounds towards -inf)."""

    is_integer = True

    @classmethod
    def eval(cls, a, b):
        if a.is_Integer and b.is_Integer and b != 0:
            return sympy.Integer(int(a) // int(b))
        return None


class sigmoid(sympy.Function):  # noqa: N801 - the name printed in expressions
    """The logistic function ``1 / (1 + exp(-x))``."""

    is_real = True

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sigmoid(x) * (1 - sigmoid(x))

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return 1 / (1 + sympy.exp(-x))
        return None


SYMBOLS: dict[str, sympy.Symbol] = {
    "q": sympy.Symbol("q", integer=True),
    "k": sympy.Symbol("k", integer=True),
    "b": sympy.Symbol("b", integer=True, nonnegative=True),
    "h": sympy.Symbol("h", integer=True, nonnegative=True),
    "T_Q": sympy.Symbol("T_Q", integer=True, positive=True),
    "T_KV": sympy.Symbol("T_KV", integer=True, positive=True),
    "s": sympy.Symbol("s", real=True),
}


def param_symbol(name: str, value: int | float) -> sympy.Symbol:
    """The sympy symbol of a compile-time param; integer-valued params are integer symbols."""
    if isinstance(value, int):
        return sympy.Symbol(name, integer=True)
    return sympy.Symbol(name, real=True)


def bind_params(expr: sympy.Basic, params: Mapping[str, int | float]) -> sympy.Basic:
    """Replace every param symbol in ``expr`` by its value (ints stay exact integers)."""
    subs = {
        param_symbol(n, v): (sympy.Integer(v) if isinstance(v, int) else sympy.Float(v)) for n, v in params.items()
    }
    return expr.xreplace(subs)


def input_base(name: str, dtype_kind: Kind) -> sympy.IndexedBase:
    """The sympy base of a runtime input tensor (``doc`` in ``doc[b, q]``)."""
    if dtype_kind == "int":
        return sympy.IndexedBase(name, integer=True)
    if dtype_kind == "bool":
        return sympy.IndexedBase(name, integer=True, nonnegative=True)
    return sympy.IndexedBase(name, real=True)


@dataclass(frozen=True)
class InputSignature:
    """What the parser needs to know of a runtime input: its rank and element kind."""

    rank: int
    kind: Kind


@dataclass(frozen=True)
class Parsed:
    """A parsed expression: its sympy form and its type."""

    sym: sympy.Basic
    kind: Kind


def parse_expression(
    text: str,
    *,
    field: str,
    params: Mapping[str, int | float],
    inputs: Mapping[str, InputSignature],
    allow_score: bool,
) -> Parsed:
    """Parse one spec expression into sympy.

    Args:
        text: the expression, Python syntax, e.g. ``"k <= q and q - k < window"``.
        field: the spec field it came from, for error messages (``"mask"``, ``"score"``).
        params: compile-time params by name (their values fix int/float type).
        inputs: runtime inputs by name, with rank and element kind.
        allow_score: whether ``s`` (the score) may appear.

    Returns:
        The sympy expression and its kind (``"int"``, ``"float"`` or ``"bool"``).

    Raises:
        SpecError: on a syntax error, a construct outside the grammar, an unknown name (the
            message lists the known names), a wrong arity or a type mismatch. Nothing in the
            text is executed.
    """
    if not isinstance(text, str):
        raise SpecError(field, f"expected an expression string, got {type(text).__name__} {text!r}")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise SpecError(field, f"expression is {len(text)} characters; at most {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        hint = "; join conditions with 'and', 'or' and 'not'" if "&&" in text or "||" in text else ""
        raise SpecError(field, f"syntax error in {text!r}: {exc.msg} (column {exc.offset}){hint}") from None
    except (RecursionError, MemoryError):
        raise SpecError(field, f"expression nests too deeply; at most {MAX_DEPTH} levels") from None
    depth = _depth(tree.body)
    if depth > MAX_DEPTH:
        raise SpecError(field, f"expression nests {depth} levels deep; at most {MAX_DEPTH}")
    return _Converter(text, field, params, inputs, allow_score).convert(tree.body)


def _depth(node: ast.AST) -> int:
    """Nesting depth of an expression tree (iterative, so deep input cannot overflow)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        n, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in ast.iter_child_nodes(n) if not isinstance(c, (ast.expr_context, ast.operator, ast.boolop, ast.cmpop, ast.unaryop)))
    return deepest


class _Converter:
    def __init__(self, text, field, params, inputs, allow_score):
        self.text = text
        self.field = field
        self.params = params
        self.inputs = inputs
        self.allow_score = allow_score

    # -- helpers -------------------------------------------------------------------------
    def fail(self, node: ast.AST, message: str) -> SpecError:
        snippet = ast.get_source_segment(self.text.strip(), node) or self.text
        return SpecError(self.field, f"{message} (in {snippet!r})")

    def known_names(self) -> list[str]:
        names = [n for n in POSITION_NAMES]
        if self.allow_score:
            names.append(SCORE_NAME)
        names += sorted(self.params)
        names += [f"{n}[...]" for n in sorted(self.inputs)]
        return names

    def numeric(self, node: ast.AST) -> Parsed:
        p = self.convert(node)
        if p.kind == "bool":
            raise self.fail(node, "expected a number here, got a boolean")
        return p

    def boolean(self, node: ast.AST) -> Parsed:
        p = self.convert(node)
        if p.kind != "bool":
            raise self.fail(node, f"expected a boolean (a comparison) here, got {p.kind}")
        return p

    # -- dispatch ------------------------------------------------------------------------
    def convert(self, node: ast.AST) -> Parsed:
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            raise self.fail(
                node,
                f"{type(node).__name__} is not allowed in an expression; use names, numbers, "
                "+ - * / // %, comparisons, and/or/not, 'x if c else y', input[...] and the "
                f"functions {', '.join(FUNCTIONS)}",
            )
        return method(node)

    def visit_Constant(self, node: ast.Constant) -> Parsed:
        v = node.value
        if isinstance(v, bool):
            return Parsed(sympy.true if v else sympy.false, "bool")
        if isinstance(v, int):
            return Parsed(sympy.Integer(v), "int")
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                raise self.fail(node, "non-finite constants are not allowed")
            return Parsed(sympy.Float(v), "float")
        raise self.fail(node, f"constant {v!r} is not a number")

    def visit_Name(self, node: ast.Name) -> Parsed:
        name = node.id
        if name.startswith("_"):
            raise self.fail(node, f"name {name!r} is not allowed (no leading underscores)")
        if name == SCORE_NAME:
            if not self.allow_score:
                raise self.fail(node, "'s' (the score) may only appear in 'score'")
            return Parsed(SYMBOLS["s"], "float")
        if name in POSITION_NAMES:
            return Parsed(SYMBOLS[name], POSITION_NAMES[name])
        if name in self.params:
            value = self.params[name]
            return Parsed(param_symbol(name, value), "int" if isinstance(value, int) else "float")
        if name in self.inputs:
            raise self.fail(node, f"runtime input {name!r} must be indexed, e.g. {name}[...]")
        if name in FUNCTIONS:
            raise self.fail(node, f"function {name!r} must be called, e.g. {name}(x)")
        raise self.fail(node, f"unknown name {name!r}; known names: {', '.join(self.known_names())}")

    def visit_UnaryOp(self, node: ast.UnaryOp) -> Parsed:
        if isinstance(node.op, ast.Not):
            return Parsed(sympy.Not(self.boolean(node.operand).sym), "bool")
        if isinstance(node.op, ast.Invert):  # FlexAttention's mask_mod writes ~
            raise self.fail(node, "'~' is not allowed; write 'not' (as in 'not (k > q)')")
        p = self.numeric(node.operand)
        if isinstance(node.op, ast.USub):
            return Parsed(-p.sym, p.kind)
        if isinstance(node.op, ast.UAdd):
            return p
        raise self.fail(node, f"unary operator {type(node.op).__name__} is not allowed")

    def visit_BinOp(self, node: ast.BinOp) -> Parsed:
        bitwise = {ast.BitAnd: ("&", "'and', as in 'k <= q and q - k < window'"),
                   ast.BitOr: ("|", "'or', as in 'k <= q or k < prefix'"),
                   ast.BitXor: ("^", "'!=' between the two conditions in parentheses")}
        if type(node.op) in bitwise:  # FlexAttention's mask_mod joins conditions with & and |
            sign, fix = bitwise[type(node.op)]
            raise self.fail(node, f"'{sign}' is not allowed; join conditions with {fix}")
        a, b = self.numeric(node.left), self.numeric(node.right)
        both_int = a.kind == "int" and b.kind == "int"
        kind: Kind = "int" if both_int else "float"
        op = node.op
        if isinstance(op, ast.Add):
            return Parsed(a.sym + b.sym, kind)
        if isinstance(op, ast.Sub):
            return Parsed(a.sym - b.sym, kind)
        if isinstance(op, ast.Mult):
            return Parsed(a.sym * b.sym, kind)
        if isinstance(op, ast.Div):
            if b.sym.is_zero:
                raise self.fail(node, "division by zero")
            return Parsed(a.sym / b.sym, "float")
        if isinstance(op, (ast.FloorDiv, ast.Mod)):
            if not both_int:
                raise self.fail(node, "'//' and '%' take integers; use floor(x / y) for floats")
            if b.sym.is_zero:
                raise self.fail(node, "division by zero")
            if isinstance(op, ast.FloorDiv):
                return Parsed(FloorDiv(a.sym, b.sym), "int")
            return Parsed(sympy.Mod(a.sym, b.sym), "int")
        hint = "; write x * x for a square" if isinstance(op, ast.Pow) else ""
        raise self.fail(node, f"operator {type(op).__name__} is not allowed; use + - * / // %{hint}")

    def visit_BoolOp(self, node: ast.BoolOp) -> Parsed:
        parts = [self.boolean(v).sym for v in node.values]
        if isinstance(node.op, ast.And):
            return Parsed(sympy.And(*parts), "bool")
        return Parsed(sympy.Or(*parts), "bool")

    def visit_Compare(self, node: ast.Compare) -> Parsed:
        ops = {
            ast.Lt: sympy.Lt,
            ast.LtE: sympy.Le,
            ast.Gt: sympy.Gt,
            ast.GtE: sympy.Ge,
            ast.Eq: sympy.Eq,
            ast.NotEq: sympy.Ne,
        }
        terms = [self.numeric(node.left)] + [self.numeric(c) for c in node.comparators]
        parts = []
        for op, left, right in zip(node.ops, terms, terms[1:]):
            fn = ops.get(type(op))
            if fn is None:
                raise self.fail(node, f"comparison {type(op).__name__} is not allowed; use < <= > >= == !=")
            parts.append(fn(left.sym, right.sym))
        return Parsed(sympy.And(*parts), "bool")

    def visit_IfExp(self, node: ast.IfExp) -> Parsed:
        cond = self.boolean(node.test)
        a, b = self.convert(node.body), self.convert(node.orelse)
        if (a.kind == "bool") != (b.kind == "bool"):
            raise self.fail(node, "both branches of 'x if c else y' must be numbers, or both booleans")
        if a.kind == "bool":
            sym = sympy.Or(sympy.And(cond.sym, a.sym), sympy.And(sympy.Not(cond.sym), b.sym))
            return Parsed(sym, "bool")
        kind: Kind = "int" if a.kind == b.kind == "int" else "float"
        return Parsed(sympy.Piecewise((a.sym, cond.sym), (b.sym, True)), kind)

    def visit_Call(self, node: ast.Call) -> Parsed:
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise self.fail(node, f"only these functions may be called: {', '.join(FUNCTIONS)}")
        name = node.func.id
        if node.keywords:
            raise self.fail(node, f"{name}() takes no keyword arguments")
        lo, hi = FUNCTIONS[name]
        if not lo <= len(node.args) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise self.fail(node, f"{name}() takes {want} arguments, got {len(node.args)}")
        args = [self.numeric(a) for a in node.args]
        syms = [a.sym for a in args]
        all_int = all(a.kind == "int" for a in args)
        if name == "abs":
            return Parsed(sympy.Abs(syms[0]), args[0].kind)
        if name == "min":
            return Parsed(sympy.Min(*syms), "int" if all_int else "float")
        if name == "max":
            return Parsed(sympy.Max(*syms), "int" if all_int else "float")
        if name == "floor":
            return Parsed(sympy.floor(syms[0]), "int")
        fn = {"exp": sympy.exp, "log": sympy.log, "sqrt": sympy.sqrt, "tanh": sympy.tanh, "sigmoid": sigmoid}[name]
        return Parsed(fn(syms[0]), "float")

    def visit_Subscript(self, node: ast.Subscript) -> Parsed:
        if not isinstance(node.value, ast.Name) or node.value.id not in self.inputs:
            known = ", ".join(sorted(self.inputs)) or "none declared (add them under 'inputs')"
            raise self.fail(node, f"only runtime inputs may be indexed; declared inputs: {known}")
        name = node.value.id
        sig = self.inputs[name]
        idx_nodes = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if len(idx_nodes) != sig.rank:
            raise self.fail(node, f"input {name!r} has {sig.rank} dimension(s) but is indexed with {len(idx_nodes)}")
        indices = []
        for i in idx_nodes:
            if isinstance(i, ast.Slice):
                raise self.fail(node, "slices are not allowed; index with one position per dimension")
            p = self.convert(i)
            if p.kind != "int":
                raise self.fail(i, f"index of {name!r} must be an integer expression, got {p.kind}")
            indices.append(p.sym)
        element = input_base(name, sig.kind)[tuple(indices)]
        if sig.kind == "bool":
            return Parsed(sympy.Ne(element, 0), "bool")
        return Parsed(element, sig.kind)
