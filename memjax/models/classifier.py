"""Small native image models: an MLP and a CNN / small ResNet, as pure functions of params.

memjax.train trains them (many at once with ``jax.vmap``: reference models, SimCLR
encoders); every method runs them through :class:`memjax.models.Model`
(:meth:`Model.from_classifier`). Like the NNX ports they report named activations to
:class:`~memjax.models.taps.Taps` from the same forward pass: ``conv{k}`` (stage output
[H/2^k, W/2^k, C_k], after ReLU, pooling and the residual block), ``dense{k}`` (hidden
layer after ReLU) and ``embedding`` (the last layer's output: logits of a classifier, the
embedding of an encoder).

Params are self-describing pytrees, so one :func:`classifier_logits` runs both kinds:
``{"convs": [{"w": [3, 3, C_in, C_out], "b": [C_out]}, ...],   # CNN only
  "layers": [{"w": [in, out], "b": [out]}, ...]}``
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memjax.errors import InputError
from memjax.models.taps import Taps, tap


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Shape of an MLP classifier: flattened input -> hidden layers (ReLU) -> logits."""

    input_shape: tuple[int, ...]
    num_classes: int
    hidden: tuple[int, ...] = (256, 256)
    kind = "mlp_classifier"

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    def init(self, key: jax.Array) -> dict[str, Any]:
        return {"layers": dense_layers(key, [self.input_dim, *self.hidden, self.num_classes])}

    def describe(self) -> str:
        return f"MLP {self.input_dim}-{'-'.join(map(str, self.hidden))}-{self.num_classes}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "hidden": list(self.hidden)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> MLPConfig:
        return cls(tuple(value["input_shape"]), int(value["num_classes"]),
                   tuple(value["hidden"]))


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """A small CNN: [3x3 conv (SAME) -> ReLU -> 2x2 average pool] per entry of
    ``channels``, then flatten -> hidden dense layers (ReLU) -> logits.

    ``residual=True`` makes it a small ResNet in the layout of Page's ResNet-9 (conv ->
    pool -> residual block): after its pool, every stage computes
    ``relu(h + conv(relu(conv(h))))`` (He et al. 2016's basic block). There is no BatchNorm
    (vmapped training of many models stays a pure function), so the block's second conv
    starts at zero (Goyal et al. 2017's zero-init residual): each block begins as the
    identity (h >= 0 after the stage's ReLU), and the network trains like the plain CNN at
    first.
    """

    input_shape: tuple[int, int, int]
    num_classes: int
    channels: tuple[int, ...] = (16, 32)
    hidden: tuple[int, ...] = (64,)
    residual: bool = False
    kind = "cnn_classifier"

    def __post_init__(self):
        height, width, _ = self.input_shape
        if height % 2 ** len(self.channels) or width % 2 ** len(self.channels):
            raise InputError(f"CNNConfig: input {self.input_shape[:2]} is not divisible by "
                             f"2^{len(self.channels)} (one 2x2 pool per conv layer)")

    def init(self, key: jax.Array) -> dict[str, Any]:
        height, width, channels_in = self.input_shape
        k_conv, k_dense = jax.random.split(key)
        widths = [channels_in, *self.channels]

        def conv(k, c_in, c_out, scale=1.0):
            return {"w": jax.random.normal(k, (3, 3, c_in, c_out)) * scale
                    * jnp.sqrt(2.0 / (9 * c_in)), "b": jnp.zeros(c_out)}

        convs = []
        for k, c_in, c_out in zip(jax.random.split(k_conv, len(self.channels)),
                                  widths[:-1], widths[1:], strict=True):
            convs.append(conv(k, c_in, c_out))  # k as before residual blocks existed
            if self.residual:  # second conv zero: the block starts as the identity
                convs[-1]["res"] = [conv(jax.random.fold_in(k, 1), c_out, c_out),
                                    conv(k, c_out, c_out, scale=0.0)]
        flat = (height * width // 4 ** len(self.channels)) * widths[-1]
        return {"convs": convs,
                "layers": dense_layers(k_dense, [flat, *self.hidden, self.num_classes])}

    def describe(self) -> str:
        return (f"{'ResNet' if self.residual else 'CNN'} "
                f"conv{'-'.join(map(str, self.channels))} "
                f"dense{'-'.join(map(str, self.hidden))}-{self.num_classes}")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "channels": list(self.channels),
                "hidden": list(self.hidden), "residual": self.residual}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> CNNConfig:
        return cls(tuple(value["input_shape"]), int(value["num_classes"]),
                   tuple(value["channels"]), tuple(value["hidden"]),
                   bool(value.get("residual", False)))


