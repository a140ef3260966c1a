"""GPT-2 (``GPT2LMHeadModel``) in Flax NNX, matching Hugging Face's PyTorch implementation.

Radford et al. 2019. Pre-LayerNorm decoder blocks, learned absolute positions, the
unembedding tied to the token embedding. ``__call__`` returns logits [B, T, V];
``hidden_states`` returns the final (post ``ln_f``) hidden states [B, T, D] and
``unembedding()`` the [D, V] output matrix, for the vocabulary-chunked token signals.

Taps (see :mod:`memjax.models.taps`): ``layers.{i}.attn_out``, ``layers.{i}.mlp_hidden``
(after the activation), ``layers.{i}.out`` (block output), ``final`` (after ``ln_f``).
"""

from __future__ import annotations

import dataclasses
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
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd


class GPT2Block(nnx.Module):
    def __init__(self, config: GPT2Config, index: int, *, rngs: nnx.Rngs):
        d = config.n_embd
        self.ln_1 = LayerNorm(d, eps=config.layer_norm_epsilon)
        self.c_attn = Dense(d, 3 * d, rngs=rngs)
        self.c_proj = Dense(d, d, rngs=rngs)
        self.ln_2 = LayerNorm(d, eps=config.layer_norm_epsilon)
        self.c_fc = Dense(d, config.inner, rngs=rngs)
        self.mlp_proj = Dense(config.inner, d, rngs=rngs)
        self.n_head = config.n_head
        head_dim = d // config.n_head
        scale = head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= index + 1
        self.scale = scale
        self.act = config.activation_function
        self.name = f"layers.{index}"

    def __call__(self, x, mask, taps):
        b, t, d = x.shape
        q, k, v = jnp.split(self.c_attn(self.ln_1(x)), 3, axis=-1)
        shape = (b, t, self.n_head, d // self.n_head)
        a = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), mask, self.scale)
        a = tap(taps, f"{self.name}.attn_out", self.c_proj(a.reshape(b, t, d)))
        x = x + a
        h = tap(taps, f"{self.name}.mlp_hidden", ACTIVATIONS[self.act](self.c_fc(self.ln_2(x))))
        return tap(taps, f"{self.name}.out", x + self.mlp_proj(h))


class GPT2LMHeadModel(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = nnx.Param(jax.random.normal(rngs.params(), (config.vocab_size,
                                                                config.n_embd)) * 0.02)
        self.wpe = nnx.Param(jax.random.normal(rngs.params(), (config.n_positions,
                                                                config.n_embd)) * 0.01)
        self.layers = nnx.List([GPT2Block(config, i, rngs=rngs) for i in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      taps: Taps | None = None) -> jax.Array:
        """Final hidden states [B, T, D] (after ``ln_f``) of ``input_ids`` [B, T]."""
        t = input_ids.shape[-1]
        if t > self.config.n_positions:
            raise InputError(f"input_ids has {t} positions; GPT-2 supports at most "
                             f"{self.config.n_positions}")
        x = self.wte[...][input_ids]
        x = x + jnp.broadcast_to(self.wpe[...][:t], x.shape)
        mask = AttentionMask(attention_mask, causal=True)  # never a [T, T] array
        for block in self.layers:
            x = block(x, mask, taps)
        return tap(taps, "final", self.ln_f(x))

    def unembedding(self) -> jax.Array:
        """The output matrix [D, V] (tied to the token embedding)."""
        return self.wte[...].T

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 taps: Taps | None = None) -> jax.Array:
        """Logits [B, T, V]."""
        h = self.hidden_states(input_ids, attention_mask, taps=taps)
        return h @ self.unembedding().astype(h.dtype)


_IMPLEMENTED = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                "activation_function", "layer_norm_epsilon", "scale_attn_weights",
                "scale_attn_by_inverse_layer_idx", "n_ctx",
                # Dropout is off at inference; the upcast only changes fp16 rounding.
                "resid_pdrop", "embd_pdrop", "attn_pdrop", "reorder_and_upcast_attn",
                # Sequence-summary head of GPT2DoubleHeadsModel, which is not ported.
                "summary_type", "summary_use_proj", "summary_activation",
                "summary_proj_to_labels", "summary_first_dropout"}
_DEFAULTS = {"add_cross_attention": False, "tie_word_embeddings": True}


def from_hf_config(hf: dict[str, Any]) -> GPT2Config:
    check_config(hf, _IMPLEMENTED, _DEFAULTS, "gpt2")
    if hf.get("tie_word_embeddings", True) is False:
        raise InputError("gpt2 config.json: tie_word_embeddings=False is not implemented")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise InputError(f"gpt2 config.json activation_function={act!r}: expected one of "
                         f"{sorted(ACTIVATIONS)}")
    fields = {f.name for f in dataclasses.fields(GPT2Config)}
    config = GPT2Config(**{k: v for k, v in hf.items() if k in fields})
    if config.n_embd % config.n_head:
        raise InputError(f"gpt2 config.json: n_embd={config.n_embd} is not divisible by "
                         f"n_head={config.n_head}")
    return config


def convert(reader, config: GPT2Config) -> dict[tuple, np.ndarray]:
    """HF GPT-2 keys -> param paths. Conv1D weights are already [in, out]."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in reader.tensors) else ""
    take = lambda key: reader.take(prefix + key)
    params = {("wte",): take("wte.weight"), ("wpe",): take("wpe.weight"),
              ("ln_f", "scale"): take("ln_f.weight"), ("ln_f", "bias"): take("ln_f.bias")}
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "c_attn": "attn.c_attn", "c_proj": "attn.c_proj",
             "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}
    for i in range(config.n_layer):
        for ours, theirs in names.items():
            is_norm = ours.startswith("ln")
            params[("layers", i, ours, "scale" if is_norm else "kernel")] = take(
                f"h.{i}.{theirs}.weight")
            params[("layers", i, ours, "bias")] = take(f"h.{i}.{theirs}.bias")
    if "lm_head.weight" in reader:
        tied = reader.take("lm_head.weight")
        if params[("wte",)] is not None and not np.array_equal(tied, params[("wte",)]):
            raise InputError("gpt2 checkpoint: lm_head.weight differs from wte.weight, but "
                             "memjax's GPT-2 ties them")
    return {k: v for k, v in params.items() if v is not None}


def partition_rules(config: GPT2Config) -> list[tuple[str, PartitionSpec]]:
    """Megatron-style: column-parallel in-projections, row-parallel out-projections."""
    return [
        (r"(c_attn|c_fc)/kernel$", PartitionSpec(None, "model")),
        (r"(c_attn|c_fc)/bias$", PartitionSpec("model")),
        (r"(c_proj|mlp_proj)/kernel$", PartitionSpec("model", None)),
        (r"^wte$", PartitionSpec("model", None)),
    ]


ARCH = register(Architecture(
    name="gpt2", model_types=("gpt2",), from_hf_config=from_hf_config,
    build=lambda config, rngs: GPT2LMHeadModel(config, rngs=rngs), convert=convert,
    partition_rules=partition_rules, ignore=(r"\.attn\.(masked_)?bias$",),
    config_class=GPT2Config,
))
