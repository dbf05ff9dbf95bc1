"""Draw a recorded graph with Graphviz: the forward DAG, its gradients, and the backward pass.

``graph.render("mlp.svg")`` draws the tensors the user wrote, named after the user's
variables. Each box is one tensor: the expression that computed it on top
(``matmul_1 + b1``), then its name and shape (``hprebn 32×64``), and on request a value
summary and its gradient's norm and largest entry. Leaves, integer inputs, constants and
the loss are drawn in their own colours; a comparison report (``compare=``) or a
learner's check report (``check=``) colours each gradient by its status.

``view="backward"`` draws the adjoint graph the engine actually runs (see
:mod:`tensorgraph.render_backward`). Large graphs are grouped into clusters by
``tg.scope`` or by function, clusters can be collapsed to one box, and ``depth`` limits
the drawing to the nodes nearest the loss.

This module only describes the picture: it builds a small drawing (boxes, edges,
clusters) from ``graph.nx`` and hands it to the ``graphviz`` package; the layout is
Graphviz's ``dot``. It holds no engine logic.
"""

from __future__ import annotations

import html
import math
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import graphviz
import networkx as nx
import torch
from torch import Tensor

from .graph import Ref, is_float
from .ops import OPS
from .printer import _fraction

if TYPE_CHECKING:
    from .engine import Gradients
    from .graph import Graph

FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": "dot", ".gv": "dot"}
VIEWS = ("forward", "backward")
RANKDIRS = ("TB", "LR", "BT", "RL")
CLUSTER_MODES = ("auto", "scope", "function")
INSTALL_HINT = ("install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; "
                "conda: conda install -c conda-forge graphviz)")

# fill colours: roles of tensors, statuses of gradients, and the backward pass's own nodes
COLORS = {
    "op": "#ffffff", "leaf": "#d9ead3", "input": "#cfe2f3", "constant": "#eeeeee", "loss": "#f9cb9c",
    "exact": "#b6d7a8", "approximate": "#ffe599", "wrong": "#ea9999",
    "ok": "#b6d7a8", "first error": "#e06666", "downstream of the error": "#f4cccc",
    "gradient": "#fce5cd", "seed": "#f9cb9c", "broadcast-undo": "#d9d2e9", "fan-out +=": "#fff2cc",
    "partial gradient": "#fdf6ec", "collapsed": "#e8eef7",
}
STATUSES = ("exact", "approximate", "wrong", "ok", "first error", "downstream of the error")
_MUTED = "#555555"
# seconds Graphviz may spend on one picture before render stops it (render's timeout=)
TIMEOUT = 60.0
# the largest graph a notebook draws inline: its SVG takes ~1.4 KB per node, and a notebook keeps it
# (measured: 3,002 nodes 4.2 MB in 0.9 s; 30,002 nodes 43 MB in 10.6 s, blocking the kernel meanwhile)
INLINE_NODES = 2000
# dot turns an edge spanning k ranks into a chain of k-1 virtual nodes, and its layout time grows faster than
# their count: ~4,000 take seconds, ~9,000 a minute. A parameter used at every step of an unrolled loop makes
# that many (one edge from the top to each step); above this many, such sources get one box per use instead
LONG_EDGE_BUDGET = 2000
# dot's network simplex placing boxes side by side stops after this many passes per box: where it converges (the
# lecture's pictures, a 40-layer MLP's both views) the picture is the same bit for bit; without it a recurrent
# rule's backward (a 2-layer nn.LSTM over 6 steps: 480 boxes, each step's gates read steps away) ran for minutes
NSLIMIT = "2"


class GraphvizNotFoundError(FileNotFoundError):
    """Graphviz's ``dot`` program is not installed; the DOT source was written beside the target."""


class RenderTimeoutError(TimeoutError):
    """Graphviz's layout ran longer than render's ``timeout``; the DOT source was written beside the target."""


def render(graph: Graph, path: str | os.PathLike | None = None, *, view: str = "forward",
           grads: Gradients | None = None, loss: Any = None, compare: Any = None, check: Any = None,
           values: bool = False, collapse: Iterable[str] | str | None = None, depth: int | None = None,
           cluster: str | None = "auto", rankdir: str = "TB", legend: bool = True, title: str | None = None,
           dpi: int | None = None, timeout: float | None = TIMEOUT, textbook: bool = False) -> graphviz.Digraph | Path:
    """Draw ``graph``; with ``path``, write the picture there and return the path.

    Args:
        path: where to write; the format comes from the suffix (.svg .png .pdf, or .dot for
            the Graphviz source, which needs no Graphviz install). None returns the
            ``graphviz.Digraph`` (notebooks display it inline).
        view: "forward" (the tensors the user wrote) or "backward" (the adjoint graph the
            engine runs: the rules' ops, broadcast-undo sums and fan-out additions).
        grads: a :class:`tensorgraph.Gradients`; each tensor shows its gradient's norm and
            largest entry. Its loss is the loss of the backward view.
        loss: the loss (tensor, name or node id), when ``grads`` is not given.
        compare: a report from ``graph.compare(loss)``: colours each gradient exact,
            approximate (or past allclose only by rounding: ok) or wrong.
        check: a learner's check report (``.first_error``, ``.rows`` with ``.name``,
            ``.kind``, ``.message``): colours the first wrong gradient and the gradients
            computed from it.
        values: show each tensor's mean, std, min and max.
        collapse: cluster names (``tg.scope`` names, or function names with
            ``cluster="function"``: ``block`` or a class ``Linear`` each call of it, ``block#2``
            one call) to draw as one box each.
        depth: draw only the nodes at most this many ops away from the loss.
        cluster: group nodes by "scope" (``tg.scope`` blocks), by "function" (one cluster
            per call: ``block``, ``block#2`` ...; a layer's ``__call__`` or ``forward`` by its
            class: ``Linear``, ``Linear#2``; top-level code is no cluster), not at all (None), or "auto" (scopes if
            any were recorded, else functions if ops come from several functions).
        rankdir: "TB" (top to bottom), "LR", "BT" or "RL".
        legend: add a legend of the colours used.
        title: a line of text above the legend.
        dpi: resolution of PNG output (a positive number; None: Graphviz's default, 96).
        timeout: seconds Graphviz may take to lay the picture out (None: no limit). Past it,
            ``RenderTimeoutError`` says how to draw less; the DOT source is written beside
            ``path``. Without ``path`` there is no layout here, so no limit.
        textbook: with view="backward", draw the handout rather than the kernels the engine calls, as
            ``graph.backward_source(loss, textbook=True)`` prints it: a fused kernel's box reads as its formula
            (``(1 - h**2) * dh`` for ``tanh_backward(dh, h)``), and an ``F.cross_entropy`` with no target
            ignored, no weight and no label smoothing is drawn as ``(softmax(logits) - one_hot(Yb)) / n * dloss``
            (5 ops) instead of the engine's closed form for the general case.
    """
    if timeout is not None and not _positive(timeout):
        raise ValueError(f"render: timeout must be a positive number of seconds or None, got {timeout!r}")
    if dpi is not None and not (_positive(dpi) and math.isfinite(dpi)):  # dot hangs on a negative dpi
        raise ValueError(f"render: dpi must be a positive number of dots per inch or None, got {dpi!r}")
    target, fmt = output_format(path) if path is not None else (None, None)
    options = _Options.parse(graph, view=view, grads=grads, loss=loss, compare=compare, check=check, values=values,
                             collapse=collapse, depth=depth, cluster=cluster, rankdir=rankdir, textbook=textbook)
    if options.view == "backward":
        from .render_backward import backward_drawing

        drawing = backward_drawing(graph, options)
    else:
        drawing = forward_drawing(graph, options)
    dot = emit(drawing, options, legend=legend, title=title, dpi=dpi)
    if target is None:
        return dot
    return write(dot, target, fmt, timeout)


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def mimebundle(graph: Graph) -> dict[str, Any]:
    """What Jupyter shows for a Graph: the forward view as SVG (text only without Graphviz, or for a graph too
    big to draw inline)."""
    bundle: dict[str, Any] = {"text/plain": repr(graph)}
    if len(graph) > INLINE_NODES:
        bundle["text/plain"] += (f"\n(too big to draw inline: more than {INLINE_NODES:,} nodes; draw it into a file "
                                 f"with graph.render('graph.svg'), or {_DRAW_LESS})")
        return bundle
    try:
        bundle["image/svg+xml"] = layout(render(graph), "svg", TIMEOUT).decode("utf-8")
    except FileNotFoundError:
        bundle["text/plain"] += f"\n(Graphviz's `dot` program was not found: {INSTALL_HINT} to see the graph)"
    except subprocess.TimeoutExpired:
        bundle["text/plain"] += (f"\n(Graphviz's dot did not lay this graph out in {TIMEOUT:g} s: "
                                 f"{_DRAW_LESS})")
    return bundle


