"""``memjax memorization``: UnitMem, LayerMem/SSLMem, CLIPMem and déjà vu on any model
``memjax.load`` opens (ViT, ResNet, CLIP, BERT, memjax.train models).

Every command writes a results folder (``--out``): ``scores.parquet``, ``metrics.json``,
``index.html`` and a PNG.

- ``unitmem``: one row per UNIT (UnitMem scores units, not examples): ``layer``, ``unit``,
  ``unitmem``, ``argmax_id`` (the example the unit fires for most) and ``argmax_name``.
- ``layermem``: one row per example: ``id``, ``name``, and per layer ``<layer>_layermem``
  (raw SSLMem of the layer), ``<layer>_layermem_normalized``, ``<layer>_delta`` (raw
  ΔLayerMem) and ``<layer>_delta_normalized``; without ``--layers``, SSLMem of the model
  output (``sslmem``, ``sslmem_normalized``, ``loss_f``, ``loss_g``).
- ``clipmem``: one row per image-caption pair: ``clipmem``, ``clipmem_normalized``,
  ``align_f``, ``align_g``.
- ``dejavu``: one row per query crop: ``id``, ``label``, each model's top-1 prediction and
  confidence.

Views. Images are opened with the checkpoint's preprocessing WITHOUT its mean/std
normalisation (resize, crop and rescale to [0, 1] only); the views (``--views``) are made
in [0, 1] at the preprocessed size, which is the model's input size, and normalised with
the checkpoint's ``image_mean``/``image_std`` afterwards (``normalize=`` of the Python
API), because colour jitter and clipping assume [0, 1] pixels. Text encoders (BERT) get
``--views mask``: each real, non-special token replaced by the tokenizer's mask token with
probability ``--mask-rate`` (BERT's pre-training corruption, 15%;
:class:`memjax.augment.TokenMaskView`).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from memjax.augment import SimCLRView, SmallImageView, TokenMaskView
from memjax.cli._common import (
    add_data_options,
    example_names,
    id_columns,
    open_data,
    positive_int,
    print_metrics,
    results_folder,
    write_results,
)
from memjax.cli._influence import histogram, load_tokenizer
from memjax.errors import InputError

#: The image view functions ``--views`` names: SimCLR's views (crops down to 8% of the
#: area, flips, colour jitter, grayscale) at the image's (= the model's input) size, or the
#: milder ones for images of a few pixels (crops of at least half the area,
#: brightness/contrast jitter; the audit's 8×8 digits). ``mask`` is the text view.
VIEWS = {"simclr": SimCLRView(), "small": SmallImageView()}
VIEW_CHOICES = ("auto", "simclr", "small", "mask")


def register(sub: Any) -> None:
    """Add the subcommand and its arguments to the ``memjax`` parser."""
    memorization = sub.add_parser("memorization", help="UnitMem of a model, LayerMem/SSLMem "
                                  "or CLIPMem of f (--model) against g (--reference), or "
                                  "déjà vu")
    memorization.add_argument("what", choices=["unitmem", "layermem", "clipmem", "dejavu"])
    memorization.add_argument("--model", help="f: a model folder (Hugging Face checkpoint, "
                              "memjax convert output, memjax.train model)")
    memorization.add_argument("--reference", help="layermem/clipmem: g, the same "
                              "architecture trained without the data; dejavu: the reference "
                              "model")
    memorization.add_argument("--tower", default="image", choices=["image", "text"],
                              help="unitmem/layermem of a CLIP: which tower to score")
    memorization.add_argument("--data", default="digits", help="the examples (images, "
                              "texts, or image-caption pairs for clipmem)")
    memorization.add_argument("--layers", nargs="+", metavar="LAYER", help="activation names "
                              "or globs (also comma-separated), e.g. 'layers.*.out'; a name "
                              "that matches nothing lists the model's activations")
    memorization.add_argument("--views", default="auto", choices=VIEW_CHOICES,
                              help="augmentation: simclr (SimCLR's views), small (mild, for "
                              "images of a few pixels), mask (text: token masking); auto: "
                              "mask for text models, simclr for images")
    memorization.add_argument("--mask-rate", type=float, default=0.15,
                              help="--views mask: probability of masking each real token")
    memorization.add_argument("--seed", type=int, default=0, help="view seed")
    memorization.add_argument("--n-aug", type=int, default=5)
    memorization.add_argument("--others", default="mean", choices=["mean", "median"],
                              help="unitmem: mean (paper) or median (reference code) of the "
                              "other examples")
    memorization.add_argument("--spatial", default="mean", choices=["mean", "max"],
                              help="unitmem: reduce a unit over space/tokens")
    memorization.add_argument("--negative", default="clamp", choices=["clamp", "shift"],
                              help="unitmem: how negative activations are handled")
    memorization.add_argument("--distance", default="l2", choices=["l2", "sq_l2"],
                              help="layermem: distance of normalised representations")
    memorization.add_argument("--pairing", default="views", choices=["views", "clean"],
                              help="layermem: pairs of views (paper) or clean vs view (code)")
    # déjà vu
    memorization.add_argument("--embeddings", help="dejavu: .npz with target [Q, D], reference "
                              "[Q, D'] or reference_probs [Q, C], public [P, D] (or "
                              "target_public and reference_public), public_labels [P], "
                              "labels [Q]")
    memorization.add_argument("--images", help="dejavu: the training images to query (with "
                              "labels), cropped by --crop")
    memorization.add_argument("--boxes", help="dejavu: .json or .csv of object boxes in the "
                              "original images' pixels: rows image (path, relative to the "
                              "file), label, x0, y0, x1, y1 (CSV: one row per box; JSON: a "
                              "list of {image, label, boxes: [[x0, y0, x1, y1], ...]}); the "
                              "query is the largest background rectangle outside the boxes")
    memorization.add_argument("--public", help="dejavu: the public labelled images")
    memorization.add_argument("--crop", default="periphery", choices=["none", "center",
                                                                     "periphery"],
                              help="dejavu --images: the crop to embed (periphery: the "
                              "largest rectangle outside the central --crop-fraction box)")
    memorization.add_argument("--crop-fraction", type=float, default=0.5,
                              help="dejavu: side fraction of the central box")
    memorization.add_argument("--layer", help="dejavu: embed this tap (averaged over "
                              "positions) instead of the model output")
    memorization.add_argument("--save-embeddings", help="dejavu: also write the embeddings "
                              "as an .npz that --embeddings reads")
    memorization.add_argument("--k", type=int, default=100, help="dejavu: neighbours")
    memorization.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    memorization.add_argument("--out", required=True, type=results_folder, help="results folder")
    memorization.add_argument("--batch-size", type=positive_int, default=64)
    memorization.add_argument("--no-progress", action="store_true")
    add_data_options(memorization)
    memorization.set_defaults(run=cmd_memorization)


def cmd_memorization(args: argparse.Namespace) -> int:
    """UnitMem of one model; LayerMem/SSLMem or CLIPMem of two (f, g); déjà vu."""
    if args.what == "dejavu":
        return _dejavu_command(args)
    from memjax.convert import load

    if args.model is None:
        raise InputError(f"memjax memorization {args.what} needs --model (f: a model folder)")
    f = _scored_part(args, load(args.model))
    if args.what == "unitmem":
        return _unitmem(args, f)
    if args.reference is None:
        raise InputError(f"memjax memorization {args.what} needs --reference (g: the same "
                         "architecture trained without the scored examples)")
    g = _scored_part(args, load(args.reference))
    if f.preprocess != g.preprocess:
        raise InputError(f"--model and --reference preprocess images differently "
                         f"({f.preprocess} vs {g.preprocess}); both see the same views, so "
                         "they need the same preprocessor_config.json")
    if args.what == "clipmem":
        return _clipmem(args, f, g)
    return _layermem(args, f, g)


def _scored_part(args: argparse.Namespace, model: Any) -> Any:
    """A CLIP's ``--tower`` for unitmem/layermem (clipmem takes the whole CLIP)."""
    if model.kind == "clip" and args.what in ("unitmem", "layermem"):
        return model.tower(args.tower)
    return model


