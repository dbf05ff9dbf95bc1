"""Print a recorded torch call back as the Python source a user would write.

A recorded node keeps its call exactly as made: the torch callable (``node["func"]``)
and its arguments with tensors replaced by :class:`~tensorgraph.graph.Ref`
(``node["args"]``, ``node["kwargs"]``). This module turns that back into source::

    >>> printer.expression(graph, graph.node_id("bnvar_inv"))
    '(bnvar + 1e-05)**-0.5'

Operators are printed as operators with Python's precedence and only the parentheses it
needs (``-(a + b) * c``, ``x**-0.5``, ``1 / x``); Tensor methods as methods
(``x.sum(0, keepdim=True)``); functions with their usual module alias (``torch.tanh(x)``,
``F.cross_entropy(logits, Yb)``); indexing as subscripts (``x[range(32), Yb]``); properties
as attributes (``x.T``); in-place ops as statements (``x += y``, ``x[i] = v``).

What the recorder sees is not always what was typed: ``1 + x`` and ``x.add(1)`` both
arrive as ``Tensor.add(x, 1)`` and print as ``x + 1``; ``1 / n * t`` with a Python ``n``
arrives as ``t * 0.03125``. Floats that are a simple fraction exactly (``0.03225806451612903``
is ``1 / 31`` to the last bit) print as that fraction. Printed code evaluates to the same
values, bit for bit, in a namespace holding :data:`NAMESPACE` and the tensors' names.

The naming of tensors is the caller's: ``name(node_id)`` returns a variable name, or an
:class:`Expr` to inline a whole sub-expression (its precedence decides the parentheses).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import torch
import torch.nn.functional as F

from .graph import Ref, identifier

if TYPE_CHECKING:
    from .graph import Graph

# The most calls an expression nests when temporaries used once are inlined into it (codegen, tg.compile):
# a deeper chain gets a variable every so many levels. CPython's parser refuses about 200 nested brackets, and
# its compiler recurses once per level of an expression, so a long chain inlined whole could not even be compiled.
MAX_NESTING = 24

# Python's operator precedence, loosest to tightest (the numbers only need to be ordered)
TUPLE, COMPARE, BIT_OR, BIT_XOR, BIT_AND, SHIFT, SUM, PRODUCT, UNARY, POWER, PRIMARY, ATOM = range(12)


@dataclass(frozen=True)
class Expr:
    """A piece of source and the precedence of its outermost operator (``ATOM`` for a name)."""

    text: str
    prec: int = ATOM

    def wrap(self, prec: int) -> str:
        """The text, in parentheses when it binds less tightly than ``prec`` requires."""
        return self.text if self.prec >= prec else f"({self.text})"

    def __str__(self) -> str:
        return self.text


Namer = Callable[[int], Union[str, Expr]]

# the modules printed code refers to, under the names it uses for them
NAMESPACE: dict[str, Any] = {"torch": torch, "F": F}

# Tensor methods that Python's operators call: printed as the operator
_BINARY = {
    "add": ("+", SUM), "__add__": ("+", SUM), "sub": ("-", SUM), "__sub__": ("-", SUM),
    "mul": ("*", PRODUCT), "__mul__": ("*", PRODUCT), "div": ("/", PRODUCT), "__truediv__": ("/", PRODUCT),
    "__div__": ("/", PRODUCT), "matmul": ("@", PRODUCT), "__matmul__": ("@", PRODUCT),
    "remainder": ("%", PRODUCT), "__mod__": ("%", PRODUCT), "__floordiv__": ("//", PRODUCT),
    "__and__": ("&", BIT_AND), "__or__": ("|", BIT_OR), "__xor__": ("^", BIT_XOR),
    "__lshift__": ("<<", SHIFT), "__rshift__": (">>", SHIFT),
    "gt": (">", COMPARE), "lt": ("<", COMPARE), "ge": (">=", COMPARE), "le": ("<=", COMPARE),
    "__gt__": (">", COMPARE), "__lt__": ("<", COMPARE), "__ge__": (">=", COMPARE), "__le__": ("<=", COMPARE),
    "eq": ("==", COMPARE), "ne": ("!=", COMPARE), "__eq__": ("==", COMPARE), "__ne__": ("!=", COMPARE),
}
# ``other - x`` arrives as ``Tensor.__rsub__(x, other)``
_REFLECTED = {
    "__rsub__": ("-", SUM), "__radd__": ("+", SUM), "__rmul__": ("*", PRODUCT), "__rdiv__": ("/", PRODUCT),
    "__rtruediv__": ("/", PRODUCT), "__rmatmul__": ("@", PRODUCT), "__rfloordiv__": ("//", PRODUCT),
    "__rmod__": ("%", PRODUCT), "__rand__": ("&", BIT_AND), "__ror__": ("|", BIT_OR),
    "__rxor__": ("^", BIT_XOR), "__rlshift__": ("<<", SHIFT), "__rrshift__": (">>", SHIFT),
    "__rpow__": ("**", POWER),
}
_UNARY = {"neg": "-", "__neg__": "-", "positive": "+", "__pos__": "+", "__invert__": "~", "bitwise_not": "~"}
# ``x += y`` arrives as ``Tensor.add_(x, y)``
_AUGMENTED = {
    "add_": "+=", "__iadd__": "+=", "sub_": "-=", "__isub__": "-=", "mul_": "*=", "__imul__": "*=",
    "div_": "/=", "__itruediv__": "/=", "__idiv__": "/=", "floor_divide_": "//=", "__ifloordiv__": "//=",
    "remainder_": "%=", "__imod__": "%=", "__iand__": "&=", "__ior__": "|=", "__ixor__": "^=",
    "__ilshift__": "<<=", "__irshift__": ">>=",
}
# methods taking a size as varargs: ``x.view((2, 3))`` prints as ``x.view(2, 3)``
_SIZE_METHODS = frozenset({"view", "reshape", "expand", "repeat", "permute", "sum_to_size", "tile"})
# ops returning a named tuple: ``x.max(1).values``
_FIELDS = {
    "max": ("values", "indices"), "min": ("values", "indices"), "sort": ("values", "indices"),
    "topk": ("values", "indices"), "kthvalue": ("values", "indices"), "mode": ("values", "indices"),
    "median": ("values", "indices"), "nanmedian": ("values", "indices"), "cummax": ("values", "indices"),
    "cummin": ("values", "indices"), "aminmax": ("min", "max"), "frexp": ("mantissa", "exponent"),
    "slogdet": ("sign", "logabsdet"),
}
# where functions live, tried in this order; the first that holds the very callable names it
_MODULES = [("F", F), ("torch", torch), ("torch.special", torch.special), ("torch.linalg", torch.linalg),
            ("torch.fft", torch.fft), ("torch.nn.init", torch.nn.init)]


def _pow_func() -> tuple[Any, Any]:
    return torch.Tensor.__pow__, torch.Tensor.__ipow__


_POW, _IPOW = _pow_func()


# ---------------------------------------------------------------- public API


def expression(graph: Graph, node: Any, name: Namer | None = None) -> str:
    """The source of a node's value as an expression (``logits.max(1, keepdim=True).values``).

    ``node``: a node id, a recorded name or the tensor itself. ``name`` maps the node id of
    every tensor argument to its source; by default the nodes' own names. In-place ops print
    as their method (``x.add_(y)`` returns ``x``); ``x[i] = v`` has no expression form and
    raises ``ValueError``: use :func:`statement`.
    """
    data = graph._nodes[_node(graph, node)]
    if data["func"] is None:
        raise ValueError(f"printer: {data['name']!r} is a {data['kind']} (no call to print)")
    return call(data["func"], data["args"], data["kwargs"], name or _default_namer(graph),
                output_index=data["output_index"], statement=False).text


def statement(graph: Graph, node: Any, name: Namer | None = None, target: str | None = None) -> str:
    """The source of a node as a statement: ``target = expr``, or for in-place ops ``x += y``, ``x[i] = v``.

    ``target`` defaults to the node's name. In-place ops change their receiver (the
    previous version of the tensor, printed by ``name``), so they ignore ``target``.
    """
    data = graph._nodes[_node(graph, node)]
    namer = name or _default_namer(graph)
    if data["func"] is None:
        raise ValueError(f"printer: {data['name']!r} is a {data['kind']} (no call to print)")
    if data["inplace"]:
        return call(data["func"], data["args"], data["kwargs"], namer, statement=True).text
    expr = call(data["func"], data["args"], data["kwargs"], namer, output_index=data["output_index"])
    return f"{target or identifier(data['name'])} = {expr.text}"


def call(func: Any, args: tuple, kwargs: dict, name: Namer, *, output_index: int | None = None,
         statement: bool = False) -> Expr:
    """Print one torch call given as recorded: ``func(*args, **kwargs)`` with :class:`Ref` for tensors.

    ``output_index`` selects one output of a call returning several (``.values``, ``[1]``).
    With ``statement``, in-place operators print as augmented assignments (``x += y``)
    and ``__setitem__`` as ``x[i] = v``; without, they print as expressions where Python
    has one (``x.add_(y)``).
    """
    expr = _call(func, tuple(args), dict(kwargs), name, statement)
    if output_index is None:
        return expr
    fields = _FIELDS.get(_name_of(func))
    if fields and output_index < len(fields):
        return Expr(f"{expr.wrap(PRIMARY)}.{fields[output_index]}", PRIMARY)
    return Expr(f"{expr.wrap(PRIMARY)}[{output_index}]", PRIMARY)


def literal(value: Any, name: Namer | None = None) -> Expr:
    """Source for an argument: numbers, tuples, sizes, ranges, slices, dtypes, devices, or a :class:`Ref`.

    Raises ``ValueError`` for a value with no source form (a generator, a lambda ...).
    """
    return _value(value, name or _no_refs, subscript=False)


def op_path(func: Any) -> str | None:
    """``torch.ops.aten.mm`` for an operator from ``torch.ops`` (the rules' aten kernels); None otherwise."""
    if isinstance(func, torch._ops.OpOverloadPacket):
        namespace, _, op = func._qualified_op_name.partition("::")
        return f"torch.ops.{namespace}.{op}"
    if isinstance(func, torch._ops.OpOverload):
        namespace, _, op = func.name().partition("::")
        op, _, overload = op.partition(".")
        return f"torch.ops.{namespace}.{op}.{overload or 'default'}"
    return None


def qualified_name(func: Any) -> str:
    """How printed code names a torch function: ``torch.tanh``, ``F.cross_entropy``, ``torch.ops.aten.mm``."""
    path = op_path(func)
    if path is not None:
        return path
    name = getattr(func, "__name__", None)
    if name:
        for alias, module in _MODULES:
            if getattr(module, name, None) is func:
                return f"{alias}.{name}"
    module_name, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    if module_name and qualname and "<" not in qualname:
        return f"{module_name}.{qualname}"
    raise ValueError(f"printer: cannot name the callable {func!r} in source")


def namespace(graph: Graph) -> dict[str, Any]:
    """A namespace to run printed code in: the modules of :data:`NAMESPACE` and every node's value by name."""
    import tensorgraph

    result = {**NAMESPACE, "tensorgraph": tensorgraph}
    for data in graph._nodes:
        result.setdefault(identifier(data["name"]), data["value"])
    return result


# ---------------------------------------------------------------- textbook formulas


class Formula(NamedTuple):
    """How :func:`textbook` writes one fused backward kernel: ``build(value, *args, **kwargs)`` gets the
    kernel's arguments as recorded and ``value`` (an argument's :class:`Expr`); ``repeats``: the positions
    of the tensor arguments the formula reads more than once (a caller may put those in variables first)."""

    build: Callable[..., Any]
    repeats: tuple[int, ...]
    outputs: int = 1  # a kernel returning several gradients: build gives one Expr per output (None if not asked)


def _tanh_backward(value: Callable[[Any], Expr], g: Any, y: Any) -> Expr:
    return Expr(f"(1 - {value(y).wrap(PRIMARY)}**2) * {value(g).wrap(PRODUCT + 1)}", PRODUCT)


def _sigmoid_backward(value: Callable[[Any], Expr], g: Any, y: Any) -> Expr:
    y_ = value(y)
    return Expr(f"{y_.wrap(PRODUCT)} * (1 - {y_.wrap(PRODUCT)}) * {value(g).wrap(PRODUCT + 1)}", PRODUCT)


def _threshold_backward(value: Callable[[Any], Expr], g: Any, x: Any, threshold: Any) -> Expr:
    return Expr(f"({_above(value, x, threshold)}) * {value(g).wrap(PRODUCT + 1)}", PRODUCT)


def _softmax_backward(value: Callable[[Any], Expr], g: Any, y: Any, dim: Any, dtype: Any = None) -> Expr:
    g_, y_ = value(g), value(y)
    inner = f"({g_.wrap(PRODUCT)} * {y_.wrap(PRODUCT + 1)}).sum({value(dim)}, keepdim=True)"
    return Expr(f"{y_.wrap(PRODUCT)} * ({g_.wrap(SUM)} - {inner})", PRODUCT)


def _log_softmax_backward(value: Callable[[Any], Expr], g: Any, y: Any, dim: Any, dtype: Any = None) -> Expr:
    g_ = value(g)
    return Expr(f"{g_.wrap(SUM)} - {value(y).wrap(PRIMARY)}.exp() * {g_.wrap(PRIMARY)}.sum({value(dim)}, "
                f"keepdim=True)", SUM)


def _gelu_backward(value: Callable[[Any], Expr], g: Any, x: Any, approximate: str = "none") -> Expr:
    x_, g_ = value(x), value(g).wrap(PRODUCT + 1)
    if approximate == "tanh":  # gelu(x) = x/2 * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x**3)
        t = f"torch.tanh((2 / torch.pi)**0.5 * ({x_.wrap(SUM)} + 0.044715 * {x_.wrap(PRIMARY)}**3))"
        return Expr(f"(0.5 * (1 + {t}) + 0.5 * {x_.wrap(PRODUCT)} * (1 - {t}**2) * (2 / torch.pi)**0.5 * "
                    f"(1 + 3 * 0.044715 * {x_.wrap(PRIMARY)}**2)) * {g_}", PRODUCT)
    # Phi(x) + x * phi(x): the normal distribution's cdf and density
    return Expr(f"(0.5 * (1 + torch.erf({x_.wrap(PRODUCT)} / 2**0.5)) + {x_.wrap(PRODUCT)} * "
                f"torch.exp(-{x_.wrap(PRIMARY)}**2 / 2) / (2 * torch.pi)**0.5) * {g_}", PRODUCT)


def _silu_backward(value: Callable[[Any], Expr], g: Any, x: Any) -> Expr:
    x_ = value(x)
    return Expr(f"torch.sigmoid({x_}) * (1 + {x_.wrap(PRODUCT)} * (1 - torch.sigmoid({x_}))) * "
                f"{value(g).wrap(PRODUCT + 1)}", PRODUCT)


def _leaky_relu_backward(value: Callable[[Any], Expr], g: Any, x: Any, slope: Any, is_result: Any = None) -> Expr:
    g_ = value(g)
    return Expr(f"torch.where({_above(value, x, 0)}, {g_}, {value(slope).wrap(PRODUCT)} * "
                f"{g_.wrap(PRODUCT + 1)})", PRIMARY)


def _hardtanh_backward(value: Callable[[Any], Expr], g: Any, x: Any, low: Any, high: Any) -> Expr:
    x_ = value(x).wrap(COMPARE + 1)
    inside = f"({x_} > {value(low).wrap(COMPARE + 1)}) & ({x_} < {value(high).wrap(COMPARE + 1)})"
    return Expr(f"({inside}) * {value(g).wrap(PRODUCT + 1)}", PRODUCT)


def _softplus_backward(value: Callable[[Any], Expr], g: Any, x: Any, beta: Any, threshold: Any) -> Expr:
    g_, x_ = value(g), value(x)
    scaled = x_ if beta == 1 else Expr(f"{x_.wrap(PRODUCT)} * {value(beta).wrap(PRODUCT + 1)}", PRODUCT)
    return Expr(f"torch.where({scaled.wrap(COMPARE + 1)} > {value(threshold).wrap(COMPARE + 1)}, {g_}, "
                f"torch.sigmoid({scaled}) * {g_.wrap(PRODUCT + 1)})", PRIMARY)


def _elu_backward(value: Callable[[Any], Expr], g: Any, alpha: Any, scale: Any, input_scale: Any, is_result: Any,
                  v: Any) -> Expr:
    """elu, selu and celu: ``scale * g`` where v > 0, else the derivative of ``scale * alpha * (exp(x * input_scale)
    - 1)``, written from the output y (``input_scale * (y + scale * alpha) * g``) or from the input x."""
    g_, v_ = value(g), value(v)
    above = _times(value, [scale], g_)
    if is_result:
        shift = _times(value, [scale], value(alpha))
        below = _times(value, [input_scale], Expr(f"({v_.wrap(SUM)} + {shift.wrap(SUM)})", PRIMARY), g_)
    else:
        exponent = _times(value, [input_scale], v_) if _is_one(input_scale) else \
            Expr(f"{v_.wrap(PRODUCT)} * {value(input_scale).wrap(PRODUCT + 1)}", PRODUCT)
        below = _times(value, [scale, alpha, input_scale], Expr(f"torch.exp({exponent})", PRIMARY), g_)
    return Expr(f"torch.where({_above(value, v, 0)}, {above}, {below})", PRIMARY)


def _mish_backward(value: Callable[[Any], Expr], g: Any, x: Any) -> Expr:
    """(t + x * sigmoid(x) * (1 - t**2)) * g, t = tanh(softplus(x)), softplus written log1p(exp(x)) as the kernel."""
    x_ = value(x)
    t = f"torch.tanh(torch.log1p(torch.exp({x_})))"
    return Expr(f"({t} + {x_.wrap(PRODUCT)} * torch.sigmoid({x_}) * (1 - {t}**2)) * {value(g).wrap(PRODUCT + 1)}",
                PRODUCT)


def _hardswish_backward(value: Callable[[Any], Expr], g: Any, x: Any) -> Expr:
    """0 up to -3 (included), (x/3 + 1/2) * g below 3, g from 3 on: torch's kernel at the kinks."""
    x_, g_ = value(x), value(g)
    low, high = f"{x_.wrap(COMPARE + 1)} <= -3", f"{x_.wrap(COMPARE + 1)} < 3"
    return Expr(f"torch.where({low}, 0.0, torch.where({high}, ({x_.wrap(PRODUCT)} / 3 + 0.5) * "
                f"{g_.wrap(PRODUCT + 1)}, {g_}))", PRIMARY)


def _hardsigmoid_backward(value: Callable[[Any], Expr], g: Any, x: Any) -> Expr:
    """g / 6 strictly between -3 and 3: the derivative of (x + 3).clamp(0, 6) / 6 (torch's kernel multiplies by
    1/6 rounded to float32, 3e-8 off in float64)."""
    x_ = value(x).wrap(COMPARE + 1)
    return Expr(f"(({x_} > -3) & ({x_} < 3)) * {value(g).wrap(PRODUCT + 1)} / 6", PRODUCT)


def _log_sigmoid_backward(value: Callable[[Any], Expr], g: Any, x: Any, buffer: Any = None) -> Expr:
    return Expr(f"torch.sigmoid(-{value(x).wrap(UNARY)}) * {value(g).wrap(PRODUCT + 1)}", PRODUCT)


def _shrink_backward(value: Callable[[Any], Expr], g: Any, x: Any, lambd: Any) -> Expr:
    """softshrink and hardshrink: g where |x| > lambd, else 0."""
    return Expr(f"({value(x).wrap(PRIMARY)}.abs() > {value(lambd).wrap(COMPARE + 1)}) * "
                f"{value(g).wrap(PRODUCT + 1)}", PRODUCT)


def _times(value: Callable[[Any], Expr], factors: list[Any], *terms: Expr) -> Expr:
    """``2.0 * a * g``: the factors that are not 1, then the terms, as one product."""
    parts = [value(f) for f in factors if not _is_one(f)] + list(terms)
    parts = [p.wrap(PRODUCT) if i == 0 else p.wrap(PRODUCT + 1) for i, p in enumerate(parts)]
    return Expr(" * ".join(parts), PRODUCT) if len(parts) > 1 else terms[0]


def _is_one(number: Any) -> bool:
    return isinstance(number, (int, float)) and not isinstance(number, bool) and number == 1


def _layer_norm_backward(value: Callable[[Any], Expr], g: Any, x: Any, shape: Any, mean: Any, rstd: Any,
                         weight: Any, bias: Any, mask: Any) -> tuple[Expr | None, ...]:
    """(dx, dweight, dbias), each None where ``mask`` does not ask for it: with x̂ = (x - mean) * rstd and
    gw = g * weight, ``dx = rstd * (gw - gw.mean(dims) - x̂ * (gw * x̂).mean(dims))`` over the normalized dims."""
    g_, rstd_ = value(g), value(rstd)
    dims = ", ".join(str(-i) for i in range(len(shape), 0, -1))
    dims = dims if len(shape) == 1 else f"({dims})"
    xhat = Expr(f"({value(x).wrap(SUM)} - {value(mean).wrap(SUM + 1)}) * {rstd_.wrap(PRODUCT + 1)}", PRODUCT)
    gw = g_ if weight is None else Expr(f"{g_.wrap(PRODUCT)} * {value(weight).wrap(PRODUCT + 1)}", PRODUCT)
    dx = Expr(f"{rstd_.wrap(PRODUCT)} * ({gw.wrap(SUM)} - {gw.wrap(PRIMARY)}.mean({dims}, keepdim=True) - "
              f"{xhat.wrap(PRODUCT)} * ({gw.wrap(PRODUCT)} * {xhat.wrap(PRODUCT + 1)}).mean({dims}, keepdim=True))",
              PRODUCT)
    flat = ", ".join(str(size) for size in shape)  # the other dims flattened into one, summed over
    dweight = Expr(f"({g_.wrap(PRODUCT)} * {xhat.wrap(PRODUCT + 1)}).reshape(-1, {flat}).sum(0)", PRIMARY)
    dbias = Expr(f"{g_.wrap(PRIMARY)}.reshape(-1, {flat}).sum(0)", PRIMARY)
    return tuple(part if asked else None for part, asked in zip((dx, dweight, dbias), mask))


def _above(value: Callable[[Any], Expr], x: Any, threshold: Any) -> str:
    return f"{value(x).wrap(COMPARE + 1)} > {value(threshold).wrap(COMPARE + 1)}"


# torch's fused backward kernels the rules call, by aten name, written as the formula they compute. The default
# answer key calls the kernels (bit-exact with torch); textbook=True prints these (equal up to rounding). The
# kernels' dtype arguments are left out: the rules pass the output's own dtype. A kernel not here prints as called.
TEXTBOOK: dict[str, Formula] = {
    "tanh_backward": Formula(_tanh_backward, ()),  # (1 - y**2) * g
    "sigmoid_backward": Formula(_sigmoid_backward, (1,)),  # y * (1 - y) * g
    "threshold_backward": Formula(_threshold_backward, ()),  # relu: (y > 0) * g
    "_softmax_backward_data": Formula(_softmax_backward, (0, 1)),  # y * (g - (g * y).sum(dim, keepdim=True))
    "_log_softmax_backward_data": Formula(_log_softmax_backward, (0,)),  # g - y.exp() * g.sum(dim, keepdim=True)
    "gelu_backward": Formula(_gelu_backward, (1,)),
    "silu_backward": Formula(_silu_backward, (1,)),  # s * (1 + x * (1 - s)) * g, s = sigmoid(x)
    "leaky_relu_backward": Formula(_leaky_relu_backward, (0,)),
    "hardtanh_backward": Formula(_hardtanh_backward, (1,)),  # also relu6
    "softplus_backward": Formula(_softplus_backward, (0, 1)),
    "elu_backward": Formula(_elu_backward, (0, 5)),  # also selu and celu
    "native_layer_norm_backward": Formula(_layer_norm_backward, (0, 1, 3, 4, 5), outputs=3),
    "mish_backward": Formula(_mish_backward, (1,)),
    "hardswish_backward": Formula(_hardswish_backward, (0, 1)),
    "hardsigmoid_backward": Formula(_hardsigmoid_backward, (1,)),
    "log_sigmoid_backward": Formula(_log_sigmoid_backward, ()),  # sigmoid(-x) * g
    "softshrink_backward": Formula(_shrink_backward, ()),
    "hardshrink_backward": Formula(_shrink_backward, ()),
}


def textbook_formula(func: Any) -> Formula | None:
    """The :data:`TEXTBOOK` formula of a recorded call to a fused backward kernel (``aten.tanh_backward``)."""
    path = op_path(func)
    if path is None or not path.startswith("torch.ops.aten."):
        return None
    return TEXTBOOK.get(path.split(".")[3])


def textbook(func: Any, args: tuple, kwargs: dict, name: Namer) -> Expr | None:
    """A fused backward kernel's call as its elementwise formula in ordinary torch operations
    (``aten.tanh_backward(dh, h)`` as ``(1 - h**2) * dh``); None for a call :data:`TEXTBOOK` lacks."""
    formula = textbook_formula(func)
    if formula is None:
        return None
    built = formula.build(lambda arg: _value(arg, name, subscript=False), *args, **kwargs)
    return built if formula.outputs == 1 else outputs(built)


def outputs(parts: tuple[Expr | None, ...]) -> Expr:
    """A formula's several outputs as one tuple: ``(dx, dw, None)``."""
    return Expr("(" + ", ".join("None" if part is None else part.text for part in parts) + ")", PRIMARY)


# ---------------------------------------------------------------- how a call is written


def _node(graph: Graph, key: Any) -> int:
    """A node id from an id, a name or a tensor, with the graph's own errors naming the key."""
    try:
        return graph.node_id(key)
    except KeyError as err:
        raise KeyError(f"printer: {err.args[0]}") from None


def _default_namer(graph: Graph) -> Namer:
    return lambda node: identifier(graph._nodes[node]["name"])


def _no_refs(node: int) -> str:
    raise ValueError("printer: a tensor argument needs a name function")


def _name_of(func: Any) -> str:
    if getattr(func, "__name__", None) == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", "")
    return getattr(func, "__name__", "") or ""


def _is_method(func: Any) -> bool:
    qualname = getattr(func, "__qualname__", "") or ""
    owner = qualname.split(".")[0]
    return owner in ("Tensor", "TensorBase") and getattr(func, "__module__", None) in (None, "torch._tensor")


def _is_property(func: Any) -> bool:
    owner = getattr(func, "__self__", None)
    return getattr(func, "__name__", None) == "__get__" and getattr(owner, "__objclass__", None) in (
        torch.Tensor, torch._C.TensorBase)


def _call(func: Any, args: tuple, kwargs: dict, name: Namer, statement: bool) -> Expr:
    if _is_property(func):
        return Expr(f"{_operand(args[0], name, PRIMARY)}.{_name_of(func)}", PRIMARY)
    if not _is_method(func) or not args:
        kwargs = _without_defaults(func, args, kwargs)
        return Expr(f"{qualified_name(func)}({_arguments(args, kwargs, name)})", PRIMARY)
    method = func.__name__
    if method == "__getitem__" and len(args) == 2 and not kwargs:
        return Expr(f"{_operand(args[0], name, PRIMARY)}[{_index(args[1], name)}]", PRIMARY)
    if method == "__setitem__" and len(args) == 3 and not kwargs:
        if not statement:
            raise ValueError("printer: x[i] = v is a statement; print it with statement()")
        value = _value(args[2], name, subscript=False).text
        return Expr(f"{_operand(args[0], name, PRIMARY)}[{_index(args[1], name)}] = {value}", TUPLE)
    if not kwargs:
        expr = _operator(func, method, args, name, statement)
        if expr is not None:
            return expr
    if method in _SIZE_METHODS and len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) and args[1]:
        args = (args[0], *args[1])
    method = {"__pow__": "pow", "__ipow__": "pow_"}.get(method, method)
    return Expr(f"{_operand(args[0], name, PRIMARY)}.{method}({_arguments(args[1:], kwargs, name)})", PRIMARY)


