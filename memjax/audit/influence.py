"""The audit's influence section: Forward-INF applications and LAVA on real data.

Forward-INF (Ko et al., CVPR 2024) scores training examples by how their loss moves when
the model unlearns a test example (or, for self-influence, the example itself):

- mislabeled data: digits with 10% of the training labels flipped; rank training examples
  by self-influence and compare with the loss baseline and with LAVA (Just et al. 2023,
  class-wise optimal transport to clean validation data);
- data leakage: test examples that are near-duplicates of training examples; the most
  supporting training example should be the source (top-1 / top-5 hit rate);
- memorization: the most self-influential training examples of a clean model, shown;
- training-document tracing: a tiny GPT-2 and corrupted copies of its training texts;
  Forward-INF should point each copy at the text it came from;
- curvature (issue 15): each attribution method's LDS against 100 subset models
  (:func:`memjax.train.attribution.subset_outputs`) and its correlation with exact
  leave-one-out on the convex check, side by side, and the most supporting / opposing
  training digits of a few test digits under the best method.
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from memjax.audit.data import read_only
from memjax.data import digits, stdlib_docstrings
from memjax.influence import (
    RANKING,
    classifier_outputs,
    cross_entropy_loss,
    dense_curvature,
    dense_preconditioner,
    ekfac_batch_stats,
    ekfac_factors,
    ekfac_preconditioner,
    fit_logistic,
    forward_inf,
    gauss_newton_preconditioner,
    gnhvp,
    grad_dot,
    gradient_store,
    hit_rates,
    kfac_batch_stats,
    kfac_factors,
    label_cross_entropy,
    lava_values,
    lds,
    logistic_loss,
    loo_influence,
    projected_fisher_solve,
    query_vectors,
    relative_first_order,
    sample_labels,
    self_influence,
    solver_curvature,
)
from memjax.metrics import roc_auc
from memjax.report import Section, plot_top_images
from memjax.train import MLPConfig, classifier_logits, fit_classifier
from memjax.train.attribution import subset_outputs

TITLE = "Influence: Forward-INF applications and LAVA data valuation"
FLIP_FRACTION = 0.1
#: One SGD step of ascent on the example itself (lr 0.1): self-influence, Forward-INF.
SELF_INFLUENCE = {"mode": "finite", "optimizer": "sgd", "lr": 0.1}
#: Unlearning a test example: one SGD ascent step; oriented scores (positive = supports).
TRACING = {"mode": "finite", "optimizer": "sgd", "lr": 0.1, "direction": "ascent"}
#: Forward-INF's loss for the audit's MLPs: cross-entropy of one example.
classifier_loss = functools.partial(cross_entropy_loss, classifier_logits)


def flip_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(noisy labels, flipped [N] bool): a random ``fraction`` moved to another class."""
    rng = np.random.default_rng(seed)
    flipped = rng.random(labels.shape[0]) < fraction
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, 10, int(flipped.sum()))) % 10
    return noisy, flipped


def train_digits(images: np.ndarray, labels: np.ndarray, seed: int, steps: int = 300):
    """An MLP 64-128-10 trained (full-batch Adam) on all the given examples."""
    config = MLPConfig(images.shape[1:], 10, hidden=(128,))
    fit = jax.jit(functools.partial(fit_classifier, config=config, steps=steps,
                                    learning_rate=2e-3))
    return fit(jax.random.key(seed), images, labels, np.ones(len(labels), np.float32))


