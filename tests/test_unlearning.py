"""MUC's unlearning audits (memjax.unlearning) and the unlearning baselines
(memjax.train.unlearning) vs float64 NumPy references written here.

Tolerances: memjax computes in float32. Cosines of unit vectors are O(1) sums of D
products, each rounded to ~6e-8 relative, so alignment scores agree with float64 to 1e-6
(absolute). The probe is 200 full-batch gradient steps; float32 rounding of each step's
gradient (~1e-7 relative) accumulates over the steps to ~1e-5 relative in the weights, so
they are compared at 1e-4. One SGD step of the baselines: float32 gradients of an O(1)
loss through a tiny CNN agree with the reference's (same float32 forward, different
formula) to ~1e-6 absolute; compared at 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.augment import view_key
from memjax.errors import InputError
from memjax.models import Model
from memjax.robustness import fit_linear_probe
from memjax.train import CNNConfig
from memjax.train.clip import kept_minibatch
from memjax.train.simclr import embed
from memjax.train.unlearning import UNLEARN_AUG_OFFSET, unlearn_simclr
from memjax.unlearning import (
    alignment_scores,
    audit_from_scores,
    best_accuracy_threshold,
    cmia,
    emia,
    pairwise_alignment,
    probe_confidence,
)

H, W, C = 4, 4, 1


def views_fn(image, key):
    """Keyed flip + brightness in [0.6, 1.4) (4x4 views of the 4x4 image)."""
    k1, k2 = jax.random.split(key)
    view = jnp.where(jax.random.bernoulli(k1), image[:, ::-1], image)
    return view * jax.random.uniform(k2, (), minval=0.6, maxval=1.4)


def np_alignment(emb: np.ndarray) -> float:
    """Mean over pairs i < j of the cosine of rows i and j (float64)."""
    emb = np.asarray(emb, np.float64).reshape(len(emb), -1)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    pairs = [(i, j) for i in range(len(emb)) for j in range(i + 1, len(emb))]
    return float(np.mean([unit[i] @ unit[j] for i, j in pairs]))


def np_best_threshold(members, nonmembers):
    """Brute force: every candidate t in the scores and +inf; the smallest best t."""
    candidates = sorted(set(np.concatenate([members, nonmembers]).tolist())) + [np.inf]
    accs = [((members >= t).sum() + (nonmembers < t).sum()) / (len(members) + len(nonmembers))
            for t in candidates]
    best = int(np.argmax(accs))
    return candidates[best], accs[best]


def linear_apply(params, image):
    return jnp.tanh(image.reshape(-1) @ params["w"]) + params["b"]


def tiny_encoder(rng) -> Model:
    params = {"w": jnp.asarray(rng.normal(size=(H * W * C, 5)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=5) * 0.1, jnp.float32)}
    return Model.from_apply(linear_apply, params, kind="encoder", name="tiny")


# --------------------------------------------------------------------------- formulas


def test_pairwise_alignment_matches_numpy(rng):
    for views in (2, 3, 7):
        emb = rng.normal(size=(views, 6, 2)).astype(np.float32)
        got = float(pairwise_alignment(jnp.asarray(emb)))
        assert got == pytest.approx(np_alignment(emb), abs=1e-6)


def test_best_accuracy_threshold_matches_brute_force(rng):
    # Rounded scores make ties, which the rule breaks towards the smallest threshold.
    members = np.round(rng.normal(0.4, 1.0, size=37), 1)
    nonmembers = np.round(rng.normal(0.0, 1.0, size=29), 1)
    threshold, accuracy = best_accuracy_threshold(members, nonmembers)
    want_t, want_acc = np_best_threshold(members, nonmembers)
    assert threshold == want_t
    assert accuracy == pytest.approx(want_acc, abs=1e-15)
    # Perfectly separated sets: accuracy 1, threshold the smallest member.
    t, acc = best_accuracy_threshold(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    assert (t, acc) == (3.0, 1.0)


def test_audit_from_scores_flags_and_balances(rng):
    scores = rng.normal(size=60)
    forget, retain, test = np.arange(0, 10), np.arange(10, 45), np.arange(45, 60)
    audit = audit_from_scores("emia", scores, forget, retain, test)
    # Members: the first len(test) = 15 retain rows.
    t, acc = np_best_threshold(scores[retain[:15]], scores[test])
    assert audit.threshold == t and audit.attack_accuracy == pytest.approx(acc)
    assert audit.flagged_fraction == pytest.approx(np.mean(scores[forget] >= t))
    assert audit.efficacy == pytest.approx(1 - np.mean(scores[forget] >= t))
    assert list(audit.split[[0, 10, 59]]) == ["forget", "retain", "test"]


def test_audit_from_scores_svc_is_the_reference_svc(rng):
    """attack="svc": the reference code's SVC_fit_predict (SVC(C=3, gamma="auto", rbf) on
    the 1-D feature, members = label 1) fitted on the first len(test) retain rows vs test."""
    from sklearn.svm import SVC

    # Members concentrate at high confidence, non-members spread below: the SVC's member
    # region is (about) the upper interval, as the threshold's.
    scores = np.concatenate([rng.uniform(0, 1, 10), rng.beta(5, 1, 35), rng.beta(1, 3, 15)])
    forget, retain, test = np.arange(0, 10), np.arange(10, 45), np.arange(45, 60)
    audit = audit_from_scores("cmia", scores, forget, retain, test, classifier="svc")
    svc = SVC(C=3, gamma="auto", kernel="rbf").fit(
        np.concatenate([scores[retain[:15]], scores[test]])[:, None], np.repeat([1, 0], 15))
    want = svc.predict(scores[:, None]) == 1
    np.testing.assert_array_equal(audit.flagged, want)
    assert audit.attack == "cmia-svc" and np.isnan(audit.threshold)
    assert audit.flagged_fraction == pytest.approx(want[forget].mean())
    assert audit.attack_accuracy == pytest.approx(
        (want[retain[:15]].sum() + (~want[test]).sum()) / 30)
    threshold = audit_from_scores("cmia", scores, forget, retain, test)
    # Both classify most rows alike on this monotone case (agreement 0.83-1.0, median 0.97,
    # over 300 seeds).
    assert np.mean(audit.flagged == threshold.flagged) > 0.7
    with pytest.raises(InputError, match="attack"):
        audit_from_scores("cmia", scores, forget, retain, test, classifier="svm")


def test_probe_confidence_matches_numpy(rng):
    # The probe itself is memjax.robustness.fit_linear_probe (tested there); CMIA's feature
    # is its softmax probability of the true label on unit-normalised embeddings.
    w, b = rng.normal(size=(6, 3)), rng.normal(size=3)
    x_new, y_new = rng.normal(size=(9, 6)), rng.integers(0, 3, size=9)
    unit = x_new / np.linalg.norm(x_new, axis=1, keepdims=True)
    logits = unit @ w + b
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # float32 softmax of O(1) logits.
    np.testing.assert_allclose(probe_confidence(w.astype(np.float32), b.astype(np.float32),
                                                x_new, y_new),
                               probs[np.arange(9), y_new], rtol=1e-5)


# --------------------------------------------------------------------------- engine


def test_emia_engine_equals_direct_computation(rng):
    model = tiny_encoder(rng)
    images = rng.uniform(size=(14, H, W, C)).astype(np.float32)
    source = {"image": images, "id": np.arange(100, 114)}  # ids key the views, not rows
    forget, retain, test = np.array([0, 1, 2]), np.arange(3, 9), np.arange(9, 14)
    audit = emia(model, source, forget=forget, retain=retain, test=test, views_fn=views_fn,
                 n_views=4, seed=3, batch_size=8)
    rows = np.concatenate([forget, retain, test])
    want = []
    for r in rows:
        views = [views_fn(jnp.asarray(images[r]), view_key(3, 100 + r, k)) for k in range(4)]
        want.append(np_alignment(np.stack([linear_apply(model.params, v) for v in views])))
    np.testing.assert_allclose(audit.scores, want, atol=1e-6)
    t, _ = np_best_threshold(np.asarray(want)[3:8], np.asarray(want)[9:])
    assert audit.flagged_fraction == pytest.approx(np.mean(np.asarray(want)[:3] >= t))
    direct = alignment_scores(model, source, views_fn=views_fn, n_views=4, seed=3,
                              batch_size=8)
    np.testing.assert_allclose(direct["alignment"][rows], want, atol=1e-6)


def test_cmia_engine_equals_direct_computation(rng):
    model = tiny_encoder(rng)
    images = rng.uniform(size=(20, H, W, C)).astype(np.float32)
    forget, retain, test = np.arange(0, 4), np.arange(4, 14), np.arange(14, 20)
    labels = rng.integers(0, 3, size=20)
    # Every class in the retain set: the probe's bias is not penalised, so a class it never
    # sees has a bias that runs to -inf and a confidence set by the optimiser's path.
    labels[retain] = rng.permutation(np.arange(10) % 3)
    audit = cmia(model, {"image": images, "label": labels}, forget=forget, retain=retain,
                 test=test, probe_steps=200, probe_l2=1e-2, batch_size=8)
    emb = np.stack([np.asarray(linear_apply(model.params, jnp.asarray(x))) for x in images])
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    # A ridge large enough that 200 L-BFGS steps converge: the probe is then a function of
    # the embeddings, not of the float32 path the optimiser took.
    head = fit_linear_probe(unit[retain], labels[retain], num_classes=3, l2=1e-2, steps=200)
    logits = unit.astype(np.float64) @ head["weight"] + head["bias"]
    conf = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True))[np.arange(20), labels]
    np.testing.assert_allclose(audit.scores, conf[np.concatenate([forget, retain, test])],
                               rtol=1e-4)


def test_audits_refuse_bad_sets(rng):
    model = tiny_encoder(rng)
    source = {"image": rng.uniform(size=(6, H, W, C)).astype(np.float32)}
    with pytest.raises(InputError, match="forget and test share"):
        emia(model, source, forget=[0, 1], retain=[2, 3], test=[1, 4], views_fn=views_fn)
    with pytest.raises(InputError, match=r"retain: row indices must be in \[0, 6\)"):
        emia(model, source, forget=[0], retain=[7], test=[1], views_fn=views_fn)
    with pytest.raises(InputError, match="n_views"):
        emia(model, source, forget=[0], retain=[2], test=[1], views_fn=views_fn, n_views=1)
    with pytest.raises(InputError, match="label_field"):
        cmia(model, source, forget=[0], retain=[2], test=[1])


# --------------------------------------------------------------------------- baselines

CONFIG = CNNConfig((H, W, C), 3, channels=(4,), hidden=(8,))


def ref_nt_xent(z1, z2, temperature):
    """NT-Xent written as -log(exp(s_pos) / sum_{k != i} exp(s_ik)), every pair valid;
    norms clamped at 1e-6 (SimCLR's normalisation, as memjax.train.simclr)."""
    z = jnp.concatenate([z1, z2])
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-6)
    sim = z @ z.T / temperature
    n = len(z)
    partner = (jnp.arange(n) + n // 2) % n
    others = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, sim)
    return jnp.mean(jax.scipy.special.logsumexp(others, axis=1) - sim[jnp.arange(n), partner])


