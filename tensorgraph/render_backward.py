"""The backward view: the adjoint graph the engine runs, grouped by the forward op each part differentiates.

``tg.trace(graph, loss)`` records the backward pass as a graph of its own. This module
draws it so that the lecture's two rules can be seen:

* each forward op's rule is a cluster labelled with that op (``bnraw = bndiff * bnvar_inv``)
  holding the ops the rule ran;
* broadcast-undo is an explicit sum box (``sum dim=0: 32×64 → 1×64``);
* a tensor used by several ops gets its gradient from an explicit accumulation box
  (``+= from 2 consumers``; ``+= from 2 uses in z`` for ``z = x * x``), fed by one partial gradient per
  consumer.

Gradients are named the lecture's way (``dhprebn``); forward values a rule reads are not
drawn as boxes but named in the expression that uses them (``dprobs * counts``).

A fused backward kernel the engine calls is one box (``tanh_backward(dh, h)``), as the engine runs it.
``textbook=True`` draws the handout instead, as ``graph.backward_source(loss, textbook=True)`` prints it:
each such box is labelled with its formula (``(1 - h**2) * dh``), and an ``F.cross_entropy`` that ignores
no target and has no weight or label smoothing is drawn as the lecture's ``(softmax(logits) -
one_hot(Yb)) / n * dloss`` rather than the engine's general closed form.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import printer
from .codegen import textbook_cross_entropy
from .graph import Ref
from .render import (
    COLORS,
    Box,
    Drawing,
    call_names,
    cluster_mode,
    cluster_path,
    definition,
    distances,
    expression,
    function_of_call,
    grad_summary,
    name_row,
    op_row,
    shape_text,
    small_row,
    status_rows,
    statuses,
    value_summary,
)

if TYPE_CHECKING:
    from .engine import BackwardTrace
    from .graph import Graph
    from .render import _Options


# a gradient passed on unchanged to several tensors (``d = e + c``: dd, de and dc are one tensor) is one box;
# its name row lists this many of their names
_NAMES_SHOWN = 4


def backward_drawing(graph: Graph, options: _Options) -> Drawing:
    """Boxes for the adjoint graph's ops, clustered by the forward op whose rule made them."""
    from .engine import traced

    rules = _textbook_rules(graph, options.root) if options.textbook else None
    tr = traced(graph, options.root, _seed(graph, options), "render", rules)
    return _Backward(graph, tr, options).draw()


def _textbook_rules(graph: Graph, root: int) -> dict[int, Callable]:
    """The lecture's rule for each ``F.cross_entropy`` the loss depends on whose gradient is ``(softmax(logits)
    - one_hot(Yb)) / n`` (no target ignored, no weight, no label smoothing: see
    :func:`tensorgraph.codegen.textbook_cross_entropy`)."""
    rules = {}
    for node in graph.ancestors(root) | {root}:
        found = textbook_cross_entropy(graph._nodes, node)
        if found is not None:
            rules[node] = _cross_entropy_rule(graph, node, *found)
    return rules


def _cross_entropy_rule(graph: Graph, node: int, logits: Ref, target: Ref, reduction: str) -> Callable:
    """``dlogits = (F.softmax(logits, 1) - F.one_hot(Yb, classes)) / n * dloss`` (no ``/ n`` for a sum), run on
    the recorded logits and targets; in the rule's result at the logits' argument position."""
    x, y = graph._nodes[logits.node]["value"], graph._nodes[target.node]["value"]
    n, classes = x.shape
    positions = [isinstance(arg, Ref) and arg.node == logits.node for arg in graph._nodes[node]["bargs"]]

    def rule(g: torch.Tensor, *_: Any, **__: Any) -> tuple[torch.Tensor | None, ...]:
        diff = F.softmax(x, 1) - F.one_hot(y, classes)
        grad = (diff / n if reduction == "mean" else diff) * g
        return tuple(grad if at else None for at in positions)

    return rule


def _seed(graph: Graph, options: _Options) -> torch.Tensor | None:
    """The seed to replay: None (ones) for a scalar loss seeded with 1, as graph.backward does."""
    seed = options.seed
    if seed is None or (seed.numel() == 1 and (seed.is_meta or bool(seed.eq(1).all()))):
        return None
    return seed


