"""The backward pass as straight-line torch code: the answer key of the lecture's exercise 1.

``graph.backward_source(loss)`` runs the engine once while recording it
(:func:`tensorgraph.trace`) and prints what it did, one statement per gradient
contribution, with the user's names and the lecture's ``d`` convention::

    # probs = counts * counts_sum_inv
    dcounts = dprobs * counts_sum_inv  # mul: d(a*b)/da = b
    dcounts_sum_inv = (dprobs * counts).sum(1, keepdim=True)  # mul: d(a*b)/db = a; broadcast-undo: sum to (32, 1)
    ...
    dcounts += dcounts_sum  # sum: each summed element gets the sum's gradient; 2nd branch, through counts_sum

Every statement is the rule's own torch calls as recorded, so the code computes exactly
what the engine computes, bit for bit (``textbook=True`` trades that for a handout: torch's
fused backward kernels written as their formulas, ``dhpreact = (1 - h**2) * dh``, from
:data:`tensorgraph.printer.TEXTBOOK`). Broadcast-undo is explicit (``.sum(0,
keepdim=True)``), and a tensor used by several ops gets one ``+=`` per extra branch.
Temporaries used once are inlined, up to :data:`~tensorgraph.printer.MAX_NESTING` calls deep
(a longer chain, a long recurrence's, gets a variable every so many levels); forward
intermediates without a user name are written out as their forward expressions
(``logits.max(1, keepdim=True).indices``).

The code runs in a namespace holding ``torch``, ``F`` and the forward tensors by name
(:func:`tensorgraph.printer.namespace`), plus, when a ``grad`` was given, that seed gradient
in the root's gradient variable (``dloss``; ``dh`` for ``backward_source("h", grad=g)``).
:func:`run` finds that variable itself.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import printer
from .graph import Ref, identifier
from .printer import PRIMARY, PRODUCT, Expr

if TYPE_CHECKING:
    from .engine import BackwardTrace
    from .graph import Graph

# what each rule does, by op and argument position (the comment on each generated line)
RULE_NOTES: dict[str, tuple[str, ...]] = {
    "add": ("d(a+b)/da = 1", "d(a+b)/db = 1"),
    "sub": ("d(a-b)/da = 1", "d(a-b)/db = -1"),
    "rsub": ("d(b-a)/da = -1", "d(b-a)/db = 1"),
    "mul": ("d(a*b)/da = b", "d(a*b)/db = a"),
    "div": ("d(a/b)/da = 1/b", "d(a/b)/db = -a/b**2"),
    "rdiv": ("d(c/x)/dx = -c/x**2",),
    "pow": ("d(x**e)/dx = e*x**(e-1)", "d(x**e)/de = x**e*log(x)"),
    "square": ("d(x**2)/dx = 2*x",),
    "neg": ("d(-x)/dx = -1",),
    "exp": ("d exp(x)/dx = exp(x)",),
    "log": ("d log(x)/dx = 1/x",),
    "sqrt": ("d sqrt(x)/dx = 1/(2*sqrt(x))",),
    "rsqrt": ("d x**-0.5/dx = -0.5*x**-1.5",),
    "reciprocal": ("d(1/x)/dx = -1/x**2",),
    "tanh": ("d tanh(x)/dx = 1 - tanh(x)**2, in torch's fused kernel",),
    "sigmoid": ("d sigmoid(x)/dx = s*(1-s), in torch's fused kernel",),
    "relu": ("d relu(x)/dx = 1 where x > 0",),
    "threshold": ("d threshold(x)/dx = 1 where x > threshold, else 0, in torch's kernel",),
    "abs": ("d|x|/dx = sign(x)",),
    "matmul": ("d(a@b)/da = g @ b.T", "d(a@b)/db = a.T @ g"),
    "linear": ("d(x@W.T+b)/dx = g @ W", "d/dW = g.T @ x", "d/db = g"),
    "sum": ("each summed element gets the sum's gradient",),
    "mean": ("each element gets 1/n of the mean's gradient",),
    "var": ("d var/dx = 2*(x-mean)/(n-correction)",),
    "std": ("d std/dx = (x-mean)/((n-correction)*std)",),
    "max": ("only the selected maximum gets the gradient",),
    "min": ("only the selected minimum gets the gradient",),
    "amax": ("the maxima share the gradient",),
    "getitem": ("the picked elements get the gradient; repeated picks add up",),
    "setitem": ("overwritten elements get none", "", "the written elements get theirs"),
    "index_put": ("overwritten elements get none", "", "the written elements get theirs"),
    "embedding": ("", "each looked-up row gets its gradient; repeated rows add up"),
    "view": ("reshape the gradient back",),
    "reshape": ("reshape the gradient back",),
    "flatten": ("reshape the gradient back",),
    "unsqueeze": ("reshape the gradient back",),
    "squeeze": ("reshape the gradient back",),
    "t": ("transpose back",),
    "T": ("transpose back",),
    "mT": ("transpose back",),
    "transpose": ("transpose back",),
    "permute": ("permute back",),
    "expand": ("sum over the copies (broadcast-undo)",),
    "clone": ("the gradient passes through",),
    "no_grad_update": ("updated under torch.no_grad(): the gradient passes through, as torch autograd keeps its "
                       "history",),
    "contiguous": ("the gradient passes through",),
    "cat": ("each input gets its slice",),
    "stack": ("each input gets its slice",),
    "softmax": ("s*(g - (g*s).sum(dim)), in torch's fused kernel",),
    "log_softmax": ("g - exp(out)*g.sum(dim), in torch's fused kernel",),
    "cross_entropy": ("(softmax(logits) - onehot(target)) / n",),
    "nll_loss": ("-onehot(target) / n",),
    "mse_loss": ("2*w*(x - target) / n (w: the weight or 1; n: the count, or the weights' sum for a weighted mean)",
                 "-2*w*(x - target) / n", "", "", "", "(x - target)**2 / n, less out / n for a weighted mean"),
    "layer_norm": ("rstd*(gw - mean(gw) - x̂*mean(gw*x̂)) over the normalized dims, gw = g*weight, x̂ = (x-mean)*rstd, "
                   "in torch's fused kernel", "", "d/dweight = g*x̂ summed over the other dims",
                   "d/dbias = g summed over the other dims"),
    "batch_norm": ("torch's fused batch-norm backward",),
    "masked_fill": ("the filled elements get none", "", "the filled elements' gradients add up"),
    "where": ("", "d/da = 1 where the condition holds", "d/db = 1 where it does not"),
    "tril": ("the zeroed elements get none",),
    "triu": ("the zeroed elements get none",),
    "gelu": ("d gelu(x)/dx = Phi(x) + x*phi(x), in torch's fused kernel",),
    "silu": ("d silu(x)/dx = s*(1 + x*(1-s)), s = sigmoid(x)",),
    "softplus": ("d softplus(x)/dx = sigmoid(beta*x) (1 where beta*x > threshold), in torch's fused kernel",),
    "leaky_relu": ("d leaky_relu(x)/dx = 1 where x > 0, else negative_slope, in torch's fused kernel",),
    "elu": ("d elu(x)/dx = 1 where x > 0, else elu(x) + alpha, in torch's fused kernel",),
    "selu": ("d selu(x)/dx = scale where x > 0, else scale*alpha*exp(x), in torch's fused kernel",),
    "celu": ("d celu(x)/dx = 1 where x > 0, else exp(x/alpha), in torch's fused kernel",),
    "mish": ("d mish(x)/dx = t + x*sigmoid(x)*(1 - t**2), t = tanh(softplus(x)), in torch's fused kernel",),
    "hardswish": ("d hardswish(x)/dx = 0 where x <= -3, x/3 + 1/2 where -3 < x < 3, else 1, in torch's kernel",),
    "hardsigmoid": ("d hardsigmoid(x)/dx = 1/6 strictly between -3 and 3, else 0, in torch's kernel",),
    "log_sigmoid": ("d logsigmoid(x)/dx = sigmoid(-x) = 1 - sigmoid(x), in torch's fused kernel",),
    "softsign": ("d softsign(x)/dx = 1/(1 + |x|)**2",),
    "tanhshrink": ("d(x - tanh(x))/dx = 1 - (1 - tanh(x)**2) = tanh(x)**2",),
    "softshrink": ("d softshrink(x)/dx = 1 where |x| > lambd, else 0, in torch's kernel",),
    "hardshrink": ("d hardshrink(x)/dx = 1 where |x| > lambd, else 0, in torch's kernel",),
    "rrelu": ("d rrelu(x)/dx = 1 where x > 0, else the mean slope (lower + upper)/2 (evaluation mode), in torch's "
              "fused kernel",),
    "prelu": ("d prelu(x)/dx = 1 where x > 0, else weight", "d prelu(x)/dweight = x where x <= 0, else 0, summed over "
              "the elements sharing the slope"),
    "softmin": ("-s*(g - (g*s).sum(dim)), s = softmin(x) = softmax(-x), in torch's fused kernel",),
    "glu": ("glu(x) = a*sigmoid(b), halves a, b of x: d/da = sigmoid(b), d/db = a*sigmoid(b)*(1 - sigmoid(b)), "
            "in torch's fused kernel",),
    "logit": ("d logit(x)/dx = 1/(x*(1 - x)) (0 outside [eps, 1 - eps] when eps is given), in torch's kernel",),
    "sin": ("d sin(x)/dx = cos(x)",),
    "cos": ("d cos(x)/dx = -sin(x)",),
    "tan": ("d tan(x)/dx = 1 + tan(x)**2",),
    "asin": ("d asin(x)/dx = 1/sqrt(1 - x**2)",),
    "acos": ("d acos(x)/dx = -1/sqrt(1 - x**2)",),
    "atan": ("d atan(x)/dx = 1/(1 + x**2)",),
    "sinh": ("d sinh(x)/dx = cosh(x)",),
    "cosh": ("d cosh(x)/dx = sinh(x)",),
    "asinh": ("d asinh(x)/dx = 1/sqrt(x**2 + 1)",),
    "acosh": ("d acosh(x)/dx = 1/sqrt(x**2 - 1)",),
    "atanh": ("d atanh(x)/dx = 1/(1 - x**2)",),
    "erf": ("d erf(x)/dx = 2/sqrt(pi)*exp(-x**2)",),
    "erfc": ("d erfc(x)/dx = -2/sqrt(pi)*exp(-x**2)",),
    "erfinv": ("d erfinv(x)/dx = sqrt(pi)/2*exp(erfinv(x)**2)",),
    "log1p": ("d log(1 + x)/dx = 1/(1 + x)",),
    "expm1": ("d(exp(x) - 1)/dx = exp(x)",),
    "log2": ("d log2(x)/dx = 1/(x*log(2))",),
    "log10": ("d log10(x)/dx = 1/(x*log(10))",),
    "exp2": ("d 2**x/dx = 2**x*log(2)",),
    "lgamma": ("d lgamma(x)/dx = digamma(x)",),
    "i0": ("d i0(x)/dx = i1(x)",),
    "digamma": ("d digamma(x)/dx = polygamma(1, x)",),
    "sinc": ("d sinc(x)/dx = (cos(pi*x)*pi*x - sin(pi*x))/(pi*x**2), 0 at x = 0",),
    "hypot": ("d hypot(x,y)/dx = x/hypot(x,y)", "d hypot(x,y)/dy = y/hypot(x,y)"),
    "xlogy": ("d(x*log(y))/dx = log(y) (0 where x = 0 and y <= 0)", "d(x*log(y))/dy = x/y"),
    "clamp": ("1 where min <= x <= max", "d/dmin = 1 where x < min (and min < max)",
              "d/dmax = 1 where x > max (or max < min)"),
    "clamp_min": ("1 where x >= min", "d/dmin = 1 where x < min"),
    "clamp_max": ("1 where x <= max", "d/dmax = 1 where x > max"),
    "nan_to_num": ("1 where x is finite, else 0 (the replaced values take none)",),
    "frac": ("d(x - trunc(x))/dx = 1",),
    **{op: (f"{op} is piecewise constant: 0",) for op in ("sign", "sgn", "floor", "ceil", "round", "trunc", "fix")},
    "split": ("each piece's gradient goes back to its slice",),
    "chunk": ("each piece's gradient goes back to its slice",),
    "unbind": ("each piece's gradient goes back to its slice",),
    "select": ("the gradient goes back to the selected slice",),
    "narrow": ("the gradient goes back to the selected slice",),
    "addmm": ("d/dc = beta", "d(a@b)/da = alpha * g @ b.T", "d(a@b)/db = alpha * a.T @ g"),
    "baddbmm": ("d/dc = beta", "d(a@b)/da = alpha * g @ b.mT", "d(a@b)/db = alpha * a.mT @ g"),
    "scaled_dot_product_attention": ("softmax(q @ k.mT * scale + mask) @ v, differentiated through its parts",),
    "logsumexp": ("d logsumexp(x)/dx = softmax(x)",),
    "var_mean": ("d var/dx = 2*(x-mean)/(n-correction); d mean/dx = 1/n",),
    "std_mean": ("d std/dx = (x-mean)/((n-correction)*std); d mean/dx = 1/n",),
    "group_norm": ("torch's fused group-norm backward",),
    "instance_norm": ("torch's fused batch-norm backward over N*C channels",),
    "rms_norm": ("x*rsqrt(mean(x**2)+eps) through its parts", "", "d/dw = g * x*rsqrt(mean(x**2)+eps)"),
    "hardtanh": ("1 strictly between the bounds, in torch's kernel",),
    "relu6": ("1 strictly between 0 and 6, in torch's kernel",),
    "normalize": ("g/|x| - x*(g.x)/|x|**3, |x| clamped to eps",),
    "median": ("only the selected median gets the gradient (a full median: shared among ties)",),
    "atan2": ("d atan2(y,x)/dy = x/(x**2+y**2)", "d atan2(y,x)/dx = -y/(x**2+y**2)"),
    "lerp": ("1 - weight", "weight", "end - input"),
    "smooth_l1_loss": ("torch's fused smooth-L1 backward", "minus that"),
    "huber_loss": ("torch's fused Huber backward", "minus that"),
    "interpolate": ("torch's upsample backward: each output's gradient back to its sources",),
}

# notes that depend on how the op was called, by (op, keyword, value): they replace the op's RULE_NOTES
CALL_NOTES: dict[tuple[str, str, Any], tuple[str, ...]] = {
    ("gelu", "approximate", "tanh"): (
        "d gelu(x)/dx for gelu(x) = x/2*(1 + tanh(u)), u = sqrt(2/pi)*(x + 0.044715*x**3): (1 + tanh(u))/2 + "
        "x/2*(1 - tanh(u)**2)*du/dx, in torch's fused kernel",),
}


def rule_notes(data: dict) -> tuple[str, ...]:
    """What a recorded op's rule does, by argument position: :data:`CALL_NOTES` for its call, else RULE_NOTES."""
    attrs = data.get("attrs") or {}
    for (op, key, value), notes in CALL_NOTES.items():
        if data["op"] == op and attrs.get(key) == value:
            return notes
    return RULE_NOTES.get(data["op"], ())


