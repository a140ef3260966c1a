"""Shared benchmark helpers: thread setup, timing, machine peak and bandwidth, JSON output.

Every benchmark measures the machine's matmul peak and copy bandwidth in the same run as
its rows, because these machines are shared and noisy: a number is only meaningful next
to a peer (a ratio) and next to the peak measured minutes apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cores() -> int:
    """Cores this process may run on (XLA's CPU client sizes its thread pool the same way)."""
    return len(os.sched_getaffinity(0))


def set_torch_threads() -> int:
    """Give PyTorch as many intra-op threads as JAX uses, so the peers get the same cores."""
    import torch

    torch.set_num_threads(cores())
    return torch.get_num_threads()


def summarize(times: list[float]) -> dict[str, float | list[float]]:
    """Median and spread of repeated timings; spread = (max - min) / median."""
    median = statistics.median(times)
    return {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "spread": (max(times) - min(times)) / median if median > 0 else 0.0,
        "times_s": list(times),
    }


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list]:
    """Time each callable ``repeats`` times, round-robin (A B C A B C ...).

    Interleaving spreads slow phases of a shared machine over all peers instead of
    penalising whichever peer happened to run during them. Callables must block until
    their result is ready (``block_until_ready`` / host arrays).
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def measure_matmul_peak(n: int = 2048, repeats: int = 7) -> dict[str, float]:
    """Achievable float32 FLOP/s: an n^3 matmul through JAX and through PyTorch (median).

    ``peak_flops`` is the better of the two: the ceiling either framework can reach here.
    """
    import jax
    import jax.numpy as jnp
    import torch

    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile outside the timing
    ta, tb = torch.from_numpy(a_np), torch.from_numpy(b_np)
    torch.mm(ta, tb)
    times = time_interleaved(
        {"jax": lambda: matmul(a, b).block_until_ready(), "torch": lambda: torch.mm(ta, tb)},
        repeats,
    )
    jax_flops = flops / statistics.median(times["jax"])
    torch_flops = flops / statistics.median(times["torch"])
    return {
        "matmul_n": n,
        "jax_flops": jax_flops,
        "torch_flops": torch_flops,
        "peak_flops": max(jax_flops, torch_flops),
        "jax_spread": summarize(times["jax"])["spread"],
        "torch_spread": summarize(times["torch"])["spread"],
    }


def machine_ceilings(quick: bool) -> dict:
    """Machine info plus the matmul peak and copy bandwidth measured now (see below)."""
    return {
        "info": machine_info(),
        "peak_start": measure_matmul_peak(1024 if quick else 2048),
        "bandwidth": measure_bandwidth(64 if quick else 512),
    }


def finish_ceilings(machine: dict, quick: bool) -> float:
    """Measure the peak again at the end of the run and keep the better median.

    Other jobs come and go within a run; a peak measured during a busy spell would make
    every fraction-of-peak look better than it is. Returns the peak used, in FLOP/s.
    """
    machine["peak_end"] = measure_matmul_peak(1024 if quick else 2048)
    machine["peak_flops"] = max(machine["peak_start"]["peak_flops"],
                                machine["peak_end"]["peak_flops"])
    return machine["peak_flops"]


def measure_bandwidth(mib: int = 512, repeats: int = 7) -> dict[str, float]:
    """Memory bandwidth from a large float32 array copy (bytes read + bytes written).

    Measured with NumPy (one thread) and a jitted JAX copy-and-scale (XLA may use every
    core); ``bandwidth_bytes_per_s`` is the better of the two.
    """
    import jax
    import jax.numpy as jnp

    n = mib * 2**20 // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    x = jnp.asarray(src)
    # A scale, not a plain copy: XLA would alias an identity and move nothing.
    scale = jax.jit(lambda v: v * 2.0)
    scale(x).block_until_ready()
    times = time_interleaved(
        {"numpy": lambda: np.copyto(dst, src), "jax": lambda: scale(x).block_until_ready()},
        repeats,
    )
    moved = 2.0 * n * 4
    numpy_bw = moved / statistics.median(times["numpy"])
    jax_bw = moved / statistics.median(times["jax"])
    return {
        "array_mib": mib,
        "numpy_copy_bytes_per_s": numpy_bw,
        "jax_scale_bytes_per_s": jax_bw,
        "bandwidth_bytes_per_s": max(numpy_bw, jax_bw),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    """What the numbers were measured on: CPU, cores, library versions, date."""
    import jax
    import torch

    return {
        "cpu_model": cpu_model(),
        "cores": cores(),
        "os_cpu_count": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", "unknown"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
    }


def memory_analysis(compiled) -> dict[str, int]:
    """XLA's memory plan of a compiled function (bytes): temp, argument, output, alias and
    total = temp + argument + output - alias."""
    stats = compiled.memory_analysis()
    out = {k: int(getattr(stats, f"{k}_size_in_bytes"))
           for k in ("temp", "argument", "output", "alias")}
    out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    return out


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak RSS since start or since the last :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_kib("VmHWM") * 1024


def ru_maxrss_bytes() -> int:
    """``getrusage`` peak RSS. Not reliably reset by :func:`reset_peak_rss`: Linux folds
    the high-water mark into it whenever a thread exits, so it may keep an earlier peak
    (e.g. the compiler's)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark ``VmHWM`` (Linux >= 4.0); False if refused.

    Lets a worker drop the peak left by JAX's compiler before the run it measures.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def demo_arguments(description: str, *, devices: int | None = 8,
                   configure: Callable[[argparse.ArgumentParser], None] | None = None,
                   ) -> argparse.Namespace:
    """Parse a seed demo's ``--seeds`` (default 0 1 2) and ``--devices``, then fix JAX's CPU
    device count; call before anything starts a JAX backend (the count is fixed then).

    ``devices``: the default device count (the tests force 8; None = JAX's own default).
    ``configure``: adds the script's own options to the parser.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--devices", type=int, default=devices,
                        help=f"forced CPU devices (the tests use 8; default {devices})")
    if configure is not None:
        configure(parser)
    args = parser.parse_args()
    if args.devices:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax

        jax.config.update("jax_num_cpu_devices", args.devices)
    return args


def result_name(name: str, quick: bool) -> str:
    """``name``, or ``name_quick`` for --quick runs, so they never overwrite real results."""
    return f"{name}_quick" if quick else name


def write_json(name: str, payload: dict) -> Path:
    """Write ``bench/results/<name>.json`` and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
