"""The lesson's training chapters (09-17): each example script run small, its numbers checked
against an independent reference (jax.vjp, float64 NumPy, a known property)."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# --------------------------------------------------------------------------- 15 RNN

def test_sequence_gradients_lstm_learns_the_memory_task_and_the_rnn_does_not(tmp_path):
    """The chapter's claim, at a size where it holds with margin (3 seeds, 150 steps; the LSTM
    is at 100% by step ~60 at the default size): every LSTM seed >= 95%, every RNN seed within
    chance +- 8%; the error reaching step 0 at init is >100x smaller in the RNN."""
    sg = load("sequence_gradients")
    out = sg.main(["--steps", "150", "--seeds", "3", "--out", str(tmp_path)])
    lstm, rnn = np.array(out["LSTM"]["accuracy"]), np.array(out["SimpleRNN"]["accuracy"])
    assert lstm.min() >= 0.95, lstm
    assert np.abs(rnn - 0.5).max() <= 0.08, rnn
    assert np.median(out["LSTM"]["reach_at_init"]) > 100 * np.median(
        out["SimpleRNN"]["reach_at_init"])
    c = out["curves"]                  # gain 0.5 vanishes, gain 2 explodes, clipping caps it
    assert c["RNN, gain 0.5"][60] < 1e-6 * c["RNN, gain 0.5"][0]
    assert c["RNN, gain 2.0"][60] > 1e3 * c["RNN, gain 2.0"][0]
    assert out["exploding_norm"] > 1e3 and out["clipped_norm"] == pytest.approx(1.0, rel=1e-6)
    figure(out["figure"])


def test_sequence_gradients_story_matches_autodiff(key):
    """The per-step norms come from the hand BPTT; check them against jax.vjp of apply."""
    sg = load("sequence_gradients")
    for name, layer in sg.gradient_models().items():
        if name not in ("RNN, gain 2.0", "LSTM"):
            continue
        params, state, x, dy = sg.story_inputs(layer, key)
        x, dy = x[:2, :12], dy[:2]
        norms, _ = sg.gradient_per_step(layer.backward, params, state, x, dy)
        _, vjp = jax.vjp(lambda xx: layer.apply(params, state, xx)[0], x)
        want = np.asarray(jnp.mean(jnp.linalg.norm(vjp(dy)[0], axis=-1), axis=0))
        np.testing.assert_allclose(norms, want, rtol=1e-9)


def test_memory_task_marks_the_sign_and_hides_it_in_noise(key):
    sg = load("sequence_gradients")
    x, y = sg.memory_task(key, 500, 7, 2.0)
    assert x.shape == (500, 7, 2) and y.shape == (500, 1)
    np.testing.assert_array_equal(np.asarray(y[:, 0]), np.asarray(x[:, 0, 0] > 0))
    np.testing.assert_array_equal(np.asarray(jnp.abs(x[:, 0, 0])), 1.0)
    np.testing.assert_array_equal(np.asarray(x[:, :, 1]), np.eye(7)[0][None, :].repeat(500, 0))
    assert 1.7 < float(jnp.std(x[:, 1:, 0])) < 2.3
