"""Repeated structure: recording templates and cached straight-line backward plans.

A training loop records the same graph at every step: the same ops, from the same lines,
on tensors of the same shapes. The engine exploits that in two places, without changing
a single result (names, sources, arguments, gradients: bit for bit what the first
recording of the structure gives).

**Recording templates.** A ``tg.record()`` block remembers the structure of its last
recording, keyed by the line of its ``with`` statement (per thread; a bounded cache, a few
structures per line). A line's first recording only marks the line as seen, so that
one-off recordings pay nothing; from the second on, a recording the full path made becomes
the line's template. The next recording checks each intercepted op against the template's
op at the same position: the same callable, from the same user frame and line, in the same
``tg.scope``; the same non-tensor arguments (compared strictly: ``1`` is not ``1.0`` or
``True``, ``-0.0`` is not ``0.0``; anything unusual never matches); every tensor argument
the same node as in the template, unchanged since it was recorded; new leaves of the same
shape, dtype, strides, device and ``requires_grad``; outputs of the same shapes and dtypes.
A matched op copies the template's nodes (arguments with Refs, bound arguments, attributes,
formatted source, op, kind ...) and adds only what belongs to the step: the value, its
version, the result tuple. An in-place op of the table on a tensor the graph made
(``h += b``, ``h.mul_(2)``: :func:`_plain_inplace`) is matched the same way, but before it
runs (:meth:`Session.before_inplace`), since the recorder keeps the old value first; it is
replayed only when the target shares memory with no other recorded tensor and has no
gradient hooks, so that keeping its own old value is all the full path would do. At the
first op that does not match, and at anything the template does not replay (other in-place
changes: ``x[i] = v``, ``inplace=True``, updates of leaves or through views; ops that
update an input, ``no_grad`` updates, ``.data`` writes, calls that return their own input),
matching stops for the rest of the block: the recorder's full path records the rest, and
the recording becomes the line's new template.

Once a structure has matched its template to the end twice, its checks are generated as
straight-line Python, one function per call (:func:`_matchers`), from factories shared by
calls with the same checks. A generated check accepts a subset of what the generic
:meth:`Session.match` accepts, with the same effects; anything it rejects goes through the
generic match, which also decides what a miss does.

A recording that matched its template to the end is finished cheaply: the user's variables
are looked up as always, and when they name the same nodes the op-based names and versions
(in place, and of rebound variables: the template's nodes carry the variable an assignment
stored them in) come with the template; the leaf snapshot reuses the template's grouping.

**Backward plans.** ``graph.backward`` on a graph that matched a template looks up a plan
for the root and the seed's shape: one generated Python function of straight-line torch
calls, taking the forward values it reads and the seed, returning exactly the gradients the
rule walk returns (every float node the loss depends on, in the same order; bit-identical
values, since they are the same kernels called with the same arguments in the same order).
The first backward of a structure walks the rule table; the second is traced
(:func:`tensorgraph.trace`) and its adjoint graph printed as the plan; later ones run the
plan. Before running it, the walk's checks are made: the leaf snapshot, the recorded
versions of every value the rule walk would check, and no node carrying its own rule. When
any check fails, the rule walk runs instead and raises exactly its own error.

No plan is cached when the traced backward read a tensor value into Python (``item()``,
``bool(t)`` ...), used an op whose output shape depends on tensor values (``nonzero``,
boolean masks), read a tensor that is neither a forward value nor made by a recorded call,
or failed to trace; nor when a gradient is incomplete (an input without a derivative, which the walk's
Gradients name); nor in anomaly mode (which keeps no templates). Graphs whose backward
raises (an op without a rule) never get a plan: the rule walk raises its error every time.
A graph whose tensors have gradient hooks never runs a plan (``engine.gradient_hooks``,
checked before this module is asked): the walk runs the hooks.
"""

from __future__ import annotations

import builtins
import itertools
import keyword
import linecache
import math
import operator
import sys
import threading
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import record as _rec  # record imports this module first: its helpers are looked up at call time
from .engine import NO_STAMPS, Gradients, LeafStamps, check_unchanged, seed_gradient, trace
from .graph import Ref
from .naming import find_names, set_names
from .ops import OPS, lookup

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["Plan", "Session", "Template", "session", "templates"]

MAX_TEMPLATE_NODES = 20_000  # a bigger recording keeps no template (it would hold ~1 KB per node)
MAX_CACHED_NODES = 60_000  # all templates of a thread together
MAX_TEMPLATES = 64  # lines with templates, per thread
PER_LINE = 4  # structures remembered per line (a loop may alternate between a few: train and eval steps)
GENERATE_AFTER = 2  # full matches before a template gets generated matchers (~0.1 ms per call to make)
_COUNTER = itertools.count(1)
_state: Any = None
_internal_code: dict = {}
_local = threading.local()


def templates() -> dict[tuple, list[Template]]:
    """This thread's templates, by (code object, line) of the ``with`` statement that recorded them, latest first."""
    cache = getattr(_local, "templates", None)
    if cache is None:
        cache = _local.templates = {}
    return cache


def session(caller: types.FrameType, graph: Graph) -> Session | None:
    """Start matching a recording made from ``caller``'s current line against that line's templates.

    None for the line's first recording: the line is only marked as seen (a one-off recording pays nothing).
    """
    global _state, _internal_code
    if _state is None:  # the recorder's thread state and its cache of internal code objects (record imports us)
        _state, _internal_code = _rec._state, _rec._internal_code
    key = (caller.f_code, caller.f_lineno)
    line = templates().get(key)
    if line is None:
        _keep(key, None)
        return None
    return Session(graph, key, line)


# ---------------------------------------------------------------- the structure of a recording


