"""``tensorgraph derive cross-entropy|batchnorm``: the lecture's exercises 2 and 3, derived with sympy.

The chains are recorded from the lecture's own forward pass (``tensorgraph.lecture``):
cross-entropy from ``logits`` to ``loss``, batchnorm from ``hprebn`` to ``hpreact``. With
``--biased`` the batchnorm lines are recorded with the biased variance (1/n) instead of
Bessel's 1/(n-1), and the derivation changes with them.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sympy as sp

CHAINS = ("cross-entropy", "batchnorm")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "derive", help="derive the lecture's fused gradients (exercises 2 and 3) from the recorded graph with sympy",
        description="Record the lecture's atomic chain, derive its gradient symbolically, prove it equal to the "
                    "lecture's formula, and print the closed form and the generated fused backward.")
    parser.add_argument("chain", choices=CHAINS, type=_chain_name,
                        help="which chain of the lecture's forward pass (cross_entropy works too)")
    parser.add_argument("--biased", action="store_true",
                        help="batchnorm with the biased variance 1/n instead of Bessel's 1/(n-1)")
    parser.add_argument("--latex", action="store_true", help="print the closed forms as LaTeX")
    parser.add_argument("--steps", action="store_true", help="print the whole derivation (markdown with LaTeX)")
    parser.set_defaults(run=run)
    return parser


def _chain_name(text: str) -> str:
    return text.strip().lower().replace("_", "-")


def run(args: argparse.Namespace) -> int:
    from ..cli import CLIError

    if args.biased and args.chain != "batchnorm":
        raise CLIError("--biased applies to the batchnorm chain only", "tensorgraph derive")
    graph, output, wrt = record_chain(args.chain, args.biased)
    from .. import symbolic

    start = time.perf_counter()
    derivation = symbolic.derive(graph, output=output, wrt=wrt)
    seconds = time.perf_counter() - start
    if args.steps:
        print(derivation.steps)
        return 0
    if args.latex:
        import sympy as sp  # NOTE: imported here so that every other command starts without sympy

        print(derivation.latex)
        for name, form in derivation.gradients.items():
            if name != derivation.wrt:
                names = _latex_names(derivation)
                print(rf"{names[derivation.symbols['d' + name]]} = {sp.latex(form, symbol_names=names)}")
        return 0
    print(summary(derivation, args.chain, args.biased, seconds))
    return 0


def record_chain(chain: str, biased: bool) -> tuple[Any, str, str]:
    """Record the lecture's forward pass (or, with ``biased``, its batchnorm with 1/n): (graph, output, input)."""
    from ..lecture import record_exercise, setup

    if chain == "cross-entropy":
        graph, _, _ = record_exercise()
        return graph, "loss", "logits"
    if not biased:
        graph, _, _ = record_exercise()
        return graph, "hpreact", "hprebn"
    ex = setup()
    from ..naming import set_names
    from ..record import record

    with record() as graph:
        variables = _biased_batchnorm(ex)
    set_names(graph, {graph.node_id(t): name for name, t in variables.items() if t in graph})
    return graph, "hpreact", "hprebn"


def _biased_batchnorm(ex: Any) -> dict[str, Any]:
    """The lecture's first layer and batchnorm lines, with the biased variance (returns its variables)."""
    n = ex.Xb.shape[0]
    emb = ex.C[ex.Xb]
    embcat = emb.view(emb.shape[0], -1)
    hprebn = embcat @ ex.W1 + ex.b1
    bnmeani = 1 / n * hprebn.sum(0, keepdim=True)
    bndiff = hprebn - bnmeani
    bndiff2 = bndiff**2
    bnvar = 1 / n * (bndiff2).sum(0, keepdim=True)  # biased: dividing by n, as F.batch_norm does in training
    bnvar_inv = (bnvar + 1e-5) ** -0.5
    bnraw = bndiff * bnvar_inv
    hpreact = ex.bngain * bnraw + ex.bnbias
    return {k: v for k, v in locals().items() if k not in ("ex", "n")} | {"bngain": ex.bngain, "bnbias": ex.bnbias}


def lecture_formula(derivation: Any, chain: str, biased: bool) -> tuple[str, sp.Expr]:
    """The lecture's formula for the chain (to prove the derived form against), as text and as sympy."""
    import sympy as sp

    s = derivation.symbols
    if chain == "cross-entropy":
        text = "dlogits = (softmax(logits) - onehot(Yb)) / n * dloss"
        j, yb = s["j"], s["Yb"]
        return text, s["dloss"] * (s["probs"] - sp.KroneckerDelta(j, yb)) / s["n"]
    n, dy, raw = s["n"], s["dhpreact"], s["bnraw"]
    correction = n / (n - 1) if not biased else sp.S.One
    text = "dhprebn = bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - " + \
        ("n/(n-1)*" if not biased else "") + "bnraw*(dhpreact*bnraw).sum(0))"
    form = s["bngain"] * s["bnvar_inv"] / n * (
        n * dy - derivation.sum(dy, "i") - correction * raw * derivation.sum(dy * raw, "i"))
    return text, form


def summary(derivation: Any, chain: str, biased: bool, seconds: float) -> str:
    """The closed form, its proof against the lecture's formula, and the generated code, as text."""
    import sympy as sp

    x = derivation.chain.input
    shape = "×".join(map(str, x.shape))
    lines = [f"d{derivation.output} / d{derivation.wrt}, derived from the recorded chain "
             f"({len(derivation.chain.ops)} ops from {derivation.wrt} [{shape}] to {derivation.output}) "
             f"in {seconds:.2f} s", ""]
    lines.append(f"  d{derivation.wrt}[{_indices(x)}] = {sp.sstr(derivation.textbook)}")
    for name, form in derivation.gradients.items():
        if name != derivation.wrt:
            node = derivation.chain.node(name)
            lines.append(f"  d{name}[{_indices(node)}] = {sp.sstr(form)}")
    if len(sp.sstr(derivation.expr)) <= 160:
        lines.append(f"  (written out: d{derivation.wrt} = {sp.sstr(derivation.expr)})")
    lines.append("")
    text, formula = lecture_formula(derivation, chain, biased)
    proof = derivation.prove(formula)
    lines.append(f"  the lecture's formula  {text}")
    lines.append(f"  symbolic proof (n symbolic): {proof}")
    if chain == "cross-entropy":
        zero = derivation.grad("logit_maxes")
        lines.append(f"  dlogit_maxes = {zero}" + ("  (the max-subtraction cancels exactly)" if zero == 0 else ""))
    lines.append(f"  {derivation.checked}")
    lines += ["", "generated fused backward:", ""]
    lines += ["    " + line for line in derivation.source.rstrip().splitlines()]
    return "\n".join(lines)


def _indices(node: Any) -> str:
    return ",".join(str(a) for a in node.axes if a is not None)


def _latex_names(derivation: Any) -> dict:
    from ..symbolic.derivation import symbol_latex

    return symbol_latex(derivation.chain, derivation.backprop)
