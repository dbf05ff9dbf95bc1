"""``tensorgraph check FILE.py``: run a learner's script and judge its hand-written gradients.

The convention: after it runs, the script's globals hold

* ``graph``: the forward pass, recorded with ``with tg.record() as graph:``;
* ``loss``: the scalar it backpropagates from (the tensor, or its recorded name);
* ``manual``: a dict of the learner's gradients by recorded name, with or without the
  leading ``d`` (``{"dlogprobs": dlogprobs, ...}``). Without ``manual``, every global
  called ``d<name>`` for a recorded ``name`` is taken (the lecture's own naming); a global
  that looks like one but would be dropped (``dbnvarinv``, ``dw1``, a numpy ``dC``) is an error.

A notebook (``.ipynb``) runs its code cells in order, IPython magics, shell lines and help (``x?``)
skipped, except that ``%%time`` and ``%%capture`` cells run their body and ``%time stmt`` runs
``stmt``; ``display`` is IPython's (``print`` without IPython).

Exit status: 0 when no gradient is wrong, 1 when one is, 2 when the script cannot be
checked (missing file, the script raises, a variable is missing).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any

from ..cli import CLIError, positive_float

PROG = "tensorgraph check"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check", help="run a learner's script and diagnose its hand-written gradients",
        description="Run FILE.py (or FILE.ipynb: a notebook's code cells, in order), which must leave "
                    "`graph` (recorded with tg.record()), `loss` and your gradients in its globals: `manual` "
                    "(a dict {'dlogits': dlogits, ...}) or, without it, the lecture's variables d<name> for "
                    "the recorded names (dlogits, dW1, ...); print which gradient is wrong first and why. "
                    "Exit status 0: all right; 1: a gradient is wrong; 2: the script could not be checked.")
    parser.add_argument("script", metavar="FILE.py", help="the learner's script")
    parser.add_argument("--rtol", type=positive_float, default=None, help="relative tolerance (default: by dtype)")
    parser.add_argument("--atol", type=nonnegative_float, default=None,
                        help="absolute tolerance, 0 allowed (default: by dtype)")
    parser.add_argument("--answer", action="store_true",
                        help="also print the answer key: the whole backward pass as torch code")
    parser.add_argument("--textbook", action="store_true",
                        help="print the answer key (implies --answer) with torch's fused backward kernels written "
                             "as their formulas, for a handout: (1 - h**2) * dh for aten.tanh_backward(dh, h)")
    parser.add_argument("--render", metavar="PATH", default=None,
                        help="also draw the graph with the wrong gradient and its consequences coloured")
    parser.add_argument("--loss", metavar="NAME", default="loss",
                        help="the global (or recorded name) your gradients are of, when it is not called loss "
                             "(micrograd's L: --loss L)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    path = script_path(args.script, PROG)
    if args.render is not None:
        from .render import picture_path

        picture_path(args.render, "--render", PROG)  # a bad --render path fails before the learner's script runs
    name = args.loss
    namespace, graph, loss = script_graph(path, name, PROG)
    _check_recorded_values(path, graph, loss)
    manual = namespace.get("manual")
    if manual is None:
        manual = _gradients_by_name(namespace, graph, loss, path, name)
        if not manual:
            raise CLIError(f"{path} defines no 'manual' (a dict of your gradients, e.g. manual = {{'dlogits': "
                           f"dlogits, ...}}) and no d<name> variable for a recorded name{graph._names_note()}",
                           PROG)
    try:
        report = graph.check(manual, loss, rtol=args.rtol, atol=args.atol)
    except ValueError as err:  # a key or value graph.check cannot read: say where the script gave it
        raise CLIError(_check_error(err, path, namespace), PROG) from None
    print(report)
    if args.answer or args.textbook:
        if args.textbook:
            print("\n# the answer key: the backward pass, torch's fused backward kernels written as their formulas")
        else:
            print("\n# the answer key: the backward pass as the rules compute it")
        print(graph.backward_source(loss, textbook=args.textbook), end="")
    if args.render:
        graph.render(args.render, check=report, loss=loss)
        print(f"wrote {args.render}")
    return 0 if report.ok else 1


def script_path(text: str, prog: str) -> Path:
    """The script named on the command line, which must be a file."""
    path = Path(text)
    if not path.is_file():
        raise CLIError(f"{path} is a folder, not a file" if path.is_dir() else f"no such file: {path}", prog)
    return path


def script_graph(path: Path, name: str, prog: str, need_loss: bool = True) -> tuple[dict[str, Any], Any, Any]:
    """Run a script; its globals, the ``graph`` it recorded, and the scalar its global ``name`` holds (or the
    recorded tensor of that name; None when there is neither and ``need_loss`` is False)."""
    from ..graph import Graph

    namespace = run_script(path, prog)
    graph = namespace.get("graph")
    if not isinstance(graph, Graph):
        found = "defines no 'graph'" if graph is None else f"sets 'graph' to a {type(graph).__name__}"
        raise CLIError(f"{path} {found}; record the forward pass with `with tg.record() as graph:`", prog)
    if name in namespace:
        loss = namespace[name]
    elif name != "loss" and name in graph.names:  # a recorded name the script kept no variable for
        loss = name
    elif not need_loss:
        return namespace, graph, None
    else:
        hint = "" if name != "loss" else "; --loss NAME names another"
        raise CLIError(f"{path} defines no {name!r} (the tensor your gradients are of{hint})", prog)
    _check_loss(path, graph, loss, name, prog)
    return namespace, graph, loss


def run_script(path: Path, prog: str = PROG) -> dict[str, Any]:
    """Run a script (or a notebook's code cells, in order) as ``__main__``; its errors become one line
    naming its file and line (for a notebook: its cell and line)."""
    cells = _notebook_cells(path)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path)]
    sys.path.insert(0, str(path.resolve().parent))
    try:
        if cells is None:
            return runpy.run_path(str(path), run_name="__main__")
        namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(path), "__builtins__": __builtins__,
                                     "display": _display()}
        exec(compile("\n".join(code for code, _ in cells), str(path), "exec"), namespace)  # noqa: S102
        return namespace
    except BrokenPipeError:
        raise  # our reader closed stdout (`tensorgraph check x.py | head`): the CLI ends quietly, as other commands do
    except SystemExit as exit_:
        if exit_.code in (None, 0):
            raise CLIError(f"{path} exited before its globals could be read", prog) from exit_
        raise CLIError(f"{path} exited with status {exit_.code}", prog) from exit_
    except SyntaxError as err:
        where = _place(path, err.lineno, cells)
        raise CLIError(f"{where}: SyntaxError: {err.msg}", prog) from err
    except Exception as err:  # noqa: BLE001 - any failure of the learner's script is one line
        message = f"{_where(err, path, cells)}: {type(err).__name__}: {_first_line(err)}"
        raise CLIError(message + _misshapen_gradients(err, path, cells), prog) from err
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def _notebook_cells(path: Path) -> list[tuple[str, int]] | None:
    """A Jupyter notebook's code cells as (code, cell number), IPython syntax made Python (see
    ``_python_lines``); None for a script. Each cell keeps its line count, so a line of the joined
    code maps back to its cell."""
    if path.suffix != ".ipynb":
        return None
    try:
        return _code_cells(json.loads(path.read_text(encoding="utf-8"))["cells"])
    # a cell list, a cell or a source of another JSON type: TypeError or AttributeError
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise CLIError(f"{path} is not a readable Jupyter notebook ({type(err).__name__}); export its code with "
                       f"`jupyter nbconvert --to script {path}` and check the .py", PROG) from None


def _code_cells(cells: list[dict]) -> list[tuple[str, int]]:
    code = []
    for number, cell in enumerate((c for c in cells if c.get("cell_type") == "code"), 1):
        source = cell.get("source", "")
        lines = ("".join(source) if isinstance(source, list) else source).split("\n")
        code.append(("\n".join(_python_lines(lines)), number))
    return code


# cell magics whose body runs in the notebook's namespace as plain Python (its assignments stay);
# the body of any other (%%timeit runs it in a function of its own, %%bash is not Python) is skipped
_RUN_BODY_CELL_MAGICS = frozenset({"time", "capture"})
# line magics followed by a statement that runs in the namespace: ``%time dh = dlogits @ W2.T``
_RUN_STATEMENT_LINE_MAGICS = frozenset({"time"})
# ``files = !ls``, ``t = %timeit -o f()``: an assignment from a shell command or a magic
_MAGIC_ASSIGNMENT = re.compile(r"^\s*[A-Za-z_][\w\s,.\[\]()*]*=\s*[!%]")
# ``torch.zeros?``, ``??F.cross_entropy``: IPython's help
_HELP = re.compile(r"^\s*\?{0,2}[\w.\[\]()'\"]+\?{0,2}\s*$")


def _python_lines(lines: list[str]) -> list[str]:
    """One code cell's lines as Python, one for one: magics and shell lines blanked, except that
    ``%%time`` / ``%%capture`` cells run their body and ``%time stmt`` runs ``stmt``."""
    first = lines[0].strip() if lines else ""
    if first.startswith("%%"):
        magic = first[2:].split(maxsplit=1)[0] if first[2:].strip() else ""
        if magic not in _RUN_BODY_CELL_MAGICS:
            return [""] * len(lines)
        lines = ["", *lines[1:]]
    return [_python_line(line) for line in lines]


def _python_line(line: str) -> str:
    stripped = line.lstrip()
    indent = line[:len(line) - len(stripped)]
    if stripped.startswith("%"):
        magic, _, rest = stripped[1:].partition(" ")
        return indent + rest.strip() if magic in _RUN_STATEMENT_LINE_MAGICS and rest.strip() else ""
    if stripped.startswith("!") or _MAGIC_ASSIGNMENT.match(line):
        return ""
    if "?" in (stripped[:1], stripped.rstrip()[-1:]) and _HELP.match(line):
        return ""
    return line


def _display() -> Any:
    """A notebook's ``display``: IPython's when it is installed, else ``print``."""
    try:
        from IPython.display import display
    except ImportError:
        return print
    return display


def _place(path: Path, line: int | None, cells: list[tuple[str, int]] | None) -> str:
    """``file.py:12``, or ``notebook.ipynb, cell 3, line 2``."""
    if not line:
        return str(path)
    if cells is None:
        return f"{path}:{line}"
    for code, number in cells:
        count = code.count("\n") + 1
        if line <= count:
            return f"{path}, cell {number}, line {line}"
        line -= count
    return str(path)


def _where(err: BaseException, path: Path, cells: list[tuple[str, int]] | None = None) -> str:
    """file:line of the deepest frame of the script itself (where the learner's code failed)."""
    target = os.path.realpath(path)
    line = None
    for frame in traceback.extract_tb(err.__traceback__):
        if os.path.realpath(frame.filename) == target:
            line = frame.lineno
    return _place(path, line, cells)


def _script_globals(err: BaseException, path: Path) -> dict[str, Any] | None:
    """The globals the script had when it failed (its deepest frame's), or None."""
    target, found = os.path.realpath(path), None
    tb = err.__traceback__
    while tb is not None:
        if os.path.realpath(tb.tb_frame.f_code.co_filename) == target:
            found = tb.tb_frame.f_globals
        tb = tb.tb_next
    return found


def _misshapen_gradients(err: BaseException, path: Path, cells: list[tuple[str, int]] | None) -> str:
    """When a script fails part-way through its backward pass, the gradients it had set whose shape differs
    from their tensor's: a ``.sum(1)`` without ``keepdim=True`` fails lines later, where it is used."""
    import torch

    from ..graph import Graph, identifier

    namespace = _script_globals(err, path)
    graph = namespace.get("graph") if namespace else None
    if not isinstance(graph, Graph):
        return ""
    found = []
    names = graph.names
    for name in reversed(names):  # backward order: the first one set is the likely cause
        variable, shape = "d" + identifier(name), tuple(graph.node(name)["shape"])
        value = namespace.get(variable)
        if variable not in names and isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
            got = tuple(value.shape)
            found.append(f"{variable} ({_assignment(path, variable)}) has shape {got} but {name} is {shape}"
                         f"{_shape_cause(got, shape)}")
    if not found:
        return ""
    return f"; before it, {'; '.join(found[:3])}. Each gradient must have its tensor's shape: fix the first"


def _shape_cause(got: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """The likely slip behind a gradient of shape ``got`` for a tensor of ``shape``."""
    if [size for size in got if size != 1] == [size for size in shape if size != 1]:
        return " (a sum without keepdim=True?)" if len(got) < len(shape) else " (keepdim=True where the dim goes?)"
    return " (transposed?)" if got == shape[::-1] else ""


def _check_error(err: ValueError, path: Path, namespace: dict[str, Any]) -> str:
    """graph.check's error as one line: ``file.py:40: manual: ...`` when it is about an entry of the
    script's ``manual`` dict (the line that set it), ``file.py: ...`` otherwise."""
    message = _first_line(err).removeprefix("check: ")
    about_manual = any(frame.name == "_resolve" and frame.filename.endswith("check.py")
                       for frame in traceback.extract_tb(err.__traceback__))
    if about_manual and "manual" in namespace:
        return f"{_assignment(path, 'manual')}: manual: {message}"
    return f"{path}: {message}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def nonnegative_float(text: str) -> float:
    """A tolerance: a finite float >= 0 (``--atol 0`` asks for rtol alone, as the API allows)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _check_loss(path: Path, graph: Any, loss: Any, name: str = "loss", prog: str = PROG) -> None:
    """``loss`` (the global ``name``) must be a scalar recorded in ``graph``; say where the script set it
    otherwise."""
    from ..engine import root_node

    where = _assignment(path, name)
    try:
        root = root_node(graph, loss)
    except ValueError as err:
        reason = str(err).removeprefix("graph.backward: ")
        raise CLIError(f"{where}: {name!r} is not in the recorded graph ({reason}); set it inside the "
                       f"tg.record() block, or to the name of a recorded tensor", prog) from None
    data = graph._nodes[root]
    if data["value"].numel() != 1:
        raise CLIError(f"{where}: {name!r} must be the scalar your gradients are of, but it is {data['name']!r} of "
                       f"shape {tuple(data['shape'])} (reduce it, e.g. with .mean(), inside the tg.record() "
                       f"block)", prog)


def _check_recorded_values(path: Path, graph: Any, loss: Any) -> None:
    """The leaves must hold their recorded values: exercise 4's loop updates them at its end."""
    from ..engine import check_unchanged, root_node

    if not getattr(graph, "_fingerprints", None):
        return
    try:
        check_unchanged(graph, root_node(graph, loss), "tensorgraph check judges the gradients the script leaves, "
                        "so end it (or break out of the training loop) before the update.")
    except RuntimeError as err:
        raise CLIError(f"{path}: {str(err).removeprefix('tensorgraph: ')}", PROG) from None


def _assignment(path: Path, name: str) -> str:
    """``file.py:12``: the script's last assignment to ``name`` (or the file alone)."""
    cells = _notebook_cells(path)
    try:
        tree = ast.parse(path.read_bytes() if cells is None else "\n".join(code for code, _ in cells))
    except (SyntaxError, ValueError, OSError):
        return str(path)
    line = None
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else
            [item.optional_vars for item in node.items if item.optional_vars] if isinstance(node, ast.With) else [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            line = max(line or 0, node.lineno)
    return _place(path, line, cells)


def _gradients_by_name(namespace: dict[str, Any], graph: Any, loss: Any, path: Path | str = "the script",
                       name: str = "loss") -> dict[str, Any]:
    """The lecture's convention without a dict: globals dlogprobs, dprobs ... for recorded tensors."""
    import torch

    from ..graph import identifier

    try:
        upstream = graph.ancestors(loss)
    except KeyError as err:
        raise CLIError(f"{name!r} is not in the recorded graph: {err.args[0]}", "tensorgraph check") from None
    found = {}
    expected = {}  # global name -> recorded name, for the gradients the loss has
    for node in upstream:
        data = graph._nodes[node]
        if not (data["dtype"].is_floating_point and data["named"]):
            continue
        variable = "d" + identifier(data["name"])
        value = namespace.get(variable)
        if _is_number(value) and tuple(data["shape"]) == ():  # micrograd's way, for a scalar: dc = 1.0
            found["d" + data["name"]] = value  # (graph.check reads a number as a scalar's gradient)
            continue
        expected[variable] = data["name"]
        if isinstance(value, torch.Tensor):
            found["d" + data["name"]] = value
    problems = _stray_gradients(namespace, expected, set(graph.names))
    if problems:  # each at the line that set it: a misspelt dbnvarinv is one of some thirty lines
        where = (lambda variable: _assignment(path, variable)) if isinstance(path, Path) else (lambda _: str(path))
        raise CLIError("; ".join(f"{where(variable)}: {problem}" for variable, problem in problems), PROG)
    return found


def _stray_gradients(namespace: dict[str, Any], expected: dict[str, str], names: set[str]) -> list[tuple[str, str]]:
    """Globals that look like gradients but would be dropped, as (variable, what is wrong): not a tensor, or a
    near miss of a name."""
    import torch

    problems = []
    for variable, value in namespace.items():
        if variable in expected:
            if value is not None and not isinstance(value, torch.Tensor):
                problems.append((variable, f"{variable} is a {type(value).__name__}, not a tensor "
                                           f"(torch.as_tensor(...) makes it one)"))
            continue
        if not variable.startswith("d") or names & {variable, variable[1:]} or not _array_like(value):
            continue
        close = [e for e in expected if e.lower() == variable.lower()] or difflib.get_close_matches(
            variable, list(expected), n=1, cutoff=0.8)
        if close:
            problems.append((variable, f"{variable} is not the gradient of a recorded tensor (did you mean "
                                       f"{close[0]}?)"))
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _array_like(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) or (hasattr(value, "shape") and hasattr(value, "dtype"))
