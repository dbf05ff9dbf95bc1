"""The lecture's character-level MLP: embedding, linear, batchnorm, tanh, linear, cross-entropy.

``forward`` is the training forward pass of the lecture's exercise 4, verbatim, and the one
function every backend runs: the engine records it with ``tg.record()``, the torch backend
runs it under autograd, the compiled backend hands it to ``tg.compile``. Its local variable
names become the names of the recorded graph's nodes (``hprebn``, ``bnraw``, ``logits`` ...).

:class:`MLP` holds the parameters (initialised as the lecture does, every draw from a
seeded generator), the batchnorm statistics calibrated over the training set after
training, and the inference-time pieces: evaluation and sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import BLOCK_SIZE, Vocab

PARAMETER_NAMES = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")
BN_EPS = 1e-5


def forward(C, W1, b1, W2, b2, bngain, bnbias, Xb, Yb):
    """The lecture's exercise-4 forward pass: the batch loss, batchnorm using the batch's statistics."""
    emb = C[Xb]  # embed the characters into vectors
    embcat = emb.view(emb.shape[0], -1)  # concatenate the vectors
    # Linear layer
    hprebn = embcat @ W1 + b1  # hidden layer pre-activation
    # BatchNorm layer
    bnmean = hprebn.mean(0, keepdim=True)
    bnvar = hprebn.var(0, keepdim=True, unbiased=True)
    bnvar_inv = (bnvar + 1e-5) ** -0.5
    bnraw = (hprebn - bnmean) * bnvar_inv
    hpreact = bngain * bnraw + bnbias
    # Non-linearity
    h = torch.tanh(hpreact)  # hidden layer
    logits = h @ W2 + b2  # output layer
    loss = F.cross_entropy(logits, Yb)  # loss function
    return loss


@dataclass
class MLP:
    """Parameters of the lecture's MLP, and the batchnorm statistics once calibrated."""

    C: Tensor
    W1: Tensor
    b1: Tensor
    W2: Tensor
    b2: Tensor
    bngain: Tensor
    bnbias: Tensor
    block_size: int = BLOCK_SIZE
    bnmean: Tensor | None = None
    bnvar: Tensor | None = None

    @classmethod
    def init(cls, vocab_size: int, *, block_size: int = BLOCK_SIZE, n_embd: int = 10, n_hidden: int = 200,
             generator: torch.Generator | None = None) -> MLP:
        """The lecture's initialisation, every draw (bngain and bnbias included) from ``generator``."""
        g = generator if generator is not None else torch.Generator().manual_seed(2147483647)
        fan_in = n_embd * block_size
        C = torch.randn((vocab_size, n_embd), generator=g)
        W1 = torch.randn((fan_in, n_hidden), generator=g) * (5 / 3) / (fan_in**0.5)
        b1 = torch.randn(n_hidden, generator=g) * 0.1  # useless with batchnorm, kept as the lecture does
        W2 = torch.randn((n_hidden, vocab_size), generator=g) * 0.1
        b2 = torch.randn(vocab_size, generator=g) * 0.1
        bngain = torch.randn((1, n_hidden), generator=g) * 0.1 + 1.0
        bnbias = torch.randn((1, n_hidden), generator=g) * 0.1
        return cls(C, W1, b1, W2, b2, bngain, bnbias, block_size)

    @property
    def vocab_size(self) -> int:
        return self.C.shape[0]

    @property
    def n_embd(self) -> int:
        return self.C.shape[1]

    @property
    def n_hidden(self) -> int:
        return self.W1.shape[1]

    def parameters(self) -> list[Tensor]:
        """The trained tensors, in the lecture's order: C, W1, b1, W2, b2, bngain, bnbias."""
        return [getattr(self, name) for name in PARAMETER_NAMES]

    def named_parameters(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in PARAMETER_NAMES}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def is_finite(self) -> bool:
        """Whether every parameter (and calibrated statistic) is free of nan and inf."""
        tensors = [*self.parameters(), *(t for t in (self.bnmean, self.bnvar) if t is not None)]
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def loss(self, Xb: Tensor, Yb: Tensor) -> Tensor:
        """The training loss of one batch (batchnorm with the batch's own statistics)."""
        return forward(*self.parameters(), Xb, Yb)

    @torch.no_grad()
    def calibrate(self, X: Tensor, Y: Tensor | None = None) -> float | None:
        """Batchnorm's mean and variance over all of ``X`` (the training set), as the lecture does after training.

        With the targets ``Y``, also the loss on ``X`` with those statistics (one pass instead of two).
        """
        hpreact = self._hprebn(X)
        self.bnmean = hpreact.mean(0, keepdim=True)
        self.bnvar = hpreact.var(0, keepdim=True, unbiased=True)
        return None if Y is None else F.cross_entropy(self._head(hpreact), Y).item()

    @torch.no_grad()
    def logits(self, X: Tensor) -> Tensor:
        """Inference: batchnorm with the calibrated statistics (call :meth:`calibrate` first)."""
        if self.bnmean is None or self.bnvar is None:
            raise ValueError("the batchnorm statistics are not calibrated: call model.calibrate(Xtr) first")
        return self._head(self._hprebn(X))

    def _head(self, hpreact: Tensor) -> Tensor:
        hpreact = self.bngain * (hpreact - self.bnmean) * (self.bnvar + BN_EPS) ** -0.5 + self.bnbias
        h = torch.tanh(hpreact)
        return h @ self.W2 + self.b2

    @torch.no_grad()
    def evaluate(self, X: Tensor, Y: Tensor) -> float:
        """The mean cross-entropy over a whole split, with the calibrated batchnorm statistics."""
        if X.shape[0] == 0:
            raise ValueError("cannot evaluate an empty split")
        return F.cross_entropy(self.logits(X), Y).item()

    @torch.no_grad()
    def sample(self, vocab: Vocab, n: int = 20, *, generator: torch.Generator | None = None,
               max_length: int = 100) -> list[str]:
        """``n`` words, one character at a time until '.', as the lecture samples (at most ``max_length``)."""
        g = generator if generator is not None else torch.Generator().manual_seed(2147483647 + 10)
        words = []
        for _ in range(n):
            out: list[int] = []
            context = [0] * self.block_size
            while len(out) < max_length:
                probs = F.softmax(self.logits(torch.tensor([context])), dim=1)
                ix = torch.multinomial(probs, num_samples=1, generator=g).item()
                context = context[1:] + [ix]
                if ix == 0:
                    break
                out.append(ix)
            words.append(vocab.decode(out))
        return words

    def _hprebn(self, X: Tensor) -> Tensor:
        emb = self.C[X]
        embcat = emb.view(emb.shape[0], -1)
        return embcat @ self.W1 + self.b1
