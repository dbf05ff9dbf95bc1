"""Rules of the engine's table derived by the symbolic layer: ``F.cross_entropy`` and batch norm.

The rule table (:mod:`tensorgraph.rules`) asks here first for ``F.cross_entropy`` with
class-index targets (mean or sum, no weights, no label smoothing, 2-D input) and for
``F.batch_norm`` in training mode. The closed forms are not typed in: each is derived
once per process, with :func:`tensorgraph.symbolic.derive`, from an atomic chain recorded
here (the lecture's cross-entropy lines; batch norm written out with the biased variance,
as ``F.batch_norm`` normalises in training), checked numerically, compiled, and cached.
Any other call returns None and the table's general rule applies.
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Any

import torch
from torch import Tensor

from .derivation import Derivation

# how many times the table took each derived rule (tests read this to see the fused path is used)
CALLS = {"cross_entropy": 0, "batch_norm": 0}


def _isolated(function: Any, *args: Any) -> Any:
    """Run in a fresh thread: torch-function modes are per thread, so a recording that is active
    here (tg.trace records the backward pass) does not see the atomic chain recorded for a derivation."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result()


def _lecture_cross_entropy(logits: Tensor, Yb: Tensor, reduction: str) -> Tensor:
    """The lecture's cross-entropy lines (exercise 1), ending in a mean or a sum."""
    logit_maxes = logits.max(1, keepdim=True).values
    norm_logits = logits - logit_maxes  # subtract max for numerical stability
    counts = norm_logits.exp()
    counts_sum = counts.sum(1, keepdims=True)
    counts_sum_inv = counts_sum**-1
    probs = counts * counts_sum_inv
    logprobs = probs.log()
    picked = logprobs[range(logits.shape[0]), Yb]
    return -picked.mean() if reduction == "mean" else -picked.sum()


def _derive_cross_entropy(reduction: str) -> Derivation:
    from ..record import record
    from .fusion import derive

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64, generator=generator)
    Yb = torch.tensor([0, 3, 1, 2, 3])
    with record() as graph:
        loss = _lecture_cross_entropy(logits, Yb, reduction)
    return derive(graph, output=loss, wrt=logits)


@functools.cache
def cross_entropy_derivation(reduction: str) -> Derivation:
    """The derived d loss / d logits of the lecture's cross-entropy chain (reduction "mean" or "sum")."""
    return _isolated(_derive_cross_entropy, reduction)


def _batch_norm_chain(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Training-mode batch norm written out: batch mean, biased variance, normalise, scale, shift."""
    mean = x.mean(0, keepdim=True)
    diff = x - mean
    var = (diff**2).mean(0, keepdim=True)
    var_inv = (var + eps) ** -0.5
    out = diff * var_inv
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _derive_batch_norm(eps: float, has_weight: bool, has_bias: bool) -> Derivation:
    from ..record import record
    from .fusion import derive

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    weight = torch.randn(3, dtype=torch.float64, generator=generator) if has_weight else None
    bias = torch.randn(3, dtype=torch.float64, generator=generator) if has_bias else None
    with record() as graph:
        out = _batch_norm_chain(x, weight, bias, eps)
    return derive(graph, output=out, wrt=x)


@functools.lru_cache(maxsize=64)
def batch_norm_derivation(eps: float, has_weight: bool, has_bias: bool) -> Derivation:
    """The derived gradients of training-mode batch norm for one eps (and affine or not)."""
    return _isolated(_derive_batch_norm, eps, has_weight, has_bias)


def cross_entropy(g: Tensor, x: Tensor, target: Tensor, weight: Any, ignore_index: int, reduction: str,
                  label_smoothing: float) -> Tensor | None:
    """d F.cross_entropy / d input by the derived closed form, or None when the call is outside its scope."""
    if (x.dim() != 2 or x.shape[0] == 0 or target.is_floating_point() or weight is not None or label_smoothing
            or reduction not in ("mean", "sum")):
        return None
    CALLS["cross_entropy"] += 1
    # Rows whose target is ignore_index take no part: the closed form runs on a safe target, then
    # those rows are zeroed and a mean is rescaled from n rows to the kept ones. No value is read
    # into Python, so the rule stays branch-free (a repeated structure can replay it); when every
    # row is kept, the extra factors are exactly 1 and the result is the closed form's, bit for bit.
    keep = target != ignore_index
    grad = cross_entropy_derivation(reduction).backward(g, x, target.masked_fill(~keep, 0))[0]
    if reduction == "mean":
        # the factor in the gradient's dtype: n / an int64 count would be float32 (torch's promotion). With
        # every row ignored the loss is 0/0 = nan, and torch's gradient is 0: the count is taken as at least 1
        kept = keep.sum().clamp_min(1).to(grad.dtype)
        return grad * (keep.unsqueeze(1) * (x.shape[0] / kept))
    return grad * keep.unsqueeze(1)


def batch_norm(g: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
               ) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """Gradients of training-mode F.batch_norm (input, weight, bias) by the derived closed form.

    Inputs of more than two dimensions are normalised per channel (dimension 1) over all
    the others: they are folded to (N * ..., C), which is the derived 2-D case.
    """
    if x.dim() < 2 or x.shape[0] == 0:
        return None
    CALLS["batch_norm"] += 1
    derivation = batch_norm_derivation(float(eps), weight is not None, bias is not None)
    channels = x.shape[1]
    fold = (lambda t: t.movedim(1, -1).reshape(-1, channels)) if x.dim() > 2 else (lambda t: t)
    args = [fold(x)] + [t for t in (weight, bias) if t is not None]
    grads = list(derivation.backward(fold(g), *args))
    grad_x = grads.pop(0)
    if x.dim() > 2:
        grad_x = grad_x.reshape(x.movedim(1, -1).shape).movedim(-1, 1)
    grad_w = grads.pop(0) if weight is not None else None
    grad_b = grads.pop(0) if bias is not None else None
    return grad_x, grad_w, grad_b