def _operator(func: Any, method: str, args: tuple, name: Namer, statement: bool) -> Expr | None:
    if len(args) == 1 and method in _UNARY:
        return Expr(f"{_UNARY[method]}{_operand(args[0], name, UNARY, strict=True)}", UNARY)
    if len(args) != 2:
        return None
    if func is _POW:
        return _power(args[0], args[1], name)
    if method == "__rpow__":
        return _power(args[1], args[0], name)
    if method in _BINARY:
        return _binary(args[0], args[1], *_BINARY[method], name)
    if method in _REFLECTED:
        return _binary(args[1], args[0], *_REFLECTED[method], name)
    if statement and (method in _AUGMENTED or func is _IPOW):
        symbol = "**=" if func is _IPOW else _AUGMENTED[method]
        return Expr(f"{_operand(args[0], name, ATOM)} {symbol} {_value(args[1], name, subscript=False).text}", TUPLE)
    return None


def _binary(left: Any, right: Any, symbol: str, prec: int, name: Namer) -> Expr:
    """Left-associative: the right operand needs parentheses at equal precedence (``a - (b + c)``)."""
    if prec == COMPARE:  # comparisons chain in Python: parenthesise both sides
        text = f"{_operand(left, name, COMPARE + 1)} {symbol} {_operand(right, name, COMPARE + 1)}"
    else:
        text = f"{_operand(left, name, prec)} {symbol} {_operand(right, name, prec + 1)}"
    return Expr(text, prec)


