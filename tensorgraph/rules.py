"""The rule table: one vector-Jacobian product per op, next to the torch calls it covers.

Each rule maps ``(g, out, *inputs)`` to the gradients of the inputs, written with the
same formulas PyTorch's derivatives.yaml uses, so that gradients agree with torch
autograd bit for bit wherever the formula allows. Where torch computes a gradient in a
fused kernel with a single rounding (tanh, sigmoid, softmax, the norms), the rule calls
that same kernel and says so. Broadcast-undo and fan-out sums are the engine's job.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import UnsupportedCall, constants, defop, once_per_pass

# The aten kernels the rules call. A traced backward graph records them, so a loaded graph file
# may name them (tensorgraph.serialize); they are the only torch.ops it may run, since aten also
# holds ops that touch files (from_file). A rule calling a kernel not listed fails at once.
KERNELS = frozenset({
    "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward", "_ctc_loss", "_ctc_loss_backward",
    "_embedding_bag", "_embedding_bag_backward", "_embedding_bag_per_sample_weights_backward",
    "fractional_max_pool2d", "fractional_max_pool2d_backward", "fractional_max_pool3d",
    "fractional_max_pool3d_backward",
    "adaptive_max_pool3d", "adaptive_max_pool3d_backward",
    "_log_softmax_backward_data",
    "_softmax_backward_data", "_upsample_nearest_exact1d_backward", "_upsample_nearest_exact2d_backward",
    "_upsample_nearest_exact3d_backward", "adaptive_max_pool2d", "adaptive_max_pool2d_backward", "avg_pool2d_backward",
    "avg_pool3d_backward", "convolution_backward", "elu_backward", "gelu_backward", "glu_backward",
    "grid_sampler_2d_backward", "grid_sampler_3d_backward",
    "hardshrink_backward", "hardsigmoid_backward", "hardswish_backward", "hardtanh_backward", "huber_loss",
    "huber_loss_backward", "leaky_relu_backward", "log_sigmoid_backward", "log_sigmoid_forward", "logit_backward",
    "max_pool2d_with_indices", "max_pool2d_with_indices_backward", "max_pool3d_with_indices",
    "max_pool3d_with_indices_backward", "mish_backward", "multi_margin_loss_backward",
    "multilabel_margin_loss_backward", "multilabel_margin_loss_forward", "native_batch_norm",
    "native_batch_norm_backward", "native_group_norm", "native_group_norm_backward", "native_layer_norm",
    "native_layer_norm_backward", "sigmoid_backward", "silu_backward", "smooth_l1_loss_backward",
    "soft_margin_loss_backward", "softplus_backward", "softshrink_backward", "tanh_backward", "threshold_backward",
    "upsample_bicubic2d_backward", "upsample_bilinear2d_backward", "upsample_linear1d_backward",
    "upsample_nearest1d_backward", "upsample_nearest2d_backward", "upsample_nearest3d_backward",
    "upsample_trilinear3d_backward", "_weight_norm_interface_backward", "_upsample_bilinear2d_aa_backward",
    "_upsample_bicubic2d_aa_backward",
})
aten = SimpleNamespace(**{name: getattr(torch.ops.aten, name) for name in sorted(KERNELS)})


# ---------------------------------------------------------------- helpers


def _dims(dim: Any, ndim: int) -> tuple[int, ...]:
    """Reduced dimensions as sorted non-negative ints; None or () means all."""
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return tuple(range(ndim))
    if isinstance(dim, int):
        dim = (dim,)
    return tuple(sorted(d % max(ndim, 1) for d in dim))


def _unreduce(g: Tensor, x: Tensor, dim: Any, keepdim: bool) -> Tensor:
    """Put back the dimensions a reduction removed, so ``g`` broadcasts against ``x``."""
    if keepdim or x.dim() == 0:
        return g
    dims = _dims(dim, x.dim())
    if len(dims) == x.dim():
        return g.reshape((1,) * x.dim())
    for d in dims:
        g = g.unsqueeze(d)
    return g


def _count(x: Tensor, dim: Any) -> int:
    return math.prod(x.shape[d] for d in _dims(dim, x.dim())) if x.dim() else 1


def _place(g: Tensor, x: Tensor, select) -> Tensor:
    """Gradient of any element selection ``select(x)``: scatter ``g`` back to where each element came from.

    Pushing ``arange(numel)`` through the same selection tells each output element's
    source position; ``index_add_`` accumulates duplicates.
    """
    positions = select(torch.arange(x.numel(), device=x.device).view(x.shape))
    flat = torch.zeros(x.numel(), dtype=g.dtype, device=g.device)
    return flat.index_add_(0, positions.reshape(-1), g.reshape(-1)).view(x.shape)


def _shape_arg(args: Sequence[Any]) -> Sequence[int]:
    """``view(2, 3)`` and ``view((2, 3))`` both mean shape (2, 3)."""
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return args[0]
    return args


def _zeros_like_grad(g: Tensor, out: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return torch.zeros_like(x)


def _reshape_back(g: Tensor, out: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return g.reshape(x.shape)


def _same(g: Tensor, out: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return g


def _as_input(g: Tensor, out: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return g.to(dtype=x.dtype, device=x.device)


def _symbolic(name: str, *args: Any) -> Any:
    """The rule tensorgraph.symbolic derives for this call (see its fused_rules), or None outside its scope."""
    from .symbolic import fused_rules

    return getattr(fused_rules, name)(*args)


def _reduction(size_average: Any, reduce: Any, reduction: str) -> str:
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    return "none" if not reduce else ("mean" if size_average else "sum")


def _scale_loss(g: Tensor, per_element: Tensor, reduction: str, denom: Any, batch_dim: int | None) -> Tensor:
    """Multiply d(loss_n)/d(input) by the incoming gradient under each reduction."""
    if reduction == "none":
        return per_element * (g.unsqueeze(batch_dim) if batch_dim is not None else g)
    if reduction == "sum":
        return per_element * g
    return per_element * (g / denom)


def _expanded(x: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """Both operands at their common shape and dtype, as torch broadcasts and promotes them for a fused kernel.

    The engine sums each gradient back to its input's shape and casts it to its dtype. ``expand``, not
    ``torch.broadcast_tensors``: the traced backward records it, so backward_source can print it.
    """
    shape, dtype = torch.broadcast_shapes(x.shape, other.shape), torch.result_type(x, other)
    return tuple((t if t.shape == shape else t.expand(shape)).to(dtype) for t in (x, other))


# ---------------------------------------------------------------- elementwise, one input

defop("neg", lambda g, out, x: -g, funcs=("torch.negative", "Tensor.negative"))
defop("abs", lambda g, out, x: g * x.sgn(), funcs=("torch.absolute", "Tensor.absolute"))
defop("exp", lambda g, out, x: g * out)
defop("log", lambda g, out, x: g / x)
defop("log2", lambda g, out, x: g / (x * math.log(2.0)))
defop("log10", lambda g, out, x: g / (x * math.log(10.0)))
defop("log1p", lambda g, out, x: g / (x + 1), funcs=("special.log1p",))
defop("expm1", lambda g, out, x: g * (out + 1), funcs=("special.expm1",))
defop("sqrt", lambda g, out, x: g / (2 * out))
defop("rsqrt", lambda g, out, x: -0.5 * g * out.pow(3))
defop("reciprocal", lambda g, out, x: -g * (out * out))
defop("sin", lambda g, out, x: g * x.cos())
defop("cos", lambda g, out, x: g * -x.sin())
# the trigonometric and hyperbolic family, with derivatives.yaml's formulas
defop("tan", lambda g, out, x: g * (1 + out.pow(2)))
defop("asin", lambda g, out, x: g * (-x * x + 1).rsqrt(), funcs=("torch.arcsin", "Tensor.arcsin"),
      inplace=("Tensor.arcsin_",))
defop("acos", lambda g, out, x: g * -((-x * x + 1).rsqrt()), funcs=("torch.arccos", "Tensor.arccos"),
      inplace=("Tensor.arccos_",))
defop("atan", lambda g, out, x: g / (x * x + 1), funcs=("torch.arctan", "Tensor.arctan"), inplace=("Tensor.arctan_",))
defop("sinh", lambda g, out, x: g * x.cosh())
defop("cosh", lambda g, out, x: g * x.sinh())
defop("asinh", lambda g, out, x: g * (x.pow(2) + 1).rsqrt(), funcs=("torch.arcsinh", "Tensor.arcsinh"),
      inplace=("Tensor.arcsinh_",))
defop("acosh", lambda g, out, x: g * (x.pow(2) - 1).rsqrt(), funcs=("torch.arccosh", "Tensor.arccosh"),
      inplace=("Tensor.arccosh_",))
defop("atanh", lambda g, out, x: g * 1 / (1 - x.pow(2)), funcs=("torch.arctanh", "Tensor.arctanh"),
      inplace=("Tensor.arctanh_",))
defop("erf", lambda g, out, x: 2.0 / math.sqrt(math.pi) * torch.exp(-(x.pow(2))) * g, funcs=("special.erf",))
# NOTE: torch's tanh/sigmoid backward kernels round g*(1-y*y) once; the same kernels keep us bit-exact.
defop("tanh", lambda g, out, x: aten.tanh_backward(g, out))  # g * (1 - out**2)
defop("sigmoid", lambda g, out, x: aten.sigmoid_backward(g, out), funcs=("special.expit",))  # g * out * (1 - out)
defop("relu", lambda g, out, x: aten.threshold_backward(g, out, 0))  # g where out > 0, and where out is NaN
defop("gelu", lambda g, out, x, approximate="none": aten.gelu_backward(g, x, approximate=approximate))
defop("silu", lambda g, out, x: aten.silu_backward(g, x))
defop(
    "softplus",
    lambda g, out, x, beta=1.0, threshold=20.0: aten.softplus_backward(g, x, beta, threshold),
)
defop(
    "leaky_relu",
    lambda g, out, x, negative_slope=0.01: aten.leaky_relu_backward(g, out, negative_slope, True),
)
defop(
    "elu",
    lambda g, out, x, alpha=1.0: aten.elu_backward(g, alpha, 1.0, 1.0, True, out),
)
# NOTE: hardtanh passes the gradient strictly inside (min_val, max_val): none at the bounds, as torch gives
defop("hardtanh", lambda g, out, x, min_val=-1.0, max_val=1.0: aten.hardtanh_backward(g, x, min_val, max_val))
defop("relu6", lambda g, out, x: aten.hardtanh_backward(g, x, 0.0, 6.0))  # torch's relu6 is hardtanh(x, 0, 6)
defop("mish", lambda g, out, x: aten.mish_backward(g, x))
defop("hardswish", lambda g, out, x: aten.hardswish_backward(g, x))
defop("hardsigmoid", lambda g, out, x: aten.hardsigmoid_backward(g, x))
# piecewise-constant functions: zero gradient, as torch gives
for _name in ("sign", "sgn", "floor", "ceil", "round", "trunc", "fix"):
    defop(_name, _zeros_like_grad, funcs=("special.round",) if _name == "round" else ())
defop("angle", _zeros_like_grad)  # of a real tensor: 0 or pi, piecewise constant


def _torch_gradient(f: Callable[..., Tensor], *values: float) -> list[float]:
    """torch autograd's gradient of ``f`` at a point (float64 scalars): how the installed torch takes a kink."""
    inputs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    with torch.enable_grad():
        return [grad.item() for grad in torch.autograd.grad(f(*inputs), inputs)]


# torch 2.14 changed how clamp is differentiated at its bounds, and with it every composite built on clamp_min (the
# margin losses, F.normalize), and gave fmax/fmin maximum's rule; the rules follow the installed torch, asked once:
# a scalar bound: up to 2.13 the gradient passes at it (x >= min), from 2.14 strictly inside only (x > min)
CLAMP_PASSES_AT_BOUND = _torch_gradient(lambda x: x.clamp(min=0.0), 0.0)[0] == 1.0
# a tensor bound equal to the input: up to 2.13 the input takes the gradient, from 2.14 the two share it
CLAMP_SHARES_TIES = _torch_gradient(lambda x, bound: x.clamp(min=bound), 0.0, 0.0)[0] == 0.5
# fmax/fmin: up to 2.13 a tie goes to the first input and a NaN's gradient to the other; from 2.14 as maximum's
FMAX_AS_MAXIMUM = _torch_gradient(torch.fmax, 1.0, 1.0)[0] == 0.5


def clamp_passes(x: Tensor, bound: Any) -> Tensor:
    """Where a clamp below at ``bound`` passes the gradient to ``x`` (scalar bounds): at the bound too, or not."""
    return x >= bound if CLAMP_PASSES_AT_BOUND else x > bound


def clamp(g: Tensor, out: Tensor, x: Tensor, min: Any = None, max: Any = None) -> tuple:
    """Gradient passes where the input lies within [min, max] (at a bound too up to torch 2.13: ties go to the input,
    as in torch; torch 2.14 passes it strictly inside, and shares it with a tensor bound equal to the input)."""
    if CLAMP_SHARES_TIES and (isinstance(min, Tensor) or isinstance(max, Tensor)):
        return _clamp_sharing_ties(g, x, min, max)
    keep = torch.ones_like(x, dtype=torch.bool)
    if min is not None:
        keep = keep & clamp_passes(x, min)
    if max is not None:
        keep = keep & clamp_passes(-x, -max)
    # torch: with both bounds, min > max makes the output max: max takes the gradient, min none
    grad_min = grad_max = None
    if isinstance(min, Tensor):
        grad_min = g * ((x < min) & (min < max) if max is not None else (x < min))
    if isinstance(max, Tensor):
        grad_max = g * ((x > max) | (max < min) if min is not None else (x > max))
    return g * keep, grad_min, grad_max


def _clamp_sharing_ties(g: Tensor, x: Tensor, min: Any, max: Any) -> tuple:
    """torch 2.14's clamp with a tensor bound: inside (min, max) the input takes the gradient, below min or above max
    the bound does; a bound equal to the input shares it half and half, unless both bounds equal it (then the input
    takes it); with min > max the output is max, which takes it all."""
    none = torch.zeros_like(x, dtype=torch.bool)
    below, at_min = (x < min, x == min) if min is not None else (none, none)
    above, at_max = (x > max, x == max) if max is not None else (none, none)
    inverted = (min > max) if min is not None and max is not None else none
    half = g / 2
    grad_x = torch.where(inverted | below | above, 0.0, torch.where(at_min ^ at_max, half, g))
    grad_min = grad_max = None
    if isinstance(min, Tensor):
        grad_min = torch.where(inverted, 0.0, torch.where(below, g, torch.where(at_min & ~at_max, half, 0.0)))
    if isinstance(max, Tensor):
        grad_max = torch.where(inverted | above, g, torch.where(at_max & ~at_min, half, 0.0))
    return grad_x, grad_min, grad_max


defop("clamp", clamp, funcs=("torch.clip", "Tensor.clip"), inplace=("Tensor.clip_",))
defop("clamp_min", lambda g, out, x, min: clamp(g, out, x, min, None)[:2])
defop("clamp_max", lambda g, out, x, max: clamp(g, out, x, None, max)[::2])  # (the input's, max's)

# activations and special functions, with derivatives.yaml's formulas or torch's own backward kernels
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
defop("log_sigmoid", lambda g, out, x: aten.log_sigmoid_backward(g, x, aten.log_sigmoid_forward(x)[1]),
      funcs=("F.logsigmoid",))
defop("selu", lambda g, out, x: aten.elu_backward(g, _SELU_ALPHA, _SELU_SCALE, 1.0, False, x))  # selu is a scaled elu
defop("celu", lambda g, out, x, alpha=1.0: aten.elu_backward(g, alpha, 1.0, 1.0 / alpha, False, x))
defop("softsign", lambda g, out, x: g / (x.abs() + 1).square())
defop("tanhshrink", lambda g, out, x: g - aten.tanh_backward(g, x.tanh()))  # x - tanh(x)
defop("hardshrink", lambda g, out, x, lambd=0.5: aten.hardshrink_backward(g, x, lambd))
defop("softshrink", lambda g, out, x, lambd=0.5: aten.softshrink_backward(g, x, lambd))
defop("threshold", lambda g, out, x, threshold, value: aten.threshold_backward(g, x, threshold))
defop("glu", lambda g, out, x, dim=-1: aten.glu_backward(g, x, dim))
defop("logit", lambda g, out, x, eps=None: aten.logit_backward(g, x, eps), funcs=("special.logit",))


def rrelu(g: Tensor, out: Tensor, x: Tensor, lower: float = 1.0 / 8, upper: float = 1.0 / 3, training: bool = False,
          inplace: bool = False) -> Tensor:
    """In evaluation mode a leaky relu with the mean slope; training draws a random slope per element."""
    if training:
        raise UnsupportedCall("rrelu: training=True draws random slopes inside the kernel; it has no rule")
    return aten.leaky_relu_backward(g, x, (lower + upper) / 2, False)


def prelu(g: Tensor, out: Tensor, x: Tensor, weight: Tensor) -> tuple:
    """One slope per channel (dim 1), or one for all: g where x > 0, else the slope's share (torch's kernel)."""
    shape = [1] * x.dim()
    if x.dim() >= 2:
        shape[1] = weight.numel()
    w = weight.reshape(shape) if x.dim() else weight.reshape(())
    positive = x > 0
    grad_w = torch.where(positive, 0.0, g * x).sum_to_size(w.shape).reshape(weight.shape)
    return torch.where(positive, g, g * w), grad_w


defop("rrelu", rrelu)
defop("prelu", prelu)
defop("erfc", lambda g, out, x: -2.0 / math.sqrt(math.pi) * torch.exp(-(x.pow(2))) * g, funcs=("special.erfc",))
defop("special_erfcx", lambda g, out, x: g * (2 * x * out - 2.0 / math.sqrt(math.pi)), auto=False,
      funcs=("special.erfcx",))  # exp(x**2) erfc(x)
defop("erfinv", lambda g, out, x: 0.5 * math.sqrt(math.pi) * torch.exp(out.pow(2)) * g, funcs=("special.erfinv",))
defop("lgamma", lambda g, out, x: g * torch.digamma(x), funcs=("special.gammaln",))
defop("digamma", lambda g, out, x: g * torch.polygamma(1, x), funcs=("special.digamma", "special.psi"))


def polygamma(g: Tensor, out: Tensor, n: Any, x: Any) -> tuple:
    """d/dx polygamma(n, x) = polygamma(n + 1, x); the method form ``x.polygamma(n)`` puts the tensor first."""
    if isinstance(n, Tensor):
        return g * torch.polygamma(x + 1, n), None
    return None, g * torch.polygamma(n + 1, x)


defop("polygamma", polygamma, funcs=("special.polygamma",))


def mvlgamma(g: Tensor, out: Tensor, x: Tensor, p: int) -> Tensor:
    """d/dx of sum_i lgamma(x - i/2) (plus a constant): the digammas of the same arguments."""
    shifts = torch.arange(-p / 2 + 0.5, 0.5, 0.5, dtype=x.dtype, device=x.device)
    return g * (x.unsqueeze(-1) + shifts).digamma().sum(-1)


defop("mvlgamma", mvlgamma, funcs=("special.multigammaln",))
defop("exp2", lambda g, out, x: g * out * math.log(2.0), funcs=("special.exp2",))
# frexp: (mantissa, exponent), x = mantissa * 2**exponent; the integer exponent takes no gradient
defop("frexp", lambda g, out, x, *, output_index=0: g * torch.exp2(-out[1].to(g.dtype)), multi=True)


def ldexp(g: Tensor, out: Tensor, x: Tensor, other: Tensor) -> tuple:
    """x * 2**other (torch's composite: mul and pow); a floating-point exponent takes g * out * log(2)."""
    grad_other = g * out * math.log(2.0) if other.is_floating_point() else None
    return g * torch.pow(2.0, other), grad_other


defop("ldexp", ldexp)
defop("deg2rad", lambda g, out, x: g * (math.pi / 180))
defop("rad2deg", lambda g, out, x: g * (180 / math.pi))
defop("frac", _same)  # x - trunc(x)
defop("nan_to_num", lambda g, out, x, nan=0.0, posinf=None, neginf=None: g * x.isfinite())  # replaced: no gradient


def sinc(g: Tensor, out: Tensor, x: Tensor) -> Tensor:
    """(pi x cos(pi x) - sin(pi x)) / (pi x**2); NOTE: 0 at x == 0, as torch gives (the limit)."""
    px = x * math.pi
    return (g * ((px * px.cos() - px.sin()) / (px * x))).masked_fill(x == 0, 0)


defop("sinc", sinc, funcs=("special.sinc",))
# The regularized incomplete gamma functions P(a, x) and Q(a, x) = 1 - P(a, x), and Hurwitz's zeta(s, q): only x
# and q take a gradient. NOTE: as torch, which refuses to differentiate a and s (it has no formula for them).


def _gamma_density(a: Tensor, x: Tensor) -> Tensor:
    """d P(a, x) / dx = x**(a - 1) exp(-x) / Gamma(a)."""
    return torch.exp((a - 1) * torch.log(x) - x - torch.lgamma(a))


# (a's and s's derivatives torch does not define: underived, see ops.Op)
defop("igamma", lambda g, out, x, other: (None, g * _gamma_density(x, other)), funcs=("special.gammainc",),
      underived=(0,))
defop("igammac", lambda g, out, x, other: (None, -g * _gamma_density(x, other)), funcs=("special.gammaincc",),
      underived=(0,))
defop("special_zeta", lambda g, out, x, other: (None, g * -x * torch.special.zeta(x + 1.0, other) if isinstance(
    other, Tensor) else None), auto=False, funcs=("special.zeta",), underived=(0,))
# the normal distribution's cdf, its log and its inverse
defop("special_ndtr", lambda g, out, x: g * (x.pow(2) * -0.5).exp() / math.sqrt(2 * math.pi), auto=False,
      funcs=("special.ndtr",))
defop("special_log_ndtr", lambda g, out, x: g / math.sqrt(2 * math.pi) * (out + x.pow(2) / 2).neg().exp(),
      auto=False, funcs=("special.log_ndtr",))
defop("special_ndtri", lambda g, out, x: g * math.sqrt(2 * math.pi) * (out.square() / 2).exp(), auto=False,
      funcs=("special.ndtri",))
# modified Bessel functions of the first kind (and their exponentially scaled forms)
defop("i0", lambda g, out, x: g * torch.special.i1(x), funcs=("special.i0",))
defop("special_i0e", lambda g, out, x: g * (torch.special.i1e(x) - x.sgn() * out), auto=False, funcs=("special.i0e",))
# NOTE: i1'(0) = 1/2 (the limit of i0(x) - i1(x)/x), as torch gives
defop("special_i1", lambda g, out, x: g * torch.where(x == 0, 0.5, torch.special.i0(x) - out / x), auto=False,
      funcs=("special.i1",))
defop("special_i1e", lambda g, out, x: g * torch.where(x == 0, 0.5, torch.special.i0e(x) - out * (x.sgn() + 1 / x)),
      auto=False, funcs=("special.i1e",))

# ---------------------------------------------------------------- elementwise, two inputs

defop("add", lambda g, out, x, other, *, alpha=1: (g, g if alpha == 1 else g * alpha))
defop(
    "sub",
    lambda g, out, x, other, *, alpha=1: (g, -g if alpha == 1 else -g * alpha),
    funcs=("torch.subtract", "Tensor.subtract"),
)
# `torch.rsub(x, y)` is y - x
defop("rsub", lambda g, out, x, other, *, alpha=1: (-g if alpha == 1 else -g * alpha, g), auto=False,
      funcs=("torch.rsub",))
defop("mul", lambda g, out, x, other: (g * other, g * x if isinstance(other, Tensor) else None),
      funcs=("torch.multiply", "Tensor.multiply"))


def rdiv(g: Tensor, out: Tensor, x: Tensor, other: Any) -> tuple:
    """``other / x``: torch evaluates it as ``x.reciprocal() * other``, and so do we."""
    r = x.reciprocal()
    return -(g * other) * (r * r), None


defop("rdiv", rdiv, auto=False, funcs=("Tensor.__rdiv__", "Tensor.__rtruediv__"))


def div(g: Tensor, out: Tensor, x: Any, other: Any, *, rounding_mode: str | None = None) -> tuple:
    """d(x/y) = g/y and -g*(x/y)/y, written as torch writes them."""
    if rounding_mode is not None:
        return torch.zeros_like(g), (torch.zeros_like(g) if isinstance(other, Tensor) else None)
    grad_other = -g * ((x / other) / other) if isinstance(other, Tensor) else None
    return g / other, grad_other


defop(
    "div",
    div,
    funcs=("torch.true_divide", "Tensor.true_divide", "torch.divide", "Tensor.divide", "Tensor.__truediv__"),
    inplace=("Tensor.__itruediv__", "Tensor.true_divide_", "Tensor.divide_"),
)


def pow_rule(g: Tensor, out: Tensor, x: Any, exponent: Any) -> tuple:
    """d(x**e)/dx = e*x**(e-1); d(x**e)/de = x**e * log(x) (0 where x == 0 and e >= 0)."""
    grad_x = grad_e = None
    if isinstance(x, Tensor):
        if isinstance(exponent, Tensor):
            grad_x = torch.where(exponent == 0.0, 0.0, g * (exponent * x.pow(exponent - 1)))
        elif exponent == 0:
            grad_x = torch.zeros_like(x)
        else:  # (x**2: x itself, not x.pow(1), which is the same bits at the cost of a kernel)
            grad_x = g * (exponent * (x if exponent == 2 else x.pow(exponent - 1)))
    if isinstance(exponent, Tensor):
        if isinstance(x, Tensor):
            grad_e = g * torch.where((x == 0) & (exponent >= 0), 0.0, out * x.log())
        elif x == 0:
            grad_e = g * torch.where(exponent >= 0, 0.0, out * -math.inf)
        else:
            grad_e = g * (out * math.log(x))
    return grad_x, grad_e


defop("pow", pow_rule, swapped=("Tensor.__rpow__",), inplace=("Tensor.__ipow__",))
defop("square", lambda g, out, x: pow_rule(g, out, x, 2)[0])


def maximum(g: Tensor, out: Tensor, x: Tensor, other: Tensor) -> tuple:
    """The larger input takes the gradient; ties split it evenly, as torch does."""
    shared = torch.where(x == other, g / 2, g)
    return shared.masked_fill(x < other, 0), shared.masked_fill(x > other, 0)


def minimum(g: Tensor, out: Tensor, x: Tensor, other: Tensor) -> tuple:
    shared = torch.where(x == other, g / 2, g)
    return shared.masked_fill(x > other, 0), shared.masked_fill(x < other, 0)


def fmax(g: Tensor, out: Tensor, x: Tensor, other: Tensor) -> tuple:
    """fmax ignores NaN; ties give the whole gradient to ``x`` (not split, unlike maximum), as torch does up to 2.13;
    torch 2.14 differentiates it as maximum (ties split, a NaN's gradient to both)."""
    if FMAX_AS_MAXIMUM:
        return maximum(g, out, x, other)
    pick = (x >= other) | other.isnan()
    return g.masked_fill(~pick, 0), g.masked_fill(pick, 0)


def fmin(g: Tensor, out: Tensor, x: Tensor, other: Tensor) -> tuple:
    if FMAX_AS_MAXIMUM:
        return minimum(g, out, x, other)
    pick = (x <= other) | other.isnan()
    return g.masked_fill(~pick, 0), g.masked_fill(pick, 0)


