"""Membership inference against a prompted causal LM (in-context learning), and the
prompt-ensemble mitigation.

Duan, Dziedzic, Yaghini, Papernot, Boenisch, "On the privacy risk of in-context learning"
(TrustNLP 2023) and "Flocks of stochastic parrots: differentially private prompt learning
for large language models" (NeurIPS 2023). A downstream classification task is solved by
prompting a causal LM with k demonstrations (``text -> label`` pairs) followed by the
query; the prompted model's output is its probability vector over the downstream labels.
The attack queries the prompted model with a candidate and scores it by the probability
of the candidate's correct label: the demonstrations in the prompt (the members) get a
higher one. The mitigation ensembles M prompts with disjoint demonstration sets and
averages their label distributions, so each member's own prompt is one vote of M.

Label probability. For each label l with verbalizer tokens ``v_1 .. v_m`` (the template's
answer text, tokenised after the context), the model's teacher-forced
``log p(v | context) = sum_j log p(v_j | context, v_<j)`` over the whole vocabulary; then
either the paper's probability vector over the downstream labels, ``softmax_l`` of those
log-probabilities (``normalize="labels"``, the default), or the raw ``exp`` of them
(``normalize="none"``: the verbalizer's probability under the full vocabulary, which does
not sum to one over the labels).

Cost. Every (prompt, query, label) sequence runs the model in full; prompts share their
prefix across queries, but no KV cache of the prompt is kept (an optimisation skipped
here: each forward recomputes the prompt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memjax.errors import InputError

#: How label log-probabilities become the prompted model's output distribution.
ICL_NORMALIZATIONS = ("labels", "none")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How demonstrations and the query are written.

    A demonstration is ``query.format(text=t) + answer.format(label=w) + separator`` for a
    text t with label word w (its verbalizer); a prompt is its demonstrations joined in
    order; the model reads ``prompt + query.format(text=q)`` and is scored on each
    ``answer.format(label=w)`` continuation.

    Attributes:
      labels: the label words (verbalizers), one per class, in class order.
      query: the text of one query, with a ``{text}`` field.
      answer: the continuation that names a label, with a ``{label}`` field.
      separator: written after each demonstration.
    """

    labels: tuple[str, ...]
    query: str = "Text: {text}\nTopic:"
    answer: str = " {label}"
    separator: str = "\n\n"

    def __post_init__(self):
        labels = tuple(self.labels)
        object.__setattr__(self, "labels", labels)
        if len(labels) < 2:
            raise InputError(f"labels: expected at least 2 label words, got {list(labels)}")
        if any(not isinstance(w, str) or not w.strip() for w in labels):
            raise InputError(f"labels: expected non-empty strings, got {list(labels)}")
        if len(set(labels)) != len(labels):
            raise InputError(f"labels: label words must be distinct, got {list(labels)}")
        for name, field in (("query", "{text}"), ("answer", "{label}")):
            value = getattr(self, name)
            if not isinstance(value, str) or field not in value:
                raise InputError(f"template {name} {value!r}: expected a string with a "
                                 f"{field} field")
        try:
            self.query.format(text="")
            self.answer.format(label="")
        except (KeyError, IndexError, ValueError) as error:
            raise InputError(f"template: only {{text}} (query) and {{label}} (answer) "
                             f"fields are allowed ({error!r})") from None

    def demonstration(self, text: str, label: int) -> str:
        """One demonstration: the query of ``text`` answered with label ``label``."""
        return self.query.format(text=text) + self.answer.format(label=self.labels[label]) \
            + self.separator


def build_prompt(template: PromptTemplate, texts: Sequence[str],
                 labels: Sequence[int]) -> str:
    """The prompt of demonstrations ``(texts[i], labels[i])`` in order (label indices)."""
    if len(texts) != len(labels):
        raise InputError(f"demonstrations: {len(texts)} texts but {len(labels)} labels")
    indices = label_indices(labels, template)
    return "".join(template.demonstration(t, int(y)) for t, y in zip(texts, indices, strict=True))


