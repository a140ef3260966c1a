"""The ICL membership demonstration (memjax/audit/icl.py) on several seeds: attack AUC of
the single prompt and of the 16-prompt ensemble, task accuracy on the non-members and the
training time, written to bench/results/icl_demo.json.

Run: ``PYTHONPATH=. python -m bench.icl_demo [--seeds 0 1 2]`` (~20 s per seed on 2
cores; tests/test_icl_demo.py's margins come from the same seeds under 8 CPU devices:
``--devices 8``).
"""

from __future__ import annotations

import json
import time

from bench.common import demo_arguments, machine_info, write_json


def main() -> None:
    args = demo_arguments(__doc__.split("\n\n")[0], devices=None)
    import jax

    from memjax.audit.icl import icl_demo

    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        demo = icl_demo(seed)
        row = {"seed": seed, **demo["metrics"], "train_seconds": demo["train_seconds"],
               "total_seconds": time.perf_counter() - start}
        print(json.dumps(row), flush=True)
        rows.append(row)
    path = write_json("icl_demo", {"machine": machine_info(), "devices": jax.device_count(),
                                   "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
