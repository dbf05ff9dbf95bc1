"""From a recorded subgraph to element expressions over named axes.

The chain between one input tensor and one output is every recorded node that depends on
the input and that the output depends on. Each of its ops becomes a :class:`SNode` whose
``local`` expression gives one element of the op's output in terms of its operands'
element symbols (``counts_sum[i] = AxisSum(counts[i,j], j)``). Tensors entering the chain
from outside (``bngain``, ``Yb``) are parameters. Composite torch calls (``F.cross_entropy``,
``F.layer_norm``, ``x.var()`` ...) are lowered into several atomic nodes, so their
derivation reads like the hand-written chain.

Every scalar of the recording is a number: ``1/n`` arrives as ``0.03125``. A scalar that
multiplies (or divides) the result of a reduction over an axis is lifted back to that
axis' size when it equals exactly one of n, 1/n, n-1, 1/(n-1) (see :meth:`Lowering.number`);
an ambiguous one stays a number and the derivation says so. A number typed in the code that
happens to equal a size is lifted too (nothing tells them apart): ``Chain.lifted`` lists every
lifted constant, and the derivation's backward then refuses inputs of other shapes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
import sympy as sp
import torch

from ..graph import Ref, identifier
from ..naming import unique_name
from ..rules import CLAMP_PASSES_AT_BOUND, CLAMP_SHARES_TIES
from .algebra import Axis, AxisMax, AxisSum, Relu, Sigmoid, Softplus, Space, TooLarge

if TYPE_CHECKING:
    from ..graph import Graph

_INDEX_LETTERS = "ijklpqrstuvw"


class SymbolicError(ValueError):
    """A recorded subgraph the symbolic layer cannot handle (the message names the node)."""


class ChainTooLong(SymbolicError):
    """A chain whose expressions grow past :data:`.algebra.SIZE_LIMIT` nodes (nested normalisations)."""

    def __init__(self, node: SNode, chain_input: SNode, what: str, err: TooLarge) -> None:
        super().__init__(
            f"the chain from {chain_input.where} is too long to derive in one piece: {what} {node.where} grew "
            f"past {err.size:,} terms and operations (as two normalisations in one chain do); derive "
            f"shorter chains, one normalisation each, or leave it to the engine's atomic rules")


@dataclass(eq=False)
class SNode:
    """One tensor of the chain: the input, a parameter, or an op (recorded or lowered)."""

    name: str
    kind: str  # "input" | "param" | "op"
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    axes: tuple[Any, ...]  # an axis index symbol, or None for a size-1 dimension, per dimension
    sym: sp.Symbol | None = None
    gsym: sp.Symbol | None = None  # the symbol of its gradient: d<name>
    operands: list[SNode] = field(default_factory=list)
    local: sp.Expr | None = None  # element of the output in terms of the operands' symbols
    value: sp.Expr | None = None  # element in terms of primitives (input, parameters, reductions)
    reduction: bool = False
    definition: sp.Expr | None = None
    graph_node: int | None = None
    source: str = ""
    recent: frozenset = frozenset()  # axes of the reduction this value comes straight from
    notes: list[str] = field(default_factory=list)
    differentiable: bool = True
    code: Callable[[Callable[[SNode], str], Callable[[Any], int]], str] | None = None  # composite ops
    ident: str = ""
    named: bool = True  # a user's variable name (or a lowered step of one), not an op-based name like sum_3
    from_end: bool = False  # class indices of x[rows, targets]: a negative one counts from the end, as in torch

    def __repr__(self) -> str:
        return f"<SNode {self.name} {self.op} {self.axes}>"

    @property
    def where(self) -> str:
        return f"'{self.name}' ({self.op} at {self.source or '<unknown>'})"


@dataclass
class Chain:
    """The lowered chain: its nodes in topological order, its input, output and parameters."""

    graph: Graph | None  # the recorded graph while lowering (dropped once derived)
    space: Space
    nodes: list[SNode]
    input: SNode
    output: SNode
    params: list[SNode]
    members: list[int]  # recorded node ids fused away (input excluded, parameters excluded)
    ties: dict[tuple, str] = field(default_factory=dict)  # (max body, axis) -> "first" | "split"
    lifted: list[str] = field(default_factory=list)  # "the constant 4.0 at 'y' (mul at f.py:3) as n_j - 1"
    # parameters computed elementwise from other parameters outside the chain (1 - t beside t): their elements
    derived: dict[SNode, sp.Expr] = field(default_factory=dict)

    def node(self, name: str) -> SNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no tensor named {name!r} in the chain (names: {', '.join(n.name for n in self.nodes)})")

    @property
    def ops(self) -> list[SNode]:
        return [node for node in self.nodes if node.kind == "op"]


def where(data: dict[str, Any]) -> str:
    return f"'{data['name']}' ({data['op']} at {data['source'] or '<unknown>'})"


def chain_members(graph: Graph, output: int, wrt: int) -> list[int]:
    """Recorded nodes between ``wrt`` and ``output`` (both included), in creation order.

    Only paths a gradient flows along count: a tensor computed from ``wrt`` through a detached tensor
    (``x.detach().mean()``) or an integer one (``x.argmax()``) is outside the chain, a constant that enters
    it as a parameter, as torch's gradient treats it.
    """
    nodes = graph._nodes
    if wrt == output:
        raise SymbolicError(f"the input and the output are the same tensor {where(nodes[wrt])}")
    ancestors = graph.ancestors(output)
    if wrt not in ancestors:
        raise SymbolicError(f"{where(nodes[output])} does not depend on {where(nodes[wrt])}")
    flowing = nx.subgraph_view(graph.nx, filter_node=lambda n: n == wrt or _carries_gradient(nodes[n]))
    between = (nx.descendants(flowing, wrt) | {wrt}) & ancestors
    if output not in between:
        raise SymbolicError(f"{where(nodes[output])} depends on {where(nodes[wrt])} only through tensors without "
                            f"a gradient (a detached tensor, or one computed from it): its gradient is zero")
    return sorted(between)


def _carries_gradient(data: dict[str, Any]) -> bool:
    """A recorded op whose result a gradient flows through (not a constant, not an integer tensor)."""
    return data["kind"] == "op" and (data["dtype"].is_floating_point or data["dtype"].is_complex)


# ---------------------------------------------------------------------- elementwise ops


def _pow(x, exponent):
    return x**exponent


# Piecewise ops. Which branch owns a kink decides the derivative there: each is written so that sympy's
# derivative of the branch torch picks at the kink is torch's gradient (leaky_relu'(0) is the slope, clamp
# passes the gradient at its bounds up to torch 2.14, hardtanh does not).


def _where(condition, input, other):
    """``torch.where(condition, input, other)``: the gradient goes to the branch chosen, as in torch."""
    return sp.Piecewise((input, condition), (other, True))


def _clamp(x, min=None, max=None):  # noqa: A002 - torch's argument names
    """``x.clamp(min, max)``: the gradient passes for ``min <= x <= max``; with ``min > max`` the output is max.

    As the installed torch differentiates it (rules.clamp): from torch 2.14 a number bound passes the gradient
    strictly inside only, and a tensor bound equal to the input shares it half and half (a branch of its own,
    ``(x + min) / 2``, equal to the output there, whose derivative gives each half), unless both bounds equal it.
    """
    shares = CLAMP_SHARES_TIES and any(bound is not None and not _is_number(bound) for bound in (min, max))
    at_bound = CLAMP_PASSES_AT_BOUND or shares  # (a tie with a tensor bound: its own branch below)
    pieces = []
    if max is not None:
        above = x > max if at_bound else x >= max
        pieces.append((max, above | (min > max) if min is not None else above))
    if min is not None:
        pieces.append((min, x < min if at_bound else x <= min))
    if shares:
        for bound, other in ((min, max), (max, min)):
            if bound is not None:
                pieces.append(((x + bound) / 2, sp.Eq(x, bound) & (sp.Ne(x, other) if other is not None else True)))
    return sp.Piecewise(*pieces, (x, True))


def _is_number(value: Any) -> bool:
    """A bound given as a number, not a tensor (an operand's symbol)."""
    return not isinstance(value, sp.Basic) or bool(value.is_number)


def _hardtanh(x, min_val=-1, max_val=1, inplace=False):
    """``F.hardtanh``: unlike clamp, no gradient at the bounds (torch passes it strictly inside)."""
    return sp.Piecewise((min_val, x <= min_val), (max_val, x >= max_val), (x, True))


_LEAKY_SLOPE = sp.Rational(1, 100)  # torch's default negative_slope, 0.01


def _leaky_relu(x, negative_slope=_LEAKY_SLOPE, inplace=False):
    """``F.leaky_relu``: the slope at 0, as torch's ``x > 0 ? g : g*slope``."""
    return sp.Piecewise((x, x > 0), (negative_slope * x, True))


def _elu(x, alpha=1, inplace=False):
    """``F.elu``: ``alpha*exp(x)`` at 0, as torch's backward (``x > 0`` takes the identity)."""
    return sp.Piecewise((x, x > 0), (alpha * (sp.exp(x) - 1), True))


def _softplus(x, beta=1, threshold=20):
    """``F.softplus``: torch returns ``x`` itself where ``beta*x > threshold`` (gradient 1 there, not
    ``sigmoid(beta*x)``); with ``threshold=1`` the two differ by a quarter."""
    return sp.Piecewise((x, beta * x > threshold), (Softplus(beta * x) / beta, True))


ELEMENTWISE: dict[str, Callable[..., sp.Expr]] = {
    "add": lambda x, other, alpha=1: x + alpha * other,
    "sub": lambda x, other, alpha=1: x - alpha * other,
    "rsub": lambda x, other, alpha=1: other - alpha * x,
    "mul": lambda x, other: x * other,
    "div": lambda x, other: x / other,
    "rdiv": lambda x, other: other / x,
    "neg": lambda x: -x,
    "exp": sp.exp,
    "log": sp.log,
    "log2": lambda x: sp.log(x) / sp.log(2),
    "log10": lambda x: sp.log(x) / sp.log(10),
    "log1p": lambda x: sp.log(1 + x),
    "expm1": lambda x: sp.exp(x) - 1,
    "sqrt": sp.sqrt,
    "rsqrt": lambda x: x ** sp.Rational(-1, 2),
    "reciprocal": lambda x: 1 / x,
    "square": lambda x: x**2,
    "pow": _pow,
    "sin": sp.sin,
    "cos": sp.cos,
    "tanh": sp.tanh,
    "tan": sp.tan,
    "asin": sp.asin,
    "acos": sp.acos,
    "atan": sp.atan,
    "sinh": sp.sinh,
    "cosh": sp.cosh,
    "asinh": sp.asinh,
    "acosh": sp.acosh,
    "atanh": sp.atanh,
    "sigmoid": Sigmoid,
    "silu": lambda x: x * Sigmoid(x),
    "relu": Relu,
    "abs": sp.Abs,
    "erf": sp.erf,
    "gelu": lambda x, approximate=None: (  # approximate="none" or "tanh" (checked)
        x * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (x + sp.Float("0.044715") * x**3))) / 2
        if str(approximate) == "tanh" else x * (1 + sp.erf(x / sp.sqrt(2))) / 2),
    "softplus": _softplus,
    "where": _where,
    "clamp": _clamp,
    "clamp_min": lambda x, min: _clamp(x, min, None),  # noqa: A002
    "clamp_max": lambda x, max: _clamp(x, None, max),  # noqa: A002
    "hardtanh": _hardtanh,
    "relu6": lambda x, inplace=False: _hardtanh(x, 0, 6),
    "leaky_relu": _leaky_relu,
    "elu": _elu,
}
IDENTITY = {"contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type_as"}
RESHAPES = {"view", "reshape", "squeeze", "unsqueeze", "flatten", "view_as", "reshape_as", "ravel"}
# ops that keep the "this comes straight from a reduction over these axes" provenance for lifting
_KEEPS_PROVENANCE = {"mul", "div", "rdiv", "neg", "add", "sub", "rsub"}


