"""Per-token membership features of image autoregressive models (Kowalczuk et al. 2025,
"Privacy Attacks on Image AutoRegressive Models"; reference code
sprintml/privacy_attacks_against_iars, ``src/features_extraction/llm_mia.py``).

Three kinds of logits of one image's tokens x_0 .. x_{T-1} under a class-conditional token
model (row t predicts x_t):

- ``cond``: the model given the image's class;
- ``uncond``: the model given the null class (``num_classes``, classifier-free guidance's
  unconditional branch);
- ``cfg``: ``cond - uncond``, the raw logit difference, used AS logits (softmax over the
  vocabulary of the difference) exactly as the reference's extractor does
  (``logits = logits - logits_uncond`` before every feature, the loss included).

Per token: ``log p_t`` (log-softmax at x_t), ``mu_t = sum_v p_v log p_v`` and the variance
``var_t = sum_v p_v (log p_v - mu_t)^2`` of log p under the model's own distribution, and the
hinge ``z_t[x_t] - max_{v != x_t} z_t[v]`` on the logits z. From them, per example (every
token scored, k-fractions counted as ``max(1, int(k * T))`` tokens as in
:mod:`memjax.mia._tokens`, whose Min-K% / Min-K%++ / LOSS / zlib functions are reused):

- ``loss``: mean log p_t (Yeom et al. 2018), i.e. minus the mean token cross-entropy;
- ``zlib``: ``-mean loss / len(zlib.compress(str(token_list).encode()))`` (Carlini et al.
  2021; the reference compresses the Python list's text, e.g. ``"[3, 17, 5]"``);
- ``hinge``: the mean hinge (Carlini et al. 2022's margin on logits);
- ``min_k``: mean of the k lowest log p_t (Shi et al. 2024);
- ``min_k_pp``: Min-K%++ with the paper's ``z_t = (log p_t - mu_t) / sigma_t``,
  sigma the standard deviation (Zhang et al. 2024); ``min_k_pp_var``: the reference code's
  variant ``(log p_t - mu_t) / (var_t + 1e-6)``, dividing by the variance;
- ``surp``: SURP (Zhang & Wu 2024) as the reference computes it, per max entropy e:
  tokens with entropy ``-mu_t < e`` and ``log p_t < bound``, where the reference's bound is
  ``max(topk(-log p, k))`` = ``-min_t log p_t`` — the LARGEST surprise, so (unlike the
  paper's k-th) it does not depend on k and admits every token but in degenerate cases;
  memjax therefore reports one column per e, not per (k, e). ``surp_{e}``: the mean
  log p_t over those tokens (sum / max(count, 1e-6)); ``surp_count_{e}``: their fraction;
- ``camia``: the reference's CAMIA-style features (Chang et al. 2024): ``below_mean`` (the
  fraction of tokens with log p_t below the example's mean), ``below_prev_mean`` (below the
  running mean of log p_0 .. log p_t, itself included), the same two on the Min-K%++
  scores of the reference's variance variant (``_z``), and ``slope`` (least-squares slope
  of log p_t over t).

Orientation: memjax's convention, higher = more likely member. The reference orients every
feature "members lower"; each memjax feature is exactly MINUS the reference's value (so
loss, zlib, min_k, min_k_pp are :mod:`memjax.mia._tokens`'s own; ``below_mean``,
``slope`` come out negative of the reference's positive ones, ``below_prev_mean`` and the
SURP counts positive), and min-max-scaled sums of them rank examples in reverse, which a
two-sided test does not see.

Where memjax differs from the reference: the variance is computed as
``sum p (log p - mu)^2`` (never negative) instead of ``sum p (log p)^2 - mu^2`` (equal in
exact arithmetic; the latter can go below zero in float32); k-fractions smaller than one
token score one token (the reference's ``topk(0)`` gives NaN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memjax._checks import check_positive_int
from memjax.errors import InputError
from memjax.mia._tokens import loss, min_k, min_k_plus_plus, zlib

#: The feature families, in column order.
IAR_FEATURES = ("loss", "zlib", "hinge", "min_k", "min_k_pp", "min_k_pp_var", "surp", "camia")
#: The logits each family is computed on.
IAR_LOGITS = ("cond", "uncond", "cfg")
#: The reference configuration's k-fractions (``conf/attack/llm_mia*.yaml``).
IAR_KS = (0.1, 0.2, 0.3, 0.4, 0.5)
#: The reference configuration's SURP entropy bounds.
IAR_MAX_ENTROPIES = (2.0, 4.0, 8.0, 16.0)
#: Added to the variance in the reference's Min-K%++ (and its CAMIA z-scores).
VARIANCE_EPS = 1e-6
#: Floor on the SURP token count (the reference's ``clip(1e-6)``).
SURP_COUNT_EPS = 1e-6
CAMIA = ("below_mean", "below_mean_z", "below_prev_mean", "below_prev_mean_z", "slope")
STATS = ("logp", "mu", "variance", "hinge")


# --------------------------------------------------------------------------- token stats


def iar_token_statistics(logits: Any, tokens: Any) -> dict[str, np.ndarray]:
    """Per-token statistics of one example in float64: ``logp``, ``mu``, ``variance``,
    ``hinge``, each [T], from ``logits`` [T, V] and ``tokens`` [T] (int, row t scores
    tokens[t])."""
    z = np.asarray(logits, dtype=np.float64)
    x = np.asarray(tokens)
    if z.ndim != 2 or x.shape != z.shape[:1]:
        raise InputError(f"logits, tokens: expected [T, V] and [T], got {z.shape} and "
                         f"{x.shape}")
    if z.shape[1] < 2 or not np.issubdtype(x.dtype, np.integer) or x.min() < 0 \
            or x.max() >= z.shape[1]:
        raise InputError(f"tokens: expected integers in [0, {z.shape[1]}) over a vocabulary "
                         "of at least 2")
    shifted = z - z.max(axis=1, keepdims=True)
    logp_all = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(logp_all)
    rows = np.arange(len(x))
    mu = (p * logp_all).sum(axis=1)
    others = z.copy()
    others[rows, x] = -np.inf
    return {"logp": logp_all[rows, x], "mu": mu,
            "variance": (p * np.square(logp_all - mu[:, None])).sum(axis=1),
            "hinge": z[rows, x] - others.max(axis=1)}


def iar_device_token_statistics(logits: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
    """:func:`iar_token_statistics` in JAX (the logits' dtype, float32 on devices), for one
    example inside a jitted program."""
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp_all)
    onehot = jax.nn.one_hot(tokens, logits.shape[-1], dtype=jnp.bool_)
    pick = lambda a: jnp.sum(jnp.where(onehot, a, 0.0), axis=-1)
    mu = jnp.sum(p * logp_all, axis=-1)
    z = logits.astype(jnp.float32)
    return {"logp": pick(logp_all), "mu": mu,
            "variance": jnp.sum(p * jnp.square(logp_all - mu[:, None]), axis=-1),
            "hinge": pick(z) - jnp.max(jnp.where(onehot, -jnp.inf, z), axis=-1)}


# --------------------------------------------------------------------------- reductions


def _all_tokens(logp: np.ndarray) -> np.ndarray:
    return np.ones(logp.shape, dtype=bool)


def _camia(logp: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    t = logp.shape[1]
    running = lambda a: np.cumsum(a, axis=1) / np.arange(1, t + 1)[None, :]
    below = lambda a, ref: (a < ref).mean(axis=1)
    steps = np.arange(t, dtype=np.float64) - (t - 1) / 2
    slope = ((logp - logp.mean(axis=1, keepdims=True)) * steps[None, :]).sum(axis=1) / max(
        float(np.square(steps).sum()), np.finfo(np.float64).tiny)
    # Each is minus the reference's value (higher = member).
    return {"below_mean": -below(logp, logp.mean(axis=1, keepdims=True)),
            "below_mean_z": -below(z, z.mean(axis=1, keepdims=True)),
            "below_prev_mean": below(logp, running(logp)),
            "below_prev_mean_z": below(z, running(z)),
            "slope": -slope}


def _surp(logp: np.ndarray, mu: np.ndarray, max_entropy: float
          ) -> tuple[np.ndarray, np.ndarray]:
    bound = -logp.min(axis=1, keepdims=True)  # the reference's max(topk(-logp, k))
    chosen = (-mu < max_entropy) & (logp < bound)
    count = chosen.sum(axis=1)
    return (np.where(chosen, logp, 0.0).sum(axis=1) / np.maximum(count, SURP_COUNT_EPS),
            chosen.mean(axis=1))


def _zscores(stats: Mapping[str, np.ndarray], variant: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, scale) for _tokens.min_k_plus_plus: the std (paper) or var + 1e-6 (reference)."""
    var = np.maximum(stats["variance"], 0.0)
    return stats["mu"], (np.sqrt(var) if variant == "std" else var + VARIANCE_EPS)


def iar_features_from_statistics(stats: Mapping[str, Any], tokens: Any, *, prefix: str = "",
                                 features: Sequence[str] = IAR_FEATURES,
                                 ks: Sequence[float] = IAR_KS,
                                 max_entropies: Sequence[float] = IAR_MAX_ENTROPIES
                                 ) -> dict[str, np.ndarray]:
    """Every requested feature of N examples from their token statistics.

    Args:
        stats: ``logp``, ``mu``, ``variance``, ``hinge``, each [N, T] (one logits kind).
        tokens: [N, T] the scored tokens (for ``zlib``).
        prefix: prepended to each column name (``"cond_"`` ...).
        features, ks, max_entropies: see :func:`iar_features`.

    Returns:
        {column: [N] float64}, higher = more likely member.
    """
    s = {k: np.asarray(stats[k], dtype=np.float64) for k in STATS}
    logp, mask = s["logp"], _all_tokens(s["logp"])
    out: dict[str, np.ndarray] = {}
    for feature in features:
        if feature == "loss":
            out["loss"] = loss(-logp.mean(axis=1))
        elif feature == "zlib":
            texts = [str([int(v) for v in row]) for row in np.asarray(tokens)]
            out["zlib"] = zlib(-logp.mean(axis=1), texts)
        elif feature == "hinge":
            out["hinge"] = s["hinge"].mean(axis=1)
        elif feature == "min_k":
            out |= {f"min_k_{k:g}": min_k(logp, mask, k) for k in ks}
        elif feature in ("min_k_pp", "min_k_pp_var"):
            mu, scale = _zscores(s, "std" if feature == "min_k_pp" else "variance")
            out |= {f"{feature}_{k:g}": min_k_plus_plus(logp, mu, scale, mask, k) for k in ks}
        elif feature == "surp":
            for e in max_entropies:
                out[f"surp_{e:g}"], out[f"surp_count_{e:g}"] = _surp(logp, s["mu"], e)
        elif feature == "camia":
            mu, scale = _zscores(s, "variance")
            z = (logp - mu) / scale
            out |= {f"camia_{name}": v for name, v in _camia(logp, z).items()}
    return {prefix + name: v for name, v in out.items()}


# --------------------------------------------------------------------------- one example


def _one(logits, tokens, feature: str, **options) -> dict[str, float]:
    stats = {k: v[None] for k, v in iar_token_statistics(logits, tokens).items()}
    columns = iar_features_from_statistics(stats, np.asarray(tokens)[None], features=(feature,),
                                       **options)
    return {name: float(v[0]) for name, v in columns.items()}


def cfg_logits(cond: Any, uncond: Any) -> np.ndarray:
    """The CFG-difference logits ``cond - uncond`` [T, V] (the reference's order)."""
    return np.asarray(cond, dtype=np.float64) - np.asarray(uncond, dtype=np.float64)


def iar_loss(logits: Any, tokens: Any) -> float:
    """Mean log p_t of one example (minus its mean token loss); logits [T, V], tokens [T]."""
    return _one(logits, tokens, "loss")["loss"]


def iar_zlib(logits: Any, tokens: Any) -> float:
    """``-mean loss / zlib length of str(token list)`` of one example."""
    return _one(logits, tokens, "zlib")["zlib"]


def iar_hinge(logits: Any, tokens: Any) -> float:
    """Mean over t of ``logits[t, x_t] - max_{v != x_t} logits[t, v]``."""
    return _one(logits, tokens, "hinge")["hinge"]


def iar_min_k(logits: Any, tokens: Any, k: float = 0.2) -> float:
    """Min-K%: mean of the ``max(1, int(k T))`` lowest log p_t."""
    return _one(logits, tokens, "min_k", ks=(k,))[f"min_k_{k:g}"]


def iar_min_k_pp(logits: Any, tokens: Any, k: float = 0.2, *,
                     scale: str = "std") -> float:
    """Min-K%++: mean of the lowest ``(log p_t - mu_t) / s_t``; ``scale="std"``: s = sigma
    (the paper), ``"variance"``: s = var + 1e-6 (the reference code)."""
    if scale not in ("std", "variance"):
        raise InputError(f"scale={scale!r}: expected 'std' or 'variance'")
    feature = "min_k_pp" if scale == "std" else "min_k_pp_var"
    return _one(logits, tokens, feature, ks=(k,))[f"{feature}_{k:g}"]


def iar_surp(logits: Any, tokens: Any, max_entropy: float = 2.0) -> tuple[float, float]:
    """SURP as the reference computes it: (mean log p over the chosen tokens, their
    fraction); see the module docstring for the reference's bound."""
    out = _one(logits, tokens, "surp", max_entropies=(max_entropy,))
    return out[f"surp_{max_entropy:g}"], out[f"surp_count_{max_entropy:g}"]


def iar_camia(logits: Any, tokens: Any) -> dict[str, float]:
    """The five CAMIA-style features of one example (names of :data:`CAMIA`)."""
    out = _one(logits, tokens, "camia")
    return {name: out[f"camia_{name}"] for name in CAMIA}


# --------------------------------------------------------------------------- engine


@dataclasses.dataclass(frozen=True)
class IARStatistics:
    """Per-example score function: the token statistics of the requested logits kinds
    from one program (conditional and null-class passes as one batch of two)."""

    apply: Any
    null_class: int
    kinds: tuple[str, ...]

    def __call__(self, params: Any, example: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        ids = example["input_ids"]
        label = jnp.asarray(example["class_labels"], jnp.int32)
        needs_uncond = any(k in ("uncond", "cfg") for k in self.kinds)
        labels = jnp.stack([label, jnp.full_like(label, self.null_class)]) if needs_uncond \
            else label[None]
        logits = jax.vmap(lambda c: self.apply(params, {"class_labels": c,
                                                        "input_ids": ids}))(labels)
        by_kind = {"cond": lambda: logits[0], "uncond": lambda: logits[1],
                   "cfg": lambda: logits[0] - logits[1]}
        out = {"input_ids": ids}
        for kind in self.kinds:
            for name, value in iar_device_token_statistics(by_kind[kind](), ids).items():
                out[f"{kind}_{name}"] = value
        return out


def _check_options(features, logits, ks, max_entropies) -> tuple:
    def as_tuple(value, name):
        if isinstance(value, str):
            return (value,)
        try:
            return tuple(value)
        except TypeError:
            raise InputError(f"{name}: expected a sequence, got {value!r}") from None

    features, logits = as_tuple(features, "features"), as_tuple(logits, "logits")
    for name, values, options in (("features", features, IAR_FEATURES),
                                  ("logits", logits, IAR_LOGITS)):
        bad = [v for v in values if v not in options]
        if bad or not values:
            raise InputError(f"{name}={list(values)!r}: expected a non-empty subset of "
                             f"{list(options)}")
    ks = (ks,) if isinstance(ks, (int, float)) else as_tuple(ks, "k")
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1
                     for k in ks):
        raise InputError(f"k={ks!r}: expected fractions in (0, 1]")
    max_entropies = as_tuple(max_entropies, "max_entropies")
    if not max_entropies or any(isinstance(e, bool) or not isinstance(e, (int, float))
                                or not e > 0 for e in max_entropies):
        raise InputError(f"max_entropies={max_entropies!r}: expected positive numbers")
    return (tuple(dict.fromkeys(features)), tuple(dict.fromkeys(logits)),
            tuple(float(k) for k in ks), tuple(float(e) for e in max_entropies))


def _token_model(model: Any, null_class: int | None, kinds: tuple[str, ...]) -> int:
    if getattr(model, "kind", None) != "iar":
        raise InputError(f"model: expected a class-conditional image-token model (kind "
                         f"'iar', e.g. a LlamaGen folder), got kind "
                         f"{getattr(model, 'kind', type(model).__name__)!r}")
    config = getattr(model, "config", None)
    classes = getattr(config, "num_classes", None)
    if null_class is None:
        if classes is None:
            raise InputError("null_class: the model's config has no num_classes; pass the "
                             "null class id")
        null_class = classes
    if any(k in ("uncond", "cfg") for k in kinds) and \
            getattr(config, "has_null_class", True) is False:
        raise InputError("logits: 'uncond' / 'cfg' need the null class, but this model's "
                         "class_dropout_prob is 0 (no null-class row); use logits=('cond',)")
    return int(null_class)


def iar_features(model: Any, source: Any, *, features: Sequence[str] = IAR_FEATURES,
                 logits: Sequence[str] = IAR_LOGITS, k: float | Sequence[float] = IAR_KS,
                 max_entropies: Sequence[float] = IAR_MAX_ENTROPIES,
                 null_class: int | None = None, batch_size: int = 16, mesh: Any = None,
                 store: Any = None, progress: bool = True) -> dict[str, np.ndarray]:
    """IAR membership features of every example of ``source`` (Kowalczuk et al. 2025).

    Args:
        model: a :class:`memjax.Model` of kind ``"iar"`` (inputs ``class_labels`` int
            scalar and ``input_ids`` [T]; outputs logits [T, V], row t predicting
            input_ids[t]), e.g. ``memjax.load`` of a LlamaGen folder.
        source: examples with ``class_labels`` [N] and ``input_ids`` [N, T] (a dict of
            arrays or a ``memjax.data`` source).
        features: families among :data:`IAR_FEATURES`.
        logits: kinds among :data:`IAR_LOGITS` (``cfg`` = cond - uncond).
        k: the Min-K% / Min-K%++ fraction(s).
        max_entropies: SURP's entropy bounds.
        null_class: the unconditional class id (default: the config's ``num_classes``).
        batch_size, mesh, store, progress: as :func:`memjax.engine.score` (the store makes
            the run resumable; only [T] statistics per example are kept, never logits).

    Returns:
        ``{"id": [N], "<kind>_<feature>[_<k or e>]": [N] float64, ...}`` in source order,
        e.g. ``cond_loss``, ``uncond_min_k_pp_0.2``, ``cfg_surp_count_2``,
        ``cfg_camia_slope``; higher = more likely member.
    """
    from memjax.engine import score

    features, kinds, ks, entropies = _check_options(features, logits, k, max_entropies)
    batch_size = check_positive_int(batch_size, "batch_size")
    null = _token_model(model, null_class, kinds)
    config = model.config
    vocab = getattr(config, "vocab_size", None)
    classes = getattr(config, "num_classes", None)

    def validate(fields: Mapping[str, np.ndarray], indices: np.ndarray) -> None:
        for name in ("class_labels", "input_ids"):
            if name not in fields:
                raise InputError(f"data: expected fields 'class_labels' and 'input_ids', got "
                                 f"{sorted(fields)}")
        labels, ids = np.asarray(fields["class_labels"]), np.asarray(fields["input_ids"])
        if labels.ndim != 1 or ids.ndim != 2 or ids.shape[1] < 1:
            raise InputError(f"class_labels / input_ids: expected one class and [T] tokens "
                             f"per example, got shapes {labels.shape[1:]} and {ids.shape[1:]}")
        for name, values, high in (("class_labels", labels, classes),
                                   ("input_ids", ids, vocab)):
            if not np.issubdtype(values.dtype, np.integer):
                raise InputError(f"{name}: expected integers, got dtype {values.dtype}")
            bad = (values < 0) | (values >= high) if high is not None else values < 0
            if bad.any():
                row = int(indices[np.argwhere(bad)[0][0]])
                raise InputError(f"{name}: example {row} has {values[bad][0]}, expected "
                                 f"0 <= value < {high}")

    fn = IARStatistics(model.apply, null, kinds)
    out = score(fn, model.params, source, batch_size=batch_size, mesh=mesh, store=store,
                progress=progress, with_ids=True, validate=validate,
                param_rules=model.partition_rules or None)
    if not isinstance(out, Mapping):  # a ScoreStore: its finished columns
        out = out.read()
    tokens = np.asarray(out["input_ids"])
    columns: dict[str, np.ndarray] = {"id": np.asarray(out["id"])}
    for kind in kinds:
        stats = {name: out[f"{kind}_{name}"] for name in STATS}
        columns |= iar_features_from_statistics(stats, tokens, prefix=f"{kind}_",
                                            features=features, ks=ks,
                                            max_entropies=entropies)
    return columns