class _Event:
    """One recorded call that made new tensors (the recorder's common path), as the template checks it."""

    __slots__ = ("func", "first", "end", "code", "lasti", "line", "scope", "nargs", "refs", "consts", "generic",
                 "kwargs", "leaves", "single", "outputs", "device", "detach", "inplace", "expected", "call", "same")

    def __init__(self, func: Any, first: int, end: int, code: types.CodeType | None, lasti: int, line: int,
                 scope: tuple) -> None:
        self.func = func  # None: never matches (a call the template does not replay)
        self.first = first  # the id of the first node the call made (a new leaf or its first output)
        self.end = end  # one past its last node
        self.code = code  # the user's code object, and the line in it that made the call
        self.line = line
        self.lasti = lasti  # an instruction offset on that line: cheaper to compare than the line
        self.scope = scope
        self.nargs = 0
        self.refs: tuple = ()  # (position, node) of each tensor argument
        self.consts: tuple = ()  # (position, value) of each int, bool, str, None, dtype or plain float argument
        self.generic: tuple = ()  # (position, pattern) of every other argument (floats, tuples ...)
        self.kwargs: tuple = ()  # (name, pattern) in the call's order
        self.leaves: dict[int, tuple] = {}  # node -> (shape, dtype, stride, device, requires_grad) of each new leaf
        self.single: tuple | None = None  # (node, shape, dtype) of a call returning one tensor
        self.outputs: list[tuple | None] = []  # a call returning several: per output, as single, or None
        self.device: Any = None  # the output's device, checked for calls without tensor arguments
        self.detach = False  # x.detach() or x.data: the recorder tracks it as memory shared with x
        self.inplace = False  # h += b on a tensor the graph made: matched before it runs (Session.before_inplace)
        self.expected: Any = None  # what the recorder's fast path compares the next call with: func, None if in place
        self.call: int | None = None  # the user's call it ran in: its frame's rank among the block's (a node's "call")
        self.same = False  # in the same call as the template's previous call


_SIMPLE = frozenset({int, bool, str, type(None), torch.dtype})


def _event(nodes: list[dict[str, Any]], func: Any, first: int, end: int, code: types.CodeType | None, lasti: int,
           line: int, scope: tuple) -> _Event:
    """The template's record of the call that made nodes ``first .. end-1`` (its new leaves, then its outputs)."""
    event = _Event(None, first, end, code, lasti, line, scope)
    out = first
    while out < end and nodes[out]["kind"] == "leaf":
        out += 1
    if out == end or code is None:
        return event
    for node in range(first, out):
        value = nodes[node]["value"]
        if value.layout is not torch.strided:
            return event
        event.leaves[node] = (value.shape, value.dtype, value.stride(), value.device, value.requires_grad)
    head = nodes[out]
    if _holds((head["args"], head["kwargs"]), Tensor):
        return event  # stray tensors (not Refs) in the arguments cannot be compared
    if head["inplace"] and not _plain_inplace(nodes, head, func):
        return event
    event.inplace = bool(head["inplace"])
    event.call = head.get("call")
    event.detach = head["op"] == "detach" and bool(head["inputs"])
    if event.detach and lookup(func) is None:
        return event
    refs, consts, generic = [], [], []
    nested = False  # a tuple or list of tensors came first: later tensors are checked after it (new leaves in order)
    for position, pattern in enumerate(head["args"]):
        if pattern.__class__ is Ref and not nested:
            refs.append((position, pattern.node))
        elif pattern.__class__ in _SIMPLE or (pattern.__class__ is float and pattern == pattern and pattern != 0.0):
            consts.append((position, pattern))  # (-0.0 and nan need _same's care; other floats compare plainly)
        else:
            generic.append((position, pattern))
            nested = nested or _holds(pattern, Ref)
    event.nargs = len(head["args"])
    event.refs, event.consts, event.generic = tuple(refs), tuple(consts), tuple(generic)
    event.kwargs = tuple(head["kwargs"].items())
    if head["output_index"] is None:
        if end != out + 1:
            return event
        event.single = (out, torch.Size(head["shape"]), head["dtype"])
        if not head["inputs"]:
            event.device = head["value"].device
    else:
        if not head["inputs"]:
            return event
        by_index = {nodes[n]["output_index"]: n for n in range(out, end)}
        for index in range(len(head["result"])):
            node = by_index.get(index)
            event.outputs.append(None if node is None else (node, torch.Size(nodes[node]["shape"]),
                                                            nodes[node]["dtype"]))
        if [o[0] for o in event.outputs if o is not None] != list(range(out, end)):
            return event
    event.func = func
    event.expected = None if event.inplace else func
    return event


def _plain_inplace(nodes: list[dict[str, Any]], head: dict[str, Any], func: Any) -> bool:
    """An in-place op of the table (``h += b``, ``h.mul_(2)``) that made a new version of a tensor the graph made,
    of the same shape and dtype: what :meth:`Session.before_inplace` replays. Not ``x[i] = v`` (it writes through
    views), ``detach_`` (it makes shared memory), in-place ops on leaves, nor ``F.relu(h, inplace=True)``."""
    entry = lookup(func)
    previous = head["previous"]
    if entry is None or not entry[2] or entry[0].name in ("setitem", "detach") or previous is None:
        return False
    target = head["args"][0] if head["args"] else None
    before = nodes[previous]
    return (target.__class__ is Ref and target.node == previous and before["kind"] != "leaf"
            and head["output_index"] is None and head["shape"] == before["shape"] and head["dtype"] is before["dtype"])


# ---------------------------------------------------------------- generated matchers


def _call_fits(recorder: Any, frame: types.FrameType, call: int | None) -> bool:
    """Whether ``frame``, which is not the previous matched call's, is the template's user call number ``call``: the
    block's frame of that rank in order of first use, or the next new one (a loop running in one call what the
    template ran in two calls of the same function is another structure, with other clusters and names)."""
    order = recorder.frame_order
    if call is None:
        return False
    if call < len(order):
        return order[call] is frame
    return call == len(order) and id(frame) not in recorder.frames


def _user_frame(frame: types.FrameType | None, code: types.CodeType) -> types.FrameType | None:
    """The frame running ``code`` above ``frame``, if only torch's and tensorgraph's own frames lie between."""
    while frame is not None and frame.f_code is not code:
        internal = _internal_code.get(frame.f_code)
        if internal is None:
            internal = _rec._is_internal(frame.f_code)
        if not internal:
            return None
        frame = frame.f_back
    return frame


def _same_line(frame: types.FrameType, event: _Event) -> bool:
    """Another instruction than the template's: the same call if on the same line (3.11 specialises calls)."""
    if frame.f_lineno != event.line:
        return False
    event.lasti = frame.f_lasti
    return True


