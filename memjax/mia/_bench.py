"""A membership-inference benchmark grid: causal LMs x text datasets x attacks, in the spirit
of MIMIR (Duan et al. 2024, "Do Membership Inference Attacks Work on Large Language
Models?"), run by ``memjax mia bench CONFIG.toml`` and by the audit.

Each (model, dataset) cell is scored once into a resumable store (a killed run, rerun,
continues from its finished chunks and gives the same table); every attack then runs on
the stored token signals exactly as ``memjax mia tokens`` does on that pair alone. The
result is a row per (model, dataset, attack): AUC with its stratified bootstrap interval
and TPR at 1% and 0.1% FPR (dataset inference: its p-value).

Attacks are plug-ins: a function ``fn(signals, texts, k) -> [N] scores`` (higher = member)
over the stored token fields (``logp``, ``mu``, ``sigma``, ``scored`` [N, T];
``mean_loss`` [N]) and the raw texts, added with :func:`register_attack` or named in the
config as ``plugins = ["package.module:function"]``.

The config (paths relative to its folder)::

    out = "mia-bench"                     # results folder (stores beside it, .stores)
    attacks = ["LOSS", "zlib", "Min-K%", "Min-K%++", "reference", "dataset inference"]
    k = 0.2                               # Min-K% / Min-K%++ fraction
    batch_size = 32
    seed = 0                              # bootstrap and dataset-inference splits
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
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memjax._io import atomic_write_bytes
from memjax.errors import InputError
from memjax.mia._inference import dataset_inference
from memjax.mia._stored import attacks_from_signals, token_mask
from memjax.mia._tokens import reference, token_features

REFERENCE = "reference"
DATASET_INFERENCE = "dataset inference"
Attack = Callable[[dict[str, np.ndarray], list[str] | None, float], np.ndarray]


def _stored(name: str) -> Attack:
    """The attack ``name`` of :func:`attacks_from_signals` (k substituted into its name)."""
    def attack(signals, texts, k):
        key = name if name in ("LOSS", "zlib") else f"{name} (k={k})"
        return attacks_from_signals(signals, k=k, texts=texts)[key]

    attack.__name__ = name
    return attack


#: The attacks on a cell's stored token signals, by the name the config uses.
ATTACKS: dict[str, Attack] = {name: _stored(name) for name in ("LOSS", "zlib", "Min-K%",
                                                                "Min-K%++")}
CONFIG_KEYS = ("out", "attacks", "k", "batch_size", "seed", "models", "datasets", "plugins",
               "model_parallel")


def register_attack(fn: Attack, name: str | None = None) -> Attack:
    """Add ``fn(signals, texts, k) -> [N]`` (higher = member) to :data:`ATTACKS` under
    ``name`` (default ``fn.__name__``); returns ``fn``, so it works as a decorator."""
    name = name or fn.__name__
    if name in (REFERENCE, DATASET_INFERENCE):
        raise InputError(f"attack name {name!r} is reserved")
    ATTACKS[name] = fn
    return fn


def known_attacks() -> list[str]:
    return [*ATTACKS, REFERENCE, DATASET_INFERENCE]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A validated grid; paths are absolute (resolved against the config's folder)."""

    out: str
    attacks: tuple[str, ...]
    models: tuple[dict[str, Any], ...]
    datasets: tuple[dict[str, Any], ...]
    k: float = 0.2
    batch_size: int = 32
    seed: int = 0
    model_parallel: int = 1

    @property
    def stores(self) -> Path:
        """The folder of the cells' stores and the combined dataset files."""
        return Path(self.out + ".stores")


def _load_plugin(spec: str, where: str) -> None:
    module, _, name = str(spec).partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise InputError(f"{where}: plugin {spec!r}: cannot import it ({error}); expected "
                         "'package.module:function'") from None
    register_attack(fn)


def _rows(config: dict[str, Any], key: str, fields: dict[str, bool], root: Path,
          where: str) -> tuple[dict[str, Any], ...]:
    """The [[key]] tables, checked (known keys, names usable as folder names, unique)."""
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
        out.append({k: (str(root / v) if k in ("path", "reference", "members", "nonmembers")
                        else v) for k, v in row.items()})
    names = [r["name"] for r in out]
    if len(set(names)) != len(names):
        raise InputError(f"{where}: [[{key}]] names repeat: {names}")
    return tuple(out)


def bench_config(config: dict[str, Any], root: str | Path = ".", *,
                 where: str = "config") -> BenchConfig:
    """A :class:`BenchConfig` from the config's dict (as TOML gives it); relative paths are
    resolved against ``root``. Plug-ins named in it are imported and registered."""
    root = Path(root)
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; expected some of "
                         f"{list(CONFIG_KEYS)}")
    for plugin in config.get("plugins", []):
        _load_plugin(plugin, where)
    attacks = config.get("attacks", known_attacks())
    missing = [a for a in attacks if a not in known_attacks()]
    if missing:
        raise InputError(f"{where}: unknown attack(s) {missing}; expected some of "
                         f"{known_attacks()}")
    return BenchConfig(
        out=str(root / config.get("out", "mia-bench")), attacks=tuple(attacks),
        k=float(config.get("k", 0.2)), batch_size=int(config.get("batch_size", 32)),
        seed=int(config.get("seed", 0)), model_parallel=int(config.get("model_parallel", 1)),
        models=_rows(config, "models", {"name": True, "path": True, "reference": False},
                     root, where),
        datasets=_rows(config, "datasets", {"name": True, "members": True,
                                            "nonmembers": True, "text_field": False,
                                            "max_length": False}, root, where))


