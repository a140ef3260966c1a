"""Small image classifiers (an MLP and a CNN) trained with optax on a keep-mask subset.

``fit_classifier`` is a pure function of (key, data, weights): deterministic for a key, and
``jax.vmap`` over keys and weights trains many models at once (reference models for
membership inference; :func:`memjax.train.train_classifiers`). Training is full-batch
Adam on the weighted mean loss, where the weights [N] (0/1: a keep mask) select the
training examples.

Params are self-describing pytrees, so one :func:`classifier_logits` runs both kinds:
``{"convs": [{"w": [3, 3, C_in, C_out], "b": [C_out]}, ...],   # CNN only
  "layers": [{"w": [in, out], "b": [out]}, ...]}``
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.errors import InputError
from memjax.signals import classification

MODEL_FILE = "memjax_model.json"


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


def conv3x3_same(image: jax.Array, kernel: jax.Array) -> jax.Array:
    """[H, W, C_in] * [3, 3, C_in, C_out] -> [H, W, C_out], zero padding ("SAME").

    Written as nine shifted slices and one matmul (im2col) rather than ``lax.conv``: under
    ``vmap`` over models the kernel is batched, which XLA:CPU runs as a grouped
    convolution many times slower than the batched matmul this becomes.
    """
    height, width, _ = image.shape
    padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[i:i + height, j:j + width]
                               for i in range(3) for j in range(3)], axis=-1)
    return patches @ kernel.reshape(-1, kernel.shape[-1])


def conv_stage(h: jax.Array, conv: dict[str, Any]) -> jax.Array:
    """One CNN stage [H, W, C_in] -> [H/2, W/2, C_out]: 3x3 conv -> ReLU -> 2x2 average
    pool, then the residual block ``relu(h + conv(relu(conv(h))))`` if it has one."""
    h = jax.nn.relu(conv3x3_same(h, conv["w"]) + conv["b"])
    height, width, channels = h.shape
    h = h.reshape(height // 2, 2, width // 2, 2, channels).mean(axis=(1, 3))
    if "res" in conv:
        first, second = conv["res"]
        inner = jax.nn.relu(conv3x3_same(h, first["w"]) + first["b"])
        h = jax.nn.relu(h + conv3x3_same(inner, second["w"]) + second["b"])
    return h


def classifier_logits(params: dict[str, Any], image: jax.Array) -> jax.Array:
    """Logits [C] of one example [H, W, C_in] (an MLP flattens any shape)."""
    h = jnp.asarray(image, jnp.float32)
    for conv in params.get("convs", ()):
        h = conv_stage(h, conv)
    h = jnp.ravel(h)
    *hidden, last = params["layers"]
    for layer in hidden:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ last["w"] + last["b"]


def classification_signals(params: dict[str, Any], example: dict[str, jax.Array]):
    """The engine's score function: the classification signal bundle of one example."""
    return classification(classifier_logits(params, example["image"]), example["label"])


def fit_classifier(key: jax.Array, images: jax.Array, labels: jax.Array, keep: jax.Array, *,
                   config: MLPConfig | CNNConfig, steps: int = 400,
                   learning_rate: float = 1e-3, weight_decay: float = 0.0) -> dict[str, Any]:
    """Train a classifier on the examples with ``keep`` = 1 (full-batch Adam).

    Args:
      key: PRNG key for initialisation.
      images: [N, ...] float inputs; labels: [N] int; keep: [N] 0/1 training weights.

    Returns:
      The trained params. Pure: vmap over (key, keep) to train many models at once.
    """
    params = config.init(key)
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    keep = keep.astype(jnp.float32)

    def loss(p):
        logits = jax.vmap(classifier_logits, in_axes=(None, 0))(p, images)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(per_example * keep) / jnp.maximum(jnp.sum(keep), 1.0)

    def step(carry, _):
        p, state = carry
        grads = jax.grad(loss)(p)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def save_model(directory: str | Path, params: dict[str, Any],
               config: MLPConfig | CNNConfig) -> Path:
    """Save params (orbax) and the config (memjax_model.json) into ``directory``."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", jax.tree.map(np.asarray, params), force=True)
    checkpointer.wait_until_finished()
    (directory / MODEL_FILE).write_text(json.dumps(config.to_json(), indent=1))
    return directory


def load_model(directory: str | Path) -> tuple[dict[str, Any], MLPConfig | CNNConfig]:
    """Load a model saved by :func:`save_model`; names the folder if it is not one."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not (directory / MODEL_FILE).is_file():
        raise InputError(f"--model {str(directory)!r}: expected a folder with {MODEL_FILE} "
                         "(written by memjax audit or memjax.train.save_model)")
    config = config_from_json(json.loads((directory / MODEL_FILE).read_text()))
    abstract = jax.eval_shape(config.init, jax.random.key(0))
    params = ocp.StandardCheckpointer().restore(directory / "params", abstract)
    return jax.tree.map(np.asarray, params), config