def _digits_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, order): all digits and ``seed``'s permutation of them (the first
    1,300 are the training examples of every digits experiment here)."""
    data = digits().arrays
    images, labels = data["image"], data["label"]
    return images, labels, np.random.default_rng(seed).permutation(len(labels))


def clean_model(seed: int = 0):
    """The MLP trained on the 1,300 clean-label training digits of ``seed``'s split.

    :func:`leakage_detection` and :func:`curvature_check` use the same model: the
    section trains it once and passes it to both.
    """
    images, labels, order = _digits_split(seed)
    return train_digits(images[order[:1300]], labels[order[:1300]], seed)


def mislabeled_detection(seed: int = 0) -> dict:
    """Self-influence vs loss vs LAVA at finding flipped labels (AUROC), one model."""
    images, labels, order = _digits_split(seed)
    train, val = order[:1300], order[1300:]
    noisy, flipped = flip_labels(labels[train], FLIP_FRACTION, seed)
    params = train_digits(images[train], noisy, seed)
    source = {"image": images[train], "label": noisy}
    start = time.perf_counter()
    influence = self_influence(classifier_loss, params, source, **SELF_INFLUENCE)
    seconds = time.perf_counter() - start
    losses = np.asarray(jax.vmap(classifier_loss, in_axes=(None, 0))(params, source))
    values = np.asarray(lava_values(images[train].reshape(len(train), -1), noisy,
                                    images[val].reshape(len(val), -1), labels[val]))
    return {"flipped": flipped, "self_influence": influence, "loss": losses,
            "lava": values, "seconds": seconds, "n_train": len(train)}


def leakage_detection(seed: int = 0, n_leaked: int = 50, noise: float = 0.05, *,
                      params=None) -> dict:
    """Near-duplicates of training digits as test examples: is their source found?

    ``params``: :func:`clean_model` of the same ``seed`` (default: trained here).
    """
    images, labels, order = _digits_split(seed)
    train = order[:1300]
    if params is None:
        params = clean_model(seed)
    rng = np.random.default_rng(seed + 1)
    source = rng.choice(len(train), n_leaked, replace=False)
    leaked = np.clip(images[train][source] + rng.normal(0, noise, images[train][source].shape),
                     0, 1).astype(np.float32)
    test = {"image": leaked, "label": labels[train][source]}
    train_set = {"image": images[train], "label": labels[train]}
    scores = forward_inf(classifier_loss, params, test, train_set, **TRACING)
    influence = self_influence(classifier_loss, params, train_set, **SELF_INFLUENCE)
    relative = relative_first_order(classifier_loss, params, test, train_set)
    return {"hits": hit_rates(scores, source), "relative_hits": hit_rates(relative, source),
            "n_leaked": n_leaked, "noise": noise,
            "self_influence": influence, "images": images[train], "labels": labels[train]}


def text_tracing(seed: int = 0, n_texts: int = 128, n_queries: int = 32,
                 corrupt: float = 0.15) -> dict:
    """A tiny GPT-2 on real texts; queries are training texts with ``corrupt`` of their
    bytes replaced at random; Forward-INF should rank each query's source first."""
    from flax import nnx

    from memjax.audit.text import CONFIG, LEARNING_RATE
    from memjax.train.lm import byte_tokens, fit_gpt2, gpt2_graph, next_token_loss

    texts = stdlib_docstrings()
    chosen = np.random.default_rng(seed).choice(len(texts), n_texts, replace=False)
    ids, mask = byte_tokens([texts[i] for i in chosen], CONFIG.n_positions)
    fit = jax.jit(functools.partial(fit_gpt2, config=CONFIG, steps=150,
                                    learning_rate=LEARNING_RATE))
    params = fit(jax.random.key(seed), ids, mask, np.ones(n_texts, bool))
    graph = gpt2_graph(CONFIG)

    def text_loss(p, example):
        return next_token_loss(nnx.merge(graph, p), example["input_ids"][None],
                               example["attention_mask"][None], np.ones(1, np.float32))

    rng = np.random.default_rng(seed + 1)
    source = rng.choice(n_texts, n_queries, replace=False)
    queries = ids[source].copy()
    swap = (rng.random(queries.shape) < corrupt) & (mask[source] != 0)
    queries[swap] = rng.integers(32, 127, int(swap.sum()))
    test = {"input_ids": queries, "attention_mask": mask[source]}
    train = {"input_ids": ids, "attention_mask": mask}
    # A smaller step than for the MLP: one SGD step of 0.1 on a language model's mean token
    # loss moves it far outside the small-step regime.
    step = {**TRACING, "lr": 0.01}
    scores = forward_inf(text_loss, params, test, train, **step, batch_size=64)
    relative = relative_first_order(text_loss, params, test, train, batch_size=64)
    return {"hits": hit_rates(scores, source), "relative_hits": hit_rates(relative, source),
            "n_texts": n_texts, "n_queries": n_queries,
            "corrupt": corrupt}


