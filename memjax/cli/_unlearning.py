"""``memjax unlearning``: black-box unlearning audits of contrastive encoders (MUC: EMIA, CMIA).

Wang et al. 2024, "MUC: Machine Unlearning for Contrastive Learning with Black-box
Evaluation" (:mod:`memjax.unlearning`). Audits one or more encoders (``--model``: the
original and/or unlearned ones; ``--reference``: the encoder retrained without the forget
set, the target) on one data source (``--data``, with a ``label`` field for CMIA) split by
three files of example ids (``--forget``, ``--retain``, ``--test``: one id per line, the
source's ``id`` field or its row numbers). Per model: EMIA (mean cosine similarity of
``--n-views`` augmented views, thresholded at best accuracy on retain vs test) and CMIA (a
threshold on a linear probe's confidence in the true label, or with ``--cmia-attack svc``
the reference code's RBF SVC on it); the fraction of the forget set flagged as members
(lower = better forgotten).

Writes ``scores.parquet`` (one row per forget/retain/test example: ``id``, ``split``, and
per model ``<model>_alignment``, ``<model>_emia_flagged``, ``<model>_cmia_confidence``,
``<model>_cmia_flagged``), ``metrics.json`` and ``alignment_gap.png`` (the alignment of the
forget vs the test examples per model). Images are opened without the checkpoint's
mean/std normalisation; views are made in [0, 1] and normalised afterwards, as in
``memjax memorization``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from memjax.cli._common import (
    add_data_options,
    example_ids,
    open_data,
    positive_int,
    print_metrics,
    results_folder,
    write_results,
)
from memjax.cli._memorization import VIEWS, unnormalized
from memjax.errors import InputError

TITLE = "Unlearning audit (MUC: EMIA, CMIA)"
SPLITS = ("forget", "retain", "test")


def register(sub: Any) -> None:
    """Add ``memjax unlearning`` to the top-level subcommands."""
    parser = sub.add_parser(
        "unlearning", help="unlearning audits of contrastive encoders (MUC: EMIA, CMIA)",
        description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--model", nargs="+", required=True,
                        help="encoder folders to audit (original and/or unlearned; a CLIP's "
                        "image tower)")
    parser.add_argument("--reference", help="the encoder retrained without the forget set")
    parser.add_argument("--data", required=True, help="the examples (image field; a label "
                        "field for CMIA)")
    for split in SPLITS:
        parser.add_argument(f"--{split}", required=True,
                            help=f"text file of the {split} set's example ids, one per line")
    parser.add_argument("--views", default="simclr", choices=sorted(VIEWS),
                        help="augmentation (simclr; small for images of a few pixels)")
    parser.add_argument("--n-views", type=positive_int, default=10,
                        help="views per example for EMIA (>= 2; the reference code's 10)")
    parser.add_argument("--seed", type=int, default=0, help="keys the views")
    parser.add_argument("--label-field", default="label", help="CMIA's label field")
    parser.add_argument("--no-cmia", action="store_true", help="EMIA only (data without labels)")
    parser.add_argument("--cmia-attack", default="threshold", choices=["threshold", "svc"],
                        help="CMIA's classifier on the probe confidence: the best-accuracy "
                        "threshold (default) or the reference code's SVC(C=3, rbf)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--out", type=results_folder, default="memjax-unlearning",
                        help="results folder (new, empty, or an earlier report to replace)")
    add_data_options(parser)
    parser.set_defaults(run=cmd_unlearning)


def read_ids(path: str, flag: str) -> np.ndarray:
    """The ids in a text file (one per line, blank lines skipped), as strings."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{flag} {path!r}: no such file")
    try:
        lines = file.read_text().split()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{flag} {path!r}: not a readable text file ({error})") from None
    if not lines:
        raise InputError(f"{flag} {path!r}: no ids in the file (expected one id per line)")
    return np.asarray(lines)


