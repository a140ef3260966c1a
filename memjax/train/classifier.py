"""An MLP image classifier trained with optax on a keep-mask subset of the data.

``fit_mlp`` is a pure function of (key, data, keep mask): deterministic for a key, and
``jax.vmap`` over keys and masks trains many models at once (reference models for
membership inference). Training is full-batch Adam on the weighted mean loss, where the
keep mask [N] (0/1) selects the training examples.
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

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "mlp_classifier", "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "hidden": list(self.hidden)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> MLPConfig:
        if value.get("kind") != "mlp_classifier":
            raise InputError(f"model kind {value.get('kind')!r}: expected 'mlp_classifier'")
        return cls(tuple(value["input_shape"]), int(value["num_classes"]),
                   tuple(value["hidden"]))


def init_mlp(key: jax.Array, config: MLPConfig) -> dict[str, Any]:
    """He-initialised params ``{"layers": [{"w": [in, out], "b": [out]}, ...]}``."""
    sizes = [config.input_dim, *config.hidden, config.num_classes]
    keys = jax.random.split(key, len(sizes) - 1)
    return {"layers": [
        {"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]}


def mlp_logits(params: dict[str, Any], image: jax.Array) -> jax.Array:
    """Logits [C] of one example (any shape; flattened)."""
    h = jnp.ravel(image).astype(jnp.float32)
    *hidden, last = params["layers"]
    for layer in hidden:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ last["w"] + last["b"]


def classification_signals(params: dict[str, Any], example: dict[str, jax.Array]):
    """The engine's score function: the classification signal bundle of one example."""
    return classification(mlp_logits(params, example["image"]), example["label"])


def fit_mlp(key: jax.Array, images: jax.Array, labels: jax.Array, keep: jax.Array, *,
            config: MLPConfig, steps: int = 400, learning_rate: float = 1e-3,
            weight_decay: float = 0.0) -> dict[str, Any]:
    """Train an MLP on the examples with ``keep`` = 1 (full-batch Adam), deterministically.

    Args:
      key: PRNG key for initialisation.
      images: [N, ...] float inputs; labels: [N] int; keep: [N] 0/1 training mask.

    Returns:
      The trained params. Pure: vmap over (key, keep) to train many models at once.
    """
    params = init_mlp(key, config)
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    keep = keep.astype(jnp.float32)

    def loss(p):
        logits = jax.vmap(mlp_logits, in_axes=(None, 0))(p, images)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(per_example * keep) / jnp.maximum(jnp.sum(keep), 1.0)

    def step(carry, _):
        p, state = carry
        grads = jax.grad(loss)(p)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def save_model(directory: str | Path, params: dict[str, Any], config: MLPConfig) -> Path:
    """Save params (orbax) and the config (memjax_model.json) into ``directory``."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", jax.tree.map(np.asarray, params), force=True)
    checkpointer.wait_until_finished()
    (directory / MODEL_FILE).write_text(json.dumps(config.to_json(), indent=1))
    return directory


def load_model(directory: str | Path) -> tuple[dict[str, Any], MLPConfig]:
    """Load a model saved by :func:`save_model`; names the folder if it is not one."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not (directory / MODEL_FILE).is_file():
        raise InputError(f"--model {str(directory)!r}: expected a folder with {MODEL_FILE} "
                         "(written by memjax audit or memjax.train.save_model)")
    config = MLPConfig.from_json(json.loads((directory / MODEL_FILE).read_text()))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float32),
                            init_mlp(jax.random.key(0), config))
    params = ocp.StandardCheckpointer().restore(directory / "params", abstract)
    return jax.tree.map(np.asarray, params), config