defop("maximum", maximum)
defop("minimum", minimum)
defop("fmax", fmax)
defop("fmin", fmin)


def where(g: Tensor, out: Tensor, condition: Any, input: Any, other: Any) -> tuple:
    """The gradient goes to the branch chosen."""
    return None, torch.where(condition, g, 0.0), torch.where(condition, 0.0, g)


defop("where", where, swapped=("Tensor.where",))  # a.where(condition, b) is torch.where(condition, a, b)


def masked_fill(g: Tensor, out: Tensor, x: Tensor, mask: Tensor, value: Any) -> tuple:
    grad_value = g.masked_select(mask).sum() if isinstance(value, Tensor) else None
    return g.masked_fill(mask, 0), None, grad_value


defop("masked_fill", masked_fill)


def atan2(g: Tensor, out: Tensor, x: Tensor, other: Tensor) -> tuple:
    """d atan2(y, x) = (x dy - y dx) / (x**2 + y**2), in torch's atan2_backward order.

    NOTE: at y = x = 0 (a denominator of exactly 0) torch gives both gradients 0, not NaN.
    """
    denominator = x * x + other * other
    recip = denominator.reciprocal().masked_fill(denominator == 0, 0)
    return g * other * recip, g * -x * recip


defop("atan2", atan2, funcs=("torch.arctan2", "Tensor.arctan2"), inplace=("Tensor.arctan2_",))


def lerp(g: Tensor, out: Tensor, x: Tensor, end: Tensor, weight: Any) -> tuple:
    """``x + weight * (end - x)``: a tensor weight gets ``g * (end - x)``."""
    grad_weight = g * (end - x) if isinstance(weight, Tensor) else None
    return g * (1 - weight), g * weight, grad_weight


defop("lerp", lerp)
defop("addcmul", lambda g, out, x, tensor1, tensor2, *, value=1: (g, g * (tensor2 * value), g * (tensor1 * value)))
defop("addcdiv", lambda g, out, x, tensor1, tensor2, *, value=1: (
    g, g * (value / tensor2), -g * (value * tensor1 / (tensor2 * tensor2))))


def xlogy(g: Tensor, out: Tensor, x: Any, other: Any) -> tuple:
    """x * log(y), 0 where x == 0; NOTE: torch's d/dx there is log(y) too, but 0 where also y <= 0."""
    grad_x = torch.xlogy(g, other).masked_fill((x == 0) & (other <= 0), 0) if isinstance(x, Tensor) else None
    return grad_x, (g * x / other if isinstance(other, Tensor) else None)


def xlog1py(g: Tensor, out: Tensor, x: Any, other: Any) -> tuple:
    """x * log1p(y), 0 where x == 0; NOTE: d/dx is log1p(y), 0 where x == 0 and y <= -1 (torch's)."""
    grad_x = torch.special.xlog1py(g, other).masked_fill((x == 0) & (other <= -1), 0) if isinstance(
        x, Tensor) else None
    return grad_x, (g * x / (other + 1) if isinstance(other, Tensor) else None)


defop("xlogy", xlogy, funcs=("special.xlogy",))
defop("special_xlog1py", xlog1py, auto=False, funcs=("special.xlog1py",))
defop("special_entr", lambda g, out, x: g * -(1 + x.log()), auto=False, funcs=("special.entr",))  # -x log(x)
defop("logaddexp", lambda g, out, x, other: (g / (1 + (other - x).exp()), g / (1 + (x - other).exp())))
defop("logaddexp2", lambda g, out, x, other: (g / (1 + torch.pow(2, other - x)), g / (1 + torch.pow(2, x - other))))
defop("hypot", lambda g, out, x, other: (g * x / out, g * other / out))


def copysign(g: Tensor, out: Tensor, x: Tensor, other: Any) -> tuple:
    """|x| with other's sign: d/dx = out / x (0 where x == 0, as torch); nothing flows to the sign."""
    ratio = (out / x).masked_fill(x == 0, 0)
    return g * ratio, (torch.zeros_like(other) if isinstance(other, Tensor) else None)


def _rounding_remainder(mode: str) -> Any:
    """fmod (trunc) and remainder (floor): x - other * div(x, other): d/d other = -div(x, other)."""

    def rule(g: Tensor, out: Tensor, x: Any, other: Any) -> tuple:
        if not isinstance(x, Tensor):
            raise UnsupportedCall("remainder: a number % a tensor has no rule (torch does not differentiate it either)")
        grad_other = -g * torch.div(x, other, rounding_mode=mode) if isinstance(other, Tensor) else None
        return g, grad_other

    return rule


defop("copysign", copysign)
defop("fmod", _rounding_remainder("trunc"))
defop("remainder", _rounding_remainder("floor"), funcs=("Tensor.__mod__",), swapped=("Tensor.__rmod__",),
      inplace=("Tensor.__imod__",))


def float_power(g: Tensor, out: Tensor, x: Any, exponent: Any) -> tuple:
    """pow in float64 (the engine casts each gradient back to its input's dtype)."""
    wide = [v.double() if isinstance(v, Tensor) else v for v in (x, exponent)]
    return pow_rule(g, out, *wide)


defop("float_power", float_power)

# ---------------------------------------------------------------- matrix products


def _mm(g: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """2-D product gradients, in the memory order torch's mm backward picks."""
    if x.shape[0] > 1 and x.shape[1] > 1 and x.stride() == (1, x.shape[0]):
        grad_x = y.mm(g.t()).t()
    else:
        grad_x = g.mm(y.t())
    if y.shape[0] > 1 and y.shape[1] > 1 and y.stride() == (1, y.shape[0]):
        grad_y = g.t().mm(x).t()
    else:
        grad_y = x.t().mm(g)
    return grad_x, grad_y


def matmul(g: Tensor, out: Tensor, x: Tensor, other: Tensor) -> tuple:
    """Gradients of ``x @ other`` for every rank combination matmul accepts."""
    if x.dim() == 1 and other.dim() == 1:
        return g * other, g * x
    if x.dim() == 2 and other.dim() == 2:
        return _mm(g, x, other)
    if x.dim() == 1:  # (k) @ (..., k, m)
        return (g.unsqueeze(-2) @ other.mT).squeeze(-2), x.unsqueeze(-1) * g.unsqueeze(-2)
    if other.dim() == 1:  # (..., n, k) @ (k)
        return g.unsqueeze(-1) * other, (x.mT @ g.unsqueeze(-1)).squeeze(-1)
    if other.dim() == 2:  # (B, T, C) @ (C, H): torch folds the batch into one mm
        grad_x, grad_y = _mm(g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]), other)
        return grad_x.reshape(x.shape), grad_y
    return g @ other.mT, x.mT @ g


defop("matmul", matmul, funcs=("torch.mm", "Tensor.mm", "torch.bmm", "Tensor.bmm", "torch.mv", "Tensor.mv",
                               "torch.dot", "Tensor.dot", "torch.vdot", "Tensor.vdot", "linalg.matmul"))
# (x * y).sum(dim), broadcasting
defop("vecdot", lambda g, out, x, y, *, dim=-1: (g.unsqueeze(dim) * y, g.unsqueeze(dim) * x), auto=False,
      funcs=("linalg.vecdot",))


def _chain_grads(g: Tensor, matrices: Sequence[Tensor]) -> list[Tensor]:
    """Gradients of the product M0 @ M1 @ ... @ Mk: (M0 .. Mi-1)^T g (Mi+1 .. Mk)^T for each Mi."""
    lefts: list[Tensor | None] = [None]
    for m in matrices[:-1]:
        lefts.append(m if lefts[-1] is None else lefts[-1] @ m)
    rights: list[Tensor | None] = [None]
    for m in reversed(matrices[1:]):
        rights.append(m if rights[-1] is None else m @ rights[-1])
    grads = []
    for left, right in zip(lefts, reversed(rights)):
        grad = g if left is None else left.mT @ g
        grads.append(grad if right is None else grad @ right.mT)
    return grads


def multi_dot(g: Tensor, out: Tensor, tensors: Sequence[Tensor]) -> tuple:
    """linalg.multi_dot: a chain of matrix products, the first (last) operand possibly a row (column) vector."""
    matrices = list(tensors)
    if matrices[0].dim() == 1:
        matrices[0] = matrices[0].unsqueeze(0)
    if matrices[-1].dim() == 1:
        matrices[-1] = matrices[-1].unsqueeze(-1)
    grads = _chain_grads(g.reshape(matrices[0].shape[0], matrices[-1].shape[-1]), matrices)
    return ([grad.reshape(t.shape) for grad, t in zip(grads, tensors)],)


defop("multi_dot", multi_dot, auto=False, funcs=("linalg.multi_dot",))
defop("chain_matmul", lambda g, out, *matrices: tuple(_chain_grads(g, matrices)))


def matrix_power(g: Tensor, out: Tensor, A: Tensor, n: int) -> Tensor:
    """A**n = B**k (B = A, or A^-1 for n < 0, k = |n|): gB = sum_j (B^T)**j g (B^T)**(k-1-j); gA = -A^-T gB A^-T."""
    if n == 0:
        return torch.zeros_like(A)
    B = A if n > 0 else torch.linalg.inv(A)
    k = abs(n)
    powers: list[Tensor | None] = [None]  # (B^T)**j, j = 0 .. k-1 (None: the identity)
    for _ in range(k - 1):
        powers.append(B.mT if powers[-1] is None else powers[-1] @ B.mT)
    grad = None
    for before, after in zip(powers, reversed(powers)):
        term = g if before is None else before @ g
        term = term if after is None else term @ after
        grad = term if grad is None else grad + term
    return grad if n > 0 else -(B.mT @ grad @ B.mT)


defop("matrix_power", matrix_power, funcs=("linalg.matrix_power",))


def inner(g: Tensor, out: Tensor, x: Tensor, other: Tensor) -> tuple:
    """Contraction of the last dims: out[i.., j..] = sum_k x[i.., k] other[j.., k]."""
    if x.dim() == 0 or other.dim() == 0:
        return g * other, g * x
    a, b = x.dim() - 1, other.dim() - 1
    return (torch.tensordot(g, other, dims=(list(range(a, a + b)), list(range(b)))),
            torch.tensordot(g, x, dims=(list(range(a)), list(range(a)))))


defop("inner", inner)
# outer promotes mixed dtypes (it is a broadcast multiply), mm does not
defop("outer", lambda g, out, x, vec2: (g @ vec2.to(g.dtype), g.t() @ x.to(g.dtype)), funcs=("torch.ger", "Tensor.ger"))


def linear(g: Tensor, out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> tuple:
    """``x @ weight.T + bias``; the bias gradient is summed by the engine."""
    grad_x = g @ weight
    flat_g = g.reshape(-1, g.shape[-1]) if g.dim() > 1 else g.unsqueeze(0)
    flat_x = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.unsqueeze(0)
    return grad_x, flat_g.t().mm(flat_x), (g if bias is not None else None)


defop("linear", linear)


def _scaled_product(g: Tensor, grad_1: Tensor, grad_2: Tensor, beta: Any, alpha: Any) -> tuple:
    """The gradients of ``beta * input + alpha * product(a, b)`` from those of the product (scales of 1 skipped)."""
    if alpha != 1:
        grad_1, grad_2 = grad_1 * alpha, grad_2 * alpha
    return (g if beta == 1 else g * beta), grad_1, grad_2


def addbmm(g: Tensor, out: Tensor, input: Tensor, batch1: Tensor, batch2: Tensor, *, beta=1, alpha=1) -> tuple:
    """``beta * input + alpha * sum_b batch1[b] @ batch2[b]``: every batch gets the same ``g``."""
    g_batched = g.unsqueeze(0).expand(batch1.shape[0], batch1.shape[1], batch2.shape[2])
    return _scaled_product(g, g_batched.bmm(batch2.transpose(1, 2)), batch1.transpose(1, 2).bmm(g_batched), beta,
                           alpha)


defop("addbmm", addbmm)


def addmm(g: Tensor, out: Tensor, input: Tensor, mat1: Tensor, mat2: Tensor, *, beta=1, alpha=1) -> tuple:
    return _scaled_product(g, *_mm(g, mat1, mat2), beta, alpha)


defop("addmm", addmm)


def baddbmm(g: Tensor, out: Tensor, input: Tensor, batch1: Tensor, batch2: Tensor, *, beta=1, alpha=1) -> tuple:
    """``beta * input + alpha * batch1 @ batch2`` (batched): the input's share is broadcast back by the engine."""
    return _scaled_product(g, g @ batch2.mT, batch1.mT @ g, beta, alpha)


defop("baddbmm", baddbmm)


def addmv(g: Tensor, out: Tensor, input: Tensor, mat: Tensor, vec: Tensor, *, beta=1, alpha=1) -> tuple:
    """``beta * input + alpha * mat @ vec``."""
    return _scaled_product(g, torch.outer(g, vec.to(g.dtype)), mat.t().to(g.dtype).mv(g), beta, alpha)


def addr(g: Tensor, out: Tensor, input: Tensor, vec1: Tensor, vec2: Tensor, *, beta=1, alpha=1) -> tuple:
    """``beta * input + alpha * outer(vec1, vec2)`` (which promotes mixed dtypes, as outer does)."""
    return _scaled_product(g, g.mv(vec2.to(g.dtype)), g.t().mv(vec1.to(g.dtype)), beta, alpha)


def tensordot(g: Tensor, out: Tensor, a: Tensor, b: Tensor, dims: Any = 2) -> tuple:
    """Each operand's gradient contracts ``g`` with the other operand's free dims, then is permuted into place."""
    if isinstance(dims, int):
        dims_a, dims_b = list(range(a.dim() - dims, a.dim())), list(range(dims))
    else:
        dims_a, dims_b = ([d] if isinstance(d, int) else list(d) for d in dims)
    dims_a, dims_b = [d % max(a.dim(), 1) for d in dims_a], [d % max(b.dim(), 1) for d in dims_b]
    free_a = [d for d in range(a.dim()) if d not in dims_a]
    free_b = [d for d in range(b.dim()) if d not in dims_b]
    n = len(free_a)
    grad_a = torch.tensordot(g, b, dims=(list(range(n, g.dim())), free_b))  # dims: free_a, then b's contracted
    grad_b = torch.tensordot(a, g, dims=(free_a, list(range(n))))  # dims: a's contracted, then free_b
    order_a = free_a + [dims_a[dims_b.index(d)] for d in sorted(dims_b)]
    order_b = [dims_b[dims_a.index(d)] for d in sorted(dims_a)] + free_b
    return grad_a.permute(_inverse(order_a)), grad_b.permute(_inverse(order_b))


def _inverse(order: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=list(order).__getitem__))


def _cross_dim(out: Tensor, dim: Any) -> int:
    """torch.cross without dim: the first dimension of size 3 (its deprecated default)."""
    return dim if dim is not None else next(d for d, size in enumerate(out.shape) if size == 3)


defop("addmv", addmv)
defop("addr", addr)
defop("tensordot", tensordot)
defop("cross", lambda g, out, x, other, dim=None: (torch.linalg.cross(other, g, dim=_cross_dim(out, dim)),
                                                   torch.linalg.cross(g, x, dim=_cross_dim(out, dim))))
defop("linalg_cross", lambda g, out, x, other, *, dim=-1: (torch.linalg.cross(other, g, dim=dim),
                                                           torch.linalg.cross(g, x, dim=dim)),
      auto=False, funcs=("linalg.cross",))


def bilinear(g: Tensor, out: Tensor, input1: Tensor, input2: Tensor, weight: Tensor,
             bias: Tensor | None = None) -> tuple:
    """out[..., k] = input1[..., i] weight[k, i, j] input2[..., j] + bias[k]."""
    return (torch.einsum("...k,kij,...j->...i", g, weight, input2),
            torch.einsum("...k,kij,...i->...j", g, weight, input1),
            torch.einsum("...k,...i,...j->kij", g, input1, input2),
            g if bias is not None else None)


defop("bilinear", bilinear)


def kron(g: Tensor, out: Tensor, x: Tensor, other: Tensor) -> tuple:
    """out[i * m + j] = x[i] other[j] in every dimension (the fewer-dims operand padded in front with 1s):
    ``g`` viewed with the dims interleaved (x0, other0, x1, other1 ...) contracts with the other operand."""
    n = max(x.dim(), other.dim())
    a = x.reshape((1,) * (n - x.dim()) + tuple(x.shape))
    b = other.reshape((1,) * (n - other.dim()) + tuple(other.shape))
    g = g.reshape([size for pair in zip(a.shape, b.shape) for size in pair])
    a_dims, b_dims = tuple(range(0, 2 * n, 2)), tuple(range(1, 2 * n, 2))
    spread_a = a.reshape([size for s in a.shape for size in (s, 1)])
    spread_b = b.reshape([size for s in b.shape for size in (1, s)])
    return (g * spread_b).sum(b_dims).reshape(x.shape), (g * spread_a).sum(a_dims).reshape(other.shape)


defop("kron", kron)

# ---------------------------------------------------------------- linear algebra

defop("trace", lambda g, out, x: g * torch.eye(*x.shape, dtype=g.dtype, device=g.device))


def _matrix(g: Tensor) -> Tensor:
    """A scalar per matrix, broadcastable against the batch of matrices."""
    return g.unsqueeze(-1).unsqueeze(-1)


def det(g: Tensor, out: Tensor, x: Tensor) -> Tensor:
    """Jacobi's formula, g * det(A) * A^-T.

    NOTE: at an exactly singular matrix (det == 0) torch's gradient is 0, not the adjugate: its first-order
    backward solves with g * det, which is 0 there. So is ours.
    """
    inverse = torch.linalg.inv_ex(x).inverse.mT
    return (_matrix(g * out) * inverse).masked_fill(_matrix(out == 0), 0)


def slogdet(g: Tensor, out: Any, x: Tensor, *, output_index: int = 0) -> Tensor:
    """d log|det A| / dA = A^-T; the sign has no gradient (real matrices)."""
    if output_index == 0:
        return torch.zeros_like(x)
    return _matrix(g) * torch.linalg.inv_ex(x).inverse.mT


def logdet(g: Tensor, out: Tensor, x: Tensor) -> Tensor:
    """log det A: NaN where det < 0, which takes no gradient (torch's where(sign == -1, nan, logabsdet))."""
    negative = torch.linalg.slogdet(x).sign == -1
    return slogdet(g.masked_fill(negative, 0), out, x, output_index=1)


def solve(g: Tensor, out: Tensor, A: Tensor, B: Tensor, *, left: bool = True) -> tuple:
    """X = A^-1 B (or B A^-1): dB = A^-T g (g A^-T), dA = -dB X^T (-X^T dB); B may be a (batch of) vector(s)."""
    grad_b = torch.linalg.solve(A.mT, g, left=left)
    vector = B.dim() == 1 or (B.dim() == A.dim() - 1 and B.shape == A.shape[:-1])
    if vector:
        grad_a = -grad_b.unsqueeze(-1) * out.unsqueeze(-2)
    else:
        grad_a = -(grad_b @ out.mT) if left else -(out.mT @ grad_b)
    return grad_a, grad_b


defop("det", det, funcs=("linalg.det",))
defop("slogdet", slogdet, multi=True, funcs=("linalg.slogdet",))
defop("logdet", logdet)
defop("inverse", lambda g, out, x: -(out.mT @ (g @ out.mT)), funcs=("linalg.inv",))
defop("linalg_solve", solve, auto=False, funcs=("linalg.solve",))
# the forms returning (result, info): the result's rule; info is an integer
defop("inv_ex", lambda g, out, A, *, check_errors=False, output_index=0: -(out[0].mT @ (g @ out[0].mT)), multi=True,
      auto=False, funcs=("linalg.inv_ex",))
defop("solve_ex", lambda g, out, A, B, *, left=True, check_errors=False, output_index=0: solve(
    g, out[0], A, B, left=left), multi=True, auto=False, funcs=("linalg.solve_ex",))


# ---------------------------------------------------------------- decompositions (real matrices only)


def _real(name: str, *tensors: Any) -> None:
    """The decomposition rules are for real matrices: refuse complex ones by name."""
    if any(isinstance(t, Tensor) and t.is_complex() for t in tensors):
        raise UnsupportedCall(f"{name}: complex matrices have no rule (tensorgraph's linear-algebra rules are "
                              f"for real matrices)")


def _eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _through_values(g: Tensor, U: Tensor, Vh: Tensor) -> Tensor:
    """U diag(g) Vh: the gradient reaching A through its eigen- or singular values."""
    return (U * g.unsqueeze(-2)) @ Vh


def cholesky(g: Tensor, out: Tensor, x: Tensor, upper: bool = False) -> Tensor:
    """A = L L^T: gA = L^-T sym(tril(L^T gL) with its diagonal halved) L^-1 (Murray 2016).

    NOTE: the forward reads one triangle of A; the gradient is torch's symmetric one, the derivative
    along symmetric perturbations.
    """
    _real("cholesky", x)
    L, gL = (out.mT, g.mT) if upper else (out, g)
    phi = (L.mT @ gL).tril()
    phi = 0.5 * (phi + phi.tril(-1).mT)
    grad = torch.linalg.solve_triangular(L.mT, phi, upper=True)
    return torch.linalg.solve_triangular(L, grad, upper=False, left=False)


def cholesky_ex(g: Tensor, out: Any, x: Tensor, *, upper: bool = False, check_errors: bool = False,
                output_index: int = 0) -> Tensor:
    """(L, info): L as cholesky; info is an integer status."""
    return cholesky(g, out[0], x, upper)


def cholesky_solve(g: Tensor, out: Tensor, B: Tensor, L: Tensor, upper: bool = False) -> tuple:
    """X = (L L^T)^-1 B: gB = (L L^T)^-1 g; gL = -(gB X^T + X gB^T) L (U (...) for upper)."""
    _real("cholesky_solve", B, L)
    grad_b = torch.cholesky_solve(g, L, upper)
    common = grad_b @ out.mT
    common = common + common.mT
    return grad_b, -(L @ common) if upper else -(common @ L)


def cholesky_inverse(g: Tensor, out: Tensor, L: Tensor, upper: bool = False) -> Tensor:
    """out = (L L^T)^-1: gL = -out (g + g^T) out L (L out (...) for upper)."""
    _real("cholesky_inverse", L)
    common = out @ (g + g.mT) @ out
    return -(L @ common) if upper else -(common @ L)


def eigh(g: Tensor, out: Any, A: Tensor, UPLO: str = "L", *, output_index: int = 0) -> Tensor:
    """A = V diag(w) V^T: gA = V (diag(gw) + skew(V^T gV) / (w_j - w_i)) V^T.

    NOTE: as torch, the gradient is symmetric whichever triangle UPLO reads, and repeated eigenvalues divide by
    zero in the eigenvectors' part (inf/NaN).
    """
    _real("eigh", A)
    values, vectors = out
    if output_index == 0:
        return _through_values(g, vectors, vectors.mT)
    VtgV = vectors.mT @ g
    gaps = values.unsqueeze(-2) - values.unsqueeze(-1) + _eye(values.shape[-1], values)  # 1 on the diagonal
    return vectors @ ((0.5 * (VtgV - VtgV.mT)) / gaps) @ vectors.mT


def eigvalsh(g: Tensor, out: Tensor, A: Tensor, UPLO: str = "L") -> Tensor:
    """V diag(g) V^T, with V from eigh of the same matrix."""
    _real("eigvalsh", A)
    vectors = torch.linalg.eigh(A, UPLO).eigenvectors
    return _through_values(g, vectors, vectors.mT)


def _svd_grad(g: Tensor, U: Tensor, S: Tensor, Vh: Tensor, output_index: int) -> Tensor:
    """The gradient through one output of the reduced SVD A = U diag(S) Vh (0: U, 1: S, 2: Vh).

    NOTE: as torch, repeated singular values divide by zero in the singular vectors' part (inf/NaN).
    """
    if output_index == 1:
        return _through_values(g, U, Vh)
    m, n = U.shape[-2], Vh.shape[-1]
    squares = S * S
    gaps = squares.unsqueeze(-2) - squares.unsqueeze(-1) + _eye(S.shape[-1], S)  # 1 on the diagonal
    if output_index == 0:
        UtgU = U.mT @ g
        inner = (UtgU - UtgU.mT) * S.unsqueeze(-2) / gaps
        if m > n:  # the part of gU outside U's columns
            scaled = g / S.unsqueeze(-2)
            return (U @ inner + scaled - U @ (U.mT @ scaled)) @ Vh
        return U @ inner @ Vh
    VtgV = Vh @ g.mT
    inner = S.unsqueeze(-1) * (VtgV - VtgV.mT) / gaps
    if m < n:  # the part of gVh outside Vh's rows
        scaled = g / S.unsqueeze(-1)
        return U @ (inner @ Vh + scaled - (scaled @ Vh.mT) @ Vh)
    return U @ inner @ Vh


def linalg_svd(g: Tensor, out: Any, A: Tensor, full_matrices: bool = True, *, driver: Any = None,
               output_index: int = 0) -> Tensor:
    """torch.linalg.svd: (U, S, Vh).

    NOTE: with full_matrices=True, as torch, only U's first k columns and Vh's first k rows (k = min(m, n)) take
    a gradient: the others are any orthonormal completion.
    """
    _real("linalg.svd", A)
    U, S, Vh = out
    k = S.shape[-1]
    if full_matrices:
        U, Vh = U[..., :k], Vh[..., :k, :]
        if output_index == 0:
            g = g[..., :k]
        elif output_index == 2:
            g = g[..., :k, :]
    return _svd_grad(g, U, S, Vh, output_index)


def svd(g: Tensor, out: Any, x: Tensor, some: bool = True, compute_uv: bool = True, *,
        output_index: int = 0) -> Tensor | None:
    """torch.svd: (U, S, V) with V, not Vh; some=False is full_matrices; without compute_uv U and V are zeros."""
    _real("svd", x)
    if not compute_uv:
        if output_index != 1:
            return None  # zero-filled constants
        U, _, Vh = torch.linalg.svd(x, full_matrices=False)
        return _through_values(g, U, Vh)
    U, S, V = out
    if output_index == 2:
        g = g.mT
    return linalg_svd(g, (U, S, V.mT), x, not some, output_index=output_index)


def svdvals(g: Tensor, out: Tensor, A: Tensor, *, driver: Any = None) -> Tensor:
    """U diag(g) Vh, with U and Vh from the SVD of the same matrix."""
    _real("linalg.svdvals", A)
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    return _through_values(g, U, Vh)


def _spectral_norm(g: Tensor, A: Tensor, ord: Any, dim: Any, keepdim: bool, dtype: Any, name: str) -> Tensor:
    """The nuclear norm (sum of singular values) and the 2 / -2 norms (largest / smallest), over ``dim``.

    NOTE: as torch (amax / amin of the singular values), tied largest or smallest singular values share the
    gradient evenly.
    """
    _real(name, A)
    dims = tuple(d % A.dim() for d in dim)
    x = A.movedim(dims, (-2, -1))
    if dtype is not None:
        x = x.to(dtype)
    if keepdim:
        g = g.squeeze(dims)
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    if ord == "nuc":
        grad_s = g.unsqueeze(-1).expand(S.shape)
    else:
        chosen = S == (S.amax(-1, keepdim=True) if ord == 2 else S.amin(-1, keepdim=True))
        grad_s = g.unsqueeze(-1) * chosen / chosen.sum(-1, keepdim=True)
    return _through_values(grad_s, U, Vh).movedim((-2, -1), dims)


