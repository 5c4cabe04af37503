"""The recurrent layers' loop-form choice point (``recurrent.loop``, ``loop="auto"``): with the
tuner off the layers lower to the one-step scan, exactly as ``loop="scan"``; every form's ``fwd``
and ``bwd`` equal the default's and ``jax.vjp`` of ``apply`` (float64); the tuner's choice (a
fake timer: nothing is timed) is the form the layer then runs, kept on disk and reported."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import no_autodiff, tree_rel_err

from fnn import tuning
from fnn.layers import GRU, LSTM, SimpleRNN
from fnn.layers._rnn_tuning import LOOPS, _offered

B, T, F, H = 4, 5, 2, 3
LENGTHS = np.array([5, 2, 0, 3])
CASES = {"rnn": (SimpleRNN, {}, {}),
         "lstm": (LSTM, {"reverse": True}, {"lengths": LENGTHS}),
         "gru": (GRU, {"return_sequences": False, "return_carry": True}, {})}


def no_timer(name, run):
    raise AssertionError(f"timed {name!r} although the tuner is off or the choice was cached")


@pytest.fixture
def tune(tmp_path, monkeypatch):
    """``tune(timer)``: the tuner on with ``timer``, a cache in ``tmp_path``, an empty memo."""
    from fnn.tuning import measure
    monkeypatch.setattr(measure, "_MEMO", {})
    return lambda timer: tuning.settings(enabled=True, timer=timer, directory=tmp_path)


def _data(kind, rng):
    ctor, opts, kw = CASES[kind]
    params, state, out = ctor(H, **opts).init(jax.random.PRNGKey(0), (B, T, F))
    params = jax.tree.map(lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape)), params)
    x = jnp.asarray(rng.normal(size=(B, T, F)))
    dy = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s)), out,
                      is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(n, int) for n in s))
    return params, state, x, dy, {k: jnp.asarray(v) for k, v in kw.items()}


def _lowered(layer, params, state, x, dy, kw):
    """The StableHLO of ``layer``'s ``fwd`` then ``bwd`` (lowering only: nothing compiles)."""
    def f(p, x, dy):
        y, _, res = layer.fwd(p, state, x, **kw)
        return y, layer.bwd(p, state, res, dy, **kw)
    return jax.jit(f).lower(params, x, dy).as_text()


def test_tuner_off_auto_is_the_scan_form(tmp_path, rng):
    params, state, x, dy, kw = _data("lstm", rng)
    with tuning.settings(enabled=False, timer=no_timer, directory=tmp_path):
        auto = _lowered(LSTM(H, reverse=True), params, state, x, dy, kw)
        assert auto == _lowered(LSTM(H, reverse=True, loop="scan"), params, state, x, dy, kw)
        assert auto != _lowered(LSTM(H, reverse=True, loop="chains2"), params, state, x, dy, kw)
    assert list(tmp_path.iterdir()) == []                          # nothing measured or written


@pytest.mark.parametrize("kind", sorted(CASES))
def test_every_form_equals_the_default_and_vjp(kind, rng, monkeypatch):
    """Each form's forward equals the default's and its hand backward ``jax.vjp`` of ``apply``,
    all forms in one compiled program (float64: relative 1e-12 and 1e-9)."""
    ctor, opts, _ = CASES[kind]
    params, state, x, dy, kw = _data(kind, rng)
    layers = {name: ctor(H, **opts, loop=name) for name in LOOPS}
    real_vjp = jax.vjp

    def run(p, x, dy):
        f = lambda p, x: layers["scan"].apply(p, state, x, **kw)[0]
        want = f(p, x), real_vjp(f, p, x)[1](dy)
        got = {}
        for name, layer in layers.items():
            y, _, res = layer.fwd(p, state, x, **kw)
            got[name] = y, layer.bwd(p, state, res, dy, **kw)
        return want, got
    with no_autodiff(monkeypatch):
        want, got = jax.jit(run)(params, x, dy)
    for name, (y, grads) in got.items():
        assert tree_rel_err(y, got["scan"][0]) < 1e-12, name
        assert tree_rel_err(y, want[0]) < 1e-12, name
        assert tree_rel_err(grads, got["scan"][1]) < 1e-12, name
        assert tree_rel_err(grads, want[1]) < 1e-9, name


def test_the_tuners_choice_is_run_cached_and_reported(tune, rng, capsys, monkeypatch):
    from fnn.layers import _rnn_tuning
    monkeypatch.setattr(_rnn_tuning, "_threads", lambda: 2)       # a one-CPU host has no chains2
    winner = "chains2"
    params, state, x, dy, kw = _data("lstm", rng)
    auto, forced = LSTM(H, reverse=True), LSTM(H, reverse=True, loop=winner)
    with tune(lambda name, run: 0.5 if name == winner else 1.0):
        assert _lowered(auto, params, state, x, dy, kw) == \
            _lowered(forced, params, state, x, dy, kw)
    from fnn.tuning import measure
    (entry,) = measure.memo_entries()
    assert entry["key"]["point"] == "recurrent.loop" and not entry["rejected"]
    assert set(entry["times_ms"]) == set(LOOPS)                    # all verified, all timed
    measure._MEMO.clear()                                          # a new process: from disk
    with tune(no_timer):
        assert _lowered(auto, params, state, x, dy, kw) == \
            _lowered(forced, params, state, x, dy, kw)
        from fnn.cli import main
        assert main(["tune", "--report"]) == 0
    out = capsys.readouterr().out
    assert "recurrent.loop" in out and f"{winner} " in out and "fastest" in out


def test_loop_argument_and_the_forms_a_batch_allows(monkeypatch):
    from fnn.layers._rnn_tuning import _threads
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                       "intra_op_parallelism_threads=1")
    assert _threads() == 1
    for ctor in (SimpleRNN, LSTM, GRU):
        with pytest.raises(ValueError, match=f"{ctor.__name__}: loop must be"):
            ctor(3, loop="fast")
    assert _offered(4, 2) == list(LOOPS) == ["scan", "chains2"]
    assert _offered(3, 2) == _offered(4, 1) == ["scan"]            # odd batch; one XLA thread
    assert LSTM(3) == LSTM(3, loop="auto") != LSTM(3, loop="scan")
    layer = GRU(3, loop="chains2")                               # named: an odd batch is an error
    params, state, _ = layer.init(jax.random.PRNGKey(0), (3, 4, 2))
    with pytest.raises(ValueError, match=r"GRU\(3\): loop='chains2' .* multiple of 2, got 3"):
        layer.fwd(params, state, jnp.ones((3, 4, 2)))


def test_inside_another_choice_points_measurement(tune, monkeypatch):
    """``stack(LSTM, 2)`` (``remat="auto"``): the stack's candidates trace the LSTM in the
    tuner's thread, where the loop form is the default (measuring there would wait forever on
    the lock the stack's measurement holds); the LSTM's own trace then measures its form."""
    import threading

    from fnn.combinators import stack
    from fnn.layers import _rnn_tuning
    from fnn.tuning import measure
    monkeypatch.setattr(_rnn_tuning, "_threads", lambda: 2)
    model = stack(LSTM(2), 2)
    params, state, _ = model.init(jax.random.PRNGKey(0), (2, 2, 2))
    box = {}

    def run():
        with tune(lambda name, run: 1.0):
            box["y"] = model.fwd(params, state, jnp.ones((2, 2, 2)))[0]
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the nested choice point deadlocked"
    assert box["y"].shape == (2, 2, 2)
    assert sorted(e["key"]["point"] for e in measure.memo_entries()) == \
        ["recurrent.loop", "stack.form"]