def _power(base: Any, exponent: Any, name: Namer) -> Expr:
    """``**`` binds tighter than unary minus on its left, looser on its right: ``(-x)**2``, ``x**-0.5``."""
    power = _value(exponent, name, subscript=False)
    right = f"({power.text})" if power.prec == POWER else power.wrap(UNARY)  # x**(y**2), not x**y**2
    return Expr(f"{_operand(base, name, PRIMARY)}**{right}", POWER)


def _operand(value: Any, name: Namer, prec: int, strict: bool = False) -> str:
    expr = _value(value, name, subscript=False)
    if strict and expr.prec == prec:  # -(-x) rather than --x
        return f"({expr.text})"
    return expr.wrap(prec)


def _arguments(args: tuple, kwargs: dict, name: Namer) -> str:
    parts = [_value(a, name, subscript=False).text for a in args]
    parts += [f"{key}={_value(v, name, subscript=False).text}" for key, v in kwargs.items()]
    return ", ".join(parts)


def _without_defaults(func: Any, args: tuple, kwargs: dict) -> dict:
    """Drop keyword arguments a function was handed at their default (``F.relu(x, inplace=False)``)."""
    if not kwargs:
        return kwargs
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return kwargs
    kept = {}
    for key, value in kwargs.items():
        param = params.get(key)
        default = param.default if param is not None else inspect.Parameter.empty
        if default is inspect.Parameter.empty or not _same_value(value, default):
            kept[key] = value
    return kept


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, (Ref, torch.Tensor)) or isinstance(b, (Ref, torch.Tensor)):
        return False
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an exotic __eq__ means "not the default"
        return False


