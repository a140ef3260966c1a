"""memjax benchmarks: throughput and memory, memjax vs PyTorch peers, JSON results.

Run ``python bench/run_all.py`` (or ``python -m bench.<name>``) from the repo root.

PyTorch runs with its defaults (``OMP_WAIT_POLICY`` unset): its OpenMP threads spin a while
between parallel regions. That is the fastest setting on an idle machine and the worst on
a busy one (bench/README.md, "Noise"), so run the final numbers on an idle machine
(``run_all.py --wait-quiet``) and check the load average recorded with every result.
"""
