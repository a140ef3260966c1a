"""``memjax influence``: Forward-INF scores, self-influence and leakage on any classifier,
CLIP zero-shot classifier or causal LM that ``memjax.load`` opens; LAVA data values.

Every command writes a results folder (``--out``): ``scores.parquet`` (one row per
example), ``metrics.json``, ``index.html`` and a histogram PNG.

- ``scores``: one row per TRAINING example: ``id``, ``name`` (when the source names its
  examples) and one column ``score[<test id>]`` per test example (a wide table: column
  ``score[t]`` is the [N_train] influence of every training example on test example t);
  with ``--group`` a single ``score`` column.
- ``self``: ``id``, ``name``, ``self_influence``.
- ``leakage``: one row per TEST example: ``test_id``, ``test_name``, ``source_ids`` [k]
  and ``source_names`` [k], best first.
- ``lava``: ``id``, ``name``, ``lava_value``.
- ``store``: every training example's projected loss gradient Rᵀg_i [k], computed once into
  a resumable gradient store folder (``--store``: ``settings.json`` + the score store
  ``rows/``); the results folder has ``id``, ``name``, ``projected_grad_norm``.
- ``query``: test examples against a gradient store: one row per TEST example with
  ``supporting_ids`` / ``supporting_scores`` [k] (highest first) and ``opposing_ids`` /
  ``opposing_scores`` [k] (lowest first), streamed (never an N x T matrix).

``--curvature`` (``scores`` and ``query``): ``none`` (the plain gradient), ``kfac`` /
``ekfac`` (factors fitted over the training set), ``cg`` / ``lissa`` (the Gauss-Newton
matrix over ``--curvature-examples`` training examples, solved matrix-free and checked to
converge); ``query`` also takes ``projected``, TRAK's inverse of the stored rows' own
Gram matrix (Park et al. 2023). Damping: ``--damping`` or 0.1 × the mean eigenvalue.

The loss follows the model's kind: a classifier's cross-entropy (fields ``image``,
``label``), a CLIP's zero-shot cross-entropy over ``--classes`` prompts, a causal LM's
mean next-token cross-entropy over the attention mask (``memjax.influence``'s
``cross_entropy_loss``, ``zero_shot_loss``, ``causal_lm_loss``).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import numpy as np

from memjax.cli._common import (
    add_data_options,
    example_ids,
    example_names,
    id_columns,
    open_data,
    positive_int,
    print_metrics,
    results_folder,
    write_results,
)
from memjax.errors import InputError

#: The default CLIP prompt (Radford et al. 2021 use "a photo of a {}." for ImageNet).
DEFAULT_PROMPT = "a photo of a {}."
#: --curvature choices; "projected" is for query only (the stored rows' own Gram matrix).
CURVATURES = ("none", "kfac", "ekfac", "cg", "lissa", "projected")
#: The gradient store folder: its settings beside the score store of the projected rows.
STORE_SETTINGS, STORE_ROWS = "settings.json", "rows"


def register(sub: Any) -> None:
    """Add the subcommand and its arguments to the ``memjax`` parser."""
    influence = sub.add_parser("influence", help="Forward-INF influence (scores, self, "
                               "leakage) of a classifier, CLIP or causal LM, or LAVA values")
    influence.add_argument("what", choices=["scores", "self", "leakage", "lava", "store",
                                            "query"])
    influence.add_argument("--model", help="model folder (Hugging Face checkpoint, memjax "
                           "convert output or memjax.train model): a classifier, a CLIP "
                           "(zero-shot over --classes) or a causal LM (not for lava)")
    influence.add_argument("--train", default="digits", help="training data")
    influence.add_argument("--test", help="test examples (scores, leakage)")
    influence.add_argument("--val", help="clean validation data (lava)")
    influence.add_argument("--out", required=True, type=results_folder,
                           help="results folder (scores.parquet, metrics.json, index.html)")
    influence.add_argument("--store", help="scores: also stream the [N, T] scores to this "
                           "resumable score store folder; store/query: the gradient store "
                           "folder (written by store, read by query)")
    influence.add_argument("--curvature", default="none", choices=CURVATURES,
                           help="scores/query: precondition the test gradient by an inverse "
                           "curvature (query also: 'projected')")
    influence.add_argument("--damping", type=float, help="curvature damping λ >= 0 (default: "
                           "0.1 x the mean eigenvalue of the curvature)")
    influence.add_argument("--curvature-examples", type=positive_int, default=512,
                           help="cg/lissa: training examples whose Gauss-Newton matrix is "
                           "used (a seeded random subset; default 512)")
    influence.add_argument("--fisher", choices=["true", "empirical"], help="kfac/ekfac: "
                           "labels sampled from the model (true Fisher; default for "
                           "classifiers and CLIP) or the data's own labels (empirical; the "
                           "only choice for causal LMs)")
    influence.add_argument("--projection-dim", type=positive_int, default=1024,
                           help="store: k, the width of the stored projected gradients")
    influence.add_argument("--factor-dim", type=positive_int, help="store: LoGra's factorized "
                           "projection: k x k columns per dense layer found in the model, "
                           "from its activations and output gradients (never forming the "
                           "layer's gradient); --projection-dim columns for the other leaves")
    influence.add_argument("--seed", type=int, default=0, help="store: the projection's seed; "
                           "cg/lissa: the curvature subset's and probes' seed")
    influence.add_argument("--mode", default="finite", choices=["finite", "first_order"])
    influence.add_argument("--direction", default="ascent", choices=["ascent", "descent"])
    influence.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "sign"])
    influence.add_argument("--lr", type=float, default=0.1)
    influence.add_argument("--steps", type=int, default=1)
    influence.add_argument("--score", default="oriented", choices=["oriented", "delta", "abs"])
    influence.add_argument("--group", action="store_true", help="one update on all test "
                           "examples together")
    influence.add_argument("--trainable", nargs="+", metavar="PATTERN", help="glob patterns "
                           "over parameter paths (e.g. 'classifier/*'): only these are "
                           "updated and differentiated, the rest frozen (default: every "
                           "float parameter; BatchNorm statistics are always frozen)")
    influence.add_argument("--classes", nargs="+", metavar="NAME", help="CLIP: class names "
                           "in label order (default: the image folder's class folders)")
    influence.add_argument("--classes-file", help="CLIP: a text file of class names, one per "
                           "line, in label order")
    influence.add_argument("--prompt", default=DEFAULT_PROMPT, help="CLIP: the prompt "
                           f"template, '{{}}' is the class name (default {DEFAULT_PROMPT!r})")
    influence.add_argument("--k", type=positive_int, default=5, help="leakage: sources per "
                           "test; query: supporting and opposing training examples per test")
    influence.add_argument("--flagged", help="self/lava: .npy bool [N] of known-bad examples: "
                           "reports the AUROC")
    influence.add_argument("--batch-size", type=positive_int, default=256)
    influence.add_argument("--no-progress", action="store_true")
    add_data_options(influence)
    influence.set_defaults(run=cmd_influence)


def cmd_influence(args: argparse.Namespace) -> int:
    """Forward-INF (scores, self, leakage) on any supported model folder, or LAVA values."""
    if args.what == "lava":
        return _influence_lava(args)
    if args.what == "query":
        return _query(args)
    _check_curvature_use(args)
    from memjax.convert import load

    if args.model is None:
        raise InputError(f"memjax influence {args.what} needs --model (a classifier, CLIP or "
                         "causal LM folder: Hugging Face checkpoint, memjax convert output "
                         "or memjax.train model, e.g. the audit's model/)")
    model = load(args.model)
    train = open_data(args.train, model, args, what="--train")
    loss_fn = influence_loss(model, args, train)
    _check_loss_fields(model, train, "--train")
    params = model.params
    trainable = tuple(args.trainable) if args.trainable else None
    step = {"mode": args.mode, "optimizer": args.optimizer, "lr": args.lr,
            "steps": args.steps, "trainable": trainable}
    progress = not args.no_progress
    settings = [("model", str(args.model)), ("loss", LOSS_NAMES[model.kind]),
                ("trainable", ", ".join(trainable) if trainable else "all float parameters")]
    if args.what == "self":
        from memjax.influence import self_influence

        values = self_influence(loss_fn, params, train, **step, batch_size=args.batch_size,
                                progress=progress)
        settings += [(k, str(v)) for k, v in step.items() if k != "trainable"]
        return _write_values(args, train, np.asarray(values), "self_influence",
                             "Forward-INF self-influence", settings)
    if args.what == "store":
        return _store(args, model, loss_fn, train, trainable, settings)
    if args.test is None:
        raise InputError(f"memjax influence {args.what} needs --test (the test examples)")
    test_source = open_data(args.test, model, args, what="--test")
    _check_loss_fields(model, test_source, "--test")
    test = test_source.read(np.arange(len(test_source)))
    if args.what == "scores":
        return _scores(args, model, loss_fn, test, test_source, train, step, settings)
    from memjax.influence import relative_first_order, top_sources

    # Ranked by first-order influence relative to self-influence (a gradient cosine): an
    # exact copy of a training example ranks its source first (see memjax.influence.RANKING).
    relative = relative_first_order(loss_fn, params, test, train, batch_size=args.batch_size,
                                    trainable=trainable, progress=progress)
    top = top_sources(relative, args.k)
    train_ids, train_names = example_ids(train), example_names(train)
    table = {"test_id": example_ids(test_source), "source_ids": train_ids[top]}
    test_names = example_names(test_source)
    if test_names is not None:
        table["test_name"] = test_names
    if train_names is not None:
        table["source_names"] = train_names[top]
    metrics = [*settings, ("k", args.k), ("test examples", len(top)),
               ("training examples", len(train_ids))]
    text = (f"The {args.k} training examples that support each test example most, ranked by "
            "first-order Forward-INF relative to self-influence (the cosine of the test and "
            "training gradients; an exact copy of a training example ranks its source "
            "first). One row per test example.")
    folder = write_results(args.out, "Forward-INF leakage", text, table, metrics)
    print(f"wrote the top-{args.k} training sources of {len(top)} test examples")
    print_metrics(metrics, folder)
    return 0


#: The loss each model kind gets (shown in the report).
LOSS_NAMES = {"classifier": "cross-entropy of the classifier's logits",
              "clip": "cross-entropy of CLIP zero-shot logits over the class prompts",
              "causal_lm": "mean next-token cross-entropy over the attention mask"}


def influence_loss(model: Any, args: argparse.Namespace, train: Any):
    """The per-example ``loss_fn(params, example)`` Forward-INF differentiates for this
    model: a partial of a ``memjax.influence`` loss (value-hashable: equal settings share
    one compiled program)."""
    from memjax.influence import causal_lm_loss, cross_entropy_loss, param_leaf, zero_shot_loss

    if model.kind == "classifier":
        return functools.partial(cross_entropy_loss, model.apply)
    if model.kind == "causal_lm":
        return functools.partial(causal_lm_loss, model.apply)
    if model.kind == "clip":
        ids, mask = tokenize_prompts(model, class_prompts(args, train), args)
        return functools.partial(zero_shot_loss, model.tower("image").apply,
                                 model.tower("text").apply,
                                 functools.partial(param_leaf, path="logit_scale"), ids, mask)
    raise InputError(f"--model {args.model!r}: Forward-INF needs a loss; memjax has one for "
                     f"classifiers, CLIP (zero-shot) and causal LMs, but {model.name} is a "
                     f"{model.kind!r} model")


def _check_loss_fields(model: Any, source: Any, what: str) -> None:
    """The fields the loss reads are in the data (named error before any compilation)."""
    needed = {"classifier": ("image", "label"), "clip": ("image", "label"),
              "causal_lm": ("input_ids", "attention_mask")}[model.kind]
    fields = source.read(np.zeros(1, np.int64))
    missing = [f for f in needed if f not in fields]
    if missing:
        raise InputError(f"{what}: the {model.kind} loss reads fields {list(needed)}; the "
                         f"data has {sorted(fields)} (missing {missing})")


def class_prompts(args: argparse.Namespace, train: Any) -> list[str]:
    """One prompt per class, in label order: ``--prompt`` filled with each class name from
    ``--classes``, ``--classes-file`` or the image folder's class folders."""
    if args.classes and args.classes_file:
        raise InputError("pass --classes or --classes-file, not both")
    if args.classes_file:
        try:
            lines = Path(args.classes_file).read_text().splitlines()
        except OSError as error:
            raise InputError(f"--classes-file {args.classes_file}: cannot read ({error})") \
                from None
        classes = [line.strip() for line in lines if line.strip()]
        if not classes:
            raise InputError(f"--classes-file {args.classes_file}: no class names; expected "
                             "one class name per line, in label order")
    elif args.classes:
        classes = list(args.classes)
    else:
        classes = list(getattr(train, "classes", None) or [])
        if not classes:
            raise InputError("--model is a CLIP: zero-shot classification needs the class "
                             "names: pass --classes NAME... or --classes-file FILE (in label "
                             "order), or --train images:DIR with one folder per class")
    if "{}" not in args.prompt:
        raise InputError(f"--prompt {args.prompt!r}: expected a template with '{{}}' where "
                         "the class name goes")
    return [args.prompt.replace("{}", name) for name in classes]


