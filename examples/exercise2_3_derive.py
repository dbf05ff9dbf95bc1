"""Exercises 2 and 3 with tensorgraph: derive the fused gradients of cross-entropy and batchnorm.

    .venv/bin/python examples/exercise2_3_derive.py

The lecture asks for ``dlogits`` in one go (exercise 2) and ``dhprebn`` in one go
(exercise 3), derived on paper. ``tg.symbolic.derive`` reads the atomic ops recorded
between the two tensors and derives the closed form with sympy; ``prove`` checks it
against the lecture's formula symbolically; ``graph.fuse`` replaces the chain by one
node whose backward is the derived code, and ``compare`` checks that against PyTorch.
"""

import tensorgraph as tg
from tensorgraph.lecture import record_exercise

graph, loss, ex = record_exercise()

# ---- exercise 2: cross-entropy, from logits to loss
ce = tg.symbolic.derive(graph, output=loss, wrt="logits")
print(ce)  # dloss/dlogits = dloss*(probs[i,j] - KroneckerDelta(Yb[i], j))/n
print(ce.source)  # the fused backward as torch code
fused = graph.fuse(loss, "logits")  # a new graph: the eight cross-entropy ops are one node
report = fused.compare(loss)
print(f"fused cross-entropy vs torch autograd: {report.exact_count}/{len(report.rows)} exact, ok={report.ok}")

# ---- exercise 3: batchnorm, from hprebn to hpreact
bn = tg.symbolic.derive(graph, output="hpreact", wrt="hprebn")
print(bn)
s = bn.symbols  # the element symbols: dhpreact stands for dhpreact[i, j], bngain for bngain[j] ...
n, dy, bngain, bnraw, bnvar_inv = s["n"], s["dhpreact"], s["bngain"], s["bnraw"], s["bnvar_inv"]
# the lecture's answer: bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*(dhpreact*bnraw).sum(0))
lecture = bngain * bnvar_inv / n * (n * dy - bn.sum(dy, "i") - n / (n - 1) * bnraw * bn.sum(dy * bnraw, "i"))
print("the lecture's formula:", bn.prove(lecture))
without_bessel = bngain * bnvar_inv / n * (n * dy - bn.sum(dy, "i") - bnraw * bn.sum(dy * bnraw, "i"))
print("the same without Bessel's n/(n-1):", "proved" if bn.prove(without_bessel) else "not equal")
