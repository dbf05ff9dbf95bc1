"""``tensorgraph sample``: names from a trained makemore checkpoint."""

from __future__ import annotations

import argparse
import sys

from ..cli import positive_int
from .train import seed_int


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sample", help="sample names from a checkpoint written by `tensorgraph train`",
        description="Print names sampled one character at a time from the model a `tensorgraph train` run saved "
                    "(its model.pt, checked before it is loaded).")
    parser.add_argument("--checkpoint", metavar="PATH", required=True, help="model.pt from `tensorgraph train`")
    parser.add_argument("--n", metavar="N", type=positive_int, default=20, help="how many names (default 20)")
    parser.add_argument("--seed", metavar="N", type=seed_int, default=None,
                        help="the sampling generator's seed (default: the training seed + 10, as the lecture does)")
    parser.add_argument("--max-length", metavar="N", type=positive_int, default=100, help="longest name (default 100)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from ..makemore.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, unverified_note

    data = load_checkpoint(args.checkpoint)
    note = unverified_note(data, args.checkpoint)
    if note:
        print(note, file=sys.stderr)
    model, vocab = model_from_checkpoint(data)
    if model.bnmean is None or model.bnvar is None:
        raise CheckpointError(f"{args.checkpoint}: the checkpoint has no calibrated batchnorm statistics")
    seed = args.seed if args.seed is not None else int(data.get("config", {}).get("seed", 2147483647)) + 10
    for name in model.sample(vocab, args.n, generator=torch.Generator().manual_seed(seed),
                             max_length=args.max_length):
        print(name)
    return 0
