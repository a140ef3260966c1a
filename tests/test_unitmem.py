"""UnitMem: the formula against float64 NumPy, streaming vs materialised, 8 devices vs 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.augment import simclr_views
from memjax.engine import clear_compile_cache, compile_cache_info, make_mesh
from memjax.errors import InputError
from memjax.memorization import (
    batch_stats,
    combine,
    unitmem,
    unitmem_from_activations,
    unitmem_from_stats,
)
from memjax.models import Model
from memjax.models.cifar_resnet import CifarResNet, CifarResNetConfig
from memjax.models.taps import with_taps


def reference(mu, others, eps=1e-8):
    """Independent float64 loop: first index wins ties; dead units score 0."""
    mu = np.maximum(np.asarray(mu, np.float64), 0.0)
    scores, argmax = [], []
    for u in range(mu.shape[1]):
        col = mu[:, u]
        top = int(np.flatnonzero(col == col.max())[0])
        rest = np.delete(col, top)
        other = rest.mean() if others == "mean" else np.median(rest)
        den = col[top] + other
        scores.append(0.0 if den == 0 else (col[top] - other) / (den + eps))
        argmax.append(top)
    return np.array(scores), np.array(argmax)


@pytest.mark.parametrize("others", ["mean", "median"])
@pytest.mark.parametrize("n", [2, 7, 30])
def test_formula_matches_float64_reference(others, n):
    rng = np.random.default_rng(n)
    mu = rng.gamma(0.7, size=(n, 11))
    mu[:, 3] = 0.0  # a dead unit
    scores, argmax = unitmem_from_activations(mu, others=others)
    ref_scores, ref_argmax = reference(mu, others)
    np.testing.assert_array_equal(argmax, ref_argmax)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-12, atol=0)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_ties_go_to_first_index():
    mu = np.array([[1.0, 2.0], [3.0, 2.0], [3.0, 0.0], [0.0, 2.0]])
    _, argmax = unitmem_from_activations(mu)
    np.testing.assert_array_equal(argmax, [1, 0])
    # Streaming: a tie split across chunks also goes to the first index.
    stats = combine(batch_stats(mu[2:], 2), batch_stats(mu[:2], 0))
    np.testing.assert_array_equal(stats.argmax, [1, 0])


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_dead_units_score_zero_without_nan(eps):
    mu = np.zeros((5, 3))
    mu[:, 1] = [0, 0, 2.0, 0, 0]  # one example only: UnitMem exactly 1 - eps/2
    scores, _ = unitmem_from_activations(mu, eps=eps, others="mean")
    assert np.isfinite(scores).all()
    assert scores[0] == 0.0 and scores[2] == 0.0
    np.testing.assert_allclose(scores[1], 2.0 / (2.0 + eps), rtol=1e-15)
    median, _ = unitmem_from_activations(mu, eps=eps, others="median")
    assert median[0] == 0.0 and np.isfinite(median).all()


def test_negative_activations_clamp_and_shift():
    rng = np.random.default_rng(3)
    mu = rng.normal(size=(9, 6))
    mu[:, 0] = -np.abs(mu[:, 0]) - 0.1  # negative everywhere: dead after clamping
    clamp, clamp_arg = unitmem_from_activations(mu, negative="clamp")
    ref, ref_arg = reference(np.maximum(mu, 0), "mean")
    np.testing.assert_allclose(clamp, ref, rtol=1e-12)
    np.testing.assert_array_equal(clamp_arg, ref_arg)
    assert clamp[0] == 0.0
    shift, shift_arg = unitmem_from_activations(mu, negative="shift")
    ref, ref_arg = reference(mu - mu.min(axis=0), "mean")
    np.testing.assert_allclose(shift, ref, rtol=1e-12)
    np.testing.assert_array_equal(shift_arg, np.argmax(mu, axis=0))
    assert shift[0] > 0 and ((shift >= 0) & (shift <= 1)).all()
    stats = batch_stats(mu, 0)
    np.testing.assert_allclose(unitmem_from_stats(stats, negative="shift"), shift, rtol=1e-12)


def test_running_stats_any_grouping():
    rng = np.random.default_rng(4)
    mu = rng.gamma(0.5, size=(23, 5))
    full = unitmem_from_activations(mu)
    cuts = [0, 4, 5, 13, 23]
    parts = [batch_stats(mu[a:b], a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        stats = None
        for i in order:
            stats = combine(stats, parts[i])
        np.testing.assert_array_equal(stats.argmax, full[1])
        np.testing.assert_allclose(unitmem_from_stats(stats), full[0], rtol=1e-12)


def test_formula_bad_input():
    with pytest.raises(InputError, match="N >= 2"):
        unitmem_from_activations(np.ones((1, 3)))
    with pytest.raises(InputError, match="others"):
        unitmem_from_activations(np.ones((3, 3)), others="max")
    with pytest.raises(InputError, match="NaN"):
        unitmem_from_activations(np.array([[1.0], [np.nan]]))


# --------------------------------------------------------------------------- end to end

LAYERS = ["embedder", "stages.0.blocks.1.conv0"]


@pytest.fixture(scope="module")
def encoder():
    config = CifarResNetConfig(arch="resnet9", num_classes=None, stem_width=4, widths=(6,),
                               depths=(1,))
    graphdef, params = nnx.split(CifarResNet(config, rngs=nnx.Rngs(0)))

    def apply_fn(p, image):
        return with_taps(nnx.merge(graphdef, p).features, ["*"], image[None])[1]

    rng = np.random.default_rng(0)
    data = {"image": rng.random((13, 8, 8, 3)).astype(np.float32),
            "id": (1000 + rng.permutation(13)).astype(np.int64)}
    return apply_fn, params, data


def _run(encoder, **kw):
    apply_fn, params, data = encoder
    args = dict(layers=LAYERS, n_aug=2, seed=5, batch_size=8, chunk_size=8, return_mu=True)
    return unitmem(Model.from_apply(apply_fn, params), data, **{**args, **kw})


def test_streaming_equals_materialised_and_direct(encoder):
    apply_fn, params, data = encoder
    result = _run(encoder)
    np.testing.assert_array_equal(result.ids, data["id"])
    views = jax.jit(lambda x, i: simclr_views(x, i, 2, seed=5))(data["image"], data["id"])
    all_acts = jax.jit(jax.vmap(jax.vmap(lambda v: apply_fn(params, v))))(views)
    for name in LAYERS:
        layer = result.layers[name]
        scores, argmax = unitmem_from_activations(layer.mu)
        np.testing.assert_array_equal(layer.argmax, argmax)
        np.testing.assert_allclose(layer.scores, scores, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(layer.argmax_id, data["id"][argmax])
        # mu is the mean over views (keyed by the example's id) of the spatial mean.
        direct = np.asarray(all_acts[name], np.float64).mean(axis=(2, 3, 4)).mean(axis=1)
        np.testing.assert_allclose(layer.mu, direct, rtol=1e-5, atol=1e-6)
        assert layer.summary["n_units"] == layer.scores.size
        assert layer.summary["max"] == layer.scores.max()
    median = _run(encoder, others="median")
    for name in LAYERS:
        scores, _ = unitmem_from_activations(median.layers[name].mu, others="median")
        np.testing.assert_allclose(median.layers[name].scores, scores, rtol=1e-12)


def test_streaming_without_mu_matches(encoder):
    full = _run(encoder)
    clear_compile_cache()
    lean = _run(encoder, return_mu=False, chunk_size=8)  # 2 chunks (8 + 5 padded to 8)
    # Two programs (the views stage and the encoder), each compiled once for both chunks.
    assert compile_cache_info()["compiles"] == 2
    assert lean.ids is None
    for name in LAYERS:
        assert lean.layers[name].mu is None
        np.testing.assert_allclose(lean.layers[name].scores, full.layers[name].scores,
                                   rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(lean.layers[name].argmax, full.layers[name].argmax)


def test_8_devices_equal_1(encoder):
    assert jax.device_count() == 8
    on8 = _run(encoder)
    on1 = _run(encoder, mesh=make_mesh(devices=jax.devices()[:1]))
    for name in LAYERS:
        np.testing.assert_allclose(on8.layers[name].mu, on1.layers[name].mu, rtol=1e-6,
                                   atol=1e-7)
        np.testing.assert_array_equal(on8.layers[name].argmax, on1.layers[name].argmax)
        np.testing.assert_allclose(on8.layers[name].scores, on1.layers[name].scores,
                                   rtol=1e-6, atol=1e-7)


def test_bad_layer_and_n_aug(encoder):
    apply_fn, params, data = encoder
    with pytest.raises(InputError, match=r"available: .*embedder.*pooled"):
        unitmem(Model.from_apply(apply_fn, params), data, layers=["nope"], n_aug=2, batch_size=8)
    with pytest.raises(InputError, match="n_aug"):
        unitmem(Model.from_apply(apply_fn, params), data, layers=LAYERS, n_aug=0, batch_size=8)
    with pytest.raises(InputError, match=r"outside \[0, 1\]"):
        unitmem(Model.from_apply(apply_fn, params), {"image": data["image"] * 3},
                layers=LAYERS, n_aug=1, batch_size=8)
    with pytest.raises(InputError, match="at least 2"):
        unitmem(Model.from_apply(apply_fn, params), {"image": data["image"][:1]},
                layers=LAYERS, n_aug=1, batch_size=8)


def test_gelu_tokens_are_clamped():
    """Token activations [T, D] averaged over tokens; negative means clamp at 0."""
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)

    def apply_fn(p, image):  # 16 "tokens" of 3 features -> GELU units
        return {"mlp": jax.nn.gelu(image.reshape(-1, 3) @ p - 0.5)}

    data = {"image": np.random.default_rng(2).random((9, 4, 4, 3)).astype(np.float32)}
    result = unitmem(Model.from_apply(apply_fn, w), data, layers=["mlp"], n_aug=2, batch_size=8,
                     return_mu=True, mesh=make_mesh(devices=jax.devices()[:1]))
    layer = result.layers["mlp"]
    assert layer.mu.shape == (9, 5)
    assert (layer.mu < 0).any()
    ref, _ = reference(layer.mu, "mean")  # reference clamps at 0
    np.testing.assert_allclose(layer.scores, ref, rtol=1e-12, atol=1e-15)
    # spatial="max": each view's max over tokens, averaged over views (ids = indices).
    peak = unitmem(Model.from_apply(apply_fn, w), data, layers=["mlp"], n_aug=2, batch_size=8,
                   spatial="max", return_mu=True, mesh=make_mesh(devices=jax.devices()[:1]))
    views = simclr_views(data["image"], np.arange(9), 2, seed=0)
    direct = np.asarray(jax.vmap(jax.vmap(lambda v: apply_fn(w, v)["mlp"]))(views))
    np.testing.assert_allclose(peak.layers["mlp"].mu, direct.max(axis=2).mean(axis=1),
                               rtol=1e-5, atol=1e-6)