def read_bench_config(path: str | Path) -> BenchConfig:
    """The validated config of a .toml file, paths resolved against its folder."""
    path = Path(path)
    where = f"config {str(path)!r}"
    if not path.is_file():
        raise InputError(f"{where}: no such file; expected a .toml grid of models and "
                         "datasets")
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{where}: not valid TOML ({error})") from None
    return bench_config(config, path.parent, where=where)


def combined_texts(dataset: dict[str, Any], folder: Path) -> tuple[Path, int, int]:
    """The dataset's members then non-members as one JSONL (``folder/<name>.jsonl``,
    written atomically once); returns (path, members, non-members)."""
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


def source_texts(source: Any) -> list[str] | None:
    """The raw texts of a text source (for zlib), or None when it has none."""
    if "text" not in source.read(np.arange(min(len(source), 1))):
        return None
    texts: list[str] = []
    for start in range(0, len(source), 4096):
        rows = np.arange(start, min(start + 4096, len(source)))
        texts.extend(str(t) for t in source.read(rows)["text"])
    return texts


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


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """``rows``: one dict per (model, dataset, attack) with AUC, its interval, TPR at 1% and
    0.1% FPR and the dataset-inference p-value (NaN where not applicable); ``curves``:
    ``{"model / dataset": {attack: (scores [N], is_member [N])}}`` for ROC plots."""

    rows: list[dict[str, Any]]
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]

    def table(self) -> dict[str, np.ndarray]:
        """Column name -> [rows] array."""
        return {key: np.asarray([row[key] for row in self.rows]) for key in self.rows[0]}

    def to_csv(self) -> str:
        """The rows as CSV text (a header line, then one line per row)."""
        import csv
        import io

        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return text.getvalue()


def _metric_row(model: str, dataset: str, attack: str, scores: np.ndarray | None,
                is_member: np.ndarray, seed: int, p_value: float = np.nan) -> dict[str, Any]:
    from memjax.metrics import auc_confidence_interval, roc_auc, tpr_at_fpr

    row = {"model": model, "dataset": dataset, "attack": attack, "AUC": np.nan,
           "AUC low": np.nan, "AUC high": np.nan, "TPR@1%FPR": np.nan,
           "TPR@0.1%FPR": np.nan, "p-value": p_value}
    if scores is not None:
        low, high = auc_confidence_interval(scores, is_member, seed=seed)
        row.update({"AUC": roc_auc(scores, is_member), "AUC low": low, "AUC high": high,
                    "TPR@1%FPR": tpr_at_fpr(scores, is_member, 0.01),
                    "TPR@0.1%FPR": tpr_at_fpr(scores, is_member, 0.001)})
    return row


def run_bench(config: BenchConfig, *, progress: bool = True, mesh: Any = None,
              log: Callable[[str], None] = print) -> BenchResult:
    """Score every (model, dataset) cell into its store and run the attacks on it."""
    from memjax.engine import make_mesh

    mesh = make_mesh(model=config.model_parallel) if mesh is None else mesh
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict] = {}
    for dataset in config.datasets:
        data, n_members, n_non = combined_texts(dataset, config.stores / "data")
        is_member = np.arange(n_members + n_non) < n_members
        for entry in config.models:
            cell = f"{entry['name']} / {dataset['name']}"
            log(f"[bench] {cell}")
            signals, source = cell_signals(entry["path"], data, dataset,
                                           config.stores / f"{entry['name']}__{dataset['name']}",
                                           config.batch_size, progress, mesh)
            texts = source_texts(source)
            scores = {name: np.asarray(ATTACKS[name](signals, texts, config.k), np.float64)
                      for name in config.attacks if name in ATTACKS}
            if REFERENCE in config.attacks and entry.get("reference"):
                store = config.stores / f"{entry['name']}.reference__{dataset['name']}"
                ref, _ = cell_signals(entry["reference"], data, dataset, store,
                                      config.batch_size, progress, mesh)
                scores[REFERENCE] = reference(signals["mean_loss"], ref["mean_loss"])
            rows += [_metric_row(entry["name"], dataset["name"], name, s, is_member,
                                 config.seed) for name, s in scores.items()]
            if DATASET_INFERENCE in config.attacks:
                features, _ = token_features(signals["logp"], signals["mu"], signals["sigma"],
                                             token_mask(signals), signals["mean_loss"], texts)
                result = dataset_inference(features[is_member], features[~is_member],
                                           seed=config.seed)
                rows.append(_metric_row(entry["name"], dataset["name"], DATASET_INFERENCE,
                                        None, is_member, config.seed, result.p_value))
            curves[cell] = {name: (s, is_member) for name, s in scores.items()}
    return BenchResult(rows, curves)
