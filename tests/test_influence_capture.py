"""K-FAC / EK-FAC on any model: dense layers found in the jaxpr (memjax.influence._capture)
and the streamed, sharded, resumable fit (memjax.influence._generic_kfac), against float64
NumPy sums of independently obtained per-example quantities.

Vec convention as tests/test_influence_kfac.py: a layer's weight gradient is
G = Σ_s g_s ã_sᵀ [out, in+1] (bias last column), vec stacks columns (``order="F"``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memjax
from memjax.engine import make_mesh
from memjax.errors import InputError
from memjax.influence import causal_lm_loss, cross_entropy_loss, param_paths
from memjax.influence._capture import (
    find_dense_layers,
    grad_matrix,
    layer_inputs_and_output_grads,
    set_grad_matrix,
)
from memjax.influence._generic_kfac import curvature_preconditioner, fit_kfac
from memjax.influence._kfac import (
    ekfac_batch_stats,
    ekfac_factors,
    kfac_batch_stats,
    kfac_factors,
    precondition,
)
from memjax.models.classifier import classifier_logits
from tests import hf_tiny
from tests.test_influence_kfac import explicit_inverse_apply, numpy_per_example, random_mlp

# float64 end to end (same reasoning as tests/test_influence_kfac.py): eigh / einsum agree
# with NumPy to ~1e-13 relative on these small factors, damped solves amplify to ~1e-11.
RTOL, ATOL = 1e-9, 1e-12
# float32 models (the tiny GPT-2): sums of ≤ 100 products in float32 carry ~1e-6 relative
# rounding; 1e-4 of the largest entry is far below any formula error (O(1) of it).
F32_REL = 1e-4
SIZES = [4, 6, 3]
N = 24


def one_device():
    return make_mesh(devices=jax.devices()[:1])


def reconstruct(vecs, vals):
    vecs, vals = np.asarray(vecs, np.float64), np.asarray(vals, np.float64)
    return vecs @ np.diag(vals) @ vecs.T


def assert_close_f32(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=0,
                               atol=F32_REL * max(np.abs(expected).max(), 1e-30))


# ---- (a) memjax's MLP: equal to the MLP-layout K-FAC of _kfac --------------------------


def mlp_loss():
    return functools.partial(cross_entropy_loss, classifier_logits)


def test_mlp_factors_and_preconditioner_equal_mlp_kfac(rng):
    params = random_mlp(rng, SIZES)
    # inputs exact in float32: classifier_logits casts the image to float32 first
    x = rng.normal(size=(N, SIZES[0])).astype(np.float32).astype(np.float64)
    y = rng.integers(0, SIZES[-1], N)
    inputs, grads = numpy_per_example(params, x, y)
    vector = random_mlp(rng, SIZES)
    with jax.enable_x64(True):
        jp, jv = jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, vector)
        got = fit_kfac(mlp_loss(), jp, {"image": x, "label": y}, method="ekfac", batch_size=8,
                       mesh=make_mesh(devices=jax.devices()[:2]))
        want = kfac_factors(kfac_batch_stats(jp, x, y, fisher="empirical"))
        want = ekfac_factors(want, ekfac_batch_stats(jp, want, x, y, fisher="empirical"))
        # K-FAC uses the same pass-1 factors (Λ ignored), so one fit serves both methods
        outs = [(curvature_preconditioner(got._replace(method=m), d)(jv),
                 precondition(jv, want, d, method=m))
                for m in ("kfac", "ekfac") for d in (None, 0.05)]
    assert [layer.path for layer in got.layers] == ["layers/0/w", "layers/1/w"]
    assert [layer.bias_path for layer in got.layers] == ["layers/0/b", "layers/1/b"]
    assert got.diagonal == {} and got.count == N
    for f, w, a, g in zip(got.dense, want, inputs, grads, strict=True):
        np.testing.assert_allclose(reconstruct(f.a_eigvecs, f.a_eigvals), a.T @ a / N, RTOL,
                                   ATOL)
        np.testing.assert_allclose(reconstruct(f.s_eigvecs, f.s_eigvals), g.T @ g / N, RTOL,
                                   ATOL)
        np.testing.assert_allclose(reconstruct(f.a_eigvecs, f.a_eigvals),
                                   reconstruct(w.a_eigvecs, w.a_eigvals), RTOL, ATOL)
        per_g = g[:, :, None] * a[:, None, :]  # Λ in got's own eigenbasis, from NumPy G_i
        q_a, q_s = np.asarray(f.a_eigvecs), np.asarray(f.s_eigvecs)
        lam = np.mean((q_s.T[None] @ per_g @ q_a[None]) ** 2, axis=0)
        np.testing.assert_allclose(f.corrected, lam, RTOL, ATOL)
    for mine, theirs in outs:
        jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, RTOL, ATOL), mine, theirs)


def test_true_fisher_uses_labels_drawn_by_sample_fn(rng, seed):
    params = random_mlp(rng, SIZES)
    x = rng.normal(size=(N, SIZES[0])).astype(np.float32).astype(np.float64)
    key = jax.random.key(seed)

    def sample_fn(p, example, k):  # the classifier's own softmax
        return {**example, "label": jax.random.categorical(k, classifier_logits(
            p, example["image"]))}

    with jax.enable_x64(True):
        jp = jax.tree.map(jnp.asarray, params)
        true = fit_kfac(mlp_loss(), jp, {"image": x, "label": np.zeros(N, int)}, method="ekfac",
                        batch_size=8, fisher="true", sample_fn=sample_fn, key=key,
                        mesh=one_device())

        def draw(pass_key):  # the documented per-example key: fold_in(key, example index)
            return np.asarray([int(jax.random.categorical(jax.random.fold_in(pass_key, i),
                                                          classifier_logits(jp, x[i])))
                               for i in range(N)])

        labels, fresh = draw(key), draw(jax.random.fold_in(key, 1))
    assert (labels != fresh).any()  # the eigenvalue correction draws its own labels
    inputs, grads = numpy_per_example(params, x, labels)
    _, fresh_grads = numpy_per_example(params, x, fresh)
    for f, a, g, g2 in zip(true.dense, inputs, grads, fresh_grads, strict=True):
        np.testing.assert_allclose(reconstruct(f.a_eigvecs, f.a_eigvals), a.T @ a / N, RTOL,
                                   ATOL)
        np.testing.assert_allclose(reconstruct(f.s_eigvecs, f.s_eigvals), g.T @ g / N, RTOL,
                                   ATOL)
        # Λ = E[(Q_Sᵀ g ãᵀ Q_A)²] over the FRESH labels' gradients, in the fitted basis.
        lam = ((g2 @ np.asarray(f.s_eigvecs)) ** 2).T @ (a @ np.asarray(f.a_eigvecs)) ** 2 / N
        np.testing.assert_allclose(f.corrected, lam, RTOL, ATOL)


# ---- (b) a tiny random Hugging Face GPT-2 --------------------------------------------


GPT2_LAYERS = [f"layers/{k}/{name}/kernel" for k in (0, 1)
               for name in ("c_attn", "c_fc", "c_proj", "mlp_proj")]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder, _ = hf_tiny.cached(tmp_path_factory, "gpt2")
    return memjax.load(folder)


def token_data(rng, n, length=8):
    ids = rng.integers(4, 300, size=(n, length)).astype(np.int32)
    mask = np.ones((n, length), np.int32)
    mask[::3, -2:] = 0  # some right padding
    return {"input_ids": ids, "attention_mask": mask}


def test_gpt2_layers_and_factors_equal_numpy_sums(gpt2, rng):
    loss = functools.partial(causal_lm_loss, gpt2.apply)
    data = token_data(rng, 6)
    one = jax.tree.map(lambda v: v[0], data)
    layers = find_dense_layers(loss, gpt2.params, one)
    assert [layer.path for layer in layers] == GPT2_LAYERS
    assert [layer.bias_path for layer in layers] == [p[:-len("kernel")] + "bias"
                                                      for p in GPT2_LAYERS]
    assert [(layer.in_dim, layer.out_dim) for layer in layers[:4]] == [
        (32, 96), (32, 128), (32, 32), (128, 32)]
    factors = fit_kfac(loss, gpt2.params, data, method="ekfac", batch_size=6,
                       mesh=one_device())
    # every floating leaf not in a layer (tied wte, wpe, LayerNorms) is diagonal
    covered = {p for layer in layers for p in (layer.path, layer.bias_path)}
    assert sorted(factors.diagonal) == sorted(set(param_paths(gpt2.params)) - covered)
    assert "wte" in factors.diagonal and "wpe" in factors.diagonal

    record = jax.jit(jax.vmap(lambda e: layer_inputs_and_output_grads(
        loss, gpt2.params, e, layers)))(data)
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(gpt2.params, data)
    leaf_grads = dict(zip(param_paths(gpt2.params), map(np.asarray, jax.tree.leaves(grads)),
                          strict=True))
    taps = jax.jit(jax.vmap(gpt2.activations("*mlp_hidden"), in_axes=(None, 0)))(
        gpt2.params, data)
    for layer, f in zip(layers, factors.dense, strict=True):
        a, g = (np.asarray(v, np.float64) for v in record[layer.path])  # [6, 8, in], [6, 8, out]
        a_tilde = np.concatenate([a, np.ones(a.shape[:2] + (1,))], axis=-1)
        # Σ_s g_s ã_sᵀ is each example's own weight and bias gradient (kernels are [in, out])
        want = np.concatenate([np.swapaxes(leaf_grads[layer.path], 1, 2),
                               leaf_grads[layer.bias_path][:, :, None]], axis=2)
        assert_close_f32(np.einsum("bto,bti->boi", g, a_tilde), want)
        if "mlp_proj" in layer.path:  # the recorded input is the model's own activation
            tap = np.asarray(taps[f"layers.{layer.path.split('/')[1]}.mlp_hidden"])
            assert_close_f32(a, tap.reshape(a.shape))
        big_a = np.einsum("bti,btj->ij", a_tilde, a_tilde) / len(a)
        big_s = np.einsum("bti,btj->ij", g, g) / len(a)
        assert_close_f32(reconstruct(f.a_eigvecs, f.a_eigvals), big_a)
        assert_close_f32(reconstruct(f.s_eigvecs, f.s_eigvals), big_s)
        q_a, q_s = np.asarray(f.a_eigvecs, np.float64), np.asarray(f.s_eigvecs, np.float64)
        per_g = np.einsum("bto,bti->boi", g, a_tilde)
        assert_close_f32(f.corrected, np.mean((q_s.T[None] @ per_g @ q_a[None]) ** 2, axis=0))
    for path, diag in factors.diagonal.items():
        assert_close_f32(diag, np.mean(leaf_grads[path].astype(np.float64) ** 2, axis=0))


# ---- (c) tied, reused, scanned and shared leaves fall back to the diagonal ------------


def toy_loss(params, example):
    """Embedding tied to the output, a weight applied twice, a scan over a stacked weight,
    a dense layer inside a nested jit with its own bias, a bias shared by two dots."""
    emb = params["emb"]
    h = jnp.mean(emb[example["tokens"]], axis=0) * params["scale"]
    h = jnp.tanh(h @ params["twice"])
    h = jnp.tanh(h @ params["twice"])
    h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, params["stack"])
    h = jax.jit(lambda v, w, b: jnp.tanh(v @ w + b))(h, params["proj"]["w"], params["proj"]["b"])
    h = jnp.tanh(h @ params["left"] + params["shared"]) + jnp.tanh(h @ params["right"]
                                                                  + params["shared"])
    h = jnp.tanh(h @ params["tw"].T)  # PyTorch layout [out, in], through a transpose
    h = jnp.tanh(h @ params["rw"].reshape(h.shape[0], -1))  # through a reshape
    logits = emb @ h
    return -jax.nn.log_softmax(logits)[example["label"]]


def toy_params(rng, vocab=7, d=5):
    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-1]))
    return {"emb": normal(vocab, d), "scale": normal(d), "twice": normal(d, d),
            "stack": normal(2, d, d), "proj": {"w": normal(d, d), "b": normal(d)},
            "left": normal(d, d), "right": normal(d, d), "shared": normal(d),
            "tw": normal(d, d), "rw": normal(d, 1, d), "unused": normal(d)}


def test_tied_and_reused_leaves_fall_back_to_diagonal(rng):
    n = 12
    data = {"tokens": rng.integers(0, 7, size=(n, 3)), "label": rng.integers(0, 7, n)}
    with jax.enable_x64(True):
        params = toy_params(rng)
        layers = find_dense_layers(toy_loss, params, jax.tree.map(lambda v: v[0], data))
        factors = fit_kfac(toy_loss, params, data, method="kfac", batch_size=4,
                           mesh=one_device())
        # the first 10 of 12 examples: the last batch of 4 is padded with weight-0 rows
        first10 = fit_kfac(toy_loss, params, data, method="kfac", batch_size=4,
                           mesh=one_device(), max_examples=10)
        grads = jax.jit(jax.vmap(jax.grad(toy_loss), in_axes=(None, 0)))(params, data)
        record = jax.jit(jax.vmap(lambda e: layer_inputs_and_output_grads(
            toy_loss, params, e, layers)))(data)
    assert [(la.path, la.bias_path) for la in layers] == [
        ("left", None), ("proj/w", "proj/b"), ("right", None), ("rw", None), ("tw", None)]
    assert sorted(factors.diagonal) == ["emb", "scale", "shared", "stack", "twice", "unused"]
    # a leaf the loss ignores has zero curvature: the damping rule leaves it unchanged
    with jax.enable_x64(True):
        vector = toy_params(rng)
        out = jax.jit(curvature_preconditioner(factors))(vector)
    np.testing.assert_array_equal(out["unused"], vector["unused"])
    diag = np.asarray(factors.diagonal["scale"])
    np.testing.assert_allclose(out["scale"], np.asarray(vector["scale"]) / (
        diag + 0.1 * diag.mean()), RTOL, ATOL)
    leaf = dict(zip(param_paths(params), map(np.asarray, jax.tree.leaves(grads)), strict=True))
    for path, diag in factors.diagonal.items():
        np.testing.assert_allclose(diag, np.mean(leaf[path] ** 2, axis=0), RTOL, ATOL)
        np.testing.assert_allclose(first10.diagonal[path], np.mean(leaf[path][:10] ** 2, axis=0),
                                   RTOL, ATOL)
    assert first10.count == 10
    # Σ_s g_s ã_sᵀ [out, in(+1)] against each leaf's own gradient, in the layer's layout
    want = {"left": np.swapaxes(leaf["left"], 1, 2), "right": np.swapaxes(leaf["right"], 1, 2),
            "proj/w": np.concatenate([np.swapaxes(leaf["proj/w"], 1, 2),
                                      leaf["proj/b"][:, :, None]], axis=2),
            "tw": leaf["tw"], "rw": np.swapaxes(leaf["rw"].reshape(n, 5, 5), 1, 2)}
    with jax.enable_x64(True):
        for layer in layers:
            a, g = (np.asarray(v) for v in record[layer.path])
            if layer.has_bias:
                a = np.concatenate([a, np.ones(a.shape[:2] + (1,))], axis=2)
            np.testing.assert_allclose(np.einsum("bso,bsi->boi", g, a), want[layer.path], RTOL,
                                       ATOL)
            # the preconditioner's view of a leaf gradient is the same matrix, and invertible
            matrices = jax.vmap(lambda tree, la=layer: grad_matrix(la, jax.tree.leaves(tree)))(
                grads)
            np.testing.assert_allclose(matrices, want[layer.path], RTOL, ATOL)
            back = list(jax.tree.leaves(jax.tree.map(lambda v: v[0], grads)))
            set_grad_matrix(layer, back, matrices[0])
            np.testing.assert_array_equal(back[layer.index], leaf[layer.path][0])


def test_refusals(rng):
    data = {"tokens": rng.integers(0, 7, size=(4, 3)), "label": rng.integers(0, 7, 4)}
    params = toy_params(rng)
    with pytest.raises(InputError, match="batch_size"):
        fit_kfac(toy_loss, params, data, batch_size=3, mesh=make_mesh(devices=jax.devices()[:2]))
    with pytest.raises(InputError, match="sample_fn"):
        fit_kfac(toy_loss, params, data, batch_size=2, fisher="true", mesh=one_device())
    with pytest.raises(InputError, match="method"):
        fit_kfac(toy_loss, params, data, batch_size=2, method="shampoo", mesh=one_device())
    kfac_only = fit_kfac(toy_loss, params, data, batch_size=2, method="kfac", mesh=one_device())
    with pytest.raises(InputError, match="corrected eigenvalues"):
        curvature_preconditioner(kfac_only._replace(method="ekfac"))
    with pytest.raises(InputError, match="damping"):
        curvature_preconditioner(kfac_only, -1.0)
    with pytest.raises(InputError, match="scalar loss"):
        find_dense_layers(lambda p, e: p["emb"][e["tokens"]], params,
                          jax.tree.map(lambda v: v[0], data))


# ---- (d) one dense layer with the exact eigenbasis: the Gauss–Newton inverse -------------


def torch_layout_loss(params, example):
    """One dense layer written as PyTorch's Linear: W [out, in] on the LEFT of x."""
    logits = jnp.dot(params["weight"], example["x"]) + params["bias"]
    return -jax.nn.log_softmax(logits)[example["label"]]


