"""Derive the closed-form gradient of a recorded chain: chain rule, simplification, code.

1. **Chain rule** over the lowered chain (see :mod:`.chain`), output first. For a node whose
   element is ``E`` (in its operands' symbols) and whose gradient is ``G``, an operand ``O``
   receives ``sum over the axes O lacks of G * dE/dO`` (broadcast undo), and every sum
   ``AxisSum(B, a)`` inside ``E`` passes ``G * dE/dsum`` on to its body ``B`` (a max passes it
   through a one-hot of the argmax). This is :func:`vjp`; it is exact for nested sums.
2. **Substitution**: every gradient is written in primitives (the input, the parameters,
   the incoming gradient, and one symbol per reduction), then brought to canonical form
   with the reductions' definitions as rewrite rules (:class:`.algebra.Space`). Terms that
   cancel disappear here: the gradient into ``logit_maxes`` becomes exactly 0.
3. **Saved tensors**: the result is rewritten in terms of the chain's own tensors where
   that makes it simpler (``hprebn -> bnmeani + bnraw/bnvar_inv``, ``logits -> ...probs``),
   which yields the textbook forms; the fully explicit form (sums over the input only) is
   kept too.
4. **Code**: the gradients are printed as torch code by :class:`.printing.TorchPrinter`,
   preceded by the recomputation of the saved tensors they use, and compiled once.
"""

from __future__ import annotations

import linecache
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy as sp
import torch
from sympy.logic.boolalg import simplify_logic

from ..naming import unique_name
from .algebra import AxisMax, AxisSum, Sigmoid, Softplus, Space, TooLarge, invert, maximal_atoms
from .chain import Chain, ChainTooLong, SNode, SymbolicError, to_number
from .printing import TorchPrinter, latex_name, to_latex

_LONG = 400  # expressions with more operations than this are summarised in the steps


# ---------------------------------------------------------------------- the chain rule


class Backprop:
    """The chain rule over a lowered chain, node by node (see the module docstring)."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.space: Space = chain.space
        self.special: dict[sp.Symbol, tuple] = {}  # argmax / tie symbols -> ("argmax" | "tie", body, axis)
        self.contributions: list[tuple[SNode, SNode, sp.Expr]] = []  # (consumer, operand, gradient term)
        self.resolved: dict[SNode, sp.Expr] = {}

    def run(self) -> None:
        chain, space = self.chain, self.space
        for node in reversed(chain.ops):
            for operand in node.operands:
                if not operand.differentiable:
                    continue
                term = self.vjp(node.local, node.gsym, operand.sym, space.axes_of(node.local))
                if term != 0:
                    self.contributions.append((node, operand, term))
        values = {n.sym: n.value for n in chain.ops if not n.reduction}
        self.resolved[chain.output] = chain.output.gsym
        for node in reversed(chain.nodes):
            if node is chain.output or not node.differentiable:
                continue
            terms = [(consumer, term) for consumer, operand, term in self.contributions if operand is node]
            if not terms:
                self.resolved[node] = sp.S.Zero
                continue
            replace = dict(values)
            replace.update({consumer.gsym: self.resolved[consumer] for consumer, _ in terms})
            total = sp.Add(*(term.xreplace(replace) for _, term in terms))
            try:
                self.resolved[node] = space.canon(total)
            except TooLarge as err:
                raise ChainTooLong(node, chain.input, "the gradient of", err) from None

    def vjp(self, expr: sp.Expr, grad: sp.Expr, operand: sp.Symbol, expr_axes: frozenset) -> sp.Expr:
        """Sum over the positions of ``expr`` of ``grad * d expr / d operand``: an element of the operand gradient."""
        space = self.space
        atoms = [atom for atom in maximal_atoms(expr) if atom.has(operand)]
        dummies = {atom: sp.Dummy("s") for atom in atoms}
        back = {dummy: atom for atom, dummy in dummies.items()}
        flat = expr.xreplace(dummies)
        result = sp.S.Zero
        direct = sp.diff(flat, operand).xreplace(back)
        if direct != 0:
            result += space.sum_over(grad * direct, expr_axes - space.axes_of(operand))
        for atom, dummy in dummies.items():
            through = sp.diff(flat, dummy).xreplace(back)
            if through == 0:
                continue
            passed = space.sum_over(grad * through, expr_axes - space.axes_of(atom))
            if isinstance(atom, AxisMax):
                passed = passed * self.indicator(atom)
            result += self.vjp(atom.body, passed, operand, space.axes_of(atom.body))
        return result

    def indicator(self, atom: AxisMax) -> sp.Expr:
        """Where the max was taken: a one-hot of the index torch returns, or ties split evenly."""
        body, axis = atom.body, atom.axis
        ties = self.chain.ties.get((body, axis), "split")
        space = self.space
        for symbol, (kind, b, a) in self.special.items():
            if b == body and a == axis:
                return sp.KroneckerDelta(axis, symbol) if kind == "argmax" else symbol
        label = str(body).replace(" ", "")
        if ties == "first":
            symbol = sp.Symbol(f"argmax_{axis}({label})", integer=True)
            space.register(symbol, space.axes_of(body) - {axis})
            self.special[symbol] = ("argmax", body, axis)
            return sp.KroneckerDelta(axis, symbol)
        symbol = sp.Symbol(f"ismax_{axis}({label})", nonnegative=True)
        space.register(symbol, space.axes_of(body))
        space.unit_sums[symbol] = axis
        self.special[symbol] = ("tie", body, axis)
        return symbol


# ---------------------------------------------------------------------- rewriting in saved tensors


def _primitives(chain: Chain) -> set[sp.Symbol]:
    """Symbols a readable closed form should avoid: the input and the reductions' symbols."""
    return {chain.input.sym} | {node.sym for node in chain.ops if node.reduction}


def _score(expr: sp.Expr, primitives: set[sp.Symbol], unnamed: set[sp.Symbol] = frozenset()) -> tuple:
    """Fewer primitives, then fewer exponentials of anything (they overflow in the generated code: a saved
    ``probs`` is safer than ``exp(logits)/sum(exp(logits))``), fewer sums, fewer operations, fewer op-based names."""
    return (len(expr.free_symbols & primitives), len(expr.atoms(sp.exp)), len(maximal_atoms(expr)),
            int(sp.count_ops(expr)), len(expr.free_symbols & unnamed))


@dataclass
class Rewrite:
    """One step of the textbook rewrite: ``primitive = inverse``, read off ``node``'s definition."""

    node: SNode
    primitive: sp.Symbol
    inverse: sp.Expr
    protect: list = field(default_factory=list)  # sums the substitution must not enter
    over: sp.Expr | None = None  # where set, the substitution enters only the terms divided by this sum
    shift: tuple | None = None  # (r, e, normaliser rewrite): exp(a) as exp(a - r)*exp(e), exp(e) = exp(r) through it


