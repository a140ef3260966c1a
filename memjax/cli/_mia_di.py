"""``memjax mia di``: dataset inference on any per-example features table.

The table is Parquet with numeric feature columns (e.g. what ``memjax mia diffusion`` or
``memjax mia iar`` write: an ``id`` column and one column per feature). Either one table
with a membership column (``--member-column COL``: rows where it is true/1 are the suspect
set, false/0 the validation set) or two tables (``--suspect``, ``--validation``). The
aggregator is :func:`memjax.mia.dataset_inference`'s ``--method`` (maini, cdi, iar; its
docstring says how each differs from its reference code); cdi scores held-out rows with a
model fitted on ``--fit-fraction`` of each set unless ``--cdi-scoring cross-fit`` (the
reference's cdi_perf.py, whose p-values are anti-conservative: a warning is printed). Writes
``metrics.json`` (p-value, t statistic, smallest number of suspect examples reaching p =
0.01 and 0.05, and the same for the false-positive check on the validation set),
``p_value_curve.parquet`` (n, p-value) and ``p_value_curve.png`` beside ``index.html``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from memjax.cli._common import fraction_open, positive_int, results_folder
from memjax.errors import InputError

TITLE = "Dataset inference"
#: Printed (stderr) and written in the report when ``--cdi-scoring cross-fit`` is chosen.
CROSS_FIT_WARNING = ("warning: --cdi-scoring cross-fit gives anti-conservative p-values "
                     "(about 16% of null p-values below 0.05 in bench/di_calibration.py); use "
                     "it to reproduce CDI's cdi_perf.py, not as evidence")
#: Columns never taken as features unless named in --columns.
ID_COLUMNS = ("id", "name")


def register(attacks) -> None:
    """Add ``memjax mia di`` to ``memjax mia``'s subcommands."""
    di = attacks.add_parser(
        "di", help="dataset inference on a per-example features table (maini | cdi | iar)",
        description=__doc__.split("\n\n")[1].replace("\n", " "))
    di.add_argument("--features", help="one Parquet table with every example, and "
                    "--member-column")
    di.add_argument("--member-column", help="with --features: the column that is true/1 for "
                    "suspect rows and false/0 for validation rows")
    di.add_argument("--suspect", help="Parquet table of the suspect set (with --validation)")
    di.add_argument("--validation", help="Parquet table of the validation (non-member) set")
    di.add_argument("--columns", nargs="+", help="feature columns (default: every column but "
                    "id, name and the membership column)")
    di.add_argument("--method", choices=("maini", "cdi", "iar"), default="maini",
                    help="aggregator (default maini)")
    di.add_argument("--test", choices=("welch", "student"), default="welch")
    di.add_argument("--alternative", choices=("greater", "two-sided"), default=None,
                    help="default: the method's reference (maini greater, cdi/iar "
                    "two-sided)")
    di.add_argument("--cdi-scoring", choices=("split", "cross-fit"), default="split",
                    help="cdi: score held-out rows with a model fitted on --fit-fraction of "
                    "each set (default, calibrated), or cross-fit every row (the reference's "
                    "cdi_perf.py; anti-conservative p-values)")
    di.add_argument("--fit-fraction", type=fraction_open, default=0.2,
                    help="cdi split: fraction of each set that fits the model (default 0.2, "
                    "the reference's 5000 of 25000)")
    di.add_argument("--resamples", type=positive_int, default=100,
                    help="cdi/iar: random subsets per curve size (default 100; the "
                    "reference code 1000)")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--out", type=results_folder, default="memjax-mia-di",
                    help="results folder (new, empty, or an earlier report to replace)")
    di.set_defaults(run=cmd_di)


def _read_table(path: str, flag: str) -> dict[str, object]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise InputError(f"{flag} {path!r}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"{flag} {path!r}: not a readable Parquet table ({error})") from None
    if table.num_rows == 0:
        raise InputError(f"{flag} {path!r}: the table has no rows")
    return {name: table.column(name) for name in table.column_names}


def _numeric(column, name: str, flag: str) -> np.ndarray:
    import pyarrow as pa

    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
            or pa.types.is_boolean(kind)):
        raise InputError(f"{flag}: column {name!r} is {kind}, not numeric (choose feature "
                         "columns with --columns)")
    if column.null_count:
        raise InputError(f"{flag}: column {name!r} has {column.null_count} missing values")
    values = column.to_numpy().astype(np.float64)
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values))[0])
        raise InputError(f"{flag}: column {name!r} has the non-finite value {values[row]} "
                         f"at row {row}")
    return values


