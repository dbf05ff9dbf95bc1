"""The op registry: which torch callables tensorgraph recognises and how their arguments bind.

An :class:`Op` ties a canonical op name (``"mul"``) to its vector-Jacobian rule and to
every torch callable that means it (``torch.mul``, ``Tensor.mul``, ``Tensor.__mul__``,
``Tensor.__rmul__`` with its operands swapped, ``Tensor.mul_`` in place ...).
The rules themselves live in :mod:`tensorgraph.rules`, one ``defop`` line per op.

A rule is written like an entry of PyTorch's derivatives.yaml::

    defop("mul", lambda g, out, x, other: (g * other, g * x))

``g`` is the gradient of the op's output, ``out`` its recorded value, and the remaining
parameters are the op's own arguments, named as torch names them, so that keyword calls
(``x.sum(dim=0, keepdim=True)``) bind to them.  A rule returns one gradient per
positional argument (a bare tensor for a one-argument op); ``None`` where there is none.
Broadcast-undo is not the rule's business: the engine sums every gradient to its input's
shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

_REQUIRED = object()

# keyword spellings torch (or numpy habit) accepts for the same parameter
KW_ALIASES = {"axis": "dim", "keepdims": "keepdim"}
# keywords that never change a gradient
KW_IGNORED = frozenset({"_stacklevel", "memory_format", "non_blocking", "inplace"})


class UnsupportedCall(NotImplementedError):
    """A torch call whose arguments tensorgraph's rule for that op does not handle."""


@dataclass(eq=False)
class Op:
    """One entry of the rule table."""

    name: str
    rule: Callable[..., Any] | None
    constant: bool = False  # output is a constant: no gradient flows to the inputs
    multi: bool = False  # returns several tensors; the rule gets ``output_index``
    mutates: tuple[int, ...] = ()  # positions of inputs the op legitimately updates in place
    # positions of inputs the output does not depend on, given the node's attrs (batch_norm's running
    # statistics in training mode: written, never read)
    ignores: Callable[[dict[str, Any]], tuple[int, ...]] | None = None
    # positions of float inputs torch defines no derivative for (gammainc's a): the rule gives them None, and the
    # engine names every tensor whose gradient would then be incomplete instead of giving it (Gradients)
    underived: tuple[int, ...] = ()
    params: tuple[str, ...] = ()
    defaults: tuple[Any, ...] = ()
    kwonly: frozenset[str] = frozenset()
    varargs: bool = False
    varkw: bool = False
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule is None:
            self.varargs = self.varkw = True
            return
        params = list(inspect.signature(self.rule).parameters.values())[2:]  # skip g, out
        positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        self.params = tuple(p.name for p in positional)
        self.defaults = tuple(_REQUIRED if p.default is p.empty else p.default for p in positional)
        self.kwonly = frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        self.varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
        self.varkw = any(p.kind is p.VAR_KEYWORD for p in params)
        self.index = {name: i for i, name in enumerate(self.params)}

    def bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Normalise a call's arguments to the rule's signature: positional tuple + keyword-only dict."""
        n = len(args)
        if not kwargs:
            if n >= len(self.params):
                return args, {}
            full = args + self.defaults[n:]
            if _REQUIRED in full:
                missing = self.params[full.index(_REQUIRED)]
                raise UnsupportedCall(f"{self.name}: missing argument '{missing}'")
            return full, {}
        full = list(args) + list(self.defaults[n:])
        extra: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in KW_IGNORED and key not in self.index:
                continue
            key = KW_ALIASES.get(key, key)
            if key in ("input", "self") and key not in self.index and self.params:
                key = self.params[0]
            pos = self.index.get(key)
            if pos is not None and pos >= n:
                full[pos] = value
            elif key in self.kwonly or self.varkw:
                extra[key] = value
            elif pos is not None:
                raise UnsupportedCall(f"{self.name}: argument '{key}' given twice")
            elif value is None:
                continue  # an optional torch argument left at its default
            else:
                raise UnsupportedCall(
                    f"{self.name}: tensorgraph's rule does not support the argument {key}={value!r}"
                )
        if _REQUIRED in full:
            raise UnsupportedCall(f"{self.name}: missing argument '{self.params[full.index(_REQUIRED)]}'")
        return tuple(full), extra

    def attrs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The op's non-tensor attributes by name (dim, keepdim, exponent ...)."""
        named = dict(zip(self.params[1:], args[1:]))
        named.update(kwargs)
        if self.varargs and len(args) > len(self.params):
            named["args"] = args[max(1, len(self.params)):]
        return named


OPS: dict[str, Op] = {}
UNDERIVED: dict[str, tuple[int, ...]] = {}  # the ops with inputs torch defines no derivative for: Op.underived
# torch callable -> (op, operands swapped?, in place?)
FUNCS: dict[Any, tuple[Op, bool, bool]] = {}

_NAMESPACES = {
    "torch": torch,
    "Tensor": torch.Tensor,
    "F": F,
    "nn": torch._C._nn,
    "special": torch.special,
    "linalg": torch.linalg,
}


