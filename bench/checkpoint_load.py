"""Checkpoint loading: memjax's lazy (and sharded) load vs ``transformers`` ``from_pretrained``.

A random GPT-2-shaped checkpoint (default: 10 layers of width 1024, vocabulary 8192, about
540 MB of float32) is written locally, straight to safetensors from NumPy (no torch model
is built, nothing is downloaded). Each row then loads it in a fresh process, after the
process has imported its libraries and started its backend; the row reports the wall time
of the load (until every parameter is on its device) and the process's peak RSS increase
during it (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus ``VmRSS``
before the load). The file is in the page cache for every row (written just before, and
read by the warm-up), so these are warm loads; page cache is not RSS.

Rows:

- ``memjax``: ``memjax.convert.load_pretrained(folder)`` on one CPU device: each tensor
  read whole (``pread``, no mmap) and placed, one at a time.
- ``memjax_eager``: what memjax did before the lazy loader: every tensor copied into host
  memory first (``safetensors`` ``get_tensor``), then converted and placed.
- ``memjax_model8``: one process, 8 CPU devices, ``mesh=make_mesh(model=8)``. On CPU the
  8 devices' buffers are this process's memory, so its peak is still the whole model.
- ``memjax_2proc_model8``: two ``jax.distributed`` processes (gloo on 127.0.0.1), 4 CPU
  devices each, the ``model`` axis over all 8: each process reads and holds only its own
  blocks of the sharded parameters (and all of the replicated ones). Time and peak are the
  larger of the two processes'.
- ``transformers``: ``GPT2LMHeadModel.from_pretrained(folder)`` (float32, PyTorch CPU),
  then one element of every 4 KiB page of every parameter read: ``from_pretrained`` may
  hand back views of its mmap of the file, which cost nothing until they are read (a
  forward pass reads them all); mapped file pages count in RSS once read.

Run ``PYTHONPATH=. python -m bench.checkpoint_load [--quick] [--repeats N]``; writes
``bench/results/checkpoint_load.json`` (``checkpoint_load_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

ROWS = ("memjax", "memjax_eager", "memjax_model8", "memjax_2proc_model8", "transformers")


# --------------------------------------------------------------------------- the checkpoint


def gpt2_config(*, n_layer: int, n_embd: int, vocab_size: int, n_positions: int = 64,
                n_head: int = 16) -> dict:
    """A Hugging Face GPT-2 config.json (as ``GPT2Config.to_dict`` would write it)."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": n_layer,
            "n_embd": n_embd, "n_head": n_head, "vocab_size": vocab_size,
            "n_positions": n_positions, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True}


