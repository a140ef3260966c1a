"""MUC unlearning audits on digits over several seeds (issue 17, item 2): EMIA/CMIA of a
SimCLR encoder trained with a forget set (original), one retrained without it, and the
original after a few steps of fine-tuning on the retain set (unlearned).

Run: ``PYTHONPATH=. python -m bench.unlearning_demo [--seeds 0 1 2] [--devices 8]``
(``--devices 8``: the tests' 8 forced CPU devices; the default 1 is the audit's setting);
writes ``bench/results/unlearning_demo.json``: per seed and model the EMIA/CMIA flagged
fractions of the forget set, the EMIA alignment gap (forget - test) and attack accuracy,
and the seconds of training, unlearning and audits.
"""

from __future__ import annotations

import os

from bench.common import demo_arguments, machine_info, write_json


def main() -> None:
    args = demo_arguments(__doc__.split("\n\n")[0], devices=1)
    from memjax.audit.unlearning import MODELS, alignment_gap, unlearning_demo

    rows = []
    for seed in args.seeds:
        result = unlearning_demo(seed)
        row = {"seed": seed, "seconds": dict(result["seconds"])}
        for name in MODELS:
            e, c = result[name]["emia"], result[name]["cmia"]
            row[name] = {"emia_flagged": e.flagged_fraction, "emia_gap": alignment_gap(e),
                         "emia_attack_accuracy": e.attack_accuracy,
                         "cmia_flagged": c.flagged_fraction,
                         "cmia_attack_accuracy": c.attack_accuracy, **c.extra}
        rows.append(row)
        print(seed, {k: v for k, v in row.items() if k != "seed"}, flush=True)
    path = write_json("unlearning_demo", {"machine": machine_info(),
                                          "load_average": os.getloadavg(),
                                          "devices": args.devices, "seeds": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
