"""Attention's block size as a tuner choice point (``chunk_size="auto"``,
``fnn/layers/_attention_tuning.py``): ``None`` exactly with the tuner off; with it on, every
forced winner equal to a float64 reference and to the default within float32 rounding, the
choice cached on disk and reported; the defaults taken where timing would need the caller's key;
a choice point nested in another's measurement; the error for a bad ``chunk_size``. Fake timers
only; tiny shapes (the candidates are patched to blocks of 2 and 4 of an 8-long sequence)."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnn import tuning
from fnn.layers import MultiHeadAttention
from fnn.layers import _attention_tuning as AT
from fnn.layers.attention import dot_product_attention as dpa
from fnn.layers.attention import dot_product_attention_vjp as dpa_vjp
from fnn.tuning import cache

from helpers import rel_err

B, T, H, KH, D = 2, 8, 4, 2, 3
MASK, BIAS = (B, 1, T, T), (H, T, T)
KW = dict(causal=True)


@pytest.fixture
def tune(tmp_path, monkeypatch):
    """``tune(seconds)``: the tuner on with a fake timer and a fresh cache directory; blocks 2
    and 4 as the candidates; an empty memo."""
    from fnn.tuning import measure
    monkeypatch.setattr(measure, "_MEMO", {})
    monkeypatch.setattr(AT, "BLOCKS", (2, 4))

    def on(seconds=None, timer=None):
        return tuning.settings(enabled=True, directory=tmp_path, timer=timer or (
            lambda name, run: seconds.get(name, 1.0)))
    on.dir = tmp_path
    return on


def no_timer(name, run):
    raise AssertionError(f"timed {name!r} although nothing was to be measured")


@pytest.fixture(scope="module")
def data():
    r = np.random.default_rng(0)
    q, k, v, do = (r.standard_normal(s).astype(np.float32) for s in
                   ((B, T, H, D), (B, T, KH, D), (B, T, KH, D), (B, T, H, D)))
    mask = r.random(MASK) > 0.3
    mask[0, 0, 1, :] = False                           # a row allowed no key
    bias = r.standard_normal(BIAS).astype(np.float32)
    return q, k, v, do, mask, bias


def reference(q, k, v, do, mask, bias):
    """Attention and its VJP in float64, written from the equations (jnp in x64, autodiff)."""
    def attn(q, k, v):
        kk, vv = (jnp.repeat(a, H // KH, axis=2) for a in (k, v))
        s = jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(D) + bias[None]
        ok = mask & (np.arange(T)[None, :] <= np.arange(T)[:, None])
        m = jnp.max(jnp.where(ok, s, -jnp.inf), -1, keepdims=True)
        e = jnp.exp(jnp.where(ok, s - jnp.where(jnp.isfinite(m), m, 0), -jnp.inf))
        p = e / jnp.maximum(jnp.sum(e, -1, keepdims=True), 1e-300)       # empty rows: 0
        return jnp.einsum("bhts,bshd->bthd", p, vv)
    args = [np.asarray(a, np.float64) for a in (q, k, v)]
    out, vjp = jax.vjp(attn, *args)
    return out, vjp(np.asarray(do, np.float64))


def _key(q, k, v, mask, bias):
    return {"q": list(q.shape), "k": list(k.shape), "v": list(v.shape),
            "dtypes": ["float32"] * 3, "causal": True, "mask": list(mask.shape),
            "bias": [list(bias.shape), "float32"], "q_offset": 0}


def test_auto_with_the_tuner_off_is_none_exactly(data, monkeypatch):
    monkeypatch.setattr(AT, "BLOCKS", (2, 4))                  # candidates exist, yet unused
    q, k, v, do, mask, bias = data
    both = jax.jit(lambda *a: [dpa_vjp(*a[:4], a[4], bias=a[5], chunk_size=c, **KW)
                               for c in ("auto", None)])
    with tuning.settings(enabled=False, timer=no_timer):
        auto, none = both(q, k, v, do, mask, bias)
        for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(none)):
            np.testing.assert_array_equal(a, b)
        # the layer: the same program as chunk_size=None (traced, not compiled)
        x = np.ones((B, T, H * D), np.float32)
        layers = [MultiHeadAttention(H, num_kv_heads=KH, causal=True, chunk_size=c)
                  for c in ("auto", None)]
        params = layers[0].init(jax.random.PRNGKey(0), x.shape)[0]
        step = lambda m: jax.make_jaxpr(lambda p, x: m.backward(p, {}, x, x))(params, x)
        assert str(step(layers[0])) == str(step(layers[1]))


def test_each_forced_winner_matches_float64_and_the_default(tune, data):
    from fnn.tuning import measure
    q, k, v, do, mask, bias = data
    ref_out, ref_grads = reference(*data)
    shapes = dict(causal=True, mask_shape=MASK, bias=(BIAS, np.float32))
    with tune({"chunk_size=None": 3.0, "chunk_size=2": 1.0, "chunk_size=4": 2.0}):
        assert AT.chunk_size_choice(q.shape, k.shape, v.shape, (np.float32,) * 3, **shapes) == 2
    (entry,) = measure.memo_entries()
    assert set(entry["times_ms"]) == {"chunk_size=None", "chunk_size=2", "chunk_size=4"}
    assert not entry["rejected"]                                # each agreed with the default
    results = {}
    for winner in (None, 2, 4):                                 # force each by its recorded time
        run = lambda *a: dpa_vjp(*a[:4], a[4], bias=a[5], chunk_size="auto", **KW)  # new trace
        entry["times_ms"] = {n: (0.5 if n == f"chunk_size={winner}" else 9.0)
                             for n in entry["times_ms"]}
        with tune(timer=no_timer):
            assert AT.chunk_size_choice(q.shape, k.shape, v.shape, (np.float32,) * 3,
                                        **shapes) == winner
            out, grads = results[winner] = jax.jit(run)(q, k, v, do, mask, bias)
        assert rel_err(out, ref_out) < 1e-5, winner
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) < 1e-5, winner
    for winner in (2, 4):                                       # and the chunks took effect
        assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(results[winner]),
                                                            jax.tree.leaves(results[None])))


def test_the_choice_is_cached_on_disk_and_reported(tune, data, monkeypatch, capsys):
    from fnn.cli import main
    from fnn.tuning import measure
    q, k, v, *_ = data
    with tune({"chunk_size=4": 0.5}):                          # no mask, no bias: another key
        assert AT.chunk_size_choice(q.shape, k.shape, v.shape, (np.float32,) * 3,
                                    causal=True) == 4
        monkeypatch.setattr(measure, "_MEMO", {})               # a new process: from the disk
    with tune(timer=no_timer):
        assert AT.chunk_size_choice(q.shape, k.shape, v.shape, (np.float32,) * 3,
                                    causal=True) == 4
        key = dict(_key(q, k, v, np.zeros(MASK), np.zeros(BIAS)), mask=None, bias=None)
        assert cache.load(cache.full_key("attention.chunk_size", key)) is not None
        assert main(["tune", "--report"]) == 0
    text = capsys.readouterr().out
    assert "attention.chunk_size" in text and "chunk_size=4" in text
    assert "chunk_size=None" in text and "fastest" in text


def test_auto_takes_the_default_where_timing_would_need_the_callers_key(tune, data):
    q, k, v, *_ = data
    with tune(timer=no_timer):
        res = lambda **kw: AT.resolve_chunk_size("auto", q, k, v, causal=True, **kw)
        assert res(dropout_rate=0.1) is None                    # forms draw different masks
        assert res(q_offset=jnp.int32(3)) is None               # decoding's traced offset
        assert AT.resolve_chunk_size(3, q, k, v) == 3           # explicit values untouched
        assert AT.resolve_chunk_size("auto", q[:, :2], k, v) is None   # no block below T = 2
    with tuning.settings(enabled=False, timer=no_timer):
        assert AT.resolve_chunk_size("auto", q, k, v) is None


def test_a_choice_point_nested_in_anothers_measurement(tune):
    """A choice point reached while another's candidate compiles (attention's inside
    ``stack``'s) is measured there, not deadlocked on the outer one's lock."""
    args = lambda: (np.linspace(-1, 1, 6, dtype=np.float32),)

    def inner():
        return tuning.choose("test.inner", {"n": 6}, [
            tuning.Candidate("a", lambda x: x * 2), tuning.Candidate("b", lambda x: x + x)], args)

    def outer(x):
        return x * (2 if inner() == "b" else 3)
    box = {}
    with tune({"b": 0.5}):
        th = threading.Thread(target=lambda: box.update(out=tuning.choose(
            "test.outer", {"n": 6}, [tuning.Candidate("o", outer)], args)), daemon=True)
        th.start()
        th.join(120)
    assert not th.is_alive() and box["out"] == "o"
    from fnn.tuning import measure
    assert {e["key"]["point"] for e in measure.memo_entries()} == {"test.inner", "test.outer"}


def test_bad_chunk_size_names_the_values_allowed(data):
    q, k, v, *_ = data
    for bad in (0, -4, 2.5, "fast", True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int, None or 'auto'"):
            dpa(q, k, v, chunk_size=bad)
    with pytest.raises(ValueError, match="MultiHeadAttention: chunk_size .* 'auto', got 'fast'"):
        MultiHeadAttention(2, chunk_size="fast")
