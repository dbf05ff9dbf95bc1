"""The recorded graph: nodes in creation order, exposed as a networkx DAG.

Node ids are integers in creation order. Every node is created after its inputs, so this
order is a topological order by construction: the engine walks it backwards without
sorting. ``graph.nx`` is the networkx ``MultiDiGraph`` of the same nodes (one edge per
argument position, so ``x * x`` has two edges), built on first use, whose node attribute
dicts are the very dicts the engine reads.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import keyword
import os
import re
import sys
import types
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from torch import Tensor

if TYPE_CHECKING:
    from pathlib import Path

    from .check import CheckReport
    from .compare import CompareReport
    from .engine import Gradients
    from .naming import StoredValues

_GRAPHS: weakref.WeakSet[Graph] = weakref.WeakSet()


class Ref:
    """A recorded tensor argument: the id of the node that holds it."""

    __slots__ = ("node",)

    def __init__(self, node: int) -> None:
        self.node = node

    def __repr__(self) -> str:
        return f"Ref({self.node})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.node == self.node

    def __hash__(self) -> int:
        return hash(("Ref", self.node))


# every node has these keys; ops fill in the call, leaves keep the defaults
_NODE_DEFAULTS: dict[str, Any] = {
    "name": None, "named": False, "op": "leaf", "kind": "leaf", "attrs": {}, "source": None, "scope": (), "func": None,
    "args": (), "kwargs": {}, "bargs": (), "bkwargs": {}, "inplace": False, "previous": None,
    "output_index": None, "result": None, "unsupported": None, "version": 0, "rule": None,
}


def substitute(value: Any, values: Any) -> Any:
    """``value`` with every Ref (top level or inside a list/tuple) replaced by ``values[ref.node]``."""
    if isinstance(value, Ref):
        return values[value.node]
    if isinstance(value, (tuple, list)) and any(isinstance(v, Ref) for v in value):
        return type(value)(substitute(v, values) for v in value)
    return value


def refs_in(value: Any) -> list[Ref]:
    """The Refs in a call's arguments, at any depth of tuples, lists and dicts, in order."""
    if isinstance(value, Ref):
        return [value]
    if isinstance(value, (tuple, list)):
        return [ref for item in value for ref in refs_in(item)]
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in refs_in(item)]
    return []


