"""After the lecture: makemore part 5's WaveNet, trained with every gradient from graph.backward.

    .venv/bin/python examples/wavenet_train.py [STEPS]

The next lecture of the series stacks the layers of part 3 (``Linear``, ``BatchNorm1d``,
``Tanh``) into a hierarchical model over 8 characters: ``Embedding``, then three times
``FlattenConsecutive(2)`` (pairs of neighbours side by side), ``Linear``, a ``BatchNorm1d``
over 3-d input (its statistics over dims (0, 1)) and ``Tanh``. Here each step records the
forward pass and backpropagates with tensorgraph's engine. The first step is checked
against PyTorch, prints part 3's per-layer statistics with each gradient looked up by the
layer's name, and shows what ``graph.check`` says of a hand-written gradient that forgets
the batch norm's second dimension.
"""

import sys

import torch
import torch.nn.functional as F

import tensorgraph as tg
from tensorgraph.makemore import load_splits

g = torch.Generator().manual_seed(42)


class Linear:
    def __init__(self, fan_in, fan_out, bias=True):
        self.weight = torch.randn((fan_in, fan_out), generator=g) / fan_in**0.5
        self.bias = torch.zeros(fan_out) if bias else None

    def __call__(self, x):
        self.out = x @ self.weight
        if self.bias is not None:
            self.out += self.bias
        return self.out

    def parameters(self):
        return [self.weight] + ([] if self.bias is None else [self.bias])


class BatchNorm1d:
    def __init__(self, dim, eps=1e-5, momentum=0.1):
        self.eps, self.momentum, self.training = eps, momentum, True
        self.gamma, self.beta = torch.ones(dim), torch.zeros(dim)
        self.running_mean, self.running_var = torch.zeros(dim), torch.ones(dim)

    def __call__(self, x):
        if self.training:
            dim = 0 if x.ndim == 2 else (0, 1)  # 3-d input: one statistic per channel, over batch and time
            xmean, xvar = x.mean(dim, keepdim=True), x.var(dim, keepdim=True)
        else:
            xmean, xvar = self.running_mean, self.running_var
        xhat = (x - xmean) / torch.sqrt(xvar + self.eps)
        self.out = self.gamma * xhat + self.beta
        if self.training:
            with torch.no_grad():
                self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * xmean
                self.running_var = (1 - self.momentum) * self.running_var + self.momentum * xvar
        return self.out

    def parameters(self):
        return [self.gamma, self.beta]


class Tanh:
    def __call__(self, x):
        self.out = torch.tanh(x)
        return self.out

    def parameters(self):
        return []


class Embedding:
    def __init__(self, num_embeddings, embedding_dim):
        self.weight = torch.randn((num_embeddings, embedding_dim), generator=g)

    def __call__(self, IX):
        self.out = self.weight[IX]
        return self.out

    def parameters(self):
        return [self.weight]


class FlattenConsecutive:
    def __init__(self, n):
        self.n = n

    def __call__(self, x):
        B, T, C = x.shape
        x = x.view(B, T // self.n, C * self.n)
        if x.shape[1] == 1:
            x = x.squeeze(1)
        self.out = x
        return self.out

    def parameters(self):
        return []


class Sequential:
    def __init__(self, layers):
        self.layers = layers

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        self.out = x
        return self.out

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]


steps = int(sys.argv[1]) if len(sys.argv) > 1 else 500
splits = load_splits(block_size=8)
Xtr, Ytr = splits.train
vocab_size, n_embd, n_hidden = len(splits.vocab), 10, 68
model = Sequential([
    Embedding(vocab_size, n_embd),
    FlattenConsecutive(2), Linear(n_embd * 2, n_hidden, bias=False), BatchNorm1d(n_hidden), Tanh(),
    FlattenConsecutive(2), Linear(n_hidden * 2, n_hidden, bias=False), BatchNorm1d(n_hidden), Tanh(),
    FlattenConsecutive(2), Linear(n_hidden * 2, n_hidden, bias=False), BatchNorm1d(n_hidden), Tanh(),
    Linear(n_hidden, vocab_size),
])
with torch.no_grad():
    model.layers[-1].weight *= 0.1  # a less confident last layer at the start
parameters = model.parameters()
print(f"{sum(p.nelement() for p in parameters)} parameters")

for i in range(steps):
    ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
    Xb, Yb = Xtr[ix], Ytr[ix]
    with tg.record() as graph:
        logits = model(Xb)
        loss = F.cross_entropy(logits, Yb)
    grads = graph.backward(loss)
    if i == 0:
        print(graph.compare(loss).ok and "step 0: every gradient matches torch autograd")
        for j, layer in enumerate(model.layers[:-1]):
            if isinstance(layer, Tanh):  # part 3's histograms, as numbers: each gradient by the layer's name
                out, dout = layer.out, grads[f"model.layers[{j}].out"]
                print(f"layer {j:2d} (Tanh): mean {out.mean():+.2f}, std {out.std():.2f}, "
                      f"saturated {(out.abs() > 0.97).float().mean() * 100:.1f}%; gradient std {dout.std():.2e}")
        bn, x = model.layers[3], model.layers[2].out  # the first batch norm: 3-d input (32, 4, 68)
        xhat = (x - x.mean((0, 1), keepdim=True)) / torch.sqrt(x.var((0, 1), keepdim=True) + bn.eps)
        dout = grads["model.layers[3].out"]
        mistake = {"model.layers[3].gamma": (dout * xhat).sum(0)}  # the 2-d layer's .sum(0): dim 1 forgotten
        row = graph.check(mistake, loss)["model.layers[3].gamma"]
        print(f"a hand-written dgamma summed over dim 0 only: {row.kind}: {row.message}")
    lr = 0.1 if i < steps * 3 // 4 else 0.01
    with torch.no_grad():
        for p in parameters:
            p -= lr * grads[p]
    if i % 100 == 0 or i == steps - 1:
        print(f"step {i:5d}: loss {loss.item():.4f}")

for layer in model.layers:
    layer.training = False  # evaluation: the batch norms use their running statistics
Xval, Yval = splits.val
with torch.no_grad():
    val = F.cross_entropy(model(Xval), Yval).item()
print(f"validation loss after {steps} steps: {val:.4f}")
