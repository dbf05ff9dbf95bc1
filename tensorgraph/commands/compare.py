"""``tensorgraph compare``: the lecture's exercise-1 table, engine vs torch autograd."""

from __future__ import annotations

import argparse

import torch

from ..cli import positive_int, require_memory


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare", help="exercise 1: every gradient of the lecture's MLP vs torch autograd",
        description="Record exercise 1's forward pass (the lecture's MLP, batch 32), backpropagate it with "
                    "tensorgraph's engine and print the lecture's cmp table for every named tensor against torch "
                    "autograd: exact, approximate, maxdiff, the distance in ulps and why a row is not exact. Exit "
                    "status 0: every gradient agrees; 1: one does not.")
    parser.add_argument("--hidden", type=positive_int, default=64, help="hidden units (lecture: 64)")
    parser.add_argument("--double", action="store_true", help="run in float64")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..lecture import record_exercise, setup

    # ~60 parameters and ~3,000 recorded and replayed values per hidden unit (batch 32)
    require_memory(3_100 * args.hidden * (8 if args.double else 4), f"--hidden {args.hidden:,}", "tensorgraph compare")
    ex = setup(n_hidden=args.hidden, dtype=torch.float64 if args.double else torch.float32)
    graph, loss, _ = record_exercise(ex)
    report = graph.compare(loss)
    print(f"recorded {graph}; loss = {loss.item():.4f}")
    print(report)
    return 0 if report.ok else 1