@pytest.mark.parametrize("method, optimizer", [("finetune", "sgd"), ("gradient_ascent", "sgd"),
                                               ("neggrad_plus", "sgd"), ("finetune", "adam")])
def test_one_unlearning_step_is_a_gradient_step(rng, method, optimizer):
    params = CONFIG.init(jax.random.key(int(rng.integers(1 << 30))))
    images = jnp.asarray(rng.uniform(size=(10, H, W, C)), jnp.float32)
    ids = jnp.arange(10, dtype=jnp.int32) + 7
    retain = np.arange(10) < 6
    forget = ~retain
    key, lr, beta, batch = jax.random.key(5), 0.3, 0.7, 4
    got = unlearn_simclr(params, images, ids, retain, forget, method=method,
                         views_fn=views_fn, key=key, view_seed=2, steps=1, batch_size=batch,
                         learning_rate=lr, beta=beta, optimizer=optimizer)

    def loss_on(p, mask, which, size):
        rows, _ = kept_minibatch(jax.random.fold_in(jax.random.fold_in(key, 0), which),
                                 jnp.asarray(mask), size)

        def embedded(j):
            keys = jax.vmap(lambda i: view_key(2, i, UNLEARN_AUG_OFFSET + j))(ids[rows])
            views = jax.vmap(views_fn)(images[rows], keys)
            return jax.vmap(embed, in_axes=(None, 0))(p, views)
        return ref_nt_xent(embedded(0), embedded(1), 0.5)

    def objective(p):
        retain_loss = loss_on(p, retain, 0, batch)
        forget_loss = loss_on(p, forget, 1, 4)  # min(batch, 4 forget examples)
        return {"finetune": retain_loss, "gradient_ascent": -forget_loss,
                "neggrad_plus": beta * retain_loss - (1 - beta) * forget_loss}[method]

    grads = jax.grad(objective)(params)
    if optimizer == "sgd":
        want = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    else:
        # Adam's first step (bias-corrected moments m = g, v = g^2): p - lr g / (|g| + 1e-8).
        # Where |g| is below ~1e-4 the two float32 gradients' ~1e-7 differences change the
        # ratio g / |g| itself, so only parameters with a clear gradient are compared.
        compared = 0
        for a, p, g in zip(jax.tree.leaves(got), jax.tree.leaves(params),
                           jax.tree.leaves(grads), strict=True):
            g = np.asarray(g, np.float64)
            clear = np.abs(g) > 1e-4
            compared += int(clear.sum())
            want = np.asarray(p, np.float64) - lr * g / (np.abs(g) + 1e-8)
            np.testing.assert_allclose(np.asarray(a)[clear], want[clear], rtol=1e-5,
                                       atol=1e-5)
        assert compared > 10
    assert not all(np.allclose(a, p) for a, p in zip(jax.tree.leaves(got),
                                                     jax.tree.leaves(params), strict=True))


