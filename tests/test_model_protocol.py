"""One model protocol: every method runs on a memjax.train model and on tiny random Hugging
Face checkpoints opened by ``memjax.load``, through the same code path, and equals the
PyTorch computation of the same quantity.

Models: a memjax.train CNN classifier (saved with ``save_model``), a ViT and a ResNet
classifier (``transformers``, random weights, saved with ``save_pretrained``), and CLIPs
(tiny memjax CLIP, tiny HF CLIP) for CLIPMem. References: the PyTorch models in float64
(logits, per-example parameter gradients by autograd, hidden states) for the HF models;
the classifier's own float64 NumPy forward for the memjax.train CNN.

Tolerances: memjax computes in float32. Logits and activations of these O(1)-scale models
agree with float64 to ~1e-6 relative (seen: <= 3e-6); gradient dot products sum ~10^3-10^4
float32 products, so they are compared relative to the largest magnitude at 1e-4; view
alignments are differences of O(1) distances: 1e-5 absolute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import memjax
from memjax.augment import SimCLRView, keyed_views
from memjax.cli import main
from memjax.engine import clear_compile_cache, compile_cache_info, score
from memjax.influence import cross_entropy_loss, forward_inf, grad_dot, self_influence
from memjax.memorization import clipmem, layermem, unitmem
from memjax.signals import signal_function
from memjax.train import CNNConfig, save_model

N_TRAIN, N_TEST, SIZE, CLASSES = 12, 3, 8, 4
LOGIT_TOL = 1e-5
GRAD_TOL = 1e-4


def _vit_config():
    return transformers.ViTConfig(image_size=SIZE, patch_size=4, hidden_size=16,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, num_labels=CLASSES)


def _resnet_config():
    return transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                     layer_type="basic", num_labels=CLASSES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: (folder, HF torch model or None)}: a memjax.train CNN, a HF ViT, a HF ResNet,
    and a second ViT (another seed: g for LayerMem)."""
    root = tmp_path_factory.mktemp("protocol")
    out = {}
    config = CNNConfig((SIZE, SIZE, 3), CLASSES, channels=(4,), hidden=(8,))
    params = jax.tree.map(np.asarray, config.init(jax.random.key(0)))
    out["cnn"] = (save_model(root / "cnn", params, config), None)
    for name, build, seed in (("vit", lambda: transformers.ViTForImageClassification(
            _vit_config()), 0), ("vit_g", lambda: transformers.ViTForImageClassification(
                _vit_config()), 1), ("resnet", lambda: transformers.ResNetForImageClassification(
                    _resnet_config()), 0)):
        torch.manual_seed(seed)
        hf = build().eval()
        hf.save_pretrained(root / name)
        out[name] = (root / name, hf)
    return out


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.random((N_TRAIN + N_TEST, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, N_TRAIN + N_TEST)
    train = {"image": images[:N_TRAIN], "label": labels[:N_TRAIN]}
    test = {"image": images[N_TRAIN:], "label": labels[N_TRAIN:]}
    return train, test


def _nchw(images):
    return torch.tensor(np.asarray(images, np.float64).transpose(0, 3, 1, 2))


def reference_logits(name, folders, images):
    """float64 logits [B, C]: PyTorch for HF models, NumPy for the memjax.train CNN."""
    folder, hf = folders[name]
    if hf is not None:
        with torch.no_grad():
            return hf.double()(pixel_values=_nchw(images)).logits.numpy()
    model = memjax.load(folder)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), model.params)
    out = []
    for image in np.asarray(images, np.float64):
        h = image
        for conv in p["convs"]:
            height, width = h.shape[:2]
            padded = np.pad(h, ((1, 1), (1, 1), (0, 0)))  # 3x3 "SAME" convolution
            conv_out = sum(padded[i:i + height, j:j + width] @ conv["w"][i, j]
                           for i in range(3) for j in range(3)) + conv["b"]
            h = np.maximum(conv_out, 0)
            h = h.reshape(h.shape[0] // 2, 2, h.shape[1] // 2, 2, -1).mean(axis=(1, 3))
        h = h.reshape(-1)
        *hidden, last = p["layers"]
        for layer in hidden:
            h = np.maximum(h @ layer["w"] + layer["b"], 0)
        out.append(h @ last["w"] + last["b"])
    return np.stack(out)


def reference_grads(name, folders, batch):
    """float64 per-example gradients [B, P] of the cross-entropy (PyTorch autograd)."""
    _, hf = folders[name]
    hf = hf.double()
    params = [p for p in hf.parameters() if p.requires_grad]
    rows = []
    for image, label in zip(batch["image"], batch["label"], strict=True):
        hf.zero_grad()
        logits = hf(pixel_values=_nchw(image[None])).logits
        torch.nn.functional.cross_entropy(logits, torch.tensor([int(label)])).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]).numpy().copy())
    return np.stack(rows)


