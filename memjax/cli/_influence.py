"""``memjax influence``: Forward-INF scores, self-influence and leakage, or LAVA values."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import numpy as np

from memjax._io import atomic_write_json
from memjax.errors import InputError


def register(sub: Any) -> None:
    """Add the subcommand and its arguments to the ``memjax`` parser."""
    influence = sub.add_parser("influence", help="Forward-INF influence (scores, self, "
                               "leakage) of a memjax classifier, or LAVA data values")
    influence.add_argument("what", choices=["scores", "self", "leakage", "lava"])
    influence.add_argument("--model", help="classifier folder: Hugging Face checkpoint, memjax "
                           "convert output or memjax.train model (not for lava)")
    influence.add_argument("--train", default="digits", help="training data")
    influence.add_argument("--test", help="test examples (scores, leakage)")
    influence.add_argument("--val", help="clean validation data (lava)")
    influence.add_argument("--out", required=True, help="scores: store folder; self/lava: "
                           ".parquet; leakage: .json")
    influence.add_argument("--mode", default="finite", choices=["finite", "first_order"])
    influence.add_argument("--direction", default="ascent", choices=["ascent", "descent"])
    influence.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "sign"])
    influence.add_argument("--lr", type=float, default=0.1)
    influence.add_argument("--steps", type=int, default=1)
    influence.add_argument("--score", default="oriented", choices=["oriented", "delta", "abs"])
    influence.add_argument("--group", action="store_true", help="one update on all test "
                           "examples together")
    influence.add_argument("--k", type=int, default=5, help="leakage: sources per test")
    influence.add_argument("--flagged", help="self/lava: .npy bool [N] of known-bad examples: "
                           "prints the AUROC")
    influence.add_argument("--batch-size", type=int, default=256)
    influence.add_argument("--no-progress", action="store_true")
    influence.set_defaults(run=cmd_influence)


def cmd_influence(args: argparse.Namespace) -> int:
    """Forward-INF (scores, self, leakage) on any classifier folder, or LAVA values."""
    from memjax.data import open_source

    train = open_source(args.train)
    if args.what == "lava":
        return _influence_lava(args, train)
    from memjax.convert import load
    from memjax.influence import cross_entropy_loss, forward_inf, self_influence

    if args.model is None:
        raise InputError(f"memjax influence {args.what} needs --model (a classifier folder: "
                         "Hugging Face checkpoint, memjax convert output or memjax.train "
                         "model, e.g. the audit's model/)")
    model = load(args.model)
    if model.kind != "classifier":
        raise InputError(f"--model {args.model!r}: Forward-INF here uses the cross-entropy "
                         f"of a classifier's logits; {model.name} is a {model.kind!r} model")
    # The model's own per-example logits: the same code path for every model folder.
    classifier_loss = functools.partial(cross_entropy_loss, model.apply)
    params = model.params
    step = {"mode": args.mode, "optimizer": args.optimizer, "lr": args.lr,
            "steps": args.steps}
    progress = not args.no_progress
    if args.what == "self":
        values = self_influence(classifier_loss, params, train, **step,
                                batch_size=args.batch_size, progress=progress)
        return _write_values(args, train, values, "self_influence")
    if args.test is None:
        raise InputError(f"memjax influence {args.what} needs --test (the test examples)")
    test_source = open_source(args.test)
    test = test_source.read(np.arange(len(test_source)))
    if args.what == "scores":
        from memjax.engine import ScoreStore

        forward_inf(classifier_loss, params, test, train, **step, direction=args.direction,
                    score=args.score, group=args.group, batch_size=args.batch_size,
                    store=ScoreStore(args.out), progress=progress)
        print(f"wrote Forward-INF scores (field 'score', [N, T]) to {args.out}")
        return 0
    from memjax.influence import relative_first_order, top_sources

    # Ranked by first-order influence relative to self-influence (a gradient cosine): an
    # exact copy of a training example ranks its source first (see memjax.influence.RANKING).
    top = top_sources(relative_first_order(classifier_loss, params, test, train,
                                           batch_size=args.batch_size), args.k)
    ids = _example_ids(train)
    rows = [{"test": int(t), "sources": ids[top[t]].tolist()} for t in range(len(top))]
    atomic_write_json(Path(args.out), {"k": args.k, "ranking": "first-order Forward-INF "
                      "relative to self-influence", "leakage": rows})
    print(f"wrote the top-{args.k} training sources of {len(rows)} test examples to "
          f"{args.out}")
    return 0


def _influence_lava(args: argparse.Namespace, train) -> int:
    from memjax.data import open_source
    from memjax.influence import lava_values

    if args.val is None:
        raise InputError("memjax influence lava needs --val (clean validation data)")
    val = open_source(args.val)
    fields = train.read(np.arange(len(train)))
    val_fields = val.read(np.arange(len(val)))
    for name, data in (("--train", fields), ("--val", val_fields)):
        if "image" not in data or "label" not in data:
            raise InputError(f"{name}: LAVA needs fields 'image' and 'label', got "
                             f"{sorted(data)}")
    values = lava_values(fields["image"].reshape(len(fields["image"]), -1), fields["label"],
                         val_fields["image"].reshape(len(val_fields["image"]), -1),
                         val_fields["label"])
    return _write_values(args, train, np.asarray(values), "lava_value")


def _write_values(args: argparse.Namespace, train, values: np.ndarray, name: str) -> int:
    """Per-training-example values to Parquet (id, value), plus AUROC with --flagged."""
    from memjax.engine.store import write_parquet
    from memjax.metrics import roc_auc

    ids = _example_ids(train)
    write_parquet([{"id": ids, name: values}], args.out)
    print(f"wrote {name} of {len(ids)} training examples to {args.out}")
    if args.flagged:
        flagged = np.load(args.flagged, allow_pickle=False)
        if flagged.dtype != bool or flagged.shape != values.shape:
            raise InputError(f"--flagged: expected a bool .npy of shape {values.shape}, got "
                             f"{flagged.dtype} {flagged.shape}")
        print(f"AUROC of {name} for the flagged examples: {roc_auc(values, flagged):.4f}")
    return 0


def _example_ids(source) -> np.ndarray:
    """The example ids of a source (its ``id`` field; else the row numbers)."""
    from memjax.data import source_ids

    return source_ids(source, np.arange(len(source)))
