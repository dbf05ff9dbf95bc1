"""A small algebra of reductions over named axes, on top of sympy.

sympy's ``Sum``/``KroneckerDelta``/``doit`` machinery can derive cross-entropy, but it
chokes on batchnorm (Gosper summation fails, or the result is a huge unsimplified
expression). The reductions a recorded chain contains are much simpler than general
symbolic sums: every tensor is a family of elements indexed by named axes, and every sum
runs over one whole axis. This module exploits exactly that:

* **Named axes.** Every element symbol (``hprebn[i,j]``) is registered with the set of
  axes it varies over. An axis is an index symbol (``i``) with a size symbol (``n``).
* **Canonical sums.** :class:`AxisSum` is an unevaluated sum over one axis. Canonical form:
  expand, split sums over added terms, pull factors that do not vary along the summed axis
  out of the sum, replace the sum of a constant by ``size * constant`` and a sum of a
  one-hot ``KroneckerDelta(k, y[i])`` over ``k`` by 1.
* **Rewrite rules.** Each reduction recorded in the chain is a fresh symbol; its
  definition, once canonical, is solved for one sum (``sum_k exp(l) = counts_sum*exp(m)``)
  and becomes a rewrite rule. Rewriting both sides of an identity with the same rules and
  cancelling decides the identities we need (the gradient into ``logit_maxes`` is 0;
  the derived batchnorm gradient equals the textbook one).
* **Fractional powers** get their bases normalised, so one square root is recognised
  wherever it appears.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import sympy as sp


class _AxisReduction(sp.Function):
    """A reduction of the element expression ``body`` over the whole axis ``axis``: ``Reduction(body, i)``."""

    nargs = 2
    str_name = ""

    @classmethod
    def eval(cls, body, axis):  # noqa: D102 - never evaluates by itself: canonical forms are explicit
        return None

    @property
    def body(self) -> sp.Expr:
        return self.args[0]

    @property
    def axis(self) -> sp.Symbol:
        return self.args[1]

    def _eval_is_real(self):
        return self.args[0].is_real

    def _sympystr(self, printer) -> str:
        return f"{self.str_name}({printer._print(self.body)}, {printer._print(self.axis)})"


class AxisSum(_AxisReduction):
    """``AxisSum(body, i)``: the sum of the element expression ``body`` over the whole axis ``i``.

    Inside the body, element symbols that vary along ``i`` refer to the summed element;
    outside, to the element at the free index: ``x[i,j] - AxisSum(x[i,j], i)/n`` is
    ``x_ij - mean_i x_ij``.
    """

    str_name = "Sum"

    def _eval_is_nonnegative(self):
        return self.args[0].is_nonnegative

    def _eval_is_positive(self):
        return self.args[0].is_positive

    def _latex(self, printer, exp=None) -> str:
        body = printer._print(self.body)
        if isinstance(self.body, sp.Add):
            body = rf"\left({body}\right)"
        text = rf"\sum_{{{printer._print(self.axis)}}} {body}"
        return rf"\left({text}\right)^{{{exp}}}" if exp is not None else text


class AxisMax(_AxisReduction):
    """``AxisMax(body, i)``: the largest element of ``body`` along axis ``i``."""

    str_name = "Max"

    def _latex(self, printer, exp=None) -> str:
        text = rf"\max_{{{printer._print(self.axis)}}} {printer._print(self.body)}"
        return rf"\left({text}\right)^{{{exp}}}" if exp is not None else text


class _Named(sp.Function):
    """An elementwise function of one argument, printed in LaTeX as ``latex_name(x)``."""

    nargs = 1
    latex_name = ""

    def _latex(self, printer, exp=None) -> str:
        text = rf"{self.latex_name}\left({printer._print(self.args[0])}\right)"
        return rf"{text}^{{{exp}}}" if exp is not None else text


class Relu(_Named):
    """``max(x, 0)``, whose derivative is :class:`Step` (0 at 0, as torch's)."""

    latex_name = r"\operatorname{relu}"

    def fdiff(self, argindex=1):
        return Step(self.args[0])

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_nonnegative(self):
        return True if self.args[0].is_real else None


class Sigmoid(_Named):
    """``1/(1 + exp(-x))``, kept whole: its derivative is ``s*(1 - s)`` (as torch computes it), not
    ``exp(-x)/(1 + exp(-x))**2``, which overflows for very negative x."""

    latex_name = r"\sigma"

    def fdiff(self, argindex=1):
        return self * (1 - self)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))

    def _eval_is_positive(self):
        return True if self.args[0].is_real else None


