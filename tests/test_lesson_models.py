"""The lesson's model chapters (14 CNN, 16 transformer, 17 debugging): each example script run
small, its numbers checked against an independent reference (float64 NumPy written from the
equations, the conv arithmetic, the planted faults)."""
import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    """Import ``examples/<name>.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"lesson_{name}",
                                                  os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def figure(path):
    assert os.path.isfile(path) and 1_000 < os.path.getsize(path) < 150_000, path


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


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
