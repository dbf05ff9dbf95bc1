"""Exercise 1 with tensorgraph: record the lecture's forward pass, backpropagate, compare with PyTorch.

    .venv/bin/python examples/exercise1_compare.py

The forward pass below is the lecture's, line for line. Recording it needs one ``with``
line and no ``retain_grad()``; ``graph.compare`` replaces the 26 ``cmp(...)`` calls, and
``graph.backward_source`` prints the whole manual backward pass: the answer key.
"""

import torch

import tensorgraph as tg
from tensorgraph.lecture import setup

ex = setup()  # the lecture's parameters and one batch (seed 2147483647, n_embd 10, n_hidden 64, batch 32)
C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb = ex.C, ex.W1, ex.b1, ex.W2, ex.b2, ex.bngain, ex.bnbias, ex.Xb, ex.Yb
n = Xb.shape[0]

with tg.record() as graph:
    emb = C[Xb]  # embed the characters into vectors
    embcat = emb.view(emb.shape[0], -1)  # concatenate the vectors
    hprebn = embcat @ W1 + b1  # hidden layer pre-activation
    bnmeani = 1 / n * hprebn.sum(0, keepdim=True)
    bndiff = hprebn - bnmeani
    bndiff2 = bndiff**2
    bnvar = 1 / (n - 1) * (bndiff2).sum(0, keepdim=True)  # Bessel's correction
    bnvar_inv = (bnvar + 1e-5) ** -0.5
    bnraw = bndiff * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    h = torch.tanh(hpreact)
    logits = h @ W2 + b2
    logit_maxes = logits.max(1, keepdim=True).values
    norm_logits = logits - logit_maxes
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdims=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    loss = -logprobs[range(n), Yb].mean()

print(graph, f"loss = {loss.item():.4f}")

grads = graph.backward(loss)  # tensorgraph's own engine: one rule per op, no torch.autograd
print("dlogits[0, :5] =", grads["dlogits"][0, :5])

print(graph.compare(loss))  # every gradient vs torch autograd: the lecture's cmp table

print("\nThe answer key, generated from the rule table:\n")
print(graph.backward_source(loss))