def test_unlearning_refuses_bad_sets(rng):
    params = CONFIG.init(jax.random.key(0))
    images = rng.uniform(size=(6, H, W, C)).astype(np.float32)
    both = np.ones(6, bool)
    with pytest.raises(InputError, match="share"):
        unlearn_simclr(params, images, np.arange(6), both, both, method="finetune",
                       views_fn=views_fn, key=jax.random.key(0))
    with pytest.raises(InputError, match="method"):
        unlearn_simclr(params, images, np.arange(6), both, ~both, method="scrub",
                       views_fn=views_fn, key=jax.random.key(0))


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    import memjax
    from memjax.train import save_model

    root = tmp_path_factory.mktemp("unlearning_cli")
    rng = np.random.default_rng(0)
    folders = []
    for k in range(2):
        params = CONFIG.init(jax.random.key(k))
        folders.append(str(save_model(root / f"enc{k}", params, CONFIG, kind="encoder")))
    images = rng.uniform(size=(24, H, W, C)).astype(np.float32)
    np.savez(root / "data.npz", image=images, label=rng.integers(0, 3, size=24))
    sets = {"forget": np.arange(0, 4), "retain": np.arange(4, 14), "test": np.arange(14, 22)}
    for name, rows in sets.items():
        (root / f"{name}.txt").write_text("\n".join(str(r) for r in rows) + "\n")
    models = [memjax.load(f) for f in folders]
    return root, folders, models, sets


