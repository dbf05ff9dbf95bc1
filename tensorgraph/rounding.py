"""How far float rounding alone can move a gradient: the allowance that ``graph.check`` and ``graph.compare`` share.

Two float computations of the same gradient (a learner's line and the rule, the engine and
torch autograd) differ by rounding. Where the terms behind an element do not cancel,
allclose's ``rtol`` covers that; where terms of size ~0.1 cancel to ~0 (``db1`` behind
batchnorm, a batch-norm input at batch size 2), the noise is ~eps * 0.1, far above ``atol``.
The allowance scales with what was summed to produce an element, not with its value: the
backward pass run on absolute values (a running error bound), times ``ROUNDING_ULPS * eps``,
less the share of the element's own size that ``rtol`` already covers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .engine import call_rule, input_gradients, rule_inputs
from .ops import OPS
from .rules import _reduction, _softmax_dim, cross_entropy_parts

if TYPE_CHECKING:
    from .graph import Graph

# allclose tolerances by dtype: float32 is the lecture's cmp (torch.allclose's defaults); the dtypes that
# get a rounding allowance
TOLERANCES = {torch.float64: (1e-7, 1e-10), torch.float32: (1e-5, 1e-8), torch.float16: (1e-3, 1e-5),
              torch.bfloat16: (1e-2, 1e-4)}
# ops whose rule sums products of the gradient with an input (a contraction): their magnitude pass
# runs the rule on the inputs' absolute values, so that the terms cannot cancel there either
_CONTRACTIONS = frozenset({"matmul", "linear", "addmm", "inner", "outer", "einsum", "tensordot", "addmv", "addr",
                           "bilinear"})
# the rounding allowance, in units of the dtype's eps times the summed magnitude that cancelled (see
# rounding_noise, cancelled). Measured on the lecture's network: correct alternative formulas give no
# false alarm already at 1, nor do the atomic, fused and float64-cast answers at 4 (batch 4 to 128, widths
# 64 and 200, many seeds); exercise 3's one-liner without its eps (a ~1e-5 relative slip) passed at 16
# where the lecture's allclose rejects it, and is caught wherever allclose catches it at 8 and below
ROUNDING_ULPS = 4


def rounding_noise(graph: Graph, root: int, gradients: dict[int, Tensor],
                   restarts: dict[int, Tensor] | None = None) -> dict[int, Tensor]:
    """Per gradient element, how far float rounding alone can move it: ``ROUNDING_ULPS * eps * magnitude``.

    ``gradients``: the right gradients by node (the loss's is the seed). With ``restarts``
    (absolute values of other gradients, by node: a learner's), the sums start again from
    those values: what rounding can add since them.
    """
    noise = {}
    for node, magnitude in _magnitudes(graph, root, gradients, restarts or {}).items():
        if magnitude.is_floating_point() and magnitude.dtype in TOLERANCES:
            magnitude = torch.where(torch.isfinite(magnitude), magnitude, 0)  # no allowance from an inf
            noise[node] = magnitude * (ROUNDING_ULPS * torch.finfo(magnitude.dtype).eps)
    return noise


def cancelled(noise: Tensor | float, reference: Tensor) -> Tensor | float:
    """The rounding allowance of the mass that cancelled: ``noise`` less its share of ``|reference|``.

    Where the terms behind an element do not cancel (magnitude ~ |value|), allclose's rtol
    already covers their rounding, and a uniform relative slip (a forgotten eps) must show
    as it does with allclose; only the mass that cancelled away carries rounding noise above it.
    """
    if not isinstance(noise, Tensor):
        return noise
    share = reference.abs().to(noise.dtype) * (ROUNDING_ULPS * torch.finfo(noise.dtype).eps)
    return (noise - share).clamp(min=0)


def close(a: Tensor, b: Tensor, noise: Tensor | float | None, rtol: float, atol: float) -> Tensor:
    """Per element: ``a`` is within allclose of ``b``, or within ``noise``'s allowance of what cancelled in ``b``."""
    within = torch.isclose(a, b, rtol=rtol, atol=atol)
    if noise is not None:
        within |= (a - b).abs() <= cancelled(noise, b)
    return within


def sum_to(grad: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``grad`` summed over its broadcast dimensions (or reshaped, same size) to ``shape``."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    try:
        return grad.sum_to_size(shape)
    except RuntimeError:
        if grad.numel() == math.prod(shape):
            return grad.reshape(shape)
        raise


def _magnitudes(graph: Graph, root: int, gradients: dict[int, Tensor],
                restarts: dict[int, Tensor]) -> dict[int, Tensor]:
    """The backward pass on absolute values: per element, the sum of the sizes of the terms behind it.

    Each rule runs on the consumer's magnitude (nonnegative), its result is taken in absolute
    value and broadcast-undone by summing, so nothing cancels: a running error bound's
    ``|J|^T |g|``. Contractions (matmul ...) run on their inputs' absolute values; fused kernels
    that subtract inside (the norms, softmax) have their own absolute evaluation (``_FUSED``).
    A node in ``restarts`` sends its restart value on instead of what was summed into it.
    """
    nodes = graph._nodes
    magnitudes = {root: gradients[root].abs()}
    for node in range(root, -1, -1):
        magnitude = magnitudes.get(node)
        data = nodes[node]
        if magnitude is None or data["kind"] != "op" or not data["inputs"]:
            continue
        try:
            grads = _magnitude_rule(graph, node, restarts.get(node, magnitude))
            pairs = list(input_gradients(data, grads))
        except Exception:  # noqa: BLE001 - no allowance beyond allclose's where a rule cannot run on magnitudes
            continue
        for source, grad in pairs:
            if source not in gradients or not isinstance(grad, Tensor) or not grad.is_floating_point():
                continue
            target = nodes[source]
            try:
                part = sum_to(grad.abs(), target["shape"]).to(target["dtype"])
            except RuntimeError:
                continue
            magnitudes[source] = magnitudes[source] + part if source in magnitudes else part
    return magnitudes


def _magnitude_rule(graph: Graph, node: int, magnitude: Tensor) -> Any:
    data = graph._nodes[node]
    fused = _FUSED.get(data["op"]) if data.get("rule") is None else None  # (a node's own rule: as it is)
    if fused is not None:
        args, kwargs = rule_inputs(data, graph._nodes)
        return fused(magnitude, data["value"], *args, **kwargs)
    rule = data.get("rule") or getattr(OPS.get(data["op"]), "rule", None)
    if data["op"] not in _CONTRACTIONS or rule is None:
        return call_rule(graph, node, magnitude)
    args, kwargs = rule_inputs(data, graph._nodes)
    args = tuple(_absolute(a) for a in args)
    out = data["result"] if data["output_index"] is not None else data["value"]
    return rule(magnitude, out, *args, **kwargs)


def _absolute(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.abs()
    if isinstance(value, (tuple, list)):
        return type(value)(_absolute(v) for v in value)
    return value


# ---------------------------------------------------------------- fused kernels that subtract inside
#
# Run on a magnitude, the rule of a fused kernel can cancel inside it: batch norm's input gradient
# w r (g - mean(g) - x̂ mean(g x̂)) is exactly 0 for any g at batch size 2 (x̂ = ±1), where the engine's and
# torch's values are rounding noise of size eps * w r |g|. These are the kernels' absolute evaluations:
# the same formula with every operand's absolute value and every difference a sum, so nothing cancels.
# Each takes the rule's arguments and returns its gradients in the same places.


def _wide(t: Tensor) -> Tensor:
    """Half-precision values in float32 (the statistics of a magnitude need no more)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _per_channel(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A per-channel tensor (size C) laid along ``x``'s dimension 1."""
    return None if t is None else _wide(t).view([1, -1] + [1] * (x.dim() - 2))


def _normalized(g: Tensor, x: Tensor, weight: Tensor | None, dims: tuple[int, ...], eps: float,
                stats: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The magnitude of a normalisation's input gradient, and ``ξ``, the size of ``x̂``'s own rounding (in eps).

    ``dx = w r (g - mean(g) - x̂ mean(g x̂))``, ``x̂ = (x - mean(x)) r``, the means over ``dims``. ``x̂`` is
    rounded by ~eps ``ξ = (|x| + mean|x|) r``, far above ``|x̂|`` where the batch's values sit close together
    (``x - mean(x)`` cancels), and each side recomputes it its own way: the product ``x̂ mean(g x̂)`` is
    counted to first order, ``|x̂| mean(|g| ξ) + ξ mean(|g x̂|)``. With ``stats`` (running mean and variance,
    laid out like ``x``), ``dx = w r g`` and ``ξ = (|x| + |mean|) r``.
    """
    g, x = _wide(g), _wide(x)
    g = g * weight.abs() if weight is not None else g
    if stats is not None:
        mean, var = stats
        r = (var + eps).rsqrt()
        return g * r, (x.abs() + mean.abs()) * r
    def average(t: Tensor) -> Tensor:
        return t.mean(dims, keepdim=True)

    r = (x.var(dims, correction=0, keepdim=True) + eps).rsqrt()
    size = ((x - average(x)) * r).abs()
    xi = (x.abs() + average(x.abs())) * r
    return r * (g + average(g) + size * average(g * xi) + xi * average(g * size)), xi


def _affine(g: Tensor, xi: Tensor, weight: Tensor | None, bias: Tensor | None,
            dims: tuple[int, ...]) -> tuple[Tensor | None, Tensor | None]:
    """The magnitudes of the weight's and bias's gradients, ``sum |g| ξ`` and ``sum |g|`` over ``dims``."""
    g = _wide(g)
    grad_w = _summed(g * xi, dims) if weight is not None else None
    return grad_w, (_summed(g, dims) if bias is not None else None)


def _summed(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    return t.sum(dims) if dims else t  # (torch's sum over no dimension sums them all)


def _batch_norm(g: Tensor, out: Tensor, x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                momentum: float = 0.1, eps: float = 1e-5) -> tuple:
    dims = (0, *range(2, x.dim()))
    batch = training or running_mean is None
    stats = None if batch else (_per_channel(running_mean, x), _per_channel(running_var, x))
    dx, xi = _normalized(g, x, _per_channel(weight, x), dims, eps, stats)
    return dx, None, None, *_affine(g, xi, weight, bias, dims)


def _instance_norm(g: Tensor, out: Tensor, input: Tensor, running_mean: Tensor | None = None,
                   running_var: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None,
                   use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> tuple:
    dims = tuple(range(2, input.dim()))
    stats = None if use_input_stats else (_per_channel(running_mean, input), _per_channel(running_var, input))
    dx, xi = _normalized(g, input, _per_channel(weight, input), dims, eps, stats)
    return dx, None, None, *_affine(g, xi, weight, bias, (0, *dims))


def _layer_norm(g: Tensor, out: Tensor, x: Tensor, normalized_shape: Any, weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5) -> tuple:
    lead = x.dim() - len(normalized_shape)
    dims = tuple(range(lead, x.dim()))
    dx, xi = _normalized(g, x, None if weight is None else _wide(weight), dims, eps)
    return dx, None, *_affine(g, xi, weight, bias, tuple(range(lead)))


def _group_norm(g: Tensor, out: Tensor, input: Tensor, num_groups: int, weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5) -> tuple:
    grouped = (input.shape[0], num_groups, -1)  # each sample's group of channels, flattened
    weight_laid = None if weight is None else _per_channel(weight, input).expand(input.shape).reshape(grouped)
    dx, xi = _normalized(g.reshape(grouped), input.reshape(grouped), weight_laid, (2,), eps)
    xi = xi.reshape(input.shape)
    return dx.reshape(input.shape), None, *_affine(g, xi, weight, bias, (0, *range(2, input.dim())))


def _rms_norm(g: Tensor, out: Tensor, input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
              eps: float | None = None) -> tuple:
    """``dx = w r g - x r³ mean(w g x)`` with ``r = rsqrt(mean(x²) + eps)``."""
    g, x = _wide(g), _wide(input)
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    r = (x.pow(2).mean(dims, keepdim=True) + eps).rsqrt()
    gw = g * _wide(weight).abs() if weight is not None else g
    dx = gw * r + x.abs() * r.pow(3) * (gw * x.abs()).mean(dims, keepdim=True)
    return dx, None, (g * x.abs() * r if weight is not None else None)


def _softmax(g: Tensor, out: Tensor, x: Tensor, dim: Any = None, dtype: Any = None, *, _stacklevel: int = 3) -> Tensor:
    """``out * (g - sum(g out))`` evaluated as ``out * (g + sum(g out))``."""
    d = _softmax_dim(x, dim)
    g, out = _wide(g), _wide(out)
    return out * (g + (g * out).sum(d, keepdim=True))


def _log_softmax(g: Tensor, out: Tensor, x: Tensor, dim: Any = None, dtype: Any = None, *,
                 _stacklevel: int = 3) -> Tensor:
    """``g - exp(out) sum(g)`` evaluated as ``g + exp(out) sum(g)``."""
    d = _softmax_dim(x, dim)
    g, out = _wide(g), _wide(out)
    return g + out.exp() * g.sum(d, keepdim=True)


def _cross_entropy(g: Tensor, out: Tensor, x: Tensor, target: Tensor, weight: Tensor | None = None,
                   size_average: Any = None, ignore_index: int = -100, reduce: Any = None, reduction: str = "mean",
                   label_smoothing: float = 0.0) -> tuple:
    """log_softmax's backward of the loss's gradient by logp, ``G - softmax(x) sum(G)``, as ``|G| + softmax(x) sum|G|``.

    (``(softmax(x) - onehot) / n`` at a confident target is ``1 - p``: rounding noise of size eps / n.)
    """
    reduction = _reduction(size_average, reduce, reduction)
    logp, grad_logp, grad_target, class_dim = cross_entropy_parts(g, x, target, weight, ignore_index, reduction,
                                                                  label_smoothing)
    grad_logp = _wide(grad_logp).abs()
    return grad_logp + _wide(logp).exp() * grad_logp.sum(class_dim, keepdim=True), grad_target, None


_FUSED = {"batch_norm": _batch_norm, "instance_norm": _instance_norm, "layer_norm": _layer_norm,
          "group_norm": _group_norm, "rms_norm": _rms_norm, "softmax": _softmax, "log_softmax": _log_softmax,
          "cross_entropy": _cross_entropy}


__all__ = ["ROUNDING_ULPS", "TOLERANCES", "cancelled", "close", "rounding_noise", "sum_to"]