class Graph:
    """A recorded forward pass. Create one with ``tg.record()``."""

    def __init__(self) -> None:
        self._nodes: list[dict[str, Any]] = []
        self._live: dict[int, tuple[int, int, Tensor]] = {}  # id(tensor) -> (node, version, tensor)
        self._names: dict[str, int] = {}
        self._nx: nx.MultiDiGraph | None = None
        self._fingerprints: dict[int, int] = {}  # leaf node -> fingerprint of its value at the end of recording
        self._recording = False  # inside its tg.record() block
        self._replay: Any = None  # the recording template this graph matched (tensorgraph.replay): backward plans
        self._user_names = True  # named after the user's variables (False: tg.record(names=False))
        # each call of a user function that ran ops (a node's "call" indexes it): (function, the call it was
        # made from, or None); render nests function clusters with it
        self._calls: list[tuple[str, int | None]] = []
        self._reads_values = False  # a recorded call read tensor values into Python (item(), bool(t) ...)
        # gradient hooks a tensor had when a recorded in-place op replaced it: they see the gradient of that
        # earlier version (as in torch, where they stay on its grad_fn); node -> (the tensor's hook dict, keys)
        self._version_hooks: dict[int, tuple[dict, tuple]] = {}
        self.anomaly = False
        _GRAPHS.add(self)

    # ---------------------------------------------------------------- construction

    def _add_node(self, *, value: Tensor, inputs: Iterable[int] = (), **attrs: Any) -> int:
        node = len(self._nodes)
        data = dict(_NODE_DEFAULTS)
        data.update(attrs)
        data["value"] = value
        data["inputs"] = list(inputs)
        data["shape"] = tuple(value.shape)
        data["dtype"] = value.dtype
        self._nodes.append(data)
        return node

    def _finish(self, caller: types.FrameType, frames: list[types.FrameType], start: int = 0, *,
                names: bool = True, callers: dict[int, tuple[types.FrameType, int] | None] | None = None,
                stored: StoredValues | None = None, ran: int | None = None) -> dict[int, str]:
        """End of the record block: name nodes after the caller's variables (op-based names only without
        ``names``), format sources.

        Nodes before ``start`` already have formatted sources (copied from a recording template). ``callers``:
        each user frame's caller and the instruction that called it, ``stored``: what the statements were seen
        storing (see :func:`tensorgraph.naming.statement_values`). ``frames``: the block's calls, the ``ran`` first
        of them those that ran ops (all by default), whose places are the nodes' ``call``.
        Returns the user-variable names found, by node (see :func:`tensorgraph.naming.find_names`).
        """
        from .naming import assign_names, set_names, statement_values

        if names:
            try:
                statement_values(self, frames, start, callers, stored.finish(self) if stored is not None else None,
                                 ran)
            except Exception:  # noqa: BLE001 - NOTE: it reads CPython's bytecode: where a Python it was not tested
                pass  # on lays it out otherwise, a rebound variable's earlier values keep op-based names
        short = _short_paths()  # relpath is slow: once per file and working directory, not once per node
        cells = notebook_cells()  # (not cached: a cell run again gets a new number)
        # a node's "call": its user frame's place among the block's frames in order of first use (the frames a
        # template's nodes were copied from came in the same order), so that two calls of one function differ
        calls = {id(frame): index for index, frame in enumerate(frames)}
        for data in itertools.islice(self._nodes, start, None):
            source = data.get("source")
            if isinstance(source, tuple):
                data["function"] = source[2]
                data["call"] = calls.get(source[3])
                path = short.get(source[0])
                if path is None:
                    number = cells.get(source[0])
                    path = f"In[{number}]" if number is not None else short.setdefault(source[0],
                                                                                       _short_path(source[0]))
                data["source"] = f"{path}:{source[1]}"
            elif source is None:
                data["source"] = ""
                data.setdefault("function", "")
                data.setdefault("call", None)
            scope = data.get("scope")
            data["scope"] = "/".join(scope) if scope else ""
        if not names:
            set_names(self, {})
            return {}
        return assign_names(self, caller, frames)

    # ---------------------------------------------------------------- lookups

    @property
    def nx(self) -> nx.MultiDiGraph:
        """The graph as a networkx MultiDiGraph (node attributes are shared with the engine)."""
        if self._nx is None or self._nx.number_of_nodes() != len(self._nodes):
            graph = nx.MultiDiGraph()
            for node, data in enumerate(self._nodes):
                graph.add_node(node)
                graph._node[node] = data  # share, not copy: one source of truth
            for node, data in enumerate(self._nodes):
                for position, source in enumerate(data["inputs"]):
                    graph.add_edge(source, node, key=position, position=position)
            self._nx = graph
            # networkx's cached views (G.nodes, G.edges ...) make a reference cycle with G, which would keep
            # every recorded tensor alive until the cyclic GC runs: empty G when this Graph is freed
            weakref.finalize(self, graph.clear)
        return self._nx

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self._nodes)))

    def __contains__(self, key: object) -> bool:
        try:
            self.node_id(key)
        except (KeyError, TypeError):
            return False
        return True

    @property
    def names(self) -> list[str]:
        """Every node's name, in creation order."""
        return [data["name"] for data in self._nodes]

    def node_id(self, key: Any) -> int:
        """The node of a tensor (its latest version), a name, or an id."""
        if isinstance(key, Tensor):
            live = self._live.get(id(key))
            if live is None or live[2] is not key:
                raise KeyError(f"this tensor was not recorded in this graph: {self.owner_message(key)}")
            return live[0]
        if isinstance(key, str):
            if key in self._names:
                return self._names[key]
            raise KeyError(f"no tensor named {key!r} in this graph{self._names_note()}{self._close_names(key)} "
                           f"(names: {', '.join(self._names)})")
        if isinstance(key, int) and not isinstance(key, bool):  # True is no node id, though an int to Python
            if 0 <= key < len(self._nodes):
                return key
            raise KeyError(f"no node {key} in this graph (its node ids run from 0 to {len(self._nodes) - 1})")
        raise KeyError(f"look tensors up by the tensor itself, its recorded name or its node id, not "
                       f"{type(key).__name__}")

    def _close_names(self, key: str) -> str:
        """For a misspelt name: the recorded names it is close to (a gradient's ``d`` prefix aside)."""
        if len(self._names) > 10_000:  # difflib over every name would make a big graph's error slow
            return ""
        wanted = [key, key[1:]] if key.startswith("d") and len(key) > 1 else [key]
        close = [name for text in wanted for name in difflib.get_close_matches(text, list(self._names), n=2,
                                                                               cutoff=0.75)]
        close = list(dict.fromkeys(close))[:3]
        return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""

    def _names_note(self) -> str:
        """For errors about a name: why the user's variable names are missing, if they are."""
        if self._user_names:
            return ""
        return ("; it was recorded with tg.record(names=False), so its nodes have op-based names only "
                "(look tensors up by the tensor itself, or record without names=False)")

    def node(self, key: Any) -> dict[str, Any]:
        """The attribute dict of a node (name, op, shape, dtype, inputs, attrs, source, value ...)."""
        return self._nodes[self.node_id(key)]

    def name_of(self, key: Any) -> str:
        return self._nodes[self.node_id(key)]["name"]

    def value(self, key: Any) -> Tensor:
        return self._nodes[self.node_id(key)]["value"]

    def ancestors(self, key: Any) -> set[int]:
        """Nodes the given node depends on (itself included)."""
        return nx.ancestors(self.nx, self.node_id(key)) | {self.node_id(key)}

    def owner_message(self, tensor: Tensor) -> str:
        """Why a tensor is not in this graph: recorded by another graph (named as there), or by none."""
        what = f"shape {tuple(tensor.shape)}, {str(tensor.dtype).replace('torch.', '')}"
        for other in list(_GRAPHS):
            live = other._live.get(id(tensor)) if other is not self else None
            if live is not None and live[2] is tensor:
                return (f"it belongs to another graph, where it is {other._nodes[live[0]]['name']!r} ({what}; "
                        f"recorded by a different tg.record() block)")
        if not self._nodes:
            return (f"it belongs to no graph (a tensor of {what}), and this graph recorded nothing: no torch op ran "
                    f"inside its tg.record() block. Put the forward pass inside the block (indented under "
                    f"`with tg.record() as graph:`)")
        return (f"it belongs to no graph (a tensor of {what} that was not produced or used inside this "
                f"tg.record() block). Compute it inside the block: a loss computed after the block ended is not "
                f"recorded. A tensor from a block without 'as graph' (with tg.record(): ...) belongs to "
                f"that block's graph, which nothing kept: write with tg.record() as graph:")

    # ---------------------------------------------------------------- the engine and friends

    def backward(self, loss: Any, grad: Tensor | None = None) -> Gradients:
        """Gradients of ``loss`` w.r.t. every recorded tensor it depends on, by tensor or by name."""
        from .engine import backward

        return backward(self, loss, grad)

    def compare(self, loss: Any, grad: Tensor | None = None) -> CompareReport:
        """Replay the graph under torch autograd and compare every gradient with the engine's."""
        from .compare import compare

        return compare(self, loss, grad)

    def render(self, path: Any = None, **options: Any) -> Any:
        """Draw the graph with Graphviz (see :func:`tensorgraph.render.render` for the options)."""
        from .render import render

        known = [name for name in inspect.signature(render).parameters if name not in ("graph", "path")]
        for option in options:
            if option not in known:  # render(grad=...) for grads=: Python's TypeError named no option it has
                close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise TypeError(f"render: no option {option!r} ({hint}the options: {', '.join(known)})")
        return render(self, path, **options)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        from .render import mimebundle

        return mimebundle(self)

    def _repr_svg_(self) -> str | None:
        """The forward view as SVG, for front ends that ask for SVG alone (None without Graphviz's ``dot``)."""
        return self._repr_mimebundle_().get("image/svg+xml")

    def check(self, manual: dict[str, Tensor], loss: Any, grad: Tensor | None = None, *, rtol: float | None = None,
              atol: float | None = None) -> CheckReport:
        """Diagnose hand-written gradients ``{"dlogits": dlogits, ...}``: see :func:`tensorgraph.check.check`."""
        from .check import check

        return check(self, manual, loss, grad, rtol=rtol, atol=atol)

    def backward_source(self, loss: Any, grad: Tensor | None = None, *, comments: bool = True,
                        textbook: bool = False) -> str:
        """The backward pass as straight-line torch code: see :func:`tensorgraph.codegen.backward_source`."""
        from .codegen import backward_source

        return backward_source(self, loss, grad, comments=comments, textbook=textbook)

    def fuse(self, output: Any, inputs: Any, **options: Any) -> Graph:
        """A new graph with the subgraph between ``inputs`` and ``output`` replaced by one fused node."""
        from .symbolic import fuse

        return fuse(self, output, inputs, **options)

    def save(self, path: Any, **options: Any) -> Path:
        """Write the graph as JSON or GraphML (see :func:`tensorgraph.serialize.save`); returns the path."""
        from .serialize import save

        return save(self, path, **options)

    def __repr__(self) -> str:
        ops = sum(1 for d in self._nodes if d["kind"] == "op")
        leaves = sum(1 for d in self._nodes if d["kind"] == "leaf")
        constants = len(self._nodes) - ops - leaves
        made = f", {constants} constants made in the block" if constants else ""
        return f"<tensorgraph.Graph: {len(self._nodes)} nodes ({ops} ops, {leaves} leaves{made})>"


