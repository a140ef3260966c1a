"""The ``memjax`` command: audit, score, convert, mia, influence, memorization, info, export.

One thin adapter module per subcommand (``_audit``, ``_score``, ``_convert``, ``_mia``,
``_influence``, ``_memorization``, ``_store`` for info and export): each parses its
arguments, calls the Python API and prints. Expected errors (bad input, bad stores) print
``memjax: error: ...`` and exit with status 2, without a traceback; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from memjax.cli import _audit, _convert, _influence, _memorization, _mia, _score, _store
from memjax.errors import MemjaxError

#: The subcommands' adapters, in the order ``memjax --help`` lists them.
COMMANDS = (_audit, _score, _convert, _mia, _influence, _memorization, _store)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MemjaxError as err:
        print(f"memjax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
