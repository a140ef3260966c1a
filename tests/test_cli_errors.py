"""Every ``memjax`` subcommand refuses bad input with one line, exit status 2, no traceback.

A table of bad command lines (missing files, wrong types, bad JSON, out-of-range values,
unwritable outputs), run in-process through ``memjax.cli.main``. The table must hold at
least one case per subcommand that ``memjax.cli.build_parser()`` knows (nested ones such as
``mia tokens`` included), so a new subcommand cannot be forgotten. One subprocess case
checks that output into a closed pipe (``memjax info ... | head``) ends quietly.

To add a case: a ``Case(argv, message)`` whose argv may use the fixture paths below
(``{store}``, ``{file}``, ...); ``message`` is a fragment the error line must contain,
normally the flag or the file it names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub: everything is local

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from memjax.cli import build_parser, main, subcommands  # noqa: E402
from memjax.engine import ScoreStore, score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Case(NamedTuple):
    argv: tuple[str, ...]
    message: str  # a fragment of the one error line: the input it names


def case(*argv: str, message: str) -> Case:
    return Case(tuple(argv), message)


NEW = "{root}/new-output"  # a path that does not exist yet, in a writable folder
#: memjax unlearning's data and split files (the cases fail before reading them).
SPLITS = ("--data", "{file}", "--forget", "{file}", "--retain", "{file}", "--test", "{file}")

CASES = [
    # -- audit: checked before minutes of training
    case("audit", "--out", "{file}", message="--out '{file}' is a file"),
    case("audit", "--references", "3", message="--references 3"),
    case("audit", "--steps", "0", message="argument --steps"),
    # -- score
    case("score", "--model", "{missing}", "--out", NEW, message="{missing}"),
    case("score", "--model", "{mlp}", "--out", "{file}", message="--out '{file}' is a file"),
    case("score", "--model", "{mlp}", "--out", "{file}/store",
         message="--out '{file}/store': cannot create it"),
    case("score", "--model", "{mlp}", "--out", "{store}", message="already holds a store"),
    case("score", "--model", "{mlp}", "--out", "{foreign}",
         message="holds files that are not a score store"),
    case("score", "--model", "{mlp}", "--out", NEW, "--batch-size", "abc",
         message="argument --batch-size"),
    case("score", "--model", "{mlp}", "--out", NEW, "--chunk-size", "0",
         message="argument --chunk-size"),
    case("score", "--model", "{mlp}", "--out", NEW, "--chunk-size", "12", "--batch-size", "8",
         message="--chunk-size 12: expected a multiple of --batch-size 8"),
    case("score", "--model", "{mlp}", "--out", NEW, "--max-length", "0",
         message="--max-length 0"),
    case("score", "--model", "{mlp}", "--out", "{store}", "--resume", "--overwrite",
         message="argument --overwrite: not allowed with argument --resume"),
    case("score", "--model", "{mlp}", "--out", NEW, "--signal", "loss", message="--signal"),
    case("score", "--model", "{mlp}", "--out", NEW, "--data", "{missing}.npz",
         message="{missing}.npz"),
    case("score", "--model", "{gpt2_without_tokenizer}", "--signal", "tokens", "--data",
         "{texts}", "--out", NEW, message="{gpt2_without_tokenizer} reads input_ids but has no "
         "tokenizer files"),
    case("score", "--model", "{gpt2}", "--signal", "tokens", "--data", "{texts}",
         "--tokenizer", "{empty}", "--out", NEW, message="--tokenizer '{empty}'"),
    case("score", "--model", "{gpt2}", "--signal", "tokens", "--data", "{texts}",
         "--tokenizer", "{broken_tokenizer}", "--out", NEW,
         message="--tokenizer '{broken_tokenizer}'"),
    # -- convert
    case("convert", "{missing}", NEW, message="{missing}"),
    case("convert", "{gpt2}", "{file}", message="dst '{file}' is a file"),
    case("convert", "{gpt2}", NEW, "--dtype", "float8", message="argument --dtype"),
    # -- info
    case("info", "{missing}", message="no manifest.json"),
    case("info", "{bad_manifest}", message="manifest.json is not valid JSON"),
    # -- export
    case("export", "{store}", "{empty}", message="out '{empty}' is a folder"),
    case("export", "{store}", "{root}/scores.csv", message="ending in .parquet"),
    case("export", "{store}", "{file}/scores.parquet", message="is a file, not a folder"),
    case("export", "{incomplete}", "{root}/scores.parquet", message="incomplete"),
    case("export", "{corrupt}", "{root}/scores.parquet", message="chunk 1 is missing or corrupt"),
    # -- mia (helper MIA is changing these right now: revisit)
    case("mia", "stored", "--scores", "{store}", "--members", "{members}", "--texts",
         "{bad_jsonl}", "--out", NEW, message="{bad_jsonl}"),
    case("mia", "stored", "--scores", "{store}", "--members", "{missing}.npy", "--out", NEW,
         message="{missing}.npy"),
    case("mia", "stored", "--scores", "{missing}", "--members", "{members}", "--out", NEW,
         message="no manifest.json"),
    case("mia", "tokens", "--model", "{missing}", "--data", "{texts}", "--members",
         "{members}", "--out", NEW, message="{missing}"),
    case("mia", "clip", "--model", "{missing}", "--data", "pairs:{missing}.csv", "--members",
         "{members}", "--out", NEW, message="{missing}"),
    case("mia", "lira", "--signals", "{missing}.npz", "--out", NEW, message="{missing}.npz"),
    case("mia", "bench", "{missing}.toml", message="{missing}.toml"),
    case("mia", "diffusion", "--model", "{missing}", "--data", "digits", "--out", NEW,
         message="{missing}"),
    case("mia", "diffusion", "--model", "{missing}", "--data", "digits", "--noise-draws", "0",
         "--out", NEW, message="argument --noise-draws"),
    case("mia", "iar", "--model", "{missing}", "--data", "{missing}.npz", "--out", NEW,
         message="{missing}"),
    case("mia", "di", "--features", "{missing}.parquet", "--method", "cdi",
         "--member-column", "member", "--out", NEW, message="{missing}.parquet"),
    case("mia", "bench", "{bad_jsonl}", message="not valid TOML"),
    case("mia", "lira", "--signals", "{missing}.npz", "--out", "{foreign}",
         message="is not a memjax report"),
    case("mia", "lira", "--signals", "{missing}.npz", "--out", "{file}",
         message="is a file"),
    case("mia", "rmia", "--signals", "{bad_jsonl}", "--out", NEW, message="{bad_jsonl}"),
    case("mia", "rmia", "--signals", "{missing}.npz", "--gamma", "x", "--out", NEW,
         message="argument --gamma"),
    # -- influence
    case("influence", "self", "--model", "{missing}", "--out", NEW, message="{missing}"),
    case("influence", "lava", "--val", "{missing}.npz", "--out", NEW,
         message="{missing}.npz"),
    case("influence", "everything", "--out", NEW, message="argument what"),
    case("influence", "self", "--model", "{mlp}", "--trainable", "no_such_layer*", "--out",
         NEW, message="no_such_layer*"),
    case("influence", "scores", "--model", "{mlp}", "--out", "{foreign}",
         message="is not a memjax report"),
    case("influence", "self", "--model", "{mlp}", "--out", NEW, "--batch-size", "0",
         message="argument --batch-size"),
    case("influence", "query", "--store", "{missing}", "--test", "{missing}.npz", "--out", NEW,
         message="no readable settings.json"),
    case("influence", "store", "--model", "{mlp}", "--out", NEW, message="needs --store"),
    case("influence", "scores", "--model", "{mlp}", "--curvature", "newton", "--out", NEW,
         message="argument --curvature"),
    case("influence", "self", "--model", "{mlp}", "--curvature", "ekfac", "--out", NEW,
         message="applies to 'scores', 'store' and 'query'"),
    # -- memorization
    case("memorization", "dejavu", "--embeddings", "{missing}.npz", "--out", NEW,
         message="--embeddings"),
    case("memorization", "unitmem", "--out", NEW, message="--model"),
    case("memorization", "unitmem", "--model", "{mlp}", "--layers", "no_such_layer",
         "--out", NEW, message="no_such_layer"),
    case("memorization", "layermem", "--model", "{mlp}", "--out", NEW,
         message="--reference"),
    case("memorization", "unitmem", "--model", "{mlp}", "--out", "{file}",
         message="is a file"),
    # -- mia icl
    case("mia", "icl", "--model", "{gpt2}", "--data", "{texts}", "--out", NEW,
         message="no field 'label'"),
    case("mia", "icl", "--model", "{gpt2}", "--data", "jsonl:{bad_jsonl}", "--out", NEW,
         message="{bad_jsonl}:1"),
    case("mia", "icl", "--model", "{gpt2}", "--data", "{missing}.jsonl", "--out", NEW,
         message="expected jsonl:FILE"),
    case("mia", "icl", "--model", "{gpt2}", "--data", "jsonl:{missing}.jsonl", "--out", NEW,
         message="no such file"),
    # -- unlearning
    case("unlearning", "--model", "{mlp}", *SPLITS, "--out", NEW, message="--model '{mlp}'"),
    case("unlearning", "--model", "{missing}", *SPLITS, "--out", NEW, message="--model"),
    case("unlearning", "--model", "{mlp}", *SPLITS, "--n-views", "0", "--out", NEW,
         message="argument --n-views"),
    # -- robustness
    case("robustness", "--model", "{mlp}", "--data", "digits", "--epsilon", "eight", "--out", NEW,
         message="argument --epsilon"),
    case("robustness", "--model", "{mlp}", "--data", "digits", "--out", NEW,
         message="--layer: model"),
    case("robustness", "--model", "{mlp}", "--data", "digits", "--layer", "dense9", "--out", NEW,
         message="--layer 'dense9': not a tap"),
    case("robustness", "--model", "{mlp}", "--data", "digits", "--layer", "dense1", "--head",
         "{missing}.npz", "--out", NEW, message="--head '{missing}.npz': no such file"),
    # -- prototypes
    case("prototypes", "--model", "{mlp}", "--private", "digits", "--test", "digits", "--method",
         "public", "--epsilon", "1", "--out", NEW, message="--public"),
    case("prototypes", "--model", "{mlp}", "--private", "digits", "--test", "digits",
         "--epsilon", "0", "--out", NEW, message="argument --epsilon"),
    case("prototypes", "--model", "{missing}", "--private", "digits", "--test", "digits",
         "--epsilon", "1", "--out", NEW, message="{missing}"),
    case("prototypes", "--model", "{mlp}", "--private", "{missing}.npz", "--test", "digits",
         "--epsilon", "1", "--out", NEW, message="{missing}.npz"),
    # -- clipscore
    case("clipscore", "--model", "{missing}", "--data", "pairs:{missing}.jsonl", "--out", NEW,
         message="{missing}"),
    case("clipscore", "--model", "{mlp}", "--data", "digits", "--out", NEW,
         message="--data 'digits': expected image-caption pairs"),
    case("clipscore", "--model", "{mlp}", "--data", "pairs:{missing}.jsonl", "--out", NEW,
         message="--model"),
    case("clipscore", "--model", "{mlp}", "--data", "pairs:{missing}.jsonl", "--weight", "0",
         "--out", NEW, message="argument --weight"),
    case("clipscore", "--model", "{mlp}", "--data", "pairs:{missing}.jsonl", "--references",
         "digits", "--out", NEW, message="--references 'digits': expected reference captions"),
]


def _command_of(argv: tuple[str, ...], commands) -> tuple[str, ...] | None:
    """The subcommand path ``argv`` starts with (the longest that matches)."""
    matches = [path for path in commands if argv[:len(path)] == path]
    return max(matches, key=len, default=None)


def test_every_subcommand_has_a_bad_input_case():
    commands = subcommands(build_parser())
    assert ("score",) in commands and ("export",) in commands  # the walk sees them all
    covered = {_command_of(c.argv, commands) for c in CASES}
    missing = sorted(set(commands) - covered)
    assert not missing, f"add a bad-input case to CASES for: {missing}"


def _tiny_store(path: Path, n: int = 40) -> ScoreStore:
    data = {"x": np.arange(n, dtype=np.float32), "label": np.zeros(n, np.int32)}
    return score(lambda params, example: {"loss": example["x"] * params}, np.float32(2.0),
                 data, batch_size=8, store=ScoreStore(path, chunk_size=16), progress=False)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    """Inputs the cases name, made once: stores (complete, incomplete, corrupt, bad
    manifest), files, a tiny memjax classifier and a tiny GPT-2 with its tokenizer."""
    from memjax.models.classifier import MLPConfig
    from memjax.train import save_model
    from tests import hf_tiny

    root = tmp_path_factory.mktemp("cli_errors")
    store = _tiny_store(root / "store")
    incomplete = _tiny_store(root / "incomplete")
    manifest = incomplete.manifest()
    manifest["complete"] = False
    (root / "incomplete" / "manifest.json").write_text(__import__("json").dumps(manifest))
    _tiny_store(root / "corrupt")
    chunk = root / "corrupt" / "chunks" / "000001.npz"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    (root / "bad_manifest").mkdir()
    (root / "bad_manifest" / "manifest.json").write_text("{not json")
    (root / "file").write_text("not a folder\n")
    (root / "empty").mkdir()
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("the user's own files\n")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (root / "texts.jsonl").write_text("".join(f'{{"text": "text number {i}"}}\n'
                                              for i in range(4)))
    np.save(root / "members.npy", np.arange(40) < 20)
    config = MLPConfig(input_shape=(8, 8, 1), num_classes=10, hidden=(16,))
    save_model(root / "mlp", jax.tree.map(np.asarray, config.init(jax.random.key(0))), config)
    gpt2, _ = hf_tiny.cached(tmp_path_factory, "gpt2")
    (root / "gpt2_without_tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(gpt2 / name, root / "gpt2_without_tokenizer" / name)
    broken = root / "broken_tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{this is no tokenizer")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}')
    named = {name: root / name for name in ("file", "empty", "foreign", "bad_manifest",
                                             "incomplete", "corrupt", "mlp",
                                             "broken_tokenizer", "gpt2_without_tokenizer")}
    return {"root": str(root), "store": str(store.path), "missing": str(root / "missing"),
            "bad_jsonl": str(root / "bad.jsonl"), "texts": f"jsonl:{root / 'texts.jsonl'}",
            "members": str(root / "members.npy"), "gpt2": str(gpt2),
            **{name: str(path) for name, path in named.items()}}


@pytest.mark.parametrize("bad", CASES, ids=[" ".join(c.argv)[:70] for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_it(bad, paths, capsys, monkeypatch,
                                                   tmp_path):
    monkeypatch.chdir(tmp_path)  # defaults such as --out memjax-mia land here
    argv = [arg.format(**paths) for arg in bad.argv]
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("memjax: error: "), captured.err
    assert bad.message.format(**paths) in lines[0]
    assert not Path(paths["root"], "new-output").exists()  # nothing left behind


def test_a_closed_pipe_ends_quietly(paths):
    """``memjax info STORE --json | head -0``: the reader is gone before the first write."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "memjax.cli", "info", paths["store"],
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_an_os_error_on_a_path_the_user_gave_is_named_by_its_flag(paths, capsys,
                                                                  monkeypatch):
    """The safety net under every command: an OSError about a path given on the command
    line (or one inside it) is an input error naming the flag; about any other path it
    is a bug and keeps its traceback."""
    def denied(filename):
        def info(self):
            raise PermissionError(13, "Permission denied", filename)

        return info

    monkeypatch.setattr(ScoreStore, "info", denied(f"{paths['store']}/chunks/000000.npz"))
    assert main(["info", paths["store"]]) == 2
    assert capsys.readouterr().err == (f"memjax: error: store {paths['store']!r}: "
                                       "Permission denied\n")
    monkeypatch.setattr(ScoreStore, "info", denied("/somewhere/else"))
    with pytest.raises(PermissionError):
        main(["info", paths["store"]])
