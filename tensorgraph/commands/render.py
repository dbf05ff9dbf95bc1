"""``tensorgraph render``: draw the lecture's exercise-1 graph (forward, with gradients, or backward), or the graph
a script of your own records (``tensorgraph render toy.py --out toy.svg --grads``)."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..cli import CLIError, positive_int


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "render", help="draw the lecture's MLP graph, or your script's, with Graphviz (.svg .png .pdf .dot)",
        description="Draw the compute graph of the lecture's MLP (makemore part 4, exercise 1), or, given "
                    "FILE.py, the graph your own script records (its globals `graph` and `loss`, as for "
                    "tensorgraph check). The format comes from the suffix of --out; .dot needs no Graphviz install.")
    parser.add_argument("script", nargs="?", metavar="FILE.py", default=None,
                        help="a script (or notebook) recording `with tg.record() as graph:`; draw its graph "
                             "instead of the lecture's")
    parser.add_argument("--loss", metavar="NAME", default="loss",
                        help="with FILE.py: the global the gradients are of (default: loss; micrograd's L: --loss L)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="where to write: mlp.svg, mlp.png, mlp.pdf or mlp.dot")
    parser.add_argument("--view", choices=("forward", "backward"), default="forward",
                        help="forward: the tensors the lecture computes; backward: the ops the engine runs to "
                             "get their gradients (default: forward)")
    parser.add_argument("--grads", action="store_true", help="show each tensor's gradient (norm and largest entry)")
    parser.add_argument("--compare", action="store_true",
                        help="colour each gradient by how it compares with torch autograd (exact/approximate/wrong)")
    parser.add_argument("--values", action="store_true", help="show each tensor's mean, std, min and max")
    parser.add_argument("--depth", type=positive_int, metavar="K", help="draw only the K ops nearest the loss")
    parser.add_argument("--rankdir", choices=("TB", "LR"), default="TB", help="top to bottom (TB) or left to right")
    parser.add_argument("--dpi", type=positive_int, help="resolution of PNG output")
    parser.add_argument("--textbook", action="store_true",
                        help="with --view backward: draw fused kernels as their formulas and an F.cross_entropy "
                             "as (softmax - one_hot) / n, as check --textbook prints them")
    parser.set_defaults(run=run)
    return parser


def picture_path(path: str, option: str, prog: str) -> None:
    """A picture's path from the command line, checked before the work: its errors name the option."""
    from ..render import output_format

    try:
        output_format(path)
    except (ValueError, OSError) as err:
        raise CLIError(f"{option}: {str(err).removeprefix('render: ')}", prog) from None


def run(args: argparse.Namespace) -> int:
    from ..render import render

    picture_path(args.out, "--out", "tensorgraph render")  # a bad path fails before the work
    if args.textbook and args.view != "backward":
        raise CLIError("--textbook draws the backward view; add --view backward", "tensorgraph render")
    graph, loss, what = _graph(args)
    grads = graph.backward(loss) if args.grads or args.view == "backward" else None
    compare = graph.compare(loss) if args.compare else None
    with warnings.catch_warnings(record=True) as caught:  # one line each, not Python's file:line format
        warnings.simplefilter("always")
        try:
            path = render(graph, args.out, view=args.view, grads=grads, loss=loss, compare=compare,
                          values=args.values, depth=args.depth, rankdir=args.rankdir, dpi=args.dpi,
                          textbook=args.textbook)
        except OSError as err:  # a folder that refuses the file (permissions, /proc): named by the option
            if not str(err).startswith("render: cannot write"):
                raise
            raise CLIError(f"--out: {str(err).removeprefix('render: ')}", "tensorgraph render") from None
    for warning in caught:
        print(f"tensorgraph render: warning: {warning.message}", file=sys.stderr)
    print(f"wrote {path}: the {args.view} view of {what} ({len(graph)} recorded tensors)")
    return 0


def _graph(args: argparse.Namespace) -> tuple:
    """The graph to draw, its loss (None: a script's forward view without one) and what to call it."""
    if args.script is None:
        from ..lecture import record_exercise

        graph, loss, _ = record_exercise()
        return graph, loss, "the lecture's MLP"
    from .check import script_graph, script_path

    path = script_path(args.script, "tensorgraph render")
    need_loss = args.grads or args.compare or args.view == "backward" or args.loss != "loss"
    _, graph, loss = script_graph(path, args.loss, "tensorgraph render", need_loss=need_loss)
    return graph, loss, str(path)
