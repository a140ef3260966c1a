"""ResNet (HF ``ResNetModel`` / ``ResNetForImageClassification``) in Flax NNX.

He et al. 2016, "Deep Residual Learning for Image Recognition". A 7x7/2 conv stem with a
3x3/2 max-pool, then stages of basic (two 3x3 convs) or bottleneck (1x1 -> 3x3 -> 1x1)
residual blocks, global average pooling, and an optional linear classifier. The maths
matches Hugging Face's PyTorch implementation, including its quirk that the convs inside
a block always use ReLU while ``hidden_act`` applies only to the stem and to each
block's output.

Images are NHWC float ``[B, H, W, C]`` (HF's ``pixel_values`` are NCHW: transpose with
``x.transpose(0, 2, 3, 1)``). Inference semantics: BatchNorm normalises with its running
statistics, stored as ``nnx.BatchStat`` (never a ``Param``, so ``nnx.grad`` and
optimisers leave them alone).

``__call__`` returns logits ``[B, num_labels]`` for ``ResNetForImageClassification``
checkpoints and the pooled features ``[B, C]`` (HF's ``pooler_output`` flattened) for
``ResNetModel`` / ``ResNetBackbone`` checkpoints (the weights decide: a classifier exactly
when ``classifier.1.weight`` exists); :meth:`ResNet.features` returns the pooled features
of either. The last feature map (HF's ``last_hidden_state``, NHWC) is the
``stages.{n-1}.out`` tap.

Taps (see :mod:`memjax.models.taps`), in call order:

- ``embedder``: after the stem conv, BN, activation and max-pool (HF ``hidden_states[0]``).
- ``stages.{s}.blocks.{b}.conv{k}``: conv ``k`` (0-based) of block ``b`` after its BN and,
  except for the block's last conv, its ReLU (the last one is tapped before the residual
  add).
- ``stages.{s}.blocks.{b}.out``: the block output (residual add, then ``hidden_act``).
- ``stages.{s}.out``: the stage output (HF ``hidden_states[s + 1]``).
- ``pooled``: the globally average-pooled features ``[B, C]``.

:class:`Conv2d`, :class:`BatchNorm`, :class:`ConvBN` and :class:`ResNetBlock` are shared
with :mod:`memjax.models.cifar_resnet`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax.errors import InputError
from memjax.models.layers import ACTIVATIONS, Dense
from memjax.models.registry import Architecture, check_config, register
from memjax.models.taps import Taps, tap

LAYER_TYPES = ("basic", "bottleneck")


# --------------------------------------------------------------------------- layers


class Conv2d(nnx.Module):
    """2-D convolution, NHWC input, kernel ``[kh, kw, C_in, C_out]`` (HWIO), no bias.

    Padding is ``kernel_size // 2`` on every side, as PyTorch's ``padding=k // 2``, so odd
    sizes round the same way as PyTorch (output ``floor((H + 2p - k) / stride) + 1``).
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, *, stride: int = 1,
                 rngs: nnx.Rngs):
        # He-normal (fan-in) initialisation: only used when training from scratch.
        std = (2.0 / (c_in * kernel_size * kernel_size)) ** 0.5
        self.kernel = nnx.Param(std * jax.random.normal(
            rngs.params(), (kernel_size, kernel_size, c_in, c_out)))
        self.stride = stride
        self.padding = kernel_size // 2

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.padding
        return jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BatchNorm(nnx.Module):
    """BatchNorm over the channel (last) axis, PyTorch ``BatchNorm2d`` semantics.

    ``train=False`` (default) normalises with the running statistics. ``train=True``
    normalises with the batch's mean and biased variance over (B, H, W) and updates the
    running statistics in place, as PyTorch: ``running = (1 - momentum) * running +
    momentum * batch`` with the unbiased batch variance. Under ``jax.jit`` use
    ``nnx.jit``, or ``nnx.merge`` the state inside the jitted function and return
    ``nnx.state(model)`` to keep the update. Statistics are computed in float32.
    """

    def __init__(self, channels: int, *, eps: float = 1e-5, momentum: float = 0.1):
        self.scale = nnx.Param(jnp.ones((channels,)))
        self.bias = nnx.Param(jnp.zeros((channels,)))
        self.mean = nnx.BatchStat(jnp.zeros((channels,)))
        self.var = nnx.BatchStat(jnp.ones((channels,)))
        self.eps = eps
        self.momentum = momentum

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x32 = x.astype(jnp.float32)
        channels = (1,) * (x.ndim - 1) + (-1,)  # [C] -> [1, ..., 1, C]: explicit broadcast
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean.reshape(channels)), axis=axes)
            n = int(np.prod([x.shape[a] for a in axes]))
            # PyTorch keeps the unbiased variance (n / (n - 1)) as the running estimate.
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = ((1 - m) * self.mean[...] + m * mean).astype(self.mean.dtype)
            self.var[...] = ((1 - m) * self.var[...] + m * unbiased).astype(self.var.dtype)
        else:
            mean = self.mean[...].astype(jnp.float32)
            var = self.var[...].astype(jnp.float32)
        y = (x32 - mean.reshape(channels)) * jax.lax.rsqrt(var + self.eps).reshape(channels)
        return (y * self.scale[...].astype(jnp.float32).reshape(channels)
                + self.bias[...].astype(jnp.float32).reshape(channels)).astype(x.dtype)


