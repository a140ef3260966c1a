"""Tiny causal LMs trained on a keep-mask subset of texts (membership demonstrations).

Texts are byte-tokenised (vocabulary 256, no tokenizer files needed): ``byte_tokens``;
:func:`save_byte_tokenizer` writes the Hugging Face tokenizer files that give the same
ids, so a saved model scores users' JSONL texts through ``memjax.load`` like any
checkpoint. :func:`fit_causal_lm` (any NNX causal LM port: GPT-2, the Llama family, ...)
and :func:`fit_gpt2` are pure functions of (key, data, keep mask): full-batch Adam on the
masked next-token loss of the kept texts, deterministic by key, vmappable over (key, keep).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from memjax.errors import InputError
from memjax.models.gpt2 import GPT2Config, GPT2LMHeadModel
from memjax.train.reference import check_keep


def byte_tokens(texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [N, length] int32, attention_mask [N, length] int32) of UTF-8 bytes,
    truncated or zero-padded to ``length``."""
    if length < 2:
        raise InputError(f"length={length}: expected at least 2 tokens")
    ids = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
        data = np.frombuffer(text.encode("utf-8")[:length], np.uint8)
        ids[row, :len(data)], mask[row, :len(data)] = data, 1
    return ids, mask


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel
    pre-tokenizer of the ``tokenizers`` library (Radford et al. 2019)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def save_byte_tokenizer(folder: str | Path) -> Path:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` into ``folder``: a Hugging Face
    fast tokenizer whose ids are the UTF-8 bytes of the text (no special tokens, pad id 0),
    so ``tokenizer(text, max_length=L, truncation=True, padding="max_length")`` gives
    :func:`byte_tokens`' ids and mask."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                       use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    pad = _byte_to_unicode()[0]
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": pad,
         "model_max_length": 1 << 30, "padding_side": "right"}, indent=1))
    return folder


def next_token_loss(model: nnx.Module, ids: jax.Array, mask: jax.Array,
                    weight: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over real (mask) positions of weighted texts."""
    logp = jax.nn.log_softmax(model(ids, mask)[:, :-1].astype(jnp.float32))
    token_logp = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    scored = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32) * weight[:, None]
    return -(token_logp * scored).sum() / jnp.maximum(scored.sum(), 1.0)


def fit_causal_lm(key: jax.Array, ids: jax.Array, mask: jax.Array, keep: jax.Array, *,
                  build: Callable[[nnx.Rngs], nnx.Module], steps: int = 200,
                  learning_rate: float = 3e-3) -> nnx.State:
    """Train ``build(rngs)`` (a causal LM port: ``model(ids, mask)`` -> logits [B, T, V]) on
    the texts with ``keep`` = 1, full-batch Adam; returns its NNX state (params).

    Build the model back with ``nnx.merge(nnx.split(build(...))[0], state)``.
    """
    graph, params = nnx.split(build(nnx.Rngs(params=key)))
    optimizer = optax.adam(learning_rate)
    weight = keep.astype(jnp.float32)

    def step(carry, _):
        p, state = carry
        grads = jax.grad(lambda q: next_token_loss(nnx.merge(graph, q), ids, mask,
                                                   weight))(p)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def fit_gpt2(key: jax.Array, ids: jax.Array, mask: jax.Array, keep: jax.Array, *,
             config: GPT2Config, steps: int = 200, learning_rate: float = 3e-3) -> nnx.State:
    """:func:`fit_causal_lm` of a GPT-2; :func:`gpt2_graph` gives its graph."""
    return fit_causal_lm(key, ids, mask, keep, steps=steps, learning_rate=learning_rate,
                         build=functools.partial(_gpt2, config))


def _gpt2(config: GPT2Config, rngs: nnx.Rngs) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(config, rngs=rngs)


def gpt2_graph(config: GPT2Config):
    """The NNX graph definition that :func:`fit_gpt2`'s params merge into."""
    return nnx.split(nnx.eval_shape(lambda: GPT2LMHeadModel(config, rngs=nnx.Rngs(0))))[0]


def train_gpt2s(key: jax.Array, ids: np.ndarray, mask: np.ndarray, keep: np.ndarray, *,
                config: GPT2Config, steps: int = 200,
                learning_rate: float = 3e-3) -> nnx.State:
    """Train one GPT-2 per row of ``keep`` [M, N] bool, all in one vmapped, jitted program.

    Args:
      key: model m is initialised from ``jax.random.split(key, M)[m]``, so the result
        equals M separate :func:`fit_gpt2` calls with those keys.
      ids, mask: [N, L] int32 token ids and attention mask (:func:`byte_tokens`).
      keep: [M, N] bool, which texts each model trains on.

    Returns:
      The stacked NNX state: every leaf has a leading axis of size M (host arrays).
    """
    keep = check_keep(keep, len(ids))
    keys = jax.random.split(key, keep.shape[0])
    fit = functools.partial(fit_gpt2, config=config, steps=steps, learning_rate=learning_rate)
    trained = jax.jit(jax.vmap(fit, in_axes=(0, None, None, 0)))(keys, ids, mask, keep)
    return jax.tree.map(np.asarray, trained)
