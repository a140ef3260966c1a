"""ViT (``ViTModel``, ``ViTForImageClassification``) in Flax NNX, matching Hugging Face.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words". Non-overlapping patches are
embedded linearly, a learned [CLS] token and learned absolute positions are added, and
pre-LayerNorm encoder blocks follow; a final LayerNorm closes the encoder.

Images are NHWC float arrays [B, H, W, C] at the checkpoint's native ``image_size`` (HF's
``interpolate_pos_encoding`` is not implemented: other sizes raise ``InputError``).

* :class:`ViTModel` returns the last hidden state [B, 1 + N, D] (after the final
  LayerNorm); :meth:`ViTModel.pooled` returns the pooler output [B, P]
  (``tanh(dense(CLS))``) when the checkpoint has a pooler.
* :class:`ViTForImageClassification` returns logits [B, L] from the final [CLS] state.

Taps (see :mod:`memjax.models.taps`): ``embeddings`` (patches + CLS + positions, the
encoder input), ``layers.{i}.attn_out`` (attention output after its projection),
``layers.{i}.mlp_hidden`` (after the activation), ``layers.{i}.out`` (block output),
``final`` (after the final LayerNorm), ``pooled`` (pooler output, bare model with pooler).

The patch embedding and the pre-LN block here are shared with :mod:`memjax.models.clip`,
whose vision tower is a ViT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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

# ----------------------------------------------------------------------------------------
# Shared pieces (also used by CLIP's vision and text towers)
# ----------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
    """Non-overlapping patch projection: [B, H, W, C] -> [B, (H/ph)(W/pw), D].

    ``kernel`` is HWIO [ph, pw, C, D] (PyTorch's Conv2d OIHW transposed). A stride-p conv
    with a p x p kernel is a matmul over flattened patches, which is what this computes.
    """

    def __init__(self, patch: tuple[int, int], channels: int, dim: int, *, rngs: nnx.Rngs,
                 use_bias: bool = True):
        ph, pw = patch
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (ph, pw, channels, dim))
                                * 0.02)
        self.bias = nnx.Param(jnp.zeros((dim,))) if use_bias else None
        self.patch = (ph, pw)

    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        ph, pw = self.patch
        gh, gw = h // ph, w // pw
        # A strided conv ignores the rows/columns that do not fill a whole patch.
        x = images[:, :gh * ph, :gw * pw].reshape(b, gh, ph, gw, pw, c)
        # Row-major patch order (gh, gw), as HF's conv output flatten(2) gives.
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, ph * pw * c)
        kernel = self.kernel[...].astype(images.dtype)
        y = x @ kernel.reshape(ph * pw * c, -1)
        if self.bias is None:
            return y
        return y + jnp.broadcast_to(self.bias[...].astype(y.dtype), y.shape)


class EncoderBlock(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + fc2(act(fc1(ln2(x))))``.

    Attention uses separate q/k/v projections [D, H*Dh] and scale Dh**-0.5, as HF's ViT
    and CLIP do. ``name`` prefixes the block's taps (e.g. ``"vision.layers.3"``).
    """

    def __init__(self, *, dim: int, heads: int, head_dim: int, inner: int, act: str,
                 eps: float, qkv_bias: bool, name: str, rngs: nnx.Rngs):
        width = heads * head_dim
        self.layer_norm1 = LayerNorm(dim, eps=eps)
        self.q_proj = Dense(dim, width, rngs=rngs, use_bias=qkv_bias)
        self.k_proj = Dense(dim, width, rngs=rngs, use_bias=qkv_bias)
        self.v_proj = Dense(dim, width, rngs=rngs, use_bias=qkv_bias)
        self.out_proj = Dense(width, dim, rngs=rngs)
        self.layer_norm2 = LayerNorm(dim, eps=eps)
        self.fc1 = Dense(dim, inner, rngs=rngs)
        self.fc2 = Dense(inner, dim, rngs=rngs)
        self.heads, self.head_dim, self.act, self.name = heads, head_dim, act, name

    def __call__(self, x: jax.Array, mask: AttentionMask | jax.Array | None,
                 taps: Taps | None) -> jax.Array:
        """x [B, T, D]; mask an ``AttentionMask``, a bool array broadcastable to
        [B, H, T, T] (True = attend), or None (see ``layers.attention``)."""
        b, t, _ = x.shape
        h = self.layer_norm1(x)
        shape = (b, t, self.heads, self.head_dim)
        q, k, v = (proj(h).reshape(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        a = attention(q, k, v, mask, self.head_dim ** -0.5).reshape(b, t, -1)
        x = x + tap(taps, f"{self.name}.attn_out", self.out_proj(a))
        hidden = ACTIVATIONS[self.act](self.fc1(self.layer_norm2(x)))
        hidden = tap(taps, f"{self.name}.mlp_hidden", hidden)
        return tap(taps, f"{self.name}.out", x + self.fc2(hidden))


def check_images(pixel_values: jax.Array, image_size: tuple[int, int], channels: int,
                 arch: str) -> None:
    """Refuse images that are not NHWC [B, H, W, C] at the model's native size."""
    shape = tuple(pixel_values.shape)
    if len(shape) != 4 or shape[3] != channels:
        raise InputError(f"{arch} pixel_values: expected NHWC [B, H, W, {channels}], got shape "
                         f"{shape} (transpose PyTorch-style NCHW with .transpose(0, 2, 3, 1))")
    if shape[1:3] != tuple(image_size):
        raise InputError(
            f"{arch} pixel_values: image size {shape[1]}x{shape[2]} differs from the "
            f"checkpoint's {image_size[0]}x{image_size[1]}; memjax does not interpolate "
            "position embeddings (HF's interpolate_pos_encoding): resize the images")
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
        raise InputError(f"{arch} pixel_values: expected a float dtype, got {pixel_values.dtype}")


def pair(value: Any, name: str, arch: str) -> tuple[int, int]:
    """An HF int-or-[h, w] size as (h, w)."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return (int(value[0]), int(value[1]))
    raise InputError(f"{arch} config.json {name}={value!r}: expected an int or [height, width]")


def check_activation(act: Any, key: str, arch: str) -> None:
    if act not in ACTIVATIONS:
        raise InputError(f"{arch} config.json {key}={act!r}: expected one of "
                         f"{sorted(ACTIVATIONS)}")


def check_heads(dim: int, heads: int, arch: str) -> None:
    if heads < 1 or dim % heads:
        raise InputError(f"{arch} config.json: hidden_size={dim} is not divisible by "
                         f"num_attention_heads={heads}")


class ParamMap:
    """Converter output: param path -> array, remembering each array's checkpoint key.

    Tensors are read with ``reader.take`` (so missing and unexpected keys are tracked)
    and put into memjax's layout; :meth:`finish` checks every shape against the model and
    names a mis-shaped tensor by its checkpoint key and its expected checkpoint shape.
    """

    def __init__(self, reader):
        self.reader = reader
        self.params: dict[tuple, np.ndarray] = {}
        self.problems: list[str] = []
        self._sources: dict[tuple, tuple[str, tuple[int, ...], str, int]] = {}

    def put(self, path: tuple, key: str, layout: str = "same", drop: int = 0) -> None:
        """Read ``key`` into ``path``. layout: "same", "T" (Linear [out, in] -> [in, out])
        or "hwio" (Conv2d OIHW -> HWIO); ``drop`` leading unit axes are removed first."""
        value = self.reader.take(key)
        if value is None:
            return
        self._sources[path] = (key, tuple(value.shape), layout, drop)
        if value.shape[:drop] != (1,) * drop:
            self.params[path] = value  # wrong rank: reported by finish()
            return
        value = value.reshape(value.shape[drop:])
        if layout == "T":
            value = value.T
        elif layout == "hwio":
            value = value.transpose(2, 3, 1, 0)
        self.params[path] = value

    def linear(self, path: tuple, key: str, *, bias: bool = True) -> None:
        """PyTorch Linear ``key`` -> ``path``/kernel [in, out] (+ ``path``/bias [out])."""
        self.put((*path, "kernel"), f"{key}.weight", "T")
        if bias:
            self.put((*path, "bias"), f"{key}.bias")

    def layer_norm(self, path: tuple, key: str) -> None:
        self.put((*path, "scale"), f"{key}.weight")
        self.put((*path, "bias"), f"{key}.bias")

    def finish(self, build: Callable[[], nnx.Module], arch: str) -> dict[tuple, np.ndarray]:
        """The params, or InputError naming every mis-shaped tensor (with the missing and
        unexpected ones, so one error lists every problem)."""
        abstract = nnx.eval_shape(build)
        expected = {tuple(p): tuple(v.get_value().shape)
                    for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
        problems = []
        for path, value in self.params.items():
            want = expected.get(path)
            if want is not None and tuple(value.shape) != want:
                key, shape, layout, drop = self._sources[path]
                problems.append(f"{key}: checkpoint shape {shape}, expected "
                                f"{_checkpoint_shape(want, layout, drop)}")
        if problems:
            if self.reader.missing:
                problems.append(f"missing tensors: {sorted(set(self.reader.missing))}")
            if self.reader.unexpected():
                problems.append(f"unexpected tensors: {self.reader.unexpected()}")
            raise InputError(f"{arch} checkpoint does not match the model: "
                             + "; ".join(problems))
        return self.params


def _checkpoint_shape(shape: tuple[int, ...], layout: str, drop: int) -> tuple[int, ...]:
    """A memjax parameter shape in the checkpoint's layout (inverse of ParamMap.put)."""
    if layout == "T":
        shape = shape[::-1]
    elif layout == "hwio":
        shape = (shape[3], shape[2], shape[0], shape[1])
    return (1,) * drop + tuple(shape)


def encoder_rules(embedding: str | None = None) -> list[tuple[str, PartitionSpec]]:
    """Megatron-style ``model``-axis rules for :class:`EncoderBlock`: column-parallel
    q/k/v/fc1 (split heads / hidden units), row-parallel out_proj/fc2."""
    rules = [
        (r"(q_proj|k_proj|v_proj|fc1)/kernel$", PartitionSpec(None, "model")),
        (r"(q_proj|k_proj|v_proj|fc1)/bias$", PartitionSpec("model")),
        (r"(out_proj|fc2)/kernel$", PartitionSpec("model", None)),
    ]
    if embedding is not None:  # a vocabulary table: split the rows
        rules.append((embedding, PartitionSpec("model", None)))
    return rules


# ----------------------------------------------------------------------------------------
# ViT
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    qkv_bias: bool = True
    head_dim: int | None = None
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    add_pooling_layer: bool = True
    #: 0: a bare ViTModel; > 0: ViTForImageClassification with this many classes.
    num_labels: int = 0

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


class ViTModel(nnx.Module):
    """Bare ViT encoder: images [B, H, W, C] -> last hidden state [B, 1 + N, D]."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, add_pooling_layer: bool | None = None):
        d = config.hidden_size
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.num_channels, d, rngs=rngs)
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (d,)) * 0.02)
        self.position_embeddings = nnx.Param(
            jax.random.normal(rngs.params(), (config.num_patches + 1, d)) * 0.02)
        self.layers = nnx.List([
            EncoderBlock(dim=d, heads=config.num_attention_heads, head_dim=config.head_size,
                         inner=config.intermediate_size, act=config.hidden_act,
                         eps=config.layer_norm_eps, qkv_bias=config.qkv_bias,
                         name=f"layers.{i}", rngs=rngs)
            for i in range(config.num_hidden_layers)])
        self.layernorm = LayerNorm(d, eps=config.layer_norm_eps)
        pool = config.add_pooling_layer if add_pooling_layer is None else add_pooling_layer
        self.pooler = Dense(d, config.pooler_output_size or d, rngs=rngs) if pool else None

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [CLS; patches] + positions [B, 1 + N, D]."""
        check_images(pixel_values, self.config.image_size, self.config.num_channels, "vit")
        x = self.patch_embed(pixel_values)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + jnp.broadcast_to(self.position_embeddings[...].astype(x.dtype), x.shape)

    def __call__(self, pixel_values: jax.Array, *, taps: Taps | None = None) -> jax.Array:
        """Last hidden state [B, 1 + N, D] (after the final LayerNorm)."""
        x = tap(taps, "embeddings", self.embed(pixel_values))
        for block in self.layers:
            x = block(x, None, taps)
        x = tap(taps, "final", self.layernorm(x))
        if self.pooler is not None and taps is not None:
            tap(taps, "pooled", self.pool(x))
        return x

    def pool(self, last_hidden: jax.Array) -> jax.Array:
        """HF ViTPooler: ``act(dense(last_hidden[:, 0]))`` -> [B, P]."""
        if self.pooler is None:
            raise InputError("this ViT checkpoint has no pooler (pooler.dense)")
        return ACTIVATIONS[self.config.pooler_act](self.pooler(last_hidden[:, 0]))

    def pooled(self, pixel_values: jax.Array, *, taps: Taps | None = None) -> jax.Array:
        """Pooler output [B, P] (HF ``pooler_output``)."""
        return self.pool(self(pixel_values, taps=taps))


class ViTForImageClassification(nnx.Module):
    """ViT with a linear head on the final [CLS] state: images -> logits [B, L]."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vit = ViTModel(config, rngs=rngs, add_pooling_layer=False)
        self.classifier = Dense(config.hidden_size, config.num_labels, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, *, taps: Taps | None = None) -> jax.Array:
        """Logits [B, num_labels]."""
        return self.classifier(self.vit(pixel_values, taps=taps)[:, 0])


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------

_IMPLEMENTED = {
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias",
    "head_dim", "pooler_output_size", "pooler_act",
    # Dropout is off at inference.
    "hidden_dropout_prob", "attention_probs_dropout_prob",
    # Only ViTForMaskedImageModeling's decoder uses it; that head is not ported.
    "encoder_stride",
}
# Every computation-relevant ViTConfig attribute is implemented; none falls back here.
_DEFAULTS: dict[str, Any] = {}
_HEADS = ("ViTModel", "ViTForImageClassification")


def _num_labels(hf: dict[str, Any]) -> int:
    if isinstance(hf.get("id2label"), dict):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))  # HF's default: two classes


def from_hf_config(hf: dict[str, Any]) -> ViTConfig:
    """HF ViT config.json -> :class:`ViTConfig`; the head comes from ``architectures``."""
    check_config(hf, _IMPLEMENTED, _DEFAULTS, "vit")
    architectures = hf.get("architectures") or ["ViTModel"]
    head = architectures[0]
    if head not in _HEADS:
        raise InputError(f"vit config.json architectures={architectures!r}: memjax implements "
                         f"{list(_HEADS)}")
    for key in ("hidden_act", "pooler_act"):
        check_activation(hf.get(key, "gelu" if key == "hidden_act" else "tanh"), key, "vit")
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    values = {k: v for k, v in hf.items() if k in fields}
    values["image_size"] = pair(hf.get("image_size", 224), "image_size", "vit")
    values["patch_size"] = pair(hf.get("patch_size", 16), "patch_size", "vit")
    classify = head == "ViTForImageClassification"
    values["num_labels"] = _num_labels(hf) if classify else 0
    # HF's ViTModel(config) adds the pooler by default; the classifier builds it without.
    values["add_pooling_layer"] = not classify
    config = ViTConfig(**values)
    if config.head_dim is None:
        check_heads(config.hidden_size, config.num_attention_heads, "vit")
    if classify and config.num_labels < 1:
        raise InputError("vit config.json: ViTForImageClassification with no labels (an "
                         "identity head) is not implemented")
    if min(config.grid) < 1:
        raise InputError(f"vit config.json: patch_size={config.patch_size} is larger than "
                         f"image_size={config.image_size}")
    return config


# Per-layer HF names: (legacy checkpoints, as save_pretrained still writes them; the
# transformers 5 module names).
_LAYER_KEYS = {
    "layer_norm1": ("layernorm_before", "layernorm_before"),
    "q_proj": ("attention.attention.query", "attention.q_proj"),
    "k_proj": ("attention.attention.key", "attention.k_proj"),
    "v_proj": ("attention.attention.value", "attention.v_proj"),
    "out_proj": ("attention.output.dense", "attention.o_proj"),
    "layer_norm2": ("layernorm_after", "layernorm_after"),
    "fc1": ("intermediate.dense", "mlp.fc1"),
    "fc2": ("output.dense", "mlp.fc2"),
}


def convert(reader, config: ViTConfig) -> dict[tuple, np.ndarray]:
    """HF ViT keys -> param paths (Linear weights transposed, the patch conv to HWIO)."""
    classify = config.num_labels > 0
    prefix = "vit." if classify or any(k.startswith("vit.") for k in reader.tensors) else ""
    new_names = any(k.startswith(f"{prefix}layers.") for k in reader.tensors)
    root = ("vit",) if classify else ()
    out = ParamMap(reader)
    emb = f"{prefix}embeddings."
    out.put((*root, "patch_embed", "kernel"), emb + "patch_embeddings.projection.weight", "hwio")
    out.put((*root, "patch_embed", "bias"), emb + "patch_embeddings.projection.bias")
    out.put((*root, "cls_token"), emb + "cls_token", drop=2)  # [1, 1, D]
    out.put((*root, "position_embeddings"), emb + "position_embeddings", drop=1)  # [1, 1+N, D]
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}layers.{i}." if new_names else f"{prefix}encoder.layer.{i}."
        for ours, theirs in _LAYER_KEYS.items():
            path, key = (*root, "layers", i, ours), layer + theirs[new_names]
            if ours.startswith("layer_norm"):
                out.layer_norm(path, key)
            else:
                qkv = ours in ("q_proj", "k_proj", "v_proj")
                out.linear(path, key, bias=config.qkv_bias or not qkv)
    out.layer_norm((*root, "layernorm"), f"{prefix}layernorm")
    if config.add_pooling_layer and not classify:
        out.linear(("pooler",), "pooler.dense")
    if classify:
        out.linear(("classifier",), "classifier")
    return out.finish(lambda: _build(config, nnx.Rngs(0)), "vit")


def partition_rules(config: ViTConfig) -> list[tuple[str, PartitionSpec]]:
    """Column-parallel q/k/v/fc1, row-parallel out_proj/fc2 over the ``model`` axis."""
    return encoder_rules()


def _build(config: ViTConfig, rngs: nnx.Rngs) -> nnx.Module:
    if config.num_labels > 0:
        return ViTForImageClassification(config, rngs=rngs)
    return ViTModel(config, rngs=rngs)


def refine_config(config: ViTConfig, keys: frozenset[str]) -> ViTConfig:
    """A bare ViT has a pooler exactly when the checkpoint holds its weights (HF's
    ``ViTModel(config, add_pooling_layer=False)`` saves none, and config.json omits it)."""
    if not config.add_pooling_layer:
        return config
    return dataclasses.replace(config, add_pooling_layer=any(
        k.endswith(("pooler.dense.weight", "pooler.dense.bias")) for k in keys))


ARCH = register(Architecture(
    name="vit", model_types=("vit",), from_hf_config=from_hf_config, build=_build,
    convert=convert, partition_rules=partition_rules, config_class=ViTConfig,
    refine_config=refine_config,
))
