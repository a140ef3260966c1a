"""What every subcommand shares: output checks made before any work starts, the data
options, opening data the way a model expects it, and writing per-example results
(Parquet) beside metrics and an HTML/PNG summary."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from memjax.errors import InputError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def number(expected: str, holds: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a float for which ``holds`` is true (NaN never is, as every
    comparison with it is false), else the error "expected {expected}, got 'TEXT'"."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not holds(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


#: argparse types shared by the commands.
fraction_open = number("a number in (0, 1)", lambda v: 0.0 < v < 1.0)
fraction_closed = number("a fraction in (0, 1]", lambda v: 0.0 < v <= 1.0)
positive_number = number("a number > 0", lambda v: 0.0 < v < math.inf)


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


def results_folder(text: str) -> Path:
    """argparse type for a results folder (``--out`` of the analyses): a new path, or a
    writable folder that is empty or an earlier memjax report (which the new one replaces
    when it is complete). Refused before any work starts."""
    from memjax.report import REPORT_FILES

    path = Path(text)
    try:
        check_out_folder(path, "--out")
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--out {text!r}").strip(
            " :;")) from None
    if path.is_dir() and any(path.iterdir()) and not all(
            (path / f).is_file() for f in REPORT_FILES):
        raise argparse.ArgumentTypeError(
            f"{text!r} holds files but is not a memjax report (no "
            f"{' and '.join(REPORT_FILES)}); choose a new folder, or an earlier report")
    return path


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """``--max-length`` and ``--text-field``: how texts become tokens (the tokenizer and
    the image preprocessing come from the model's own checkpoint files)."""
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per text (padded/truncated); default: the model's "
                        "context length; the number of truncated texts is reported")
    parser.add_argument("--text-field", default="text",
                        help="the text field of JSONL/CSV/TSV rows (default: text)")


def open_data(spec: str, model: Any, args: argparse.Namespace, *, what: str = "--data",
              prefix: str = ""):
    """The source ``spec`` names, prepared for ``model``: images preprocessed with the
    checkpoint's ``preprocessor_config.json``, texts tokenised with its tokenizer to
    ``--max-length`` (default the model's context), a pairs file's captions after
    ``prefix``. Prints how many texts were cut."""
    from memjax.data import open_source

    try:
        source = open_source(spec, model=model, max_length=getattr(args, "max_length", None),
                             text_field=getattr(args, "text_field", "text"),
                             text_prefix=prefix)
    except InputError as error:
        raise InputError(f"{what}: {error}") from None
    report_truncation(source, what)
    return source


def report_truncation(source: Any, what: str) -> None:
    """Print ``k of n texts truncated`` when the source tokenised texts and cut some."""
    truncated = getattr(source, "truncated", None)
    if callable(truncated):
        count, total, length = truncated()
        if count:
            print(f"{what}: {count} of {total} texts are longer than {length} tokens and "
                  "were truncated (raise --max-length up to the model's context)",
                  file=sys.stderr)


def write_results(out: str | Path, title: str, text: str, table: Mapping[str, Any],
                  metrics: list[tuple[str, Any]], *,
                  figures: Callable[[Path], list[tuple[str, str]]] | None = None,
                  table_name: str = "scores.parquet") -> Path:
    """A results folder: ``scores.parquet`` (one row per example: ``table``'s columns,
    1-D arrays of equal length, or [N, ...] arrays stored as lists), ``metrics.json``,
    ``index.html`` and the figures ``figures(folder)`` writes (file, caption). Written to a
    staging folder and renamed into place, so a failed run leaves no half result."""
    from memjax.report import Section, write_report

    columns = {name: np.asarray(value) for name, value in table.items()}
    lengths = {name: len(value) for name, value in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"write_results: columns of different lengths {lengths}")

    def build(folder: Path) -> list:
        write_parquet(columns, folder / table_name)
        made = figures(folder) if figures is not None else []
        return [Section(title, text, metrics, figures=made,
                        files=[(table_name, "per-example results (Parquet)")])]

    return write_report(out, f"memjax: {title}", build)


def write_parquet(columns: Mapping[str, np.ndarray], path: Path) -> None:
    """Columns as a Parquet table (arrays with more than one axis become list columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name, value in columns.items():
        value = np.asarray(value)
        arrays[name] = pa.array(list(value) if value.ndim > 1 else value)
    pq.write_table(pa.table(arrays), path)


def print_metrics(metrics: list[tuple[str, Any]], folder: Path) -> None:
    """The headline numbers and where the report is."""
    for name, value in metrics:
        if isinstance(value, float):
            print(f"{name}: {value:.4f}")
    print(f"report: {folder / 'index.html'} (metrics.json, scores.parquet)")


def example_ids(source: Any) -> np.ndarray:
    """The example ids of a source (its ``id`` field; else the row numbers)."""
    from memjax.data import source_ids

    return source_ids(source, np.arange(len(source)))


def example_names(source: Any) -> np.ndarray | None:
    """The source's stable string names of its examples (file name / key), or None."""
    names = getattr(source, "names", None)
    if not callable(names):
        return None
    values = names()
    return None if values is None else np.asarray([str(v) for v in values], dtype=object)


def id_columns(source: Any) -> dict[str, np.ndarray]:
    """The first columns of a per-example table: ``id`` and, when the source has them,
    ``name``."""
    columns = {"id": example_ids(source)}
    names = example_names(source)
    if names is not None:
        columns["name"] = names
    return columns


def load_model(folder: str, flag: str, kind: str, described: str | None = None, *,
               allow_pickle: bool = False):
    """``memjax.load(folder)`` for the option ``flag``, refused unless it is of ``kind``
    (``described`` names it in the message, e.g. "a causal LM")."""
    from memjax.convert import load

    try:
        model = load(folder, allow_pickle=allow_pickle)
    except InputError as error:
        raise InputError(f"{flag}: {error}") from None
    if model.kind != kind:
        raise InputError(f"{flag} {folder!r}: {model.name} is a {model.kind!r} model; "
                         f"expected {described or f'a {kind!r} model'}")
    return model
