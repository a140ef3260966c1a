"""``memjax info`` and ``memjax export``: describe a score store, export it to Parquet.

Also the argument checks the commands that write share: :func:`positive_int` (an
argparse type) and :func:`check_out_folder` / :func:`check_out_file`, which refuse an
output path that cannot be written before any work starts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from memjax.errors import InputError


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


# ---------------------------------------------------------------------- shared checks


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nearest_existing(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder
    return Path(path.anchor or ".")


def _check_creatable(path: Path, what: str) -> None:
    """``path`` does not exist: its nearest existing ancestor must be a writable folder."""
    parent = _nearest_existing(path.absolute())
    if not parent.is_dir():
        raise InputError(f"{what}: cannot create it, {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what}: cannot create it, the folder {str(parent)!r} is not "
                         "writable")


def check_out_folder(path: str | os.PathLike, flag: str) -> Path:
    """Refuse an output folder that is a file or cannot be created or written."""
    path = Path(path)
    what = f"{flag} {str(path)!r}"
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{what} is a file; expected a folder (or a new path)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{what}: the folder is not writable")
    else:
        _check_creatable(path, what)
    return path


def check_out_file(path: str | os.PathLike, flag: str, suffix: str | None = None) -> Path:
    """Refuse an output file path that is a folder, has another extension than
    ``suffix``, or cannot be written."""
    path = Path(path)
    what = f"{flag} {str(path)!r}"
    if path.is_dir():
        raise InputError(f"{what} is a folder; expected a file path"
                         + (f" ending in {suffix}" if suffix else ""))
    if suffix is not None and path.suffix.lower() != suffix:
        raise InputError(f"{what}: expected a file name ending in {suffix} (the only format "
                         "written here)")
    if path.exists():
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK | os.X_OK):
            raise InputError(f"{what}: not writable")
    else:
        _check_creatable(path, what)
    return path


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
