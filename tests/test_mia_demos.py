"""Membership inference on real data: a tiny GPT-2 trained on half of real texts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.data import stdlib_docstrings
from memjax.engine import score
from memjax.metrics import auc_confidence_interval, roc_auc
from memjax.mia import loss, min_k_plus_plus
from memjax.models.gpt2 import GPT2Config
from memjax.signals import tokens
from memjax.train.lm import byte_tokens, fit_gpt2, gpt2_graph

LENGTH = 48


@pytest.fixture(scope="module")
def trained_lm():
    """A 2-layer GPT-2 trained on a random half of the standard library's docstrings."""
    texts = stdlib_docstrings()
    ids, mask = byte_tokens(texts, LENGTH)
    member = np.zeros(len(texts), bool)
    member[np.random.default_rng(0).permutation(len(texts))[: len(texts) // 2]] = True
    config = GPT2Config(vocab_size=256, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=4)
    train = jax.jit(functools.partial(fit_gpt2, config=config, steps=150))
    params = train(jax.random.key(0), ids, mask, member)
    return texts, ids, mask, member, config, params


def token_signals(graph, params, example):
    """The engine's per-example token signals: position t scores byte t+1."""
    lm = nnx.merge(graph, params)
    ids, mask = example["input_ids"], example["attention_mask"]
    hidden = lm.hidden_states(ids[None], mask[None])[0]
    scored = (mask != 0) & (jnp.roll(mask, -1) != 0) & (jnp.arange(ids.shape[0]) < LENGTH - 1)
    return {**tokens(hidden=hidden, unembedding=lm.unembedding(), targets=jnp.roll(ids, -1),
                     mask=scored, chunk_size=64), "scored": scored}


def test_loss_and_min_k_plus_plus_detect_training_texts(trained_lm):
    texts, ids, mask, member, config, params = trained_lm
    signals = score(functools.partial(token_signals, gpt2_graph(config)), params,
                    {"input_ids": ids, "attention_mask": mask}, batch_size=16, progress=False)
    attacks = {"LOSS": loss(signals["mean_loss"]),
               "Min-K%++": min_k_plus_plus(signals["logp"], signals["mu"], signals["sigma"],
                                           signals["scored"].astype(bool), k=0.2)}
    for name, scores in attacks.items():
        low, high = auc_confidence_interval(scores, member)
        assert roc_auc(scores, member) > 0.5 and low > 0.5, (name, low, high)