def test_ekfac_reproduces_gauss_newton_inverse_on_one_layer(rng):
    """W = 0, b = 0: every example predicts p uniform, so H_i = diag(p) − p pᵀ = H and the
    Gauss–Newton matrix is exactly GGN = (1/n) Σ ã ãᵀ ⊗ H. Listing every example with every
    label (uniform p: equal weights) makes the empirical S = E_y[g gᵀ] = H exactly; then
    K-FAC's eigenbasis is the GGN's and EK-FAC's Λ its eigenvalues, so the preconditioner is
    (GGN + λI)⁻¹, built here from the formula, not from the factors."""
    d, c, n = 5, 4, 10
    x = rng.normal(size=(n, d))
    data = {"x": np.repeat(x, c, axis=0), "label": np.tile(np.arange(c), n)}
    vector = {"weight": rng.normal(size=(c, d)), "bias": rng.normal(size=c)}
    with jax.enable_x64(True):
        params = {"weight": jnp.zeros((c, d)), "bias": jnp.zeros(c)}
        factors = fit_kfac(torch_layout_loss, params, data, method="ekfac", batch_size=8,
                           mesh=one_device())
        damping = 1e-3
        out = curvature_preconditioner(factors, damping)(jax.tree.map(jnp.asarray, vector))
    assert [(la.path, la.bias_path, la.in_dim, la.out_dim) for la in factors.layers] == [
        ("weight", "bias", d, c)]
    p = np.full(c, 1.0 / c)
    x_tilde = np.concatenate([x, np.ones((n, 1))], axis=1)
    ggn = np.kron(x_tilde.T @ x_tilde / n, np.diag(p) - np.outer(p, p))
    grad = np.concatenate([vector["weight"], vector["bias"][:, None]], axis=1)  # [out, in+1]
    want = explicit_inverse_apply(ggn, damping, grad)
    np.testing.assert_allclose(out["weight"], want[:, :d], RTOL, ATOL)
    np.testing.assert_allclose(out["bias"], want[:, d], RTOL, ATOL)