_SHORT_PATHS: dict[str, dict[str, str]] = {}  # working directory -> {file: its short form}


def _short_paths() -> dict[str, str]:
    """The cache of shortened source paths for the current working directory (a training loop records
    from the same few files at every step)."""
    try:
        cwd = os.getcwd()
    except OSError:
        return {}
    if cwd not in _SHORT_PATHS and len(_SHORT_PATHS) > 16:
        _SHORT_PATHS.clear()
    return _SHORT_PATHS.setdefault(cwd, {})


_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder holding tensorgraph/


def _short_path(path: str) -> str:
    """A source file as the user knows it: a notebook cell as IPython numbers it (``In[3]``, not the file
    ``/tmp/ipykernel_51/2094948501.py`` it was compiled into), a file below the working directory relative
    to it, one of tensorgraph's own (the lecture's forward pass that ``tensorgraph derive`` records) as
    ``tensorgraph/lecture.py``, not a site-packages path, else the path."""
    number = notebook_cells().get(path)
    if number is not None:
        return f"In[{number}]"
    try:
        rel = os.path.relpath(path)
        own = os.path.relpath(path, _PACKAGE_PARENT)
    except ValueError:
        return path
    if not rel.startswith(".."):
        return rel
    return own if own.startswith("tensorgraph" + os.sep) else path