def split_rows(ids: np.ndarray, split_ids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row numbers of each split's ids in the source's ``ids``; unknown, repeated or
    shared ids are refused naming the flag."""
    row_of = {str(v): i for i, v in enumerate(ids.tolist())}
    rows, seen = {}, {}
    for split, wanted in split_ids.items():
        missing = [v for v in wanted.tolist() if v not in row_of]
        if missing:
            raise InputError(f"--{split}: {len(missing)} ids are not in --data (e.g. "
                             f"{missing[0]!r}); ids are the data's id field or row numbers")
        found = np.asarray([row_of[v] for v in wanted.tolist()], np.int64)
        if len(np.unique(found)) != len(found):
            raise InputError(f"--{split}: repeated ids")
        for other, other_rows in seen.items():
            shared = np.intersect1d(found, other_rows)
            if shared.size:
                raise InputError(f"--{split} and --{other} share {shared.size} ids (e.g. "
                                 f"{ids[shared[0]]!r}); expected disjoint sets")
        rows[split] = seen[split] = found
    return rows


def _load(folder: str, flag: str) -> Any:
    from memjax.convert import load

    try:
        model = load(folder)
    except InputError as error:
        raise InputError(f"{flag}: {error}") from None
    if model.kind == "clip":
        model = model.tower("image")
    if model.kind != "encoder" or "image" not in model.inputs:
        raise InputError(f"{flag} {folder!r}: {model.name} is a {model.kind!r} model "
                         f"reading {list(model.inputs)}; expected an image encoder (a "
                         "memjax.train SimCLR encoder, a vision port, or a CLIP)")
    return model


def _labels(models: dict[str, Any]) -> list[str]:
    """Unique column prefixes: the folder names (``_2``, ``_3`` appended to repeats)."""
    labels: list[str] = []
    for name in models:
        label = name
        k = 2
        while label in labels:
            label, k = f"{name}_{k}", k + 1
        labels.append(label)
    return labels


def cmd_unlearning(args: argparse.Namespace) -> int:
    from memjax.unlearning import cmia, emia, plot_alignment_gap

    folders = [("--model", f) for f in args.model]
    if args.reference is not None:
        folders.append(("--reference", args.reference))
    if args.n_views < 2:
        raise InputError(f"--n-views {args.n_views}: EMIA compares pairs of views; expected "
                         ">= 2")
    models = [(flag, folder, _load(folder, flag)) for flag, folder in folders]
    first = models[0][2]
    for flag, folder, model in models[1:]:
        if model.preprocess != first.preprocess:
            raise InputError(f"{flag} {folder!r} preprocesses images differently from "
                             f"--model {args.model[0]!r}; every model sees the same views, "
                             "so they need the same preprocessor_config.json")
    data_model, normalize = unnormalized(first)
    source = open_data(args.data, data_model, args)
    have = source.read(np.zeros(1, np.int64))
    if "image" not in have:
        raise InputError(f"--data {args.data}: no image field (fields: {sorted(have)})")
    if not args.no_cmia and args.label_field not in have:
        raise InputError(f"--label-field {args.label_field!r}: not a field of --data (fields: "
                         f"{sorted(have)}); CMIA needs labels (or pass --no-cmia)")
    ids = example_ids(source)
    rows = split_rows(np.asarray([str(v) for v in ids.tolist()]),
                      {split: read_ids(getattr(args, split), f"--{split}")
                       for split in SPLITS})
    sets = {split: rows[split] for split in SPLITS}
    names = _labels([Path(folder).name or "model" for _, folder, _ in models])
    if args.reference is not None:
        names[-1] = "reference"
    order = np.concatenate([rows[s] for s in SPLITS])
    table: dict[str, Any] = {"id": ids[order],
                             "split": np.repeat(SPLITS, [len(rows[s]) for s in SPLITS])}
    metrics: list[tuple[str, Any]] = [(f"{s} examples", len(rows[s])) for s in SPLITS]
    audits = {}
    for name, (_, _, model) in zip(names, models, strict=True):
        audit = emia(model, source, **sets, views_fn=VIEWS[args.views], n_views=args.n_views,
                     seed=args.seed, batch_size=args.batch_size, normalize=normalize)
        audits[name] = audit
        table[f"{name}_alignment"] = audit.scores
        table[f"{name}_emia_flagged"] = audit.flagged
        metrics += [(f"{name}: EMIA forget set flagged as members", audit.flagged_fraction),
                    (f"{name}: EMIA efficacy (1 - flagged)", audit.efficacy),
                    (f"{name}: EMIA attack accuracy (retain vs test)", audit.attack_accuracy)]
        if not args.no_cmia:
            probe = cmia(model, source, **sets, label_field=args.label_field,
                         batch_size=args.batch_size, normalize=normalize,
                         attack=args.cmia_attack)
            table[f"{name}_cmia_confidence"] = probe.scores
            table[f"{name}_cmia_flagged"] = probe.flagged
            metrics += [(f"{name}: CMIA forget set flagged as members", probe.flagged_fraction),
                        (f"{name}: CMIA efficacy (1 - flagged)", probe.efficacy),
                        (f"{name}: CMIA attack accuracy (retain vs test)",
                         probe.attack_accuracy)]
            metrics += [(f"{name}: {key}", value) for key, value in probe.extra.items()]

    def figures(folder: Path) -> list[tuple[str, str]]:
        plot_alignment_gap(audits, folder / "alignment_gap.png")
        return [("alignment_gap.png", "EMIA alignment of the forget vs the test examples")]

    text = (f"MUC's black-box audits (Wang et al. 2024) of {len(models)} encoder(s): EMIA "
            f"thresholds the mean cosine similarity of {args.n_views} '{args.views}' views of "
            "each example at the best accuracy separating retain (members) from test "
            "examples (non-members); CMIA "
            + ("thresholds a linear probe's confidence in the true label the same way"
               if args.cmia_attack == "threshold" else "classifies a linear probe's "
               "confidence in the true label by the reference code's RBF SVC (C = 3), fitted "
               "on retain vs test")
            + ". Reported: the fraction of the forget set flagged as members (lower = better "
            "forgotten; a retrained encoder is the target). One row per example.")
    folder = write_results(args.out, TITLE, text, table, metrics, figures=figures)
    print_metrics(metrics, folder)
    return 0