def label_indices(labels: Sequence[Any], template: PromptTemplate) -> np.ndarray:
    """[N] int64 class indices from labels given as label words of the template or as
    integers in ``[0, n_labels)``; refuses anything else, naming the first bad label."""
    out = np.empty(len(labels), np.int64)
    for i, label in enumerate(labels):
        if isinstance(label, str) and label in template.labels:
            out[i] = template.labels.index(label)
        elif isinstance(label, int | np.integer) and not isinstance(label, bool) \
                and 0 <= int(label) < len(template.labels):
            out[i] = int(label)
        else:
            raise InputError(f"label {label!r} (example {i}) is not one of the label words "
                             f"{list(template.labels)} nor an index below "
                             f"{len(template.labels)}")
    return out


# --------------------------------------------------------------------------- tokens

def token_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """``text -> token ids`` (the checkpoint's own special tokens included) for a
    ``transformers`` tokenizer, a ``tokenizers.Tokenizer``, or a callable already."""
    if hasattr(tokenizer, "convert_tokens_to_ids"):  # transformers
        return lambda text: list(tokenizer(text)["input_ids"])
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return lambda text: list(tokenizer.encode(text).ids)
    if callable(tokenizer):
        return lambda text: [int(i) for i in tokenizer(text)]
    raise InputError(f"tokenizer: expected a transformers tokenizer, a tokenizers.Tokenizer "
                     f"or a callable text -> list[int], got {type(tokenizer).__name__}")


def model_tokenizer(model: Any, tokenizer: Any = None) -> Callable[[str], list[int]]:
    """The encoder of ``tokenizer``, else of the model's own tokenizer folder."""
    if tokenizer is None:
        if not model.tokenizer:
            raise InputError(f"tokenizer: {model.name} has no tokenizer folder; pass "
                             "tokenizer= (e.g. a byte-level text -> list(text.encode()))")
        from memjax.data import load_tokenizer

        tokenizer = load_tokenizer(model.tokenizer)
    elif isinstance(tokenizer, str):
        from memjax.data import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return token_encoder(tokenizer)


def answer_sequences(encode: Callable[[str], list[int]], context: str,
                     answers: Sequence[str], where: str) -> list[tuple[list[int], int]]:
    """Per answer: (ids of ``context + answer``, number of context tokens).

    The answer's tokens are those of the whole text after the context's own tokens (the
    whole text is tokenised at once, so the tokenizer sees the boundary as in use);
    refused when the context's tokens are not a prefix of the whole (the tokenizer merged
    across the boundary) or the answer adds no token.
    """
    context_ids = encode(context)
    out = []
    for answer in answers:
        ids = encode(context + answer)
        n = len(context_ids)
        if ids[:n] != context_ids or len(ids) <= n:
            raise InputError(f"{where}: the tokenizer does not split {context[-20:]!r} + "
                             f"{answer!r} at the answer (change the template's answer or "
                             "query so the label starts a new token)")
        out.append((ids, n))
    return out


