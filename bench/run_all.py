"""Run every benchmark, then summarise: ``python bench/run_all.py [--quick]``.

Each benchmark runs in its own process (fresh JAX and PyTorch state, memory that does not
carry over) and writes ``bench/results/<name>.json``; this script adds
``bench/results/run_all.json`` (machine, wall time per benchmark) and
``bench/results/summary.md`` (the tables quoted in bench/README.md). ``--quick`` runs write
``*_quick.json`` / ``summary_quick.md`` instead, so they never overwrite real results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/run_all.py` puts bench/, not the repo, first
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402

BENCHMARKS = ("classification_throughput", "token_signals", "vit_components",
              "engine_overhead", "data_throughput", "checkpoint_load", "clip_csa",
              "attention_cpu", "llm_scoring", "diffusion_features")


def wait_until_quiet(max_wait_s: float, load: float = 1.0) -> float:
    """Wait (up to ``max_wait_s``) for the 1-minute load average to fall below ``load``.

    A shared machine's other jobs add noise the interleaved timing can only partly cancel.
    Returns the load average when it starts.
    """
    deadline = time.monotonic() + max_wait_s
    while os.getloadavg()[0] >= load and time.monotonic() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def run_benchmark(name: str, quick: bool) -> float:
    """Run ``python -m bench.<name>`` from the repo root; returns its wall time in seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.perf_counter() - start


