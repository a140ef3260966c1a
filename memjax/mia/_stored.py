"""Attacks on one model's stored signals (what ``memjax mia stored`` runs), and membership
read from the user's files by example id (``--members`` / ``--member-ids``).

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


def read_members(n_examples: int, *, members: str | Path | None = None,
                 member_ids: str | Path | None = None) -> np.ndarray:
    """[n_examples] bool membership by example id (0..n_examples-1), from exactly one of:

    - ``members``: a ``.npy`` boolean mask of length ``n_examples``, entry i for example
      id i (``memjax mia ... --members``). An integer array is refused even if it holds
      only 0/1: it cannot be told apart from a list of ids; save ``mask.astype(bool)``,
      or pass ids as ``member_ids``.
    - ``member_ids``: the ids of the members (``--member-ids``), a ``.npy`` 1-D integer
      array or a text file with one integer id per line (blank lines ignored), each in
      ``[0, n_examples)`` and none repeated.

    Raises:
      InputError: naming the file (and the flag) and what was expected.
    """
    if (members is None) == (member_ids is None):
        raise InputError("membership: give exactly one of --members (a .npy boolean mask by "
                         "example id) or --member-ids (the members' ids: .npy integers or a "
                         "text file, one id per line)")
    if members is not None:
        return _mask_file(Path(members), n_examples)
    ids = _ids_file(Path(member_ids))
    where = f"--member-ids {str(member_ids)!r}"
    if ids.size:
        bad = np.flatnonzero((ids < 0) | (ids >= n_examples))
        if bad.size:
            raise InputError(f"{where}: id {int(ids[bad[0]])} (entry {int(bad[0])}) is out of "
                             f"range; expected example ids in [0, {n_examples}) "
                             f"({bad.size} out of range)")
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            repeated = unique[counts > 1]
            raise InputError(f"{where}: id {int(repeated[0])} is listed "
                             f"{int(counts[counts > 1][0])} times ({repeated.size} repeated "
                             "ids); expected each member id once")
    flags = np.zeros(n_examples, bool)
    flags[ids] = True
    return flags


def _mask_file(path: Path, n_examples: int) -> np.ndarray:
    where = f"--members {str(path)!r}"
    mask = _load_npy(path, where, "a .npy boolean mask by example id")
    if mask.dtype != bool:
        hint = (" (for member ids use --member-ids; for a 0/1 mask save "
                "mask.astype(bool))" if mask.dtype.kind in "iu" else "")
        raise InputError(f"{where}: dtype {mask.dtype}; expected a boolean mask by example "
                         f"id{hint}")
    if mask.shape != (n_examples,):
        raise InputError(f"{where}: shape {mask.shape}; expected a 1-D boolean mask with one "
                         f"entry per example id, shape ({n_examples},)")
    return mask


def _ids_file(path: Path) -> np.ndarray:
    where = f"--member-ids {str(path)!r}"
    if path.suffix == ".npy":
        ids = _load_npy(path, where, "a .npy array of integer member ids")
        if ids.dtype.kind not in "iu" or ids.ndim != 1:
            raise InputError(f"{where}: dtype {ids.dtype}, shape {ids.shape}; expected a 1-D "
                             "array of integer example ids")
        return ids.astype(np.int64)
    if not path.is_file():
        raise InputError(f"{where}: no such file; expected a .npy array of integer ids or a "
                         "text file with one id per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{where}: cannot read it as text ({error}); expected one integer "
                         "id per line") from None
    ids = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise InputError(f"{where} line {number}: {text[:40]!r} is not an integer; "
                             "expected one integer example id per line") from None
    return np.asarray(ids, np.int64)


def _load_npy(path: Path, where: str, expected: str) -> np.ndarray:
    if path.suffix != ".npy" or not path.is_file():
        raise InputError(f"{where}: {'no such file' if not path.exists() else 'not a .npy file'}"
                         f"; expected {expected}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"{where}: cannot read it as a .npy array ({error}); expected "
                         f"{expected}") from None


def members_of(flags: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """``flags[ids]``: membership of the examples ``ids`` [N] (e.g. a store's rows), with
    an InputError naming ``what`` when an id is not in ``[0, len(flags))``."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise InputError(f"{what}: example ids of dtype {ids.dtype}; membership by id needs "
                         "integer ids")
    if ids.size and (ids.min() < 0 or ids.max() >= flags.size):
        raise InputError(f"{what}: example ids {int(ids.min())}..{int(ids.max())} are not all "
                         f"in [0, {flags.size})")
    return flags[ids]


def jsonl_texts(path: str | Path, ids: np.ndarray, field: str = "text") -> list[str]:
    """The ``field`` of lines ``ids`` (0-based line numbers) of a JSONL file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"--texts {str(path)!r}: cannot read it ({error}); expected a "
                         "UTF-8 JSONL file") from None
    out = []
    for i in np.asarray(ids, np.int64):
        if not 0 <= i < len(lines):
            raise InputError(f"--texts {str(path)!r} has {len(lines)} lines; example id {i} "
                             "is not one of them")
        try:
            row = json.loads(lines[i])
        except json.JSONDecodeError as error:
            raise InputError(f"--texts {str(path)!r} line {i + 1}: not JSON ({error.msg}); "
                             "expected one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise InputError(f"--texts {str(path)!r} line {i + 1}: expected an object with a "
                             f"string field {field!r}")
        out.append(row[field])
    return out
