"""The audit's image-generator demonstrations over several seeds (issue 16): the digit DDPM's
CDI feature AUCs and dataset inference, and the tiny LlamaGen's IAR feature AUCs and dataset
inference with and without the CFG-difference features.

Run: ``PYTHONPATH=. python -m bench.generators_demo [--seeds 0 1 2] [--devices 8]``
(~1.5 min per seed on 2 cores). ``--devices 8`` forces 8 CPU devices, the tests'
configuration (tests/test_generators_demo.py's margins were measured this way; training is
chaotic in the last bits, so the image-token model trained on 1 device differs slightly).
Writes ``bench/results/generators_demo.json``.
"""

from __future__ import annotations

from bench.common import demo_arguments, machine_info, write_json


def main() -> None:
    args = demo_arguments(__doc__.splitlines()[0], devices=8)
    from memjax.audit.generators import (
        ddpm_demo,
        diffusion_inference,
        feature_aucs,
        iar_demo,
        iar_inference,
    )
    from memjax.mia import smallest_n

    rows = []
    for seed in args.seeds:
        ddpm = ddpm_demo(seed)
        cdi = diffusion_inference(ddpm, 0)
        row = {"seed": seed, "ddpm_train_seconds": ddpm["train_seconds"],
               "ddpm_auc": feature_aucs(ddpm["features"], ddpm["member"],
                                        lower_is_member=True),
               "cdi_p": cdi["members"].p_value,
               "cdi_smallest_n": smallest_n(cdi["members"], 0.01),
               "cdi_false_positive_p": cdi["false_positive"].p_value}
        iar = iar_demo(seed)
        aucs = feature_aucs(iar["features"], iar["member"], lower_is_member=False)
        row["iar_auc"] = aucs
        for label, columns in (("all", tuple(aucs)),
                               ("no_cfg", tuple(k for k in aucs if not k.startswith("cfg_")))):
            di = iar_inference(iar, columns, 0)
            row[f"iar_{label}_p"] = di["members"].p_value
            row[f"iar_{label}_smallest_n"] = smallest_n(di["members"], 0.01)
            row[f"iar_{label}_false_positive_p"] = di["false_positive"].p_value
        print({k: v for k, v in row.items() if not k.endswith("_auc")}, flush=True)
        rows.append(row)
    write_json("generators_demo", {"benchmark": "generators_demo", "devices": args.devices,
                                   "machine": machine_info(), "seeds": rows})


if __name__ == "__main__":
    main()