class ConvBN(nnx.Module):
    """Conv2d (no bias) followed by BatchNorm; the activation is left to the caller."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, *, stride: int = 1,
                 rngs: nnx.Rngs):
        self.conv = Conv2d(c_in, c_out, kernel_size, stride=stride, rngs=rngs)
        self.norm = BatchNorm(c_out)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return self.norm(self.conv(x), train=train)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """Max-pool NHWC ``x``; padded cells are -inf, as PyTorch's ``MaxPool2d``."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    # A Python -inf init lets JAX recognise the max monoid (differentiable reduce_window).
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max,
                                 (1, window, window, 1), (1, stride, stride, 1), pad)


# --------------------------------------------------------------------------- blocks


def block_convs(layer_type: str, c_in: int, c_out: int, stride: int,
                downsample_in_bottleneck: bool = False) -> list[tuple[int, int, int, int]]:
    """The (c_in, c_out, kernel, stride) of each conv of one residual block.

    Bottleneck blocks reduce to ``c_out // 4`` channels; the stride sits on the 3x3 conv
    (ResNet v1.5) unless ``downsample_in_bottleneck`` puts it on the first 1x1 (v1).
    """
    if layer_type == "basic":
        return [(c_in, c_out, 3, stride), (c_out, c_out, 3, 1)]
    mid = c_out // 4
    s1, s3 = (stride, 1) if downsample_in_bottleneck else (1, stride)
    return [(c_in, mid, 1, s1), (mid, mid, 3, s3), (mid, c_out, 1, 1)]


def needs_shortcut(c_in: int, c_out: int, stride: int) -> bool:
    """A 1x1 conv + BN projection when the identity cannot be added (shape changes)."""
    return c_in != c_out or stride != 1


