"""SSLMem, LayerMem and CLIPMem (memjax.memorization._sslmem) vs float64 NumPy references.

Encoders are tiny random MLPs written here (with activation taps); views come from a
keyed shift/flip/crop/brightness ``views_fn`` also written here, evaluated once in JAX and
then fed to the float64 reference, so both sides see the same pixels.

Tolerances: the engine computes in float32. Activations and normalised representations
of O(1) carry ~1e-7 relative rounding, and view distances are O(0.1..1), so per-example
losses and raw scores agree with float64 to 1e-5 (absolute and relative).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.engine import compile_cache_info, make_mesh
from memjax.errors import InputError
from memjax.memorization import clipmem, layermem, sslmem
from memjax.models import Model
from memjax.models.protocol import ApplyForward
from memjax.models.taps import tap, with_taps

H, W, C = 6, 6, 2
VIEW = (4, 4, C)
D_VIEW = 4 * 4 * C
TOL = {"rtol": 1e-5, "atol": 1e-5}
# Two float32 evaluations of the same formula: raw scores are differences of O(1) losses,
# so they agree to a few float32 ulps of 1 (2^-23 = 1.2e-7) in absolute terms.
ULP_TOL = {"rtol": 0, "atol": 1e-6}
SEED = 0  # the methods' default view seed


def _bits(key):
    """32 random bits of a view's key (cheap hashing of them below, not more threefry)."""
    return jax.random.bits(key, dtype=jnp.uint32)


def views_fn(image, key):
    """Keyed augmentation: 4x4 crop, horizontal flip and brightness in [0.7, 1.3)."""
    h = _bits(key)
    i, j = ((h >> 3) % 3).astype(jnp.int32), ((h >> 7) % 3).astype(jnp.int32)
    view = jax.lax.dynamic_slice(image, (i, j, jnp.int32(0)), VIEW)
    view = jnp.where((h >> 11) & 1, view[:, ::-1], view)
    return view * (0.7 + 0.6 * ((h >> 13) % 1024).astype(jnp.float32) / 1024)


def same_size_views(image, key):
    """Keyed roll by -2..2 rows + flip (views the size of the image, for pairing='clean')."""
    h = _bits(key)
    view = jnp.roll(image, (h % 5).astype(jnp.int32) - 2, axis=0)
    return jnp.where((h >> 11) & 1, view[:, ::-1], view)


def mlp_call(params, image, taps=None):
    x = image.reshape(-1)
    h1 = tap(taps, "hidden1", jnp.tanh(x @ params["w1"] + params["b1"]))
    h2 = tap(taps, "hidden2", jnp.tanh(h1 @ params["w2"] + params["b2"]))
    return tap(taps, "out", h2 @ params["w3"])


def mlp(params, image):
    """{layer: activation} of one image, from one pass through the taps."""
    return with_taps(mlp_call, ["*"], params, image)[1]


def mlp_rep(params, image):
    return mlp_call(params, image)


def other_mlp(params, image):
    """A different apply function (same formula): f and g then run separately."""
    return mlp(params, image)


def init_mlp(rng, d_in, hidden=(7, 5), d_out=3):
    return {"w1": rng.normal(size=(d_in, hidden[0])).astype(np.float32) / np.sqrt(d_in),
            "b1": rng.normal(size=hidden[0]).astype(np.float32) * 0.1,
            "w2": rng.normal(size=hidden).astype(np.float32) / np.sqrt(hidden[0]),
            "b2": rng.normal(size=hidden[1]).astype(np.float32) * 0.1,
            "w3": rng.normal(size=(hidden[1], d_out)).astype(np.float32)}


def np_mlp(params, view):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h1 = np.tanh(view.reshape(-1) @ p["w1"] + p["b1"])
    h2 = np.tanh(h1 @ p["w2"] + p["b2"])
    return {"hidden1": h1, "hidden2": h2, "out": h2 @ p["w3"]}


@functools.cache
def _batched_views(fn, n):
    def one(image, example_id):
        # The documented key of view k of example i: fold_in(fold_in(key(seed), i), k).
        base = jax.random.fold_in(jax.random.key(SEED), example_id)
        return jnp.stack([fn(image, jax.random.fold_in(base, k)) for k in range(n)])
    return jax.jit(jax.vmap(one))


