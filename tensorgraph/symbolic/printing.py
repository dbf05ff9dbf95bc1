"""Printers: element expressions to torch code (a sympy code printer) and to LaTeX.

Generated code works on tensors laid out with one dimension per axis of the chain (size 1
where a tensor does not vary along that axis), so every sum keeps its dimension
(``.sum(dim, keepdim=True)``) and broadcasting lines up by construction.
"""

from __future__ import annotations

from typing import Any

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from .algebra import AxisMax, AxisSum

_TORCH_FUNCTIONS = {"exp": "exp", "log": "log", "tanh": "tanh", "sin": "sin", "cos": "cos", "Abs": "abs",
                    "sign": "sign", "atanh": "atanh", "Sigmoid": "sigmoid", "Softplus": "nn.functional.softplus",
                    "erf": "erf", "tan": "tan", "asin": "asin", "acos": "acos", "atan": "atan", "sinh": "sinh",
                    "cosh": "cosh", "asinh": "asinh", "acosh": "acosh"}


class TorchPrinter(PythonCodePrinter):
    """Prints element expressions as torch code on layout-shaped tensors.

    ``names`` maps symbols (element symbols, sizes, one-hot deltas, indicators) to Python
    names; ``dims`` maps each axis index symbol to its dimension in the layout; ``tensors``
    is the set of symbols that are tensors (the others are Python numbers).
    """

    def __init__(self, names: dict[sp.Basic, str], dims: dict[sp.Symbol, int], tensors: set[sp.Basic],
                 like: str | None = None) -> None:
        super().__init__({"fully_qualified_modules": True, "standard": "python3"})
        self.names = names
        self.dims = dims
        self.tensors = tensors
        self.like = like  # a tensor whose dtype and device a piecewise of numbers takes

    def is_tensor(self, expr: sp.Basic) -> bool:
        if expr in self.tensors:
            return True
        if isinstance(expr, (AxisSum, AxisMax)):
            return True
        return any(self.is_tensor(arg) for arg in expr.args)

    def _print_Symbol(self, expr: sp.Symbol) -> str:
        if expr in self.names:
            return self.names[expr]
        raise ValueError(f"tensorgraph.symbolic: no value for the symbol {expr} in the generated code")

    _print_Dummy = _print_Symbol

    def _print_KroneckerDelta(self, expr: sp.Basic) -> str:
        if expr in self.names:
            return self.names[expr]
        raise ValueError(f"tensorgraph.symbolic: no one-hot tensor for {expr} in the generated code")

    def _print_AxisSum(self, expr: AxisSum) -> str:
        dims = []
        while isinstance(expr, AxisSum):
            dims.append(self.dims[expr.axis])
            expr = expr.body
        dims.sort()
        dim = str(dims[0]) if len(dims) == 1 else str(tuple(dims))
        return f"{self._method_target(expr)}.sum({dim}, keepdim=True)"

    def _print_AxisMax(self, expr: AxisMax) -> str:
        return f"{self._method_target(expr.body)}.amax({self.dims[expr.axis]}, keepdim=True)"

    def _method_target(self, expr: sp.Basic) -> str:
        text = self._print(expr)
        return text if isinstance(expr, sp.Symbol) else f"({text})"

    def _print_Pow(self, expr: sp.Pow, rational: bool = False) -> str:
        base, exponent = expr.args
        if not self.is_tensor(base):
            return super()._print_Pow(expr, rational=rational)
        text = self.parenthesize(base, sp.printing.precedence.PRECEDENCE["Pow"])
        if exponent == sp.S.Half:
            return f"torch.sqrt({self._print(base)})"
        if exponent == -sp.S.Half:
            return f"torch.rsqrt({self._print(base)})"
        if exponent == -1:
            return f"1/{text}"
        if exponent.is_Integer:
            return f"{text}**{exponent}"
        if exponent.is_Rational:
            return f"{text}**({exponent.p}/{exponent.q})"
        return f"{text}**({self._print(exponent)})"

    def _print_Function(self, expr: sp.Function) -> str:
        name = type(expr).__name__
        if name in _TORCH_FUNCTIONS and self.is_tensor(expr):
            return f"torch.{_TORCH_FUNCTIONS[name]}({self._print(expr.args[0])})"
        if name == "Relu":
            return f"torch.relu({self._print(expr.args[0])})"
        if name == "Step":
            return self._print_Step(expr)
        return super()._print_Function(expr)

    def _print_exp(self, expr: sp.Basic) -> str:
        return self._print_Function(expr) if self.is_tensor(expr) else super()._print_Function(expr)

    def _print_Add(self, expr: sp.Add, order: Any = None) -> str:
        """``a - log(Sum(exp(a), j))`` (and other terms) as ``torch.log_softmax(a, j)``: subtracted after the
        ``logsumexp``, ``a`` loses its digits in float32 where it is large (logits near 1,000 keep 5e-5)."""
        found = _log_softmax_terms(expr) if self.is_tensor(expr) else None
        if found is None:
            return super()._print_Add(expr, order=order)
        exponent, axis, rest = found
        text = f"torch.log_softmax({self._print(exponent)}, {self.dims[axis]})"
        return text if rest == 0 else f"{text} + {self.parenthesize(rest, sp.printing.precedence.PRECEDENCE['Add'])}"

    def _print_log(self, expr: sp.Basic) -> str:
        """``log(Sum(exp(a), j))`` as ``torch.logsumexp``: shifted by the maximum, it does not overflow where ``a``
        passes ~88 (float32), as the forward's own ``logsumexp``, ``log_softmax`` or ``cross_entropy`` do not."""
        total, dims = expr.args[0], []
        while isinstance(total, AxisSum):
            dims.append(self.dims[total.axis])
            total = total.body
        factors = sp.Mul.make_args(total)
        if not dims or not all(isinstance(f, sp.exp) for f in factors):
            return self._print_exp(expr)
        dim = str(dims[0]) if len(dims) == 1 else str(tuple(sorted(dims)))
        exponent = sp.Add(*(f.args[0] for f in factors))
        return f"torch.logsumexp({self._method_target(exponent)}, {dim}, keepdim=True)"

    _print_tanh = _print_exp
    _print_sin = _print_exp
    _print_cos = _print_exp
    _print_sign = _print_exp
    _print_erf = _print_exp
    _print_tan = _print_asin = _print_acos = _print_atan = _print_exp
    _print_sinh = _print_cosh = _print_asinh = _print_acosh = _print_atanh = _print_exp

    def _print_Abs(self, expr: sp.Basic) -> str:
        if self.is_tensor(expr):
            return f"torch.abs({self._print(expr.args[0])})"
        return f"abs({self._print(expr.args[0])})"

    def _print_Sigmoid(self, expr: sp.Basic) -> str:
        return f"torch.sigmoid({self._print(expr.args[0])})"

    def _print_Softplus(self, expr: sp.Basic) -> str:
        return f"torch.nn.functional.softplus({self._print(expr.args[0])})"

    def _print_Relu(self, expr: sp.Basic) -> str:
        return f"torch.relu({self._print(expr.args[0])})"

    def _print_Piecewise(self, expr: sp.Piecewise) -> str:
        """``torch.where`` per piece, the last one (condition True) innermost; the branch not taken is never
        multiplied by anything, so an infinite value there does not leak (as in torch.where)."""
        *pieces, (otherwise, _) = expr.args
        if len(pieces) == 1 and pieces[0][0] == 1 and otherwise == 0 and self.like is not None:  # an indicator
            return f"({self._print(pieces[0][1])}).to({self.like}.dtype)"
        branches = [self._print(value) for value, _ in expr.args]
        if self.like is not None and not any(self.is_tensor(value) for value, _ in expr.args):
            # torch.where of Python numbers only is float32: one branch in the gradient's dtype sets it
            branches[0] = f"torch.tensor({branches[0]}, dtype={self.like}.dtype, device={self.like}.device)"
        text = branches[-1]
        for (_, condition), branch in zip(reversed(pieces), reversed(branches[:-1])):
            text = f"torch.where({self._print(condition)}, {branch}, {text})"
        return text

    def _print_Relational(self, expr: sp.Basic) -> str:
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _print_And(self, expr: sp.Basic) -> str:
        return " & ".join(f"({self._print(arg)})" for arg in expr.args)

    def _print_Or(self, expr: sp.Basic) -> str:
        return " | ".join(f"({self._print(arg)})" for arg in expr.args)

    def _print_Not(self, expr: sp.Basic) -> str:
        return f"~({self._print(expr.args[0])})"

    def _print_Step(self, expr: sp.Basic) -> str:
        target = self._method_target(expr.args[0])
        return f"({target} > 0).to({target}.dtype)"


