"""``memjax clipscore``: CLIPScore (Hessel et al. 2021) of image-caption pairs under a CLIP.

Every pair of a ``pairs:FILE`` (JSONL/CSV/TSV with an image path and a caption per row) is
scored as ``w * max(cos(image, prefix + caption), 0)`` with the model's own image
preprocessing and tokenizer (captions truncated to the model's context, as the reference
code's ``clip.tokenize(..., truncate=True)``; the number cut is reported). Defaults are the
paper's: w = 2.5 and the reference code's caption prefix "A photo depicts "; ``--prefix ''
--weight 100`` gives torchmetrics' CLIPScore. With ``--references pairs:FILE`` (reference
captions, any number per image, matched to the candidates by image file) also
RefCLIPScore, the harmonic mean of CLIPScore and the best reference cosine. Writes
``scores.parquet`` (id, name, clipscore, cosine[, refclipscore, reference_cosine]) and
``metrics.json`` (mean CLIPScore[, mean RefCLIPScore], pairs, w, prefix) beside
``index.html``.
"""

from __future__ import annotations

import argparse

import numpy as np

from memjax.cli._common import (
    add_data_options,
    example_names,
    load_model,
    open_data,
    positive_int,
    positive_number,
    print_metrics,
    results_folder,
    write_results,
)
from memjax.errors import InputError

TITLE = "CLIPScore"


def register(sub) -> None:
    """Add ``memjax clipscore`` to the top-level subcommands."""
    from memjax.mia import CLIPSCORE_PREFIX, CLIPSCORE_WEIGHT

    parser = sub.add_parser(
        "clipscore", help="CLIPScore of image-caption pairs under a CLIP (Hessel et al. 2021)",
        description=" ".join(__doc__.split("\n\n")[1].split()))
    parser.add_argument("--model", required=True, help="CLIP folder (Hugging Face checkpoint "
                        "or memjax convert output, with its preprocessor and tokenizer files)")
    parser.add_argument("--data", required=True, help="the pairs: pairs:FILE (.jsonl, .csv or "
                        ".tsv with image and text columns)")
    parser.add_argument("--references", default=None,
                        help="reference captions for RefCLIPScore: pairs:FILE whose rows show "
                        "the candidates' image files (each image needs at least one)")
    parser.add_argument("--prefix", default=CLIPSCORE_PREFIX,
                        help=f"prepended to every caption (default {CLIPSCORE_PREFIX!r}, the "
                        "reference code's; '' for raw captions)")
    parser.add_argument("--weight", type=positive_number, default=CLIPSCORE_WEIGHT,
                        help=f"w in w * max(cos, 0) (default {CLIPSCORE_WEIGHT:g})")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="pairs per batch (default 64)")
    parser.add_argument("--out", type=results_folder, default="memjax-clipscore",
                        help="results folder (new, empty, or an earlier report to replace)")
    parser.add_argument("--no-progress", action="store_true")
    add_data_options(parser)
    parser.set_defaults(run=cmd_clipscore)


def cmd_clipscore(args: argparse.Namespace) -> int:
    """Score every pair; write the per-pair table and the mean."""
    from memjax.mia import clipscore

    if not args.data.startswith("pairs:"):
        raise InputError(f"--data {args.data!r}: expected image-caption pairs, pairs:FILE "
                         "(a .jsonl, .csv or .tsv file with image and text columns)")
    if args.references is not None and not args.references.startswith("pairs:"):
        raise InputError(f"--references {args.references!r}: expected reference captions, "
                         "pairs:FILE (rows of image and text, matched to --data by image file)")
    model = load_model(args.model, "--model", "clip", "a CLIP model")
    source = open_data(args.data, model, args, prefix=args.prefix)
    references = (None if args.references is None else
                  open_data(args.references, model, args, what="--references",
                            prefix=args.prefix))
    result = clipscore(model, source, weight=args.weight, prefix=args.prefix,
                       references=references, batch_size=args.batch_size,
                       progress=not args.no_progress)
    scores = result["clipscore"].astype(np.float64)
    table = {"id": result["id"]}
    names = example_names(source)
    if names is not None:
        table["name"] = names[result["id"]]
    table |= {name: result[name] for name in ("clipscore", "cosine", "refclipscore",
                                               "reference_cosine") if name in result}
    metrics = [("mean CLIPScore", float(scores.mean())),
               ("std CLIPScore", float(scores.std())),
               ("pairs", int(scores.size)),
               ("pairs with cosine <= 0 (score 0)", int((result["cosine"] <= 0).sum())),
               ("weight w", float(args.weight)), ("caption prefix", args.prefix),
               ("model", model.name)]
    if references is not None:
        metrics[2:2] = [("mean RefCLIPScore", float(result["refclipscore"].astype(
                            np.float64).mean())),
                        ("reference captions", len(references))]
    text = (f"CLIPScore (Hessel et al. 2021, EMNLP) of each pair: {args.weight:g} · max(cos("
            f"image, {args.prefix!r} + caption), 0) under {model.name}, with the checkpoint's "
            "own image preprocessing and tokenizer. The mean over pairs is the corpus-level "
            "score the paper reports.")
    if references is not None:
        text += (" RefCLIPScore (the paper's Eq. 2): the harmonic mean of CLIPScore and "
                 "max(0, the best cosine between the caption and one of its image's "
                 f"{len(references)} reference captions), references prefixed alike.")
    folder = write_results(args.out, TITLE, text, table, metrics)
    print_metrics(metrics, folder)
    return 0
