"""``memjax score`` started as two jax.distributed processes on 127.0.0.1 (gloo, 4 CPU
devices each, ``--model-parallel 8``: the model axis spans both processes) writes the same
store as one process with 8 devices; the multi-host options are refused when incomplete."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memjax.cli import main
from memjax.engine import ScoreStore
from tests import hf_tiny

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def lm_and_texts(tmp_path_factory):
    folder, _ = hf_tiny.cached(tmp_path_factory, "gpt2")
    texts = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in hf_tiny.corpus(52)))
    return folder, texts


def _score_args(folder, texts, out) -> list[str]:
    return ["score", "--model", str(folder), "--data", f"jsonl:{texts}", "--signal", "tokens",
            "--out", str(out), "--model-parallel", "8", "--batch-size", "8", "--no-progress"]


def test_two_processes_score_the_same_store_as_one(lm_and_texts, tmp_path):
    folder, texts = lm_and_texts
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "memjax.cli", *_score_args(folder, texts, tmp_path / "multi"),
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    assert all("4 of 8 devices here" in log for log in logs), "\n".join(logs)

    assert main(_score_args(folder, texts, tmp_path / "single")) == 0  # 8 devices, 1 process
    multi, single = ScoreStore(tmp_path / "multi").read(), ScoreStore(tmp_path / "single").read()
    assert sorted(multi) == sorted(single)
    np.testing.assert_array_equal(multi["id"], single["id"])
    for name in single:
        # The same programs on the same shards; only the cross-process reductions (gloo)
        # can order sums differently.
        np.testing.assert_allclose(multi[name], single[name], rtol=0, atol=1e-6, err_msg=name)


def test_two_processes_run_the_same_mia_bench_as_one(lm_and_texts, tmp_path):
    """memjax mia bench with model_parallel = 8: two processes x 4 devices (process 0
    writes the stores and the table) give the table one process with 8 devices gives."""
    import pyarrow.parquet as pq

    folder, texts = lm_and_texts
    lines = texts.read_text().splitlines()
    (tmp_path / "m.jsonl").write_text("\n".join(lines[:26]) + "\n")
    (tmp_path / "n.jsonl").write_text("\n".join(lines[26:]) + "\n")
    for name in ("multi", "single"):
        (tmp_path / f"{name}.toml").write_text(
            f'out = "{name}"\nattacks = ["LOSS", "Min-K%++", "zlib"]\nbatch_size = 8\n'
            f'model_parallel = 8\n[[models]]\nname = "lm"\npath = "{folder}"\n'
            '[[datasets]]\nname = "d"\nmembers = "m.jsonl"\nnonmembers = "n.jsonl"\n')
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "memjax.cli", "mia", "bench", str(tmp_path / "multi.toml"),
         "--no-progress", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    assert main(["mia", "bench", str(tmp_path / "single.toml"), "--no-progress"]) == 0
    multi = pq.read_table(tmp_path / "multi" / "scores.parquet").to_pandas()
    single = pq.read_table(tmp_path / "single" / "scores.parquet").to_pandas()
    assert multi.equals(single)


@pytest.mark.parametrize("options, message", [
    (["--coordinator", "127.0.0.1:1"], "go together"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2"),
    (["--distributed", "--num-processes", "2"], "--distributed auto-detects"),
])
def test_incomplete_multi_host_options_are_refused(options, message, tmp_path, capsys):
    assert main(["info", str(tmp_path), *options]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
