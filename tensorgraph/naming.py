"""Name recorded nodes after the user's own variables.

At the end of a ``record()`` block the recorder looks, in this order, at: the block's
own local variables, its module's globals, attributes and items of the objects they
hold, at most :data:`WALK_DEPTH` steps deep (``layers[0].out``, ``model.fc1.weight``; the
user's objects, not tensorgraph's own graphs and gradients, which hold earlier steps, nor a
library's objects), the locals of every function that ran ops inside the block, then of
their callers that ran none (their frames keep their final locals), and last a notebook's
output cache (IPython's ``Out``).
A tensor gets the first name found for it; other nodes get op-based names (``sum_3``).
Earlier versions of a tensor updated in place are named ``x_v0``, ``x_v1`` ... before the
final ``x``, and so are the earlier values of a variable rebound by plain assignments
(``wei = q @ k.T``; ``wei = wei.masked_fill(...)``; ``wei = F.softmax(wei, -1)``: ``wei_v0``,
``wei_v1``, ``wei``), numbered together with its in-place versions in the order they were made.
So are those of an attribute of a variable (``self.out = x @ W``; ``self.out = self.out + b``: ``layers[0].out_v0``,
after the name its last value has), and a value a function of the user's returns into the caller's variable
(``x = block(x)`` where ``block`` returns ``torch.tanh(x @ W)``) is that variable's, whether or not the caller
ran ops itself. A statement names a value only if its variable was seen holding it (:class:`StoredValues`):
``best = max(xs, key=score)`` names none of ``score``'s results.
"""

from __future__ import annotations
import __future__

import argparse
import dis
import os
import site
import sys
import sysconfig
import types
from collections.abc import Iterable
from itertools import chain, compress
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .graph import Graph

_MAX_ITEMS = 256
# how many attribute or item steps from a variable the search goes: ``n.layers[0].w`` is 3
# (``.layers``, ``[0]``, ``.w``); an nn.Module's parameters and buffers are found at any depth.
# Not 6 (micrograd's n.layers[0].neurons[1].w[2]): with such a net in the namespace, every recording
# would walk all its neurons (measured: +20% on the lecture's recording for 41 parameters, 3x for 3,600)
WALK_DEPTH = 3
_SKIP_TYPES = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
               __future__._Feature)  # ``annotations`` in a module that imports it from __future__
# values that hold no tensor: skipped without a call (a list of 256 logged losses cost ~80 us to walk)
_ATOMS = frozenset({int, float, bool, str, bytes, complex, type(None)})
# variables skipped by their exact type before any other check: a notebook's namespace is mostly these
_SKIP_FAST = _ATOMS | {types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
                       __future__._Feature}