class Lowering:
    """Builds a :class:`Chain` from a recorded graph (see the module docstring)."""

    def __init__(self, graph: Graph, output: int, wrt: int) -> None:
        self.graph = graph
        self.nodes_data = graph._nodes
        self.output_id, self.wrt_id = output, wrt
        self.members = chain_members(graph, output, wrt)
        self.member_set = set(self.members)
        self.space = Space()
        self.nodes: list[SNode] = []
        self.by_graph: dict[int, SNode] = {}
        self.params: list[SNode] = []
        self.ties: dict[tuple, str] = {}
        self.names: set[str] = set()
        self.labels: set[str] = set()
        self.notes_for_next: list[str] = []
        self.lifted: list[str] = []

    # ------------------------------------------------------------------ driver

    def run(self) -> Chain:
        data = self.nodes_data[self.wrt_id]
        if not data["dtype"].is_floating_point:
            raise SymbolicError(f"the input {where(data)} is not a floating-point tensor ({data['dtype']})")
        x = self._new("input", data["name"], data, axes=self._input_axes(data))
        x.graph_node = self.wrt_id
        self.by_graph[self.wrt_id] = x
        for node in self.members[1:]:
            data = self.nodes_data[node]
            if data["kind"] != "op" or not data["dtype"].is_floating_point:
                continue  # a constant computed from the input: a parameter of the chain, no gradient
            if data.get("unsupported"):
                raise SymbolicError(f"{where(data)} has no gradient rule: {data['unsupported']}")
            lower = LOWERINGS.get(data["op"])
            if lower is None:
                raise SymbolicError(self._unsupported_message(data))
            result = lower(self, data)
            result.graph_node = node
            self.by_graph[node] = result
        output = self.by_graph.get(self.output_id)
        if output is None:
            raise SymbolicError(f"the output {where(self.nodes_data[self.output_id])} is not a floating-point "
                                f"result of the chain")
        fused = [n for n in self.members[1:] if n in self.by_graph and self.by_graph[n].kind == "op"]
        for node in fused:
            for source in self.nodes_data[node]["inputs"]:
                self._param(source)  # read by the recorded call (rows of a pick, running stats): the replay needs it
        self._finish()
        return Chain(self.graph, self.space, self.nodes, x, output, self.params, fused, self.ties, self.lifted,
                     self._derived_params())

    def _derived_params(self) -> dict[SNode, sp.Expr]:
        """Parameters that a recorded elementwise op computed from other parameters only, as expressions of them.

        ``(1 - t) * log(1 - p)`` beside ``t * log(p)``: ``1 - t`` enters the chain as a parameter of its own,
        but it is ``1 - t`` elementwise, which the textbook form may use (``p - t``, not ``p*sub_1 + p*t - t``).
        The fused node keeps every parameter as an input; only tensors it already takes are used.
        """
        derived: dict[SNode, sp.Expr] = {}
        for param in self.params:
            data = self.nodes_data[param.graph_node]
            if data["kind"] != "op" or data["op"] not in ELEMENTWISE or not self._settled(param) or \
                    data["inplace"] or data["output_index"] is not None:
                continue
            exprs = [self._derived_operand(arg, param) for arg in data["bargs"]]
            kwargs = {k: v for k, v in (data["bkwargs"] or {}).items() if k != "rounding_mode" or v is not None}
            if any(e is None for e in exprs) or not all(isinstance(v, (int, float)) for v in kwargs.values()):
                continue
            try:
                derived[param] = ELEMENTWISE[data["op"]](*exprs, **{k: to_number(v) for k, v in kwargs.items()})
            except TypeError:
                continue
        return derived

    @staticmethod
    def _settled(param: SNode) -> bool:
        """A floating-point parameter whose axes a formula assigned, one per dimension."""
        return param.dtype.is_floating_point and param.sym is not None and len(param.axes) == len(param.shape)

    def _derived_operand(self, arg: Any, param: SNode) -> sp.Expr | None:
        """An operand of the op that computed ``param``: a number, or another parameter lined up with its axes."""
        if isinstance(arg, bool) or not isinstance(arg, (int, float, Ref)):
            return None
        if not isinstance(arg, Ref):
            return to_number(arg)
        source = self.by_graph.get(arg.node)
        if source is None or source is param or source.kind != "param" or not self._settled(source):
            return None
        offset = len(param.axes) - len(source.axes)
        for d, axis in enumerate(source.axes):
            if axis is not None and (offset + d < 0 or param.axes[offset + d] != axis):
                return None
        return source.sym

    def _unsupported_message(self, data: dict[str, Any]) -> str:
        op = data["op"]
        if op in ("matmul", "linear", "addmm", "outer", "conv1d", "conv2d", "bmm", "einsum"):
            return (f"{where(data)} is a contraction ({op}); the symbolic layer handles elementwise ops and "
                    f"reductions along dimensions (choose a chain that starts after it)")
        if op == "cosine_similarity":
            return (f"{where(data)}: cosine_similarity has no symbolic form: torch clamps its norms at eps outside "
                    f"the gradient (which flows through the unclamped norm), and no closed form's derivative is "
                    f"that; (F.normalize(x1, dim=d) * F.normalize(x2, dim=d)).sum(d) derives, with normalize's "
                    f"own clamp")
        return (f"{where(data)}: the op {op!r} has no symbolic form (supported: elementwise ops, where, clamp, "
                f"leaky_relu, elu, hardtanh, sum, mean, var, std, max, amax, logsumexp, softmax, log_softmax, "
                f"x[range(n), targets], gather, cross_entropy, nll_loss, mse_loss, l1_loss, smooth_l1_loss, "
                f"huber_loss, binary_cross_entropy_with_logits, normalize, layer_norm, batch_norm in training)")

    # ------------------------------------------------------------------ node creation

    def _unique(self, name: str) -> str:
        return unique_name(name, self.names)

    def _new(self, kind: str, name: str, data: dict[str, Any] | None, *, axes: tuple, op: str | None = None,
             shape: tuple | None = None) -> SNode:
        node = SNode(
            name=self._unique(name), kind=kind, op=op or (data["op"] if data else kind),
            shape=tuple(shape if shape is not None else data["shape"]),
            dtype=data["dtype"] if data else torch.float64, axes=axes,
            source=(data.get("source") or "") if data else "",
        )
        node.differentiable = node.dtype.is_floating_point
        if kind != "op":
            assumptions = {"real": True} if node.dtype.is_floating_point else {"integer": True}
            node.sym = self._symbol(node, assumptions)
            node.value = node.sym
        self.nodes.append(node)
        return node

    def _symbol(self, node: SNode, assumptions: dict[str, bool]) -> sp.Symbol:
        indices = [a for a in node.axes if a is not None]
        suffix = f"[{','.join(str(a) for a in indices)}]" if indices else ""
        label = self._label(node.name, suffix)
        symbol = sp.Symbol(label, **assumptions)
        self.space.register(symbol, indices)
        node.gsym = self.space.register(sp.Symbol(self._label("d" + node.name, suffix), real=True), indices)
        return symbol

    def _label(self, name: str, suffix: str) -> str:
        label = name + suffix
        while label in self.labels:
            name += "'"
            label = name + suffix
        self.labels.add(label)
        return label

    def _input_axes(self, data: dict[str, Any]) -> tuple:
        axes = []
        for size in data["shape"]:
            axes.append(self._new_axis(size, position=len(self.space.axes)) if size != 1 else None)
        return tuple(axes)

    def _new_axis(self, size: int, position: int) -> sp.Symbol:
        letter = _INDEX_LETTERS[len(self.space.axes)] if len(self.space.axes) < len(_INDEX_LETTERS) else \
            f"a{len(self.space.axes)}"
        index = sp.Symbol(letter, integer=True)
        size_symbol = sp.Symbol("n" if not self.space.axes else f"n_{letter}", integer=True, positive=True)
        self.space.axes.insert(position, Axis(index, size_symbol, int(size)))
        self.labels.update({str(index), str(size_symbol)})
        return index

    def _param(self, node: int) -> SNode:
        """A tensor entering the chain from outside (axes assigned at its first use)."""
        existing = self.by_graph.get(node)
        if existing is not None:
            return existing
        data = self.nodes_data[node]
        param = SNode(name=self._unique(data["name"]), kind="param", op=data["op"], shape=tuple(data["shape"]),
                      dtype=data["dtype"], axes=(), source=data.get("source") or "", graph_node=node)
        # a constant (a dropout mask, a detached tensor) takes no gradient, as in torch
        param.differentiable = data["dtype"].is_floating_point and data["kind"] != "constant"
        param.axes = None  # type: ignore[assignment]  (assigned at first use)
        self.by_graph[node] = param
        self.params.append(param)
        self.nodes.append(param)
        return param

    def _settle_param(self, param: SNode, axes: tuple) -> None:
        if param.axes is None:
            param.axes = axes
            assumptions = {"real": True} if param.dtype.is_floating_point else {"integer": True}
            param.sym = self._symbol(param, assumptions)
            param.value = param.sym
        elif tuple(param.axes) != tuple(axes):
            raise SymbolicError(f"the parameter '{param.name}' lines up with different axes in two places "
                                f"({param.axes} and {axes})")

    def _operand(self, arg: Any) -> SNode | None:
        if isinstance(arg, Ref):
            return self.by_graph[arg.node] if arg.node in self.by_graph and self.by_graph[arg.node].kind != "param" \
                else self._param(arg.node)
        return None

    def _op(self, data: dict[str, Any] | None, name: str, op: str, operands: list[SNode], local: sp.Expr,
            axes: tuple, shape: tuple | None = None, recent: frozenset = frozenset(),
            code: Callable | None = None) -> SNode:
        node = self._new("op", name, data, axes=axes, op=op, shape=shape)
        node.named = bool(data is None or data.get("named") or name != data["name"])
        node.operands = operands
        node.local = local
        node.recent = recent
        node.code = code
        if shape is None and data is not None:
            self._check_shape(node, data)
        self._evaluate(node)
        return node

    def _evaluate(self, node: SNode) -> None:
        """The node's element in primitives; a reduction becomes a fresh symbol whose definition is a rule."""
        space = self.space
        value = node.local.xreplace({operand.sym: operand.value for operand in node.operands})
        operand_axes = frozenset().union(*(space.axes_of(o.sym) for o in node.operands))
        node.reduction = bool(operand_axes - frozenset(a for a in node.axes if a is not None))
        sign = self._assumptions(node.local)  # from the operands' own signs: bndiff**2 >= 0
        try:
            if node.reduction:
                node.sym = self._symbol(node, sign if "real" not in sign else self._assumptions(value))
                node.value = node.sym
                node.definition = space.define(node.sym, value)
            else:
                node.value = space.canon(value)
                node.sym = self._symbol(node, sign if "real" not in sign else self._assumptions(node.value))
        except TooLarge as err:
            raise ChainTooLong(node, self.nodes[0], "the value of", err) from None

    def _assumptions(self, value: sp.Expr) -> dict[str, bool]:
        """Sign of an element, for sympy: sizes are at least 2 (a size-1 dimension is no axis)."""
        shifted = self.space.sized(value)
        if shifted.is_positive:
            return {"positive": True}
        if shifted.is_nonnegative:
            return {"nonnegative": True}
        return {"real": True}

    def _check_shape(self, node: SNode, data: dict[str, Any]) -> None:
        sizes = tuple(self.space.axis(a).value if a is not None else 1 for a in node.axes)
        if sizes != tuple(data["shape"]):
            raise SymbolicError(f"{where(data)}: could not follow its dimensions (expected {sizes}, recorded "
                                f"{tuple(data['shape'])})")

    # ------------------------------------------------------------------ numbers

    def number(self, value: Any, recent: frozenset, node: dict[str, Any] | None, *, lift: bool = True) -> sp.Expr:
        """A recorded scalar as a sympy number, or lifted to a size expression (see the module docstring)."""
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, bool):
            return sp.Integer(int(value))
        if lift and recent and value not in (0, 1, -1):
            lifted = self._lift(float(value), recent, node)
            if lifted is not None:
                return lifted
        return to_number(value)

    def _lift(self, value: float, recent: frozenset, data: dict[str, Any] | None) -> sp.Expr | None:
        sizes = {axis.size: axis.value for axis in self.space.axes}
        bases = []
        for index in sorted(recent, key=str):
            size = self.space.size(index)
            bases += [size, size - 1]
        if len(recent) > 1:
            total = sp.Mul(*(self.space.size(index) for index in recent))
            bases += [total, total - 1]
        matches = []
        for base in bases:
            for candidate in (base, 1 / base):
                number = float(candidate.subs(sizes)) if float(base.subs(sizes)) != 0 else math.inf
                for sign in (1, -1):
                    if math.isfinite(number) and math.isclose(sign * number, value, rel_tol=1e-12, abs_tol=0):
                        if sign * candidate not in matches:
                            matches.append(sign * candidate)
        if len(matches) == 1:
            if data is not None:
                self.lifted.append(f"the constant {value!r} at {where(data)} as {_plain(matches[0])}")
            return matches[0]
        if len(matches) > 1 and data is not None:
            self.notes_for_next.append(f"the constant {value!r} could be {' or '.join(map(str, matches))}: kept "
                                       f"as a number (the closed form holds for these sizes only)")
        return None

    # ------------------------------------------------------------------ axes

    def broadcast(self, data: dict[str, Any], operands: list[SNode | None], shapes: list[tuple]) -> tuple:
        """The output's axes: operands lined up from the right, as torch broadcasts."""
        rank = max([len(s) for s in shapes] + [0])
        result: list[Any] = [None] * rank
        for operand, shape in zip(operands, shapes):
            if operand is None or operand.axes is None:
                continue
            offset = rank - len(shape)
            for d, axis in enumerate(operand.axes):
                if axis is None:
                    continue
                current = result[offset + d]
                if current is None:
                    result[offset + d] = axis
                elif current != axis:
                    raise SymbolicError(
                        f"{where(data)}: its operands line up axis {current} with axis {axis} (both of size "
                        f"{self.space.axis(axis).value}); a reduction probably dropped a dimension "
                        f"(keepdim=True missing?)")
        for operand, shape in zip(operands, shapes):
            if operand is None or operand.axes is not None:
                continue
            offset = rank - len(shape)
            axes = []
            for d, size in enumerate(shape):
                position = offset + d
                if size == 1:
                    axes.append(None)
                    continue
                if result[position] is None:
                    following = [a for a in result[position + 1:] if a is not None]
                    at = [a.index for a in self.space.axes].index(following[0]) if following else \
                        len(self.space.axes)
                    result[position] = self._new_axis(size, at)
                elif self.space.axis(result[position]).value != size:
                    raise SymbolicError(f"{where(data)}: sizes do not line up")
                axes.append(result[position])
            self._settle_param(operand, tuple(axes))
        return tuple(result)

    def reduced(self, data: dict[str, Any], operand: SNode, dim: Any, keepdim: bool) -> tuple[tuple, list]:
        """Output axes and summed axes of a reduction over ``dim``."""
        rank = len(operand.axes)
        if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
            dims = list(range(rank))
        else:
            dims = [dim] if isinstance(dim, int) else list(dim)
            dims = sorted({d % max(rank, 1) for d in dims})
        summed = [operand.axes[d] for d in dims if operand.axes[d] is not None]
        if keepdim:
            out = tuple(None if d in dims else a for d, a in enumerate(operand.axes))
        else:
            out = tuple(a for d, a in enumerate(operand.axes) if d not in dims)
        return out, summed

    # ------------------------------------------------------------------ finishing

    def _finish(self) -> None:
        """Values in primitives, reductions as fresh symbols with their definitions as rules."""
        space = self.space
        order = [axis.index for axis in space.axes]
        for node in self.nodes:
            if node.kind == "param" and node.axes is None:  # read by a call, in no formula: no gradient
                node.differentiable = False
                self._settle_param(node, ())
            indices = [a for a in (node.axes or ()) if a is not None]
            if indices != sorted(indices, key=order.index):
                raise SymbolicError(f"{node.where}: its dimensions come in another order than the input's "
                                    f"(transposes are outside the symbolic layer)")
        for node in self.nodes:
            node.ident = identifier(node.name)


