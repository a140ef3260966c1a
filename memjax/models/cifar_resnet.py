"""CIFAR-style ResNet-9 and ResNet-18 in Flax NNX, for small (self-)supervised experiments.

- :func:`resnet9`: the DAWNBench ResNet-9 of David Page ("How to train your ResNet",
  2018): prep conv 64; layer1 = conv 128 + max-pool 2 + a residual of two convs; layer2 =
  conv 256 + max-pool 2; layer3 = conv 512 + max-pool 2 + residual; global max-pool; a
  bias-free linear layer whose logits are scaled by 0.125. Every conv is 3x3 conv-BN-ReLU;
  residuals are ``x + f(x)`` with no activation after the add.
- :func:`resnet18`: the CIFAR variant of He et al. 2016's ResNet-18 (as in kuangliu's
  pytorch-cifar): a 3x3 stride-1 stem without max-pool, BasicBlocks [2, 2, 2, 2] of widths
  64-128-256-512 (stride 2 from the second stage on), global average pooling, a linear
  layer with bias.

Images are NHWC float ``[B, H, W, C]``; the networks are size-agnostic (global pooling).
``model(x)`` returns logits ``[B, num_classes]``, or the pooled features ``[B, C]`` when
``num_classes`` is 0 or None (an SSL encoder); :meth:`CifarResNet.features` always
returns the pooled features.

BatchNorm: ``train=False`` (default) uses the running statistics (``nnx.BatchStat``,
never touched by ``nnx.grad``). ``model(x, train=True)`` normalises with batch statistics
and updates the running statistics in place (PyTorch's momentum 0.1 and unbiased running
variance). Eagerly the module simply changes; under ``jax.jit`` use ``nnx.jit``, or merge
the state inside the jitted function and return ``nnx.state(model)`` (functional update)::

    graphdef, state = nnx.split(model)
    @jax.jit
    def step(state, x):
        m = nnx.merge(graphdef, state)
        return m(x, train=True), nnx.state(m)

Taps (see :mod:`memjax.models.taps`), in call order:

- ``embedder``: after the stem/prep conv, BN and ReLU.
- ``stages.{s}.blocks.{b}.conv{k}``: conv ``k`` (0-based) of block ``b`` after its BN and
  ReLU (ResNet-18's last conv of a block: after BN, before the residual add). ResNet-9:
  block 0 of a stage is its conv (tapped before the max-pool); blocks 1.. are residuals.
- ``stages.{s}.blocks.{b}.out``: the block output (ResNet-9 block 0: after the max-pool).
- ``stages.{s}.out``, ``pooled`` (``[B, C]``).

:func:`memjax.convert.from_torch_state_dict` loads PyTorch weights, strictly; the expected
key names are those of :func:`torch_keys` (kuangliu's ResNet-18 names; ResNet-9 after
Page's layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax.errors import InputError
from memjax.models.layers import Dense
from memjax.models.registry import Architecture, register
from memjax.models.resnet import ConvBN, ResNetBlock, conv_bn_params, max_pool, needs_shortcut
from memjax.models.taps import Taps, tap

ARCHS = ("resnet9", "resnet18")


@dataclasses.dataclass(frozen=True)
class CifarResNetConfig:
    """Shape of a CIFAR ResNet.

    Attributes:
      arch: "resnet9" (Page's conv-pool stages with plain residuals) or "resnet18"
        (BasicBlock stages).
      num_classes: classifier outputs; 0 or None: no classifier (features).
      stem_width: channels of the stem (ResNet-18) / prep (ResNet-9) conv.
      widths: channels of each stage.
      depths: ResNet-18: BasicBlocks per stage; ResNet-9: residual blocks after the
        stage's conv-pool (Page: (1, 0, 1)).
      in_channels: image channels.
      logit_scale: multiplies the logits (Page's ResNet-9: 0.125).
    """

    arch: str = "resnet18"
    num_classes: int | None = 10
    stem_width: int = 64
    widths: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    in_channels: int = 3
    logit_scale: float = 1.0


def check(config: CifarResNetConfig) -> CifarResNetConfig:
    if config.arch not in ARCHS:
        raise InputError(f"CifarResNetConfig.arch={config.arch!r}: expected one of {ARCHS}")
    if len(config.widths) != len(config.depths) or not config.widths:
        raise InputError(f"CifarResNetConfig: widths {config.widths} and depths "
                         f"{config.depths} must be non-empty and of equal length")
    if config.arch == "resnet18" and min(config.depths) < 1:
        raise InputError(f"CifarResNetConfig: resnet18 depths {config.depths} must be >= 1")
    return config


def stage_plan(config: CifarResNetConfig) -> list[list[tuple[int, int, int]]]:
    """ResNet-18: (c_in, c_out, stride) of each BasicBlock, per stage (stride 2 from the
    second stage on). ResNet-9: (c_in, c_out, 1) of the conv-pool, then of each residual."""
    plan, c_in = [], config.stem_width
    for s, (width, depth) in enumerate(zip(config.widths, config.depths, strict=True)):
        if config.arch == "resnet9":
            plan.append([(c_in, width, 1)] + [(width, width, 1)] * depth)
        else:
            stride = 2 if s > 0 else 1
            plan.append([(c_in, width, stride)] + [(width, width, 1)] * (depth - 1))
        c_in = width
    return plan


class ConvPool(nnx.Module):
    """Page's stage entry: conv3x3-BN-ReLU, then max-pool 2x2/2."""

    def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs):
        self.convs = nnx.List([ConvBN(c_in, c_out, 3, rngs=rngs)])

    def __call__(self, x, name: str, taps: Taps | None, *, train: bool = False):
        h = tap(taps, f"{name}.conv0", jax.nn.relu(self.convs[0](x, train=train)))
        return tap(taps, f"{name}.out", max_pool(h, 2, 2))


class Residual(nnx.Module):
    """Page's residual: ``x + relu(bn(conv(relu(bn(conv(x))))))``, no activation after."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.convs = nnx.List([ConvBN(width, width, 3, rngs=rngs) for _ in range(2)])

    def __call__(self, x, name: str, taps: Taps | None, *, train: bool = False):
        h = x
        for k, conv in enumerate(self.convs):
            h = tap(taps, f"{name}.conv{k}", jax.nn.relu(conv(h, train=train)))
        return tap(taps, f"{name}.out", x + h)


def build_block(config: CifarResNetConfig, b: int, spec: tuple[int, int, int],
                rngs: nnx.Rngs) -> nnx.Module:
    c_in, c_out, stride = spec
    if config.arch == "resnet18":
        return ResNetBlock(c_in, c_out, stride, layer_type="basic", rngs=rngs)
    return ConvPool(c_in, c_out, rngs=rngs) if b == 0 else Residual(c_out, rngs=rngs)


class CifarStage(nnx.Module):
    def __init__(self, config: CifarResNetConfig, specs: list[tuple[int, int, int]], *,
                 rngs: nnx.Rngs):
        self.blocks = nnx.List([build_block(config, b, spec, rngs)
                                for b, spec in enumerate(specs)])

    def __call__(self, x, name: str, taps: Taps | None, *, train: bool = False):
        for b, block in enumerate(self.blocks):
            x = block(x, f"{name}.blocks.{b}", taps, train=train)
        return tap(taps, f"{name}.out", x)


class CifarResNet(nnx.Module):
    """A CIFAR ResNet-9 / ResNet-18 (see the module docstring); build with the presets."""

    def __init__(self, config: CifarResNetConfig, *, rngs: nnx.Rngs):
        self.config = check(config)
        self.embedder = ConvBN(config.in_channels, config.stem_width, 3, rngs=rngs)
        self.stages = nnx.List([CifarStage(config, specs, rngs=rngs)
                                for specs in stage_plan(config)])
        self.classifier = (Dense(config.widths[-1], config.num_classes, rngs=rngs,
                                 use_bias=config.arch == "resnet18")
                           if config.num_classes else None)

    def features(self, images: jax.Array, *, taps: Taps | None = None,
                 train: bool = False) -> jax.Array:
        """Pooled features ``[B, C]`` of NHWC ``images`` ``[B, H, W, in_channels]``."""
        if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
            raise InputError(f"images shape {images.shape}: expected NHWC "
                             f"[B, H, W, {self.config.in_channels}]")
        x = tap(taps, "embedder", jax.nn.relu(self.embedder(images, train=train)))
        for s, stage in enumerate(self.stages):
            x = stage(x, f"stages.{s}", taps, train=train)
        # Page pools with MaxPool2d(4) on the 4x4 map of a 32x32 image: a global max.
        pool = jnp.max if self.config.arch == "resnet9" else jnp.mean
        return tap(taps, "pooled", pool(x, axis=(1, 2)))

    def __call__(self, images: jax.Array, *, taps: Taps | None = None,
                 train: bool = False) -> jax.Array:
        """Logits ``[B, num_classes]`` (features ``[B, C]`` without a classifier)."""
        pooled = self.features(images, taps=taps, train=train)
        if self.classifier is None:
            return pooled
        return self.classifier(pooled) * self.config.logit_scale


def resnet9_config(num_classes: int | None = 10, *, in_channels: int = 3) -> CifarResNetConfig:
    """Page's DAWNBench ResNet-9: prep 64; layers 128/256/512; residuals on 1 and 3."""
    return CifarResNetConfig(arch="resnet9", num_classes=num_classes, stem_width=64,
                             widths=(128, 256, 512), depths=(1, 0, 1),
                             in_channels=in_channels, logit_scale=0.125)


def resnet18_config(num_classes: int | None = 10, *,
                    in_channels: int = 3) -> CifarResNetConfig:
    """CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2]."""
    return CifarResNetConfig(arch="resnet18", num_classes=num_classes,
                             in_channels=in_channels)


def resnet9(num_classes: int | None = 10, *, in_channels: int = 3,
            rngs: nnx.Rngs | None = None) -> CifarResNet:
    """A randomly initialised :func:`resnet9_config` model (``rngs`` default: seed 0)."""
    return CifarResNet(resnet9_config(num_classes, in_channels=in_channels),
                       rngs=rngs or nnx.Rngs(0))


def resnet18(num_classes: int | None = 10, *, in_channels: int = 3,
             rngs: nnx.Rngs | None = None) -> CifarResNet:
    """A randomly initialised :func:`resnet18_config` model (``rngs`` default: seed 0)."""
    return CifarResNet(resnet18_config(num_classes, in_channels=in_channels),
                       rngs=rngs or nnx.Rngs(0))


# --------------------------------------------------------------------------- PyTorch weights


def torch_keys(config: CifarResNetConfig) -> dict[tuple, tuple[str, str]]:
    """Module path of every ConvBN -> (conv key, BN key) of the PyTorch state dict.

    ResNet-18 (kuangliu/pytorch-cifar): ``conv1``/``bn1``; ``layer{s+1}.{b}.conv{k+1}`` /
    ``bn{k+1}``; ``layer{s+1}.{b}.shortcut.0`` / ``shortcut.1``; ``linear``. ResNet-9:
    ``prep.conv``/``prep.bn``; ``layer{s+1}.conv``/``.bn``; residual ``r`` (0-based):
    ``layer{s+1}.residual.{r}.res{k+1}.conv`` / ``.bn``; ``linear``.
    """
    keys: dict[tuple, tuple[str, str]] = {}
    if config.arch == "resnet18":
        keys[("embedder",)] = ("conv1", "bn1")
    else:
        keys[("embedder",)] = ("prep.conv", "prep.bn")
    for s, specs in enumerate(stage_plan(config)):
        for b, (c_in, c_out, stride) in enumerate(specs):
            ours, theirs = ("stages", s, "blocks", b), f"layer{s + 1}"
            if config.arch == "resnet18":
                for k in range(2):
                    keys[(*ours, "convs", k)] = (f"{theirs}.{b}.conv{k + 1}",
                                                 f"{theirs}.{b}.bn{k + 1}")
                if needs_shortcut(c_in, c_out, stride):
                    keys[(*ours, "shortcut")] = (f"{theirs}.{b}.shortcut.0",
                                                 f"{theirs}.{b}.shortcut.1")
            elif b == 0:
                keys[(*ours, "convs", 0)] = (f"{theirs}.conv", f"{theirs}.bn")
            else:
                for k in range(2):
                    res = f"{theirs}.residual.{b - 1}.res{k + 1}"
                    keys[(*ours, "convs", k)] = (f"{res}.conv", f"{res}.bn")
    return keys


def convert(reader: Any, config: CifarResNetConfig) -> dict[tuple, np.ndarray]:
    """PyTorch state-dict keys (see :func:`torch_keys`) -> module paths."""
    params: dict[tuple, Any] = {}
    for ours, (conv_key, bn_key) in torch_keys(config).items():
        params.update(conv_bn_params(reader.take, ours, conv_key, bn_key))
    if config.num_classes:
        weight = reader.take("linear.weight")  # PyTorch Linear: [out, in]
        params[("classifier", "kernel")] = None if weight is None else weight.T
        if config.arch == "resnet18":
            params[("classifier", "bias")] = reader.take("linear.bias")
    return {k: v for k, v in params.items() if v is not None}


def _no_hf_config(hf: dict[str, Any]) -> CifarResNetConfig:
    raise InputError("cifar_resnet has no Hugging Face checkpoints; build it with "
                     "memjax.models.cifar_resnet.resnet9/resnet18 or "
                     "memjax.convert.from_torch_state_dict")


# Registered (with no HF model_type) so memjax.convert.save / restore handle trained models.
ARCH = register(Architecture(
    name="cifar_resnet", model_types=(), from_hf_config=_no_hf_config,
    build=lambda config, rngs: CifarResNet(config, rngs=rngs), convert=convert,
    ignore=(r"num_batches_tracked$",), config_class=CifarResNetConfig,
    refine_config=lambda config, keys: check(config),
))
