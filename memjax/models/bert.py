"""BERT (``BertModel``) in Flax NNX, matching Hugging Face's PyTorch implementation.

Devlin et al. 2019. Post-LayerNorm bidirectional encoder: word + learned absolute position
+ token-type embeddings, LayerNorm, then blocks of self-attention and a GELU/ReLU MLP,
each followed by a residual add and LayerNorm. ``__call__(input_ids, attention_mask,
token_type_ids)`` returns the last hidden state [B, T, D]; ``pooled`` gives BERT's
tanh pooler over the first token (only when the checkpoint has one) and
``sentence_embedding`` the sentence-transformers embedding: the masked mean of the
last hidden state (Reimers & Gurevych 2019), optionally L2-normalised.

The pooler is part of the model when ``config.add_pooling_layer``: :func:`from_hf_config`
sets it the way Hugging Face builds the model from ``config.json`` (``BertModel`` and the
sequence-level heads have one, ``BertForMaskedLM``, ``BertLMHeadModel``,
``BertForTokenClassification`` and ``BertForQuestionAnswering`` do not), and
:func:`refine_config` then follows the checkpoint: a pooler exactly when its weights exist.
Task heads of ``BertFor*`` checkpoints (``cls.*``, ``classifier.*``, ``qa_outputs.*``)
are not part of the encoder and are skipped.

Taps (see :mod:`memjax.models.taps`): ``embeddings`` (after the embedding LayerNorm),
``layers.{i}.attn_out`` (attention output projection, before the residual add),
``layers.{i}.mlp_hidden`` (intermediate units after the activation), ``layers.{i}.out``
(block output, equal to Hugging Face's ``hidden_states[i + 1]``), ``pooler`` (when
present and ``pooled`` is called).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from memjax.errors import InputError
from memjax.models.layers import ACTIVATIONS, AttentionMask, Dense, LayerNorm, attention
from memjax.models.registry import Architecture, check_config, register
from memjax.models.taps import Taps, tap


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    add_pooling_layer: bool = True


def _embedding(rngs: nnx.Rngs, rows: int, dim: int) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), (rows, dim)) * 0.02)


class BertLayer(nnx.Module):
    """One post-LN encoder block: LN(x + attn(x)), then LN(h + MLP(h))."""

    def __init__(self, config: BertConfig, index: int, *, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.query = Dense(d, d, rngs=rngs)
        self.key = Dense(d, d, rngs=rngs)
        self.value = Dense(d, d, rngs=rngs)
        self.attn_output = Dense(d, d, rngs=rngs)
        self.attn_norm = LayerNorm(d, eps=eps)
        self.intermediate = Dense(d, config.intermediate_size, rngs=rngs)
        self.output = Dense(config.intermediate_size, d, rngs=rngs)
        self.output_norm = LayerNorm(d, eps=eps)
        self.n_head = config.num_attention_heads
        self.act = config.hidden_act
        self.name = f"layers.{index}"

    def __call__(self, x: jax.Array, mask: AttentionMask, taps: Taps | None) -> jax.Array:
        b, t, d = x.shape
        shape = (b, t, self.n_head, d // self.n_head)
        q, k, v = (proj(x).reshape(shape) for proj in (self.query, self.key, self.value))
        a = attention(q, k, v, mask, (d // self.n_head) ** -0.5).reshape(b, t, d)
        a = tap(taps, f"{self.name}.attn_out", self.attn_output(a))
        h = self.attn_norm(x + a)
        m = tap(taps, f"{self.name}.mlp_hidden", ACTIVATIONS[self.act](self.intermediate(h)))
        return tap(taps, f"{self.name}.out", self.output_norm(h + self.output(m)))


class BertModel(nnx.Module):
    """BERT encoder; calling it returns the last hidden state [B, T, D]."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        self.word_embeddings = _embedding(rngs, config.vocab_size, d)
        self.position_embeddings = _embedding(rngs, config.max_position_embeddings, d)
        self.token_type_embeddings = _embedding(rngs, config.type_vocab_size, d)
        self.embeddings_norm = LayerNorm(d, eps=config.layer_norm_eps)
        self.layers = nnx.List([BertLayer(config, i, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.pooler = Dense(d, d, rngs=rngs) if config.add_pooling_layer else None

    def embed(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        """LayerNorm(word + token type + position) embeddings [B, T, D] of ids [B, T]."""
        t = input_ids.shape[-1]
        if t > self.config.max_position_embeddings:
            raise InputError(f"input_ids has {t} positions; this BERT supports at most "
                             f"{self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        # Same summation order as Hugging Face, so fp32 rounding agrees.
        x = self.word_embeddings[...][input_ids] + self.token_type_embeddings[...][token_type_ids]
        return self.embeddings_norm(
            x + jnp.broadcast_to(self.position_embeddings[...][:t], x.shape))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, *,
                 taps: Taps | None = None) -> jax.Array:
        """Last hidden state [B, T, D] of ``input_ids`` [B, T]; ``attention_mask`` [B, T]
        (1 = token, 0 = padding, default all 1) and ``token_type_ids`` [B, T] (default 0)."""
        x = tap(taps, "embeddings", self.embed(input_ids, token_type_ids))
        mask = AttentionMask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask, taps)
        return x

    def pooled(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *,
               taps: Taps | None = None) -> jax.Array:
        """BERT's pooler output [B, D]: tanh(dense(hidden state of the first token))."""
        if self.pooler is None:
            raise InputError("this BERT checkpoint has no pooler (add_pooling_layer=False)")
        hidden = self(input_ids, attention_mask, token_type_ids, taps=taps)
        return tap(taps, "pooler", jnp.tanh(self.pooler(hidden[:, 0])))

    def sentence_embedding(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                           token_type_ids: jax.Array | None = None, *, normalize: bool = False,
                           taps: Taps | None = None) -> jax.Array:
        """Sentence embedding [B, D]: masked mean of the last hidden state (Reimers &
        Gurevych 2019), L2-normalised when ``normalize`` (sentence-transformers'
        ``Normalize`` module; see :func:`read_sentence_config`)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        pooled = mean_pool(self(input_ids, attention_mask, token_type_ids, taps=taps),
                           attention_mask)
        return l2_normalize(pooled) if normalize else pooled


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Masked mean over tokens, as sentence-transformers' ``Pooling(mean)``.

    Args:
      hidden: [B, T, D] token embeddings.
      attention_mask: [B, T] (1 = token, 0 = padding).

    Returns:
      [B, D] float32: sum of the unmasked rows / max(count, 1e-9) (the clamp keeps an
      all-padding row finite, as sentence-transformers does).
    """
    mask = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` over the last axis (torch.nn.functional.normalize)."""
    norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers folder applies after the encoder.

    Attributes:
      normalize: whether a ``Normalize`` module L2-normalises the mean-pooled embedding.
      max_seq_length: the tokenizer truncation length (``sentence_bert_config.json``).
    """

    normalize: bool
    max_seq_length: int | None


_ST_MODULES = "sentence_transformers.models."


def read_sentence_config(folder: str | Path) -> SentenceConfig:
    """Read ``modules.json`` (+ ``1_Pooling``) of a sentence-transformers folder.

    memjax implements Transformer -> Pooling(mean) [-> Normalize]; any other pipeline
    (CLS or max pooling, Dense layers, ...) raises InputError naming the module.
    """
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        raise InputError(f"{str(folder)!r}: no modules.json (not a sentence-transformers "
                         "folder)")
    modules = json.loads(modules_file.read_text())
    kinds = [m.get("type", "").removeprefix(_ST_MODULES) for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
        raise InputError(f"{str(modules_file)!r}: modules {kinds}; memjax implements "
                         "Transformer, Pooling (mean) and optionally Normalize")
    pooling_file = folder / modules[1].get("path", "") / "config.json"
    pooling = json.loads(pooling_file.read_text()) if pooling_file.is_file() else {}
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
    if modes not in ([], ["pooling_mode_mean_tokens"]) or pooling.get("pooling_mode",
                                                                      "mean") != "mean":
        raise InputError(f"{str(pooling_file)!r}: pooling {modes or pooling}; memjax "
                         "implements mean pooling only")
    st_file = folder / "sentence_bert_config.json"
    st = json.loads(st_file.read_text()) if st_file.is_file() else {}
    return SentenceConfig(normalize="Normalize" in kinds,
                          max_seq_length=st.get("max_seq_length"))


# Sub-models whose BertModel is built with add_pooling_layer=False (modeling_bert.py).
_NO_POOLER = frozenset({"BertForMaskedLM", "BertLMHeadModel", "BertForTokenClassification",
                        "BertForQuestionAnswering"})
_IMPLEMENTED = {f.name for f in dataclasses.fields(BertConfig)} - {"add_pooling_layer"} | {
    # Dropout is off at inference; position_embedding_type is checked below.
    "hidden_dropout_prob", "attention_probs_dropout_prob", "position_embedding_type",
    # Keys of Google's original TF BERT configs that Hugging Face's BertModel never reads.
    "directionality", "pooler_fc_size", "pooler_num_attention_heads", "pooler_num_fc_layers",
    "pooler_size_per_head", "pooler_type", "output_past",
}
# From transformers.BertConfig().to_dict() (transformers 5.23), for attributes not above.
_DEFAULTS = {"is_decoder": False, "add_cross_attention": False}


def from_hf_config(hf: dict[str, Any]) -> BertConfig:
    check_config(hf, _IMPLEMENTED, _DEFAULTS, "bert")
    # Neutral for most models, but a decoder BERT attends causally and may cross-attend.
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key, False):
            raise InputError(f"bert config.json: {key}=True is not implemented (memjax ports "
                             "the bidirectional encoder)")
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise InputError(f"bert config.json position_embedding_type={position!r}: memjax "
                         "implements only 'absolute'")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise InputError(f"bert config.json hidden_act={act!r}: expected one of "
                         f"{sorted(ACTIVATIONS)}")
    fields = {f.name for f in dataclasses.fields(BertConfig)} - {"add_pooling_layer"}
    pooler = not _NO_POOLER.intersection(hf.get("architectures") or ())
    config = BertConfig(**{k: v for k, v in hf.items() if k in fields},
                        add_pooling_layer=pooler)
    if config.hidden_size % config.num_attention_heads:
        raise InputError(f"bert config.json: hidden_size={config.hidden_size} is not divisible "
                         f"by num_attention_heads={config.num_attention_heads}")
    return config


_LAYER_KEYS = {  # ours -> Hugging Face's name under encoder.layer.{i}.
    "query": "attention.self.query", "key": "attention.self.key",
    "value": "attention.self.value", "attn_output": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm", "intermediate": "intermediate.dense",
    "output": "output.dense", "output_norm": "output.LayerNorm",
}


def _linear(take, ours: tuple, theirs: str) -> dict[tuple, np.ndarray | None]:
    """A PyTorch Linear [out, in] -> Dense kernel [in, out] and bias."""
    weight = take(f"{theirs}.weight")
    return {(*ours, "kernel"): None if weight is None else weight.T,
            (*ours, "bias"): take(f"{theirs}.bias")}


def _norm(take, ours: tuple, theirs: str) -> dict[tuple, np.ndarray | None]:
    return {(*ours, "scale"): take(f"{theirs}.weight"), (*ours, "bias"): take(f"{theirs}.bias")}


def convert(reader, config: BertConfig) -> dict[tuple, np.ndarray]:
    """HF BERT keys (with or without the ``bert.`` prefix of BertFor*) -> param paths."""
    prefix = "bert." if any(k.startswith("bert.") for k in reader.tensors) else ""
    take = lambda key: reader.take(prefix + key)
    params = {(name,): take(f"embeddings.{name}.weight") for name in
              ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    params.update(_norm(take, ("embeddings_norm",), "embeddings.LayerNorm"))
    for i in range(config.num_hidden_layers):
        for ours, theirs in _LAYER_KEYS.items():
            convert_one = _norm if ours.endswith("norm") else _linear
            params.update(convert_one(take, ("layers", i, ours), f"encoder.layer.{i}.{theirs}"))
    if config.add_pooling_layer:
        params.update(_linear(take, ("pooler",), "pooler.dense"))
    return {k: v for k, v in params.items() if v is not None}


def refine_config(config: BertConfig, keys: frozenset[str]) -> BertConfig:
    """The pooler is part of the model exactly when the checkpoint holds its weights (a
    ``BertModel`` may be saved with ``add_pooling_layer=False``, which config.json omits)."""
    has_pooler = any(k.endswith("pooler.dense.weight") or k.endswith("pooler.dense.bias")
                     for k in keys)
    return dataclasses.replace(config, add_pooling_layer=has_pooler)


def partition_rules(config: BertConfig) -> list[tuple[str, PartitionSpec]]:
    """Megatron-style: column-parallel q/k/v and intermediate, row-parallel output
    projections (one all-reduce per attention and per MLP)."""
    return [
        (r"/(query|key|value|intermediate)/kernel$", PartitionSpec(None, "model")),
        (r"/(query|key|value|intermediate)/bias$", PartitionSpec("model")),
        (r"/(attn_output|output)/kernel$", PartitionSpec("model", None)),
        (r"^word_embeddings$", PartitionSpec("model", None)),
    ]


ARCH = register(Architecture(
    name="bert", model_types=("bert",), from_hf_config=from_hf_config,
    build=lambda config, rngs: BertModel(config, rngs=rngs), convert=convert,
    partition_rules=partition_rules,
    # Buffers (position/token-type id ranges) and the task heads of BertFor* checkpoints.
    ignore=(r"embeddings\.(position_ids|token_type_ids)$", r"^(cls|classifier|qa_outputs)\."),
    config_class=BertConfig, refine_config=refine_config,
))
