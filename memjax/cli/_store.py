"""``memjax info`` and ``memjax export``: describe a score store, export it to Parquet."""

from __future__ import annotations

import argparse
import json
from typing import Any

from memjax.cli._common import check_out_file


def register(sub: Any) -> None:
    """Add the subcommands and their arguments to the ``memjax`` parser."""
    info = sub.add_parser("info", help="describe a score store and verify its chunks")
    info.add_argument("store", help="score store folder (memjax score --out)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)

    export = sub.add_parser("export", help="export a complete store to Parquet")
    export.add_argument("store", help="score store folder (memjax score --out)")
    export.add_argument("out", help="output .parquet file")
    export.set_defaults(run=cmd_export)


# ---------------------------------------------------------------------- commands


def _state_line(info: dict[str, Any]) -> str:
    counts = f"{info['chunks_done']}/{info['n_chunks']} chunks"
    if info["state"] == "corrupt":
        bad = info["corrupt_chunks"]
        shown = ", ".join(str(i) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
        many = len(bad) > 1
        return (f"CORRUPT, {counts} intact: chunk{'s' if many else ''} {shown} "
                f"fail{'' if many else 's'} verification (missing, or size/sha256 differ from "
                "the record); rerun the same memjax score command with --resume to recompute "
                f"{'them' if many else 'it'}")
    if info["state"] == "incomplete":
        return f"INCOMPLETE, {counts} (resume with memjax score --resume)"
    return f"complete, {counts}"


def cmd_info(args: argparse.Namespace) -> int:
    from memjax.engine import ScoreStore

    info = ScoreStore(args.store).info()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"store:      {info['path']}")
    print(f"state:      {_state_line(info)}")
    print(f"examples:   {info['n_examples']} (chunk size {info['chunk_size']}, "
          f"batch size {info['batch_size']})")
    print(f"function:   {info['function']}")
    print(f"data:       {info['data']}")
    for name, field in (info["fields"] or {}).items():
        print(f"field:      {name} {field['dtype']} {tuple(field['shape'])}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from memjax.engine import ScoreStore

    check_out_file(args.out, "out", suffix=".parquet")
    path = ScoreStore(args.store).to_parquet(args.out)
    print(f"wrote {path}")
    return 0