# ---- curvature: LDS against subset models and convex LOO, method by method (issue 15) ----

#: Subset models behind the LDS (Park et al. 2023; memjax.train.attribution.MIN_SUBSETS).
LDS_SUBSETS = 100
#: Test digits the LDS averages over: the first held-out digits of the split.
LDS_TEST = 20
#: The damping rule of every damped method here: λ = 0.1 × the mean eigenvalue (trace /
#: dimension) of the curvature it damps. It is memjax.influence's default per-layer rule for
#: EK-FAC (kronfluence's heuristic), applied here also to the whole Gauss-Newton matrix (CG)
#: and to the projected Fisher of the gradient store.
DAMPING_FACTOR = 0.1
#: Labels drawn per training example from the model's predictive distribution (true Fisher).
FISHER_SAMPLES = 4
#: Width of the TRAK-style store of projected training gradients.
PROJECTION_DIM = 512
#: CG on the Gauss-Newton matrix: relative residual and iteration cap. Inside forward_inf
#: the solve is traced, so memjax.influence.solver_curvature checks it first on every test
#: gradient; measured on the digits MLP, seed 0: all 20 reach 1e-3 in 196-227 iterations.
CG_TOL, CG_MAX_ITER = 1e-3, 300
#: The convex check of tests/test_influence_convex.py: L2 logistic regression on 200 digits,
#: exact LOO (float64 refits) on the 10 highest-loss test digits; Pearson per test, averaged.
CONVEX_L2, CONVEX_TRAIN, CONVEX_TOP = 0.01, 200, 10
#: Test digits of the support / opposition figure, and images shown per side.
FIGURE_TESTS, FIGURE_TOP = 3, 5

IDENTITY = "Forward-INF (first order)"
FINITE = "Forward-INF (finite, one SGD ascent step)"
GRAD_DOT = "grad-dot (TracIn, final checkpoint)"
EKFAC = "Forward-INF + EK-FAC (true Fisher)"
CG = "Forward-INF + CG (Gauss-Newton)"
STORE = "gradient store + projected Fisher (TRAK-style)"
EXACT = "Forward-INF + exact Hessian (convex only)"




def _lds_split(seed: int, n_test: int) -> tuple[dict, dict]:
    """(train [1300], test [n_test]) example dicts of ``seed``'s split (clean labels)."""
    images, labels, order = _digits_split(seed)
    train, test = order[:1300], order[1300:1300 + n_test]
    return ({"image": images[train], "label": labels[train]},
            {"image": images[test], "label": labels[test]})


# Deterministic and the heaviest part (100 MLPs): cached, so the audit and the tests that
# assert on the same setting train once per process.
@functools.lru_cache(maxsize=4)
def lds_ground_truth(seed: int = 0, n_subsets: int = LDS_SUBSETS,
                     n_test: int = LDS_TEST) -> dict:
    """``n_subsets`` MLPs with :func:`clean_model`'s recipe on random halves of its 1,300
    training digits, in one vmapped program (:func:`memjax.train.attribution.subset_outputs`).

    Returns (read-only, cached):
      ``{"subsets": [S, 1300] bool, "outputs": [S, T] (−CE of each test digit), "seconds"}``.
    """
    train, test = _lds_split(seed, n_test)
    config = MLPConfig(train["image"].shape[1:], 10, hidden=(128,))
    start = time.perf_counter()
    subsets, outputs = subset_outputs(train["image"], train["label"], test,
                                      n_subsets=n_subsets, fraction=0.5, config=config,
                                      steps=300, learning_rate=2e-3, seed=seed + 2)
    return read_only({"subsets": subsets, "outputs": outputs,
                    "seconds": time.perf_counter() - start})


def true_fisher_ekfac(params, images: np.ndarray, key: jax.Array,
                      samples: int = FISHER_SAMPLES) -> list:
    """EK-FAC factors (George et al. 2018) of an MLP's true Fisher over ``images`` [N, ...]:
    ``samples`` labels per example drawn from the model (its expectation over labels is the
    Gauss-Newton matrix of softmax cross-entropy), the same draws for both passes."""
    x = np.repeat(images, samples, axis=0)
    y = sample_labels(params, x, key)
    # "empirical" with the sampled labels: the Fisher of those draws, reused by both passes.
    factors = kfac_factors(kfac_batch_stats(params, x, y, fisher="empirical"))
    return ekfac_factors(factors, ekfac_batch_stats(params, factors, x, y, fisher="empirical"))