# ---------------------------------------------------------------- values


def _value(value: Any, name: Namer, subscript: bool) -> Expr:
    if isinstance(value, Ref):
        named = name(value.node)
        return named if isinstance(named, Expr) else Expr(str(named), ATOM)
    if value is None or isinstance(value, (bool, str)):
        return Expr(repr(value))
    if isinstance(value, int):
        return Expr(repr(value), ATOM if value >= 0 else UNARY)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, complex):
        return Expr(f"complex({_float(value.real).text}, {_float(value.imag).text})", PRIMARY)
    if isinstance(value, torch.Size):
        return _sequence(tuple(value), name, "()")
    if isinstance(value, tuple):
        return _sequence(value, name, "()")
    if isinstance(value, list):
        return _sequence(value, name, "[]")
    if isinstance(value, range):
        if value.step != 1:
            return Expr(f"range({value.start}, {value.stop}, {value.step})", PRIMARY)
        return Expr(f"range({value.stop})" if value.start == 0 else f"range({value.start}, {value.stop})", PRIMARY)
    if isinstance(value, slice):
        parts = ", ".join(_value(v, name, False).text for v in (value.start, value.stop, value.step))
        return Expr(f"slice({parts})", PRIMARY)
    if value is Ellipsis:
        return Expr("...") if subscript else Expr("Ellipsis")
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return Expr(str(value), PRIMARY)  # torch.float32, torch.strided, torch.contiguous_format
    if isinstance(value, torch.device):
        return Expr(repr(str(value)))
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0 and not isinstance(value, torch.Tensor):
        return _value(value.item(), name, subscript)  # numpy scalars
    raise ValueError(f"printer: no source form for the argument {value!r} ({type(value).__name__})")