def load_tokenizer(model: Any, what: str = "--model"):
    """The model's own tokenizer (``transformers.AutoTokenizer``, local files only)."""
    from memjax.data import load_tokenizer as load_folder

    if model.tokenizer is None:
        raise InputError(f"{what} {model.source or model.name}: no tokenizer files "
                         "(tokenizer.json, vocab.txt, ...) in the model folder")
    return load_folder(model.tokenizer, where=what)


def tokenize_prompts(model: Any, prompts: list[str], args: argparse.Namespace
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` [C, T] int32 of the prompts, padded to
    ``--max-length`` (default the model's context length) with the model's tokenizer."""
    tokenizer = load_tokenizer(model)
    length = args.max_length or model.context_length
    encoded = tokenizer(prompts, padding="max_length", truncation=True, max_length=length,
                        return_tensors="np")
    cut = sum(len(ids) > length for ids in tokenizer(prompts)["input_ids"])
    if cut:
        raise InputError(f"--prompt: {cut} class prompts are longer than {length} tokens; "
                         "shorten the prompt or the class names")
    return (np.asarray(encoded["input_ids"], np.int32),
            np.asarray(encoded["attention_mask"], np.int32))


def _scores(args, model, loss_fn, test, test_source, train, step, settings) -> int:
    from memjax.engine import ScoreStore
    from memjax.influence import forward_inf

    params = model.params
    precondition, curvature = curvature_preconditioner(args, model, loss_fn, train, test,
                                                       step["trainable"])
    settings = [*settings, *curvature]
    out = forward_inf(loss_fn, params, test, train, **step, direction=args.direction,
                      score=args.score, group=args.group, batch_size=args.batch_size,
                      precondition=precondition,
                      store=ScoreStore(args.store) if args.store else None,
                      progress=not args.no_progress)
    # [N] (group) or [N, T]: one row per training example.
    scores = np.asarray(out.read()["score"]) if args.store else np.asarray(out).T
    table = id_columns(train)
    if args.group:
        table["score"] = scores
    else:
        for t, test_id in enumerate(example_ids(test_source)):
            table[f"score[{test_id}]"] = scores[:, t]
    metrics = [*settings, *[(k, str(v)) for k, v in step.items() if k != "trainable"],
               ("direction", args.direction), ("score", args.score), ("group", args.group),
               ("training examples", len(scores)),
               ("test examples", 1 if args.group else scores.shape[1]),
               ("mean score", float(scores.mean())), ("max |score|", float(np.abs(scores).max()))]
    text = ("Forward-INF (Ko et al., CVPR 2024): the change of each training example's loss "
            "after an update of the model on the test example (oriented: positive = the "
            "training example supports the test example). One row per training example; "
            "column score[t] holds the influence on test example id t" +
            (" (all test examples updated together)." if args.group else "."))
    folder = write_results(args.out, "Forward-INF influence", text, table, metrics,
                           figures=lambda f: [histogram(f, "scores.png", scores,
                                                        "Forward-INF score")])
    print(f"wrote Forward-INF scores of {len(scores)} training examples")
    print_metrics(metrics, folder)
    return 0


def _influence_lava(args: argparse.Namespace) -> int:
    from memjax.data import open_source
    from memjax.influence import lava_values

    if args.val is None:
        raise InputError("memjax influence lava needs --val (clean validation data)")
    train, val = open_source(args.train), open_source(args.val)
    fields = train.read(np.arange(len(train)))
    val_fields = val.read(np.arange(len(val)))
    for name, data in (("--train", fields), ("--val", val_fields)):
        if "image" not in data or "label" not in data:
            raise InputError(f"{name}: LAVA needs fields 'image' and 'label', got "
                             f"{sorted(data)}")
    values = lava_values(fields["image"].reshape(len(fields["image"]), -1), fields["label"],
                         val_fields["image"].reshape(len(val_fields["image"]), -1),
                         val_fields["label"])
    return _write_values(args, train, np.asarray(values), "lava_value",
                         "LAVA data values", [("validation examples", len(val))])


def _write_values(args: argparse.Namespace, train, values: np.ndarray, name: str,
                  title: str, settings: list) -> int:
    """Per-training-example values (id, name, value), plus the AUROC with --flagged."""
    from memjax.metrics import roc_auc

    table = {**id_columns(train), name: values}
    metrics = [*settings, ("training examples", len(values)),
               (f"mean {name}", float(values.mean()))]
    if args.flagged:
        flagged = np.load(args.flagged, allow_pickle=False)
        if flagged.dtype != bool or flagged.shape != values.shape:
            raise InputError(f"--flagged: expected a bool .npy of shape {values.shape}, got "
                             f"{flagged.dtype} {flagged.shape}")
        auroc = float(roc_auc(values, flagged))
        metrics.append((f"AUROC of {name} for the flagged examples", auroc))
        table["flagged"] = flagged
    text = (f"{title}: one row per training example (higher = more influential / more "
            "valuable to flag)." if name == "self_influence" else
            f"{title}: one row per training example.")
    folder = write_results(args.out, title, text, table, metrics,
                           figures=lambda f: [histogram(f, f"{name}.png", values, name)])
    print(f"wrote {name} of {len(values)} training examples")
    print_metrics(metrics, folder)
    return 0


# ---- curvature ----------------------------------------------------------------------

def _check_curvature_use(args: argparse.Namespace) -> None:
    """--curvature: scores (any but 'projected'), store (kfac/ekfac: whitened rows), query
    ('projected', or none: a whitened store's queries are whitened alike)."""
    allowed = {"scores": ("none", "kfac", "ekfac", "cg", "lissa"),
               "store": ("none", "kfac", "ekfac"), "query": ("none", "projected")}
    if args.curvature != "none" and args.what not in allowed:
        raise InputError(f"--curvature {args.curvature}: applies to 'scores', 'store' and "
                         f"'query', not to {args.what!r}")
    if args.curvature not in allowed.get(args.what, ("none",)):
        why = {"scores": "the Gram matrix of stored projected gradients exists only for "
                         "'query'",
               "store": "a store is whitened by (F + λI)^(-1/2), which K-FAC/EK-FAC give "
                        "and matrix-free solvers do not",
               "query": "preconditioning only the query is unbiased, but its projection "
                        "noise drowns the scores; make the store with --curvature ekfac "
                        "(both sides whitened) or query with --curvature projected"}
        raise InputError(f"--curvature {args.curvature} with {args.what}: expected one of "
                         f"{list(allowed[args.what])} ({why[args.what]})")
    if args.damping is not None and not (np.isfinite(args.damping) and args.damping >= 0):
        raise InputError(f"--damping {args.damping}: expected a finite number >= 0")


def influence_outputs(model: Any, args: argparse.Namespace, train: Any):
    """``(outputs_fn, output_loss)``: :func:`influence_loss` split at the model's logits,
    for the Gauss-Newton curvature (cg, lissa) and for sampling labels (true Fisher)."""
    from memjax.influence import (
        causal_lm_outputs,
        classifier_outputs,
        label_cross_entropy,
        next_token_cross_entropy,
        param_leaf,
        zero_shot_outputs,
    )

    if model.kind == "classifier":
        return functools.partial(classifier_outputs, model.apply), label_cross_entropy
    if model.kind == "causal_lm":
        return functools.partial(causal_lm_outputs, model.apply), next_token_cross_entropy
    ids, mask = tokenize_prompts(model, class_prompts(args, train), args)
    return functools.partial(zero_shot_outputs, model.tower("image").apply,
                             model.tower("text").apply,
                             functools.partial(param_leaf, path="logit_scale"), ids,
                             mask), label_cross_entropy


def curvature_preconditioner(args: argparse.Namespace, model: Any, loss_fn, train: Any,
                             test: dict, trainable) -> tuple[Any, list]:
    """``(precondition or None, report rows)`` for ``--curvature`` on this model and data."""
    if args.curvature in ("none", "projected"):
        return None, []
    from memjax.influence import gauss_newton_preconditioner

    rows = [("curvature", args.curvature)]
    if args.curvature in ("cg", "lissa"):
        outputs_fn, output_loss = influence_outputs(model, args, train)
        subset = _curvature_subset(train, args.curvature_examples, args.seed)
        precondition, info = gauss_newton_preconditioner(
            args.curvature, outputs_fn, output_loss, loss_fn, model.params, subset, test,
            trainable=trainable, damping=args.damping, seed=args.seed)
        rows += [("curvature matrix", "Gauss-Newton of the loss"),
                 *[(f"curvature {k}", v) for k, v in info.items() if k != "method"]]
        return precondition, rows
    precondition, info = _kfac_preconditioner(args, model, loss_fn, train)
    return precondition, rows + info


def _curvature_subset(train: Any, count: int, seed: int) -> dict:
    """``count`` training examples (all when fewer), a seeded random subset in source
    order: the examples whose mean Gauss-Newton matrix the solvers use."""
    n = len(train)
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:min(count, n)])
    fields = train.read(rows)
    return {k: v for k, v in fields.items() if k != "id"}


def _kfac_preconditioner(args, model, loss_fn, train, power: float = -1.0
                         ) -> tuple[Any, list]:
    """K-FAC / EK-FAC factors over the whole training set (one streamed pass, two for
    EK-FAC) for every dense layer memjax finds in the model, the diagonal Fisher for the
    rest; ``(F + λI)^power`` as a preconditioner (power -0.5 whitens a gradient store)."""
    import jax

    from memjax.influence import curvature_preconditioner as kfac_curvature
    from memjax.influence import fit_kfac, sampled_label

    fisher = args.fisher or ("empirical" if model.kind == "causal_lm" else "true")
    if fisher == "true" and model.kind == "causal_lm":
        raise InputError("--fisher true: sampling a causal LM's tokens is not implemented; "
                         "use --fisher empirical (the data's own next tokens)")
    sample_fn = None
    if fisher == "true":
        sample_fn = functools.partial(sampled_label, influence_outputs(model, args, train)[0])
    # The factors are block-diagonal over layers and leaves, so fitting them on every leaf
    # and letting forward_inf drop the frozen ones is the trainable block exactly.
    factors = fit_kfac(loss_fn, model.params, train, method=args.curvature,
                       batch_size=args.batch_size, fisher=fisher, sample_fn=sample_fn,
                       key=jax.random.key(args.seed), progress=not args.no_progress)
    precondition = kfac_curvature(factors, damping=args.damping, power=power)
    return precondition, [
        ("fisher", fisher), ("damping", "0.1 x mean eigenvalue per block"
                             if args.damping is None else args.damping),
        ("K-FAC layers", ", ".join(layer.path for layer in factors.layers) or "none found"),
        ("diagonal Fisher leaves", len(factors.diagonal)),
        ("curvature examples", int(factors.count))]


# ---- gradient store ---------------------------------------------------------------

def _store_settings(args: argparse.Namespace, model_path: str, trainable) -> dict:
    return {"format": "memjax gradient store", "version": 1, "model": model_path,
            "train": args.train, "projection_dim": args.projection_dim, "seed": args.seed,
            "factor_dim": args.factor_dim, "curvature": args.curvature,
            "damping": args.damping, "fisher": args.fisher, "batch_size": args.batch_size,
            "block_size": 4096, "trainable": list(trainable) if trainable else None,
            "classes": args.classes, "classes_file": args.classes_file, "prompt": args.prompt,
            "max_length": args.max_length, "text_field": args.text_field}


def _store(args, model, loss_fn, train, trainable, settings) -> int:
    """``store``: projected training gradients, once, into ``--store`` (resumable)."""
    import json

    from memjax._io import atomic_write_json
    from memjax.engine import ScoreStore
    from memjax.influence import gradient_store

    if args.store is None:
        raise InputError("memjax influence store needs --store FOLDER (the gradient store "
                         "to write, or to resume)")
    folder = Path(args.store)
    wanted = _store_settings(args, str(Path(args.model).resolve()), trainable)
    settings_file = folder / STORE_SETTINGS
    if settings_file.exists():
        try:
            found = json.loads(settings_file.read_text())
        except (OSError, ValueError) as error:
            raise InputError(f"--store {args.store}: {STORE_SETTINGS} is unreadable "
                             f"({error}); expected a memjax gradient store") from None
        if found != wanted:
            changed = sorted(k for k in wanted if found.get(k) != wanted[k])
            raise InputError(f"--store {args.store}: a gradient store made with other "
                             f"settings ({', '.join(changed)}); use a new folder")
    elif folder.exists() and any(folder.iterdir()):
        raise InputError(f"--store {args.store}: the folder is not empty and is not a "
                         "gradient store; expected a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(settings_file, wanted)
    if args.factor_dim is not None and trainable is not None:
        raise InputError("--factor-dim: the factorized store projects every parameter; "
                         "leave out --trainable (or --factor-dim)")
    if args.factor_dim is not None and args.curvature != "none":
        raise InputError(f"--factor-dim with --curvature {args.curvature}: whitening forms "
                         "each example's gradient; use the dense projection")
    whiten, curvature_rows = None, []
    if args.curvature != "none":
        whiten, curvature_rows = _kfac_preconditioner(args, model, loss_fn, train, power=-0.5)
    rows = gradient_store(loss_fn, model.params, train, ScoreStore(folder / STORE_ROWS),
                          projection_dim=args.projection_dim, batch_size=args.batch_size,
                          seed=args.seed, trainable=trainable, factor_dim=args.factor_dim,
                          precondition=whiten, progress=not args.no_progress)
    settings = [*settings, ("whitening", f"(F + λI)^(-1/2), F by {args.curvature}"
                            if whiten else "none"), *curvature_rows]
    grads = rows.read()["grad"]
    norms = np.linalg.norm(grads, axis=1)
    table = {**id_columns(train), "projected_grad_norm": norms}
    metrics = [*settings, ("projection dim", args.projection_dim),
               ("factorized (LoGra) factor dim", args.factor_dim or "no (dense projection)"),
               ("stored width", int(grads.shape[1])),
               ("projection seed", args.seed), ("training examples", len(norms)),
               ("mean projected gradient norm", float(norms.mean())),
               ("gradient store", str(folder))]
    text = ("The projected loss gradient Rᵀg_i [k] of every training example (R a seeded "
            "Gaussian projection, E[RRᵀ] = I) is in the gradient store; query it with "
            "'memjax influence query --store'. One row per training example: the norm of "
            "its stored row.")
    out = write_results(args.out, "Gradient store", text, table, metrics)
    print(f"stored the projected gradients of {len(norms)} training examples in {folder}")
    print_metrics(metrics, out)
    return 0


def _open_store(args: argparse.Namespace) -> tuple[dict, Any]:
    import json

    from memjax.engine import ScoreStore

    if args.store is None:
        raise InputError("memjax influence query needs --store FOLDER (a gradient store "
                         "written by 'memjax influence store')")
    folder = Path(args.store)
    try:
        settings = json.loads((folder / STORE_SETTINGS).read_text())
    except (OSError, ValueError):
        raise InputError(f"--store {args.store}: no readable {STORE_SETTINGS}; expected a "
                         "folder written by 'memjax influence store'") from None
    rows = ScoreStore(folder / STORE_ROWS)
    if not (rows.exists() and rows.complete):
        raise InputError(f"--store {args.store}: the store is incomplete; rerun 'memjax "
                         "influence store' with the same arguments to finish it")
    return settings, rows


def _query(args: argparse.Namespace) -> int:
    """``query``: the test examples' top supporting and opposing training examples."""
    from memjax.convert import load
    from memjax.engine.cache import cached_jit
    from memjax.influence import projected_fisher_solve, query_store, query_vectors

    _check_curvature_use(args)
    settings, rows = _open_store(args)
    if args.model is not None and str(Path(args.model).resolve()) != settings["model"]:
        raise InputError(f"--model {args.model}: the store was made with {settings['model']}; "
                         "omit --model (the store's own is used) or query another store")
    if args.test is None:
        raise InputError("memjax influence query needs --test (the test examples)")
    for key in ("classes", "classes_file", "prompt", "max_length", "text_field"):
        setattr(args, key, settings[key])
    args.train, args.model = settings["train"], settings["model"]
    model = load(settings["model"])
    train = open_data(settings["train"], model, args, what="the store's training data")
    loss_fn = influence_loss(model, args, train)
    test_source = open_data(args.test, model, args, what="--test")
    _check_loss_fields(model, test_source, "--test")
    from memjax.data import numeric_fields

    test = numeric_fields(test_source.read(np.arange(len(test_source))))
    trainable = tuple(settings["trainable"]) if settings["trainable"] else None
    metrics = [("model", settings["model"]), ("training data", settings["train"]),
               ("projection dim", settings["projection_dim"]), ("k", args.k)]
    precondition, rows_info, requested = None, [], args.curvature
    if settings.get("curvature", "none") != "none":  # a whitened store: whiten alike
        if requested != "none":
            raise InputError(f"--curvature {requested}: the store is whitened by "
                             f"{settings['curvature']}, so its queries are whitened the same "
                             "way; query it with --curvature none")
        for key in ("curvature", "damping", "fisher", "seed", "batch_size"):
            setattr(args, key, settings[key])
        precondition, rows_info = _kfac_preconditioner(args, model, loss_fn, train,
                                                       power=-0.5)
        rows_info = [("whitening", f"(F + λI)^(-1/2), F by {settings['curvature']} (the "
                                   "store's)"), *rows_info]
    project = functools.partial(query_vectors, loss_fn, projection_dim=settings[
        "projection_dim"], seed=settings["seed"], block_size=settings["block_size"],
        trainable=trainable, precondition=precondition,
        factor_dim=settings.get("factor_dim"))
    queries = np.asarray(cached_jit(project)(model.params, test), np.float64)
    if requested == "projected":
        queries, damping = projected_fisher_solve(rows, queries, args.damping)
        rows_info = [("curvature", "projected (TRAK: stored rows' Gram matrix)"),
                     ("damping", damping)]
    found = query_store(rows, queries, top_k=min(args.k, len(train)))
    train_ids = example_ids(train)
    table = {"test_id": example_ids(test_source),
             "supporting_ids": train_ids[found["top_rows"]],
             "supporting_scores": found["top_scores"],
             "opposing_ids": train_ids[found["bottom_rows"]],
             "opposing_scores": found["bottom_scores"]}
    test_names, train_names = example_names(test_source), example_names(train)
    if test_names is not None:
        table["test_name"] = test_names
    if train_names is not None:
        table["supporting_names"] = train_names[found["top_rows"]]
        table["opposing_names"] = train_names[found["bottom_rows"]]
    metrics += [*rows_info, ("test examples", len(test_names if test_names is not None
                                                  else table["test_id"])),
                ("training examples", len(train_ids))]
    text = (f"The {args.k} training examples whose stored projected gradients have the "
            "highest (supporting) and lowest (opposing) dot product with each test "
            "example's projected gradient" + (" preconditioned by the inverse curvature"
                                              if args.curvature != "none" else "") +
            ". One row per test example; scores best first.")
    folder = write_results(args.out, "Gradient store query", text, table, metrics)
    print(f"wrote the top-{args.k} supporting and opposing training examples of "
          f"{len(table['test_id'])} test examples")
    print_metrics(metrics, folder)
    return 0


# ---- shared with memjax memorization -------------------------------------------------

def histogram(folder: Path, file: str, values: np.ndarray, label: str) -> tuple[str, str]:
    """A histogram PNG of ``values`` (all of them, flattened) in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(values, np.float64).ravel()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values[np.isfinite(values)], bins=50)
    ax.set_xlabel(label)
    ax.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(folder / file, dpi=100)
    plt.close(fig)
    return file, f"distribution of {label}"