# ---- (e) killed and resumed = one pass ----------------------------------------------


class Dying:
    """An array source whose ``read`` raises after ``reads`` calls (a killed run)."""

    def __init__(self, data, reads):
        self.source, self.reads = memjax.data.as_source(data), reads

    def __len__(self):
        return len(self.source)

    def spec(self):
        return self.source.spec()

    def read(self, indices):
        self.reads -= 1
        if self.reads < 0:
            raise RuntimeError("killed")
        return self.source.read(indices)


def test_killed_and_resumed_equals_one_pass(rng, tmp_path):
    data = {"tokens": rng.integers(0, 7, size=(20, 3)), "label": rng.integers(0, 7, 20)}
    params = toy_params(rng)
    fit = functools.partial(fit_kfac, toy_loss, params, method="ekfac", batch_size=4,
                            mesh=one_device(), checkpoint_every=2)
    whole = fit(data)
    # 1 read to trace + 5 batches per pass; saves after batches 2 and 4 and at a pass's end
    # dies in pass 1 reading batch 4 (saved: 2 done), then in pass 2 reading batch 4
    for reads in (1 + 3, 1 + 3 + 3):
        with pytest.raises(RuntimeError, match="killed"):
            fit(Dying(data, reads), checkpoint=tmp_path)
    resumed = fit(Dying(data, 1 + 3), checkpoint=tmp_path)  # pass 2's last 3 batches only
    jax.tree.map(np.testing.assert_array_equal, tuple(resumed.dense), tuple(whole.dense))
    jax.tree.map(np.testing.assert_array_equal, resumed.diagonal, whole.diagonal)
    with pytest.raises(InputError, match="checkpoint.*batch_size"):
        fit_kfac(toy_loss, params, data, batch_size=5, mesh=one_device(), checkpoint=tmp_path)


