"""Memorization measurements on digits (issue 6): SSLMem / LayerMem / UnitMem of SimCLR
encoders f (with a candidate set) and g (without), and CLIPMem of tiny CLIPs.

Run: ``PYTHONPATH=. python -m bench.memorization_demo [--rare | --clipmem]`` (prints the
measurements; ~1 min): inverted-intensity outliers, (``--rare``) a class only the
candidates contain (the audit's setting), or (``--clipmem``) CLIPMem of mis-captioned
pairs. Results in bench/README.md.
"""

from __future__ import annotations

import numpy as np

from memjax.audit_memorization import clipmem_demo, run_memorization_demo
from memjax.metrics import roc_auc


def main() -> None:
    import sys

    from memjax.metrics import auc_confidence_interval

    if "--clipmem" in sys.argv[1:]:
        out = clipmem_demo(0)
        score, bad = out["clipmem"], out["miscaptioned"]
        low, high = auc_confidence_interval(score, bad)
        top = np.argsort(-score)[:int(bad.sum())]
        print(f"CLIPMem AUROC mis-captioned vs others {roc_auc(score, bad):.3f} "
              f"[{low:.3f}, {high:.3f}]; mis-captioned among the top {len(top)}: "
              f"{bad[top].mean():.2f} (base rate {bad.mean():.2f})")
        return
    setting = "rare" if "--rare" in sys.argv[1:] else "inverted"
    result = run_memorization_demo(0, setting=setting)
    print(f"setting: {setting}")
    splits, per_layer = result["splits"], result["layermem"]
    outlier = splits["outlier"][result["rows"]]
    print(f"trained f and g in {result['seconds']:.1f} s (one vmapped program)")
    for j, name in enumerate(per_layer["layers"]):
        raw = per_layer["raw"][:, j]
        low, high = auc_confidence_interval(raw, outlier)
        print(f"LayerMem {name}: mean {raw.mean():+.4f}; outliers {raw[outlier].mean():+.4f} "
              f"vs typical {raw[~outlier].mean():+.4f}; AUROC {roc_auc(raw, outlier):.3f} "
              f"[{low:.3f}, {high:.3f}]")
    base = splits["outlier"][result["train_rows"]].mean()
    for name, layer in result["unitmem"].layers.items():
        top = np.argsort(-layer.scores)[:10]
        hits = splits["outlier"][result["train_rows"][layer.argmax[top]]].mean()
        print(f"UnitMem {name}: {layer.summary}; top-10 units' argmax examples are outliers: "
              f"{hits:.2f} (base rate {base:.3f})")


if __name__ == "__main__":
    main()