class Softplus(_Named):
    """``log(1 + exp(x))``, kept whole: its derivative is :class:`Sigmoid` (no overflow for large x)."""

    latex_name = r"\operatorname{softplus}"

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return sp.log(1 + sp.exp(x))

    def _eval_is_positive(self):
        return True if self.args[0].is_real else None


class Step(sp.Function):
    """``1 if x > 0 else 0``; its derivative is taken as 0 (as torch does)."""

    nargs = 1

    def fdiff(self, argindex=1):
        return sp.S.Zero

    def _eval_is_nonnegative(self):
        return True

    def _latex(self, printer, exp=None) -> str:
        return rf"\mathbb{{1}}\left[{printer._print(self.args[0])} > 0\right]"


ATOMS = (AxisSum, AxisMax)

# The most nodes an expression may have while deriving. The lecture's chains stay under 1,000 and
# a layer norm, tanh and cross-entropy in one chain under 4,000; two normalisations in one chain
# multiply out past 100,000 and sympy then takes many minutes (hours with a gelu between them).
SIZE_LIMIT = 10_000


class TooLarge(ValueError):
    """An expression grew past :data:`SIZE_LIMIT` nodes: the chain is too long to derive in one piece."""

    def __init__(self, size: int) -> None:
        super().__init__(f"an expression grew past {size:,} nodes")
        self.size = size


def exceeds(expr: sp.Basic, limit: int) -> bool:
    """Whether ``expr`` has more than ``limit`` nodes (counting stops there)."""
    count = 0
    for _ in sp.preorder_traversal(expr):
        count += 1
        if count > limit:
            return True
    return False


@dataclass
class Axis:
    """One named axis: its index symbol, its size symbol, and the recorded size."""

    index: sp.Symbol
    size: sp.Symbol
    value: int