_SPECTRAL = ("nuc", 2, -2)


def cond(g: Tensor, out: Tensor, A: Tensor, p: Any = None) -> Tensor:
    """The 2-norm condition number S_max / S_min (p=-2: S_min / S_max); other p have no rule."""
    if p not in (None, 2, -2):
        raise UnsupportedCall(f"linalg.cond: only p=None, 2 and -2 have a rule (got p={p!r})")
    _real("linalg.cond", A)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    if S.shape[-1] == 1:  # one singular value: cond is 1
        return torch.zeros_like(A)
    largest, smallest, scaled = S[..., :1], S[..., -1:], (g * out).unsqueeze(-1)  # S is sorted descending
    if p == -2:  # S_min / S_max
        ends = -scaled / largest, scaled / smallest
    else:
        ends = scaled / largest, -scaled / smallest
    return _through_values(torch.cat((ends[0], torch.zeros_like(S[..., 1:-1]), ends[1]), -1), U, Vh)


def _qr_square(gQ: Tensor | None, gR: Tensor | None, Q: Tensor, R: Tensor) -> Tensor:
    """A = QR with R square: gA = (gQ + Q copyltu(gR R^T - Q^T gQ)) R^-T (copyltu mirrors the upper triangle)."""
    M = torch.zeros_like(R)
    if gR is not None:
        M = M + gR @ R.mT
    if gQ is not None:
        M = M - Q.mT @ gQ
    grad = Q @ (M.triu() + M.triu(1).mT)
    if gQ is not None:
        grad = grad + gQ
    return torch.linalg.solve_triangular(R.mT, grad, upper=False, left=False)


def linalg_qr(g: Tensor, out: Any, A: Tensor, mode: str = "reduced", *, output_index: int = 0) -> Tensor:
    """A = QR (Walter and Lehmann). A wide A = Q [R1 R2] is the QR of A1 and R2 = Q^T A2.

    NOTE: as torch, mode='r' (no Q) and mode='complete' with more rows than columns have no gradient.
    """
    _real("linalg.qr", A)
    Q, R = out
    m, n = A.shape[-2:]
    if mode == "r":
        raise UnsupportedCall("linalg.qr: mode='r' computes no Q and the gradient needs it (torch refuses it "
                              "too); use mode='reduced'")
    if mode == "complete" and m > n:
        raise UnsupportedCall("linalg.qr: mode='complete' with more rows than columns has no gradient (Q's "
                              "extra columns are arbitrary; torch refuses it too); use mode='reduced'")
    gQ, gR = (g, None) if output_index == 0 else (None, g)
    if m >= n:
        return _qr_square(gQ, gR, Q, R)
    A2 = A[..., m:]
    if gR is None:
        return torch.cat((_qr_square(gQ, None, Q, R[..., :m]), torch.zeros_like(A2)), -1)
    return torch.cat((_qr_square(A2 @ gR[..., m:].mT, gR[..., :m], Q, R[..., :m]), Q @ gR[..., m:]), -1)


def qr(g: Tensor, out: Any, x: Tensor, some: bool = True, *, output_index: int = 0) -> Tensor:
    """torch.qr: some=False is mode='complete'."""
    return linalg_qr(g, out, x, "reduced" if some else "complete", output_index=output_index)


def _pinv_grad(g: Tensor, P: Tensor, A: Tensor) -> Tensor:
    """P = pinv(A), at a point where A's rank does not change (Golub and Pereyra):
    gA = -P^T g P^T + (I - A P) g^T P P^T + P^T P g^T (I - P A), grouped so the products stay small.
    """
    gT = g.mT
    if A.shape[-2] <= A.shape[-1]:
        K = gT @ P
        KPt = K @ P.mT
        return -(P @ K).mT + KPt - A @ (P @ KPt) + P.mT @ (P @ (gT - K @ A))
    K = P @ gT
    PtK = P.mT @ K
    return -(K @ P).mT + ((gT - A @ K) @ P) @ P.mT + PtK - (PtK @ P) @ A


def pinv(g: Tensor, out: Tensor, A: Tensor, rcond: Any = None, hermitian: bool = False, *, atol: Any = None,
         rtol: Any = None) -> Tensor:
    """torch.linalg.pinv.

    NOTE: as torch, the gradient is the formula's whatever the tolerances cut (exact where the rank stays), and
    with hermitian=True it is not symmetrised although only one triangle is read.
    """
    _real("linalg.pinv", A)
    return _pinv_grad(g, out, A)


def _is_vector_rhs(A: Tensor, B: Tensor) -> bool:
    return B.dim() == 1 or (B.dim() == A.dim() - 1 and B.shape == A.shape[:-1])


def lstsq(g: Tensor, out: Any, A: Tensor, B: Tensor, rcond: Any = None, *, driver: Any = None,
          output_index: int = 0) -> tuple:
    """X = pinv(A) B: gB = pinv(A)^T gX, gA through pinv with g = gX B^T.

    NOTE: as torch, only the solution has a gradient: residuals, rank and singular values are constants.
    """
    _real("linalg.lstsq", A, B)
    if output_index != 0:
        return None, None
    vector = _is_vector_rhs(A, B)
    if vector:
        g, B = g.unsqueeze(-1), B.unsqueeze(-1)
    P = torch.linalg.pinv(A)
    grad_b = P.mT @ g
    return _pinv_grad(g @ B.mT, P, A), grad_b.squeeze(-1) if vector else grad_b


def matrix_exp(g: Tensor, out: Tensor, A: Tensor) -> Tensor:
    """The adjoint of the Frechet derivative: the top-right block of exp([[A^T, g], [0, A^T]])."""
    _real("linalg.matrix_exp", A)
    n = A.shape[-1]
    At = A.mT.expand(g.shape)
    block = torch.cat((torch.cat((At, g), -1), torch.cat((torch.zeros_like(At), At), -1)), -2)
    return torch.linalg.matrix_exp(block)[..., :n, n:]


def _sylvester(C: Tensor, values: Tensor, vectors: Tensor) -> Tensor:
    """Y with S Y + Y S = C, for S = V diag(values) V^T positive definite: in S's eigenbasis the equation is
    (V^T Y V)_ij (s_i + s_j) = (V^T C V)_ij, one division per entry."""
    return vectors @ ((vectors.mT @ C @ vectors) / (values.unsqueeze(-1) + values.unsqueeze(-2))) @ vectors.mT


def matrix_sqrth(g: Tensor, out: Tensor, A: Tensor) -> Tensor:
    """X = A^(1/2) for A symmetric positive definite: X X = A gives X dX + dX X = dA, so <g, dX> = <gA, dA>
    for gA solving X gA + gA X = g (the Sylvester operator is its own adjoint), in X's eigenbasis.

    NOTE: as torch, the gradient is symmetric, the derivative along symmetric perturbations, though the forward
    reads one triangle of A: g's antisymmetric part does not reach A.
    """
    _real("linalg.matrix_sqrth", A)
    values, vectors = torch.linalg.eigh(out)
    return _sylvester(0.5 * (g + g.mT), values, vectors)


def linalg_polar(g: Tensor, out: Any, A: Tensor, *, output_index: int = 0) -> Tensor:
    """A = U H, U with orthonormal columns, H = (A^T A)^(1/2) (A of full column rank).

    H H = A^T A gives H dH + dH H = dA^T A + A^T dA, and U = A H^-1 gives dU = (dA - U dH) H^-1. A gradient K
    reaching dH thus reaches dA as A Y with H Y + Y H = K + K^T; U's sends gU H^-1 directly and K = -U^T gU H^-1.
    """
    _real("linalg.polar", A)
    U, H = out
    values, vectors = once_per_pass((H,), lambda: torch.linalg.eigh(H), last=output_index == 0)
    if output_index == 1:
        return A @ _sylvester(g + g.mT, values, vectors)
    direct = g @ (vectors / values.unsqueeze(-2)) @ vectors.mT  # gU H^-1
    through_h = -(U.mT @ direct)
    return direct + A @ _sylvester(through_h + through_h.mT, values, vectors)


def _triangle(grad: Tensor, upper: bool, unitriangular: bool) -> Tensor:
    """Only the triangle the solve reads gets a gradient (without the diagonal when it is taken as ones)."""
    return grad.triu(int(unitriangular)) if upper else grad.tril(-int(unitriangular))


def solve_triangular(g: Tensor, out: Tensor, A: Tensor, B: Tensor, *, upper: bool, left: bool = True,
                     unitriangular: bool = False) -> tuple:
    """X = A^-1 B (B A^-1 with left=False), A triangular: gB = A^-T g, gA = -gB X^T (-X^T gB) on A's triangle."""
    _real("linalg.solve_triangular", A, B)
    grad_b = torch.linalg.solve_triangular(A.mT, g, upper=not upper, left=left, unitriangular=unitriangular)
    grad_a = -(grad_b @ out.mT) if left else -(out.mT @ grad_b)
    return _triangle(grad_a, upper, unitriangular), grad_b


def triangular_solve(g: Tensor, out: Any, b: Tensor, A: Tensor, upper: bool = True, transpose: bool = False,
                     unitriangular: bool = False, *, output_index: int = 0) -> tuple:
    """torch.triangular_solve: (X, a clone of A) with X = A^-1 b (A^-T b with transpose).

    NOTE: as torch, the clone's gradient reaches all of A, not only the triangle the solve reads.
    """
    _real("triangular_solve", b, A)
    if output_index == 1:
        return None, g
    X = out[0]
    M = A.mT if transpose else A
    grad_b = torch.linalg.solve_triangular(M.mT, g, upper=upper == transpose, unitriangular=unitriangular)
    grad_m = -(grad_b @ X.mT)
    return grad_b, _triangle(grad_m.mT if transpose else grad_m, upper, unitriangular)


defop("cholesky", cholesky, funcs=("linalg.cholesky",))
defop("cholesky_ex", cholesky_ex, multi=True, auto=False, funcs=("linalg.cholesky_ex",))
defop("cholesky_solve", cholesky_solve)
defop("cholesky_inverse", cholesky_inverse)
defop("eigh", eigh, multi=True, auto=False, funcs=("linalg.eigh",))
defop("eigvalsh", eigvalsh, auto=False, funcs=("linalg.eigvalsh",))
defop("linalg_svd", linalg_svd, multi=True, auto=False, funcs=("linalg.svd",))
defop("svd", svd, multi=True)
defop("svdvals", svdvals, auto=False, funcs=("linalg.svdvals",))
defop("cond", cond, auto=False, funcs=("linalg.cond",))
defop("linalg_qr", linalg_qr, multi=True, auto=False, funcs=("linalg.qr",))
defop("qr", qr, multi=True)
defop("pinv", pinv, auto=False, funcs=("linalg.pinv",))
defop("pinverse", lambda g, out, x, rcond=1e-15: _pinv_grad(g, out, x))
defop("lstsq", lstsq, multi=True, auto=False, funcs=("linalg.lstsq",))
defop("matrix_exp", matrix_exp, funcs=("linalg.matrix_exp",))
if hasattr(torch.linalg, "matrix_sqrth"):  # new in torch 2.14, as linalg.polar: no rule where torch lacks them
    defop("matrix_sqrth", matrix_sqrth, auto=False, funcs=("linalg.matrix_sqrth",))
if hasattr(torch.linalg, "polar"):
    defop("linalg_polar", linalg_polar, multi=True, auto=False, funcs=("linalg.polar",))
defop("solve_triangular", solve_triangular, auto=False, funcs=("linalg.solve_triangular",))
defop("triangular_solve", triangular_solve, multi=True)


def _reflections_backward(g: Tensor, A: Tensor, tau: Tensor, start: Tensor, order: Sequence[int]) -> tuple:
    """Gradients of H_order[0] H_order[1] ... start, H_i = I - tau_i v_i v_i^T, v_i A's column i below the diagonal
    with 1 on it (LAPACK's packed reflectors): (A's, tau's, start's).

    Applying H = I - t v v^T to P: dL/dP_before = G - t v (v^T G); dL/dt = -(v^T G)(v^T P)^T; dL/dv = -t (G P^T v +
    P G^T v), G being dL/d(H P). The products P after each reflection are made from the right first.
    """
    rows = torch.arange(A.shape[-2], device=A.device)
    reflectors = {i: torch.where(rows > i, A[..., :, i], (rows == i).to(A.dtype)).unsqueeze(-1) for i in order}
    scales = {i: tau[..., i, None, None] for i in order}
    products = [start]  # products[j]: the reflections order[j:] applied to start
    for i in reversed(order):
        v, P = reflectors[i], products[0]
        products.insert(0, P - scales[i] * v * (v.mT @ P))
    grad_v, grad_tau = {}, {}
    for j, i in enumerate(order):
        v, t, P = reflectors[i], scales[i], products[j + 1]
        vg, vp = v.mT @ g, v.mT @ P
        grad_tau[i] = -(vg * vp).sum((-2, -1))
        grad_v[i] = torch.where(rows > i, -(t * (g @ vp.mT + P @ vg.mT))[..., 0], 0.0)
        g = g - t * v * vg
    k = tau.shape[-1]
    columns = [grad_v[i] for i in range(k)] + [torch.zeros_like(A[..., :, 0])] * (A.shape[-1] - k)
    grad_tau_all = torch.stack([grad_tau[i] for i in range(k)], -1) if k else torch.zeros_like(tau)
    return torch.stack(columns, -1), grad_tau_all, g


def householder_product(g: Tensor, out: Tensor, A: Tensor, tau: Tensor) -> tuple:
    """linalg.householder_product (orgqr): the first n columns of H_0 H_1 ... H_k-1."""
    _real("linalg.householder_product", A, tau)
    m, n = A.shape[-2:]
    start = torch.eye(m, n, dtype=out.dtype, device=out.device).expand(out.shape)
    return _reflections_backward(g, A, tau, start, range(tau.shape[-1]))[:2]


def ormqr(g: Tensor, out: Tensor, A: Tensor, tau: Tensor, other: Tensor, left: bool = True,
          transpose: bool = False) -> tuple:
    """Q C, Q^T C, C Q or C Q^T with Q = H_0 ... H_k-1 (m x m) from geqrf's reflectors: C Q is (Q^T C^T)^T."""
    _real("ormqr", A, tau, other)
    forward = left != transpose  # Q C and C Q^T apply H_k-1 first; Q^T C and C Q apply H_0 first
    order = range(tau.shape[-1]) if forward else range(tau.shape[-1] - 1, -1, -1)
    grad_a, grad_tau, grad_c = _reflections_backward(g if left else g.mT, A, tau, other if left else other.mT, order)
    return grad_a, grad_tau, grad_c if left else grad_c.mT


defop("householder_product", householder_product, auto=False, funcs=(
    "linalg.householder_product", "torch.orgqr", "Tensor.orgqr"))
defop("ormqr", ormqr)


def _lu_args(name: str, A: Tensor, pivot: bool = True, *, square: bool = False) -> None:
    _real(name, A)
    if square and A.shape[-2] != A.shape[-1]:
        raise UnsupportedCall(f"{name}: only square matrices have a rule (got {A.shape[-2]}x{A.shape[-1]})")
    if not pivot:
        raise UnsupportedCall(f"{name}: pivot=False (CUDA only) has no rule")


def _lu_grad(gL: Tensor | None, gU: Tensor | None, P: Tensor, L: Tensor, U: Tensor) -> Tensor:
    """A = P L U, L (m x k) unit lower and U (k x n) upper trapezoidal, k = min(m, n).

    On the square k x k blocks L1, U1, with X = L1^-1 (P^T dA)_1 U1^-1: dL1 = L1 tril(X, -1), dU1 = triu(X) U1.
    The rows of L below them (more rows than columns) are (P^T dA)_2 U1^-1 - L2 triu(X); the columns of U right
    of them (more columns than rows) L1^-1 (P^T dA)_2 - tril(X, -1) U2. So, with
    M = tril(L1^T gL1 - gU2 U2^T, -1) + triu(gU1 U1^T - L2^T gL2), P^T gA = L1^-T M U1^-T, beside which
    come gL2 U1^-T (the rows below) or L1^-T gU2 (the columns to the right).
    """
    m, n = L.shape[-2], U.shape[-1]
    k = min(m, n)
    L1, U1 = L[..., :k, :], U[..., :, :k]
    M = torch.zeros_like(U1)
    if gL is not None:
        M = M + (L1.mT @ gL[..., :k, :]).tril(-1)
        if m > k:
            M = M - (L[..., k:, :].mT @ gL[..., k:, :]).triu()
    if gU is not None:
        M = M + (gU[..., :, :k] @ U1.mT).triu()
        if n > k:
            M = M - (gU[..., :, k:] @ U[..., :, k:].mT).tril(-1)
    grad = torch.linalg.solve_triangular(U1.mT, torch.linalg.solve_triangular(
        L1.mT, M, upper=True, unitriangular=True), upper=False, left=False)
    if m > k:  # the rows of L below L1
        rows = torch.zeros_like(L[..., k:, :]) if gL is None else torch.linalg.solve_triangular(
            U1.mT, gL[..., k:, :], upper=False, left=False)
        grad = torch.cat([grad, rows], -2)
    if n > k:  # the columns of U right of U1
        columns = torch.zeros_like(U[..., :, k:]) if gU is None else torch.linalg.solve_triangular(
            L1.mT, gU[..., :, k:], upper=True, unitriangular=True)
        grad = torch.cat([grad, columns], -1)
    return P @ grad


def lu(g: Tensor, out: Any, A: Tensor, *, pivot: bool = True, output_index: int = 0) -> Tensor | None:
    """torch.linalg.lu: (P, L, U); P is a constant."""
    _lu_args("linalg.lu", A, pivot)
    if output_index == 0:
        return None
    P, L, U = out
    return _lu_grad(g if output_index == 1 else None, g if output_index == 2 else None, P, L, U)


def lu_factor(g: Tensor, out: Any, A: Tensor, *, pivot: bool = True, check_errors: bool = False,
              output_index: int = 0) -> Tensor | None:
    """torch.linalg.lu_factor(_ex): (LU, pivots[, info]), L's strict lower and U's upper triangle packed in LU."""
    _lu_args("linalg.lu_factor", A, pivot)
    if output_index != 0:
        return None
    P, L, U = torch.lu_unpack(out[0], out[1])
    k = min(A.shape[-2:])
    return _lu_grad(g[..., :, :k].tril(-1), g[..., :k, :].triu(), P, L, U)


def lu_solve(g: Tensor, out: Tensor, LU: Tensor, pivots: Tensor, B: Tensor, *, left: bool = True,
             adjoint: bool = False) -> tuple:
    """X = A^-1 B for A = P L U packed in LU (B A^-1 with left=False, A^T for adjoint): gB as solve's; gA is
    pulled back to LU's two triangles: tril(P^T gA U^T, -1) + triu(L^T P^T gA)."""
    _lu_args("linalg.lu_solve", LU, square=True)
    _real("linalg.lu_solve", B)
    grad_b = torch.linalg.lu_solve(LU, pivots, g, left=left, adjoint=not adjoint)
    grad_a = -(grad_b @ out.mT) if left else -(out.mT @ grad_b)
    if adjoint:
        grad_a = grad_a.mT
    P, L, U = torch.lu_unpack(LU, pivots)
    permuted = P.mT @ grad_a
    return (permuted @ U.mT).tril(-1) + (L.mT @ permuted).triu(), None, grad_b


def lu_unpack(g: Tensor, out: Any, LU_data: Tensor, LU_pivots: Tensor, unpack_data: bool = True,
              unpack_pivots: bool = True, *, output_index: int = 0) -> tuple:
    """(P, L, U) from a packed LU: L's gradient goes to LU's strict lower triangle, U's to its upper one."""
    k = min(LU_data.shape[-2:])
    if output_index == 1:
        grad = g.tril(-1)
        return (grad if k == LU_data.shape[-1] else torch.cat([grad, torch.zeros_like(LU_data[..., :, k:])], -1)), None
    if output_index == 2:
        grad = g.triu()
        return (grad if k == LU_data.shape[-2] else torch.cat([grad, torch.zeros_like(LU_data[..., k:, :])], -2)), None
    return None, None


defop("lu", lu, multi=True, auto=False, funcs=("linalg.lu",))
defop("lu_factor", lu_factor, multi=True, auto=False, funcs=("linalg.lu_factor", "linalg.lu_factor_ex"))
defop("lu_solve", lu_solve, auto=False, funcs=("linalg.lu_solve",))
defop("lu_unpack", lu_unpack, multi=True)
# the deprecated torch.lu (LU, pivots[, infos]) and torch.lu_solve(B, LU, pivots), with their own argument orders
defop("torch_lu", lambda g, out, A, pivot=True, get_infos=False, *, output_index=0: lu_factor(
    g, out, A, pivot=pivot, output_index=output_index), multi=True, auto=False, funcs=("torch.lu", "Tensor.lu"))


def torch_lu_solve(g: Tensor, out: Tensor, b: Tensor, LU_data: Tensor, LU_pivots: Tensor) -> tuple:
    grad_lu, _, grad_b = lu_solve(g, out, LU_data, LU_pivots, b)
    return grad_b, grad_lu, None


defop("torch_lu_solve", torch_lu_solve, auto=False, funcs=("torch.lu_solve", "Tensor.lu_solve"))



def _difference_stencil(n: int, step: float, edge_order: int, like: Tensor) -> Tensor:
    """The n x n matrix of torch.gradient along one dim with spacing ``step``: central differences inside,
    one-sided ones of order ``edge_order`` at the two ends (its rows applied to the identity's)."""
    t = torch.eye(n, dtype=like.dtype, device=like.device)
    inside = (t[2:] - t[:-2]) / (2 * step)
    if edge_order == 1:
        first, last = (t[1:2] - t[:1]) / step, (t[-1:] - t[-2:-1]) / step
    else:
        first = (t[:1] * -1.5 + t[1:2] * 2 - t[2:3] * 0.5) / step
        last = (t[-3:-2] * 0.5 - t[-2:-1] * 2 + t[-1:] * 1.5) / step
    return torch.cat([first, inside, last])


def _coordinate_stencil(gaps: Tensor, edge_order: int) -> Tensor:
    """The n x n matrix of torch.gradient along one dim at coordinates ``gaps`` apart (n - 1 of them): each
    row the derivative, at its point, of the parabola through the point and its two neighbours (at an edge,
    the line through the two end points with edge_order=1, or the parabola through the three)."""
    n = gaps.shape[0] + 1
    t = torch.eye(n, dtype=gaps.dtype, device=gaps.device)
    h1, h2 = gaps[:-1, None], gaps[1:, None]  # the gaps before and after each inner point
    span = h1 + h2
    inside = t[:-2] * (-h2 / (h1 * span)) + t[1:-1] * ((h2 - h1) / (h1 * h2)) + t[2:] * (h1 / (h2 * span))
    if edge_order == 1:
        first, last = (t[1:2] - t[:1]) / gaps[0], (t[-1:] - t[-2:-1]) / gaps[-1]
    else:
        a, b = gaps[0], gaps[1]
        first = (t[:1] * -(2 * a + b) / (a * (a + b)) + t[1:2] * (a + b) / (a * b) - t[2:3] * a / (b * (a + b)))
        a, b = gaps[-2], gaps[-1]
        last = (t[-3:-2] * b / (a * (a + b)) - t[-2:-1] * (a + b) / (a * b) + t[-1:] * (a + 2 * b) / (b * (a + b)))
    return torch.cat([first, inside, last])


def _gaps_gradient(g: Tensor, x: Tensor, y: Tensor, gaps: Tensor, edge_order: int) -> Tensor:
    """The gradient of the gaps between coordinates (g, x, y with the differentiated dim last).

    With the slopes u = (x_i - x_(i-1)) / h1 and v = (x_(i+1) - x_i) / h2 on both sides of a point, each
    output is a weighted mean y = N / (h1 + h2): N = h2 u + h1 v inside, (2 h1 + h2) u - h1 v at the first
    point and (h1 + 2 h2) v - h2 u at the last (edge_order=2), so dy/dh = (dN/dh - y) / (h1 + h2), where
    du/dh1 = -u / h1 and dv/dh2 = -v / h2. With edge_order=1 an end is one slope: dy/dh = -y / h.
    """
    count = gaps.shape[0]
    slopes = x.diff(dim=-1) / gaps
    if edge_order == 1:
        first = torch.stack([(g[..., 0] * -y[..., 0]).sum() / gaps[0]])
        last = torch.stack([(g[..., -1] * -y[..., -1]).sum() / gaps[-1]])
    else:
        h1, h2, u, v, end, weight = gaps[0], gaps[1], slopes[..., 0], slopes[..., 1], y[..., 0], g[..., 0]
        first = torch.stack([(weight * (-h2 * u / h1 - v - end)).sum(), (weight * (u + h1 * v / h2 - end)).sum()])
        h1, h2, u, v, end, weight = gaps[-2], gaps[-1], slopes[..., -2], slopes[..., -1], y[..., -1], g[..., -1]
        last = torch.stack([(weight * (v + h2 * u / h1 - end)).sum(), (weight * (-u - h1 * v / h2 - end)).sum()])
        first, last = first / (gaps[0] + gaps[1]), last / (gaps[-2] + gaps[-1])
    grad = F.pad(first, (0, count - first.shape[0])) + F.pad(last, (count - last.shape[0], 0))
    if count >= 2:  # the inner points, each between the gaps h1 (before it) and h2 (after it)
        h1, h2, u, v = gaps[:-1], gaps[1:], slopes[..., :-1], slopes[..., 1:]
        inner, weight = y[..., 1:-1], g[..., 1:-1] / (h1 + h2)
        before = (weight * (v - h2 * u / h1 - inner)).reshape(-1, count - 1).sum(0)
        after = (weight * (u - h1 * v / h2 - inner)).reshape(-1, count - 1).sum(0)
        grad = grad + F.pad(before, (0, 1)) + F.pad(after, (1, 0))
    return grad


def gradient(g: Tensor, out: Any, input: Tensor, spacing: Any = 1, dim: Any = None, edge_order: int = 1, *,
             output_index: int = 0) -> tuple:
    """torch.gradient: along each dim a linear stencil D (central differences inside, one-sided at the edges), so
    the input's gradient is D^T g. Spacing given as coordinate tensors makes D depend on them too: their
    gradient goes through the gaps between them (_gaps_gradient), and c_(k+1) - c_k = h_k gives each
    coordinate the gradient of the gap before it minus that of the gap after it.

    (``spacing`` is keyword-only in torch; positional here so that its tensors get their gradients.)"""
    dims = list(range(input.dim())) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    steps = list(spacing) if isinstance(spacing, (tuple, list)) else [spacing] * len(dims)
    step = steps[output_index]
    along = dims[output_index] % input.dim()
    if not isinstance(step, Tensor):
        stencil = _difference_stencil(input.shape[along], float(step), edge_order, g)
        return (g.movedim(along, -1) @ stencil).movedim(-1, along), None
    n = input.shape[along]
    if step.shape != (n,):
        raise UnsupportedCall(f"gradient: spacing[{output_index}] holds {step.numel()} coordinates for dim {along} "
                              f"of size {n}; give one coordinate per element")
    stencil = _coordinate_stencil(step.diff(), edge_order).to(g.dtype)  # its weights rounded as torch's are
    gaps = step.to(g.dtype).diff()
    moved = g.movedim(along, -1)
    grad_input = (moved @ stencil).movedim(-1, along).to(input.dtype)
    grad_gaps = _gaps_gradient(moved, input.to(g.dtype).movedim(along, -1), out[output_index].movedim(along, -1),
                               gaps, edge_order)
    zero = grad_gaps.new_zeros(1)
    grad_step = (torch.cat([zero, grad_gaps]) - torch.cat([grad_gaps, zero])).to(step.dtype) \
        if step.is_floating_point() else None  # integer coordinates take no gradient
    return grad_input, [grad_step if i == output_index else None for i in range(len(steps))]