CONFIG_KINDS = {config.kind: config for config in (MLPConfig, CNNConfig)}


def config_from_json(value: dict[str, Any]) -> MLPConfig | CNNConfig:
    """The classifier config saved by ``to_json`` (kind ``mlp_classifier`` or
    ``cnn_classifier``); names the kind when it is neither."""
    kind = value.get("kind")
    if kind not in CONFIG_KINDS:
        raise InputError(f"model kind {kind!r}: expected one of {sorted(CONFIG_KINDS)}")
    return CONFIG_KINDS[kind].from_json(value)


def dense_layers(key: jax.Array, sizes: list[int]) -> list[dict[str, jax.Array]]:
    """He-initialised dense layers ``[{"w": [m, n], "b": [n]}]`` for consecutive sizes."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)]


CONV_IMPLS = ("im2col", "xla")


def conv3x3_same(image: jax.Array, kernel: jax.Array, impl: str = "im2col") -> jax.Array:
    """[H, W, C_in] * [3, 3, C_in, C_out] -> [H, W, C_out], zero padding ("SAME").

    ``impl="im2col"`` (training): nine shifted slices and one matmul rather than
    ``lax.conv``: under ``vmap`` over models the kernel is batched, which XLA:CPU runs as a
    grouped convolution many times slower than the batched matmul this becomes.
    ``impl="xla"`` (one model, many examples: scoring): ``lax.conv_general_dilated``, 3.9x
    faster than im2col on XLA:CPU for a 32x32 CNN over 160 views (bench/memorization.py);
    the two agree to float32 rounding (~1e-6 relative).
    """
    if impl == "xla":
        return jax.lax.conv_general_dilated(image[None], kernel, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
    height, width, _ = image.shape
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[i:i + height, j:j + width]
                               for i in range(3) for j in range(3)], axis=-1)
    return patches @ kernel.reshape(-1, kernel.shape[-1])


def conv_stage(h: jax.Array, conv: dict[str, Any], impl: str = "im2col") -> jax.Array:
    """One CNN stage [H, W, C_in] -> [H/2, W/2, C_out]: 3x3 conv -> ReLU -> 2x2 average
    pool, then the residual block ``relu(h + conv(relu(conv(h))))`` if it has one."""
    h = jax.nn.relu(conv3x3_same(h, conv["w"], impl) + conv["b"][None, None])
    height, width, channels = h.shape
    h = h.reshape(height // 2, 2, width // 2, 2, channels).mean(axis=(1, 3))
    if "res" in conv:
        first, second = conv["res"]
        inner = jax.nn.relu(conv3x3_same(h, first["w"], impl) + first["b"][None, None])
        h = jax.nn.relu(h + conv3x3_same(inner, second["w"], impl) + second["b"][None, None])
    return h


def classifier_logits(params: dict[str, Any], image: jax.Array, *,
                      taps: Taps | None = None, conv: str = "im2col") -> jax.Array:
    """Logits [C] of one example [H, W, C_in] (an MLP flattens any shape); activations
    ``conv{k}``, ``dense{k}``, ``embedding`` go to ``taps`` (module docstring); ``conv``:
    the convolution's implementation (:func:`conv3x3_same`)."""
    h = jnp.asarray(image, jnp.float32)
    for k, stage in enumerate(params.get("convs", ()), start=1):
        h = tap(taps, f"conv{k}", conv_stage(h, stage, conv))
    h = jnp.ravel(h)
    *hidden, last = params["layers"]
    for k, layer in enumerate(hidden, start=1):
        h = tap(taps, f"dense{k}", jax.nn.relu(h @ layer["w"] + layer["b"]))
    return tap(taps, "embedding", h @ last["w"] + last["b"])