def to_number(value: Any) -> sp.Expr:
    """A Python scalar as an exact sympy number when it round-trips, else a Float."""
    if isinstance(value, int):
        return sp.Integer(value)
    value = float(value)
    if value.is_integer():
        return sp.Integer(int(value))
    rational = sp.Rational(value).limit_denominator(10**6)
    if float(rational) == value:
        return rational
    return sp.Float(value, 17)


# ---------------------------------------------------------------------- lowerings, one per op


def _args(data: dict[str, Any], lowering: Lowering) -> tuple[list[Any], dict[str, Any]]:
    return list(data["bargs"]), dict(data["bkwargs"] or {})


def lower_elementwise(self: Lowering, data: dict[str, Any]) -> SNode:
    op = data["op"]
    args, kwargs = _args(data, self)
    if op == "div" and kwargs.get("rounding_mode") is not None:
        raise SymbolicError(f"{where(data)}: division with rounding_mode has no derivative")
    kwargs.pop("rounding_mode", None)
    if any(isinstance(v, Ref) for v in kwargs.values()):  # x.clamp(min=lower): the tensor becomes an operand
        try:
            bound = inspect.signature(ELEMENTWISE[op]).bind(*args, **kwargs)
        except TypeError as err:
            raise SymbolicError(f"{where(data)}: unsupported arguments ({err})") from None
        args, kwargs = list(bound.args), dict(bound.kwargs)
    operands, shapes, tensor_operands = [], [], []
    for arg in args:
        operand = self._operand(arg)
        operands.append(operand)
        shapes.append(tuple(self.nodes_data[arg.node]["shape"]) if isinstance(arg, Ref) else ())
        if operand is not None:
            tensor_operands.append(operand)
    self.notes_for_next = []
    axes = self.broadcast(data, operands, shapes)
    recent = tensor_operands[0].recent if len(tensor_operands) == 1 and op in _KEEPS_PROVENANCE else frozenset()
    lift = op in ("mul", "div", "rdiv")
    exprs = []
    for arg, operand in zip(args, operands):
        if operand is not None:
            exprs.append(operand.sym)
        elif isinstance(arg, str):  # gelu's approximate="none"
            exprs.append(sp.Symbol(arg))
        elif arg is None:  # clamp's missing bound
            exprs.append(None)
        else:
            exprs.append(self.number(arg, recent if lift else frozenset(), data, lift=lift))
    if op == "gelu" and (args[1] if len(args) > 1 else kwargs.get("approximate", "none")) not in ("none", "tanh"):
        raise SymbolicError(f"{where(data)}: gelu has a symbolic form for approximate='none' or 'tanh' only")
    if op == "gelu" and "approximate" in kwargs:
        exprs.append(sp.Symbol(kwargs.pop("approximate")))
    for key, value in kwargs.items():
        kwargs[key] = value if value is None or isinstance(value, Ref) else \
            self.number(value, frozenset(), data, lift=False)
    try:
        local = ELEMENTWISE[op](*exprs, **kwargs)
    except TypeError as err:
        raise SymbolicError(f"{where(data)}: unsupported arguments ({err})") from None
    node = self._op(data, data["name"], op, _unique_operands(tensor_operands), local, axes, recent=recent)
    node.notes.extend(self.notes_for_next)
    for arg, expr in zip(args, exprs):
        if not isinstance(arg, Ref) and isinstance(arg, (int, float)) and not expr.is_Number:
            node.notes.append(f"the constant {arg!r} is {_plain(expr)}")
    return node