def _log_softmax_terms(expr: sp.Add) -> tuple[sp.Expr, sp.Symbol, sp.Expr] | None:
    """``(a, j, rest)`` where ``expr`` is ``a - log(Sum(exp(a), j)) + rest``, else None."""
    terms = sp.Add.make_args(expr)
    for term in terms:
        if not (isinstance(-term, sp.log) and isinstance((-term).args[0], AxisSum)):
            continue
        total = (-term).args[0]
        factors = sp.Mul.make_args(total.body)
        if not all(isinstance(f, sp.exp) for f in factors):
            continue
        exponent = sp.Add(*(f.args[0] for f in factors))
        others = [t for t in terms if t is not term]
        if all(t in others for t in sp.Add.make_args(exponent)):
            rest = sp.Add(*(t for t in others if t not in sp.Add.make_args(exponent)))
            return exponent, total.axis, rest
    return None


def latex_name(name: str, indices: list[Any]) -> str:
    """``bn_raw`` with indices i, j -> ``\\mathrm{bn\\_raw}_{ij}``."""
    text = r"\mathrm{" + name.replace("_", r"\_") + "}"
    if indices:
        text += "_{" + "".join(str(i) for i in indices) + "}"
    return text


def to_latex(expr: sp.Basic, names: dict[sp.Basic, str]) -> str:
    return sp.latex(expr, symbol_names=names, mul_symbol=None)
