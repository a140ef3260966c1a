"""The ``memjax`` command: audit, score, convert, mia, influence, memorization, info, export.

One thin adapter module per subcommand (``_audit``, ``_score``, ``_convert``, ``_mia``,
``_influence``, ``_memorization``, ``_store`` for info and export): each parses its
arguments, calls the Python API and prints. Expected errors print one line,
``memjax: error: ...`` naming the input, and exit with status 2, without a traceback:
bad arguments (argparse's own errors included), bad input files and stores
(:class:`memjax.errors.MemjaxError`), and operating-system errors on a file or folder the
command line named (missing, a folder where a file was expected, not writable). Anything
else is a bug and keeps its traceback. Output cut short by a closed pipe
(``memjax info ... | head``) ends quietly with status 141, as for a process killed by
SIGPIPE.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from memjax.cli import (
    _audit,
    _clipscore,
    _convert,
    _distributed,
    _influence,
    _memorization,
    _mia,
    _prototypes,
    _robustness,
    _score,
    _store,
    _unlearning,
)
from memjax.errors import MemjaxError

#: The subcommands' adapters, in the order ``memjax --help`` lists them.
COMMANDS = (_audit, _score, _convert, _mia, _influence, _memorization, _unlearning,
            _robustness, _prototypes, _clipscore, _store)

#: Exit status of a command whose output pipe was closed (128 + SIGPIPE).
BROKEN_PIPE_STATUS = 141


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (``memjax: error: ...``, status 2) like every
    other error of the command; subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"memjax: error: {' '.join(message.split())} (see {self.prog} "
                  "--help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="memjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    for leaf in subcommands(parser).values():
        _distributed.add_options(leaf)
    return parser


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                ) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every leaf subcommand of ``parser`` by its path, e.g. ``("mia", "tokens")``."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.update(subcommands(child, (*prefix, name)) or {(*prefix, name): child})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        return _run(parser, argv)
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_STATUS
    except KeyboardInterrupt:
        print("memjax: interrupted", file=sys.stderr)
        return 130


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or an argument error already printed
        sys.stdout.flush()
        return exit_.code if isinstance(exit_.code, int) else 0
    try:
        _distributed.initialize(args)
        code = args.run(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe must end quietly
        return code
    except MemjaxError as err:
        return _error(str(err))
    except OSError as err:
        if isinstance(err, BrokenPipeError):
            raise
        named = _named_input(parser, args, err)
        if named is None:
            raise  # not a path the user gave: a bug, keep the traceback
        return _error(f"{named}: {err.strerror or err}")


def _error(message: str) -> int:
    print(f"memjax: error: {message}", file=sys.stderr)
    return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again
    (the recipe of Python's ``signal`` module documentation, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured)
        pass
    finally:
        os.close(devnull)


def _named_input(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 err: OSError) -> str | None:
    """``--flag 'value'`` for the command-line argument naming the path ``err`` is about
    (the path itself, a folder holding it, or a path inside it), else None."""
    paths = [Path(os.path.abspath(p)) for p in (err.filename, err.filename2)
             if isinstance(p, str | os.PathLike)]
    flags = _flags(parser, getattr(args, "command", None))
    cwd = Path.cwd()
    best = None
    for dest, value in vars(args).items():
        if not isinstance(value, str) or dest in ("command", "run") or not value:
            continue
        given = Path(os.path.abspath(value))
        for path in paths:
            # A folder above the given path counts, but not the working folder or above:
            # every relative argument (--signal tokens) is "inside" those.
            above = path in given.parents and path != cwd and path not in cwd.parents
            related = path == given or given in path.parents or above
            if related and (best is None or len(str(given)) > len(str(best[1]))):
                best = (dest, given, value)
    if best is None:
        return None
    dest, _, value = best
    return f"{flags.get(dest, dest)} {value!r}"


def _flags(parser: argparse.ArgumentParser, command: str | None) -> dict[str, str]:
    """dest -> how the user writes it (``--out``, or a positional's name) in ``command``
    (and its own subcommands)."""
    flags: dict[str, str] = {}
    for path, sub in subcommands(parser).items():
        if path[0] == command:
            for action in sub._actions:
                flags.setdefault(action.dest, max(action.option_strings, key=len,
                                                  default=action.dest))
    return flags


if __name__ == "__main__":
    sys.exit(main())
