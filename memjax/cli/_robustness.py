"""``memjax robustness``: adversarial robustness of an image encoder (embedding-space PGD and
downstream PGD through a linear head; Kowalczuk et al. 2024, see memjax.robustness).

Images are read in pixel units [0, 1] (a checkpoint's own resize/crop/rescale, WITHOUT its
mean/std normalisation, which the attacked forward applies itself); arrays (``digits``,
.npz, .npy folders) are taken as given and refused when outside [0, 1]. ``--epsilon`` takes
radii like ``8/255``. Writes ``scores.parquet`` (per example: ``shift_l2``,
``shift_cosine`` and, with a head, ``clean_correct`` and ``adv_correct``, one entry per ε),
``metrics.json`` (robust accuracy and mean embedding shift per ε) and, with
``--fit-head``, the fitted probe as ``head.npz`` (weight [D, C], bias [C]).
"""

from __future__ import annotations

import argparse
import dataclasses
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from memjax.cli._common import (
    id_columns,
    positive_int,
    print_metrics,
    results_folder,
    write_results,
)
from memjax.errors import InputError

TITLE = "Adversarial robustness of an image encoder (PGD)"
KINDS = ("encoder", "classifier", "clip")


def register(sub: Any) -> None:
    """Add ``memjax robustness`` to the top-level subcommands."""
    parser = sub.add_parser(
        "robustness", help="adversarial robustness of encoders (embedding-space and "
        "downstream PGD)", description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--model", required=True, help="model folder: an image encoder, a "
                        "classifier (with --layer) or a CLIP (its image tower)")
    parser.add_argument("--data", required=True, help="images to attack (images:FOLDER, "
                        "digits, .npz, ...; a 'label' field for the downstream attack)")
    parser.add_argument("--layer", default=None, help="the representation tap (e.g. pooled, "
                        "final, dense1); default: the model's output")
    parser.add_argument("--epsilon", nargs="+", type=radius, default=[Fraction(8, 255)],
                        help="L∞ radii in [0, 1] pixel units, e.g. 0 2/255 8/255 "
                        "(default 8/255)")
    parser.add_argument("--steps", type=positive_int, default=10, help="PGD steps (default 10)")
    parser.add_argument("--step-size", type=radius, default=None,
                        help="α in pixel units (default 2.5 ε / steps per ε)")
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--head", default=None, help=".npz with a linear head: weight [D, C], "
                       "bias [C]")
    heads.add_argument("--fit-head", action="store_true", help="fit a linear probe on "
                       "--fit-data (default --data) and attack it")
    parser.add_argument("--fit-data", default=None, help="labelled images for --fit-head")
    parser.add_argument("--l2", type=float, default=1e-3, help="probe ridge (default 1e-3)")
    parser.add_argument("--normalize", choices=("model", "none"), default="model",
                        help="mean/std inside the forward: the checkpoint's own (default) "
                        "or none")
    parser.add_argument("--seed", type=int, default=0, help="keys the random starts")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--out", type=results_folder, default="memjax-robustness",
                        help="results folder (new, empty, or an earlier report to replace)")
    parser.set_defaults(run=cmd_robustness)


def radius(text: str) -> Fraction:
    """argparse type: a number >= 0 written as a decimal or a fraction (``8/255``)."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 such as 8/255 or 0.03, "
                                         f"got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _load(folder: str) -> Any:
    from memjax.convert import load

    try:
        model = load(folder)
    except InputError as error:
        raise InputError(f"--model: {error}") from None
    if model.kind not in KINDS:
        raise InputError(f"--model {folder!r}: {model.name} is a {model.kind!r} model; "
                         "expected an image encoder, classifier or CLIP")
    if model.kind == "clip":
        model = model.tower("image")
    return model


def _pixel_transform(model: Any, flag: str) -> Any:
    """The checkpoint's preprocessing without its normalisation: uint8 -> [0, 1] pixels."""
    from memjax.data import ImageProcessor

    if model.preprocess is None:
        return None
    try:
        processor = ImageProcessor.from_config(model.preprocess)
    except InputError as error:
        raise InputError(f"--model: {error}") from None
    if not processor.do_rescale or not np.isclose(processor.rescale_factor, 1 / 255):
        raise InputError(f"{flag}: the checkpoint's preprocessing does not rescale pixels to "
                         "[0, 1] (rescale_factor 1/255), the units of --epsilon")
    return dataclasses.replace(processor, do_normalize=False, image_mean=None, image_std=None)


def _open(spec: str, model: Any, flag: str) -> Any:
    from memjax.data import open_source

    try:
        return open_source(spec, model=model, image_transform=_pixel_transform(model, flag))
    except InputError as error:
        raise InputError(f"{flag}: {error}") from None