def np_views(fn, images, ids, n):
    """[N, n, h, w, C] float64 views of every image (ids key them), computed by JAX once."""
    views = _batched_views(fn, n)(jnp.asarray(images), jnp.asarray(ids, jnp.int32))
    return np.asarray(views, np.float64)


def M(apply, params):
    """A memjax.Model of a test encoder; (image encoder, text encoder) make a CLIP."""
    if isinstance(apply, tuple):
        image_enc, text_enc = apply
        return Model.from_apply(
            lambda p, x: {"image": image_enc(p, x["image"]), "text": text_enc(p, x["text"])},
            params, inputs=("image", "text"), kind="clip",
            towers=(("image", ApplyForward(image_enc), ("image",)),
                    ("text", ApplyForward(text_enc), ("text",))))
    return Model.from_apply(apply, params)


def np_losses(params, images, ids, n_aug, layers, distance="l2", pairing="views",
              fn=views_fn):
    """[N, L] float64 alignment losses, written from the paper's formula."""
    out = np.zeros((len(images), len(layers)))
    all_views = np_views(fn, images, ids, 2 * n_aug if pairing == "views" else n_aug)
    for n, (image, v) in enumerate(zip(images, all_views, strict=True)):
        if pairing == "views":
            pairs = [(v[2 * k], v[2 * k + 1]) for k in range(n_aug)]
        else:
            pairs = [(np.asarray(image, np.float64), v[k]) for k in range(n_aug)]
        for li, layer in enumerate(layers):
            dists = []
            for a, b in pairs:
                ra, rb = np_mlp(params, a)[layer], np_mlp(params, b)[layer]
                d = ra / np.linalg.norm(ra) - rb / np.linalg.norm(rb)
                dists.append(np.sqrt(d @ d) if distance == "l2" else d @ d)
            out[n, li] = np.mean(dists)
    return out


def data(rng, n=12):
    images = rng.normal(size=(n, H, W, C)).astype(np.float32)
    ids = rng.choice(10_000, size=n, replace=False).astype(np.int64)
    return {"image": images, "id": ids}


def models(rng, d_in=D_VIEW):
    return init_mlp(rng, d_in), init_mlp(rng, d_in)


@pytest.mark.parametrize("distance", ["l2", "sq_l2"])
def test_sslmem_matches_numpy(distance, rng):
    src = data(rng)
    pf, pg = models(rng)
    out = sslmem(M(mlp, pf), M(mlp, pg), src, views_fn=views_fn, n_aug=3, layer="out",
                    batch_size=8, distance=distance, progress=False)
    lf = np_losses(pf, src["image"], src["id"], 3, ["out"], distance)[:, 0]
    lg = np_losses(pg, src["image"], src["id"], 3, ["out"], distance)[:, 0]
    np.testing.assert_array_equal(out["id"], src["id"])
    np.testing.assert_allclose(out["loss_f"], lf, **TOL)
    np.testing.assert_allclose(out["loss_g"], lg, **TOL)
    np.testing.assert_allclose(out["raw"], lg - lf, **TOL)
    raw = out["raw"]
    np.testing.assert_allclose(out["normalized"], raw / (raw.max() - raw.min()), rtol=1e-12)
    # A bare-array encoder gives the same scores as the "out" tap, up to a few float32 ulps
    # of the O(1) losses (XLA fuses the two programs differently): ULP_TOL.
    bare = sslmem(M(mlp_rep, pf), M(mlp_rep, pg), src, views_fn=views_fn, n_aug=3,
                     batch_size=8, distance=distance, progress=False)
    np.testing.assert_allclose(bare["raw"], out["raw"], **ULP_TOL)


def test_sslmem_clean_pairing_matches_numpy(rng):
    src = data(rng, n=9)
    pf, pg = models(rng, d_in=H * W * C)
    out = sslmem(M(other_mlp, pf), M(mlp, pg), src, views_fn=same_size_views, n_aug=4,
                    layer="hidden2", pairing="clean", batch_size=8, progress=False)
    lf = np_losses(pf, src["image"], src["id"], 4, ["hidden2"], pairing="clean",
                   fn=same_size_views)[:, 0]
    lg = np_losses(pg, src["image"], src["id"], 4, ["hidden2"], pairing="clean",
                   fn=same_size_views)[:, 0]
    np.testing.assert_allclose(out["raw"], lg - lf, **TOL)


