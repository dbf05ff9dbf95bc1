"""``tensorgraph train``: train the lecture's makemore MLP with graph.backward() (exercise 4)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..cli import CLIError, positive_float, positive_int, require_memory

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


def batch_int(text: str) -> int:
    """argparse type: a batch size, at least 2 (batchnorm's variance divides by n - 1)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 (batchnorm's variance needs two examples), got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..makemore.train import BACKENDS

    parser = subparsers.add_parser(
        "train", help="train the lecture's makemore MLP with graph.backward() (exercise 4)",
        description="Train the character-level MLP of 'makemore part 4' (embedding, linear, batchnorm, tanh, "
                    "linear) with SGD, taking every gradient from tensorgraph's engine. The defaults are the "
                    "lecture's: 200,000 steps of batch 32, lr 0.1 then 0.01 from half-way, on names.txt.")
    parser.add_argument("--steps", metavar="N", type=positive_int, help="SGD steps in total (default 200000)")
    parser.add_argument("--batch", metavar="N", type=batch_int, help="batch size (default 32; at least 2)")
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
    parser.add_argument("--force", action="store_true",
                        help="overwrite another run's model.pt in --out; with --resume, continue on --data other "
                             "than the data the checkpoint was trained on")
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
    from ..makemore.train import TrainingInterrupted, train

    if args.samples < 0:
        raise CLIError(f"argument --samples: expected a non-negative integer, got {args.samples}", "tensorgraph train")
    setup = prepare(args)
    require_memory(_memory_needed(setup["config"], setup["splits"]), _sizes(setup["config"]), "tensorgraph train")
    out = ensure_folder(setup["out"])
    _refuse_overwrite(out / "model.pt", args)
    say = _printer(args)
    for note in setup["notes"]:  # shown even with --quiet: each says the run is not what the user may assume
        print(note, file=sys.stderr)
    load_before = _load()
    say(f"training the makemore MLP ({setup['describe']}) with the {args.backend} backend; outputs in {out}")
    try:
        result = train(setup["splits"], setup["config"], backend=args.backend, state=setup["state"],
                       progress=not args.quiet, checkpoint=out / "model.pt",
                       checkpoint_extra={"data": setup["data"], "data_sha256": setup["data_sha256"]},
                       handle_sigint=True, threads=args.threads)
    except TrainingInterrupted as stop:
        print(f"tensorgraph: {stop}", file=sys.stderr)
        return 130
    try:
        return _report(args, result, setup, out, say, load_before)
    except KeyboardInterrupt:
        print(f"tensorgraph: interrupted while writing the outputs; the finished run is saved to {out / 'model.pt'}",
              file=sys.stderr)
        return 130


def _report(args: argparse.Namespace, result: Any, setup: dict[str, Any], out: Path, say, load_before) -> int:
    """Samples, the loss curve, the graph picture, metrics.json, and the summary of a finished run."""
    from ..makemore.train import write_outputs

    samples = sample_names(result.model, result.vocab, args.samples, result.config.seed + 10)
    info = {"data": setup["data"] or "names.txt (embedded)", "load_average": {"start": load_before, "end": _load()},
            "threads": args.threads}
    metrics = write_outputs(result, setup["splits"], out, samples=samples, render=not args.no_render, info=info)
    say(f"train loss {result.train_loss:.4f}   val loss {result.val_loss:.4f}   "
        f"({result.steps:,} steps, {result.seconds:.1f} s; {result.steps_per_second:.0f} steps/s, "
        f"evaluations excluded)")
    if samples:
        say("samples: " + " ".join(samples))
    for note in metrics["notes"]:
        say(note)
    say(f"wrote {out / 'model.pt'}, {out / 'loss.png'}, {out / 'metrics.json'}"
        + (f", {metrics['files']['graph']}" if metrics["files"].get("graph") else ""))
    if args.json:
        print(json.dumps(result.metrics()))
    return 0


def _memory_needed(config: Any, splits: Any) -> int:
    """Bytes (float32) for the parameters with their gradients and optimizer copies, a step's recorded graph,
    and the evaluation of the largest split in one pass (its embeddings, three hidden and two output tensors)."""
    vocab, block = len(splits.vocab), splits.block_size
    embd, hidden, batch = config.n_embd, config.n_hidden, config.batch_size
    parameters = vocab * embd + block * embd * hidden + hidden * vocab + 3 * hidden + vocab
    rows = max(len(split[1]) for split in (splits.train, splits.val, splits.test))
    evaluation = rows * (2 * block * embd + 4 * hidden + 2 * vocab)
    return 4 * (4 * parameters + 40 * batch * (block * embd + hidden + vocab) + evaluation)


