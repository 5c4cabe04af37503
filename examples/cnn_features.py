"""What a CNN computes: learned 3×3 filters, their feature maps on a digit, pooling's shapes, and the parameter bill.

The lesson's CNN section, looked at from the inside. A one-convolution network on scikit-learn's
8×8 digits — ``Conv(8, (3, 3))`` (SAME padding), ReLU, 2×2 max pool, ``Dense(10)`` — trained
briefly with Adam (hand-derived backward, a few seeds). Each output
value of the convolution is one 3×3 patch of the image times one filter, plus a bias:
``y[i, j, c] = b[c] + Σ_{di, dj} x[i+di−1, j+dj−1] · w[di, dj, c]``; the same 9 weights slide
over every position (weight sharing), so a filter that responds to, say, a left edge finds it
anywhere. ReLU keeps the positive responses; the 2×2 max pool keeps the strongest of each
neighbourhood and halves the height and width. Printed: the shapes through the network (and
under VALID padding and stride 2, from the conv arithmetic), the parameter counts of each
convolution against a dense layer with the same input and output sizes, and the test accuracy
per seed. Figure ``OUT/cnn_features.png``: the 8 learned filters, one test digit, its 8 feature
maps after the ReLU and after the pool.

    python examples/cnn_features.py [--steps 300] [--seeds 3] [--out out] [--quick] [--seed 0]
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from fnn import backprop, data, losses, optim
from fnn.core import count_params, default_dtype, output_shape
from fnn.layers import Conv, Dense, Flatten, MaxPool, Relu, serial
from fnn.plot import save as save_figure

LOSS = losses.softmax_cross_entropy_with_integer_labels
FILTERS, BATCH = 8, 32


def model(filters=FILTERS):
    """``[batch, 8, 8, 1]`` → 10 logits: one 3×3 convolution (SAME), ReLU, 2×2 max pool, dense."""
    return serial(Conv(filters, (3, 3)), Relu(), MaxPool((2, 2)), Flatten(), Dense(10))


def shapes(image=(1, 8, 8, 1)):
    """``{description: output shape}`` of convolutions and pools on ``image`` (shape inference
    only, no computation): SAME keeps ``⌈n/s⌉``, VALID gives ``⌊(n − k)/s⌋ + 1``."""
    cases = {"Conv(8, 3×3), SAME": Conv(8, (3, 3)),
             "Conv(8, 3×3), VALID": Conv(8, (3, 3), padding="VALID"),
             "Conv(8, 3×3), SAME, stride 2": Conv(8, (3, 3), strides=2),
             "Conv(8, 3×3), VALID, stride 2": Conv(8, (3, 3), strides=2, padding="VALID"),
             "Conv + MaxPool(2×2)": serial(Conv(8, (3, 3)), MaxPool((2, 2))),
             "the model (logits)": model()}
    return {k: tuple(output_shape(m, image)) for k, m in cases.items()}


def parameter_bill(h=8, w=8):
    """Parameters of a 3×3 convolution vs a dense layer mapping the same input to the same
    output (``h·w·c_in → h·w·c_out``), for this script's conv and digits_cnn.py's two."""
    out = {}
    for cin, cout in ((1, FILTERS), (1, 32), (32, 64)):
        init = Conv(cout, (3, 3)).init
        conv = count_params(jax.eval_shape(lambda k: init(k, (1, h, w, cin))[0],
                                           jax.random.PRNGKey(0)))          # shapes only
        n_in, n_out = h * w * cin, h * w * cout
        out[f"{cin}→{cout} channels"] = (conv, n_in * n_out + n_out)
    return out


def inspect(net, p, x_test, y_test, digit):
    """Test accuracy; and for ``x_test[digit]``: the feature maps after the ReLU ``[8, 8, F]``
    and after the pool ``[4, 4, F]``."""
    state = {str(i): {} for i in range(5)}                 # no layer here has state
    conv, relu, pool = (dict(net.children)[k] for k in "012")
    acc = jnp.mean(jnp.argmax(net.apply(p, state, x_test)[0], -1) == y_test)
    fmap = relu.apply({}, {}, conv.apply(p["0"], {}, x_test[digit:digit + 1])[0])[0]
    return acc, fmap[0], pool.apply({}, {}, fmap)[0][0]


def train(keys, x, y, steps, lr, x_test, y_test, digit):
    """Adam on random minibatches, one model per key (training and :func:`inspect` in one
    compile, run per seed). Returns the trained params, test accuracies, feature maps and
    pooled maps, each with a leading seed axis."""
    net = model()
    opt = optim.adam(lr)
    vg = backprop.value_and_grad(net, LOSS)

    @jax.jit
    def one(key):
        params, state, _ = net.init(key, (BATCH,) + x.shape[1:])

        def step(carry, i):
            p, o = carry
            idx = jax.random.randint(jax.random.fold_in(key, i), (BATCH,), 0, len(x))
            (_, _), g = vg(p, state, x[idx], y[idx])
            u, o = opt.update(g, o, p)
            return (optim.apply_updates(p, u), o), None
        p = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(steps))[0][0]
        return (p,) + inspect(net, p, x_test, y_test, digit)
    return jax.tree.map(lambda *a: np.stack([np.asarray(u) for u in a]), *[one(k) for k in keys])


def tile(maps, gap=1):
    """``[h, w, n]`` → one ``[h, n·(w + gap) − gap]`` image, the maps side by side (NaN gaps)."""
    h, w, n = maps.shape
    out = np.full((h, n * (w + gap) - gap), np.nan)
    for c in range(n):
        out[:, c * (w + gap):c * (w + gap) + w] = maps[:, :, c]
    return out


def plot(w, image, fmaps, pooled, label, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(10, 4.2))
    grid = fig.add_gridspec(3, 2, width_ratios=(1, 7))
    m, top = np.abs(w).max(), max(fmaps.max(), 1e-9)
    rows = ((tile(w[:, :, 0, :]), "RdBu_r", -m, m, "learned 3×3 filters (red +, blue −)"),
            (tile(fmaps), "viridis", 0, top, "feature maps after the ReLU, 8×8"),
            (tile(pooled), "viridis", 0, top, "after the 2×2 max pool, 4×4"))
    for r, (img, cmap, lo, hi, title) in enumerate(rows):
        ax = fig.add_subplot(grid[r, 1])
        ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(image[:, :, 0], cmap="gray_r")
    ax.set_title(f"test digit ({label})", fontsize=9)
    ax.axis("off")
    save_figure(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="fewer steps, 2 seeds (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = min(args.steps, 150), min(args.seeds, 2)
    (x, y), (x_test, y_test) = data.load_digits(image=True, dtype=default_dtype())
    print("shapes (batch, height, width, channels):")
    shp = shapes()
    for k, s in shp.items():
        print(f"  {k:32s} {s}")
    bill = parameter_bill()
    print("parameters, 3×3 conv vs a dense layer with the same input and output (8×8 image):")
    for k, (conv, dense) in bill.items():
        print(f"  {k:16s} conv {conv:>6,}   dense {dense:>10,}   ({dense / conv:,.0f}×)")
    keys = jax.random.split(jax.random.PRNGKey(args.seed), args.seeds)
    digit = 0
    params, acc, fmaps, pooled = train(keys, jnp.asarray(x), jnp.asarray(y), args.steps, args.lr,
                                       jnp.asarray(x_test), jnp.asarray(y_test), digit)
    print(f"Conv({FILTERS}, 3×3) → ReLU → MaxPool(2×2) → Dense(10): {args.steps} Adam steps of "
          f"{BATCH}, lr {args.lr:g}: test accuracy {acc.min():.1%}–{acc.max():.1%} over "
          f"{args.seeds} seeds ({', '.join(f'{a:.1%}' for a in acc)})")
    p0 = jax.tree.map(lambda a: a[0], params)
    path = os.path.join(args.out, "cnn_features.png")
    plot(p0["0"]["w"], x_test[digit], fmaps[0], pooled[0], int(y_test[digit]), path)
    print(f"wrote {path}")
    return {"shapes": shp, "bill": bill, "accuracy": acc, "params": p0, "image": x_test[digit],
            "feature_maps": fmaps[0], "pooled": pooled[0], "figure": path}


if __name__ == "__main__":
    main()
