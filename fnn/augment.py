"""Data augmentation: jittable, keyed transforms of a batch, ``aug(key, x, y) -> (x, y)``.

Every augmentation here is built by a snake_case factory and is a pure function of a
``jax.random`` key and one batch, with static shapes, so it runs inside a compiled training
step (``fit(..., augment=aug)``) and under ``jax.jit``/``vmap`` alike. Randomness is per
example: each image gets its own crop offset, flip, angle, noise, hole and mixing partner.
Each docstring states the exact draws, so that a test can repeat them from the same key.

Image augmentations take ``x: [batch, height, width, channels]`` (channels last, as
``fnn.layers.Conv``) and leave ``y`` alone; :func:`gaussian_noise` and :func:`mixup` take any
``x: [batch, ...]``. Shapes and dtypes are preserved (:func:`mixup` turns integer labels into
soft targets, see there). :func:`compose` chains augmentations with independent keys.

Which ones help is a property of the data, not of the code: :func:`random_flip` mirrors
images left–right, right for photographs of objects and *wrong for digits and text* (a
mirrored 2, 3, 4, 5, 7 or 9 is not that digit); small translations and rotations
(:func:`random_translation`, :func:`random_rotation`, :func:`random_crop`) suit digits.

>>> aug = compose(random_crop(1), gaussian_noise(0.05))        # + random_rotation(10.0), ...
>>> x, y = jnp.ones((4, 8, 8, 1)), jnp.arange(4)
>>> x_aug, y_aug = jax.jit(aug)(jax.random.PRNGKey(0), x, y)
>>> x_aug.shape, bool((y_aug == y).all()), bool((x_aug != x).any())
((4, 8, 8, 1), True, True)
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["random_crop", "random_flip", "random_translation", "random_rotation",
           "random_affine", "gaussian_noise", "cutout", "mixup", "compose"]

Augmentation = Callable  # (key, x, y) -> (x, y)


def _named(fn, name):
    fn.__name__ = fn.__qualname__ = name
    return fn


def _images(name, x):
    if not hasattr(x, "shape") or x.ndim != 4:
        raise ValueError(f"{name}: expected images of shape (batch, height, width, channels), "
                         f"got shape {getattr(x, 'shape', type(x).__name__)}")


def _batch(name, x):
    if not hasattr(x, "shape") or x.ndim < 1:
        raise ValueError(f"{name}: expected an array of shape (batch, ...), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")


def _floating(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected floating-point input, got dtype {x.dtype}")


def _per_example(v, x):
    """``v: [batch]`` reshaped to broadcast against ``x: [batch, ...]`` (explicit ranks)."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _non_negative_int(name, what, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{name}: {what} must be a non-negative int, got {v!r}")
    return v


def _non_negative(name, what, v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}: {what} must be a finite number >= 0, got {v!r}")
    return float(v)


# --------------------------------------------------------------------------- crop and flip

def random_crop(padding: int) -> Augmentation:
    """Zero-pad each image by ``padding`` pixels on every side, then cut an ``H×W`` window at
    a random offset: a translation by up to ``±padding`` whole pixels with zeros filled in.

    Draws ``offsets = jax.random.randint(key, (batch, 2), 0, 2 * padding + 1)`` (row, column
    of the window's top-left corner in the padded image). ``[b, H, W, C] → [b, H, W, C]``.
    """
    padding = _non_negative_int("random_crop", "padding", padding)

    def aug(key, x, y):
        _images("random_crop", x)
        b, h, w, c = x.shape
        offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)
        xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
        return jax.vmap(crop)(xp, offsets), y
    return _named(aug, f"random_crop({padding})")


