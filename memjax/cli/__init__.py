"""The ``memjax`` command: audit, score, convert, mia, influence, memorization, info, export.

Expected errors (bad input, bad stores) print ``memjax: error: ...`` and exit with status
2, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from memjax.errors import InputError, MemjaxError


def cmd_audit(args: argparse.Namespace) -> int:
    from memjax.audit import run_audit

    folder = run_audit(args.out, seed=args.seed, steps=args.steps,
                       progress=not args.no_progress, references=args.references,
                       demos=not args.no_demos)
    metrics = json.loads((folder / "metrics.json").read_text())
    attack = metrics["Membership inference: LOSS attack"]
    print(f"report: {folder / 'index.html'}")
    print(f"LOSS attack: AUC {attack['AUC']:.4f}, TPR@1%FPR {attack['TPR@1%FPR']:.4f}")
    return 0


def _tokenizer(folder: str | None):
    """A Hugging Face tokenizer from a local folder (never downloads), or None."""
    if folder is None:
        return None
    if not Path(folder).is_dir():
        raise InputError(f"--tokenizer {folder!r}: expected a local tokenizer folder")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InputError("--tokenizer needs the transformers package "
                         "(pip install transformers)") from None
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def cmd_score(args: argparse.Namespace) -> int:
    from memjax.data import open_source
    from memjax.engine import ScoreStore, make_mesh, score
    from memjax.scoring import scorer

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise InputError(f"--out {str(out)!r} already holds a store; pass --resume to "
                         "continue it, or choose another folder")
    source = open_source(args.data, tokenizer=_tokenizer(args.tokenizer),
                         max_length=args.max_length if args.tokenizer else None)
    job = scorer(args.model, args.signal)
    store = score(job.fn, job.params, source, batch_size=args.batch_size,
                  mesh=make_mesh(model=args.model_parallel), param_rules=job.param_rules,
                  store=ScoreStore(out, chunk_size=args.chunk_size),
                  progress=not args.no_progress, validate=job.validate)
    info = store.info()
    print(f"scored {info['n_examples']} examples of {job.description} into {out} "
          f"({info['n_chunks']} chunks)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from memjax.convert import load_pretrained, save

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    model, config = load_pretrained(args.src, dtype=dtype[args.dtype],
                                    allow_pickle=args.allow_pickle)
    save(model, config, args.dst)
    print(f"converted {args.src} ({type(model).__name__}) -> {args.dst}")
    return 0


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
    from memjax.audit.mia import all_model_signals, attack_metrics, attack_suite
    from memjax.data import open_source
    from memjax.engine import score
    from memjax.scoring import classifier_validator
    from memjax.train import load_models

    params, keep, config, _ = load_models(args.models)
    source = open_source(args.data)
    if len(source) != keep.shape[1]:
        raise InputError(f"--data has {len(source)} examples; the models' keep mask covers "
                         f"{keep.shape[1]}: expected the data the models were trained on")
    if not 0 <= args.target < keep.shape[0]:
        raise InputError(f"--target {args.target}: expected a model index in "
                         f"[0, {keep.shape[0]})")
    signals = score(all_model_signals, params, source, batch_size=args.batch_size,
                    progress=not args.no_progress, validate=classifier_validator(config))
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
    from memjax.audit.mia import attack_metrics
    from memjax.engine import ScoreStore
    from memjax.mia._stored import attacks_from_signals, jsonl_texts, member_flags

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
            f"signals stored in {args.scores} (see memjax.mia._stored).", attacks, is_member,
            metrics)


def cmd_influence(args: argparse.Namespace) -> int:
    """Forward-INF (scores, self, leakage) on a memjax.train classifier, or LAVA values."""
    from memjax.data import open_source

    train = open_source(args.train)
    if args.what == "lava":
        return _influence_lava(args, train)
    from memjax.audit.influence import classifier_loss
    from memjax.influence import forward_inf, self_influence
    from memjax.train import load_model

    if args.model is None:
        raise InputError(f"memjax influence {args.what} needs --model (a memjax.train "
                         "classifier folder, e.g. the audit's model/)")
    params, _ = load_model(args.model)
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
    from memjax.audit.influence import relative_first_order
    from memjax.influence import top_sources

    # Ranked by first-order influence relative to self-influence (a gradient cosine): an
    # exact copy of a training example ranks its source first (see memjax.audit.influence).
    top = top_sources(relative_first_order(classifier_loss, params, test, train,
                                           batch_size=args.batch_size), args.k)
    ids = _example_ids(train)
    rows = [{"test": int(t), "sources": ids[top[t]].tolist()} for t in range(len(top))]
    _write_json_atomically(Path(args.out), {"k": args.k, "ranking": "first-order Forward-INF "
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
    from memjax.data.base import source_ids

    return source_ids(source, np.arange(len(source)))


def _write_json_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def cmd_memorization(args: argparse.Namespace) -> int:
    """UnitMem of one memjax.train classifier/encoder, or SSLMem/LayerMem of two (f, g)."""
    from memjax.audit.memorization import digit_views
    from memjax.data import open_source
    from memjax.memorization import layermem, unitmem
    from memjax.train import load_model
    from memjax.train.simclr import encoder_layers

    if args.what == "dejavu":
        return _dejavu_command(args)
    if args.model is None:
        raise InputError(f"memjax memorization {args.what} needs --model (f: a memjax.train "
                         "model folder)")
    source = open_source(args.data)
    layers = tuple(args.layers.split(","))
    params_f, _ = load_model(args.model)
    if args.what == "unitmem":
        result = unitmem(encoder_layers, params_f, source, layers=layers, n_aug=args.n_aug,
                         batch_size=args.batch_size, progress=not args.no_progress)
        columns = {}
        for name, layer in result.layers.items():
            print(f"UnitMem {name}: {layer.summary}")
            columns[f"{name}_unitmem"] = np.asarray(layer.scores)
            columns[f"{name}_argmax_id"] = np.asarray(layer.argmax_id)
        _write_json_atomically(Path(args.out), {k: v.tolist() for k, v in columns.items()})
        print(f"wrote per-unit scores and argmax example ids to {args.out}")
        return 0
    if args.reference is None:
        raise InputError("memjax memorization layermem needs --reference (g: the same "
                         "architecture trained without the scored examples)")
    params_g, _ = load_model(args.reference)
    result = layermem(encoder_layers, encoder_layers, params_f, params_g, source,
                      views_fn=digit_views, n_aug=args.n_aug, layers=layers,
                      batch_size=args.batch_size, progress=not args.no_progress)
    from memjax.engine.store import write_parquet

    columns = {"id": result["id"]}
    for j, name in enumerate(result["layers"]):
        columns[f"{name}_layermem"] = result["raw"][:, j]
        columns[f"{name}_delta"] = result["delta_raw"][:, j]
        print(f"LayerMem {name}: mean {result['raw'][:, j].mean():+.4f}")
    write_parquet([columns], args.out)
    print(f"wrote LayerMem / ΔLayerMem of {len(result['id'])} examples to {args.out}")
    return 0


DEJAVU_ARRAYS = ("target", "reference", "reference_probs", "public", "target_public",
                 "reference_public", "public_labels", "labels")


def _dejavu_command(args: argparse.Namespace) -> int:
    """Déjà vu label inference (Meehan et al. 2023) on precomputed crop embeddings."""
    from memjax.memorization._dejavu import dejavu

    if args.embeddings is None:
        raise InputError("memjax memorization dejavu needs --embeddings (an .npz of the "
                         f"arrays {', '.join(DEJAVU_ARRAYS)})")
    with np.load(args.embeddings) as npz:
        arrays = {name: npz[name] for name in npz.files}
    unknown = sorted(set(arrays) - set(DEJAVU_ARRAYS))
    missing = [name for name in ("target", "public_labels", "labels") if name not in arrays]
    if unknown or missing:
        raise InputError(f"--embeddings {args.embeddings}: missing {missing}, unknown "
                         f"{unknown}; expected arrays among {list(DEJAVU_ARRAYS)}")
    if "public" in arrays:
        public = arrays["public"]
    elif {"target_public", "reference_public"} <= set(arrays):
        public = (arrays["target_public"], arrays["reference_public"])
    else:
        raise InputError(f"--embeddings {args.embeddings}: expected 'public' [P, D] or both "
                         "'target_public' and 'reference_public'")
    result = dejavu(arrays["target"], arrays.get("reference"), public, arrays["public_labels"],
                    arrays["labels"], k=args.k, metric=args.metric,
                    reference_probs=arrays.get("reference_probs"))
    payload = {"fractions": result["fractions"].tolist(),
               "gap": {t: np.asarray(v).tolist() for t, v in result["gap"].items()}}
    for model in ("target", "reference"):
        payload[model] = {t: np.asarray(result[model][t]).tolist() for t in ("top1", "top5")}
    for j, fraction in enumerate(payload["fractions"]):
        print(f"most confident {fraction:.0%}: top-1 target {payload['target']['top1'][j]:.3f} "
              f"reference {payload['reference']['top1'][j]:.3f} gap "
              f"{payload['gap']['top1'][j]:+.3f}; top-5 gap {payload['gap']['top5'][j]:+.3f}")
    _write_json_atomically(Path(args.out), payload)
    print(f"wrote the déjà vu accuracies and gaps to {args.out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from memjax.engine import ScoreStore

    info = ScoreStore(args.store).info()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    state = "complete" if info["complete"] else "INCOMPLETE (resume with memjax score --resume)"
    print(f"store:      {info['path']}")
    print(f"state:      {state}, {info['chunks_done']}/{info['n_chunks']} chunks")
    print(f"examples:   {info['n_examples']} (chunk size {info['chunk_size']}, "
          f"batch size {info['batch_size']})")
    print(f"function:   {info['function']}")
    print(f"data:       {info['data']}")
    for name, field in (info["fields"] or {}).items():
        print(f"field:      {name} {field['dtype']} {tuple(field['shape'])}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from memjax.engine import ScoreStore

    path = ScoreStore(args.store).to_parquet(args.out)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    audit = sub.add_parser("audit", help="train, score and attack on bundled data; write a "
                           "report")
    audit.add_argument("--out", default="memjax-report", help="report folder")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--steps", type=int, default=600, help="training steps")
    audit.add_argument("--references", type=int, default=16,
                       help="reference models for LiRA/RMIA (even; 0 to skip)")
    audit.add_argument("--no-demos", action="store_true", help="leave out the tiny CLIP and "
                       "GPT-2 membership demonstrations and the influence section")
    audit.add_argument("--no-progress", action="store_true")
    audit.set_defaults(run=cmd_audit)

    score = sub.add_parser("score", help="score every example of a data source into a store")
    score.add_argument("--model", required=True, help="model folder: Hugging Face checkpoint, "
                       "memjax convert output, or memjax audit's model/")
    score.add_argument("--data", default="digits", help="digits | FILE.npz | DIR of .npy | "
                       "tfds:NAME:SPLIT[@DIR] | images:DIR | jsonl:FILE")
    score.add_argument("--tokenizer", help="tokenizer folder for jsonl: text (Hugging Face)")
    score.add_argument("--max-length", type=int, default=128,
                       help="tokens per text with --tokenizer (padded/truncated)")
    score.add_argument("--signal", default="classification",
                       help="classification | tokens | contrastive")
    score.add_argument("--model-parallel", type=int, default=1,
                       help="devices per model replica (params sharded over them)")
    score.add_argument("--out", required=True, help="score store folder")
    score.add_argument("--batch-size", type=int, default=256)
    score.add_argument("--chunk-size", type=int, default=None,
                       help="examples per store chunk (a multiple of the batch size)")
    score.add_argument("--resume", action="store_true", help="continue an existing store")
    score.add_argument("--no-progress", action="store_true")
    score.set_defaults(run=cmd_score)

    convert = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder")
    convert.add_argument("src", help="folder with config.json and *.safetensors")
    convert.add_argument("dst", help="output folder (orbax checkpoint + memjax_model.json)")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16",
                                                                 "float16"])
    convert.add_argument("--allow-pickle", action="store_true",
                         help="accept .bin/.pt weights (torch.load(weights_only=True))")
    convert.set_defaults(run=cmd_convert)

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

    influence = sub.add_parser("influence", help="Forward-INF influence (scores, self, "
                               "leakage) of a memjax classifier, or LAVA data values")
    influence.add_argument("what", choices=["scores", "self", "leakage", "lava"])
    influence.add_argument("--model", help="memjax.train classifier folder (not for lava)")
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

    memorization = sub.add_parser("memorization", help="UnitMem of a memjax.train model, or "
                                  "LayerMem/SSLMem of f (--model) against g (--reference)")
    memorization.add_argument("what", choices=["unitmem", "layermem", "dejavu"])
    memorization.add_argument("--model", help="unitmem/layermem, f: a memjax.train classifier "
                              "or SimCLR encoder folder")
    memorization.add_argument("--embeddings", help="dejavu: .npz with target [Q, D], reference "
                              "[Q, D'] or reference_probs [Q, C], public [P, D] (or "
                              "target_public and reference_public), public_labels [P], "
                              "labels [Q]")
    memorization.add_argument("--k", type=int, default=100, help="dejavu: neighbours")
    memorization.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    memorization.add_argument("--reference", help="layermem: g, trained without the data")
    memorization.add_argument("--data", default="digits")
    memorization.add_argument("--layers", default="dense1", help="comma-separated layer names "
                              "(conv1, conv2, ..., dense1, ..., embedding)")
    memorization.add_argument("--n-aug", type=int, default=5)
    memorization.add_argument("--out", required=True, help="unitmem, dejavu: .json; layermem: "
                              ".parquet")
    memorization.add_argument("--batch-size", type=int, default=64)
    memorization.add_argument("--no-progress", action="store_true")
    memorization.set_defaults(run=cmd_memorization)

    info = sub.add_parser("info", help="describe a score store")
    info.add_argument("store")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)

    export = sub.add_parser("export", help="export a complete store to Parquet")
    export.add_argument("store")
    export.add_argument("out", help="output .parquet file")
    export.set_defaults(run=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MemjaxError as err:
        print(f"memjax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