def _close_relative(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.abs(got - want).max() <= tol * np.abs(want).max(), (got, want)


@pytest.mark.parametrize("name", ["cnn", "vit", "resnet"])
def test_load_apply_and_classification_signals_equal_the_reference(name, folders, data):
    train, _ = data
    model = memjax.load(folders[name][0])
    assert isinstance(model, memjax.Model) and model.kind == "classifier"
    want = reference_logits(name, folders, train["image"])
    got = np.stack([model(image) for image in train["image"]])
    _close_relative(got, want, LOGIT_TOL)
    # The MIA signal bundle through the engine: the loss is the float64 cross-entropy.
    fn, validate = signal_function(model, "classification")
    out = score(fn, model.params, train, batch_size=8, validate=validate, progress=False)
    logp = want - np.log(np.exp(want - want.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - want.max(1, keepdims=True)
    np.testing.assert_allclose(out["loss"], -logp[np.arange(N_TRAIN), train["label"]],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["cnn", "vit", "resnet"])
def test_memjax_score_cli_on_every_model_folder(name, folders, data, tmp_path):
    train, _ = data
    np.savez(tmp_path / "data.npz", **train)
    store = tmp_path / "store"
    assert main(["score", "--model", str(folders[name][0]), "--data",
                 str(tmp_path / "data.npz"), "--out", str(store), "--batch-size", "8",
                 "--no-progress"]) == 0
    stored = memjax.ScoreStore(store).read()
    want = reference_logits(name, folders, train["image"])
    shifted = want - want.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    np.testing.assert_allclose(stored["loss"], -logp[np.arange(N_TRAIN), train["label"]],
                               rtol=1e-5, atol=1e-6)


def _gradients(name, folders, model, batch):
    """Per-example gradients [B, P] of the cross-entropy: PyTorch float64 for the HF
    models; for the memjax.train CNN, jax.grad of the same loss (float32)."""
    if folders[name][1] is not None:
        return reference_grads(name, folders, batch)
    loss = functools.partial(cross_entropy_loss, model.apply)

    def flat(example):
        grads = jax.grad(loss)(model.params, example)
        return jnp.concatenate([g.reshape(-1) for g in jax.tree.leaves(grads)])

    return np.asarray(jax.vmap(flat)(jax.tree.map(jnp.asarray, batch)), np.float64)


@pytest.mark.parametrize("name", ["cnn", "vit", "resnet"])
def test_influence_methods_equal_gradient_dot_products(name, folders, data):
    """First-order Forward-INF = lr·g_i·g_t, first-order self-influence = lr·|g_i|², and
    grad-dot = g_t·g_i, with gradients from PyTorch autograd (HF) in float64."""
    train, test = data
    model = memjax.load(folders[name][0])
    loss = functools.partial(cross_entropy_loss, model.apply)
    g_train = _gradients(name, folders, model, train)
    g_test = _gradients(name, folders, model, test)
    lr = 0.1
    scores = forward_inf(loss, model.params, test, train, mode="first_order", lr=lr,
                         batch_size=8)
    _close_relative(scores, lr * g_test @ g_train.T, GRAD_TOL)
    own = self_influence(loss, model.params, train, mode="first_order", lr=lr, batch_size=8)
    _close_relative(own, lr * (g_train ** 2).sum(1), GRAD_TOL)
    dots = grad_dot(loss, model.params, test, train, batch_size=8)
    _close_relative(dots, g_test @ g_train.T, GRAD_TOL)


def _torch_hidden(hf, views, layer):
    """float64 hidden states of one HF layer for a batch of NHWC views."""
    with torch.no_grad():
        out = hf.double()(pixel_values=_nchw(views), output_hidden_states=True)
    return out.hidden_states[layer].numpy()


# memjax tap -> index into HF's hidden_states (ViT: block outputs; ResNet: stage outputs).
TAPS = {"vit": ("layers.0.out", 1), "resnet": ("stages.1.out", 2)}


def _views(images, n, seed=0):
    """[N, n, h, w, C] SimCLR views keyed by example index (the methods' keys)."""
    one = jax.vmap(lambda image, i: keyed_views(SimCLRView(), image, seed, i, n))
    return np.asarray(jax.jit(one)(jnp.asarray(images), jnp.arange(len(images))), np.float64)


def _unit_means(hidden):
    """[B, ..., U] (ViT tokens or ResNet NCHW channels) -> per-view unit means [B, U]."""
    if hidden.ndim == 4:  # NCHW
        return hidden.mean(axis=(2, 3))
    return hidden.mean(axis=1)


@pytest.mark.parametrize("name", ["cnn", "vit", "resnet"])
def test_unitmem_on_every_model(name, folders, data):
    """UnitMem's μ [N, U] equals the PyTorch hidden states of the same views, averaged over
    space/tokens and views; scores follow from μ by the float64 formula."""
    from memjax.memorization import unitmem_from_activations

    train, _ = data
    model = memjax.load(folders[name][0])
    layer = TAPS[name][0] if name in TAPS else "conv1"
    result = unitmem(model, {"image": train["image"]}, layers=[layer], n_aug=2, batch_size=8,
                     return_mu=True)
    mu = result.layers[layer].mu
    views = _views(train["image"], 2)
    if name in TAPS:
        hidden = _torch_hidden(folders[name][1], views.reshape(-1, SIZE, SIZE, 3), TAPS[name][1])
        want = _unit_means(hidden).reshape(N_TRAIN, 2, -1).mean(axis=1)
    else:
        acts = jax.vmap(model.activations([layer]), in_axes=(None, 0))(
            model.params, jnp.asarray(views.reshape(-1, SIZE, SIZE, 3), jnp.float32))[layer]
        want = np.asarray(acts, np.float64).mean(axis=(1, 2)).reshape(N_TRAIN, 2, -1).mean(1)
    np.testing.assert_allclose(mu, want, rtol=1e-5, atol=1e-6)
    scores, argmax = unitmem_from_activations(mu)
    np.testing.assert_allclose(result.layers[layer].scores, scores, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(result.layers[layer].argmax, argmax)


def _np_alignment(reps_a, reps_b):
    """Mean over pairs of |u(a) - u(b)|, float64 ([K, ...] each)."""
    a = reps_a.reshape(len(reps_a), -1)
    b = reps_b.reshape(len(reps_b), -1)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.linalg.norm(a - b, axis=1).mean()


def test_layermem_on_hf_vits_equals_pytorch(folders, data):
    """LayerMem of f (ViT seed 0) against g (ViT seed 1), on a block output and the final
    norm, equals the alignment gap computed from PyTorch hidden states of the same views."""
    train, _ = data
    f, g = memjax.load(folders["vit"][0]), memjax.load(folders["vit_g"][0])
    layers = ["layers.0.out", "final"]
    out = layermem(f, g, {"image": train["image"]}, views_fn=SimCLRView(), n_aug=2,
                   layers=layers, batch_size=8, progress=False)
    views = _views(train["image"], 4).reshape(-1, SIZE, SIZE, 3)
    want = np.zeros((N_TRAIN, 2))
    for which, sign in (("vit", -1.0), ("vit_g", 1.0)):
        hf = folders[which][1].double()
        with torch.no_grad():
            hidden = hf.vit(pixel_values=_nchw(views), output_hidden_states=True)
        reps = [hidden.hidden_states[1].numpy(), hidden.last_hidden_state.numpy()]
        for li, rep in enumerate(reps):
            rep = rep.reshape(N_TRAIN, 4, *rep.shape[1:])
            for i in range(N_TRAIN):
                want[i, li] += sign * _np_alignment(rep[i, 0::2], rep[i, 1::2])
    np.testing.assert_allclose(out["raw"], want, rtol=0, atol=1e-5)


def test_layermem_on_memjax_train_encoders(folders, data):
    """The same call on memjax.train models (f, and g with other weights) equals the
    float64 alignment of their own activations on the same views."""
    train, _ = data
    f = memjax.load(folders["cnn"][0])
    g = f.replace(params=jax.tree.map(lambda a: a * 1.5 + 0.01, f.params))
    out = layermem(f, g, {"image": train["image"]}, views_fn=SimCLRView(), n_aug=2,
                   layers=["conv1", "embedding"], batch_size=8, progress=False)
    views = jnp.asarray(_views(train["image"], 4).reshape(-1, SIZE, SIZE, 3), jnp.float32)
    want = np.zeros((N_TRAIN, 2))
    for model, sign in ((f, -1.0), (g, 1.0)):
        acts = jax.vmap(model.activations(["conv1", "embedding"]), in_axes=(None, 0))(
            model.params, views)
        for li, layer in enumerate(["conv1", "embedding"]):
            rep = np.asarray(acts[layer], np.float64).reshape(N_TRAIN, 4, -1)
            for i in range(N_TRAIN):
                want[i, li] += sign * _np_alignment(rep[i, 0::2], rep[i, 1::2])
    np.testing.assert_allclose(out["raw"], want, rtol=0, atol=1e-5)


def _hf_clip(seed, root):
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=30, hidden_size=16, intermediate_size=24,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=8, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, image_size=SIZE, patch_size=4),
        projection_dim=8)
    torch.manual_seed(seed)
    hf = transformers.CLIPModel(config).eval()
    hf.save_pretrained(root / f"clip{seed}")
    return hf, root / f"clip{seed}"


def test_clipmem_on_hf_clips_equals_pytorch(tmp_path, data):
    train, _ = data
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 30, (N_TRAIN, 6))
    ids[:, -1] = 2  # EOS
    pairs = {"image": train["image"], "input_ids": ids,
             "attention_mask": np.ones_like(ids)}
    (hf_f, path_f), (hf_g, path_g) = _hf_clip(0, tmp_path), _hf_clip(1, tmp_path)
    f, g = memjax.load(path_f), memjax.load(path_g)
    assert f.kind == "clip"
    out = clipmem(f, g, pairs, views_fn=SimCLRView(), n_aug=2, batch_size=8, progress=False)
    views = _views(train["image"], 2).reshape(-1, SIZE, SIZE, 3)
    align = {}
    for name, hf in (("f", hf_f), ("g", hf_g)):
        hf = hf.double()
        with torch.no_grad():
            img = hf.get_image_features(pixel_values=_nchw(views))
            txt = hf.get_text_features(input_ids=torch.tensor(ids),
                                       attention_mask=torch.tensor(np.ones_like(ids)))
        img = getattr(img, "pooler_output", img).numpy().reshape(N_TRAIN, 2, -1)
        txt = getattr(txt, "pooler_output", txt).numpy()
        cos = np.einsum("nkd,nd->nk", img, txt) / (
            np.linalg.norm(img, axis=2) * np.linalg.norm(txt, axis=1)[:, None])
        align[name] = cos.mean(axis=1)
    np.testing.assert_allclose(out["align_f"], align["f"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["raw"], align["f"] - align["g"], rtol=0, atol=1e-5)


def test_clipmem_on_memjax_train_clips(data):
    from memjax.train.clip import ClipConfig, clip_model, encode_image, encode_text, init_clip

    train, _ = data
    config = ClipConfig((SIZE, SIZE, 3), vocab_size=20, caption_length=5, embed_dim=8,
                        hidden=(16,), text_width=8, text_hidden=(8,))
    pf, pg = (init_clip(jax.random.key(s), config) for s in (0, 1))
    text = np.random.default_rng(2).integers(1, 20, (N_TRAIN, 5))
    out = clipmem(clip_model(pf, config), clip_model(pg, config),
                  {"image": train["image"], "text": text}, views_fn=SimCLRView(), n_aug=2,
                  batch_size=8, progress=False)
    views = jnp.asarray(_views(train["image"], 2), jnp.float32)
    for params, got in ((pf, out["align_f"]), (pg, out["align_g"])):
        img = np.asarray(jax.vmap(jax.vmap(encode_image, in_axes=(None, 0)),
                                  in_axes=(None, 0))(params, views), np.float64)
        txt = np.asarray(jax.vmap(encode_text, in_axes=(None, 0))(params, text), np.float64)
        cos = np.einsum("nkd,nd->nk", img, txt) / (
            np.linalg.norm(img, axis=2) * np.linalg.norm(txt, axis=1)[:, None])
        np.testing.assert_allclose(got, cos.mean(axis=1), rtol=0, atol=1e-5)


def test_equal_fresh_functions_compile_once(folders, data):
    """forward_inf, unitmem and score called twice with freshly built (equal) score
    functions and freshly loaded models compile once."""
    train, test = data
    clear_compile_cache()

    def run():
        model = memjax.load(folders["vit"][0])  # a new Model object every time
        loss = functools.partial(cross_entropy_loss, model.apply)
        forward_inf(loss, model.params, test, train, mode="first_order", lr=0.1,
                    batch_size=8)
        unitmem(model, {"image": train["image"]}, layers=["layers.0.out"], n_aug=1,
                batch_size=8)
        fn, _ = signal_function(model, "classification")

        def fresh(params, example):  # a new closure every time, equal by value
            return fn(params, example)

        score(fresh, model.params, train, batch_size=8, progress=False)

    run()
    first = compile_cache_info()["compiles"]
    # forward_inf's training pass, unitmem's views and encoder stages, score.
    assert first == 4
    run()
    assert compile_cache_info()["compiles"] == first


def test_memorization_and_influence_cli_open_hf_checkpoints(folders, data, tmp_path):
    """The CLI runs UnitMem / LayerMem and Forward-INF on Hugging Face folders (they
    refused every folder but memjax.train's before) and equals the library calls."""
    train, test = data
    np.savez(tmp_path / "train.npz", **train)
    np.savez(tmp_path / "test.npz", **test)
    vit, vit_g = str(folders["vit"][0]), str(folders["vit_g"][0])
    assert main(["memorization", "unitmem", "--model", vit, "--data",
                 str(tmp_path / "train.npz"), "--layers", "layers.0.out", "--n-aug", "2",
                 "--batch-size", "8", "--out", str(tmp_path / "u"),
                 "--no-progress"]) == 0
    direct = unitmem(memjax.load(vit), {"image": train["image"]}, layers=["layers.0.out"],
                     n_aug=2, batch_size=8)
    import pyarrow.parquet as pq

    got = pq.read_table(tmp_path / "u" / "scores.parquet").to_pandas()
    np.testing.assert_allclose(got["unitmem"], direct.layers["layers.0.out"].scores,
                               rtol=1e-12)
    assert main(["memorization", "layermem", "--model", vit, "--reference", vit_g, "--data",
                 str(tmp_path / "train.npz"), "--layers", "final", "--n-aug", "2",
                 "--batch-size", "8", "--out", str(tmp_path / "l"),
                 "--no-progress"]) == 0
    table = pq.read_table(tmp_path / "l" / "scores.parquet").to_pandas()
    direct = layermem(memjax.load(vit), memjax.load(vit_g), {"image": train["image"]},
                      views_fn=SimCLRView(), n_aug=2, layers=["final"], batch_size=8,
                      progress=False)
    np.testing.assert_allclose(table["final_layermem"], direct["raw"][:, 0], rtol=1e-12)
    assert main(["influence", "scores", "--model", vit, "--train", str(tmp_path / "train.npz"),
                 "--test", str(tmp_path / "test.npz"), "--mode", "first_order",
                 "--batch-size", "8", "--store", str(tmp_path / "inf"), "--out",
                 str(tmp_path / "inf_results"), "--no-progress"]) == 0
    stored = memjax.ScoreStore(tmp_path / "inf").read()["score"]
    model = memjax.load(vit)
    want = forward_inf(functools.partial(cross_entropy_loss, model.apply), model.params,
                       test, train, mode="first_order", lr=0.1, batch_size=8)
    np.testing.assert_allclose(stored.T, want, rtol=1e-6, atol=1e-9)