def random_flip(p: float = 0.5) -> Augmentation:
    """Mirror each image left–right with probability ``p`` (the width axis, axis 2).

    Draws ``flip = jax.random.bernoulli(key, p, (batch,))``. Not for digits or text: a
    mirrored digit is usually another glyph or none. ``[b, H, W, C] → [b, H, W, C]``.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"random_flip: p must lie in [0, 1], got {p!r}")

    def aug(key, x, y):
        _images("random_flip", x)
        flip = jax.random.bernoulli(key, p, (x.shape[0],))
        return jnp.where(_per_example(flip, x), x[:, :, ::-1, :], x), y
    return _named(aug, f"random_flip({p})")


# --------------------------------------------------------------------------- affine warps

def _bilinear(img, rows, cols):
    """``img: [H, W, C]`` sampled at the float points ``rows, cols: [H, W]`` (zeros outside)."""
    coords = [rows, cols]
    per_channel = lambda ch: jax.scipy.ndimage.map_coordinates(ch, coords, order=1,
                                                               mode="constant", cval=0.0)
    return jax.vmap(per_channel, in_axes=2, out_axes=2)(img)


def _warp(x, angles, shifts):
    """Each image rotated by ``angles: [b]`` (radians) about its centre and shifted by
    ``shifts: [b, 2]`` (rows, cols): output pixel ``p = (row, col)`` samples the input at
    ``c + R(θ)·(p - c - s)``, ``R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]]``,
    ``c = ((H-1)/2, (W-1)/2)``."""
    b, h, w, _ = x.shape
    r, q = jnp.meshgrid(jnp.arange(h, dtype=x.dtype), jnp.arange(w, dtype=x.dtype),
                        indexing="ij")                                  # (H, W) each

    def one(img, theta, s):
        dr, dc = r - (h - 1) / 2 - s[0], q - (w - 1) / 2 - s[1]
        cos, sin = jnp.cos(theta), jnp.sin(theta)
        rows = cos * dr - sin * dc + (h - 1) / 2
        cols = sin * dr + cos * dc + (w - 1) / 2
        return _bilinear(img, rows, cols)
    return jax.vmap(one)(x, angles, shifts).astype(x.dtype)


def random_affine(max_degrees: float = 0.0, max_shift: float = 0.0) -> Augmentation:
    """Rotate each image by a random angle about its centre, then translate it by a random
    sub-pixel shift; bilinear interpolation, zeros outside the image.

    Draws ``k1, k2 = jax.random.split(key)``, ``degrees = jax.random.uniform(k1, (batch,),
    minval=-max_degrees, maxval=max_degrees)``, ``shifts = jax.random.uniform(k2, (batch, 2),
    minval=-max_shift, maxval=max_shift)`` (rows, columns). Output pixel ``p = (row, col)``
    takes the input at ``c + R(θ)(p - c - s)``, ``R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]]``,
    ``θ = degrees·π/180``, ``c`` the image centre: with rows counted downwards, a positive
    angle turns the picture clockwise as displayed (``θ = 90°`` is ``np.rot90(x, -1, (1, 2))``).
    Floating input only.
    ``[b, H, W, C] → [b, H, W, C]``.
    """
    max_degrees = _non_negative("random_affine", "max_degrees", max_degrees)
    max_shift = _non_negative("random_affine", "max_shift", max_shift)

    def aug(key, x, y):
        _images("random_affine", x)
        _floating("random_affine", x)
        k1, k2 = jax.random.split(key)
        b = x.shape[0]
        degrees = jax.random.uniform(k1, (b,), x.dtype, -max_degrees, max_degrees)
        shifts = jax.random.uniform(k2, (b, 2), x.dtype, -max_shift, max_shift)
        return _warp(x, degrees * (math.pi / 180), shifts), y
    return _named(aug, f"random_affine({max_degrees}, {max_shift})")


def random_rotation(max_degrees: float) -> Augmentation:
    """:func:`random_affine` with rotations only (shifts drawn but zero-width)."""
    return random_affine(max_degrees, 0.0)


def random_translation(max_shift: float) -> Augmentation:
    """:func:`random_affine` with sub-pixel translations only, up to ``±max_shift`` pixels."""
    return random_affine(0.0, max_shift)


# --------------------------------------------------------------------------- noise and holes

def gaussian_noise(std: float) -> Augmentation:
    """``x + std·ε``, ``ε = jax.random.normal(key, x.shape)``, for any ``x: [batch, ...]``."""
    std = _non_negative("gaussian_noise", "std", std)

    def aug(key, x, y):
        _batch("gaussian_noise", x)
        _floating("gaussian_noise", x)
        return x + std * jax.random.normal(key, x.shape, x.dtype), y
    return _named(aug, f"gaussian_noise({std})")


def cutout(size: int) -> Augmentation:
    """Cutout (DeVries & Taylor 2017): zero a ``size×size`` square, one per image, every
    channel. The square's centre is uniform over the image, so it may hang over the edge.

    Draws ``centres = jax.random.randint(key, (batch, 2), 0, [[H, W]])``; rows
    ``[cr - size//2, cr - size//2 + size)`` × the same for columns are zeroed.
    """
    size = _non_negative_int("cutout", "size", size)

    def aug(key, x, y):
        _images("cutout", x)
        b, h, w, _ = x.shape
        centres = jax.random.randint(key, (b, 2), 0, jnp.asarray([[h, w]]))
        top = centres - size // 2                                       # (b, 2)
        rows = jnp.arange(h)[None, :] - top[:, :1]                      # (b, H)
        cols = jnp.arange(w)[None, :] - top[:, 1:]                      # (b, W)
        inside = lambda i: (i >= 0) & (i < size)
        hole = inside(rows)[:, :, None] & inside(cols)[:, None, :]        # (b, H, W)
        return jnp.where(hole[..., None], jnp.zeros((), x.dtype), x), y
    return _named(aug, f"cutout({size})")


# --------------------------------------------------------------------------- mixup

def mixup(alpha: float = 0.2, *, num_classes: int | None = None) -> Augmentation:
    """Mixup (Zhang et al. 2018): each example mixed with a partner from the same batch,
    inputs and labels alike: ``x' = λ x + (1-λ) x[π]``, ``y' = λ y + (1-λ) y[π]``.

    Draws ``k1, k2 = jax.random.split(key)``, ``λ = jax.random.beta(k1, alpha, alpha,
    (batch,))`` (one per example) and ``π = jax.random.permutation(k2, batch)``.

    Labels: one-hot or soft targets ``[batch, ..., classes]`` are mixed as they are; integer
    labels ``[batch, ...]`` need ``num_classes`` and become one-hot first, so the result is
    always a soft target (each row sums to 1) in ``x``'s float dtype. Train on it with a
    soft-label loss, ``fnn.losses.softmax_cross_entropy`` (``-Σ_k t_k log softmax(z)_k``, which
    takes soft targets), not ``softmax_cross_entropy_with_integer_labels``; evaluate on the
    plain integer labels as before.
    """
    if not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"mixup: alpha must be a finite number > 0, got {alpha!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(f"mixup: num_classes must be an int >= 2, got {num_classes!r}")

    def aug(key, x, y):
        _batch("mixup", x)
        _floating("mixup", x)
        y = _soft_targets(y, x, num_classes)
        k1, k2 = jax.random.split(key)
        lam = jax.random.beta(k1, alpha, alpha, (x.shape[0],), x.dtype)
        perm = jax.random.permutation(k2, x.shape[0])
        mix = lambda a: _per_example(lam, a) * a + _per_example(1 - lam, a) * a[perm]
        return mix(x), mix(y)
    return _named(aug, f"mixup({alpha})")


def _soft_targets(y, x, num_classes):
    if not hasattr(y, "shape") or y.ndim < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"mixup: expected labels with the batch size {x.shape[0]} first, got "
                         f"{getattr(y, 'shape', type(y).__name__)}")
    if jnp.issubdtype(y.dtype, jnp.integer):
        if num_classes is None:
            raise ValueError("mixup: integer labels need num_classes= to become one-hot soft "
                             "targets")
        return jax.nn.one_hot(y, num_classes, dtype=x.dtype)
    if num_classes is not None and y.shape[-1] != num_classes:
        raise ValueError(f"mixup: expected soft targets with {num_classes} classes on the last "
                         f"axis, got shape {y.shape}")
    return y.astype(x.dtype)


# --------------------------------------------------------------------------- composition

def compose(*augs: Augmentation) -> Augmentation:
    """Apply ``augs`` in order, each with its own key from ``jax.random.split(key, len(augs))``
    (the ``i``-th augmentation gets ``keys[i]``)."""
    if not augs or not all(callable(a) for a in augs):
        raise ValueError(f"compose: expected one or more augmentations (key, x, y) -> (x, y), "
                         f"got {augs!r}")

    def aug(key, x, y):
        for a, k in zip(augs, jax.random.split(key, len(augs))):
            x, y = a(k, x, y)
        return x, y
    return _named(aug, "compose(" + ", ".join(getattr(a, "__name__", "?") for a in augs) + ")")
