"""``memjax mia``: membership inference against any model memjax opens.

Subcommands (each writes ``scores.parquet``, one row per example with its id, name when
the data has names, membership and every attack's score, beside ``metrics.json``,
``index.html`` and ``roc.png``):

- ``tokens``: a causal LM on texts: LOSS, Min-K%, Min-K%++, zlib, reference-model
  calibration, and dataset inference.
- ``clip``: a CLIP on image-text pairs: CSA, AEA, WSA and the text-only control.
- ``lira`` / ``rmia``: a target model against reference models, from model folders or
  from saved signal arrays (``--signals``).
- ``stored``: the attacks a score store written by ``memjax score`` supports.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import numpy as np

from memjax.cli import _mia_bench, _mia_di, _mia_diffusion, _mia_iar, _mia_icl
from memjax.cli._common import (
    example_names,
    load_model,
    positive_int,
    results_folder,
)
from memjax.errors import InputError

TITLE = "Membership inference"
#: The reference-model attack's column: −(target loss − reference loss), higher = member.
REFERENCE = "reference-calibrated LOSS"


def register(sub: Any) -> None:
    """Add ``memjax mia`` and its subcommands to the ``memjax`` parser."""
    from memjax.cli._common import add_data_options

    mia = sub.add_parser("mia", help="membership inference: tokens | clip | lira | rmia | "
                         "stored | bench | diffusion | iar | di",
                         description="Membership inference against any model memjax opens "
                         "(memjax mia ATTACK --help for each).")
    attacks = mia.add_subparsers(dest="attack", required=True, metavar="ATTACK")
    output = _output_options()
    # 256 for the small classifiers of reference-model attacks: the audit's batch size, so
    # `memjax mia lira|rmia --models` reproduces its numbers exactly.
    reference_output = _output_options(256)
    members = _member_options()

    tokens = attacks.add_parser(
        "tokens", parents=[output, members], help="a causal LM on texts: LOSS, Min-K%%, "
        "Min-K%%++, zlib, reference model, dataset inference")
    tokens.add_argument("--model", required=True, help="causal LM folder (Hugging Face "
                        "GPT-2/GPT-NeoX checkpoint or memjax convert output)")
    tokens.add_argument("--data", required=True, help="texts: jsonl:FILE (tokenised with the "
                        "model's own tokenizer)")
    tokens.add_argument("--reference", help="a reference LM folder (not trained on the "
                        "candidates): adds the reference-calibrated loss attack")
    tokens.add_argument("--dataset-inference", action="store_true",
                        help="Maini et al. 2024's test: is the member set (suspect) trained "
                        "on, against the non-members (validation)? p-values and a curve")
    tokens.add_argument("--k", type=float, default=0.2, help="Min-K%% / Min-K%%++ fraction")
    tokens.add_argument("--seed", type=int, default=0, help="dataset inference's split seed")
    add_data_options(tokens)
    tokens.set_defaults(run=cmd_tokens)
    _mia_bench.register(attacks)
    _mia_diffusion.register(attacks)
    _mia_iar.register(attacks)
    _mia_di.register(attacks)
    _mia_icl.register(attacks)

    clip = attacks.add_parser(
        "clip", parents=[output, members], help="a CLIP on image-text pairs: CSA, AEA, WSA, "
        "text-only control")
    clip.add_argument("--model", required=True, help="CLIP folder (Hugging Face checkpoint "
                      "with preprocessor_config.json, or memjax convert output)")
    clip.add_argument("--data", required=True, help="the candidate pairs: pairs:FILE "
                      "(.jsonl/.csv/.tsv with image and text columns) or wds:PATTERN")
    clip.add_argument("--known-nonmembers", help="pairs known not to be in the training set "
                      "(a data argument like --data): enables WSA and the text-only control")
    clip.add_argument("--augmentations", type=int, default=0, help="AEA: views per image "
                      "(random resized crop + flip); 0 = no AEA")
    clip.add_argument("--lam", type=float, default=1.5, help="WSA threshold: mean + lam * "
                      "std of the known non-members' CSA")
    clip.add_argument("--wsa-features", default="concat", choices=("concat", "concat_product"),
                      help="WSA features: [img, txt] (the paper) or also img * txt")
    clip.add_argument("--wsa-classifier", default="mlp", choices=("mlp", "logistic"),
                      help="WSA's and the control's classifier: the reference code's MLP "
                      "(default) or logistic regression")
    clip.add_argument("--seed", type=int, default=0, help="seed of views and classifiers")
    add_data_options(clip)
    clip.set_defaults(run=cmd_clip)

    lira = attacks.add_parser(
        "lira", parents=[reference_output, _reference_options()],
        help="LiRA (Carlini et al. 2022) against a target model with reference models")
    lira.add_argument("--missing", default="offline", choices=("offline", "skip"),
                      help="examples without an IN reference model: the offline test on "
                      "their OUT fit (default) or no score; without an OUT model: no score")
    lira.add_argument("--estimator", default="mean", choices=("mean", "median"),
                      help="Gaussian location: mean (paper) or median (reference code)")
    add_data_options(lira)
    lira.set_defaults(run=cmd_lira)

    rmia = attacks.add_parser(
        "rmia", parents=[reference_output, _reference_options()],
        help="RMIA (Zarifzadeh et al. 2024) against a target model with reference models")
    rmia.add_argument("--a", type=float, default=None, help="offline correction a in [0, 1]; "
                      "default: chosen by attacking the first reference model with the others")
    rmia.add_argument("--gamma", type=float, default=1.0, help="likelihood-ratio threshold")
    rmia.add_argument("--online", action="store_true", help="p(x) over all reference models "
                      "(IN and OUT) instead of the corrected OUT mean")
    rmia.add_argument("--missing", default="online", choices=("online", "skip"),
                      help="offline, examples without an OUT reference model: the online "
                      "p(x) (default) or no score")
    rmia.add_argument("--population-variant", default="paper",
                      choices=("paper", "privacy-meter"), help="p(z): mean over all reference "
                      "models (paper) or of the largest half (Privacy Meter's code)")
    add_data_options(rmia)
    rmia.set_defaults(run=cmd_rmia)

    stored = attacks.add_parser(
        "stored", parents=[output, members],
        help="attacks on a score store written by memjax score")
    stored.add_argument("--scores", required=True, help="a score store written by memjax score")
    stored.add_argument("--texts", help="JSONL whose 'text' field, line i = example id i, "
                        "enables the zlib attack")
    stored.add_argument("--k", type=float, default=0.2, help="Min-K%% / Min-K%%++ fraction")
    stored.set_defaults(run=cmd_stored)


def _output_options(batch_size: int = 64) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", type=results_folder, default="memjax-mia",
                        help="results folder (new, empty, or an earlier report to replace)")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help=f"examples per batch (default {batch_size})")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _member_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--members", help=".npy boolean mask by example id (entry i: is "
                       "example i a member)")
    group.add_argument("--member-ids", help="the members' example ids: .npy integers, or a "
                       "text file with one id per line")
    return parser


def _reference_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--signals", help=".npz with phi [M, N(, A)] or logits [M, N(, A), C] "
                       "+ labels [N], keep [M, N] bool, optional population [N] bool")
    group.add_argument("--target-model", help="the attacked model's folder (any model "
                       "memjax.load opens); with --reference-models, --keep and --data")
    group.add_argument("--models", help="a folder written by memjax.train.save_models (e.g. "
                       "the audit's reference_models): models and keep mask together")
    parser.add_argument("--reference-models", nargs="+", default=None,
                        help="with --target-model: the reference models' folders")
    parser.add_argument("--keep", help="with --target-model: .npy bool [1 + R, N], row 0 "
                        "the target's training mask, row r the r-th reference model's")
    parser.add_argument("--data", default=None, help="the examples the models are scored "
                        "on (with --target-model; with --models, default digits)")
    parser.add_argument("--target", type=int, default=0, help="with --signals / --models: "
                        "the attacked model's index (the others are its references)")
    return parser


# --------------------------------------------------------------------------- tokens


def cmd_tokens(args: argparse.Namespace) -> int:
    """LOSS, Min-K%, Min-K%++, zlib (and a reference model) on every text; dataset
    inference of the members against the non-members."""
    from memjax.cli._common import open_data
    from memjax.mia import attacks_from_signals, reference, source_texts

    model = load_model(args.model, "--model", "causal_lm", "a causal LM")
    source = open_data(args.data, model, args)
    signals = _token_signals(model, source, args)
    is_member = _membership(args, signals["id"], len(source))
    texts = source_texts(source)
    attacks = attacks_from_signals(signals, k=args.k, texts=texts)
    facts: list[tuple[str, Any]] = [("model", model.name), ("texts", int(is_member.size)),
                                    ("members", int(is_member.sum()))]
    if args.reference:
        ref_model = load_model(args.reference, "--reference", "causal_lm", "a causal LM")
        ref_signals = _token_signals(ref_model, open_data(args.data, ref_model, args,
                                                          what="--data (reference model)"),
                                     args)
        attacks[REFERENCE] = reference(signals["mean_loss"], ref_signals["mean_loss"])
        facts.append(("reference model", ref_model.name))
    figures = [_roc(attacks, is_member, f"{model.name} on {args.data}")]
    if args.dataset_inference:
        facts += _dataset_inference(signals, texts, attacks, is_member, args, figures)
    text = ("Per-example attacks on the token signals of a causal LM (higher = more likely "
            "member): LOSS (Yeom et al. 2018), Min-K% (Shi et al. 2024), Min-K%++ (Zhang et "
            "al. 2024), zlib (Carlini et al. 2021)"
            + (", and the reference-calibrated loss −(target loss − reference loss) "
               "(Carlini et al. 2021)" if args.reference else "")
            + (". Dataset inference (Maini et al. 2024) t-tests the members against the "
               "non-members on held-out halves" if args.dataset_inference else "") + ".")
    return _finish(args, text, signals["id"], example_names(source), is_member, attacks, facts,
                   figures)


def _token_signals(model, source, args) -> dict[str, np.ndarray]:
    from memjax.engine import score
    from memjax.signals import signal_function

    fn, validate = signal_function(model, "tokens")
    return score(fn, model.params, source, batch_size=args.batch_size,
                 progress=not args.no_progress, validate=validate,
                 param_rules=list(model.partition_rules))


def _dataset_inference(signals, texts, attacks, is_member, args, figures) -> list[tuple]:
    from memjax.audit.text import plot_p_values
    from memjax.mia import dataset_inference, token_features, token_mask

    features, names = token_features(signals["logp"], signals["mu"], signals["sigma"],
                                     token_mask(signals), signals["mean_loss"], texts)
    calibrated = [name for name in attacks if name == REFERENCE]
    if calibrated:
        features = np.concatenate([features, attacks[calibrated[0]][:, None]], axis=1)
    suspect, validation = features[is_member], features[~is_member]
    result = dataset_inference(suspect, validation, seed=args.seed)
    check = dataset_inference(suspect, validation, seed=args.seed, false_positive=True)

    def draw(folder: Path) -> tuple[str, str]:
        plot_p_values({"suspect = members": result,
                       "false-positive check (non-members)": check},
                      folder / "dataset_inference.png")
        return "dataset_inference.png", "Dataset inference p-value vs examples per set"

    figures.append(draw)
    return [("dataset-inference features", len(names) + len(calibrated)),
            ("dataset inference p-value (members vs non-members)", result.p_value),
            ("dataset inference t statistic", result.statistic),
            ("dataset inference p-value (false-positive check on the non-members)",
             check.p_value)]


# --------------------------------------------------------------------------- clip


def cmd_clip(args: argparse.Namespace) -> int:
    """CSA (and AEA over augmented views) on every pair; WSA and the text-only control
    with known non-members."""
    from memjax.cli._common import open_data
    from memjax.mia import aea, csa, embed_pairs, text_only_baseline, wsa

    model = load_model(args.model, "--model", "clip", "a CLIP model")
    if args.augmentations < 0:
        raise InputError(f"--augmentations {args.augmentations}: expected 0 (no AEA) or a "
                         "positive number of views")
    source = open_data(args.data, model, args)
    emb = embed_pairs(model, source, n_views=args.augmentations, seed=args.seed,
                      batch_size=args.batch_size, progress=not args.no_progress)
    is_member = _membership(args, emb["id"], len(source))
    img, txt = emb["image_emb"], emb["text_emb"]
    attacks = {"CSA": np.asarray(csa(img, txt), np.float64)}
    if args.augmentations:
        attacks[f"AEA (mean over {args.augmentations} views)"] = np.asarray(
            aea(emb["view_emb"], txt), np.float64)
    facts: list[tuple[str, Any]] = [("model", model.name), ("pairs", int(is_member.size)),
                                    ("members", int(is_member.sum()))]
    if args.known_nonmembers:
        known = embed_pairs(model, open_data(args.known_nonmembers, model, args,
                                             what="--known-nonmembers"),
                            batch_size=args.batch_size, progress=not args.no_progress)
        result = wsa(img, txt, known["image_emb"], known["text_emb"], lam=args.lam,
                     seed=args.seed, features=args.wsa_features,
                     classifier=args.wsa_classifier)
        control = text_only_baseline(txt, known["text_emb"], seed=args.seed,
                                     classifier=args.wsa_classifier)
        attacks["WSA"] = np.asarray(result.scores, np.float64)
        facts += [("known non-members", int(len(known["id"]))),
                  ("WSA threshold tau", result.tau),
                  ("WSA pseudo-members (CSA >= tau)", result.n_pseudo),
                  ("text-only control AUC (pairs vs known non-members; ~0.5 = no shift)",
                   control.auc)]
    text = ("Attacks of Ko et al. 2023 on a CLIP's image and text embeddings (higher = more "
            "likely member): CSA, the cosine of a pair's embeddings"
            + (f"; AEA, its mean over {args.augmentations} random crops and flips of the "
               "image" if args.augmentations else "")
            + ("; WSA, a classifier trained on pairs pseudo-labelled by a threshold set on "
               "known non-members, with the text-only control (the same classifier on "
               "captions alone: far from 0.5 means the sets differ by distribution, not "
               "membership)" if args.known_nonmembers else "") + ".")
    return _finish(args, text, emb["id"], example_names(source), is_member, attacks, facts,
                   [_roc(attacks, is_member, f"{model.name} on {args.data}")])


# --------------------------------------------------------------------------- lira / rmia


def cmd_lira(args: argparse.Namespace) -> int:
    """LOSS and LiRA (online, online with fixed variance, offline) against the target."""
    from memjax.mia import lira_attacks

    stack, target, names, where = _reference_stack(args)
    result = lira_attacks(stack, target, missing=args.missing, estimator=args.estimator)
    text = (f"Model {target} of {where} against its {stack.n_models - 1} reference models: "
            "LiRA (Carlini et al. 2022) fits Gaussians to the logit-scaled confidence φ of "
            "the reference models that trained on each example (IN) and of those that did "
            f"not (OUT). Examples without an IN model: {_lira_missing(args.missing)}; "
            "without an OUT model: no score (left out of the metrics, counted).")
    return _finish_reference(args, text, stack, result, names)


def cmd_rmia(args: argparse.Namespace) -> int:
    """LOSS and RMIA against the target, with its population examples."""
    from memjax.mia import rmia_attacks

    stack, target, names, where = _reference_stack(args)
    result = rmia_attacks(stack, target, a=args.a, gamma=args.gamma, online=args.online,
                          missing=args.missing, population_variant=args.population_variant)
    text = (f"Model {target} of {where} against its {stack.n_models - 1} reference models: "
            "RMIA (Zarifzadeh et al. 2024) compares the likelihood ratio Pr(x|target)/p(x) "
            f"with that of the {int(stack.population.sum())} population examples no model "
            f"trained on (γ = {args.gamma:g}; p(z) as {args.population_variant}).")
    return _finish_reference(args, text, stack, result, names)


def _lira_missing(missing: str) -> str:
    return "the offline test on their OUT fit" if missing == "offline" else "no score"


def _reference_stack(args: argparse.Namespace):
    """(ReferenceSignals, target index, example names or None, description)."""
    from memjax.mia import load_signals

    given = [flag for flag, value in (("--reference-models", args.reference_models),
                                      ("--keep", args.keep)) if value is not None]
    if args.target_model is None and given:
        raise InputError(f"{', '.join(given)}: only with --target-model (with --signals or "
                         "--models the reference models come from the same file or folder)")
    if args.signals:
        if args.data is not None:
            raise InputError("--data: not with --signals (the arrays are already scored)")
        return load_signals(args.signals), args.target, None, args.signals
    if args.models:
        stack, names = _models_stack(args)
        return stack, args.target, names, args.models
    stack, names = _folders_stack(args)
    return stack, 0, names, "--target-model"


def _models_stack(args: argparse.Namespace):
    import jax

    from memjax.data import open_source
    from memjax.engine import score
    from memjax.mia import all_model_signals, reference_signals
    from memjax.models import Model
    from memjax.signals import signal_function
    from memjax.train import load_models

    params, keep, config, _ = load_models(args.models)
    source = open_source(args.data or "digits")
    if len(source) != keep.shape[1]:
        raise InputError(f"--data has {len(source)} examples; the models' keep mask covers "
                         f"{keep.shape[1]}: expected the data the models were trained on")
    # One model of the set gives the per-model function and the host check of the data.
    model = Model.from_classifier(jax.tree.map(lambda a: a[0], params), config)
    _, validate = signal_function(model, "classification")
    signals = score(functools.partial(all_model_signals, model.apply), params, source,
                    batch_size=args.batch_size, progress=not args.no_progress,
                    validate=validate)
    stack = reference_signals(keep, phi=np.asarray(signals["phi"]).T,
                              p_true=np.asarray(signals["p_true"]).T,
                              loss=np.asarray(signals["loss"]).T, where=f"--models "
                              f"{args.models!r}")
    return stack, example_names(source)


def _folders_stack(args: argparse.Namespace):
    from memjax.cli._common import open_data
    from memjax.mia import model_signals, reference_signals

    missing = [flag for flag, value in (("--reference-models", args.reference_models),
                                        ("--keep", args.keep), ("--data", args.data))
               if value is None]
    if missing:
        raise InputError(f"--target-model needs {', '.join(missing)} (the reference models' "
                         "folders, the keep mask [1 + R, N] and the examples)")
    if args.target != 0:
        raise InputError(f"--target {args.target}: with --target-model the attacked model is "
                         "--target-model (row 0 of --keep); leave --target out")
    folders = [args.target_model, *args.reference_models]
    models = [load_model(folder, "--target-model" if i == 0 else "--reference-models",
                    "classifier", "a classifier") for i, folder in enumerate(folders)]
    sources = [open_data(args.data, model, args) for model in models]
    keep = _keep_file(args.keep, len(models), len(sources[0]))
    signals = model_signals(models, sources, batch_size=args.batch_size,
                            progress=not args.no_progress)
    stack = reference_signals(keep, phi=signals["phi"], p_true=signals["p_true"],
                              loss=signals["loss"], where="--target-model")
    return stack, example_names(sources[0])


def _keep_file(path: str, n_models: int, n_examples: int) -> np.ndarray:
    where = f"--keep {path!r}"
    if not path.endswith(".npy") or not Path(path).is_file():
        raise InputError(f"{where}: expected a .npy boolean array [1 + R, N]")
    try:
        keep = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"{where}: cannot read it as a .npy array ({error})") from None
    if keep.dtype != bool:
        raise InputError(f"{where}: dtype {keep.dtype}; expected a boolean array [1 + R, N] "
                         "(save it with .astype(bool))")
    if keep.shape != (n_models, n_examples):
        raise InputError(f"{where}: shape {keep.shape}; expected [1 + R, N] = "
                         f"{(n_models, n_examples)}: row 0 the target model's training mask, "
                         "one row per --reference-models folder, one column per --data "
                         "example")
    return keep


def _finish_reference(args, text, stack, result, names) -> int:
    """Per-example rows for every example (population rows get no score)."""
    n = stack.n_examples
    table_scores = {}
    for name, values in result.scores.items():
        full = np.full(n, np.nan)
        full[result.evaluation] = values
        table_scores[name] = full
    is_member = np.zeros(n, bool)
    is_member[result.evaluation] = result.is_member
    figures = [_roc(result.scores, result.is_member, text.split(":")[0])]
    extra = {"population": stack.population}
    return _finish(args, text, np.arange(n), names, is_member, table_scores, result.facts,
                   figures, extra=extra, scored=result.evaluation)


# --------------------------------------------------------------------------- stored


def cmd_stored(args: argparse.Namespace) -> int:
    """Attacks on one model's stored signals (no reference models)."""
    from memjax.engine import ScoreStore
    from memjax.mia import attacks_from_signals, jsonl_texts

    signals = ScoreStore(args.scores).read()
    ids = np.asarray(signals["id"])
    is_member = _membership(args, ids, len(ids))
    texts = jsonl_texts(args.texts, ids) if args.texts else None
    attacks = attacks_from_signals(signals, k=args.k, texts=texts)
    facts = [("examples", int(is_member.size)), ("members", int(is_member.sum()))]
    text = ("Attacks that need no reference models, on the signals stored in "
            f"{args.scores} (see memjax.mia.attacks_from_signals).")
    return _finish(args, text, ids, None, is_member, attacks, facts,
                   [_roc(attacks, is_member, "Attacks on stored signals")])