class _Backward:
    def __init__(self, graph: Graph, tr: BackwardTrace, options: _Options) -> None:
        self.graph, self.tr, self.options = graph, tr, options
        self.fwd, self.adj = graph._nodes, tr.adjoint._nodes
        self.seed = tr.node_of(tr.grads.by_node[options.root])
        self.final: dict[int, list[int]] = {}  # adjoint node -> forward nodes whose gradient it is
        for node, grad in tr.grads.by_node.items():
            holder = tr.node_of(grad)
            if holder is not None:
                self.final.setdefault(holder, []).append(node)
        self.owner = self._owners()
        self.calls: dict[tuple, tuple[str, ...]] | None = None  # the clusters of function calls (cluster="function")
        self.partial: dict[int, tuple[int, int]] = {}  # adjoint node -> (forward source, consumer)
        self.accumulation: dict[int, tuple[int, int, int, int]] = {}  # -> (source, k, n, consumer)
        self.consumers: dict[int, set[int]] = {}  # forward source -> the ops its branches come from
        self.part_of_use: dict[int, tuple[int, int]] = {}  # partial -> (k, uses): x's k-th use in z = x * x
        self._contributions()
        self.hidden = {a for a, data in enumerate(self.adj) if data["kind"] == "leaf" and a != self.seed}
        self.hidden |= {a for a in range(len(self.adj)) if self.seed is not None and a < self.seed}
        self.unused = {a for a, data in enumerate(self.adj) if data["kind"] == "op" and a not in self.final
                       and a not in self.accumulation and tr.adjoint.nx.out_degree(a) == 0}
        referenced = {self.adj[a]["name"] for a in self.hidden}
        self.primed = {a for a, data in enumerate(self.adj)
                       if a not in self.hidden and a not in self.final and data["name"] in referenced}

    # ------------------------------------------------------------------ structure

    def _owners(self) -> dict[int, int]:
        """Each adjoint node -> the forward op whose rule (or whose inputs' accumulation) made it.

        The engine runs one forward op at a time: its rule's ops, then the broadcast-undo
        and accumulation of each input's gradient. Node ids are creation order, so each
        op's share of the adjoint graph is the id range up to its last contribution.
        """
        owner: dict[int, int] = {}
        start = end = self.seed if self.seed is not None else -1
        current = None
        for step in self.tr.steps:
            if step.consumer != current:
                if current is not None:
                    owner.update(dict.fromkeys(range(start + 1, end + 1), current))
                    start = end
                current = step.consumer
            for tensor in (step.grad, step.summed, step.total):
                node = self.tr.node_of(tensor)
                if node is not None:
                    end = max(end, node)
        if current is not None:
            owner.update(dict.fromkeys(range(start + 1, end + 1), current))
        return owner

    def _contributions(self) -> None:
        counts = Counter(step.source for step in self.tr.steps)
        uses = Counter((step.source, step.consumer) for step in self.tr.steps)
        seen: Counter[int] = Counter()
        seen_use: Counter[tuple[int, int]] = Counter()
        for step in self.tr.steps:
            seen[step.source] += 1
            seen_use[step.source, step.consumer] += 1
            self.consumers.setdefault(step.source, set()).add(step.consumer)
            summed = self.tr.node_of(step.summed)
            if counts[step.source] > 1 and summed is not None:
                self.partial.setdefault(summed, (step.source, step.consumer))
                if uses[step.source, step.consumer] > 1:
                    self.part_of_use.setdefault(summed, (seen_use[step.source, step.consumer],
                                                         uses[step.source, step.consumer]))
            if not step.first:
                total = self.tr.node_of(step.total)
                if total is not None:
                    self.accumulation[total] = (step.source, seen[step.source], counts[step.source], step.consumer)

    # ------------------------------------------------------------------ names

    def gradient_names(self, a: int) -> list[str]:
        """The names of the gradients adjoint node ``a`` is: ``["dd", "de", "dc"]`` when an add passed ``dd`` on
        unchanged to ``e`` and ``c`` (the user's names only, when there are any)."""
        forward = self.final[a]
        named = [node for node in forward if self.fwd[node]["named"]] or forward[:1]
        return ["d" + self.fwd[node]["name"] for node in named]

    def name(self, a: int) -> str:
        """Display name: ``dhprebn`` for gradients (the first of several: the name an expression uses), else the
        adjoint's own."""
        if a in self.final:
            return self.gradient_names(a)[0]
        name = self.adj[a]["name"]
        return name + "′" if a in self.primed else name

    def forward_name(self, node: int) -> str:
        return self.fwd[node]["name"]

    # ------------------------------------------------------------------ drawing

    def draw(self) -> Drawing:
        options = self.options
        mode = cluster_mode(self.graph, options.cluster)
        self.calls = call_names(self.graph) if mode == "function" else None
        drawing = Drawing(functions=function_of_call(self.calls) if self.calls else {})
        near = distances(self.graph, [options.root], options.depth) if options.depth is not None else None
        status = statuses(self.graph, options)
        shown: set[int] = set()
        for a, data in enumerate(self.adj):
            if a in self.hidden or not self._within(a, near):
                continue
            shown.add(a)
            box = self._box(a, data, status)
            box.cluster = self._cluster(a, mode, drawing)
            drawing.add(box, legend=self._legend_text(a, box.fill, status))
        for a in sorted(shown):
            for source in self.adj[a]["inputs"]:
                if source in shown:
                    drawing.edge(f"a{source}", f"a{a}")
        self._name_empty_clusters(mode, drawing, near)
        if near is not None:
            self._mark_cut(drawing, shown, near)
        loss = self.fwd[options.root]["name"]
        drawing.title = (f"backward pass of {loss}: {len(self.tr.grads)} gradients, "
                         f"{sum(1 for a in shown if self.adj[a]['kind'] == 'op')} ops")
        return drawing

    def _within(self, a: int, near: dict[int, int] | None) -> bool:
        if near is None or a == self.seed:
            return True
        depth = self.options.depth
        if a in self.accumulation:
            source = self.accumulation[a][0]
            return near.get(source, depth + 1) <= depth
        consumer = self.owner.get(a)
        return consumer is not None and near.get(consumer, depth + 1) < depth

    def _box(self, a: int, data: dict[str, Any], status: dict[int, tuple[str, str]]) -> Box:
        rows, fill = self._top_rows(a, data)
        rows.append(self._name_row(a, data))
        if a in self.final and a in self.partial:  # passed on unchanged (add, sub): also one branch of another
            source, consumer = self.partial[a]
            rows.append(small_row(f"also the part of d{self.forward_name(source)} from {self.forward_name(consumer)}"))
        if self.options.values:
            rows.append(small_row(value_summary(data["value"])))
        forward = self.final.get(a, [])
        if self.options.grads is not None and forward:
            rows.append(small_row(grad_summary(data["value"]), "#7f3f00"))
        found = next((status[node] for node in forward if node in status), None)
        rows += status_rows(found)
        if found is not None:
            fill = COLORS[found[0]]
        attrs = {"style": "filled,dashed"} if data["kind"] == "constant" else {}
        if a in self.unused:  # the rule computed it for an input that is a plain number: nobody reads it
            attrs = {"style": "rounded,filled,dotted", "fontcolor": "#888888"}
        return Box(f"a{a}", rows, fill, tooltip=self._tooltip(a, data),
                   summary=f"{self.name(a)} {shape_text(data['shape'])}", is_op=data["kind"] == "op", attrs=attrs,
                   result=a in self.final and self.tr.adjoint.nx.out_degree(a) == 0)  # a gradient the pass ends with

    def _top_rows(self, a: int, data: dict[str, Any]) -> tuple[list[str], str]:
        """The op row (what made this tensor) and the box's colour."""
        if a == self.seed:
            what = expression(data, self.name) if data["kind"] != "leaf" else "the grad= given"
            return [op_row(f"seed: {what}")], COLORS["seed"]
        if a in self.accumulation:
            source, k, n, consumer = self.accumulation[a]
            return [op_row(self._accumulation_text(source, k, n, consumer))], COLORS["fan-out +="]
        if data["op"] == "sum_to_size" and data["inputs"]:
            before = self.adj[data["inputs"][0]]["shape"]
            return [op_row(f"{_sum_dims(before, data['shape'])}: {shape_text(before)} → "
                           f"{shape_text(data['shape'])}"), small_row("undo the broadcast")], COLORS["broadcast-undo"]
        fill = COLORS["constant"] if data["kind"] == "constant" else COLORS["op"]
        if a in self.final:
            fill = COLORS["gradient"]
        elif a in self.partial:
            fill = COLORS["partial gradient"]
        return [op_row(self._formula(data) or expression(data, self.name))], fill

    def _formula(self, data: dict[str, Any]) -> str | None:
        """With textbook=True, a fused kernel's formula (``(1 - h**2) * dh``; a kernel with several outputs, such
        as layer norm's, keeps its name)."""
        formula = printer.textbook_formula(data["func"]) if self.options.textbook else None
        if formula is None or formula.outputs != 1 or data["output_index"] is not None:
            return None
        text = printer.textbook(data["func"], data["args"], data["kwargs"], self.name).text
        return text if len(text) <= 60 else text[:59] + "…"

    def _accumulation_text(self, source: int, k: int, n: int, consumer: int) -> str:
        """``+= from 2 consumers``; a tensor an op reads twice (``z = x * x``) has two uses in one consumer."""
        distinct = len(self.consumers.get(source, ()))
        if distinct == n:
            return f"+= from {n} consumers" if k == n else f"+= ({k} of {n} consumers)"
        where = f"in {self.forward_name(consumer)}" if distinct == 1 else f"in {distinct} consumers"
        return f"+= from {n} uses {where}" if k == n else f"+= ({k} of {n} uses {where})"

    def _name_row(self, a: int, data: dict[str, Any]) -> str:
        if a in self.final:
            names = self.gradient_names(a)
            more = len(names) - _NAMES_SHOWN
            return name_row(" = ".join(names[:_NAMES_SHOWN]), data["shape"],
                            note=f"= … ({more} more)" if more > 0 else "")
        if a in self.accumulation:
            source = self.accumulation[a][0]
            return name_row("d" + self.forward_name(source), data["shape"], note="(running sum)")
        if a in self.partial:
            source, consumer = self.partial[a]
            k, uses = self.part_of_use.get(a, (0, 1))
            which = f"part {k} of {uses}" if uses > 1 else "part"
            return name_row("d" + self.forward_name(source), data["shape"],
                            note=f"({which} from {self.forward_name(consumer)})")
        return name_row(self.name(a), data["shape"], named=False, note="(unused)" if a in self.unused else "")

    def _legend_text(self, a: int, fill: str, status: dict[int, tuple[str, str]]) -> str:
        for node in self.final.get(a, []):
            if node in status:
                return status[node][0]
        if a == self.seed:  # named after the output: micrograd's L, a toy's y, a layer's h seeded with grad=
            root = "d" + self.fwd[self.options.root]["name"]
            return f"seed ({root} = 1)" if self.adj[a]["kind"] != "leaf" else f"seed ({root} = the grad= given)"
        if a in self.accumulation:
            return "fan-out: sum the branches"
        if self.adj[a]["op"] == "sum_to_size":
            return "broadcast-undo"
        if a in self.final:
            return "gradient dX"
        if a in self.partial:
            return "partial gradient (one branch)"
        return "constant" if self.adj[a]["kind"] == "constant" else "op of a rule"

    def _cluster(self, a: int, mode: str | None, drawing: Drawing) -> tuple[str, ...]:
        """A forward op's rule is a cluster inside that op's scope; accumulations sit outside rules."""
        consumer = self.owner.get(a)
        if consumer is None:
            return ()
        scope = cluster_path(self.fwd[consumer], mode, self.calls)
        _register(scope, drawing)
        if a in self.accumulation:
            return scope
        path = scope + (f"\x00rule{consumer}",)
        data = self.fwd[consumer]
        drawing.cluster_labels.setdefault(
            path, f"backward of {definition(data['name'], data, self.forward_name)}")
        return path

    def _name_empty_clusters(self, mode: str | None, drawing: Drawing, near: dict[int, int] | None) -> None:
        """The clusters of the drawn forward ops whose rules draw no op (a residual ``x + f(x)``, nanoGPT's
        ``Block.forward``: the add passes its gradient on unchanged) are clusters of this view too, so that
        ``collapse=`` takes the names the forward view takes (collapsing nothing here)."""
        depth = self.options.depth
        for node in self.graph.ancestors(self.options.root):
            if self.fwd[node]["kind"] == "op" and (near is None or near.get(node, depth + 1) < depth):
                _register(cluster_path(self.fwd[node], mode, self.calls), drawing)

    def _tooltip(self, a: int, data: dict[str, Any]) -> str:
        consumer = self.owner.get(a)
        rule = f" (in the rule of {self.fwd[consumer]['name']})" if consumer is not None else ""
        name = " = ".join(self.gradient_names(a)) if a in self.final else self.name(a)
        return f"{definition(name, data, self.name, limit=200)}: {shape_text(data['shape'])}{rule}"

    def _mark_cut(self, drawing: Drawing, shown: set[int], near: dict[int, int]) -> None:
        """With depth=k: the gradients whose rules were not drawn feed one "⋯" box."""
        depth = self.options.depth
        cut = [a for a in shown for node in self.final.get(a, [])
               if near.get(node) == depth and self.fwd[node]["kind"] == "op"]
        if not cut:
            return
        drawing.add(Box("cut", [small_row(f"⋯ the backward pass continues (depth={depth})")], "#ffffff",
                        is_op=False, attrs={"style": "dashed"}))
        for a in dict.fromkeys(cut):
            drawing.edge(f"a{a}", "cut", style="dashed")


def _register(scope: tuple[str, ...], drawing: Drawing) -> None:
    """A cluster path and its outer clusters: labelled, and names ``collapse=`` takes."""
    for i in range(1, len(scope) + 1):
        drawing.cluster_labels.setdefault(scope[:i], scope[i - 1])
        drawing.collapsible.add(scope[:i])


def _sum_dims(before: tuple[int, ...], after: tuple[int, ...]) -> str:
    """Which dimensions sum_to_size summed: ``sum dim=0`` for 32×64 → 1×64 or 32×27 → 27."""
    lead = len(before) - len(after)
    dims = list(range(lead)) + [lead + i for i, (b, a) in enumerate(zip(before[lead:], after)) if a == 1 and b != 1]
    if not dims:
        return "sum"
    return f"sum dim={dims[0]}" if len(dims) == 1 else f"sum dims={','.join(map(str, dims))}"
