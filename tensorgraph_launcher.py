"""The ``tensorgraph`` console script: the command line, with Ctrl-C during its start-up answered too.

``tensorgraph.cli.main`` answers Ctrl-C with one line and exit status 130, but importing the
package (torch, several seconds) comes before it. This module sits outside the package, so
the console script imports it without importing torch, and it answers a Ctrl-C during that
import the same way: ``tensorgraph: interrupted``, status 130, never a traceback.

During the import a Ctrl-C ends the process at once (nothing has been done yet) instead of
raising KeyboardInterrupt: raised inside a C extension's initialisation, KeyboardInterrupt
becomes pybind11's ``ImportError: initialization failed``, which an optional import may
swallow (the command then runs on as if never interrupted) or the CLI reports as an error.
"""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED = 130


def main() -> int:
    """Import and run the command line; Ctrl-C at any point ends in ``tensorgraph: interrupted`` and 130."""
    watching = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # leave an ignored SIGINT ignored
    if watching:
        signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        from tensorgraph.cli import main as cli_main
    finally:
        if watching:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return cli_main()
    except KeyboardInterrupt:
        print("tensorgraph: interrupted", file=sys.stderr)
        return INTERRUPTED


def _exit_interrupted(signum: int, frame: object) -> None:
    sys.stderr.write("tensorgraph: interrupted\n")
    sys.stderr.flush()
    os._exit(INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
