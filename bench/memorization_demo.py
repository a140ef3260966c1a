"""Memorization findings on digits over several seeds (issue 6): SSLMem / LayerMem /
UnitMem of SimCLR encoders f (with a candidate set) and g (without, same initialisation),
and CLIPMem of tiny CLIPs with mis-captioned pairs.

Run: ``PYTHONPATH=. python -m bench.memorization_demo [--seeds 0 1 2] [--encoder cnn]
[--no-clipmem]`` (~3 min per seed on 2 cores): both atypical settings (inverted-intensity
outliers, the audit's and the tests' setting; a class only the candidates contain) and
CLIPMem, per seed; writes ``bench/results/memorization_demo_<encoder>.json``. Summary in
bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.common import machine_info, write_json
from memjax.audit.memorization import (
    CNN_ENCODER,
    ENCODER,
    clipmem_demo,
    run_memorization_demo,
    top_fraction,
    unit_enrichment,
)
from memjax.metrics import auc_confidence_interval, roc_auc


def _auroc(scores: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    low, high = auc_confidence_interval(scores, positive)
    return {"auroc": roc_auc(scores, positive), "low": low, "high": high}


def simclr_row(seed: int, setting: str, encoder=ENCODER) -> dict:
    """LayerMem per layer (means, AUROC atypical vs typical) and UnitMem enrichment."""
    start = time.perf_counter()
    result = run_memorization_demo(seed, setting=setting, encoder=encoder)
    per_layer = result["layermem"]
    atypical = result["splits"]["outlier"][result["rows"]]
    layers = {}
    for j, name in enumerate(per_layer["layers"]):
        raw = per_layer["raw"][:, j]
        layers[name] = {"mean": float(raw.mean()), "atypical": float(raw[atypical].mean()),
                        "typical": float(raw[~atypical].mean()), **_auroc(raw, atypical)}
    units = {name: {"summary": layer.summary,
                    "top10_atypical": float(result["splits"]["outlier"][result["train_rows"]][
                        layer.argmax[np.argsort(-layer.scores, kind="stable")[:10]]].mean())}
             for name, layer in result["unitmem"].layers.items()}
    return {"seed": seed, "setting": setting, "encoder": encoder.describe(),
            "train_seconds": result["seconds"],
            "layermem": layers, "unitmem": units, "enrichment": unit_enrichment(result),
            "seconds": time.perf_counter() - start}


def clip_row(seed: int) -> dict:
    out = clipmem_demo(seed)
    score, bad = out["clipmem"], out["miscaptioned"]
    return {"seed": seed, **_auroc(score, bad), "top_fraction": top_fraction(score, bad),
            "base_rate": float(bad.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--encoder", choices=["resnet", "cnn"], default="resnet",
                        help="the small ResNet (the audit's) or the plain CNN of the same "
                        "widths; writes memorization_demo_<encoder>.json")
    parser.add_argument("--no-clipmem", action="store_true", help="SimCLR rows only")
    args = parser.parse_args()
    encoder = ENCODER if args.encoder == "resnet" else CNN_ENCODER
    rows, clips = [], []
    for seed in args.seeds:
        for setting in ("inverted", "rare"):
            row = simclr_row(seed, setting, encoder)
            rows.append(row)
            means = " ".join(f"{n} {v['mean']:+.4f}" for n, v in row["layermem"].items())
            aucs = " ".join(f"{n} {v['auroc']:.3f}" for n, v in row["layermem"].items())
            e = row["enrichment"]
            print(f"seed {seed} {setting}: LayerMem {means}; AUROC {aucs}; top-10 units "
                  f"atypical {e['hits']}/{e['units']} (base {e['base_rate']:.3f}, all units "
                  f"{e['all_units_fraction']:.2f})", flush=True)
        if args.no_clipmem:
            continue
        clips.append(clip_row(seed))
        c = clips[-1]
        print(f"seed {seed} CLIPMem AUROC {c['auroc']:.3f} [{c['low']:.3f}, {c['high']:.3f}]; "
              f"top-30 {c['top_fraction']:.2f} (base {c['base_rate']:.2f})", flush=True)
    path = write_json(f"memorization_demo_{args.encoder}",
                      {"machine": machine_info(), "load_average": os.getloadavg(),
                       "simclr": rows, "clipmem": clips})
    print("wrote", path)


if __name__ == "__main__":
    main()