@dataclass
class Line:
    """One generated line: code (or a ``#`` header), its comment, and the index of the step it computes."""

    code: str
    comment: str = ""
    step: int | None = None

    def __str__(self) -> str:
        return f"{self.code}  # {self.comment}" if self.comment else self.code


@dataclass
class BackwardSource:
    """The generated backward pass: its lines, and each step's contribution as an expression."""

    lines: list[Line]
    trace: BackwardTrace
    variables: dict[int, str]  # forward node id -> the variable holding its final gradient
    contributions: dict[int, str] = field(default_factory=dict)  # step index -> source of what it adds

    def text(self, comments: bool = True) -> str:
        return "\n".join(str(line) if comments else line.code for line in self.lines
                         if comments or not line.code.startswith("#") or line.code.startswith(_KEPT)) + "\n"

    def __str__(self) -> str:
        return self.text()


_KEPT = "# NOTE:"  # a header line kept by text(comments=False)


def backward_source(graph: Graph, loss: Any, grad: Tensor | None = None, *, comments: bool = True,
                    textbook: bool = False) -> str:
    """The whole backward pass of ``loss`` as readable, runnable torch code (see the module docstring).

    ``comments=False`` leaves out the forward-line headers and the per-line rule notes.
    ``textbook=True`` writes each of torch's fused backward kernels in :data:`printer.TEXTBOOK`
    as its formula in ordinary torch operations (``aten.tanh_backward(dh, h)`` as
    ``(1 - h**2) * dh``): for a handout. Those lines then equal the engine's gradients up to
    rounding, not bit for bit; kernels the table lacks print as called.
    """
    return generate(graph, loss, grad, textbook=textbook).text(comments)