def _plain(expr: sp.Expr) -> str:
    return str(expr).replace("**", "^")


def _unique_operands(operands: list[SNode]) -> list[SNode]:
    seen: list[SNode] = []
    for operand in operands:
        if operand not in seen:
            seen.append(operand)
    return seen


def lower_identity(self: Lowering, data: dict[str, Any]) -> SNode:
    """A copy or a cast: the same element. A cast is kept in the fused backward's code, which recomputes the
    saved tensors after it in the dtype the forward used (``logits.float()`` of half logits: softmax in float32)."""
    args, kwargs = _args(data, self)
    operand = self._operand(args[0])
    if operand is None or operand.axes is None:
        raise SymbolicError(f"{where(data)}: expected a tensor of the chain")
    dtype = data["dtype"]

    def cast(ident: Callable, layout_dim: Callable) -> str:
        return f"{ident(operand)}.to({dtype})"

    return self._op(data, data["name"], data["op"], [operand], operand.sym, operand.axes, recent=operand.recent,
                    code=cast if dtype != operand.dtype else None)


def lower_reshape(self: Lowering, data: dict[str, Any]) -> SNode:
    args, _ = _args(data, self)
    operand = self._operand(args[0])
    before = [s for s in operand.shape if s != 1]
    after = [s for s in data["shape"] if s != 1]
    if before != after:
        raise SymbolicError(f"{where(data)}: a reshape that merges or splits dimensions is outside the symbolic "
                            f"layer (only size-1 dimensions may come and go)")
    real = iter([a for a in operand.axes if a is not None])
    axes = tuple(next(real) if s != 1 else None for s in data["shape"])
    return self._op(data, data["name"], data["op"], [operand], operand.sym, axes, recent=operand.recent)