def mean_fisher_eigenvalue(factors: list) -> float:
    """tr(F)/P of the sampled Fisher: EK-FAC's corrected eigenvalues are E[(Q_Sᵀ G Q_A)²]
    in an orthonormal basis, so their sum over every layer is E||g||², exactly tr(F)."""
    total = sum(float(jnp.sum(f.corrected)) for f in factors)
    return total / sum(int(f.corrected.size) for f in factors)


def projected_fisher_queries(params, train: dict, test: dict, folder: Path, seed: int):
    """TRAK-style (Park et al. 2023) store: (stored [N, k], queries [T, k]) with each query
    Rᵀg_t multiplied by (ΦᵀΦ/N + λI)⁻¹, Φ = the stored rows Rᵀg_i (:func:`gradient_store`,
    k = :data:`PROJECTION_DIM`), λ by :data:`DAMPING_FACTOR`. Score = query · stored row."""
    store = gradient_store(classifier_loss, params, train, folder / "gradients",
                           projection_dim=PROJECTION_DIM, batch_size=256, seed=seed)
    queries = query_vectors(classifier_loss, params, test, projection_dim=PROJECTION_DIM,
                            seed=seed)
    solved, _ = projected_fisher_solve(store, queries)
    return np.asarray(store.read()["grad"], np.float32), solved.astype(np.float32)


def mlp_method_scores(params, train: dict, test: dict, seed: int, folder: Path) -> dict:
    """[T, N] oriented scores (positive = supports) of every method on the digits MLP."""
    ekfac = true_fisher_ekfac(params, train["image"], jax.random.key(seed + 5))
    # CG on the Gauss-Newton matrix, its convergence checked on every test gradient first.
    cg, _ = gauss_newton_preconditioner(
        "cg", functools.partial(classifier_outputs, classifier_logits), label_cross_entropy,
        classifier_loss, params, train, test,
        damping=DAMPING_FACTOR * mean_fisher_eigenvalue(ekfac), tol=CG_TOL,
        max_iter=CG_MAX_ITER)
    stored, queries = projected_fisher_queries(params, train, test, folder, seed)
    mirrored = functools.partial(forward_inf, classifier_loss, params, test, train)
    return {
        IDENTITY: mirrored(**RANKING),
        FINITE: mirrored(**TRACING),
        GRAD_DOT: np.asarray(grad_dot(classifier_loss, params, test, train)),
        EKFAC: mirrored(**RANKING, precondition=ekfac_preconditioner(ekfac)),
        CG: mirrored(**RANKING, precondition=cg),
        STORE: queries @ stored.T,
    }


def _layer_loss(params, example):
    return logistic_loss(params["layers"][0], example["x"], example["y"])


def _convex_gauss_newton(params, train: dict, l2: float):
    """Gauss-Newton matvec of the LOO objective J = mean CE + (l2/2)||W||² + ½(Σb)² (equal to
    its Hessian: softmax regression is linear in θ), in the one-layer MLP layout."""
    def logits(p, ex):
        return ex["x"] @ p["layers"][0]["w"] + p["layers"][0]["b"]

    def ce(z, ex):
        return jax.nn.logsumexp(z) - z[ex["y"]]

    def matvec(v):
        gn = gnhvp(logits, ce, params, train, v)["layers"][0]
        w, b = v["layers"][0]["w"], v["layers"][0]["b"]
        return {"layers": [{"w": gn["w"] + l2 * w,
                            "b": gn["b"] + jnp.sum(b) * jnp.ones_like(b)}]}

    return matvec