class _Namer:
    def __init__(self, graph: Graph, *, lookup: bool = True) -> None:
        self.graph = graph
        # id(tensor) -> (node, version, tensor): the graph's own map of its tensors' latest versions
        self.latest: dict[int, tuple] = graph._live if lookup else {}
        self.named: dict[int, str] = {}
        self.used: set[str] = set()
        self.seen: set[int] = set()

    def offer(self, name: str, value: Any, *, unique_suffix: bool = False) -> None:
        live = self.latest.get(id(value))
        if live is None:
            return
        node = live[0]
        if node in self.named or name.startswith("_"):
            return
        if name in self.used and not unique_suffix:
            return
        self.named[node] = unique_name(name, self.used)

    def walk(self, prefix: str, value: Any, depth: int) -> None:
        """Attributes and items of user objects: ``layers[0].out``, ``model.fc1.weight``."""
        if isinstance(value, Tensor):
            self.offer(prefix, value)
            return
        if depth == 0 or id(value) in self.seen or not _WALKABLE[type(value)]:
            return
        self.seen.add(id(value))
        if isinstance(value, torch.nn.Module):
            for name, tensor in value.named_parameters():
                self.offer(f"{prefix}.{name}", tensor)
            for name, tensor in value.named_buffers():
                self.offer(f"{prefix}.{name}", tensor)
            for name, module in value.named_modules():
                for attr, item in vars(module).items():
                    if isinstance(item, Tensor):
                        self.offer(f"{prefix}.{name}.{attr}" if name else f"{prefix}.{attr}", item)
            return
        if isinstance(value, (list, tuple)):
            if len(value) <= _MAX_ITEMS:
                self._items(prefix, "[{}]", range(len(value)), list(value), depth)
        elif isinstance(value, dict):
            if len(value) <= _MAX_ITEMS:
                self._items(prefix, "[{!r}]", list(value), list(value.values()), depth, keyed=True)
        elif hasattr(value, "__dict__"):  # (a walkable type: the user's class, or a bag like SimpleNamespace)
            attrs = vars(value)
            self._items(prefix, ".{}", list(attrs), list(attrs.values()), depth, public=True)

    def _items(self, prefix: str, form: str, keys: Any, values: list, depth: int, *, keyed: bool = False,
               public: bool = False) -> None:
        """Offer the graph's tensors among ``values`` and walk the objects among them, in order.

        Only values of the types worth a look reach Python code (a list of 200 logged losses, or of 64
        data batches, is in the namespace at every record).
        """
        latest = self.latest
        kinds = _worth_a_look(values, depth)
        if not kinds:
            return
        if depth > 1 and not kinds.isdisjoint(_SEQUENCES):
            # the tuples and lists among the values (data batches): one look at all their items together
            nested = list(chain.from_iterable(compress(values, map(_SEQUENCES.__contains__, map(type, values)))))
            if not _worth_a_look(nested, depth - 1, latest):
                kinds = kinds - _SEQUENCES
        named = self.named
        for key, item in compress(zip(keys, values), map(kinds.__contains__, map(type, values))):
            if (keyed and not isinstance(key, (str, int))) or (public and key.startswith("_")):
                continue
            found = latest.get(id(item))
            if found is not None:
                if found[0] not in named:  # (a name is only formatted for a node still without one)
                    self.offer(prefix + form.format(key), item)
            elif depth > 1 and not isinstance(item, Tensor):
                self.walk(prefix + form.format(key), item, depth - 1)