def _matcher_source(k: int, event: _Event, nodes: list[dict[str, Any]],
                    following: _Event | None) -> tuple[str, dict[str, Any]] | None:
    """:meth:`Session.match` for one template call, its checks unrolled: the body of ``match`` and its constants.

    The source names no node, literal or object of this call: those are the constants, so that calls
    with the same checks share one compiled factory (a chain of 1,000 ``tanh`` compiles once). The
    common cases are generated: tensor arguments (top level, or inside tuples and lists), other
    arguments compared as the generic match compares them, plain constant keyword arguments, each
    new leaf once. It accepts a subset of what the generic match accepts and has the same effects;
    anything it rejects is checked again by the generic match, which also decides what a miss does.
    None where only the generic match applies.
    """
    if (event.func is None or event.detach or event.inplace or event.code is None
            or (event.single is None and not event.outputs)
            or any(value.__class__ not in _SIMPLE or not name.isidentifier() for name, value in event.kwargs)):
        return None
    source = _MatcherSource(k, event, nodes, following)
    checks = source.arguments()
    if checks is None:
        return None
    lines = source.header() + checks + source.results() + [
        "    except Exception:  # noqa: BLE001 - the generic match makes the same check and stops matching",
        "        return False"] + source.effects(following is None) + ["    return True"]
    return "\n".join(lines) + "\n", source.constants


class _MatcherSource:
    """The parts of one generated matcher; ``constants`` collects what its source names by placeholder."""

    def __init__(self, k: int, event: _Event, nodes: list[dict[str, Any]], following: _Event | None) -> None:
        self.event = event
        self.nodes = nodes
        self.constants: dict[str, Any] = {"EVENT": event, "CODE": event.code, "SCOPE": event.scope,
                                          "FIRST": event.first, "END": event.end, "NEXT": k + 1,
                                          "KWARG_NAMES": tuple(name for name, _ in event.kwargs)}
        if following is not None:
            self.constants.update(NEXT_EVENT=following, NEXT_FUNC=following.expected)
        self.tensors: list[str] = []  # the tensor arguments' variables, for the check of writes through views
        self.leaves: list[tuple[str, int]] = []  # new leaves in the order the generic match meets them
        self.outputs: list[tuple[str, int]] = []  # (variable, node) of each output

    def header(self) -> list[str]:
        """The call's place: the graph's length, arity, keyword names, scope, and the user's frame and line."""
        kw = "tuple(kwargs) != KWARG_NAMES" if self.event.kwargs else "kwargs"
        return ["def match(session, recorder, args, kwargs, result):",
                "    try:",
                "        nodes = session.nodes",
                f"        if len(nodes) != FIRST or len(args) != {self.event.nargs} or {kw} or _state.scope != SCOPE:",
                "            return False",
                "        frame = _getframe(2)",
                "        if frame.f_code is not CODE:",
                "            frame = _user_frame(frame, CODE)",
                "            if frame is None:",
                "                return False",
                "        if frame.f_lasti != EVENT.lasti and not _same_line(frame, EVENT):",
                "            return False",
                *(["        if frame is not session.frame:", "            return False"] if self.event.same else
                  ["        if frame is session.frame or not _call_fits(recorder, frame, EVENT.call):",
                   "            return False"]),
                "        live = session.live",
                "        written = recorder.view_written"]

    def arguments(self) -> list[str] | None:
        """Tensor arguments (known nodes at their versions, or new leaves), literals, other patterns, keywords."""
        event, constants = self.event, self.constants
        lines: list[str] = []
        for position, node in event.refs:
            lines.append(f"        a{position} = args[{position}]")
            lines += self.tensor(f"a{position}", node)
        for position, value in event.consts:
            constants[f"CONST_{position}"] = value
            lines += [f"        c = args[{position}]",
                      f"        if c.__class__ is not CONST_{position}.__class__ or c != CONST_{position}:",
                      "            return False"]
        for position, pattern in event.generic:
            checks = _pattern_checks(f"args[{position}]", pattern, str(position), constants, self.tensor)
            if checks is None:
                return None
            lines += checks
        for name, value in event.kwargs:
            constants[f"KWARG_{name}"] = value
            lines += [f"        c = kwargs[{name!r}]",
                      f"        if c.__class__ is not KWARG_{name}.__class__ or c != KWARG_{name}:",
                      "            return False"]
        first_output = event.single[0] if event.single is not None else min(
            o[0] for o in event.outputs if o is not None)
        if [node for _, node in self.leaves] != list(range(event.first, first_output)):
            return None  # a new leaf passed twice, or out of order: the generic match knows these
        if self.tensors:
            lines += [f"        if written and ({' or '.join(f'id({t}) in written' for t in self.tensors)}):",
                      "            return False"]
        return lines

    def tensor(self, a: str, node: int) -> list[str]:
        """Checks that the tensor in variable ``a`` is the template's ``node``: known and unchanged, or a new leaf."""
        self.tensors.append(a)
        if node not in self.event.leaves:
            self.constants[f"N_{a}"] = node
            return [f"        f_{a} = live.get(id({a}))",
                    f"        if f_{a} is None or f_{a}[0] != N_{a} or {a}._version != f_{a}[1]:",
                    "            return False"]
        spec = f"LEAF_{a}"
        self.constants[spec] = self.event.leaves[node]
        earlier = "".join(f" or {a} is {b}" for b, _ in self.leaves)
        self.leaves.append((a, node))
        return [f"        if (id({a}) in live or not isinstance({a}, Tensor) or {a}.dtype is not {spec}[1]"
                f" or {a}.shape != {spec}[0]",
                f"                or {a}.requires_grad != {spec}[4] or {a}.layout is not _strided"
                f" or {a}.stride() != {spec}[2]",
                f"                or {a}.device != {spec}[3] or {a}.is_inference(){earlier}",
                f"                or ({a}.grad_fn is not None"
                f" and {a}.grad_fn._sequence_nr() >= session.sequence_at_entry)):",
                "            return False"]

    def results(self) -> list[str]:
        """The outputs: new tensors of the template's shapes and dtypes (and device, for a call without tensors)."""
        event = self.event
        if event.single is not None:
            device = " or result.device != EVENT.device" if event.device is not None else ""
            self.outputs.append(("result", event.single[0]))
            self.constants.update(SHAPE=event.single[1], DTYPE=event.single[2])
            return ["        if (not isinstance(result, Tensor) or result.dtype is not DTYPE or result.shape != SHAPE",
                    f"                or id(result) in live{device}):",
                    "            return False"]
        lines = [f"        if not isinstance(result, (tuple, list)) or len(result) != {len(event.outputs)}:",
                 "            return False"]
        for index, spec in enumerate(event.outputs):
            o = f"o{index}"
            lines.append(f"        {o} = result[{index}]")
            if spec is None:
                lines += [f"        if {o} is not None:", "            return False"]
                continue
            self.outputs.append((o, spec[0]))
            lines += [f"        if (not isinstance({o}, Tensor) or {o}.dtype is not EVENT.outputs[{index}][2]"
                      f" or {o}.shape != EVENT.outputs[{index}][1] or id({o}) in live):",
                      "            return False"]
        return lines

    def effects(self, last: bool) -> list[str]:
        """What a match does: the template's nodes with this step's tensors, views, the frame, the next call."""
        several = self.event.single is None
        lines: list[str] = []
        for a, node in self.leaves:
            lines += _append(a, node, self.nodes, self.constants)
        if several:
            lines.append("    together = tuple(result)")
        for o, node in self.outputs:
            lines += _append(o, node, self.nodes, self.constants, together=several)
            lines += [f"    base = {o}._base",
                      "    if base is not None:",
                      f"        recorder.views.setdefault(id(base), []).append({o})"]
        if not self.event.same:
            lines += ["    if id(frame) not in recorder.frames:  # (recorder.keep_frame, inlined)",
                      "        recorder.frames[id(frame)] = frame",
                      "        recorder.frame_order.append(frame)",
                      "    session.frame = frame"]
        lines += ["    session.count = END", "    session.cursor = NEXT"]
        if last:
            return lines + ["    session.event = session.expected = session.fast = None"]
        return lines + ["    session.event = NEXT_EVENT",
                        "    session.expected = NEXT_FUNC",
                        "    session.fast = session.matchers[NEXT]"]


