"""``tensorgraph demo``: the lecture "becoming a backprop ninja", walked through in under a minute.

1. Exercise 1: every gradient of the atomic graph from tensorgraph's engine, compared with torch autograd.
2. Exercises 2 and 3: the fused cross-entropy and batchnorm gradients, derived with sympy.
3. A picture of the recorded graph.
4. Exercise 4: a short training run with graph.backward(), the same steps under torch autograd, and samples.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import replace
from pathlib import Path

from ..cli import positive_int


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="the whole lecture in under a minute",
        description="The lecture 'becoming a backprop ninja', walked through in under a minute: exercise 1 (every "
                    "gradient of the atomic graph from tensorgraph's engine, compared with torch autograd), exercises "
                    "2 and 3 (the fused cross-entropy and batchnorm gradients, derived with sympy), a picture of the "
                    "recorded graph, and exercise 4 (a short training run with graph.backward(), the same steps under "
                    "torch autograd, and sampled names).")
    parser.add_argument("--steps", type=positive_int, default=10_000,
                        help="training steps of the short run (default 10000; the lecture trains 200000)")
    parser.add_argument("--out", metavar="DIR", default="tensorgraph-out/demo",
                        help="where the pictures, checkpoint and metrics go (default tensorgraph-out/demo)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..cli import CLIError
    from .train import ensure_folder

    if args.out == "":
        raise CLIError("argument --out: expected a folder, got an empty string", "tensorgraph demo")
    out = ensure_folder(Path(args.out), "tensorgraph demo")  # a bad --out fails now, not after the exercises
    graph, ok = exercise_1()
    derivations()
    picture(graph, out)
    exercise_4(args.steps, out, progress=not args.quiet)
    return 0 if ok else 1


def heading(text: str) -> None:
    print(f"\n{'=' * 8} {text} {'=' * max(0, 70 - len(text))}", flush=True)


def note(text: str) -> None:
    print(f"(note: {text})", flush=True)


def exercise_1():
    from ..lecture import record_exercise

    heading("Exercise 1: backprop through the atomic compute graph")
    graph, loss, _ = record_exercise()
    print(f"recorded the lecture's forward pass: {graph}; loss = {loss.item():.4f}")
    print("graph.backward(loss) gives every gradient; graph.compare(loss) checks each against torch autograd:\n")
    report = graph.compare(loss)
    print(report)
    return graph, report.ok


def derivations() -> None:
    """The ``derive`` command's two lecture derivations, when the symbolic module is there."""
    from ..cli import build_parser

    heading("Exercises 2 and 3: the fused gradients, derived with sympy")
    if importlib.util.find_spec("tensorgraph.commands.derive") is None:
        note("derivations skipped: the derive command (tensorgraph.symbolic) is not available yet")
        return
    parser = build_parser()
    try:
        for chain in ("cross-entropy", "batchnorm"):
            args = parser.parse_args(["derive", chain])
            print(f"$ tensorgraph derive {chain}", flush=True)
            args.run(args)
            print()
    except Exception as err:  # noqa: BLE001 - one section of a walk-through must not stop the rest
        note(f"derivations skipped: {_why(err)}")


def picture(graph, out: Path) -> None:
    heading("The graph")
    path = out / "exercise1.svg"
    try:
        written = graph.render(path)
    except Exception as err:  # noqa: BLE001
        note(f"picture skipped: {_why(err)}")
        return
    print(f"wrote {written or path}: the forward graph of exercise 1, each node named after the lecture's variable "
          f"(open it in a browser; `tensorgraph render --view backward` draws the backward pass)")


def exercise_4(steps: int, out: Path, progress: bool) -> None:
    from ..makemore.data import load_splits
    from ..makemore.train import TrainConfig, train, write_outputs

    heading("Exercise 4: training the MLP with graph.backward()")
    splits = load_splits()
    config = TrainConfig(steps=steps, eval_every=max(1, steps // 5))
    print(f"the lecture's network (hidden 200, batchnorm, {sum(p.numel() for p in _params(config, splits)):,} "
          f"parameters), {steps:,} SGD steps of batch 32, lr 0.1 then 0.01; every gradient from graph.backward",
          flush=True)
    engine = train(splits, config, backend="engine", progress=progress, checkpoint=out / "model.pt")
    print(f"engine backend: train {engine.train_loss:.4f}, val {engine.val_loss:.4f} "
          f"({engine.seconds:.1f} s, {steps / engine.seconds:.0f} steps/s)", flush=True)
    reference = train(splits, replace(config, eval_every=steps), backend="torch", progress=False)
    same = engine.state.losses == reference.state.losses
    print(f"torch autograd, same seed: train {reference.train_loss:.4f}, val {reference.val_loss:.4f} "
          f"({reference.seconds:.1f} s); the two runs' {steps:,} batch losses are "
          + ("bit-identical" if same else f"within {_max_gap(engine, reference):.2g} of each other"))
    print("(the full run, `tensorgraph train`: train 2.0711, val 2.1119 after 200,000 steps; the lecture: 2.0705, "
          "2.1099)")
    heading("Samples")
    import torch

    names = engine.model.sample(splits.vocab, 20, generator=torch.Generator().manual_seed(config.seed + 10))
    print(" ".join(names))
    metrics = write_outputs(engine, splits, out, samples=names, render=False)
    print(f"\nwrote {out / 'model.pt'} (try: tensorgraph sample --checkpoint {out / 'model.pt'}), "
          f"{metrics['files']['loss_curve']}, {out / 'metrics.json'}")


def _params(config, splits):
    from ..makemore.train import init_state

    return init_state(config, len(splits.vocab), splits.block_size).model.parameters()


def _max_gap(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a.state.losses, b.state.losses))


def _why(err: Exception) -> str:
    if isinstance(err, ModuleNotFoundError) and err.name and err.name.startswith("tensorgraph"):
        return f"{err.name} is not available yet"
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:200]