def _reduction_operand(self: Lowering, data: dict[str, Any]) -> tuple[SNode, dict[str, Any]]:
    params = dict(zip(("x", "dim", "keepdim"), data["bargs"]))
    params.update(data["attrs"])
    operand = self._operand(data["bargs"][0])
    if operand is None or operand.axes is None:
        raise SymbolicError(f"{where(data)}: expected a tensor of the chain")
    return operand, params


def lower_sum(self: Lowering, data: dict[str, Any]) -> SNode:
    operand, params = _reduction_operand(self, data)
    axes, summed = self.reduced(data, operand, params.get("dim"), bool(params.get("keepdim", False)))
    local = self.space.sum_over(operand.sym, summed)
    if data["op"] == "mean":
        count = sp.Mul(*(self.space.size(a) for a in summed))
        local = local / count
    return self._op(data, data["name"], data["op"], [operand], local, axes, recent=frozenset(summed))


def lower_var(self: Lowering, data: dict[str, Any]) -> SNode:
    """``x.var(dim)`` / ``x.std(dim)``: mean, deviations, squares, their sum over n - correction."""
    operand, params = _reduction_operand(self, data)
    dim, unbiased, correction = params.get("dim"), params.get("unbiased"), params.get("correction")
    if isinstance(dim, bool):
        dim, unbiased = None, dim
    if correction is None:
        correction = 0 if unbiased is False else 1
    keepdim = bool(params.get("keepdim", False))
    name = data["name"]
    mean_axes, summed = self.reduced(data, operand, dim, True)
    count = sp.Mul(*(self.space.size(a) for a in summed))
    mean = self._op(data, f"{name}_mean", "mean", [operand], self.space.sum_over(operand.sym, summed) / count,
                    mean_axes, shape=_shape(self, mean_axes), recent=frozenset(summed))
    diff = self._op(data, f"{name}_diff", "sub", [operand, mean], operand.sym - mean.sym, operand.axes,
                    shape=operand.shape)
    square = self._op(data, f"{name}_sq", "pow", [diff], diff.sym**2, operand.axes, shape=operand.shape)
    out_axes, _ = self.reduced(data, operand, dim, keepdim)
    scale = count - self.number(correction, frozenset(), None, lift=False)
    local = self.space.sum_over(square.sym, summed) / scale
    if data["op"] == "var":
        return self._op(data, name, "var", [square], local, out_axes, recent=frozenset(summed))
    var = self._op(data, f"{name}_var", "var", [square], local, out_axes, shape=_shape(self, out_axes),
                   recent=frozenset(summed))
    return self._op(data, name, "sqrt", [var], sp.sqrt(var.sym), out_axes)