def _sizes(config: Any) -> str:
    return f"--embd {config.n_embd:,} --hidden {config.n_hidden:,} --batch {config.batch_size:,}"


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Data, configuration, state (fresh or resumed), output folder and notes from the options."""
    from ..makemore.checkpoint import load_checkpoint, unverified_note
    from ..makemore.data import data_checksum, load_splits
    from ..makemore.train import TrainConfig, check_splits, extend_config, state_from_checkpoint

    if args.out == "":
        raise CLIError("argument --out: expected a folder, got an empty string", "tensorgraph train")
    given = {field: getattr(args, option) for option, field in _ARCHITECTURE.items()
             if getattr(args, option) is not None}
    if args.resume is None:
        config = TrainConfig(**given, **_optional(steps=args.steps, eval_every=args.eval_every))
        config.resolved()  # check before loading anything
        splits = load_splits(args.data)
        check_splits(splits, args.data or "names.txt")
        out = Path(args.out) if args.out else default_out()
        return {"splits": splits, "config": config, "state": None, "data": _data_path(args.data), "out": out,
                "data_sha256": data_checksum(args.data), "notes": [],
                "describe": f"{config.steps:,} steps, hidden {config.n_hidden}, seed {config.seed}"}
    checkpoint = load_checkpoint(args.resume)
    notes = [note for note in [unverified_note(checkpoint, args.resume)] if note]
    state, config, vocab = state_from_checkpoint(checkpoint, args.resume)
    for field, value in given.items():
        if getattr(config, field) != value:
            option = next(o for o, f in _ARCHITECTURE.items() if f == field)
            raise CLIError(f"--{option} {value} conflicts with the checkpoint {args.resume} "
                           f"({field} = {getattr(config, field)}); leave it out to resume", "tensorgraph train")
    if args.steps is not None:
        if args.steps <= state.step:
            raise CLIError(f"the checkpoint {args.resume} is already at step {state.step:,}; pass --steps greater "
                           f"than that to continue", "tensorgraph train")
        if args.steps != config.steps:
            config, note = extend_config(config, state, args.steps)
            notes += [f"note: {note}"] if note else []
    elif state.step >= config.steps:
        raise CLIError(f"the checkpoint {args.resume} finished its {config.steps:,} steps; pass a larger --steps "
                       f"to train further", "tensorgraph train")
    if args.eval_every is not None:
        config.eval_every = args.eval_every
    data = args.data if args.data is not None else checkpoint.get("data")
    if data is not None and args.data is None and not Path(data).exists():
        raise CLIError(f"the data file the checkpoint {args.resume} was trained on, {data}, is not there any more; "
                       f"pass --data with its new place", "tensorgraph train")
    splits = load_splits(data)
    check_splits(splits, data or "names.txt")
    if splits.vocab != vocab:
        raise CLIError(_vocab_mismatch(data, splits.vocab, vocab, args.resume), "tensorgraph train")
    data_sha256 = data_checksum(data)
    notes += _check_same_data(checkpoint, data, data_sha256, args)
    out = Path(args.out) if args.out else Path(args.resume).parent
    return {"splits": splits, "config": config, "state": state, "data": _data_path(data), "out": out,
            "data_sha256": data_sha256, "notes": notes,
            "describe": f"resuming at step {state.step:,} of {config.steps:,}"}


def _check_same_data(checkpoint: dict[str, Any], data: str | None, sha256: str, args: argparse.Namespace) -> list[str]:
    """Refuse to resume on data other than the checkpoint's (its sha256 differs) unless --force; notes."""
    saved = checkpoint.get("data_sha256")
    if saved is None or saved == sha256:
        return []
    name = data or "the embedded names.txt"
    trained_on = checkpoint.get("data") or "the embedded names.txt"
    if args.force:
        return [f"note: continuing on {name}, which is not the data the checkpoint was trained on ({trained_on})"]
    if args.data is not None:
        problem = f"--data {args.data} is not the data the checkpoint {args.resume} was trained on ({trained_on})"
    else:
        problem = f"the data file {name} has changed since the checkpoint {args.resume} was written"
    raise CLIError(f"{problem} (the sha256 recorded in the checkpoint differs); pass --force to continue on it "
                   f"anyway", "tensorgraph train")


def _refuse_overwrite(target: Path, args: argparse.Namespace) -> None:
    """A new run must not replace another run's checkpoint without --force (--resume of it is fine)."""
    if args.force or not target.exists():
        return
    if args.resume is not None and _same_file(target, Path(args.resume)):
        return
    raise CLIError(f"--out {target.parent} already holds a run's checkpoint ({target}); continue that run with "
                   f"--resume {target}, choose another --out, or pass --force to overwrite it", "tensorgraph train")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _vocab_mismatch(data: str | None, have: Any, want: Any, checkpoint: str) -> str:
    """Name the first line with a character the checkpoint cannot encode, else the two character sets."""
    from ..makemore.data import default_path

    path = Path(data) if data is not None else default_path()
    known = set(want.stoi)
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        unknown = sorted(set(line.strip()) - known)
        if unknown:
            return (f"{path}:{number}: the character {unknown[0]!r} is not in the vocabulary of the checkpoint "
                    f"{checkpoint} ({_chars(want)!r})")
    return (f"the data {path} has the characters {_chars(have)!r} but the checkpoint {checkpoint} was trained on "
            f"{_chars(want)!r}")


def ensure_folder(out: Path, prog: str = "tensorgraph train") -> Path:
    """Create the output folder now, so a bad --out fails before the work, not after it."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a folder", prog)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--out {out}: cannot create the folder: {err.strerror or err}", prog) from None
    if not _writable(out):
        raise CLIError(f"--out {out}: the folder is not writable", prog)
    return out


def _writable(folder: Path) -> bool:
    """os.access misses a read-only mount for root: try creating a file."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


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