def _pattern_checks(value: str, pattern: Any, label: str, constants: dict[str, Any],
                    tensor_checks: Callable[[str, int], list[str]]) -> list[str] | None:
    """Checks of a non-constant argument, as :meth:`Session._check` makes them (None: not generated)."""
    cls = pattern.__class__
    if cls is Ref:  # a tensor after a tuple or list of tensors (torch.lstm_cell(x, (h, c), w_ih, ...))
        t = f"t{label}"
        return [f"        {t} = {value}", f"        if not isinstance({t}, Tensor):",
                "            return False"] + tensor_checks(t, pattern.node)
    if (cls is tuple or cls is list) and _holds(pattern, Ref):
        v = f"v{label}"
        lines = [f"        {v} = {value}",
                 f"        if {v}.__class__ is not {cls.__name__} or len({v}) != {len(pattern)}:",
                 "            return False"]
        for i, item in enumerate(pattern):
            if item.__class__ is Ref:
                t = f"t{label}_{i}"
                lines += [f"        {t} = {v}[{i}]", f"        if not isinstance({t}, Tensor):",
                          "            return False"] + tensor_checks(t, item.node)
            else:
                checks = _pattern_checks(f"{v}[{i}]", item, f"{label}_{i}", constants, tensor_checks)
                if checks is None:
                    return None
                lines += checks
        return lines
    if _holds(pattern, (Ref, Tensor)):
        return None
    constants[f"PATTERN_{label}"] = pattern
    return [f"        if not _same({value}, PATTERN_{label}):", "            return False"]


def _append(value: str, node: int, nodes: list[dict[str, Any]], constants: dict[str, Any], *,
            together: bool = False) -> list[str]:
    """Add the template's node ``node`` with this step's tensor ``value``."""
    constants[f"NODE_{value}"], constants[f"N_{value}"] = nodes[node], node
    lines = [f"    data = NODE_{value}.copy()", f"    data['value'] = {value}"]
    if together:
        lines.append("    data['result'] = together")
    return lines + [f"    version = data['version'] = {value}._version",
                    "    nodes.append(data)",
                    f"    live[id({value})] = (N_{value}, version, {value})"]


_FACTORIES: dict[str, Callable[..., Callable]] = {}  # a matcher's source -> its compiled factory
MAX_FACTORIES = 1024


def _matchers(events: list[_Event], nodes: list[dict[str, Any]]) -> list[Callable | None]:
    """One generated matcher per template call (None where the generic match must run).

    Calls with the same checks share a factory, compiled once per process (~0.4 ms each); each
    matcher is its factory called with the call's own constants.
    """
    matchers: list[Callable | None] = [None] * len(events)
    for k, event in enumerate(events):
        made = _matcher_source(k, event, nodes, events[k + 1] if k + 1 < len(events) else None)
        if made is None:
            continue
        source, constants = made
        factory = _FACTORIES.get(source)
        if factory is None:
            if len(_FACTORIES) >= MAX_FACTORIES:
                _FACTORIES.clear()
            factory = _FACTORIES[source] = _factory(source, sorted(constants))
        matchers[k] = factory(**constants)
    return matchers


def _factory(source: str, names: list[str]) -> Callable[..., Callable]:
    """Compile ``make(<names>)``, which returns the ``match`` of ``source`` over those names."""
    body = "".join(f"    {line}\n" if line else "\n" for line in source.splitlines())
    text = f"def make(*, {', '.join(names)}):\n{body}    return match\n"
    namespace: dict[str, Any] = {"_getframe": sys._getframe, "_state": _rec._state, "_user_frame": _user_frame,
                                 "_call_fits": _call_fits,
                                 "_same_line": _same_line, "_same": _same, "Tensor": Tensor,
                                 "_strided": torch.strided}
    # (no linecache entry: a matcher's errors never leave it, they are a miss)
    exec(builtins.compile(text, "<tensorgraph matcher>", "exec"), namespace)  # noqa: S102 - the generated checks
    return namespace["make"]