def candidate_arrays(encode: Callable[[str], list[int]], prompts: Sequence[str],
                     queries: Sequence[str], template: PromptTemplate, *,
                     context_length: int | None, pad_id: int = 0,
                     pair_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Token arrays of every (prompt + query, label) sequence, right-padded.

    Args:
      prompts, queries: N prompts and N query texts (pair i: prompt i then query i).
      context_length: the model's context; a longer sequence is refused, naming its prompt.
      pair_names: how messages name pair i (default ``prompt i with query i``).

    Returns:
      ``input_ids``, ``attention_mask`` and ``answer_mask`` (1 at the answer's tokens),
      each [N, n_labels, T] int32, T the longest sequence rounded up to a multiple of 8.
    """
    if len(prompts) != len(queries):
        raise InputError(f"queries: {len(queries)} queries for {len(prompts)} prompts")
    if not len(queries):
        raise InputError("queries: expected at least one query")
    answers = [template.answer.format(label=w) for w in template.labels]
    rows = []
    for i, (prompt, query) in enumerate(zip(prompts, queries, strict=True)):
        name = pair_names[i] if pair_names is not None else f"prompt {i} with query {i}"
        seqs = answer_sequences(encode, prompt + template.query.format(text=query), answers,
                                name)
        longest = max(len(ids) for ids, _ in seqs)
        if context_length is not None and longest > context_length:
            raise InputError(f"{name}: {longest} tokens, longer than the "
                             f"model's context of {context_length} (use fewer or shorter "
                             "demonstrations)")
        rows.append(seqs)
    length = -(-max(len(ids) for seqs in rows for ids, _ in seqs) // 8) * 8
    if context_length is not None:
        length = min(length, context_length)
    shape = (len(rows), len(answers), length)
    ids = np.full(shape, pad_id, np.int32)
    mask = np.zeros(shape, np.int32)
    answer = np.zeros(shape, np.int32)
    for i, seqs in enumerate(rows):
        for j, (seq, n_context) in enumerate(seqs):
            ids[i, j, :len(seq)] = seq
            mask[i, j, :len(seq)] = 1
            answer[i, j, n_context:len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "answer_mask": answer}


@dataclasses.dataclass(frozen=True)
class AnswerLogProb:
    """fn(params, example) -> [n_labels] teacher-forced log-probability of each answer.

    ``example``: ``input_ids``, ``attention_mask``, ``answer_mask`` [n_labels, T] (one
    sequence per label). ``apply(params, {"input_ids": [T], "attention_mask": [T]})`` gives
    the causal LM's logits [T, V]; the answer's log-probability is the sum over its tokens
    t of ``log_softmax(logits[t - 1])[ids[t]]`` (float32).
    """

    apply: Callable[[Any, dict[str, jax.Array]], jax.Array]

    def __call__(self, params: Any, example: dict[str, jax.Array]) -> jax.Array:
        def one(ids, mask, answer):
            logits = self.apply(params, {"input_ids": ids, "attention_mask": mask})
            logp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1)
            token = jnp.take_along_axis(logp, ids[1:, None], axis=-1)[:, 0]
            return jnp.sum(jnp.where(answer[1:] > 0, token, 0.0))

        return jax.vmap(one)(example["input_ids"], example["attention_mask"],
                             example["answer_mask"])


def icl_label_log_probs(model: Any, prompts: Sequence[str], queries: Sequence[str],
                        template: PromptTemplate, *, tokenizer: Any = None,
                        batch_size: int = 8, progress: bool = False,
                        pair_names: Sequence[str] | None = None) -> np.ndarray:
    """Log-probability of every label's answer after ``prompts[i] + query(queries[i])``.

    Args:
      model: a ``memjax.Model`` of kind ``"causal_lm"`` (its apply gives logits [T, V]).
      prompts, queries: N prompts (:func:`build_prompt`) and N query texts, paired.
      template: the :class:`PromptTemplate` the prompts were written with.
      tokenizer: default the model's own; or a transformers / tokenizers tokenizer, a
        folder, or a callable ``text -> list[int]`` (e.g. bytes for memjax.train's LMs).
      batch_size: (prompt, query) pairs per engine batch (each runs n_labels sequences).

    Returns:
      [N, n_labels] float64: ``log p(answer_l | prompt_i + query_i)`` over the vocabulary.
    """
    from memjax.engine import score

    if getattr(model, "kind", None) != "causal_lm":
        raise InputError(f"model: expected a causal LM (kind 'causal_lm'), got "
                         f"{getattr(model, 'kind', type(model).__name__)!r}")
    encode = model_tokenizer(model, tokenizer)
    arrays = candidate_arrays(encode, prompts, queries, template,
                              context_length=model.context_length,
                              pair_names=pair_names)
    result = score(AnswerLogProb(model.apply), model.params, arrays,
                   batch_size=_engine_batch(batch_size), progress=progress)
    return np.asarray(result["score"], np.float64)


def _engine_batch(batch_size: int) -> int:
    """``batch_size`` rounded up to a multiple of the devices (the engine's data axis)."""
    n = jax.device_count()
    return max(n, -(-int(batch_size) // n) * n)


# --------------------------------------------------------------------------- scores

def check_normalize(normalize: str) -> str:
    if normalize not in ICL_NORMALIZATIONS:
        raise InputError(f"normalize: expected one of {list(ICL_NORMALIZATIONS)}, got "
                         f"{normalize!r}")
    return normalize


def icl_label_distribution(label_log_probs: Any, normalize: str = "labels") -> np.ndarray:
    """The prompted model's output over the labels, [..., n_labels] float64.

    ``"labels"`` (the paper's probability vector over the downstream labels):
    ``softmax`` over the last axis; ``"none"``: ``exp`` of each label's log-probability
    (its probability under the full vocabulary).
    """
    logp = np.asarray(label_log_probs, np.float64)
    if logp.ndim < 1 or logp.shape[-1] < 2:
        raise InputError(f"label_log_probs: expected [..., n_labels >= 2], got {logp.shape}")
    if not np.isfinite(logp).all():
        raise InputError("label_log_probs: expected finite values")
    if check_normalize(normalize) == "none":
        return np.exp(logp)
    shifted = logp - logp.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


def icl_ensemble_distribution(label_log_probs: Any, normalize: str = "labels") -> np.ndarray:
    """[N, n_labels]: the mean over prompts of each prompt's label distribution
    (``label_log_probs`` [M, N, n_labels]), the ensemble's output (Duan et al.)."""
    logp = np.asarray(label_log_probs, np.float64)
    if logp.ndim != 3:
        raise InputError(f"label_log_probs: expected [prompts, queries, labels], got "
                         f"{logp.shape}")
    return icl_label_distribution(logp, normalize).mean(axis=0)


def icl_correct_label_score(distribution: Any, labels: Any) -> np.ndarray:
    """[N] probability of each query's correct label (the attack's score; higher = more
    likely member), from ``distribution`` [N, n_labels] and class indices ``labels`` [N]."""
    dist = np.asarray(distribution, np.float64)
    y = np.asarray(labels)
    if dist.ndim != 2 or y.shape != (dist.shape[0],):
        raise InputError(f"labels: expected shape ({dist.shape[0]},) for a distribution of "
                         f"shape {dist.shape}, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (y < 0).any() or (y >= dist.shape[1]).any():
        raise InputError(f"labels: expected class indices in [0, {dist.shape[1]})")
    return dist[np.arange(len(y)), y]


def draw_demonstration_sets(n: int, k: int, prompts: int, seed: int) -> np.ndarray:
    """[prompts, k] int64: disjoint random example indices (seeded), one row per prompt."""
    for name, value in (("k", k), ("prompts", prompts)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise InputError(f"{name}: expected a positive integer, got {value!r}")
    if k * prompts > n:
        raise InputError(f"k={k} demonstrations x {prompts} prompts = {k * prompts} "
                         f"examples needed, but the data has {n}")
    order = np.random.default_rng(seed).permutation(n)
    return order[:k * prompts].reshape(prompts, k).astype(np.int64)


def check_demonstration_sets(sets: Any, n: int) -> np.ndarray:
    """[M, k] int64 demonstration indices, refused when out of range or overlapping."""
    try:
        a = np.asarray(sets)
    except ValueError:
        raise InputError("demonstration_sets: expected M sets of k indices (equal k)") from None
    if a.ndim != 2 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"demonstration_sets: expected an [M, k] integer array, got shape "
                         f"{a.shape} and dtype {a.dtype}")
    if (a < 0).any() or (a >= n).any():
        raise InputError(f"demonstration_sets: indices must lie in [0, {n})")
    values, counts = np.unique(a, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"demonstration_sets: example {int(values[counts > 1][0])} is in "
                         "more than one demonstration slot; the sets must be disjoint")
    return a.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class IclMembership:
    """Result of :func:`icl_membership` (N candidates, M prompts, L labels).

    Attributes:
      label_log_probs: [M, N, L] log p(answer_l | prompt_m + query_n).
      labels: [N] class index of each candidate.
      is_member: [N] bool, True for the candidates that are demonstrations of a prompt.
      prompt_index: [N] the prompt a member is a demonstration of; for non-members the
        prompt the single-prompt attack queries (round-robin over non-members in order).
      single_prompt: [N] correct-label probability under the candidate's own prompt.
      ensemble: [N] correct-label probability of the M-prompt ensemble.
      ensemble_prediction: [N] the ensemble's predicted class.
      normalize: how label log-probabilities became distributions.
    """

    label_log_probs: np.ndarray
    labels: np.ndarray
    is_member: np.ndarray
    prompt_index: np.ndarray
    single_prompt: np.ndarray
    ensemble: np.ndarray
    ensemble_prediction: np.ndarray
    normalize: str

    def metrics(self) -> dict[str, float]:
        """AUC of both attacks and the task accuracy on the non-members (held-out)."""
        from memjax.metrics import roc_auc

        single_pred = np.argmax(icl_label_distribution(
            self.label_log_probs[self.prompt_index, np.arange(len(self.labels))],
            self.normalize), axis=-1)
        held_out = ~self.is_member
        return {"auc_single_prompt": float(roc_auc(self.single_prompt, self.is_member)),
                "auc_ensemble": float(roc_auc(self.ensemble, self.is_member)),
                "accuracy_single_prompt": float(np.mean(single_pred[held_out]
                                                        == self.labels[held_out])),
                "accuracy_ensemble": float(np.mean(self.ensemble_prediction[held_out]
                                                   == self.labels[held_out]))}


def icl_scores(label_log_probs: Any, labels: Any, demonstration_sets: Any,
                      normalize: str = "labels") -> IclMembership:
    """The attacks from label log-probabilities [M, N, L] of every candidate under every
    prompt; ``demonstration_sets`` [M, k] are the candidates in each prompt (disjoint)."""
    logp = np.asarray(label_log_probs, np.float64)
    if logp.ndim != 3:
        raise InputError(f"label_log_probs: expected [prompts, queries, labels], got "
                         f"{logp.shape}")
    m, n, _ = logp.shape
    sets = check_demonstration_sets(demonstration_sets, n)
    if sets.shape[0] != m:
        raise InputError(f"demonstration_sets: {sets.shape[0]} sets for {m} prompts")
    y = np.asarray(labels)
    is_member = np.zeros(n, bool)
    is_member[sets.ravel()] = True
    prompt = np.empty(n, np.int64)
    prompt[sets.ravel()] = np.repeat(np.arange(m), sets.shape[1])
    prompt[~is_member] = np.arange(int((~is_member).sum())) % m
    own = icl_label_distribution(logp[prompt, np.arange(n)], normalize)
    ensemble = icl_ensemble_distribution(logp, normalize)
    return IclMembership(logp, y, is_member, prompt, icl_correct_label_score(own, y),
                         icl_correct_label_score(ensemble, y), np.argmax(ensemble, axis=-1),
                         normalize)


def icl_membership(model: Any, texts: Sequence[str], labels: Sequence[Any],
                   template: PromptTemplate, demonstration_sets: Any, *,
                   normalize: str = "labels", tokenizer: Any = None, batch_size: int = 8,
                   progress: bool = False) -> IclMembership:
    """Membership inference against M prompts with disjoint demonstration sets.

    Prompt m is :func:`build_prompt` of the candidates ``demonstration_sets[m]``; every
    candidate is queried under every prompt (:func:`icl_label_log_probs`). The
    single-prompt attack scores a candidate by the correct label's probability under its
    own prompt (:attr:`IclMembership.prompt_index`), the ensemble attack by the correct
    label's probability of the mean of the M label distributions (Duan et al. 2023).

    Args:
      model: a causal-LM ``memjax.Model``.
      texts, labels: N candidates; labels as label words of ``template`` or indices.
      demonstration_sets: [M, k] disjoint candidate indices (:func:`draw_demonstration_sets`).
      normalize: ``"labels"`` (the paper's, default) or ``"none"`` (see
        :func:`icl_label_distribution`).
      tokenizer, batch_size, progress: as in :func:`icl_label_log_probs`.
    """
    check_normalize(normalize)
    if isinstance(texts, str) or len(texts) != len(labels):
        raise InputError(f"texts: expected a list of {len(labels)} strings, one per label")
    y = label_indices(list(labels), template)
    sets = check_demonstration_sets(demonstration_sets, len(texts))
    prompts = [build_prompt(template, [texts[i] for i in row], y[row]) for row in sets]
    pairs_prompt = [p for p in prompts for _ in texts]
    names = [f"prompt {m} with query {n}" for m in range(len(prompts)) for n in range(len(texts))]
    logp = icl_label_log_probs(model, pairs_prompt, list(texts) * len(prompts), template,
                               tokenizer=tokenizer, batch_size=batch_size,
                               progress=progress, pair_names=names)
    return icl_scores(logp.reshape(len(prompts), len(texts), -1), y, sets, normalize)
