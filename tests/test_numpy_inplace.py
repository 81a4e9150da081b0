"""The NumPy backend's fast paths on wide models (>= NumpyStatements.INPLACE_MIN_SIZE numbers per
sample): statements that update a dead buffer in place and per-thread scratch arrays must give
the same numbers as the plain one-expression form, never hand the caller an array that a later
call overwrites, and stay correct when threads call one module at once."""
import threading

import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from compiler.backends.numpy.statements import NumpyStatements

W = 40   # wider than INPLACE_MIN_SIZE
x_ = sp.Symbol("x")
CASES = [
    ("tanh", "softmax_cross_entropy"), ("relu", "mse"), ("sigmoid", "bce"), ("softplus", "mse"),
    ("swish", "softmax_cross_entropy"), ("gelu", "mse"), (x_ / (1 + sp.exp(-1.5 * x_)), "mse"),
    (x_**3 / 10 + x_, "mse"),
]


def _model(act, loss, name):
    out = 5 if loss == "softmax_cross_entropy" else (1 if loss == "bce" else W)
    return bpc.mlp([7, W, W, out], act, loss, name=name)


def _plain(model):
    old = NumpyStatements.INPLACE_MIN_SIZE
    NumpyStatements.INPLACE_MIN_SIZE = 10**9
    try:
        return bpc.compile_model(model).load()
    finally:
        NumpyStatements.INPLACE_MIN_SIZE = old


def _data(mod, n, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 7)).astype(dtype)
    (name, shape), = mod.TARGETS.items()
    if mod.TARGET_KINDS[name] == "label":
        y = rng.integers(0, mod.CLASSES[name], n)
    elif "bce" in mod.__name__:
        y = rng.integers(0, 2, (n,) + shape).astype(dtype)
    else:
        y = rng.standard_normal((n,) + shape).astype(dtype)
    return x, y


@pytest.mark.parametrize("act,loss", CASES, ids=[f"{a}-{l}" for a, l in CASES])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inplace_form_equals_plain_form(act, loss, dtype):
    model = _model(act, loss, f"ip_{loss}")
    fast, plain = bpc.compile_model(model).load(), _plain(model)
    assert "out=" in bpc.compile_model(model).source
    p = fast.init_params(seed=1, dtype=dtype)
    for n in (3, 16, 3):   # a batch size seen again after another one
        x, y = _data(fast, n, dtype, seed=n)
        lf, gf = fast.backward(p, x, y)
        lp, gp = plain.backward(p, x, y)
        tol = 1e-4 if dtype == np.float32 else 1e-12
        assert np.isclose(lf, lp, rtol=tol, atol=tol)
        for k in gp:
            assert gf[k].dtype == gp[k].dtype == dtype
            np.testing.assert_allclose(gf[k], gp[k], rtol=tol, atol=tol)
        np.testing.assert_allclose(fast.forward(p, x), plain.forward(p, x), rtol=tol, atol=tol)
        assert np.isclose(fast.loss(p, x, y), lp, rtol=tol, atol=tol)