class Template:
    """The last recording from one ``with`` line: its calls, its node data without values, and its backward plans."""

    def __init__(self, events: list[_Event], nodes: list[dict[str, Any]], found: dict[int, str],
                 names: dict[str, int], layout: list) -> None:
        self.events = events
        self.nodes = nodes  # each node's dict with no tensors in it (value and result are None)
        self.size = len(nodes)
        self.found = found  # the user-variable names naming found, by node
        self.names = names  # graph._names
        self.layout = layout  # the leaf checksums' grouping (LeafStamps.layout)
        self.plans: dict[tuple, Plan | None] = {}  # (root, seed) -> plan, or None where none can be made
        self.walked: set[tuple] = set()  # (root, seed) keys backpropagated once by the rule walk
        self.matchers: list[Callable | None] | None = None  # generated per event once the structure repeats
        self.matched = 0  # recordings that matched it to the end

    # ------------------------------------------------------------ backward

    def backward(self, graph: Graph, root: int, grad: Tensor | None) -> Gradients | None:
        """The gradients by this structure's plan for ``root``; None where the rule walk must run."""
        if graph.anomaly or torch._C._is_torch_function_mode_enabled():
            return None  # a mode around the backward records or changes its torch calls: the walk makes them
        if grad is None:
            key: tuple = (root, None)
        elif isinstance(grad, Tensor):
            key = (root, grad.shape, grad.dtype, grad.device)
        else:
            return None
        plan = self.plans.get(key, _MISSING)
        if plan is _MISSING:
            if key not in self.walked:  # the first backward of this structure: the rule walk
                self.walked.add(key)
                return None
            return self._trace(graph, root, grad, key)
        if plan is None:
            return None
        return plan.run(graph, root, grad)

    def _trace(self, graph: Graph, root: int, grad: Tensor | None, key: tuple) -> Gradients | None:
        """Backpropagate while recording the backward (the same kernels as the walk), and keep it as the plan."""
        stamps = graph._fingerprints
        if stamps:
            check_unchanged(graph, root)  # the walk's first check, kept out of the traced recording
        graph._fingerprints = None
        try:
            traced = trace(graph, root, grad)
        except Exception as err:  # noqa: BLE001 - the rule walk raises its own error, or succeeds where tracing cannot
            _last_refusal[0] = f"tracing the backward failed: {type(err).__name__}: {err}"
            self.plans[key] = None
            return None
        finally:
            graph._fingerprints = stamps
        incomplete = traced.grads.incomplete
        if incomplete:  # (the walk names a gradient left incomplete by an underived input; a plan would not)
            _last_refusal[0] = f"an incomplete gradient: the loss depends on {next(iter(incomplete.values()))}"
            self.plans[key] = None
        else:
            self.plans[key] = Plan.build(graph, root, grad, traced)
        return traced.grads


_MISSING = object()


# ---------------------------------------------------------------- backward plans

# ops whose output shape depends on tensor values: code after them may take another path at the next step
_DATA_DEPENDENT = frozenset({"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "nonzero_static",
                             "repeat_interleave", "bincount"})


class _Refused(Exception):
    """The traced backward cannot be replayed as straight-line code."""


_last_refusal = [""]  # why the last plan was refused (for tests and debugging)


class Plan:
    """A traced backward printed as one straight-line function ``plan(nodes, seed) -> {node: gradient}``."""

    __slots__ = ("fn", "unchanged", "source")

    def __init__(self, fn: Callable[[list, Tensor], dict[int, Tensor]], unchanged: Callable[[list], bool],
                 source: str) -> None:
        self.fn = fn
        self.unchanged = unchanged  # checks the versions of the values the rule walk would check
        self.source = source

    def run(self, graph: Graph, root: int, grad: Tensor | None) -> Gradients | None:
        """The rule walk's gradients, or None (the walk then runs and raises its own error) if a check fails."""
        nodes = graph._nodes
        stamps = graph._fingerprints
        if stamps:
            if not isinstance(stamps, LeafStamps):
                return None
            changed = stamps.changed()
            if changed and min(changed) <= root:
                return None
        if not self.unchanged(nodes):
            return None
        return Gradients(graph, self.fn(nodes, seed_gradient(graph, root, grad)), root)

    @classmethod
    def build(cls, graph: Graph, root: int, grad: Tensor | None, traced: Any) -> Plan | None:
        """The plan of a traced backward, or None where it could not replay it exactly."""
        try:
            return _Printer(graph, root, grad, traced).plan()
        except _Refused as why:
            _last_refusal[0] = str(why)
            return None