@dataclass
class Space:
    """The axes of one derivation, the axes of every element symbol, and the rewrite rules."""

    axes: list[Axis] = field(default_factory=list)
    symbol_axes: dict[sp.Symbol, frozenset] = field(default_factory=dict)
    # symbols that sum to 1 along an axis (tie-splitting masks of amax)
    unit_sums: dict[sp.Symbol, sp.Symbol] = field(default_factory=dict)
    rules: dict[sp.Basic, sp.Expr] = field(default_factory=dict)
    rule_notes: list[tuple[sp.Expr, sp.Expr]] = field(default_factory=list)
    limit: int | None = field(default_factory=lambda: SIZE_LIMIT)  # canon raises TooLarge past it (None: never)
    _axes_cache: dict[sp.Basic, frozenset] = field(default_factory=dict)

    # ------------------------------------------------------------------ axes

    def axis(self, index: sp.Symbol) -> Axis:
        for axis in self.axes:
            if axis.index == index:
                return axis
        raise KeyError(index)

    def size(self, index: sp.Symbol) -> sp.Symbol:
        return self.axis(index).size

    @property
    def indices(self) -> set[sp.Symbol]:
        return {axis.index for axis in self.axes}

    def register(self, symbol: sp.Symbol, axes: Iterable[sp.Symbol]) -> sp.Symbol:
        self.symbol_axes[symbol] = frozenset(axes)
        return symbol

    def axes_of(self, expr: sp.Basic) -> frozenset:
        """The axes an element expression varies over (bound axes of sums excluded)."""
        cached = self._axes_cache.get(expr)
        if cached is not None:
            return cached
        if isinstance(expr, sp.Symbol):
            if expr in self.symbol_axes:
                result = self.symbol_axes[expr]
            else:
                result = frozenset([expr]) if expr in self.indices else frozenset()
        elif isinstance(expr, ATOMS):
            result = self.axes_of(expr.args[0]) - {expr.args[1]}
        elif not expr.args:
            result = frozenset()
        else:
            result = frozenset().union(*(self.axes_of(arg) for arg in expr.args))
        self._axes_cache[expr] = result
        return result

    def sum_over(self, expr: sp.Expr, axes: Iterable[sp.Symbol]) -> sp.Expr:
        """``expr`` summed over each of ``axes`` (unevaluated, in layout order)."""
        order = [axis.index for axis in self.axes]
        for index in sorted(axes, key=order.index, reverse=True):
            expr = AxisSum(expr, index)
        return expr

    @contextmanager
    def unlimited(self) -> Iterator[None]:
        """No size limit inside the block (for proofs the user asks for: they may take their time)."""
        limit, self.limit = self.limit, None
        try:
            yield
        finally:
            self.limit = limit

    def sized(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with every size n written as 1 + (a positive symbol): sizes are at least 2 (a size-1
        dimension is no axis), which tells sympy that ``n - 1`` is positive."""
        if not hasattr(self, "_shift") or len(self._shift) != len(self.axes):
            self._shift = {a.size: sp.Symbol(f"_{a.size}", positive=True) + 1 for a in self.axes}
        return expr.xreplace(self._shift)

    def nonnegative(self, expr: sp.Expr) -> bool:
        return bool(self.sized(expr).is_nonnegative)

    def nonzero(self, expr: sp.Expr) -> bool:
        return bool(self.sized(expr).is_nonzero)

    def dummy(self, expr: sp.Expr) -> sp.Dummy:
        """A stand-in symbol with the sign of ``expr`` (so sympy may still divide by a positive sum)."""
        sized = self.sized(expr)
        if sized.is_positive:
            return sp.Dummy("a", positive=True)
        if sized.is_nonnegative:
            return sp.Dummy("a", nonnegative=True)
        return sp.Dummy("a", real=True)

    # ------------------------------------------------------------------ canonical form

    def canon(self, expr: sp.Expr, rules: bool = True) -> sp.Expr:
        """Canonical form: expanded, sums split and stripped of constant factors, rules applied.

        Raises :class:`TooLarge` when the result has more than ``self.limit`` nodes.
        """
        expr = sp.sympify(expr)
        for _ in range(16):
            expr = self._normalise(expr)
            if self.limit is not None and exceeds(expr, self.limit):
                raise TooLarge(self.limit)
            if not (rules and self.rules):
                return expr
            replaced = self._pick_through(expr.xreplace(self.rules))
            if replaced == expr:
                return expr
            expr = replaced
        return expr

    def _pick_through(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with each one-hot term read through the pick a rule knows: ``delta(j, y)*f_j = delta(j, y)*pick``.

        Where ``KroneckerDelta(j, y[i])`` multiplies factors ``f`` that vary along ``j``, only ``f`` at
        ``j = y[i]`` counts, which is ``sum_j f*delta(j, y[i])``; when a rule knows that sum (a recorded pick
        ``p[range(n), y]``), the term is written with it. The pick-then-log cross-entropy
        ``-log(softmax(x)[range(n), y])`` needs this: its gradient divides ``delta*exp(x)`` by the pick, which
        cancels only once ``delta*exp(x)`` is read as the pick times the softmax's sum.
        """
        if not expr.has(sp.KroneckerDelta):
            return expr
        terms = [self._pick_term(term) for term in sp.Add.make_args(expr)]
        return sp.Add(*terms)

    def _pick_term(self, term: sp.Expr) -> sp.Expr:
        factors = sp.Mul.make_args(term)
        for delta in factors:
            if not isinstance(delta, sp.KroneckerDelta):
                continue
            for axis, other in (delta.args, delta.args[::-1]):
                if axis not in self.indices or axis in self.axes_of(other):
                    continue
                varying = [f for f in factors if f is not delta and axis in self.axes_of(f)]
                if not varying:
                    continue
                picked = self.rules.get(AxisSum(sp.Mul(*varying) * delta, axis))
                if picked is not None:
                    rest = [f for f in factors if f is delta or axis not in self.axes_of(f)]
                    return sp.Mul(*rest) * picked
        return term

    def _normalise(self, expr: sp.Expr) -> sp.Expr:
        expr = _expand(expr)
        expr = self._walk(expr)
        return self._combine(_expand(expr))

    def _combine(self, expr: sp.Basic) -> sp.Basic:
        """:meth:`combine_sizes` on every sum of terms in ``expr``, the bases of roots included."""
        if not expr.args or isinstance(expr, sp.Symbol) or not expr.has(*(axis.size for axis in self.axes)):
            return expr
        args = tuple(self._combine(arg) for arg in expr.args)
        expr = expr.func(*args) if args != expr.args else expr
        return self.combine_sizes(expr) if isinstance(expr, sp.Add) else expr

    def _walk(self, expr: sp.Basic) -> sp.Basic:
        if not expr.args or isinstance(expr, sp.Symbol):
            return expr
        if isinstance(expr, AxisSum):
            return self._sum(self._walk(expr.body), expr.axis)
        if isinstance(expr, AxisMax):
            return AxisMax(self._walk(expr.body), expr.axis)
        if not expr.has(AxisSum, AxisMax):
            return expr
        args = tuple(self._walk(arg) for arg in expr.args)
        return expr.func(*args) if args != expr.args else expr

    def _sum(self, body: sp.Expr, axis: sp.Symbol) -> sp.Expr:
        """A sum over ``axis`` in canonical form: linear, constant factors outside."""
        terms = []
        for term in sp.Add.make_args(_expand(body)):
            inside, outside = [], []
            for factor in sp.Mul.make_args(term):
                (inside if axis in self.axes_of(factor) else outside).append(factor)
            coeff = sp.Mul(*outside)
            if not inside:
                terms.append(coeff * self.size(axis))
                continue
            summand = sp.Mul(*inside)
            terms.append(coeff if self._sums_to_one(summand, axis) else coeff * AxisSum(summand, axis))
        return sp.Add(*terms)

    def _sums_to_one(self, summand: sp.Expr, axis: sp.Symbol) -> bool:
        if isinstance(summand, sp.KroneckerDelta):
            a, b = summand.args
            other = b if a == axis else a if b == axis else None
            return other is not None and axis not in self.axes_of(other)
        return self.unit_sums.get(summand) == axis

    # ------------------------------------------------------------------ rules and identities

    def define(self, symbol: sp.Symbol, definition: sp.Expr) -> sp.Expr:
        """Record that ``symbol`` equals ``definition``: solve the definition for one of its sums.

        Returns the canonical definition. The rule turns that sum into an expression of
        ``symbol`` (and of reductions defined earlier) wherever it appears later.
        """
        canonical = self.canon(definition)
        atoms = [a for a in maximal_atoms(canonical)]
        if not atoms:
            self.rules[symbol] = canonical
            self.rule_notes.append((symbol, canonical))
            return canonical
        # solve for the most complex sum: the others are already known, or simpler
        for atom in sorted(atoms, key=lambda a: (sp.count_ops(a), sp.default_sort_key(a)), reverse=True):
            dummy = self.dummy(atom)  # with the sum's sign: sqrt(sum x**2) = norm inverts to sum x**2 = norm**2
            solved = invert(canonical.xreplace({atom: dummy}), dummy, symbol, self.nonnegative, self.nonzero)
            if solved is not None:
                solved = self.canon(solved)
                self.rules[atom] = solved
                self.rule_notes.append((atom, solved))
                break
        return canonical

    def combine_sizes(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with the terms that differ only in a rational function of the sizes added up and cancelled.

        ``expand`` leaves ``m**2*n**2/(n - 1) - m**2*n/(n - 1)`` as two terms; they are ``m**2*n``. A
        variance with Bessel's correction needs this: its rule, solved through the ``1/(n - 1)``, and the
        root of ``sum_i (x_i - mean)**2/(n - 1) + eps``, whose ``(n*var - var)/(n - 1)`` is ``var``, read
        as terms that never cancel, and a correct formula would not prove.
        """
        sizes = {axis.size for axis in self.axes}
        groups: dict[sp.Expr, list[sp.Expr]] = {}
        for term in sp.Add.make_args(expr):
            factors = sp.Mul.make_args(term)
            rest = sp.Mul(*(f for f in factors if not f.free_symbols <= sizes))
            groups.setdefault(rest, []).append(sp.Mul(*(f for f in factors if f.free_symbols <= sizes)))
        if all(len(coefficients) == 1 for coefficients in groups.values()):
            return expr
        return _expand(sp.Add(*(sp.cancel(sp.Add(*coefficients)) * rest for rest, coefficients in groups.items())))

    def equal(self, a: sp.Expr, b: sp.Expr) -> tuple[bool, sp.Expr]:
        """Whether two element expressions are identical, and their simplified difference.

        Both sides are brought to canonical form with the same rules; what is left is
        combined over a common denominator and cancelled (sums and roots act as symbols).
        Float constants are compared at float64's precision: a recorded ``0.7978845608028654``
        multiplied out in another order differs in the 18th digit, which says nothing.
        """
        a, b = sp.sympify(a), sp.sympify(b)
        if a.has(sp.Float) or b.has(sp.Float):
            a, b = _float64(self.canon(a)), _float64(self.canon(b))
        difference = self.canon(a - b)
        if difference != 0:
            difference = sp.cancel(sp.together(difference))
        if difference != 0 and difference.has(sp.Piecewise):  # dy*Piecewise((1, c), (s, True)) - Piecewise(...)
            folded = sp.piecewise_fold(difference)
            values = [value for value, _ in folded.args] if isinstance(folded, sp.Piecewise) else [folded]
            if all(sp.cancel(sp.together(self.canon(value))) == 0 for value in values):
                difference = sp.S.Zero
        return difference == 0, difference


def _float64(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every Float rounded to 15 significant digits (what a float64 holds for sure)."""
    return expr.xreplace({f: sp.Float(f, 15) for f in expr.atoms(sp.Float)})


_HINTS = dict(deep=True, mul=True, multinomial=True, power_exp=True, power_base=True, log=True, basic=True)


def _expand(expr: sp.Expr) -> sp.Expr:
    """Multiply out products and whole powers of sums, but never a denominator or a root of a sum.

    sympy's ``expand`` also multiplies out denominators (``1/((n-1)*v) -> 1/(n*v - v)``) and
    splits ``(v + eps)**(3/2)`` into ``v*sqrt(v + eps) + eps*sqrt(v + eps)``: both hide the
    factors that must cancel. Such powers are set aside (their bases normalised, with the
    numerical content pulled out: ``1/(2*n - 2) -> 1/(2*(n - 1))``), the rest is expanded,
    and they are put back.
    """
    cached = _EXPANDED.get(expr)
    if cached is not None:
        return cached
    masks: dict[sp.Basic, sp.Dummy] = {}
    masked = _mask(expr, masks)
    expanded = sp.expand(masked, **_HINTS)
    result = expanded.xreplace({dummy: power for power, dummy in masks.items()}) if masks else expanded
    if len(_EXPANDED) > 20000:
        _EXPANDED.clear()
    _EXPANDED[expr] = result
    return result


_EXPANDED: dict[sp.Basic, sp.Basic] = {}


def _mask(expr: sp.Basic, masks: dict[sp.Basic, sp.Dummy]) -> sp.Basic:
    if not expr.args or isinstance(expr, sp.Symbol):
        return expr
    if isinstance(expr, sp.Pow) and isinstance(expr.base, sp.Add) and not (expr.exp.is_Integer and expr.exp > 0):
        base = _expand(expr.base)
        if not isinstance(base, sp.Add):
            return _mask(sp.Pow(base, expr.exp), masks)
        content, primitive = base.as_content_primitive()
        factor = sp.S.One
        if content.is_Integer and content > 1:
            factor, base = content**expr.exp, primitive
        if expr.exp.is_Integer and base.could_extract_minus_sign():
            factor, base = factor * (-1) ** expr.exp, -base
        power = sp.Pow(base, expr.exp, evaluate=False)
        if power not in masks:
            masks[power] = sp.Dummy("m", **_sign(power))
        return factor * masks[power]
    args = tuple(_mask(arg, masks) for arg in expr.args)
    return expr.func(*args) if args != expr.args else expr


def _sign(power: sp.Pow) -> dict[str, bool]:
    if power.is_positive:
        return {"positive": True}
    if power.is_real:
        return {"real": True}
    return {}


def maximal_atoms(expr: sp.Basic) -> list[sp.Basic]:
    """Sums and maxima of ``expr`` that are not inside another sum or max."""
    found: list[sp.Basic] = []

    def walk(e: sp.Basic) -> None:
        if isinstance(e, ATOMS):
            if e not in found:
                found.append(e)
            return
        for arg in e.args:
            walk(arg)

    walk(expr)
    return found


def invert(expr: sp.Expr, target: sp.Symbol, value: sp.Expr,
           nonnegative: Callable[[sp.Expr], bool] = lambda e: bool(e.is_nonnegative),
           nonzero: Callable[[sp.Expr], bool] = lambda e: bool(e.is_nonzero)) -> sp.Expr | None:
    """Solve ``expr == value`` for ``target`` when ``target`` occurs once, peeling one operation at a time.

    Only inversions that hold on the whole domain are made: a power other than ``1/x`` or an odd
    root (``x**2``, ``x**3``) is inverted only when its base is known to be non-negative, and
    nothing is divided by a factor that may be zero. Returns None when it cannot solve.
    """
    if _occurrences(expr, target) != 1:
        return None
    while expr != target:
        if isinstance(expr, (sp.Add, sp.Mul)):
            holder = [arg for arg in expr.args if arg.has(target)]
            rest = expr.func(*[arg for arg in expr.args if not arg.has(target)])
            if len(holder) != 1 or (isinstance(expr, sp.Mul) and not _divisible(rest, nonzero)):
                return None  # never divide by something that may be 0 (a parameter such as a gain)
            value = value - rest if isinstance(expr, sp.Add) else value / rest
            expr = holder[0]
        elif isinstance(expr, sp.Pow):
            base, exponent = expr.args
            if exponent.has(target) or exponent == 0:
                return None
            if not (nonnegative(base) or _odd_power(exponent)):
                return None
            value = value ** (1 / exponent)
            expr = base
        elif isinstance(expr, sp.exp):
            value, expr = sp.log(value), expr.args[0]
        elif isinstance(expr, sp.log):
            value, expr = sp.exp(value), expr.args[0]
        else:
            return None
    return value


def _divisible(factor: sp.Expr, nonzero: Callable[[sp.Expr], bool]) -> bool:
    """Whether dividing by ``factor`` is safe: each of its factors is nonzero, or a negative power (``1/T``,
    never 0 where it is finite: dividing by it multiplies by ``T``)."""
    return all(nonzero(f) or (isinstance(f, sp.Pow) and bool(f.exp.is_negative)) for f in sp.Mul.make_args(factor))


def _odd_power(exponent: sp.Expr) -> bool:
    """Whether ``value = base**exponent`` inverts to ``base = value**(1/exponent)`` for a base of any sign:
    ``1/x`` and the odd roots ``x**(1/3)``. Not ``x**3``: sympy's (and torch's) ``value**(1/3)`` is the
    principal root, not the real one, and NaN in torch for a negative value."""
    if exponent.is_Integer:
        return exponent in (1, -1)
    if exponent.is_Rational:
        return bool(sp.Rational(1, 1) / exponent % 2 == 1) if (1 / exponent).is_Integer else False
    return False


def _occurrences(expr: sp.Basic, target: sp.Symbol) -> int:
    if expr == target:
        return 1
    return sum(_occurrences(arg, target) for arg in expr.args)
