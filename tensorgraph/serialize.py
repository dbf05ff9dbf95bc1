"""Save a recorded graph as JSON or GraphML, and load it back without running pickled code.

``graph.save("g.json")`` writes networkx node-link JSON, ``graph.save("g.graphml")``
GraphML (both through networkx); ``tg.load_graph(path)`` reads either back. Every node
keeps its name, op, kind, shape, dtype, inputs in argument order, attributes, source
line, function, scope and in-place bookkeeping; edges carry the argument position.

The recorded call itself is kept too: the torch callable as its dotted name (resolved on
load by attribute lookup inside ``torch`` or ``tensorgraph`` only, never by import of
arbitrary modules, ``eval`` or pickle) and its arguments in a small tagged JSON form
(tuples, slices, ranges, ``...``, dtypes, and ``Ref`` for tensors). So a loaded graph
prints, renders and is inspected like a recorded one.

With ``values=True`` every node's tensor is written too, as exact nested lists (JSON's
``NaN``/``Infinity`` for non-finite numbers), with the order of its dimensions in memory when
it is not row-major (a transpose, a LAPACK result), since a kernel's rounding may depend on it:
a loaded graph backpropagates bit for bit as the recorded one. The loaded graph then supports
``backward`` and ``compare`` as well. Without values, the loaded tensors are shape-only
("meta") tensors and ``backward`` raises a clear error.

Limits: values make files large (every element as text); a fused node's own rule
(``graph.fuse``) and arguments that are neither plain data nor tensors are not saved, so
backward through those nodes raises ``NotImplementedError`` after loading.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import Tensor

from .graph import Graph, Ref, refs_in
from .printer import op_path
from .rules import _inverse

FORMAT = "tensorgraph-graph"
VERSION = 1
SUFFIXES = {".json": "json", ".graphml": "graphml"}

# keys whose values are structured (lists, dicts, tagged values): JSON text inside GraphML attributes
_STRUCTURED = ("shape", "inputs", "attrs", "args", "kwargs", "bargs", "bkwargs", "result", "value", "previous",
               "output_index", "unsupported", "func", "call", "layout", "requires_grad")
_REQUIRED = ("name", "op", "kind", "shape", "dtype", "inputs")
_ROOTS = ("torch", "tensorgraph")  # the only packages a saved callable may name


class Opaque:
    """An argument that could not be saved as data: printed as it was, never called."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


# ---------------------------------------------------------------- saving


def save(graph: Graph, path: str | os.PathLike, *, values: bool = False) -> Path:
    """Write ``graph`` to ``path`` (.json: node-link JSON; .graphml: GraphML), atomically.

    ``values=True`` also writes every node's tensor, so that the loaded graph can be
    differentiated. Returns the path written.
    """
    path = Path(path)
    fmt = _format_of(path)
    if getattr(graph, "_recording", False):
        raise ValueError(f"graph.save({str(path)!r}): the graph is still being recorded; save it after the "
                         f"tg.record() block ends")
    if values and any(data["value"].is_meta for data in graph._nodes):
        raise ValueError(f"graph.save({str(path)!r}, values=True): the graph was loaded from "
                         f"{getattr(graph, 'loaded_from', 'a file')} without values; it has none to save")
    out = nx.MultiDiGraph()
    out.graph.update({"format": FORMAT, "version": VERSION, "values": bool(values),
                      "anomaly": bool(getattr(graph, "anomaly", False)), "torch": str(torch.__version__),
                      "calls": json.dumps([list(call) for call in graph._calls])})
    siblings = _siblings(graph)
    for node, data in enumerate(graph._nodes):
        record = _node_record(data, siblings.get(node), values)
        if fmt == "graphml":
            _check_xml_text(path, record)
        out.add_node(node, **(record if fmt == "json" else _flatten(record)))
    for node, data in enumerate(graph._nodes):
        for position, source in enumerate(data["inputs"]):
            out.add_edge(source, node, key=position, position=position)
    if fmt == "json":
        text = json.dumps(nx.node_link_data(out, edges="edges"), indent=1, allow_nan=True)
        _write_atomically(path, text.encode("utf-8"))
    else:
        _write_atomically(path, "\n".join(nx.generate_graphml(out)).encode("utf-8"))
    return path