def _sequence(items: Any, name: Namer, brackets: str) -> Expr:
    parts = [_value(v, name, False).text for v in items]
    if brackets == "()" and len(parts) == 1:
        return Expr(f"({parts[0]},)")
    return Expr(f"{brackets[0]}{', '.join(parts)}{brackets[1]}")


def _float(value: float) -> Expr:
    if math.isnan(value):
        return Expr("float('nan')", PRIMARY)
    if math.isinf(value):
        return Expr("float('inf')" if value > 0 else "-float('inf')", PRIMARY if value > 0 else UNARY)
    text = repr(value)
    fraction = _fraction(value, text)
    if fraction is not None:
        return fraction
    return Expr(text, UNARY if text.startswith("-") else ATOM)


def _fraction(value: float, text: str) -> Expr | None:
    """``p / q`` when that is the same float and reads better than its digits (``1 / 31``)."""
    if len(text.lstrip("-")) < 7 or value == int(value) or abs(value) > 4096:
        return None
    guess = Fraction(value).limit_denominator(4096)
    p, q = guess.numerator, guess.denominator
    if q == 1 or abs(p) > 4096 or p / q != value:
        return None
    return Expr(f"{p} / {q}", PRODUCT)


def _index(index: Any, name: Namer) -> str:
    """A subscript: tuples without parentheses, slices as ``a:b``, ``...`` and ``None`` as written."""
    if isinstance(index, tuple) and index:
        items = [_index_item(i, name) for i in index]
        return ", ".join(items) + ("," if len(items) == 1 else "")
    return _index_item(index, name)


