"""Déjà vu memorization (memjax.memorization._dejavu) vs float64 NumPy brute force."""

import math

import numpy as np
import pytest

from memjax.errors import InputError
from memjax.memorization._dejavu import dejavu, dejavu_sets, knn, label_inference, neighbour_objects


def _brute_knn(q, p, k, metric):
    q, p = q.astype(np.float64), p.astype(np.float64)
    if metric == "l2":
        key = ((q[:, None, :] - p[None, :, :]) ** 2).sum(-1)  # ascending = nearest
    else:
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        pn = p / np.linalg.norm(p, axis=1, keepdims=True)
        key = -(qn @ pn.T)
    # Nearest first, ties to the lower public index.
    idx = np.stack([np.lexsort((np.arange(len(p)), row))[:k] for row in key])
    vals = np.take_along_axis(key, idx, axis=1)
    return (vals if metric == "l2" else -vals), idx


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("block_size", [8, 1024])
def test_knn_matches_brute_force(metric, block_size, rng):
    q = rng.normal(size=(11, 5)).astype(np.float32)
    p = rng.normal(size=(37, 5)).astype(np.float32)  # 37: not a multiple of the block
    vals, idx = knn(q, p, 7, metric=metric, block_size=block_size)
    want_vals, want_idx = _brute_knn(q, p, 7, metric)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    # float32 expansion |q|^2 + |p|^2 - 2 q.p of O(10) norms: ~1e-5 absolute rounding.
    np.testing.assert_allclose(np.asarray(vals), want_vals, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("block_size", [4, 7, 64])
def test_knn_ties_go_to_lower_index(metric, block_size, rng):
    # Signed one-hot and all-(+-1) vectors: norms 1 and 2, so every coordinate, norm,
    # normalised coordinate and dot product is exact in float32 and float64 alike, and
    # the 24 distinct vectors drawn 50 times give many exact ties.
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * 4)).reshape(4, -1).T
    pool = np.concatenate([np.eye(4), -np.eye(4), signs]).astype(np.float32)
    p = pool[rng.integers(0, len(pool), size=50)]
    q = pool[rng.integers(0, len(pool), size=9)]
    _, idx = knn(q, p, 12, metric=metric, block_size=block_size)
    np.testing.assert_array_equal(np.asarray(idx), _brute_knn(q, p, 12, metric)[1])


def _np_label_inference(labels, num_classes):
    counts = np.stack([np.bincount(row, minlength=num_classes) for row in labels])
    top1 = np.argmax(counts, axis=1)
    top5 = np.argsort(-counts, axis=1, kind="stable")[:, :5]
    p = counts / labels.shape[1]
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
    return top1, top5, -ent


def test_label_inference_matches_numpy(rng):
    labels = rng.integers(0, 8, size=(30, 13))
    top1, top5, conf = label_inference(labels, 8)
    w1, w5, wc = _np_label_inference(labels, 8)
    np.testing.assert_array_equal(np.asarray(top1), w1)
    np.testing.assert_array_equal(np.asarray(top5), w5)
    np.testing.assert_allclose(np.asarray(conf), wc, rtol=1e-6, atol=1e-6)


def _np_accuracy(conf, correct, fractions):
    order = np.argsort(-conf, kind="stable")
    return np.array([correct[order[:max(1, math.floor(f * len(conf) + 0.5))]].mean()
                     for f in fractions])


def _np_accuracy_range(conf, correct, fractions):
    """(lowest, highest) accuracy of the ``fractions`` most confident examples over every
    order of the examples whose (rounded) confidence ties at a fraction's cut."""
    low, high = [], []
    for f in fractions:
        m = max(1, math.floor(f * len(conf) + 0.5))
        cut = np.sort(conf)[::-1][m - 1]
        above, tied = conf > cut, conf == cut
        need = m - int(above.sum())
        right = int(correct[above].sum())
        hits = int(correct[tied].sum())
        low.append((right + max(0, need - int((~correct[tied]).sum()))) / m)
        high.append((right + min(need, hits)) / m)
    return np.array(low), np.array(high)


def _np_dejavu_model(emb, public, public_labels, truth, k, num_classes, fractions):
    _, idx = _brute_knn(emb, public, k, "l2")
    top1, top5, conf = _np_label_inference(public_labels[idx], num_classes)
    # Relabelled histograms have equal entropy; round so float64 ties stay ties.
    conf = np.round(conf, 9)
    return (_np_accuracy(conf, top1 == truth, fractions),
            _np_accuracy(conf, (top5 == truth[:, None]).any(axis=1), fractions))