def candidates(chain: Chain) -> dict[sp.Symbol, list[Rewrite]]:
    """For each primitive, the saved tensors it can be expressed through (by inverting their definitions)."""
    found: dict[sp.Symbol, list[Rewrite]] = {}
    x = chain.input
    full = frozenset(a for a in x.axes if a is not None)
    primitives = _primitives(chain)
    for node in chain.ops:
        if node.reduction:
            continue
        atoms = maximal_atoms(node.value)
        dummies = {atom: chain.space.dummy(atom) for atom in atoms}
        flat = node.value.xreplace(dummies)
        mine = frozenset(a for a in node.axes if a is not None)
        options = [x.sym] if mine == full else []
        # a statistic is expressed through a tensor with its own axes (bnvar through bnvar_inv)
        options += [s for s in flat.free_symbols & primitives if s != x.sym and chain.space.axes_of(s) == mine]
        for primitive in options:
            if primitive not in flat.free_symbols or (primitive == x.sym and _renames(flat, primitive)):
                continue
            inverse = invert(flat, primitive, node.sym, chain.space.nonnegative, chain.space.nonzero)
            if inverse is not None:
                back = {d: a for a, d in dummies.items()}
                found.setdefault(primitive, []).append(Rewrite(node, primitive, inverse.xreplace(back), atoms))
    return found


def _renames(value: sp.Expr, primitive: sp.Symbol) -> bool:
    """Whether ``value`` is ``primitive`` scaled or shifted by a number (``0.5*x``): written through it, a
    gradient only trades the input for a rescaled copy (``x**3`` becomes ``8*mul_1**3``)."""
    return bool((value / primitive).is_number or (value - primitive).is_number)


def rewrite_in_saved(expr: sp.Expr, chain: Chain, space: Space, limit: int = 96) -> tuple[sp.Expr, list[Rewrite]]:
    """The simplest form of ``expr`` written with the chain's saved tensors instead of primitives.

    Tries every combination of "express this primitive through that saved tensor" (the
    input first, then the reductions, latest first), substitutes, brings each result to
    canonical form, and keeps the one with the fewest primitives, sums and operations.
    """
    primitives = _primitives(chain)
    unnamed = {node.sym for node in chain.ops if not node.named}
    options = candidates(chain)
    folds = reduction_folds(chain, space)

    def fold(current: sp.Expr) -> sp.Expr:
        """``current`` with the reductions of saved tensors folded back into their symbols, where that is simpler."""
        folded = current.xreplace(folds)
        if folded == current:
            return current
        folded = space.canon(folded)
        return folded if _score(folded, primitives, unnamed) < _score(current, primitives, unnamed) else current

    order = [chain.input.sym] + [n.sym for n in reversed(chain.ops) if n.reduction]
    order = [p for p in order if p in options]
    best = (_score(expr, primitives, unnamed), expr, [])
    tried = 0

    def leaf(current: sp.Expr, chosen: list[Rewrite]) -> None:
        nonlocal best
        score = _score(current, primitives, unnamed)
        if chosen and score < best[0]:
            best = (score, current, chosen)
        if not current.has(sp.exp):
            return
        normalised, used = through_normalisers(current, chain, space, chosen)
        if used:
            score = _score(normalised, primitives, unnamed)
            if score < best[0]:
                best = (score, normalised, chosen + used)

    def walk(current: sp.Expr, position: int, chosen: list[Rewrite]) -> None:
        nonlocal tried
        if position == len(order) or tried >= limit:
            leaf(current, chosen)
            return
        primitive = order[position]
        walk(current, position + 1, chosen)
        if primitive not in current.free_symbols:
            return
        for rewrite in options[primitive]:
            protect = {atom: sp.Dummy("p") for atom in rewrite.protect if current.has(atom)}
            substituted = _powers_of_logs(current.xreplace(protect).xreplace({primitive: rewrite.inverse}))
            tried += 1
            try:
                rewritten = fold(space.canon(substituted.xreplace({d: a for a, d in protect.items()})))
            except TooLarge:
                continue  # this substitution multiplies out: not the simpler form
            walk(rewritten, position + 1, chosen + [rewrite])

    walk(expr, 0, [])
    result = reuse_saved(best[1], best[2], chain, space), best[2]
    through = [Rewrite(param, param.sym, value) for param, value in chain.derived.items()
               if param.sym in expr.free_symbols]
    if not through:
        return result
    # parameters computed from other parameters, written as what they are (1 - t, not sub_1) where the
    # arranged form is simpler: the canonical forms compared above leave s**2/(s - 1) - s/(s - 1) uncancelled
    try:
        computed = space.canon(_apply(expr, through, space))
        best, tried = (_score(computed, primitives, unnamed), computed, through), 0
        walk(computed, 0, through)
        other = reuse_saved(best[1], best[2], chain, space), best[2]
    except TooLarge:
        return result
    arranged = [_score(display(form, space), primitives, unnamed) for form, _ in (result, other)]
    return other if arranged[1] < arranged[0] else result


def _powers_of_logs(expr: sp.Expr) -> sp.Expr:
    """``expr`` with ``exp(c*log(y))`` written ``y**c`` (a product ``y`` of positive factors as a product of powers):
    the input of ``softmax(x)**T`` written through the softmax, ``x = log(p*Sum(exp(x), j))``, turns
    ``exp(T*x)`` into ``p**T*Sum(exp(x), j)**T``, whose sum cancels against the normaliser ``Sum(exp(x), j)**T``;
    split into ``exp(T*log(p))*exp(T*log(Sum))`` by the canonical form, it never would."""
    def power(e: sp.exp) -> sp.Expr:
        logs = [f for f in sp.Mul.make_args(e.args[0]) if isinstance(f, sp.log)]
        if len(logs) != 1:
            return e
        return sp.expand_power_base(logs[0].args[0] ** (e.args[0] / logs[0]))

    return expr.replace(lambda e: isinstance(e, sp.exp) and e.args[0].has(sp.log), power) if expr.has(sp.exp) else expr


def normaliser_rewrites(chain: Chain, space: Space, rewrites: list[Rewrite]) -> list[Rewrite]:
    """``exp(a) = out*Sum(exp(a), j)`` for each saved tensor ``out`` normalised by a sum of ``exp(a)`` (a softmax
    reads ``exp(a)/Sum(exp(a), j)``, a log-softmax ``a - log(Sum(exp(a), j))``, which gives ``exp(out)*Sum``),
    with ``a`` written through ``rewrites`` as the gradient is. The sum is left whole: substituted, it leaves
    the sums it is summed in along ``j`` and cancels against the normaliser, which is how the gradient of a
    temperature, ``Sum(z*exp(z), j)/Sum(exp(z), j)``, becomes ``Sum(z*out, j)``: no exponential that overflows."""
    found: list[Rewrite] = []
    for node in chain.ops:
        if node.reduction or node is chain.input:
            continue
        try:
            value = space.canon(_apply(node.value, rewrites, space))
        except TooLarge:
            continue
        for total in value.atoms(AxisSum):
            factor = _normalised_factor(total, space.axes_of(node.sym), chain, space)
            if factor is None:
                continue
            held, solved = space.dummy(total), sp.Dummy("e", positive=True)
            flat = value.xreplace({total: held})
            flat = flat.xreplace({factor: solved}) if flat.has(factor) else \
                flat.xreplace({factor.args[0]: sp.log(solved)})
            inverse = invert(flat, solved, node.sym, space.nonnegative, space.nonzero)
            if inverse is None:
                continue
            try:
                inverse = space.canon(inverse.xreplace({held: total}))
            except TooLarge:
                continue
            found.append(Rewrite(node, factor, inverse, [total]))
    return _through_logsumexps(found, chain, space) + found


