"""Printers of sympy expressions: to Triton source text, and evaluation with torch.

The Triton printer turns a mask or score expression into one Triton expression over the
kernel's variables (``pos_q [BLOCK_Q, 1]``, ``pos_k [1, BLOCK_KV]``, ``off_b``, ``off_h``,
``s``, ``T_Q``, ``T_KV`` and the loaded runtime inputs). The torch evaluator computes the
same expression on dense tensors for the reference. Both give ``//`` and ``%`` Python's floor
semantics, whatever the backend's integer division does on negative operands.
"""

from __future__ import annotations

from typing import Callable, Mapping

import sympy
import torch

from .errors import CodegenError
from .expr import FloorDiv, sigmoid


def _is_int(e: sympy.Basic) -> bool:
    return bool(getattr(e, "is_integer", False))


def _positive_const(e: sympy.Basic) -> bool:
    return e.is_Integer and int(e) > 0


class TritonPrinter:
    """Prints a sympy expression as Triton source.

    Args:
        names: code for each free symbol (``{"q": "pos_q", "ld0": "ld0"}``), by symbol name.
        fast_tanh: print ``tanh`` as the rendered module's ``_tanh`` helper, which takes the
            hardware ``tanh.approx.f32`` when the launch's ``FAST_SIGMOID`` is set (the spec's
            ``fast_tanh``); else as ``2 sigmoid(2x) - 1``.
    """

    def __init__(self, names: Mapping[str, str], fast_tanh: bool = False) -> None:
        self.names = names
        self.fast_tanh = fast_tanh

    def __call__(self, expr: sympy.Basic) -> str:
        return self.p(expr)

    def flt(self, e: sympy.Basic) -> str:
        """``e`` as a float32 value."""
        if e.is_Number:
            return repr(float(e))
        code = self.p(e)
        if _is_int(e):
            return f"({code}).to(tl.float32)"
        return code

    def p(self, e: sympy.Basic) -> str:  # noqa: C901 - one branch per node type
        if e is sympy.true:
            return "True"
        if e is sympy.false:
            return "False"
        if e.is_Symbol:
            try:
                return self.names[e.name]
            except KeyError:
                raise CodegenError(f"no kernel variable for symbol {e.name!r}") from None
        if e.is_Integer:
            return str(int(e))
        if e.is_Rational or e.is_Float:
            return repr(float(e))
        if e.is_Add:
            terms = [self.p(a) for a in e.args]
            return "(" + " + ".join(terms) + ")"
        if e.is_Mul:
            num, den = [], []
            for a in e.args:
                if a.is_Pow and a.exp.is_Number and a.exp < 0:
                    den.append(a.base if a.exp == -1 else a.base ** (-a.exp))
                elif a.is_Rational and not a.is_Integer:
                    if a.p != 1:
                        num.append(sympy.Integer(a.p))
                    den.append(sympy.Integer(a.q))
                else:
                    num.append(a)
            if not den:
                return "(" + " * ".join(self.p(a) for a in num) + ")"
            top = " * ".join(self.flt(a) for a in num) if num else "1.0"
            bottom = " * ".join(self.flt(a) for a in den)
            return f"(({top}) / ({bottom}))"
        if e.is_Pow:
            base, exp = e.args
            if exp == sympy.Rational(1, 2):
                return f"tl.sqrt({self.flt(base)})"
            if exp == sympy.Rational(-1, 2):
                return f"(1.0 / tl.sqrt({self.flt(base)}))"
            if exp.is_Integer and 0 < abs(int(exp)) <= 64:
                n = abs(int(exp))
                b = self.p(base) if n == int(exp) else self.flt(base)
                prod = "(" + " * ".join([b] * n) + ")"
                return prod if int(exp) > 0 else f"(1.0 / {prod})"
            if exp.is_Integer:
                raise CodegenError(f"power {exp} of {base} is too large to print; rewrite the expression")
            return f"tl.exp({self.flt(exp)} * tl.log({self.flt(base)}))"
        if isinstance(e, sympy.exp):
            return f"tl.exp({self.flt(e.args[0])})"
        if isinstance(e, sympy.log):
            return f"tl.log({self.flt(e.args[0])})"
        if isinstance(e, sympy.tanh):
            x = self.flt(e.args[0])
            if self.fast_tanh:
                return f"_tanh({x}, FAST_SIGMOID)"
            return f"(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)"
        if isinstance(e, sigmoid):
            return f"tl.sigmoid({self.flt(e.args[0])})"
        if isinstance(e, sympy.Abs):
            return f"tl.abs({self.p(e.args[0])})"
        if isinstance(e, (sympy.Min, sympy.Max)):
            fn = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
            args = [self.p(a) if _is_int(e) else self.flt(a) for a in e.args]
            code = args[0]
            for a in args[1:]:
                code = f"{fn}({code}, {a})"
            return code
        if isinstance(e, sympy.floor):
            return f"tl.floor({self.flt(e.args[0])}).to(tl.int32)"
        if isinstance(e, sympy.sign):
            x = self.p(e.args[0])
            return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"
        if isinstance(e, sympy.Heaviside):
            x, h0 = self.p(e.args[0]), self.flt(e.args[1]) if len(e.args) > 1 else "0.5"
            return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, 0.0, {h0}))"
        if isinstance(e, sympy.Mod):
            return self.mod(*e.args)
        if isinstance(e, FloorDiv):
            a, d = e.args
            return f"((({self.p(a)}) - {self.mod(a, d)}) // ({self.p(d)}))"
        if isinstance(e, sympy.Piecewise):
            *pairs, (last, last_cond) = e.args
            if last_cond is not sympy.true:
                raise CodegenError(f"Piecewise without a default branch: {e}")
            code = self.p(last)
            for value, cond in reversed(pairs):
                code = f"tl.where({self.p(cond)}, {self.p(value)}, {code})"
            return code
        if isinstance(e, sympy.And):
            return "(" + " & ".join(self.p(a) for a in e.args) + ")"
        if isinstance(e, sympy.Or):
            return "(" + " | ".join(self.p(a) for a in e.args) + ")"
        if isinstance(e, sympy.Not):
            return f"(~{self.p(e.args[0])})"
        if isinstance(e, sympy.core.relational.Relational):
            ops = {"<": "<", "<=": "<=", ">": ">", ">=": ">=", "==": "==", "!=": "!="}
            return f"({self.p(e.lhs)} {ops[e.rel_op]} {self.p(e.rhs)})"
        raise CodegenError(f"cannot print {type(e).__name__} node {e} to Triton")

    def mod(self, a: sympy.Basic, d: sympy.Basic) -> str:
        """Python's ``a % d`` (result has the sign of ``d``) from any integer remainder."""
        ac, dc = self.p(a), self.p(d)
        if _positive_const(d):
            return f"((({ac}) % {dc} + {dc}) % {dc})"
        r = f"(({ac}) % ({dc}))"
        return f"tl.where(({r} != 0) & (({r} < 0) != (({dc}) < 0)), {r} + ({dc}), {r})"


