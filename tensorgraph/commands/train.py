"""``tensorgraph train``: train the lecture's makemore MLP with graph.backward() (exercise 4)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..cli import CLIError, positive_float, positive_int

# option -> TrainConfig field, for the options a checkpoint fixes
_ARCHITECTURE = {"embd": "n_embd", "hidden": "n_hidden", "batch": "batch_size", "lr": "lr", "seed": "seed"}


def seed_int(text: str) -> int:
    """argparse type: a seed in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..makemore.train import BACKENDS

    parser = subparsers.add_parser(
        "train", help="train the lecture's makemore MLP with graph.backward() (exercise 4)",
        description="Train the character-level MLP of 'makemore part 4' (embedding, linear, batchnorm, tanh, "
                    "linear) with SGD, taking every gradient from tensorgraph's engine. The defaults are the "
                    "lecture's: 200,000 steps of batch 32, lr 0.1 then 0.01 from half-way, on names.txt.")
    parser.add_argument("--steps", metavar="N", type=positive_int, help="SGD steps in total (default 200000)")
    parser.add_argument("--batch", metavar="N", type=positive_int, help="batch size (default 32; at least 2)")
    parser.add_argument("--embd", metavar="N", type=positive_int, default=None, help="embedding size (default 10)")
    parser.add_argument("--hidden", metavar="N", type=positive_int, default=None, help="hidden units (default 200)")
    parser.add_argument("--lr", metavar="X", type=positive_float, default=None,
                        help="learning rate until half-way, then a tenth of it (default 0.1)")
    parser.add_argument("--seed", metavar="N", type=seed_int, default=None,
                        help="seed of the parameters' and batches' generator (default 2147483647, the lecture's)")
    parser.add_argument("--backend", choices=list(BACKENDS), default="engine",
                        help="engine: tg.record + graph.backward (default); torch: torch autograd; "
                             "compiled: tg.compile")
    parser.add_argument("--data", metavar="FILE", default=None,
                        help="one word per line (default: the embedded names.txt); the vocabulary comes from it")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder (default ./tensorgraph-out/<timestamp>; with --resume, the checkpoint's)")
    parser.add_argument("--resume", metavar="CHECKPOINT", default=None, help="continue from a checkpoint (model.pt)")
    parser.add_argument("--eval-every", metavar="N", type=positive_int, default=None,
                        help="steps between full train/val evaluations for the loss curve "
                             "(default steps/10, at least 5000)")
    parser.add_argument("--threads", metavar="N", type=positive_int, default=1,
                        help="torch threads (default 1: the steps are too small to gain from more)")
    parser.add_argument("--samples", metavar="N", type=int, default=20, help="names to sample at the end (default 20)")
    parser.add_argument("--no-render", action="store_true", help="skip the picture of one step's graph")
    parser.add_argument("--json", action="store_true", help="print the final metrics as one JSON line on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..makemore.train import TrainingInterrupted, train, write_outputs

    if args.samples < 0:
        raise CLIError(f"argument --samples: expected a non-negative integer, got {args.samples}", "tensorgraph train")
    setup = prepare(args)
    out = ensure_folder(setup["out"])
    say = _printer(args)
    load_before = _load()
    say(f"training the makemore MLP ({setup['describe']}) with the {args.backend} backend; outputs in {out}")
    try:
        result = train(setup["splits"], setup["config"], backend=args.backend, state=setup["state"],
                       progress=not args.quiet, checkpoint=out / "model.pt",
                       checkpoint_extra={"data": setup["data"]}, handle_sigint=True,
                       threads=args.threads)
    except TrainingInterrupted as stop:
        print(f"tensorgraph: {stop}", file=sys.stderr)
        return 130
    samples = sample_names(result.model, result.vocab, args.samples, result.config.seed + 10)
    info = {"data": setup["data"] or "names.txt (embedded)", "load_average": {"start": load_before, "end": _load()},
            "threads": args.threads}
    metrics = write_outputs(result, setup["splits"], out, samples=samples, render=not args.no_render, info=info)
    say(f"train loss {result.train_loss:.4f}   val loss {result.val_loss:.4f}   "
        f"({result.steps:,} steps, {result.seconds:.1f} s, {result.steps / max(result.seconds, 1e-9):.0f} steps/s)")
    if samples:
        say("samples: " + " ".join(samples))
    for note in metrics["notes"]:
        say(note)
    say(f"wrote {out / 'model.pt'}, {out / 'loss.png'}, {out / 'metrics.json'}"
        + (f", {metrics['files']['graph']}" if metrics["files"].get("graph") else ""))
    if args.json:
        print(json.dumps(result.metrics()))
    return 0


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Data, configuration, state (fresh or resumed) and output folder from the options."""
    from ..makemore.checkpoint import load_checkpoint
    from ..makemore.data import load_splits
    from ..makemore.train import TrainConfig, check_splits, state_from_checkpoint

    given = {field: getattr(args, option) for option, field in _ARCHITECTURE.items()
             if getattr(args, option) is not None}
    if args.resume is None:
        config = TrainConfig(**given, **_optional(steps=args.steps, eval_every=args.eval_every))
        config.resolved()  # check before loading anything
        splits = load_splits(args.data)
        check_splits(splits, args.data or "names.txt")
        out = Path(args.out) if args.out else default_out()
        return {"splits": splits, "config": config, "state": None, "data": _data_path(args.data), "out": out,
                "describe": f"{config.steps:,} steps, hidden {config.n_hidden}, seed {config.seed}"}
    checkpoint = load_checkpoint(args.resume)
    state, config, vocab = state_from_checkpoint(checkpoint)
    for field, value in given.items():
        if getattr(config, field) != value:
            option = next(o for o, f in _ARCHITECTURE.items() if f == field)
            raise CLIError(f"--{option} {value} conflicts with the checkpoint {args.resume} "
                           f"({field} = {getattr(config, field)}); leave it out to resume", "tensorgraph train")
    if args.steps is not None:
        if args.steps <= state.step:
            raise CLIError(f"the checkpoint {args.resume} is already at step {state.step:,}; pass --steps greater "
                           f"than that to continue", "tensorgraph train")
        config.steps = args.steps
    elif state.step >= config.steps:
        raise CLIError(f"the checkpoint {args.resume} finished its {config.steps:,} steps; pass a larger --steps "
                       f"to train further", "tensorgraph train")
    if args.eval_every is not None:
        config.eval_every = args.eval_every
    data = args.data if args.data is not None else checkpoint.get("data")
    splits = load_splits(data)
    check_splits(splits, data or "names.txt")
    if splits.vocab != vocab:
        raise CLIError(_vocab_mismatch(data, splits.vocab, vocab, args.resume), "tensorgraph train")
    out = Path(args.out) if args.out else Path(args.resume).parent
    return {"splits": splits, "config": config, "state": state, "data": _data_path(data), "out": out,
            "describe": f"resuming at step {state.step:,} of {config.steps:,}"}


def _vocab_mismatch(data: str | None, have: Any, want: Any, checkpoint: str) -> str:
    """Name the first line with a character the checkpoint cannot encode, else the two character sets."""
    from ..makemore.data import default_path

    path = Path(data) if data is not None else default_path()
    known = set(want.stoi)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        unknown = sorted(set(line.strip()) - known)
        if unknown:
            return (f"{path}:{number}: the character {unknown[0]!r} is not in the vocabulary of the checkpoint "
                    f"{checkpoint} ({_chars(want)!r})")
    return (f"the data {path} has the characters {_chars(have)!r} but the checkpoint {checkpoint} was trained on "
            f"{_chars(want)!r}")


def ensure_folder(out: Path) -> Path:
    """Create the output folder now, so a bad --out fails before training, not after it."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a folder", "tensorgraph train")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--out {out}: cannot create the folder: {err.strerror or err}", "tensorgraph train") from None
    if not os.access(out, os.W_OK):
        raise CLIError(f"--out {out}: the folder is not writable", "tensorgraph train")
    return out


def sample_names(model: Any, vocab: Any, n: int, seed: int) -> list[str]:
    import torch

    return model.sample(vocab, n, generator=torch.Generator().manual_seed(seed)) if n else []


def default_out() -> Path:
    base = Path("tensorgraph-out") / time.strftime("%Y%m%d-%H%M%S")
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _optional(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _data_path(data: str | None) -> str | None:
    return None if data is None else os.path.abspath(data)


def _chars(vocab: Any) -> str:
    return "".join(vocab.itos[i] for i in range(1, len(vocab)))


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _printer(args: argparse.Namespace):
    stream = sys.stderr if args.json else sys.stdout

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=stream, flush=True)

    return say
