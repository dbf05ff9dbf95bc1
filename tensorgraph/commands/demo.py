"""``tensorgraph demo``: the lecture, walked through (grows with each capability)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="the whole lecture in a few minutes")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..lecture import record_exercise

    graph, loss, _ = record_exercise()
    print("Exercise 1: backprop through the atomic compute graph")
    print(f"recorded {graph}; loss = {loss.item():.4f}\n")
    report = graph.compare(loss)
    print(report)
    return 0 if report.ok else 1
