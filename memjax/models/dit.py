"""DiT (diffusers' ``DiTTransformer2DModel``) in Flax NNX: a class-conditional ε-predictor.

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers". A latent [H, W, C] is cut
into p x p patches (a stride-p convolution), a fixed 2-D sin-cos position table is added,
and ``num_layers`` adaLN-Zero transformer blocks follow. Each block embeds the timestep
(256 sinusoidal features -> Linear -> SiLU -> Linear) and the class label (a table with one
extra "null" row, the unconditional label ``num_classes`` used for classifier-free
guidance) into a conditioning vector ``c`` [D], and regresses from ``SiLU(c)`` six
modulations [6D]: shift / scale / gate of the attention branch and of the MLP branch::

    x = x + gate_msa * Attn(LN(x) * (1 + scale_msa) + shift_msa)
    x = x + gate_mlp * MLP(LN'(x) * (1 + scale_mlp) + shift_mlp)

The final layer modulates ``LN(x)`` with a shift / scale regressed from block 0's ``c``
(diffusers reads ``transformer_blocks[0].norm1.emb``; every block carries its own
embedding tables), projects each token to p * p * out_channels values and reassembles
the image. With ``out_channels = 2 * in_channels`` the second half is the learned
variance (Nichol & Dhariwal 2021); :meth:`DiTTransformer2DModel.epsilon` returns the first
``in_channels`` channels, the ε prediction.

Layout: NHWC (memjax's vision layout), sample [B, H, W, C] -> [B, H, W, out_channels];
diffusers is NCHW (the converter transposes the patch convolution OIHW -> HWIO).

Taps (see :mod:`memjax.models.taps`): ``embeddings`` (patches + positions [B, N, D]),
``timestep_features`` (the sinusoidal features [B, 256] every block's timestep MLP reads),
``conditioning`` (block 0's ``c`` [B, D]), ``layers.{i}.attn_out`` (attention after
``to_out``, before the gate), ``layers.{i}.mlp_hidden`` (after the activation),
``layers.{i}.out`` (block output [B, N, D]), ``final`` (the output [B, H, W, out]).
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
from memjax.models.diffusion_layers import timestep_embedding
from memjax.models.layers import ACTIVATIONS, Dense, LayerNorm, attention
from memjax.models.registry import Architecture, check_config, register
from memjax.models.taps import Taps, tap
from memjax.models.vit import ParamMap, PatchEmbed

ARCH_NAME = "dit"
#: Sinusoidal timestep features feeding each block's timestep MLP (diffusers'
#: ``CombinedTimestepLabelEmbeddings``: 256 channels, cos first, frequency shift 1).
TIMESTEP_FEATURES = 256
#: diffusers' ``activation_fn`` names -> memjax activations (FeedForward's GELU variants).
FF_ACTIVATIONS = {"gelu": "gelu", "gelu-approximate": "gelu_pytorch_tanh"}
#: eps of the parameter-free LayerNorms in AdaLayerNormZero and ``norm_out`` (fixed there).
ADA_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """diffusers' ``DiTTransformer2DModel`` config (defaults: DiT-XL/2 at 256 px)."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None
    num_layers: int = 28
    attention_bias: bool = True
    sample_size: int = 32
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    #: Number of classes; the label table has one more row (the null label).
    num_embeds_ada_norm: int = 1000
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.sample_size // self.patch_size