# ---- data and views -------------------------------------------------------------------

def unnormalized(model: Any) -> tuple[Any, tuple[np.ndarray, np.ndarray] | None]:
    """(the model with its preprocessing minus the mean/std normalisation, (mean, std) or
    None): data opened with the first is in [0, 1]; views are normalised with the second."""
    config = dict(model.preprocess or {})
    if not config.get("do_normalize", False):
        return model, None
    mean, std = config.get("image_mean"), config.get("image_std")
    if mean is None or std is None:
        raise InputError(f"--model {model.source}: preprocessor_config.json has do_normalize "
                         "but no image_mean/image_std")
    config["do_normalize"] = False
    return model.replace(preprocess=config), (np.asarray(mean, np.float32),
                                              np.asarray(std, np.float32))


def is_text(model: Any) -> bool:
    return "input_ids" in model.inputs


def view_function(args: argparse.Namespace, model: Any):
    """The ``--views`` view function for ``model``'s inputs."""
    views = args.views
    if views == "auto":
        views = "mask" if is_text(model) else "simclr"
    if is_text(model) != (views == "mask"):
        kind = "a text" if is_text(model) else "an image"
        raise InputError(f"--views {views}: {model.name} is {kind} model; use "
                         f"{'--views mask' if is_text(model) else '--views simclr or small'}")
    if views != "mask":
        return VIEWS[views]
    tokenizer = load_tokenizer(model)
    if tokenizer.mask_token_id is None:
        raise InputError(f"--views mask: the tokenizer in {model.tokenizer} has no mask token")
    return TokenMaskView(mask_id=int(tokenizer.mask_token_id), rate=args.mask_rate,
                         keep_ids=tuple(sorted({int(i) for i in tokenizer.all_special_ids})))