def shown(value: Any) -> str:
    """A value in an error: its type, and its repr when that is one short line (never a tensor's whole text)."""
    text = repr(value)
    if len(text) > 60 or "\n" in text:
        return type(value).__name__
    return f"{type(value).__name__} {text}"


def require_graph(graph: Any, caller: str) -> None:
    """``caller`` (a function taking the graph first) was given something else: say what it needs."""
    if not isinstance(graph, Graph):
        raise TypeError(f"{caller}: the graph must be the Graph that `with tg.record() as graph:` recorded, not "
                        f"{type(graph).__name__}")


def notebook_cells() -> dict[str, int]:
    """The files IPython compiled the cells it ran into, with each cell's number; empty outside IPython."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    cells = getattr(getattr(shell, "compile", None), "_filename_map", None)  # (IPython >= 8)
    return cells if isinstance(cells, dict) else {}


def identifier(name: str) -> str:
    """A Python identifier for a node name (``layers[0].out`` -> ``layers_0_out``)."""
    ident = re.sub(r"\W+", "_", name).strip("_") or "t"
    if ident[0].isdigit() or keyword.iskeyword(ident):
        ident = "t_" + ident
    return ident


def is_float(data: dict[str, Any]) -> bool:
    return data["dtype"].is_floating_point or data["dtype"].is_complex


__all__ = ["Graph", "Ref", "identifier", "torch"]
