"""Compare the engine's gradients with torch autograd's, row by row: the lecture's ``cmp`` table.

The recorded graph is replayed under torch autograd: leaves and constants are fresh
leaves holding the recorded values, every op is called again with the same torch
function, and every intermediate retains its gradient; the user's gradient hooks are registered on the
replayed tensors (so a hook runs twice: for the engine and for torch). Each named float tensor then gets
one row: exact (bit-equal), approximate (allclose), maxdiff, and the distance in units in
the last place. An inexact row says why in one line: an upstream gradient was already
off, or this op's gradient is rounded differently from torch's kernel.

The verdict (``Row.ok``, ``CompareReport.ok``) allows, on top of allclose, what float rounding
alone can give where terms cancel (the allowance ``graph.check`` uses, ``tensorgraph.rounding``):
behind a batch norm at batch size 2 the input's gradient is a sum of terms of size ~0.1 that
cancel, and the engine's value and torch's are both rounding noise of ~eps * 0.1, beyond
allclose's atol. A row beyond that is ``NOT OK``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .graph import is_float, substitute
from .rounding import close, rounding_noise

if TYPE_CHECKING:
    from .graph import Graph


NAME_WIDTH = 15  # the name column's least width; longer names widen the whole table
RTOL, ATOL = 1e-5, 1e-8  # torch.allclose's defaults: the lecture's cmp


@dataclass
class Row:
    """One tensor's comparison."""

    name: str
    shape: tuple[int, ...]
    exact: bool
    approximate: bool
    maxdiff: float
    ulps: int
    reason: str = ""
    within_rounding: bool = False  # not allclose, but each element within what rounding alone can give

    @property
    def ok(self) -> bool:
        """Within allclose of torch autograd's gradient, or beyond it only by rounding where terms cancel."""
        return self.approximate or self.within_rounding

    def __str__(self) -> str:
        return self.line(NAME_WIDTH)

    def line(self, width: int) -> str:
        """The row with its name padded to ``width`` (the table's longest name)."""
        line = (f"{self.name:{width}s} | exact: {str(self.exact):5s} | approximate: {str(self.approximate):5s} | "
                f"maxdiff: {self.maxdiff:<10.3g} | ulps: {_ulps_text(self.ulps)}")
        return line + (f" | {self.reason}" if self.reason else "")


@dataclass
class CompareReport:
    """The table printed by ``print(graph.compare(loss))``."""

    rows: list[Row]
    loss: str
    # named tensors without a gradient, each with the argument without a derivative on its way (engine.Gradients)
    incomplete: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every gradient is within allclose of torch autograd's, or beyond it only by rounding (see Row.ok)."""
        return all(row.ok for row in self.rows)

    @property
    def exact_count(self) -> int:
        return sum(row.exact for row in self.rows)

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def __getitem__(self, name: str) -> Row:
        return self.row(name)

    def __str__(self) -> str:
        header = (f"gradients of {self.loss!r}: tensorgraph engine vs torch autograd "
                  f"({self.exact_count}/{len(self.rows)} exact, "
                  f"{sum(r.approximate for r in self.rows)}/{len(self.rows)} approximate")
        rounded = sum(r.within_rounding for r in self.rows)
        header += f", {rounded} more within rounding)" if rounded else ")"
        wrong = [r.name for r in self.rows if not r.ok]
        if wrong:
            header += f"; NOT OK: {', '.join('d' + name for name in wrong)}"
        width = max([NAME_WIDTH] + [len(row.name) for row in self.rows])
        return "\n".join([header] + [row.line(width) for row in self.rows] + self._incomplete_lines())

    def _incomplete_lines(self) -> list[str]:
        if not self.incomplete:
            return []
        why = next(iter(self.incomplete.values()))
        return [f"no gradient, on either side, for {', '.join(self.incomplete)}: {self.loss!r} depends on them "
                f"through {why}"]

    def _repr_markdown_(self) -> str:
        title = f"**{self.loss}**: {self.exact_count}/{len(self.rows)} exact"
        wrong = ", ".join(f"d{r.name}" for r in self.rows if not r.ok)
        lines = [title + (f"; **NOT OK**: {wrong}" if wrong else ""), "",
                 "| tensor | shape | exact | approximate | maxdiff | ulps | note |", "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.name} | {'×'.join(map(str, r.shape))} | {r.exact} | {r.approximate} | "
                         f"{r.maxdiff:.3g} | {_ulps_text(r.ulps)} | {r.reason} |")
        return "\n".join(lines + ["", *self._incomplete_lines()] if self.incomplete else lines)


