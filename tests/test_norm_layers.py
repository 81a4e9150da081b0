"""Normalisation layers (``layernorm``, ``rmsnorm``): values against a NumPy reference on both
targets, constant inputs (variance 0 plus epsilon) with finite values and gradients that match
central differences, a backward that reuses the forward's ``R = 1/sqrt(V + eps)`` instead of
recomputing it, the Python API's and the spec loader's errors. The gradients on random data,
every dtype and batch size are the model table's rows ``layernorm`` and ``rmsnorm``."""
from dataclasses import replace

import numpy as np
import pytest

import compiler as bpc
from compiler.errors import BpcError
from compiler.gradcheck import check_gradients
from compiler.spec.loader import SpecError, loads_spec
from model_table import BACKENDS, NEEDS_CC

KINDS = ("layernorm", "rmsnorm")


def _reference(kind, x, g, s, eps):
    if kind == "layernorm":
        c = x - x.mean(axis=-1, keepdims=True)
        return c / np.sqrt((c * c).mean(axis=-1, keepdims=True) + eps) * g + s
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * g


def _norm_alone(kind, width=4, eps=1e-5):
    """x -> norm: forward returns the norm's output itself."""
    net = bpc.Network(f"{kind}_alone")
    h = getattr(net, kind)(net.input("x", width), eps=eps)
    return net.build(h, "mse", net.target("y", width))


def _dense_norm(kind, eps=1e-5):
    """x -> dense -> norm -> dense: the gradient of W1 flows through the norm's backward."""
    net = bpc.Network(f"{kind}_deep")
    h = net.dense(net.input("x", 3), 4)
    h = getattr(net, kind)(h, eps=eps)
    return net.build(net.dense(h, 2, "tanh"), "mse", net.target("y", 2))


def _load(model, backend):
    if backend == "numpy":
        return bpc.compile_model(model, "float64").load()
    return bpc.compile_model_c(model, dtype="float64").load()


BACKEND_PARAMS = [pytest.param(b, marks=NEEDS_CC if b == "c" else ()) for b in BACKENDS]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_values_match_the_definition(kind, backend, eps):
    m = _load(_norm_alone(kind, 5, eps), backend)
    rng = np.random.default_rng(0)
    params = {k: np.array(v) for k, v in m.init_params().items()}
    assert params["g1"].tolist() == [1.0] * 5                      # scale starts at one
    if kind == "layernorm":
        assert params["s1"].tolist() == [0.0] * 5                  # shift at zero
    else:
        assert set(params) == {"g1"}                               # rmsnorm: a scale, no shift
    params["g1"] = rng.normal(size=5)
    if kind == "layernorm":
        params["s1"] = rng.normal(size=5)
    x = 3 * rng.normal(size=(7, 5)) + 2
    out = m.forward(params, x)
    np.testing.assert_allclose(out, _reference(kind, x, params["g1"], params.get("s1", 0), eps),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("level", [0.0, 1.0, -1e3])
def test_constant_inputs_give_finite_values_and_gradients(kind, backend, level):
    # every feature of the norm's input equal: layernorm's variance is 0 and R = 1/sqrt(eps)
    m = _load(_dense_norm(kind, eps=1e-3), backend)
    rng = np.random.default_rng(1)
    params = {k: np.array(v) for k, v in m.init_params(seed=2).items()}
    params["W1"] = np.tile(rng.normal(size=(3, 1)), (1, 4))          # equal columns ...
    params["b1"] = np.zeros(4)                                       # ... so equal features
    x = np.full((6, 3), level) if level else rng.normal(size=(6, 3))
    x[:, 1:] = x[:, :1]
    y = rng.normal(size=(6, 2))
    loss, grads = m.backward(params, x, y)
    assert np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in grads.values())
    if kind == "layernorm":     # a constant row normalises to 0: the output is the shift
        inner = _load(_norm_alone(kind, 4, 1e-3), backend)
        shift = rng.normal(size=4)
        out = inner.forward({"g1": rng.normal(size=4), "s1": shift}, np.full((3, 4), level))
        np.testing.assert_array_equal(out, np.tile(shift, (3, 1)))
    # the derived gradient at this point (the kink-free centre of the norm) is the true one
    if level != -1e3:           # at -1000 central differences of the loss lose their digits
        rows = check_gradients(m, params, [x, y], rtol=1e-6, atol=1e-9)
        assert all(r.ok for r in rows), rows


@pytest.mark.parametrize("kind", KINDS)
def test_backward_reuses_the_forward_reciprocal_root(kind):
    compiled = bpc.compile_model(_dense_norm(kind))
    formulas = compiled.formulas["W1"]
    # dV = dR * d(1/sqrt(V + eps))/dV = -R**3/2 * dR, from the forward's R: no new root
    assert "dV2 = -R2**3*dR2/2" in formulas, formulas
    assert "sqrt" not in formulas
    text = compiled.source.split("def backward")[1].split("\ndef ")[0]
    assert text.count("np.sqrt") == 1       # the forward's R2, computed once in backward too
    assert "R2 = 1/np.sqrt(V2 + 1e-05)" in text