def _shape(self: Lowering, axes: tuple) -> tuple:
    return tuple(self.space.axis(a).value if a is not None else 1 for a in axes)


def lower_max(self: Lowering, data: dict[str, Any]) -> SNode:
    """``x.max(dim).values`` / ``x.amax(dim)`` (and min): the gradient goes to the selected element."""
    operand, params = _reduction_operand(self, data)
    op = data["op"]
    dim = params.get("dim")
    if isinstance(dim, Ref):
        raise SymbolicError(f"{where(data)}: the two-tensor {op} (maximum) has no symbolic form")
    if op in ("max", "min") and data["output_index"] not in (0, None):
        raise SymbolicError(f"{where(data)}: the indices of {op} carry no gradient")
    axes, summed = self.reduced(data, operand, dim, bool(params.get("keepdim", False)))
    if len(summed) != 1:
        raise SymbolicError(f"{where(data)}: {op} over several dimensions at once has no symbolic form "
                            f"(reduce one dimension at a time)")
    axis = summed[0]
    sign = -1 if op in ("min", "amin") else 1
    body = sign * operand.sym
    ties = "first" if (op in ("max", "min") and dim is not None) else "split"
    self.ties[(body, axis)] = ties
    node = self._op(data, data["name"], op, [operand], sign * AxisMax(body, axis), axes)
    node.notes.append("ties: the gradient goes to " + ("the index torch returns" if ties == "first" else
                                                       "every maximal element, split evenly"))
    return node


def only_unit_dims(idx: Any) -> bool:
    """Whether an index only adds size-1 dimensions (``m[:, None]``, ``x[..., None]``): a reshape."""
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(item is None or item is Ellipsis or (isinstance(item, slice) and item == slice(None)) for item in items)


def lower_getitem(self: Lowering, data: dict[str, Any]) -> SNode:
    """``x[range(n), targets]`` on a 2-D tensor: one element per row, a one-hot pick; ``m[:, None]``: a reshape."""
    args = data["bargs"]
    if len(args) > 1 and only_unit_dims(args[1]):
        return lower_reshape(self, data)
    operand = self._operand(args[0])
    idx = args[1]
    if not (isinstance(idx, tuple) and len(idx) == 2 and len(operand.shape) == 2):
        raise SymbolicError(f"{where(data)}: only x[range(n), targets] indexing (and m[:, None]) has a symbolic "
                            f"form here")
    rows, targets = idx
    n = operand.shape[0]
    if isinstance(rows, range):
        ok = rows == range(n)
    elif isinstance(rows, Ref):
        value = self.nodes_data[rows.node]["value"]
        ok = value.dim() == 1 and torch.equal(value.cpu(), torch.arange(n))
    else:
        ok = False
    if not ok or not isinstance(targets, Ref):
        raise SymbolicError(f"{where(data)}: only x[range(n), targets] indexing has a symbolic form here")
    target_data = self.nodes_data[targets.node]
    if target_data["dtype"].is_floating_point or tuple(target_data["shape"]) != (n,):
        raise SymbolicError(f"{where(data)}: the targets must be an integer tensor of shape ({n},)")
    row_axis, class_axis = operand.axes
    if row_axis is None or class_axis is None:
        raise SymbolicError(f"{where(data)}: picking from a tensor with a size-1 dimension has no symbolic form")
    picked = _pick(self, data, data["name"], operand, targets.node, row_axis, class_axis)
    self.by_graph[targets.node].from_end = True
    return picked


def lower_gather(self: Lowering, data: dict[str, Any]) -> SNode:
    """``x.gather(1, targets.unsqueeze(1))`` on a 2-D tensor: the same one-hot pick, keeping the dimension."""
    params = _params(data, ("x", "dim", "index"))
    operand = self._operand(params["x"])
    index = params["index"]
    if len(operand.shape) != 2 or not isinstance(index, Ref) or params["dim"] % 2 != 1:
        raise SymbolicError(f"{where(data)}: only x.gather(1, targets[:, None]) on a 2-D x has a symbolic form here")
    index_data = self.nodes_data[index.node]
    if index_data["dtype"].is_floating_point or tuple(index_data["shape"]) != (operand.shape[0], 1):
        raise SymbolicError(f"{where(data)}: the index must be an integer tensor of shape ({operand.shape[0]}, 1)")
    row_axis, class_axis = operand.axes
    if row_axis is None or class_axis is None:
        raise SymbolicError(f"{where(data)}: picking from a tensor with a size-1 dimension has no symbolic form")
    target = self._param(index.node)
    self._settle_param(target, (row_axis, None))
    local = AxisSum(sp.KroneckerDelta(class_axis, target.sym) * operand.sym, class_axis)
    return self._op(data, data["name"], "pick", [operand, target], local, (row_axis, None),
                    recent=frozenset([row_axis]))


def _pick(self: Lowering, data: dict[str, Any], name: str, operand: SNode, targets: int, row_axis: Any,
          class_axis: Any, shape: tuple | None = None) -> SNode:
    target = self._param(targets)
    self._settle_param(target, (row_axis,))
    delta = sp.KroneckerDelta(class_axis, target.sym)
    local = AxisSum(delta * operand.sym, class_axis)
    return self._op(data, name, "pick", [operand, target], local, (row_axis,), shape=shape,
                    recent=frozenset([row_axis]))


def _loss_reduction(self: Lowering, data: dict[str, Any], name: str, picked: SNode, reduction: str) -> SNode:
    if reduction == "none":
        return self._op(data, name, "neg", [picked], -picked.sym, picked.axes)
    total = self.space.sum_over(picked.sym, [a for a in picked.axes if a is not None])
    if reduction == "mean":
        total = total / sp.Mul(*(self.space.size(a) for a in picked.axes if a is not None))
    return self._op(data, name, reduction, [picked], -total, (), recent=frozenset(picked.axes))


def _reduction_arg(params: dict[str, Any]) -> str:
    from ..rules import _reduction

    return _reduction(params.get("size_average"), params.get("reduce"), params.get("reduction", "mean"))