class TorchEvaluator:
    """Evaluates a sympy expression on broadcastable torch tensors (for the reference).

    Args:
        env: the value of each free symbol, by name: tensors or Python numbers.
        indexed: called as ``indexed(name, [index tensors])`` for ``input[...]`` nodes.
        dtype: the floating dtype that integer values are converted to where a float is needed.
    """

    def __init__(self, env: Mapping[str, object], indexed: Callable, dtype: torch.dtype, device) -> None:
        self.env = env
        self.indexed = indexed
        self.dtype = dtype
        self.device = device

    def t(self, x) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, bool):
            return torch.tensor(x, device=self.device)
        if isinstance(x, int):
            return torch.tensor(x, dtype=torch.int64, device=self.device)
        return torch.tensor(x, dtype=self.dtype, device=self.device)

    def flt(self, e: sympy.Basic) -> torch.Tensor:
        x = self.t(self(e))
        if not x.is_floating_point():
            x = x.to(self.dtype)
        return x

    def __call__(self, e: sympy.Basic):  # noqa: C901
        if e is sympy.true:
            return self.t(True)
        if e is sympy.false:
            return self.t(False)
        if e.is_Symbol:
            return self.t(self.env[e.name])
        if e.is_Integer:
            return int(e)
        if e.is_Number:
            return float(e)
        if isinstance(e, sympy.Indexed):
            return self.indexed(e.base.name, [self.t(self(i)) for i in e.indices])
        if e.is_Add or e.is_Mul:
            args = [self(a) if _is_int(e) else self.flt(a) for a in e.args]
            out = args[0]
            for a in args[1:]:
                out = out + a if e.is_Add else out * a
            return out
        if e.is_Pow:
            base, exp = e.args
            if exp.is_Integer and int(exp) > 0 and _is_int(e):
                return self.t(self(base)) ** int(exp)
            return self.flt(base) ** self.flt(exp)
        simple = {sympy.exp: torch.exp, sympy.log: torch.log, sympy.tanh: torch.tanh, sigmoid: torch.sigmoid}
        for cls, fn in simple.items():
            if isinstance(e, cls):
                return fn(self.flt(e.args[0]))
        if isinstance(e, sympy.Abs):
            return torch.abs(self.t(self(e.args[0])))
        if isinstance(e, (sympy.Min, sympy.Max)):
            fn = torch.minimum if isinstance(e, sympy.Min) else torch.maximum
            args = [self.t(self(a)) if _is_int(e) else self.flt(a) for a in e.args]
            out = args[0]
            for a in args[1:]:
                out = fn(out, a)
            return out
        if isinstance(e, sympy.floor):
            return torch.floor(self.flt(e.args[0])).to(torch.int64)
        if isinstance(e, sympy.sign):
            return torch.sign(self.flt(e.args[0]))
        if isinstance(e, sympy.Heaviside):
            h0 = self.flt(e.args[1]) if len(e.args) > 1 else self.t(0.5)
            return torch.heaviside(self.flt(e.args[0]), h0)
        if isinstance(e, sympy.Mod):
            return torch.remainder(self.t(self(e.args[0])), self.t(self(e.args[1])))
        if isinstance(e, FloorDiv):
            return torch.div(self.t(self(e.args[0])), self.t(self(e.args[1])), rounding_mode="floor")
        if isinstance(e, sympy.Piecewise):
            *pairs, (last, _) = e.args
            out = self.t(self(last)) if _is_int(e) else self.flt(last)
            for value, cond in reversed(pairs):
                v = self.t(self(value)) if _is_int(e) else self.flt(value)
                out = torch.where(self.t(self(cond)), v, out)
            return out
        if isinstance(e, sympy.And):
            out = self.t(self(e.args[0]))
            for a in e.args[1:]:
                out = out & self.t(self(a))
            return out
        if isinstance(e, sympy.Or):
            out = self.t(self(e.args[0]))
            for a in e.args[1:]:
                out = out | self.t(self(a))
            return out
        if isinstance(e, sympy.Not):
            return ~self.t(self(e.args[0]))
        if isinstance(e, sympy.core.relational.Relational):
            lhs, rhs = self.t(self(e.lhs)), self.t(self(e.rhs))
            ops = {
                "<": torch.lt,
                "<=": torch.le,
                ">": torch.gt,
                ">=": torch.ge,
                "==": torch.eq,
                "!=": torch.ne,
            }
            return ops[e.rel_op](lhs, rhs)
        raise CodegenError(f"cannot evaluate {type(e).__name__} node {e} with torch")