class _Printer:
    """Prints the needed calls of a traced backward as a Python function."""

    def __init__(self, graph: Graph, root: int, grad: Tensor | None, traced: Any) -> None:
        self.fwd = graph._nodes
        self.adj = traced.adjoint._nodes
        self.traced = traced
        self.root = root
        self.grad = grad
        self.namespace: dict[str, Any] = {}
        self.var: dict[int, str] = {}

    def plan(self) -> Plan:
        traced, fwd, adj = self.traced, self.fwd, self.adj
        if traced.adjoint._reads_values:
            raise _Refused("a rule read tensor values into Python")
        if any(data["rule"] is not None for data in fwd):
            raise _Refused("a node carries its own rule")
        grads = traced.grads.by_node
        seed = traced.node_of(grads[self.root])
        by_value = {id(data["value"]): node for node, data in enumerate(fwd)}
        if seed is None:
            raise _Refused("the seed was not recorded")
        if self.grad is not None and id(self.grad) in by_value:
            raise _Refused("the seed is a forward value (reads of it could not be told from reads of the seed)")
        outputs = []
        for node, g in grads.items():
            j = traced.node_of(g)
            if j is None:
                raise _Refused("a gradient was not made by a recorded call")
            outputs.append((node, j))
        needed = self._needed([j for _, j in outputs], seed)
        self.from_data: set[int] = set()  # adjoint nodes computed from forward values or the seed
        for j, data in enumerate(adj):
            if data["kind"] == "leaf" or any(i in self.from_data for i in data["inputs"]):
                self.from_data.add(j)
        lines = ["def plan(nodes, seed):"]
        groups: dict[tuple, str] = {}
        for j in sorted(needed):
            data = adj[j]
            if j == seed:
                self.var[j] = "seed"
            elif data["kind"] == "leaf":
                node = by_value.get(id(data["value"]))
                if node is None or fwd[node]["value"] is not data["value"]:
                    raise _Refused(f"the rules read {data['name']!r}, which is no forward value (it may differ "
                                   f"at the next step)")
                self.var[j] = f"x{node}"
                lines.append(f"    x{node} = nodes[{node}]['value']  # {fwd[node]['name']}")
            else:
                lines.extend(self._statement(j, data, groups))
        result = ", ".join(f"{node}: {self.var[j]}" for node, j in outputs)
        lines.append(f"    return {{{result}}}")
        checked = self._checks(grads)
        # (checked[0] twice: itemgetter gives a tuple even for one node)
        pick = operator.itemgetter(*checked, checked[0]) if checked else (lambda nodes: ())
        self.namespace.update(_pick=pick, _rule=operator.itemgetter("rule"),
                              _value=operator.itemgetter("value"), _recorded=operator.itemgetter("version"),
                              _version=operator.attrgetter("_version"))
        lines += ["", "", "def unchanged(nodes):",
                  '    """Whether the values the rule walk checks have their recorded versions (and no own rule)."""',
                  f"    datas = _pick(nodes)  # nodes {', '.join(map(str, checked))}",
                  "    if any(map(_rule, datas)):",
                  "        return False",
                  "    return list(map(_version, map(_value, datas))) == list(map(_recorded, datas))"]
        source = "\n".join(lines) + "\n"
        filename = f"<tensorgraph plan {next(_COUNTER)}>"
        exec(builtins.compile(source, filename, "exec"), self.namespace)  # noqa: S102 - the generated plan
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # tracebacks show it
        return Plan(self.namespace["plan"], self.namespace["unchanged"], source)

    def _needed(self, outputs: list[int], seed: int) -> set[int]:
        """The adjoint nodes the gradients need, and every in-place call (its side effect may be needed)."""
        adj = self.adj
        stack = outputs + [j for j, data in enumerate(adj) if data["inplace"]]
        needed: set[int] = set()
        while stack:
            j = stack.pop()
            if j in needed:
                continue
            needed.add(j)
            if j != seed:
                stack.extend(adj[j]["inputs"])
        return needed

    def _statement(self, j: int, data: dict[str, Any], groups: dict[tuple, str]) -> list[str]:
        op = data["op"]
        if data["func"] is None:
            raise _Refused(f"{data['name']!r} was not made by a call")
        if op in _DATA_DEPENDENT:
            shaping = data["inputs"]
        elif op in ("getitem", "index"):  # boolean masks
            shaping = [i for i in data["inputs"] if self.adj[i]["dtype"] in (torch.bool, torch.uint8)]
        else:
            shaping = ()
        if any(i in self.from_data for i in shaping):
            raise _Refused(f"{op} makes a shape that depends on tensor values")
        self.namespace[f"f{j}"] = data["func"]
        args = [self._arg(a) for a in data["args"]]
        for key, value in data["kwargs"].items():
            if not key.isidentifier() or keyword.iskeyword(key):
                raise _Refused(f"keyword argument {key!r}")
            args.append(f"{key}={self._arg(value)}")
        call = f"f{j}({', '.join(args)})"
        if data["inplace"]:  # the recorder's value is the changed tensor, whatever the call returns (x[i] = v)
            self.var[j] = self.var[data["previous"]]
            return [f"    {call}  # {data['name']}"]
        name = f"t{j}"
        self.var[j] = name
        if data["output_index"] is None:
            return [f"    {name} = {call}  # {data['name']}"]
        lines = []
        group = tuple(id(t) for t in data["result"])  # the outputs of one call come one after the other
        together = groups.get(group)
        if together is None:
            together = groups[group] = f"r{j}"
            lines.append(f"    {together} = {call}")
        lines.append(f"    {name} = {together}[{data['output_index']}]  # {data['name']}")
        return lines

    def _arg(self, value: Any) -> str:
        if value.__class__ is Ref:
            return self.var[value.node]
        cls = value.__class__
        if (cls is tuple or cls is list) and _holds(value, Ref):
            items = ", ".join(self._arg(v) for v in value)
            return f"({items},)" if cls is tuple else f"[{items}]"
        if _holds(value, (Tensor, Ref)):
            raise _Refused("a tensor argument that is not a recorded value")
        if value is None or value is True or value is False or cls is int:
            return repr(value)
        name = f"k{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def _checks(self, grads: dict[int, Tensor]) -> list[int]:
        """The nodes whose versions the rule walk checks: each node it runs a rule for, and that node's inputs."""
        fwd = self.fwd
        checked: set[int] = set()
        for node in grads:
            data = fwd[node]
            if not data["inputs"] or data["kind"] != "op":
                continue
            op = OPS.get(data["op"])
            if op is None or op.rule is None or data["unsupported"]:
                continue  # the walk returns no gradient for it (the trace would have raised otherwise)
            checked.add(node)
            checked.update(data["inputs"])
        return sorted(checked)


def _holds(value: Any, kinds: Any) -> bool:
    if isinstance(value, kinds):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds(v, kinds) for v in value)
    if isinstance(value, dict):
        return any(_holds(v, kinds) for v in value.values())
    if isinstance(value, slice):
        return _holds((value.start, value.stop, value.step), kinds)
    return False


# ---------------------------------------------------------------- matching a recording


