"""``memjax prototypes``: differentially private prototypes (DPPL; Wahdany et al., NeurIPS
2024) from an encoder's embeddings of a private labelled set.

``--method mean`` (DPPL-Mean: ``--estimator sum``, the Gaussian mechanism on each class's
sum of unit-normalised embeddings, or ``coinpress``, the paper's CoinPress mean) or
``public`` (DPPL-Public: per class, one ``--public`` example chosen by the exponential
mechanism); ``--accountant`` says what ε means (mean: zcdp or analytic (ε, δ)-DP, or
pure-zcdp, the reference code's ρ = ε²/2; public: pure ε-DP or pure-zcdp); see
:mod:`memjax.prototypes`. For each ``--epsilon`` the prototypes classify ``--test`` by
cosine similarity and a membership attack (cosine to the own class's prototype) scores the
private set against ``--nonmembers`` (default: the test set). Writes ``prototypes.npz``
(``epsilon`` [E], ``noise`` [E], ``prototypes`` [E, K, D], ``indices`` [E, K] for public),
``predictions.parquet`` (one row per test example: id, label, one prediction column per ε)
and ``metrics.json`` (accuracy, membership AUC and the noise scale per ε) beside
``index.html``.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from memjax.cli._common import number
from memjax.errors import InputError

TITLE = "Differentially private prototypes"
#: argparse type of --epsilon: a privacy budget > 0, or inf (no noise: the non-private
#: prototypes, for comparison).
EPSILON = number("a number > 0 or inf", lambda v: v > 0)


def register(sub: Any) -> None:
    """Add ``memjax prototypes`` to the top-level subcommands."""
    from memjax.cli._common import fraction_open, positive_int, positive_number, results_folder
    from memjax.prototypes import ACCOUNTANTS, ESTIMATORS, EXPONENTIAL_ACCOUNTANTS, METHODS

    cmd = sub.add_parser("prototypes", help="differentially private prototypes (DPPL-Mean, "
                         "DPPL-Public): accuracy and membership AUC per ε",
                         description=__doc__.split("\n\n")[1].replace("\n", " "))
    cmd.add_argument("--model", required=True, help="encoder folder (memjax.load: an "
                     "encoder, a classifier with --layer, or a CLIP: its image tower)")
    cmd.add_argument("--layer", help="embed with this tap of the model (e.g. dense1) "
                     "instead of its output")
    cmd.add_argument("--private", required=True, help="the private labelled set (image and "
                     "label fields: PATH.npz, digits, images:FOLDER, ...)")
    cmd.add_argument("--test", required=True, help="labelled test set (accuracy; also the "
                     "non-members unless --nonmembers)")
    cmd.add_argument("--public", help="public candidates (DPPL-Public; labels not needed)")
    cmd.add_argument("--nonmembers", help="labelled non-members of the membership check "
                     "(default: --test)")
    cmd.add_argument("--method", choices=METHODS, default="mean", help="default mean")
    cmd.add_argument("--epsilon", type=EPSILON, nargs="+", required=True,
                     help="one or more ε (inf: not private)")
    cmd.add_argument("--delta", type=fraction_open, default=1e-5,
                     help="δ of DPPL-Mean (default 1e-5)")
    cmd.add_argument("--accountant",
                     choices=tuple(dict.fromkeys((*ACCOUNTANTS, *EXPONENTIAL_ACCOUNTANTS))),
                     help="what ε means: mean: zcdp (default), analytic (sum only) or "
                     "pure-zcdp (ρ = ε²/2); public: pure (default) or pure-zcdp")
    cmd.add_argument("--estimator", choices=ESTIMATORS, default="sum",
                     help="DPPL-Mean: sum (default) or coinpress")
    cmd.add_argument("--clip", type=positive_number, default=1.0,
                     help="DPPL-Mean sum: embeddings normalised to this L2 norm (default 1)")
    cmd.add_argument("--monotone", action="store_true", help="DPPL-Public: exp(ε·u/Δ) "
                     "(add/remove-one neighbours) instead of exp(ε·u/(2Δ))")
    cmd.add_argument("--min-score", type=float, default=0.0, help="DPPL-Public: a, the "
                     "lower clip of 1 + cosine (default 0; 1 counts positive cosine only)")
    cmd.add_argument("--max-score", type=float, default=2.0,
                     help="DPPL-Public: b, the upper clip of 1 + cosine (default 2)")
    cmd.add_argument("--num-classes", type=positive_int,
                     help="classes (default: 1 + the largest private or test label)")
    cmd.add_argument("--label-field", default="label", help="the label field (default label)")
    cmd.add_argument("--seed", type=int, default=0, help="keys the mechanisms' noise")
    cmd.add_argument("--batch-size", type=positive_int, default=256,
                     help="examples per batch when embedding (default 256)")
    cmd.add_argument("--out", type=results_folder, default="memjax-prototypes",
                     help="results folder (new, empty, or an earlier report to replace)")
    cmd.add_argument("--no-progress", action="store_true")
    cmd.set_defaults(run=cmd_prototypes)


def _load(folder: str):
    from memjax.convert import load

    try:
        return load(folder)
    except InputError as error:
        raise InputError(f"--model: {error}") from None


def _embed(model, spec: str, flag: str, args: argparse.Namespace, labelled: bool):
    from memjax.cli._common import example_ids, open_data
    from memjax.prototypes import embed

    source = open_data(spec, model, args, what=flag)
    try:
        out = embed(model, source, batch_size=args.batch_size, layer=args.layer,
                    label_field=args.label_field if labelled else None,
                    progress=not args.no_progress)
    except InputError as error:
        raise InputError(f"{flag} {spec!r}: {error}") from None
    if labelled and out["label"].dtype.kind not in "iu":
        raise InputError(f"{flag} {spec!r}: the {args.label_field!r} field is "
                         f"{out['label'].dtype}, expected integer class labels")
    return out, example_ids(source)


def cmd_prototypes(args: argparse.Namespace) -> int:
    import jax

    from memjax._io import atomic_write_bytes
    from memjax.cli._common import write_results
    from memjax.prototypes import ACCOUNTANTS, EXPONENTIAL_ACCOUNTANTS, evaluate_prototypes

    if args.method == "public" and args.public is None:
        raise InputError("--public: DPPL-Public (--method public) needs public candidates")
    if args.method == "mean" and args.public is not None:
        raise InputError("--public: only DPPL-Public (--method public) reads it")
    allowed = ACCOUNTANTS if args.method == "mean" else EXPONENTIAL_ACCOUNTANTS
    accountant = args.accountant or allowed[0]
    if accountant not in allowed:
        raise InputError(f"--accountant {accountant}: --method {args.method} takes "
                         f"{' or '.join(allowed)}")
    if args.method == "mean" and args.estimator == "coinpress" and accountant == "analytic":
        raise InputError("--accountant analytic: CoinPress is accounted in zCDP (zcdp or "
                         "pure-zcdp)")
    if not 0.0 <= args.min_score < args.max_score <= 2.0:
        raise InputError(f"--min-score {args.min_score} / --max-score {args.max_score}: "
                         "expected 0 <= min < max <= 2 (bounds on 1 + cosine)")
    model = _load(args.model)
    private, _ = _embed(model, args.private, "--private", args, True)
    test, test_ids = _embed(model, args.test, "--test", args, True)
    others = (_embed(model, args.nonmembers, "--nonmembers", args, True)[0]
              if args.nonmembers else test)
    public = _embed(model, args.public, "--public", args, False)[0] if args.public else None
    largest = max(int(private["label"].max()), int(test["label"].max()),
                  int(others["label"].max()))
    num_classes = args.num_classes or largest + 1
    for flag, labels in (("--private", private["label"]), ("--test", test["label"]),
                         ("--nonmembers", others["label"])):
        if labels.min() < 0 or labels.max() >= num_classes:
            raise InputError(f"{flag}: labels {labels.min()}..{labels.max()} outside "
                             f"0..{num_classes - 1} (--num-classes {num_classes})")
    options = ({"delta": args.delta, "clip": args.clip, "accountant": accountant,
                "estimator": args.estimator}
               if args.method == "mean" else
               {"public": public["embedding"], "monotone": args.monotone,
                "min_score": args.min_score, "max_score": args.max_score,
                "accountant": accountant})
    rows = evaluate_prototypes(
        jax.random.key(args.seed), args.method, private["embedding"], private["label"],
        test["embedding"], test["label"], num_classes, epsilons=tuple(args.epsilon),
        nonmembers=others["embedding"], nonmember_labels=others["label"], **options)

    noise_name = ("exponential mechanism factor" if args.method == "public" else
                  "sigma" if args.estimator == "sum" else "largest last-step CoinPress sigma")
    metrics: list[tuple[str, Any]] = [
        ("method", f"DPPL-{args.method.capitalize()}"),
        ("private examples", len(private["label"])), ("test examples", len(test["label"])),
        ("non-member examples", len(others["label"])), ("classes", num_classes),
        ("embedding size", int(private["embedding"].shape[1]))]
    metrics.append(("accountant", accountant))
    if args.method == "mean":
        metrics += [("estimator", args.estimator), ("delta", args.delta)]
        if args.estimator == "sum":
            metrics.append(("clip radius (L2 sensitivity)", args.clip))
    else:
        metrics.append(("utility clip of 1 + cosine", f"[{args.min_score}, {args.max_score}]"))
    table: dict[str, Any] = {"id": test_ids, "label": test["label"]}
    for row in rows:
        name = f"epsilon={row['epsilon']:g}"
        metrics += [(f"accuracy ({name})", row["accuracy"]),
                    (f"membership AUC ({name})", row["auc"]),
                    (f"{noise_name} ({name})", row["noise"])]
        table[f"prediction ({name})"] = row["predictions"]
    arrays = {"epsilon": np.array([r["epsilon"] for r in rows]),
              "noise": np.array([r["noise"] for r in rows]),
              "prototypes": np.stack([r["prototypes"] for r in rows])}
    if args.method == "public":
        arrays["indices"] = np.stack([r["indices"] for r in rows])

    def figures(folder):
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(folder / "prototypes.npz", buffer.getvalue())
        return []

    text = (f"DPPL-{args.method.capitalize()} prototypes of {num_classes} classes from "
            f"{len(private['label'])} private examples at ε = "
            f"{', '.join(f'{e:g}' for e in args.epsilon)}; nearest-prototype (cosine) "
            "accuracy on the test set; membership AUC of the private set against the "
            "non-members, each scored by its cosine to its class prototype. prototypes.npz "
            "holds the released prototypes.")
    folder = write_results(args.out, TITLE, text, table, metrics, figures=figures,
                           table_name="predictions.parquet")
    for name, value in metrics:
        if name.startswith(("accuracy", "membership")):
            print(f"{name}: {value:.4f}")
    print(f"report: {folder / 'index.html'} (metrics.json, predictions.parquet, "
          "prototypes.npz)")
    return 0