# ---------------------------------------------------------------------------------------------- options


@dataclass
class _Options:
    view: str
    grads: Any
    root: int | None
    seed: Tensor | None
    compare: Any
    check: Any
    values: bool
    collapse: frozenset[str]
    depth: int | None
    cluster: str | None
    rankdir: str
    textbook: bool = False

    @classmethod
    def parse(cls, graph: Graph, *, view: str, grads: Any, loss: Any, compare: Any, check: Any, values: bool,
              collapse: Any, depth: Any, cluster: Any, rankdir: str, textbook: bool = False) -> _Options:
        if view not in VIEWS:
            raise ValueError(f"render: unknown view {view!r}; expected one of {', '.join(VIEWS)}")
        if rankdir not in RANKDIRS:
            raise ValueError(f"render: unknown rankdir {rankdir!r}; expected one of {', '.join(RANKDIRS)}")
        if cluster is not None and cluster not in CLUSTER_MODES:
            raise ValueError(f"render: unknown cluster mode {cluster!r}; expected one of "
                             f"{', '.join(CLUSTER_MODES)} or None")
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
            raise ValueError(f"render: depth must be a non-negative integer, got {depth!r}")
        if isinstance(collapse, str):
            collapse = [collapse]
        if textbook and view != "backward":
            raise ValueError("render: textbook=True draws the backward view's fused kernels as their formulas; "
                             "pass view='backward' with it")
        _require_report(compare, "compare", "graph.compare(loss)")
        _require_report(check, "check", "graph.check(manual, loss)")
        _require_matching(graph, compare, "compare", "graph.compare(loss)")
        _require_matching(graph, check, "check", "graph.check(manual, loss)")
        root, seed = _root(graph, grads, loss)
        if view == "backward" and root is None:
            raise ValueError("render: view='backward' needs the loss: pass grads=graph.backward(loss) or loss=loss")
        if view == "backward" and seed is None and graph._nodes[root]["shape"]:
            data = graph._nodes[root]
            raise ValueError(f"render: view='backward' from loss= needs a scalar loss, but {data['name']!r} has shape "
                             f"{tuple(data['shape'])}; for a non-scalar output pass "
                             f"grads=graph.backward({data['name']!r}, grad=...) (a gradient of that shape)")
        return cls(view, grads, root, seed, compare, check, bool(values), frozenset(collapse or ()), depth,
                   cluster, rankdir, bool(textbook))


def _require_report(report: Any, option: str, made_by: str) -> None:
    """compare= and check= take reports; another value (compare=True, as the CLI's --compare) would colour nothing."""
    if report is not None and not hasattr(report, "rows"):
        raise TypeError(f"render: {option} must be the report {made_by} returns (its rows colour the gradients), "
                        f"not {type(report).__name__}")


def _require_matching(graph: Graph, report: Any, option: str, made_by: str) -> None:
    """A report of another graph would colour whatever nodes share its rows' names: each row must name a tensor of
    this graph, of the shape the report was made for (a report of the same code recorded again matches)."""
    for row in getattr(report, "rows", ()):
        shape = getattr(row, "expected_shape", getattr(row, "shape", None))
        node = _report_node(graph, getattr(row, "name", None))
        found = None if node is None else tuple(graph._nodes[node]["shape"])
        if found is None or (shape is not None and tuple(shape) != found):
            here = "has no such tensor" if found is None else f"has {graph._nodes[node]['name']!r} of shape {found}"
            raise ValueError(f"render: the {option} report is not this graph's: its row {row.name!r} is for a tensor "
                             f"of shape {tuple(shape) if shape is not None else '?'}, and this graph {here}; pass "
                             f"the report {made_by} returns for this graph")


def _root(graph: Graph, grads: Any, loss: Any) -> tuple[int | None, Tensor | None]:
    """The loss node (from grads, else from loss=) and the gradient it was seeded with."""
    if grads is not None:
        if not (hasattr(grads, "by_node") and hasattr(grads, "root")):
            raise TypeError(f"render: grads must be the Gradients returned by graph.backward(loss), "
                            f"got {type(grads).__name__}")
        if getattr(grads, "graph", graph) is not graph:
            raise ValueError("render: grads were computed on a different graph")
        if loss is not None and _node_id(graph, loss) != grads.root:
            raise ValueError("render: loss= is not the loss the grads were computed from")
        return grads.root, grads.by_node[grads.root]
    if loss is None:
        return None, None
    return _node_id(graph, loss), None


def _node_id(graph: Graph, key: Any) -> int:
    try:
        return graph.node_id(key)
    except KeyError as err:
        message = err.args[0] if err.args and isinstance(err.args[0], str) else f"no node {key!r}"
        if isinstance(key, Tensor):
            message = f"the loss tensor is not in this graph: {graph.owner_message(key)}"
        raise ValueError(f"render: {message}") from None


# ---------------------------------------------------------------------------------------------- output