def sincos_position_table(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embeddings [grid * grid, dim] float32, as diffusers'
    ``get_2d_sincos_pos_embed`` at ``base_size = grid`` and ``interpolation_scale = 1`` (so
    positions are the integer patch coordinates), for row-major patches.

    The first ``dim / 2`` features encode the patch's column, the last ``dim / 2`` its row,
    each as ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 10000^(-k / (dim / 4))``,
    ``k < dim / 4`` (Vaswani et al. 2017); computed in float64 and rounded once.
    """
    if dim % 4:
        raise InputError(f"dit: the sin-cos position table needs an inner dim "
                         f"(num_attention_heads * attention_head_dim) divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10_000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64),
                             np.arange(grid, dtype=np.float64), indexing="ij")

    def one_axis(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def time_features(timestep: jax.Array) -> jax.Array:
    """DiT's sinusoidal timestep features [B, 256] float32 of timesteps [B] (cos first,
    frequency shift 1, as diffusers' ``Timesteps(256, True, 1)``)."""
    return timestep_embedding(timestep, TIMESTEP_FEATURES, flip_sin_to_cos=True,
                              downscale_freq_shift=1.0)


def normalize(x: jax.Array, eps: float) -> jax.Array:
    """Parameter-free LayerNorm over the last axis, statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift``: x [B, N, D], shift / scale [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def unpatchify(tokens: jax.Array, grid: int, patch: int) -> jax.Array:
    """[B, grid * grid, patch * patch * C] -> [B, grid * patch, grid * patch, C]: token
    (i, j)'s values (p, q, c) go to pixel (i * patch + p, j * patch + q), channel c."""
    b, _, features = tokens.shape
    c = features // (patch * patch)
    x = tokens.reshape(b, grid, grid, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * patch, grid * patch, c)


class ConditionEmbedding(nnx.Module):
    """diffusers' ``CombinedTimestepLabelEmbeddings``: ``MLP(sinusoid(t)) + table[label]``.

    ``class_table`` has ``num_classes + 1`` rows: diffusers sizes it with the extra null row
    whenever the class dropout is positive, which DiT's AdaLayerNormZero always sets (0.1).
    """

    def __init__(self, num_classes: int, dim: int, *, rngs: nnx.Rngs):
        self.linear_1 = Dense(TIMESTEP_FEATURES, dim, rngs=rngs)
        self.linear_2 = Dense(dim, dim, rngs=rngs)
        self.class_table = nnx.Param(
            jax.random.normal(rngs.params(), (num_classes + 1, dim)) * 0.02)

    def __call__(self, features: jax.Array, class_labels: jax.Array) -> jax.Array:
        """features [B, 256] (:func:`time_features`), class_labels [B] int -> c [B, D]."""
        dtype = features.dtype
        time = self.linear_2(jax.nn.silu(self.linear_1(features)))
        labels = self.class_table[...][class_labels].astype(dtype)
        return time + labels


class DiTBlock(nnx.Module):
    """diffusers' ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"`` and no
    cross-attention: adaLN-Zero self-attention, then an adaLN-Zero GELU MLP (4 x D)."""

    def __init__(self, config: DiTConfig, name: str, *, rngs: nnx.Rngs):
        d, heads, head_dim = config.inner_dim, config.num_attention_heads, \
            config.attention_head_dim
        self.emb = ConditionEmbedding(config.num_embeds_ada_norm, d, rngs=rngs)
        self.ada_linear = Dense(d, 6 * d, rngs=rngs)
        bias = config.attention_bias
        self.to_q = Dense(d, d, rngs=rngs, use_bias=bias)
        self.to_k = Dense(d, d, rngs=rngs, use_bias=bias)
        self.to_v = Dense(d, d, rngs=rngs, use_bias=bias)
        self.to_out = Dense(d, d, rngs=rngs)
        self.norm3 = (LayerNorm(d, eps=config.norm_eps) if config.norm_elementwise_affine
                      else None)
        self.ff_in = Dense(d, 4 * d, rngs=rngs)
        self.ff_out = Dense(4 * d, d, rngs=rngs)
        self.heads, self.head_dim, self.eps = heads, head_dim, config.norm_eps
        self.act = FF_ACTIVATIONS[config.activation_fn]
        self.name = name

    def conditioning(self, features: jax.Array, class_labels: jax.Array) -> jax.Array:
        """This block's ``c`` [B, D] from the timestep features [B, 256]."""
        return self.emb(features, class_labels)

    def __call__(self, x: jax.Array, features: jax.Array, class_labels: jax.Array,
                 taps: Taps | None) -> jax.Array:
        """x [B, N, D], timestep features [B, 256], class_labels [B] -> [B, N, D]."""
        b, n, d = x.shape
        mods = self.ada_linear(jax.nn.silu(self.conditioning(features, class_labels)))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mods, 6, -1)
        h = modulate(normalize(x, ADA_EPS), shift_msa, scale_msa)
        shape = (b, n, self.heads, self.head_dim)
        q, k, v = (proj(h).reshape(shape) for proj in (self.to_q, self.to_k, self.to_v))
        a = attention(q, k, v, None, self.head_dim ** -0.5).reshape(b, n, d)
        a = tap(taps, f"{self.name}.attn_out", self.to_out(a))
        x = x + gate_msa[:, None] * a
        h = self.norm3(x) if self.norm3 is not None else normalize(x, self.eps)
        h = modulate(h, shift_mlp, scale_mlp)
        hidden = tap(taps, f"{self.name}.mlp_hidden", ACTIVATIONS[self.act](self.ff_in(h)))
        return tap(taps, f"{self.name}.out", x + gate_mlp[:, None] * self.ff_out(hidden))


