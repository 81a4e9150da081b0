"""Every model of the table: generated backward == float64 central finite differences, and the
generated loss == an independent evaluation of the model."""
import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from compiler.gradcheck import check_gradients, random_batch
from model_table import MODELS


@pytest.fixture(scope="module")
def modules():
    cache = {}

    def get(model_id):
        if model_id not in cache:
            cache[model_id] = bpc.compile_model(dict(MODELS)[model_id]()).load()
        return cache[model_id]
    return get


@pytest.mark.parametrize("model_id", [m[0] for m in MODELS])
@pytest.mark.parametrize("batch", [1, 7])
def test_backward_matches_finite_differences(modules, model_id, batch):
    mod = modules(model_id)
    params = mod.init_params(seed=3)
    rng = np.random.default_rng(11)
    # move every parameter off its initial value, so that zero biases test nothing special
    params = {k: v + 0.3 * rng.standard_normal(np.shape(v)) for k, v in params.items()}
    arrays = random_batch(mod, batch=batch, seed=5)
    rows = check_gradients(mod, params, arrays, rtol=1e-6, atol=1e-9)
    bad = [r for r in rows if not r.ok]
    assert not bad, bad
    # the check itself can fail: a wrong gradient is caught
    loss, grads = mod.backward(params, *arrays)
    name = next(iter(grads))
    broken = type(mod)("broken")
    broken.__dict__.update(mod.__dict__)
    broken.backward = lambda p, *a: (loss, {**grads, name: np.asarray(grads[name]) + 1e-3})
    assert not all(r.ok for r in check_gradients(broken, params, arrays, rtol=1e-6, atol=1e-9))


@pytest.mark.parametrize("model_id", [m[0] for m in MODELS])
def test_backward_returns_the_loss_and_every_param(modules, model_id):
    mod = modules(model_id)
    params = mod.init_params(seed=0)
    arrays = random_batch(mod, batch=4, seed=1)
    loss, grads = mod.backward(params, *arrays)
    assert loss == pytest.approx(mod.loss(params, *arrays), rel=1e-12, abs=1e-15)
    assert list(grads) == list(mod.PARAMS)
    for k, shape in mod.PARAMS.items():
        assert np.shape(grads[k]) == shape
        assert np.shape(params[k]) == shape


def _mlp_reference(params, x, act, depth):
    h = x
    for i in range(1, depth + 1):
        z = h @ params[f"W{i}"] + params[f"b{i}"]
        h = act(z) if i < depth else z
    return h


def test_mlp_mse_loss_matches_numpy_reference(modules):
    mod = modules("mlp_tanh_mse")
    params = mod.init_params(seed=1)
    x, y = random_batch(mod, batch=9, seed=2)
    out = _mlp_reference(params, x, np.tanh, 3)
    np.testing.assert_allclose(mod.forward(params, x), out, rtol=1e-13)
    assert mod.loss(params, x, y) == pytest.approx(np.mean((out - y) ** 2), rel=1e-13)


def test_softmax_loss_matches_numpy_reference(modules):
    mod = modules("softmax_labels")
    params = mod.init_params(seed=1)
    x, y = random_batch(mod, batch=9, seed=2)
    z = _mlp_reference(params, x, np.tanh, 2)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(mod.forward(params, x), p, rtol=1e-12)
    assert mod.loss(params, x, y) == pytest.approx(-np.mean(np.log(p[np.arange(9), y])), rel=1e-12)


def test_onehot_and_label_targets_agree():
    a = bpc.compile_model(bpc.mlp([4, 5, 3], "tanh", "softmax_cross_entropy", name="lab")).load()
    b = bpc.compile_model(bpc.mlp([4, 5, 3], "tanh", "softmax_cross_entropy", target_kind="onehot",
                                  name="hot")).load()
    params = a.init_params(seed=4)
    x = np.random.default_rng(0).standard_normal((6, 4))
    labels = np.array([0, 2, 1, 1, 0, 2])
    la, ga = a.backward(params, x, labels)
    lb, gb = b.backward(params, x, np.eye(3)[labels])
    assert la == pytest.approx(lb, rel=1e-14)
    for k in ga:
        np.testing.assert_allclose(ga[k], gb[k], rtol=1e-13, atol=1e-15)


def test_bce_loss_matches_reference(modules):
    mod = modules("bce_logits")
    params = mod.init_params(seed=1)
    x, y = random_batch(mod, batch=8, seed=2)
    z = _mlp_reference(params, x, np.tanh, 2)
    s = 1 / (1 + np.exp(-z))
    ref = -np.mean(y * np.log(s) + (1 - y) * np.log(1 - s))
    assert mod.loss(params, x, y) == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(mod.forward(params, x), s, rtol=1e-12)


@pytest.mark.parametrize("model_id", ["poly_fit", "expr_multi"])
def test_expression_model_loss_matches_sympy(modules, model_id):
    model = dict(MODELS)[model_id]()
    mod = modules(model_id)
    params = mod.init_params(seed=0)
    arrays = random_batch(mod, batch=6, seed=3)
    # evaluate the user's own expressions sample by sample with SymPy
    if model_id == "poly_fit":
        a, b, c, d, x = sp.symbols("a b c d x")
        pred = a * x**3 + b * x**2 + c * x + d
        loss = lambda p, y: (p - y) ** 2  # noqa: E731
        data = {"x": arrays[0]}
        y = arrays[1]
    else:
        w, k, s, x1, x2 = sp.symbols("w k s x1 x2")
        pred = w * sp.sin(k * x1) + sp.exp(-s**2 * x2**2) + sp.log(1 + sp.exp(w * x2))
        loss = lambda p, y: sp.log(sp.cosh(p - y)) + sp.Rational(1, 100) * w**2  # noqa: E731
        data = {"x1": arrays[0], "x2": arrays[1]}
        y = arrays[2]
    subs_p = {sp.Symbol(k): float(v) for k, v in params.items()}
    total = 0.0
    for i in range(len(y)):
        subs = {**subs_p, **{sp.Symbol(k): float(v[i]) for k, v in data.items()}}
        p = pred.subs(subs)
        total += float(loss(p, float(y[i])).subs(subs_p))
    assert mod.loss(params, *arrays) == pytest.approx(total / len(y), rel=1e-12)
    assert list(mod.PARAMS) == [p.name for p in model.params]
