"""ResNet (He et al. 2016, "Deep Residual Learning"; torchvision's v1.5: the stride on the 3×3
convolution) assembled from fnn layers, channels-last, named as torchvision names its modules.

::

    stem:    conv1 7×7/2 (pad 3, no bias) → bn1 → relu → maxpool 3×3/2 (pad 1)
    body:    layer1 … layer4, each a serial of blocks "0", "1", …  (widths w, 2w, 4w, 8w;
             layer1 keeps the size, the others halve it)
    head:    avgpool (global mean) → fc
    block:   y = relu(F(x) + x)             identity shortcut: residual(F)
             y = relu(F(x) + D(x))          projection: parallel(F, D) then Add()
    basic F:      conv1 3×3/s → bn1 → relu → conv2 3×3 → bn2
    bottleneck F: conv1 1×1 → bn1 → relu → conv2 3×3/s → bn2 → relu → conv3 1×1 (×4) → bn3
    D (downsample): "0" conv 1×1/s (no bias) → "1" bn

Every block is a plain ``serial`` of public layers; its parameters sit under
``residual`` (identity shortcut) or ``residual/main`` and ``residual/downsample`` (projection),
and its ``meta["torch_names"]`` tells :func:`fnn.torch_weights.load_state_dict` that those
containers add no level to PyTorch's names, so the keys it reads are torchvision's
(``layer2.0.conv1.weight``, ``layer2.0.downsample.0.weight``, ``layer2.0.downsample.1.running_mean``,
...). BatchNorm is torchvision's: PyTorch momentum 0.1 (fnn's ``momentum=0.9``), ``eps=1e-5``.
Convolutions start as torchvision's (He normal over ``fan_out``); the ``fc`` from fnn's
``Dense`` default.
"""
from __future__ import annotations

from fnn import initializers as inits
from fnn.activations import Relu
from fnn.combinators import parallel, residual, serial
from fnn.core import Layer, constructor
from fnn.layers.batch_norm import BatchNorm
from fnn.layers.conv import Conv
from fnn.layers.dense import Dense
from fnn.layers.merge import Add
from fnn.layers.pooling import GlobalAvgPool, MaxPool

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50"]

_EXPANSION = {"basic": 1, "bottleneck": 4}
_CONV_INIT = inits.variance_scaling(2.0, "fan_out", "normal")   # kaiming_normal_(fan_out, relu)