def generate(graph: Graph, loss: Any, grad: Tensor | None = None, *, textbook: bool = False) -> BackwardSource:
    """Like :func:`backward_source`, as a :class:`BackwardSource` (lines, steps, variables)."""
    from .engine import traced

    return _Generator(graph, traced(graph, loss, grad, "backward_source"), textbook).run()


def run(source: str, graph: Graph, grad: Tensor | None = None, root: str | None = None) -> dict[str, Any]:
    """Execute generated code in a namespace holding the forward values; returns the namespace.

    ``grad`` is the seed gradient ``source`` was generated with (``backward_source(h, grad=g)``
    reads it as ``dh``); the variable it goes in is the one name the code reads but never
    assigns, or the gradient of ``root`` (the name of the tensor it was seeded at) when given:
    ``"d" + root``, or ``"grad_" + root`` where a forward tensor holds that name.
    """
    namespace = printer.namespace(graph)
    code = compile(source, "<backward_source>", "exec")
    if grad is not None:
        seed = _root_seed_name(root, namespace) if root is not None else _seed_name(source, namespace)
        namespace[seed] = _as_seed(grad, graph, seed)
    exec(code, namespace)  # noqa: S102 - running generated code is the point
    return namespace


def _root_seed_name(root: str, namespace: dict[str, Any]) -> str:
    """The variable holding ``root``'s gradient, as the code generator names it (``dh``, or ``grad_h``)."""
    name = "d" + identifier(root)
    return "grad_" + identifier(root) if name in namespace else name