def _index_item(item: Any, name: Namer) -> str:
    if isinstance(item, slice):
        parts = ["" if v is None else _value(v, name, False).text for v in (item.start, item.stop)]
        text = ":".join(parts)
        return text + (f":{_value(item.step, name, False).text}" if item.step is not None else "")
    return _value(item, name, subscript=True).text


def children_first(root: Any, children: Callable[[Any], Iterable[Any]]) -> list[Any]:
    """``root`` and every node it reaches through ``children``, each listed after the nodes it reaches (a
    depth-first post-order, in the order ``children`` gives them), walked without recursion: chains of any length."""
    order: list[Any] = []
    seen = {root}
    stack = [(root, iter(children(root)))]
    while stack:
        node, pending = stack[-1]
        for child in pending:
            if child not in seen:
                seen.add(child)
                stack.append((child, iter(children(child))))
                break
        else:
            stack.pop()
            order.append(node)
    return order


__all__ = ["Expr", "Formula", "MAX_NESTING", "NAMESPACE", "TEXTBOOK", "call", "children_first", "expression",
           "literal", "namespace", "qualified_name", "statement", "textbook", "textbook_formula", "TUPLE", "COMPARE",
           "SUM", "PRODUCT", "UNARY", "POWER", "PRIMARY", "ATOM"]
