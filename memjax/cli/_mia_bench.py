"""``memjax mia bench CONFIG.toml``: a grid of causal LMs x text datasets x attacks, in
the spirit of MIMIR (Duan et al. 2024), in one command.

Each (model, dataset) is scored once into a resumable store under ``<out>.stores/`` (a
killed run, rerun, continues from its finished chunks and gives the same table); every
attack then runs on the stored token signals exactly as ``memjax mia tokens`` does on that
pair alone. The result is one table, a row per (model, dataset, attack): AUC with its
stratified bootstrap interval, TPR at 1% and 0.1% FPR (``scores.parquet``, ``table.csv``,
``metrics.json``, ``index.html`` with one ROC figure per cell).

The config (paths relative to it)::

    out = "mia-bench"                     # results folder (stores beside it)
    attacks = ["LOSS", "zlib", "Min-K%", "Min-K%++", "reference", "dataset inference"]
    k = 0.2                               # Min-K% / Min-K%++ fraction
    batch_size = 32
    model_parallel = 1                    # devices per model replica (params sharded)
    [[models]]
    name = "pythia-160m"
    path = "models/pythia-160m"
    reference = "models/pythia-70m"       # optional: the reference-calibrated loss
    [[datasets]]
    name = "wikipedia"
    members = "wiki_members.jsonl"        # JSONL, one text per line
    nonmembers = "wiki_nonmembers.jsonl"
    text_field = "text"                   # optional
    max_length = 512                      # optional; default the model's context

Attacks are named entries of :data:`ATTACKS` (``name -> fn(signals, texts, k) -> [N]``,
higher = member); a plug-in is one more entry (``plugins = ["package.module:function"]``
in the config imports ``function`` and registers it under its ``__name__``).
"""

from __future__ import annotations

import argparse
import importlib
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from memjax.errors import InputError

REFERENCE = "reference"
DATASET_INFERENCE = "dataset inference"
#: The attacks on a cell's stored token signals, by the name the config uses.
ATTACKS = {
    "LOSS": lambda signals, texts, k: _stored(signals, k, texts)["LOSS"],
    "zlib": lambda signals, texts, k: _stored(signals, k, texts)["zlib"],
    "Min-K%": lambda signals, texts, k: _stored(signals, k, texts)[f"Min-K% (k={k})"],
    "Min-K%++": lambda signals, texts, k: _stored(signals, k, texts)[f"Min-K%++ (k={k})"],
}
KNOWN = (*ATTACKS, REFERENCE, DATASET_INFERENCE)


def _stored(signals, k, texts):
    from memjax.mia import attacks_from_signals

    return attacks_from_signals(signals, k=k, texts=texts)


def register(attacks: Any) -> None:
    """Add ``memjax mia bench`` to ``memjax mia``'s subcommands."""
    bench = attacks.add_parser(
        "bench", help="a grid of causal LMs x text datasets x attacks from one TOML config "
        "(MIMIR-style)", description=__doc__.split("\n\n")[0],
        epilog="Config: out, attacks, k, batch_size, seed, plugins; [[models]] name, path, "
        "reference; [[datasets]] name, members, nonmembers, text_field, max_length.")
    bench.add_argument("config", help="the grid: a .toml file")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(run=cmd_bench)