class DiTTransformer2DModel(nnx.Module):
    """Class-conditional DiT: (sample, timestep, class label) -> ε (and learned σ)."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        d, p = config.inner_dim, config.patch_size
        self.config = config
        self.patch_embed = PatchEmbed((p, p), config.in_channels, d, rngs=rngs)
        self.layers = nnx.List([DiTBlock(config, f"layers.{i}", rngs=rngs)
                                for i in range(config.num_layers)])
        self.proj_out_1 = Dense(d, 2 * d, rngs=rngs)
        self.proj_out_2 = Dense(d, p * p * config.output_channels, rngs=rngs)

    def memjax_interface(self) -> tuple[str, str, tuple[str, ...]]:
        """(kind, method, input fields) for ``memjax.load``: an ε-predictor per example."""
        return ("diffusion", "epsilon", ("sample", "timestep", "class_labels"))

    def _check(self, sample: jax.Array, timestep: jax.Array, class_labels: jax.Array) -> None:
        c = self.config
        want = (c.sample_size, c.sample_size, c.in_channels)
        if sample.ndim != 4 or tuple(sample.shape[1:]) != want:
            raise InputError(f"dit sample: expected NHWC [B, {want[0]}, {want[1]}, {want[2]}] "
                             f"(the checkpoint's sample_size and in_channels), got shape "
                             f"{tuple(sample.shape)}")
        if not jnp.issubdtype(sample.dtype, jnp.floating):
            raise InputError(f"dit sample: expected a float dtype, got {sample.dtype}")
        for name, value in (("timestep", timestep), ("class_labels", class_labels)):
            if jnp.shape(value) != (sample.shape[0],):
                raise InputError(f"dit {name}: expected shape [B] = ({sample.shape[0]},), got "
                                 f"{jnp.shape(value)}")
        if not jnp.issubdtype(jnp.asarray(class_labels).dtype, jnp.integer):
            raise InputError(f"dit class_labels: expected integers, got "
                             f"{jnp.asarray(class_labels).dtype}")
        if not isinstance(class_labels, jax.core.Tracer):
            labels = np.asarray(class_labels)
            if labels.size and (labels.min() < 0 or labels.max() > c.num_embeds_ada_norm):
                raise InputError(f"dit class_labels: expected 0..{c.num_embeds_ada_norm} "
                                 f"({c.num_embeds_ada_norm} is the null label), got "
                                 f"{labels.min()}..{labels.max()}")

    def __call__(self, sample: jax.Array, timestep: jax.Array, class_labels: jax.Array, *,
                 taps: Taps | None = None) -> jax.Array:
        """sample [B, H, W, C], timestep [B], class_labels [B] (``num_classes`` = the null
        label) -> [B, H, W, out_channels] (ε, then the learned variance when
        ``out_channels = 2 * in_channels``), as diffusers' forward (NCHW there)."""
        self._check(sample, timestep, class_labels)
        c = self.config
        x = self.patch_embed(sample)
        table = jnp.asarray(sincos_position_table(c.inner_dim, c.grid), x.dtype)
        x = tap(taps, "embeddings", x + table[None])
        features = tap(taps, "timestep_features", time_features(timestep).astype(x.dtype))
        for block in self.layers:
            x = block(x, features, class_labels, taps)
        cond = tap(taps, "conditioning", self.layers[0].conditioning(features, class_labels))
        shift, scale = jnp.split(self.proj_out_1(jax.nn.silu(cond)), 2, axis=-1)
        x = self.proj_out_2(modulate(normalize(x, ADA_EPS), shift, scale))
        return tap(taps, "final", unpatchify(x, c.grid, c.patch_size))

    def epsilon(self, sample: jax.Array, timestep: jax.Array, class_labels: jax.Array, *,
                taps: Taps | None = None) -> jax.Array:
        """The ε prediction [B, H, W, in_channels] (the learned variance dropped)."""
        return self(sample, timestep, class_labels, taps=taps)[..., :self.config.in_channels]


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------

_IMPLEMENTED = {
    "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
    "attention_bias", "sample_size", "patch_size", "activation_fn", "num_embeds_ada_norm",
    "norm_type", "norm_elementwise_affine", "norm_eps",
    # Dropout is off at inference.
    "dropout",
    # DiTTransformer2DModel stores it but builds no GroupNorm.
    "norm_num_groups",
    # Upcasts q/k to float32 before the scores; memjax's scores are float32 always.
    "upcast_attention",
}
# Transformer2DModel attributes (the class DiT checkpoints were first published as, e.g.
# facebook/DiT-XL-2-256, which diffusers loads as DiTTransformer2DModel when norm_type is
# "ada_norm_zero"): accepted only at the values that build a DiT.
_DEFAULTS: dict[str, Any] = {
    "cross_attention_dim": None, "num_vector_embeds": None, "use_linear_projection": False,
    "only_cross_attention": False, "double_self_attention": False, "attention_type": "default",
    "caption_channels": None, "interpolation_scale": None, "use_additional_conditions": None,
}
#: diffusers' own class, and the legacy class it remaps to it (by ``norm_type``).
MODEL_TYPES = ("DiTTransformer2DModel", "Transformer2DModel")


def _positive_int(hf: dict[str, Any], key: str, default: int) -> int:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"dit config.json {key}={value!r}: expected a positive integer")
    return value