def _through_logsumexps(found: list[Rewrite], chain: Chain, space: Space) -> list[Rewrite]:
    """For a normaliser rewrite of ``exp(b)``, ``b`` a ``logsumexp`` ``r = log(Sum(exp(a), k))`` or a saved tensor
    ``c*r`` (``c`` a number or a 0-dim tensor), the rewrite of ``exp(a)`` as ``exp(a - r)*exp(b/c)``, then through
    the normaliser: the gradient of ``softmax(x.logsumexp(2), 1)`` reads ``exp(x)/Sum(exp(r), j)``, which
    overflows where ``p*exp(x - r)`` does not. It enters only the terms divided by the normaliser (``w*exp(x - r)``
    needs nothing), see :func:`_shifted`."""
    logsumexps = {}
    for node in chain.ops:
        definition = node.definition if node.reduction else None
        if isinstance(definition, sp.log) and isinstance(definition.args[0], AxisSum) and \
                isinstance(definition.args[0].body, sp.exp):
            logsumexps[node.sym] = definition.args[0].body
    values = {node.sym: node.value for node in chain.ops if not node.reduction}
    shifted = []
    for rewrite in found:
        b = rewrite.primitive.args[0]
        value = values.get(b, b)
        for r, body in logsumexps.items():
            scale = sp.cancel(r / value)  # exp(r) is exp(b*scale)
            if scale.has(r) or space.axes_of(scale) or scale == 0:
                continue
            shifted.append(Rewrite(rewrite.node, body, body, rewrite.protect, over=rewrite.protect[0],
                                   shift=(r, b * scale, rewrite)))
    return shifted


def _shifted(term: sp.Expr, rewrite: Rewrite, space: Space) -> sp.Expr:
    """``term`` (divided by the normaliser) with its factor ``exp(a)`` written ``exp(a - r)*exp(r)`` and ``exp(r)``,
    joined with the term's other powers of the normaliser's exponential, through the normaliser (``exp(x)*
    exp(3*b/5)/Sum(exp(b), j)``, ``b = 5*r/2``, is ``p*exp(x - r)``). ``term`` itself where ``exp(a)`` is no factor
    or no normaliser is left to cancel."""
    a, (_, exponent, normaliser) = rewrite.primitive, rewrite.shift
    if a not in sp.Mul.make_args(term):
        return term
    rest = (term / a) * sp.exp(exponent)  # sympy joins exp(b*scale) with the term's exp(k*b)
    through = _through_normaliser(rest, normaliser, space)
    try:
        through = space.canon(through) if through != rest else rest
    except TooLarge:
        return term
    return term if through == rest or _divided_by(through, rewrite.over) else a * sp.exp(-exponent) * through


def _normalised_factor(total: AxisSum, axes: frozenset, chain: Chain, space: Space) -> sp.exp | None:
    """The exponential to solve for in a normaliser ``Sum(exp(a), j)`` of a saved tensor with ``axes``, or None.

    The canonical form splits ``exp(x + b)`` into ``exp(x)*exp(b)``: then one factor is solved for (the other
    factors cancel where it is substituted), one that varies over all of ``axes``, so that the saved tensor it
    is written with never lands outside a sum over one of them (``exp(b[j])`` outside a sum over the rows ``i``
    is no ``out[i,j]``); the one with the input first. None when the body is not made of exponentials."""
    factors = sp.Mul.make_args(total.body)
    if not all(isinstance(f, sp.exp) for f in factors):
        return None
    whole = [f for f in factors if space.axes_of(f) >= axes]
    if not whole:
        return None
    return next((f for f in whole if f.has(chain.input.sym)), whole[0])


def through_normalisers(expr: sp.Expr, chain: Chain, space: Space,
                        rewrites: list[Rewrite]) -> tuple[sp.Expr, list[Rewrite]]:
    """``expr`` with the exponentials that a saved softmax (or log-softmax) normalises written through it (see
    :func:`normaliser_rewrites`), and the rewrites used; ``(expr, [])`` where none applies."""
    normalised, used = expr, []
    for rewrite in normaliser_rewrites(chain, space, rewrites):
        substituted = _through_normaliser(normalised, rewrite, space)
        if substituted != normalised:
            normalised, used = substituted, used + [rewrite]
    if not used:
        return expr, []
    try:
        normalised = space.canon(normalised)
    except TooLarge:
        return expr, []
    return (normalised, used) if space.axes_of(normalised) <= space.axes_of(expr) else (expr, [])


def _through_normaliser(expr: sp.Expr, rewrite: Rewrite, space: Space) -> sp.Expr:
    """``expr`` with ``exp(a)`` replaced by ``rewrite.inverse`` outside the normaliser itself, and ``exp(k*a)`` for an
    integer ``k > 1`` (the gradient of ``softmax(x / T)**2`` has ``exp(2*x/T)``) or a 0-dim tensor ``k`` that is
    not negated (``softmax(x)**T`` has ``exp(T*x)``) by its ``k``-th power; with ``rewrite.over``, only in the
    terms divided by that sum."""
    protect = {atom: sp.Dummy("p") for atom in rewrite.protect if expr.has(atom)}
    exponent = rewrite.primitive.args[0]

    def swap(power: sp.exp) -> sp.Expr:
        if power == rewrite.primitive:  # Piecewise/Piecewise does not cancel
            return rewrite.inverse
        k = sp.cancel(power.args[0] / exponent)
        if k.is_Integer and k > 0:
            return rewrite.inverse ** k
        if not k.is_number and not space.axes_of(k) and not k.could_extract_minus_sign():
            return sp.expand_power_base(rewrite.inverse ** k)  # a 0-dim power: softmax(x)**T has exp(T*x)
        return power

    def substitute(term: sp.Expr) -> sp.Expr:
        if rewrite.shift is not None:
            return _shifted(term, rewrite, space)
        return term.xreplace(protect).replace(lambda e: isinstance(e, sp.exp), swap).xreplace(
            {d: a for a, d in protect.items()})

    if rewrite.over is None:
        return substitute(expr)
    return sp.Add(*(substitute(term) if _divided_by(term, rewrite.over) else term for term in sp.Add.make_args(expr)))


