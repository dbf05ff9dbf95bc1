"""Train the lecture's makemore MLP from Python, every gradient from tensorgraph's engine.

    .venv/bin/python examples/train_makemore.py [STEPS]

The same loop the CLI runs (`tensorgraph train`): the lecture's data split, initialisation and
SGD schedule; then batchnorm calibration, the split losses, and samples. The second half
writes the loop by hand, to show what the engine backend does at each step.
"""

import sys

import torch

import tensorgraph as tg
from tensorgraph.makemore import MLP, TrainConfig, forward, load_splits, train

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
splits = load_splits()  # names.txt, the lecture's random.seed(42) shuffle, 80/10/10
print(f"{len(splits.vocab)} characters, {splits.train[0].shape[0]:,} training examples")

# 1. the library's loop (engine backend: tg.record + graph.backward each step)
result = train(splits, TrainConfig(steps=steps), backend="engine", progress=True)
print(f"train {result.train_loss:.4f}  val {result.val_loss:.4f}  ({result.seconds:.1f} s)")
generator = torch.Generator().manual_seed(result.config.seed + 10)
print(" ".join(result.model.sample(splits.vocab, 10, generator=generator)))

# 2. the same steps written out: record the forward, backpropagate with the engine, update in place
#    (the library's loop records with tg.record(names=False, check_leaves=False): it never looks a
#    gradient up by name, so it skips the name search and the .data guard; the same gradients, faster)
g = torch.Generator().manual_seed(2147483647)
model = MLP.init(len(splits.vocab), generator=g)
Xtr, Ytr = splits.train
for i in range(200):
    ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
    with tg.record() as graph:
        loss = forward(*model.parameters(), Xtr[ix], Ytr[ix])
    grads = graph.backward(loss)  # grads[W1], grads["hprebn"], ...: every recorded tensor's gradient
    lr = result.config.learning_rate(i)  # 0.1, then 0.01 from half-way
    for p in model.parameters():
        p += -lr * grads[p]
print(f"by hand, 200 steps: batch loss {loss.item():.4f}; same as the library's first 200 steps: "
      f"{result.state.losses[199]:.4f}")