def layer_patterns(args: argparse.Namespace) -> tuple[str, ...] | None:
    """``--layers`` as a tuple of names/globs (comma-separated values split)."""
    if not args.layers:
        return None
    return tuple(p.strip() for value in args.layers for p in value.split(",") if p.strip())


def _open(args: argparse.Namespace, model: Any, spec: str, what: str,
          fields: tuple[str, ...] | None = None):
    """(source, normalize) for ``model``: images in [0, 1] plus their (mean, std). The
    source must have ``fields`` (default: the model's inputs)."""
    data_model, normalize = unnormalized(model)
    source = open_data(spec, data_model, args, what=what)
    have = source.read(np.zeros(1, np.int64))
    missing = [f for f in (fields or model.inputs) if f not in have]
    if missing:
        raise InputError(f"{what} {spec}: {model.name} reads {list(fields or model.inputs)}; "
                         f"the data has {sorted(have)} (missing {missing})")
    return source, normalize


# ---- UnitMem --------------------------------------------------------------------------

def _unitmem(args: argparse.Namespace, model: Any) -> int:
    from memjax.memorization import unitmem

    layers = layer_patterns(args)
    source, normalize = _open(args, model, args.data, "--data")
    if layers is None:
        example = {k: v[0] for k, v in source.read(np.zeros(1, np.int64)).items()
                   if k in model.inputs}
        raise InputError("memjax memorization unitmem needs --layers; the model's "
                         f"activations: {', '.join(model.activation_names(example))}")
    views = view_function(args, model)
    result = unitmem(model, source, layers=layers, n_aug=args.n_aug, views_fn=views,
                     seed=args.seed, others=args.others, spatial=args.spatial,
                     negative=args.negative, batch_size=args.batch_size,
                     normalize=None if is_text(model) else normalize,
                     progress=not args.no_progress)
    names = example_names(source)
    table: dict[str, list] = {"layer": [], "unit": [], "unitmem": [], "argmax_id": []}
    if names is not None:
        table["argmax_name"] = []
    metrics: list[tuple[str, Any]] = [("model", str(args.model)), ("examples",
                                                                   result.n_examples),
                                      ("views per example", result.n_aug),
                                      ("others", result.others)]
    for name, layer in result.layers.items():
        units = len(layer.scores)
        table["layer"] += [name] * units
        table["unit"] += list(range(units))
        table["unitmem"] += list(np.asarray(layer.scores))
        table["argmax_id"] += list(np.asarray(layer.argmax_id))
        if names is not None:
            table["argmax_name"] += list(names[np.asarray(layer.argmax)])
        for key, value in layer.summary.items():
            metrics.append((f"UnitMem {name}: {key}", float(value)))
    text = ("UnitMem (Wang et al., NeurIPS 2024): per unit, (mu_max - mu_others) / (mu_max + "
            "mu_others) of its activation averaged over views of each example. One row per "
            "unit; argmax_id is the example it fires for most.")
    scores = {name: np.asarray(layer.scores) for name, layer in result.layers.items()}
    folder = write_results(args.out, "UnitMem", text,
                           {k: np.asarray(v, dtype=object if k == "argmax_name" else None)
                            for k, v in table.items()}, metrics,
                           figures=lambda f: [_layer_histograms(f, scores)])
    print_metrics(metrics, folder)
    return 0


def _layer_histograms(folder: Path, scores: dict[str, np.ndarray]) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for name, values in scores.items():
        ax.hist(values, bins=40, range=(0, 1), histtype="step", label=name)
    ax.set_xlabel("UnitMem")
    ax.set_ylabel("units")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "unitmem.png", dpi=100)
    plt.close(fig)
    return "unitmem.png", "UnitMem of the units of each layer"