def _divided_by(term: sp.Expr, total: sp.Expr) -> bool:
    """Whether the product ``term`` divides by ``total`` (a power of it with a negative exponent)."""
    return any(isinstance(f, sp.Pow) and f.base == total and f.exp.is_negative for f in sp.Mul.make_args(term))


def reduction_folds(chain: Chain, space: Space) -> dict[sp.Basic, sp.Expr]:
    """Each reduction of a saved tensor, solved for its sum: ``Sum(logprobs*KroneckerDelta(j, y), j) -> picked``.

    The rewrite rules know the reductions in primitives only (the input), so once a gradient is written
    with saved tensors, ``picked - Sum(logprobs*KroneckerDelta(j, y), j)`` no longer cancels: the scaled
    cross-entropy ``F.cross_entropy(x / T, y)`` read ``exp(logprobs + picked - Sum(logprobs*delta))``.
    """
    saved = {node.sym for node in chain.ops if not node.reduction}
    folds: dict[sp.Basic, sp.Expr] = {}
    for node in chain.ops:
        if not node.reduction:
            continue
        try:
            local = space.canon(node.local, rules=False)
        except TooLarge:
            continue
        atoms = maximal_atoms(local)
        if len(atoms) != 1 or not atoms[0].free_symbols & saved:
            continue  # a sum of the input: the rewrite rules have it already
        dummy = space.dummy(atoms[0])
        solved = invert(local.xreplace({atoms[0]: dummy}), dummy, node.sym, space.nonnegative, space.nonzero)
        if solved is not None:
            for atom in _spelled_out(atoms[0], chain, space):
                folds.setdefault(atom, solved)
    return folds


def _spelled_out(total: sp.Expr, chain: Chain, space: Space) -> list[sp.Expr]:
    """``total`` (a sum of saved tensors), then the same sum with each saved tensor that is computed from other
    saved tensors alone written as its formula, step by step: ``Sum(mul_1, j)``, ``Sum(pow_1*w, j)``,
    ``Sum(softmax_1**T*w, j)``. A gradient written with the softmax holds the last one (``-log((p**T*w).sum(1))``
    after ``softmax(x)**T``), which then folds into its reduction symbol too."""
    primitives = _primitives(chain)
    formulas = {node.sym: node.local for node in chain.ops
                if not node.reduction and node is not chain.input and not node.local.free_symbols & primitives}
    found = [total]
    for _ in range(len(formulas)):
        step = total.xreplace(formulas)
        if step == total:
            break
        try:
            total = space.canon(step, rules=False)
        except TooLarge:
            break
        found.append(total)
    return found


def _apply(expr: sp.Expr, rewrites: list[Rewrite], space: Space) -> sp.Expr:
    for rewrite in rewrites:
        if isinstance(rewrite.primitive, sp.exp):  # through a normaliser: exp(k*a) too
            expr = _through_normaliser(expr, rewrite, space)
            continue
        protect = {atom: sp.Dummy("p") for atom in rewrite.protect if expr.has(atom)}
        expr = expr.xreplace(protect).xreplace({rewrite.primitive: rewrite.inverse})
        expr = _powers_of_logs(expr.xreplace({d: a for a, d in protect.items()}))
    return expr


def reuse_saved(expr: sp.Expr, rewrites: list[Rewrite], chain: Chain, space: Space) -> sp.Expr:
    """Replace each function application (exp, log, roots, tanh ...) that is exactly a saved tensor's value
    by that tensor: the code then reads the value the forward computed stably (``log_softmax``) instead of
    recomputing an expression that can overflow (``log(1 - p)``); a root also where it divides. A saved sum
    of terms is reused where it is the base of a power (``1/(std + eps)**2``): written out, ``factor_terms``
    reads it ``100000*std + 1``; a sum of terms also where a gradient holds them all and reads safer written
    with it (``log_softmax(x * s)``: see :func:`_collect_saved_sum`)."""
    for node in reversed(chain.ops):
        if node.reduction or node is chain.input:
            continue
        try:
            value = space.canon(_apply(node.value, rewrites, space))
            if value == node.sym:
                continue
            if isinstance(value, sp.Add):
                bases = {p: sp.Pow(node.sym, p.exp) for p in expr.atoms(sp.Pow) if p.base == value}
                if bases:
                    expr = space.canon(expr.xreplace(bases))
                for form in (expr, _joined_exponentials(expr, space)):  # as it is, then exp(a)*exp(b) as exp(a + b)
                    collected = _collect_saved_sum(form, value, node.sym)
                    if collected is not form:
                        collected = space.canon(collected)
                        if _unsafe(collected, chain) < _unsafe(expr, chain):
                            expr = collected
                            break
            elif isinstance(value, sp.Function) or (isinstance(value, sp.Pow) and not value.exp.is_Integer):
                found = {value: node.sym}
                if isinstance(value, sp.Pow):  # a root divided by: x/sqrt(x**2 + eps) is x/norm
                    found[sp.Pow(value.base, -value.exp)] = 1 / node.sym
                if any(expr.has(f) for f in found):
                    expr = space.canon(expr.xreplace(found))
        except TooLarge:
            continue
    return expr


def _joined_exponentials(expr: sp.Expr, space: Space) -> sp.Expr:
    """``expr`` with each product of exponentials as one, also across a sum it multiplies: the canonical form
    splits ``exp(logprobs)`` of ``F.cross_entropy(x * s, y)`` into ``exp(picked)*exp(s*x)*exp(-s*Sum(x*delta, j))``
    and moves the factors constant along ``j`` out of the sums; joined, the exponent is a saved tensor's sum of
    terms, which :func:`_collect_saved_sum` finds."""
    if not expr.has(sp.exp):
        return expr
    return sp.powsimp(_exponentials_into_sums(expr, space), combine="exp")


def _unsafe(expr: sp.Expr, chain: Chain) -> tuple[int, int]:
    """How many primitives and exponentials or logarithms ``expr`` holds: what a saved tensor spares the code."""
    return len(expr.free_symbols & _primitives(chain)), len(expr.atoms(sp.exp, sp.log))


def _collect_saved_sum(expr: sp.Expr, value: sp.Add, saved: sp.Symbol) -> sp.Expr:
    """``expr`` with each sum of terms ``c*v1 + c*v2 + ...`` (``value = v1 + v2 + ...``, ``c`` a factor that divides by
    no tensor) written
    ``c*saved``: the gradient of a weight after ``log_softmax(x * s)`` is ``dout*(s*x - log(Sum(exp(s*x), j)))``,
    which overflows where the saved log-softmax does not. ``expr`` itself when no sum holds all of the terms."""
    terms = sp.Add.make_args(value)

    def collect(total: sp.Add) -> sp.Expr:
        present = set(total.args)
        for term in total.args:
            factor = sp.cancel(term / terms[0])
            if not sp.fraction(factor)[1].is_number:
                continue  # never divide by a tensor: dout*(w*x - w*lse)/w would be 0/0 where w is 0
            scaled = [sp.expand(factor * t) for t in terms]
            if all(s in present for s in scaled):
                return sp.Add(*(present - set(scaled))) + factor * saved
        return total

    return expr.replace(lambda e: isinstance(e, sp.Add) and len(e.args) >= len(terms), collect)