def _g(x: float) -> str:
    """Compact number: 3 significant digits, thousands separated."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def classification_table(result: dict) -> str:
    lines = [
        "| model | row | examples/s | × torch batched | GFLOP/s | % of peak | spread |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model in result["models"]:
        for row, r in model["rows"].items():
            lines.append(
                f"| {model['model']} | {row} | {_g(r['examples_per_s'])} | "
                f"{r['ratio_vs_torch_batched']:.2f} | {r['flops_per_s'] / 1e9:.2f} | "
                f"{100 * r['fraction_of_peak']:.2f} | {100 * r['spread']:.0f}% |"
            )
    lines += ["", "| model | N | batch | MFLOP/example | memjax / torch batched (paired) | "
              "goal ≥1.5× | engine overhead ms/batch | memjax time / raw jit (paired) | "
              "memjax time / floor |",
              "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for m in result["models"]:
        lines.append(
            f"| {m['model']} | {m['n_examples']} | {m['batch_size']} | "
            f"{m['flops_per_example'] / 1e6:.3g} | {m['memjax_over_torch_batched']:.2f} "
            f"({m['memjax_over_torch_batched_paired_median']:.2f}) | "
            f"{'met' if m['goal_1p5x_met'] else 'not met'} | "
            f"{m['engine_overhead_per_batch_ms']:.2f} | "
            f"{m['memjax_time_over_raw_jit_paired_median']:.2f} | "
            f"{m['memjax_time_over_floor']:.1f} |"
        )
    return "\n".join(lines)


def token_table(result: dict) -> str:
    memory = {(m["variant"], m["batch"]): m for m in result["memory"]}
    lines = [
        "| B | variant | time ms | × jax naive | % of peak | time / floor | spread | "
        "peak RSS MiB | XLA temp MiB | XLA temp+arg+out MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for timing in result["timing"]:
        b = timing["batch"]
        for name, r in timing["rows"].items():
            m = memory.get((name, b))  # diagnostic rows are timed only
            xla = m["xla_memory"] if m else None
            rss = f"{m['peak_rss_delta_bytes'] / 2**20:,.0f}" if m else "–"
            lines.append(
                f"| {b} | {name} | {r['median_s'] * 1e3:,.0f} | {r['time_over_jax_naive']:.2f} | "
                f"{100 * r['fraction_of_peak']:.1f} | {r['time_over_floor']:.2f} | "
                f"{100 * r['spread']:.0f}% | {rss} | "
                + (f"{xla['temp'] / 2**20:,.0f} | {xla['total'] / 2**20:,.0f} |" if xla
                   else "– | – |")
            )
    lines += ["", "| goal check | time × naive | peak RSS × naive | XLA total × naive | "
              "XLA temp × naive | met (RSS) | met (XLA total) |",
              "|---|---:|---:|---:|---:|---|---|"]
    for key, g in result["goals"].items():
        lines.append(
            f"| {key} | {g['time_over_naive']:.2f} | {g['rss_peak_over_naive']:.3f} | "
            f"{g['xla_total_over_naive']:.3f} | {g['xla_temp_over_naive']:.3f} | "
            f"{'yes' if g['met_rss'] else 'no'} | {'yes' if g['met_xla_total'] else 'no'} |"
        )
    return "\n".join(lines)


def components_table(result: dict) -> str:
    lines = ["| op (batch 128) | JAX ms | PyTorch ms | JAX / PyTorch |", "|---|---:|---:|---:|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['jax_ms']:.2f} | {r['torch_ms']:.2f} | "
                     f"{r['jax_over_torch']:.2f} |")
    block = result["block_sum_ms"]
    lines.append(f"| one block (sum) | {block['jax']:.1f} | {block['torch']:.1f} | "
                 f"{result['block_jax_over_torch']:.2f} |")
    return "\n".join(lines)


def overhead_table(result: dict) -> str:
    lines = ["| engine step (MLP batch of 256) | µs |", "|---|---:|"]
    lines += [f"| {name} | {us:,.1f} |" for name, us in result["microseconds"].items()]
    return "\n".join(lines)


def machine_line(result: dict) -> str:
    m = result["machine"]
    info = m["info"]
    line = (f"{info['cpu_model']}, {info['cores']} cores, jax {info['jax']}, torch "
            f"{info['torch']} ({info['torch_threads']} threads, OMP_WAIT_POLICY "
            f"{info.get('omp_wait_policy')}), {info['date']}, load average "
            f"{', '.join(f'{x:.1f}' for x in info['load_average'])}")
    if "peak_start" not in m:
        return line
    line += (f"; matmul peak {m['peak_flops'] / 1e9:.1f} GFLOP/s (start: JAX "
             f"{m['peak_start']['jax_flops'] / 1e9:.1f}, PyTorch "
             f"{m['peak_start']['torch_flops'] / 1e9:.1f}")
    if "peak_end" in m:
        line += (f"; end: JAX {m['peak_end']['jax_flops'] / 1e9:.1f}, PyTorch "
                 f"{m['peak_end']['torch_flops'] / 1e9:.1f}")
    line += ")"
    if "bandwidth" in m:
        line += f", copy bandwidth {m['bandwidth']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s"
    return line


def summary(walls: dict[str, float], quick: bool = False) -> str:
    parts = []
    run_all = common.RESULTS_DIR / f"{common.result_name('run_all', quick)}.json"
    if not walls and run_all.exists():
        walls = json.loads(run_all.read_text())["wall_s"]
    for name, table in (("classification_throughput", classification_table),
                        ("token_signals", token_table), ("vit_components", components_table),
                        ("engine_overhead", overhead_table)):
        if quick and name not in BENCHMARKS[:2]:
            continue  # no quick mode
        path = common.RESULTS_DIR / f"{common.result_name(name, quick)}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        wall = walls.get(name, result.get("wall_s", float("nan")))
        parts += [f"## {name} ({wall:.0f} s)", "", machine_line(result), "", table(result), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for development")
    parser.add_argument("--only", choices=BENCHMARKS, action="append",
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--summarise", action="store_true",
                        help="only rebuild summary.md from existing results")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each benchmark, wait up to SECONDS for load average < 1")
    args = parser.parse_args(argv)
    walls: dict[str, float] = {}
    if not args.summarise:
        common.set_torch_threads()
        info = common.machine_info()
        loads = {}
        # --quick: only the benchmarks with a quick mode (the others would overwrite results).
        default = BENCHMARKS[:2] if args.quick else BENCHMARKS
        for name in args.only or default:
            if args.wait_quiet:
                loads[name] = wait_until_quiet(args.wait_quiet)
            walls[name] = run_benchmark(name, args.quick)
        common.write_json(common.result_name("run_all", args.quick),
                          {"machine": info, "quick": args.quick, "wall_s": walls,
                           "load_average_at_start": loads})
    text = summary(walls, args.quick)
    (common.RESULTS_DIR / f"{common.result_name('summary', args.quick)}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
