"""What every command of the ``domainpolicy`` command line shares: exit codes, the argument
parser that keeps its errors to one line, ``--json`` output, input lists and the progress bar.

Imports only the standard library: every command module (`names`, `admin`, `replay`, `serve`)
imports this one, and `domainpolicy._cli` (the package) imports the command modules.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

__all__ = [
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_USAGE",
    "Command",
    "Handler",
    "Parser",
    "Progress",
    "add_progress_option",
    "emit",
    "inputs",
]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace, TextIO], int]
"""A command's body: ``(arguments, stdout) -> exit code``."""

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Handler]
"""A command as its module declares it: ``(help, configure the sub-parser, handler)``; each
command module has a ``COMMANDS: dict[str, Command]``."""


class Parser(argparse.ArgumentParser):
    """An ``argparse`` parser whose usage errors are one line and exit with `EXIT_USAGE`."""

    def error(self, message: str) -> Any:  # argparse's own exit path, kept to one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def emit(out: TextIO, args: argparse.Namespace, record: dict[str, Any], text: str) -> None:
    """Write *record* as one JSON line (``--json``) or *text* to *out*."""
    if args.json:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        out.write(text + "\n")


def inputs(values: Sequence[str], path: str | None) -> Iterator[str]:
    """The command-line *values*, then the non-blank, non-comment lines of *path* (``-``:
    stdin)."""
    yield from values
    if path is not None:
        handle: TextIO
        with sys.stdin if path == "-" else open(path, encoding="utf-8") as handle:
            for raw in handle:
                line = raw.strip()
                if line and not line.startswith("#"):
                    yield line


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` for a command that may run long."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show a progress bar on stderr (default: only when stderr is a terminal)",
    )
    group.add_argument("--no-progress", dest="progress", action="store_false", help="never show it")


class Progress:
    """A progress bar on stderr, ``[#####    ]  20% <label>``, redrawn when the percentage
    changes; nothing at all unless *enabled* (``--progress``, or stderr is a terminal)."""

    def __init__(self, total: int, args: argparse.Namespace) -> None:
        self.total = max(total, 1)
        self.enabled: bool = args.progress if args.progress is not None else sys.stderr.isatty()
        self.shown = -1

    def draw(self, done: int, label: str, *, force: bool = False) -> None:
        """Show *done* of the total with *label* (only if the percentage changed, or *force*)."""
        if not self.enabled:
            return
        percent = min(100, done * 100 // self.total)
        if percent == self.shown and not force:
            return
        self.shown = percent
        sys.stderr.write(f"\r[{'#' * (percent // 4):<25}] {percent:3d}% {label}")
        sys.stderr.flush()

    def finish(self, done: int | None = None, label: str = "") -> None:
        """Draw the final state (when *done* is given) and end the line."""
        if done is not None:
            self.draw(done, label, force=True)
        if self.enabled and self.shown >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()
