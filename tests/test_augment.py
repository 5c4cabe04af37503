"""fnn.augment against NumPy: the same draws repeated from the same key (as each docstring
states them), the transform recomputed in float64 NumPy; jit equals eager; shapes and dtypes
kept; bad input refused."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import augment as A
from fnn import losses

K = jax.random.PRNGKey(3)


def images(shape=(5, 6, 7, 2), seed=0, dtype=np.float64):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape).astype(dtype))


LABELS = jnp.arange(5) % 3


def test_random_crop_matches_numpy_window():
    x = images()
    out, y = A.random_crop(2)(K, x, LABELS)
    offsets = np.asarray(jax.random.randint(K, (5, 2), 0, 5))
    xp = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
    ref = np.stack([xp[i, r:r + 6, c:c + 7] for i, (r, c) in enumerate(offsets)])
    chex.assert_trees_all_close((out, y), (ref, LABELS))
    assert len({tuple(o) for o in offsets}) > 1              # per-example offsets


def test_random_flip_matches_numpy():
    x = images()
    out, _ = A.random_flip(0.5)(K, x, LABELS)
    flip = np.asarray(jax.random.bernoulli(K, 0.5, (5,)))
    assert 0 < flip.sum() < 5
    ref = np.stack([xi[:, ::-1] if f else xi for xi, f in zip(np.asarray(x), flip)])
    np.testing.assert_array_equal(out, ref)


def np_bilinear(img, rows, cols):
    """Zero-padded bilinear sampling of ``img: [H, W, C]`` at float points, from the formula."""
    h, w, _ = img.shape
    out = np.zeros(rows.shape + img.shape[-1:])
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    for dr in (0, 1):
        for dc in (0, 1):
            r, c = r0 + dr, c0 + dc
            wgt = (1 - np.abs(rows - r)) * (1 - np.abs(cols - c))
            ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            out += np.where(ok[..., None], img[np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)], 0) \
                * wgt[..., None]
    return out


def test_random_affine_matches_numpy_bilinear():
    x = images()
    out, _ = A.random_affine(15.0, 1.5)(K, x, LABELS)
    k1, k2 = jax.random.split(K)
    deg = np.asarray(jax.random.uniform(k1, (5,), jnp.float64, -15.0, 15.0))
    sh = np.asarray(jax.random.uniform(k2, (5, 2), jnp.float64, -1.5, 1.5))
    r, c = np.meshgrid(np.arange(6.0), np.arange(7.0), indexing="ij")
    ref = []
    for img, d, s in zip(np.asarray(x), deg, sh):
        t = np.deg2rad(d)
        dr, dc = r - 2.5 - s[0], c - 3.0 - s[1]
        ref.append(np_bilinear(img, np.cos(t) * dr - np.sin(t) * dc + 2.5,
                               np.sin(t) * dr + np.cos(t) * dc + 3.0))
    np.testing.assert_allclose(out, np.stack(ref), atol=1e-12)


def test_whole_pixel_translation_and_quarter_turn_are_exact():
    x = images((2, 5, 5, 1))
    shifted = A._warp(x, jnp.zeros(2), jnp.asarray([[1.0, -2.0], [0.0, 0.0]]))
    ref = np.zeros((5, 5))
    ref[1:, :3] = np.asarray(x)[0, :4, 2:, 0]                  # down 1 row, left 2 columns
    np.testing.assert_allclose(shifted[0, :, :, 0], ref, atol=1e-12)
    np.testing.assert_allclose(shifted[1], x[1], atol=1e-12)
    turned = A._warp(x, jnp.full(2, np.pi / 2), jnp.zeros((2, 2)))
    np.testing.assert_allclose(turned, np.rot90(np.asarray(x), -1, axes=(1, 2)), atol=1e-12)


def test_gaussian_noise_statistics_and_draws():
    x = images((4, 16, 16, 3))
    out, _ = A.gaussian_noise(0.1)(K, x, LABELS[:4])
    eps = (np.asarray(out) - np.asarray(x)) / 0.1
    np.testing.assert_allclose(eps, np.asarray(jax.random.normal(K, x.shape)), atol=1e-12)
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1
    assert A.gaussian_noise(0.1)(K, jnp.ones((3, 2)), None)[0].shape == (3, 2)   # any rank


def test_cutout_matches_numpy_mask():
    x = images((6, 7, 7, 2))
    out, _ = A.cutout(3)(K, x, None)
    centres = np.asarray(jax.random.randint(K, (6, 2), 0, jnp.asarray([[7, 7]])))
    ref = np.asarray(x).copy()
    for i, (cr, cc) in enumerate(centres):
        ref[i, max(cr - 1, 0):max(cr + 2, 0), max(cc - 1, 0):max(cc + 2, 0)] = 0
    np.testing.assert_array_equal(out, ref)


def test_mixup_mixes_inputs_and_labels():
    x = images((5, 4))
    out, y = A.mixup(0.4, num_classes=3)(K, x, LABELS)
    k1, k2 = jax.random.split(K)
    lam = np.asarray(jax.random.beta(k1, 0.4, 0.4, (5,), jnp.float64))
    perm = np.asarray(jax.random.permutation(k2, 5))
    onehot = np.eye(3)[np.asarray(LABELS)]
    ref_x = lam[:, None] * np.asarray(x) + (1 - lam[:, None]) * np.asarray(x)[perm]
    ref_y = lam[:, None] * onehot + (1 - lam[:, None]) * onehot[perm]
    chex.assert_trees_all_close((out, y), (ref_x, ref_y), atol=1e-12)
    np.testing.assert_allclose(np.sum(y, axis=1), 1.0, atol=1e-12)
    assert y.dtype == x.dtype
    # the soft-label cross-entropy of the mixed target is the λ-mix of the two plain losses
    z = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)))
    per = lambda t: losses.softmax_cross_entropy(z, jnp.asarray(t), reduction="none")
    np.testing.assert_allclose(per(y), lam * per(onehot) + (1 - lam) * per(onehot[perm]),
                               rtol=1e-12)


def test_compose_uses_split_keys_in_order():
    x = images()
    aug = A.compose(A.random_crop(1), A.random_flip(), A.gaussian_noise(0.01))
    k = jax.random.split(K, 3)
    ref, _ = A.random_crop(1)(k[0], x, LABELS)
    ref, _ = A.random_flip()(k[1], ref, LABELS)
    ref, _ = A.gaussian_noise(0.01)(k[2], ref, LABELS)
    chex.assert_trees_all_close(aug(K, x, LABELS), (ref, LABELS))


AUGS = [A.random_crop(1), A.random_flip(), A.random_rotation(10.0), A.random_translation(1.0),
        A.gaussian_noise(0.1), A.cutout(2), A.mixup(0.2, num_classes=3)]


@pytest.mark.parametrize("aug", AUGS, ids=lambda a: a.__name__)
def test_jit_equals_eager_and_keeps_shape_and_dtype(aug):
    x = images(dtype=np.float32)
    eager = aug(K, x, LABELS)
    jitted = jax.jit(aug)(K, x, LABELS)
    chex.assert_trees_all_close(eager, jitted, atol=1e-6)
    assert eager[0].shape == x.shape and eager[0].dtype == jnp.float32


@pytest.mark.parametrize("aug", AUGS[:4] + AUGS[5:6], ids=lambda a: a.__name__)
def test_image_augmentations_refuse_wrong_rank(aug):
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, height, width, "
                                         r"channels\), got shape \(5, 6, 7\)"):
        aug(K, jnp.ones((5, 6, 7)), LABELS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mixup: integer labels need num_classes="):
        A.mixup(0.2)(K, jnp.ones((5, 2)), LABELS)
    with pytest.raises(ValueError, match=r"mixup: expected labels with the batch size 5 first"):
        A.mixup(0.2, num_classes=3)(K, jnp.ones((5, 2)), jnp.arange(4))
    with pytest.raises(TypeError, match="random_affine: expected floating-point input"):
        A.random_rotation(5.0)(K, jnp.ones((1, 3, 3, 1), jnp.uint8), None)
    with pytest.raises(ValueError, match="random_crop: padding must be a non-negative int"):
        A.random_crop(-1)
    with pytest.raises(ValueError, match="gaussian_noise: std must be a finite number >= 0"):
        A.gaussian_noise(float("nan"))
    with pytest.raises(ValueError, match="mixup: alpha must be a finite number > 0"):
        A.mixup(0.0)
    with pytest.raises(ValueError, match="compose: expected one or more augmentations"):
        A.compose()
