"""backward's lean path on the C target (issue 14, item 3): a call with the same Params, kept
gradient buffer and data arrays as the last such call skips the checks and pointer conversions,
and still sees everything that can change in place: the arrays' contents, an entry of the
Params replaced, an array's dtype or shape assigned. Its results are those of the full path.
The same for calls without grads= (fresh results), whose results it never holds on to."""
import numpy as np
import pytest

import compiler as bpc
from compiler.backends.c.backend import compile_model_c
from model_table import NEEDS_CC

pytestmark = NEEDS_CC


@pytest.fixture(scope="module")
def mods():
    model = bpc.mlp([3, 5, 2], "tanh", "mse", name="lean")
    return compile_model_c(model).load(), bpc.compile_model(model).load()


def _ref(npm, params, x, y):
    return npm.backward({k: np.array(v) for k, v in params.items()}, x, y)


def _same(got, want):
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    for k in want[1]:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-12, atol=1e-15)


def test_repeated_calls_follow_every_change(mods):
    cm, npm = mods
    rng = np.random.default_rng(0)
    p, g = cm.init_params(1), cm.Params()
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    for _ in range(2):    # the second call takes the lean path
        loss, out = cm.backward(p, x, y, grads=g)
        assert out is g
        _same((loss, out), _ref(npm, p, x, y))
    assert cm._LAST[1] is g and cm._LAST[0] is p
    x[0, 0] = 3.0                      # contents
    p.flat[0] += 0.5                   # parameters updated in place
    _same(cm.backward(p, x, y, grads=g), _ref(npm, p, x, y))
    p["W1"] = p["W1"] * 2              # an entry replaced: the Params is an ordinary dict now
    _same(cm.backward(p, x, y, grads=g), _ref(npm, p, x, y))


def test_in_place_dtype_and_shape_changes_are_checked(mods):
    cm, npm = mods
    rng = np.random.default_rng(1)
    p, g = cm.init_params(2), cm.Params()
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    cm.backward(p, x, y, grads=g)
    cm.backward(p, x, y, grads=g)
    y.shape = (2, 4)                   # same data, another shape: refused as by the full path
    with pytest.raises(ValueError, match="shape"):
        cm.backward(p, x, y, grads=g)
    y.shape = (4, 2)
    _same(cm.backward(p, x, y, grads=g), _ref(npm, p, x, y))
    x.dtype = np.int64                 # the same bytes read as integers: converted, as by the full path
    _same(cm.backward(p, x, y, grads=g), _ref(npm, p, x.astype(np.float64), y))
    x.dtype = np.float64
    cm.backward(p, x, y, grads=g)      # (remembered again: the last call used a converted copy)
    assert cm._LAST[2] is x
    with pytest.raises(ValueError):    # numpy refuses to resize an array something refers to
        x.resize((8, 3))


def test_other_objects_and_errors_take_the_full_path(mods):
    cm, npm = mods
    rng = np.random.default_rng(2)
    p, g = cm.init_params(3), cm.Params()
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    cm.backward(p, x, y, grads=g)
    x2 = x.copy()
    x2[1] = -1
    _same(cm.backward(p, x2, y, grads=g), _ref(npm, p, x2, y))
    g["W1"] = np.zeros((3, 5))         # a gradient buffer whose arrays were replaced
    with pytest.raises(ValueError, match="arrays were replaced"):
        cm.backward(p, x2, y, grads=g)
    fresh = cm.backward(p, x2, y)      # no grads=: a result of its own, never the kept buffer
    assert fresh[1] is not g
    _same(fresh, _ref(npm, p, x2, y))


def test_fresh_results_take_the_lean_path_too(mods):
    cm, npm = mods
    rng = np.random.default_rng(4)
    p = cm.init_params(4)
    x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    first = cm.backward(p, x, y)
    assert cm._LAST[0] is p and cm._LAST[1] is None and cm._LAST[2] is x   # not the result
    want = _ref(npm, p, x, y)
    _same(first, want)
    x[0, 0] = 3.0                      # the lean path, contents changed: a result of its own
    second = cm.backward(p, x, y)
    assert second[1] is not first[1]
    _same(first, want)                 # the kept result is never changed by a later call
    _same(second, _ref(npm, p, x, y))
    del first, second
    ids = {id(cm.backward(p, x, y)[1]) for _ in range(6)}
    assert len(ids) <= 2               # results nothing refers to are recycled (a ring of two)
    p.flat[0] += 0.5
    _same(cm.backward(p, x, y), _ref(npm, p, x, y))
    y.shape = (2, 4)
    with pytest.raises(ValueError, match="shape"):
        cm.backward(p, x, y)
    y.shape = (4, 2)
    _same(cm.backward(p, x, y), _ref(npm, p, x, y))
    x.dtype = np.int64
    _same(cm.backward(p, x, y), _ref(npm, p, x.astype(np.float64), y))
    x.dtype = np.float64
    g = cm.Params()                    # a kept buffer after fresh calls, and fresh calls after it
    _same(cm.backward(p, x, y, grads=g), _ref(npm, p, x, y))
    assert cm.backward(p, x, y)[1] is not g
    assert cm.backward(p, x, y, grads=g)[1] is g
    p["W1"] = p["W1"] * 2              # an entry replaced: the full path, every call
    _same(cm.backward(p, x, y), _ref(npm, p, x, y))
    _same(cm.backward(p, x, y), _ref(npm, p, x, y))


def test_parameters_and_gradients_in_one_buffer(mods):
    cm, npm = mods
    p, g = cm.init_buffers(seed=4)
    base = p.flat.base
    assert base is not None and g.flat.base is base and base.shape == (2 * cm.NUM_PARAMS + 1,)
    assert all(np.array_equal(p[k], v) for k, v in cm.init_params(4).items())
    assert all(np.shares_memory(p[k], base) and np.shares_memory(g[k], base) for k in cm.PARAMS)
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    for _ in range(2):
        loss, out = cm.backward(p, x, y, grads=g)
        assert out is g
    _same((loss, out), _ref(npm, p, x, y))
    np.testing.assert_array_equal(base[cm.NUM_PARAMS:2 * cm.NUM_PARAMS], g.flat)
    before = p.flat.copy()
    cm.sgd_step(p, g, lr=0.1)
    np.testing.assert_allclose(p.flat, before - 0.1 * g.flat, rtol=1e-15)