# --------------------------------------------------------------------------- shared


def _membership(args, ids: np.ndarray, n_examples: int) -> np.ndarray:
    """[N] bool membership of the scored rows ``ids`` from --members / --member-ids."""
    from memjax.mia import members_of, read_members

    flags = read_members(n_examples, members=args.members, member_ids=args.member_ids)
    is_member = members_of(flags, ids, "--data")
    if is_member.all() or not is_member.any():
        flag, path = (("--members", args.members) if args.members
                      else ("--member-ids", args.member_ids))
        raise InputError(f"{flag} {path!r}: {int(is_member.sum())} of the {is_member.size} "
                         "examples are members; expected both members and non-members")
    return is_member


def _roc(attacks: dict[str, np.ndarray], is_member: np.ndarray, title: str):
    """A figure callback: the log-log ROC of every attack over the examples it scores."""
    def draw(folder: Path) -> tuple[str, str]:
        from memjax.metrics import plot_roc

        curves = {}
        for name, scores in attacks.items():
            scored = ~np.isnan(scores)
            curves[name] = (scores[scored], is_member[scored])
        plot_roc(curves, folder / "roc.png", title=title)
        return "roc.png", "Log-log ROC of every attack"

    return draw


def _finish(args, text, ids, names, is_member, attacks, facts, figures, *, extra=None,
            scored=None) -> int:
    """Metrics, the per-example table and the report; prints the headline numbers."""
    from memjax.cli._common import print_metrics, write_results
    from memjax.mia import attack_metrics

    rows = slice(None) if scored is None else scored
    metrics = list(facts) + attack_metrics({k: v[rows] for k, v in attacks.items()},
                                           is_member[rows])
    table: dict[str, Any] = {"id": np.asarray(ids)}
    if names is not None:
        table["name"] = names
    table["member"] = is_member
    table.update(extra or {})
    table.update({name: np.asarray(values, np.float64) for name, values in attacks.items()})
    folder = write_results(args.out, TITLE, text, table, metrics,
                           figures=lambda folder: [draw(folder) for draw in figures])
    print_metrics(metrics, folder)
    return 0