def replay(graph: Graph, root: int, differentiable: Collection[int] | None = None) -> dict[int, Tensor]:
    """Re-run the graph's ops under torch autograd; every float tensor retains its gradient.

    ``differentiable``: the leaves and constants that require grad (default: every float one).
    torch refuses some (batch norm's running statistics, a loss's class weights).
    """
    from .engine import gradient_hooks

    nodes = graph._nodes
    needed = graph.ancestors(root)
    values: dict[int, Tensor] = {}
    results: dict[int, Any] = {}
    hooks = gradient_hooks(graph, root) or {}  # the user's tensor hooks, on the replayed versions they were on

    with torch.enable_grad():
        for node in sorted(needed):
            data = nodes[node]
            if data["kind"] != "op" or not is_float(data):
                leaf = data["value"].detach().clone()
                wanted = is_float(data) and (differentiable is None or node in differentiable)
                values[node] = leaf.requires_grad_() if wanted else leaf
                _register(values[node], hooks.get(node))
                continue
            args = tuple(substitute(a, values) for a in data["args"])
            kwargs = {k: substitute(v, values) for k, v in data["kwargs"].items()}
            if data["op"] == "no_grad_update":
                out = _NoGradUpdate.apply(values[data["previous"]], _updated(data, values))
            elif data["inplace"]:
                target = args[0].clone()  # autograd forbids in-place updates of leaves
                data["func"](target, *args[1:], **kwargs)
                out = target
            elif data["output_index"] is not None:  # one call, several output nodes
                key = id(data["args"])
                if key not in results:
                    results[key] = data["func"](*args, **kwargs)
                out = results[key][data["output_index"]]
            else:
                out = data["func"](*args, **kwargs)
            if not out.requires_grad and (differentiable is None or node in differentiable):
                # a float tensor made from no float input (a mask or one-hot cast: (t != pad).float()): torch
                # tracks nothing into it, the engine gives it a gradient as it gives a constant, so it is a leaf
                out = out.detach().requires_grad_()
            if out.requires_grad:
                out.retain_grad()
                _register(out, hooks.get(node))
            values[node] = out
    return values


def _updated(data: dict[str, Any], values: dict[int, Tensor]) -> Tensor:
    """The value a no_grad in-place update (or ``out=``) gave: the call made again on a copy of the old value."""
    copy = values[data["previous"]].detach().clone()
    inputs = {**values, data["previous"]: copy}
    with torch.no_grad():
        args = tuple(substitute(a, inputs) for a in data["args"])
        kwargs = {k: substitute(v, inputs) for k, v in data["kwargs"].items()}
        data["func"](*args, **kwargs)
    return copy


class _NoGradUpdate(torch.autograd.Function):
    """A tensor updated under torch.no_grad(), as torch autograd sees it: the new value, with the old history.

    torch keeps one autograd tensor for both versions (the gradient passes through the update unchanged); a
    separate node here gives each version its own gradient, as the engine's rows have them.
    """

    @staticmethod
    def forward(ctx: Any, previous: Tensor, updated: Tensor) -> Tensor:
        return updated.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _register(tensor: Tensor, hooks: list | None) -> None:
    """Register the recorded tensor's gradient hooks on its replayed copy, in their order."""
    if hooks and tensor.requires_grad:
        for hook in hooks:
            tensor.register_hook(hook)


ULPS_CAP = 1 << 62  # what _ulps gives for values of opposite signs far apart (float64's distance would wrap)


def _ulps_text(ulps: int) -> str:
    """A row's ulps as printed: the cap says what it means (a gradient near zero, its signs differing)."""
    return ">= 2**62 (signs differ)" if ulps >= ULPS_CAP else str(ulps)


_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _ulps(a: Tensor, b: Tensor) -> int:
    """Largest distance between a and b in units in the last place of their dtype (capped at 2**62)."""
    if a.numel() == 0 or not a.is_floating_point():
        return 0
    b = b.to(a.dtype)
    ints = _SAME_SIZE_INT[a.element_size()]
    magnitude = (1 << (8 * a.element_size() - 1)) - 1
    # the bit patterns, reordered so that consecutive floats are consecutive integers (negatives mirrored)
    ordered_a, ordered_b = a.view(ints).long(), b.view(ints).long()
    ordered_a = torch.where(ordered_a < 0, -(ordered_a & magnitude), ordered_a)
    ordered_b = torch.where(ordered_b < 0, -(ordered_b & magnitude), ordered_b)
    # subtracted as integers (a double would round float64 distances to multiples of 2**10); a distance
    # beyond 2**62 (only values of opposite signs far apart) may wrap in int64: the double says which
    far = (ordered_a.double() - ordered_b.double()).abs() >= 2.0**62
    diff = torch.where(far, ULPS_CAP, (ordered_a - ordered_b).abs())
    return int(diff.max().item())


