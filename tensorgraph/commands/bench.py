"""``tensorgraph bench``: the engine and tg.compile against torch autograd, scaling, and memory (issue 7)."""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import CLIError, positive_int

PARTS = ("steps", "overhead", "scaling", "memory")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="time the engine and tg.compile against torch autograd (ratios, scaling, memory)",
        description="Time a training step of the lecture's exercise-4 MLP (hidden 200, batch 32) under torch "
                    "autograd, tensorgraph's engine and tg.compile, side by side in one process (medians over "
                    "interleaved repetitions); then time per node as graphs grow, and memory over many steps.")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--repeats", type=positive_int, default=30,
                        help="interleaved repetitions per variant (default: 30)")
    parser.add_argument("--inner", type=positive_int, default=20, help="steps per repetition (default: 20)")
    parser.add_argument("--sizes", default="100,1000,10000,100000",
                        help="graph sizes for the scaling table, comma-separated (default: 100,1000,10000,100000)")
    parser.add_argument("--memory-steps", type=positive_int, default=10_000,
                        help="training steps per backend for the memory check (default: 10000)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"what to measure, comma-separated from {', '.join(PARTS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="a fast smoke run: 5 repetitions, sizes up to 10,000, 500 memory steps")
    parser.set_defaults(run=run)
    return parser


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError:
        raise CLIError(f"--sizes: expected comma-separated node counts, got {text!r}", "tensorgraph bench") from None
    if not sizes or any(n < 3 for n in sizes):
        raise CLIError(f"--sizes: every size must be at least 3 nodes, got {text!r}", "tensorgraph bench")
    return sizes


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise CLIError(f"--only: unknown part {', '.join(unknown) or text!r} (choose from {', '.join(PARTS)})",
                       "tensorgraph bench")
    return parts


def _device(name: str) -> str:
    import torch

    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError("--device cuda: no CUDA device is available on this machine (torch "
                           f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)",
                           "tensorgraph bench")
        return name
    raise CLIError(f"--device: expected cpu or cuda, got {name!r}", "tensorgraph bench")


def run(args: argparse.Namespace) -> int:
    from ..benchmark import format_report
    from ..benchmark import run as run_benchmark

    device = _device(args.device)
    sizes, parts = _sizes(args.sizes), _parts(args.only)
    repeats, memory_steps = args.repeats, args.memory_steps
    if args.quick:
        repeats, memory_steps = min(repeats, 5), min(memory_steps, 500)
        sizes = tuple(n for n in sizes if n <= 10_000) or sizes[:1]

    def progress(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    report = run_benchmark(device=device, threads=args.threads, repeats=repeats, inner=args.inner, sizes=sizes,
                           memory_steps=memory_steps, parts=parts, progress=progress)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report))
    return 0
