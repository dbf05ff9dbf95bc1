"""The ``tensorgraph`` command line: one sub-command per module in ``tensorgraph.commands``.

Every failure a user can cause (a missing file, a bad option, data that cannot be used)
ends in one line on stderr and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Sequence

# each module defines register(subparsers) -> parser, with parser.set_defaults(run=...)
COMMANDS = ["demo", "compare", "render", "derive", "train", "sample", "check", "bench"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""

    def __init__(self, message: str, prog: str = "tensorgraph") -> None:
        super().__init__(message)
        self.prog = prog


_DEBUG_HELP = "show full tracebacks on errors"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage dump -> one line
        raise CLIError(message, self.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tensorgraph", description="tensorgraph: record, check, draw and derive the gradients of "
                     "PyTorch code; the lecture 'becoming a backprop ninja' as a tool.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"tensorgraph.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"tensorgraph.commands.{name}":
                continue  # command not built yet
            raise
        command = module.register(subparsers)
        # --debug after the command too (tensorgraph derive ... --debug); SUPPRESS: when absent there, the
        # command's parser leaves alone a --debug given before the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def require_memory(nbytes: int, what: str, prog: str) -> None:
    """Refuse sizes whose tensors alone would not fit in this machine's memory.

    Linux's out-of-memory killer ends such a run without a word (exit 137), often minutes in.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no check
        return
    if nbytes > 0.8 * total:
        raise CLIError(f"{what} would need about {nbytes / 2**30:,.1f} GiB of memory, more than this machine's "
                       f"{total / 2**30:,.1f} GiB; choose smaller sizes", prog)


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The sub-command's parser (the top-level one without a command)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> CLIError:
    """argparse's "unrecognized arguments", said by the command that read them, with the options a typo meant."""
    known = [option for action in parser._actions for option in action.option_strings]
    meant = []
    for word in extra:
        close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.75) if word.startswith("-") else []
        meant += [f"{close[0]}?"] if close else []
    hint = f" (did you mean {' '.join(meant)})" if meant else ""
    return CLIError(f"unrecognized arguments: {' '.join(extra)}{hint}", parser.prog)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # before or after the command; known even when the arguments do not parse
    prog = "tensorgraph"
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        command = _command_parser(parser, getattr(args, "command", None))
        prog = command.prog
        if extra:
            raise _unrecognized(command, extra)
        if not getattr(args, "run", None):
            # NOTE: no command is a usage error (status 2, like argparse's), so that a script notices it
            parser.print_help(sys.stderr)
            print(f"{prog}: error: choose a command, e.g. `tensorgraph demo`", file=sys.stderr)
            return 2
        result = args.run(args)
        return int(result or 0)
    except KeyboardInterrupt:
        print("tensorgraph: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except BrokenPipeError:
        return 0
    except Exception as err:  # noqa: BLE001 - the CLI's one-line error policy
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not isinstance(err, (CLIError, OSError, ValueError)):
            message = f"{type(err).__name__}: {message}"
        prog = err.prog if isinstance(err, CLIError) else prog
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