defop("gradient", gradient, multi=True)


def tensorinv(g: Tensor, out: Tensor, A: Tensor, ind: int = 2) -> Tensor:
    """The inverse of A read as a matrix (the first ``ind`` dims its rows): inverse's rule on that matrix."""
    rows = math.prod(A.shape[:ind])
    inverse = out.reshape(-1, rows)
    return (-(inverse.mT @ (g.reshape(inverse.shape) @ inverse.mT))).reshape(A.shape)


def tensorsolve(g: Tensor, out: Tensor, A: Tensor, B: Tensor, dims: Any = None) -> tuple:
    """X with tensordot(A, X, X.dim()) = B: solve's rule on A read as a matrix (``dims`` moved to its end first)."""
    moved = A
    if dims is not None:
        moved = A.movedim(list(dims), list(range(A.dim() - len(dims), A.dim())))
    matrix = moved.reshape(B.numel(), -1)
    grad_b = torch.linalg.solve(matrix.mT, g.reshape(-1, 1))
    grad_a = -(grad_b @ out.reshape(1, -1))
    grad_a = grad_a.reshape(moved.shape)
    if dims is not None:
        grad_a = grad_a.movedim(list(range(A.dim() - len(dims), A.dim())), list(dims))
    return grad_a, grad_b.reshape(B.shape)


defop("tensorinv", tensorinv, auto=False, funcs=("linalg.tensorinv",))
defop("tensorsolve", tensorsolve, auto=False, funcs=("linalg.tensorsolve",))

# ---------------------------------------------------------------- reductions