class Session:
    """One ``tg.record()`` block: matches its calls against the template, logs them for the next one."""

    def __init__(self, graph: Graph, key: tuple, candidates: Any) -> None:
        self.graph = graph
        self.key = key
        self.nodes = graph._nodes
        self.live = graph._live
        self.others = list(candidates[1:])  # the line's other templates, tried in turn at the first call
        self.matching = bool(candidates)  # False from the first call that did not match
        self.cursor = 0  # the template event to match next
        self.frame: types.FrameType | None = None  # the user's frame of the last matched call
        self.count = 0  # nodes made by matched calls: always a prefix of the graph
        self.logged: list[tuple] = []  # calls the full path recorded: (func, first, end, code, lasti, line, scope)
        self.sequence_at_entry = _rec._NO_SEQUENCE  # the recorder's (record.made_in_block): set when the block begins
        self._use(candidates[0] if candidates else None)

    def _use(self, template: Template | None) -> None:
        self.template = template
        self.events = template.events if template is not None else []
        self.length = len(self.events)
        self.template_nodes = template.nodes if template is not None else []
        self.event = self.events[0] if self.events else None
        self.expected = self.event.expected if self.event is not None else None  # the recorder's fast path compares
        self.matchers = template.matchers if template is not None else None
        self.fast = self.matchers[0] if self.matchers and self.event is not None else None

    def match(self, recorder: Any, func: Any, args: tuple, kwargs: dict, result: Any) -> bool:
        """Record one call by copying the template's nodes, if it is the template's call at this position."""
        # NOTE: this runs for every op of a repeated recording: checks are flat, cheapest and likeliest first;
        # nothing changes unless the call matches
        try:
            if _rec._any_autocast():  # the full path marks the float ops recorded under torch.autocast
                return self._stop()
            for arg in args:  # an input returned as is (t.flatten(0, 0), x.float()): the recorder's alias path,
                if arg is result:  # no event, whether or not the graph has met the input yet
                    return False
            if kwargs and any(v is result for v in kwargs.values()):
                return False
            pending: list[Tensor] = []  # new leaves, made only if the whole call matches
            # (an in-place call never comes here: it is matched before it runs)
            frame = self._same_call(func, args, kwargs, pending, recorder, sys._getframe(2), False)
            if frame is None:
                return self._miss(recorder, func, args, kwargs, result)
            event, nodes, live = self.event, self.nodes, self.live
            single = event.single
            if single is not None:
                if (not isinstance(result, Tensor) or result.dtype is not single[2] or result.shape != single[1]
                        or id(result) in live or (event.device is not None and result.device != event.device)):
                    return self._miss(recorder, func, args, kwargs, result)  # a known result: an input returned as is
            elif not self._outputs(result, event.outputs):
                return self._miss(recorder, func, args, kwargs, result)
            # it matches: the nodes are the template's, with this step's values
            for value in pending:
                self._add_node(len(nodes), value)
            if single is not None:
                data = self._add_node(single[0], result)
                base = result._base
                if base is not None:
                    recorder.views.setdefault(id(base), []).append(result)
                elif event.detach:  # as the recorder's _add_op does: x's memory, not a view
                    origin = nodes[data["inputs"][0]]["value"]
                    base = origin._base if origin._base is not None else origin
                    recorder.data_of[id(result)] = base
                    recorder.views.setdefault(id(base), []).append(result)
            else:
                self._add_outputs(recorder, list(result), event.outputs)
            if frame is not self.frame:
                recorder.keep_frame(frame)
                self.frame = frame
            self.count = len(nodes)
            self._next()
            return True
        except Exception:  # noqa: BLE001 - a check that cannot be made is no match: the full path records the call
            return self._stop()

    def _next(self) -> None:
        """The template's next call becomes the one to match."""
        k = self.cursor = self.cursor + 1
        if k < self.length:
            event = self.event = self.events[k]
            self.expected = event.expected
            self.fast = self.matchers[k] if self.matchers else None
        else:
            self.event = self.expected = self.fast = None

    def _same_call(self, func: Any, args: tuple, kwargs: dict, pending: list[Tensor], recorder: Any,
                   caller: types.FrameType, inplace: bool) -> types.FrameType | None:
        """The user's frame if this is the template's call at this position, by the checks :meth:`match` and
        :meth:`before_inplace` share (the callable, the user's line, the scope, the arguments: new leaves go to
        ``pending``); else None. ``inplace``: the call is matched before it runs."""
        event = self.event
        # (x.T makes a new method-wrapper at each call: equal, not identical)
        if (event is None or event.inplace is not inplace or len(self.nodes) != self.count
                or (event.func is not func and event.func != func)):
            return None
        # the user's line: the first frame outside torch and tensorgraph, as the recorder's _source finds it
        frame = _user_frame(caller, event.code)
        if frame is None or (frame.f_lasti != event.lasti and not _same_line(frame, event)):
            return None
        if (frame is not self.frame) if event.same else (frame is self.frame or
                                                         not _call_fits(recorder, frame, event.call)):
            return None
        if _state.scope != event.scope or len(args) != event.nargs:
            return None
        return frame if self._arguments(event, args, kwargs, pending, recorder.view_written) else None

    def _arguments(self, event: _Event, args: tuple, kwargs: dict, pending: list[Tensor], written: dict) -> bool:
        """Whether the arguments are the template call's: each tensor its node at its recorded version, or a new
        leaf like the template's (collected in ``pending``), and the other arguments the same."""
        n = self.count
        live = self.live
        for position, node in event.refs:
            value = args[position]
            found = live.get(id(value))
            if found is None:
                if not isinstance(value, Tensor) or not self._leaf(value, node, n, pending, event):
                    return False
            elif found[0] != node or value._version != found[1]:
                return False
        for position, expected in event.consts:
            value = args[position]
            if value.__class__ is not expected.__class__ or value != expected:
                return False
        if event.generic:
            for position, expected in event.generic:
                if not self._check(args[position], expected, n, pending, event, written):
                    return False
        if kwargs or event.kwargs:
            if len(kwargs) != len(event.kwargs):
                return False
            for (name, value), (expected_name, expected) in zip(kwargs.items(), event.kwargs):
                if name != expected_name or not self._check(value, expected, n, pending, event, written):
                    return False
        return len(pending) == len(event.leaves) and not (
            written and any(id(args[p]) in written for p, _ in event.refs))

    def before_inplace(self, recorder: Any, func: Any, args: tuple, kwargs: dict) -> bool:
        """Before an in-place call (``h += b``) runs: if it is the template's call at this position, do what the
        recorder's ``_inplace_call`` does before the call (new leaves, the old value kept) and return True; the
        recorder then makes the call and :meth:`after_inplace` adds the new version. False: the full path records it.

        Checked before the call, since the old value must be kept first. Only a target that shares memory with no
        other recorded tensor (``recorder._live_aliases``) and has no gradient hooks is replayed: the full path then
        keeps its old value alone.
        """
        try:
            if _rec._any_autocast():
                return self._stop()
            pending: list[Tensor] = []
            frame = self._same_call(func, args, kwargs, pending, recorder, sys._getframe(2), True)
            if frame is None:
                return self._miss_inplace(recorder, func, args, kwargs)
            target = args[0]
            if target._backward_hooks or recorder._live_aliases(target):
                return self._stop()  # its aliases' old values and hooks: the full path's _mark_aliases, _keep_hooks
        except Exception:  # noqa: BLE001 - a check that cannot be made is no match: the full path records the call
            return self._stop()
        nodes = self.nodes
        for value in pending:
            self._add_node(len(nodes), value)
        self.count = len(nodes)  # (the template's copies are a prefix of the graph, should the call raise)
        if frame is not self.frame:
            recorder.keep_frame(frame)
            self.frame = frame
        recorder._snapshot(target)
        return True

    def after_inplace(self, recorder: Any, target: Tensor) -> None:
        """After a call :meth:`before_inplace` matched: its node, the target's new version, as the template's."""
        self._add_node(self.event.single[0], target)
        base = target._base
        if base is not None:  # (a view of memory no other recorded tensor shares: as the recorder's _add_op)
            recorder.views.setdefault(id(base), []).append(target)
        self.count = len(self.nodes)
        self._next()

    def _miss_inplace(self, recorder: Any, func: Any, args: tuple, kwargs: dict) -> bool:
        if self.cursor == 0 and self.others:
            self._use(self.others.pop(0))
            return self.before_inplace(recorder, func, args, kwargs)
        return self._stop()

    def _leaf(self, value: Tensor, node: int, n: int, pending: list[Tensor], event: _Event) -> bool:
        """A tensor the graph has not seen: the template's new leaf at this position, or a repeat of one."""
        for i, seen in enumerate(pending):
            if seen is value:
                return node == n + i
        spec = event.leaves.get(node)
        if (spec is None or node != n + len(pending) or value.dtype is not spec[1] or value.shape != spec[0]
                or value.requires_grad != spec[4] or value.layout is not torch.strided or value.stride() != spec[2]
                or value.device != spec[3] or value.is_inference()
                or _rec.made_in_block(value, self.sequence_at_entry)):
            return False  # (made in the block by code the recorder cannot see: the full path refuses it)
        pending.append(value)
        return True

    def _check(self, value: Any, expected: Any, n: int, pending: list[Tensor], event: _Event, written: dict) -> bool:
        """One argument against the template's (tensors as Refs, in lists and tuples as the recorder nests them)."""
        if isinstance(value, Tensor):
            if expected.__class__ is not Ref:
                return False
            found = self.live.get(id(value))
            if found is None:
                return self._leaf(value, expected.node, n, pending, event)
            return found[0] == expected.node and value._version == found[1] and id(value) not in written
        cls = value.__class__
        if (cls is tuple or cls is list) and expected.__class__ is cls:
            return len(value) == len(expected) and all(
                self._check(v, e, n, pending, event, written) for v, e in zip(value, expected))
        return _same(value, expected)

    def _outputs(self, result: Any, specs: list) -> bool:
        """A call returning several tensors (or None in places), as the template's did."""
        if result.__class__ is not tuple and not isinstance(result, (tuple, list)) or len(result) != len(specs):
            return False
        live = self.live
        for out, spec in zip(result, specs):
            if spec is None:
                if out is not None:
                    return False
            elif (not isinstance(out, Tensor) or out.dtype is not spec[2] or out.shape != spec[1]
                  or id(out) in live):
                return False
        return True

    def _add_node(self, node: int, value: Tensor, together: tuple | None = None) -> dict[str, Any]:
        """Append the template's node ``node`` with this step's tensor (and, for a multi-output call, its result)."""
        data = self.template_nodes[node].copy()
        data["value"] = value
        if together is not None:
            data["result"] = together
        version = data["version"] = value._version
        self.nodes.append(data)
        self.live[id(value)] = (node, version, value)
        return data

    def _add_outputs(self, recorder: Any, outputs: list, specs: list) -> None:
        together = tuple(outputs)
        for out, spec in zip(outputs, specs):
            if spec is None:
                continue
            self._add_node(spec[0], out, together)
            if out._base is not None:
                recorder.views.setdefault(id(out._base), []).append(out)

    def _miss(self, recorder: Any, func: Any, args: tuple, kwargs: dict, result: Any) -> bool:
        """The call is not the template's: the first call may still be another template's; later, matching stops."""
        if self.cursor == 0 and self.others:
            self._use(self.others.pop(0))
            return self.match(recorder, func, args, kwargs, result)
        return self._stop()

    def _stop(self) -> bool:
        self.matching = False
        self.event = self.expected = self.fast = None
        return False

    def log(self, func: Any, first: int, end: int, frame: types.FrameType | None, source: tuple,
            scope: tuple) -> None:
        """A call the full path recorded (nodes ``first .. end-1``, ``source`` found in ``frame``): for the template."""
        if frame is None:
            self.logged.append((func, first, end, None, -1, -1, scope))
        else:
            self.logged.append((func, first, end, frame.f_code, frame.f_lasti, source[1], scope))

    # ------------------------------------------------------------ the end of the block

    def finish(self, caller: types.FrameType, frames: list[types.FrameType], *, names: bool = True,
               check_leaves: bool = True) -> bool:
        """Finish a recording that matched its template entirely (names, checksums); False if it did not."""
        template = self.template
        graph = self.graph
        nodes = graph._nodes
        if (template is None or not self.matching or self.cursor != len(template.events)
                or len(nodes) != self.count or self.count != template.size):
            return False
        found = find_names(graph, caller, frames) if names else {}
        if found == template.found:
            graph._names = dict(template.names)  # the nodes' names and "named" flags came with the template's data
        else:
            set_names(graph, found, frames=frames, rebound=names)
        graph._fingerprints = LeafStamps.from_layout(template.layout, nodes) if check_leaves else NO_STAMPS
        graph._replay = template
        template.matched += 1
        if template.matched == GENERATE_AFTER:  # the structure repeats: its next recordings get generated matchers
            template.matchers = _matchers(template.events, template.nodes)
        if templates().get(self.key, [None])[0] is not template:  # the line's latest structure comes first
            _keep(self.key, template)
        return True

    def remember(self, found: dict[int, str], layout: list) -> None:
        """Make this recording (finished by the full path, its leaves grouped as ``layout``) its line's template."""
        graph = self.graph
        nodes = graph._nodes
        if len(nodes) > MAX_TEMPLATE_NODES:
            return
        events = self.events[:self.cursor] if self.count else []
        expected = self.count
        for entry in self.logged:  # matching stops at the first call it cannot replay: no events after it
            if entry[1] != expected:
                break
            event = _event(nodes, *entry)
            if event.func is None:
                break
            events.append(event)
            expected = event.end
        previous = None
        for event in events:
            event.same = event.call is not None and event.call == previous
            previous = event.call
        stripped = []
        for data in nodes:
            copy = data.copy()
            copy["value"] = None
            copy["result"] = None
            stripped.append(copy)
        template = Template(events, stripped, dict(found), dict(graph._names), layout)
        _keep(self.key, template)
        graph._replay = template