def _read_head(path: str) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise InputError(f"--head {path!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            head = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as error:
        raise InputError(f"--head {path!r}: not a readable .npz file ({error})") from None
    if not {"weight", "bias"} <= set(head):
        raise InputError(f"--head {path!r}: expected arrays 'weight' [D, C] and 'bias' [C], "
                         f"got {sorted(head)}")
    return head


def _fit_head(model: Any, args: argparse.Namespace, normalize: Any) -> dict[str, np.ndarray]:
    from memjax.robustness import encode_images, fit_linear_probe, image_encoder

    flag = "--fit-data" if args.fit_data else "--data"
    source = _open(args.fit_data or args.data, model, flag)
    labels = source.read(np.arange(len(source)))
    if "label" not in labels:
        raise InputError(f"{flag}: --fit-head needs a 'label' field; the data has "
                         f"{sorted(labels)}")
    encoder = image_encoder(model, layer=args.layer, normalize=normalize)
    embeddings = encode_images(encoder, model.params, source, batch_size=args.batch_size)
    return fit_linear_probe(embeddings, labels["label"], l2=args.l2)


def _check_encoder(model: Any, args: argparse.Namespace, normalize: Any) -> None:
    from memjax.robustness import image_encoder

    try:
        image_encoder(model, layer=args.layer, normalize=normalize)
    except InputError as error:
        flag = "--layer" if model.kind == "classifier" and args.layer is None else "--model"
        raise InputError(f"{flag}: {error}") from None


def _check_layer(model: Any, source: Any, layer: str | None) -> None:
    import jax

    if layer is None:
        return
    first = source.read(np.zeros(1, dtype=np.int64))
    if "image" not in first:
        raise InputError(f"--data: no 'image' field; the data has {sorted(first)}")
    image = jax.ShapeDtypeStruct(first["image"].shape[1:], np.float32)
    names = model.activation_names(image)
    if layer not in names:
        raise InputError(f"--layer {layer!r}: not a tap of {model.name}; taps: "
                         f"{', '.join(names)}")


def _label(value: Fraction) -> str:
    return str(value) if value.denominator != 1 else str(value.numerator)


def cmd_robustness(args: argparse.Namespace) -> int:
    from memjax.robustness import encoder_robustness

    if args.fit_data and not args.fit_head:
        raise InputError("--fit-data: only used with --fit-head")
    if not (args.l2 >= 0 and np.isfinite(args.l2)):
        raise InputError(f"--l2: expected a number >= 0, got {args.l2}")
    model = _load(args.model)
    normalize = "model" if args.normalize == "model" else None
    _check_encoder(model, args, normalize)
    source = _open(args.data, model, "--data")
    _check_layer(model, source, args.layer)
    head = _read_head(args.head) if args.head else None
    if args.fit_head:
        head = _fit_head(model, args, normalize)
    epsilons = [float(e) for e in args.epsilon]
    step = None if args.step_size is None else float(args.step_size)
    try:
        out = encoder_robustness(model, source, epsilons=epsilons, steps=args.steps,
                                 step_size=step, head=head, seed=args.seed,
                                 batch_size=args.batch_size, layer=args.layer,
                                 normalize=normalize)
    except InputError as error:
        raise InputError(f"--data/--model: {error}") from None
    names = [_label(e) for e in args.epsilon]
    table = {**id_columns(source), "shift_l2": out["shift_l2"],
             "shift_cosine": out["shift_cosine"]}
    metrics: list[tuple[str, Any]] = [("epsilons", ", ".join(names)),
                                      ("steps", args.steps)]
    metrics += [(f"mean_shift_l2 eps={n}", float(v))
                for n, v in zip(names, out["mean_shift_l2"], strict=True)]
    if head is not None:
        table["clean_correct"] = out["clean_correct"]
        table["adv_correct"] = out["adv_correct"]
        metrics.append(("clean_accuracy", out["clean_accuracy"]))
        metrics += [(f"robust_accuracy eps={n}", float(v))
                    for n, v in zip(names, out["robust_accuracy"], strict=True)]

    def files(folder: Path) -> list[tuple[str, str]]:
        if args.fit_head:
            np.savez(folder / "head.npz", **head)
        return []

    text = (f"Embedding-space PGD (maximise ||f(x+δ) − f(x)||₂) and, with a head, downstream "
            f"PGD on {args.model} over {args.data}: L∞ radii {', '.join(names)} in [0, 1] "
            f"pixel units, {args.steps} steps, random starts keyed by seed {args.seed}.")
    folder = write_results(args.out, TITLE, text, table, metrics, figures=files)
    print_metrics(metrics, folder)
    return 0
