"""The audit's private-prototypes demonstration over several seeds (issue 17, item 4):
DPPL-Mean (clipped sum and CoinPress) and DPPL-Public accuracy and membership AUC per ε on
imbalanced digits.

Run: ``PYTHONPATH=. python -m bench.prototypes_demo [--seeds 0 1 2] [--devices 8]``
(~10 s per seed on 2 cores). ``--devices 8`` forces 8 CPU devices, the tests'
configuration (tests/test_prototypes_demo.py's margins were measured this way).
Writes ``bench/results/prototypes_demo.json``.
"""

from __future__ import annotations

from bench.common import demo_arguments, machine_info, write_json


def main() -> None:
    args = demo_arguments(__doc__.splitlines()[0], devices=8)
    from memjax.audit.prototypes import prototypes_demo

    rows = []
    for seed in args.seeds:
        result = prototypes_demo(seed)
        row = {"seed": seed, "seconds": result["seconds"],
               "train_seconds": result["train_seconds"],
               "private_per_class": result["counts"].tolist()}
        for method in ("mean", "public", "coinpress"):
            row[method] = {key: [None if v == float("inf") else float(v)
                                 for v in result[method][key]]
                           for key in result[method]}
            row[method]["epsilon"] = [str(v) for v in result[method]["epsilon"]]
        print(seed, {m: {"accuracy": [round(a, 3) for a in row[m]["accuracy"]],
                         "auc": [round(a, 3) for a in row[m]["auc"]],
                         "rare_auc": [round(a, 3) for a in row[m]["rare_auc"]]}
                     for m in ("mean", "public", "coinpress")}, flush=True)
        rows.append(row)
    write_json("prototypes_demo", {"benchmark": "prototypes_demo", "devices": args.devices,
                                   "machine": machine_info(), "seeds": rows})


if __name__ == "__main__":
    main()
