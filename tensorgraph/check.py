"""Check a learner's hand-written gradients node by node, with a pointed diagnosis for each.

``graph.check(manual, loss)`` takes the gradients a learner derived by hand (the
lecture's exercise 1: ``{"dlogprobs": dlogprobs, "dprobs": dprobs, ...}``) and judges
every one in backward order. Each row is judged on its own line of the backward pass:
the right gradient is recomputed by the rule table from *the learner's own* upstream
gradients, so one mistake is blamed once, where it was made, and the rows below it are
marked ``inherited`` instead of wrong.

A wrong row gets one of the kinds below, found by testing what the learner's tensor is
against the right value (or, when their upstream is already off, against what the rules
give from their upstream):

``ok``               equal (allclose, plus what float rounding alone can give)
``shape``            the values agree after broadcasting; the shape is wrong (missing ``keepdim=True``)
``dtype``            right within the precision of its dtype, which is the wrong one (float16 for float32)
``not-unbroadcast``  the gradient of the broadcast result: summing over the broadcast dimensions fixes it
``transposed``       the transpose of the right gradient
``missing-branch``   the sum over only some of the tensor's consumers (the message names the lines kept and missed)
``sign``             the right value times -1
``scaled``           the right value times another constant (the message gives it: ``(n-1)/n = 31/32``)
``wrong``            none of the above (the message says what it can: the local derivative alone, a fused slip,
                     a swapped variable ...)
``inherited``        right given the learner's upstream gradients, which are wrong
``missing``          not given
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from torch import Tensor

from .engine import (
    backward,
    call_rule,
    check_unchanged,
    gradient_hooks,
    input_gradients,
    require_values,
    root_node,
    seed_gradient,
)
from .graph import Ref, identifier, is_float, refs_in, substitute
from .ops import OPS
from .rounding import TOLERANCES, close, rounding_noise, sum_to

if TYPE_CHECKING:
    from .graph import Graph

KINDS = ("ok", "shape", "dtype", "not-unbroadcast", "transposed", "missing-branch", "sign", "scaled", "wrong",
         "inherited", "missing")
# kinds that are the learner's own mistake in that row (``inherited`` and ``missing`` are not)
ERROR_KINDS = frozenset({"shape", "dtype", "not-unbroadcast", "transposed", "missing-branch", "sign", "scaled",
                         "wrong"})
_INDEX_OPS = frozenset({"getitem", "embedding", "index_select"})
# reductions that select an element, by what they select
_SELECTIONS = {"max": "max", "amax": "max", "min": "min", "amin": "min"}


# the end of the error for a parameter updated in place after recording (exercise 4's p.data += -lr * grad)
_UPDATED_ADVICE = "Check your gradients before the update (graph.check(manual, loss) before p.data += ...)."


NAME_WIDTH = 15  # the gradient column's least width; longer names widen the whole table


@dataclass
class CheckRow:
    """The verdict on one hand-written gradient."""

    name: str  # the recorded tensor's name (``logits``; the gradient is ``dlogits``)
    kind: str  # one of KINDS
    maxdiff: float  # max |yours - right| (after broadcasting when the shapes differ; nan, shown -, if they cannot)
    message: str  # one line: what is wrong and how to fix it
    shape: tuple[int, ...] | None  # the shape you gave (None if missing)
    expected_shape: tuple[int, ...]
    node: int = -1
    upstream: list[str] = field(default_factory=list)  # for inherited rows: the wrong gradients it got

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    @property
    def error(self) -> bool:
        """This row is a mistake of its own (not ok, inherited or missing)."""
        return self.kind in ERROR_KINDS

    def __str__(self) -> str:
        return self.line(NAME_WIDTH)

    def line(self, width: int) -> str:
        """The row with its gradient's name padded to ``width`` (the table's longest name)."""
        return f"{'d' + self.name:{width}s} | {self.kind:15s} | {_number(self.maxdiff):10s} | {self.message}"


@dataclass
class CheckReport:
    """``print(report)`` gives the table; ``report.first_error`` the first wrong gradient in backward order."""

    rows: list[CheckRow]
    loss: str
    first_error: str | None

    @property
    def ok(self) -> bool:
        """You gave gradients and none of them is wrong (missing ones are not errors; with none given, nothing
        was checked: not ok, so that ``assert report.ok`` cannot pass on an empty answer)."""
        return self.first_error is None and any(row.kind != "missing" for row in self.rows)

    @property
    def errors(self) -> list[CheckRow]:
        return [row for row in self.rows if row.error]

    def row(self, name: str) -> CheckRow:
        """A row by tensor name, with or without the leading ``d``."""
        for row in self.rows:
            if name in (row.name, "d" + row.name):
                return row
        raise KeyError(f"no row for {name!r} (rows: {', '.join('d' + r.name for r in self.rows)})")

    def __getitem__(self, name: str) -> CheckRow:
        return self.row(name)

    def summary(self) -> str:
        given = [row for row in self.rows if row.kind != "missing"]
        right = sum(row.ok for row in given)
        text = f"check of your gradients of {self.loss!r}: {right}/{len(given)} right"
        missing = len(self.rows) - len(given)
        if missing:
            text += f", {missing} not given"
        if not given:
            return text + ": nothing to check yet"
        if self.first_error is None:
            return text + ", no errors"
        first = self.row(self.first_error)
        return text + f"; first error: d{first.name} ({first.kind})"

    def __str__(self) -> str:
        missing = [row for row in self.rows if row.kind == "missing"]
        given = [row for row in self.rows if row.kind != "missing"]
        shown = given if len(missing) > len(given) else self.rows
        width = max([NAME_WIDTH] + [len(row.name) + 1 for row in shown])
        lines = [self.summary(), f"   {'gradient':{width}s} | {'kind':15s} | {'maxdiff':10s} | diagnosis"]
        for row in shown:
            marker = ">> " if row.name == self.first_error else "   "
            lines.append(marker + row.line(width))
        if missing and len(missing) > len(given):  # a partial check: list what was not given on one line
            lines.append("   not given: " + ", ".join("d" + row.name for row in missing))
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        lines = [f"**{self.summary()}**", "", "| gradient | kind | maxdiff | diagnosis |", "|---|---|---|---|"]
        for row in self.rows:
            cells = [f"d{row.name}", row.kind, _number(row.maxdiff), row.message.replace("|", "\\|")]
            if row.name == self.first_error:
                cells = [f"**{c}**" if c else c for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def check(graph: Graph, manual: dict[str, Any], loss: Any, grad: Tensor | None = None, *,
          rtol: float | None = None, atol: float | None = None) -> CheckReport:
    """Judge hand-written gradients (see the module docstring).

    ``manual`` maps recorded names, with or without the leading ``d`` (``"dlogits"`` or
    ``"logits"``), to tensors (None counts as not given). ``rtol``/``atol`` override the
    allclose tolerances (by default torch's for float32, tighter for float64).
    """
    root = root_node(graph, loss, "graph.check")
    seed_gradient(graph, root, grad, "graph.check")  # a wrong grad= named as graph.check's
    require_values(graph, root, "graph.check")
    if getattr(graph, "_fingerprints", None):  # before backward, whose error would say "call backward"
        check_unchanged(graph, root, _UPDATED_ADVICE)
    _check_tolerances(rtol, atol)
    hooked = list(gradient_hooks(graph, root) or ())
    if hooked:
        data = graph._nodes[max(hooked)]
        raise NotImplementedError(f"check: tensor {data['name']!r} has a gradient hook (t.register_hook); check "
                                  f"judges each of your lines with the rules alone, which know nothing of it. "
                                  f"Remove the hook (handle.remove()) before checking.")
    with torch.no_grad():  # parameters may require grad: nothing here is differentiated
        gradients = backward(graph, root, grad)
        truth = gradients.by_node
        if not all(bool(torch.isfinite(t).all()) for t in truth.values() if t.is_floating_point()):
            broken = nonfinite_forward(graph, root)
            if broken:  # the right gradients are inf or nan too: there is nothing to judge against
                raise ValueError(f"check: {broken}; the right gradients through it are inf or nan, so no line "
                                 f"can be judged")
        given = _resolve(graph, manual, truth, root, gradients.incomplete)
        report = _Checker(graph, root, truth, given, rtol, atol, grad).run()
    _note_ambiguous_keys(graph, manual, report)
    return report


def _note_ambiguous_keys(graph: Graph, manual: dict, report: CheckReport) -> None:
    """A wrong row given by a key like ``"dx"`` that was read as the tensor named ``dx`` (a tensor ``x`` exists
    too) says how to mean the other: the learner may well have meant x's gradient."""
    chosen = _nodes_of_keys(graph, manual)
    nodes = graph._nodes
    for key, node in chosen.items():
        options = _candidates(graph, key)
        if len(options) != 2 or node != options[0]:
            continue
        row = next((row for row in report.rows if row.node == node), None)
        other = nodes[options[1]]["name"]
        if row is not None and row.error:
            row.message += (f" ({key!r} was read as the gradient of the tensor named {key!r}; for the gradient of "
                            f"{other!r}, give the tensor itself as the key: {{{other}: ...}})")


def _check_tolerances(rtol: Any, atol: Any) -> None:
    """rtol and atol: None (the dtype's defaults) or finite numbers >= 0 (0 allowed, as in torch.allclose)."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"graph.check: {name} must be a finite number >= 0 (or None for the dtype's default), "
                             f"got {value!r}")


def nonfinite_forward(graph: Graph, root: int) -> str | None:
    """``the forward pass has non-finite values: 'logprobs' (x.py:31) holds -inf ...``, or None if it has none."""
    nodes = graph._nodes
    for node in sorted(graph.ancestors(root)):
        data = nodes[node]
        value = data.get("value")
        if not isinstance(value, Tensor) or not value.is_floating_point() or bool(torch.isfinite(value).all()):
            continue
        kinds = [k for k, mask in (("nan", value.isnan()), ("inf", value.isposinf()), ("-inf", value.isneginf()))
                 if bool(mask.any())]
        where = f" ({data['source']})" if data.get("source") else ""
        return (f"the forward pass has non-finite values: {data['name']!r}{where} is the first tensor holding "
                f"{' and '.join(kinds)} (record with tg.record(anomaly=True) to stop at the op that makes it)")
    return None


# ---------------------------------------------------------------- reading the learner's dict


def _resolve(graph: Graph, manual: Any, truth: dict[int, Tensor], root: int,
             incomplete: dict[int, str] | None = None) -> dict[int, Tensor]:
    if not isinstance(manual, dict):
        raise ValueError(f"check: expected a dict of gradients by name, got {type(manual).__name__}")
    nodes = graph._nodes
    given: dict[int, Tensor] = {}
    keys: dict[int, str] = {}
    for raw_key, node in _nodes_of_keys(graph, manual).items():
        value = manual[raw_key]
        name = nodes[node]["name"]
        key = raw_key if isinstance(raw_key, str) else "d" + name  # never a tensor's repr in a message
        how = repr(raw_key) if isinstance(raw_key, str) else f"the tensor {name}"
        if node not in truth:
            why = "it is not a floating-point tensor" if not is_float(nodes[node]) else "the loss does not depend on it"
            if incomplete and node in incomplete:
                why = f"the loss depends on it through {incomplete[node]}"
            raise ValueError(f"check: {key!r}: {name!r} has no gradient ({why})")
        if node in keys:
            raise ValueError(f"check: the gradient of {name!r} is given twice ({keys[node]} and {how})")
        keys[node] = how
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and truth[node].dim() == 0:
            value = torch.tensor(float(value), dtype=truth[node].dtype)  # a scalar's gradient, micrograd's way
        if not isinstance(value, Tensor):
            fix = " (a Python number is taken for a scalar's gradient only)" if isinstance(value, (int, float)) \
                else " (torch.as_tensor(...) makes it one)"
            raise ValueError(f"check: {key!r} is a {type(value).__name__}, not a tensor{fix}")
        if node == root:
            _check_seed(key, value, truth[root])
            continue
        given[node] = value.detach()
    return given


def _check_seed(key: str, value: Tensor, seed: Tensor) -> None:
    """The loss's own gradient is the seed (1, or ``grad``): a different one means other gradients altogether."""
    if tuple(value.shape) in (tuple(seed.shape), ()) and bool(torch.allclose(value.detach().to(seed), seed)):
        return
    shown = f"{value.item():g}" if value.numel() == 1 else f"a tensor of shape {tuple(value.shape)}"
    expected = f"{seed.item():g}" if seed.numel() == 1 else "the grad= you passed"
    raise ValueError(f"check: {key!r} is {shown}, but the gradient of the loss with respect to itself is "
                     f"{expected}; to check the gradients from another seed, pass it as grad=")


def _nodes_of_keys(graph: Graph, manual: dict[Any, Any]) -> dict[Any, int]:
    """The node each key names. A key such as ``"dx"`` when both ``dx`` and ``x`` are recorded names is
    ambiguous: it takes the reading no other key claims (``{"ddx": ..., "dx": ...}``), else the name itself."""
    choices = {key: _candidates(graph, key) for key in manual}
    claimed = {options[0] for options in choices.values() if len(options) == 1}
    return {key: next((n for n in options if n not in claimed), options[0]) for key, options in choices.items()}


def _candidates(graph: Graph, key: Any) -> list[int]:
    """The nodes a key can name: the recorded name itself first, then the name without its leading ``d``."""
    names = graph._names
    if isinstance(key, str) and key in names and key.startswith("d") and key[1:] in names:
        return [names[key], names[key[1:]]]
    return [_node_of_key(graph, key)]


def _node_of_key(graph: Graph, key: Any) -> int:
    if isinstance(key, Tensor):  # the forward tensor itself: {logits: dlogits}, as with tg.record(names=False)
        live = graph._live.get(id(key))
        if live is None or live[2] is not key:
            raise ValueError(f"check: a tensor used as a key is not in this graph: {graph.owner_message(key)}")
        return live[0]
    if isinstance(key, int) and not isinstance(key, bool):
        if 0 <= key < len(graph._nodes):
            return key
        raise ValueError(f"check: no node {key} in the graph (it has {len(graph._nodes)} nodes)")
    if not isinstance(key, str):
        raise ValueError(f"check: gradient keys are tensor names such as 'dlogits', the forward tensors "
                         f"themselves or node ids, not a {type(key).__name__}")
    names = graph._names
    if key in names:
        return names[key]
    if key.startswith("d") and key[1:] in names:
        return names[key[1:]]
    close = difflib.get_close_matches(key, ["d" + n for n in names] + list(names), n=3)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(f"check: no tensor named {key!r} in the graph{hint}{graph._names_note()}")


# ---------------------------------------------------------------- judging


@dataclass
class _Branch:
    consumer: int
    raw: Tensor  # what the consumer's rule sent (maybe the broadcast shape)
    summed: Tensor  # after broadcast-undo: the input's shape


# a right gradient this much smaller than the parts summed into it is about 0 by cancellation, not by its values
_CANCELLED = 1e-5

# at most this many recorded tensors are tried in place of each one a rule reads (on a wrong row only)
_SWAP_CANDIDATES = 50
# a swap is looked for in at most this many ops of a line (the consumer and the unnamed ops it feeds), and in
# tensors computed through at most this many unnamed ops from a named one; at most _SWAP_TRIES swaps per branch
_SWAP_DEPTH = 3
_SWAP_TRIES = 300
# and at most this many in one check: each runs a rule (a big graph's matmuls), and a check of a big graph whose
# every row is wrong spent minutes on them; the rows are judged in backward order, so the first errors get them
_SWAP_BUDGET = 2000

# a slipped formula: (the row's kind, the message, its value)
_Slip = tuple[str, str, Tensor]


class _Checker:
    def __init__(self, graph: Graph, root: int, truth: dict[int, Tensor], given: dict[int, Tensor],
                 rtol: float | None, atol: float | None, grad: Tensor | None = None) -> None:
        self.graph = graph
        self.grad = grad
        self.nodes = graph._nodes
        self.root = root
        self.truth = truth
        self.given = given
        dtype = truth[root].dtype
        default = TOLERANCES.get(dtype, (1e-5, 1e-8))
        self.rtol = default[0] if rtol is None else rtol
        self.atol = default[1] if atol is None else atol
        # per element, what float rounding alone can give: along the whole backward path, and since the
        # learner's own values (the rounding of the lines between their gradients and this one)
        self.noise = rounding_noise(graph, root, truth)
        self.local_noise = rounding_noise(graph, root, truth, _restarts(given, truth)) if given else self.noise
        self.mine: dict[int, list[_Branch | None]] = {}  # from the learner's upstream gradients
        self.right: dict[int, list[_Branch]] = {}  # from the right upstream gradients
        self.used: dict[int, Tensor] = {}  # the upstream value each node passes on, as the learner has it
        self.shape_off: set[int] = set()  # nodes whose learner value was passed on with a wrong shape
        self.rows: dict[int, CheckRow] = {}
        self.n_label = _batch_size(graph)
        self._code: dict[bool, Any] = {}  # textbook or not -> the generated backward (False: it failed)
        self._stand_in_index: dict[tuple[tuple, Any], list[int]] | None = None  # see _swap_index
        self._swaps_left = _SWAP_BUDGET

    def run(self) -> CheckReport:
        judged = {n for n in self.truth if n != self.root and (self.nodes[n]["named"] or n in self.given)}
        for node in sorted(self.truth, reverse=True):  # creation order reversed: backward order
            if node == self.root:
                self.used[node] = self.truth[node]
            else:
                self._settle(node, judged)
            self._push(node)
        rows = [self.rows[n] for n in sorted(self.rows, reverse=True)]
        first = next((row.name for row in rows if row.error), None)
        return CheckReport(rows, self.nodes[self.root]["name"], first)

    # ---------------------------------------------------------------- propagation

    def _settle(self, node: int, judged: set[int]) -> None:
        """Judge the node (if it is a row) and fix the value it passes on to its inputs."""
        expected = _total(self.mine.get(node))
        row = self._judge(node, expected) if node in judged else None
        if row is not None:
            self.rows[node] = row
        mine = self.given.get(node)
        truth = self.truth[node]
        if mine is not None:  # right or not, the rows below are judged on the learner's own value
            self.used[node] = _as_real(mine)
            if tuple(mine.shape) != tuple(truth.shape):
                self.shape_off.add(node)
        elif self._reshaped(node):  # not given, below a wrongly shaped gradient: the learner's lines broadcast it
            raw = _total([b for b in self.mine[node] if b is not None], summed=False)
            self.used[node] = expected if raw is None else raw
            if raw is not None and tuple(raw.shape) != tuple(truth.shape):
                self.shape_off.add(node)
        else:  # not given: what the rules make of the learner's values above it
            self.used[node] = truth if expected is None else expected

    def _push(self, node: int) -> None:
        data = self.nodes[node]
        if data["kind"] != "op" or not data["inputs"]:
            return
        truth = self.truth[node]
        right = self._branches(node, truth)
        for source, branch in right:
            self.right.setdefault(source, []).append(branch)
        used = self.used[node]
        if used is truth:
            mine = right
        else:
            mine = self._try_branches(node, used)
        for source, branch in mine:
            self.mine.setdefault(source, []).append(branch)

    def _try_branches(self, node: int, g: Tensor) -> list[tuple[int, _Branch | None]]:
        """Push the learner's value through the rule; if it does not fit, push it reshaped, else give up."""
        attempts = [g.to(self.truth[node].dtype)]
        coerced = _coerce(g, self.truth[node])
        if coerced is not None and coerced.shape != g.shape:
            attempts.append(coerced)
        for attempt in attempts:
            try:
                return self._branches(node, attempt)
            except (RuntimeError, ValueError, IndexError):
                continue
        return [(source, None) for source in self._float_inputs(node)]

    def _branches(self, node: int, g: Tensor) -> list[tuple[int, _Branch]]:
        data = self.nodes[node]
        found = []
        for source, grad in input_gradients(data, call_rule(self.graph, node, g)):
            target = self.nodes[source]
            if source not in self.truth or not is_float(target):
                continue
            found.append((source, _Branch(node, grad, sum_to(grad, target["shape"]).to(target["dtype"]))))
        return found

    def _local_derivative(self, consumer: int, source: int) -> Tensor | None:
        """``consumer``'s rule run on an upstream of ones, summed over ``source``'s uses: its local derivative
        (for a pick, how often each element is picked). None when the rule cannot run so, or ``source`` gets none."""
        try:
            ones = torch.ones_like(self.truth[consumer])
            parts = [branch.summed for s, branch in self._branches(consumer, ones) if s == source]
        except (RuntimeError, ValueError, IndexError, TypeError):
            return None
        return sum(parts[1:], parts[0]) if parts else None

    def _float_inputs(self, node: int) -> list[int]:
        return [s for s in self.nodes[node]["inputs"] if s in self.truth]

    # ---------------------------------------------------------------- one row

    def _judge(self, node: int, expected: Tensor | None) -> CheckRow:
        data = self.nodes[node]
        truth = self.truth[node]
        name = data["name"]
        mine = self.given.get(node)
        row = CheckRow(name, "missing", math.nan, f"not given (no d{name})", None, tuple(truth.shape), node)
        if mine is None:
            return row
        row.shape = tuple(mine.shape)
        mine = mine.to(device=truth.device)
        own_dtype = mine.dtype
        dtype_note = _dtype_mistake(own_dtype, truth.dtype)
        if dtype_note:
            if self._right_in_own_precision(mine, truth, expected):
                row.kind, row.maxdiff = "dtype", _maxdiff(_as_real(mine), truth)
                row.message = f"right values, but {dtype_note}: build it from {_dtype_name(truth.dtype)} tensors " \
                              f"(the lines below inherit its rounding)"
                return row
            if not (own_dtype.is_floating_point or own_dtype.is_complex):  # the values themselves were cut
                row.kind, row.maxdiff = "dtype", _maxdiff(mine.to(truth.dtype), truth)
                holder = "a bool" if own_dtype == torch.bool else "an integer"
                row.message = f"{dtype_note}: {holder} tensor cannot hold this gradient (its fractions are cut " \
                              f"off); build it from {_dtype_name(truth.dtype)} tensors"
                return row
            mine = _as_real(mine).to(truth.dtype)  # judge the values; the dtype is named in the message
        row.maxdiff = _maxdiff(mine, truth)
        upstream_off = expected is not None and (self._reshaped(node) or not self._close(expected, truth, node))
        if self._right(node, mine, truth, None if upstream_off else expected):
            partial = self._exact_partial(node, mine, truth)
            row.kind, row.message = ("missing-branch", partial) if partial else ("ok", self._cancelled_note(node))
            return row
        alias = self._alias(node, mine)
        if alias is not None:
            row.kind, row.message = "wrong", alias
            return row
        if upstream_off and self._inherited(node, mine, expected):
            row.upstream = self._wrong_upstream(node)
            row.kind = "inherited"
            row.message = self._inherited_message(row.upstream, node)
            return row
        if mine.is_floating_point() and not bool(torch.isfinite(mine).all()):
            row.kind, row.message = "wrong", _nonfinite_message(mine)
            return row
        references = [(expected, self.mine.get(node))] if upstream_off else []
        references.append((truth, self.right.get(node)))
        for reference, branches in references:
            with self._tolerances(own_dtype if dtype_note else None):  # a mistake up to the dtype's rounding
                verdict = self._diagnose(node, mine, reference, branches)
            if verdict is not None:
                row.kind, row.message = verdict
                break
        else:
            row.kind, row.message = "wrong", self._wrong_message(node, mine, references[0][0], upstream_off)
        if upstream_off and row.kind != "wrong":
            upstream = self._wrong_upstream(node)
            if upstream:
                row.message += f" (judged on your {_names(upstream)}, which is also off)"
        if dtype_note and row.kind not in ("ok", "inherited"):
            row.message += f"; also {dtype_note}"
        elif dtype_note:  # right values, given the upstream: the dtype is still this line's own mistake
            row.kind, row.message = "dtype", f"{row.message}; but {dtype_note}" if row.message else dtype_note
        return row

    @contextmanager
    def _tolerances(self, dtype: torch.dtype | None) -> Iterator[None]:
        """Within the block, allclose's tolerances are at least ``dtype``'s (values that came in float16)."""
        saved = self.rtol, self.atol
        if dtype in TOLERANCES:
            rtol, atol = TOLERANCES[dtype]
            self.rtol, self.atol = max(rtol, self.rtol), max(atol, self.atol)
        try:
            yield
        finally:
            self.rtol, self.atol = saved

    def _right_in_own_precision(self, mine: Tensor, truth: Tensor, expected: Tensor | None) -> bool:
        """The values are right up to the rounding of the (lower-precision or integer) dtype they came in."""
        if tuple(mine.shape) != tuple(truth.shape) or mine.is_complex() and bool(mine.imag.any()):
            return False
        rtol, atol = TOLERANCES.get(mine.dtype, (self.rtol, self.atol))
        value = _as_real(mine).to(truth.dtype)
        return any(bool(torch.allclose(value, ref, rtol=max(rtol, self.rtol), atol=max(atol, self.atol)))
                   for ref in (truth, expected) if ref is not None and tuple(ref.shape) == tuple(value.shape))

    def _reshaped(self, node: int) -> bool:
        """A gradient sent to this node came from an upstream value of the wrong shape."""
        return any(b is not None and b.consumer in self.shape_off for b in self.mine.get(node, []))

    def _right(self, node: int, mine: Tensor, truth: Tensor, expected: Tensor | None) -> bool:
        """Right up to rounding: given the learner's own upstream values when they are right, else the truth.

        From right upstream values, the line is compared with what the rule gives from *those
        values* (``expected``), allowing only the rounding of the ops in between: a slip as small
        as a forgotten eps still shows. Without them, the truth allows the whole path's rounding;
        a line that matches the truth is right whatever the upstream (a gradient computed from an
        earlier, equally right version of the upstream value, as when the lecture's exercise 2
        replaces ``dlogits`` after exercise 1's ``dW2`` was computed from the old one).
        """
        if expected is not None and self._close(mine, expected, node, local=True):
            return True
        return self._close(mine, truth, node)

    def _alias(self, node: int, mine: Tensor) -> str | None:
        """``dhprebn = dbndiff`` without ``.clone()``: the later ``dhprebn += ...`` changed dbndiff too."""
        if mine.shape != self.truth[node].shape:
            return None  # dbnbias = dhpreact is a broadcast mistake, diagnosed as such
        pointer = mine.untyped_storage().data_ptr()
        for other, value in self.given.items():
            # only a gradient written later (the input's, lower in the graph) can change this one in place;
            # dnorm_logits = dcounts (an earlier gradient, unchanged since) is a missing local derivative
            if other >= node or value.untyped_storage().data_ptr() != pointer or value.shape != mine.shape:
                continue
            if self._close(mine, self.truth[other], other):
                name, alias = self.nodes[node]["name"], self.nodes[other]["name"]
                return (f"it is the same tensor as your d{alias}, and holds d{alias}'s value: either d{alias} = "
                        f"d{name} without .clone() made them one tensor, so an in-place update of d{alias} "
                        f"(d{alias} += ...) changed d{name} too, or d{alias}'s variable was given for d{name}")
        return None

    def _exact_partial(self, node: int, mine: Tensor, truth: Tensor) -> str | None:
        """Within tolerance, yet exactly the sum of only some branches: a branch that happens to be ~0 here."""
        branches = self.right.get(node)
        full = _maxdiff(mine, truth)
        if not branches or len(branches) < 2 or len(branches) > 10 or full == 0:
            return None
        for size in range(len(branches) - 1, 0, -1):
            for subset in itertools.combinations(range(len(branches)), size):
                partial = sum((branches[i].summed for i in subset[1:]), branches[subset[0]].summed)
                if _maxdiff(mine, partial) <= full / 100:
                    missing = [branches[i] for i in range(len(branches)) if i not in subset]
                    return self._branch_message([branches[i] for i in subset], missing, node) + \
                        "; that branch is ~0 here, so the values pass allclose, but the formula needs it"
        return None

    def _inherited(self, node: int, mine: Tensor, expected: Tensor) -> bool:
        if self._close(mine, expected, node, local=True):
            return True
        # an upstream gradient with a wrong shape: the learner's line broadcast it as is
        if not self._reshaped(node):
            return False
        raw = _total([b for b in self.mine[node] if b is not None], summed=False)
        return raw is not None and self._close(mine, raw, node, local=True)

    def _diagnose(self, node: int, mine: Tensor, ref: Tensor, branches: list | None) -> tuple[str, str] | None:
        """The kind of mistake that turns ``ref`` into ``mine``, with its message; None if no kind fits."""
        shape, ref_shape = tuple(mine.shape), tuple(ref.shape)
        if shape != ref_shape:
            return self._diagnose_shape(node, mine, ref)
        if self._negligible(ref, node):
            return None
        if self._close(mine, -ref, node):
            return "sign", "the right value times -1: a sign error"
        if mine.dim() >= 2 and mine.shape[-1] == mine.shape[-2] and self._close(mine, ref.mT, node):
            return "transposed", "the transpose of the right gradient" + self._line_hint(node)
        branch = self._missing_branch(node, mine, branches)
        if branch is not None:
            return "missing-branch", branch
        scaled_branch = self._branch_scaled(node, mine, ref, branches)
        if scaled_branch is not None:
            return "wrong", scaled_branch
        slipped = self._branch_slip(node, mine, ref, branches)
        if slipped is not None:
            return "wrong", slipped
        tied = self._tie_message(node, mine, ref)  # before "scaled": a full max's gradient is 0 off the ties
        if tied is not None:
            return "wrong", tied
        fused = self._fused_slip(node, mine, ref)
        if fused is not None:
            return fused
        factor = _factor(mine, ref)
        if factor is not None and abs(factor - 1) > 10 * self.rtol and abs(factor) > 1e-12 and \
                self._close(mine, ref * factor, node):
            return "scaled", self._scaled_message(factor)
        return None

    def _diagnose_shape(self, node: int, mine: Tensor, ref: Tensor) -> tuple[str, str] | None:
        shape, ref_shape = tuple(mine.shape), tuple(ref.shape)
        if mine.numel() == ref.numel() and self._close(mine.reshape(ref_shape), ref, node):
            if shape == tuple(s for s in ref_shape if s != 1) and len(shape) < len(ref_shape):
                dims = [i for i, s in enumerate(ref_shape) if s == 1]
                return "shape", f"missing keepdim=True: got {_shape(shape)} for {_shape(ref_shape)} " \
                                f"(sum over dim {_dims(dims)} with keepdim=True)"
            if ref_shape == tuple(s for s in shape if s != 1) and len(shape) > len(ref_shape):
                dims = [i for i, s in enumerate(shape) if s == 1]
                return "shape", f"right values, extra size-1 dim: got {_shape(shape)} for {_shape(ref_shape)} " \
                                f"(sum over dim {_dims(dims)} without keepdim=True, or .reshape{_shape(ref_shape)})"
            return "shape", f"right values, wrong shape: got {_shape(shape)} for {_shape(ref_shape)} " \
                            f"(.reshape{_shape(ref_shape)} gives it the right shape)"
        broadcast = _broadcast_shape(shape, ref_shape)
        if broadcast == ref_shape and self._close(mine.expand(ref_shape), ref, node):
            return "shape", f"right values, wrong shape: got {_shape(shape)} for {_shape(ref_shape)}; they are " \
                            f"right once broadcast, so expand to {_shape(ref_shape)} (e.g. * torch.ones_like(...))"
        if broadcast == shape and shape != ref_shape and self._close(mine, ref.expand(shape), node):
            aligned = (None,) * (len(shape) - len(ref_shape)) + ref_shape
            dims = [i for i, (size, right) in enumerate(zip(shape, aligned)) if size != right]
            return "shape", f"right values, broadcast: got {_shape(shape)} for {_shape(ref_shape)}, the right " \
                            f"gradient repeated along dim {_dims(dims)}; keep it in {_shape(ref_shape)} (no " \
                            f"* torch.ones_like(...) or .expand)"
        if broadcast == shape:
            try:
                summed = mine.sum_to_size(ref_shape)
            except RuntimeError:
                summed = None
            if summed is not None and self._close(summed, ref, node):
                return "not-unbroadcast", self._unbroadcast_message(shape, ref_shape)
            if summed is not None and not self._negligible(ref, node) and self._close(summed, -ref, node):
                return "not-unbroadcast", self._unbroadcast_message(shape, ref_shape) + ", and flip the sign"
        if mine.dim() >= 2 and tuple(mine.mT.shape) == ref_shape and self._close(mine.mT, ref, node):
            return "transposed", f"the transpose of the right gradient: got {_shape(shape)} for " \
                                 f"{_shape(ref_shape)}" + self._line_hint(node)
        return None

    def _missing_branch(self, node: int, mine: Tensor, branches: list | None) -> str | None:
        if not branches or len(branches) < 2 or any(b is None for b in branches) or len(branches) > 10:
            return None
        count = len(branches)
        for size in range(count - 1, 0, -1):
            for subset in itertools.combinations(range(count), size):
                partial = sum((branches[i].summed for i in subset[1:]), branches[subset[0]].summed)
                if self._close(mine, partial, node):
                    missing = [branches[i] for i in range(count) if i not in subset]
                    return self._branch_message([branches[i] for i in subset], missing, node)
        return None

    def _branch_scaled(self, node: int, mine: Tensor, ref: Tensor, branches: list | None) -> str | None:
        """One branch added twice (``dcounts += dcounts_sum`` run twice), with the wrong sign (``-=``) or scaled
        (``dhprebn += dbnmeani`` without its 1/n): ``mine = ref + k * branch``."""
        from .codegen import branch_name

        if not branches or len(branches) < 2:
            return None  # one branch scaled is "scaled"
        for branch in branches:
            if branch is None or self._negligible(branch.summed, node):
                continue
            share = _factor(branch.summed, ref)
            if share is not None and self._close(branch.summed, share * ref, node):
                continue  # a branch in proportion to the whole (x * x): "scaled" says it
            extra = _factor(mine - ref.to(mine.dtype), branch.summed)
            if extra is None or abs(extra) < 10 * self.rtol or not self._close(mine, ref + extra * branch.summed, node):
                continue
            through = f"the branch through {branch_name(self.graph, branch.consumer)}"
            if abs(extra - 1) <= 1e-3:
                text = f"{through} is added twice"
            elif abs(extra + 2) <= 1e-3:
                text = f"{through} has the wrong sign"
            else:
                text = f"{through} is {self._scaled_message(1 + extra)}"
            hint = self._branch_hint(node, branch.consumer)
            return text + (f" (it should be {hint})" if hint else "")
        return None

    def _branch_slip(self, node: int, mine: Tensor, ref: Tensor, branches: list | None) -> str | None:
        """One branch of several wrong in a way the values name, the others right: ``dbndiff += 2 * bndiff``
        (its local derivative alone) or ``dbndiff += dbndiff2`` (its upstream gradient passed on as it is).
        Said only when exactly one such reading fits."""
        if not branches or len(branches) < 2 or any(b is None for b in branches):
            return None
        found = []
        for consumer in dict.fromkeys(b.consumer for b in branches):
            if not self.nodes[consumer]["named"]:
                continue  # the upstream gradient that multiplies the local derivative has no name to give
            own = _total([b for b in branches if b.consumer == consumer])
            if own is None or self._negligible(own, node):
                continue
            residual = mine - (ref - own).to(mine.dtype)  # what the learner's line adds for this branch
            upstream, line = self.nodes[consumer]["name"], self._forward_line(consumer)
            local = self._local_derivative(consumer, node)
            if local is not None and not self._close(local, own, node) and self._close(residual, local, node):
                found.append(f"the branch through `{line}` is its local derivative alone, without the upstream "
                             f"gradient d{upstream} it multiplies (chain rule); the rest is right")
            passed = self._as_shape(self.used.get(consumer), tuple(ref.shape))
            if passed is not None and not self._negligible(passed, node) and not self._close(passed, own, node) \
                    and self._close(residual, passed, node):
                whose = "your " if consumer in self.given else ""
                found.append(f"the branch through `{line}` passes {whose}d{upstream} on as it is, without the local "
                             f"derivative of that line (chain rule); the rest is right")
        return found[0] if len(found) == 1 else None

    def _fused_slip(self, node: int, mine: Tensor, ref: Tensor) -> tuple[str, str] | None:
        """A slip in the lecture's fused one-liners (exercises 2 and 3), found by recomputing the formula with
        the slip from the forward's values: said only when the right formula gives ``ref`` (so the tensor is
        the logits of a cross-entropy, or a batchnorm's input: 2-d, or 3-d as in makemore part 5) and exactly one
        slipped formula gives ``mine``."""
        value = self.nodes[node].get("value")
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() not in (2, 3) or \
                tuple(value.shape) != tuple(ref.shape) or value.shape[0] < 2:
            return None
        slips = (self._cross_entropy_slips(node, value, ref) if value.dim() == 2 else []) or \
            self._batch_norm_slips(node, value, ref)
        hits = list(dict.fromkeys((kind, text) for kind, text, slipped in slips if not self._close(
            slipped.to(ref.dtype), ref, node) and self._close(mine, slipped.to(ref.dtype), node)))
        return hits[0] if len(hits) == 1 else None

    def _cross_entropy_slips(self, node: int, value: Tensor, ref: Tensor) -> list[_Slip]:
        """``(softmax(logits, 1) - one_hot) / n`` with one slip each, if ``ref`` is that formula's value (the
        one-hot read off ``ref`` itself: it must be one 1 per row, up to rounding); else []."""
        logits, right = value.double(), ref.double()
        rows = logits.shape[0]
        probs = logits.softmax(1)
        for scale in (1 / rows, 1.0):  # reduction='mean', reduction='sum'
            onehot = probs - right / scale
            target = onehot.round()
            if not (bool(((target == 0) | (target == 1)).all()) and bool((target.sum(1) == 1).all()) and
                    float((onehot - target).abs().max()) < 1e-3):
                continue
            if not self._close((scale * (probs - target)).to(ref.dtype), ref, node):
                continue
            x, by = identifier(self.nodes[node]["name"]), f" / {rows}" if scale != 1 else ""
            picked = self._picked_by(target.bool())
            targets = f"the elements {picked} picks" if picked else "each row's target class"
            slips = [
                ("wrong", f"equals (F.softmax({x}, 0) - one_hot){by}: the softmax is taken over dim 0, across the "
                          f"batch; cross-entropy's runs over dim 1, each row's classes",
                 scale * (logits.softmax(0) - target)),
                ("wrong", f"equals F.softmax({x}, 1){by}: the one-hot is not subtracted (1 less at {targets})",
                 scale * probs),
                ("wrong", f"equals (F.one_hot + F.softmax({x}, 1)){by}: the one-hot is added; it is subtracted",
                 scale * (probs + target)),
                ("wrong", f"equals (F.log_softmax({x}, 1) - one_hot){by}: the gradient of cross-entropy takes softmax "
                          f"(the probabilities), not log_softmax", scale * (logits.log_softmax(1) - target)),
            ]
            if scale != 1:
                slips.append(("scaled", f"equals F.softmax({x}, 1) - one_hot without the / {rows}: the loss is the "
                                        f"mean over the batch, so divide by n = {rows}", probs - target))
            return slips
        return []

    def _batch_norm_slips(self, node: int, value: Tensor, ref: Tensor) -> list[_Slip]:
        """The batchnorm input gradient, ``bnvar_inv/n * (n*dx̂ - dx̂.sum(0) - n/(n-1) * x̂ * (dx̂*x̂).sum(0))``,
        with one slip each, if the tensor is normalized over dim 0 (a 3-d one over dims (0, 1), makemore part 5's
        BatchNorm1d) further down (a tensor ``w * x̂ + b``) and ``ref`` is that formula's value; else []."""
        x = value.double()
        dims = (0,) if x.dim() == 2 else (0, 1)
        n = math.prod(x.shape[d] for d in dims)
        centred = x - x.mean(dims, keepdim=True)
        below = [d for d in sorted(_descendants(self.graph, node, 6)) if d in self.truth and
                 isinstance(self.nodes[d].get("value"), Tensor) and self.nodes[d]["value"].is_floating_point() and
                 tuple(self.nodes[d]["value"].shape) == tuple(x.shape)]
        fed = x.dim() == 2 and any(self.nodes[c]["op"] == "batch_norm" and self.nodes[c]["attrs"].get("training")
                                   for c in self.graph.nx.successors(node))  # (F.batch_norm's 3-d: over (0, 2))
        for unbiased, eps in itertools.product((True, False), (1e-5, 1e-3, 1e-6, 0.0)):
            inv = (centred.pow(2).sum(dims, keepdim=True) / (n - unbiased) + eps).rsqrt()
            xhat = centred * inv
            uses = self._normalized_uses(below, xhat, dims)
            after = self._normalized(node, uses)
            uses = [(d, w, g) for d, w, g in uses if d in after]  # not bndiff, w * x̂ with w = 1/std: before it
            dxhat = next((g * w for d, w, g in uses
                          if self._close(_bn_formula(xhat, inv, g * w, n / (n - 1) if unbiased else 1.0, dims=dims)
                                         .to(ref.dtype), ref, node)), None)
            if dxhat is None:
                continue
            # a gain w fitted to the tensors below absorbs a variance's n or n-1: the values establish which the
            # forward divides by only where the normalized value itself (w = 1) is recorded, or F.batch_norm
            # (which divides by n) normalizes the tensor
            if any(self._plain(w) for _, w, _ in uses) or (fed and not unbiased):
                return self._batch_norm_messages(node, xhat, inv, dxhat, unbiased, uses, dims)
        return []

    def _normalized(self, node: int, uses: list[tuple[int, Tensor, Tensor]]) -> set[int]:
        """The normalized value (``w * x̂ + b`` with w = 1, or F.batch_norm's output) and the tensors computed
        from it: not those before the division by the standard deviation (bndiff is ``x̂ / bnvar_inv``)."""
        normalized = {d for d, w, _ in uses if self._plain(w)} | {
            c for c in self.graph.nx.successors(node) if self.nodes[c]["op"] == "batch_norm"}
        return normalized | {a for d in normalized for a in _descendants(self.graph, d, 4)}

    @staticmethod
    def _plain(w: Tensor) -> bool:
        return bool(torch.allclose(w, torch.ones_like(w)))

    def _normalized_uses(self, below: list[int], xhat: Tensor, dims: tuple[int, ...]
                         ) -> list[tuple[int, Tensor, Tensor]]:
        """(tensor, w, its gradient) for each tensor of ``below`` that is ``w * xhat + b`` per column (per channel,
        over the statistics' ``dims``), once with the right gradient and once with the learner's."""
        found = []
        norm = xhat.pow(2).sum(dims, keepdim=True)
        if not bool((norm > 0).all()):
            return found
        for d in below:
            v = self.nodes[d]["value"].double()
            w = (v * xhat).sum(dims, keepdim=True) / norm
            fitted = w * xhat + v.mean(dims, keepdim=True)
            if not bool(torch.allclose(fitted, v, rtol=1e-4, atol=1e-5 * float(v.abs().max()))):
                continue
            for gradient in dict.fromkeys(g for g in (self.truth[d], self.used.get(d)) if g is not None):
                if tuple(gradient.shape) == tuple(v.shape):
                    found.append((d, w, gradient.double()))
        return found

    def _batch_norm_messages(self, node: int, xhat: Tensor, inv: Tensor, dxhat: Tensor, unbiased: bool,
                             uses: list[tuple[int, Tensor, Tensor]], dims: tuple[int, ...] = (0,)) -> list[_Slip]:
        """The slipped formulas, each with its message; ``dims``: those the forward's statistics reduce over."""
        n = math.prod(xhat.shape[d] for d in dims)
        bessel = n / (n - 1) if unbiased else 1.0
        plain = next((self.nodes[d]["name"] for d, w, _ in uses if self.nodes[d]["named"] and self._plain(w)), None)
        xh, dx = (identifier(plain), "d" + identifier(plain)) if plain else ("x̂", "dx̂")
        over = _dims(list(dims))
        term = f"{xh} * ({dx} * {xh}).sum({over})"
        factor = "n/(n-1) * " if unbiased else ""
        slips = [
            ("wrong", f"equals the batchnorm formula with n where it needs n-1: this forward's variance divides by "
                      f"n-1 (Bessel's correction), so the term {term} takes the factor n/(n-1) = {n}/{n - 1}"
             if unbiased else f"equals the batchnorm formula with n-1 (Bessel's correction) where it needs n: this "
                              f"forward's variance divides by n, so the term {term} takes no factor n/(n-1)",
             _bn_formula(xhat, inv, dxhat, 1.0 if unbiased else n / (n - 1), dims=dims)),
            ("wrong", f"equals the batchnorm formula without its mean term (- {dx}.sum({over})): the gradient "
                      f"through the batch mean is missing",
             _bn_formula(xhat, inv, dxhat, bessel, mean=False, dims=dims)),
            ("wrong", f"equals the batchnorm formula without its variance term (- {factor}{term}): the gradient "
                      f"through the batch variance is missing",
             _bn_formula(xhat, inv, dxhat, bessel, var=False, dims=dims)),
            ("scaled", f"equals the batchnorm formula without its 1/n: scaled by n = {n}",
             n * _bn_formula(xhat, inv, dxhat, bessel, dims=dims)),
        ]
        if dims == (0,):
            slips.append(("wrong", "equals the batchnorm formula with its sums over dim 1: the batch statistics (mean, "
                                   "variance) are over dim 0", _bn_formula(xhat, inv, dxhat, bessel, dims=(1,), n=n)))
        slips += _bn_subset_slips(xhat, inv, dxhat, unbiased, dims)
        for d, w, gradient in uses:  # the gain forgotten: dhpreact where the formula needs bngain * dhpreact
            if self.nodes[d]["named"] and not self._plain(w):
                name = self.nodes[d]["name"]
                slips.append(("wrong", f"equals the batchnorm formula fed d{name} without the gain: the gradient of "
                                       f"the normalized value is d{name} times the gain (`{self._forward_line(d)}`)",
                              _bn_formula(xhat, inv, gradient, bessel, dims=dims)))
        return slips

    @staticmethod
    def _as_shape(value: Tensor | None, shape: tuple) -> Tensor | None:
        """``value`` broadcast, or summed over its broadcast dims, to ``shape``; None if neither fits."""
        if value is None:
            return None
        if tuple(value.shape) == shape:
            return value
        if _broadcast_shape(tuple(value.shape), shape) == shape:
            return value.expand(shape)
        try:
            return value.sum_to_size(shape)
        except RuntimeError:
            return None

    # ---------------------------------------------------------------- messages

    def _branch_message(self, present: list[_Branch], missing: list[_Branch], node: int) -> str:
        from .codegen import branch_name

        hints = [h for h in (self._branch_hint(node, b.consumer) for b in missing) if h]
        if {b.consumer for b in missing} <= {b.consumer for b in present}:  # x * x: one use of two
            user = branch_name(self.graph, missing[0].consumer)
            text = f"only one use of {self.nodes[node]['name']} in {user}; missing the other"
            return text + (f" ({'; '.join(hints)})" if hints else "")
        lines = [self._branch_line(b.consumer) for b in present]
        gone = [self._branch_line(b.consumer) for b in missing]
        what = "the gradient through " + lines[0] if len(lines) == 1 else \
            "the sum of the gradients through " + _names(lines, prefix="")
        missed = f"the branch through {gone[0]} is" if len(gone) == 1 else \
            f"the branches through {_names(gone, prefix='')} are"
        text = f"equals {what} alone: {missed} missing (did you write = instead of +=, or leave a line out?"
        return text + (f" it needs {'; '.join(hints)})" if hints else ")")

    def _branch_line(self, consumer: int) -> str:
        """```bnraw = bndiff * bnvar_inv```: the forward line of the named tensor a branch goes through."""
        from .codegen import branch_name

        name = branch_name(self.graph, consumer)
        named = self.graph._names.get(name)
        return f"`{self._forward_line(named)}`" if named is not None else name

    def _branch_hint(self, node: int, consumer: int, textbook: bool = False) -> str | None:
        """The generated backward line that adds that branch: ``dcounts += dcounts_sum``."""
        code = self._generated(textbook)
        if code is None:
            return None
        variable = code.variables.get(node)
        for index, step in enumerate(code.trace.steps):
            if step.consumer == consumer and step.source == node and index in code.contributions and variable:
                return f"{variable} += {code.contributions[index]}"
        return None

    def _line_hint(self, node: int) -> str:
        """``; the right line: dW1 = embcat.t().mm(dhprebn)`` when one generated line computes the gradient."""
        line = self._answer_line(node)
        if line is None:
            return self._matmul_hint(node)
        return f"; the right line: {line}" if line else ""

    def _answer_line(self, node: int, textbook: bool = False) -> str | None:
        """The answer key's one line for the gradient, ``dhpreact = (1 - h**2) * dh`` (``textbook``: fused kernels
        written out); "" when it takes several lines, None when there is no generated code for it or its line
        reads temporaries of the generated code."""
        code = self._generated(textbook)
        if code is None or node not in code.variables:
            return None
        steps = [i for i, step in enumerate(code.trace.steps) if step.source == node]
        if len(steps) != 1 or steps[0] not in code.contributions:
            return ""
        line = code.contributions[steps[0]]
        return f"{code.variables[node]} = {line}" if self._readable(code, line) else None

    def _readable(self, code: Any, line: str) -> bool:
        """The generated ``line`` reads only the graph's named tensors and their gradients (no temporaries; a
        keyword argument's name, ``keepdim=``, is no read)."""
        known = {"torch", "F", "True", "False", "None"} | {identifier(d["name"]) for d in self.nodes if d["named"]}
        known |= {variable for forward, variable in code.variables.items() if self.nodes[forward]["named"]}
        return all(word in known for word in re.findall(r"(?<![.\w])[A-Za-z_]\w*(?!\w)(?!\s*=(?!=))", line))

    def _matmul_hint(self, node: int) -> str:
        """``; it should be x.T @ d(x @ W)``: the rule of the matmul that uses the tensor."""
        from .printer import expression

        for consumer in self.graph.nx.successors(node):
            data = self.nodes[consumer]
            args = data["bargs"]
            if data["op"] != "matmul" or len(args) != 2 or self.nodes[consumer]["shape"] == ():
                continue
            try:
                product = expression(self.graph, consumer)
            except ValueError:
                continue
            name = identifier(self.nodes[node]["name"])
            other = [identifier(self.nodes[a.node]["name"]) for a in args if getattr(a, "node", node) != node]
            if not other:
                continue
            if getattr(args[1], "node", None) == node:
                return f"; it should be d{name} = {other[0]}.T @ d({product})"
            return f"; it should be d{name} = d({product}) @ {other[0]}.T"
        return ""

    def _generated(self, textbook: bool = False) -> Any:
        """The answer key (codegen's backward pass); ``textbook``: fused kernels as formulas (``(1 - h**2) * dh``)."""
        if textbook not in self._code:
            from .codegen import generate

            try:
                self._code[textbook] = generate(self.graph, self.root, self.grad, textbook=textbook)
            except Exception:  # noqa: BLE001 - a hint is optional; the diagnosis stands without it
                self._code[textbook] = False
        return self._code[textbook] or None

    def _unbroadcast_message(self, shape: tuple, ref_shape: tuple) -> str:
        dims, fix = _unbroadcast_fix(shape, ref_shape)
        return (f"the gradient of the broadcast result {_shape(shape)}, not of the {_shape(ref_shape)} input: "
                f"sum over dim {_dims(dims)} ({fix})")

    def _summed_too_much(self, node: int, mine: Tensor, ref_shape: tuple) -> str | None:
        """``dbnmeani = (-dbndiff).sum()``: the broadcast result summed over more dims than the broadcast added."""
        for branch in (self.mine.get(node) or []) + (self.right.get(node) or []):
            if branch is None:
                continue
            wide = tuple(branch.raw.shape)
            if wide == ref_shape or mine.dim() >= len(wide) or len(wide) > 6:
                continue
            right_dims, fix = _unbroadcast_fix(wide, ref_shape)
            for dims in itertools.combinations(range(len(wide)), len(wide) - mine.dim()):
                summed = branch.raw.sum(dims) if dims else branch.raw
                if list(dims) == right_dims or summed.shape != mine.shape or not self._close(mine, summed, node):
                    continue
                where = f"every dim of {_shape(wide)} (a .sum() with no dim)" if mine.dim() == 0 else \
                    f"dim {_dims(list(dims))} of {_shape(wide)}"
                return f"summed over {where}; the broadcast happened along dim {_dims(right_dims)} only ({fix})"
        return None

    def _scaled_message(self, factor: float) -> str:
        text, related = _describe_factor(factor, self.n_label)
        message = f"scaled by {text}"
        if related in ("(n-1)/n", "n/(n-1)"):
            message += ": Bessel's correction? (n vs n-1)"
        elif related in ("√((n-1)/n)", "√(n/(n-1))"):
            message += ": Bessel's correction under a square root? (a variance divided by n where it should be n-1, " \
                       "or the reverse)"
        elif related in ("n", "1/n"):
            message += ": a 1/n too many or too few?"
        elif related == "sqrt":
            message += ": a **0.5 or **-0.5 too many or too few (attention's head_size**-0.5)?"
        return message

    def _inherited_message(self, upstream: list[str], node: int) -> str:
        if not upstream:  # the rows in between pass, within tolerance, yet carry the error on
            text = "inherited: this line is right given your upstream gradients"
            cause = self._nearest_error_above(node)
            return text + (f" (the error starts at d{cause})" if cause else "")
        names = _names(upstream)
        text = f"inherited from {names}: this line is right given your {names}"
        root = self._root_cause(upstream)
        if root and root not in upstream:
            text += f" (the error starts at d{root})"
        return text

    def _wrong_message(self, node: int, mine: Tensor, ref: Tensor, upstream_off: bool = False) -> str:
        """What can be said of a wrong value; ``ref`` is what the learner's upstream gives when that is off."""
        if not torch.isfinite(mine).all():
            return "contains nan or inf"
        shape, ref_shape = tuple(mine.shape), tuple(ref.shape)
        if shape != ref_shape:
            text = f"wrong shape: got {_shape(shape)} for {_shape(ref_shape)}"
            other = self._other_gradient(node, mine)
            if other:
                return f"{text}: {other}"
            over = self._summed_too_much(node, mine, ref_shape)
            if over:
                return f"{text}: {over}"
            for branch in self.right.get(node) or []:
                wide = tuple(branch.raw.shape)
                if wide not in (ref_shape, shape) and len(wide) == len(shape) == len(ref_shape) and all(
                        a in (1, b) for a, b in zip(shape, wide)):  # mine summed over other dims than the broadcast
                    mine_dims = [i for i, (a, b) in enumerate(zip(shape, wide)) if a != b]
                    right_dims = [i for i, (a, b) in enumerate(zip(ref_shape, wide)) if a != b]
                    return text + f": summed over dim {_dims(mine_dims)} of {_shape(wide)}; the broadcast " \
                                  f"happened along dim {_dims(right_dims)}"
            return text
        if not mine.any():
            return "all zeros; the right gradient is not"
        repeated = self._repeated_index_message(node, mine, ref)
        if repeated:
            return repeated
        if self._negligible(ref, node):
            return f"should be (nearly) zero; yours reaches {_number(mine.abs().max().item())}"
        if self._same_values_elsewhere(node, mine, ref):
            return "the right values in the wrong places: check the indices"
        said = self._other_gradient(node, mine) or self._local_derivative_alone(node, mine) or \
            self._swapped_message(node, mine, ref, upstream_off) or self._picked_message(node, mine, ref) or \
            self._localised_message(node, mine, ref)
        if said:
            return said
        scale = ref.abs().max().item()
        if upstream_off:  # the maxdiff column is from the right gradient: say which this one is from
            upstream = self._wrong_upstream(node)
            given = _names(upstream) if upstream else "upstream gradients"
            return f"maxdiff {_number(_maxdiff(mine, ref))} from what your {given} give, whose values reach " \
                   f"{_number(scale)}" + (self._rule_hint(node) or self._fan_out_hint(node))
        text = f"maxdiff {_number(_maxdiff(mine, ref))} where the right values reach {_number(scale)}"
        if _maxdiff(mine, ref) < 1e-3 * scale:
            text += (f": close ({_number(_maxdiff(mine, ref) / scale)} of the largest value) but more than float "
                     f"rounding gives: a small constant (an eps?) left out or added")
        return text + (self._rule_hint(node) or self._fan_out_hint(node))

    def _fan_out_hint(self, node: int) -> str:
        """`` (dbndiff sums 2 branches, through `bndiff2 = bndiff**2` and `bnraw = ...`: check each)``: where a
        tensor feeds several lines, which contributions its gradient adds up, or nothing."""
        consumers = list(dict.fromkeys(b.consumer for b in self.right.get(node) or []))
        if len(consumers) < 2:
            return ""
        lines = _names([self._branch_line(c) for c in consumers], prefix="")
        return f" (d{self.nodes[node]['name']} sums {len(consumers)} branches, through {lines}: check each)"

    def _rule_hint(self, node: int) -> str:
        """`` (h = torch.tanh(hpreact): d tanh(x)/dx = 1 - tanh(x)**2)``: the derivative of the one line that
        uses the tensor (through unnamed steps: ``bnvar_inv = (bnvar + 1e-5)**-0.5``), or nothing."""
        from .codegen import rule_notes

        notes, current = [], node
        for _ in range(4):
            consumers = [c for c in self.graph.nx.successors(current) if c in self.truth]
            if len(consumers) != 1:
                return ""
            data = self.nodes[consumers[0]]
            positions = [i for i, arg in enumerate(data["bargs"]) if getattr(arg, "node", None) == current]
            rule = rule_notes(data)
            fused = data.get("rule") is not None  # a rule of its own: no note to give
            if len(positions) != 1 or positions[0] >= len(rule) or not rule[positions[0]] or fused:
                return ""
            note = rule[positions[0]].removesuffix(", in torch's fused kernel")
            notes.append(note.removesuffix(", in torch's kernel"))
            if data["named"]:
                return f" ({self._forward_line(consumers[0])}: {' and '.join(notes)})"
            current = consumers[0]
        return ""

    def _cancelled_note(self, node: int) -> str:
        """For a right gradient that is about 0 because the parts summed into it cancel (the lecture's
        dlogit_maxes: softmax does not change when a row is shifted): values this small cannot tell the right
        formula from a wrong one, so the note names the right line. Nothing for other rows."""
        truth = self.truth[node]
        parts = [branch.raw for branch in self.right.get(node) or [] if branch.raw.numel()]
        if not parts or not truth.numel():
            return ""
        scale = max(float(part.abs().max()) for part in parts)
        size = float(truth.abs().max())
        if not (scale > 0 and math.isfinite(scale) and size <= _CANCELLED * scale):
            return ""
        right = self._assignment(node)
        return (f"(about 0: the parts summed into d{self.nodes[node]['name']}, up to {scale:.2g}, cancel to "
                f"{size:.2g}; any formula that gives about 0 passes, a wrong sign too"
                + (f". The right line: {right})" if right else ")"))

    def _assignment(self, node: int) -> str | None:
        """The answer key's line that computes a gradient in one go (``dlogit_maxes = (-dnorm_logits).sum(1,
        keepdim=True)``), without its note; None if it is built over several lines."""
        code = self._generated()
        variable = code.variables.get(node) if code is not None else None
        if variable is None:
            return None
        lines = [line.code for line in code.lines if line.code.startswith((f"{variable} = ", f"{variable} += "))]
        return lines[0] if len(lines) == 1 and lines[0].startswith(f"{variable} = ") else None

    def _picked_message(self, node: int, mine: Tensor, ref: Tensor) -> str | None:
        """Wrong exactly at the elements an index of the graph picks (``dlogits`` without
        ``dlogits[range(n), Yb] -= 1`` is off where ``logprobs[range(n), Yb]`` picks), or right only there and
        nonzero where the gradient is 0 (``dlogprobs`` = -1/n everywhere)."""
        if mine.dtype != ref.dtype or mine.numel() < 4:
            return None
        off = ~close(mine, ref, self._noise(node, ref), self.rtol, self.atol)
        count = int(off.sum())
        slip = (mine - ref).abs()[off] <= 10 * (self.atol + self.rtol * ref.abs()[off])
        if count == 0 or bool(slip.any()):  # a slip past allclose (a forgotten eps) is off a little everywhere
            return None
        if count > off.numel() // 4 and bool((ref[off].abs() <= self.atol).all()):
            where = self._picked_by(~off)  # dlogprobs = full_like(logprobs, -1/n): right where the loss picks only
            if where:
                return f"right at the {off.numel() - count} elements {where} picks; everywhere else ({count} " \
                       f"elements) it should be 0, and yours is not"
        if count > off.numel() // 4:
            return None
        where = self._picked_by(off)
        return f"wrong only at the {count} elements {where} picks (the others are right)" if where else None

    def _picked_by(self, mask: Tensor) -> str | None:
        """The expression of an indexing op of the graph (``logprobs[range(32), Yb]``) whose picked positions,
        in a tensor of ``mask``'s shape, are exactly ``mask``."""
        from .printer import expression

        for consumer, data in enumerate(self.nodes):
            if data["op"] != "getitem" or consumer not in self.truth or not data["inputs"]:
                continue
            source = data["inputs"][0]
            if tuple(self.nodes[source]["shape"]) != tuple(mask.shape):
                continue
            picked = self._local_derivative(consumer, source)
            if picked is not None and torch.equal(picked != 0, mask):
                return expression(self.graph, consumer)
        return None

    def _repeated_index_message(self, node: int, mine: Tensor, ref: Tensor) -> str | None:
        """dC[Xb] = demb: rows picked several times must add up, not overwrite."""
        for consumer in self.graph.nx.successors(node):
            data = self.nodes[consumer]
            if data["op"] not in _INDEX_OPS or consumer not in self.truth:
                continue
            counts = self._local_derivative(consumer, node)
            if counts is None:
                continue
            repeated = counts > 1.5
            if not repeated.any() or not self._close(mine[~repeated], ref[~repeated], node):
                continue
            off = ~torch.isclose(mine[repeated].to(ref.dtype), ref[repeated], rtol=self.rtol, atol=self.atol)
            if float(off.float().mean()) < 0.9:  # not an overwrite, which leaves one contribution of several
                return (f"wrong at {int(off.sum())} of the {off.numel()} elements whose index repeats (the "
                        f"other elements are right): a contribution is missing or extra there")
            return ("wrong only where an index repeats: those elements are picked more than once, so their "
                    "gradients must add up (index_add_, index_put_(..., accumulate=True) or += in a loop), "
                    "not overwrite each other")
        return None

    def _tie_message(self, node: int, mine: Tensor, ref: Tensor) -> str | None:
        """``(logits == logit_maxes).float() * dlogit_maxes``: right except where the max is tied."""
        value = self.nodes[node].get("value")
        for consumer in self.graph.nx.successors(node):
            data = self.nodes[consumer]
            kind = _SELECTIONS.get(data["op"])
            if kind is None or consumer not in self.truth or not isinstance(value, Tensor):
                continue
            tied = _ties(value, kind, data["attrs"].get("dim"))
            if tied is None or not tied.any() or not self._close(mine[~tied], ref[~tied], node) or \
                    self._close(mine[tied], ref[tied], node):
                continue
            name, dim = self.nodes[node]["name"], data["attrs"].get("dim")
            text = f"wrong only where the {kind} of {name} is tied ({int(tied.sum())} elements): "
            if data["op"] in ("max", "min") and isinstance(dim, int):
                return text + (f"{name}.{data['op']}({dim}) sends the gradient to the one index it returns (its "
                               f".indices: F.one_hot(...indices) picks it), not to every element equal to the {kind}")
            return text + (f"torch splits it evenly among the tied elements; ({name} == {kind}) alone gives each "
                           f"of them all of it: divide by how many are tied")
        return None

    def _other_gradient(self, node: int, mine: Tensor) -> str | None:
        """``dnorm_logits = dcounts`` (the upstream gradient passed on as it is), or the right gradient of another
        tensor: ``dbnbias`` holding ``dbngain`` (a pasted line), ``{"dW1": dW2}`` (a key or a list out of order)."""
        name = self.nodes[node]["name"]
        for consumer in self.graph.nx.successors(node):
            used = self.used.get(consumer)
            if self.nodes[consumer]["named"] and used is not None and tuple(used.shape) == tuple(mine.shape) and \
                    not self._negligible(used, consumer) and self._close(mine, used, consumer):
                upstream = self.nodes[consumer]["name"]
                whose = "your" if consumer in self.given else "the right"
                return (f"equals {whose} d{upstream}: the line passes d{upstream} on as it is, without the local "
                        f"derivative of {self._forward_line(consumer)} (chain rule: d{name} = local derivative * "
                        f"d{upstream})")
        for other in sorted(self.truth, reverse=True):
            right = self.truth[other]
            if other in (node, self.root) or tuple(right.shape) != tuple(mine.shape) or \
                    not (self.nodes[other]["named"] or other in self.given) or self._negligible(right, other):
                continue
            if self._close(mine, right, other):
                theirs = self.nodes[other]["name"]
                return f"equals the right d{theirs}, not d{name}: a line, key or list entry meant for d{theirs}?"
        return None

    def _local_derivative_alone(self, node: int, mine: Tensor) -> str | None:
        """``dprobs = 1.0 / probs``: the local derivative without the upstream gradient it multiplies."""
        consumers = [c for c in self.graph.nx.successors(node) if c in self.truth]
        if len(consumers) != 1 or not self.nodes[consumers[0]]["named"]:
            return None
        consumer = consumers[0]
        local = self._local_derivative(consumer, node)
        if local is None or not self._close(mine, local, node):
            return None
        upstream = self.nodes[consumer]["name"]
        return (f"the local derivative of {self._forward_line(consumer)} alone: multiply it by the upstream "
                f"gradient d{upstream} (chain rule)")

    def _swapped_message(self, node: int, mine: Tensor, ref: Tensor, upstream_off: bool) -> str | None:
        """``dhpreact = (1 - hpreact**2) * dh`` for ``(1 - h**2) * dh``: the right formula with another recorded
        tensor of the same shape (or one that broadcasts to it) in place of one its rules read (a forward value,
        directly or through unnamed ops, or the upstream gradient), found by running the line's rules with the swap
        (see ``_swaps``). Said only when exactly one swap gives the learner's value; a tensor with several consumers
        may have the swap in one branch, the others right."""
        branches = self.mine.get(node) if upstream_off else self.right.get(node)
        if not branches or any(b is None for b in branches):
            return None
        consumers = list(dict.fromkeys(b.consumer for b in branches))
        if len(consumers) > 10:
            return None
        hits: dict[tuple[int, str, str], None] = {}
        for consumer in consumers:
            upstream = self.used.get(consumer) if upstream_off else self.truth[consumer]
            if upstream is None:
                continue
            own = _total([b for b in branches if b.consumer == consumer])
            rest = None if len(consumers) == 1 or own is None else ref - own
            for old, new, swapped in self._swaps(consumer, node, upstream, upstream_off):
                total = swapped if rest is None else rest + swapped
                if not self._close(total, ref, node) and self._close(mine, total, node):
                    hits[(consumer, old, new)] = None
                    if len(hits) > 1:
                        return None  # two swaps fit: neither is named
        if len(hits) != 1:
            return None
        (consumer, old, new), = hits
        where = f"{new} where {old} belongs"
        if len(consumers) > 1:
            hint = self._branch_hint(node, consumer, textbook=True)
            if hint and not self._readable(self._generated(True), hint):  # dhprebn += dsub_1: a temporary
                hint = None
            return (f"the branch through {self._branch_line(consumer)} reads {where}; the rest is right"
                    + (f" (it should be {hint})" if hint else ""))
        line = self._answer_line(node, textbook=True)
        text = f"equals the right formula with {where} (a swapped variable?)"
        return text + (f"; the right line: {line}" if line else self._rule_hint(node))

    def _swaps(self, consumer: int, node: int, upstream: Tensor, upstream_off: bool
               ) -> Iterator[tuple[str, str, Tensor]]:
        """(what the rule reads, what stands in for it, the contribution to ``node``) for each swap: every
        named tensor a rule of the line reads replaced by each named recorded tensor of its shape and dtype (or of
        a shape that broadcasts to it), and the upstream gradient by each of the learner's earlier gradients of its
        shape. The line's rules are the consumer's and those of the unnamed ops it feeds up to the line's named
        tensor (``bnvar_inv = (bnvar + 1e-5)**-0.5``: the add's and the pow's); a named tensor is read directly or
        through unnamed ops (the pow reads ``bnvar + 1e-5``: that sum is recomputed with the stand-in)."""
        yield from self._read_swaps(consumer, node, upstream, upstream_off)
        named = self._gradient_name(consumer, upstream, upstream_off)
        if named is None:
            return
        for other, value in self.given.items():
            # only a gradient the learner has before this line: one of a later tensor (earlier in backward order)
            if other <= node or other == named or tuple(value.shape) != tuple(upstream.shape) or \
                    not value.is_floating_point():
                continue
            if not self._take_swap():
                return
            swapped = self._contribution(consumer, node, value.to(dtype=upstream.dtype, device=upstream.device))
            if swapped is not None:
                yield "d" + identifier(self.nodes[named]["name"]), "d" + identifier(self.nodes[other]["name"]), swapped

    def _read_swaps(self, consumer: int, node: int, upstream: Tensor, upstream_off: bool
                    ) -> Iterator[tuple[str, str, Tensor]]:
        """The swaps of what the rules of the consumer's line read (at most _SWAP_TRIES), each rule run from the
        upstream gradient of its op and the result passed down the line to ``node``."""
        chain = self._line_ops(consumer)
        tries = 0
        for level, op in enumerate(chain):
            data = self.nodes[op]
            base = data.get("rule") or getattr(OPS.get(data["op"]), "rule", None)
            above = upstream if level == 0 else self.used.get(op) if upstream_off else self.truth.get(op)
            if base is None or above is None:
                continue
            for position, old, new, value in self._stand_in_reads(op):
                tries += 1
                if tries > _SWAP_TRIES or not self._take_swap():
                    return
                swapped = self._down(chain[:level + 1], node, above, _swapped_rule(base, position, value))
                if swapped is not None:
                    yield identifier(self.nodes[old]["name"]), identifier(self.nodes[new]["name"]), swapped

    def _take_swap(self) -> bool:
        """One swap of the check's _SWAP_BUDGET, if any is left."""
        if self._swaps_left <= 0:
            return False
        self._swaps_left -= 1
        return True

    def _line_ops(self, consumer: int) -> list[int]:
        """``consumer``, then each unnamed op that alone uses the one before, up to the first named one (a few):
        the ops of the forward line that reads the row's tensor."""
        chain = [consumer]
        while not self.nodes[chain[-1]]["named"] and len(chain) < _SWAP_DEPTH:
            after = [c for c in self.graph.nx.successors(chain[-1]) if c in self.truth]
            if len(after) != 1:
                break
            chain.append(after[0])
        return chain

    def _down(self, chain: list[int], node: int, upstream: Tensor, rule: Any) -> Tensor | None:
        """What the last op of ``chain`` (run with ``rule``) sends, from ``upstream``, down the chain to ``node``."""
        grad: Tensor | None = upstream
        for level in reversed(range(len(chain))):
            below = chain[level - 1] if level else node
            grad = self._contribution(chain[level], below, grad, rule if level == len(chain) - 1 else None)
            if grad is None:
                return None
        return grad

    def _stand_in_reads(self, op: int) -> Iterator[tuple[int | None, int, int, Tensor]]:
        """(the argument position (None: the result), the named tensor swapped, its stand-in, the value the rule
        reads instead) for each swap of a tensor ``op``'s rule reads: a named one, or one a few unnamed ops
        compute from a named one (recomputed with the stand-in)."""
        data = self.nodes[op]
        reads = [(position, arg.node) for position, arg in enumerate(data["bargs"]) if arg.__class__ is Ref]
        if data["output_index"] is None:
            reads.append((None, op))
        for position, read in reads:
            shape = tuple(self.nodes[read]["shape"])
            for source in self._named_sources(read, _SWAP_DEPTH):
                for other in self._stand_ins(source):
                    value = self.nodes[other]["value"]
                    if source != read:
                        value = self._recomputed(read, source, value, _SWAP_DEPTH)
                    if value is None or tuple(value.shape) != shape and not _broadcasts_to(tuple(value.shape), shape):
                        continue
                    if tuple(value.shape) != shape:  # a broadcasting stand-in: the rule sees the read's shape
                        value = value.expand(shape)
                    yield position, source, other, value

    def _named_sources(self, read: int, depth: int) -> list[int]:
        """The named tensors ``read`` is computed from through at most ``depth`` unnamed ops (itself if named)."""
        data = self.nodes[read]
        if data["named"]:
            return [read]
        if depth == 0 or not _recomputable(data):
            return []
        found = [s for ref in refs_in((data["args"], data["kwargs"])) for s in self._named_sources(ref.node,
                                                                                                   depth - 1)]
        return list(dict.fromkeys(found))

    def _recomputed(self, read: int, source: int, value: Tensor, depth: int) -> Tensor | None:
        """``read``'s value recomputed through its unnamed ops with ``value`` in place of ``source``'s."""
        if read == source:
            return value
        data = self.nodes[read]
        if data["named"] or depth == 0 or not _recomputable(data):
            return data["value"]
        refs = {ref.node for ref in refs_in((data["args"], data["kwargs"]))}
        values = {}
        for ref in refs:
            values[ref] = self._recomputed(ref, source, value, depth - 1)
            if values[ref] is None:
                return None
        try:
            with torch.no_grad():
                out = data["func"](*substitute(data["args"], values),
                                   **{k: substitute(v, values) for k, v in data["kwargs"].items()})
        except (RuntimeError, ValueError, IndexError, TypeError):
            return None
        return out if isinstance(out, Tensor) and out.dtype == data["value"].dtype else None

    def _stand_ins(self, read: int) -> list[int]:
        """The named recorded tensors of ``read``'s shape and dtype, then those whose shape broadcasts to it
        (not single elements), each nearest in the recording first (a few dozen)."""
        data = self.nodes[read]
        shape, dtype = tuple(data["shape"]), data["dtype"]
        same = [n for n in self._swap_index().get((shape, dtype), []) if n != read]
        broadcast = [n for (other, kind), nodes in self._swap_index().items() if kind == dtype and other != shape
                     and _broadcasts_to(other, shape) for n in nodes]
        return (sorted(same, key=lambda n: abs(n - read)) + sorted(broadcast, key=lambda n: abs(n - read))
                )[:_SWAP_CANDIDATES]

    def _swap_index(self) -> dict[tuple[tuple, Any], list[int]]:
        """The named recorded tensors that can stand in for another (values not changed since), by shape and
        dtype: built once per check."""
        if self._stand_in_index is None:
            self._stand_in_index = {}
            for n, other in enumerate(self.nodes):
                if other["named"] and isinstance(other.get("value"), Tensor) and \
                        other["value"]._version == other["version"]:
                    self._stand_in_index.setdefault((tuple(other["shape"]), other["dtype"]), []).append(n)
        return self._stand_in_index

    def _gradient_name(self, consumer: int, upstream: Tensor, upstream_off: bool) -> int | None:
        """The named tensor whose gradient ``upstream`` is: the consumer, or the named tensor a few unnamed ops
        later whose gradient passes on unchanged (``logits = h @ W2 + b2``: the matmul's gradient is dlogits)."""
        current = consumer
        for _ in range(4):
            if self.nodes[current]["named"]:
                value = self.used.get(current) if upstream_off else self.truth[current]
                same = value is not None and tuple(value.shape) == tuple(upstream.shape) and \
                    self._close(upstream, value, current)
                return current if same else None
            after = [c for c in self.graph.nx.successors(current) if c in self.truth]
            if len(after) != 1:
                return None
            current = after[0]
        return None

    def _contribution(self, consumer: int, node: int, upstream: Tensor, rule: Any = None) -> Tensor | None:
        """What ``consumer``'s rule (or ``rule`` in its place) sends ``node`` from ``upstream``, in its shape."""
        target = self.nodes[node]
        try:
            parts = [sum_to(grad, target["shape"]).to(target["dtype"]) for source, grad in
                     input_gradients(self.nodes[consumer], call_rule(self.graph, consumer, upstream, rule))
                     if source == node]
            return sum(parts[1:], parts[0]) if parts else None
        except (RuntimeError, ValueError, IndexError, TypeError):
            return None

    def _localised_message(self, node: int, mine: Tensor, ref: Tensor) -> str | None:
        """Wrong at some elements only: how many, the first, and whether the right gradient is 0 there."""
        off = ~close(mine.to(ref.dtype), ref, self._noise(node, ref), self.rtol, self.atol)
        count, total = int(off.sum()), off.numel()
        if not 0 < count < total:
            return None
        first = tuple(int(i) for i in off.nonzero()[0])
        if self._negligible(ref[off], node):
            return (f"nonzero at {count} of {total} elements where the right gradient is 0 (the first at {first}); "
                    f"right elsewhere: only the elements the loss depends on get a gradient")
        if count > total // 2 or float((mine - ref)[off].abs().max()) < 1e-3 * float(ref.abs().max()):
            return None  # most are wrong, or all are nearly right (a forgotten eps): not a mistake in a few places
        where = f"one in each row, the first at {first}" if off.dim() == 2 and bool((off.sum(1) == 1).all()) else \
            f"the first at {first}"
        return f"wrong at {count} of {total} elements ({where}); the others are right"

    def _forward_line(self, node: int) -> str:
        """``bnvar_inv = (bnvar + 1e-05)**-0.5``: the forward line that computes a tensor, unnamed intermediates
        written out (a few deep), or its name alone if it cannot be printed."""
        from .printer import call, expression

        def source(input_: int, depth: int = 0) -> Any:
            data = self.nodes[input_]
            if not data["named"] and data["kind"] == "op" and not data["inplace"] and data["func"] is not None and \
                    depth < 4:
                try:
                    return call(data["func"], data["args"], data["kwargs"], lambda n: source(n, depth + 1),
                                output_index=data["output_index"])
                except ValueError:
                    pass
            return identifier(data["name"])

        name = self.nodes[node]["name"]
        try:
            return f"{name} = {expression(self.graph, node, source)}"
        except ValueError:
            return name

    def _same_values_elsewhere(self, node: int, mine: Tensor, ref: Tensor) -> bool:
        if self._close(mine, ref, node):
            return False
        a, b = mine.flatten(), ref.flatten()
        nonzero_a, nonzero_b = a[a != 0], b[b != 0]
        if nonzero_a.numel() != nonzero_b.numel() or nonzero_a.numel() == 0:
            return False
        return self._close(nonzero_a.sort().values, nonzero_b.sort().values, node)

    def _wrong_upstream(self, node: int) -> list[str]:
        """The nearest gradients downstream in the forward graph (upstream in backward) that are off."""
        found: list[str] = []
        seen: set[int] = set()
        frontier = list(self.graph.nx.successors(node))
        while frontier:
            consumer = frontier.pop()
            if consumer in seen or consumer not in self.truth:
                continue
            seen.add(consumer)
            row = self.rows.get(consumer)
            if row is not None and row.kind not in ("ok", "missing"):
                if row.name not in found:
                    found.append(row.name)
            elif row is None or row.kind == "missing":
                frontier.extend(self.graph.nx.successors(consumer))
        return sorted(found, key=lambda n: -self.graph._names[n])

    def _nearest_error_above(self, node: int) -> str | None:
        """The latest row, in backward order, that is a mistake and that this node's gradient depends on."""
        import networkx as nx

        above = nx.descendants(self.graph.nx, node)
        causes = [n for n in above if n in self.rows and self.rows[n].error]
        return self.rows[min(causes)].name if causes else None

    def _root_cause(self, upstream: list[str]) -> str | None:
        for name in upstream:
            row = self.rows[self.graph._names[name]]
            if row.kind != "inherited":
                continue
            if not row.upstream:  # inherited through rows that pass within tolerance
                cause = self._nearest_error_above(row.node)
                if cause:
                    return cause
            for above in row.upstream:
                cause = self._root_cause([above]) or above
                if self.rows[self.graph._names[cause]].error:
                    return cause
        for name in upstream:
            if self.rows[self.graph._names[name]].error:
                return name
        return None

    # ---------------------------------------------------------------- comparisons

    def _close(self, a: Tensor, b: Tensor, node: int | None = None, local: bool = False) -> bool:
        """allclose, plus the rounding allowance of ``node``'s gradient (the comparison is about that node).

        ``local``: ``b`` was computed from the learner's own upstream values, so only the rounding
        since those values counts (see ``rounding_noise``).
        """
        if tuple(a.shape) != tuple(b.shape):
            return False
        a = a.to(dtype=b.dtype, device=b.device) if a.dtype != b.dtype else a
        return bool(close(a, b, self._noise(node, b, local), self.rtol, self.atol).all())

    def _negligible(self, t: Tensor, node: int | None = None) -> bool:
        """Zero up to rounding: every element within atol (and ``node``'s rounding allowance) of 0."""
        if t.numel() == 0:
            return True
        noise = self._noise(node, t)
        bound = self.atol if noise is None else noise + self.atol
        return bool((t.abs() <= bound).all())

    def _noise(self, node: int | None, like: Tensor, local: bool = False) -> Tensor | float | None:
        noise = (self.local_noise if local else self.noise).get(node) if node is not None else None
        if noise is None or noise.numel() == 0:
            return None
        if tuple(noise.shape) == tuple(like.shape):
            return noise.to(dtype=like.dtype, device=like.device)
        return float(noise.max())  # a comparison in another layout (sorted, masked): the largest allowance


# ---------------------------------------------------------------- rounding


def _restarts(given: dict[int, Tensor], truth: dict[int, Tensor]) -> dict[int, Tensor]:
    """The learner's gradients that can stand in for the right ones in the magnitude pass."""
    restarts = {}
    for node, value in given.items():
        right = truth[node]
        if tuple(value.shape) == tuple(right.shape) and value.is_floating_point() and bool(value.isfinite().all()):
            restarts[node] = value.to(dtype=right.dtype, device=right.device).abs()
    return restarts


# ---------------------------------------------------------------- helpers


def _total(branches: list[_Branch | None] | None, summed: bool = True) -> Tensor | None:
    """The sum of a node's branches (None if a branch could not be computed)."""
    if not branches or any(b is None for b in branches):
        return None
    parts = [b.summed if summed else b.raw for b in branches]
    try:
        total = parts[0]
        for part in parts[1:]:
            total = total + part
    except RuntimeError:
        return None
    return total


def _bn_formula(xhat: Tensor, inv: Tensor, dxhat: Tensor, bessel: float, mean: bool = True, var: bool = True,
                dims: tuple[int, ...] = (0,), n: int | None = None) -> Tensor:
    """Batchnorm's input gradient from the gradient of the normalized value: ``inv/n * (n*dxhat - dxhat.sum(dims)
    - bessel * xhat * (dxhat*xhat).sum(dims))``, a term left out where ``mean`` or ``var`` is False; ``n``: the
    number of elements the sums run over, unless given."""
    n = math.prod(xhat.shape[d] for d in dims) if n is None else n
    out = n * dxhat
    if mean:
        out = out - dxhat.sum(dims, keepdim=True)
    if var:
        out = out - bessel * xhat * (dxhat * xhat).sum(dims, keepdim=True)
    return inv / n * out


def _bn_subset_slips(xhat: Tensor, inv: Tensor, dxhat: Tensor, unbiased: bool, dims: tuple[int, ...]) -> list[_Slip]:
    """The batchnorm gradient with its sums over some of the forward's ``dims`` only: the 2-d formula (sums over
    dim 0) applied to makemore part 5's 3-d input, whose statistics reduce over (0, 1). Its n is the count of
    either the dims summed or all of them, its Bessel factor either n's or the forward's."""
    slips: list[_Slip] = []
    total = math.prod(xhat.shape[d] for d in dims)
    over = _dims(list(dims))
    for size in range(1, len(dims)):
        for subset in itertools.combinations(dims, size):
            text = (f"equals the batchnorm gradient with its sums over dim {_dims(list(subset))} only: this forward's "
                    f"mean and variance reduce over dims {over}, so the sums in the gradient must too "
                    f"(.sum({over}, keepdim=True))")
            count = math.prod(xhat.shape[d] for d in subset)
            for n in dict.fromkeys((count, total)):
                factors = [m / (m - 1) for m in dict.fromkeys((n, total)) if m > 1] if unbiased else [1.0]
                slips += [("wrong", text, _bn_formula(xhat, inv, dxhat, bessel, dims=subset, n=n))
                          for bessel in factors]
    return slips


def _descendants(graph: Graph, node: int, depth: int) -> set[int]:
    """The tensors computed from ``node`` within ``depth`` ops."""
    return set(nx.single_source_shortest_path_length(graph.nx, node, cutoff=depth)) - {node}


def _ties(x: Tensor, kind: str, dim: Any) -> Tensor | None:
    """The elements of ``x`` equal to the max (min) along ``dim`` where two or more are; None for ``max(x, y)``."""
    if x.dim() == 0 or not x.is_floating_point():
        return None
    if dim is None or dim == () or dim == []:
        dims = list(range(x.dim()))
    elif isinstance(dim, int):
        dims = [dim]
    elif isinstance(dim, (tuple, list)) and all(isinstance(d, int) for d in dim):
        dims = list(dim)
    else:
        return None
    reduce = torch.amax if kind == "max" else torch.amin
    hit = x == reduce(x, dim=dims, keepdim=True)
    return hit & (hit.sum(dims, keepdim=True) > 1)


def _unbroadcast_fix(shape: tuple, ref_shape: tuple) -> tuple[list[int], str]:
    """The dims of ``shape`` that broadcasting from ``ref_shape`` added, and the sum that undoes it."""
    lead = len(shape) - len(ref_shape)
    kept = [lead + i for i, s in enumerate(ref_shape) if s == 1 and shape[lead + i] != 1]
    dims = list(range(lead)) + kept
    fix = f".sum({_dims(dims)}, keepdim=True)" if kept and not lead else (
        f".sum({_dims(dims)})" if not kept else f".sum_to_size{_shape(ref_shape)}")
    return dims, fix


def _coerce(value: Tensor, truth: Tensor) -> Tensor | None:
    """A learner's wrongly shaped value in the right shape, when there is an obvious way."""
    shape = tuple(truth.shape)
    if tuple(value.shape) == shape:
        return value
    if value.numel() == truth.numel():
        return value.reshape(shape)
    broadcast = _broadcast_shape(tuple(value.shape), shape)
    if broadcast == shape:
        return value.expand(shape)
    if broadcast == tuple(value.shape):
        try:
            return value.sum_to_size(shape)
        except RuntimeError:
            return None
    return None


def _broadcast_shape(a: tuple, b: tuple) -> tuple | None:
    try:
        return tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        return None


def _maxdiff(mine: Tensor, truth: Tensor) -> float:
    if _broadcast_shape(tuple(mine.shape), tuple(truth.shape)) is None:
        return math.nan  # no element of yours stands for one of the right gradient: no difference to give
    try:
        diff = (mine.to(truth.dtype) - truth).abs()
    except RuntimeError:
        return math.nan
    return float(diff.max()) if diff.numel() else 0.0


def _factor(mine: Tensor, ref: Tensor) -> float | None:
    """The least-squares c in mine ≈ c * ref."""
    a, b = mine.double().flatten(), ref.double().flatten()
    denom = float(b @ b)
    if denom == 0 or not math.isfinite(denom):
        return None
    factor = float(a @ b) / denom
    return factor if math.isfinite(factor) else None


def _describe_factor(factor: float, n: int | None) -> tuple[str, str | None]:
    """``(n-1)/n = 31/32`` when the factor is n-related, else ``3/2``, ``√8 = 2.82843`` or ``0.8731``."""
    if not math.isfinite(factor):
        return f"{factor}", None
    text = _simple_fraction(factor)
    if n and n > 2:
        candidates = {"(n-1)/n": (n - 1) / n, "n/(n-1)": n / (n - 1), "1/n": 1 / n, "n": float(n),
                      "1/(n-1)": 1 / (n - 1), "n-1": float(n - 1), "√((n-1)/n)": math.sqrt((n - 1) / n),
                      "√(n/(n-1))": math.sqrt(n / (n - 1))}
        for label, value in candidates.items():
            for sign in (1, -1):
                if abs(factor - sign * value) <= 1e-5 * abs(value):
                    label = label if sign > 0 else f"-{label}"
                    value = _simple_fraction(factor, max(64, n)) if "√" not in label else None
                    shown = f"{label} = {value or f'{factor:.6g}'} (n = {n})"
                    return (f"{label} with n = {n}" if label.lstrip("-") == "n" else shown), label.lstrip("-")
    if text is not None:
        return text, None
    root = _square_root(factor)
    if root is not None:
        return f"{root} = {factor:.6g}", "sqrt"
    return f"{factor:.6g}", None


def _simple_fraction(factor: float, limit: int = 64) -> str | None:
    """``2``, ``-3/2``: a ratio of small integers equal to the factor, else None.

    Denominators stop at ``limit``: with up to 1024, nearly every number has a fraction within the
    tolerance (``√8`` would read ``2786/985``).
    """
    fraction = Fraction(factor).limit_denominator(limit)
    if fraction == 0 or abs(float(fraction) - factor) > 1e-5 * abs(factor):
        return None
    return str(fraction.numerator) if fraction.denominator == 1 else f"{fraction.numerator}/{fraction.denominator}"


def _square_root(factor: float) -> str | None:
    """``√8``, ``-1/√8``: the factor as the square root of a whole number or its inverse, else None."""
    sign = "-" if factor < 0 else ""
    square = factor * factor
    for value, form in ((square, "√{}"), (1 / square, "1/√{}")):
        whole = round(value)
        if 2 <= whole <= 4096 and abs(value - whole) <= 1e-6 * value:  # (a few in 1,000 numbers pass by chance)
            return sign + form.format(whole)
    return None


def _dtype_mistake(dtype: torch.dtype, expected: torch.dtype) -> str | None:
    """``float16, expected float32`` for a gradient in a dtype that cannot hold it; None for a wider float."""
    if dtype == expected:
        return None
    wider = dtype.is_floating_point and expected.is_floating_point and torch.finfo(dtype).eps <= torch.finfo(
        expected).eps and torch.finfo(dtype).max >= torch.finfo(expected).max
    if wider:  # float64 for float32 keeps every digit: not a mistake
        return None
    return f"{_dtype_name(dtype)}, expected {_dtype_name(expected)}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_real(value: Tensor) -> Tensor:
    return value.real if value.is_complex() else value


def _nonfinite_message(value: Tensor) -> str:
    """``contains inf (12 of 2048 elements, the first at (0, 3))``: where a division by zero or overflow landed."""
    bad = ~torch.isfinite(value)
    kinds = [k for k, mask in (("nan", value.isnan()), ("inf", value.isinf())) if bool(mask.any())]
    first = tuple(int(i) for i in bad.nonzero()[0])
    return (f"contains {' and '.join(kinds)} ({int(bad.sum())} of {value.numel()} elements, the first at "
            f"{first}): a division by zero or an overflow?")


def _batch_size(graph: Graph) -> int | None:
    """The size the lecture calls n: the most common size among reduced dimensions (sum, mean, var ...)."""
    sizes: Counter[int] = Counter()
    for data in graph._nodes:
        if data["kind"] != "op" or data["op"] not in ("sum", "mean", "var", "std", "max", "min", "amax", "logsumexp"):
            continue
        source = data["inputs"][0] if data["inputs"] else None
        if source is None:
            continue
        shape = graph._nodes[source]["shape"]
        dim = data["attrs"].get("dim")
        dims = range(len(shape)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        for d in dims:
            if isinstance(d, int) and -len(shape) <= d < len(shape) and shape[d] > 1:
                sizes[shape[d]] += 1
    return sizes.most_common(1)[0][0] if sizes else None


def _names(names: list[str], prefix: str = "d") -> str:
    names = [prefix + n for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _shape(shape: tuple) -> str:
    return str(tuple(shape))


def _dims(dims: list[int]) -> str:
    return str(dims[0]) if len(dims) == 1 else "(" + ", ".join(map(str, dims)) + ")"


def _recomputable(data: dict[str, Any]) -> bool:
    """An op node whose value its recorded call gives again (one output, not in place, unchanged since)."""
    return data["kind"] == "op" and data["func"] is not None and not data["inplace"] and \
        data["output_index"] is None and isinstance(data.get("value"), Tensor) and \
        data["value"]._version == data["version"]


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    """A tensor of ``shape`` (more than one element) broadcasts to ``target`` without changing it."""
    if math.prod(shape) <= 1 or len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(shape[::-1], target[::-1]))


def _swapped_rule(rule: Any, position: int | None, value: Tensor) -> Any:
    """``rule`` reading ``value`` as its argument at ``position`` (None: as the op's result)."""
    def swapped(grad: Tensor, out: Any, *args: Any, **kwargs: Any) -> Any:
        if position is None:
            return rule(grad, value, *args, **kwargs)
        args = (*args[:position], value, *args[position + 1:])
        return rule(grad, out, *args, **kwargs)

    return swapped


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}"


__all__ = ["CheckReport", "CheckRow", "ERROR_KINDS", "KINDS", "check", "nonfinite_forward"]