def _conv(features: int, k: int, stride: int = 1) -> Layer:
    """PyTorch's ``nn.Conv2d(.., k, stride, padding=k // 2, bias=False)``, channels-last."""
    return Conv(features, (k, k), stride, ((k // 2, k // 2),) * 2, use_bias=False,
                w_init=_CONV_INIT)


def _bn() -> Layer:
    return BatchNorm(momentum=0.9, eps=1e-5)                     # nn.BatchNorm2d's defaults


def _check(name: str, **ints):
    for arg, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")


def _block(main: list, features: int, stride: int, downsample: bool) -> tuple[Layer, dict]:
    """``serial(residual(F), relu)`` or ``serial(parallel(F, D), Add(), relu)``, and the
    torch names of its containers (``""``: no level of their own)."""
    f = serial(*main)
    if not downsample:
        return serial(("residual", residual(f)), ("relu", Relu())), {"residual": ""}
    d = serial(("0", _conv(features, 1, stride)), ("1", _bn()))
    body = parallel(("main", f), ("downsample", d))
    return (serial(("residual", body), ("add", Add()), ("relu", Relu())),
            {"residual": "", "residual/main": ""})


def _named_block(layer: Layer, names: dict, name: str) -> Layer:
    return layer._replace(name=name, meta={"torch_names": names}, spec=layer.spec)


@constructor
def BasicBlock(planes: int, stride: int = 1, downsample: bool = False) -> Layer:
    """torchvision's ``BasicBlock``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``,
    both convolutions 3×3 with ``planes`` outputs, the first with ``stride``; the shortcut is
    the identity, or with ``downsample=True`` a 1×1 convolution with ``stride`` and a batch norm
    (needed when the stride is not 1 or the input width is not ``planes``).
    **Params:** ``{"residual": {"conv1", "bn1", "conv2", "bn2"}}``, or with the downsample
    ``{"residual": {"main": {...}, "downsample": {"0", "1"}}}``. **Input:** ``[batch, h, w, c]``.

    >>> from fnn.core import output_shape
    >>> output_shape(BasicBlock(16, 2, downsample=True), (1, 8, 8, 4))
    (1, 4, 4, 16)
    """
    _check("BasicBlock", planes=planes, stride=stride)
    main = [("conv1", _conv(planes, 3, stride)), ("bn1", _bn()), ("relu", Relu()),
            ("conv2", _conv(planes, 3)), ("bn2", _bn())]
    layer, names = _block(main, planes, stride, downsample)
    return _named_block(layer, names, f"BasicBlock({planes}, stride={stride})")


@constructor
def Bottleneck(planes: int, stride: int = 1, downsample: bool = False) -> Layer:
    """torchvision's ``Bottleneck`` (ResNet v1.5): 1×1 to ``planes``, 3×3 with ``stride``,
    1×1 to ``4·planes``, each followed by a batch norm (and a relu but the last), plus the
    shortcut (identity, or with ``downsample=True`` a strided 1×1 convolution and a batch norm),
    then a relu. **Params:** as :func:`BasicBlock` with ``conv3``, ``bn3``.

    >>> from fnn.core import output_shape
    >>> output_shape(Bottleneck(4, downsample=True), (1, 8, 8, 4))
    (1, 8, 8, 16)
    """
    _check("Bottleneck", planes=planes, stride=stride)
    main = [("conv1", _conv(planes, 1)), ("bn1", _bn()), ("relu1", Relu()),
            ("conv2", _conv(planes, 3, stride)), ("bn2", _bn()), ("relu2", Relu()),
            ("conv3", _conv(4 * planes, 1)), ("bn3", _bn())]
    layer, names = _block(main, 4 * planes, stride, downsample)
    return _named_block(layer, names, f"Bottleneck({planes}, stride={stride})")


@constructor
def ResNet(block: str = "basic", layers=(2, 2, 2, 2), num_classes: int = 1000,
           width: int = 64) -> Layer:
    """A ResNet image classifier, torchvision's ``ResNet(block, layers, num_classes)``.

    **Arguments:** ``block``: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50 and
    up); ``layers``: blocks per stage (four ints); ``num_classes``; ``width``: the stem's
    channels and ``layer1``'s planes (torchvision: 64; stage ``k`` has ``width·2^(k-1)``).
    **Params:** named as torchvision's modules: ``conv1``, ``bn1``, ``layer1`` … ``layer4``
    (blocks ``"0"``, ``"1"``, … as :func:`BasicBlock` / :func:`Bottleneck`), ``fc``; the
    batch norms' running statistics in ``state``. **Input:** ``[batch, h, w, 3]``
    (channels-last: a PyTorch batch ``x`` is ``x.permute(0, 2, 3, 1)``) → ``[batch,
    num_classes]`` logits. ``fnn.torch_weights.load_state_dict(model, resnet.state_dict(),
    (1, h, w, 3))`` loads torchvision's weights.

    >>> from fnn.core import output_shape
    >>> output_shape(resnet18(num_classes=10), (2, 64, 64, 3))
    (2, 10)
    """
    if block not in _EXPANSION:
        raise ValueError(f"ResNet: block must be 'basic' or 'bottleneck', got {block!r}")
    layers = tuple(layers) if isinstance(layers, (tuple, list)) else layers
    if not isinstance(layers, tuple) or len(layers) != 4:
        raise ValueError(f"ResNet: layers must be four ints (blocks per stage), got {layers!r}")
    _check("ResNet", num_classes=num_classes, width=width,
           **{f"layers[{i}]": n for i, n in enumerate(layers)})
    make, expansion = (BasicBlock if block == "basic" else Bottleneck), _EXPANSION[block]
    stages, inplanes = [], width
    for k, n in enumerate(layers):
        planes, stride = width * 2 ** k, 1 if k == 0 else 2
        blocks = []
        for i in range(n):
            s = stride if i == 0 else 1
            blocks.append((str(i), make(planes, s, s != 1 or inplanes != planes * expansion)))
            inplanes = planes * expansion
        stages.append((f"layer{k + 1}", serial(*blocks)))
    model = serial(("conv1", Conv(width, (7, 7), 2, ((3, 3), (3, 3)), use_bias=False,
                                  w_init=_CONV_INIT)),
                   ("bn1", _bn()), ("relu", Relu()),
                   ("maxpool", MaxPool((3, 3), 2, ((1, 1), (1, 1)))),
                   *stages, ("avgpool", GlobalAvgPool()), ("fc", Dense(num_classes)))
    name = f"ResNet({block}, layers={layers}, classes={num_classes}, width={width})"
    return model._replace(name=name, meta={"torch_names": {}}, spec=model.spec)


def resnet18(num_classes: int = 1000) -> Layer:
    """ResNet-18: ``ResNet("basic", (2, 2, 2, 2), num_classes)`` (torchvision's ``resnet18``)."""
    return ResNet("basic", (2, 2, 2, 2), num_classes)


def resnet34(num_classes: int = 1000) -> Layer:
    """ResNet-34: ``ResNet("basic", (3, 4, 6, 3), num_classes)``."""
    return ResNet("basic", (3, 4, 6, 3), num_classes)


def resnet50(num_classes: int = 1000) -> Layer:
    """ResNet-50: ``ResNet("bottleneck", (3, 4, 6, 3), num_classes)``."""
    return ResNet("bottleneck", (3, 4, 6, 3), num_classes)
