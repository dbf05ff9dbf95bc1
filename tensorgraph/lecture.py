"""The lecture's exercise-1 network and forward pass, verbatim, for demos, the CLI and tests.

"makemore part 4: becoming a backprop ninja" chunks a character-level MLP with batchnorm
into atomic steps so each can be backpropagated by hand. ``forward`` below is that pass,
line for line; ``setup`` builds the parameters and one batch the way the lecture does
(every draw from one seeded generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .graph import Graph
from .makemore.data import load_splits
from .record import record

SEED = 2147483647


@dataclass
class Exercise:
    """Parameters, one batch, and the hyperparameters of the lecture's exercise 1."""

    C: torch.Tensor
    W1: torch.Tensor
    b1: torch.Tensor
    W2: torch.Tensor
    b2: torch.Tensor
    bngain: torch.Tensor
    bnbias: torch.Tensor
    Xb: torch.Tensor
    Yb: torch.Tensor

    @property
    def parameters(self) -> list[torch.Tensor]:
        return [self.C, self.W1, self.b1, self.W2, self.b2, self.bngain, self.bnbias]


def setup(n_embd: int = 10, n_hidden: int = 64, batch_size: int = 32, seed: int = SEED,
          dtype: torch.dtype = torch.float32) -> Exercise:
    """The lecture's initialisation (non-standard on purpose, so no gradient hides behind a zero)."""
    for name, value, least in (("n_embd", n_embd, 1), ("n_hidden", n_hidden, 1), ("batch_size", batch_size, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            # (batch_size 1: the batchnorm's unbiased variance divides by n - 1)
            raise ValueError(f"lecture.setup: {name} must be an integer >= {least}, got {value!r}")
    splits = load_splits()
    vocab_size, block_size = len(splits.vocab), splits.block_size
    g = torch.Generator().manual_seed(seed)
    C = torch.randn((vocab_size, n_embd), generator=g)
    W1 = torch.randn((n_embd * block_size, n_hidden), generator=g) * (5 / 3) / ((n_embd * block_size) ** 0.5)
    b1 = torch.randn(n_hidden, generator=g) * 0.1
    W2 = torch.randn((n_hidden, vocab_size), generator=g) * 0.1
    b2 = torch.randn(vocab_size, generator=g) * 0.1
    bngain = torch.randn((1, n_hidden), generator=g) * 0.1 + 1.0
    bnbias = torch.randn((1, n_hidden), generator=g) * 0.1
    Xtr, Ytr = splits.train
    ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=g)
    params = [t.to(dtype) for t in (C, W1, b1, W2, b2, bngain, bnbias)]
    return Exercise(*params, Xtr[ix], Ytr[ix])


def forward(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb):
    """The lecture's forward pass, "chunkated" into steps that can be backpropagated one at a time."""
    n = Xb.shape[0]
    emb = C[Xb]  # embed the characters into vectors
    embcat = emb.view(emb.shape[0], -1)  # concatenate the vectors
    # Linear layer 1
    hprebn = embcat @ W1 + b1  # hidden layer pre-activation
    # BatchNorm layer
    bnmeani = 1 / n * hprebn.sum(0, keepdim=True)
    bndiff = hprebn - bnmeani
    bndiff2 = bndiff**2
    bnvar = 1 / (n - 1) * (bndiff2).sum(0, keepdim=True)  # note: Bessel's correction (dividing by n-1, not n)
    bnvar_inv = (bnvar + 1e-5) ** -0.5
    bnraw = bndiff * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    # Non-linearity
    h = torch.tanh(hpreact)  # hidden layer
    # Linear layer 2
    logits = h @ W2 + b2  # output layer
    # cross entropy loss (same as F.cross_entropy(logits, Yb))
    logit_maxes = logits.max(1, keepdim=True).values
    norm_logits = logits - logit_maxes  # subtract max for numerical stability
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdims=True)
    counts_sum_inv = counts_sum**-1  # if I use (1.0 / counts_sum) instead then I can't get backprop to be bit exact...  # noqa: E501
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    loss = -logprobs[range(n), Yb].mean()
    return loss


def record_exercise(ex: Exercise | None = None) -> tuple[Graph, torch.Tensor, Exercise]:
    """Record the lecture's forward pass: (graph, loss, exercise)."""
    ex = ex or setup()
    C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb = (ex.C, ex.W1, ex.b1, ex.W2, ex.b2, ex.bngain, ex.bnbias,
                                                 ex.Xb, ex.Yb)
    with record() as graph:
        loss = forward(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb)
    return graph, loss, ex


# the 26 gradients the lecture's exercise 1 asks for, in the order it checks them
LECTURE_ROWS = [
    "logprobs", "probs", "counts_sum_inv", "counts_sum", "counts", "norm_logits", "logit_maxes", "logits",
    "h", "W2", "b2", "hpreact", "bngain", "bnbias", "bnraw", "bnvar_inv", "bnvar", "bndiff2", "bndiff",
    "bnmeani", "hprebn", "embcat", "W1", "b1", "emb", "C",
]