def sum_rule(g: Tensor, out: Tensor, x: Tensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Tensor:
    """Each summed element receives the output's gradient: unsqueeze and expand."""
    return _unreduce(g, x, dim, keepdim).expand(x.shape)


def mean_rule(g: Tensor, out: Tensor, x: Tensor, dim: Any = None, keepdim: bool = False, *,
              dtype: Any = None) -> Tensor:
    return _unreduce(g, x, dim, keepdim).expand(x.shape) / _count(x, dim)


def _correction(dim: Any, unbiased: Any, correction: Any) -> tuple[Any, float]:
    if isinstance(dim, bool):  # var(True): the old positional `unbiased`
        dim, unbiased = None, dim
    if correction is None:
        correction = 0 if unbiased is False else 1
    return dim, correction


def var_rule(g: Tensor, out: Tensor, x: Tensor, dim: Any = None, unbiased: Any = None, keepdim: bool = False,
        *, correction: Any = None) -> Tensor:
    """d var / dx_i = 2 (x_i - mean) / (n - correction): the mean's own dependence on x_i cancels."""
    dim, correction = _correction(dim, unbiased, correction)
    dof = _count(x, dim) - correction
    mean_dims = _dims(dim, x.dim())
    centred = x - x.mean(mean_dims, keepdim=True)
    if dof <= 0 and (dim is None or x.dim() == 0):
        # NOTE: torch's var_backward for a full reduction with no degrees of freedom left: inf, nan where x == mean
        return _unreduce(g, x, dim, keepdim) * torch.where(centred == 0, math.nan, math.inf).to(x.dtype)
    return (2.0 / dof if dof else math.inf) * _unreduce(g, x, dim, keepdim) * centred


def std_rule(g: Tensor, out: Tensor, x: Tensor, dim: Any = None, unbiased: Any = None, keepdim: bool = False,
        *, correction: Any = None) -> Tensor:
    """std = sqrt(var): chain through var's rule with g / (2 std)."""
    grad_var = (g / (out * 2)).masked_fill(out == 0, 0)
    return var_rule(grad_var, out, x, dim, unbiased, keepdim, correction=correction)


def _with_mean(spread_rule: Any) -> Any:
    """The rule of ``torch.var_mean`` or ``torch.std_mean``: each of the two outputs by its own rule."""

    def rule(g: Tensor, out: Any, x: Tensor, dim: Any = None, unbiased: Any = None, keepdim: bool = False, *,
             correction: Any = None, output_index: int = 0) -> Tensor:
        if output_index == 0:
            return spread_rule(g, out[0], x, dim, unbiased, keepdim, correction=correction)
        return mean_rule(g, out[1], x, _correction(dim, unbiased, correction)[0], keepdim)

    return rule


defop("sum", sum_rule)
defop("mean", mean_rule)


def _cov_parts(x: Tensor, correction: float, fweights: Tensor | None, aweights: Tensor | None) -> tuple:
    """torch.cov's pieces (observations in columns): their weights (None: all 1), the centred x, the divisor."""
    x = x.reshape(1, -1) if x.dim() < 2 else x
    w = fweights.to(x.dtype) if fweights is not None else None
    if aweights is not None:
        w = aweights if w is None else w * aweights
    total = w.sum() if w is not None else torch.tensor(float(x.shape[1]), dtype=x.dtype, device=x.device)
    mean = (x * w if w is not None else x).sum(1, keepdim=True) / total
    if aweights is not None and correction != 0:
        divisor = total - correction * (w * aweights).sum() / total
    else:
        divisor = total - correction
    return w, x - mean, divisor.clamp_min(0)  # torch: a divisor <= 0 (correction too large) becomes 0


def _cov_backward(grad: Tensor, x: Tensor, correction: float, fweights: Tensor | None,
                  aweights: Tensor | None) -> tuple:
    """Gradients of C = (xc * w) xc^T / divisor (xc: x centred on its weighted mean) for the (p, p) ``grad``.

    The mean's own gradient is zero: the weighted sum of the centred observations vanishes.
    An analytic weight's gradient is its observation's quadratic form xc_k^T grad xc_k / divisor, plus the
    divisor's dependence on it.
    """
    w, centred, divisor = _cov_parts(x, correction, fweights, aweights)
    symmetric = grad + grad.mT
    spread = symmetric @ centred / divisor
    grad_x = (spread * w if w is not None else spread).reshape(x.shape)
    if aweights is None:
        return grad_x, None
    c = (centred * w) @ centred.mT / divisor
    grad_divisor = -(grad * c).sum() / divisor
    total = w.sum()
    f = fweights.to(x.dtype) if fweights is not None else torch.ones_like(aweights)
    square = (w * aweights).sum()
    d_divisor = f * (1 - correction * (2 * aweights * total - square) / total**2) if correction != 0 else f
    quadratic = (centred * (grad @ centred)).sum(0) / divisor
    return grad_x, f * quadratic + grad_divisor * d_divisor


def cov(g: Tensor, out: Tensor, x: Tensor, correction: int = 1, fweights: Tensor | None = None,
        aweights: Tensor | None = None) -> tuple:
    """torch.cov (correction, fweights and aweights are keywords in torch; bound here by position so that
    recorded analytic weights receive their gradient too; frequency weights are integers)."""
    p = 1 if x.dim() < 2 else x.shape[0]
    grad_x, grad_aweights = _cov_backward(g.reshape(p, p), x, correction, fweights, aweights)
    return grad_x, None, None, grad_aweights


def corrcoef(g: Tensor, out: Tensor, x: Tensor) -> Tensor:
    """R = C / (s s^T) with s = sqrt(diag C), clipped to [-1, 1] (torch's clip passes no gradient where it cut)."""
    _, centred, divisor = _cov_parts(x, 1, None, None)
    c = centred @ centred.mT / divisor
    if x.dim() < 2 or x.shape[0] == 1:  # torch: c / c
        grad_c = g.reshape(1, 1) / c - g.reshape(1, 1) * c / (c * c)
        return _cov_backward(grad_c, x, 1, None, None)[0]
    s = c.diagonal().sqrt()
    outer = s.unsqueeze(1) * s.unsqueeze(0)
    unclipped = c / s.view(-1, 1) / s.view(1, -1)
    g = g * ((unclipped >= -1) & (unclipped <= 1))
    grad_c = g / outer
    grad_s = -((g * unclipped).sum(1) + (g * unclipped).sum(0)) / s
    grad_c = grad_c + torch.diag_embed(grad_s / (2 * s))
    return _cov_backward(grad_c, x, 1, None, None)[0]


defop("cov", cov)
defop("corrcoef", corrcoef)
defop("var", var_rule)
defop("std", std_rule)
defop("var_mean", _with_mean(var_rule), multi=True)
defop("std_mean", _with_mean(std_rule), multi=True)


def _select_reduction(g: Tensor, out: Any, x: Tensor, dim: Any, keepdim: bool) -> Tensor:
    if isinstance(dim, Tensor):
        raise AssertionError("binary max/min are dispatched before this point")
    if dim is None:
        # NOTE: a full max() or median() splits the gradient evenly among ties, as torch does; a NaN result is the NaNs'
        mask = (x == out) | (x.isnan() & out.isnan())
        return mask * (g / mask.sum())
    values, indices = out
    if not keepdim and x.dim() > 0:
        g, indices = g.unsqueeze(dim), indices.unsqueeze(dim)
    # NOTE: max(dim) ties: the gradient goes to the returned index only, as torch does
    return torch.zeros_like(x).scatter(dim, indices, g)


def max_rule(g: Tensor, out: Any, x: Tensor, dim: Any = None, keepdim: bool = False, *, output_index: int = 0) -> Any:
    """Gradient flows to the selected element (``max(x, y)`` with a tensor is ``maximum``)."""
    if isinstance(dim, Tensor):
        return maximum(g, out, x, dim)
    return _select_reduction(g, out, x, dim, keepdim)


def min_rule(g: Tensor, out: Any, x: Tensor, dim: Any = None, keepdim: bool = False, *, output_index: int = 0) -> Any:
    if isinstance(dim, Tensor):
        return minimum(g, out, x, dim)
    return _select_reduction(g, out, x, dim, keepdim)


defop("max", max_rule, multi=True)
defop("min", min_rule, multi=True)


# the selections max/min make: median(dim), kthvalue and mode give the gradient to the returned index, a full
# median() shares it among the elements equal to it
for _name in ("median", "nanmedian"):
    defop(_name, lambda g, out, x, dim=None, keepdim=False, *, output_index=0: _select_reduction(
        g, out, x, dim, keepdim), multi=True)
defop("kthvalue", lambda g, out, x, k, dim=-1, keepdim=False, *, output_index=0: _select_reduction(
    g, out, x, dim, keepdim), multi=True)
defop("mode", lambda g, out, x, dim=-1, keepdim=False, *, output_index=0: _select_reduction(
    g, out, x, dim, keepdim), multi=True)


def _quantile(ignore_nan: bool) -> Callable[..., tuple]:
    """quantile (nanquantile): each output interpolates two neighbours among x's values sorted along ``dim`` (all
    of x without one), at torch's rank q * (count - 1); they take g * (1 - weight) and g * weight.

    The ranks are torch's: quantile counts every value and a slice holding a NaN gives NaN (its last, sorted
    value); nanquantile counts the others. A tensor q takes g * (upper - lower) * (count - 1) with linear
    interpolation (where the rank moves with q), and nothing with the others, whose weights do not depend on it.
    """

    def rule(g: Tensor, out: Tensor, x: Tensor, q: Any, dim: int | None = None, keepdim: bool = False, *,
             interpolation: str = "linear") -> tuple:
        values = x.reshape(-1) if dim is None or x.dim() == 0 else x.movedim(dim, -1)
        ordered, order = values.sort(-1)
        probs = q.reshape(-1) if isinstance(q, Tensor) else torch.tensor([q], dtype=x.dtype, device=x.device)
        if ignore_nan:
            scale = (~ordered.isnan()).sum(-1, keepdim=True).to(x.dtype) - 1
            raw = probs * scale
            moving = raw >= 0  # an all-NaN slice has rank 0 (the NaN): no q moves it
            ranks = raw.clamp_min(0)
        else:
            scale = torch.full_like(ordered[..., :1], ordered.shape[-1] - 1)
            moving = ~ordered.isnan().any(-1, keepdim=True)
            ranks = torch.where(moving, probs * scale, scale)
        rounding = {"lower": torch.floor, "higher": torch.ceil, "nearest": torch.round}.get(interpolation)
        if rounding is not None:
            ranks = rounding(ranks)
        below, above = ranks.floor(), ranks.ceil()
        weight = torch.full_like(ranks, 0.5) if interpolation == "midpoint" else ranks - below
        g = g.movedim(0, -1) if isinstance(q, Tensor) and q.dim() == 1 else g.unsqueeze(-1)
        g = g.reshape(ranks.shape)
        grad = torch.zeros_like(ordered).scatter_add(-1, below.long(), g * (1 - weight)).scatter_add(
            -1, above.long(), g * weight)
        grad = torch.zeros_like(grad).scatter(-1, order, grad)
        grad_x = grad.reshape(x.shape) if dim is None or x.dim() == 0 else grad.movedim(-1, dim)
        if not isinstance(q, Tensor) or interpolation != "linear":
            return grad_x, None
        gap = ordered.gather(-1, above.long()) - ordered.gather(-1, below.long())
        grad_ranks = (g * gap).masked_fill(~moving, 0) * scale
        return grad_x, grad_ranks.reshape(-1, probs.shape[0]).sum(0).reshape(q.shape)

    return rule


defop("quantile", _quantile(False))
defop("nanquantile", _quantile(True))

def amax(g: Tensor, out: Tensor, x: Tensor, dim: Any = (), keepdim: bool = False) -> Tensor:
    """Ties share the gradient evenly along the reduced dimensions."""
    mask = _unreduce(out, x, dim, keepdim) == x
    return (_unreduce(g, x, dim, keepdim) / mask.sum(_dims(dim, x.dim()), keepdim=True)) * mask


defop("amax", amax)
defop("amin", amax)
# (min, max): each output's gradient as amin's or amax's, ties sharing it evenly
defop("aminmax", lambda g, out, x, *, dim=None, keepdim=False, output_index=0: amax(
    g, out[output_index], x, () if dim is None else dim, keepdim), multi=True)
defop(
    "logsumexp",
    lambda g, out, x, dim, keepdim=False: _unreduce(g, x, dim, keepdim) * (x - _unreduce(out, x, dim, keepdim)).exp(),
    funcs=("special.logsumexp",),
)
# with dtype=, torch casts g back to x's dtype before the reversed cumsum (its rounding, not the wider dtype's)
defop("cumsum", lambda g, out, x, dim, *, dtype=None: (g if dtype is None else g.to(x.dtype)).flip(dim).cumsum(
    dim).flip(dim))


def _products_of_others(x: Tensor, dim: int) -> Tensor:
    """For each element, the product of the other elements along ``dim`` (no division: zeros are fine)."""
    ones = torch.ones_like(x.narrow(dim, 0, 1))
    n = x.shape[dim]
    before = torch.cat([ones, x.narrow(dim, 0, n - 1)], dim).cumprod(dim)
    after = torch.cat([x.narrow(dim, 1, n - 1), ones], dim).flip(dim).cumprod(dim).flip(dim)
    return before * after


def prod_rule(g: Tensor, out: Tensor, x: Tensor, dim: Any = None, keepdim: bool = False, *,
              dtype: Any = None) -> Tensor:
    """d prod / dx_i = the product of the other elements (computed without dividing by x_i)."""
    if x.numel() == 0:
        return torch.zeros_like(x)
    if dim is None or x.dim() == 0:
        return (g * _products_of_others(x.reshape(-1), 0)).reshape(x.shape)
    return _unreduce(g, x, dim, keepdim) * _products_of_others(x, dim % x.dim())


defop("prod", prod_rule)


def _select_sorted(g: Tensor, out: Any, x: Tensor, dim: int) -> Tensor:
    """sort / topk values: each gradient goes back to the position its value came from."""
    if x.dim() == 0:
        return g
    return torch.zeros_like(x).scatter(dim, out[1], g)


defop("sort", lambda g, out, x, dim=-1, descending=False, *, stable=None, output_index=0: _select_sorted(
    g, out, x, dim), multi=True)
defop("msort", lambda g, out, x: _select_sorted(g, (out, x.sort(0).indices), x, 0))  # msort(x) = sort(x, 0)[0]
defop("topk", lambda g, out, x, k, dim=-1, largest=True, sorted=True, *, output_index=0: _select_sorted(
    g, out, x, dim), multi=True)


def _reversed_cumsum(t: Tensor, dim: int) -> Tensor:
    return t.flip(dim).cumsum(dim).flip(dim)


def cumprod(g: Tensor, out: Tensor, x: Tensor, dim: int, *, dtype: Any = None) -> Tensor:
    """d out_j / dx_i = prod_{k <= j, k != i} x_k for j >= i, computed without dividing by a zero.

    Before a slice's first zero this is out_j / x_i; at the first zero, the cumprod with that zero set
    to 1; after it 0 (every product holds that zero). As in torch, ``g`` is cast to x's dtype first.
    """
    g, out = g.to(x.dtype), out.to(x.dtype)
    if x.dim() == 0:
        return g
    zero = x == 0
    seen = zero.cumsum(dim)
    before, first = seen == 0, zero & (seen == 1)
    grad = torch.where(before, _reversed_cumsum(g * out, dim) / torch.where(before, x, 1.0), 0.0)
    skipped = torch.where(first, 1.0, x).cumprod(dim)  # the first zero left out of every product after it
    return grad + torch.where(first, _reversed_cumsum(g * skipped, dim), 0.0)


def _cumulative_select(g: Tensor, out: Any, x: Tensor, dim: int, *, output_index: int = 0) -> Tensor:
    """cummax / cummin: each running extreme's gradient goes to the index it came from (torch's, ties included)."""
    if x.dim() == 0:
        return g
    return torch.zeros_like(x).scatter_add(dim, out[1], g)


def logcumsumexp(g: Tensor, out: Tensor, x: Tensor, dim: int) -> Tensor:
    """sum_{j >= i} g_j exp(x_i - out_j), the positive and negative parts of g summed in log space (no overflow).

    As torch does, log(0) of a part is the dtype's lowest finite number, not -inf.
    """
    if x.dim() == 0:
        return g
    lowest = torch.finfo(g.dtype).min
    log_g = g.abs().log()

    def part(mask: Tensor) -> Tensor:
        terms = torch.where(mask, log_g, lowest) - out
        return (terms.flip(dim).logcumsumexp(dim).flip(dim) + x).exp()

    return part(g > 0) - part(g < 0)


defop("cumprod", cumprod)
defop("cummax", _cumulative_select, multi=True)
defop("cummin", _cumulative_select, multi=True)
defop("logcumsumexp", logcumsumexp)


def _beside(t: Tensor, dim: int, before: bool) -> Tensor:
    """``t`` with one slice of zeros added before (or after) along ``dim``."""
    shape = list(t.shape)
    shape[dim] = 1
    zero = t.new_zeros(shape)
    return torch.cat([zero, t] if before else [t, zero], dim)


def _trapezoid_grads(w: Tensor, y: Tensor, x: Any, dx: Any, dim: int) -> tuple:
    """Gradients of sum_i w_i (y_i + y_i+1) / 2 (x_i+1 - x_i) along ``dim``, ``w`` a weight per interval.

    A 1-d x is laid along ``dim`` (and its gradient summed back to it); another x broadcasts against y,
    padded with leading dimensions, as torch does. Without x the spacing is the number ``dx`` (1 by default).
    """
    n = y.shape[dim]
    if n == 0:
        return torch.zeros_like(y), torch.zeros_like(x) if isinstance(x, Tensor) else None
    if isinstance(x, Tensor):
        shape = [1] * y.dim()
        if x.dim() == 1:
            shape[dim] = x.shape[0]
        else:
            shape[y.dim() - x.dim():] = x.shape
        laid = x.reshape(shape)
        step = laid.narrow(dim, 1, n - 1) - laid.narrow(dim, 0, n - 1)
    else:
        step = 1.0 if dx is None else dx
    weighted = w * step
    grad_y = (_beside(weighted, dim, True) + _beside(weighted, dim, False)) / 2
    if not isinstance(x, Tensor):
        return grad_y, None
    middle = w * (y.narrow(dim, 0, n - 1) + y.narrow(dim, 1, n - 1)) / 2
    grad_x = _beside(middle, dim, True) - _beside(middle, dim, False)
    if x.dim() == 1 and grad_x.dim() > 1:
        grad_x = grad_x.sum([d for d in range(grad_x.dim()) if d != dim])
    return grad_y, grad_x


def trapezoid(g: Tensor, out: Tensor, y: Tensor, x: Tensor | None = None, *, dx: Any = None,
              dim: int = -1) -> tuple:
    """The trapezoidal rule along ``dim``: every interval takes the output's gradient."""
    dim %= y.dim()
    w = g.unsqueeze(dim)
    shape = list(w.shape)
    shape[dim] = max(y.shape[dim] - 1, 0)
    return _trapezoid_grads(w.expand(shape), y, x, dx, dim)


def cumulative_trapezoid(g: Tensor, out: Tensor, y: Tensor, x: Tensor | None = None, *, dx: Any = None,
                         dim: int = -1) -> tuple:
    """The running trapezoidal sums along ``dim``: interval i takes the gradients of the sums from i on."""
    dim %= y.dim()
    return _trapezoid_grads(_reversed_cumsum(g, dim), y, x, dx, dim)


defop("trapezoid", trapezoid)
defop("trapz", trapezoid)
defop("cumulative_trapezoid", cumulative_trapezoid)

def nansum(g: Tensor, out: Tensor, x: Tensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Tensor:
    """sum's gradient, none to the NaNs (which the sum skipped)."""
    return sum_rule(g, out, x, dim, keepdim).masked_fill(x.isnan(), 0)


def nanmean(g: Tensor, out: Tensor, x: Tensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Tensor:
    """nansum divided by the number of non-NaN elements along the reduced dimensions.

    NOTE: times the mask, not masked_fill, as torch: a slice of NaNs only (count 0) gets NaN, not 0.
    """
    kept = ~x.isnan()
    return _unreduce(g, x, dim, keepdim) / kept.sum(_dims(dim, x.dim()), keepdim=True) * kept


defop("nansum", nansum)
defop("nanmean", nanmean)


def diff(g: Tensor, out: Tensor, x: Tensor, n: int = 1, dim: int = -1, prepend: Tensor | None = None,
         append: Tensor | None = None) -> tuple:
    """n rounds of y[1:] - y[:-1] on cat(prepend, x, append): each element gets the difference it starts less
    the one it ends; the pieces of the concatenation get their slices."""
    sizes = [t.shape[dim] if isinstance(t, Tensor) else 0 for t in (prepend, x, append)]
    shape = list(g.shape)
    shape[dim] = 1
    for _ in range(min(n, sum(sizes))):  # (rounds on an already empty difference change nothing)
        zero = g.new_zeros(shape)
        g = torch.cat([zero, g], dim) - torch.cat([g, zero], dim)
    grad_prepend, grad_x, grad_append = g.split(sizes, dim)
    return (grad_x, None, None, grad_prepend if isinstance(prepend, Tensor) else None,
            grad_append if isinstance(append, Tensor) else None)


defop("diff", diff)


def einsum(g: Tensor, out: Tensor, equation: str, *operands: Any) -> tuple:
    """Each operand's gradient is another einsum: the output's gradient contracted with the other operands."""
    as_list = len(operands) == 1 and isinstance(operands[0], (list, tuple))
    tensors = list(operands[0]) if as_list else list(operands)
    equation = equation.replace(" ", "")
    if "..." in equation:
        raise UnsupportedCall("einsum: equations with '...' have no rule")
    inputs, arrow, output = equation.partition("->")
    subscripts = inputs.split(",")
    if not arrow:  # implicit output: the letters used once, in alphabetical order
        output = "".join(sorted(c for c in set(inputs) - {","} if inputs.count(c) == 1))
    grads: list[Any] = []
    for i, (letters, x) in enumerate(zip(subscripts, tensors)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            grads.append(None)
            continue
        if len(set(letters)) != len(letters):
            raise UnsupportedCall(f"einsum: a repeated index within one operand ({letters!r}) has no rule")
        others = [(output, g)] + [(subscripts[j], t) for j, t in enumerate(tensors) if j != i]
        present = set("".join(sub for sub, _ in others))
        kept = "".join(c for c in letters if c in present)
        # NOTE: einsum's forward may promote mixed dtypes on some paths: contract in the output's dtype
        grad = torch.einsum(",".join(sub for sub, _ in others) + "->" + kept, *[t.to(g.dtype) for _, t in others])
        # letters of this operand that appear nowhere else were summed over: broadcast the gradient back
        sizes = iter(grad.shape)
        grad = grad.reshape([next(sizes) if c in present else 1 for c in letters])
        grads.append(grad.expand(torch.broadcast_shapes(grad.shape, x.shape)))
    return (None, grads) if as_list else (None, *grads)


defop("einsum", einsum)


def norm(g: Tensor, out: Tensor, x: Tensor, p: Any = "fro", dim: Any = None, keepdim: bool = False,
         dtype: Any = None) -> Tensor:
    """The vector p-norm over ``dim`` (every element by default); "fro" is the 2-norm: x / ||x|| (0 where it is 0)."""
    if p in ("fro", 2, 2.0, None):
        scale = (_unreduce(g, x, dim, keepdim) / _unreduce(out, x, dim, keepdim))
        return x * scale.masked_fill(_unreduce(out, x, dim, keepdim) == 0, 0)
    if p == "nuc":
        return _spectral_norm(g, x, p, (-2, -1) if dim is None else dim, keepdim, dtype, "norm")
    if isinstance(p, str):
        raise UnsupportedCall(f"norm: the matrix norm p={p!r} has no rule")
    return _norm_grad(_unreduce(g, x, dim, keepdim), x, float(p), _unreduce(out, x, dim, keepdim),
                      _dims(dim, x.dim()))


def linalg_norm(g: Tensor, out: Tensor, x: Tensor, ord: Any = None, dim: Any = None, keepdim: bool = False, *,
                dtype: Any = None) -> Tensor:
    """Vector norms and the Frobenius, nuclear, 2 and -2 matrix norms; the other matrix norms have no rule."""
    two_dims = (dim is None and x.dim() == 2) or (isinstance(dim, (tuple, list)) and len(dim) == 2)
    if two_dims and ord in _SPECTRAL:
        return _spectral_norm(g, x, ord, (-2, -1) if dim is None else dim, keepdim, dtype, "linalg.norm")
    if ord is not None and ord != "fro" and (isinstance(ord, str) or two_dims):
        raise UnsupportedCall(f"linalg.norm: the matrix norm ord={ord!r} has no rule")
    return norm(g, out, x, 2 if ord in (None, "fro") else ord, dim, keepdim)


def matrix_norm(g: Tensor, out: Tensor, A: Tensor, ord: Any = "fro", dim: Any = (-2, -1), keepdim: bool = False, *,
                dtype: Any = None) -> Tensor:
    """The Frobenius norm (the 2-norm of the elements over ``dim``), the nuclear norm and the 2 and -2 norms."""
    if ord in _SPECTRAL:
        return _spectral_norm(g, A, ord, dim, keepdim, dtype, "linalg.matrix_norm")
    if ord != "fro":
        raise UnsupportedCall(f"linalg.matrix_norm: only ord='fro', 'nuc', 2 and -2 have a rule (got {ord!r})")
    return norm(g, out, A, 2, dim, keepdim)


defop("norm", norm)
defop("vector_norm", lambda g, out, x, ord=2, dim=None, keepdim=False, *, dtype=None: norm(
    g, out, x, ord, dim, keepdim), funcs=("linalg.vector_norm",))
defop("linalg_norm", linalg_norm, auto=False, funcs=("linalg.norm",))
defop("matrix_norm", matrix_norm, funcs=("linalg.matrix_norm",))


def nuclear_norm(g: Tensor, out: Tensor, x: Tensor, dim: Any = None, keepdim: bool = False) -> Tensor:
    """torch.nuclear_norm(x, keepdim) or (x, dim, keepdim): the sum of the singular values."""
    if isinstance(dim, bool):
        dim, keepdim = None, dim
    return _spectral_norm(g, x, "nuc", (-2, -1) if dim is None else dim, keepdim, None, "nuclear_norm")


defop("nuclear_norm", nuclear_norm)
defop("frobenius_norm", lambda g, out, x, dim, keepdim=False: norm(g, out, x, 2, dim, keepdim))


def renorm(g: Tensor, out: Tensor, x: Tensor, p: float, dim: int, maxnorm: float) -> Tensor:
    """Each slice along ``dim`` whose p-norm n exceeds maxnorm is scaled by maxnorm / (n + 1e-7), as torch: g times
    that factor, less the norm's gradient times factor / (n + 1e-7) * sum(x * g) over the slice."""
    dims = [d for d in range(x.dim()) if d != dim % x.dim()]
    n = torch.linalg.vector_norm(x, p, dims, keepdim=True)
    factor = maxnorm / (n + 1e-7)
    through_norm = _norm_grad((x * g).sum(dims, keepdim=True), x, float(p), n, dims)
    return torch.where(n > maxnorm, factor * g - factor / (n + 1e-7) * through_norm, g)


defop("renorm", renorm)


def _vector_norm_backward(g: Tensor, x: Tensor, p: float, n: Tensor) -> Tensor:
    """d ||x||_p / dx with ``g`` and the norm ``n`` kept-dim: torch's norm_backward, for finite p != 0."""
    if p == 1:
        return x.sgn() * g
    if p == 2:
        return g * (x / n).masked_fill(n == 0, 0)
    if p < 1:
        return x.sgn() * x.abs().pow(p - 1).masked_fill(x == 0, 0) * g * n.pow(1 - p)
    scaled = x.sgn() * x.abs().pow(p - 1) if p < 2 else x * x.abs().pow(p - 2)
    return scaled * (g / n.pow(p - 1)).masked_fill(n == 0, 0)


def normalize(g: Tensor, out: Tensor, input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """``x / x.norm(p, dim, keepdim=True).clamp_min(eps)``, differentiated through its parts as torch does.

    Where the norm is below ``eps`` (a zero vector) the denominator is the constant ``eps``: ``g / eps``.
    """
    if p <= 0 or math.isinf(p):
        raise UnsupportedCall(f"normalize: only finite p > 0 has a rule (got p={p!r})")
    x = input
    n = x.norm(p, dim, keepdim=True)
    d = n.clamp_min(eps)
    grad_d = (-g * ((x / d) / d)).sum(dim, keepdim=True)
    return g / d + _vector_norm_backward(torch.where(clamp_passes(n, eps), grad_d, 0.0), x, p, n)


def cosine_similarity(g: Tensor, out: Tensor, x1: Tensor, x2: Tensor, dim: int = 1, eps: float = 1e-8) -> tuple:
    """``((x1 / |x1|) * (x2 / |x2|)).sum(dim)``, each norm clamped to ``eps`` outside the gradient, as torch does.

    NOTE: where the clamp acts the gradient still flows through the norm: torch's convention, not the derivative.
    """
    x1, x2 = _expanded(x1, x2)
    g = g.unsqueeze(dim)
    n1, n2 = (torch.linalg.vector_norm(x, 2, dim, keepdim=True) for x in (x1, x2))
    d1, d2 = n1.clamp_min(eps), n2.clamp_min(eps)
    grads = []
    for x, n, d, other, d_other in ((x1, n1, d1, x2, d2), (x2, n2, d2, x1, d1)):
        grad_unit = g * (other / d_other)  # d(a * b)/da = b, a = x / d
        grad_n = (-grad_unit * ((x / d) / d)).sum(dim, keepdim=True)  # through d = n: the clamp is invisible
        grads.append(grad_unit / d + _vector_norm_backward(grad_n, x, 2, n))
    return tuple(grads)


def weight_norm(grad: Tensor, out: Tensor, v: Tensor, g: Tensor, dim: int = 0) -> tuple:
    """``torch._weight_norm`` (``nn.utils.parametrizations.weight_norm``): ``v * (g / ||v||)``, the norm over every
    dimension but ``dim`` (over all of them for ``dim=-1``). (``grad`` is the output's gradient: torch names the
    magnitude ``g``, which a keyword call binds.)

    With ``dim`` the first or the last, torch runs the fused ``_weight_norm_interface``, whose backward kernel this
    calls; for another ``dim`` it differentiates the composite ``v * (g / norm_except_dim(v, 2, dim))``.
    """
    if dim < -1 or dim >= max(v.dim(), 1):
        raise UnsupportedCall(f"_weight_norm: dim={dim} is out of range for a {v.dim()}-dimensional v")
    if dim in (0, v.dim() - 1):
        v, g = v.contiguous(), g.contiguous()  # as torch makes them before its fused kernel, whose backward needs it
        _, norms = torch._weight_norm_interface(v, g, dim)
        return aten._weight_norm_interface_backward(grad.contiguous(), v, g, norms, dim)
    others = [d for d in range(v.dim()) if d != dim] if dim != -1 else list(range(v.dim()))
    norm = torch.linalg.vector_norm(v, 2, others, keepdim=True)
    grad_scale = (grad * v).sum(others, keepdim=True)  # through s = g / norm, w = v * s
    grad_norm = -grad_scale * g / (norm * norm)
    return grad * (g / norm) + grad_norm * v / norm, grad_scale / norm


defop("normalize", normalize)
defop("cosine_similarity", cosine_similarity)
defop("_weight_norm", weight_norm)


def _norm_grad(g: Tensor, x: Tensor, p: float, n: Tensor, dims: Any) -> Tensor:
    """d ||x||_p / dx with ``g`` and the norm ``n`` kept-dim: torch's norm_backward, every p.

    NOTE: p = +-inf shares the gradient among the elements tied at the norm, as torch's amax does; p = 0 (a count)
    has none.
    """
    if p == 0:
        return torch.zeros_like(x)
    if math.isinf(p):
        mask = (x.abs() == n) | x.isnan()
        return x.sgn() * ((g / mask.sum(dims, keepdim=True)) * mask)
    return _vector_norm_backward(g, x, p, n)


def _distance_grad(g: Tensor, diff: Tensor, p: float, dist: Tensor) -> Tensor:
    """The gradient of one p-distance by its difference vector, as torch's cdist and pdist kernels compute it.

    NOTE: unlike norm's, their inf-norm gradient does not share among ties (each tied element gets all of it),
    and a distance of 0 gives 0.
    """
    if p == 0:
        return torch.zeros_like(diff)
    if p == 1:
        return g * diff.sgn()
    if math.isinf(p):
        return g * diff.sgn() * (diff.abs() == dist)
    if p < 2:  # (|diff|**(p - 2) would be inf at a zero coordinate)
        scaled = diff.sgn() * diff.abs().pow(p - 1) * g / dist.pow(p - 1)
        return scaled.masked_fill((dist == 0) | (diff == 0), 0)
    if p == 2:
        return (g * diff / dist).masked_fill(dist == 0, 0)
    return (diff * diff.abs().pow(p - 2) * g / dist.pow(p - 1)).masked_fill(dist == 0, 0)


def dist(g: Tensor, out: Tensor, x: Tensor, other: Tensor, p: float = 2) -> tuple:
    """||x - other||_p over every element (broadcast)."""
    diff = x - other
    grad = _norm_grad(g, diff, float(p), out, tuple(range(diff.dim())))
    return grad, -grad


def pairwise_distance(g: Tensor, out: Tensor, x1: Tensor, x2: Tensor, p: float = 2.0, eps: float = 1e-6,
                      keepdim: bool = False) -> tuple:
    """||x1 - x2 + eps||_p along the last dimension, torch's formula."""
    diff = x1 - x2 + eps
    last = diff.dim() - 1
    grad = _norm_grad(_unreduce(g, diff, last, keepdim), diff, float(p), _unreduce(out, diff, last, keepdim), (last,))
    return grad, -grad


def cdist(g: Tensor, out: Tensor, x1: Tensor, x2: Tensor, p: float = 2.0, compute_mode: Any = None) -> tuple:
    """out[..., i, j] = ||x1[..., i, :] - x2[..., j, :]||_p, differentiated through every pair's difference.

    NOTE: with p = 2 and more than 25 rows torch computes through matrix products, whose gradient differs from
    this one only where two points coincide.
    """
    diff = x1.unsqueeze(-2) - x2.unsqueeze(-3)
    grad = _distance_grad(g.unsqueeze(-1), diff, float(p), out.unsqueeze(-1))
    return grad.sum(-2), -grad.sum(-3)


def pdist(g: Tensor, out: Tensor, input: Tensor, p: float = 2) -> Tensor:
    """The distances between the rows i < j of ``input``, in torch's order (triu_indices)."""
    rows, cols = torch.triu_indices(input.shape[0], input.shape[0], 1, device=input.device)
    grad = _distance_grad(g.unsqueeze(-1), input[rows] - input[cols], float(p), out.unsqueeze(-1))
    return torch.zeros_like(input).index_add(0, rows, grad).index_add(0, cols, -grad)


defop("dist", dist)
defop("pairwise_distance", pairwise_distance)
defop("cdist", cdist)
defop("pdist", pdist)

# ---------------------------------------------------------------- shapes and views

for _name in ("view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
              "ravel"):
    defop(_name, _reshape_back)
for _name in ("contiguous", "clone", "expand", "expand_as", "broadcast_to"):
    defop(_name, _same)  # expand: the engine's broadcast-undo sums the gradient back
# an in-place update of an intermediate under torch.no_grad() (recorded by tensorgraph.record): torch autograd
# does not see it, so the gradient of the new version passes to the earlier one unchanged
defop("no_grad_update", _same, auto=False)
for _name in ("to", "float", "double", "half", "bfloat16", "type", "type_as", "cpu", "cuda"):
    defop(_name, _as_input)

defop("sum_to_size", lambda g, out, x, *size: g.expand(x.shape))
defop("transpose", lambda g, out, x, dim0, dim1: g.transpose(dim0, dim1),
      funcs=("torch.swapaxes", "Tensor.swapaxes", "torch.swapdims", "Tensor.swapdims"))
defop("t", lambda g, out, x: g.t())
defop("T", lambda g, out, x: g.permute(tuple(reversed(range(g.dim())))), auto=False, funcs=("Tensor.T",))
defop("mT", lambda g, out, x: g.mT, auto=False, funcs=("Tensor.mT", "Tensor.mH", "Tensor.H"))
defop("adjoint", lambda g, out, x: g.mT)


def permute(g: Tensor, out: Tensor, x: Tensor, *dims: Any) -> Tensor:
    order = [d % x.dim() for d in _shape_arg(dims)]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return g.permute(tuple(inverse))  # a tuple: permute() of a 0-d tensor takes ()


defop("permute", permute)
defop("movedim", lambda g, out, x, source, destination: g.movedim(destination, source),
      funcs=("torch.moveaxis", "Tensor.moveaxis"))


def repeat(g: Tensor, out: Tensor, x: Tensor, *sizes: Any) -> Tensor:
    """Sum the gradient over every copy: split each dim into (copies, size) and sum the copies."""
    sizes = list(_shape_arg(sizes))
    padded = [1] * (len(sizes) - x.dim()) + list(x.shape)
    split = [v for copies, size in zip(sizes, padded) for v in (copies, size)]
    return g.reshape(split).sum(tuple(range(0, len(split), 2))).reshape(x.shape)


defop("repeat", repeat)


def cat(g: Tensor, out: Tensor, tensors: Sequence[Tensor], dim: int = 0) -> tuple:
    grads, offset = [], 0
    for t in tensors:
        if t.dim() == 1 and t.numel() == 0 and out.dim() > 1:  # torch skips legacy empty inputs
            grads.append(None)
            continue
        grads.append(g.narrow(dim, offset, t.shape[dim]))
        offset += t.shape[dim]
    return (grads,)


defop("cat", cat, funcs=("torch.concat", "torch.concatenate"))
defop("stack", lambda g, out, tensors, dim=0: (list(g.unbind(dim)),))


def _pieces(g: Tensor, out: Sequence[Tensor], index: int) -> list[Tensor]:
    return [g if i == index else torch.zeros_like(o) for i, o in enumerate(out)]


defop("split", lambda g, out, x, split_size_or_sections, dim=0, *, output_index: torch.cat(
    _pieces(g, out, output_index), dim), multi=True, funcs=(
    "torch.split_with_sizes", "Tensor.split_with_sizes", "torch.unsafe_split", "Tensor.unsafe_split",
    "torch.unsafe_split_with_sizes", "Tensor.unsafe_split_with_sizes"))
defop("chunk", lambda g, out, x, chunks, dim=0, *, output_index: torch.cat(_pieces(g, out, output_index), dim),
      multi=True, funcs=("torch.unsafe_chunk", "Tensor.unsafe_chunk"))
# each output is one input broadcast: its gradient goes to that input (the engine sums it back to its shape)
defop("broadcast_tensors", lambda g, out, *tensors, output_index: tuple(
    g if i == output_index else None for i in range(len(tensors))), multi=True)


def meshgrid(g: Tensor, out: Any, *tensors: Any, indexing: str | None = None, output_index: int) -> tuple:
    """Output i is input i laid along dimension i (0 and 1 swapped with indexing='xy') and repeated along the
    others: the gradient summed over those. The inputs may come as one list."""
    inputs = tensors[0] if len(tensors) == 1 and isinstance(tensors[0], (tuple, list)) else tensors
    along = output_index
    if indexing == "xy" and len(inputs) >= 2 and output_index < 2:
        along = 1 - output_index
    grad = g.sum([d for d in range(g.dim()) if d != along]).reshape(inputs[output_index].shape)
    grads = tuple(grad if i == output_index else None for i in range(len(inputs)))
    return (list(grads),) if inputs is not tensors else grads


defop("meshgrid", meshgrid, multi=True)
defop("unbind", lambda g, out, x, dim=0, *, output_index: torch.stack(_pieces(g, out, output_index), dim),
      multi=True)


def getitem(g: Tensor, out: Tensor, x: Tensor, idx: Any) -> tuple:
    """Indexing of every kind (ints, slices, None, ranges, lists, int and bool tensors)."""
    if isinstance(idx, Tensor) and idx.dtype == torch.int64:
        # NOTE: C[Xb]: the same accumulate-into-zeros torch's index backward does
        return torch.zeros_like(x).index_put_((idx,), g, accumulate=True), None
    indices = _advanced_indices(x, idx)
    if indices is not None:  # logprobs[range(n), Yb]: the same, with the ranges as index tensors
        return torch.zeros_like(x).index_put_(indices, g, accumulate=True), None
    if _basic_index(idx) and g.dtype == x.dtype:
        # probs[0], h[:, 1:]: each element is picked at most once, so writing g into zeros is torch's
        # select/slice backward, and reads as the lecture writes it
        grad = torch.zeros_like(x)
        grad[idx] = g
        return grad, None
    return _place(g, x, lambda positions: positions[idx]), None


def _basic_index(idx: Any) -> bool:
    """Whether ``idx`` is basic indexing only (ints, slices, None, ...): no element picked twice."""
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(type(item) in (int, slice) or item is None or item is Ellipsis for item in items)


def _advanced_indices(x: Tensor, idx: Any) -> tuple[Tensor, ...] | None:
    """``idx`` as index tensors when every entry is an advanced index (range, list of ints, int64 tensor)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    if not items or len(items) > x.dim():
        return None
    device = {} if x.device.type == "cpu" else {"device": x.device}
    indices = []
    for item in items:
        if isinstance(item, Tensor) and item.dtype == torch.int64 and item.device == x.device:
            indices.append(item)
        elif isinstance(item, range):
            simple = item.start == 0 and item.step == 1
            indices.append(torch.arange(item.stop, **device) if simple else
                           torch.arange(item.start, item.stop, item.step, **device))
        elif isinstance(item, list) and item and all(type(i) is int for i in item):
            indices.append(torch.tensor(item, **device))
        else:
            return None
    return tuple(indices)


defop("getitem", getitem, auto=False, funcs=("Tensor.__getitem__",))


def setitem(g: Tensor, out: Tensor, x: Tensor, idx: Any, value: Any) -> tuple:
    """``x[idx] = value``: overwritten elements get no gradient; value gets the gradient there."""
    grad_x = g.clone()
    grad_x[idx] = 0
    return grad_x, None, (g[idx] if isinstance(value, Tensor) else None)


defop("setitem", setitem, auto=False, inplace=("Tensor.__setitem__",))
defop("copy", lambda g, out, x, src, non_blocking=False: (None, g.to(dtype=src.dtype, device=src.device)),
      auto=False, inplace=("Tensor.copy_",))


def index_put(g: Tensor, out: Tensor, x: Tensor, indices: Any, values: Tensor, accumulate: bool = False) -> tuple:
    grad_x = g
    if not accumulate:
        grad_x = g.clone()
        grad_x[indices] = 0
    return grad_x, None, g[indices]


defop("index_put", index_put)
# x with src written over a selection of it: x's gradient without the selection, src's the selection of g
defop("select_scatter", lambda g, out, x, src, dim, index: (
    g.select_scatter(torch.zeros_like(src), dim, index), g.select(dim, index)))
defop("diagonal_scatter", lambda g, out, x, src, offset=0, dim1=0, dim2=1: (
    g.diagonal_scatter(torch.zeros_like(src), offset, dim1, dim2), g.diagonal(offset, dim1, dim2)))


def slice_scatter(g: Tensor, out: Tensor, x: Tensor, src: Tensor, dim: int = 0, start: int | None = None,
                  end: int | None = None, step: int = 1) -> tuple:
    window = (slice(None),) * (dim % x.dim()) + (slice(start, end, step),)
    return g.slice_scatter(torch.zeros_like(src), dim, start, end, step), g[window]


defop("slice_scatter", slice_scatter)
# x.put(index, source): source's elements written (or added) at x's flat positions; torch gives every source
# element the gradient at its position, duplicates overwritten or not
defop("put", lambda g, out, x, index, source, accumulate=False: (
    g if accumulate else g.put(index, torch.zeros_like(source)), None, g.take(index).reshape(source.shape)))


def as_strided(g: Tensor, out: Tensor, x: Tensor, size: Any, stride: Any, storage_offset: int | None = None) -> Tensor:
    """Each output element reads a memory position of x: its gradient goes back there (repeats add up).

    Only a contiguous x has a rule: the positions are x's own then, read from the elements' flat order.
    """
    if not x.is_contiguous():
        raise UnsupportedCall("as_strided: only a contiguous input has a rule (make it one: x.contiguous())")
    offset = 0 if storage_offset is None else storage_offset - x.storage_offset()
    if offset < 0 or offset + sum((n - 1) * s for n, s in zip(size, stride) if n > 0) >= max(x.numel(), 1):
        raise UnsupportedCall("as_strided: the view reads memory outside its input; it has no rule")
    return _place(g, x, lambda positions: positions.as_strided(size, stride, offset))


defop("as_strided", as_strided)
defop("index_add", lambda g, out, x, dim, index, source, *, alpha=1: (
    g, None, None, g.index_select(dim, index) if alpha == 1 else g.index_select(dim, index) * alpha))


def _scattered_src_grad(g: Tensor, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """The gradient of a scatter's ``src``: gathered where ``index`` reads it, 0 where ``src`` is larger than it."""
    return _as_src(g.gather(dim, index), src)


def _as_src(grad: Tensor, src: Tensor) -> Tensor:
    """A gradient of the part of ``src`` a scatter reads (``index``'s shape), padded with zeros to ``src``'s shape."""
    if grad.shape == src.shape:
        return grad
    padded = grad.new_zeros(src.shape)  # torch reads only src[:index.shape[0], :index.shape[1], ...]
    padded[tuple(slice(0, n) for n in grad.shape)] = grad
    return padded


defop("scatter_add", lambda g, out, x, dim, index, src: (g, None, None, _scattered_src_grad(g, dim, index, src)))


def scatter(g: Tensor, out: Tensor, x: Tensor, dim: int, index: Tensor, src: Any = None, *, value: Any = None,
            reduce: Any = None) -> tuple:
    if reduce is not None:
        raise UnsupportedCall("scatter: reduce= has no rule")
    grad_src = _scattered_src_grad(g, dim, index, src) if isinstance(src, Tensor) else None
    return g.scatter(dim, index, 0), None, None, grad_src


defop("scatter", scatter)


def _others_product(members: Tensor, product: Tensor, zeros: Tensor) -> Tensor:
    """The product of the other members of each one's group, from the group's product of its non-zero members and
    its count of zeros: no division by a zero member."""
    is_zero = members == 0
    return torch.where(zeros - is_zero.to(zeros.dtype) > 0, 0.0, product / members.masked_fill(is_zero, 1))


def scatter_reduce(g: Tensor, out: Tensor, x: Tensor, dim: int, index: Tensor, src: Tensor, reduce: str, *,
                   include_self: bool = True) -> tuple:
    """Each output element reduces its x (with include_self) and the src elements scattered to it; an element
    nothing is scattered to keeps x's. sum and mean pass g (divided by the count); amax and amin share it among
    the members equal to the result, as torch; prod gives each member the product of the others."""
    part = src[tuple(slice(0, n) for n in index.shape)]
    scattered = torch.zeros_like(x).scatter(dim, index, 1.0) > 0
    if reduce in ("sum", "mean"):
        count = torch.zeros_like(x).scatter_add(dim, index, torch.ones_like(part)) + int(include_self)
        share = g / count.clamp_min(1) if reduce == "mean" else g
        grad_x = share if include_self else g.masked_fill(scattered, 0)
        return grad_x, None, None, _as_src(share.gather(dim, index), src)
    if reduce in ("amax", "amin"):
        own = (x == out) & (scattered.logical_not() | include_self)
        hits = part == out.gather(dim, index)
        count = own.to(g.dtype).scatter_add(dim, index, hits.to(g.dtype))
        share = g / count
        return share * own, None, None, _as_src(share.gather(dim, index) * hits, src)
    if reduce != "prod":
        raise UnsupportedCall(f"scatter_reduce: reduce={reduce!r} has no rule")
    own = x if include_self else torch.ones_like(x)
    product = own.masked_fill(own == 0, 1).scatter_reduce(dim, index, part.masked_fill(part == 0, 1), "prod")
    zeros = (own == 0).to(g.dtype).scatter_add(dim, index, (part == 0).to(g.dtype))
    grad_x = g * _others_product(x, product, zeros) if include_self else g.masked_fill(scattered, 0)
    grad_src = g.gather(dim, index) * _others_product(part, product.gather(dim, index), zeros.gather(dim, index))
    return grad_x, None, None, _as_src(grad_src, src)


defop("scatter_reduce", scatter_reduce)
# x.index_reduce(dim, index, source, reduce): scatter_reduce with index laid along dim and expanded to source's shape
defop("index_reduce", lambda g, out, x, dim, index, source, reduce, *, include_self=True: scatter_reduce(
    g, out, x, dim, index.reshape([-1 if d == dim % source.dim() else 1 for d in range(source.dim())]).expand(
        source.shape), source, reduce, include_self=include_self))
defop("index_select", lambda g, out, x, dim, index: (torch.zeros_like(x).index_add_(dim, index, g), None, None))
defop("gather", lambda g, out, x, dim, index, *, sparse_grad=False: (
    torch.zeros_like(x).scatter_add_(dim, index, g), None, None))
defop("narrow", lambda g, out, x, dim, start, length: _place(g, x, lambda p: p.narrow(dim, start, length)))
defop("select", lambda g, out, x, dim, index: _place(g, x, lambda p: p.select(dim, index)))
defop("diagonal", lambda g, out, x, offset=0, dim1=0, dim2=1: _place(g, x, lambda p: p.diagonal(offset, dim1, dim2)))
defop("linalg_diagonal", lambda g, out, A, *, offset=0, dim1=-2, dim2=-1: _place(
    g, A, lambda p: p.diagonal(offset, dim1, dim2)), auto=False, funcs=("linalg.diagonal",))
defop("masked_select", lambda g, out, x, mask: (torch.zeros_like(x).masked_scatter(mask.expand_as(x), g), None))
defop("tril", lambda g, out, x, diagonal=0: g.tril(diagonal))
defop("triu", lambda g, out, x, diagonal=0: g.triu(diagonal))
defop("flip", lambda g, out, x, *dims: g.flip(*dims))


def roll(g: Tensor, out: Tensor, x: Tensor, shifts: Any, dims: Any = None) -> Tensor:
    back = -shifts if isinstance(shifts, int) else [-s for s in shifts]
    return g.roll(back, dims) if dims is not None else g.roll(back)


defop("roll", roll)
defop("tile", lambda g, out, x, *dims: repeat(g, out, x, *([1] * (x.dim() - len(_shape_arg(dims)))
                                                            + list(_shape_arg(dims)))))


def repeat_interleave(g: Tensor, out: Tensor, x: Tensor, repeats: Any, dim: int | None = None, *,
                      output_size: int | None = None) -> Tensor:
    """Each element's copies are consecutive along ``dim`` (x flattened without one): sum them back."""
    source = x.reshape(-1) if dim is None else x
    dim = 0 if dim is None else dim % x.dim()
    if isinstance(repeats, int):
        grad = g.unflatten(dim, (source.shape[dim], repeats)).sum(dim + 1)
    else:
        index = torch.arange(source.shape[dim], device=g.device).repeat_interleave(repeats.reshape(-1))
        grad = torch.zeros_like(source, dtype=g.dtype).index_add(dim, index, g)
    return grad.reshape(x.shape)


defop("repeat_interleave", repeat_interleave)
# selections: each output element is an element of x (broadcast or repeated: _place adds up the copies)
defop("take_along_dim", lambda g, out, x, indices, dim=None: (
    _place(g, x, lambda p: torch.take_along_dim(p, indices, dim)), None))
defop("take", lambda g, out, x, index: (_place(g, x, lambda p: p.take(index)), None))
defop("unfold", lambda g, out, x, dimension, size, step: _place(g, x, lambda p: p.unfold(dimension, size, step)),
      auto=False, funcs=("Tensor.unfold",))
defop("diag", lambda g, out, x, diagonal=0: g.diagonal(diagonal) if x.dim() == 1 else _place(
    g, x, lambda p: p.diag(diagonal)))
defop("diag_embed", lambda g, out, x, offset=0, dim1=-2, dim2=-1: g.diagonal(offset, dim1, dim2))
defop("diagflat", lambda g, out, x, offset=0: g.diagonal(offset).reshape(x.shape))
defop("narrow_copy", lambda g, out, x, dim, start, length: _place(g, x, lambda p: p.narrow(dim, start, length)))
defop("rot90", lambda g, out, x, k=1, dims=(0, 1): g.rot90(-k, dims))
defop("fliplr", lambda g, out, x: g.fliplr())
defop("flipud", lambda g, out, x: g.flipud())
for _name in ("atleast_1d", "atleast_2d", "atleast_3d"):
    defop(_name, _reshape_back)


def _stacked(g: Tensor, tensors: Sequence[Tensor], promote: Any, dim: int) -> tuple:
    """The gradients of a cat of the ``promote``d tensors along ``dim``: each its slice, in its own shape."""
    grads, offset = [], 0
    for t in tensors:
        size = promote(t).shape[dim]
        grads.append(g.narrow(dim, offset, size).reshape(t.shape))
        offset += size
    return (grads,)


defop("hstack", lambda g, out, tensors: _stacked(g, tensors, torch.atleast_1d, 0 if out.dim() == 1 else 1))
defop("vstack", lambda g, out, tensors: _stacked(g, tensors, torch.atleast_2d, 0), funcs=("torch.row_stack",))
defop("dstack", lambda g, out, tensors: _stacked(g, tensors, torch.atleast_3d, 2))
defop("column_stack", lambda g, out, tensors: _stacked(
    g, tensors, lambda t: t.reshape(-1, 1) if t.dim() <= 1 else t, 1))
# the pieces of tensor_split and its dimension-named forms: each piece's gradient goes back to its slice
defop("tensor_split", lambda g, out, x, indices_or_sections, dim=0, *, output_index: torch.cat(
    _pieces(g, out, output_index), dim), multi=True)
defop("hsplit", lambda g, out, x, sections, *, output_index: torch.cat(
    _pieces(g, out, output_index), 1 if x.dim() > 1 else 0), multi=True)
defop("vsplit", lambda g, out, x, sections, *, output_index: torch.cat(_pieces(g, out, output_index), 0), multi=True)
defop("dsplit", lambda g, out, x, sections, *, output_index: torch.cat(_pieces(g, out, output_index), 2), multi=True)


def index_fill(g: Tensor, out: Tensor, x: Tensor, dim: int, index: Tensor, value: Any) -> tuple:
    """The filled positions take nothing from x; a tensor value gets the sum of their gradients."""
    grad_value = g.index_select(dim, index).sum() if isinstance(value, Tensor) else None
    return g.index_fill(dim, index, 0), None, None, grad_value


def masked_scatter(g: Tensor, out: Tensor, x: Tensor, mask: Tensor, source: Tensor) -> tuple:
    """The k-th masked position takes source's k-th element: that element gets its gradient, the rest of source 0."""
    mask = mask.expand(g.shape).reshape(-1)
    rank = (mask.cumsum(0) - 1).clamp_min(0)  # the source element each masked position read
    grad_source = torch.zeros(source.numel(), dtype=g.dtype, device=g.device).scatter_add(
        0, rank, g.reshape(-1).masked_fill(~mask, 0))
    return g.masked_fill(mask.view(g.shape), 0), None, grad_source.view(source.shape)


defop("index_fill", index_fill)
defop("index_copy", lambda g, out, x, dim, index, source: (
    g.index_fill(dim, index, 0), None, None, g.index_select(dim, index)))
defop("masked_scatter", masked_scatter)


def pad(g: Tensor, out: Tensor, x: Tensor, pad: Sequence[int], mode: str = "constant", value: Any = None) -> Tensor:
    """Constant padding (and cropping): the gradient is the un-padded window of ``g``; reflect, replicate and
    circular padding copy elements of x, whose copies add up."""
    if mode != "constant":
        return _place(g, x, lambda positions: F.pad(positions, pad, mode=mode))
    positions = F.pad(torch.arange(x.numel(), device=x.device).view(x.shape), pad, value=-1)
    keep = positions >= 0
    flat = torch.zeros(x.numel(), dtype=g.dtype, device=g.device)
    return flat.index_add_(0, positions[keep], g[keep]).view(x.shape)


defop("pad", pad)
_padding = pad  # (constant_pad_nd's argument is named pad too)
defop("constant_pad_nd", lambda g, out, x, pad, value=0: _padding(g, out, x, pad))


def block_diag(g: Tensor, out: Tensor, *tensors: Tensor) -> tuple:
    """Each block's gradient is its window of ``g`` (a 0-d block is 1x1, a 1-d one a single row)."""
    grads, row, col = [], 0, 0
    for t in tensors:
        rows, cols = (t.shape[0], t.shape[1]) if t.dim() == 2 else (1, t.numel())
        grads.append(g[row:row + rows, col:col + cols].reshape(t.shape))
        row, col = row + rows, col + cols
    return tuple(grads)


def cartesian_prod(g: Tensor, out: Tensor, *tensors: Tensor) -> tuple:
    """Column i of the product holds tensor i's elements: their gradients add up (one tensor: itself)."""
    if len(tensors) == 1:
        return (g,)
    positions = torch.cartesian_prod(*(torch.arange(t.numel(), device=t.device) for t in tensors))
    return tuple(_place(g[:, i], t, lambda _, i=i: positions[:, i]) for i, t in enumerate(tensors))


def _vander_grad(g: Tensor, increasing: Tensor) -> Tensor:
    """d/dx of the powers x^0 .. x^(N-1) (the last dim of ``increasing``): k x^(k-1), the column before times k."""
    if increasing.shape[-1] < 2:
        return torch.zeros_like(increasing[..., 0])
    k = torch.arange(1, increasing.shape[-1], dtype=g.dtype, device=g.device)
    return (g[..., 1:] * k * increasing[..., :-1]).sum(-1)


defop("block_diag", block_diag)
defop("cartesian_prod", cartesian_prod)
defop("combinations", lambda g, out, x, r=2, with_replacement=False: _place(
    g, x, lambda positions: torch.combinations(positions, r, with_replacement)))
defop("vander", lambda g, out, x, N=None, increasing=False: _vander_grad(
    g if increasing else g.flip(-1), out if increasing else out.flip(-1)))
defop("linalg_vander", lambda g, out, x, *, N=None: _vander_grad(g, out), auto=False, funcs=("linalg.vander",))

# ---------------------------------------------------------------- neural-network ops


def _softmax_dim(x: Tensor, dim: Any) -> int:
    return dim if dim is not None else (0 if x.dim() in (0, 1, 3) else 1)


# With dtype=, torch casts x first and differentiates the softmax in out's dtype (the engine casts the result
# back to x's): the kernels are given out.dtype, since they refuse a float16 x with a float32 out on CPU.
defop(  # out * (g - (g * out).sum(dim, keepdim=True)) in torch's fused kernel
    "softmax",
    lambda g, out, x, dim=None, dtype=None, *, _stacklevel=3: aten._softmax_backward_data(
        g, out, _softmax_dim(x, dim), out.dtype),
    funcs=("special.softmax",),
)
defop(  # g - out.exp() * g.sum(dim, keepdim=True) in torch's fused kernel
    "log_softmax",
    lambda g, out, x, dim=None, dtype=None, *, _stacklevel=3: aten._log_softmax_backward_data(
        g, out, _softmax_dim(x, dim), out.dtype),
    funcs=("special.log_softmax",),
)
defop(  # softmax(-x, dim): softmax's kernel, negated
    "softmin",
    lambda g, out, x, dim=None, _stacklevel=3, dtype=None: -aten._softmax_backward_data(
        g, out, _softmax_dim(x, dim), out.dtype),
)


def _nll_grad(logp: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
              smoothing: float) -> tuple[Tensor, Any, Tensor]:
    """d loss_n / d logp for class-index targets (before scaling by g), the mean's denominator, the kept targets."""
    class_dim = 1 if logp.dim() >= 2 else 0
    n_classes = logp.shape[class_dim]
    keep = target != ignore_index
    safe = target.masked_fill(~keep, 0)
    onehot = torch.zeros_like(logp).scatter(class_dim, safe.unsqueeze(class_dim), 1.0)
    w_target = (weight[safe] if weight is not None else torch.ones_like(safe, dtype=logp.dtype)) * keep
    grad = -onehot * w_target.unsqueeze(class_dim) * (1.0 - smoothing)
    if smoothing:
        shape = [1] * logp.dim()
        shape[class_dim] = n_classes
        w_class = weight.view(shape) if weight is not None else torch.ones(shape, dtype=logp.dtype,
                                                                            device=logp.device)
        grad = grad - (smoothing / n_classes) * w_class * keep.unsqueeze(class_dim)
    return grad, w_target.sum(), keep


def _scale_nll(g: Tensor, per_element: Tensor, keep: Tensor, reduction: str, denom: Tensor,
               batch_dim: int | None, class_dim: int) -> Tensor:
    # NOTE: rows with an ignored target get 0, as torch skips them: with every target ignored the mean's
    # denominator is 0, and 0 * (g / 0) would be nan there
    scaled = _scale_loss(g, per_element, reduction, denom, batch_dim)
    return scaled.masked_fill(~keep.unsqueeze(class_dim), 0)


def nll_loss(g: Tensor, out: Tensor, x: Tensor, target: Tensor, weight: Tensor | None = None, size_average=None,
             ignore_index: int = -100, reduce=None, reduction: str = "mean") -> tuple:
    reduction = _reduction(size_average, reduce, reduction)
    per_element, denom, keep = _nll_grad(x, target, weight, ignore_index, reduction, 0.0)
    class_dim = 1 if x.dim() >= 2 else 0
    batch_dim = class_dim if x.dim() >= 2 else None
    return _scale_nll(g, per_element, keep, reduction, denom, batch_dim, class_dim), None, None


def cross_entropy(g: Tensor, out: Tensor, x: Tensor, target: Tensor, weight: Tensor | None = None,
                  size_average=None, ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> tuple:
    """log_softmax then nll: d/dlogits = softmax(logits) * sum(dlogp) - ... , via torch's log_softmax kernel."""
    reduction = _reduction(size_average, reduce, reduction)
    fused = _symbolic("cross_entropy", g, x, target, weight, ignore_index, reduction, label_smoothing)
    if fused is not None:  # class-index targets, mean or sum: the closed form tensorgraph.symbolic derives
        return fused, None, None
    logp, grad_logp, grad_target, class_dim = cross_entropy_parts(g, x, target, weight, ignore_index, reduction,
                                                                  label_smoothing)
    return aten._log_softmax_backward_data(grad_logp, logp, class_dim, x.dtype), grad_target, None


def cross_entropy_parts(g: Tensor, x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                        reduction: str, label_smoothing: float) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """Cross entropy as nll of log_softmax: ``(logp, d loss / d logp, d loss / d target or None, class_dim)``."""
    class_dim = 1 if x.dim() >= 2 else 0
    logp = x.log_softmax(class_dim)
    batch_dim = class_dim if x.dim() >= 2 else None
    grad_target = keep = None
    if target.is_floating_point():  # class probabilities: loss_n = -sum_c w_c t_nc logp_nc
        n_classes = x.shape[class_dim]
        probs = target * (1 - label_smoothing) + label_smoothing / n_classes if label_smoothing else target
        class_weight = 1.0
        if weight is not None:
            shape = [1] * x.dim()
            shape[class_dim] = n_classes
            class_weight = weight.view(shape)
        per_element, denom = -probs * class_weight, x.numel() / n_classes
        grad_target = _scale_loss(g, -logp * class_weight * (1 - label_smoothing), reduction, denom, batch_dim)
    else:
        per_element, denom, keep = _nll_grad(logp, target, weight, ignore_index, reduction, label_smoothing)
    grad_logp = (_scale_loss(g, per_element, reduction, denom, batch_dim) if keep is None else _scale_nll(
        g, per_element, keep, reduction, denom, batch_dim, class_dim)).to(logp.dtype)  # weight may be wider
    return logp, grad_logp, grad_target, class_dim


# (class weights: torch defines no derivative for them)
defop("nll_loss", nll_loss, underived=(2,))
defop("cross_entropy", cross_entropy, underived=(2,))


def linear_cross_entropy(g: Tensor, out: Tensor, input: Tensor, linear_weight: Tensor, target: Tensor,
                         linear_bias: Tensor | None = None, weight: Tensor | None = None, reduction: str = "mean",
                         ignore_index: int | None = None, label_smoothing: float = 0.0, options: Any = None) -> tuple:
    """cross_entropy(linear(input, W, b), target, ...) with the logits shaped (*batch, C, *out_features) for a
    weight of shape (C, *out_features, in): torch's reference computation (its chunked path, with ``options``,
    computes the same loss), through cross_entropy's rule and linear's."""
    flat_weight = linear_weight.reshape(-1, linear_weight.shape[-1])
    flat_bias = None if linear_bias is None else linear_bias.reshape(-1)
    logits = F.linear(input, flat_weight, flat_bias)
    shaped = logits.reshape(*input.shape[:-1], *linear_weight.shape[:-1])
    grad_logits, grad_target, _ = cross_entropy(g, out, shaped, target, weight, None,
                                                -100 if ignore_index is None else ignore_index, None, reduction,
                                                label_smoothing)
    grad_logits = grad_logits.reshape(logits.shape)
    grad_input, grad_weight, _ = linear(grad_logits, logits, input, flat_weight, None)
    grad_bias = None
    if linear_bias is not None:
        grad_bias = grad_logits.reshape(-1, logits.shape[-1]).sum(0).reshape(linear_bias.shape)
    return grad_input, grad_weight.reshape(linear_weight.shape), grad_target, grad_bias


defop("linear_cross_entropy", linear_cross_entropy)


def _elementwise_loss(reduction: str, g: Tensor, per_element: Tensor, n: int) -> Tensor:
    return per_element * g if reduction != "mean" else per_element * (g / n)


def mse_loss(g, out, x, target, size_average=None, reduce=None, reduction="mean", weight=None) -> tuple:
    reduction = _reduction(size_average, reduce, reduction)
    if weight is not None:
        return _weighted_mse_loss(g, out, x, target, reduction, weight)
    grad = _elementwise_loss(reduction, g, 2.0 * (x - target), torch.broadcast_shapes(x.shape, target.shape).numel())
    return grad, -grad


def _weighted_mse_loss(g, out, x, target, reduction: str, weight: Tensor) -> tuple:
    """torch's ``sum(weight * (x - target)**2)``, divided by ``weight.sum()`` for 'mean' (not by the count).

    The mean's weight gradient is ``(squared - out) / weight.sum()``: its ``-out`` part once per weight
    element, so the squared part is summed over the broadcast copies first.
    """
    diff = x - target
    squared = diff * diff
    if reduction == "mean":
        total = weight.sum()
        grad_weight = (g * squared / total).sum_to_size(weight.shape) - g * out / total
        return 2.0 * diff * weight * (g / total), -2.0 * diff * weight * (g / total), None, None, None, grad_weight
    return 2.0 * diff * weight * g, -2.0 * diff * weight * g, None, None, None, squared * g


def l1_loss(g, out, x, target, size_average=None, reduce=None, reduction="mean") -> tuple:
    reduction = _reduction(size_average, reduce, reduction)
    grad = _elementwise_loss(reduction, g, (x - target).sign(), torch.broadcast_shapes(x.shape, target.shape).numel())
    return grad, -grad


def binary_cross_entropy_with_logits(g, out, x, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None) -> tuple:
    reduction = _reduction(size_average, reduce, reduction)
    if pos_weight is not None:
        coeff = pos_weight * target
        per_element = (coeff + 1 - target) * torch.sigmoid(x) - coeff
    else:
        per_element = torch.sigmoid(x) - target
    # d loss / d target = log(1 - sigmoid(x)) - pos_weight * log(sigmoid(x))  (= -x without pos_weight)
    per_target = -x if pos_weight is None else F.logsigmoid(-x) - pos_weight * F.logsigmoid(x)
    if weight is not None:
        per_element = per_element * weight
        per_target = per_target * weight
    return (_elementwise_loss(reduction, g, per_element, x.numel()),
            _elementwise_loss(reduction, g, per_target, x.numel()))


def binary_cross_entropy(g, out, x, target, weight=None, size_average=None, reduce=None, reduction="mean") -> tuple:
    reduction = _reduction(size_average, reduce, reduction)
    per_element = (x - target) / torch.clamp((1 - x) * x, min=1e-12)
    per_target = -torch.logit(x)  # d loss / d target = log(1 - x) - log(x)
    if weight is not None:
        per_element = per_element * weight
        per_target = per_target * weight
    return (_elementwise_loss(reduction, g, per_element, x.numel()),
            _elementwise_loss(reduction, g, per_target, x.numel()))


_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


def _unreduced_grad(g: Tensor, reduction: str, shape: torch.Size) -> Tensor:
    """The gradient of each element of an elementwise loss before its reduction ('none', 'sum' or 'mean')."""
    if reduction == "none":
        return g
    return g.expand(shape) if reduction == "sum" else g.expand(shape) / math.prod(shape)


def smooth_l1_loss(g, out, input, target, size_average=None, reduce=None, reduction="mean", beta=1.0) -> tuple:
    """Torch's fused smooth-L1 backward; ``beta=0`` is the L1 loss, as in torch."""
    reduction = _reduction(size_average, reduce, reduction)
    if beta == 0:
        return l1_loss(g, out, input, target, reduction=reduction)
    grad = aten.smooth_l1_loss_backward(g, *_expanded(input, target), _REDUCTION_ENUM[reduction], beta)
    return grad, -grad


def huber_loss(g, out, input, target, reduction="mean", delta=1.0, weight=None) -> tuple:
    """Torch's fused Huber backward; with ``weight``, each element's loss is scaled before the reduction.

    NOTE: with mixed dtypes torch's own backward fails ("Found dtype Double but expected Float"): its
    output keeps the input's dtype while its kernel wants the promoted one; the engine promotes ``g`` too.
    """
    x, t = _expanded(input, target)
    g = g.to(x.dtype)
    if weight is None:
        grad = aten.huber_loss_backward(g, x, t, _REDUCTION_ENUM[reduction], delta)
        return grad, -grad, None
    per_element = _unreduced_grad(g, reduction, x.shape)
    grad = aten.huber_loss_backward(per_element * weight, x, t, 0, delta)
    return grad, -grad, None, None, per_element * aten.huber_loss(x, t, 0, delta)


def kl_div(g, out, input, target, size_average=None, reduce=None, reduction="mean", log_target=False) -> tuple:
    """Pointwise ``target * (log(target) - input)`` (``exp(target) * (target - input)`` with log_target), reduced.

    NOTE: as in torch, the target's gradient is NaN where a (non-log) target is 0.
    """
    reduction = _reduction(size_average, reduce, reduction)
    shape = torch.broadcast_shapes(input.shape, target.shape)
    if reduction == "batchmean":
        per_element = (g / input.shape[0] if input.dim() else g).expand(shape)
    else:
        per_element = _unreduced_grad(g, reduction, shape)
    if log_target:
        weight = target.exp()
        grad_target = per_element * (target - input) * weight + per_element * weight
        return -(per_element * weight), grad_target
    log_part = torch.xlogy(per_element, target).masked_fill(target == 0, 0)  # d xlogy(t, t)/dt, first argument
    grad_target = log_part + per_element * target / target - per_element * input
    return -per_element * target, grad_target


defop("mse_loss", mse_loss)
defop("l1_loss", l1_loss)
defop("smooth_l1_loss", smooth_l1_loss)
defop("huber_loss", huber_loss)
defop("kl_div", kl_div)
# (weight and pos_weight: torch defines no derivative for them)
defop("binary_cross_entropy_with_logits", binary_cross_entropy_with_logits, underived=(2, 6))
defop("binary_cross_entropy", binary_cross_entropy, underived=(2,))


def _reduction_enum(size_average: Any, reduce: Any, reduction: str) -> int:
    return _REDUCTION_ENUM[_reduction(size_average, reduce, reduction)]


defop("multi_margin_loss", lambda g, out, x, target, p=1, margin=1.0, weight=None, size_average=None, reduce=None,
      reduction="mean": (aten.multi_margin_loss_backward(g, x, target, p, margin, weight, _reduction_enum(
          size_average, reduce, reduction)), None, None), auto=False, funcs=("F.multi_margin_loss",),
      underived=(4,))  # (weight: torch defines no derivative for it)


def _lengths(lengths: Any) -> list[int]:
    """CTC lengths as the kernels take them: a tensor (0-d when unbatched), a tuple or list of ints."""
    if isinstance(lengths, Tensor):
        return lengths.reshape(-1).tolist()
    return [lengths] if isinstance(lengths, int) else [int(n) for n in lengths]


def ctc_loss(g: Tensor, out: Tensor, log_probs: Tensor, targets: Tensor, input_lengths: Any, target_lengths: Any,
             blank: int = 0, reduction: Any = "mean", zero_infinity: bool = False) -> tuple:
    """Torch's CTC backward, with the log_alpha its forward (recomputed here) returns.

    NOTE: like torch's, the gradient is the one for normalised log_probs (log_softmax outputs): it includes
    exp(log_probs), which cancels in log_softmax's backward.
    """
    reduction = {0: "none", 1: "mean", 2: "sum"}.get(reduction, reduction)  # torch.ctc_loss takes the enum
    batched = log_probs.dim() == 3
    log_probs = log_probs if batched else log_probs.unsqueeze(1)
    targets = targets.to(log_probs.device, torch.long)
    inputs, lengths = _lengths(input_lengths), _lengths(target_lengths)
    nll, log_alpha = aten._ctc_loss(log_probs, targets, inputs, lengths, blank, zero_infinity)
    if reduction == "mean":  # the mean over the batch of each loss divided by its target length
        g = g / len(lengths) / torch.tensor(lengths, dtype=g.dtype, device=g.device).clamp_min(1)
    else:
        g = g.expand(len(lengths)) if reduction == "sum" else g.reshape(len(lengths))
    grad = aten._ctc_loss_backward(g, log_probs, targets, inputs, lengths, nll, log_alpha, blank, zero_infinity)
    return (grad if batched else grad.squeeze(1)), None, None, None


defop("ctc_loss", ctc_loss)


def multilabel_margin_loss(g: Tensor, out: Tensor, x: Tensor, target: Tensor, size_average=None, reduce=None,
                           reduction: str = "mean") -> tuple:
    """Torch's kernel, with the is-target mask its forward computes."""
    mode = _reduction_enum(size_average, reduce, reduction)
    _, is_target = aten.multilabel_margin_loss_forward(x, target, mode)
    return aten.multilabel_margin_loss_backward(g, x, target, mode, is_target), None


def soft_margin_loss(g: Tensor, out: Tensor, x: Tensor, target: Tensor, size_average=None, reduce=None,
                     reduction: str = "mean") -> tuple:
    """log(1 + exp(-target * x)), torch's kernel.

    NOTE: torch declares the target not differentiable (it refuses one that requires grad), so it gets none here
    either: graph.compare replays the call under torch autograd.
    """
    return aten.soft_margin_loss_backward(g, x, target, _reduction_enum(size_average, reduce, reduction)), None


def hinge_embedding_loss(g: Tensor, out: Tensor, x: Tensor, target: Tensor, margin: float = 1.0, size_average=None,
                         reduce=None, reduction: str = "mean") -> tuple:
    """x where target != -1, plus clamp_min(margin - x, 0) where target != 1 (torch's composite: its clamp
    passes the gradient at 0 up to torch 2.13: clamp_passes)."""
    per_element = _unreduced_grad(g, _reduction(size_average, reduce, reduction),
                                  torch.broadcast_shapes(x.shape, target.shape))
    slope = (target != -1).to(x.dtype) - ((target != 1) & clamp_passes(margin - x, 0)).to(x.dtype)
    return per_element * slope, None


def margin_ranking_loss(g: Tensor, out: Tensor, input1: Tensor, input2: Tensor, target: Tensor, margin: float = 0.0,
                        size_average=None, reduce=None, reduction: str = "mean") -> tuple:
    """clamp_min(-target * (input1 - input2) + margin, 0); the clamp passes the gradient at 0 as torch's does
    (clamp_passes)."""
    shape = torch.broadcast_shapes(input1.shape, input2.shape, target.shape)
    difference = input1 - input2
    active = _unreduced_grad(g, _reduction(size_average, reduce, reduction), shape) * (
        clamp_passes(-target * difference + margin, 0))
    return active * -target, active * target, active * -difference


def cosine_embedding_loss(g: Tensor, out: Tensor, input1: Tensor, input2: Tensor, target: Tensor, margin: float = 0.0,
                          size_average=None, reduce=None, reduction: str = "mean") -> tuple:
    """1 - cos where target == 1, clamp_min(cos - margin, 0) where target == -1; torch's cos adds 1e-12 to
    each squared norm."""
    dim = target.dim()
    squared1, squared2 = (input1 * input1).sum(dim) + 1e-12, (input2 * input2).sum(dim) + 1e-12
    denominator = (squared1 * squared2).sqrt()
    cos = (input1 * input2).sum(dim) / denominator
    per_element = _unreduced_grad(g, _reduction(size_average, reduce, reduction), cos.shape)
    grad_cos = per_element * (((target == -1) & clamp_passes(cos - margin, 0)).to(cos.dtype) - (target == 1).to(
        cos.dtype))
    grad_cos, cos = grad_cos.unsqueeze(dim), cos.unsqueeze(dim)
    return (grad_cos * (input2 / denominator.unsqueeze(dim) - cos * input1 / squared1.unsqueeze(dim)),
            grad_cos * (input1 / denominator.unsqueeze(dim) - cos * input2 / squared2.unsqueeze(dim)), None)


def poisson_nll_loss(g: Tensor, out: Tensor, input: Tensor, target: Tensor, log_input: bool = True,
                     full: bool = False, size_average=None, eps: float = 1e-8, reduce=None,
                     reduction: str = "mean") -> tuple:
    """exp(input) - target * input (or input - target * log(input + eps)), plus Stirling's term where target > 1.

    NOTE: with ``full``, torch's target gradient is NaN where a target is 0 (0 * log 0 in its masked Stirling term).
    """
    per_element = _unreduced_grad(g, _reduction(size_average, reduce, reduction),
                                  torch.broadcast_shapes(input.shape, target.shape))
    if log_input:
        grad_input, grad_target = input.exp() - target, -input
    else:
        grad_input, grad_target = 1 - target / (input + eps), -(input + eps).log()
    if full:  # d/dt (t log t - t + log(2 pi t) / 2), only where the term is kept
        grad_target = grad_target + (target.log() + 0.5 / target).masked_fill(target <= 1, 0).masked_fill(
            target == 0, math.nan)
    return per_element * grad_input, per_element * grad_target


def gaussian_nll_loss(g: Tensor, out: Tensor, input: Tensor, target: Tensor, var: Any, full: bool = False,
                      eps: float = 1e-6, reduction: str = "mean") -> tuple:
    """(log(var) + (input - target)**2 / var) / 2, var clamped to eps without a gradient to the clamp (torch's
    in-place clamp under no_grad); a var one dimension short is unsqueezed at the end, as torch does."""
    short = isinstance(var, Tensor) and var.shape != input.shape and input.shape[:-1] == var.shape
    v = torch.as_tensor(var, dtype=input.dtype, device=input.device)
    v = (v.unsqueeze(-1) if short else v).clamp(min=eps)
    difference = input - target
    per_element = _unreduced_grad(g, reduction, torch.broadcast_shapes(difference.shape, v.shape))
    grad_input = per_element * (difference / v)
    grad_var = None
    if isinstance(var, Tensor):
        grad_var = per_element * 0.5 * (1 / v - difference.square() / v.square())
        grad_var = grad_var.sum_to_size(v.shape).squeeze(-1) if short else grad_var
    return grad_input, -grad_input, grad_var


def multilabel_soft_margin_loss(g: Tensor, out: Tensor, input: Tensor, target: Tensor, weight: Tensor | None = None,
                                size_average=None, reduce=None, reduction: str = "mean") -> tuple:
    """Binary cross-entropy with logits per class, averaged over the classes (the last dimension)."""
    reduction = _reduction(size_average, reduce, reduction)
    classes = input.shape[-1] if input.dim() else 1
    per_sample = g if reduction != "mean" else g / (input.numel() // max(classes, 1))
    per_element = (per_sample.unsqueeze(-1) if reduction == "none" and input.dim() else per_sample) / classes
    w = 1.0 if weight is None else weight
    grad_weight = None
    if weight is not None:
        loss = -(target * F.logsigmoid(input) + (1 - target) * F.logsigmoid(-input))
        grad_weight = per_element * loss
    return per_element * (input.sigmoid() - target) * w, per_element * -input * w, grad_weight


def triplet_margin_loss(g: Tensor, out: Tensor, anchor: Tensor, positive: Tensor, negative: Tensor,
                        margin: float = 1.0, p: float = 2, eps: float = 1e-6, swap: bool = False, size_average=None,
                        reduce=None, reduction: str = "mean") -> tuple:
    """clamp_min(margin + d(a, p) - d(a, n), 0) with pairwise distances; with ``swap``, d(a, n) is the smaller of
    d(a, n) and d(p, n) (ties split the gradient, as torch's min)."""
    def distance(x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        diff = x1 - x2 + eps
        return diff, torch.linalg.vector_norm(diff, p, -1, keepdim=True)

    diff_ap, d_ap = distance(anchor, positive)
    diff_an, d_an = distance(anchor, negative)
    d_neg = d_an
    if swap:
        diff_pn, d_pn = distance(positive, negative)
        d_neg = torch.minimum(d_an, d_pn)
    shape = torch.broadcast_shapes(d_ap.shape[:-1], d_neg.shape[:-1])
    active = _unreduced_grad(g, _reduction(size_average, reduce, reduction), shape).unsqueeze(-1) * (
        clamp_passes(margin + d_ap - d_neg, 0))
    last = (d_ap.dim() - 1,)
    grad_ap = _norm_grad(active, diff_ap, float(p), d_ap, last)
    grad_neg = -active
    grad_an, grad_pn = minimum(grad_neg, d_neg, d_an, d_pn) if swap else (grad_neg, None)
    grad_an = _norm_grad(grad_an, diff_an, float(p), d_an, last)
    grad_a, grad_p, grad_n = grad_ap + grad_an, -grad_ap, -grad_an
    if swap:
        grad_pn = _norm_grad(grad_pn, diff_pn, float(p), d_pn, last)
        grad_p, grad_n = grad_p + grad_pn, grad_n - grad_pn
    return grad_a, grad_p, grad_n


# the F spellings only: torch.* and torch._C._nn.* take the reduction as an int
for _rule in (multilabel_margin_loss, soft_margin_loss, hinge_embedding_loss, margin_ranking_loss,
              cosine_embedding_loss, poisson_nll_loss, gaussian_nll_loss, multilabel_soft_margin_loss,
              triplet_margin_loss):
    defop(_rule.__name__, _rule, auto=False, funcs=(f"F.{_rule.__name__}",),
          underived=(1,) if _rule is soft_margin_loss else ())  # (its target: torch defines no derivative)


def embedding(g: Tensor, out: Tensor, input: Tensor, weight: Tensor, padding_idx: int | None = None,
              max_norm: Any = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
              sparse: bool = False) -> tuple:
    """Rows of ``weight`` accumulate the gradients of every position that looked them up."""
    if max_norm is not None:
        raise UnsupportedCall("embedding: max_norm renormalises the weight in place; it has no rule")
    if scale_grad_by_freq:
        counts = torch.bincount(input.reshape(-1), minlength=weight.shape[0])
        g = g / counts[input].unsqueeze(-1)
    grad = torch.zeros_like(weight).index_put_((input,), g, accumulate=True)
    if padding_idx is not None:
        grad[padding_idx] = 0
    return None, grad


defop("embedding", embedding)

_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}


def embedding_bag(g: Tensor, out: Tensor, input: Tensor, weight: Tensor, offsets: Tensor | None = None,
                  max_norm: Any = None, norm_type: float = 2, scale_grad_by_freq: bool = False, mode: str = "mean",
                  sparse: bool = False, per_sample_weights: Tensor | None = None, include_last_offset: bool = False,
                  padding_idx: int | None = None) -> tuple:
    """Torch's embedding-bag backward kernels, with the bags (and, for max, the rows that won) its forward finds.

    The arguments are prepared as F.embedding_bag prepares them: a 2-d input is one bag per row.
    """
    if max_norm is not None:
        raise UnsupportedCall("embedding_bag: max_norm renormalises the weight in place; it has no rule")
    if sparse:
        raise UnsupportedCall("embedding_bag: sparse=True gives a sparse gradient; it has no rule")
    indices, samples = input, per_sample_weights
    if input.dim() == 2:
        offsets = torch.arange(0, input.numel(), input.shape[1], dtype=input.dtype, device=input.device)
        indices = input.reshape(-1)
        samples = None if samples is None else samples.reshape(-1)
    padding = -1 if padding_idx is None else padding_idx % weight.shape[0]
    code = _BAG_MODES[mode]
    _, offset2bag, bag_size, winners = aten._embedding_bag(weight, indices, offsets, scale_grad_by_freq, code, False,
                                                           samples, include_last_offset, padding)
    grad_weight = aten._embedding_bag_backward(g, indices, offsets, offset2bag, bag_size, winners, weight.shape[0],
                                               scale_grad_by_freq, code, False, samples, padding)
    grad_samples = None
    if per_sample_weights is not None:
        grad_samples = aten._embedding_bag_per_sample_weights_backward(
            g, weight, indices, offsets, offset2bag, code, padding).reshape(per_sample_weights.shape)
    return None, grad_weight, None, None, None, None, None, None, grad_samples


defop("embedding_bag", embedding_bag)


def layer_norm(g: Tensor, out: Tensor, x: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> tuple:
    """Torch's fused layer-norm backward (the statistics are recomputed from x)."""
    _, mean, rstd = aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
    mask = [True, weight is not None, bias is not None]
    grad_x, grad_w, grad_b = aten.native_layer_norm_backward(g, x, normalized_shape, mean, rstd, weight, bias, mask)
    return grad_x, None, grad_w, grad_b


defop("layer_norm", layer_norm)


def batch_norm(g: Tensor, out: Tensor, x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> tuple:
    """Torch's fused batch-norm backward; batch statistics in training, running ones otherwise."""
    if training or running_mean is None:  # batch statistics: the closed form tensorgraph.symbolic derives
        fused = _symbolic("batch_norm", g, x, weight, bias, eps)
        if fused is not None:
            return fused[0], None, None, fused[1], fused[2]
    mask = [True, weight is not None, bias is not None]
    if training or running_mean is None:
        _, mean, invstd = aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        grads = aten.native_batch_norm_backward(g, x, weight, None, None, mean, invstd, True, eps, mask)
    else:
        # NOTE: the CUDA kernel asserts its saved statistics are defined even in eval mode: empty ones, as the
        # forward returns there (None crashed it)
        unsaved = x.new_empty(0)
        grads = aten.native_batch_norm_backward(g, x, weight, running_mean, running_var, unsaved, unsaved, False, eps,
                                                mask)
    grad_x, grad_w, grad_b = grads
    return grad_x, None, None, grad_w, grad_b


defop("batch_norm", batch_norm, mutates=(1, 2), ignores=lambda attrs: (1, 2) if attrs.get("training") else ())


def group_norm(g: Tensor, out: Tensor, input: Tensor, num_groups: int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> tuple:
    """Torch's fused group-norm backward (the statistics are recomputed from the input)."""
    n, c, hxw = input.shape[0], input.shape[1], math.prod(input.shape[2:])
    x = input.contiguous()
    _, mean, rstd = aten.native_group_norm(x, weight, bias, n, c, hxw, num_groups, eps)
    mask = [True, weight is not None, bias is not None]
    grad_x, grad_w, grad_b = aten.native_group_norm_backward(g.contiguous(), x, mean, rstd, weight, n, c, hxw,
                                                             num_groups, mask)
    return grad_x, None, grad_w, grad_b


def rms_norm(g: Tensor, out: Tensor, input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
             eps: float | None = None) -> tuple:
    """``x * rsqrt(mean(x**2) + eps) * weight``, differentiated through its parts as torch's composite is.

    Half-precision inputs are computed in float32, as torch does; eps defaults to that type's machine epsilon.
    """
    wide = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    x, g = input.to(wide), g.to(wide)
    dims = tuple(range(input.dim() - len(normalized_shape), input.dim()))
    eps = torch.finfo(wide).eps if eps is None else eps
    rstd = (x.pow(2).mean(dims, keepdim=True) + eps).rsqrt()
    grad_w = None
    if weight is not None:
        grad_w = g * (x * rstd)  # (the engine sums it to the weight's shape, then rounds to its dtype, as torch)
        g = g * weight.to(wide)
    grad_rstd = (-0.5 * (g * x).sum(dims, keepdim=True)) * rstd.pow(3)
    grad_x = g * rstd + grad_rstd.expand(x.shape) / _count(x, dims) * (2 * x)
    return grad_x, None, grad_w


def instance_norm(g: Tensor, out: Tensor, input: Tensor, running_mean: Tensor | None = None,
                  running_var: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None,
                  use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> tuple:
    """Batch norm of the input seen as one sample of N*C channels (torch's own definition), fused backward."""
    n, c = input.shape[0], input.shape[1]
    x = input.contiguous().view(1, n * c, *input.shape[2:])
    g = g.contiguous().view(x.shape)
    w = weight.repeat(n) if weight is not None else None
    mask = [True, weight is not None, bias is not None]
    if use_input_stats:
        _, mean, invstd = aten.native_batch_norm(x, w, None, None, None, True, 0.0, eps)
        grads = aten.native_batch_norm_backward(g, x, w, None, None, mean, invstd, True, eps, mask)
    else:
        stats = [s.repeat(n).to(x.dtype) for s in (running_mean, running_var)]  # (torch's forward mixes dtypes)
        grads = aten.native_batch_norm_backward(g, x, w, *stats, None, None, False, eps, mask)
    grad_x, grad_w, grad_b = grads
    grad_w = grad_w.view(n, c).sum(0) if grad_w is not None else None
    grad_b = grad_b.view(n, c).sum(0) if grad_b is not None else None
    return grad_x.view(input.shape), None, None, grad_w, grad_b


defop("group_norm", group_norm)
defop("rms_norm", rms_norm)
defop("instance_norm", instance_norm, mutates=(1, 2),
      ignores=lambda attrs: (1, 2) if attrs.get("use_input_stats", True) else ())


def dropout_mask(x: Tensor, p: float, shape: Sequence[int] | None = None) -> Tensor:
    """The scaled keep-mask F.dropout multiplies by, drawn from the same generator in the same way; of ``shape``
    (one element per sample and channel) for the feature dropouts. p = 1 keeps nothing and draws nothing, as torch."""
    if p == 1:
        return torch.zeros_like(x) if shape is None else x.new_zeros(shape)
    noise = torch.empty_like(x) if shape is None else x.new_empty(shape)
    return noise.bernoulli_(1 - p).div_(1 - p)


# alpha dropout: x * scale + shift, from one draw of keep-noise, with torch's constants: the dropped elements become
# SELU's negative saturation, and the affine map keeps SELU's mean 0 and variance 1
_ALPHA_PRIME = 1.7580993408473766


def alpha_dropout_noise(x: Tensor, p: float, shape: Sequence[int] | None = None) -> Tensor:
    """The 0/1 keep-noise of F.alpha_dropout (of ``shape`` for F.feature_alpha_dropout), drawn as torch draws it."""
    if p == 1:
        return torch.zeros_like(x) if shape is None else x.new_zeros(shape)
    return (torch.empty_like(x) if shape is None else x.new_empty(shape)).bernoulli_(1 - p)


def alpha_dropout_scale(noise: Tensor, p: float) -> Tensor:
    if p == 1:
        return torch.zeros_like(noise)
    return noise.mul(1.0 / math.sqrt((_ALPHA_PRIME ** 2 * p + 1) * (1 - p)))


def alpha_dropout_shift(noise: Tensor, p: float) -> Tensor:
    if p == 1:
        return torch.zeros_like(noise)
    a = 1.0 / math.sqrt((_ALPHA_PRIME ** 2 * p + 1) * (1 - p))
    return noise.add(-1).mul_(_ALPHA_PRIME * a).add_(_ALPHA_PRIME * a * p)


def gumbel_noise(logits: Tensor) -> Tensor:
    """The Gumbel(0, 1) noise F.gumbel_softmax adds to the logits, drawn from the same generator in the same way."""
    return -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()


for _func in (dropout_mask, alpha_dropout_noise, alpha_dropout_scale, alpha_dropout_shift, gumbel_noise):
    constants(_func.__name__, auto=False, callables=(_func,))


def _conv(g: Tensor, x: Tensor, weight: Tensor, bias: Any, stride: Any, padding: Any, dilation: Any,
          groups: int, output_padding: Any = None) -> tuple:
    """Torch's convolution backward; ``output_padding`` given means a transposed convolution."""
    if isinstance(padding, str):
        raise UnsupportedCall(f"conv: padding={padding!r} has no rule; give the padding as numbers")
    spatial = x.dim() - 2

    def tup(v: Any) -> list[int]:
        return list(v) if isinstance(v, (tuple, list)) else [v] * spatial

    transposed = output_padding is not None
    mask = [True, True, bias is not None]
    bias_sizes = [weight.shape[1] * groups if transposed else weight.shape[0]] if bias is not None else None
    grad_x, grad_w, grad_b = aten.convolution_backward(
        g, x, weight, bias_sizes, tup(stride), tup(padding), tup(dilation), transposed,
        tup(output_padding if transposed else 0), groups, mask)
    return grad_x, grad_w, grad_b


for _name in ("conv1d", "conv2d", "conv3d"):
    defop(_name, lambda g, out, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1: _conv(
        g, x, weight, bias, stride, padding, dilation, groups))
# torch.convolution: conv or conv_transpose by the flag; conv_tbc: a 1-d convolution on (time, batch, channel) inputs
defop("convolution", lambda g, out, x, weight, bias, stride, padding, dilation, transposed, output_padding,
      groups: _conv(g, x, weight, bias, stride, padding, dilation, groups, output_padding if transposed else None))


def conv_tbc(g: Tensor, out: Tensor, x: Tensor, weight: Tensor, bias: Tensor, pad: int = 0) -> tuple:
    """conv1d(x.permute(1, 2, 0), weight.permute(2, 1, 0), bias, padding=pad).permute(2, 0, 1)."""
    grad_x, grad_w, grad_b = _conv(g.permute(1, 2, 0), x.permute(1, 2, 0), weight.permute(2, 1, 0), bias, 1, pad, 1, 1)
    return grad_x.permute(2, 0, 1), grad_w.permute(2, 1, 0), grad_b


defop("conv_tbc", conv_tbc)
for _name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):  # (groups before dilation, as torch)
    defop(_name, lambda g, out, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1:
          _conv(g, x, weight, bias, stride, padding, dilation, groups, output_padding))


def _sizes(v: Any, dims: int) -> list[int]:
    """A pooling size given as one number or one per spatial dim, as ``dims`` numbers."""
    return list(v) if isinstance(v, (tuple, list)) else [v] * dims


def _max_pool_args(dims: int, kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool) -> tuple:
    """A max pooling's arguments as its aten kernels take them (no stride: the kernel's size)."""
    stride = stride if stride not in (None, []) else kernel_size
    return _sizes(kernel_size, dims), _sizes(stride, dims), _sizes(padding, dims), _sizes(dilation, dims), ceil_mode


def _max_pool(dims: int, forward: Any, backward: Any) -> Callable[..., Tensor]:
    """The rule of max_pool2d/3d: torch's backward kernel, with the indices its forward picks."""
    def rule(g, out, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
             return_indices=False) -> Tensor:
        args = _max_pool_args(dims, kernel_size, stride, padding, dilation, ceil_mode)
        _, indices = forward(x, *args)
        return backward(g, x, *args, indices)
    return rule


def _avg_pool(dims: int, backward: Any) -> Callable[..., Tensor]:
    """The rule of avg_pool2d/3d: torch's backward kernel."""
    def rule(g, out, x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
             divisor_override=None) -> Tensor:
        stride = stride if stride not in (None, []) else kernel_size
        return backward(g, x, _sizes(kernel_size, dims), _sizes(stride, dims), _sizes(padding, dims), ceil_mode,
                        count_include_pad, divisor_override)
    return rule


max_pool2d = _max_pool(2, aten.max_pool2d_with_indices, aten.max_pool2d_with_indices_backward)
avg_pool2d = _avg_pool(2, aten.avg_pool2d_backward)
defop("max_pool2d", max_pool2d, funcs=("torch.max_pool2d",))
defop("avg_pool2d", avg_pool2d)
defop("max_pool3d", _max_pool(3, aten.max_pool3d_with_indices, aten.max_pool3d_with_indices_backward))
defop("avg_pool3d", _avg_pool(3, aten.avg_pool3d_backward))


def _single(v: Any) -> int:
    return v[0] if isinstance(v, (tuple, list)) else v


# the 1-d poolings are torch's 2-d ones on x.unsqueeze(-2), with a kernel of height 1
def _row_sizes(kernel_size: Any, stride: Any, padding: Any, dilation: Any = 1) -> tuple[list[int], ...]:
    """A 1-d pooling's kernel size, stride, padding and dilation as the 2-d pooling's over a row."""
    stride = kernel_size if stride in (None, []) else stride
    return [1, _single(kernel_size)], [1, _single(stride)], [0, _single(padding)], [1, _single(dilation)]


def max_pool1d(g, out, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False) -> Tensor:
    sizes = _row_sizes(kernel_size, stride, padding, dilation)
    return max_pool2d(g.unsqueeze(-2), None, x.unsqueeze(-2), *sizes, ceil_mode).squeeze(-2)


def avg_pool1d(g, out, x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True) -> Tensor:
    kernel, stride, padding, _ = _row_sizes(kernel_size, stride, padding)
    return avg_pool2d(g.unsqueeze(-2), None, x.unsqueeze(-2), kernel, stride, padding, ceil_mode,
                      count_include_pad).squeeze(-2)


def adaptive_max_pool2d(g: Tensor, out: Tensor, x: Tensor, output_size: Any, return_indices: bool = False) -> Tensor:
    _, indices = aten.adaptive_max_pool2d(x, list(out.shape[-2:]))
    return aten.adaptive_max_pool2d_backward(g, x, indices)


defop("max_pool1d", max_pool1d)
defop("avg_pool1d", avg_pool1d)
defop("adaptive_avg_pool1d", lambda g, out, x, output_size: aten._adaptive_avg_pool2d_backward(
    g.unsqueeze(-2), x.unsqueeze(-2)).squeeze(-2))
defop("adaptive_max_pool2d", adaptive_max_pool2d)
defop("adaptive_max_pool1d", lambda g, out, x, output_size, return_indices=False: adaptive_max_pool2d(
    g.unsqueeze(-2), out.unsqueeze(-2), x.unsqueeze(-2), None).squeeze(-2))
defop("adaptive_avg_pool3d", lambda g, out, x, output_size: aten._adaptive_avg_pool3d_backward(g, x))
defop("adaptive_max_pool3d", lambda g, out, x, output_size, return_indices=False: aten.adaptive_max_pool3d_backward(
    g, x, aten.adaptive_max_pool3d(x, list(out.shape[-3:]))[1]))


def _lp_pool(dims: int) -> Callable[..., Tensor]:
    """lp_pool1d/2d/3d: (sign(a) relu(|a|) K)**(1/p), a the average pooling of x**p and K the kernel's size,
    differentiated through those parts as torch does (no gradient where a window's a is 0)."""
    forward = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]

    def rule(g: Tensor, out: Tensor, x: Tensor, norm_type: float, kernel_size: Any, stride: Any = None,
             ceil_mode: bool = False) -> Tensor:
        backward = {1: avg_pool1d, 2: avg_pool2d, 3: _avg_pool(3, aten.avg_pool3d_backward)}[dims]
        powered = x.pow(norm_type)
        average = forward(powered, kernel_size, stride, 0, ceil_mode)
        size = math.prod(_sizes(kernel_size, dims))
        pooled = average.sign() * average.abs().relu() * size
        grad = g * (1.0 / norm_type) * pooled.pow(1.0 / norm_type - 1) * size * average.sign()
        grad = torch.where(average.abs() > 0, grad, 0.0) * average.sign()
        return backward(grad, None, powered, kernel_size, stride, 0, ceil_mode) * norm_type * x.pow(norm_type - 1)

    return rule


for _rank in (1, 2, 3):
    defop(f"lp_pool{_rank}d", _lp_pool(_rank))


def _channel_average(t: Tensor, size: int, before: int, after: int) -> Tensor:
    """The average over a window of ``size`` channels (dim 1), padded with zeros (``before``, ``after``), as
    F.local_response_norm computes it with a 2-d or 3-d average pooling."""
    if t.dim() == 3:
        padded = F.pad(t.unsqueeze(1), (0, 0, before, after))
        return F.avg_pool2d(padded, (size, 1), stride=1).squeeze(1)
    padded = F.pad(t.reshape(t.shape[0], 1, t.shape[1], t.shape[2], -1), (0, 0, 0, 0, before, after))
    return F.avg_pool3d(padded, (size, 1, 1), stride=1).squeeze(1).reshape(t.shape)


def local_response_norm(g: Tensor, out: Tensor, x: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> Tensor:
    """x / d, d = (k + alpha * A(x**2))**beta with A the average over neighbouring channels; A's adjoint is the
    same average with the padding swapped."""
    if x.numel() == 0:
        return g
    base = _channel_average(x * x, size, size // 2, (size - 1) // 2) * alpha + k
    d = base.pow(beta)
    grad_base = -g * x / (d * d) * (beta * base.pow(beta - 1)) * alpha
    return g / d + 2 * x * _channel_average(grad_base, size, (size - 1) // 2, size // 2)


defop("local_response_norm", local_response_norm)


# return_indices=True: the values take torch's backward kernel with the indices the call returned (ties go
# where those indices point, as in torch); the indices (output 1) are integers and take no gradient
def _max_pool_with_indices(backward: Any, dims: int) -> Callable[..., Tensor | None]:
    def rule(g, out, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False, *,
             output_index: int = 0) -> Tensor | None:
        if output_index != 0:
            return None
        return backward(g, x, *_max_pool_args(dims, kernel_size, stride, padding, dilation, ceil_mode), out[1])
    return rule


max_pool2d_with_indices = _max_pool_with_indices(aten.max_pool2d_with_indices_backward, 2)


def max_pool1d_with_indices(g, out, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                            return_indices=False, *, output_index: int = 0) -> Tensor | None:
    """The 2-d kernel on x.unsqueeze(-2): a length-L row's flat indices are its 1-d ones."""
    if output_index != 0:
        return None
    sizes = _row_sizes(kernel_size, stride, padding, dilation)
    return max_pool2d_with_indices(g.unsqueeze(-2), (None, out[1].unsqueeze(-2)), x.unsqueeze(-2), *sizes,
                                   ceil_mode).squeeze(-2)


def _adaptive_max_pool_with_indices(spatial: int) -> Callable[..., Tensor | None]:
    """The 1-d one is the 2-d kernel on x.unsqueeze(-2), as for max_pool1d."""
    def rule(g: Tensor, out: Any, x: Tensor, output_size: Any, return_indices: bool = False, *,
             output_index: int = 0) -> Tensor | None:
        if output_index != 0:
            return None
        if spatial == 2:
            return aten.adaptive_max_pool2d_backward(g, x, out[1])
        return aten.adaptive_max_pool2d_backward(g.unsqueeze(-2), x.unsqueeze(-2), out[1].unsqueeze(-2)).squeeze(-2)
    return rule


def _fractional_max_pool(spatial: int) -> Callable[..., Tensor | None]:
    """F.fractional_max_pool2d/3d (and _with_indices): the recorder drew ``_random_samples``, so the pooling regions
    are known; the gradient goes to each region's max, as with max_pool."""
    pool = getattr(aten, f"fractional_max_pool{spatial}d")
    pool_backward = getattr(aten, f"fractional_max_pool{spatial}d_backward")

    def rule(g: Tensor, out: Any, x: Tensor, kernel_size: Any, output_size: Any = None, output_ratio: Any = None,
             return_indices: bool = False, _random_samples: Tensor | None = None, *, output_index: int = 0
             ) -> Tensor | None:
        if output_index != 0 or _random_samples is None:
            return None
        result = out[0] if isinstance(out, (tuple, list)) else out
        kernel = [kernel_size] * spatial if isinstance(kernel_size, int) else list(kernel_size)
        size = list(result.shape[-spatial:])
        indices = out[1] if isinstance(out, (tuple, list)) else pool(x, kernel, size, _random_samples)[1]
        return pool_backward(g, x, kernel, size, indices)
    return rule


for _spatial in (2, 3):
    defop(f"fractional_max_pool{_spatial}d", _fractional_max_pool(_spatial), auto=False,
          funcs=(f"F.fractional_max_pool{_spatial}d",))
    defop(f"fractional_max_pool{_spatial}d_with_indices", _fractional_max_pool(_spatial), multi=True, auto=False,
          funcs=(f"F.fractional_max_pool{_spatial}d_with_indices",))


defop("max_pool1d_with_indices", max_pool1d_with_indices, multi=True)
defop("max_pool2d_with_indices", max_pool2d_with_indices, multi=True)
defop("max_pool3d_with_indices", _max_pool_with_indices(aten.max_pool3d_with_indices_backward, 3), multi=True)
defop("adaptive_max_pool1d_with_indices", _adaptive_max_pool_with_indices(1), multi=True)
defop("adaptive_max_pool2d_with_indices", _adaptive_max_pool_with_indices(2), multi=True)
defop("adaptive_max_pool3d_with_indices", lambda g, out, x, output_size, return_indices=False, *, output_index=0: (
    aten.adaptive_max_pool3d_backward(g, x, out[1]) if output_index == 0 else None), multi=True)


def _max_unpool(spatial: int) -> Callable[..., tuple]:
    """max_unpool puts each value at its index in the (flattened) spatial output: its gradient gathers g there.

    NOTE: a repeated index (overlapping pooling windows) gives g to every value written there, as torch does,
    though the forward keeps only one of them.
    """
    def rule(g: Tensor, out: Tensor, x: Tensor, indices: Tensor, kernel_size: Any, stride: Any = None,
             padding: Any = 0, output_size: Any = None) -> tuple:
        flat = g.flatten(-spatial).gather(-1, indices.flatten(-spatial))
        return flat.view(x.shape), None
    return rule


for _spatial in (1, 2, 3):
    defop(f"max_unpool{_spatial}d", _max_unpool(_spatial))
# im2col and col2im undo each other's gradients; so do the pixel shuffles
defop("im2col", lambda g, out, x, kernel_size, dilation=1, padding=0, stride=1: F.fold(
    g, x.shape[-2:], kernel_size, dilation, padding, stride), auto=False, funcs=("F.unfold",))
defop("fold", lambda g, out, x, output_size, kernel_size, dilation=1, padding=0, stride=1: F.unfold(
    g, kernel_size, dilation, padding, stride))
defop("pixel_shuffle", lambda g, out, x, upscale_factor: F.pixel_unshuffle(g, upscale_factor))
defop("pixel_unshuffle", lambda g, out, x, downscale_factor: F.pixel_shuffle(g, downscale_factor))
defop("channel_shuffle", lambda g, out, x, groups: F.channel_shuffle(g, x.shape[1] // groups),
      funcs=("torch.native_channel_shuffle",))


def scaled_dot_product_attention(g: Tensor, out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, *, enable_gqa: bool = False) -> tuple:
    """softmax(q k^T * scale + mask) v, differentiated through its parts (the math backend's formula).

    With enable_gqa, each key/value head serves a group of query heads (torch's math backend repeats it with
    repeat_interleave over dim -3): the gradients of a group's copies are summed back into the shared head.
    """
    if dropout_p:  # the recorder records such a call as its parts (mask included); this is a direct rule call
        raise UnsupportedCall(f"scaled_dot_product_attention: dropout_p={dropout_p} draws its mask inside torch's "
                              f"kernel, out of a rule's reach")
    groups = query.shape[-3] // key.shape[-3] if enable_gqa and key.dim() >= 3 else 1
    if groups > 1:
        key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        L, S = query.shape[-2], key.shape[-2]
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=query.device).tril(), -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
        # torch's safe softmax: a query that may see no key gets weights 0 (not NaN), so no gradient
        hidden = (scores == -math.inf).all(-1, keepdim=True)
        att = scores.masked_fill(hidden, 0.0).softmax(-1).masked_fill(hidden, 0.0)
    else:
        att = scores.softmax(-1)
    grad_value = att.transpose(-2, -1) @ g
    grad_scores = aten._softmax_backward_data(g @ value.transpose(-2, -1), att, -1, att.dtype)
    grad_query = grad_scores @ key * scale
    grad_key = grad_scores.transpose(-2, -1) @ query * scale
    grad_mask = grad_scores if attn_mask is not None and attn_mask.is_floating_point() else None
    if groups > 1:
        grad_key, grad_value = (grad.unflatten(-3, (-1, groups)).sum(-3) for grad in (grad_key, grad_value))
    return grad_query, grad_key, grad_value, grad_mask


defop("scaled_dot_product_attention", scaled_dot_product_attention)
defop("adaptive_avg_pool2d", lambda g, out, x, output_size: aten._adaptive_avg_pool2d_backward(g, x))


# F.interpolate's modes, by number of spatial dimensions: torch's upsample backward kernels
_UPSAMPLE_BACKWARD = {
    ("nearest", 1): aten.upsample_nearest1d_backward,
    ("nearest", 2): aten.upsample_nearest2d_backward,
    ("nearest", 3): aten.upsample_nearest3d_backward,
    ("nearest-exact", 1): aten._upsample_nearest_exact1d_backward,
    ("nearest-exact", 2): aten._upsample_nearest_exact2d_backward,
    ("nearest-exact", 3): aten._upsample_nearest_exact3d_backward,
    ("linear", 1): aten.upsample_linear1d_backward,
    ("bilinear", 2): aten.upsample_bilinear2d_backward,
    ("bicubic", 2): aten.upsample_bicubic2d_backward,
    ("trilinear", 3): aten.upsample_trilinear3d_backward,
}
# with antialias=True (a downsampling filter wider than the interpolation's): torch has kernels for these two
_ANTIALIAS_BACKWARD = {
    ("bilinear", 2): aten._upsample_bilinear2d_aa_backward,
    ("bicubic", 2): aten._upsample_bicubic2d_aa_backward,
}


def interpolate(g: Tensor, out: Tensor, input: Tensor, size: Any = None, scale_factor: Any = None,
                mode: str = "nearest", align_corners: bool | None = None, recompute_scale_factor: bool | None = None,
                antialias: bool = False) -> Tensor:
    """Torch's upsample backward for the mode, with the scales F.interpolate passed to the forward kernel."""
    spatial = input.dim() - 2
    if mode == "area" and 1 <= spatial <= 3:  # torch's adaptive average pooling to the output's size
        if spatial == 3:
            return aten._adaptive_avg_pool3d_backward(g, input)
        if spatial == 2:
            return aten._adaptive_avg_pool2d_backward(g, input)
        return aten._adaptive_avg_pool2d_backward(g.unsqueeze(-2), input.unsqueeze(-2)).squeeze(-2)
    kernel = (_ANTIALIAS_BACKWARD if antialias else _UPSAMPLE_BACKWARD).get((mode, spatial))
    if kernel is None:
        raise UnsupportedCall(f"interpolate: mode={mode!r}{' with antialias' if antialias else ''} on a "
                              f"{input.dim()}-d input has no rule")
    scales = [None] * spatial  # None: the kernel uses the size ratio, as the forward did
    if scale_factor is not None and not recompute_scale_factor:
        scales = [float(s) for s in (scale_factor if isinstance(scale_factor, (tuple, list)) else
                                     [scale_factor] * spatial)]
    corners = [] if mode.startswith("nearest") else [bool(align_corners)]
    return kernel(g, list(out.shape[2:]), list(input.shape), *corners, *scales)


defop("interpolate", interpolate)

# ---------------------------------------------------------------- recurrent layers
# One cell step maps the input projection ``gi = x @ w_ih.T + b_ih`` (made for every step at once) and the state
# to the new state, keeping what its backward reads; the backward maps the new state's gradient to the gradients
# of ``gi``, of ``gh = h @ w_hh.T + b_hh`` (the same tensor except in the GRU) and of the old state. The gates are
# recomputed from the inputs, in torch's order: LSTM i, f, g, o; GRU r, z, n.


def _affine_grads(d: Tensor, x: Tensor, bias: bool) -> tuple[Tensor, Tensor | None]:
    """The gradients of ``w`` and ``b`` in ``x @ w.T + b`` from the result's gradient ``d``, over all leading dims."""
    d = d.reshape(-1, d.shape[-1])
    return d.mT @ x.reshape(-1, x.shape[-1]), d.sum(0) if bias else None


def _lstm_step(gi: Tensor, state: tuple, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None) -> tuple:
    h, c = state
    gates = gi + (h @ w_hh.mT if b_hh is None else F.linear(h, w_hh, b_hh))
    i, f, cand, o = gates.chunk(4, -1)
    i, f, cand, o = i.sigmoid(), f.sigmoid(), cand.tanh(), o.sigmoid()
    c_new = f * c + i * cand
    tanh_c = c_new.tanh()
    h_new = o * tanh_c
    h_out = h_new if w_hr is None else h_new @ w_hr.mT  # proj_size: h is projected
    return (h_out, c_new), (h, c, i, f, cand, o, tanh_c, h_new)


def _lstm_step_back(d_state: tuple, saved: tuple, w_hh: Tensor, w_hr: Tensor | None) -> tuple:
    dh, dc = d_state
    h, c, i, f, cand, o, tanh_c, _ = saved
    if w_hr is not None:
        dh = dh @ w_hr
    dc = dc + aten.tanh_backward(dh * o, tanh_c)
    d_gates = torch.cat([aten.sigmoid_backward(dc * cand, i), aten.sigmoid_backward(dc * c, f),
                         aten.tanh_backward(dc * i, cand), aten.sigmoid_backward(dh * tanh_c, o)], -1)
    d_gh = d_gates.to(w_hh.dtype)
    return d_gates, d_gh, (d_gh @ w_hh, dc * f)


def _gru_step(gi: Tensor, state: tuple, w_hh: Tensor, b_hh: Tensor | None, w_hr: Any = None) -> tuple:
    (h,) = state
    gh = h @ w_hh.mT if b_hh is None else F.linear(h, w_hh, b_hh)
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r, z = (i_r + h_r).sigmoid(), (i_z + h_z).sigmoid()
    n = (i_n + r * h_n).tanh()  # the reset gate scales h's projection, bias included
    return (n + z * (h - n),), (h, r, z, n, h_n)


def _gru_step_back(d_state: tuple, saved: tuple, w_hh: Tensor, w_hr: Any = None) -> tuple:
    (dh,) = d_state
    h, r, z, n, h_n = saved
    dn = aten.tanh_backward(dh * (1 - z), n)
    dr = aten.sigmoid_backward(dn * h_n, r)
    dz = aten.sigmoid_backward(dh * (h - n), z)
    d_gh = torch.cat([dr, dz, dn * r], -1).to(w_hh.dtype)
    return torch.cat([dr, dz, dn], -1), d_gh, (d_gh @ w_hh + dh * z,)


def _rnn_step(activation: Callable[[Tensor], Tensor]) -> Callable[..., tuple]:
    def step(gi: Tensor, state: tuple, w_hh: Tensor, b_hh: Tensor | None, w_hr: Any = None) -> tuple:
        (h,) = state
        h_new = activation(gi + (h @ w_hh.mT if b_hh is None else F.linear(h, w_hh, b_hh)))
        return (h_new,), (h, h_new)
    return step


def _rnn_step_back(derivative: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., tuple]:
    def back(d_state: tuple, saved: tuple, w_hh: Tensor, w_hr: Any = None) -> tuple:
        d = derivative(d_state[0], saved[1])
        d_gh = d.to(w_hh.dtype)
        return d, d_gh, (d_gh @ w_hh,)
    return back


_CELLS = {  # op name -> (step, step backward)
    "lstm": (_lstm_step, _lstm_step_back),
    "gru": (_gru_step, _gru_step_back),
    "rnn_tanh": (_rnn_step(torch.tanh), _rnn_step_back(aten.tanh_backward)),
    "rnn_relu": (_rnn_step(torch.relu), _rnn_step_back(lambda d, h: aten.threshold_backward(d, h, 0))),
}


def _cell_rule(kind: str) -> Callable[..., tuple]:
    """The rule of ``torch.<kind>_cell(input, hx, w_ih, w_hh, b_ih, b_hh)``: one step (nn.*Cell passes zeros for
    a missing hx, and a batch of one for a 1-d input), made again once per backward pass."""
    step, step_back = _CELLS[kind]

    def forward(input: Tensor, state: tuple, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
                b_hh: Tensor | None) -> tuple:
        gi = input @ w_ih.mT if b_ih is None else F.linear(input, w_ih, b_ih)
        return step(gi, state, w_hh, b_hh, None)

    def rule(g: Tensor, out: Any, input: Tensor, hx: Any, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
             b_hh: Tensor | None = None, *, output_index: int = 0) -> tuple:
        state = tuple(hx) if kind == "lstm" else (hx,)
        args = (input, state, w_ih, w_hh, b_ih, b_hh)  # the step made once for the LSTM's h and c
        new_state, saved = once_per_pass((kind, *args), lambda: forward(*args), last=output_index == 0)
        d_state = tuple(g if k == output_index else torch.zeros_like(s) for k, s in enumerate(new_state))
        d_gi, d_gh, d_prev = step_back(d_state, saved, w_hh, None)
        d_gi = d_gi.to(w_ih.dtype)  # a cell may mix dtypes (input and w_ih, hx and w_hh): each side's own
        d_w_ih, d_b_ih = _affine_grads(d_gi, input, b_ih is not None)
        d_w_hh, d_b_hh = _affine_grads(d_gh, state[0], b_hh is not None)
        d_hx = d_prev if kind == "lstm" else d_prev[0]
        return d_gi @ w_ih, d_hx, d_w_ih, d_w_hh, d_b_ih, d_b_hh

    rule.__doc__ = f"The gradients of torch.{kind}_cell's inputs, through one step recomputed from them."
    return rule


for _kind in _CELLS:
    defop(f"{_kind}_cell", _cell_rule(_kind), multi=_kind == "lstm")


class _Weights(NamedTuple):
    """One layer's weights in one direction."""

    ih: Tensor
    hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    hr: Tensor | None  # the LSTM's projection (proj_size > 0)


class _Run(NamedTuple):
    """One layer in one direction, run forward: its output and each step's saved tensors."""

    output: Tensor
    saved: dict[int, tuple]
    order: range


def _join(steps: list[Tensor], packed: bool) -> Tensor:
    """Per-step tensors (in time order) as one sequence: stacked, or one after the other for packed data."""
    return torch.cat(steps) if packed else torch.stack(steps)


def _run_forward(step: Callable[..., tuple], x: Tensor, where: list, sizes: list[int] | None, state: tuple,
                 w: _Weights, reverse: bool) -> _Run:
    """A layer's steps over the sequence; with packed data, step t updates only the first sizes[t] sequences."""
    gi = x @ w.ih.mT if w.b_ih is None else F.linear(x, w.ih, w.b_ih)
    order = range(len(where) - 1, -1, -1) if reverse else range(len(where))
    saved: dict[int, tuple] = {}
    hs: list[Any] = [None] * len(where)
    for t in order:
        rows = sizes[t] if sizes is not None and sizes[t] < state[0].shape[0] else None
        part = state if rows is None else tuple(s[:rows] for s in state)
        part, saved[t] = step(gi[where[t]], part, w.hh, w.b_hh, w.hr)
        state = part if rows is None else tuple(torch.cat([p, s[rows:]]) for p, s in zip(part, state))
        hs[t] = part[0]
    return _Run(_join(hs, sizes is not None), saved, order)


def _run_backward(step_back: Callable[..., tuple], x: Tensor, where: list, sizes: list[int] | None, run: _Run,
                  w: _Weights, d_output: Tensor, d_state: tuple) -> tuple[Tensor, list, tuple]:
    """Backpropagation through time for one run: the gradients of its input, its weights and its initial state."""
    n = len(where)
    d_gi, d_gh, d_h = [None] * n, [None] * n, [None] * n
    for t in reversed(run.order):
        rows = sizes[t] if sizes is not None and sizes[t] < d_state[0].shape[0] else None
        part = d_state if rows is None else tuple(s[:rows] for s in d_state)
        d_h[t] = part[0] + d_output[where[t]]
        d_gi[t], d_gh[t], part = step_back((d_h[t], *part[1:]), run.saved[t], w.hh, w.hr)
        d_state = part if rows is None else tuple(torch.cat([p, s[rows:]]) for p, s in zip(part, d_state))
    packed = sizes is not None
    d_gi_all, d_gh_all = _join(d_gi, packed).to(w.ih.dtype), _join(d_gh, packed)  # (each side in its dtype)
    h_prev = _join([run.saved[t][0] for t in range(n)], packed)
    d_w_ih, d_b_ih = _affine_grads(d_gi_all, x, w.b_ih is not None)
    d_w_hh, d_b_hh = _affine_grads(d_gh_all, h_prev, w.b_hh is not None)
    d_weights = [d_w_ih, d_w_hh] + ([d_b_ih, d_b_hh] if w.b_ih is not None else [])
    if w.hr is not None:
        d_weights.append(_affine_grads(_join(d_h, packed), _join([run.saved[t][-1] for t in range(n)], packed),
                                       False)[0])
    return d_gi_all @ w.ih, d_weights, d_state


_MODULES = {"lstm": "nn.LSTM", "gru": "nn.GRU", "rnn_tanh": "nn.RNN", "rnn_relu": "nn.RNN"}


class _Sequence(NamedTuple):
    """A torch.lstm/gru/rnn_* call's arguments, read alike for the padded and the packed overload."""

    states: tuple  # (h0,) or (h0, c0), each (num_layers * directions, batch, size)
    params: list  # w_ih, w_hh (, b_ih, b_hh) (, w_hr) per layer and direction
    has_biases: bool
    num_layers: int
    directions: int
    projected: bool  # an LSTM with proj_size: h0 narrower than c0, a w_hr per run
    sizes: list[int] | None  # packed data: the batch size at each step
    where: list  # each step's index in a layer's input: a time step, or its rows of packed data

    @property
    def per_run(self) -> int:
        return 2 + 2 * self.has_biases + self.projected

    def weights(self, k: int) -> _Weights:
        """The weights of run ``k`` (layer * directions + direction)."""
        w = self.params[k * self.per_run:(k + 1) * self.per_run]
        biases = (w[2], w[3]) if self.has_biases else (None, None)
        return _Weights(w[0], w[1], *biases, w[-1] if self.projected else None)


def _sequence(kind: str, x: Tensor, hx: Any, params: Any, has_biases: Any, num_layers: int, dropout: float,
              train: bool, bidirectional: bool, sizes: list[int] | None) -> _Sequence:
    if dropout and train and num_layers > 1:
        module = _MODULES[kind]
        raise UnsupportedCall(
            f"{kind}: dropout={dropout} between the layers of an {module} in training mode draws its masks "
            f"inside torch's kernel, out of a rule's reach; record with dropout=0 or in eval mode "
            f"(model.eval()), or stack one-layer {module}s with nn.Dropout between them, which records")
    if sizes is None:
        where: list = list(range(x.shape[0]))
    else:
        where = [slice(end - size, end) for end, size in zip(itertools.accumulate(sizes), sizes)]
    states = tuple(hx) if kind == "lstm" else (hx,)
    projected = kind == "lstm" and hx[0].shape[-1] != hx[1].shape[-1]
    return _Sequence(states, list(params), bool(has_biases), num_layers, 2 if bidirectional else 1, projected,
                     sizes, where)


def _layers_forward(step: Callable[..., tuple], seq: _Sequence, x: Tensor) -> tuple[list, Tensor]:
    """Every layer and direction run again: per layer, its input and its runs; and the last layer's output."""
    layers = []
    for layer in range(seq.num_layers):
        runs = []
        for d in range(seq.directions):
            k = layer * seq.directions + d
            weights = seq.weights(k)
            initial = tuple(s[k] for s in seq.states)
            runs.append((weights, _run_forward(step, x, seq.where, seq.sizes, initial, weights, reverse=d == 1)))
        layers.append((x, runs))
        x = torch.cat([run.output for _, run in runs], -1) if seq.directions == 2 else runs[0][1].output
    return layers, x


def _layers_backward(step_back: Callable[..., tuple], seq: _Sequence, layers: list, d_x: Tensor,
                     d_final: list[Tensor]) -> tuple[Tensor, tuple, list]:
    """From the last layer down: the gradients of the input, of the initial states and of the weights."""
    d_params: list[Any] = [None] * len(seq.params)
    d_states: list[list[Any]] = [[None] * len(layers) * seq.directions for _ in seq.states]
    for layer in reversed(range(seq.num_layers)):
        x, runs = layers[layer]
        d_input = None
        for d, (weights, run) in enumerate(runs):
            k = layer * seq.directions + d
            width = run.output.shape[-1]
            d_output = d_x[..., d * width:(d + 1) * width] if seq.directions == 2 else d_x
            d_run_input, d_weights, d_initial = _run_backward(step_back, x, seq.where, seq.sizes, run, weights,
                                                              d_output, tuple(final[k] for final in d_final))
            d_params[k * seq.per_run:(k + 1) * seq.per_run] = d_weights
            d_input = d_run_input if d_input is None else d_input + d_run_input
            for j, d_state in enumerate(d_initial):
                d_states[j][k] = d_state
        d_x = d_input
    return d_x, tuple(torch.stack(d) for d in d_states), d_params


class _Rerun(NamedTuple):
    """A torch.lstm/gru/rnn_* call run again from its arguments: what backpropagation through time reads."""

    seq: _Sequence
    layers: list  # per layer, its input and its runs (_layers_forward)
    output: Tensor  # the last layer's output, time first
    packed: bool  # the PackedSequence overload
    turn: bool  # batch_first: the input and the output's gradient are transposed to time first


def _rerun(kind: str, input: Tensor, hx: Any, params: Any, has_biases: Any, num_layers: Any, dropout: Any,
           train: Any, bidirectional: Any, batch_first: Any) -> _Rerun:
    """Every layer and direction of the call run again (the forward keeps nothing for the backward)."""
    sizes, packed = None, isinstance(has_biases, (list, tuple))  # packed: the arguments sit one place on
    if packed:
        sizes = hx.tolist()
        hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = (
            params, has_biases, num_layers, dropout, train, bidirectional, batch_first, False)
    turn = bool(batch_first) and not packed
    x = input.transpose(0, 1) if turn else input
    seq = _sequence(kind, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, sizes)
    layers, output = _layers_forward(_CELLS[kind][0], seq, x)
    return _Rerun(seq, layers, output, packed, turn)


def _sequence_rule(kind: str) -> Callable[..., tuple]:
    """The rule of ``torch.<kind>(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
    batch_first)`` as nn.LSTM/GRU/RNN call it (and of its PackedSequence overload, ``(data, batch_sizes, hx, ...)``):
    every layer and direction run again, then backpropagated through time. The re-run is made once per backward
    pass however many of the call's outputs reach the loss (each output's rule backpropagates its own gradient)."""
    step_back = _CELLS[kind][1]

    def rule(g: Tensor, out: Any, input: Tensor, hx: Any, params: Any, has_biases: Any, num_layers: Any,
             dropout: Any, train: Any, bidirectional: Any, batch_first: Any = False, *, output_index: int = 0
             ) -> tuple:
        args = (kind, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        seq, layers, output, packed, turn = once_per_pass(args, lambda: _rerun(*args), last=output_index == 0)
        d_output = (g.transpose(0, 1) if turn else g) if output_index == 0 else torch.zeros_like(output)
        d_final = [g if output_index == 1 + j else torch.zeros_like(s) for j, s in enumerate(seq.states)]
        d_x, d_hx, d_params = _layers_backward(step_back, seq, layers, d_output, d_final)
        d_x, d_hx = d_x.transpose(0, 1) if turn else d_x, d_hx if kind == "lstm" else d_hx[0]
        return (d_x, None, d_hx, d_params) if packed else (d_x, d_hx, d_params)

    return rule


for _kind in _CELLS:
    defop(_kind, _sequence_rule(_kind), multi=True)


# pack_padded_sequence and pad_packed_sequence (a PackedSequence's data holds step t's first batch_sizes[t] rows)
def _pack_rows(padded: Tensor, sizes: list[int]) -> Tensor:
    """Step after step, the rows of a (time, batch, ...) tensor that a PackedSequence with these sizes keeps."""
    return torch.cat([padded[t, :size] for t, size in enumerate(sizes)])


def _pad_rows(data: Tensor, sizes: list[int], steps: int) -> Tensor:
    """The inverse of _pack_rows: packed rows back in a (steps, batch, ...) tensor, zeros elsewhere."""
    batch, ends = sizes[0], list(itertools.accumulate(sizes))
    rows = [torch.cat([data[end - size:end], data.new_zeros((batch - size, *data.shape[1:]))])
            for end, size in zip(ends, sizes)]
    rows += [data.new_zeros((batch, *data.shape[1:]))] * (steps - len(sizes))
    return torch.stack(rows)


def pack_padded_sequence(g: Tensor, out: Any, input: Tensor, lengths: Tensor, batch_first: bool, *,
                         output_index: int = 0) -> Any:
    """The packed data's gradient goes back to the rows it came from; batch_sizes (output 1) takes none."""
    if output_index:
        return None
    grad = _pad_rows(g, out[1].tolist(), input.shape[1 if batch_first else 0])
    return grad.transpose(0, 1) if batch_first else grad


def pad_packed_sequence(g: Tensor, out: Any, data: Tensor, batch_sizes: Tensor, batch_first: bool,
                        padding_value: Any, total_length: int, *, output_index: int = 0) -> Any:
    """The padded tensor's gradient at the packed rows (the padding takes none); lengths (output 1) take none."""
    if output_index:
        return None
    return _pack_rows(g.transpose(0, 1) if batch_first else g, batch_sizes.tolist())


def pad_sequence(g: Tensor, out: Tensor, sequences: Sequence[Tensor], batch_first: bool = False,
                 padding_value: float = 0.0, padding_side: str = "right") -> tuple:
    """Each sequence's gradient is its steps' rows of ``g``, at the end for padding_side='left' (the padding
    takes none)."""
    g = g if batch_first else g.transpose(0, 1)
    steps = g.shape[1]
    left = padding_side == "left"
    return ([g[i, steps - len(s):] if left else g[i, :len(s)] for i, s in enumerate(sequences)],)


defop("_pack_padded_sequence", pack_padded_sequence, multi=True)
defop("_pad_packed_sequence", pad_packed_sequence, multi=True)
defop("pad_sequence", pad_sequence)

# F.grid_sample's arguments as its kernels number them
_GRID_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_GRID_PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}


def grid_sample(g: Tensor, out: Tensor, input: Tensor, grid: Tensor, mode: str = "bilinear",
                padding_mode: str = "zeros", align_corners: bool | None = None) -> tuple:
    """Torch's grid sampler backward (nearest: the grid's gradient is 0, as torch's)."""
    backward = aten.grid_sampler_2d_backward if input.dim() == 4 else aten.grid_sampler_3d_backward
    grad_input, grad_grid = backward(g, input, grid, _GRID_MODES[mode], _GRID_PADDINGS[padding_mode],
                                     bool(align_corners), [True, True])
    return grad_input, grad_grid


def affine_grid(g: Tensor, out: Tensor, theta: Tensor, size: Any, align_corners: bool | None = None) -> Tensor:
    """out[n, p] = theta[n] @ (base[p], 1): theta's gradient contracts g with the base grid over the positions p.

    The base grid is the grid of the identity transform (its coordinates come out exactly).
    """
    identity = torch.eye(theta.shape[1], theta.shape[2], dtype=theta.dtype, device=theta.device).expand_as(theta)
    base = F.affine_grid(identity, list(size), align_corners=bool(align_corners)).flatten(1, -2)
    base = torch.cat([base, torch.ones_like(base[..., :1])], -1)
    return g.flatten(1, -2).mT @ base


defop("grid_sample", grid_sample)
defop("affine_grid", affine_grid)

# ---------------------------------------------------------------- constants: no gradient flows

defop("detach", None, constant=True, funcs=("Tensor.data",))
constants(
    "zeros", "ones", "full", "empty", "eye", "arange", "linspace", "logspace", "tensor",
    "randn", "rand", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson",
    "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "randint_like",
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "one_hot",
    "argmax", "argmin", "argsort", "eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isfinite",
    "logical_and", "logical_or", "logical_not", "logical_xor", "nonzero", "bincount", "floor_divide",
    "zero", "uniform", "random", "exponential",  # in place as Tensor.zero_ ...: a new constant version
)
# torch.as_tensor(t, dtype=...) of a tensor is t.to(dtype), differentiated by torch; of Python data, a new tensor
defop("as_tensor", lambda g, out, data, dtype=None, device=None: (
    g.to(dtype=data.dtype, device=data.device) if isinstance(data, Tensor) else None))
# x.fill_(v): nothing flows to x; a tensor v (0-d) receives the sum of the gradient, as in torch
defop("fill", lambda g, out, x, value: (None, g.sum() if isinstance(value, Tensor) else None))
constants("from_numpy", auto=False, funcs=("torch.from_numpy",))
