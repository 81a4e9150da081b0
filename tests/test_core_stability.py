"""Numerical stability: inputs and pre-activations at +-1000 give finite losses and gradients
on every target in float64 and float32 (float32 against float64: tests/test_core_gradients.py)."""
import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from compiler.gradcheck import random_batch
from model_table import ROWS, STABLE_MODELS, build


@pytest.mark.parametrize("row", [r.param() for r in ROWS])
@pytest.mark.parametrize("model_id", [m[0] for m in STABLE_MODELS])
def test_extreme_inputs_give_finite_loss_and_gradients(model_id, row):
    mod = build(model_id, row.backend, row.compiled)
    dtype = np.dtype(row.dtype)
    params = {k: np.asarray(v, dtype=dtype) for k, v in mod.init_params(seed=0).items()}
    arrays = random_batch(mod, batch=6, seed=1)
    n_in = len(mod.INPUTS)
    for sign in (1.0, -1.0):
        data = [np.sign(a + 1e-9 * (a == 0)).astype(dtype) * 1000 * sign for a in arrays[:n_in]]
        args = data + [a.astype(dtype) if a.dtype.kind == "f" else a for a in arrays[n_in:]]
        loss, grads = mod.backward(params, *args)
        assert np.isfinite(loss), (model_id, sign, loss)
        for k, g in grads.items():
            assert np.all(np.isfinite(g)), (model_id, sign, k)
            assert np.asarray(g).dtype == dtype, (k, np.asarray(g).dtype)


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "bce_with_logits"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_logits_at_1000(loss, dtype):
    # a single linear layer whose logits reach +-1000 exactly
    mod = bpc.compile_model(bpc.mlp([1, 3], loss=loss, name="lin")).load()
    params = {"W1": np.array([[1000.0, -1000.0, 0.0]], dtype=dtype), "b1": np.zeros(3, dtype=dtype)}
    x = np.array([[1.0], [-1.0]], dtype=dtype)
    y = np.array([1, 0]) if loss.startswith("softmax") else np.array([[0, 1, 1], [1, 0, 1]], dtype=dtype)
    value, grads = mod.backward(params, x, y)
    assert np.isfinite(value) and value > 100
    assert all(np.all(np.isfinite(g)) for g in grads.values())


def test_handwritten_unstable_forms_are_rewritten():
    x = sp.Symbol("x")
    for act in (sp.log(1 + sp.exp(x)), 1 / (1 + sp.exp(-x)), sp.exp(x) / (1 + sp.exp(x)),
                sp.log(1 / (1 + sp.exp(-x)))):
        src = bpc.compile_model(bpc.mlp([1, 2, 1], activation=act, name="h")).source
        assert "np.exp(" not in src.split("def forward")[1], (act, src)
    # SymPy's own derivative of log(1 + exp(x)) is exp(x)/(exp(x) + 1): nan at 1000
    mod = bpc.compile_model(bpc.mlp([1, 2, 1], activation=sp.log(1 + sp.exp(x)), name="h")).load()
    params = {"W1": np.array([[1.0, -1.0]]), "b1": np.zeros(2), "W2": np.ones((2, 1)), "b2": np.zeros(1)}
    value, grads = mod.backward(params, np.array([[1000.0]]), np.array([[0.0]]))
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads.values())
    np.testing.assert_allclose(grads["b1"], [2 * 1000.0, 0.0], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_log_cosh_loss_stays_finite(dtype):
    p, y = sp.symbols("p y")
    mod = bpc.compile_model(bpc.mlp([1, 1], "identity", loss=sp.log(sp.cosh(p - y)), name="lc")).load()
    params = {"W1": np.array([[1000.0]], dtype=dtype), "b1": np.zeros(1, dtype=dtype)}
    value, grads = mod.backward(params, np.array([[1.0], [-1.0]], dtype=dtype), np.zeros((2, 1), dtype=dtype))
    assert value == pytest.approx(1000 - np.log(2), rel=1e-6)
    np.testing.assert_allclose(grads["W1"], [[1.0]], rtol=1e-6)


def test_dtype_option_casts_inputs():
    mod = bpc.compile_model(bpc.mlp([2, 3, 1], name="f32"), dtype="float32").load()
    assert mod.DTYPE == "float32"
    params = mod.init_params()
    assert all(v.dtype == np.float32 for v in params.values())
    out = mod.forward(params, np.ones((4, 2)))          # float64 data is cast
    assert out.dtype == np.float32
    loss, grads = mod.backward(params, [[1, 2]], [[3]])  # lists and integers too
    assert isinstance(loss, float) and grads["W1"].dtype == np.float32


def _rows_in_every_regime(dtype):
    """Rows of logits (9, 6): ordinary, large (exp overflows), very negative (exp underflows),
    mixed scales, a fully masked row, and ties; the reference softmax shifts by the row maximum."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((9, 6))
    z[1] += 1000.0
    z[2] -= 1000.0
    z[3] *= 300.0
    z[4] = -1e9
    z[5, :3] = 500.0
    z[6] = z[6] * 30 - 80          # float32: some entries underflow, the row sum stays normal
    z[7] = np.linspace(-120, 60, 6)
    return z.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_and_logsumexp_helpers_in_every_regime(dtype):
    # the helpers shift rows by 0 where that is safe and by the row maximum elsewhere: against
    # the row-maximum form in float64, and each row's result independent of the other rows
    net = bpc.Network("sm_helpers")
    h = net.attention(net.input("x", shape=(4, 6)), 2, causal=True)
    mod = bpc.compile_model(net.build(h, "softmax_cross_entropy",
                                      net.target("y", kind="label", length=4))).load()
    z = _rows_in_every_regime(dtype)
    z64 = z.astype(np.float64)
    e = np.exp(z64 - z64.max(axis=1, keepdims=True))
    want = e / e.sum(axis=1, keepdims=True)
    want_lse = z64.max(axis=1) + np.log(e.sum(axis=1))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    stacked = np.stack([z, z[::-1]])          # (2, 9, 6): the rows of a sequence, reversed
    for got in (mod._softmax_into(z, np.empty_like(z)), mod._softmax_into(stacked, np.empty_like(stacked))[1][::-1]):
        assert got.dtype == dtype and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=tol * 10, atol=tol)
    lse = mod._logsumexp(z)
    assert lse.dtype == dtype
    np.testing.assert_allclose(lse, want_lse, rtol=tol, atol=tol)
    # a row's value does not depend on its neighbours, bit for bit
    for i in range(len(z)):
        assert np.array_equal(mod._softmax_into(z[i:i + 1], np.empty_like(z[i:i + 1]))[0],
                              mod._softmax_into(z, np.empty_like(z))[i])
        assert np.array_equal(mod._logsumexp(z[i:i + 1])[0], lse[i])
