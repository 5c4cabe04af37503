"""Core: count_params, summary (names, shapes, totals), cast."""
import re

import jax.numpy as jnp

from fnn.combinators import residual, serial, stack
from fnn.core import cast, count_params, summary
from fnn.layers import Relu, Tanh

from fake_layers import K, Dense

N = 3
BLOCK = serial(Dense(4), Tanh())


def test_count_params():
    model = serial(Dense(8), Relu(), Dense(3))
    params, _, _ = model.init(K, (4, 5))
    assert count_params(params) == 5 * 8 + 8 + 8 * 3 + 3
    assert count_params({}) == 0
    assert count_params({"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4), {"c": jnp.zeros(())}]}) == 11
    sp, _, _ = stack(BLOCK, N).init(K, (2, 4))
    assert count_params(sp) == N * (4 * 4 + 4)


def test_summary_prints_names_shapes_and_total():
    lines = []
    model = serial(Dense(100), Relu(), ("head", Dense(3)))
    text = summary(model, (4, 20), print_fn=lines.append)
    assert lines == [text]
    rows = text.splitlines()
    assert re.match(r"#\s+layer\s+output shape\s+params$", rows[0])
    assert re.match(r"0\s+Dense\(100\)\s+\(4, 100\)\s+2,100$", rows[2])
    assert re.match(r"1\s+Relu\s+\(4, 100\)\s+0$", rows[3])
    assert re.match(r"head\s+Dense\(3\)\s+\(4, 3\)\s+303$", rows[4])
    assert "input (4, 20)" in rows[-1] and "total params 2,403" in rows[-1]
    assert summary(model, (4, 20), print_fn=None) == text


def test_summary_of_a_single_layer():
    text = summary(residual(Dense(6)), (2, 6), print_fn=None)
    assert re.search(r"residual\(Dense\(6\)\)\s+\(2, 6\)\s+42", text)
    assert "total params 42" in text


def test_cast_converts_float_leaves_only():
    tree = {"w": jnp.ones((2, 2)), "ids": jnp.arange(3), "n": [jnp.zeros((), jnp.float32)]}
    out = cast(tree, jnp.float32)
    assert out["w"].dtype == jnp.float32 and out["n"][0].dtype == jnp.float32
    assert out["ids"].dtype == tree["ids"].dtype
