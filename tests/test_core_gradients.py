"""The product table: every model x every target (NumPy, C; compiled for float64, float32,
or, for NumPy, following the inputs) x data dtype x batch size.

float64: generated ``backward`` == central finite differences of ``loss``; float32: loss and
gradients == the same target's float64 result at a float32 tolerance; the two backends agree
in each dtype. Plus, on every float64 target: the generated loss == an independent evaluation
of the model."""
import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from compiler.gradcheck import check_gradients, format_table, random_batch
from model_table import (BATCHES, MODELS, NEEDS_CC, PRECISIONS, ROWS, as_dtype, build, float32_mismatches,
                         perturbed, rel_err)

MODEL_IDS = [m[0] for m in MODELS]


@pytest.fixture(params=[r.param() for r in ROWS if r.dtype == "float64"])
def modules(request):
    """model id -> its module on each float64 target (for the reference checks below)."""
    return lambda model_id: build(model_id, request.param.backend, request.param.compiled)


def _inputs(row, model_id, batch):
    """(module, params, data) for a row: parameters and data drawn in float64 (from the float64
    module), then rounded to the row's dtype."""
    ref = build(model_id, row.backend, row.reference.compiled)
    params = perturbed(ref, seed=3 + batch, dtype=row.dtype)
    arrays = as_dtype(random_batch(ref, batch=batch, seed=5 + batch), row.dtype)
    return build(model_id, row.backend, row.compiled), params, arrays


def _broken(mod, params, arrays, offset):
    """``mod`` with one gradient off by ``offset`` (times its largest magnitude, at least 1):
    what the checks below must catch."""
    loss, grads = mod.backward(params, *arrays)
    name = next(iter(grads))
    g = np.asarray(grads[name])
    wrong = {**grads, name: g + np.asarray(offset * max(1.0, float(np.max(np.abs(g)))), g.dtype)}
    broken = type(mod)("broken")
    broken.__dict__.update(mod.__dict__)
    broken.backward = lambda p, *a: (loss, wrong)
    return broken


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("row", [r.param() for r in ROWS])
@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_gradients(model_id, row, batch):
    mod, params, arrays = _inputs(row, model_id, batch)
    precision = PRECISIONS[row.dtype]
    loss, grads = mod.backward(params, *arrays)
    assert isinstance(loss, float) and np.isfinite(loss)
    assert list(grads) == list(mod.PARAMS)
    init = mod.init_params(0)
    for k, shape in mod.PARAMS.items():
        assert np.shape(init[k]) == shape and init[k].dtype == np.dtype(row.compiled or "float64"), k
        assert np.shape(grads[k]) == shape and np.asarray(grads[k]).dtype == np.dtype(row.dtype), k
    assert loss == pytest.approx(mod.loss(params, *arrays), rel=1e-12 if row.dtype == "float64" else 1e-6)
    for out in _outputs(mod, mod.forward(params, *arrays[:len(mod.INPUTS)])):
        assert np.asarray(out).dtype == np.dtype(row.dtype)
    if row.dtype == "float64":
        rows = check_gradients(mod, params, arrays, rtol=precision.rtol, atol=precision.atol)
        assert rows and all(r.ok for r in rows), "\n" + format_table(rows)
        # the check itself can fail: a wrong gradient is caught
        broken = _broken(mod, params, arrays, 1e-4)
        assert not all(r.ok for r in check_gradients(broken, params, arrays, rtol=precision.rtol,
                                                     atol=precision.atol))
    else:
        ref = build(model_id, row.backend, row.reference.compiled)
        assert float32_mismatches(mod, ref, params, arrays, precision) == []
        assert float32_mismatches(_broken(mod, params, arrays, 1e-2), ref, params, arrays, precision) != []


@NEEDS_CC
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", list(PRECISIONS))
@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_backends_agree(model_id, dtype, batch):
    """The NumPy and C modules compiled for one dtype: same interface, same initial
    parameters, and loss, gradients and predictions equal to ``agree`` (relative to the
    largest magnitude)."""
    npm, cm = build(model_id, "numpy", dtype), build(model_id, "c", dtype)
    tol = PRECISIONS[dtype].agree
    assert cm.PARAMS == npm.PARAMS and cm.INPUTS == npm.INPUTS and cm.TARGETS == npm.TARGETS
    assert cm.TARGET_KINDS == npm.TARGET_KINDS and cm.CLASSES == npm.CLASSES and cm.FORMULAS == npm.FORMULAS
    assert cm.DTYPE == npm.DTYPE == dtype
    init_c, init_np = cm.init_params(7), npm.init_params(7)
    assert set(init_c) == set(init_np)
    for k in init_np:
        np.testing.assert_array_equal(init_c[k], init_np[k])
    params = perturbed(npm, seed=batch, dtype=dtype)
    arrays = as_dtype(random_batch(npm, batch=batch, seed=batch), dtype)
    np_loss, np_grads = npm.backward(params, *arrays)
    c_loss, c_grads = cm.backward(params, *arrays)
    assert rel_err(c_loss, np_loss) <= tol
    assert abs(cm.loss(params, *arrays) - c_loss) <= 1e-12 * abs(c_loss)
    for k in np_grads:
        assert np.shape(c_grads[k]) == np.shape(np_grads[k]), k
        assert rel_err(c_grads[k], np_grads[k]) <= tol, k
    x = arrays[:len(npm.INPUTS)]
    assert getattr(cm, "OUTPUTS", None) == getattr(npm, "OUTPUTS", None)
    got, want = _outputs(cm, cm.forward(params, *x)), _outputs(npm, npm.forward(params, *x))
    assert len(got) == len(want)
    for c_out, np_out in zip(got, want):
        assert c_out.shape == np_out.shape and rel_err(c_out, np_out) <= tol


def _outputs(module, out):
    """forward's result as a tuple: one array per output of OUTPUTS, or the one array."""
    if hasattr(module, "OUTPUTS"):
        assert isinstance(out, tuple) and len(out) == len(module.OUTPUTS)
        return out
    assert isinstance(out, np.ndarray)
    return (out,)


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
