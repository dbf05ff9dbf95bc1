"""``tensorgraph check FILE.py``: run a learner's script and judge its hand-written gradients.

The convention: after it runs, the script's globals hold

* ``graph``: the forward pass, recorded with ``with tg.record() as graph:``;
* ``loss``: the scalar it backpropagates from (the tensor, or its recorded name);
* ``manual``: a dict of the learner's gradients by recorded name, with or without the
  leading ``d`` (``{"dlogprobs": dlogprobs, ...}``). Without ``manual``, every global
  called ``d<name>`` for a recorded ``name`` is taken (the lecture's own naming).

Exit status: 0 when no gradient is wrong, 1 when one is, 2 when the script cannot be
checked (missing file, the script raises, a variable is missing).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any

from ..cli import CLIError, positive_float


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check", help="run a learner's script and diagnose its hand-written gradients",
        description="Run FILE.py, which must leave `graph` (recorded with tg.record()), `loss` and `manual` "
                    "(a dict {'dlogits': dlogits, ...} of your gradients) in its globals, and print which "
                    "gradient is wrong first and why. Exit status 0: all right; 1: a gradient is wrong; "
                    "2: the script could not be checked.")
    parser.add_argument("script", metavar="FILE.py", help="the learner's script")
    parser.add_argument("--rtol", type=positive_float, default=None, help="relative tolerance (default: by dtype)")
    parser.add_argument("--atol", type=positive_float, default=None, help="absolute tolerance (default: by dtype)")
    parser.add_argument("--answer", action="store_true",
                        help="also print the answer key: the whole backward pass as torch code")
    parser.add_argument("--render", metavar="PATH", default=None,
                        help="also draw the graph with the wrong gradient and its consequences coloured")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..graph import Graph

    path = Path(args.script)
    if not path.is_file():
        raise CLIError(f"no such file: {path}", "tensorgraph check")
    namespace = run_script(path)
    graph = namespace.get("graph")
    if not isinstance(graph, Graph):
        found = "defines no 'graph'" if graph is None else f"sets 'graph' to a {type(graph).__name__}"
        raise CLIError(f"{path} {found}; record the forward pass with `with tg.record() as graph:`",
                       "tensorgraph check")
    if "loss" not in namespace:
        raise CLIError(f"{path} defines no 'loss' (the tensor your gradients are of)", "tensorgraph check")
    manual = namespace.get("manual")
    if manual is None:
        manual = _gradients_by_name(namespace, graph, namespace["loss"])
        if not manual:
            raise CLIError(f"{path} defines no 'manual' (a dict of your gradients, e.g. manual = {{'dlogits': "
                           f"dlogits, ...}}) and no d<name> variables", "tensorgraph check")
    report = graph.check(manual, namespace["loss"], rtol=args.rtol, atol=args.atol)
    print(report)
    if args.answer:
        print("\n# the answer key: the backward pass as the rules compute it")
        print(graph.backward_source(namespace["loss"]), end="")
    if args.render:
        graph.render(args.render, check=report, loss=namespace["loss"])
        print(f"wrote {args.render}")
    return 0 if report.ok else 1


def run_script(path: Path) -> dict[str, Any]:
    """Run a script as ``__main__``; its errors become one line naming its file and line."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path)]
    sys.path.insert(0, str(path.resolve().parent))
    try:
        return runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code in (None, 0):
            raise CLIError(f"{path} exited before it could be checked", "tensorgraph check") from exit_
        raise CLIError(f"{path} exited with status {exit_.code}", "tensorgraph check") from exit_
    except SyntaxError as err:
        where = f"{path}:{err.lineno}" if err.lineno else str(path)
        raise CLIError(f"{where}: SyntaxError: {err.msg}", "tensorgraph check") from err
    except Exception as err:  # noqa: BLE001 - any failure of the learner's script is one line
        raise CLIError(f"{_where(err, path)}: {type(err).__name__}: {_first_line(err)}", "tensorgraph check") from err
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def _where(err: BaseException, path: Path) -> str:
    """file:line of the deepest frame of the script itself (where the learner's code failed)."""
    target = os.path.realpath(path)
    line = None
    for frame in traceback.extract_tb(err.__traceback__):
        if os.path.realpath(frame.filename) == target:
            line = frame.lineno
    return f"{path}:{line}" if line else str(path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "(no message)"


def _gradients_by_name(namespace: dict[str, Any], graph: Any, loss: Any) -> dict[str, Any]:
    """The lecture's convention without a dict: globals dlogprobs, dprobs ... for recorded tensors."""
    import torch

    from ..graph import identifier

    try:
        upstream = graph.ancestors(loss)
    except KeyError as err:
        raise CLIError(f"'loss' is not in the recorded graph: {err.args[0]}", "tensorgraph check") from None
    found = {}
    for node in upstream:
        data = graph._nodes[node]
        value = namespace.get("d" + identifier(data["name"]))
        if isinstance(value, torch.Tensor) and data["dtype"].is_floating_point and data["named"]:
            found["d" + data["name"]] = value
    return found