@functools.lru_cache(maxsize=4)
def convex_loo_check(seed: int = 0) -> dict:
    """Pearson correlation with exact LOO of mirrored influence per curvature, on the convex
    check of Ko et al. (CVPR 2024) as tests/test_influence_convex.py sets it up (L2 logistic
    regression on :data:`CONVEX_TRAIN` digits of ``seed``'s permutation; the
    :data:`CONVEX_TOP` highest-loss test digits; mean of the per-test correlations).

    Curvatures: identity; the exact float64 Hessian of J; EK-FAC with the labels' exact
    expectation (every example once per class, weighted by p(k|x)), λ = l2; CG on J's
    Gauss-Newton matrix (= its Hessian here), undamped beyond J's own L2 and gauge terms.
    Cached: every caller gets the same ``{method: Pearson}`` dict (copy it to change it).
    """
    data = digits().arrays
    x = data["image"].reshape(len(data["image"]), -1).astype(np.float64)
    y = data["label"]
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, te = perm[:CONVEX_TRAIN], perm[CONVEX_TRAIN:]
    fit = fit_logistic(x[tr], y[tr], l2=CONVEX_L2, n_classes=10)
    with jax.enable_x64(True):
        fitted = {"layers": [jax.tree.map(jnp.asarray, fit.params)]}
        losses = np.asarray(jax.vmap(_layer_loss, in_axes=(None, 0))(
            fitted, {"x": x[te], "y": y[te]}))
        top = te[np.argsort(-losses)[:CONVEX_TOP]]

        def objective(p):
            layer = p["layers"][0]
            ce = jax.vmap(logistic_loss, in_axes=(None, 0, 0))(layer, x[tr], y[tr])
            return (jnp.mean(ce) + 0.5 * CONVEX_L2 * jnp.sum(layer["w"] ** 2)
                    + 0.5 * jnp.sum(layer["b"]) ** 2)

        hessian = np.asarray(dense_curvature(
            lambda v: jax.jvp(jax.grad(objective), (fitted,), (v,))[1], fitted))
    loo, _ = loo_influence(x[tr], y[tr], x[top], y[top], l2=CONVEX_L2, n_classes=10)

    params = {"layers": [{"w": jnp.asarray(fit.params["w"], jnp.float32),
                          "b": jnp.asarray(fit.params["b"], jnp.float32)}]}
    train = {"x": x[tr].astype(np.float32), "y": y[tr].astype(np.int32)}
    test = {"x": x[top].astype(np.float32), "y": y[top].astype(np.int32)}
    prob = np.asarray(jax.nn.softmax(x[tr] @ fit.params["w"] + fit.params["b"]))
    xs, ys = np.repeat(train["x"], 10, 0), np.tile(np.arange(10, dtype=np.int32), len(tr))
    expectation = dict(fisher="empirical", weights=prob.ravel().astype(np.float32))
    factors = kfac_factors(kfac_batch_stats(params, xs, ys, **expectation))
    factors = ekfac_factors(factors, ekfac_batch_stats(params, factors, xs, ys, **expectation))
    test_grads = jax.vmap(jax.grad(_layer_loss), in_axes=(None, 0))(params, test)
    cg, _ = solver_curvature("cg", _convex_gauss_newton(params, train, CONVEX_L2), params,
                             test_grads, damping=0.0, tol=CG_TOL, max_iter=CG_MAX_ITER)
    mirrored = functools.partial(forward_inf, _layer_loss, params, test, train,
                                 mode="first_order", lr=1e-3)
    scores = {
        IDENTITY: mirrored(),
        EXACT: mirrored(precondition=dense_preconditioner(hessian, params, 0.0)),
        EKFAC: mirrored(precondition=ekfac_preconditioner(factors, CONVEX_L2)),
        CG: mirrored(precondition=cg),
    }
    return {name: float(np.mean([np.corrcoef(loo[t], s[t])[0, 1] for t in range(len(loo))]))
            for name, s in scores.items()}


def curvature_check(seed: int = 0, *, params=None, folder: Path | None = None) -> dict:
    """Every method's LDS on the digits MLP and convex-LOO correlation, side by side.

    ``params``: :func:`clean_model` of ``seed`` (default: trained here); ``folder``: where
    the gradient store's temporary folder goes (removed after; default: the system's).

    Returns:
      ``{"lds": {method: mean LDS}, "convex": {method: Pearson}, "best": method,
      "scores": its [T, N] scores, "train": dict, "test": dict, "seconds": float}``.
    """
    if params is None:
        params = clean_model(seed)
    train, test = _lds_split(seed, LDS_TEST)
    start = time.perf_counter()
    truth = lds_ground_truth(seed)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        scores = mlp_method_scores(params, train, test, seed, Path(scratch))
    lds_values = {name: float(lds(s, truth["subsets"], truth["outputs"]).mean)
                  for name, s in scores.items()}
    convex = dict(convex_loo_check(seed))  # a copy: the cached dict is shared
    best = max(lds_values, key=lds_values.get)
    return {"lds": lds_values, "convex": convex, "best": best, "scores": scores[best],
            "train": train, "test": test, "seconds": time.perf_counter() - start}