def _as_seed(grad: Tensor, graph: Graph, seed: str) -> Tensor:
    """``grad`` in the dtype of the tensor whose gradient ``seed`` holds, as the engine casts it (and torch).

    The seed's variable is ``dh``, or ``grad_h`` where a forward tensor is named ``dh`` (``_grad_name``).
    """
    for data in graph._nodes:
        name = identifier(data["name"])
        if seed in ("d" + name, "grad_" + name) and grad.dtype != data["dtype"] and not grad.is_complex():
            return grad.to(data["dtype"])
    return grad


def _seed_name(source: str, namespace: dict[str, Any]) -> str:
    """The variable generated code reads its given seed gradient from: read, never assigned, not in the namespace."""
    import ast
    import builtins

    names = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)]
    assigned = {node.id for node in names if isinstance(node.ctx, ast.Store)}
    free = list(dict.fromkeys(node.id for node in names if isinstance(node.ctx, ast.Load) and node.id not in assigned
                              and node.id not in namespace and not hasattr(builtins, node.id)))
    if len(free) == 1:
        return free[0]
    if not free:
        raise ValueError("codegen.run: grad= was given, but this code reads no seed gradient (it was generated "
                         "without grad=, and seeds itself with ones); generate it with the same grad=")
    raise ValueError(f"codegen.run: cannot tell which of {', '.join(free)} is the seed gradient; pass root= "
                     f"(the name of the tensor the code was generated for)")