def _cli_args(root, folders, **overrides):
    args = {"--model": folders[0], "--reference": folders[1], "--data": str(root / "data.npz"),
            "--forget": str(root / "forget.txt"), "--retain": str(root / "retain.txt"),
            "--test": str(root / "test.txt"), "--views": "small", "--n-views": "3",
            "--batch-size": "8"}
    args.update(overrides)
    return ["unlearning", *[x for kv in args.items() for x in kv]]


def test_cli_equals_python_api(cli_setup, tmp_path):
    import json

    import pyarrow.parquet as pq

    from memjax.augment import SmallImageView
    from memjax.cli import main

    root, folders, models, sets = cli_setup
    out = tmp_path / "report"
    assert main([*_cli_args(root, folders), "--out", str(out)]) == 0
    table = pq.read_table(out / "scores.parquet").to_pydict()
    data = dict(np.load(root / "data.npz"))
    assert table["id"] == list(range(22))
    assert table["split"] == ["forget"] * 4 + ["retain"] * 10 + ["test"] * 8
    metrics = json.loads((out / "metrics.json").read_text())
    text = json.dumps(metrics)
    for name, model in (("enc0", models[0]), ("reference", models[1])):
        e = emia(model, data, **sets, views_fn=SmallImageView(), n_views=3, batch_size=8)
        c = cmia(model, data, **sets, batch_size=8)
        np.testing.assert_allclose(table[f"{name}_alignment"], e.scores, rtol=1e-12)
        assert table[f"{name}_emia_flagged"] == e.flagged.tolist()
        np.testing.assert_allclose(table[f"{name}_cmia_confidence"], c.scores, rtol=1e-12)
        assert f"{name}: EMIA forget set flagged as members" in text
    assert (out / "alignment_gap.png").stat().st_size > 0
    # The reference code's SVC as CMIA's classifier: the flags equal the Python API's.
    svc_out = tmp_path / "svc"
    assert main([*_cli_args(root, folders), "--cmia-attack", "svc", "--out", str(svc_out)]) == 0
    svc_table = pq.read_table(svc_out / "scores.parquet").to_pydict()
    for name, model in (("enc0", models[0]), ("reference", models[1])):
        c = cmia(model, data, **sets, batch_size=8, attack="svc")
        assert c.attack == "cmia-svc"
        assert svc_table[f"{name}_cmia_flagged"] == c.flagged.tolist()


@pytest.mark.parametrize("overrides, message", [
    ({"--forget": "{root}/missing.txt"}, "--forget '{root}/missing.txt': no such file"),
    ({"--test": "{root}/forget.txt"}, "--test and --forget share 4 ids"),
    ({"--forget": "{root}/unknown.txt"}, "--forget: 1 ids are not in --data"),
    ({"--label-field": "digit"}, "--label-field 'digit'"),
    ({"--n-views": "1"}, "--n-views 1"),
])
def test_cli_refuses_bad_input(cli_setup, tmp_path, capsys, overrides, message):
    from memjax.cli import main

    root, folders, _, _ = cli_setup
    (root / "unknown.txt").write_text("3\n99\n")
    overrides = {k: v.format(root=root) for k, v in overrides.items()}
    assert main([*_cli_args(root, folders, **overrides), "--out", str(tmp_path / "o")]) == 2
    assert message.format(root=root) in capsys.readouterr().err