def nested(expr: sp.Expr, chain: Chain) -> sp.Expr:
    """``expr`` with every saved tensor replaced by its own recorded formula, recursively, unexpanded."""
    local = {node.sym: node.local for node in chain.ops}
    for _ in range(len(chain.ops) + 1):
        replaced = expr.xreplace(local)
        if replaced == expr:
            break
        expr = replaced
    return expr


def explicit(expr: sp.Expr, chain: Chain, space: Space) -> sp.Expr | None:
    """The expression with every reduction symbol replaced by its definition: sums over the input only
    (None when that multiplies out past the size limit)."""
    for _ in range(2):  # definitions may mention earlier reductions
        for node in reversed(chain.ops):
            if node.reduction and node.sym in expr.free_symbols:
                expr = expr.xreplace({node.sym: node.definition})
    try:
        return space.canon(expr, rules=False)
    except TooLarge:
        return None


def _exponentials_into_sums(expr: sp.Expr, space: Space) -> sp.Expr:
    """``exp(a)*Sum(exp(b)*f, i)`` as ``Sum(exp(a + b)*f, i)`` when ``a`` does not vary along ``i``: the canonical
    form splits ``exp(-(b + g*r)**2/2)`` into three exponentials, each of which alone can overflow (a gelu after
    a batch norm), and moves ``exp(-b**2/2)`` out of the sum; ``powsimp`` joins only what it sees together."""
    if not expr.has(AxisSum):
        return expr
    expr = expr.func(*(_exponentials_into_sums(arg, space) for arg in expr.args))
    if isinstance(expr, AxisSum):
        return AxisSum(sp.powsimp(expr.body, combine="exp"), expr.axis)
    if not isinstance(expr, sp.Mul):
        return expr
    factors = sp.Mul.make_args(expr)
    sums = [f for f in factors if isinstance(f, AxisSum) and f.body.has(sp.exp)]
    if len(sums) != 1:
        return expr
    total = sums[0]
    outside = [f for f in factors if isinstance(f, sp.exp) and total.axis not in space.axes_of(f)]
    if not outside:
        return expr
    rest = [f for f in factors if f is not total and f not in outside]
    return sp.Mul(*rest) * AxisSum(sp.powsimp(sp.Mul(*outside) * total.body, combine="exp"), total.axis)


def _merge_sums(expr: sp.Expr, space: Space) -> sp.Expr:
    """Added sums over one axis, each times a factor constant along it, as one sum: ``Sum(z*p, j)*Sum(p*g, j) -
    Sum(z*p*g, j)`` is ``Sum(z*p*(Sum(p*g, j) - g), j)``, the gradient of a temperature as torch computes it (the
    difference first: multiplied out, float32 loses the digits of ``z*p*g`` against each other)."""
    if not expr.has(AxisSum):
        return expr
    expr = expr.func(*(_merge_sums(arg, space) for arg in expr.args))
    if not isinstance(expr, sp.Add):
        return expr
    groups: dict[sp.Symbol, list[tuple[sp.Expr, sp.Expr]]] = {}
    for term in expr.args:
        for factor in sp.Mul.make_args(term):
            if isinstance(factor, AxisSum):
                coeff = term / factor
                if factor.axis not in space.axes_of(coeff):
                    groups.setdefault(factor.axis, []).append((term, coeff * factor.body))
                    break
    for axis, members in groups.items():
        if len(members) > 1:
            rest = [t for t in expr.args if t not in {term for term, _ in members}]
            body = _merge_sums(sp.factor_terms(sp.Add(*(inside for _, inside in members))), space)
            outside, inside = _split_along(body, axis, space)
            merged = outside * AxisSum(inside, axis)
            return _merge_sums(sp.Add(*rest, merged), space) if rest else merged
    return expr


def _split_along(expr: sp.Expr, axis: sp.Symbol, space: Space) -> tuple[sp.Expr, sp.Expr]:
    """``expr`` as (the factors constant along ``axis``, the others)."""
    factors = sp.Mul.make_args(expr)
    constant = [f for f in factors if axis not in space.axes_of(f)]
    varying = [f for f in factors if axis in space.axes_of(f)]
    negated = [-f if isinstance(f, sp.Add) and f.could_extract_minus_sign() else f for f in varying]
    sign = -1 if sum(f is not g for f, g in zip(varying, negated)) % 2 else 1  # -dout/T*(w - S), not dout/T*(S - w)
    return sign * sp.Mul(*constant), sp.Mul(*negated)


def fold_piecewise(expr: sp.Expr) -> sp.Expr:
    """Products and sums of piecewise factors as one ``Piecewise`` whose branches are whole expressions.

    ``x*Piecewise((0, n < eps), (1, True))/n`` is 0/0 where the norm ``n`` is 0; folded, the branch taken
    reads ``0`` and torch.where never evaluates the other one into the result. A reduction is folded inside
    (a condition on a summed element must stay inside its sum), and is one factor outside."""
    if not expr.has(sp.Piecewise):
        return expr
    expr = expr.replace(lambda e: isinstance(e, (AxisSum, AxisMax)) and e.body.has(sp.Piecewise),
                        lambda e: type(e)(fold_piecewise(e.body), e.axis))
    atoms = {atom: sp.Dummy() for atom in expr.atoms(AxisSum, AxisMax)}
    folded = sp.piecewise_fold(expr.xreplace(atoms)).replace(lambda e: isinstance(e, sp.Piecewise), _tidy)
    return folded.xreplace({dummy: atom for atom, dummy in atoms.items()})


def _tidy(piecewise: sp.Piecewise) -> sp.Expr:
    """A folded ``Piecewise`` without the pieces it can never reach: conditions simplified (``A & (A | B)`` is
    ``A``), a condition seen before dropped, neighbours with the same value merged."""
    pieces: list[tuple[sp.Expr, sp.Basic]] = []
    seen: set[sp.Basic] = set()
    for value, condition in piecewise.args:
        if condition is not sp.true and len(condition.atoms(sp.core.relational.Relational)) <= 6:
            condition = simplify_logic(condition)
        if condition in seen or condition is sp.false:
            continue
        seen.add(condition)
        if pieces and pieces[-1][0] == value:
            condition = pieces.pop()[1] | condition
        pieces.append((value, condition))
    return sp.Piecewise(*pieces)


