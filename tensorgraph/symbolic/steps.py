"""The derivation as a worked solution: markdown with LaTeX, one section per stage."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sympy as sp

from .algebra import AxisMax, AxisSum
from .printing import latex_name, to_latex

if TYPE_CHECKING:
    from .chain import SNode
    from .derivation import Derivation

_LONG = 160  # operations: longer expressions are summarised


def _eq(left: str, right: str) -> str:
    return f"$$ {left} = {right} $$"


def _name(node: SNode, prefix: str = "") -> str:
    return latex_name(prefix + node.name, [a for a in node.axes if a is not None])


def _shape(node: SNode) -> str:
    return "×".join(map(str, node.shape)) if node.shape else "scalar"


def write_steps(d: Derivation, names: dict[sp.Basic, str]) -> str:
    """The markdown of :attr:`Derivation.steps`."""
    chain, space, backprop = d.chain, d.chain.space, d.backprop

    def tex(expr: sp.Expr) -> str:
        if sp.count_ops(expr) > _LONG:
            return rf"\text{{(an expression of {sp.count_ops(expr)} operations)}}"
        return to_latex(expr, names)

    x, out = chain.input, chain.output
    lines = [f"### Gradient of `{out.name}` with respect to `{x.name}`, derived from the recorded graph", ""]
    axes = ", ".join(f"${axis.index}$ runs over a dimension of size ${names[axis.size]} = {axis.value}$"
                     for axis in space.axes)
    elements = f"Every tensor is written one element at a time: {axes}." if axes else "Every tensor is a scalar."
    lines += [f"The chain has {len(chain.ops)} operations from `{x.name}` ({_shape(x)}) to `{out.name}` "
              f"({_shape(out)}). {elements} "
              f"Tensors entering from outside the chain: "
              f"{', '.join(f'`{p.name}`' for p in chain.params) or 'none'}.", ""]
    number = iter(range(1, 7))  # the sections, numbered as printed (a chain without reductions has no rules)

    lines += [f"**{next(number)}. The forward pass, element by element.**", ""]
    for node in chain.ops:
        where = f" (`{node.op}` at {node.source})" if node.source else ""
        lines.append(f"- `{node.name}`{where}:")
        lines.append("")
        lines.append(_eq(_name(node), tex(node.local)))
        for note in node.notes:
            lines.append(f"  ({note})")
        lines.append("")

    rules = [(lhs, rhs) for lhs, rhs in space.rule_notes if isinstance(lhs, (AxisSum, AxisMax))]
    rules_section = next(number) if rules else None
    if rules:
        lines += [f"**{rules_section}. The reductions as rewrite rules.** Each reduction is a symbol of its own; "
                  "its definition, expanded (factors that do not depend on the summed index leave the sum), is solved "
                  "for one sum, which from then on is replaced wherever it appears:", ""]
        for lhs, rhs in rules:
            lines.append(_eq(tex(lhs), tex(rhs)))
        lines.append("")

    lines += [f"**{next(number)}. The chain rule, node by node**, from the output back. "
              f"$\\mathrm{{d}}t$ stands for $\\partial\\,\\mathrm{{{_esc(out.name)}}} / \\partial t$; "
              "a tensor that was broadcast gets its gradient summed over the broadcast index, and a sum passes "
              "its gradient back to every element it summed.", ""]
    seen: set = set()
    for consumer, operand, term in backprop.contributions:
        op = "=" if operand not in seen else r"\mathrel{+}="
        seen.add(operand)
        lines.append(f"- through `{consumer.name}`: $$ {_name(operand, 'd')} {op} {tex(term)} $$")
    lines.append("")

    substituting = next(number)
    rewritten = f", then expanded and rewritten with the rules of step {rules_section}" if rules else ", then expanded"
    lines += [f"**{substituting}. Substituting and simplifying**, node by node (every gradient written with the input, "
              f"the parameters, the reductions and the incoming gradient{rewritten}):", ""]
    for node in reversed(chain.nodes):
        if node is out or node not in backprop.resolved:
            continue
        value = backprop.resolved[node]
        remark = ""
        if value == 0:
            remark = " — identically zero: every path through this tensor cancels"
        lines.append(f"- {'$' + _name(node, 'd') + ' = ' + tex(value) + '$'}{remark}")
    lines.append("")

    lines += [f"**{next(number)}. The closed form for `d{x.name}`.**", ""]
    steps = d.rewrites.get(x.name, [])
    if steps:
        lines.append(f"Step {substituting} left it in terms of the input and the reductions. It gets shorter written "
                     "with tensors the forward pass already computed: reading off their definitions,")
        lines.append("")
        for step in steps:
            if step.node.kind == "param":  # computed from other parameters before the chain (1 - t)
                lines.append(f"- `{step.node.name}` is computed from parameters: $ {tex(step.primitive)} = "
                             f"{tex(step.inverse)} $")
            else:
                lines.append(f"- `{step.node.name}` gives $ {tex(step.primitive)} = {tex(step.inverse)} $")
        lines += ["", "and substituting (then expanding and applying the rules again) leaves", ""]
    lines.append(_eq(_name(x, "d"), to_latex(d.textbook, names)))
    if d.expr != d.textbook and sp.count_ops(d.expr) <= min(_LONG, 3 * sp.count_ops(d.textbook) + 10):
        lines += ["", "and, with the reductions written out as sums over the input:", "",
                  _eq(_name(x, "d"), to_latex(d.expr, names))]
    for name, form in d.gradients.items():
        if name == x.name:
            continue
        node = chain.node(name)
        lines += ["", f"The parameter `{name}` gets:", "", _eq(_name(node, "d"), to_latex(form, names))]
    lines += ["", f"**{next(number)}. The fused backward**, printed from these expressions (it recomputes the saved "
              "tensors it needs from the inputs):", "", "```python", d.source.rstrip(), "```", ""]
    return "\n".join(lines)


def _esc(name: str) -> str:
    return name.replace("_", r"\_")