def _params(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    params = dict(zip(names, data["bargs"]))
    params.update(data["bkwargs"] or {})
    return params


def lower_softmax(self: Lowering, data: dict[str, Any], *, log: bool | None = None, name: str | None = None,
                  operand: SNode | None = None, dim: Any = None) -> SNode:
    """softmax / log_softmax along one dimension: one node, recomputed with torch's own call."""
    if operand is None:
        params = _params(data, ("x", "dim", "dtype"))
        operand = self._operand(params["x"])
        dim = params.get("dim")
        log = data["op"] == "log_softmax"
    if dim is None:
        dim = 0 if len(operand.shape) in (0, 1, 3) else 1
    axis = operand.axes[dim % len(operand.axes)]
    if axis is None:
        raise SymbolicError(f"{where(data)}: softmax over a size-1 dimension")
    total = AxisSum(sp.exp(operand.sym), axis)
    local = operand.sym - sp.log(total) if log else sp.exp(operand.sym) / total
    function = "log_softmax" if log else "softmax"

    def code(ident: Callable, layout_dim: Callable) -> str:
        return f"torch.{function}({ident(operand)}, {layout_dim(axis)})"

    return self._op(data, name or data["name"], function, [operand], local, operand.axes,
                    shape=operand.shape if name else None, code=code)


def lower_cross_entropy(self: Lowering, data: dict[str, Any]) -> SNode:
    """F.cross_entropy(logits, targets): log_softmax, the one-hot pick, the mean (or sum), the sign."""
    params = _params(data, ("x", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                            "label_smoothing"))
    return _nll(self, data, params, log_softmax=True)


def lower_nll_loss(self: Lowering, data: dict[str, Any]) -> SNode:
    params = _params(data, ("x", "target", "weight", "size_average", "ignore_index", "reduce", "reduction"))
    return _nll(self, data, params, log_softmax=False)


def _nll(self: Lowering, data: dict[str, Any], params: dict[str, Any], log_softmax: bool) -> SNode:
    operand = self._operand(params["x"])
    target = params["target"]
    if params.get("weight") is not None or params.get("label_smoothing", 0.0):
        raise SymbolicError(f"{where(data)}: class weights and label smoothing have no symbolic form here")
    if len(operand.shape) != 2 or not isinstance(target, Ref):
        raise SymbolicError(f"{where(data)}: only 2-D inputs with class-index targets have a symbolic form here")
    target_data = self.nodes_data[target.node]
    if target_data["dtype"].is_floating_point:
        raise SymbolicError(f"{where(data)}: class-probability targets have no symbolic form here")
    ignore = params.get("ignore_index", -100)
    if bool((target_data["value"] == ignore).any()):
        raise SymbolicError(f"{where(data)}: some targets equal ignore_index={ignore}")
    name = data["name"]
    logp = lower_softmax(self, data, log=True, name=f"{name}_logprobs", operand=operand, dim=1) \
        if log_softmax else operand
    row_axis, class_axis = operand.axes
    picked = _pick(self, data, f"{name}_picked", logp, target.node, row_axis, class_axis,
                   shape=(operand.shape[0],))
    return _loss_reduction(self, data, name, picked, _reduction_arg(params))


def lower_mse_loss(self: Lowering, data: dict[str, Any]) -> SNode:
    """mse_loss, l1_loss and binary_cross_entropy_with_logits: an elementwise loss, then its mean or sum."""
    names = {"mse_loss": ("x", "target", "size_average", "reduce", "reduction", "weight"),
             "l1_loss": ("x", "target", "size_average", "reduce", "reduction"),
             "smooth_l1_loss": ("x", "target", "size_average", "reduce", "reduction", "beta"),
             "huber_loss": ("x", "target", "reduction", "delta", "weight"),
             "binary_cross_entropy_with_logits": ("x", "target", "weight", "size_average", "reduce", "reduction",
                                                  "pos_weight")}[data["op"]]
    params = _params(data, names)
    if params.get("weight") is not None or params.get("pos_weight") is not None:
        raise SymbolicError(f"{where(data)}: a weighted {data['op']} has no symbolic form here")
    x, target = params["x"], params["target"]
    operands = [self._operand(x), self._operand(target)]
    shapes = [tuple(self.nodes_data[a.node]["shape"]) if isinstance(a, Ref) else () for a in (x, target)]
    axes = self.broadcast(data, operands, shapes)
    exprs = [o.sym if o is not None else self.number(a, frozenset(), data, lift=False)
             for o, a in zip(operands, (x, target))]
    name = data["name"]
    shape = _shape(self, axes)
    tensors = _unique_operands([o for o in operands if o])
    if data["op"] == "binary_cross_entropy_with_logits":  # log(1 + e^x) - t*x: stable, as torch computes it
        square = self._op(data, f"{name}_each", "bce", tensors, Softplus(exprs[0]) - exprs[1] * exprs[0], axes,
                          shape=shape)
    else:
        diff = self._op(data, f"{name}_diff", "sub", tensors, exprs[0] - exprs[1], axes, shape=shape)
        each = _elementwise_loss(self, data, params, diff.sym)
        square = self._op(data, f"{name}_{each[0]}", "pow" if each[0] == "sq" else each[0], [diff], each[1], axes,
                          shape=shape)
    reduction = _reduction_arg(params)
    real = [a for a in axes if a is not None]
    if reduction == "none":
        return self._op(data, name, "identity", [square], square.sym, axes)
    local = self.space.sum_over(square.sym, real)
    if reduction == "mean":
        local = local / sp.Mul(*(self.space.size(a) for a in real))
    return self._op(data, name, reduction, [square], local, (), recent=frozenset(real))


def _elementwise_loss(self: Lowering, data: dict[str, Any], params: dict[str, Any], d: sp.Expr) -> tuple[str, sp.Expr]:
    """The loss of one element of ``x - target``: its op name and expression (Huber and smooth L1 piecewise)."""
    op = data["op"]
    if op == "mse_loss":
        return "sq", d**2
    if op == "l1_loss":
        return "abs", sp.Abs(d)
    if op == "huber_loss":  # torch: |d| < delta ? d^2/2 : delta*(|d| - delta/2)
        delta = self.number(params.get("delta", 1.0), frozenset(), data, lift=False)
        return "huber", sp.Piecewise((d**2 / 2, sp.Abs(d) < delta), (delta * (sp.Abs(d) - delta / 2), True))
    beta = self.number(params.get("beta", 1.0), frozenset(), data, lift=False)  # smooth_l1_loss
    if beta == 0:  # torch: l1_loss
        return "abs", sp.Abs(d)
    return "smooth_l1", sp.Piecewise((d**2 / (2 * beta), sp.Abs(d) < beta), (sp.Abs(d) - beta / 2, True))


def _normalise(self: Lowering, data: dict[str, Any], name: str, operand: SNode, summed: list, eps: Any,
               weight: Any, bias: Any, square_only: bool = False) -> SNode:
    """mean, deviations, biased variance, 1/sqrt(var + eps), scale and shift (layer and batch norm)."""
    keep = tuple(None if a in summed else a for a in operand.axes)
    count = sp.Mul(*(self.space.size(a) for a in summed))
    shape_keep = _shape(self, keep)
    mean = self._op(data, f"{name}_mean", "mean", [operand], self.space.sum_over(operand.sym, summed) / count, keep,
                    shape=shape_keep, recent=frozenset(summed))
    diff = self._op(data, f"{name}_diff", "sub", [operand, mean], operand.sym - mean.sym, operand.axes,
                    shape=operand.shape)
    square = self._op(data, f"{name}_sq", "pow", [diff], diff.sym**2, operand.axes, shape=operand.shape)
    var = self._op(data, f"{name}_var", "mean", [square], self.space.sum_over(square.sym, summed) / count, keep,
                   shape=shape_keep, recent=frozenset(summed))
    eps_number = self.number(eps, frozenset(), data, lift=False)
    inv = self._op(data, f"{name}_inv", "rsqrt", [var], (var.sym + eps_number) ** sp.Rational(-1, 2), keep,
                   shape=shape_keep)
    out = self._op(data, f"{name}_raw" if (weight is not None or bias is not None) else name, "mul", [diff, inv],
                   diff.sym * inv.sym, operand.axes, shape=operand.shape if (weight is not None or bias is not None)
                   else None)
    for tensor, op in ((weight, "mul"), (bias, "add")):
        if tensor is None:
            continue
        param = self._operand(tensor)
        shape = tuple(self.nodes_data[tensor.node]["shape"])
        self.broadcast(data, [out, param], [out.shape, shape])
        last = (op == "add") or bias is None
        local = out.sym * param.sym if op == "mul" else out.sym + param.sym
        out = self._op(data, name if last else f"{name}_scaled", op, [out, param], local, operand.axes,
                       shape=None if last else operand.shape)
    return out


def _normalised_operand(self: Lowering, data: dict[str, Any], params: dict[str, Any]) -> SNode:
    """The tensor a layer or batch norm normalises. When the chain starts at the weight or the bias, it enters
    from outside: its axes line up with theirs (the last dimension), as torch broadcasts them."""
    operand = self._operand(params["x"])
    if operand.axes is None:
        affine = [t for t in (params.get("weight"), params.get("bias")) if isinstance(t, Ref)]
        self.broadcast(data, [operand] + [self._operand(t) for t in affine],
                       [operand.shape] + [tuple(self.nodes_data[t.node]["shape"]) for t in affine])
    return operand


def lower_layer_norm(self: Lowering, data: dict[str, Any]) -> SNode:
    params = _params(data, ("x", "normalized_shape", "weight", "bias", "eps"))
    operand = _normalised_operand(self, data, params)
    normalized = params["normalized_shape"]
    normalized = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    summed = [a for a in operand.axes[len(operand.axes) - len(normalized):] if a is not None]
    return _normalise(self, data, data["name"], operand, summed, params.get("eps", 1e-5), params.get("weight"),
                      params.get("bias"))


def lower_batch_norm(self: Lowering, data: dict[str, Any]) -> SNode:
    params = _params(data, ("x", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"))
    operand = _normalised_operand(self, data, params)
    if not params.get("training") and params.get("running_mean") is not None:
        raise SymbolicError(f"{where(data)}: batch_norm in eval mode uses the running statistics (an affine map); "
                            f"only training mode has a symbolic form here")
    if len(operand.shape) != 2:
        raise SymbolicError(f"{where(data)}: only 2-D batch_norm inputs have a symbolic form here")
    summed = [operand.axes[0]] if operand.axes[0] is not None else []
    return _normalise(self, data, data["name"], operand, summed, params.get("eps", 1e-5), params.get("weight"),
                      params.get("bias"))


def lower_norm(self: Lowering, data: dict[str, Any]) -> SNode:
    """The Euclidean norm along dimensions: the square root of a sum of squares."""
    names = ("x", "ord", "dim", "keepdim") if data["op"] == "vector_norm" else ("x", "p", "dim", "keepdim")
    params = _params(data, names)
    order = params.get("ord", params.get("p", 2))
    if order not in (2, 2.0, "fro", None):
        raise SymbolicError(f"{where(data)}: only the 2-norm has a symbolic form here (got {order!r})")
    operand = self._operand(params["x"])
    axes, summed = self.reduced(data, operand, params.get("dim"), bool(params.get("keepdim", False)))
    local = sp.sqrt(self.space.sum_over(operand.sym**2, summed))
    return self._op(data, data["name"], data["op"], [operand], local, axes, recent=frozenset(summed))


def lower_normalize(self: Lowering, data: dict[str, Any]) -> SNode:
    """``F.normalize(x, dim=d)``: ``x / max(|x|, eps)``, the 2-norm clamped below at eps as torch does it (the
    clamp passes the gradient for ``|x| >= eps``)."""
    params = _params(data, ("x", "p", "dim", "eps", "out"))
    if params.get("p", 2.0) not in (2, 2.0) or params.get("out") is not None:
        raise SymbolicError(f"{where(data)}: only normalize with p=2 (and no out=) has a symbolic form here "
                            f"(got p={params.get('p')!r})")
    operand = self._operand(params["x"])
    name = data["name"]
    axes, summed = self.reduced(data, operand, params.get("dim", 1), True)
    norm = self._op(data, f"{name}_norm", "norm", [operand], sp.sqrt(self.space.sum_over(operand.sym**2, summed)),
                    axes, shape=_shape(self, axes), recent=frozenset(summed))
    eps = self.number(params.get("eps", 1e-12), frozenset(), data, lift=False)
    clamped = self._op(data, f"{name}_clamped", "clamp_min", [norm], _clamp(norm.sym, eps), axes,
                       shape=_shape(self, axes))
    return self._op(data, name, "div", [operand, clamped], operand.sym / clamped.sym, operand.axes)


def lower_logsumexp(self: Lowering, data: dict[str, Any]) -> SNode:
    params = _params(data, ("x", "dim", "keepdim"))
    operand = self._operand(params["x"])
    axes, summed = self.reduced(data, operand, params.get("dim"), bool(params.get("keepdim", False)))
    local = sp.log(self.space.sum_over(sp.exp(operand.sym), summed))
    def code(ident: Callable, layout_dim: Callable) -> str:
        dims = tuple(layout_dim(a) for a in summed)
        return f"torch.logsumexp({ident(operand)}, {dims if len(dims) > 1 else dims[0]}, keepdim=True)"

    return self._op(data, data["name"], "logsumexp", [operand], local, axes, recent=frozenset(summed), code=code)


LOWERINGS: dict[str, Callable[[Lowering, dict[str, Any]], SNode]] = {
    **{op: lower_elementwise for op in ELEMENTWISE},
    **{op: lower_identity for op in IDENTITY},
    **{op: lower_reshape for op in RESHAPES},
    "sum": lower_sum,
    "mean": lower_sum,
    "var": lower_var,
    "std": lower_var,
    "max": lower_max,
    "min": lower_max,
    "amax": lower_max,
    "amin": lower_max,
    "getitem": lower_getitem,
    "softmax": lower_softmax,
    "log_softmax": lower_softmax,
    "cross_entropy": lower_cross_entropy,
    "nll_loss": lower_nll_loss,
    "mse_loss": lower_mse_loss,
    "l1_loss": lower_mse_loss,
    "binary_cross_entropy_with_logits": lower_mse_loss,
    "smooth_l1_loss": lower_mse_loss,
    "huber_loss": lower_mse_loss,
    "gather": lower_gather,
    "layer_norm": lower_layer_norm,
    "batch_norm": lower_batch_norm,
    "logsumexp": lower_logsumexp,
    "norm": lower_norm,
    "vector_norm": lower_norm,
    "normalize": lower_normalize,
}


def lower(graph: Graph, output: int, wrt: int) -> Chain:
    """The chain between ``wrt`` and ``output``, lowered (raises :class:`SymbolicError` naming the node)."""
    return Lowering(graph, output, wrt).run()