def test_dejavu_matches_numpy(rng):
    n_q, n_p, d, c, k = 40, 120, 6, 7, 10
    fractions = (0.05, 0.2, 0.5, 1.0)
    public_labels = rng.integers(0, c, size=n_p)
    centers = rng.normal(size=(c, d)) * 2
    pub_t = (centers[public_labels] + rng.normal(size=(n_p, d))).astype(np.float32)
    pub_r = rng.normal(size=(n_p, d)).astype(np.float32)
    truth = rng.integers(0, c, size=n_q)
    tgt = (centers[truth] + rng.normal(size=(n_q, d))).astype(np.float32)
    ref = rng.normal(size=(n_q, d)).astype(np.float32)
    out = dejavu(tgt, ref, (pub_t, pub_r), public_labels, truth, k=k, fractions=fractions,
                    num_classes=c, block_size=16)
    for name, emb, pub in (("target", tgt, pub_t), ("reference", ref, pub_r)):
        _, idx = _brute_knn(emb, pub, k, "l2")
        top1, top5, conf = _np_label_inference(public_labels[idx], c)
        # Different histograms can have exactly the same entropy ((4, 3, 3) and (6, 2, 1, 1)
        # of k = 10: 4^4 3^6 = 6^6 2^2); float32 orders such a tie by rounding, so where a
        # tie straddles a fraction's cut the accuracy is checked against every order of it
        # (elsewhere low == high: exact).
        conf = np.round(conf, 9)
        for got, correct in ((out[name]["top1"], top1 == truth),
                             (out[name]["top5"], (top5 == truth[:, None]).any(axis=1))):
            low, high = _np_accuracy_range(conf, correct, fractions)
            assert np.all((low <= got) & (got <= high)), (name, got, low, high)
            np.testing.assert_array_equal(got[low == high], low[low == high])
    np.testing.assert_array_equal(out["gap"]["top1"], out["target"]["top1"]
                                  - out["reference"]["top1"])
    np.testing.assert_array_equal(out["fractions"], fractions)
    assert out["target"]["pred_top5"].shape == (n_q, 5)


def test_dejavu_correlation_detector(rng):
    n_q, n_p, c = 25, 60, 6
    public = rng.normal(size=(n_p, 4)).astype(np.float32)
    public_labels = rng.integers(0, c, size=n_p)
    truth = rng.integers(0, c, size=n_q)
    tgt = rng.normal(size=(n_q, 4)).astype(np.float32)
    probs = rng.dirichlet(np.ones(c), size=n_q)
    out = dejavu(tgt, None, public, public_labels, truth, k=5, reference_probs=probs * 3)
    ent = -(probs * np.log(probs)).sum(axis=1)
    top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    fr = (0.05, 0.2, 1.0)
    np.testing.assert_allclose(out["reference"]["confidence"], -ent, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["reference"]["top1"],
                                  _np_accuracy(-ent, probs.argmax(1) == truth, fr))
    np.testing.assert_array_equal(out["reference"]["top5"],
                                  _np_accuracy(-ent, (top5 == truth[:, None]).any(1), fr))
    want_t = _np_dejavu_model(tgt, public, public_labels, truth, 5, c, fr)
    np.testing.assert_array_equal(out["target"]["top1"], want_t[0])


def test_neighbour_objects_and_sets_match_numpy(rng):
    n_q, n_p, c, k = 20, 40, 9, 6
    public_sets = rng.random((n_p, c)) < 0.3
    idx = rng.integers(0, n_p, size=(n_q, k))
    pred = neighbour_objects(public_sets, idx, top=3)
    for qi in range(n_q):
        counts = public_sets[idx[qi]].sum(0)
        chosen = [o for o in np.argsort(-counts, kind="stable")[:3] if counts[o] > 0]
        np.testing.assert_array_equal(np.flatnonzero(pred[qi]), sorted(chosen))

    tgt, ref, true = (rng.random((n_q, c)) < 0.4 for _ in range(3))
    tgt[0] = False  # empty prediction: precision 0
    true[1] = False  # empty truth: recall 0
    out = dejavu_sets(tgt, ref, true)
    prec, rec = {}, {}
    for name, sets in (("target", tgt), ("reference", ref)):
        prec[name] = np.array([(s & t).sum() / s.sum() if s.sum() else 0.0
                               for s, t in zip(sets, true, strict=True)])
        rec[name] = np.array([(s & t).sum() / t.sum() if t.sum() else 0.0
                              for s, t in zip(sets, true, strict=True)])
        np.testing.assert_allclose(out[name]["precision"], prec[name], rtol=1e-12)
        np.testing.assert_allclose(out[name]["recall"], rec[name], rtol=1e-12)
    for key, m in (("ppg", prec), ("prg", rec)):
        better = np.sum(m["target"] > m["reference"])
        worse = np.sum(m["target"] < m["reference"])
        assert out[key] == pytest.approx((better - worse) / n_q, abs=1e-12)
    assert out["mean_precision_gap"] == pytest.approx(
        np.mean(prec["target"] - prec["reference"]), abs=1e-12)


