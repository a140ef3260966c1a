"""``memjax mia iar``: per-example membership features of a class-conditional image-token
model (Kowalczuk et al. 2025) over conditional, unconditional and CFG-difference logits;
the features are :func:`memjax.mia.iar_features`'s.

Data: ``.npz`` with ``class_labels`` [N] and ``input_ids`` [N, T] (integers), or ``.jsonl``
with one object per line ``{"class_labels": c, "input_ids": [t0, t1, ...]}`` (every row
the same number of tokens); an optional ``member`` field (0/1 per example) is copied to the
table and gives each feature's AUC. Writes ``scores.parquet`` (``id``, ``member`` when
given, one column per feature) beside ``metrics.json`` and ``index.html``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from memjax.errors import InputError

FIELDS = ("class_labels", "input_ids")


def register(attacks) -> None:
    """Add ``memjax mia iar`` to ``memjax mia``'s subcommands."""
    from memjax.cli._common import fraction_closed, positive_int, results_folder
    from memjax.mia import IAR_FEATURES, IAR_KS, IAR_LOGITS

    iar = attacks.add_parser(
        "iar", help="an image autoregressive model (e.g. LlamaGen) on image tokens: LOSS, "
        "zlib, hinge, Min-K%%, Min-K%%++, SURP, CAMIA on cond/uncond/CFG logits",
        description=__doc__.split("\n\n")[0])
    iar.add_argument("--model", required=True, help="a class-conditional image-token model "
                     "folder (LlamaGen: config.json with model_type llamagen + weights)")
    iar.add_argument("--allow-pickle", action="store_true", help="accept .pt/.bin weights "
                     "(torch.load(weights_only=True))")
    iar.add_argument("--data", required=True, help=".npz (class_labels [N], input_ids "
                     "[N, T]) or .jsonl rows {class_labels, input_ids}; optional member")
    iar.add_argument("--features", nargs="+", default=list(IAR_FEATURES),
                     choices=IAR_FEATURES, help="feature families (default: all)")
    iar.add_argument("--logits", nargs="+", default=list(IAR_LOGITS), choices=IAR_LOGITS,
                     help="logits kinds (cfg = cond - uncond; default: all)")
    iar.add_argument("--k", nargs="+", type=fraction_closed, default=list(IAR_KS),
                     help="Min-K%% / Min-K%%++ fractions in (0, 1] (default: the IAR "
                     "code's 0.1 .. 0.5)")
    iar.add_argument("--out", type=results_folder, default="memjax-mia-iar",
                     help="results folder (new, empty, or an earlier report to replace)")
    iar.add_argument("--batch-size", type=positive_int, default=16,
                     help="examples per batch (default 16)")
    iar.add_argument("--no-progress", action="store_true")
    iar.set_defaults(run=cmd_iar)


def _read_jsonl(path: Path) -> dict[str, np.ndarray]:
    rows: dict[str, list] = {"class_labels": [], "input_ids": [], "member": []}
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"--data {str(path)!r} line {number}: not JSON ({error})"
                                 ) from None
            if not isinstance(row, dict) or any(k not in row for k in FIELDS):
                raise InputError(f"--data {str(path)!r} line {number}: expected an object "
                                 f"with {list(FIELDS)}")
            for key in rows:
                if key in row:
                    rows[key].append(row[key])
    if rows["member"] and len(rows["member"]) != len(rows["input_ids"]):
        raise InputError(f"--data {str(path)!r}: 'member' is on some rows only")
    lengths = {len(r) if isinstance(r, list) else -1 for r in rows["input_ids"]}
    if len(lengths) > 1 or -1 in lengths:
        raise InputError(f"--data {str(path)!r}: input_ids must be lists of one length, got "
                         f"lengths {sorted(lengths)}")
    return {k: np.asarray(v) for k, v in rows.items() if v}


def read_token_data(spec: str) -> dict[str, np.ndarray]:
    """``--data``: {class_labels [N] int32, input_ids [N, T] int32, member [N] bool?}."""
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--data {spec!r}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                data = {k: archive[k] for k in archive.files}
        except (ValueError, OSError) as error:
            raise InputError(f"--data {spec!r}: not a readable .npz ({error})") from None
    elif path.suffix == ".jsonl":
        data = _read_jsonl(path)
    else:
        raise InputError(f"--data {spec!r}: expected a .npz or .jsonl file")
    missing = [k for k in FIELDS if k not in data]
    if missing:
        raise InputError(f"--data {spec!r}: missing field(s) {missing}; has {sorted(data)}")
    labels, ids = data["class_labels"], data["input_ids"]
    if labels.ndim != 1 or ids.ndim != 2 or len(labels) != len(ids) or not len(ids):
        raise InputError(f"--data {spec!r}: expected class_labels [N] and input_ids [N, T] "
                         f"with N >= 1, got shapes {labels.shape} and {ids.shape}")
    for name in FIELDS:
        if not np.issubdtype(data[name].dtype, np.integer):
            raise InputError(f"--data {spec!r}: {name} must be integers, got dtype "
                             f"{data[name].dtype}")
    out = {name: data[name].astype(np.int32) for name in FIELDS}
    if "member" in data:
        member = np.asarray(data["member"])
        if member.shape != labels.shape or not np.isin(member, (0, 1)).all():
            raise InputError(f"--data {spec!r}: member must be 0/1, one per example")
        out["member"] = member.astype(bool)
    return out


def cmd_iar(args: argparse.Namespace) -> int:
    from memjax.cli._common import load_model, print_metrics, write_results
    from memjax.metrics import roc_auc
    from memjax.mia import iar_features

    model = load_model(args.model, "--model", "iar", "a class-conditional image-token model "
                       "(kind 'iar')", allow_pickle=args.allow_pickle)
    data = read_token_data(args.data)
    member = data.pop("member", None)
    try:
        columns = iar_features(model, data, features=args.features, logits=args.logits,
                               k=args.k, batch_size=args.batch_size,
                               progress=not args.no_progress)
    except InputError as error:
        raise InputError(f"--data {args.data!r}: {error}") from None
    table: dict[str, Any] = {"id": columns.pop("id")}
    metrics: list[tuple[str, Any]] = [("model", model.name), ("examples", len(table["id"])),
                                      ("features", len(columns))]
    if member is not None:
        table["member"] = member[table["id"]]
        if table["member"].any() and not table["member"].all():
            metrics += [(f"{name} AUC", roc_auc(values, table["member"]))
                        for name, values in columns.items()]
    table |= columns
    text = ("Per-example membership features of an image autoregressive model (Kowalczuk et "
            "al. 2025) on conditional, unconditional (null class) and CFG-difference "
            "(cond - uncond) logits; higher = more likely member.")
    folder = write_results(args.out, "IAR membership features", text, table, metrics)
    print_metrics(metrics, folder)
    return 0
