"""The robustness audit section's finding on several seeds (the margins the demo test uses).

For each seed: robust accuracy of the digits probe under downstream PGD and the mean
embedding shift under embedding-space PGD at every ε of memjax.audit.robustness, the drop
from ε = 0 to 32/255, and the seconds spent. Writes bench/results/robustness_demo.json.

    PYTHONPATH=. python -m bench.robustness_demo [--seeds 0 1 2] [--devices 8]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.common import demo_arguments


def main() -> None:
    args = demo_arguments(__doc__.splitlines()[0], devices=8, configure=lambda parser:
                          parser.add_argument("--out", default=str(
                              Path(__file__).parent / "results" / "robustness_demo.json")))
    from memjax.audit.robustness import EPSILON_STEPS, robustness_demo

    rows = []
    for seed in args.seeds:
        demo = robustness_demo(seed)
        result = demo["result"]
        accuracy = [round(float(a), 4) for a in result["robust_accuracy"]]
        shift = [round(float(s), 4) for s in result["mean_shift_l2"]]
        rows.append({"seed": seed, "clean_accuracy": round(result["clean_accuracy"], 4),
                     "robust_accuracy": accuracy, "mean_shift_l2": shift,
                     "drop_0_to_32": round(accuracy[0] - accuracy[-1], 4),
                     "min_accuracy_decrease": round(min(
                         a - b for a, b in zip(accuracy, accuracy[1:], strict=False)), 4),
                     "train_seconds": round(demo["train_seconds"], 1),
                     "attack_seconds": round(demo["attack_seconds"], 1)})
        print(json.dumps(rows[-1]))
    out = {"epsilon_over_255": list(EPSILON_STEPS), "devices": args.devices,
           "load_average": os.getloadavg(), "seeds": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