class _Generator:
    def __init__(self, graph: Graph, trace: BackwardTrace, textbook: bool = False) -> None:
        self.graph = graph
        self.textbook = textbook  # fused backward kernels written as their formulas (printer.TEXTBOOK)
        self.fwd = graph._nodes
        self.trace = trace
        self.adj = trace.adjoint._nodes
        self.lines: list[Line] = []
        self.bound: dict[int, str] = {}  # adjoint node -> variable holding it
        self.forward_of: dict[int, int] = {}  # adjoint leaf -> forward node
        self.forward_cache: dict[int, Expr] = {}
        self.forward_nesting: dict[int, int] = {}  # forward node -> how many calls its cached expression nests
        self.used_names = {identifier(d["name"]) for d in self.fwd}
        self.temp_count = 0
        self.contributions: dict[int, str] = {}
        self.variables: dict[int, str] = {}
        self.pending: dict[int, _Notes] = {}  # unnamed forward node -> the rules inlined into its gradient
        self.reading: tuple[int, str] | None = None  # the current rule's upstream gradient: (adjoint node, variable)
        self.defining: tuple[int, str] | None = None  # (in-place update, the gradient variable it is written in)
        for node, data in enumerate(self.fwd):
            adjoint = trace.node_of(data["value"])
            if adjoint is not None and self.adj[adjoint]["func"] is None:
                self.forward_of.setdefault(adjoint, node)
        # textbook: an F.cross_entropy's gradient node -> (the consumer, its logits, target and reduction), written
        # as (softmax - onehot) / n
        self.cross_entropy: dict[int, tuple[int, tuple[Ref, Ref, str]]] = {}
        for step in trace.steps if textbook else ():
            node = trace.node_of(step.grad)
            found = textbook_cross_entropy(self.fwd, step.consumer, step.source) if node is not None else None
            if found is not None:
                self.cross_entropy[node] = (step.consumer, found)

    # ---------------------------------------------------------------- the steps

    def run(self) -> BackwardSource:
        steps = self.trace.steps
        root = self.trace.grads.root
        self._seed(root)
        self._count_uses()
        remaining = Counter(step.source for step in steps)
        positions: dict[tuple[int, int], int] = Counter()
        header = None
        for index, step in enumerate(steps):
            if step.consumer != header:
                header = step.consumer
                self._header(step.consumer, root)
                self.reading = self._upstream(step.consumer)
            position = self._position(step.consumer, step.source, positions)
            remaining[step.source] -= 1
            self._step(index, step, position, remaining[step.source])
        incomplete = self.trace.grads.incomplete
        if incomplete:  # (kept without comments too: the code computes these gradients in part)
            names = ", ".join(self.fwd[node]["name"] for node in sorted(incomplete, reverse=True))
            root_name = self.fwd[root]["name"]
            self.lines.insert(0, Line(f"{_KEPT} no gradient for {names}: {root_name} depends on them through "
                                      f"{next(iter(incomplete.values()))}; the lines below leave that part out"))
        return BackwardSource(self.lines, self.trace, self.variables, self.contributions)

    def _upstream(self, consumer: int) -> tuple[int, str] | None:
        """The adjoint node of ``consumer``'s gradient and its variable, which its rule reads by that name.

        ``de = dd`` (an add passes its gradient on) binds one tensor to two names; the rule of ``e = a * b``
        then reads ``de * b``, as a learner writes it, not ``dd * b``.
        """
        name = self.variables.get(consumer)
        grad = self.trace.grads.by_node.get(consumer)
        node = self.trace.node_of(grad) if name is not None and grad is not None else None
        return (node, name) if node is not None else None

    def _seed(self, root: int) -> None:
        seed = self._adjoint(self.trace.grads.by_node[root], "the seed gradient")
        name = self._grad_name(root)
        self.variables[root] = name
        self.bound[seed] = name
        data = self.adj[seed]
        if data["func"] is not None:  # torch.ones_like(loss); a grad= given by the user is a leaf
            code = printer.call(data["func"], data["args"], data["kwargs"], self._expr).text
            root_name = self.fwd[root]["name"]
            self.lines.append(Line(f"{name} = {code}", f"the seed: d{root_name}/d{root_name} = 1"))

    def _step(self, index: int, step: Any, position: int, later: int) -> None:
        source = step.source
        summed = self._adjoint(step.summed, f"the gradient of {self.fwd[source]['name']!r}")
        # the unnamed consumer's own gradient was inlined here: say which rules made it
        notes = self.pending.get(step.consumer, _NO_NOTES).then(self._note(step, position))
        needs_variable = self.fwd[source]["named"] or not step.first or later > 0
        if not needs_variable:  # an unnamed intermediate with one branch: inlined where it is used
            self.pending[source] = notes
            return
        note = notes.text()
        if source not in self.variables:
            self.variables[source] = self._grad_name(source)
        name = self.variables[source]
        if step.first:
            self._prepare(summed)
            alias = summed in self.bound or summed in self.forward_of
            if later and not alias and self.uses[summed] > 1:
                self._temp(summed)  # read elsewhere too: keep it, and sum into a copy
                alias = True
            if not alias:
                self.defining = (summed, name)
            expr = self._expr(summed) if alias else self._define(summed)
            self.defining = None
            self.contributions[index] = expr.text
            if not alias and expr.text == name:  # written in place in its variable: dprobs = ...; dprobs[0] = ...
                self.lines[-1] = Line(self.lines[-1].code, note, index)
                self.bound.setdefault(summed, name)
                return
            if later and (alias or step.summed._base is not None):
                code = f"{name} = {expr.wrap(PRIMARY)}.clone()"
                note += "; copied, since more branches are added below"
            else:
                code = f"{name} = {expr.text}"
                self.bound.setdefault(summed, name)
        else:
            branch = self._broadcast_source(summed, source)
            self._prepare(branch)
            expr = self._expr(branch)
            self.contributions[index] = expr.text
            code = f"{name} += {expr.text}"
            note += f"; branch through {self._branch_name(step.consumer)}"
            self.bound[self._adjoint(step.total, "a gradient sum")] = name
        self.lines.append(Line(code, note, index))

    def _header(self, consumer: int, root: int) -> None:
        data = self.fwd[consumer]
        if not (data["named"] or consumer == root) or data["func"] is None:
            return
        try:
            if data["inplace"]:
                text = printer.statement(self.graph, consumer)
            else:
                text = f"{identifier(data['name'])} = " + printer.expression(self.graph, consumer,
                                                                             self._forward_expr)
        except ValueError:  # a call with no source form (a fused node's replay): name its inputs
            inputs = ", ".join(identifier(self.fwd[i]["name"]) for i in dict.fromkeys(data["inputs"]))
            text = f"{identifier(data['name'])} = {data['op']}({inputs})"
        self.lines.append(Line(f"# {text}"))

    # ---------------------------------------------------------------- expressions

    def _expr(self, node: int) -> Expr:
        """Source for an adjoint node: its variable, a forward expression, or its call inlined."""
        if self.reading is not None and node == self.reading[0]:
            return Expr(self.reading[1])
        if node in self.bound:
            return Expr(self.bound[node])
        if node in self.forward_of:
            return self._forward_value(self.forward_of[node])
        data = self.adj[node]
        if data["func"] is None:
            raise ValueError(f"backward_source: the backward pass uses a tensor {data['name']!r} that is neither "
                             f"a forward value nor computed by a rule")
        if self._needs_variable(node):
            return Expr(self._temp(node))
        return self._call(node)

    def _needs_variable(self, node: int) -> bool:
        """Whether a computed node gets a variable wherever it is read: read more than once, or updated in place."""
        return self.uses[node] > 1 or (self.adj[node]["inplace"] and not self._inlinable_inplace(node))

    def _named(self, node: int) -> bool:
        """Whether :meth:`_expr` reads a node by a name (or a forward expression) rather than printing its call."""
        return (self.reading is not None and node == self.reading[0]) or node in self.bound or \
            node in self.forward_of or self.adj[node]["func"] is None

    def _prepare(self, root: int) -> None:
        """Write out, children first, the lines of what ``root``'s expression reads by a variable: temporaries
        read more than once, in-place updates, calls with several outputs read, and every single-use node whose
        inlined expression would nest :data:`printer.MAX_NESTING` calls. Printing ``root`` then recurses only
        through inlined calls, at most that deep, however long the chain (an RNN's steps, a 5,000-op chain)."""
        nesting: dict[int, int] = {}
        for node in printer.children_first(root, self._unnamed_inputs):
            if node == root or node in self.bound:
                continue  # (bound by a line written above: an in-place update binds what it updates)
            depth = 1 + max((nesting.get(i, 0) for i in self.adj[node]["inputs"]), default=0)
            if self._needs_variable(node) or depth >= printer.MAX_NESTING:
                self._temp(node)
                depth = 0
            elif self._multi_output(node):
                self._whole_call(node)
                depth = 1
            nesting[node] = depth

    def _unnamed_inputs(self, node: int) -> list[int]:
        if node in self.cross_entropy:  # written from forward values: the rule's own calls are not printed
            return []
        return [i for i in self.adj[node]["inputs"] if not self._named(i)]

    def _define(self, node: int) -> Expr:
        """The call computing a node, for its first assignment (an in-place update gets its own lines)."""
        if self.adj[node]["inplace"] and not self._inlinable_inplace(node):
            return Expr(self._temp(node))
        return self._call(node)

    def _call(self, node: int) -> Expr:
        data = self.adj[node]
        if data["op"] == "sum_to_size" and not data["kwargs"]:
            return self._sum_to_size(node)
        index = data["output_index"]
        if self._multi_output(node):
            return Expr(f"{self._whole_call(node)}[{index}]", PRIMARY)
        if node in self.cross_entropy:
            return self._cross_entropy(*self.cross_entropy[node])
        if self.textbook:
            formula = printer.textbook_formula(data["func"])
            if formula is not None and (index is None) == (formula.outputs == 1):
                built = self._formula(formula, data["args"], data["kwargs"])
                if index is None:
                    return built
                if index < len(built) and built[index] is not None:  # the one output of several read
                    return built[index]
        return printer.call(data["func"], data["args"], data["kwargs"], self._expr, output_index=index)

    def _formula(self, formula: printer.Formula, args: tuple, kwargs: dict) -> Any:
        """A fused kernel's call as its textbook formula; an argument the formula reads twice gets a variable
        first, unless it is a name already (``dp * p`` rather than an inlined gradient written out twice)."""
        for position in formula.repeats:
            arg = args[position] if position < len(args) else None
            if isinstance(arg, Ref) and not self._named(arg.node):
                self._temp(arg.node)
        return formula.build(lambda arg: printer.literal(arg, self._expr), *args, **kwargs)

    def _cross_entropy(self, consumer: int, found: tuple[Ref, Ref, str]) -> Expr:
        """``F.cross_entropy(logits, Yb)``'s gradient as the lecture writes it: ``(F.softmax(logits, 1) -
        F.one_hot(Yb, 27)) / 32 * dloss`` (without ``/ 32`` for ``reduction="sum"``); ``found``: the call's logits,
        target and reduction, as :func:`textbook_cross_entropy` read them."""
        logits, target, reduction = found
        n, classes = self.fwd[logits.node]["shape"]
        grad = self._expr(self._adjoint(self.trace.grads.by_node[consumer], "the loss's gradient"))
        text = (f"F.softmax({self._forward_value(logits.node)}, 1) - "
                f"F.one_hot({self._forward_value(target.node)}, {classes})")
        text = f"({text}) / {n}" if reduction == "mean" else f"({text})"
        return Expr(f"{text} * {grad.wrap(PRODUCT + 1)}", PRODUCT)

    def _multi_output(self, node: int) -> bool:
        """Whether a node is one of several outputs of a call that the code reads (see :meth:`_whole_call`)."""
        data = self.adj[node]
        return data["output_index"] is not None and bool(data["args"]) and self.outputs_read[id(data["args"])] > 1

    def _whole_call(self, node: int) -> str:
        """A call returning several tensors the code reads (a backward kernel's dx and dw): made once, in a
        variable its outputs are read from."""
        data = self.adj[node]
        key = id(data["args"])
        if key not in self.whole_calls:
            formula = printer.textbook_formula(data["func"]) if self.textbook else None
            if formula is not None and formula.outputs > 1:
                code = printer.outputs(self._formula(formula, data["args"], data["kwargs"])).text
            else:
                code = printer.call(data["func"], data["args"], data["kwargs"], self._expr).text
            self.whole_calls[key] = name = self._temp_name()
            self.lines.append(Line(f"{name} = {code}"))
        return self.whole_calls[key]

    def _temp(self, node: int) -> str:
        """Give a node a variable of its own (used more than once, or an in-place update)."""
        data = self.adj[node]
        if data["inplace"] and not self._inlinable_inplace(node):
            previous = data["previous"]
            name = self.bound.get(previous) if self.uses[previous] <= 1 else None
            if name is None:
                name = self._defining_name(node, previous) or self._temp_name()
                self.lines.append(Line(f"{name} = {self._expr(previous).text}"))
                self.bound[previous] = name
            self.lines.append(Line(printer.call(data["func"], data["args"], data["kwargs"], self._expr,
                                                statement=True).text))
            self.bound[node] = name
            return name
        code = self._call(node).text  # first, so temporaries it needs are numbered before it
        name = self._gradient_temp_name(node) or self._temp_name()
        self.lines.append(Line(f"{name} = {code}"))
        self.bound[node] = name
        return name

    def _defining_name(self, node: int, previous: int) -> str | None:
        """The gradient variable an in-place update is the definition of, when what it updates is fresh (its
        zeros read nowhere else): ``dprobs = torch.zeros_like(probs)``, then ``dprobs[0] = ...``."""
        if self.defining is None or self.defining[0] != node or self.uses[previous] > 1:
            return None
        return self.defining[1]

    def _inlinable_inplace(self, node: int) -> bool:
        """``torch.zeros_like(x).index_put_(...)``: an in-place method on a fresh, unshared tensor."""
        data = self.adj[node]
        previous = data["previous"]
        return data["op"] != "setitem" and previous is not None and previous not in self.bound and \
            self.uses[previous] == 1 and self.adj[previous]["func"] is not None

    def _sum_to_size(self, node: int) -> Expr:
        """Broadcast-undo as the lecture writes it: ``.sum(0)``, ``.sum(1, keepdim=True)``."""
        data = self.adj[node]
        source = data["args"][0]
        shape_in = self.adj[source.node]["shape"]
        shape_out = data["shape"]
        lead = len(shape_in) - len(shape_out)
        kept = [lead + i for i, size in enumerate(shape_out) if size == 1 and shape_in[lead + i] != 1]
        receiver = self._expr(source.node).wrap(PRIMARY)
        if kept and lead == 0:
            return Expr(f"{receiver}.sum({_dims(kept)}, keepdim=True)", PRIMARY)
        if lead and not kept:
            return Expr(f"{receiver}.sum({_dims(list(range(lead)))})", PRIMARY)
        return printer.call(data["func"], data["args"], data["kwargs"], self._expr)

    def _broadcast_source(self, node: int, source: int) -> int:
        """``dx += g.expand(shape)`` is ``dx += g``: in-place addition broadcasts by itself."""
        data = self.adj[node]
        if data["op"] == "expand" and node not in self.bound and self.uses[node] <= 1 and \
                tuple(data["shape"]) == tuple(self.fwd[source]["shape"]):
            return data["args"][0].node
        return node

    def _forward_expr(self, node: int) -> Expr:
        """A forward value in the user's terms, for headers: unnamed intermediates written out in full, up to
        :data:`printer.MAX_NESTING` calls deep (a deeper one by its op-based name)."""
        cache, nesting = self.forward_cache, self.forward_nesting
        for n in printer.children_first(node, self._forward_inputs):  # children first: no recursion
            if n in cache:
                continue
            expr = self._forward_call(n, self._forward_expr)
            depth = 1 + max((nesting.get(i, 0) for i in self.fwd[n]["inputs"]), default=0)
            if expr is None or depth >= printer.MAX_NESTING:
                expr, depth = Expr(self._forward_name(n)), 0
            cache[n], nesting[n] = expr, depth
        return cache[node]

    def _forward_inputs(self, node: int) -> list[int]:
        """The inputs a header writes out for a node not written out yet: an unnamed intermediate's."""
        data = self.fwd[node]
        if node in self.forward_cache or data["named"] or data["kind"] != "op" or data["inplace"] \
                or data["func"] is None:
            return []
        return [i for i in data["inputs"] if i not in self.forward_cache]

    def _forward_value(self, node: int) -> Expr:
        """A forward value read by the backward code: its name, or a short expression of named tensors.

        ``logits.max(1, keepdim=True).indices`` and ``bnvar + 1e-05`` read better than
        ``max_1`` and ``add_1``; deeper chains are referred to by their op-based names.
        """
        data = self.fwd[node]
        shallow = all(self.fwd[i]["named"] or self.fwd[i]["kind"] != "op" for i in data["inputs"])
        expr = self._forward_call(node, lambda i: Expr(self._forward_name(i))) if shallow else None
        return expr if expr is not None and len(expr.text) <= 60 else Expr(self._forward_name(node))

    def _forward_call(self, node: int, name: Any) -> Expr | None:
        data = self.fwd[node]
        if data["named"] or data["kind"] != "op" or data["inplace"] or data["func"] is None:
            return None
        try:
            return printer.call(data["func"], data["args"], data["kwargs"], name, output_index=data["output_index"])
        except ValueError:
            return None

    def _forward_name(self, node: int) -> str:
        return identifier(self.fwd[node]["name"])

    # ---------------------------------------------------------------- bookkeeping

    def _count_uses(self) -> None:
        """How many times each needed adjoint node is read (inlining needs exactly one)."""
        needed: set[int] = set()
        stack = [self._adjoint(step.summed, "a gradient") for step in self.trace.steps]
        stack += [self._adjoint(step.total, "a gradient") for step in self.trace.steps]
        while stack:
            node = stack.pop()
            if node in needed:
                continue
            needed.add(node)
            stack.extend(self.adj[node]["inputs"])
        self.uses: Counter[int] = Counter()
        for node in needed:
            self.uses.update(self.adj[node]["inputs"])
        # (a call's outputs share its recorded arguments)
        self.outputs_read = Counter(id(self.adj[node]["args"]) for node in needed
                                    if self.adj[node]["output_index"] is not None and self.adj[node]["args"])
        self.whole_calls: dict[int, str] = {}

    def _adjoint(self, tensor: Tensor, what: str) -> int:
        node = self.trace.node_of(tensor)
        if node is None:
            raise ValueError(f"backward_source: {what} was computed outside the recorded backward pass")
        return node

    def _position(self, consumer: int, source: int, seen: Counter) -> int:
        """Which argument of the consumer this step is for (``x * x`` sends two)."""
        data = self.fwd[consumer]
        positions = [i for i, arg in enumerate(data["bargs"]) if _refers_to(arg, source)]
        k = seen[(consumer, source)]
        seen[(consumer, source)] += 1
        return positions[k] if k < len(positions) else (positions[-1] if positions else 0)

    def _note(self, step: Any, position: int) -> str:
        data = self.fwd[step.consumer]
        notes = rule_notes(data)
        note = notes[position] if position < len(notes) and notes[position] else (notes[0] if notes else "rule")
        if self.textbook:  # the kernel is written out as its formula
            note = note.replace(", in torch's fused kernel", "").replace(", in torch's kernel", "")
        text = f"{data['op']}: {note}" if data.get("rule") is None else f"{data['op']}: its own (fused) rule"
        if step.summed is not step.grad:
            text += f"; broadcast-undo: sum to {tuple(self.fwd[step.source]['shape'])}"
        return text

    def _branch_name(self, consumer: int) -> str:
        """The user's name for a branch: the consumer, or the first named tensor computed from it."""
        return branch_name(self.graph, consumer)

    def _grad_name(self, node: int) -> str:
        name = "d" + identifier(self.fwd[node]["name"])
        if name in self.used_names:
            name = "grad_" + identifier(self.fwd[node]["name"])
        self.used_names.add(name)
        return name

    def _gradient_temp_name(self, node: int) -> str | None:
        """``dadd_1`` for the gradient of an unnamed forward tensor, so the code says what it holds."""
        if not hasattr(self, "_grad_of"):
            self._grad_of = {}
            for forward, grad in self.trace.grads.by_node.items():
                adjoint = self.trace.node_of(grad)
                if adjoint is not None:
                    self._grad_of.setdefault(adjoint, forward)
        forward = self._grad_of.get(node)
        if forward is None or forward in self.variables:
            return None
        name = self._grad_name(forward)
        self.variables[forward] = name
        return name

    def _temp_name(self) -> str:
        while True:
            self.temp_count += 1
            name = f"tmp{self.temp_count}"
            if name not in self.used_names:
                self.used_names.add(name)
                return name