# ---- LayerMem / SSLMem ----------------------------------------------------------------

def _layermem(args: argparse.Namespace, f: Any, g: Any) -> int:
    from memjax.memorization import layermem, sslmem

    source, normalize = _open(args, f, args.data, "--data")
    views = view_function(args, f)
    common = {"views_fn": views, "seed": args.seed, "n_aug": args.n_aug,
              "batch_size": args.batch_size, "distance": args.distance,
              "pairing": args.pairing, "normalize": None if is_text(f) else normalize,
              "progress": not args.no_progress}
    layers = layer_patterns(args)
    table = id_columns(source)
    metrics: list[tuple[str, Any]] = [("f", str(args.model)), ("g", str(args.reference)),
                                      ("examples", len(table["id"]))]
    if layers is None:
        result = sslmem(f, g, source, **common)
        table.update(sslmem=result["raw"], sslmem_normalized=result["normalized"],
                     loss_f=result["loss_f"], loss_g=result["loss_g"])
        metrics.append(("SSLMem mean", float(result["raw"].mean())))
        plotted, title = result["raw"], "SSLMem"
    else:
        result = layermem(f, g, source, layers=layers, **common)
        for j, name in enumerate(result["layers"]):
            table[f"{name}_layermem"] = result["raw"][:, j]
            table[f"{name}_layermem_normalized"] = result["normalized"][:, j]
            table[f"{name}_delta"] = result["delta_raw"][:, j]
            table[f"{name}_delta_normalized"] = result["delta"][:, j]
            metrics.append((f"LayerMem {name}: mean", float(result["raw"][:, j].mean())))
        plotted, title = result["raw"][:, -1], "LayerMem"
    text = ("SSLMem / LayerMem (Wang et al., ICLR 2024 / NeurIPS 2024): the alignment loss of "
            "g (trained without the example) minus that of f (trained with it) on pairs of "
            "views; higher = more memorized by f. One row per example.")
    folder = write_results(args.out, title, text, table, metrics,
                           figures=lambda d: [histogram(d, "layermem.png", plotted,
                                                        f"{title} (last layer)")])
    print_metrics(metrics, folder)
    return 0


def _clipmem(args: argparse.Namespace, f: Any, g: Any) -> int:
    from memjax.memorization import clipmem

    if f.kind != "clip" or g.kind != "clip":
        raise InputError(f"memjax memorization clipmem needs two CLIP models; --model is a "
                         f"{f.kind!r} and --reference a {g.kind!r} model")
    source, normalize = _open(args, f, args.data, "--data")
    result = clipmem(f, g, source, views_fn=view_function(args, f.tower("image")),
                     n_aug=args.n_aug, seed=args.seed, batch_size=args.batch_size,
                     normalize=normalize, progress=not args.no_progress)
    table = {**id_columns(source), "clipmem": result["raw"],
             "clipmem_normalized": result["normalized"], "align_f": result["align_f"],
             "align_g": result["align_g"]}
    metrics = [("f", str(args.model)), ("g", str(args.reference)),
               ("pairs", len(result["raw"])), ("CLIPMem mean", float(result["raw"].mean()))]
    text = ("CLIPMem (Wang et al., ICLR 2025): the image-caption alignment of f (trained with "
            "the pair) minus that of g (trained without), averaged over augmented views of "
            "the image; higher = more memorized by f. One row per pair.")
    folder = write_results(args.out, "CLIPMem", text, table, metrics,
                           figures=lambda d: [histogram(d, "clipmem.png", result["raw"],
                                                        "CLIPMem")])
    print_metrics(metrics, folder)
    return 0


# ---- déjà vu --------------------------------------------------------------------------

DEJAVU_ARRAYS = ("target", "reference", "reference_probs", "public", "target_public",
                 "reference_public", "public_labels", "labels")


def _dejavu_command(args: argparse.Namespace) -> int:
    """Déjà vu label inference (Meehan et al. 2023) on crop embeddings: from an .npz, or
    computed from --model / --reference on --images (or --boxes) and --public."""
    if args.embeddings is not None:
        if args.model is not None:
            raise InputError("pass --embeddings (precomputed) or --model (compute them), "
                             "not both")
        arrays, ids = _read_embeddings(args.embeddings), None
    elif args.model is not None:
        arrays, ids = _embed_from_models(args)
        if args.save_embeddings:
            np.savez(args.save_embeddings, **arrays)
    else:
        raise InputError("memjax memorization dejavu needs --embeddings (an .npz of the "
                         f"arrays {', '.join(DEJAVU_ARRAYS)}) or --model with --reference, "
                         "--images (or --boxes) and --public")
    return _dejavu_results(args, arrays, ids)


