"""``memjax memorization``: UnitMem, LayerMem/SSLMem and déjà vu."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from memjax._io import atomic_write_json
from memjax.augment import SimCLRView, SmallImageView
from memjax.errors import InputError


def register(sub: Any) -> None:
    """Add the subcommand and its arguments to the ``memjax`` parser."""
    memorization = sub.add_parser("memorization", help="UnitMem of a memjax.train model, or "
                                  "LayerMem/SSLMem of f (--model) against g (--reference)")
    memorization.add_argument("what", choices=["unitmem", "layermem", "dejavu"])
    memorization.add_argument("--model", help="unitmem/layermem, f: a model folder (Hugging "
                              "Face checkpoint, memjax convert output, memjax.train model)")
    memorization.add_argument("--embeddings", help="dejavu: .npz with target [Q, D], reference "
                              "[Q, D'] or reference_probs [Q, C], public [P, D] (or "
                              "target_public and reference_public), public_labels [P], "
                              "labels [Q]")
    memorization.add_argument("--k", type=int, default=100, help="dejavu: neighbours")
    memorization.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    memorization.add_argument("--reference", help="layermem: g, trained without the data")
    memorization.add_argument("--data", default="digits")
    memorization.add_argument("--layers", default="dense1", help="comma-separated activation "
                              "names (memjax.train models: conv1, ..., dense1, ..., embedding; "
                              "ports: their taps, e.g. layers.0.mlp_hidden)")
    memorization.add_argument("--views", default="simclr", choices=sorted(VIEWS),
                              help="augmentation: simclr (SimCLR's views) or small (mild "
                              "crops and brightness/contrast, for images of a few pixels)")
    memorization.add_argument("--seed", type=int, default=0, help="view seed")
    memorization.add_argument("--n-aug", type=int, default=5)
    memorization.add_argument("--out", required=True, help="unitmem, dejavu: .json; layermem: "
                              ".parquet")
    memorization.add_argument("--batch-size", type=int, default=64)
    memorization.add_argument("--no-progress", action="store_true")
    memorization.set_defaults(run=cmd_memorization)


#: The view functions ``--views`` names: SimCLR's views (crops down to 8% of the area,
#: flips, colour jitter, grayscale), or the milder ones for images of a few pixels (crops of
#: at least half the area, brightness/contrast jitter; the audit's 8×8 digits).
VIEWS = {"simclr": SimCLRView(), "small": SmallImageView()}


def cmd_memorization(args: argparse.Namespace) -> int:
    """UnitMem of one model, or SSLMem/LayerMem of two (f, g); any model folder."""
    from memjax.convert import load
    from memjax.data import open_source
    from memjax.engine.store import write_parquet
    from memjax.memorization import layermem, unitmem

    if args.what == "dejavu":
        return _dejavu_command(args)
    if args.model is None:
        raise InputError(f"memjax memorization {args.what} needs --model (f: a model folder)")
    source = open_source(args.data)
    layers = tuple(args.layers.split(","))
    f = load(args.model)
    views = VIEWS[args.views]
    if args.what == "unitmem":
        result = unitmem(f, source, layers=layers, n_aug=args.n_aug, views_fn=views,
                         seed=args.seed, batch_size=args.batch_size,
                         progress=not args.no_progress)
        columns = {}
        for name, layer in result.layers.items():
            print(f"UnitMem {name}: {layer.summary}")
            columns[f"{name}_unitmem"] = np.asarray(layer.scores)
            columns[f"{name}_argmax_id"] = np.asarray(layer.argmax_id)
        atomic_write_json(Path(args.out), {k: v.tolist() for k, v in columns.items()})
        print(f"wrote per-unit scores and argmax example ids to {args.out}")
        return 0
    if args.reference is None:
        raise InputError("memjax memorization layermem needs --reference (g: the same "
                         "architecture trained without the scored examples)")
    g = load(args.reference)
    result = layermem(f, g, source, views_fn=views, seed=args.seed, n_aug=args.n_aug,
                      layers=layers, batch_size=args.batch_size,
                      progress=not args.no_progress)
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
    from memjax.memorization import dejavu

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
    atomic_write_json(Path(args.out), payload)
    print(f"wrote the déjà vu accuracies and gaps to {args.out}")
    return 0
