"""The lesson's model chapters (14 CNN, 16 transformer, 17 debugging): each example script run
small, its numbers checked against an independent reference (float64 NumPy written from the
equations, the conv arithmetic, the planted faults)."""

import numpy as np

from helpers import assert_figure as figure, load_example as load


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- 14 CNN

def test_cnn_features_match_a_hand_convolution_and_the_conv_arithmetic(tmp_path):
    cf = load("cnn_features")
    out = cf.main(["--quick", "--out", str(tmp_path)])
    # shapes: SAME keeps ceil(n / s), VALID gives floor((n - k) / s) + 1, a 2x2 pool halves
    same, valid = (lambda n, s: -(-n // s)), (lambda n, k, s: (n - k) // s + 1)
    want = {"Conv(8, 3×3), SAME": (1, same(8, 1), same(8, 1), 8),
            "Conv(8, 3×3), VALID": (1, valid(8, 3, 1), valid(8, 3, 1), 8),
            "Conv(8, 3×3), SAME, stride 2": (1, same(8, 2), same(8, 2), 8),
            "Conv(8, 3×3), VALID, stride 2": (1, valid(8, 3, 2), valid(8, 3, 2), 8),
            "Conv + MaxPool(2×2)": (1, 4, 4, 8), "the model (logits)": (1, 10)}
    assert out["shapes"] == want
    # parameters: k·k·c_in·c_out + c_out against (h·w·c_in)·(h·w·c_out) + h·w·c_out
    for (cin, cout), (conv, dense) in zip(((1, 8), (1, 32), (32, 64)), out["bill"].values()):
        assert (conv, dense) == (9 * cin * cout + cout, 64 * cin * 64 * cout + 64 * cout)
    # every feature-map value by hand in float64 NumPy: zero-pad by 1, correlate each 3x3 patch
    # with each filter, add the bias, ReLU; then the max of each 2x2 block
    w, b = (np.asarray(out["params"]["0"][k], np.float64) for k in "wb")
    x = np.pad(np.asarray(out["image"], np.float64)[:, :, 0], 1)
    fmap = np.zeros((8, 8, w.shape[-1]))
    for i in range(8):
        for j in range(8):
            fmap[i, j] = np.maximum(np.einsum("uv,uvc->c", x[i:i + 3, j:j + 3], w[:, :, 0]) + b,
                                    0)
    np.testing.assert_allclose(out["feature_maps"], fmap, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["pooled"], fmap.reshape(4, 2, 4, 2, -1).max(axis=(1, 3)),
                               rtol=1e-12)
    assert (fmap > 0).any() and (fmap == 0).any()                 # the ReLU cut something
    assert np.all(out["accuracy"] >= 0.85), out["accuracy"]       # chance is 10%
    figure(out["figure"])


# --------------------------------------------------------------------------- 16 transformer

def numpy_reverser(p, x):
    """The attention model of examples/attention_maps.py written out in float64 NumPy:
    ``(logits [n, t, vocab], attention [n, t, t])``."""
    p = {k: {n: (np.asarray(v, np.float64) if not isinstance(v, dict) else
                 {m: np.asarray(u, np.float64) for m, u in v.items()}) for n, v in d.items()}
         for k, d in p.items()}
    h = p["0"]["w"][x] + p["1"]["w"][None, :x.shape[1]]
    a = p["2"]
    q, k, v = (h @ a[n]["w"] + a[n]["b"] for n in "qkv")
    att = softmax(q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]))
    out = (att @ v) @ a["o"]["w"] + a["o"]["b"]
    return out @ p["3"]["w"] + p["3"]["b"], att