def read_config(path: str | Path) -> dict[str, Any]:
    """The validated config, paths resolved against its folder."""
    path = Path(path)
    where = f"config {str(path)!r}"
    if not path.is_file():
        raise InputError(f"{where}: no such file; expected a .toml grid of models and "
                         "datasets")
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{where}: not valid TOML ({error})") from None
    unknown = sorted(set(config) - {"out", "attacks", "k", "batch_size", "seed", "models",
                                    "datasets", "plugins", "model_parallel"})
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}")
    for plugin in config.get("plugins", []):
        _load_plugin(plugin, where)
    attacks = config.get("attacks", list(KNOWN))
    missing = [a for a in attacks if a not in (*ATTACKS, REFERENCE, DATASET_INFERENCE)]
    if missing:
        raise InputError(f"{where}: unknown attack(s) {missing}; expected some of "
                         f"{[*ATTACKS, REFERENCE, DATASET_INFERENCE]}")
    root = path.parent

    def table(key: str, fields: dict[str, bool]) -> list[dict[str, Any]]:
        rows = config.get(key)
        if not isinstance(rows, list) or not rows:
            raise InputError(f"{where}: expected at least one [[{key}]] table")
        out = []
        for i, row in enumerate(rows):
            extra = sorted(set(row) - set(fields))
            absent = [f for f, required in fields.items() if required and f not in row]
            if extra or absent:
                raise InputError(f"{where}: [[{key}]] #{i + 1}: unknown {extra} / missing "
                                 f"{absent}; expected keys {sorted(fields)}")
            if not re.fullmatch(r"[\w.-]+", str(row["name"])):
                raise InputError(f"{where}: [[{key}]] name {row['name']!r}: expected letters, "
                                 "digits, '.', '_' or '-' (it names a store folder)")
            out.append({k: (str(root / v) if k in ("path", "reference", "members",
                                                    "nonmembers") else v)
                        for k, v in row.items()})
        names = [r["name"] for r in out]
        if len(set(names)) != len(names):
            raise InputError(f"{where}: [[{key}]] names repeat: {names}")
        return out

    return {"out": str(root / config.get("out", "mia-bench")), "attacks": attacks,
            "k": float(config.get("k", 0.2)), "batch_size": int(config.get("batch_size", 32)),
            "seed": int(config.get("seed", 0)),
            "model_parallel": int(config.get("model_parallel", 1)),
            "models": table("models", {"name": True, "path": True, "reference": False}),
            "datasets": table("datasets", {"name": True, "members": True, "nonmembers": True,
                                           "text_field": False, "max_length": False})}


def _load_plugin(spec: str, where: str) -> None:
    module, _, name = str(spec).partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise InputError(f"{where}: plugin {spec!r}: cannot import it ({error}); expected "
                         "'package.module:function'") from None
    ATTACKS[fn.__name__] = fn


def combined_texts(dataset: dict[str, Any], folder: Path) -> tuple[Path, int, int]:
    """The dataset's members then non-members as one JSONL (``folder/<name>.jsonl``,
    written atomically once); returns (path, members, non-members)."""
    from memjax._io import atomic_write_bytes

    lines = []
    for key in ("members", "nonmembers"):
        path = Path(dataset[key])
        if not path.is_file():
            raise InputError(f"dataset {dataset['name']!r}: {key} {str(path)!r}: no such file")
        rows = [line for line in path.read_bytes().splitlines() if line.strip()]
        if not rows:
            raise InputError(f"dataset {dataset['name']!r}: {key} {str(path)!r} is empty")
        lines.append(rows)
    path = folder / f"{dataset['name']}.jsonl"
    content = b"\n".join(lines[0] + lines[1]) + b"\n"
    if not path.is_file() or path.read_bytes() != content:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, content)
    return path, len(lines[0]), len(lines[1])


def cell_signals(model_path: str, data: Path, dataset: dict[str, Any], store: Path,
                 batch_size: int, progress: bool, mesh: Any
                 ) -> tuple[dict[str, np.ndarray], Any]:
    """A model's token signals on a dataset, through a resumable store; the checkpoint is
    loaded lazily onto ``mesh`` (params sharded over its model axis)."""
    from memjax.convert import load
    from memjax.data import open_source
    from memjax.engine import ScoreStore, score
    from memjax.signals import signal_function

    model = load(model_path, mesh=mesh)
    if model.kind != "causal_lm":
        raise InputError(f"model {model_path!r} is a {model.kind}; expected a causal LM")
    source = open_source(f"jsonl:{data}", model=model, max_length=dataset.get("max_length"),
                         text_field=dataset.get("text_field", "text"))
    fn, validate = signal_function(model, "tokens")
    result = score(fn, model.params, source, batch_size=batch_size, progress=progress,
                   validate=validate, param_rules=list(model.partition_rules),
                   store=ScoreStore(store), mesh=mesh)
    return result.read(), source


