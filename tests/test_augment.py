"""SimCLR augmentations: identity-keyed views, exact invariances, torchvision semantics."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from memjax import augment as A
from memjax.errors import InputError

SEED, N_AUG, SIZE = 3, 3, 10


def _images(n=7, h=12, w=12, c=3, seed=0):
    return np.random.default_rng(seed).random((n, h, w, c)).astype(np.float32)


# jit at the test edge: one compile per shape, instead of op-by-op eager vmaps.
_views = jax.jit(lambda x, ids: A.simclr_views(x, ids, N_AUG, seed=SEED, size=SIZE))


def test_views_do_not_depend_on_batch_composition():
    images, ids = _images(), np.arange(100, 107, dtype=np.int32)
    batch = np.asarray(_views(images, ids))
    assert batch.shape == (7, N_AUG, SIZE, SIZE, 3)
    alone = np.asarray(_views(images[4:5], ids[4:5]))
    np.testing.assert_array_equal(alone[0], batch[4])
    perm = np.random.default_rng(1).permutation(7)
    shuffled = np.asarray(_views(images[perm], ids[perm]))
    np.testing.assert_array_equal(shuffled, batch[perm])
    # Views differ across augmentation ids and across example ids.
    assert not np.array_equal(batch[0, 0], batch[0, 1])
    assert not np.array_equal(np.asarray(_views(images[:1], ids[1:2])), batch[:1])


def test_views_equal_on_8_devices_and_1():
    assert jax.device_count() == 8
    images, ids = _images(8, seed=2), np.arange(8, dtype=np.int32)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    on8 = jax.jit(lambda x, i: A.simclr_views(x, i, N_AUG, seed=SEED, size=SIZE),
                  in_shardings=(sharded, sharded))(images, ids)
    assert len(on8.sharding.device_set) == 8
    one = jax.devices()[0]
    on1 = jax.jit(lambda x, i: A.simclr_views(x, i, N_AUG, seed=SEED, size=SIZE))(
        jax.device_put(images, one), jax.device_put(ids, one))
    np.testing.assert_array_equal(np.asarray(on8), np.asarray(on1))


def test_values_stay_in_unit_interval():
    views = np.asarray(_views(_images(seed=5), np.arange(7, dtype=np.int32)))
    assert views.min() >= 0.0 and views.max() <= 1.0


def test_flip_is_mirror_when_chosen():
    image = jnp.asarray(_images(1)[0])
    flipped, kept = 0, 0
    for k in range(12):
        key = jax.random.key(k)
        out = np.asarray(A.horizontal_flip(key, image))
        if bool(jax.random.bernoulli(key, 0.5)):
            np.testing.assert_array_equal(out, np.asarray(image)[:, ::-1])
            flipped += 1
        else:
            np.testing.assert_array_equal(out, np.asarray(image))
            kept += 1
    assert flipped and kept
    np.testing.assert_array_equal(np.asarray(A.horizontal_flip(jax.random.key(0), image, p=1.0)),
                                  np.asarray(image)[:, ::-1])


def test_full_square_crop_is_resize():
    image = jnp.asarray(_images(1, 9, 9)[0])
    crop = jax.jit(lambda k, x: A.random_resized_crop(k, x, scale=(1, 1), ratio=(1, 1)))
    np.testing.assert_allclose(np.asarray(crop(jax.random.key(4), image)), np.asarray(image),
                               atol=1e-6, rtol=0)
    crop6 = A.random_resized_crop(jax.random.key(5), image, size=6, scale=(1, 1), ratio=(1, 1))
    np.testing.assert_allclose(np.asarray(crop6), np.asarray(A.resize(image, 6)), atol=1e-6,
                               rtol=0)


def test_resize_matches_float64_bilinear():
    image = _images(1, 5, 7)[0].astype(np.float64)

    def ref(img, h, w):  # half-pixel centres, clamped (torch align_corners=False)
        H, W = img.shape[:2]

        def taps(n_out, n_in):
            src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
            lo = np.floor(src).astype(int)
            return lo, np.minimum(lo + 1, n_in - 1), src - lo

        y0, y1, fy = taps(h, H)
        x0, x1, fx = taps(w, W)
        rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
        return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]

    for h, w in ((11, 3), (5, 7), (2, 13)):
        np.testing.assert_allclose(np.asarray(A.resize(jnp.asarray(image, jnp.float32), (h, w))),
                                   ref(image, h, w), atol=1e-6, rtol=0)


def test_center_crop():
    image = _images(1, 9, 8)[0]
    np.testing.assert_array_equal(np.asarray(A.center_crop(image, (5, 4))), image[2:7, 2:6])
    with pytest.raises(InputError, match="larger"):
        A.center_crop(image, 10)


def test_crop_box_inside_image_and_respects_scale():
    for k in range(20):
        top, left, h, w = (float(v) for v in A._crop_box(jax.random.key(k), 12, 16,
                                                          (0.08, 1.0), (3 / 4, 4 / 3)))
        assert 0 <= top and top + h <= 12 and 0 <= left and left + w <= 16
        assert h >= 1 and w >= 1


def test_color_jitter_zero_strength_is_identity():
    for c in (1, 3):
        image = jnp.asarray(_images(1, c=c)[0])
        out = A.color_jitter(jax.random.key(0), image, 0, 0, 0, 0, p=1.0)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(image))


def test_color_jitter_ops_match_torchvision_formulas():
    image = _images(1, 4, 5)[0].astype(np.float64)
    gray = image @ np.array([0.299, 0.587, 0.114])
    x = jnp.asarray(image, jnp.float32)
    np.testing.assert_allclose(np.asarray(A.adjust_brightness(x, 1.3)),
                               np.clip(image * 1.3, 0, 1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(A.adjust_contrast(x, 0.7)),
                               np.clip(0.7 * image + 0.3 * gray.mean(), 0, 1), atol=1e-6)
    np.testing.assert_allclose(np.asarray(A.adjust_saturation(x, 1.4)),
                               np.clip(1.4 * image - 0.4 * gray[..., None], 0, 1), atol=1e-6)
    shift = 0.08
    ref = np.empty_like(image)
    for idx in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*image[idx])
        ref[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    np.testing.assert_allclose(np.asarray(A.adjust_hue(x, shift)), ref, atol=1e-5)


def test_color_jitter_skips_saturation_and_hue_on_grayscale():
    image = jnp.asarray(_images(1, c=1)[0])
    out = A.color_jitter(jax.random.key(1), image, 0, 0, saturation=0.9, hue=0.4, p=1.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image))


def test_grayscale_uses_bt601_luma():
    image = _images(1)[0]
    out = np.asarray(A.random_grayscale(jax.random.key(0), jnp.asarray(image), p=1.0))
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert out.shape == image.shape
    for c in range(3):
        np.testing.assert_allclose(out[..., c], luma, atol=1e-6)
    same = A.random_grayscale(jax.random.key(0), jnp.asarray(image), p=0.0)
    np.testing.assert_array_equal(np.asarray(same), image)


def test_hsv_round_trip_and_reference():
    rng = np.random.default_rng(7)
    rgb = rng.random((64, 3)).astype(np.float32)
    rgb[:4] = [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0]]  # gray and pure pixels
    hsv = np.asarray(A.rgb_to_hsv(jnp.asarray(rgb)))
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in rgb.astype(np.float64)])
    np.testing.assert_allclose(hsv, ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(A.hsv_to_rgb(jnp.asarray(hsv))), rgb, atol=1e-5)


def test_view_key_traced_equals_eager():
    eager = jax.random.key_data(A.view_key(0, 5, 2))
    traced = jax.jit(lambda i, k: jax.random.key_data(A.view_key(0, i, k)))(5, 2)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(traced))


def test_bad_input():
    images, ids = _images(2), np.arange(2)
    with pytest.raises(InputError, match="n_aug"):
        A.simclr_views(images, ids, 0, seed=0)
    with pytest.raises(InputError, match="image shape"):
        A.simclr_view(jax.random.key(0), images)
    with pytest.raises(InputError, match="image shape"):
        A.random_resized_crop(jax.random.key(0), images[0, :, :, 0])
    with pytest.raises(InputError, match="size"):
        A.simclr_view(jax.random.key(0), images[0], size=0)
    with pytest.raises(InputError, match="size"):
        A.simclr_views(images, ids, 2, seed=0, size=(4, -1))
    with pytest.raises(InputError, match="ids"):
        A.simclr_views(images, ids[:1], 2, seed=0)
    with pytest.raises(InputError, match="scale"):
        A.random_resized_crop(jax.random.key(0), images[0], scale=(0.5, 0.1))
