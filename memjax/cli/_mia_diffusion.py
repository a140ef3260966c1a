"""``memjax mia diffusion``: per-example membership features of a diffusion model.

Writes ``scores.parquet`` (one row per example: id, name when the data has names, and
every feature column of :func:`memjax.mia.diffusion_features`) beside ``metrics.json`` and
``index.html``. The features are CDI's inputs (Dubiński et al. 2025): dataset inference
runs on the table afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from memjax.errors import InputError

TITLE = "Diffusion membership features"
SCHEDULER_FILE = "scheduler_config.json"


def register(attacks: Any) -> None:
    """Add ``memjax mia diffusion`` to ``memjax mia``'s subcommands."""
    from memjax.cli._common import positive_int, results_folder
    from memjax.mia import DIFFUSION_FEATURES, PIXEL_RANGES

    cmd = attacks.add_parser(
        "diffusion", help="a diffusion model on images: denoising losses, SecMI, PIA/PIAN, "
        "gradient-masked loss, noise optimisation (CDI's features)",
        description=__doc__.split("\n\n")[0])
    cmd.add_argument("--model", required=True, help="diffusion model folder (an ε-predictor: "
                     "memjax convert output of a diffusers UNet2DModel or DiT)")
    cmd.add_argument("--data", required=True, help="images: PATH.npz/.npy/FOLDER of arrays "
                     "with an image field [N, H, W, C], images:FOLDER, ...")
    cmd.add_argument("--scheduler", help=f"diffusers {SCHEDULER_FILE} (or the folder holding "
                     f"it); default: the model folder's, or its sibling scheduler/ folder's")
    cmd.add_argument("--vae", help="VAE folder (latent diffusion): features on its latents")
    cmd.add_argument("--vae-scaling", type=float, default=None,
                     help="latent scaling factor (default: the VAE config's scaling_factor)")
    cmd.add_argument("--image-field", default="image", help="the image field (default image)")
    cmd.add_argument("--labels-field", default="label", help="the class label field read by "
                     "class-conditional models (default label)")
    cmd.add_argument("--pixel-range", choices=PIXEL_RANGES, default="auto",
                     help="auto: uint8 [0, 255] or floats [0, 1]; signed: floats in [-1, 1]")
    cmd.add_argument("--features", nargs="+", choices=DIFFUSION_FEATURES,
                     default=list(DIFFUSION_FEATURES),
                     help="features to compute (default: all)")
    cmd.add_argument("--timesteps", nargs="+", type=int, default=[100],
                     help="timesteps of the denoising and gradient-masked losses")
    cmd.add_argument("--noise-draws", type=positive_int, default=4,
                     help="noise draws K per timestep of the denoising loss (default 4)")
    cmd.add_argument("--secmi-t", type=int, default=100, help="SecMI's t (default 100)")
    cmd.add_argument("--pia-t", type=int, default=200, help="PIA's t (default 200)")
    cmd.add_argument("--seed", type=int, default=0, help="keys every example's noise")
    cmd.add_argument("--out", type=results_folder, default="memjax-mia-diffusion",
                     help="results folder (new, empty, or an earlier report to replace)")
    cmd.add_argument("--batch-size", type=positive_int, default=32,
                     help="examples per batch (default 32)")
    cmd.add_argument("--no-progress", action="store_true")
    cmd.set_defaults(run=cmd_diffusion)


def scheduler_path(scheduler: str | None, model_folder: str) -> Path:
    """The scheduler config to read: ``--scheduler`` (a file or a folder holding
    scheduler_config.json), else the model folder's, its ``scheduler/`` (a pipeline
    folder) or its sibling ``scheduler/``'s."""
    if scheduler is not None:
        path = Path(scheduler)
        if path.is_dir():
            path = path / SCHEDULER_FILE
        if not path.is_file():
            raise InputError(f"--scheduler {scheduler!r}: no such file: {path}")
        return path
    model = Path(model_folder)
    for candidate in (model / SCHEDULER_FILE, model / "scheduler" / SCHEDULER_FILE,
                      model.parent / "scheduler" / SCHEDULER_FILE):
        if candidate.is_file():
            return candidate
    raise InputError(f"--scheduler: none given and no {SCHEDULER_FILE} in {model} or "
                     f"{model.parent / 'scheduler'}; pass the model's scheduler config")


def read_schedule(path: Path):
    from memjax.signals import schedule_from_config

    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"--scheduler {str(path)!r}: not valid JSON ({error})") from None
    try:
        return schedule_from_config(config)
    except InputError as error:
        raise InputError(f"--scheduler {str(path)!r}: {error}") from None


def cmd_diffusion(args: argparse.Namespace) -> int:
    from memjax.cli._common import (
        example_names,
        load_model,
        open_data,
        print_metrics,
        write_results,
    )
    from memjax.convert import pipeline_component
    from memjax.mia import diffusion_features

    schedule = read_schedule(scheduler_path(args.scheduler, args.model))
    model = load_model(args.model, "--model", "diffusion")
    vae_folder = args.vae
    if vae_folder is None and pipeline_component(args.model, "vae") is not None:
        # A latent-diffusion pipeline folder: its denoiser works on its VAE's latents.
        vae_folder = str(pipeline_component(args.model, "vae"))
        print(f"memjax: using the pipeline's VAE {vae_folder}", file=sys.stderr)
    vae = None if vae_folder is None else load_model(vae_folder, "--vae", "vae")
    source = open_data(args.data, model, args)
    features = diffusion_features(
        model, source, schedule=schedule, features=args.features, timesteps=args.timesteps,
        noise_draws=args.noise_draws, seed=args.seed, vae=vae, vae_scaling=args.vae_scaling,
        image_field=args.image_field, label_field=args.labels_field,
        pixel_range=args.pixel_range, secmi_t=args.secmi_t, pia_t=args.pia_t,
        batch_size=args.batch_size, progress=not args.no_progress)
    table = {"id": features["id"]}
    names = example_names(source)
    if names is not None:
        table["name"] = names
    columns = [c for c in features if c != "id"]
    table.update({c: features[c] for c in columns})
    metrics: list[tuple[str, Any]] = [("model", model.name), ("examples", len(source)),
                                      ("schedule", schedule.name)]
    metrics += [(f"mean {c}", float(features[c].mean())) for c in columns]
    text = ("Per-example membership features of a diffusion model (raw values; CDI's "
            "dataset inference learns each one's direction): denoising losses (mean over K "
            "noise draws), SecMI's t-error "
            "(Duan et al. 2023), PIA/PIAN (Kong et al. 2024), CDI's gradient-masked loss and "
            "noise optimisation (Dubiński et al. 2025). Noise is keyed by example id.")
    folder = write_results(args.out, TITLE, text, table, metrics)
    print_metrics(metrics, folder)
    return 0
