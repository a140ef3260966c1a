"""``memjax mia``: attack a model from its stored signals or its saved reference models."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

from memjax.errors import InputError


def register(sub: Any) -> None:
    """Add the subcommand and its arguments to the ``memjax`` parser."""
    mia = sub.add_parser("mia", help="attack a model: stored signals (--scores) or saved "
                         "reference models (--models)")
    mia.add_argument("--models", help="folder written by memjax.train.save_models (e.g. the "
                     "audit's reference_models)")
    mia.add_argument("--data", default="digits", help="with --models: the data the models "
                     "were trained on")
    mia.add_argument("--target", type=int, default=0, help="with --models: the attacked model")
    mia.add_argument("--scores", help="a score store written by memjax score")
    mia.add_argument("--members", help="with --scores: .npy bool mask by example id, or "
                     "member ids")
    mia.add_argument("--texts", help="with --scores: JSONL whose 'text' field, line i = "
                     "example id i, enables the zlib attack")
    mia.add_argument("--k", type=float, default=0.2, help="Min-K%% / Min-K%%++ fraction")
    mia.add_argument("--out", default="memjax-mia", help="report folder")
    mia.add_argument("--batch-size", type=int, default=256)
    mia.add_argument("--no-progress", action="store_true")
    mia.set_defaults(run=cmd_mia)


def cmd_mia(args: argparse.Namespace) -> int:
    """Attack a model: from its stored signals (--scores), or a saved model with the
    reference models trained beside it (--models)."""
    from memjax.metrics import plot_roc
    from memjax.report import Section, write_report

    if (args.models is None) == (args.scores is None):
        raise InputError("memjax mia: give exactly one of --models (saved reference models) "
                         "or --scores (a score store, with --members)")
    run = _mia_from_scores if args.scores else _mia_from_models
    title, text, attacks, is_member, metrics = run(args)

    def build(folder: Path) -> list[Section]:
        plot_roc({name: (s, is_member) for name, s in attacks.items()}, folder / "roc.png",
                 title=title)
        return [Section("Membership inference", text, metrics,
                        figures=[("roc.png", "Log-log ROC")])]

    folder = write_report(args.out, "memjax mia", build)
    for name, value in metrics:
        if name.endswith("AUC"):
            print(f"{name}: {value:.4f}")
    print(f"report: {folder / 'index.html'} (metrics.json, roc.png)")
    return 0


def _mia_from_models(args: argparse.Namespace):
    import jax

    from memjax.data import open_source
    from memjax.engine import score
    from memjax.mia import all_model_signals, attack_metrics, attack_suite
    from memjax.models import Model
    from memjax.signals import signal_function
    from memjax.train import load_models

    params, keep, config, _ = load_models(args.models)
    source = open_source(args.data)
    if len(source) != keep.shape[1]:
        raise InputError(f"--data has {len(source)} examples; the models' keep mask covers "
                         f"{keep.shape[1]}: expected the data the models were trained on")
    if not 0 <= args.target < keep.shape[0]:
        raise InputError(f"--target {args.target}: expected a model index in "
                         f"[0, {keep.shape[0]})")
    # One model of the set gives the per-model function and the host check of the data.
    model = Model.from_classifier(jax.tree.map(lambda a: a[0], params), config)
    _, validate = signal_function(model, "classification")
    signals = score(functools.partial(all_model_signals, model.apply), params, source,
                    batch_size=args.batch_size, progress=not args.no_progress,
                    validate=validate)
    population = ~keep.any(axis=0)
    attacks, is_member = attack_suite(signals, keep, population, target=args.target)
    metrics = [("models", int(keep.shape[0])), ("target model", args.target),
               ("evaluation examples", int(len(is_member))),
               ("population examples", int(population.sum()))] + attack_metrics(attacks,
                                                                                 is_member)
    return (f"Model {args.target} against {keep.shape[0] - 1} reference models",
            "LOSS, LiRA and RMIA (when some examples are in no model's training set) "
            "against the target model.", attacks, is_member, metrics)


def _mia_from_scores(args: argparse.Namespace):
    from memjax.engine import ScoreStore
    from memjax.mia import attack_metrics, attacks_from_signals, jsonl_texts, member_flags

    if args.members is None:
        raise InputError("--scores needs --members (a .npy bool mask by example id, or the "
                         "member ids)")
    signals = ScoreStore(args.scores).read()
    is_member = member_flags(args.members, signals["id"])
    if is_member.all() or not is_member.any():
        raise InputError(f"--members: {int(is_member.sum())} of {is_member.size} stored "
                         "examples are members; expected both members and non-members")
    texts = jsonl_texts(args.texts, signals["id"]) if args.texts else None
    attacks = attacks_from_signals(signals, k=args.k, texts=texts)
    metrics = [("examples", int(is_member.size)), ("members", int(is_member.sum()))]
    metrics += attack_metrics(attacks, is_member)
    return ("Attacks on stored signals", "Attacks that need no reference models, on the "
            f"signals stored in {args.scores} (see memjax.mia.attacks_from_signals).", attacks,
            is_member, metrics)