def branch_name(graph: Graph, consumer: int) -> str:
    """Name a branch of the graph after its consumer, or the nearest named tensor computed from it."""
    nodes = graph._nodes
    frontier = [consumer]
    seen = set()
    while frontier:
        node = min(frontier)
        frontier.remove(node)
        if nodes[node]["named"]:
            return nodes[node]["name"]
        seen.add(node)
        frontier.extend(n for n in graph.nx.successors(node) if n not in seen and n not in frontier)
    return nodes[consumer]["name"]


def _refers_to(arg: Any, node: int) -> bool:
    if isinstance(arg, Ref):
        return arg.node == node
    if isinstance(arg, (tuple, list)):
        return any(_refers_to(a, node) for a in arg)
    return False


class _Notes(NamedTuple):
    """The notes of the rules a line inlines, in order: all of them, up to _NOTES_ALL; of a longer chain (2,000
    ops inlined through unnamed intermediates), its first and last _NOTES_KEPT, in constant space per step."""

    first: tuple[str, ...]  # the first _NOTES_ALL notes
    last: tuple[str, ...]  # the last _NOTES_KEPT notes
    count: int

    def then(self, note: str) -> _Notes:
        first = self.first if len(self.first) == _NOTES_ALL else (*self.first, note)
        return _Notes(first, (*self.last, note)[-_NOTES_KEPT:], self.count + 1)

    def text(self) -> str:
        if self.count <= len(self.first):
            return ", then ".join(self.first)
        hidden = self.count - 2 * _NOTES_KEPT
        return ", then ".join([*self.first[:_NOTES_KEPT], f"{hidden} more rules", *self.last])


