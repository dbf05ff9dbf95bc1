"""Exercise 4 with tensorgraph: train the lecture's MLP with every gradient from graph.backward.

    .venv/bin/python examples/exercise4_train.py [STEPS]

The lecture's exercise 4 replaces ``loss.backward()`` by the hand-written backward pass.
Here each step records the forward pass and backpropagates with tensorgraph's engine;
the first step is also checked against PyTorch, and the generated backward code (the
answer key) is shown to give the same update.
"""

import sys

import torch

import tensorgraph as tg
from tensorgraph import codegen
from tensorgraph.lecture import forward, setup
from tensorgraph.makemore import load_splits

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
splits = load_splits()
Xtr, Ytr = splits.train
ex = setup(n_hidden=64)
C, W1, b1, W2, b2, bngain, bnbias = parameters = ex.parameters
g = torch.Generator().manual_seed(42)

for i in range(steps):
    ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
    with tg.record() as graph:
        loss = forward(C, W1, b1, W2, b2, bngain, bnbias, Xtr[ix], Ytr[ix])
    grads = graph.backward(loss)
    if i == 0:
        print(graph.compare(loss).ok and "step 0: every gradient matches torch autograd")
        answer_key = codegen.run(graph.backward_source(loss), graph)
        assert all(torch.equal(answer_key["d" + graph.name_of(p)], grads[p]) for p in parameters)
        print("step 0: the generated backward code gives the same gradients, bit for bit")
    lr = 0.1 if i < steps // 2 else 0.01
    with torch.no_grad():
        for p in parameters:
            p -= lr * grads[p]
    if i % 100 == 0 or i == steps - 1:
        print(f"step {i:5d}: loss {loss.item():.4f}")

Xval, Yval = splits.val
with torch.no_grad():  # evaluation mode would use running statistics; the batch statistics do for a sketch
    val = forward(*parameters, Xval[:2000], Yval[:2000]).item()
print(f"validation loss on 2000 examples after {steps} steps: {val:.4f}")
