"""``memjax info`` and ``memjax export``: describe a score store, export it to Parquet."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    """Add the subcommands and their arguments to the ``memjax`` parser."""
    info = sub.add_parser("info", help="describe a score store")
    info.add_argument("store")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)

    export = sub.add_parser("export", help="export a complete store to Parquet")
    export.add_argument("store")
    export.add_argument("out", help="output .parquet file")
    export.set_defaults(run=cmd_export)


def cmd_info(args: argparse.Namespace) -> int:
    from memjax.engine import ScoreStore

    info = ScoreStore(args.store).info()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    state = "complete" if info["complete"] else "INCOMPLETE (resume with memjax score --resume)"
    print(f"store:      {info['path']}")
    print(f"state:      {state}, {info['chunks_done']}/{info['n_chunks']} chunks")
    print(f"examples:   {info['n_examples']} (chunk size {info['chunk_size']}, "
          f"batch size {info['batch_size']})")
    print(f"function:   {info['function']}")
    print(f"data:       {info['data']}")
    for name, field in (info["fields"] or {}).items():
        print(f"field:      {name} {field['dtype']} {tuple(field['shape'])}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from memjax.engine import ScoreStore

    path = ScoreStore(args.store).to_parquet(args.out)
    print(f"wrote {path}")
    return 0