def _graph_model():
    """Wide residuals, a gate and a concat: in the backward pass an adjoint sum is the factor of
    a product (dZ = (t + dH)*(1 - H*H)), whose sum goes into the dead buffer of t."""
    net = bpc.Network("ip_graph")
    x = net.input("x", 7)
    h0 = net.dense(x, W, "tanh")
    h1 = net.dense(h0, W, "tanh") + h0
    h2 = net.multiply(net.dense(h1, W, "tanh") + h1, net.dense(x, W, "sigmoid"))
    out = net.dense(net.concat(h2, h0), 5)
    return net.build(out, "softmax_cross_entropy", net.target("y", kind="label"))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inplace_graph_equals_plain_form(dtype):
    model = _graph_model()
    fast, plain = bpc.compile_model(model).load(), _plain(model)
    p = fast.init_params(seed=1, dtype=dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for n in (3, 16):
        x, y = _data(fast, n, dtype, seed=n)
        lf, gf = fast.backward(p, x, y)
        lp, gp = plain.backward(p, x, y)
        assert np.isclose(lf, lp, rtol=tol, atol=tol)
        for k in gp:
            np.testing.assert_allclose(gf[k], gp[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy"])
def test_results_are_not_overwritten_by_later_calls(loss):
    mod = bpc.compile_model(_model("tanh", loss, f"keep_{loss}")).load()
    p = mod.init_params(seed=0)
    x1, y1 = _data(mod, 8, np.float64, 1)
    x2, y2 = _data(mod, 8, np.float64, 2)
    pred, (_, grads) = mod.forward(p, x1), mod.backward(p, x1, y1)
    kept = pred.copy(), {k: g.copy() for k, g in grads.items()}
    mod.forward(p, x2), mod.backward(p, x2, y2), mod.loss(p, x2, y2)
    np.testing.assert_array_equal(pred, kept[0])
    for k in grads:
        np.testing.assert_array_equal(grads[k], kept[1][k])
    assert not any(np.shares_memory(a, b) for a in [pred, *grads.values()] for b in (x1, y1))


def test_threads_do_not_share_scratch_arrays():
    mod = bpc.compile_model(_model("tanh", "softmax_cross_entropy", "threads")).load()
    assert "_scratch(" in bpc.compile_model(_model("tanh", "softmax_cross_entropy", "threads")).source
    p = mod.init_params(seed=0)
    batches = [_data(mod, 64, np.float64, s) for s in range(4)]
    expected = [mod.backward(p, x, y) for x, y in batches]
    errors = []

    def work(i):
        x, y = batches[i]
        for _ in range(30):
            value, grads = mod.backward(p, x, y)
            if value != expected[i][0] or any(not np.array_equal(grads[k], expected[i][1][k]) for k in grads):
                errors.append(i)
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_small_models_keep_the_one_line_form():
    src = bpc.compile_model(bpc.mlp([2, 3, 1], "tanh", name="small")).source
    assert "out=" not in src and "_scratch" not in src and "import threading" not in src


def test_large_arrays_are_not_kept_between_calls():
    mod = bpc.compile_model(_model("tanh", "mse", "large")).load()
    p = mod.init_params(seed=0)
    mod._SCRATCH_LIMIT = 8 * W * 8   # arrays of up to 8 float64 samples
    small, large = _data(mod, 8, np.float64, 1), _data(mod, 9, np.float64, 2)
    value = mod.backward(p, *small)[0]
    mod.backward(p, *large)
    kept = vars(mod._SCRATCH)
    assert kept and all(a.shape[0] == 8 for a in kept.values())
    assert mod.backward(p, *small)[0] == value


def _sequence_model(causal, mask, name):
    """ids -> embedding 40 -> positions -> transformer block (2 heads, mlp 48) -> layernorm ->
    logits per position: products feeding reshapes and head permutations, masks, the softmax
    over keys, the row sums of the layer norms and the softmax adjoint all take the fast paths."""
    net = bpc.Network(name)
    x = net.input("x", kind="ids", length=8)
    m = net.input("m", 8) if mask else None
    h = net.transformer_block(net.positional(net.embedding(x, 7, W)), 2, mlp=48, causal=causal, mask=m)
    z = net.dense(net.layernorm(h), 7)
    return net.build(z, "softmax_cross_entropy", net.target("y", kind="label", length=8), loss_mask=m)


@pytest.mark.parametrize("causal,mask", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inplace_sequence_model_equals_plain_form(causal, mask, dtype):
    model = _sequence_model(causal, mask, f"ip_seq_{int(causal)}{int(mask)}")
    source = bpc.compile_model(model).source
    for fast_path in ("_softmax_into(", "np.copyto(", "np.einsum(", ".transpose((0, 2, 1, 3)))"):
        assert fast_path in source, fast_path
    fast, plain = bpc.compile_model(model).load(), _plain(model)
    p = fast.init_params(seed=1, dtype=dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    rng = np.random.default_rng(0)
    for n in (3, 5, 3):
        arrays = [rng.integers(0, 7, (n, 8))]
        if mask:
            arrays.append(np.array([[1.0] * (8 - k % 8) + [0.0] * (k % 8) for k in range(n)], dtype))
        arrays.append(rng.integers(0, 7, (n, 8)))
        lf, gf = fast.backward(p, *arrays)
        lp, gp = plain.backward(p, *arrays)
        assert np.isclose(lf, lp, rtol=tol, atol=tol)
        for k in gp:
            assert gf[k].dtype == dtype
            np.testing.assert_allclose(gf[k], gp[k], rtol=tol, atol=tol)
        # the results are the caller's: a later call with other data changes none of them
        kept = {k: g.copy() for k, g in gf.items()}
        pred = fast.forward(p, *arrays[:-1])
        fast.backward(p, *[a[::-1].copy() for a in arrays])
        assert all(np.array_equal(gf[k], kept[k]) for k in kept)
        assert np.array_equal(pred, fast.forward(p, *arrays[:-1]))


def test_values_are_overwritten_at_their_last_use():
    """GELU's derivative is the last statement to read Z and tanh(...) (the forward statements
    read them first): it works in their arrays and needs one temporary, not two. The numbers:
    test_inplace_form_equals_plain_form."""
    back = bpc.compile_model(_model("gelu", "mse", "last_use")).source.split("def backward")[1]
    back = back.split("\ndef ")[0]
    assert "_dZ2_0 = " in back and "_dZ2_1" not in back, back
    assert "Z2 *= Z2" in back, back


def _residual_output_model():
    """The prediction is h + dense(h): the last use of h, but a value the caller keeps."""
    net = bpc.Network("ip_last_out")
    h = net.dense(net.input("x", 7), W, "tanh")
    return net.build(h + net.dense(h, W), "mse", net.target("y", W))


def test_a_last_use_never_puts_a_result_in_a_reused_array():
    model = _residual_output_model()
    fast, plain = bpc.compile_model(model).load(), _plain(model)
    p = fast.init_params(seed=0)
    x1, y1 = _data(fast, 8, np.float64, 1)
    x2, y2 = _data(fast, 8, np.float64, 2)
    pred, (_, grads) = fast.forward(p, x1), fast.backward(p, x1, y1)
    np.testing.assert_allclose(pred, plain.forward(p, x1), rtol=1e-12, atol=1e-12)
    kept = pred.copy(), {k: g.copy() for k, g in grads.items()}
    fast.forward(p, x2), fast.backward(p, x2, y2), fast.loss(p, x2, y2)
    np.testing.assert_array_equal(pred, kept[0])
    for k in grads:
        np.testing.assert_array_equal(grads[k], kept[1][k])
