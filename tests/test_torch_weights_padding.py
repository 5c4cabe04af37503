"""fnn.torch_weights: a convolution that pads 'SAME' (fnn's default) loaded from a PyTorch
state_dict gets one PaddingWarning per load naming it, what 'SAME' pads there and the PyTorch
padding that is; convolutions with a declared padding stay quiet. The claims the warning makes
are checked against NumPy float64 references of PyTorch's layers (tests/torch_refs.py)."""
import warnings

import jax
import numpy as np
import pytest

import torch_refs as R
from fnn import layers as L
from fnn import serial
from fnn.models import ResNet
from fnn.torch_weights import PaddingWarning, StateDictError, load_state_dict, state_dict


def nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def quiet_load(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_state_dict(*args)


def apply(model, loaded, x_nchw):
    """``model``'s output (NHWC) with ``loaded = (params, state)`` on a PyTorch (NCHW) input."""
    return np.asarray(model.apply(*loaded, x_nchw.transpose(0, 2, 3, 1))[0])


def test_conv_only_model_warns_once_naming_each_conv(rng):
    """Two PyTorch Conv2d(padding=0) into serial(Conv, Conv) (default SAME): no tensor is
    mis-shaped, the outputs differ; one warning names both convs, points at the caller, and
    both of its remedies hold: padding='VALID' gives PyTorch's padding=0 outputs (and loads
    quietly), padding=1 keeps SAME's."""
    sd = {"0.weight": rng.normal(size=(4, 3, 3, 3)), "0.bias": rng.normal(size=4),
          "1.weight": rng.normal(size=(5, 4, 3, 3)), "1.bias": rng.normal(size=5)}
    x = rng.normal(size=(2, 3, 7, 7))
    want = R.conv2d(R.conv2d(x, sd["0.weight"], sd["0.bias"]), sd["1.weight"], sd["1.bias"])
    same = serial(L.Conv(4, (3, 3)), L.Conv(5, (3, 3)))
    with pytest.warns(PaddingWarning) as record:
        loaded = load_state_dict(same, sd, (1, 7, 7, 3))
    assert len(record) == 1 and record[0].filename == __file__
    msg = str(record[0].message)
    assert msg.startswith("load_state_dict: 2 convolution(s) pad 'SAME'")
    assert ("Conv '0' (Conv(4, (3, 3))), input (1, 7, 7, 3): 'SAME' pads ((1, 1), (1, 1)) -> "
            "(1, 7, 7, 4), which is PyTorch's Conv2d(padding=1); keep it with padding=1, or for "
            "PyTorch's default padding=0 build it with padding='VALID' (-> (1, 5, 5, 4))") in msg
    assert "Conv '1' (Conv(5, (3, 3))), input (1, 7, 7, 4)" in msg
    got = apply(same, loaded, x)
    assert got.shape == (2, 7, 7, 5) != nhwc(want).shape                 # silently not torch's

    valid = serial(L.Conv(4, (3, 3), padding="VALID"), L.Conv(5, (3, 3), padding="VALID"))
    np.testing.assert_allclose(apply(valid, quiet_load(valid, sd, (1, 7, 7, 3)), x), nhwc(want),
                               rtol=1e-12, atol=1e-12)
    one = serial(L.Conv(4, (3, 3), padding=1), L.Conv(5, (3, 3), padding=1))
    np.testing.assert_array_equal(apply(one, quiet_load(one, sd, (1, 7, 7, 3)), x), got)

    sd["2.weight"] = np.zeros(3)                       # a load that fails says it in its error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(StateDictError, match="unexpected: '2.weight'"):
            load_state_dict(same, sd, (1, 7, 7, 3))


def test_strided_same_is_no_pytorch_padding(rng):
    """Stride 2 on an even size: SAME pads (0, 1), which no Conv2d padding does; PyTorch's
    padding=1 gives the same output shape and other numbers, so only the warning tells."""
    sd = {"weight": rng.normal(size=(4, 3, 3, 3)), "bias": rng.normal(size=4)}
    x = rng.normal(size=(1, 3, 8, 8))
    conv = L.Conv(4, (3, 3), strides=2)
    with pytest.warns(PaddingWarning, match=r"'SAME' pads \(\(0, 1\), \(0, 1\)\) -> \(1, 4, 4, 4\)"
                      r", which is no PyTorch Conv2d padding .*keep it with padding=\(\(0, 1\), "
                      r"\(0, 1\)\)"):
        loaded = load_state_dict(conv, sd, (1, 8, 8, 3))
    got = apply(conv, loaded, x)
    torch_pad1 = nhwc(R.conv2d(x, sd["weight"], sd["bias"], stride=2, padding=1))
    assert got.shape == torch_pad1.shape and np.max(np.abs(got - torch_pad1)) > 1e-3
    kept = L.Conv(4, (3, 3), strides=2, padding=((0, 1), (0, 1)))
    np.testing.assert_array_equal(apply(kept, quiet_load(kept, sd, (1, 8, 8, 3)), x), got)


def test_conv_transpose_same_names_the_pytorch_padding(rng):
    """ConvTranspose, stride 1, 3x3: SAME is PyTorch's ConvTranspose2d(padding=1,
    output_padding=0), checked against the NumPy reference of that layer."""
    sd = {"weight": rng.normal(size=(3, 4, 3, 3)), "bias": rng.normal(size=4)}
    x = rng.normal(size=(1, 3, 5, 5))
    layer = L.ConvTranspose(4, (3, 3))
    with pytest.warns(PaddingWarning, match=r"ConvTranspose '<root>' .*'SAME' pads \(\(1, 1\), "
                      r"\(1, 1\)\) -> \(1, 5, 5, 4\), which is PyTorch's ConvTranspose2d\("
                      r"padding=1, output_padding=0\)"):
        loaded = load_state_dict(layer, sd, (1, 5, 5, 3))
    want = R.conv_transpose2d(x, sd["weight"], sd["bias"], padding=1)
    np.testing.assert_allclose(apply(layer, loaded, x), nhwc(want), rtol=1e-12, atol=1e-12)


def test_declared_padding_and_1x1_kernels_stay_quiet(rng):
    """Explicit numbers, 'VALID', a 1x1 kernel (SAME pads nothing at any size, any stride) and
    fnn.models.ResNet (explicit paddings): no warning."""
    sd = {"0.weight": rng.normal(size=(4, 3, 3, 3)), "1.weight": rng.normal(size=(5, 4, 1, 1)),
          "2.weight": rng.normal(size=(6, 5, 3, 3))}
    model = serial(L.Conv(4, (3, 3), padding=((1, 1), (2, 2)), use_bias=False),
                   L.Conv(5, (1, 1), strides=2, use_bias=False),
                   L.Conv(6, (3, 3), padding="VALID", use_bias=False))
    quiet_load(model, sd, (1, 7, 7, 3))
    resnet = ResNet("basic", (1, 1, 1, 1), num_classes=5, width=8)
    p, s = jax.eval_shape(lambda k: resnet.init(k, (1, 32, 32, 3))[:2], jax.random.PRNGKey(0))
    zeros = lambda t: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), t)   # noqa: E731
    quiet_load(resnet, state_dict(resnet, zeros(p), zeros(s), (1, 32, 32, 3)), (1, 32, 32, 3))