@pytest.mark.parametrize("call,message", [
    (lambda net, h: net.layernorm(h, eps=0), "layernorm eps must be a positive number, got 0"),
    (lambda net, h: net.rmsnorm(h, eps=-1e-5), "rmsnorm eps must be a positive number"),
    (lambda net, h: net.layernorm(h, eps=float("nan")), "must be a positive number, got nan"),
    (lambda net, h: net.layernorm(h, eps=float("inf")), "must be a positive number, got inf"),
    (lambda net, h: net.layernorm(h, eps="1e-5"), "must be a positive number, got '1e-5'"),
    (lambda net, h: net.layernorm(h, eps=True), "must be a positive number, got True"),
    (lambda net, h: net.layernorm(net.input("u", 1)), "layernorm over a single feature"),
    (lambda net, h: net.rmsnorm(net.input("u")), "rmsnorm needs a (batch, ..., features) input, got (n,)"),
])
def test_api_errors(call, message):
    net = bpc.Network("bad")
    h = net.input("x", 3)
    with pytest.raises(BpcError) as e:
        call(net, h)
    assert message in str(e.value)


def test_rmsnorm_of_one_feature_is_allowed():
    # x/sqrt(x**2 + eps)*g: a smooth sign, not a constant
    net = bpc.Network("one")
    h = net.rmsnorm(net.input("x", 1))
    m = bpc.compile_model(net.build(h, "mse", net.target("y", 1))).load()
    assert m.forward(m.init_params(), np.array([[3.0], [-3.0]])).ravel().tolist() == pytest.approx(
        [3 / np.sqrt(9 + 1e-5), -3 / np.sqrt(9 + 1e-5)], rel=1e-14)


SPEC = """
[network]
input = {{ size = 3 }}
target = {{ size = 2 }}
[[network.layers]]
units = 4
activation = "tanh"
[[network.layers]]
type = "{kind}"
{extra}
[[network.layers]]
units = 2
"""


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("extra,eps", [("", 1e-5), ("eps = 1e-3", 1e-3), ('eps = "1/1000"', 1e-3),
                                       ('name = "ln"', 1e-5)])
def test_spec_layers_equal_the_python_api(kind, extra, eps):
    spec = loads_spec(SPEC.format(kind=kind, extra=extra), "m.toml")
    net = bpc.Network("m")
    h = net.dense(net.input("x", 3), 4, "tanh")
    h = getattr(net, kind)(h, eps=eps, name="ln" if "name" in extra else None)
    api = net.build(net.dense(h, 2), "mse", net.target("y", 2))
    api = replace(api, source=spec.model.source, source_text=spec.model.source_text)
    assert bpc.compile_model(spec.model).source == bpc.compile_model(api).source
    assert ("gln" if "name" in extra else "g2") in bpc.compile_model(spec.model).load().PARAMS


@pytest.mark.parametrize("kind,extra,message", [
    ("layernorm", "eps = 0", "network.layers[1].eps: must be a positive number, got 0"),
    ("rmsnorm", "eps = -0.1", "network.layers[1].eps: must be a positive number, got -0.1"),
    ("layernorm", 'eps = "big"', "network.layers[1].eps"),
    ("layernorm", "eps = true", "network.layers[1].eps: must be a number, not a boolean"),
    ("layernorm", "eps = nan", "network.layers[1].eps: must be a finite number"),
    ("layernorm", "units = 4", "network.layers[1].units: a layernorm layer keeps its input's width"),
    ("rmsnorm", 'activation = "tanh"', "network.layers[1].activation: a rmsnorm layer has no activation"),
    ("layernorm", "epsilon = 1e-5", "network.layers[1].epsilon: unknown field; did you mean 'eps'?"),
    ("batchnorm", "", "network.layers[1].type: must be one of 'dense', 'activation', 'layernorm'"),
    ("dense", "units = 4\neps = 1e-3", "network.layers[1].eps: only layernorm and rmsnorm layers take eps, not a dense layer"),
])
def test_spec_errors(kind, extra, message):
    with pytest.raises(SpecError) as e:
        loads_spec(SPEC.format(kind=kind, extra=extra), "m.toml")
    assert message in str(e.value)
    assert str(e.value).startswith("m.toml: ")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_images_normalise_over_channels(kind, backend):
    # an (n, H, W, C) value, as the image layers make: the norm runs over C at every pixel
    import types
    from compiler.core import ir
    from compiler.core.ir import ARG, N
    net = bpc.Network(f"{kind}_img")
    x = ir.input_node("x", (N, 3, 2, 4), "data")
    y = ir.input_node("y", (N, 3, 2, 4), "target")
    net.inputs.append(x)
    net.targets.append(y)
    h = ir.ew(ARG[0] * ARG[1], [x, net.param("w", (4,), ("value", 0.5))])
    h = net.dropout(getattr(net, kind)(h), 0.3)
    m = _load(net.build(h, "mse", y), backend)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(5, 3, 2, 4)), rng.normal(size=(5, 3, 2, 4))
    p = {k: np.asarray(v) + rng.normal(size=np.shape(v)) for k, v in m.init_params().items()}
    np.testing.assert_allclose(m.forward(p, X), _reference(kind, X * p["w"], p["g1"], p.get("s1", 0), 1e-5),
                               rtol=1e-12, atol=1e-12)
    fixed = types.SimpleNamespace(backward=lambda q, *a: m.backward(q, *a, training=True, seed=2),
                                  loss=lambda q, *a: m.loss(q, *a, training=True, seed=2))
    rows = check_gradients(fixed, p, [X, Y], rtol=1e-6, atol=1e-9)
    assert all(r.ok for r in rows), rows