def from_hf_config(hf: dict[str, Any]) -> DiTConfig:
    """diffusers ``DiTTransformer2DModel`` config.json (or a legacy ``Transformer2DModel``
    one with ``norm_type="ada_norm_zero"``, as diffusers remaps it) -> :class:`DiTConfig`;
    a missing attribute takes DiTTransformer2DModel's default, as diffusers' remapping
    does."""
    if hf.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise InputError(f"dit config.json norm_type={hf['norm_type']!r}: memjax ports "
                         f"{hf.get('_class_name', 'DiTTransformer2DModel')} only as DiT "
                         "(norm_type 'ada_norm_zero')")
    check_config(hf, _IMPLEMENTED, _DEFAULTS, ARCH_NAME)
    act = hf.get("activation_fn", "gelu-approximate")
    if act not in FF_ACTIVATIONS:
        raise InputError(f"dit config.json activation_fn={act!r}: memjax implements "
                         f"{sorted(FF_ACTIVATIONS)}")
    ints = {key: _positive_int(hf, key, getattr(DiTConfig, key)) for key in (
        "num_attention_heads", "attention_head_dim", "in_channels", "num_layers",
        "sample_size", "patch_size", "num_embeds_ada_norm")}
    out = hf.get("out_channels")
    if out is not None:
        out = _positive_int(hf, "out_channels", 1)
    if ints["sample_size"] % ints["patch_size"]:
        raise InputError(f"dit config.json: sample_size={ints['sample_size']} is not a "
                         f"multiple of patch_size={ints['patch_size']}")
    config = DiTConfig(**ints, out_channels=out, activation_fn=act,
                       attention_bias=bool(hf.get("attention_bias", True)),
                       norm_elementwise_affine=bool(hf.get("norm_elementwise_affine", False)),
                       norm_eps=float(hf.get("norm_eps", 1e-5)))
    if config.inner_dim % 4:
        raise InputError(f"dit config.json: num_attention_heads * attention_head_dim = "
                         f"{config.inner_dim} is not divisible by 4 (the sin-cos position "
                         "table needs it)")
    return config


def convert(reader, config: DiTConfig) -> dict[tuple, np.ndarray]:
    """diffusers keys -> param paths (Linear weights transposed, the patch conv to HWIO)."""
    out = ParamMap(reader)
    out.put(("patch_embed", "kernel"), "pos_embed.proj.weight", "hwio")
    out.put(("patch_embed", "bias"), "pos_embed.proj.bias")
    for i in range(config.num_layers):
        key, path = f"transformer_blocks.{i}.", ("layers", i)
        emb = key + "norm1.emb."
        out.linear((*path, "emb", "linear_1"), emb + "timestep_embedder.linear_1")
        out.linear((*path, "emb", "linear_2"), emb + "timestep_embedder.linear_2")
        out.put((*path, "emb", "class_table"), emb + "class_embedder.embedding_table.weight")
        out.linear((*path, "ada_linear"), key + "norm1.linear")
        for name in ("to_q", "to_k", "to_v"):
            out.linear((*path, name), f"{key}attn1.{name}", bias=config.attention_bias)
        out.linear((*path, "to_out"), key + "attn1.to_out.0")
        if config.norm_elementwise_affine:
            out.layer_norm((*path, "norm3"), key + "norm3")
        out.linear((*path, "ff_in"), key + "ff.net.0.proj")
        out.linear((*path, "ff_out"), key + "ff.net.2")
    out.linear(("proj_out_1",), "proj_out_1")
    out.linear(("proj_out_2",), "proj_out_2")
    return out.finish(lambda: _build(config, nnx.Rngs(0)), ARCH_NAME)


def partition_rules(config: DiTConfig) -> list[tuple[str, PartitionSpec]]:
    """Megatron-style over the ``model`` axis: q/k/v (by heads), the MLP input and the
    adaLN modulation regressors (by output unit) column-parallel; ``to_out`` and the MLP
    output row-parallel."""
    return [
        (r"/(to_q|to_k|to_v|ff_in|ada_linear)/kernel$", PartitionSpec(None, "model")),
        (r"/(to_q|to_k|to_v|ff_in|ada_linear)/bias$", PartitionSpec("model")),
        (r"/(to_out|ff_out)/kernel$", PartitionSpec("model", None)),
    ]


def _build(config: DiTConfig, rngs: nnx.Rngs) -> DiTTransformer2DModel:
    return DiTTransformer2DModel(config, rngs=rngs)


ARCH = register(Architecture(
    name=ARCH_NAME, model_types=MODEL_TYPES, from_hf_config=from_hf_config,
    build=_build, convert=convert, partition_rules=partition_rules, config_class=DiTConfig,
))