def gpt2_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a ``GPT2LMHeadModel`` checkpoint in HF layout (Conv1D ``[in, out]``)."""
    d, inner = config["n_embd"], 4 * config["n_embd"]
    shapes = [("transformer.wte.weight", (config["vocab_size"], d)),
              ("transformer.wpe.weight", (config["n_positions"], d))]
    for i in range(config["n_layer"]):
        h = f"transformer.h.{i}."
        shapes += [(h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
                   (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
                   (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
                   (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
                   (h + "mlp.c_fc.weight", (d, inner)), (h + "mlp.c_fc.bias", (inner,)),
                   (h + "mlp.c_proj.weight", (inner, d)), (h + "mlp.c_proj.bias", (d,))]
    return shapes + [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]


def write_safetensors(path: Path, tensors: Iterable[tuple[str, tuple[int, ...]]],
                      make: Callable[[str, tuple[int, ...]], np.ndarray]) -> int:
    """Write float32 tensors to a safetensors file one at a time (never all in memory).

    ``make(key, shape)`` returns each tensor when its turn comes. Returns the file size.
    """
    tensors = list(tensors)
    header, offset = {}, 0
    for key, shape in tensors:
        nbytes = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset,
                                                                             offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as out:
        out.write(len(text).to_bytes(8, "little") + text)
        for key, shape in tensors:
            out.write(np.ascontiguousarray(make(key, shape), dtype="<f4").tobytes())
    return path.stat().st_size


def write_random_gpt2(folder: str | Path, *, n_layer: int = 10, n_embd: int = 1024,
                      vocab_size: int = 8192, n_positions: int = 64, seed: int = 0,
                      max_shard_bytes: int | None = None) -> int:
    """A random GPT-2 checkpoint folder (config.json + safetensors), written tensor by tensor.

    Weights are N(0, 0.02^2), LayerNorm scales 1 + N(0, 0.02^2). With ``max_shard_bytes``
    the tensors go to several files with a ``model.safetensors.index.json``, as
    ``save_pretrained(max_shard_size=...)`` writes them. Returns the weights' total bytes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = gpt2_config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size,
                         n_positions=n_positions)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(seed)

    def make(key: str, shape: tuple[int, ...]) -> np.ndarray:
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        return values + np.float32(1) if ".ln_" in key and key.endswith("weight") else values

    shapes = gpt2_shapes(config)
    if max_shard_bytes is None:
        return write_safetensors(folder / "model.safetensors", shapes, make)
    shards, current, size = [], [], 0
    for key, shape in shapes:
        if current and size + 4 * math.prod(shape) > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += 4 * math.prod(shape)
    shards.append(current)
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / name, shard, make)
        weight_map.update({key: name for key, _ in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


# --------------------------------------------------------------------------- one row


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(load: Callable[[], object]) -> dict[str, float]:
    """Wall time and peak RSS increase (bytes) of ``load()`` in this process."""
    baseline = _status_kib("VmRSS") * 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    load()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    return {"seconds": seconds, "rss_before_bytes": baseline, "peak_rss_bytes": peak,
            "peak_increase_bytes": peak - baseline, "peak_reset": reset}


def _jax_setup(devices: int) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", devices)


def run_row(row: str, folder: str, process_id: int = 0, port: int = 0) -> dict:
    """Load ``folder`` the way ``row`` says, in this (fresh) process; returns measure()."""
    if row == "transformers":
        import torch
        from transformers import GPT2LMHeadModel

        torch.set_num_threads(len(os.sched_getaffinity(0)))

        def load():
            model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
            # from_pretrained may leave weights as views of the mmapped file, unread; one
            # element per 4 KiB page reads every page (as a first forward pass would).
            with torch.no_grad():
                for param in model.parameters():
                    param.detach().reshape(-1)[::1024].sum()
            return model

        return measure(load)
    import jax

    if row == "memjax_2proc_model8":
        _jax_setup(4)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                                   process_id=process_id, initialization_timeout=120)
    else:
        _jax_setup(8 if row == "memjax_model8" else 1)
    from flax import nnx

    from memjax.convert import load_pretrained
    from memjax.engine import make_mesh

    jax.devices()  # start the backend before measuring
    mesh = make_mesh(model=8) if row in ("memjax_model8", "memjax_2proc_model8") else None

    def load():
        if row == "memjax_eager":
            module = _eager_load(folder)
        else:
            module, _ = load_pretrained(folder, mesh=mesh)
        jax.block_until_ready(nnx.state(module))

    result = measure(load)
    if row == "memjax_2proc_model8":
        jax.distributed.shutdown()
    return result


def _eager_load(folder: str):
    """The loader before lazy reading: every tensor copied into host memory first (with
    ``safetensors.safe_open(...).get_tensor``, as ``read_tensors`` did), then placed."""
    import jax.numpy as jnp
    from flax import nnx
    from safetensors import safe_open

    from memjax.convert import TensorReader, read_config
    from memjax.models.registry import detect_architecture, fill_params

    with safe_open(str(Path(folder) / "model.safetensors"), framework="np") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    arch = detect_architecture(read_config(folder))
    config = arch.from_hf_config(read_config(folder))
    reader = TensorReader(tensors, ignore=arch.ignore)
    params = arch.convert(reader, config)
    abstract = nnx.eval_shape(lambda: arch.build(config, nnx.Rngs(0)))
    return fill_params(abstract, params, reader, jnp.float32, arch.name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    return env


def spawn_row(row: str, folder: Path) -> dict:
    """Run one row in fresh process(es); the two-process row reports the larger of both."""
    processes = 2 if row == "memjax_2proc_model8" else 1
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "bench.checkpoint_load", "--worker", row,
                               str(folder), str(i), str(port)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode:
            raise RuntimeError(f"row {row} failed:\n{err[-4000:]}")
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    worst = max(results, key=lambda r: r["peak_increase_bytes"])
    return {**worst, "seconds": max(r["seconds"] for r in results),
            "per_process": results if processes > 1 else None}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~35 MB checkpoint, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=ROWS)
    parser.add_argument("--worker", nargs=4, metavar=("ROW", "FOLDER", "PROCESS", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        row, folder, process_id, port = args.worker
        print(json.dumps(run_row(row, folder, int(process_id), int(port))), flush=True)
        return

    from bench import common

    shape = dict(n_layer=2, n_embd=512, vocab_size=4096) if args.quick else \
        dict(n_layer=10, n_embd=1024, vocab_size=8192)
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2"
        start = time.perf_counter()
        nbytes = write_random_gpt2(folder, **shape)
        write_s = time.perf_counter() - start
        print(f"wrote {nbytes / 2**20:.0f} MiB in {write_s:.1f} s", flush=True)
        spawn_row("memjax", folder)  # warm-up: the file into the page cache
        runs: dict[str, list[dict]] = {row: [] for row in args.rows}
        for _ in range(repeats):  # interleaved, so a busy spell hits every row
            for row in args.rows:
                runs[row].append(spawn_row(row, folder))
                print(f"{row}: {runs[row][-1]['seconds']:.2f} s, peak +"
                      f"{runs[row][-1]['peak_increase_bytes'] / 2**20:.0f} MiB", flush=True)
    rows = {}
    for row, results in runs.items():
        times = [r["seconds"] for r in results]
        peak = max(r["peak_increase_bytes"] for r in results)
        rows[row] = {"load": common.summarize(times), "peak_increase_bytes": peak,
                     "peak_increase_over_checkpoint": peak / nbytes, "runs": results}
    if "transformers" in rows:
        for row in rows:
            rows[row]["time_over_transformers"] = (rows[row]["load"]["median_s"]
                                                   / rows["transformers"]["load"]["median_s"])
    payload = {"checkpoint": {**shape, "bytes": nbytes, "write_seconds": write_s,
                              "format": "one model.safetensors, float32"},
               "repeats": repeats, "rows": rows, "machine": common.machine_info(),
               "median_note": "seconds: median over repeats; peak: the largest over repeats"}
    path = common.write_json(common.result_name("checkpoint_load", args.quick), payload)
    print(f"wrote {path}")
    for row, values in rows.items():
        print(f"{row:>22}: {values['load']['median_s']:6.2f} s  peak +"
              f"{values['peak_increase_bytes'] / 2**20:6.0f} MiB "
              f"({values['peak_increase_over_checkpoint']:.2f} x checkpoint)")


if __name__ == "__main__":
    main()