def test_layermem_matches_numpy(rng):
    src = data(rng)
    pf, pg = models(rng)
    out = layermem(M(mlp, pf), M(mlp, pg), src, views_fn=views_fn, n_aug=2,
                      layers=["hidden*", "out"], batch_size=8, progress=False)
    layers = ["hidden1", "hidden2", "out"]
    assert out["layers"] == tuple(layers)
    raw = (np_losses(pg, src["image"], src["id"], 2, layers)
           - np_losses(pf, src["image"], src["id"], 2, layers))
    np.testing.assert_allclose(out["raw"], raw, **TOL)
    norm = out["raw"] / (out["raw"].max(0) - out["raw"].min(0))
    np.testing.assert_allclose(out["normalized"], norm, rtol=1e-12)
    np.testing.assert_allclose(out["delta"][:, 0], norm[:, 0], rtol=1e-12)
    np.testing.assert_allclose(out["delta"][:, 1:], norm[:, 1:] - norm[:, :-1], rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(out["delta_raw"][:, 2], out["raw"][:, 2] - out["raw"][:, 1],
                               rtol=1e-12, atol=1e-15)


def test_stacked_equals_separate_and_devices(rng):
    src = data(rng, n=10)
    pf, pg = models(rng)
    kw = dict(views_fn=views_fn, n_aug=2, layers=["hidden1", "out"], progress=False)
    stacked = layermem(M(mlp, pf), M(mlp, pg), src, stack=True, batch_size=8, **kw)
    separate = layermem(M(mlp, pf), M(mlp, pg), src, stack=False, batch_size=8, **kw)
    one = layermem(M(mlp, pf), M(mlp, pg), src, batch_size=8,
                      mesh=make_mesh(devices=jax.devices()[:1]), **kw)
    assert len(jax.devices()) == 8
    for field in ("loss_f", "loss_g", "raw"):
        # Stacking only adds a vmapped model axis: the same float32 ops, bit for bit on CPU.
        np.testing.assert_array_equal(stacked[field], separate[field])
        # 1 vs 8 devices: per-device batch 8 vs 1 changes XLA's matmul blocking, so O(1)
        # losses (and their differences) may move by a few float32 ulps (~2.4e-7 seen).
        np.testing.assert_allclose(stacked[field], one[field], **ULP_TOL)


def test_views_keyed_by_id_not_position(rng):
    src = data(rng, n=8)
    pf, pg = models(rng)
    flipped = {k: v[::-1].copy() for k, v in src.items()}
    kw = dict(views_fn=views_fn, n_aug=2, layer="out", batch_size=8, progress=False)
    a = sslmem(M(mlp, pf), M(mlp, pg), src, **kw)
    before = compile_cache_info()["compiles"]
    b = sslmem(M(mlp, pf), M(mlp, pg), flipped, **kw)
    assert compile_cache_info()["compiles"] == before  # same config: executable reused
    np.testing.assert_array_equal(b["id"], src["id"][::-1])
    # Same views per id; only the example's batch row/device moves: ULP_TOL.
    np.testing.assert_allclose(b["raw"][::-1], a["raw"], **ULP_TOL)


def test_clipmem_matches_numpy(rng):
    n, t, vocab, d = 10, 5, 11, 4
    src = {"image": rng.normal(size=(n, H, W, C)).astype(np.float32),
           "text": rng.integers(0, vocab, size=(n, t))}

    def image_enc(p, view):
        return jnp.tanh(view.reshape(-1) @ p["wi"])

    def text_enc(p, tokens):
        return jnp.mean(p["emb"][tokens], axis=0) @ p["wt"]

    enc = (image_enc, text_enc)

    def init():
        return {"wi": rng.normal(size=(int(np.prod(VIEW)), d)).astype(np.float32) / 6,
                "emb": rng.normal(size=(vocab, 6)).astype(np.float32),
                "wt": rng.normal(size=(6, d)).astype(np.float32)}

    pf, pg = init(), init()
    out = clipmem(M(enc, pf), M(enc, pg), src, views_fn=views_fn, n_aug=3, batch_size=8,
                     progress=False)

    def np_align(p):
        p = {k: np.asarray(v, np.float64) for k, v in p.items()}
        res = []
        all_views = np_views(views_fn, src["image"], np.arange(n), 3)  # ids = indices here
        for i, views in enumerate(all_views):
            txt = p["emb"][src["text"][i]].mean(0) @ p["wt"]
            cos = [np.tanh(v.reshape(-1) @ p["wi"]) @ txt
                   / np.linalg.norm(np.tanh(v.reshape(-1) @ p["wi"])) / np.linalg.norm(txt)
                   for v in views]
            res.append(np.mean(cos))
        return np.array(res)

    af, ag = np_align(pf), np_align(pg)
    np.testing.assert_allclose(out["align_f"], af, **TOL)
    np.testing.assert_allclose(out["raw"], af - ag, **TOL)
    raw = out["raw"]
    np.testing.assert_allclose(out["normalized"], raw / (raw.max() - raw.min()), rtol=1e-12)

    def neg_sq(img, txt):
        return -jnp.sum(jnp.square(img - txt))

    custom = clipmem(M(enc, pf), M(enc, pg), src, views_fn=views_fn, n_aug=1, alignment=neg_sq,
                        batch_size=8, progress=False)
    p = {k: np.asarray(v, np.float64) for k, v in pf.items()}
    v0 = np_views(views_fn, src["image"], np.arange(n), 1)[3, 0]
    txt = p["emb"][src["text"][3]].mean(0) @ p["wt"]
    want = -np.sum((np.tanh(v0.reshape(-1) @ p["wi"]) - txt) ** 2)
    np.testing.assert_allclose(custom["align_f"][3], want, **TOL)


def test_bad_input(rng):
    src = data(rng, n=8)
    pf, pg = models(rng)
    kw = dict(views_fn=views_fn, batch_size=8, progress=False)
    with pytest.raises(InputError, match="available: hidden1, hidden2, out"):
        layermem(M(mlp, pf), M(mlp, pg), src, n_aug=2, layers=["hidden1", "conv9"], **kw)
    with pytest.raises(InputError, match="available: hidden1, hidden2, out"):
        sslmem(M(mlp, pf), M(mlp, pg), src, n_aug=2, layer="nope", **kw)
    def unsorted(params, image):  # call order zeta, alpha: not the sorted pytree order
        return {"zeta": mlp(params, image)["hidden1"], "alpha": mlp(params, image)["out"]}

    with pytest.raises(InputError, match="available: zeta, alpha$"):
        layermem(M(unsorted, pf), M(unsorted, pg), src, n_aug=1, layers=["beta"], **kw)
    with pytest.raises(InputError, match=r"matches 2 activations \['hidden1', 'hidden2'\]"):
        sslmem(M(mlp, pf), M(mlp, pg), src, n_aug=2, layer="hidden*", **kw)
    with pytest.raises(InputError, match="n_aug"):
        sslmem(M(mlp, pf), M(mlp, pg), src, n_aug=0, layer="out", **kw)
    with pytest.raises(InputError, match="pass layer="):
        sslmem(M(mlp, pf), M(mlp, pg), src, n_aug=1, **kw)
    wide = init_mlp(rng, D_VIEW, hidden=(9, 5))
    mismatch = r"stack=True.*\['b1'\] is \(7,\) float32 in params_f but \(9,\)"
    with pytest.raises(InputError, match=mismatch):
        layermem(M(mlp, pf), M(mlp, wide), src, n_aug=1, layers=["out"], stack=True, **kw)
    with pytest.raises(InputError, match="stack=True.*different apply functions"):
        layermem(M(mlp, pf), M(other_mlp, pg), src, n_aug=1, layers=["out"], stack=True, **kw)
    with pytest.raises(InputError, match="no field 'pixels'"):
        sslmem(M(mlp, pf), M(mlp, pg), src, n_aug=1, layer="out", image_field="pixels", **kw)
    with pytest.raises(InputError, match="pairing='clean'"):
        sslmem(M(mlp, pf), M(mlp, pg), src, n_aug=1, layer="out", pairing="clean", **kw)
    with pytest.raises(InputError, match="no 'image' tower"):
        clipmem(M(mlp, pf), M(mlp, pg), src, n_aug=1, **kw)
    with pytest.raises(InputError, match="distance"):
        sslmem(M(mlp, pf), M(mlp, pg), src, n_aug=1, layer="out", distance="cos", **kw)
