"""memjax.robustness: embedding-space and downstream PGD (Kowalczuk et al. 2024) against
independent float64 NumPy implementations, the keyed starts, the checkpoint's
normalisation inside the forward, the ViT path against transformers, the linear probe,
and ``memjax robustness`` end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.engine import make_mesh
from memjax.errors import InputError
from memjax.models import Model
from memjax.robustness import (
    ImageEncoder,
    attack_keys,
    downstream_pgd,
    embedding_pgd,
    embedding_shift,
    encoder_robustness,
    fit_linear_probe,
    image_encoder,
    random_start,
)
from memjax.train import MLPConfig
from tests import hf_tiny

SHAPE = (4, 4, 2)  # a tiny image [H, W, C]


# --------------------------------------------------------------------------- NumPy


def _mlp(params, x):
    """The tiny encoder: z = W2 tanh(W1 vec(x) + b1)."""
    return params["w2"] @ jnp.tanh(params["w1"] @ x.reshape(-1) + params["b1"])


def _np_encode(params, x, mean, std):
    u = ((x - mean) / std).reshape(-1)
    h = np.tanh(params["w1"] @ u + params["b1"])
    return params["w2"] @ h, h


def _np_grad_from_z(params, x, mean, std, dz):
    """d objective / d x given d objective / d z, through the normalisation."""
    _, h = _np_encode(params, x, mean, std)
    du = params["w1"].T @ ((1 - h ** 2) * (params["w2"].T @ dz))
    return du.reshape(x.shape) / std


def _np_pgd(grad_fn, image, delta0, eps, alpha, steps):
    delta = delta0.copy()
    for _ in range(steps):
        delta = delta + alpha * np.sign(grad_fn(image + delta))
        delta = np.clip(np.clip(delta, -eps, eps) + image, 0.0, 1.0) - image
    return delta


def _problem(rng):
    d_in, hidden, dim = int(np.prod(SHAPE)), 7, 5
    params = {"w1": rng.normal(size=(hidden, d_in)), "b1": rng.normal(size=hidden),
              "w2": rng.normal(size=(dim, hidden))}
    image = rng.uniform(size=SHAPE)
    image[0, 0] = 0.0  # pixels at the edges of the range: the range projection acts
    image[1, 1] = 1.0
    mean, std = rng.uniform(0.3, 0.6, size=2), rng.uniform(0.2, 0.5, size=2)
    eps = rng.uniform(0.03, 0.1)
    return params, image, mean, std, eps


def _encoder(mean, std):
    return ImageEncoder(_mlp, None, tuple(mean), tuple(std))


def test_embedding_pgd_equals_numpy_float64(rng, seed):
    params, image, mean, std, eps = _problem(rng)
    alpha, steps = eps / 3, 6
    with jax.enable_x64(True):
        key = jax.random.key(seed)
        jparams = jax.tree.map(jnp.asarray, params)
        delta = np.asarray(embedding_pgd(_encoder(mean, std), jparams, jnp.asarray(image), key,
                                         epsilon=eps, step_size=alpha, steps=steps))
        delta0 = np.asarray(random_start(key, jnp.asarray(image), eps))
    clean, _ = _np_encode(params, image, mean, std)

    def grad(x):  # of ||f(x) - f(x0)||^2; its sign is that of the L2 distance's gradient
        z, _ = _np_encode(params, x, mean, std)
        return _np_grad_from_z(params, x, mean, std, 2 * (z - clean))

    expected = _np_pgd(grad, image, delta0, eps, alpha, steps)
    # Both float64 and the same sign decisions: only rounding separates them.
    np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-12)
    assert np.abs(delta).max() <= eps + 1e-12  # inside the ball
    assert (image + delta).min() >= 0 and (image + delta).max() <= 1  # inside the range
    assert np.abs(delta).max() > 0.9 * eps  # the steps moved it (not a trivial pass)


def test_random_start_is_uniform_in_the_ball_and_range(seed):
    image = jnp.full((40, 40, 3), 0.5)
    delta = np.asarray(random_start(jax.random.key(seed), image, 0.1))
    assert np.abs(delta).max() <= 0.1 + 1e-7
    # U[-0.1, 0.1]: mean 0 (sd of the mean 0.0577/sqrt(4800) = 8e-4, 5 sd), variance 0.01/3
    assert abs(delta.mean()) < 4.2e-3
    assert abs(delta.var() - 0.01 / 3) < 0.15 * 0.01 / 3
    edge = np.asarray(random_start(jax.random.key(seed), jnp.ones((8, 8, 1)), 0.1))
    assert edge.max() <= 0 and edge.min() < 0  # projected below 1


def test_downstream_pgd_equals_numpy_float64(rng, seed):
    params, image, mean, std, eps = _problem(rng)
    head = {"weight": rng.normal(size=(5, 3)), "bias": rng.normal(size=3)}
    label, alpha, steps = int(rng.integers(3)), eps / 4, 5
    with jax.enable_x64(True):
        key = jax.random.key(seed)
        delta = np.asarray(downstream_pgd(
            _encoder(mean, std), jax.tree.map(jnp.asarray, params),
            jax.tree.map(jnp.asarray, head), jnp.asarray(image), jnp.asarray(label), key,
            epsilon=eps, step_size=alpha, steps=steps))
        delta0 = np.asarray(random_start(key, jnp.asarray(image), eps))

    def grad(x):  # of the cross-entropy: dL/dz = W (softmax - onehot)
        z, _ = _np_encode(params, x, mean, std)
        logits = z @ head["weight"] + head["bias"]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        p[label] -= 1
        return _np_grad_from_z(params, x, mean, std, head["weight"] @ p)

    expected = _np_pgd(grad, image, delta0, eps, alpha, steps)
    np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-12)  # float64 both


def test_embedding_shift_equals_numpy(rng):
    a, b = rng.normal(size=9), rng.normal(size=9)
    out = embedding_shift(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    # float32 inputs: a few ulps of values of size ~3
    np.testing.assert_allclose(out["l2"], np.linalg.norm(b - a), rtol=1e-5)
    np.testing.assert_allclose(out["cosine"], a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                               rtol=1e-5, atol=1e-6)


def test_linear_probe_is_a_stationary_point(rng):
    n, d, c, l2 = 90, 4, 3, 1e-2
    x = rng.normal(size=(n, d))
    y = rng.integers(c, size=n)
    x[np.arange(n), y] += 1.5  # learnable but not separable
    head = fit_linear_probe(x, y, num_classes=c, l2=l2)
    w, b = head["weight"].astype(np.float64), head["bias"].astype(np.float64)
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(n), y] -= 1
    grad_w, grad_b = x.T @ p / n + l2 * w, p.mean(axis=0)
    # float32 L-BFGS: gradient norm at the optimum down to float32 resolution of O(1) terms
    assert np.abs(grad_w).max() < 1e-4 and np.abs(grad_b).max() < 1e-4
    assert np.abs(w).max() > 0.1  # it learned something


# --------------------------------------------------------------------------- the runner


NORMALIZE = ((0.5, 0.4), (0.25, 0.3))  # per-channel mean, std of the runner test


@pytest.fixture(scope="module")
def mlp_model():
    config = MLPConfig(SHAPE, 3, hidden=(12, 6))
    return Model.from_classifier(config.init(jax.random.key(3)), config)


def _data(rng, n=24):
    return {"image": rng.uniform(size=(n, *SHAPE)).astype(np.float32),
            "label": rng.integers(3, size=n).astype(np.int32),
            "id": rng.permutation(1000)[:n].astype(np.int64)}


def test_runner_equals_the_pure_attack_for_any_batch_size_and_mesh(mlp_model, rng, seed):
    data = _data(rng)
    head = {"weight": rng.normal(size=(6, 3)).astype(np.float32),
            "bias": np.zeros(3, np.float32)}
    kwargs = {"epsilons": [0.0, 4 / 255, 16 / 255], "steps": 3, "head": head, "seed": seed,
              "layer": "dense2", "normalize": NORMALIZE, "progress": False}
    a = encoder_robustness(mlp_model, data, batch_size=8, **kwargs)
    b = encoder_robustness(mlp_model, data, batch_size=24,
                           mesh=make_mesh(devices=jax.devices()[:1]), **kwargs)
    for field in ("shift_l2", "shift_cosine", "adv_correct", "clean_correct"):
        # same keys per example id: equal up to float32 batching differences of XLA:CPU
        np.testing.assert_allclose(a[field], b[field], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a["adv_correct"][:, 0], a["clean_correct"])  # ε = 0
    assert (a["shift_l2"][:, 0] == 0).all()
    encode = image_encoder(mlp_model, layer="dense2", normalize=kwargs["normalize"])
    # A larger ball moves every example further, except one whose ReLUs are all off around it
    # (seed 2865001440 drew one): its embedding is locally constant, so no ε can move it.
    moved = a["shift_l2"][:, 2] > 0
    assert (a["shift_l2"][moved, 2] > a["shift_l2"][moved, 1]).all()
    assert moved.mean() > 0.5
    for i in np.flatnonzero(~moved):
        jacobian = jax.jacobian(encode, argnums=1)(mlp_model.params, jnp.asarray(data["image"][i]))
        assert not np.asarray(jacobian).any() and a["shift_l2"][i, 1] == 0
    i = 5
    key, _ = attack_keys(seed, jnp.int32(data["id"][i]), jnp.int32(2))
    image = jnp.asarray(data["image"][i])
    delta = embedding_pgd(encode, mlp_model.params, image, key, epsilon=16 / 255,
                          step_size=2.5 * 16 / 255 / 3, steps=3)
    shift = embedding_shift(encode(mlp_model.params, image),
                            encode(mlp_model.params, image + delta))
    np.testing.assert_allclose(a["shift_l2"][i, 2], shift["l2"], rtol=1e-5)  # float32


def test_runner_refuses_bad_input(mlp_model, rng):
    data = _data(rng, 8)
    run = dict(epsilons=[0.03], batch_size=8, layer="dense2", progress=False)
    with pytest.raises(InputError, match="is a classifier"):
        encoder_robustness(mlp_model, data, epsilons=[0.03], batch_size=8)
    with pytest.raises(InputError, match="layer 'nope' is not a tap"):
        encoder_robustness(mlp_model, data, **{**run, "layer": "nope"})
    with pytest.raises(InputError, match="epsilons"):
        encoder_robustness(mlp_model, data, **{**run, "epsilons": [-0.1]})
    with pytest.raises(InputError, match="head: weight is"):
        encoder_robustness(mlp_model, data, head={"weight": np.zeros((5, 3)),
                                                  "bias": np.zeros(3)}, **run)
    with pytest.raises(InputError, match="3 channel means for images"):
        encoder_robustness(mlp_model, data, **{**run, "normalize": ((0.5,) * 3, (0.2,) * 3)})
    normalised = {**data, "image": data["image"] - 0.5}
    with pytest.raises(InputError, match=f"example {data['id'][0]} \\(row 0\\) has image values"):
        encoder_robustness(mlp_model, normalised, **run)


# --------------------------------------------------------------------------- ViT


def test_vit_normalisation_and_shift_equal_transformers(tmp_path_factory, rng):
    import torch

    from memjax.convert import load

    folder, hf = hf_tiny.cached(tmp_path_factory, "vit")
    model = load(folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    encode = image_encoder(model, layer="final")
    assert encode.mean == tuple(config["image_mean"]) and encode.std == tuple(config["image_std"])
    image = rng.uniform(size=(32, 32, 3)).astype(np.float32)
    delta = rng.uniform(-8 / 255, 8 / 255, size=image.shape).astype(np.float32)
    ours = embedding_shift(encode(model.params, jnp.asarray(image)),
                           encode(model.params, jnp.asarray(image + delta)))

    def cls(x):
        pixels = (x - np.asarray(config["image_mean"])) / np.asarray(config["image_std"])
        tensor = torch.tensor(pixels.transpose(2, 0, 1)[None], dtype=torch.float32)
        with torch.no_grad():
            return hf.vit(pixel_values=tensor).last_hidden_state[0, 0].double().numpy()

    clean, adversarial = cls(image), cls(image + delta)
    # float32 ViTs on two stacks: ~1e-6 absolute per feature, on a shift of size ~0.1
    np.testing.assert_allclose(ours["l2"], np.linalg.norm(adversarial - clean), rtol=1e-3)
    np.testing.assert_allclose(ours["cosine"], clean @ adversarial / np.linalg.norm(clean)
                               / np.linalg.norm(adversarial), rtol=1e-5)
    with pytest.raises(InputError, match="rescales pixels by nothing"):
        image_encoder(model.replace(preprocess={**config, "do_rescale": False}), layer="final")


# --------------------------------------------------------------------------- the CLI


def test_cli_end_to_end_and_bad_input(tmp_path, rng, capsys):
    from memjax.cli import main
    from memjax.train import save_model

    config = MLPConfig((4, 4, 2), 3, hidden=(8,))
    save_model(tmp_path / "mlp", jax.tree.map(np.asarray, config.init(jax.random.key(1))),
               config)
    data = _data(rng, 16)
    np.savez(tmp_path / "data.npz", **data)
    argv = ["robustness", "--model", str(tmp_path / "mlp"), "--data", str(tmp_path / "data.npz"),
            "--layer", "dense1", "--epsilon", "0", "8/255", "--steps", "2", "--fit-head",
            "--batch-size", "8", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "scores.parquet").to_pydict()
    assert table["id"] == list(data["id"]) and len(table["shift_l2"][0]) == 2
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    section = next(iter(metrics.values()))
    assert section["robust_accuracy eps=0"] == section["clean_accuracy"]
    head = np.load(tmp_path / "out" / "head.npz")
    assert head["weight"].shape == (8, 3)
    again = [*argv[:-1], str(tmp_path / "again"), "--head", str(tmp_path / "out" / "head.npz")]
    again.remove("--fit-head")
    assert main(again) == 0
    assert pq.read_table(tmp_path / "again" / "scores.parquet").to_pydict() == table
    capsys.readouterr()
    bad = [(["--epsilon", "-1/255"], "--epsilon"),
           (["--head", str(tmp_path / "missing.npz")], "--head"),
           (["--layer", "nope"], "--layer 'nope': not a tap")]
    for extra, message in bad:
        args = [a for a in argv if a != "--fit-head"][:-1] + [str(tmp_path / "bad"), *extra]
        assert main(args) == 2
        assert message in capsys.readouterr().err
    no_layer = [a for a in argv if a not in ("--layer", "dense1")]
    assert main([*no_layer[:-1], str(tmp_path / "bad")]) == 2
    assert "--layer: model" in capsys.readouterr().err  # a classifier needs its tap named
    assert not (tmp_path / "bad").exists()
