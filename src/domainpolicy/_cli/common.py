"""What every command of the ``domainpolicy`` command line shares: exit codes, the argument
parser that keeps its errors to one line, one-line error messages (`one_line`, `CommandError`),
reading the configuration (`read_config`), ``--json`` output, input lists and the progress bar.

Imports the standard library and, inside `read_config` only, the configuration module: every
command module (`names`, `admin`, `replay`, `serve`) imports this one, and `domainpolicy._cli`
(the package) imports the command modules.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from domainpolicy._config import PolicyConfig

__all__ = [
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_USAGE",
    "Command",
    "CommandError",
    "Handler",
    "Parser",
    "Progress",
    "add_progress_option",
    "emit",
    "inputs",
    "one_line",
    "read_config",
    "whole_number",
]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace, TextIO], int]
"""A command's body: ``(arguments, stdout) -> exit code``."""

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Handler]
"""A command as its module declares it: ``(help, configure the sub-parser, handler)``; each
command module has a ``COMMANDS: dict[str, Command]``."""


MESSAGE_MAX = 400
"""About the longest error line `one_line` writes (the problems that fit, then a count)."""

_PROBLEM_MAX = 200


class CommandError(Exception):
    """A command cannot run: `main` writes ``domainpolicy: error: MESSAGE`` (one line) on stderr
    and exits with *code* (`EXIT_USAGE` unless told otherwise)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def one_line(exc: BaseException, limit: int = MESSAGE_MAX) -> str:
    """The message of *exc* on one line, detail kept.

    An `InvalidConfiguration` says its source and its problems joined with ``; `` (``invalid
    configuration in FILE: PROBLEM`` for one, ``... 3 problems: A; B; C`` for several); any other
    multi-line message has its continuation lines joined the same way.  Each problem is cut at
    about 200 characters and the line at about *limit*: the problems that do not fit are counted
    (``; ... and 4 more``).
    """
    problems: tuple[str, ...] | None = getattr(exc, "problems", None)
    if isinstance(problems, tuple) and all(isinstance(p, str) for p in problems):
        source = getattr(exc, "source", None)
        head = f"invalid configuration{f' in {source}' if source else ''}"
        if len(problems) > 1:
            head += f": {len(problems)} problems"
        parts = [" ".join(p.split()) for p in problems]
    else:
        lines = [line.strip().removeprefix("- ") for line in str(exc).splitlines()]
        lines = [line for line in lines if line] or [type(exc).__name__]
        head, parts = lines[0], lines[1:]
    if not parts:
        return _clip(head, limit)
    text = head + ": "
    for index, part in enumerate(parts):
        shown = _clip(part, _PROBLEM_MAX)
        rest = len(parts) - index - 1
        tail = f"; ... and {rest} more" if rest else ""
        if index and len(text) + len(shown) + len(tail) > limit:
            return text + f"... and {len(parts) - index} more"
        text += shown + ("; " if rest else "")
    return text


def read_config(path: str) -> PolicyConfig:
    """`load_config` for a command: a file that cannot be opened is ``cannot read
    configuration FILE: REASON``, not an invalid configuration.

    Raises:
        CommandError: *path* cannot be opened.
        InvalidConfiguration: the configuration is invalid (a syntax error, a bad value...).
    """
    from domainpolicy._config import load_config

    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise CommandError(f"cannot read configuration {path!r}: {exc.strerror or exc}") from exc
    return load_config(path)


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
        try:
            handle = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise CommandError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
        with handle:
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


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least *minimum*, else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its errors
    return parse