def unique_name(name: str, used: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3`` ... if taken; the result is added to ``used``."""
    if name in used:
        k = 2
        while f"{name}_{k}" in used:
            k += 1
        name = f"{name}_{k}"
    used.add(name)
    return name


def assign_names(graph: Graph, caller: types.FrameType, frames: list[types.FrameType]) -> dict[int, str]:
    """Give every node of ``graph`` a unique name (see the module docstring); returns :func:`find_names`'s result."""
    found = find_names(graph, caller, frames)
    set_names(graph, found, frames=frames, rebound=True)
    return found


def find_names(graph: Graph, caller: types.FrameType, frames: list[types.FrameType]) -> dict[int, str]:
    """The user's variable names for the graph's tensors, by node (before versions and op-based names)."""
    # NOTE: this runs at the end of every record block. Only variables of the types worth a look (tensors,
    # objects that may hold some) reach Python code, in the namespace's order; a tensor whose id is in
    # graph._live is that very tensor (the graph keeps it alive)
    namer = _Namer(graph)
    live, named, used = graph._live, namer.named, namer.used
    in_graph = live.__contains__
    scopes = [caller.f_locals]
    if caller.f_globals is not caller.f_locals:
        scopes.append(caller.f_globals)
    objects = []  # variables that may hold tensors in attributes or items, walked after the plain tensors
    outputs = None  # IPython's output cache, walked last
    for variables in scopes:
        keys, values = list(variables), list(variables.values())  # (no tuple per variable: less for the gc)
        kinds = _worth_a_look(values, 2)
        for name, value in compress(zip(keys, values), map(kinds.__contains__, map(type, values))):
            if name.startswith("_"):
                continue
            found = live.get(id(value))
            if found is not None:
                if found[0] not in named and name not in used:
                    named[found[0]] = name
                    used.add(name)
            elif not isinstance(value, Tensor):
                if name == "Out" and value is variables.get("_oh"):
                    outputs = value
                else:
                    objects.append((name, value))
    for name, value in objects:
        namer.walk(name, value, depth=WALK_DEPTH)
    for frame in frames:
        if frame is caller:
            continue
        variables = frame.f_locals
        keys, values = list(variables), list(variables.values())
        for name, value in compress(zip(keys, values), map(in_graph, map(id, values))):
            node = live[id(value)][0]
            if node in named or name == "self" or name.startswith("_"):
                continue
            if name not in used:
                named[node] = name
                used.add(name)
            else:
                namer.offer(name, value, unique_suffix=True)
    if outputs is not None:
        # a cell that displayed ``layers`` put it in Out[3]: it names only what no variable of the user's does,
        # else the parameters would be Out[3][0].weight (``Out`` comes before the user's variables)
        namer.walk("Out", outputs, depth=WALK_DEPTH)
    return named


_SEQUENCES = frozenset({tuple, list})


def _worth_a_look(values: list, depth: int, latest: dict | None = None) -> frozenset:
    """The types among ``values`` that may name something: tensors, and objects that may hold some (depth left).

    One pass over the values' types (~20 ns a value); with ``latest``, empty unless one of the
    tensors among them is in the graph or an object is worth a walk.
    """
    kinds = frozenset(kind for kind in set(map(type, values)) if _TENSORS[kind] or (depth > 1 and _WALKABLE[kind]))
    if latest is not None and kinds and not any(depth > 1 and _WALKABLE[kind] for kind in kinds):
        if not any(map(latest.__contains__, map(id, values))):
            return frozenset()
    return kinds


class _PerType(dict):
    """``test(type)``, computed once per type (a namespace holds a few types, many times each)."""

    def __init__(self, test: Any) -> None:
        super().__init__()
        self.test = test

    def __missing__(self, cls: type) -> bool:
        self[cls] = result = self.test(cls)
        return result


def _walkable(cls: type) -> bool:
    """Whether a value of this type may hold tensors to name in attributes or items.

    Yes: ``nn.Module``s, lists, tuples and dicts (from any library), ``SimpleNamespace``-like
    records, and objects of the user's own classes. Not: atoms, modules, functions, classes,
    tensors (named directly or not at all), tensorgraph's own objects (graphs and gradients of
    earlier steps name nothing of this one), objects without a ``__dict__`` (``itertools.cycle``,
    a generator), and objects of the standard library's and installed libraries' other classes:
    their attributes are not the user's variables, and a notebook's matplotlib figure or
    IPython's ``exit`` would make every recording walk thousands of them.
    """
    module = getattr(cls, "__module__", None) or ""
    if (cls in _SKIP_FAST or issubclass(cls, (Tensor, type, *_SKIP_TYPES))
            or (module.startswith("tensorgraph.") and not module.startswith(_USER_MODULES))):
        return False
    if issubclass(cls, (torch.nn.Module, list, tuple, dict, *_RECORDS)):
        return True
    has_dict = any("__dict__" in vars(k) for k in cls.__mro__) or hasattr(cls, "__getattr__")
    return has_dict and not module.startswith(_OPAQUE_MODULES) and (
        module.startswith(_USER_MODULES) or not _from_a_library(module))


def _from_a_library(module_name: str) -> bool:
    """Whether a module is the standard library's or an installed package's, by where its file is."""
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return False  # a notebook's or a script's __main__, a class made by exec(): the user's code
    return os.path.realpath(path).startswith(_LIBRARY_DIRS)


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    if site.ENABLE_USER_SITE and site.USER_SITE:
        dirs.add(site.USER_SITE)
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


_LIBRARY_DIRS = _library_dirs()
_OPAQUE_MODULES = ("torch", "numpy", "builtins")  # objects whose attributes are not the user's variables
_USER_MODULES = ("tensorgraph.makemore", "tensorgraph.lecture")  # the makemore models are user objects
_RECORDS = (types.SimpleNamespace, argparse.Namespace)  # the standard library's bags of attributes
_TENSORS = _PerType(lambda cls: issubclass(cls, Tensor))
_WALKABLE = _PerType(_walkable)


def set_names(graph: Graph, named: dict[int, str], *, frames: list[types.FrameType] | None = None,
              rebound: bool = False) -> None:
    """Name the given nodes, their earlier in-place versions, and the rest after their ops.

    With ``rebound``, also the earlier values of variables rebound by assignments (see :func:`statement_values`;
    ``frames``, the block's calls in the order of the nodes' ``call``, finds a variable's last value when no
    assignment recorded in its call made it).
    """
    namer = _Namer(graph, lookup=False)
    namer.named = dict(named)
    namer.used = set(named.values())
    nodes = graph._nodes
    earlier, unresolved = _rebound_values(graph, namer.named, frames) if rebound else ({}, [])
    successor = _successors(nodes) if earlier or unresolved else {}
    for node, name in list(namer.named.items()):
        _name_versions(nodes, namer, node, name, earlier.get(node, ()), successor)
    for variable, values in unresolved:  # (after the user's names: a name of their own is never taken here)
        _name_values(nodes, namer, unique_name(variable, namer.used), values, successor)
    counters: dict[str, int] = {}
    for node, data in enumerate(nodes):
        name = namer.named.get(node)
        if name is None:
            base = data["op"].replace(".", "_")
            while True:
                counters[base] = counters.get(base, 0) + 1
                name = f"{base}_{counters[base]}"
                if name not in namer.used:
                    break
            namer.used.add(name)
        data["name"] = name
        data["named"] = node in namer.named
    graph._names = {data["name"]: node for node, data in enumerate(nodes)}


def _name_versions(nodes: list[dict], namer: _Namer, node: int, name: str, earlier: Any = (),
                   successor: dict[int, int] | None = None) -> None:
    """``x += 1`` makes versions: the older ones are ``x_v0``, ``x_v1`` ... (``earlier``: the variable's earlier
    values by assignment, numbered with them)."""
    chain = []
    current = node
    while nodes[current]["previous"] is not None:
        previous = nodes[current]["previous"]
        if previous in namer.named:
            break
        chain.append(previous)
        current = previous
    if earlier:
        _name_values(nodes, namer, name, [*chain, *earlier], successor or {})
        return
    for k, previous in enumerate(reversed(chain)):
        version_name = f"{name}_v{k}"
        if version_name not in namer.used:
            namer.named[previous] = version_name
            namer.used.add(version_name)


def _successors(nodes: list[dict]) -> dict[int, int]:
    """node -> its next version (the node of the in-place op that changed it)."""
    return {data["previous"]: node for node, data in enumerate(nodes) if data["previous"] is not None}


def _name_values(nodes: list[dict], namer: _Namer, name: str, values: list[int], successor: dict[int, int]) -> None:
    """Name a variable's earlier values ``name_v0``, ``name_v1`` ... in the order they were made, with the
    in-place versions of each (those still without a name)."""
    found: set[int] = set()
    for value in values:
        current: int | None = value
        while current is not None and current not in namer.named and current not in found:  # older versions
            found.add(current)
            current = nodes[current]["previous"]
        current = successor.get(value)
        while current is not None and current not in namer.named and current not in found:  # newer ones
            found.add(current)
            current = successor.get(current)
    for k, value in enumerate(sorted(found)):
        version_name = f"{name}_v{k}"
        if version_name not in namer.used:
            namer.named[value] = version_name
            namer.used.add(version_name)


def _rebound_values(graph: Graph, named: dict[int, str], frames: list[types.FrameType] | None
                    ) -> tuple[dict[int, list[int]], list[tuple[str, list[int]]]]:
    """The earlier values of rebound variables, still without a name: by the named node that is the variable's
    last value (its name is theirs, versioned), and (variable, values) for those whose last value has no name."""
    nodes = graph._nodes
    groups: dict[tuple, tuple[types.FrameType | None, str, list[int]]] = {}
    for node, data in enumerate(nodes):
        assigned = data.get("assigned")
        if assigned is None or any(part.startswith("_") for part in assigned[1].split(".")):
            continue
        frame = _storing_frame(frames, assigned)
        if frame is None and len(assigned) > 2:
            continue  # (a caller that ran no op, not the template's here)
        key = (id(frame), assigned[1]) if frame is not None else assigned
        groups.setdefault(key, (frame, assigned[1], []))[2].append(node)
    earlier: dict[int, list[int]] = {}
    unresolved = []
    successor: dict[int, int] | None = None
    for frame, variable, values in groups.values():
        if all(value in named for value in values):
            continue
        last = _last_value(graph, frame, variable)  # the value it holds at the end of the block
        if last is None or last not in named:
            last = values[-1]
            if successor is None:
                successor = _successors(nodes)
            while last in successor:  # the last value assigned, updated in place after the assignment
                last = successor[last]
        if last not in named:
            unresolved.append((variable, values))
        else:
            earlier.setdefault(last, []).extend(value for value in values if value != last and value not in named)
    return earlier, unresolved


def _storing_frame(frames: list[types.FrameType] | None, assigned: tuple) -> types.FrameType | None:
    """The frame whose variable a mark of :func:`statement_values` is: ``(call, target)``, the call's frame;
    ``(call, target, steps, code)`` (a caller that ran no op), the frame ``steps`` frames up from the call's
    if it runs ``code``."""
    if frames is None or assigned[0] >= len(frames):
        return None
    frame: types.FrameType | None = frames[assigned[0]]
    if len(assigned) > 2:
        for _ in range(assigned[2]):
            frame = frame.f_back if frame is not None else None
        if frame is None or frame.f_code is not assigned[3]:
            return None
    return frame


def _last_value(graph: Graph, frame: types.FrameType | None, variable: str) -> int | None:
    """The node of the value ``variable`` (``x``, or an attribute ``self.out``) of ``frame`` holds at the end of
    the block, if any."""
    if frame is None:
        return None
    name, _, attribute = variable.partition(".")
    value = frame.f_locals.get(name, frame.f_globals.get(name))
    if attribute:
        value = _stored_attribute(value, attribute)
    live = graph._live.get(id(value))
    return live[0] if live is not None else None


def _stored_attribute(obj: Any, attribute: str) -> Any:
    """``obj.attribute`` as stored in the object (its ``__dict__``, a module's buffers), without running a
    property or ``__getattr__`` of the user's."""
    try:
        value = vars(obj).get(attribute)
    except TypeError:  # (no __dict__)
        return None
    if value is None and isinstance(obj, torch.nn.Module):
        value = obj._buffers.get(attribute)
    return value


def statement_values(graph: Graph, frames: list[types.FrameType], start: int = 0,
                     callers: dict[int, tuple[types.FrameType, int] | None] | None = None,
                     held: set[tuple[int, str, int]] | None = None, ran: int | None = None) -> None:
    """Mark the nodes from ``start`` on that an assignment to a plain variable or to an attribute of one stored
    (``x = ...``, ``x += ...``, ``self.out = ...``): ``data["assigned"] = (call, target)``, the call (index in
    ``frames``, whose first ``ran`` ran ops; all by default) whose variable it is and ``"x"`` or ``"self.out"``;
    or ``(call, target, steps, code)`` where the variable is of a caller that ran no op (``h = block(x)``, then
    ``return h``): the frame ``steps`` frames up from the call's, running ``code`` (a replay of the recording,
    whose template checked the calls that ran ops only, finds it the same way, if it is there).

    A node's source holds the instruction of the user's frame that made the call and which execution of it
    it was (:meth:`tensorgraph.record._Recorder._source`): the node is the statement's candidate when the next
    instruction stores into a plain variable (or loads one and stores into its attribute), and it is the last
    call that execution made (``nn.Sequential`` makes several; a loop's ``x = layer(x)`` one per execution).
    When the next instruction returns it instead (``return torch.tanh(x @ W)``), the value is followed to the
    caller's instruction that made the call (``callers``: id(user frame) -> the user frame that called it and
    its instruction then), up through the callers that return it too: ``x = block(x)`` makes the callee's last
    value a candidate for the caller's ``x``. Tuple targets, items and chained assignments store differently and
    are not marked.

    A candidate is marked only where the target was seen holding it (``held``: (id(frame), target, node) that
    :class:`StoredValues` saw while recording; the node or a later in-place version of it): a builtin between
    the statement and the call (``best = max(xs, key=score)``, ``sorted``, ``map``) calls ``score`` and compares
    its results but stores something else. Without ``held``, every candidate is marked.
    """
    nodes = graph._nodes
    last_of: dict[int, int] = {}  # execution -> its last node
    for node in range(start, len(nodes)):
        source = nodes[node].get("source")
        if isinstance(source, tuple) and len(source) >= 6:
            last_of[source[5]] = node
    if not last_of:
        return
    if ran is None:
        ran = len(frames)
    calls = {id(frame): index for index, frame in enumerate(frames[:ran])}
    tables = {id(frame): _stores(frame.f_code) for frame in frames[:ran]}
    successor: dict[int, int] | None = None
    for node in last_of.values():
        data = nodes[node]
        if data["output_index"] is not None:
            continue
        source = data["source"]
        table = tables.get(source[3])
        target = table.get(source[4]) if table is not None else None
        storer: types.FrameType | None = None
        frame = source[3]
        if target == _RETURN:
            storer, target = _returned_to(frame, callers or {})
            frame = id(storer)
        if target is None:
            continue
        if held is not None:
            if successor is None:
                successor = _successors(nodes)
            if not _seen_holding(held, successor, frame, target, node):
                continue
        call = calls.get(frame)
        if call is not None:
            data["assigned"] = (call, target)
        elif storer is not None and source[3] in calls:  # a caller that ran no op: found from the call's frame
            steps = _steps_up(frames[calls[source[3]]], storer)
            if steps is not None:
                data["assigned"] = (calls[source[3]], target, steps, storer.f_code)


def _steps_up(frame: types.FrameType, caller: types.FrameType) -> int | None:
    """How many frames up from ``frame`` ``caller`` is (None: not within reach)."""
    current: types.FrameType | None = frame
    steps = 0
    while current is not None and steps <= _MAX_STEPS_UP:
        if current is caller:
            return steps
        current = current.f_back
        steps += 1
    return None


_MAX_STEPS_UP = 400  # (a call's callers lie within record's _MAX_CALL_DEPTH steps of torch's frames each)


def _seen_holding(held: set[tuple[int, str, int]], successor: dict[int, int], frame: int, target: str,
                  node: int) -> bool:
    """Whether the variable ``target`` of the frame ``frame`` was seen holding ``node``'s tensor (then, or after
    an in-place change of it)."""
    current: int | None = node
    while current is not None:
        if (frame, target, current) in held:
            return True
        current = successor.get(current)
    return False


def _returned_to(frame: int, callers: dict[int, tuple[types.FrameType, int] | None]
                 ) -> tuple[types.FrameType | None, str | None]:
    """(the user frame, its target) that a value returned by the user frame ``frame`` (its id) is stored in by
    its callers; the target is None if none stores it."""
    for _ in range(_MAX_RETURNS):
        link = callers.get(frame)  # to the caller's instruction that called this frame
        if link is None:
            return None, None
        caller, instruction = link
        frame = id(caller)
        target = _stores(caller.f_code).get(instruction)
        if target != _RETURN:
            return caller, target
    return None, None


class StoredValues:
    """What the user's statements were seen storing, while recording (the full path only: a replay copies the
    marks of its template).

    A statement whose instruction makes a recorded call (a torch op, or a call of a function of the user's that
    runs ops) and stores the result (``x = ...``, ``self.out = ...``) is watched: the tensor its target holds is
    noted when its frame is at such a statement storing into the same target again (the statement is over; or
    still running: a builtin calling the user's ``key=`` function again), and at the end of the block.
    :func:`statement_values` names a value after a statement's target only if the target was seen holding it.
    """

    def __init__(self) -> None:
        self.watched: dict[int, tuple[types.FrameType, set[str]]] = {}  # id(frame) -> (frame, its targets)
        self.held: set[tuple[int, str, int]] = set()  # (id(frame), target, node of the tensor it held)
        self.failed = False  # a read failed: nothing is known to be stored

    def moved(self, graph: Graph, frame: types.FrameType, instruction: int) -> None:
        """``frame`` is at ``instruction``, making a recorded call: watch its target; if it was watched already,
        note what it holds before the statement stores into it."""
        # NOTE: this runs once per statement of a first recording: a frame's locals (a copy of all of them, in
        # 3.11) are read only where a target is stored again
        target = _stores(frame.f_code).get(instruction)
        if target is None or target == _RETURN:
            return
        entry = self.watched.get(id(frame))
        if entry is None:
            self.watched[id(frame)] = (frame, {target})
        elif target in entry[1]:
            self._read(graph, frame, (target,))
        else:
            entry[1].add(target)

    def finish(self, graph: Graph) -> set[tuple[int, str, int]]:
        """At the end of the block: read every target watched (a returned frame keeps its final locals); returns
        :attr:`held` (empty after a failed read)."""
        if self.failed:
            return set()
        for frame, targets in self.watched.values():
            self._read(graph, frame, targets)
        self.watched.clear()
        return self.held

    def clear(self) -> None:
        self.watched.clear()
        self.held.clear()
        self.failed = False

    def _read(self, graph: Graph, frame: types.FrameType, targets: Iterable[str]) -> None:
        variables = frame.f_locals
        live = graph._live
        for target in targets:
            name, _, attribute = target.partition(".")
            value = variables[name] if name in variables else frame.f_globals.get(name)
            if attribute:
                value = _stored_attribute(value, attribute)
            found = live.get(id(value))
            if found is not None:
                self.held.add((id(frame), target, found[0]))


_MAX_RETURNS = 32  # callers a returned value is followed up through
_RETURN = "<return>"  # (_stores: the next instruction returns the value)
_STORES = frozenset({"STORE_FAST", "STORE_NAME", "STORE_GLOBAL", "STORE_DEREF"})
_LOADS = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW", "LOAD_NAME", "LOAD_GLOBAL", "LOAD_DEREF"})
_SKIPPED = frozenset({"CACHE", "EXTENDED_ARG", "NOP"})
_stored: dict[int, tuple[types.CodeType, dict[int, str]]] = {}  # id(code) -> (code, its table)


def _stores(code: types.CodeType) -> dict[int, str]:
    """Instruction offset -> what the next instructions do with its result, for a code object: store it in a
    variable (its name), in an attribute of one (``self.out``), or return it (``_RETURN``).

    Every offset within an instruction (3.11's inline caches, and its PRECALL) is in the table: a frame running a
    Python function called from it without a C call between (inlined) is at the call's last cache entry, and one
    running a builtin called by a specialized PRECALL (``abs(x)``, once the code is warm) at the PRECALL.
    """
    known = _stored.get(id(code))
    if known is not None and known[0] is code:
        return known[1]
    table: dict[int, str] = {}
    instructions = [instruction for instruction in dis.get_instructions(code) if instruction.opname not in _SKIPPED]
    for index in range(1, len(instructions)):
        instruction, after = instructions[index], instructions[index + 1] if index + 1 < len(instructions) else None
        begin = instructions[index - 1].offset
        if index > 1 and instructions[index - 2].opname == "PRECALL":  # (3.11: a specialized PRECALL makes the call)
            begin = instructions[index - 2].offset
        opname = instruction.opname
        if opname in _STORES:
            target = instruction.argval
        elif opname == "STORE_FAST_LOAD_FAST" and isinstance(instruction.argval, tuple):
            target = instruction.argval[0]  # (Python 3.13: a store and the next line's load, fused)
        elif opname in _LOADS and after is not None and after.opname == "STORE_ATTR":
            target = f"{instruction.argval}.{after.argval}"
        elif opname == "RETURN_VALUE":
            target = _RETURN
        else:
            continue
        for offset in range(begin, instruction.offset, 2):
            table[offset] = target
    if len(_stored) > 4096:  # (a notebook makes new code objects at every run of a cell)
        _stored.clear()
    _stored[id(code)] = (code, table)
    return table