_NOTES_ALL = 24  # a comment names every rule of a chain up to this long
_NOTES_KEPT = 6  # and of a longer one, the first and last six
_NO_NOTES = _Notes((), (), 0)


def textbook_cross_entropy(forward: list[dict], consumer: int, source: int | None = None
                            ) -> tuple[Ref, Ref, str] | None:
    """``(logits, target, reduction)`` of a recorded ``F.cross_entropy`` whose gradient is the lecture's
    ``(softmax(logits) - onehot(target)) / n``: 2-d logits, one class index in range per row (none ignored),
    no weight, no label smoothing, mean or sum; and ``source``, when given, is its logits. None otherwise."""
    data = forward[consumer]
    if data["func"] is not F.cross_entropy:
        return None
    try:
        call = inspect.signature(F.cross_entropy).bind(*data["args"], **data["kwargs"])
    except TypeError:
        return None
    call.apply_defaults()
    options = call.arguments
    logits, target = options["input"], options["target"]
    if not isinstance(logits, Ref) or not isinstance(target, Ref) or (source is not None and logits.node != source):
        return None
    if options["weight"] is not None or options["label_smoothing"] or options["size_average"] is not None or \
            options["reduce"] is not None or options["reduction"] not in ("mean", "sum"):
        return None
    x, y = forward[logits.node]["value"], forward[target.node]["value"]
    if x.dim() != 2 or not x.is_floating_point() or y.shape != x.shape[:1] or y.is_floating_point() or \
            y.is_complex() or y.dtype == torch.bool or not len(y) or not bool(((y >= 0) & (y < x.shape[1])).all()):
        return None
    if bool((y == options["ignore_index"]).any()):  # an ignored row gets no gradient, and counts for no n
        return None
    return logits, target, options["reduction"]


def _dims(dims: list[int]) -> str:
    return str(dims[0]) if len(dims) == 1 else "(" + ", ".join(map(str, dims)) + ")"


__all__ = ["BackwardSource", "CALL_NOTES", "Line", "RULE_NOTES", "backward_source", "branch_name",
           "generate", "run", "textbook_cross_entropy"]