class ResNetBlock(nnx.Module):
    """A residual block: ``act(convs(x) + shortcut(x))``; inner convs use ReLU.

    Args:
      layer_type: "basic" (two 3x3 convs) or "bottleneck" (1x1 -> 3x3 -> 1x1).
      act: the activation after the residual add (HF ``hidden_act``).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, *, layer_type: str = "basic",
                 act: str = "relu", downsample_in_bottleneck: bool = False,
                 rngs: nnx.Rngs):
        specs = block_convs(layer_type, c_in, c_out, stride, downsample_in_bottleneck)
        self.convs = nnx.List([ConvBN(i, o, k, stride=s, rngs=rngs) for i, o, k, s in specs])
        self.shortcut = (ConvBN(c_in, c_out, 1, stride=stride, rngs=rngs)
                         if needs_shortcut(c_in, c_out, stride) else None)
        self.act = act

    def __call__(self, x: jax.Array, name: str, taps: Taps | None, *,
                 train: bool = False) -> jax.Array:
        h = x
        last = len(self.convs) - 1
        for k, conv in enumerate(self.convs):
            h = conv(h, train=train)
            if k < last:  # HF's inner ResNetConvLayers default to ReLU, not hidden_act
                h = jax.nn.relu(h)
            h = tap(taps, f"{name}.conv{k}", h)
        residual = x if self.shortcut is None else self.shortcut(x, train=train)
        return tap(taps, f"{name}.out", ACTIVATIONS[self.act](h + residual))


# --------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """The HF ``ResNetConfig`` fields the computation depends on.

    ``num_labels`` 0 means a bare ``ResNetModel`` (no classifier).
    """

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    num_labels: int = 0


def stage_plan(config: ResNetConfig) -> list[list[tuple[int, int, int]]]:
    """(c_in, c_out, stride) of every block, per stage.

    Stage 0 keeps the stem's resolution unless ``downsample_in_first_stage``; every later
    stage halves it in its first block.
    """
    plan = []
    c_in = config.embedding_size
    for s, (c_out, depth) in enumerate(zip(config.hidden_sizes, config.depths, strict=True)):
        stride = 2 if (s > 0 or config.downsample_in_first_stage) else 1
        plan.append([(c_in, c_out, stride)] + [(c_out, c_out, 1)] * (depth - 1))
        c_in = c_out
    return plan


class ResNetStage(nnx.Module):
    def __init__(self, config: ResNetConfig, blocks: list[tuple[int, int, int]], *,
                 rngs: nnx.Rngs):
        self.blocks = nnx.List([
            ResNetBlock(c_in, c_out, stride, layer_type=config.layer_type,
                        act=config.hidden_act,
                        downsample_in_bottleneck=config.downsample_in_bottleneck, rngs=rngs)
            for c_in, c_out, stride in blocks])

    def __call__(self, x: jax.Array, name: str, taps: Taps | None) -> jax.Array:
        for b, block in enumerate(self.blocks):
            x = block(x, f"{name}.blocks.{b}", taps)
        return tap(taps, f"{name}.out", x)


class ResNet(nnx.Module):
    """HF ``ResNetModel`` (``num_labels == 0``) or ``ResNetForImageClassification``."""

    def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embedder = ConvBN(config.num_channels, config.embedding_size, 7, stride=2,
                               rngs=rngs)
        self.stages = nnx.List([ResNetStage(config, blocks, rngs=rngs)
                                for blocks in stage_plan(config)])
        self.classifier = (Dense(config.hidden_sizes[-1], config.num_labels, rngs=rngs)
                           if config.num_labels > 0 else None)

    def features(self, pixel_values: jax.Array, *, taps: Taps | None = None) -> jax.Array:
        """Pooled features ``[B, C_last]`` of NHWC images ``[B, H, W, num_channels]``."""
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.config.num_channels:
            raise InputError(f"pixel_values shape {pixel_values.shape}: expected NHWC "
                             f"[B, H, W, {self.config.num_channels}]")
        x = ACTIVATIONS[self.config.hidden_act](self.embedder(pixel_values))
        x = tap(taps, "embedder", max_pool(x, 3, 2, padding=1))
        for s, stage in enumerate(self.stages):
            x = stage(x, f"stages.{s}", taps)
        return tap(taps, "pooled", jnp.mean(x, axis=(1, 2)))

    def __call__(self, pixel_values: jax.Array, *, taps: Taps | None = None) -> jax.Array:
        """Logits ``[B, num_labels]``, or pooled features ``[B, C]`` without a classifier."""
        pooled = self.features(pixel_values, taps=taps)
        return pooled if self.classifier is None else self.classifier(pooled)


# --------------------------------------------------------------------------- loading

_IMPLEMENTED = {"num_channels", "embedding_size", "hidden_sizes", "depths", "layer_type",
                "hidden_act", "downsample_in_first_stage", "downsample_in_bottleneck",
                # ResNetBackbone's output selection: no effect on the computation (every
                # stage output is available as a tap).
                "stage_names", "out_features", "out_indices"}
# Every other attribute of transformers.ResNetConfig().to_dict() (5.x) is neutral (see
# memjax.convert.core.NEUTRAL_CONFIG_KEYS), so there are no further defaults to guard;
# anything else (e.g. a timm-style "stem_type") is refused as unknown.
_DEFAULTS: dict[str, Any] = {}
_HEAD_ARCHITECTURES = {"ResNetForImageClassification"}


def from_hf_config(hf: dict[str, Any]) -> ResNetConfig:
    """HF config.json -> :class:`ResNetConfig`. A classifier is planned unless
    ``architectures`` names only other classes (``ResNetModel``, ``ResNetBackbone``);
    :func:`refine_config` then follows the weights."""
    check_config(hf, _IMPLEMENTED, _DEFAULTS, "resnet")
    layer_type = hf.get("layer_type", "bottleneck")
    if layer_type not in LAYER_TYPES:
        raise InputError(f"resnet config.json layer_type={layer_type!r}: expected one of "
                         f"{list(LAYER_TYPES)}")
    act = hf.get("hidden_act", "relu")
    if act not in ACTIVATIONS:
        raise InputError(f"resnet config.json hidden_act={act!r}: expected one of "
                         f"{sorted(ACTIVATIONS)}")
    sizes = tuple(int(v) for v in hf.get("hidden_sizes", ResNetConfig.hidden_sizes))
    depths = tuple(int(v) for v in hf.get("depths", ResNetConfig.depths))
    if len(sizes) != len(depths) or not sizes or min(depths) < 1:
        raise InputError(f"resnet config.json: hidden_sizes {list(sizes)} and depths "
                         f"{list(depths)} must be non-empty, of equal length, depths >= 1")
    architectures = set(hf.get("architectures") or ())
    head = not architectures or bool(_HEAD_ARCHITECTURES & architectures)
    num_labels = len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))
    return ResNetConfig(
        num_channels=int(hf.get("num_channels", 3)),
        embedding_size=int(hf.get("embedding_size", 64)), hidden_sizes=sizes, depths=depths,
        layer_type=layer_type, hidden_act=act,
        downsample_in_first_stage=bool(hf.get("downsample_in_first_stage", False)),
        downsample_in_bottleneck=bool(hf.get("downsample_in_bottleneck", False)),
        num_labels=num_labels if head else 0)


BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def conv_bn_params(take, ours: tuple, conv_key: str, bn_key: str) -> dict[tuple, Any]:
    """One ConvBN's arrays: the conv weight OIHW -> HWIO, and BN weight/bias/statistics."""
    weight = take(f"{conv_key}.weight")
    params = {(*ours, "conv", "kernel"): None if weight is None
              else np.transpose(weight, (2, 3, 1, 0))}
    for our, their in BN_NAMES.items():
        params[(*ours, "norm", our)] = take(f"{bn_key}.{their}")
    return params


