"""Attacks on one model's stored signals: what ``memjax mia --scores`` runs.

The engine's score store holds one signal bundle per example; which attacks apply follows
from the fields it has (higher = more likely member, everywhere):

- classification (``loss``, ``phi``): LOSS (Yeom et al. 2018) and the logit-scaled
  confidence φ (Carlini et al. 2022) thresholded without reference models;
- tokens (``mean_loss``, ``logp``, ``mu``, ``sigma``): LOSS, Min-K% (Shi et al. 2024),
  Min-K%++ (Zhang et al. 2024), and zlib (Carlini et al. 2021) when the texts are given;
- contrastive (``cosine``): CSA (Ko et al. 2023).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memjax.errors import InputError
from memjax.mia._tokens import loss, min_k, min_k_plus_plus, zlib


def token_mask(signals: dict[str, np.ndarray]) -> np.ndarray:
    """[N, T] bool scored positions: the ``scored`` field when the store has it, else the
    first ``n_tokens`` positions of each row (exact for right-padded texts, where position
    t scores token t+1 and the scored run starts at 0)."""
    if "scored" in signals:
        return np.asarray(signals["scored"]).astype(bool)
    n_tokens = np.asarray(signals["n_tokens"]).astype(np.int64)
    return np.arange(signals["logp"].shape[1])[None, :] < n_tokens[:, None]


def attacks_from_signals(signals: dict[str, np.ndarray], *, k: float = 0.2,
                         texts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """{attack name: [N] float64 scores} for every attack the signal fields support.

    Args:
      signals: one model's per-example signals (a score store's ``read()``).
      k: the Min-K% / Min-K%++ fraction.
      texts: N strings in the signals' row order, for the zlib attack (optional).

    Raises:
      InputError: if no known signal field is present, or on bad values (NaN, shapes).
    """
    attacks: dict[str, np.ndarray] = {}
    if "cosine" in signals:
        attacks["CSA (cosine)"] = np.asarray(signals["cosine"], np.float64)
    if "phi" in signals and "loss" in signals:
        attacks["LOSS"] = loss(signals["loss"])
        attacks["confidence φ"] = np.asarray(signals["phi"], np.float64)
    if "mean_loss" in signals and "logp" in signals:
        mask = token_mask(signals)
        attacks["LOSS"] = loss(signals["mean_loss"])
        attacks[f"Min-K% (k={k})"] = min_k(signals["logp"], mask, k)
        if "mu" in signals and "sigma" in signals:
            attacks[f"Min-K%++ (k={k})"] = min_k_plus_plus(signals["logp"], signals["mu"],
                                                            signals["sigma"], mask, k)
        if texts is not None:
            attacks["zlib"] = zlib(signals["mean_loss"], texts)
    if not attacks:
        raise InputError(f"--scores: no attack applies to fields {sorted(signals)}; expected "
                         "classification (loss, phi), tokens (mean_loss, logp) or "
                         "contrastive (cosine) signals")
    return attacks


def member_flags(path: str | Path, ids: np.ndarray) -> np.ndarray:
    """[N] bool membership of the examples ``ids`` from a ``.npy`` file: either a boolean
    mask indexed by example id, or the integer ids of the members."""
    path = Path(path)
    if path.suffix != ".npy" or not path.is_file():
        raise InputError(f"--members {str(path)!r}: expected a .npy file (bool mask by "
                         "example id, or member ids)")
    members = np.load(path, allow_pickle=False)
    ids = np.asarray(ids, np.int64)
    if members.dtype == bool:
        if members.ndim != 1 or (ids.size and ids.max() >= members.size) or ids.min(
                initial=0) < 0:
            raise InputError(f"--members: a boolean mask of shape {members.shape} does not "
                             f"cover example ids 0..{int(ids.max(initial=0))}")
        return members[ids]
    if np.issubdtype(members.dtype, np.integer) and members.ndim == 1:
        return np.isin(ids, members)
    raise InputError(f"--members: expected a 1-D bool mask or integer ids, got dtype "
                     f"{members.dtype} shape {members.shape}")


def jsonl_texts(path: str | Path, ids: np.ndarray, field: str = "text") -> list[str]:
    """The ``field`` of lines ``ids`` (0-based line numbers) of a JSONL file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out = []
    for i in np.asarray(ids, np.int64):
        if not 0 <= i < len(lines):
            raise InputError(f"--texts {str(path)!r} has {len(lines)} lines; example id {i} "
                             "is not one of them")
        row = json.loads(lines[i])
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise InputError(f"--texts {str(path)!r} line {i + 1}: expected an object with a "
                             f"string field {field!r}")
        out.append(row[field])
    return out