def _format_of(path: Path) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown graph file type {path.suffix!r}; use .json (node-link JSON) or .graphml")
    return fmt


def _write_atomically(path: Path, data: bytes) -> None:
    """A temporary file in the same directory, then a rename: readers never see half a file."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():  # else the error would name the temporary file
        problem = "is a file, not a folder" if directory.exists() else "does not exist"
        raise FileNotFoundError(f"graph.save: cannot write {str(path)!r}: the folder {str(directory)!r} {problem}")
    if path.is_dir():
        raise IsADirectoryError(f"graph.save: cannot write {str(path)!r}: it is a folder")
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def _siblings(graph: Graph) -> dict[int, list[int | None]]:
    """The nodes of one call returning several tensors (max(dim): values, indices), by node, each at its
    output index; None where the call returned None (aten's convolution_backward: (dx, dw, None))."""
    groups: dict[int, list[int | None]] = {}
    for node, data in enumerate(graph._nodes):
        if data.get("output_index") is not None:
            group = groups.setdefault(id(data["args"]), [None] * len(data["result"]))
            group[data["output_index"]] = node
    return {node: members for members in groups.values() for node in members if node is not None}


def _node_record(data: dict[str, Any], siblings: list[int] | None, values: bool) -> dict[str, Any]:
    fused = data.get("rule") is not None
    unsupported = data.get("unsupported") or (
        "a fused node's own rule is not saved with the graph" if fused else None)
    record = {
        "name": data["name"], "named": bool(data["named"]), "op": data["op"], "kind": data["kind"],
        "shape": list(data["shape"]), "dtype": _dtype_name(data["dtype"]), "inputs": list(data["inputs"]),
        "attrs": encode(data.get("attrs") or {}), "source": data.get("source") or "",
        "function": data.get("function") or "", "call": data.get("call"), "scope": data.get("scope") or "",
        "inplace": bool(data.get("inplace")), "previous": data.get("previous"),
        "output_index": data.get("output_index"), "unsupported": unsupported,
        "func": func_path(data["func"]) if data.get("func") is not None else None,
        "args": encode(tuple(data.get("args") or ())), "kwargs": encode(dict(data.get("kwargs") or {})),
        "bargs": encode(tuple(data.get("bargs") or ())), "bkwargs": encode(dict(data.get("bkwargs") or {})),
        "result": siblings,
    }
    if values:
        value = data["value"].detach()
        layout = _layout(value)  # (of the value itself: a complex one's real view has one more dim)
        if value.is_complex():  # (JSON has no complex numbers: each one as its [real, imaginary] pair)
            value = torch.view_as_real(value.resolve_conj())
        record["value"] = value.tolist() if value.numel() else []
        if layout is not None:
            record["layout"] = layout
        if data["value"].requires_grad:  # torch picks some kernels by the flag, also under no_grad (see load)
            record["requires_grad"] = True
    return record


def _layout(value: Tensor) -> list[int] | None:
    """The dims from outermost to innermost in memory, for a dense non-row-major value (else None)."""
    if value.dim() < 2 or value.is_contiguous():
        return None
    order = sorted(range(value.dim()), key=lambda d: (-value.stride(d), d))
    rebuilt = _laid_out(value, order)
    return order if rebuilt.stride() == value.stride() else None  # (expanded or overlapping: saved row-major)


def _laid_out(value: Tensor, order: list[int]) -> Tensor:
    """``value`` in new memory holding its dims outermost to innermost in ``order``."""
    return value.permute(order).contiguous().permute(_inverse(order))


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _check_xml_text(path: Path, record: dict[str, Any]) -> None:
    """GraphML is XML 1.0, which cannot hold control characters even escaped: refused, not written unreadable."""
    for key, value in record.items():
        if isinstance(value, str) and key not in _STRUCTURED and _NOT_XML.search(value):
            raise ValueError(f"graph.save({str(path)!r}): the {key} of node {record['name']!r} ({value!r}) has a "
                             f"control character, which GraphML cannot hold; save the graph as .json instead")


def _flatten(record: dict[str, Any]) -> dict[str, Any]:
    """GraphML holds scalars only: structured values become JSON text, None is left out."""
    flat = {}
    for key, value in record.items():
        if key in _STRUCTURED:
            flat[key] = json.dumps(value, allow_nan=True)
        elif value is not None:
            flat[key] = value
    return flat


def _calls(path: Path, text: Any) -> list[tuple[str, int | None]]:
    """The graph's call tree (each call's function and the call it was made from); files written before it have
    none, and draw flat function clusters."""
    if text is None:
        return []
    try:
        calls = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        calls = None
    if not isinstance(calls, list) or not all(
            isinstance(call, list) and len(call) == 2 and isinstance(call[0], str)
            and (call[1] is None or (_call_index(call[1]) is not None and 0 <= call[1] < len(calls)))
            for call in calls):
        raise ValueError(f"{path}: 'calls' must be a JSON list of [function, caller index or null] pairs")
    for start in range(len(calls)):  # each call's chain of callers must end
        up, steps = calls[start][1], 0
        while up is not None:
            steps += 1
            if steps > len(calls):
                raise ValueError(f"{path}: 'calls' has a cycle through call {start}")
            up = calls[up][1]
    return [(function, parent) for function, parent in calls]


def _call_index(value: Any) -> int | None:
    """A node's "call" (which call of its function made it, for drawing); files written before it have none."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode(value: Any) -> Any:
    """Plain data as JSON; tuples, slices, ranges, ``...``, dtypes, sizes and Refs as tagged objects."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, Ref):
        return {"$ref": value.node}
    if isinstance(value, torch.Size):
        return {"$size": list(value)}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"$dict": {k: encode(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"$slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    if isinstance(value, range):
        return {"$range": [value.start, value.stop, value.step]}
    if value is Ellipsis:
        return {"$ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"$dtype": _dtype_name(value)}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, complex):
        return {"$complex": [value.real, value.imag]}
    return {"$opaque": repr(value)}


# ---------------------------------------------------------------- callables by name


def func_path(func: Any) -> str | None:
    """A dotted name inside torch or tensorgraph that resolves back to ``func`` (None if there is none)."""
    path = op_path(func)  # the rules' aten kernels, in traced backward graphs
    if path is not None:
        return path
    if getattr(func, "__name__", None) == "__get__" and hasattr(func, "__self__"):  # a property's getter
        owner = func_path(func.__self__)
        return f"{owner}.__get__" if owner else None
    name = getattr(func, "__name__", None)
    if name is None:
        return None
    candidates = []
    owner = getattr(func, "__objclass__", None)
    if owner is not None:
        candidates.append(f"{owner.__module__}.{owner.__qualname__}.{name}")
    module = getattr(func, "__module__", None)
    if module:
        candidates += [f"{module}.{getattr(func, '__qualname__', name)}", f"{module}.{name}"]
    candidates += [f"torch.{name}", f"torch.Tensor.{name}", f"torch.nn.functional.{name}"]
    for path in candidates:
        try:
            if _same(resolve(path), func):
                return path
        except (ValueError, AttributeError):
            continue
    return _known_names().get(id(func))  # saved under another name (Tensor.__pow__ is a wrapped "pow")


_NAMESPACES = ("torch.Tensor", "torch._C.TensorBase", "torch", "torch.nn.functional", "torch._C._nn",
               "torch.special", "torch.linalg")
_KNOWN: dict[int, str] = {}


def _known_names() -> dict[int, str]:
    """id(object) -> dotted name, for every attribute of the namespaces torch calls come from."""
    if not _KNOWN:
        for space in reversed(_NAMESPACES):  # earlier namespaces win
            for attr, obj in vars(resolve(space)).items():
                if callable(obj) and attr.isidentifier():
                    _KNOWN[id(obj)] = f"{space}.{attr}"
    return _KNOWN


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a).__name__ == "method-wrapper" and a == b)


def resolve(path: str) -> Any:
    """The object a dotted name inside torch or tensorgraph names, by attribute lookup only."""
    parts = path.split(".")
    if parts[0] not in _ROOTS or any(not p.isidentifier() for p in parts):
        raise ValueError(f"{path!r} is not a name inside torch or tensorgraph")
    obj: Any = importlib.import_module(parts[0])
    for depth, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if depth == 1 and parts[0] == "tensorgraph":  # a tensorgraph module not imported yet
                obj = importlib.import_module(".".join(parts[:2]))
            else:
                raise
    return obj


class Uncallable:
    """A torch callable outside tensorgraph's op table: named as the original for printing, never called.

    A graph file chooses which callables a loaded graph holds; only those of the op table
    (the ops tensorgraph has rules for, or knows as constants) are the real thing.
    """

    def __init__(self, path: str, original: Any) -> None:
        self.path = path
        self.__name__ = getattr(original, "__name__", path.rsplit(".", 1)[-1])
        self.__qualname__ = getattr(original, "__qualname__", self.__name__)
        self.__module__ = getattr(original, "__module__", None)  # type: ignore[assignment]
        for attr in ("__objclass__", "__self__"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"tensorgraph: a loaded graph does not call {self.path} (it is not in "
                                  f"tensorgraph's op table)")

    def __repr__(self) -> str:
        return f"<{self.path}, not callable in a loaded graph>"


def _callable(path: str) -> Any:
    from .ops import lookup
    from .rules import KERNELS

    original = resolve(path)
    if not callable(original):
        raise ValueError(f"{path!r} is not callable")
    if lookup(original) is not None:
        return original
    if isinstance(original, torch._ops.OpOverload):
        packet = original.overloadpacket
    elif isinstance(original, torch._ops.OpOverloadPacket):
        packet = original
    else:
        return Uncallable(path, original)
    namespace, _, name = packet._qualified_op_name.partition("::")
    if namespace == "aten" and name in KERNELS:
        return original  # the math kernels the rules call (a traced backward graph holds them)
    return Uncallable(path, original)


# ---------------------------------------------------------------- loading


def load_graph(path: str | os.PathLike) -> Graph:
    """Read a graph written by ``graph.save`` (JSON or GraphML, by suffix).

    A malformed file raises ``ValueError`` naming the file and what is wrong.
    """
    path = Path(path)
    fmt = _format_of(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")  # UnicodeDecodeError is a ValueError
        if fmt == "json":
            raw = nx.node_link_graph(json.loads(text), directed=True, multigraph=True, edges="edges")
        else:
            raw = nx.parse_graphml(text, node_type=int, force_multigraph=True)
    # XML's ParseError is a SyntaxError; JSON that is not an object fails with AttributeError; nesting too
    # deep for the parser, with RecursionError
    except (nx.NetworkXError, KeyError, TypeError, ValueError, SyntaxError, AttributeError, RecursionError) as err:
        kind = "node-link JSON" if fmt == "json" else "GraphML"
        raise ValueError(f"{path}: not a readable {kind} graph file ({type(err).__name__}: {err})") from None
    return _build(path, raw, fmt)


def _build(path: Path, raw: nx.MultiDiGraph, fmt: str) -> Graph:
    if not isinstance(raw.graph, dict) or raw.graph.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tensorgraph graph (no 'format': {FORMAT!r} in its graph attributes)")
    if raw.graph.get("version") != VERSION:
        raise ValueError(f"{path}: graph format version {raw.graph.get('version')!r}; this tensorgraph reads "
                         f"version {VERSION}")
    count = raw.number_of_nodes()
    if not all(isinstance(k, int) for k in raw.nodes) or sorted(raw.nodes) != list(range(count)):
        raise ValueError(f"{path}: node ids must be 0..{count - 1} in creation order")
    with_values = bool(raw.graph.get("values"))
    graph = Graph()
    graph.anomaly = bool(raw.graph.get("anomaly", False))
    for node in range(count):
        attrs = raw.nodes[node]
        record = attrs if fmt == "json" else _unflatten(path, node, attrs)
        graph._nodes.append(_node_data(path, node, record, with_values))
    _check_edges(path, graph, raw)
    graph._calls = _calls(path, raw.graph.get("calls"))
    for node, data in enumerate(graph._nodes):
        if any(k is not None and (k >= count or graph._nodes[k]["result"] != data["result"])
               for k in data["result"] or ()):
            raise ValueError(f"{path}: node {node}: result {data['result']!r} must list nodes of the same call")
    for node, data in enumerate(graph._nodes):
        if data["result"] is not None:
            data["result"] = tuple(None if k is None else graph._nodes[k]["value"] for k in data["result"])
        graph._live[id(data["value"])] = (node, data["value"]._version, data["value"])
    graph._names = {data["name"]: node for node, data in enumerate(graph._nodes)}
    if len(graph._names) != count:
        raise ValueError(f"{path}: node names are not unique")
    graph.loaded_from = str(path)
    return graph


def _unflatten(path: Path, node: int, attrs: dict[str, Any]) -> dict[str, Any]:
    record = dict(attrs)
    for key in _STRUCTURED:
        if key in record:
            try:
                record[key] = json.loads(record[key])
            except (TypeError, json.JSONDecodeError):
                raise ValueError(f"{path}: node {node}: attribute {key!r} is not valid JSON") from None
        else:
            record[key] = None
    return record


def _node_data(path: Path, node: int, record: dict[str, Any], with_values: bool) -> dict[str, Any]:
    where = f"{path}: node {node}"
    missing = [key for key in _REQUIRED if record.get(key) is None]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    shape, inputs = record["shape"], record["inputs"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"{where}: shape must be a list of sizes, got {shape!r}")
    if not isinstance(inputs, list) or not all(isinstance(i, int) and 0 <= i < node for i in inputs):
        raise ValueError(f"{where}: inputs must be ids of earlier nodes, got {inputs!r}")
    if record["kind"] not in ("leaf", "op", "constant"):
        raise ValueError(f"{where}: unknown kind {record['kind']!r}")
    dtype = getattr(torch, str(record["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: unknown dtype {record['dtype']!r}")
    value = _with_layout(where, _value(where, record.get("value"), shape, dtype, with_values), record.get("layout"))
    value = _with_requires_grad(where, value, record.get("requires_grad") or False)
    unsupported = record.get("unsupported")
    func = None
    if record.get("func"):
        try:
            func = _callable(str(record["func"]))
        except (ValueError, AttributeError, ImportError):
            unsupported = unsupported or f"{record['func']!r} names no callable of this torch"
    try:
        args, kwargs = decode(record.get("args") or {"$tuple": []}), decode(record.get("kwargs") or {"$dict": {}})
        bargs, bkwargs = decode(record.get("bargs") or {"$tuple": []}), decode(record.get("bkwargs") or {"$dict": {}})
        attrs = decode(record.get("attrs") or {"$dict": {}})
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{where}: malformed call arguments ({err})") from None
    if record["kind"] == "op" and not with_values:
        unsupported = "the graph was loaded without values (save it with values=True to differentiate it)"
    elif record["kind"] == "op" and _has_opaque((bargs, bkwargs)):
        unsupported = unsupported or "an argument of the call could not be saved"
    elif record["kind"] == "op" and func is None:
        unsupported = unsupported or "the file names no torch callable for it"
    _check_call(where, record, (args, kwargs, bargs, bkwargs, attrs), inputs)
    _check_bookkeeping(where, node, record)
    return {
        "name": str(record["name"]), "named": bool(record.get("named", False)), "op": str(record["op"]),
        "kind": record["kind"], "attrs": attrs, "source": str(record.get("source") or ""),
        "function": str(record.get("function") or ""), "call": _call_index(record.get("call")),
        "scope": str(record.get("scope") or ""), "func": func,
        "args": args, "kwargs": kwargs, "bargs": bargs, "bkwargs": bkwargs,
        "inplace": bool(record.get("inplace", False)), "previous": record.get("previous"),
        "output_index": record.get("output_index"), "result": record.get("result"), "unsupported": unsupported,
        "version": value._version, "rule": None, "value": value, "inputs": list(inputs), "shape": tuple(shape),
        "dtype": dtype,
    }


def _check_call(where: str, record: dict[str, Any], call: tuple, inputs: list[int]) -> None:
    """The recorded call must fit the node: the engine, printer and renderer index with it."""
    args, kwargs, bargs, bkwargs, attrs = call
    for key, value, kind in (("args", args, tuple), ("bargs", bargs, tuple), ("kwargs", kwargs, dict),
                             ("bkwargs", bkwargs, dict), ("attrs", attrs, dict)):
        if not isinstance(value, (kind, list) if kind is tuple else kind):
            raise ValueError(f"{where}: {key} must be a {'sequence' if kind is tuple else 'mapping'}, "
                             f"got {value!r}")
    if record["kind"] == "leaf" and (inputs or args or kwargs or record.get("func")):
        raise ValueError(f"{where}: a leaf has no inputs and no call")
    if not (record.get("func") is None or isinstance(record["func"], str)):
        raise ValueError(f"{where}: func must be a dotted name, got {record['func']!r}")
    passed, expected = {ref.node for ref in refs_in((args, kwargs))}, set(inputs)
    bound = {ref.node for ref in refs_in((bargs, bkwargs))}  # a call not saved (a custom Function's) binds nothing
    if passed != expected or not (bound == expected or (bound <= expected and not record.get("func"))):
        raise ValueError(f"{where}: the call's tensor arguments ($ref) do not match its inputs {inputs}")


def _check_bookkeeping(where: str, node: int, record: dict[str, Any]) -> None:
    """In-place versions (inplace, previous) and calls with several outputs (output_index, result)."""
    for key in ("named", "inplace"):
        if not isinstance(record.get(key, False), bool):
            raise ValueError(f"{where}: {key} must be true or false, got {record[key]!r}")
    previous = record.get("previous")
    if previous is not None and not (isinstance(previous, int) and not isinstance(previous, bool)
                                     and 0 <= previous < node):
        raise ValueError(f"{where}: previous (the tensor an in-place op updated) must be an earlier node's id, "
                         f"got {previous!r}")
    if record.get("inplace", False) != (previous is not None):
        raise ValueError(f"{where}: an in-place node (inplace: true) names the node it updated (previous), "
                         f"and only such a node does")
    index, result = record.get("output_index"), record.get("result")
    if (index is None) != (result is None):
        raise ValueError(f"{where}: output_index and result come together (one call's several outputs)")
    if result is not None and not (isinstance(result, list) and all(
            k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 0) for k in result)
            and isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(result)
            and result[index] == node):
        raise ValueError(f"{where}: result must list the ids of its call's outputs, this node's at output_index "
                         f"{index!r}, got {result!r}")


def _value(where: str, data: Any, shape: list[int], dtype: torch.dtype, with_values: bool) -> Tensor:
    if not with_values:
        return torch.empty(shape, dtype=dtype, device="meta")
    if data is None:
        raise ValueError(f"{where}: the file says it has values, but this node has none")
    try:
        if dtype.is_complex:  # [real, imaginary] pairs (_node_record)
            pairs = torch.tensor(data, dtype=torch.empty(0, dtype=dtype).real.dtype) if data != [] else None
            return torch.view_as_complex(pairs.reshape([*shape, 2])) if pairs is not None else torch.empty(
                shape, dtype=dtype)
        value = torch.tensor(data, dtype=dtype) if data != [] else torch.empty(0, dtype=dtype)
        # not a view of itself (reshape to the same shape is one): torch picks some kernels by whether a
        # tensor is a view, and a loaded nn.GRU weight gave gradients one ulp off the recorded graph's
        return value if list(value.shape) == list(shape) else value.reshape(shape).clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{where}: its value does not fit shape {tuple(shape)} and dtype {dtype} ({err})") from None


def _with_requires_grad(where: str, value: Tensor, requires_grad: Any) -> Tensor:
    """The value flagged as requiring grad when the recorded one was (a parameter, what was computed from one):
    torch.matmul folds a batched input into one matrix product only when the other side does not require grad,
    and so rounds differently, also under no_grad, where the rules run; without the flag an nn.GRU's loaded
    graph differentiated one ulp off the recorded one's."""
    if not isinstance(requires_grad, bool):
        raise ValueError(f"{where}: requires_grad must be true or false, got {requires_grad!r}")
    if requires_grad and value.device.type != "meta" and (value.is_floating_point() or value.is_complex()):
        value.requires_grad_()
    return value


def _with_layout(where: str, value: Tensor, layout: Any) -> Tensor:
    """The value with its dims laid out in memory in the saved order (a permutation of its dims)."""
    if layout is None:
        return value
    if not (isinstance(layout, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in layout)
            and sorted(layout) == list(range(value.dim()))):  # (types first: sorted() of [0, "a"] raises)
        raise ValueError(f"{where}: layout must be an order of the value's {value.dim()} dims, got {layout!r}")
    return _laid_out(value, layout)


def _check_edges(path: Path, graph: Graph, raw: nx.MultiDiGraph) -> None:
    """Edges must agree with each node's inputs (the argument order)."""
    expected = sorted((source, node, position) for node, data in enumerate(graph._nodes)
                      for position, source in enumerate(data["inputs"]))
    try:
        found = sorted((u, v, int(k)) for u, v, k in raw.edges(keys=True))
    except (TypeError, ValueError):
        raise ValueError(f"{path}: an edge's key is not its argument position (an integer)") from None
    if found != expected:
        raise ValueError(f"{path}: the edges do not match the nodes' inputs ({len(found)} edges, "
                         f"{len(expected)} inputs)")


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ValueError(f"unknown tagged value {value!r}")
    (tag, body), = value.items()
    if tag == "$ref":
        return Ref(int(body))
    if tag == "$tuple":
        return tuple(decode(v) for v in body)
    if tag == "$dict":
        return {str(k): decode(v) for k, v in body.items()}
    if tag == "$size":
        return torch.Size(body)
    if tag == "$slice":
        return slice(*(decode(v) for v in body))
    if tag == "$range":
        return range(*body)
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$float":
        return float(body)
    if tag == "$complex":
        return complex(*body)
    if tag == "$dtype":
        dtype = getattr(torch, str(body), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {body!r}")
        return dtype
    if tag == "$device":
        return torch.device(body)
    if tag == "$opaque":
        return Opaque(str(body))
    raise ValueError(f"unknown tag {tag!r}")


def _has_opaque(value: Any) -> bool:
    if isinstance(value, Opaque):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_opaque(v) for v in value)
    if isinstance(value, dict):
        return any(_has_opaque(v) for v in value.values())
    return False