def _keep(key: tuple, template: Template | None) -> None:
    """Put a template first among its line's (the line becomes the most recent), within the cache's bounds.

    With no template, the line is only marked as seen: its next recording makes one.
    """
    cache = templates()
    line = [t for t in cache.pop(key, ()) if t is not template]
    cache[key] = ([template] if template is not None else []) + line[:PER_LINE - 1]
    total = sum(t.size for line in cache.values() for t in line)
    while len(cache) > MAX_TEMPLATES or total > MAX_CACHED_NODES:
        oldest = next(iter(cache))
        total -= sum(t.size for t in cache.pop(oldest))


def _same(value: Any, expected: Any) -> bool:
    """Whether a non-tensor argument equals the template's, strictly (type included; unusual values never)."""
    cls = value.__class__
    if cls is not expected.__class__:
        return False
    if cls is float:
        if value == expected:
            return value != 0.0 or math.copysign(1.0, value) == math.copysign(1.0, expected)
        return value != value and expected != expected  # nan
    if cls in _EQUAL:
        return value == expected
    if cls is tuple or cls is list or cls is torch.Size:
        return len(value) == len(expected) and all(_same(a, b) for a, b in zip(value, expected))
    if cls is range:
        return value.start == expected.start and value.stop == expected.stop and value.step == expected.step
    if cls is slice:
        return (_same(value.start, expected.start) and _same(value.stop, expected.stop)
                and _same(value.step, expected.step))
    return False


_EQUAL = frozenset({int, bool, str, type(None), type(Ellipsis), torch.dtype, torch.device, torch.layout,
                    torch.memory_format})
