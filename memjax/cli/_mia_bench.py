"""``memjax mia bench CONFIG.toml``: a grid of causal LMs x text datasets x attacks, in
the spirit of MIMIR (Duan et al. 2024), in one command; the grid itself is
:func:`memjax.mia.run_bench` (its docstring gives the config).

Writes ``scores.parquet``, ``table.csv``, ``metrics.json`` and ``index.html`` with one ROC
figure per cell into the config's ``out`` folder; the stores go beside it
(``<out>.stores/``), so a killed run, rerun, continues and gives the same table.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(attacks) -> None:
    """Add ``memjax mia bench`` to ``memjax mia``'s subcommands."""
    bench = attacks.add_parser(
        "bench", help="a grid of causal LMs x text datasets x attacks from one TOML config "
        "(MIMIR-style)", description=__doc__.split("\n\n")[0],
        epilog="Config: out, attacks, k, batch_size, seed, model_parallel, plugins; "
        "[[models]] name, path, reference; [[datasets]] name, members, nonmembers, "
        "text_field, max_length.")
    bench.add_argument("config", help="the grid: a .toml file")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(run=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from memjax.cli._common import print_metrics, write_results
    from memjax.metrics import plot_roc
    from memjax.mia import DATASET_INFERENCE, read_bench_config, run_bench

    config = read_bench_config(args.config)
    result = run_bench(config, progress=not args.no_progress,
                       log=lambda line: print(line, flush=True))
    table = result.table()
    metrics = [(f"{r['model']} / {r['dataset']} / {r['attack']} "
                f"{'p-value' if r['attack'] == DATASET_INFERENCE else 'AUC'}",
                r["p-value"] if r["attack"] == DATASET_INFERENCE else r["AUC"])
               for r in result.rows]

    def figures(folder: Path) -> list[tuple[str, str]]:
        (folder / "table.csv").write_text(result.to_csv())
        made = []
        for i, (cell, cell_curves) in enumerate(result.curves.items()):
            plot_roc(cell_curves, folder / f"roc_{i}.png", title=cell)
            made.append((f"roc_{i}.png", f"Log-log ROC: {cell}"))
        return made

    text = ("Every (model, dataset) scored once into a resumable store; each attack on its "
            "token signals as memjax mia tokens computes it (higher = member); AUC with a "
            "95% stratified bootstrap interval. The table is also table.csv.")
    folder = write_results(config.out, "Membership-inference benchmark", text, table,
                           metrics, figures=figures)
    print_metrics(metrics, folder)
    return 0