def plot_support_and_opposition(train: dict, test: dict, scores: np.ndarray, path: Path,
                                title: str, n_tests: int = FIGURE_TESTS,
                                top: int = FIGURE_TOP) -> None:
    """For the first ``n_tests`` test digits: the digit, then its ``top`` most supporting and
    ``top`` most opposing training digits (highest / lowest of ``scores`` [T, N]), each
    titled by its label and score (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-scores[:n_tests], axis=1, kind="stable")
    ranked = {"top_rows": order[:, :top], "bottom_rows": order[:, ::-1][:, :top]}
    for side in ("top", "bottom"):
        ranked[f"{side}_scores"] = np.take_along_axis(scores[:n_tests], ranked[f"{side}_rows"],
                                                      axis=1)
    fig, axes = plt.subplots(n_tests, 2 * top + 1, figsize=((2 * top + 1) * 0.95,
                                                             n_tests * 1.25))
    for t in range(n_tests):
        cells = [(test["image"][t], f"test: {test['label'][t]}")]
        for side in ("top", "bottom"):
            cells += [(train["image"][i], f"{train['label'][i]}: {v:+.2g}")
                      for i, v in zip(ranked[f"{side}_rows"][t], ranked[f"{side}_scores"][t],
                                      strict=True)]
        for ax, (image, label) in zip(axes[t], cells, strict=True):
            ax.imshow(image[..., 0], cmap="gray_r")
            ax.set_title(label, fontsize=6)
            ax.axis("off")
    fig.suptitle(f"{title}: test digit | top-{top} supporting | top-{top} opposing",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def influence_section(folder: Path, *, seed: int = 0, progress: bool = False) -> Section:
    """Run the four applications, LAVA and the curvature comparison; one Section, figures."""
    mislabeled = mislabeled_detection(seed)
    clean = clean_model(seed)  # one clean-label MLP for the leakage and curvature checks
    leakage = leakage_detection(seed, params=clean)
    tracing = text_tracing(seed)
    curvature = curvature_check(seed, params=clean, folder=folder)
    labels = leakage["labels"]
    plot_top_images(leakage["images"], leakage["self_influence"],
                    lambda i: f"label {labels[i]}", folder / "self_influence.png",
                    "Most self-influential training digits (clean labels)")
    plot_support_and_opposition(curvature["train"], curvature["test"], curvature["scores"],
                                folder / "influence_support.png", curvature["best"])
    flipped = mislabeled["flipped"]
    metrics = [
        ("training examples (digits)", mislabeled["n_train"]),
        ("flipped labels", int(flipped.sum())),
        ("mislabeled AUROC: Forward-INF self-influence", roc_auc(mislabeled["self_influence"],
                                                                 flipped)),
        ("mislabeled AUROC: loss baseline", roc_auc(mislabeled["loss"], flipped)),
        ("mislabeled AUROC: LAVA (pixels, OT to clean validation)",
         roc_auc(mislabeled["lava"], flipped)),
        ("self-influence seconds (all training examples)", round(mislabeled["seconds"], 2)),
        ("leaked near-duplicates (test)", leakage["n_leaked"]),
        ("leakage: source is top-1 (raw Forward-INF)", leakage["hits"][1]),
        ("leakage: source in top-5 (raw Forward-INF)", leakage["hits"][5]),
        ("leakage: source is top-1 (first order, relative: gradient cosine)",
         leakage["relative_hits"][1]),
        ("leakage: source in top-5 (first order, relative: gradient cosine)",
         leakage["relative_hits"][5]),
        *((f"LDS ({LDS_SUBSETS} half-data MLPs, {LDS_TEST} test digits): {name}", value)
          for name, value in curvature["lds"].items()),
        *((f"convex-LOO Pearson ({CONVEX_TOP} highest-loss test digits): {name}", value)
          for name, value in curvature["convex"].items()),
        ("curvature comparison seconds (subset models included)",
         round(curvature["seconds"], 1)),
        ("GPT-2 tracing: corrupted training texts queried", tracing["n_queries"]),
        ("GPT-2 tracing: source is top-1 (raw Forward-INF)", tracing["hits"][1]),
        ("GPT-2 tracing: source in top-5 (raw Forward-INF)", tracing["hits"][5]),
        ("GPT-2 tracing: source is top-1 (first order, relative: gradient cosine)",
         tracing["relative_hits"][1]),
        ("GPT-2 tracing: source in top-5 (first order, relative: gradient cosine)",
         tracing["relative_hits"][5]),
    ]
    text = (
        "Forward-INF (Ko et al., CVPR 2024, 'The Mirrored Influence Hypothesis') estimates "
        "the influence of training example i on test example t from forward passes: take "
        f"one SGD step of gradient ascent on t (lr {TRACING['lr']}), then score every "
        "training example by the change of its loss (positive = i supports t). "
        f"Mislabeled data: {FLIP_FRACTION:.0%} of 1,300 training digits get a wrong label; "
        "an MLP is trained on them; each example's self-influence (ascent on itself, change "
        "of its own loss) ranks the flipped ones first, next to the loss itself and LAVA "
        "(Just et al. 2023: the calibrated gradient of the class-wise OT dual between the "
        "training set and the 497 clean held-out digits). Leakage: test digits that are "
        f"training digits plus Gaussian noise (σ {leakage['noise']}); the hit rate is how "
        "often the most supporting training example is the source, ranked by the raw "
        "finite-step score and by first-order influence relative to self-influence "
        "(RelatIF-style, Barshan et al. 2020: the cosine of the two loss gradients, which "
        "stops examples with large gradients from topping every ranking). Tracing: a tiny byte "
        f"GPT-2 trained on {tracing['n_texts']} docstrings, queried with copies of its "
        f"training texts with {tracing['corrupt']:.0%} of their bytes replaced at random. "
        "Ground truth for attribution, method by method: the linear datamodeling score (LDS, "
        f"Park et al. 2023) from {LDS_SUBSETS} MLPs with the clean model's recipe trained at "
        "once (vmap) on random halves of its 1,300 training digits: for each of "
        f"{LDS_TEST} held-out digits, the Spearman correlation over subsets between a "
        "method's summed scores and the subset model's −loss, averaged. Methods on the clean "
        "MLP: mirrored influence at first order (= grad-dot) and with one finite SGD step; "
        "preconditioned by the inverse curvature (Koh & Liang 2017): EK-FAC of the true "
        f"Fisher (George et al. 2018; labels sampled from the model, {FISHER_SAMPLES} per "
        f"example; per-layer λ = {DAMPING_FACTOR} × mean eigenvalue) and conjugate gradient "
        "on the Gauss-Newton matrix of the training set (λ = "
        f"{DAMPING_FACTOR} × its mean eigenvalue tr(F)/P, relative residual {CG_TOL}); and a "
        f"TRAK-style store of {PROJECTION_DIM}-dimensional projected training gradients "
        "scored through the inverse projected Fisher (same λ rule). Convex LOO: L2 logistic "
        f"regression on {CONVEX_TRAIN} digits (Ko et al.'s check), exact leave-one-out by "
        f"float64 refits, Pearson correlation on the {CONVEX_TOP} highest-loss test digits, "
        "averaged; there the exact Hessian is available too. The second figure shows, for "
        f"{FIGURE_TESTS} test digits, the most supporting and most opposing training digits "
        f"of the method with the highest LDS ({curvature['best']})."
    )
    return Section(TITLE, text, metrics,
                   figures=[("self_influence.png", "The most self-influential digits of a "
                             "model trained on clean labels (atypical writing)"),
                            ("influence_support.png", f"The {FIGURE_TOP} most supporting and "
                             f"{FIGURE_TOP} most opposing training digits of {FIGURE_TESTS} "
                             f"test digits ({curvature['best']}), with their scores")])