def compare(graph: Graph, loss: Any, grad: Tensor | None = None) -> CompareReport:
    """See the module docstring; one row per named float tensor the loss depends on."""
    from .engine import backward, require_values, root_node, seed_gradient

    root = root_node(graph, loss, "graph.compare")
    seed = seed_gradient(graph, root, grad, "graph.compare")
    require_values(graph, root, "graph.compare")
    gradients = backward(graph, root, grad)
    ours = gradients.by_node
    values = replay(graph, root, differentiable=ours)  # only where the engine has a gradient
    values[root].backward(seed)
    noise: dict[int, Tensor] | None = None  # the rounding allowances, computed once a row needs them
    nodes = graph._nodes
    status: dict[int, Row] = {}
    for node in sorted(ours, reverse=True):
        data = nodes[node]
        theirs = values[node].grad
        mine = ours[node]
        if theirs is None:
            theirs = torch.zeros_like(mine)
        same_shape = mine.shape == theirs.shape
        exact = same_shape and bool(torch.equal(mine, theirs))
        approximate = same_shape and bool(torch.allclose(mine, theirs, rtol=RTOL, atol=ATOL))
        rounded = False
        if same_shape and not approximate:
            noise = _allowances(graph, root, ours) if noise is None else noise
            rounded = _within_rounding(mine, theirs, noise.get(node))
        maxdiff = (mine - theirs).abs().max().item() if same_shape and mine.numel() else 0.0
        ulps = _ulps(mine, theirs) if same_shape else -1
        status[node] = Row(data["name"], data["shape"], exact, approximate, maxdiff, ulps, within_rounding=rounded)
    broken = None
    if not all(math.isfinite(row.maxdiff) for row in status.values()):
        from .check import nonfinite_forward

        broken = nonfinite_forward(graph, root)
    for node, row in status.items():
        if not row.exact and node != root:
            row.reason = broken if broken and not math.isfinite(row.maxdiff) else _reason(graph, node, status)
    rows = [status[node] for node in sorted(status, reverse=True) if node != root and nodes[node]["named"]]
    incomplete = {nodes[node]["name"]: why for node, why in sorted(gradients.incomplete.items(), reverse=True)
                  if nodes[node]["named"]}
    return CompareReport(rows, nodes[root]["name"], incomplete)


def _allowances(graph: Graph, root: int, ours: dict[int, Tensor]) -> dict[int, Tensor]:
    """Per node, what rounding alone can move its gradient by; none at or below a gradient hook.

    The magnitude pass runs the rules without the user's hooks, so below a hook (which may scale or
    replace the gradient) its sums say nothing: those rows are judged by allclose alone.
    """
    from .engine import gradient_hooks

    with torch.no_grad():  # (recorded parameters may require grad: nothing here is differentiated)
        noise = rounding_noise(graph, root, ours)
    for hooked in gradient_hooks(graph, root) or ():
        for node in graph.ancestors(hooked):
            noise.pop(node, None)
    return noise


def _within_rounding(mine: Tensor, theirs: Tensor, noise: Tensor | None) -> bool:
    """Every element within allclose of torch's, or within what rounding can give where terms cancelled."""
    if noise is None or not mine.is_floating_point():
        return False
    allowance = noise.to(theirs.dtype) if noise.shape == theirs.shape else float(noise.max())
    return bool(close(mine, theirs, allowance, RTOL, ATOL).all())


def _reason(graph: Graph, node: int, status: dict[int, Row]) -> str:
    """One line on why a gradient is not bit-equal to torch's, and, when it is beyond rounding, that it is not ok."""
    nodes = graph._nodes
    row = status[node]
    consumers = [n for n in graph.nx.successors(node) if n in status]
    if row.ulps < 0:
        return "NOT OK: torch's gradient has another shape"
    if not row.ok:
        wrong = [n for n in consumers if not status[n].ok]
        if wrong:
            return f"NOT OK: inherits the error of d{nodes[max(wrong, key=lambda n: status[n].ulps)]['name']}"
        users = ", ".join(sorted({nodes[n]["op"] for n in consumers}))
        return f"NOT OK: beyond rounding; the {users} rule disagrees with torch's"
    prefix = "within rounding where terms cancel; " if row.within_rounding else ""
    upstream = [n for n in consumers if not status[n].exact]
    if upstream:
        worst = max(upstream, key=lambda n: status[n].ulps)
        there = "its signs differ there" if status[worst].ulps >= ULPS_CAP else f"{status[worst].ulps} ulp there"
        return prefix + f"inherits rounding from d{nodes[worst]['name']} ({there})"
    if len(consumers) > 2:
        return prefix + f"sums {len(consumers)} branches in a different order than torch"
    users = ", ".join(sorted({nodes[n]["op"] for n in consumers}))
    return prefix + f"the {users} rule rounds differently from torch's kernel"
