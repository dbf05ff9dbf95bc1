"""A learner's answer to exercise 1, with a mistake in it: let tensorgraph find it.

    .venv/bin/tensorgraph check examples/exercise1_check.py

``tensorgraph check`` runs this file, then reads three of its globals: ``graph`` (the
recorded forward pass), ``loss``, and ``manual`` (the hand-written gradients by name).
It prints one row per gradient in backward order and points at the first wrong line,
with why; the rows below it are "inherited" rather than blamed. (Exit status 1: a
gradient is wrong.) In a notebook: ``print(graph.check(manual, loss))``.
"""

import torch
import torch.nn.functional as F

import tensorgraph as tg
from tensorgraph.lecture import forward, setup

ex = setup()
C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb = ex.C, ex.W1, ex.b1, ex.W2, ex.b2, ex.bngain, ex.bnbias, ex.Xb, ex.Yb
n = Xb.shape[0]

with tg.record() as graph:
    loss = forward(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb)  # the lecture's forward pass, verbatim

# the forward values, by the names the lecture gives them
v = {name: graph.value(name) for name in graph.names}
logprobs, probs, counts, counts_sum, counts_sum_inv = (v[k] for k in ("logprobs", "probs", "counts", "counts_sum",
                                                                      "counts_sum_inv"))
logits, h, hpreact, bnraw, bnvar_inv, bnvar = (v[k] for k in ("logits", "h", "hpreact", "bnraw", "bnvar_inv", "bnvar"))
bndiff2, bndiff, hprebn, embcat, emb = (v[k] for k in ("bndiff2", "bndiff", "hprebn", "embcat", "emb"))

# ---- the learner's backward pass ----
dlogprobs = torch.zeros_like(logprobs)
dlogprobs[range(n), Yb] = -1.0 / n
dprobs = (1.0 / probs) * dlogprobs
dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)
dcounts = counts_sum_inv * dprobs
dcounts_sum = (-counts_sum**-2) * dcounts_sum_inv
dcounts += torch.ones_like(counts) * dcounts_sum
dnorm_logits = counts * dcounts
dlogits = dnorm_logits.clone()
dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
dh = dlogits @ W2.T
dW2 = h.T @ dlogits
db2 = dlogits.sum(0)
dhpreact = (1.0 - h**2) * dh
dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
dbnraw = bngain * dhpreact
dbnbias = dhpreact.sum(0, keepdim=True)
dbndiff = bnvar_inv * dbnraw
dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
dbnvar = (-0.5 * (bnvar + 1e-5) ** -1.5) * dbnvar_inv
dbndiff2 = (1.0 / n) * torch.ones_like(bndiff2) * dbnvar  # the mistake: bnvar divides by n-1, not n
dbndiff += 2 * bndiff * dbndiff2
dbnmeani = (-dbndiff).sum(0, keepdim=True)
dhprebn = dbndiff.clone()
dhprebn += 1.0 / n * (torch.ones_like(hprebn) * dbnmeani)
dembcat = dhprebn @ W1.T
dW1 = embcat.T @ dhprebn
db1 = dhprebn.sum(0)
demb = dembcat.view(emb.shape)
dC = torch.zeros_like(C)
dC.index_add_(0, Xb.view(-1), demb.view(-1, C.shape[1]))

manual = {
    "dlogprobs": dlogprobs, "dprobs": dprobs, "dcounts_sum_inv": dcounts_sum_inv, "dcounts_sum": dcounts_sum,
    "dcounts": dcounts, "dnorm_logits": dnorm_logits, "dlogit_maxes": dlogit_maxes, "dlogits": dlogits, "dh": dh,
    "dW2": dW2, "db2": db2, "dhpreact": dhpreact, "dbngain": dbngain, "dbnbias": dbnbias, "dbnraw": dbnraw,
    "dbnvar_inv": dbnvar_inv, "dbnvar": dbnvar, "dbndiff2": dbndiff2, "dbndiff": dbndiff, "dbnmeani": dbnmeani,
    "dhprebn": dhprebn, "dembcat": dembcat, "dW1": dW1, "db1": db1, "demb": demb, "dC": dC,
}