def refine_config(config: ResNetConfig, keys: frozenset[str]) -> ResNetConfig:
    """No classifier when the checkpoint has no ``classifier.1.weight`` (a bare model,
    or HF's Identity head of ``num_labels=0``, which returns the pooled features too)."""
    if config.num_labels and "classifier.1.weight" not in keys:
        return dataclasses.replace(config, num_labels=0)
    return config


def convert(reader, config: ResNetConfig) -> dict[tuple, np.ndarray]:
    """HF ResNet keys -> module paths (including BatchNorm running statistics)."""
    with_head = any(k.startswith("resnet.") for k in reader.tensors)
    if with_head and config.num_labels == 0 and "classifier.1.weight" in reader:
        raise InputError("resnet checkpoint has a classifier (classifier.1.weight) but "
                         "config.json's architectures names no ResNetForImageClassification")
    prefix = "resnet." if with_head else ""
    take = lambda key: reader.take(prefix + key)
    layer = lambda key: (f"{key}.convolution", f"{key}.normalization")
    params = conv_bn_params(take, ("embedder",), *layer("embedder.embedder"))
    for s, blocks in enumerate(stage_plan(config)):
        for b, (c_in, c_out, stride) in enumerate(blocks):
            theirs, ours = f"encoder.stages.{s}.layers.{b}", ("stages", s, "blocks", b)
            specs = block_convs(config.layer_type, c_in, c_out, stride,
                                config.downsample_in_bottleneck)
            for k in range(len(specs)):
                params.update(conv_bn_params(take, (*ours, "convs", k),
                                             *layer(f"{theirs}.layer.{k}")))
            if needs_shortcut(c_in, c_out, stride):
                params.update(conv_bn_params(take, (*ours, "shortcut"),
                                             *layer(f"{theirs}.shortcut")))
    if config.num_labels > 0:
        weight = reader.take("classifier.1.weight")  # PyTorch Linear: [out, in]
        params[("classifier", "kernel")] = None if weight is None else weight.T
        params[("classifier", "bias")] = reader.take("classifier.1.bias")
    return {k: v for k, v in params.items() if v is not None}


ARCH = register(Architecture(
    name="resnet", model_types=("resnet",), from_hf_config=from_hf_config,
    build=lambda config, rngs: ResNet(config, rngs=rngs), convert=convert,
    ignore=(r"num_batches_tracked$",), config_class=ResNetConfig, refine_config=refine_config,
))