def output_format(path: str | os.PathLike) -> tuple[Path, str]:
    """The path to write and its Graphviz format, from the suffix; errors name the path."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"render: the path must be a file name such as 'graph.svg' (a str or pathlib.Path), not "
                        f"{type(path).__name__}")
    if not str(path):
        raise ValueError(f"render: the path is empty; give a file name such as 'graph.svg' ({', '.join(FORMATS)})")
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"render: {str(target)!r} is a folder; give a file name in it, such as "
                                f"{str(target / 'graph.svg')!r}")
    fmt = FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise ValueError(f"render: cannot tell the format of {str(target)!r} from its suffix "
                         f"{target.suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
    folder = target.parent
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"render: cannot write {str(target)!r}: the folder {str(folder)!r} {problem}")
    return target, fmt


_DRAW_LESS = ("draw less of it with graph.render(path, depth=k) (the k ops nearest the loss) or collapse=[...] "
              "(a cluster as one box: clusters come from tg.scope blocks or cluster='function')")


def write(dot: graphviz.Digraph, target: Path, fmt: str, timeout: float | None = TIMEOUT) -> Path:
    """Write the picture (or, for .dot, its source); without ``dot``, write the source and say how to get it."""
    if fmt == "dot":
        _write_file(target, dot.source.encode("utf-8"))
        return target
    try:
        done = _run_dot(dot, fmt, timeout)
    except FileNotFoundError:
        source = _write_source(dot, target)
        raise GraphvizNotFoundError(
            f"render: Graphviz's `dot` program was not found, so {str(target)!r} could not be drawn; "
            f"the DOT source was written to {str(source)!r}. To draw pictures, {INSTALL_HINT}") from None
    except subprocess.TimeoutExpired:
        source = _write_source(dot, target)
        raise RenderTimeoutError(
            f"render: Graphviz's dot did not finish laying out {str(target)!r} in {timeout:g} s and was stopped "
            f"(the DOT source was written to {str(source)!r}); {_DRAW_LESS}, or pass timeout=None to wait "
            f"longer") from None
    except subprocess.CalledProcessError as err:
        detail = (err.stderr or b"").decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"render: Graphviz's dot failed on {str(target)!r}: "
                           f"{detail[-1] if detail else err}") from None
    _write_file(target, done.stdout)
    _warn_if_shrunk(done.stderr, target)
    return target


class RenderWarning(UserWarning):
    """The picture was written, but not as asked: Graphviz shrank a bitmap too large for it."""


def _warn_if_shrunk(stderr: bytes, target: Path) -> None:
    """Graphviz shrinks a bitmap larger than 32,767 pixels a side to fit, saying so only on its stderr."""
    found = re.search(r"Scaling by ([0-9.eE+-]+)", (stderr or b"").decode(errors="replace"))
    if found is None:
        return
    warnings.warn(f"render: {str(target)!r} is too large for a bitmap, so Graphviz shrank it to "
                  f"{float(found.group(1)):.0%} of its size (its text may be unreadable); write .svg or .pdf instead, "
                  f"or {_DRAW_LESS}", RenderWarning, stacklevel=_outside_the_package())


def _outside_the_package() -> int:
    """The stacklevel of the first caller outside tensorgraph: a warning points at the user's line."""
    package = str(Path(__file__).parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def layout(dot: graphviz.Digraph, fmt: str, timeout: float | None) -> bytes:
    """Run Graphviz on the source, stopped after ``timeout`` seconds (the graphviz package's pipe has no limit).

    Raises ``FileNotFoundError`` without the program, ``subprocess.TimeoutExpired`` past the
    limit (the process is killed), ``subprocess.CalledProcessError`` when it fails.
    """
    return _run_dot(dot, fmt, timeout).stdout


def _run_dot(dot: graphviz.Digraph, fmt: str, timeout: float | None) -> subprocess.CompletedProcess:
    done = subprocess.run([dot.engine, f"-T{fmt}"], input=dot.source.encode(dot.encoding or "utf-8"),
                          capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    return done


def _write_source(dot: graphviz.Digraph, target: Path) -> Path:
    source = target.with_suffix(".dot")
    _write_file(source, dot.source.encode("utf-8"))
    return source


def _write_file(target: Path, data: bytes) -> None:
    """Write the file; a folder that refuses it (no permission, a read-only or virtual file system) is named."""
    try:
        target.write_bytes(data)
    except OSError as err:
        raise type(err)(f"render: cannot write {str(target)!r}: {err.strerror or err}") from None


# ---------------------------------------------------------------------------------------------- text


def shape_text(shape: Iterable[int]) -> str:
    """``(32, 64)`` -> ``32×64``; a 0-d tensor is a ``scalar``."""
    shape = tuple(shape)
    return "×".join(map(str, shape)) if shape else "scalar"


def number(value: float) -> str:
    """A short, readable number: 3 significant digits."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.3g}"


def argument(value: Any, name: Callable[[int], str]) -> str:
    """An argument as the user would write it, tensors by name (``range(32)``, ``:``, ``Yb``)."""
    if isinstance(value, Ref):
        return name(value.node)
    if isinstance(value, bool) or value is None or value is Ellipsis:
        return "..." if value is Ellipsis else str(value)
    if isinstance(value, float):
        return _float_argument(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, range):
        if value.step != 1:
            return f"range({value.start}, {value.stop}, {value.step})"
        return f"range({value.stop})" if value.start == 0 else f"range({value.start}, {value.stop})"
    if isinstance(value, slice):
        parts = ["" if p is None else argument(p, name) for p in (value.start, value.stop, value.step)]
        return ":".join(parts[:2]) + (f":{parts[2]}" if value.step is not None else "")
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value).replace("torch.", "")
    if isinstance(value, Tensor):
        return f"tensor({shape_text(value.shape)})"
    if isinstance(value, (tuple, list)):
        items = [argument(v, name) for v in value[:6]] + (["…"] if len(value) > 6 else [])
        inner = ", ".join(items) + ("," if len(items) == 1 and isinstance(value, tuple) else "")
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    text = repr(value)
    return text if len(text) <= 24 else text[:23] + "…"


def _float_argument(value: float) -> str:
    """4 significant digits, or the fraction the float is exactly: ``1/n * x`` with n = 31 records the float
    0.03225806451612903, drawn ``(1/31)`` rather than ``0.03226``."""
    fraction = _fraction(value, repr(value)) if math.isfinite(value) else None
    if fraction is not None:
        return "(" + fraction.text.replace(" / ", "/") + ")"
    return f"{value:.4g}"


_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "matmul": "@", "pow": "**"}
_MULTI_NAMES = {"max": ("values", "indices"), "min": ("values", "indices"), "sort": ("values", "indices"),
                "topk": ("values", "indices")}


def expression(data: dict[str, Any], name: Callable[[int], str], limit: int = 60) -> str:
    """The op that made a node, written with its inputs' names: ``matmul_1 + b1``, ``sum(bndiff2, dim=0, keepdim)``."""
    text = _expression(data, name)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def definition(name: str, data: dict[str, Any], names: Callable[[int], str], limit: int = 60) -> str:
    """``hprebn = matmul_1 + b1``; an assignment into a tensor reads ``y: y_v0[0] = 0``, not ``y = y_v0[0] = 0``
    (which, as Python, would assign 0 to y)."""
    text = expression(data, names, limit)
    return f"{name}: {text}" if data["op"] == "setitem" else f"{name} = {text}"


def _expression(data: dict[str, Any], name: Callable[[int], str]) -> str:
    op_name = data["op"]
    args, kwargs = tuple(data["bargs"]), dict(data["bkwargs"] or {})
    arg = lambda value: argument(value, name)  # noqa: E731
    if data["kind"] == "constant" and data.get("previous") is not None and not args:
        # a new value of a tensor with no history (w -= lr * dw under no_grad, w.data = ..., nn.init):
        # its arguments were not recorded
        before = name(data["previous"])
        return f"{before}.data = …" if op_name == "set_data" else f"{op_name.rstrip('_')}_({before}, …)"
    if op_name == "no_grad_update":  # the update's own call, then what the engine does with it
        parts = [arg(a) for a in data["args"]] + [_keyword(k, v, arg) for k, v in data["kwargs"].items()]
        return f"{data['attrs'].get('update', '?')}({', '.join(parts)}) under no_grad"
    if op_name in _INFIX and len(args) == 2 and not _non_default(kwargs, {"alpha": 1}):
        return f"{arg(args[0])} {_INFIX[op_name]} {arg(args[1])}"
    if op_name == "rsub" and len(args) == 2:
        return f"{arg(args[1])} - {arg(args[0])}"
    if op_name == "rdiv" and len(args) == 2:
        return f"{arg(args[1])} / {arg(args[0])}"
    if op_name == "neg" and len(args) == 1:
        return f"-{arg(args[0])}"
    if op_name == "getitem" and len(args) == 2:
        index = args[1]
        inner = ", ".join(arg(i) for i in index) if isinstance(index, tuple) else arg(index)
        return f"{arg(args[0])}[{inner}]"
    if op_name == "setitem" and len(args) == 3:
        index = args[1]
        inner = ", ".join(arg(i) for i in index) if isinstance(index, tuple) else arg(index)
        return f"{arg(args[0])}[{inner}] = {arg(args[2])}"
    return _call(data, args, kwargs, arg)


def _call(data: dict[str, Any], args: tuple, kwargs: dict, arg: Callable[[Any], str]) -> str:
    """``op(first, key=value, flag)``: attributes left at the rule's defaults are left out."""
    op = OPS.get(data["op"])
    params, defaults = (op.params, op.defaults) if op is not None and op.rule is not None else ((), ())
    parts = []
    for position, value in enumerate(args):
        if position == 0 or position >= len(params):
            parts.append(arg(value))
        elif not _same(value, defaults[position]):
            parts.append(_keyword(params[position], value, arg))
    parts += [_keyword(key, value, arg) for key, value in kwargs.items() if value is not None]
    text = f"{data['op']}{'_' if data.get('inplace') else ''}({', '.join(parts)})"
    index = data.get("output_index")
    if index is not None:
        names = _MULTI_NAMES.get(data["op"])
        text += f".{names[index]}" if names and index < len(names) else f"[{index}]"
    return text


def _keyword(key: str, value: Any, arg: Callable[[Any], str]) -> str:
    return key if value is True else f"{key}={arg(value)}"


def _same(value: Any, default: Any) -> bool:
    if isinstance(value, (Tensor, Ref)) or type(default) is object:  # object(): a required parameter
        return False
    try:
        return bool(value == default) and type(value) is type(default)
    except (TypeError, RuntimeError):
        return False


def _non_default(kwargs: dict, defaults: dict) -> bool:
    return any(key not in defaults or not _same(value, defaults[key]) for key, value in kwargs.items())


def value_summary(tensor: Tensor) -> str:
    """mean, std, min and max of a tensor (its value for a scalar, its entries when it has at most :data:`FEW`);
    non-finite entries are counted, not averaged."""
    t = tensor.detach()
    if t.is_meta:  # shapes only
        return "no values (meta: recorded on the meta device, or loaded from a file saved without values=True)"
    if t.numel() == 0:
        return "empty"
    if t.dtype == torch.bool:
        return f"true {int(t.sum())}/{t.numel()}"
    if t.is_complex():
        if t.numel() == 1:
            z = complex(t.item())
            return f"value {number(z.real)}{'-' if math.copysign(1, z.imag) < 0 else '+'}{number(abs(z.imag))}j"
        return "|z| " + _stats(t.abs().double())
    if t.numel() == 1:
        return f"value {number(t.item())}"
    if t.numel() <= FEW:
        return f"values {_entries(t)}"
    if not t.is_floating_point():
        return f"min {int(t.min())}  max {int(t.max())}"
    return _stats(t.double())


FEW = 4  # a tensor of at most this many entries shows them all: softmax of 3 numbers, a 2×2 weight


def _entries(t: Tensor) -> str:
    """``[1, 2, 3]``, ``[[1, 0.5], [-2, 3]]``: every entry, nested as the tensor is, 3 significant digits each."""
    if t.dim() == 0:
        value = t.item()
        return number(value if isinstance(value, (bool, int)) else float(value) + 0.0)  # (+ 0.0: no "-0")
    return "[" + ", ".join(_entries(row) for row in t) + "]"


def _stats(t: Tensor) -> str:
    finite = t[t.isfinite()]
    odd = _non_finite(t)
    if finite.numel() == 0:
        return odd
    text = (f"mean {number(finite.mean().item())}  std {number(finite.std(correction=0).item())}  "
            f"min {number(finite.min().item())}  max {number(finite.max().item())}")
    return f"{text}  (of {finite.numel()} finite; {odd})" if odd else text


def _non_finite(t: Tensor) -> str:
    """``1 nan, 2 inf, 1 -inf``: how many entries are not finite (empty when all are)."""
    counts = {"nan": int(t.isnan().sum()), "inf": int(t.isposinf().sum()), "-inf": int(t.isneginf().sum())}
    return ", ".join(f"{count} {what}" for what, count in counts.items() if count)


def grad_summary(grad: Tensor) -> str:
    """The gradient's norm and its largest entry in absolute value (its signed value for a scalar, its entries
    when it has at most :data:`FEW`); non-finite entries are counted, and the norm is that of the finite ones."""
    g = grad.detach().double()
    if g.numel() == 0:
        return "grad empty"
    if g.is_meta:
        return "grad: no values (meta)"
    if g.numel() == 1:  # a norm would drop the sign, which is what a scalar's gradient is read for
        return f"grad {number(g.item())}"
    if g.numel() <= FEW:  # and so would a few entries' (softmax of 3 numbers: which one gets the push)
        return f"grad {_entries(g)}"
    finite = g[g.isfinite()]
    odd = _non_finite(g)
    if finite.numel() == 0:
        return f"grad: {odd}"
    text = f"grad norm {number(finite.norm().item())}  max|g| {number(finite.abs().max().item())}"
    return f"{text}  (of {finite.numel()} finite; {odd})" if odd else text


# ---------------------------------------------------------------------------------------------- the drawing


@dataclass
class Box:
    """One node of the picture."""

    key: str
    rows: list[str]  # HTML rows, already escaped
    fill: str = COLORS["op"]
    cluster: tuple[str, ...] = ()
    tooltip: str = ""
    summary: str = ""  # "hprebn 32×64", for the box of a collapsed cluster
    is_op: bool = True
    attrs: dict[str, str] = field(default_factory=dict)
    shared: bool = False  # a leaf or constant that may be drawn once per use (see _one_box_per_use)
    result: bool = False  # what the picture is for (the loss; a final gradient): named by a collapsed cluster


@dataclass
class Drawing:
    """What to draw: boxes, edges, cluster labels, and the legend entries used."""

    boxes: dict[str, Box] = field(default_factory=dict)
    edges: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    cluster_labels: dict[tuple[str, ...], str] = field(default_factory=dict)
    collapsible: set[tuple[str, ...]] = field(default_factory=set)
    # "Linear#2" -> {"Linear", "Linear.__call__", "__call__"}: the names with which collapse= takes every call
    functions: dict[str, frozenset[str]] = field(default_factory=dict)
    legend: dict[str, str] = field(default_factory=dict)  # text -> fill colour
    title: str = ""

    def add(self, box: Box, legend: str | None = None) -> Box:
        self.boxes[box.key] = box
        if legend:
            self.legend.setdefault(legend, box.fill)
        return box

    def edge(self, tail: str, head: str, **attrs: str) -> None:
        self.edges.append((tail, head, attrs))


def esc(text: Any) -> str:
    """Text for an HTML-like label: markup escaped, control characters made visible (see :func:`visible`)."""
    return html.escape(visible(str(text)), quote=True)


# characters no XML document may hold (Graphviz's label parser rejects them, an SVG holding one does not open)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_CONTROL = re.compile("[\x00-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


def visible(text: str, keep_lines: bool = False) -> str:
    """Control characters written as Python writes them (``\\x01``, ``\\n``): a ``tg.scope`` or title holding one
    made dot fail, or wrote an SVG no browser opens. ``keep_lines`` keeps tabs and line breaks (a tooltip's)."""
    pattern = _NOT_XML if keep_lines else _CONTROL
    return pattern.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def op_row(text: str) -> str:
    return f'<font point-size="10" color="{_MUTED}">{esc(text)}</font>'


def name_row(name: str, shape: Iterable[int], *, named: bool = True, dtype: torch.dtype | None = None,
             note: str = "") -> str:
    """``hprebn 32×64`` (the name bold when it is the user's, muted when it is op-based)."""
    title = f"<b>{esc(name)}</b>" if named else f'<font color="{_MUTED}"><i>{esc(name)}</i></font>'
    extra = f"  {esc(str(dtype).replace('torch.', ''))}" if dtype is not None and dtype != torch.float32 else ""
    note = f' <font color="{_MUTED}">{esc(note)}</font>' if note else ""
    return f"{title}{note}  <font color=\"{_MUTED}\">{esc(shape_text(shape))}{extra}</font>"


def small_row(text: str, color: str = "#333333") -> str:
    return f'<font point-size="9" color="{color}">{esc(text)}</font>'


def cluster_path(data: dict[str, Any], mode: str | None, calls: dict[tuple, tuple[str, ...]] | None = None
                 ) -> tuple[str, ...]:
    """The clusters a node belongs to: its ``tg.scope`` path, or the calls of its function and of the functions
    that called it (see :func:`call_names`): ``("Block", "MultiHeadAttention", "Head#3")``.

    Top-level code (a script's or notebook cell's ``<module>``) is no cluster: it is the graph itself.
    """
    if mode == "scope":
        return tuple(part for part in (data.get("scope") or "").split("/") if part)
    if mode == "function":
        function = data.get("function")
        if not function or function == TOP_LEVEL:
            return ()
        path = calls.get((function, data.get("call"))) if calls else None
        return path if path is not None else (function_label(function),)
    return ()


TOP_LEVEL = "<module>"
CALL_METHODS = ("__call__", "forward")  # a layer's call: its cluster is labelled by the class alone


def function_label(function: str) -> str:
    """A recorded function's cluster label: ``block``; ``Linear`` for ``Linear.__call__`` or ``.forward``;
    ``Linear.reset`` for another method. A nested function drops its outer ones (``main.<locals>.block``)."""
    name = function.rpartition("<locals>.")[2]
    owner, _, method = name.rpartition(".")
    return owner if owner and method in CALL_METHODS else name


def function_aliases(function: str) -> frozenset[str]:
    """The names ``collapse=`` accepts for every call of a function: its label, its qualified name without outer
    functions (``Linear.__call__``) and its plain name (``__call__``, as before qualified names were recorded)."""
    name = function.rpartition("<locals>.")[2]
    return frozenset({function_label(function), name, name.rpartition(".")[2]})


def call_names(graph: Graph) -> dict[tuple[str, int | None], tuple[str, ...]]:
    """Each call of a function that ran ops, as a cluster path: the calls it was made from, then its own.

    A call is named by its function's label (:func:`function_label`), numbered per label in the order the
    calls began: ``Linear``, ``Linear#2``, ``Tanh``; ``("Block", "MultiHeadAttention", "Head#3")`` for a head
    called by an attention layer called by a block (the recorder keeps the graph's call tree; graphs saved
    without one have flat clusters). A call of the same label as its caller (a layer's ``__call__`` running its
    ``forward``) and a comprehension are part of their caller's cluster. Keyed by (function, call): a node's
    ``call`` tells the calls of one function apart (None in graphs saved before nodes had it: one cluster per
    function, as then).
    """
    callers = _callers(graph)
    names: dict[tuple[str, int | None], str] = {}
    count: dict[str, int] = {}
    for key in sorted(callers, key=_began(callers)):
        if not _merged(key, callers):
            label = function_label(key[0])
            index = count[label] = count.get(label, 0) + 1
            names[key] = label if index == 1 else f"{label}#{index}"
    paths: dict[tuple[str, int | None], tuple[str, ...]] = {}
    for key in callers:
        path, up = [], key
        while up is not None:
            if up in names:
                path.append(names[up])
            up = callers[up]
        paths[key] = tuple(reversed(path))
    return paths


def _callers(graph: Graph) -> dict[tuple[str, int | None], tuple[str, int] | None]:
    """The calls that ran ops and the calls they were made from, each with its caller (None: the block's code)."""
    tree = graph._calls
    pending = [(data["function"], data.get("call")) for data in graph._nodes
               if data.get("function") and data["function"] != TOP_LEVEL]
    callers: dict[tuple[str, int | None], tuple[str, int] | None] = {}
    while pending:
        key = pending.pop()
        if key in callers:
            continue
        call = key[1]
        up = tree[call][1] if call is not None and call < len(tree) and tree[call][0] == key[0] else None
        callers[key] = (tree[up][0], up) if up is not None and tree[up][0] != TOP_LEVEL else None
        if callers[key] is not None:
            pending.append(callers[key])
    return callers


def _began(callers: dict) -> Callable[[tuple], tuple]:
    """Sort key: calls in the order they began (a call began before the calls it made)."""
    began: dict[tuple[str, int | None], int] = {}
    for key in callers:
        start, up = (key[1] if key[1] is not None else -1), key
        while up is not None:
            began[up] = min(began.get(up, start), start)
            up = callers[up]
    return lambda key: (key[1] is None, began[key], key[1] or 0, key[0])


def _merged(key: tuple[str, int | None], callers: dict) -> bool:
    """Whether a call draws inside its caller's cluster: a comprehension, or a call of the caller's own label."""
    if key[0].endswith(_COMPREHENSIONS):
        return True
    caller = callers[key]
    return caller is not None and function_label(caller[0]) == function_label(key[0])


# a comprehension runs in a frame of its own before Python 3.12, inlined since: its ops are its function's
_COMPREHENSIONS = ("<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>")


def function_of_call(calls: dict[tuple[str, int | None], tuple[str, ...]]) -> dict[str, frozenset[str]]:
    """Cluster name -> the names of its functions (``Linear#2`` -> ``Linear``, ``Linear.__call__``, ``__call__``,
    and those of a ``forward`` its ``__call__`` ran), so that ``collapse=["Linear"]`` names every call."""
    aliases: dict[str, frozenset[str]] = {}
    for (function, _), path in calls.items():
        if path and not function.endswith(_COMPREHENSIONS):
            aliases[path[-1]] = aliases.get(path[-1], frozenset()) | function_aliases(function)
    return aliases


def cluster_mode(graph: Graph, mode: str | None) -> str | None:
    """Resolve ``cluster="auto"``: scopes if any were recorded, else functions if there are several."""
    if mode != "auto":
        return mode
    nodes = graph._nodes
    if any(data.get("scope") for data in nodes):
        return "scope"
    functions = {data.get("function") for data in nodes if data["kind"] == "op" and data.get("function")}
    return "function" if len(functions) > 1 else None


def distances(graph: Graph, roots: Iterable[int], depth: int | None) -> dict[int, int]:
    """How many ops each node is from the nearest root (following inputs), up to ``depth``."""
    roots = list(roots)
    if not roots:
        return {}
    return nx.multi_source_dijkstra_path_length(graph.nx.reverse(copy=False), set(roots), cutoff=depth)


# ---------------------------------------------------------------------------------------------- statuses


def statuses(graph: Graph, options: _Options) -> dict[int, tuple[str, str]]:
    """Per forward node: (status colour key, one line of text) from compare= and check= reports."""
    found: dict[int, tuple[str, str]] = {}
    if options.compare is not None:
        for row in getattr(options.compare, "rows", ()):
            node = _report_node(graph, row.name)
            if node is None:
                continue
            if row.exact:
                found[node] = ("exact", "vs torch: exact")
            elif row.approximate:
                found[node] = ("approximate", f"vs torch: approximate, maxdiff {number(row.maxdiff)}")
            elif getattr(row, "ok", False):  # beyond allclose only by rounding where terms cancel
                found[node] = ("approximate", f"vs torch: within rounding, maxdiff {number(row.maxdiff)}")
            else:
                found[node] = ("wrong", f"vs torch: WRONG, maxdiff {number(row.maxdiff)}")
    if options.check is not None:
        found.update(_check_statuses(graph, options.check))
    return found


def _check_statuses(graph: Graph, report: Any) -> dict[int, tuple[str, str]]:
    found: dict[int, tuple[str, str]] = {}
    rows = {}
    for row in getattr(report, "rows", ()):
        node = _report_node(graph, row.name)
        if node is not None:
            rows[node] = row
            kind = getattr(row, "kind", "ok")
            found[node] = ("ok", "check: ok") if kind == "ok" else ("wrong", f"check: {kind}")
    first_name = getattr(report, "first_error", None)
    first = _report_node(graph, first_name) if first_name else None
    if first is None:
        return found
    for node in graph.ancestors(first) - {first}:
        if is_float(graph._nodes[node]):
            kind = getattr(rows.get(node), "kind", "inherited")
            found[node] = ("downstream of the error", f"check: {kind}, downstream of d{graph._nodes[first]['name']}")
    row = rows.get(first)
    kind = getattr(row, "kind", "wrong")
    found[first] = ("first error", f"first error: {kind}")
    return found


def _report_node(graph: Graph, name: Any) -> int | None:
    """A report row's node: rows may be named ``hprebn`` or ``dhprebn``."""
    if not isinstance(name, str):
        return None
    if name in graph._names:
        return graph._names[name]
    if name.startswith("d") and name[1:] in graph._names:
        return graph._names[name[1:]]
    return None


def status_rows(status: tuple[str, str] | None, message: str = "") -> list[str]:
    if status is None:
        return []
    rows = [small_row(status[1], "#000000")]
    if message:
        rows.append(small_row(message if len(message) <= 60 else message[:59] + "…", "#000000"))
    return rows


def check_message(graph: Graph, options: _Options, node: int) -> str:
    """The check report's message for the first error (shown in its box)."""
    report = options.check
    if report is None or _report_node(graph, getattr(report, "first_error", None)) != node:
        return ""
    for row in getattr(report, "rows", ()):
        if _report_node(graph, row.name) == node:
            return str(getattr(row, "message", "") or "")
    return ""


# ---------------------------------------------------------------------------------------------- forward view


def loss_nodes(graph: Graph, root: int | None) -> set[int]:
    """The loss: the given root, else every scalar float output nobody uses."""
    if root is not None:
        return {root}
    nxg = graph.nx
    return {node for node, data in enumerate(graph._nodes)
            if data["kind"] == "op" and not data["shape"] and is_float(data) and nxg.out_degree(node) == 0}


def _hidden(graph: Graph, keep: set[int]) -> set[int]:
    """Unused, unnamed extra outputs of multi-output ops (the indices of ``max(...).values``)."""
    nxg = graph.nx
    return {node for node, data in enumerate(graph._nodes)
            if data["output_index"] is not None and not data["named"] and nxg.out_degree(node) == 0
            and node not in keep}


def forward_drawing(graph: Graph, options: _Options) -> Drawing:
    """The forward view: one box per recorded tensor, labelled with the op that made it."""
    nodes = graph._nodes
    nxg = graph.nx
    losses = loss_nodes(graph, options.root)
    shown = set(range(len(nodes))) - _hidden(graph, losses)
    if options.depth is not None:
        near = distances(graph, losses or _sinks(graph, shown), options.depth)
        shown &= set(near)
    mode = cluster_mode(graph, options.cluster)
    calls = call_names(graph) if mode == "function" else None
    paths = _forward_paths(graph, shown, mode, calls)
    status = statuses(graph, options)
    grads = options.grads.by_node if options.grads is not None else {}
    drawing = Drawing(functions=function_of_call(calls) if calls else {})
    name = lambda node: nodes[node]["name"]  # noqa: E731
    for node in sorted(shown):
        data = nodes[node]
        role = _role(data, node in losses)
        rows = [] if data["kind"] == "leaf" else [op_row(expression(data, name))]
        rows.append(name_row(data["name"], data["shape"], named=data["named"], dtype=data["dtype"]))
        if options.values:
            rows.append(small_row(value_summary(data["value"])))
        if node in grads:
            rows.append(small_row(grad_summary(grads[node]), "#7f3f00"))
        rows += status_rows(status.get(node), check_message(graph, options, node))
        fill = COLORS[status[node][0]] if node in status else COLORS[role]
        box = Box(f"n{node}", rows, fill, paths.get(node, ()), tooltip=_tooltip(data, name),
                  summary=f"{data['name']} {shape_text(data['shape'])}", is_op=data["kind"] == "op",
                  attrs=_role_attrs(role), shared=data["kind"] != "op" and not data["inputs"], result=node in losses)
        drawing.add(box, legend=None)
        drawing.legend.setdefault(_ROLE_TEXT[role], COLORS[role])
        if node in status:
            drawing.legend.setdefault(status[node][0], COLORS[status[node][0]])
    for tail, head, _key in nxg.edges(keys=True):
        if tail in shown and head in shown:
            drawing.edge(f"n{tail}", f"n{head}")
    _mark_cut(drawing, graph, shown, options.depth)
    _label_clusters(drawing, paths.values())
    return drawing


_ROLE_TEXT = {"op": "computed tensor", "leaf": "leaf (parameter or input)", "input": "integer input",
              "constant": "constant", "loss": "loss"}


def _role(data: dict[str, Any], is_loss: bool) -> str:
    if is_loss:
        return "loss"
    if data["kind"] == "leaf":
        return "leaf" if is_float(data) else "input"
    return "constant" if data["kind"] == "constant" else "op"


def _role_attrs(role: str) -> dict[str, str]:
    if role == "loss":
        return {"peripheries": "2", "penwidth": "1.5"}
    if role in ("leaf", "input"):
        return {"style": "filled", "penwidth": "1.3"}  # square corners: leaves are not computed
    if role == "constant":
        return {"style": "filled,dashed"}
    return {}


def _tooltip(data: dict[str, Any], name: Callable[[int], str]) -> str:
    what = definition(data["name"], data, name, limit=200) if data["kind"] != "leaf" else data["name"]
    where = f" ({data['source']} in {data['function']})" if data.get("source") else ""
    return f"{what}: {shape_text(data['shape'])} {str(data['dtype']).replace('torch.', '')}{where}"


def _sinks(graph: Graph, shown: set[int]) -> set[int]:
    nxg = graph.nx
    return {node for node in shown if nxg.out_degree(node) == 0}


def _forward_paths(graph: Graph, shown: set[int], mode: str | None,
                   calls: dict[tuple, tuple[str, ...]] | None) -> dict[int, tuple[str, ...]]:
    """Each node's cluster; a leaf joins the deepest cluster all its consumers share."""
    nodes = graph._nodes
    paths = {node: cluster_path(nodes[node], mode, calls) for node in shown if nodes[node]["inputs"]}
    nxg = graph.nx
    for node in shown:
        if node in paths:
            continue
        consumer_paths = [paths.get(c, ()) for c in nxg.successors(node) if c in shown]
        paths[node] = _common_prefix(consumer_paths) if consumer_paths else cluster_path(nodes[node], mode, calls)
    return paths


def _common_prefix(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    first = paths[0]
    length = len(first)
    for path in paths[1:]:
        length = min(length, len(path))
        for i in range(length):
            if path[i] != first[i]:
                length = i
                break
    return first[:length]


def _mark_cut(drawing: Drawing, graph: Graph, shown: set[int], depth: int | None) -> None:
    """With depth=k, one "⋯" box feeds the nodes whose inputs were not drawn."""
    if depth is None:
        return
    cut = sorted(node for node in shown if any(i not in shown for i in graph._nodes[node]["inputs"]))
    if not cut:
        return
    hidden = len(set().union(*(graph.ancestors(node) for node in cut)) - shown)
    drawing.add(Box("cut", [small_row(f"⋯ {hidden} earlier nodes not drawn (depth={depth})")], "#ffffff",
                    is_op=False, attrs={"style": "dashed", "shape": "box"}))
    for node in cut:
        drawing.edge("cut", f"n{node}", style="dashed")


def _label_clusters(drawing: Drawing, paths: Iterable[tuple[str, ...]]) -> None:
    for path in set(paths):
        for i in range(1, len(path) + 1):
            drawing.cluster_labels.setdefault(path[:i], path[i - 1])
            drawing.collapsible.add(path[:i])


# ---------------------------------------------------------------------------------------------- emitting DOT


def emit(drawing: Drawing, options: _Options, *, legend: bool = True, title: str | None = None,
         dpi: int | None = None) -> graphviz.Digraph:
    """The graphviz.Digraph of a drawing: nested clusters, collapsed clusters as one box each."""
    boxes, edges = collapse_clusters(drawing, options.collapse)
    if _long_edge_ranks(boxes, edges) > LONG_EDGE_BUDGET:
        boxes, edges = _one_box_per_use(boxes, edges)
    dot = graphviz.Digraph(
        "tensorgraph",
        graph_attr={"rankdir": options.rankdir, "fontname": "Helvetica", "nodesep": "0.25", "ranksep": "0.35",
                    "newrank": "true", "nslimit": NSLIMIT, **({"dpi": str(dpi)} if dpi else {})},
        node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "11",
                   "margin": "0.08,0.03", "color": "#444444"},
        edge_attr={"arrowsize": "0.6", "color": "#666666"},
    )
    children: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    members: dict[tuple[str, ...], list[Box]] = {}
    for box in boxes:
        members.setdefault(box.cluster, []).append(box)
        for i in range(len(box.cluster)):
            children.setdefault(box.cluster[:i], set()).add(box.cluster[:i + 1])
    counter = iter(range(1 << 30))

    def fill(container: graphviz.Digraph, path: tuple[str, ...]) -> None:
        for box in members.get(path, ()):
            attrs = {"fillcolor": box.fill, **box.attrs}
            if box.tooltip:
                attrs["tooltip"] = visible(box.tooltip, keep_lines=True)
            container.node(box.key, _table(box.rows), **attrs)
        for child in sorted(children.get(path, ())):
            with container.subgraph(name=f"cluster_{next(counter)}") as sub:
                label = drawing.cluster_labels.get(child, child[-1])
                sub.attr(label=_cluster_label(label), style="rounded,dashed", color="#888888",
                         fontname="Helvetica", fontsize="10", labeljust="l")
                fill(sub, child)

    fill(dot, ())
    for tail, head, attrs in edges:
        dot.edge(tail, head, **attrs)
    label = _legend(drawing, title if title is not None else drawing.title) if legend else ""
    if label:
        dot.attr(label=label, labelloc="b", labeljust="l", fontsize="10")
    return dot


def collapse_clusters(drawing: Drawing, names: frozenset[str]) -> tuple[list[Box], list[tuple[str, str, dict]]]:
    """Replace every cluster named in ``names`` by one box; edges into and out of it are kept once."""
    if not names:
        return list(drawing.boxes.values()), drawing.edges
    available = ({"/".join(path) for path in drawing.collapsible} | {path[-1] for path in drawing.collapsible}
                 | {alias for path in drawing.collapsible for alias in drawing.functions.get(path[-1], ())})
    unknown = sorted(set(names) - available)
    if unknown:
        listing = ", ".join(sorted("/".join(p) for p in drawing.collapsible)) or (
            "none: group ops with `with tg.scope(name):` inside record(), or pass cluster='function'")
        raise ValueError(f"render: no cluster named {', '.join(map(repr, unknown))} to collapse "
                         f"(clusters: {listing})")
    owner: dict[str, tuple[str, ...]] = {}
    for box in drawing.boxes.values():
        for i in range(1, len(box.cluster) + 1):
            if box.cluster[:i] in drawing.collapsible and (
                    "/".join(box.cluster[:i]) in names or box.cluster[i - 1] in names
                    or not names.isdisjoint(drawing.functions.get(box.cluster[i - 1], ()))):
                owner[box.key] = box.cluster[:i]
                break
    merged = {path: f"collapsed{index}" for index, path in enumerate(sorted(set(owner.values())))}
    rename = {key: merged[path] for key, path in owner.items()}
    edges: list[tuple[str, str, dict]] = []
    seen: set[tuple[str, str]] = set()
    leaving: dict[tuple[str, ...], list[str]] = {}
    for tail, head, attrs in drawing.edges:
        a, b = rename.get(tail, tail), rename.get(head, head)
        if a == b:
            continue
        if tail in owner and owner.get(head) != owner[tail]:
            leaving.setdefault(owner[tail], []).append(tail)
        if (a, b) not in seen:
            seen.add((a, b))
            edges.append((a, b, attrs))
    boxes = [box for box in drawing.boxes.values() if box.key not in owner]
    for path, key in merged.items():
        inside = [box for box in drawing.boxes.values() if owner.get(box.key) == path]
        boxes.append(_collapsed_box(key, path, inside, leaving.get(path, []), drawing))
    return boxes, edges


def _long_edge_ranks(boxes: list[Box], edges: list[tuple[str, str, dict]]) -> int:
    """About how many virtual nodes dot's layout will make: the ranks that edges skip.

    Ranks as dot assigns them, roughly: the longest path from a source, and each source
    just above its first consumer.
    """
    consumers: dict[str, list[str]] = {box.key: [] for box in boxes}
    waiting = dict.fromkeys(consumers, 0)
    for tail, head, _ in edges:
        consumers[tail].append(head)
        waiting[head] += 1
    rank = dict.fromkeys(consumers, 0)
    ready = [key for key, count in waiting.items() if count == 0]
    sources = list(ready)
    while ready:
        key = ready.pop()
        for head in consumers[key]:
            rank[head] = max(rank[head], rank[key] + 1)
            waiting[head] -= 1
            if waiting[head] == 0:
                ready.append(head)
    for key in sources:
        if consumers[key]:
            rank[key] = min(rank[head] for head in consumers[key]) - 1
    return sum(max(0, rank[head] - rank[tail] - 1) for tail, head, _ in edges)


_Edges = list[tuple[str, str, dict]]


def _one_box_per_use(boxes: list[Box], edges: _Edges) -> tuple[list[Box], _Edges]:
    """Draw each shared leaf or constant (a weight used at every step) again beside each of its uses.

    Its edges would cross the whole picture, and dot's layout time explodes with them.
    """
    by_key = {box.key: box for box in boxes}
    uses: dict[str, int] = {}
    for tail, _, _ in edges:
        uses[tail] = uses.get(tail, 0) + 1
    spread = {key for key, count in uses.items() if count > 1 and by_key[key].shared}
    if not spread:
        return boxes, edges
    kept = [box for box in boxes if box.key not in spread]
    seen: dict[str, int] = {}
    new_edges = []
    for tail, head, attrs in edges:
        if tail in spread:
            index = seen[tail] = seen.get(tail, 0) + 1
            box = by_key[tail]
            note = small_row(f"use {index} of {uses[tail]} (drawn at each use)", _MUTED)
            kept.append(Box(f"{tail}_use{index}", box.rows + [note], box.fill, by_key[head].cluster, box.tooltip,
                            box.summary, box.is_op, box.attrs, shared=True))
            tail = f"{tail}_use{index}"
        new_edges.append((tail, head, attrs))
    return kept, new_edges


def _collapsed_box(key: str, path: tuple[str, ...], inside: list[Box], leaving: list[str], drawing: Drawing) -> Box:
    ops = sum(box.is_op for box in inside)
    others = f", {len(inside) - ops} leaves" if len(inside) > ops else ""
    outputs = list(dict.fromkeys(leaving + [box.key for box in inside if box.result]))
    rows = [f"<b>{esc(drawing.cluster_labels.get(path, path[-1]))}</b>", small_row(f"{ops} ops{others} (collapsed)")]
    for out in outputs[:3]:
        rows.append(small_row("→ " + drawing.boxes[out].summary))
    if len(outputs) > 3:
        rows.append(small_row(f"→ … {len(outputs) - 3} more outputs"))
    drawing.legend.setdefault("collapsed cluster", COLORS["collapsed"])
    return Box(key, rows, COLORS["collapsed"], path[:-1], tooltip="/".join(path),
               attrs={"shape": "box3d", "style": "filled"})


def _table(rows: list[str]) -> str:
    cells = "".join(f"<tr><td>{row}</td></tr>" for row in rows)
    return f'<<table border="0" cellborder="0" cellspacing="0" cellpadding="1">{cells}</table>>'


def _cluster_label(text: str) -> str:
    return f"<<b>{esc(text)}</b>>"


def _legend(drawing: Drawing, title: str) -> str:
    entries = sorted(drawing.legend.items(), key=lambda item: item[0] in STATUSES)  # roles first, then statuses
    cells = "".join(f'<td bgcolor="{color}" border="1" cellpadding="3">{esc(text)}</td>' for text, color in entries)
    heading = f'<tr><td colspan="{max(1, len(drawing.legend))}" align="left"><b>{esc(title)}</b></td></tr>' \
        if title else ""
    if not cells and not heading:
        return ""
    body = f"<tr>{cells}</tr>" if cells else ""
    return f'<<table border="0" cellspacing="4" cellborder="0">{heading}{body}</table>>'


__all__ = ["render", "mimebundle", "GraphvizNotFoundError", "RenderTimeoutError", "RenderWarning", "FORMATS",
           "expression", "definition", "shape_text", "value_summary", "grad_summary"]