def display(expr: sp.Expr, space: Space) -> sp.Expr:
    """A readable arrangement: exponentials combined (``exp(x - m)``, which cannot overflow where
    ``exp(x)*exp(-m)`` can), common factors pulled out, ``1/n`` in front when a term is a mean over that axis."""
    expr = fold_piecewise(expr)
    combined = sp.powsimp(_exponentials_into_sums(expr, space), combine="exp")
    options = [sp.factor_terms(combined)]
    merged = _merge_sums(combined, space)
    if merged != combined:
        options.append(sp.factor_terms(merged))
    if sp.count_ops(combined) <= 60:  # cancel finds s*(1-s)/(1-s) = s; on long sums it is slow and rarely shorter
        options.append(sp.factor_terms(sp.powsimp(sp.cancel(combined), combine="exp")))  # cancel splits exp(a - b)
    arranged = min(options, key=sp.count_ops)
    coeff, rest = arranged.as_independent(sp.Add) if isinstance(arranged, sp.Mul) else (sp.S.One, arranged)
    if not isinstance(rest, sp.Add):
        return arranged
    scale = sp.S.One
    for axis in space.axes:  # every mean's size: a layer norm over (j, k) gets 1/(n_j*n_k) in front
        n = axis.size
        scaled = sp.expand(rest * n)
        means = [t for t in sp.Add.make_args(rest) if sp.fraction(sp.together(t))[1].has(n) and
                 any(s.axis == axis.index for s in t.atoms(AxisSum))]  # not a constant 0.1/n_j (label smoothing)
        if means and sp.count_ops(scaled) <= sp.count_ops(rest) + 2:
            rest, scale = scaled, scale * n
    return arranged if scale == 1 else sp.Mul(coeff / scale, sp.factor_terms(rest), evaluate=False)


# ---------------------------------------------------------------------- code generation


@dataclass
class Code:
    source: str
    function: Callable[..., tuple]
    name: str