def test_bad_input(rng):
    q = rng.normal(size=(4, 3)).astype(np.float32)
    p = rng.normal(size=(10, 3)).astype(np.float32)
    bad = q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(InputError, match="queries has NaN"):
        knn(bad, p, 3)
    with pytest.raises(InputError, match="at most the public set size"):
        knn(q, p, 11)
    with pytest.raises(InputError, match="same dimension"):
        knn(q, p[:, :2], 3)
    with pytest.raises(InputError, match="metric"):
        knn(q, p, 3, metric="l1")
    with pytest.raises(InputError, match="block_size"):
        knn(q, p, 3, block_size=0)
    with pytest.raises(InputError, match=r"neighbour_labels: labels must lie in \[0, 3\)"):
        label_inference(np.array([[0, 3]]), 3)
    labels = rng.integers(0, 3, size=10)
    truth = rng.integers(0, 3, size=4)
    with pytest.raises(InputError, match="exactly one of"):
        dejavu(q, None, p, labels, truth, k=3)
    with pytest.raises(InputError, match="reference_probs has 4 classes"):
        dejavu(q, None, p, labels, truth, k=3, num_classes=3,
                  reference_probs=np.full((4, 4), 0.25))
    with pytest.raises(InputError, match="fractions"):
        dejavu(q, q, p, labels, truth, k=3, fractions=(0.0,))
    with pytest.raises(InputError, match="public_labels has 9 labels"):
        dejavu(q, q, p, labels[:9], truth, k=3)
    with pytest.raises(InputError, match="true_labels"):
        dejavu(q, q, p, labels, truth.astype(float), k=3)
    with pytest.raises(InputError, match="bool"):
        dejavu_sets(np.ones((2, 3)), np.ones((2, 3), bool), np.ones((2, 3), bool))
    with pytest.raises(InputError, match="one shape"):
        dejavu_sets(np.ones((2, 3), bool), np.ones((2, 4), bool), np.ones((2, 3), bool))


# --------------------------------------------------------------------------- background crops

def _brute_force_background(boxes, height, width):
    """Largest empty rectangle by checking every rectangle of a pixel occupancy mask."""
    solid = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        solid[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
    # Summed-area table: a rectangle is empty iff its sum of solid pixels is 0.
    table = np.pad(solid.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best = 0
    for top in range(height):
        for bottom in range(top + 1, height + 1):
            for left in range(width):
                for right in range(left + 1, width + 1):
                    filled = (table[bottom, right] - table[top, right] - table[bottom, left]
                              + table[top, left])
                    if filled == 0:
                        best = max(best, (bottom - top) * (right - left))
    return best, solid


@pytest.mark.parametrize("seed", range(12))
def test_background_box_is_the_largest_empty_rectangle(seed):
    from memjax.memorization._dejavu import background_box

    rng = np.random.default_rng(seed)
    height, width = rng.integers(5, 11, size=2)
    boxes = []
    for _ in range(rng.integers(0, 4)):
        x0, y0 = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
        boxes.append((x0, y0, x0 + rng.uniform(0.5, width / 2), y0 + rng.uniform(0.5, height / 2)))
    top, left, h, w = background_box(np.array(boxes).reshape(-1, 4), height, width)
    area, solid = _brute_force_background(boxes, height, width)
    assert h * w == area
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    assert not solid[top:top + h, left:left + w].any()


def test_background_crop_and_bad_boxes():
    import jax.numpy as jnp

    from memjax.augment import resample_box
    from memjax.memorization._dejavu import background_box, background_crop

    image = np.random.default_rng(0).random((8, 10, 3)).astype(np.float32)
    # An object filling the left 6 columns: the background is the right 4 columns.
    assert background_box([0, 0, 6, 8], 8, 10) == (0, 6, 8, 4)
    crop = background_crop(image, [[0, 0, 6, 8]], (4, 4))
    np.testing.assert_allclose(crop, resample_box(jnp.asarray(image), (0, 6, 8, 4), (4, 4)))
    assert background_box(np.zeros((0, 4)), 8, 10) == (0, 0, 8, 10)
    with pytest.raises(InputError, match="no background"):
        background_box([[0, 0, 10, 8]], 8, 10)
    with pytest.raises(InputError, match=r"boxes: expected finite \[K, 4\]"):
        background_box([[0, 0, 1]], 8, 10)
    with pytest.raises(InputError, match="x0 <= x1"):
        background_box([[5, 0, 1, 8]], 8, 10)
    with pytest.raises(InputError, match="height"):
        background_box([], 0, 10)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_knn_queries_sharded_over_8_devices_equal_1(impl):
    """The queries are split over the mesh's data axis (Q = 13: padded to 16 rows); every
    device scans the whole public set, so the neighbours are those of one device."""
    import jax

    from memjax.engine.mesh import make_mesh

    assert len(jax.devices()) == 8
    rng = np.random.default_rng(7)
    queries = rng.normal(size=(13, 6)).astype(np.float32)
    public = rng.normal(size=(50, 6)).astype(np.float32)
    one = make_mesh(devices=jax.devices()[:1])
    for metric in ("l2", "cosine"):
        v8, i8 = knn(queries, public, 5, metric=metric, block_size=16, impl=impl)
        v1, i1 = knn(queries, public, 5, metric=metric, block_size=16, impl=impl, mesh=one)
        np.testing.assert_array_equal(np.asarray(i8), np.asarray(i1))
        np.testing.assert_allclose(np.asarray(v8), np.asarray(v1), rtol=1e-6, atol=1e-6)
        assert v8.shape == (13, 5)