def test_attention_maps_reverse_puts_each_query_on_the_mirrored_key(tmp_path):
    am = load("attention_maps")
    out = am.main(["--quick", "--out", str(tmp_path)])
    t, x = out["t"], out["x"]
    mirror = t - 1 - np.arange(t)
    # the held-out accuracy and the attention maps, recomputed from the params in NumPy
    for seed in range(len(out["accuracy"])):
        p = {k: {n: (v[seed] if not isinstance(v, dict) else {m: u[seed] for m, u in v.items()})
                 for n, v in d.items()} for k, d in out["params"].items()}
        logits, att = numpy_reverser(p, x)
        np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-12)           # rows sum to 1
        np.testing.assert_allclose(out["maps"][seed], att[:2], rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(out["mean_map"][seed], att.mean(0), rtol=1e-8, atol=1e-12)
        acc = np.mean(logits.argmax(-1) == x[:, ::-1])
        assert acc == out["accuracy"][seed] and acc >= 0.95, acc
        # most queries put their largest weight on the mirrored key, with a margin of 0.1
        on = att[:, np.arange(t), mirror]
        others = np.where(np.eye(t)[mirror][None].astype(bool), -1.0, att).max(-1)
        assert np.mean(on - others >= 0.1) >= 0.75, np.mean(on - others >= 0.1)
        assert on.mean() >= 0.6 and np.isclose(on.mean(), out["mirror_weight"][seed])
    # at initialization the rows are close to uniform
    np.testing.assert_allclose(out["init"]["mirror_weight"], 1 / t, atol=0.05)
    assert np.all(out["init"]["mirror_hit"] < 0.5)
    figure(out["figure"])


# --------------------------------------------------------------------------- 17 debugging

def test_debugging_checklist_names_each_planted_fault(tmp_path):
    dbg = load("debugging")
    out = dbg.main(["--quick", "--out", str(tmp_path)])
    reports = out["reports"]
    healthy = reports["healthy"]
    assert healthy.passed and not healthy.warnings
    assert {f.check for f in healthy.findings} == {"data", "size", "gradients", "backward"}

    def only(report, check, severity):
        hits = [f.message for f in report.findings if f.severity == severity]
        assert hits and all(f.check == check for f in report.findings
                            if f.severity == severity), report
        return " ".join(hits)

    # dead ReLUs: the finding names the ReLU layer and all 16 units; NumPy: every pre-activation
    # of the bias -8 model is negative, none of the healthy one's units is dead
    msg = only(reports["dead ReLUs (first bias -8)"], "gradients", "error")
    assert "layer '1' (Relu): 16 of 16 units" in msg and "no gradient at all" in msg
    assert out["pre"]["bias −8"].max() < 0 and (out["pre"]["healthy (zero bias)"] > 0).any(0).all()
    # unnormalized inputs: a data warning, and the raw features' mean and std really are > 3
    model, x, y, _ = out["cases"]["unnormalized inputs (40 + 25·x)"]
    assert "inputs are not normalized" in only(reports["unnormalized inputs (40 + 25·x)"],
                                               "data", "warning")
    assert np.all(np.abs(x.mean(0)) > 3) and np.all(x.std(0) > 3)
    # the 1-based labels: the out-of-range label 3 is named, the later checks skipped
    rep = reports["labels 1..3 for 3 outputs"]
    assert "label 3" in only(rep, "data", "error") and "[0, 3)" in rep.errors[0].message
    assert all("skipped" in f.message for f in rep.findings if f.check != "data")
    # the wrong backward: exactly the leaf '1/s' is named; in float64 NumPy the true gradient of
    # s is Σ dy ⊙ x (what jax.grad gives) and the planted rule returns Σ dy
    msg = only(reports["wrong backward (BuggyScale)"], "backward", "error")
    assert "'1/s'" in msg and "'1/t'" not in msg and "'0/" not in msg
    hand, auto = out["grads"]["layer 1 s"]
    assert np.abs(hand - auto).max() > 0.1 * np.abs(auto).max()
    for leaf in ("layer 1 t", "layer 0 w"):
        np.testing.assert_allclose(*out["grads"][leaf], rtol=1e-10, atol=1e-14)
    layer = dbg.BuggyScale()
    rng = np.random.default_rng(0)
    xs, dy = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    params, state, _ = layer.init(None, xs.shape)
    d, dx = layer.backward(params, state, xs, dy)
    np.testing.assert_allclose(d["s"], dy.sum(0), rtol=1e-12)
    assert not np.allclose(d["s"], (dy * xs).sum(0))
    np.testing.assert_allclose(dx, dy, rtol=1e-12)                # s = 1 at init: dx = dy ⊙ s
    figure(out["figure"])
