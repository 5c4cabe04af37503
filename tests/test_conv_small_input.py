"""Convolutions whose input is smaller than the kernel (ResNet's last stage) run on CPU as an
im2col matmul (fnn.layers._conv_im2col): forward, input gradient and transposed convolution
equal XLA's convolution (float64), on the cases that route there, and only those."""
import jax
import numpy as np
import pytest
from jax import lax

from fnn.layers import conv as C
from fnn.layers._conv_im2col import conv_im2col

DN = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def xla(x, w, strides, pads, lhs, dil):
    return lax.conv_general_dilated(x, w, strides, pads, lhs, dil,
                                    dimension_numbers=DN[w.ndim - 2])


@pytest.mark.parametrize("x_shape,w_shape,strides,pads,lhs,dil", [
    ((2, 2, 2, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)), None, (1, 1)),   # ResNet layer4
    ((2, 1, 1, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)), None, (1, 1)),
    ((2, 2, 3, 3), (3, 2, 3, 4), (2, 1), ((2, 1), (0, 1)), None, (1, 1)),   # asymmetric, strided
    ((2, 2, 2, 3), (3, 3, 3, 4), (1, 1), ((2, 2), (1, 3)), (2, 2), (1, 1)),  # input gradient form
    ((2, 2, 2, 3), (2, 2, 3, 4), (1, 1), ((2, -1), (1, 0)), None, (2, 1)),  # dilated, cropping
    ((2, 2, 3), (5, 3, 4), (2,), ((3, 2),), (3,), (1,)),                      # 1-D
    ((1, 2, 1, 2, 2), (3, 2, 2, 2, 3), (1, 1, 1), ((1, 1), (1, 0), (0, 1)), None, (1, 1, 1)),
])
def test_im2col_equals_xla_convolution(rng, x_shape, w_shape, strides, pads, lhs, dil):
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    want = xla(x, w, strides, pads, lhs, dil)
    got = conv_im2col(x, w, strides, pads, lhs, dil)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_small_inputs_route_to_im2col_on_cpu_and_stay_exact(rng):
    """ResNet's last stage at 2x2: conv, its hand input gradient (stride 1 and 2) and
    conv_transpose lower to no XLA convolution on CPU and equal jax.vjp of XLA's; a 4x4 input
    (kernel not larger) and a grouped convolution keep XLA's."""
    x, w = rng.normal(size=(2, 2, 2, 4)), rng.normal(size=(3, 3, 4, 5))
    p1 = ((1, 1), (1, 1))
    hlo = lambda f, *a: jax.jit(f).lower(*a).as_text()                      # noqa: E731
    assert "convolution" not in hlo(lambda x, w: C.conv(x, w, padding=1), x, w)
    assert "convolution" in hlo(lambda x, w: C.conv(x, w, padding=1), np.zeros((2, 4, 4, 4)), w)
    assert "convolution" in hlo(lambda x, w: C.conv(x, w, padding=1, groups=2), x,
                                rng.normal(size=(3, 3, 2, 6)))
    for s, xs in ((1, (2, 2, 2, 4)), (2, (2, 4, 4, 4))):
        xx = rng.normal(size=xs)
        y, vjp = jax.vjp(lambda x: xla(x, w, (s, s), p1, None, (1, 1)), xx)
        np.testing.assert_allclose(C.conv(xx, w, s, padding=1), y, rtol=1e-12, atol=1e-12)
        dy = rng.normal(size=y.shape)
        dw, dx = jax.jit(lambda x, dy: C.conv_backward(x, w, dy, s, padding=1))(xx, dy)
        np.testing.assert_allclose(dx, vjp(dy)[0], rtol=1e-12, atol=1e-12)
    wt = rng.normal(size=(3, 3, 4, 5))
    want = lax.conv_transpose(x, wt, (2, 2), "SAME", dimension_numbers=DN[2])
    np.testing.assert_allclose(C.conv_transpose(x, wt, 2), want, rtol=1e-12, atol=1e-12)