def _read_embeddings(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as error:
        raise InputError(f"--embeddings {path}: cannot read an .npz ({error})") from None
    unknown = sorted(set(arrays) - set(DEJAVU_ARRAYS))
    missing = [name for name in ("target", "public_labels", "labels") if name not in arrays]
    if unknown or missing:
        raise InputError(f"--embeddings {path}: missing {missing}, unknown "
                         f"{unknown}; expected arrays among {list(DEJAVU_ARRAYS)}")
    if "public" not in arrays and not {"target_public", "reference_public"} <= set(arrays):
        raise InputError(f"--embeddings {path}: expected 'public' [P, D] or both "
                         "'target_public' and 'reference_public'")
    return arrays


def _dejavu_results(args: argparse.Namespace, arrays: dict[str, np.ndarray],
                    ids: np.ndarray | None) -> int:
    from memjax.memorization import dejavu

    public = arrays["public"] if "public" in arrays else (arrays["target_public"],
                                                          arrays["reference_public"])
    result = dejavu(arrays["target"], arrays.get("reference"), public, arrays["public_labels"],
                    arrays["labels"], k=args.k, metric=args.metric,
                    reference_probs=arrays.get("reference_probs"))
    labels = np.asarray(arrays["labels"])
    table = {"id": np.arange(len(labels)) if ids is None else ids, "label": labels}
    for model in ("target", "reference"):
        table[f"{model}_top1"] = np.asarray(result[model]["pred_top1"])
        table[f"{model}_confidence"] = np.asarray(result[model]["confidence"])
    metrics: list[tuple[str, Any]] = [("k", args.k), ("metric", args.metric),
                                      ("queries", len(labels))]
    for j, fraction in enumerate(np.asarray(result["fractions"])):
        for model in ("target", "reference"):
            for top in ("top1", "top5"):
                metrics.append((f"most confident {fraction:.0%}: {model} {top} accuracy",
                                float(result[model][top][j])))
        for top in ("top1", "top5"):
            metrics.append((f"most confident {fraction:.0%}: {top} gap",
                            float(result["gap"][top][j])))
        print(f"most confident {fraction:.0%}: top-1 target {result['target']['top1'][j]:.3f} "
              f"reference {result['reference']['top1'][j]:.3f} gap "
              f"{result['gap']['top1'][j]:+.3f}; top-5 gap {result['gap']['top5'][j]:+.3f}")
    text = ("Déjà vu (Meehan et al., NeurIPS 2023): the label of each training image "
            "inferred from its crop by the k nearest public neighbours, for the target and "
            "the reference model; gap = target - reference accuracy among the most "
            "confident queries (higher = more memorized). One row per query.")
    fractions = np.asarray(result["fractions"])
    folder = write_results(args.out, "Déjà vu", text, table, metrics,
                           figures=lambda d: [_dejavu_figure(d, fractions, result)])
    print_metrics(metrics, folder)
    return 0


def _dejavu_figure(folder: Path, fractions: np.ndarray, result: dict) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for model in ("target", "reference"):
        ax.plot(fractions, result[model]["top1"], marker="o", label=model)
    ax.set_xlabel("fraction of most confident queries")
    ax.set_ylabel("top-1 accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "dejavu.png", dpi=100)
    plt.close(fig)
    return "dejavu.png", "top-1 label inference accuracy by confidence"


def _embed_from_models(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The arrays of an --embeddings .npz, computed: crops of the queries and the public
    images embedded by the target and the reference model."""
    from memjax.convert import load

    if args.reference is None or args.public is None:
        raise InputError("memjax memorization dejavu --model needs --reference (a model not "
                         "trained on the images) and --public (public labelled images)")
    if (args.images is None) == (args.boxes is None):
        raise InputError("memjax memorization dejavu --model needs exactly one of --images "
                         "(cropped by --crop) and --boxes (background crops of the boxed "
                         "images)")
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="memjax-dejavu-") as scratch:
        if args.boxes is not None:
            queries, labels = _background_crops(args.boxes, Path(scratch))
            crop = "none"
        else:
            queries, labels, crop = args.images, None, args.crop
        for role, folder in (("target", args.model), ("reference", args.reference)):
            model = load(folder)
            encoder = model.tower("image") if model.kind == "clip" else model
            query, ids, query_labels = _embed(args, model, encoder, queries, crop, "--images")
            public, _, public_labels = _embed(args, model, encoder, args.public, "none",
                                              "--public")
            arrays[role], arrays[f"{role}_public"] = query, public
        arrays["public_labels"] = public_labels
        arrays["labels"] = query_labels if labels is None else labels
    if arrays["labels"] is None or arrays["public_labels"] is None:
        raise InputError("dejavu: the query and public images need labels (a 'label' field, "
                         "e.g. images:DIR with one folder per class, or --boxes rows)")
    return arrays, ids


def _embed(args, model, encoder, spec: str, crop: str, what: str):
    from memjax.memorization import crop_embeddings

    source, normalize = _open(args, model, spec, what, fields=("image",))
    out = crop_embeddings(encoder, source, crop=crop, fraction=args.crop_fraction,
                          layer=args.layer, normalize=normalize, batch_size=args.batch_size,
                          progress=not args.no_progress)
    fields = source.read(np.arange(len(source)))
    labels = np.asarray(fields["label"]) if "label" in fields else None
    return out["embedding"], out["id"], labels


def read_boxes(path: str) -> list[dict[str, Any]]:
    """The rows of a --boxes file: ``[{"image": Path, "label": int, "boxes": [K, 4]}]`` in
    file order (CSV rows of one image are merged; a row with empty coordinates is an image
    with no box)."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise InputError(f"--boxes {path}: cannot read ({error})") from None
    rows: dict[str, dict[str, Any]] = {}
    if file.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"--boxes {path}: not valid JSON ({error})") from None
        if not isinstance(entries, list):
            raise InputError(f"--boxes {path}: expected a JSON list of {{image, label, boxes}}")
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"image", "label"} <= set(entry):
                raise InputError(f"--boxes {path}: entry {n} needs 'image' and 'label' (and "
                                 "'boxes': [[x0, y0, x1, y1], ...])")
            rows[str(entry["image"])] = {"label": entry["label"],
                                         "boxes": list(entry.get("boxes", []))}
    elif file.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        need = {"image", "label", "x0", "y0", "x1", "y1"}
        if not need <= set(reader.fieldnames or ()):
            raise InputError(f"--boxes {path}: expected the columns {sorted(need)}, got "
                             f"{reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            entry = rows.setdefault(row["image"], {"label": row["label"], "boxes": []})
            coords = [row[c].strip() for c in ("x0", "y0", "x1", "y1")]
            if any(coords):
                try:
                    entry["boxes"].append([float(c) for c in coords])
                except ValueError:
                    raise InputError(f"--boxes {path} line {line}: coordinates {coords} are "
                                     "not numbers") from None
    else:
        raise InputError(f"--boxes {path}: expected a .json or .csv file")
    out = []
    for image, entry in rows.items():
        try:
            label = int(entry["label"])
        except (TypeError, ValueError):
            raise InputError(f"--boxes {path}: image {image}: label {entry['label']!r} is not "
                             "an integer") from None
        location = Path(image) if Path(image).is_absolute() else file.parent / image
        out.append({"image": location, "label": label,
                    "boxes": np.asarray(entry["boxes"], np.float64).reshape(-1, 4)})
    if not out:
        raise InputError(f"--boxes {path}: no images")
    return out


def _background_crops(path: str, scratch: Path) -> tuple[str, np.ndarray]:
    """Cut each boxed image's background (:func:`memjax.memorization.background_box`, in
    the original pixels) and save it losslessly (PNG) to ``scratch``: the folder is then
    opened with each model's own preprocessing. Returns (the images: spec, labels)."""
    from PIL import Image, UnidentifiedImageError

    from memjax.memorization import background_box

    rows = read_boxes(path)
    for n, row in enumerate(rows):
        try:
            with Image.open(row["image"]) as image:
                image = image.convert("RGB")
                top, left, h, w = background_box(row["boxes"], image.height, image.width)
                image.crop((left, top, left + w, top + h)).save(scratch / f"{n:08d}.png")
        except (UnidentifiedImageError, OSError) as error:
            raise InputError(f"--boxes {path}: cannot read image {row['image']}: {error}") \
                from None
        except InputError as error:
            raise InputError(f"--boxes {path}: image {row['image']}: {error}") from None
    return f"images:{scratch}", np.asarray([row["label"] for row in rows], np.int64)