def _features(table: dict, columns: list[str] | None, exclude: tuple[str, ...],
              flag: str) -> tuple[np.ndarray, list[str]]:
    names = columns if columns else [c for c in table if c not in exclude]
    missing = [c for c in names if c not in table]
    if missing:
        raise InputError(f"{flag}: no column {missing[0]!r} (columns: {list(table)})")
    if not names:
        raise InputError(f"{flag}: no feature columns (columns: {list(table)})")
    return np.stack([_numeric(table[c], c, flag) for c in names], axis=1), names


def _membership(table: dict, column: str, flag: str) -> np.ndarray:
    if column not in table:
        raise InputError(f"--member-column {column!r}: no such column in {flag} (columns: "
                         f"{list(table)})")
    values = _numeric(table[column], column, f"--member-column {column!r}")
    if not np.isin(values, (0.0, 1.0)).all():
        raise InputError(f"--member-column {column!r}: expected true/false or 1/0 values")
    return values == 1.0


def read_sets(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(suspect [Ns, F], validation [Nv, F], feature names) from the options."""
    if args.features is not None:
        if args.suspect is not None or args.validation is not None:
            raise InputError("--features: give either --features with --member-column, or "
                             "--suspect with --validation, not both")
        if args.member_column is None:
            raise InputError("--features: --member-column is required (the column that "
                             "marks suspect rows)")
        table = _read_table(args.features, "--features")
        is_suspect = _membership(table, args.member_column, "--features")
        x, names = _features(table, args.columns, (*ID_COLUMNS, args.member_column),
                             "--features")
        return x[is_suspect], x[~is_suspect], names
    if args.suspect is None or args.validation is None:
        raise InputError("--suspect and --validation: give both (or --features with "
                         "--member-column)")
    if args.member_column is not None:
        raise InputError("--member-column: only with --features")
    suspect = _read_table(args.suspect, "--suspect")
    validation = _read_table(args.validation, "--validation")
    xs, names = _features(suspect, args.columns, ID_COLUMNS, "--suspect")
    xv, _ = _features(validation, names, (), "--validation")
    return xs, xv, names


def plot_curves(results: dict, path: Path, method: str) -> None:
    """p-value against the number of suspect examples (log-log), one line per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.0), dpi=120)
    for label, result in results.items():
        ax.plot(result.curve_n, np.maximum(result.curve_p, 1e-300), marker="o", label=label)
    ax.axhline(0.01, color="grey", linestyle="--", label="p = 0.01")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples per set")
    ax.set_ylabel("p-value" + (" (mean over resamples)" if method != "maini" else ""))
    ax.set_title(f"Dataset inference ({method})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cmd_di(args: argparse.Namespace) -> int:
    from memjax.cli._common import write_results
    from memjax.mia import dataset_inference

    suspect, validation, names = read_sets(args)
    options = dict(method=args.method, test=args.test, alternative=args.alternative,
                   cdi_scoring=args.cdi_scoring, fit_fraction=args.fit_fraction,
                   resamples=args.resamples, seed=args.seed)
    cross_fit = args.method == "cdi" and args.cdi_scoring == "cross-fit"
    if cross_fit:
        print(f"memjax: {CROSS_FIT_WARNING}", file=sys.stderr)
    result = dataset_inference(suspect, validation, **options)
    check = dataset_inference(suspect, validation, false_positive=True, **options)
    scoring = f" ({args.cdi_scoring})" if args.method == "cdi" else ""
    metrics = [("method", args.method + scoring), ("features", len(names)),
               ("suspect examples", int(suspect.shape[0])),
               ("validation examples", int(validation.shape[0])),
               ("p-value", result.p_value), ("t statistic", result.statistic),
               ("smallest n with p <= 0.01", result.smallest_n(0.01)),
               ("smallest n with p <= 0.05", result.smallest_n(0.05)),
               ("p-value (false-positive check on the validation set)", check.p_value),
               ("smallest n with p <= 0.01 (false-positive check)", check.smallest_n(0.01))]

    def figures(folder: Path) -> list[tuple[str, str]]:
        plot_curves({"suspect vs validation": result,
                     "false-positive check (validation halves)": check},
                    folder / "p_value_curve.png", args.method)
        return [("p_value_curve.png", "p-value vs number of suspect examples")]

    text = (f"Dataset inference ({args.method}{scoring}) on {len(names)} features "
            f"({', '.join(names)}): {result.test} t-test, {result.alternative}. The curve: "
            "p-value against the number of examples per set" + (
                " (mean over random subsets)." if args.method != "maini" else ".")
            + (f" {CROSS_FIT_WARNING[0].upper()}{CROSS_FIT_WARNING[1:]}." if cross_fit else ""))
    folder = write_results(args.out, TITLE, text,
                           {"n": result.curve_n, "p_value": result.curve_p}, metrics,
                           figures=figures, table_name="p_value_curve.parquet")
    for name, value in metrics[4:]:
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    print(f"report: {folder / 'index.html'} (metrics.json, p_value_curve.parquet, "
          "p_value_curve.png)")
    return 0