class CodeWriter:
    """Writes the fused backward of a chain: recompute the saved tensors used, then the gradients."""

    def __init__(self, chain: Chain, backprop: Backprop, forms: dict[SNode, sp.Expr]) -> None:
        self.chain = chain
        self.space = chain.space
        self.backprop = backprop
        self.forms = forms
        self.dims = {axis.index: position for position, axis in enumerate(self.space.axes)}
        self.used_names: set[str] = {"torch", "F", "math"}
        self.names: dict[sp.Basic, str] = {}
        self.lines: list[str] = []

    def name(self, wanted: str) -> str:
        return unique_name(wanted, self.used_names)

    def layout(self, axes: Any) -> str:
        real = set(a for a in axes if a is not None)
        dims = [self.names[axis.size] if axis.index in real else "1" for axis in self.space.axes]
        return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

    def _needs_reshape(self, node: SNode) -> bool:
        real = [a for a in node.axes if a is not None]
        layout = [axis.value if axis.index in real else 1 for axis in self.space.axes]
        return list(node.shape) != layout

    def write(self, function_name: str = "fused_backward") -> Code:
        chain = self.chain
        inputs = [chain.input] + chain.params
        grad_names = {}
        for node in inputs + [chain.output]:
            node_name = self.name(node.ident)
            self.names[node.sym] = node_name
        out_grad = self.name("d" + chain.output.ident)
        self.names[chain.output.gsym] = out_grad
        for node in inputs:
            if node.differentiable:
                grad_names[node] = self.name("d" + node.ident)
        for axis in self.space.axes:
            self.names[axis.size] = self.name(str(axis.size))
        args = [out_grad] + [self.names[node.sym] for node in inputs]
        body: list[str] = []
        body += self._sizes(inputs)
        for node in inputs:
            if node.axes and node.differentiable and self._needs_reshape(node) and node.sym in self._used_symbols():
                name = self.names[node.sym]
                body.append(f"{name} = {name}{_sized('reshape', self.layout(node.axes))}")
        if self._needs_reshape(chain.output):
            body.append(f"{out_grad} = {out_grad}{_sized('reshape', self.layout(chain.output.axes))}")
        tensors = {n.sym for n in chain.nodes} | {n.gsym for n in chain.nodes} | set(self.backprop.special)
        printer = TorchPrinter(self.names, self.dims, tensors, like=out_grad)
        body += self._specials(printer, targets=True)
        body += self._recompute(printer)
        body += self._specials(printer, targets=False)
        results = []
        dtype = f"{out_grad}.dtype"
        for node in inputs:
            if not node.differentiable:
                results.append("None")
                continue
            expr = self._logs_of_softmaxes(self.forms[node])
            target = grad_names[node]
            if expr == 0:
                body.append(f"{target} = torch.zeros({self.layout(node.axes)}, dtype={dtype}, "
                            f"device={out_grad}.device)")
            else:
                body.append(f"{target} = {printer.doprint(expr)}")
                if self.space.axes_of(expr) != frozenset(a for a in node.axes if a is not None):
                    body.append(f"{target} = {target}{_sized('expand', self.layout(node.axes))}")
            if self._needs_reshape(node):
                shape = "(" + ", ".join(str(s) if a is None else self.names[self.space.axis(a).size]
                                        for s, a in zip(node.shape, node.axes)) + ("," if len(node.shape) == 1
                                                                                   else "") + ")"
                body.append(f"{target} = {target}{_sized('reshape', shape)}")
            results.append(target)
        body.append(f"return ({', '.join(results)}{',' if len(results) == 1 else ''})")
        doc = (f'    """Gradients of {chain.output.name} with respect to {", ".join(n.name for n in inputs)} '
               f'(None for those without one), derived by tensorgraph.symbolic."""')
        source = "\n".join([f"def {function_name}({', '.join(args)}):", doc] + ["    " + line for line in body]) + "\n"
        return Code(source, compile_source(source, function_name), function_name)

    def _logs_of_softmaxes(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` with the log of a saved softmax ``p = exp(a)/Sum(exp(a), j)`` written ``a - log(Sum(exp(a), j))``,
        which prints as ``torch.log_softmax``: where ``p`` underflows to 0, ``log(p)`` is ``-inf`` and
        ``p**T*log(p)`` NaN, where the log-softmax is finite and the product 0 (the gradient of ``T`` in
        ``softmax(x)**T``)."""
        logs = {}
        for log in expr.atoms(sp.log):
            node = next((n for n in self.chain.ops if n.sym == log.args[0]), None)
            if node is None or node.reduction:
                continue
            numerator, denominator = sp.fraction(node.local)
            if isinstance(numerator, sp.exp) and isinstance(denominator, AxisSum) and denominator.body == numerator:
                logs[log] = sp.Add(numerator.args[0], -sp.log(denominator), evaluate=False)
        return expr.xreplace(logs) if logs else expr

    def _used_symbols(self) -> set[sp.Basic]:
        used: set[sp.Basic] = set()
        for expr in self.forms.values():
            used |= expr.free_symbols
        for node in self._needed():
            used |= {o.sym for o in node.operands}
        for _, body, _axis in self.backprop.special.values():
            used |= body.free_symbols
        return used

    def _sizes(self, inputs: list[SNode]) -> list[str]:
        lines = []
        for axis in self.space.axes:
            for node in inputs + [self.chain.output]:
                if node.axes and axis.index in node.axes:
                    tensor = self.names[node.sym] if node is not self.chain.output else \
                        self.names[self.chain.output.gsym]
                    lines.append(f"{self.names[axis.size]} = {tensor}.shape[{list(node.axes).index(axis.index)}]")
                    break
            else:
                lines.append(f"{self.names[axis.size]} = {axis.value}")
        return lines

    def _needed(self) -> list[SNode]:
        """Op nodes whose values the gradients use, with what they need, in chain order."""
        wanted: set[sp.Basic] = set()
        for expr in self.forms.values():
            wanted |= expr.free_symbols
        for _, body, _axis in self.backprop.special.values():
            if any(body.has(s) for s in wanted) or True:
                wanted |= body.free_symbols
        needed: set[SNode] = set()
        for node in reversed(self.chain.ops):
            if node.sym in wanted or node in needed:
                needed.add(node)
                for operand in node.operands:
                    if operand.kind == "op":
                        needed.add(operand)
        return [node for node in self.chain.ops if node in needed]

    def _recompute(self, printer: TorchPrinter) -> list[str]:
        lines = []
        for node in self._needed():
            if node is self.chain.output and node.sym not in self.names:
                pass
            name = self.names.get(node.sym) or self.name(node.ident)
            self.names[node.sym] = name
            if node.code is not None:
                text = node.code(lambda n: self.names[n.sym], lambda a: self.dims[a])
            else:
                text = printer.doprint(node.local)
            lines.append(f"{name} = {text}")
        return lines

    def _specials(self, printer: TorchPrinter, targets: bool) -> list[str]:
        """One-hot tensors of the targets (before the recomputation, which may pick with them), then the
        argmax indicators and tie masks the gradients mention (after it: they read recomputed tensors)."""
        lines = []
        from_end = {node.sym for node in self.chain.nodes if node.from_end}
        deltas: set[sp.Basic] = set()
        for expr in list(self.forms.values()) + [n.local for n in self._needed()]:
            deltas |= expr.atoms(sp.KroneckerDelta)
        for delta in sorted(deltas, key=str):
            axis, other = (delta.args if delta.args[0] in self.dims else delta.args[::-1])
            dim = self.dims[axis]
            if (other in self.backprop.special) == targets:
                continue
            if other in self.backprop.special:
                _, body, _ = self.backprop.special[other]
                target = printer._method_target(body)
                index = f"{target}.max({dim}, keepdim=True).indices"
                name = self.name("onehot_argmax")
                lines.append(f"{name} = torch.zeros_like({target}).scatter({dim}, {index}, 1.0)")
            else:
                target_axes = self.space.axes_of(other)
                layout = self.layout(target_axes)
                source = self.names[other]
                name = self.name(f"onehot_{source}")
                both = self.layout(target_axes | {axis})
                index = f"{source}{_sized('reshape', layout)}"
                if other in from_end:  # x[rows, -1] is the last class, as torch reads it
                    index += f" % {self.names[self.space.axis(axis).size]}"
                lines.append(f"{name} = torch.zeros({both}, dtype={self.names[self.chain.output.gsym]}.dtype, "
                             f"device={source}.device).scatter({dim}, {index}, 1.0)")
            self.names[delta] = name
        for symbol, (kind, body, axis) in self.backprop.special.items():
            if targets or kind != "tie" or not any(symbol in e.free_symbols for e in self.forms.values()):
                continue
            target = printer._method_target(body)
            dim = self.dims[axis]
            name = self.name("ismax")
            lines.append(f"{name} = ({target} == {target}.amax({dim}, keepdim=True)).to({target}.dtype)")
            lines.append(f"{name} = {name} / {name}.sum({dim}, keepdim=True)")
            self.names[symbol] = name
        return lines


def _sized(method: str, shape: str) -> str:
    """``.reshape(n, 1)``; an empty shape goes as a tuple (``.reshape(())``: a bare ``.reshape()`` is an error)."""
    return f".{method}{shape}" if shape != "()" else f".{method}(())"


_COMPILED = 0


def compile_source(source: str, function_name: str) -> Callable[..., tuple]:
    """Compile generated code once; the source is registered so tracebacks show it."""
    global _COMPILED
    _COMPILED += 1
    filename = f"<tensorgraph.symbolic {function_name} #{_COMPILED}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"torch": torch, "F": torch.nn.functional, "math": math}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace[function_name]


# ---------------------------------------------------------------------- the result


@dataclass
class Derivation:
    """The closed-form gradient of ``output`` with respect to ``wrt``, derived from a recorded chain.

    ``expr`` is one element of the gradient, simplified, with reductions written as
    explicit sums over the input (``AxisSum(body, axis)``, printed ``Sum(body, axis)``);
    ``textbook`` is the same gradient in terms of the chain's own saved tensors (the form
    a lecture writes); ``latex`` renders the textbook form; ``steps`` is the worked
    derivation (markdown with LaTeX); ``source`` the generated torch code of the fused
    backward, which returns the gradients of the input and of every parameter, and
    ``backward`` that code compiled.
    """

    output: str
    wrt: str
    expr: sp.Expr
    textbook: sp.Expr
    latex: str
    steps: str
    source: str
    backward: Callable[..., tuple]
    gradients: dict[str, sp.Expr]  # textbook form of every gradient the fused backward returns, by name
    symbols: dict[str, sp.Basic]  # element symbols (and d-symbols, sizes, indices) by name
    seconds: float
    chain: Chain = field(repr=False)
    backprop: Backprop = field(repr=False)
    rewrites: dict[str, list[Rewrite]] = field(repr=False, default_factory=dict)
    checked: str = ""
    unstable: str = ""  # why the rule is not fused: at large magnitudes it loses what torch keeps ("" if it does not)

    def grad(self, name: str) -> sp.Expr:
        """The simplified gradient of any tensor of the chain (in the input, parameters and reductions)."""
        return self.backprop.resolved[self.chain.node(name)]

    def value(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` (written with the chain's symbols) in primitives: saved tensors replaced by their values."""
        values = {node.sym: node.value for node in self.chain.ops if not node.reduction}
        return sp.sympify(expr).xreplace(values)

    def sum(self, expr: sp.Expr, axis: str | sp.Symbol) -> AxisSum:
        """``AxisSum(expr, axis)``: for writing textbook forms to compare with (``d.sum(dy * r, 'i')``)."""
        return AxisSum(expr, self.symbols[axis] if isinstance(axis, str) else axis)

    def prove(self, other: sp.Expr, wrt: str | None = None) -> Proof:
        """Prove the derived gradient of ``wrt`` (default: the input) equal to ``other``, symbolically.

        Both sides are written in primitives and brought to canonical form with the same
        rewrite rules; the proof holds when their difference simplifies to 0.
        """
        derived = self.grad(wrt or self.wrt)
        other = self.value(other)
        computed = {param.sym: value for param, value in self.chain.derived.items()}  # sub_1 is 1 - t
        derived, other = derived.xreplace(computed), other.xreplace(computed)
        typed = other.atoms(sp.Float) - derived.atoms(sp.Float)  # 1e-6 typed as a float: as the chain reads it
        other = other.xreplace({f: to_number(float(f)) for f in typed})
        space = self.chain.space
        with space.unlimited():
            holds, difference = space.equal(derived, other)
            if not holds and _exponential_kinds(derived) != _exponential_kinds(other):
                # sigmoid(x) against 1/(1 + exp(-x)), 1 - tanh(x)**2 against 1/cosh(x)**2: compare in exponentials
                holds = space.equal(_as_exponentials(derived), _as_exponentials(other))[0]
                difference = sp.S.Zero if holds else difference
            return Proof(holds, difference, "" if holds else self._at_recorded_sizes(difference))

    def _at_recorded_sizes(self, difference: sp.Expr) -> str:
        """When a lifted constant is why a proof fails: say that it holds at the recorded sizes."""
        space = self.chain.space
        if not self.chain.lifted:
            return ""
        sizes = {axis.size: axis.value for axis in space.axes}
        rest = space.canon(difference.xreplace(sizes)).xreplace(sizes)
        if sp.cancel(sp.together(rest)) != 0:
            return ""
        recorded = ", ".join(f"{size} = {value}" for size, value in sizes.items())
        lifted = "; ".join(self.chain.lifted)
        return f"it holds at the recorded sizes ({recorded}) only: the derivation read {lifted}, which scales with size"

    def __str__(self) -> str:
        return f"d{self.output}/d{self.wrt} = {self.textbook}"

    def __repr__(self) -> str:
        return f"<Derivation d{self.output}/d{self.wrt} = {self.textbook} ({self.seconds:.2f} s)>"

    def _repr_markdown_(self) -> str:
        return self.steps


_EXPONENTIAL = (Sigmoid, Softplus, sp.tanh, sp.sinh, sp.cosh)


def _exponential_kinds(expr: sp.Expr) -> set[type]:
    """Which of sigmoid, softplus, tanh, sinh, cosh ``expr`` applies."""
    return {type(f) for f in expr.atoms(*_EXPONENTIAL)}


def _as_exponentials(expr: sp.Expr) -> sp.Expr:
    """``expr`` with sigmoid, softplus and the hyperbolic functions written with ``exp``."""
    return expr.rewrite(list(_EXPONENTIAL), sp.exp)


@dataclass
class Proof:
    """The result of :meth:`Derivation.prove`: ``bool(proof)`` tells whether it holds."""

    holds: bool
    difference: sp.Expr
    note: str = ""  # why a formula that holds at the recorded sizes fails for symbolic ones (a lifted constant)

    def __bool__(self) -> bool:
        return self.holds

    def __str__(self) -> str:
        if self.holds:
            return "proved: the difference simplifies to 0"
        return f"not equal: difference {self.difference}" + (f"; {self.note}" if self.note else "")


# ---------------------------------------------------------------------- putting it together


def build(chain: Chain) -> Derivation:
    """Run the derivation on a lowered chain (see the module docstring)."""
    start = time.perf_counter()
    backprop = Backprop(chain)
    backprop.run()
    space = chain.space
    targets = [chain.input] + [p for p in chain.params if p.differentiable]
    forms: dict[SNode, sp.Expr] = {}
    rewrites: dict[str, list[Rewrite]] = {}
    for node in targets:
        textbook, steps = rewrite_in_saved(backprop.resolved[node], chain, space)
        forms[node] = display(textbook, space)
        rewrites[node.name] = steps
    code = CodeWriter(chain, backprop, forms).write(f"d_{chain.output.ident}")
    x = chain.input
    textbook = forms[x]
    written_out = explicit(backprop.resolved[x], chain, space)
    options = ([display(written_out, space)] if written_out is not None else []) + [nested(textbook, chain)]
    expr = min(options, key=lambda e: (sp.count_ops(e), options.index(e)))
    names = symbol_latex(chain, backprop)
    latex = rf"{latex_name('d' + x.name, [a for a in x.axes if a is not None])} = {to_latex(textbook, names)}"
    symbols = symbol_table(chain)
    derivation = Derivation(
        output=chain.output.name, wrt=x.name, expr=expr, textbook=textbook, latex=latex, steps="",
        source=code.source, backward=at_recorded_shapes(code.function, chain) if chain.lifted else code.function,
        gradients={n.name: forms[n] for n in targets}, symbols=symbols,
        seconds=0.0, chain=chain, backprop=backprop, rewrites=rewrites)
    from .steps import write_steps

    derivation.steps = write_steps(derivation, names)
    derivation.seconds = time.perf_counter() - start
    return derivation


def at_recorded_shapes(function: Callable[..., tuple], chain: Chain) -> Callable[..., tuple]:
    """The compiled backward, refusing inputs of other shapes: a constant lifted to a size (``4.0`` read as
    ``n_j - 1``) is known to be that size only at the recorded shapes; elsewhere it may be a plain number."""
    shapes = [tuple(node.shape) for node in [chain.input] + chain.params]

    def backward(doutput: Any, *tensors: Any) -> tuple:
        given = [tuple(tensor.shape) for tensor in tensors]
        if given != shapes:
            raise SymbolicError(
                f"d{chain.output.name}/d{chain.input.name} was derived for inputs of shapes {shapes}, where it read "
                f"{'; '.join(chain.lifted)}; with shapes {given} its closed form would scale that constant with the "
                f"size, which is wrong if it is a number typed in the code: record the forward at these sizes and "
                f"derive again")
        return function(doutput, *tensors)

    return backward


def symbol_table(chain: Chain) -> dict[str, sp.Basic]:
    table: dict[str, sp.Basic] = {}
    for axis in chain.space.axes:
        table[str(axis.index)] = axis.index
        table[str(axis.size)] = axis.size
    for node in chain.nodes:
        table[node.name] = node.sym
        table["d" + node.name] = node.gsym
    return table


def symbol_latex(chain: Chain, backprop: Backprop) -> dict[sp.Basic, str]:
    names: dict[sp.Basic, str] = {}
    for node in chain.nodes:
        indices = [a for a in node.axes if a is not None]
        names[node.sym] = latex_name(node.name, indices)
        names[node.gsym] = latex_name("d" + node.name, indices)
    for axis in chain.space.axes:
        size = str(axis.size)
        names[axis.size] = size if "_" not in size else size.replace("_", "_{") + "}"
    for symbol, (kind, body, axis) in backprop.special.items():
        inner = to_latex(body, names)
        names[symbol] = (rf"\operatorname{{argmax}}_{{{axis}}} {inner}" if kind == "argmax" else
                         rf"\mathbb{{1}}^{{\max_{{{axis}}}}}[{inner}]")
    return names