# ---- (f) 8 devices = 1 device --------------------------------------------------------


def test_eight_devices_equal_one(rng):
    assert len(jax.devices()) == 8  # conftest forces 8 host devices
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), random_mlp(rng, [4, 5, 3]))
    data = {"image": rng.normal(size=(28, 4)).astype(np.float32),
            "label": rng.integers(0, 3, 28)}
    fits = [fit_kfac(mlp_loss(), params, data, method="ekfac", batch_size=16, mesh=mesh)
            for mesh in (make_mesh(), one_device())]
    # float32 sums in another order differ by ~1e-7 relative; the bar is 1e-5 of the
    # largest entry. (A preconditioned vector is not compared: the inverse of the smallest
    # eigenvalues amplifies rounding by the condition number, up to ~1e4 here.)
    def close(p, q):
        p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
        np.testing.assert_allclose(p, q, rtol=0, atol=1e-5 * np.abs(q).max())
    assert fits[0].count == fits[1].count == 28
    for f8, f1 in zip(fits[0].dense, fits[1].dense, strict=True):
        close(reconstruct(f8.a_eigvecs, f8.a_eigvals), reconstruct(f1.a_eigvecs, f1.a_eigvals))
        close(reconstruct(f8.s_eigvecs, f8.s_eigvals), reconstruct(f1.s_eigvecs, f1.s_eigvals))
        close(f8.corrected, f1.corrected)
    jax.tree.map(close, fits[0].diagonal, fits[1].diagonal)