def cmd_bench(args: argparse.Namespace) -> int:
    from memjax.cli._common import print_metrics, write_results
    from memjax.cli._mia import _texts
    from memjax.engine import make_mesh
    from memjax.metrics import auc_confidence_interval, plot_roc, roc_auc, tpr_at_fpr
    from memjax.mia import dataset_inference, reference, token_features, token_mask

    config = read_config(args.config)
    work = Path(config["out"] + ".stores")
    mesh = make_mesh(model=config["model_parallel"])
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict] = {}
    for dataset in config["datasets"]:
        data, n_members, n_non = combined_texts(dataset, work / "data")
        is_member = np.arange(n_members + n_non) < n_members
        for entry in config["models"]:
            cell = f"{entry['name']} / {dataset['name']}"
            print(f"[bench] {cell}", flush=True)
            signals, source = cell_signals(entry["path"], data, dataset,
                                           work / f"{entry['name']}__{dataset['name']}",
                                           config["batch_size"], not args.no_progress, mesh)
            texts = _texts(source)
            scores = {name: np.asarray(ATTACKS[name](signals, texts, config["k"]), np.float64)
                      for name in config["attacks"] if name in ATTACKS}
            if REFERENCE in config["attacks"] and entry.get("reference"):
                ref, _ = cell_signals(entry["reference"], data, dataset,
                                      work / f"{entry['name']}.reference__{dataset['name']}",
                                      config["batch_size"], not args.no_progress, mesh)
                scores[REFERENCE] = reference(signals["mean_loss"], ref["mean_loss"])
            for name, s in scores.items():
                low, high = auc_confidence_interval(s, is_member, seed=config["seed"])
                rows.append({"model": entry["name"], "dataset": dataset["name"],
                             "attack": name, "AUC": roc_auc(s, is_member), "AUC low": low,
                             "AUC high": high, "TPR@1%FPR": tpr_at_fpr(s, is_member, 0.01),
                             "TPR@0.1%FPR": tpr_at_fpr(s, is_member, 0.001),
                             "p-value": np.nan})
            if DATASET_INFERENCE in config["attacks"]:
                features, _ = token_features(signals["logp"], signals["mu"], signals["sigma"],
                                             token_mask(signals), signals["mean_loss"], texts)
                result = dataset_inference(features[is_member], features[~is_member],
                                           seed=config["seed"])
                rows.append({"model": entry["name"], "dataset": dataset["name"],
                             "attack": DATASET_INFERENCE, "AUC": np.nan, "AUC low": np.nan,
                             "AUC high": np.nan, "TPR@1%FPR": np.nan, "TPR@0.1%FPR": np.nan,
                             "p-value": result.p_value})
            curves[cell] = {name: (s, is_member) for name, s in scores.items()}

    table = {key: np.asarray([row[key] for row in rows]) for key in rows[0]}
    metrics = [(f"{r['model']} / {r['dataset']} / {r['attack']} "
                f"{'p-value' if r['attack'] == DATASET_INFERENCE else 'AUC'}",
                r["p-value"] if r["attack"] == DATASET_INFERENCE else r["AUC"]) for r in rows]

    def figures(folder: Path) -> list[tuple[str, str]]:
        import pandas as pd

        pd.DataFrame(table).to_csv(folder / "table.csv", index=False)
        made = []
        for i, (cell, cell_curves) in enumerate(curves.items()):
            plot_roc(cell_curves, folder / f"roc_{i}.png", title=cell)
            made.append((f"roc_{i}.png", f"Log-log ROC: {cell}"))
        return made

    text = ("Every (model, dataset) scored once into a resumable store; each attack on its "
            "token signals as memjax mia tokens computes it (higher = member); AUC with a "
            "95% stratified bootstrap interval. The table is also table.csv.")
    folder = write_results(config["out"], "Membership-inference benchmark", text, table,
                           metrics, figures=figures)
    print_metrics(metrics, folder)
    return 0