def _lookup(spec: str) -> list[Any]:
    """Resolve ``"Tensor.add"``-style names; a missing attribute resolves to nothing."""
    space, _, attr = spec.partition(".")
    obj = getattr(_NAMESPACES[space], attr, None)
    if obj is None:
        return []
    found = [obj]
    # Tensor methods exist twice: on torch.Tensor and on the C base class.
    if space == "Tensor":
        base = getattr(torch._C.TensorBase, attr, None)
        if base is not None and base is not obj:
            found.append(base)
    return found


def _register(func: Any, op: Op, swap: bool, inplace: bool) -> None:
    FUNCS.setdefault(func, (op, swap, inplace))


def defop(
    name: str,
    rule: Callable[..., Any] | None = None,
    *,
    funcs: tuple[str, ...] = (),
    swapped: tuple[str, ...] = (),
    inplace: tuple[str, ...] = (),
    callables: tuple[Any, ...] = (),
    auto: bool = True,
    constant: bool = False,
    multi: bool = False,
    mutates: tuple[int, ...] = (),
    ignores: Callable[[dict[str, Any]], tuple[int, ...]] | None = None,
    underived: tuple[int, ...] = (),
) -> Op:
    """Add one op to the table.

    With ``auto`` the usual spellings are found by name: ``torch.<name>``,
    ``Tensor.<name>``, ``F.<name>``, ``Tensor.__<name>__`` and, in place,
    ``Tensor.<name>_`` / ``Tensor.__i<name>__``; ``Tensor.__r<name>__`` swaps operands.
    """
    op = Op(name, rule, constant=constant, multi=multi, mutates=mutates, ignores=ignores, underived=underived)
    OPS[name] = op
    if underived:
        UNDERIVED[name] = underived
    names = list(funcs)
    if auto:
        names += [f"torch.{name}", f"Tensor.{name}", f"F.{name}", f"nn.{name}", f"Tensor.__{name}__"]
        inplace = tuple(inplace) + (f"Tensor.{name}_", f"Tensor.__i{name}__", f"torch.{name}_", f"F.{name}_")
        swapped = tuple(swapped) + (f"Tensor.__r{name}__",)
    for spec in swapped:  # first: a spelling auto also finds by name (Tensor.where) is registered swapped
        for func in _lookup(spec):
            _register(func, op, True, False)
    for spec in names:
        for func in _lookup(spec):
            _register(func, op, False, False)
    for spec in inplace:
        for func in _lookup(spec):
            _register(func, op, False, True)
    for func in callables:
        _register(func, op, False, False)
    return op


def constants(*names: str, **kwargs: Any) -> None:
    """Register ops whose outputs carry no gradient (creation, random, comparison ...)."""
    for name in names:
        defop(name, None, constant=True, **kwargs)


def lookup(func: Any) -> tuple[Op, bool, bool] | None:
    """The table entry for an intercepted torch callable, or None."""
    entry = FUNCS.get(func)
    if entry is None and getattr(func, "__name__", None) == "__get__":
        entry = FUNCS.get(getattr(func, "__self__", None))  # properties: x.T, x.data ...
    return entry


# ---------------------------------------------------------------- work shared by the outputs of one call
# A call with several outputs has one node per output, and the engine calls the rule once per output that reaches
# the loss. Work that depends only on the call's arguments (an RNN's layers run again) can be made once per
# backward pass instead: the engine gives each pass a fresh dict in SHARED (set, then reset: ~0.1 us) and a rule
# asks for the work with once_per_pass. The outputs' nodes are consecutive and the engine walks the nodes latest
# first, so their rules run one after the other: one slot suffices, holding at most one call's work.
SHARED: ContextVar[dict[str, Any] | None] = ContextVar("tensorgraph_shared", default=None)


def once_per_pass(args: tuple, make: Callable[[], Any], *, last: bool = False) -> Any:
    """``make()``, which must depend on nothing but ``args`` (tensors compared by identity, other values by
    equality): within a backward pass made once for consecutive requests with the same ``args``, then given
    again; outside a pass, made at every request. ``last``: no request for it follows (the call's first
    output, whose node the walk reaches last), so it is let go at once."""
    memo = SHARED.get()
    if memo is None:
        return make()
    key = _identity(args)
    if memo.get("key") != key:
        memo.clear()  # the previous call's work goes before this one's is made
        memo["value"] = make()
        memo["key"], memo["args"] = key, args  # (the arguments kept alive: their ids stay theirs)
    value = memo["value"]
    if last:
        memo.clear()
    return value


def _identity(arg: Any) -> Any:
    """``arg`` with every tensor replaced by its identity, for comparing arguments without reading values."""
    if isinstance(arg, torch.Tensor):
        return ("tensor", id(arg))
    if isinstance(arg, (tuple, list)):
        return type(arg).__name__, tuple(_identity(a) for a in arg)
    return arg


def func_name(func: Any) -> str:
    """A readable name for any torch callable (for unknown ops and messages)."""
    if getattr(func, "__name__", None) == "__get__":
        return getattr(func.__self__, "__name__", "property")
    name = getattr(func, "__name__", None) or repr(func)
    return str(name)
