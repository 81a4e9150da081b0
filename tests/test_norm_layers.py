"""Normalisation layers (``layernorm``, ``rmsnorm``, and ``batchnorm`` at the end: its two modes,
running statistics, NumPy against C, training with them): values against a NumPy reference on both
targets, constant inputs (variance 0 plus epsilon) with finite values and gradients that match
central differences, a backward that reuses the forward's ``R = 1/sqrt(V + eps)`` instead of
recomputing it, the Python API's and the spec loader's errors. The gradients on random data,
every dtype and batch size are the model table's rows ``layernorm`` and ``rmsnorm``."""
import re
from dataclasses import replace

import numpy as np
import pytest

import compiler as bpc
from compiler.errors import BpcError
from compiler.gradcheck import TrainingMode, check_gradients
from compiler.spec.loader import SpecError, loads_spec
from model_table import BACKENDS, HAS_CC, NEEDS_CC, perturbed

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
    ("groupnorm", "", "network.layers[1].type: must be one of 'dense', 'activation', 'layernorm'"),
    ("dense", "units = 4\neps = 1e-3", "network.layers[1].eps: only layernorm, rmsnorm and batchnorm layers take eps, not a dense layer"),
    ("layernorm", "momentum = 0.1", "network.layers[1].momentum: only batchnorm layers take momentum, not a layernorm layer"),
    ("batchnorm", "momentum = 0", "network.layers[1].momentum: must be above 0 and at most 1, got 0"),
    ("batchnorm", "momentum = 1.5", "network.layers[1].momentum: must be above 0 and at most 1, got 1.5"),
    ("batchnorm", "momentum = true", "network.layers[1].momentum: must be a number, not a boolean"),
    ("batchnorm", "units = 4", "network.layers[1].units: a batchnorm layer keeps its input's width"),
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


# ---- batchnorm -------------------------------------------------------------------------------
# Training mode normalises with the batch's statistics (the gradient runs through them, and the
# model table's rows batchnorm, batchnorm_image and batchnorm_inference check it against central
# differences on every target, dtype and batch size, batch 1 included: variance 0 plus eps).

def _bn_model(shape=(4,), eps=1e-5, momentum=0.1, name="bn"):
    """x -> batchnorm -> (flatten) -> dense: the norm's output is visible through forward."""
    net = bpc.Network(name)
    h = net.batchnorm(net.input("x", shape=shape), eps=eps, momentum=momentum)
    if len(shape) > 1:
        h = net.flatten(h)
    return net.build(net.dense(h, 2), "mse", net.target("y", 2))


def _bn_reference(x, g, s, mean, var, eps):
    return (x - mean) / np.sqrt(var + eps) * g + s


def _through_dense(h, params):
    return h.reshape(len(h), -1) @ params["W2"] + params["b2"]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", [(4,), (3, 2, 4)])
def test_batchnorm_modes_and_running_statistics(backend, shape):
    m = _load(_bn_model(shape, eps=1e-3, momentum=0.25), backend)
    assert m.STATS == {"running_mean1": (4,), "running_var1": (4,)}
    assert "training=False, stats=None" in m.__doc__ and "init_stats()" in m.__doc__
    rng = np.random.default_rng(0)
    params = {k: np.asarray(v) + 0.5 * rng.normal(size=np.shape(v)) for k, v in m.init_params().items()}
    x = 2 * rng.normal(size=(6, *shape)) + 1
    axes = tuple(range(len(shape)))                       # batch and spatial axes: per channel
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    stats = m.init_stats()
    assert stats["running_mean1"].tolist() == [0.0] * 4 and stats["running_var1"].tolist() == [1.0] * 4
    out = m.forward(params, x, training=True, stats=stats)
    want = _bn_reference(x, params["g1"], params["s1"], mean, var, 1e-3)
    np.testing.assert_allclose(out, _through_dense(want, params), rtol=1e-12, atol=1e-12)
    # the entries were replaced by (1 - momentum)*running + momentum*batch (biased variance)
    np.testing.assert_allclose(stats["running_mean1"], 0.25 * mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(stats["running_var1"], 0.75 + 0.25 * var, rtol=1e-13)
    # inference normalises with the running statistics, and updates nothing
    before = {k: v.copy() for k, v in stats.items()}
    out = m.forward(params, x, stats=stats)
    want = _bn_reference(x, params["g1"], params["s1"], stats["running_mean1"], stats["running_var1"], 1e-3)
    np.testing.assert_allclose(out, _through_dense(want, params), rtol=1e-12, atol=1e-12)
    y = rng.normal(size=(6, 2))
    m.backward(params, x, y, stats=stats)
    assert all(np.array_equal(stats[k], before[k]) for k in stats)
    # training mode without stats: batch statistics, nothing to update
    np.testing.assert_array_equal(m.forward(params, x, training=True), m.forward(params, x, training=True, stats=before))


@pytest.mark.parametrize("shape", [(4,), (3, 2, 4)])
def test_batchnorm_numpy_and_c_agree_in_both_modes(shape):
    pytest.importorskip("cffi")
    if not HAS_CC:
        pytest.skip("no C compiler")
    model = _bn_model(shape, name="bn_agree")
    mn, mc = _load(model, "numpy"), _load(model, "c")
    rng = np.random.default_rng(3)
    params = {k: np.asarray(v) + 0.3 * rng.normal(size=np.shape(v)) for k, v in mn.init_params().items()}
    x, y = rng.normal(size=(5, *shape)), rng.normal(size=(5, 2))
    sn, sc = mn.init_stats(), mc.init_stats()
    for training in (True, False, True):
        (ln, gn), (lc, gc) = (mn.backward(params, x, y, training=training, stats=sn),
                              mc.backward(params, x, y, training=training, stats=sc))
        assert abs(ln - lc) <= 1e-10 * abs(ln)
        assert all(np.allclose(gn[k], gc[k], rtol=1e-10, atol=1e-12) for k in gn)
        assert all(np.allclose(sn[k], sc[k], rtol=1e-10, atol=1e-14) for k in sn)
        np.testing.assert_allclose(mc.forward(params, x, training=training, stats=dict(sc)),
                                   mn.forward(params, x, training=training, stats=dict(sn)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("level", [0.0, 1.0, -1e3])
def test_batchnorm_of_constant_inputs_is_finite_and_its_gradient_right(backend, level):
    # every sample equal: the batch variance is 0 and R = 1/sqrt(eps)
    m = _load(_bn_model((3, 2, 2), eps=1e-3, name="bn_const"), backend)
    params = perturbed(m, seed=4, dtype=np.float64)
    x = np.full((5, 3, 2, 2), level)
    y = np.random.default_rng(2).normal(size=(5, 2))
    stats = m.init_stats()
    loss, grads = m.backward(params, x, y, training=True, stats=stats)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads.values())
    assert np.array_equal(stats["running_mean1"], np.full(2, 0.1 * level))
    np.testing.assert_allclose(stats["running_var1"], np.full(2, 0.9), rtol=1e-15)
    rows = check_gradients(TrainingMode(m), params, [x, y], rtol=1e-6, atol=1e-9)
    assert all(r.ok for r in rows), rows


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("kwargs,message", [
    ({}, "this model has batchnorm: in inference mode (training=False) give stats="),
    ({"training": 1}, "training must be True or False, not 1"),
    ({"stats": [1, 2]}, "stats must be a dict of the running statistics (STATS), not list"),
    ({"stats": {"running_mean1": np.zeros(4)}}, "stats has no 'running_var1'"),
    ({"stats": {"running_mean1": np.zeros(3), "running_var1": np.ones(4)}},
     "stats['running_mean1'] must have shape (4,), got (3,)"),
    ({"stats": {"running_mean1": np.array(["a"] * 4), "running_var1": np.ones(4)}}, "stats['running_mean1']"),
])
def test_batchnorm_bad_mode_arguments(backend, kwargs, message):
    m = _load(_bn_model(name="bn_bad"), backend)
    with pytest.raises(ValueError) as e:
        m.forward(m.init_params(), np.ones((3, 4)), **kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("call,message", [
    (lambda net, x: net.batchnorm(x, momentum=0), "batchnorm momentum must be a number above 0 and at most 1, got 0"),
    (lambda net, x: net.batchnorm(x, momentum=True), "batchnorm momentum must be a number above 0"),
    (lambda net, x: net.batchnorm(x, eps=0), "batchnorm eps must be a positive number, got 0"),
    (lambda net, x: net.batchnorm(net.param("w", (3,), ("zeros",))), "batchnorm needs a (batch, ..., features) input"),
])
def test_batchnorm_api_errors(call, message):
    net = bpc.Network("m")
    with pytest.raises(BpcError) as e:
        call(net, net.input("x", 3))
    assert message in str(e.value)


def test_batchnorm_spec_layer_equals_the_python_api():
    spec = loads_spec(SPEC.format(kind="batchnorm", extra="eps = 1e-3\nmomentum = 0.2"), "m.toml")
    net = bpc.Network("m")
    h = net.batchnorm(net.dense(net.input("x", 3), 4, "tanh"), eps=1e-3, momentum=0.2)
    api = net.build(net.dense(h, 2), "mse", net.target("y", 2))
    api = replace(api, source=spec.model.source, source_text=spec.model.source_text)
    assert bpc.compile_model(spec.model).source == bpc.compile_model(api).source
    assert "0.2*Mb2 + 0.8*running_mean2" in bpc.compile_model(api).source


def test_training_keeps_the_running_statistics_and_evaluates_in_inference(tmp_path):
    from compiler.train import TrainConfig, evaluate, load_params, save_params, train
    from compiler.train.loop import check_stats, read_npz
    m = _load(_bn_model((3,), name="bn_train"), "numpy")
    rng = np.random.default_rng(0)
    x = 3 * rng.normal(size=(80, 3)) + 2
    y = np.stack([x[:, 0] - x[:, 1], x[:, 2]], axis=1)
    cfg = TrainConfig(optimizer="adam", lr=0.05, epochs=15, batch_size=16, val_split=0.25, seed=1)
    result = train(m, {"x": x, "y": y}, cfg)
    assert result.history.train_loss[-1] < 0.2 * result.history.train_loss[0]
    # the running statistics moved towards the data's (mean 2, variance 9) from (0, 1)
    assert np.all(result.stats["running_mean1"] > 1.0) and np.all(result.stats["running_var1"] > 3.0)
    # the final figures are inference-mode ones, with the statistics that go with the parameters
    assert evaluate(m, result.params, {"x": x, "y": y}, stats=result.stats)["loss"] == pytest.approx(
        m.loss(result.params, x, y, stats=result.stats), rel=1e-12)
    save_params(result.params, tmp_path / "p.npz", result.stats)
    arrays = read_npz(tmp_path / "p.npz")
    assert sorted(arrays) == sorted([*m.PARAMS, *m.STATS])
    assert all(np.array_equal(check_stats(m, arrays)[k], result.stats[k]) for k in m.STATS)
    assert all(np.array_equal(load_params(m, tmp_path / "p.npz")[k], result.params[k]) for k in m.PARAMS)


def test_bpc_train_saves_the_statistics_and_tests_in_inference_mode(tmp_path, monkeypatch, capsys):
    from compiler.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.toml").write_text(SPEC.format(kind="batchnorm", extra="") + "[train]\nepochs = 10\nlr = 0.02\n")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3)) + 5
    np.savez(tmp_path / "d.npz", x=x, y=np.stack([x[:, 0], -x[:, 1]], axis=1))
    assert main(["train", "b.toml", "--data", "d.npz", "--test", "d.npz", "--out", "p.npz", "-q"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "completed 10 epochs" in out
    with np.load(tmp_path / "p.npz") as f:
        saved = {k: f[k] for k in f.files}
    assert {"running_mean2", "running_var2"} <= set(saved)
    m = bpc.compile_model(loads_spec((tmp_path / "b.toml").read_text(), "b.toml").model).load()
    stats = {k: saved.pop(k) for k in m.STATS}
    test_loss = float(re.search(r"test\s+loss (\S+)", out).group(1))
    assert test_loss == pytest.approx(m.loss(saved, x, np.stack([x[:, 0], -x[:, 1]], axis=1), stats=stats), rel=1e-5)
    # a resumed run reads the statistics saved beside the parameters
    assert main(["train", "b.toml", "--data", "d.npz", "--resume", "p.npz", "--out", "q.npz", "-q"]) == 0


def test_bpc_train_checkpoint_resume_carries_the_running_statistics(tmp_path, monkeypatch, capsys):
    """A batchnorm model stopped after 3 epochs (checkpoint) and resumed for 3 more ends exactly
    where 6 uninterrupted epochs end, running statistics included; the checkpoint holds them
    (current and best), and the resumed run reads them: the same checkpoint with other
    statistics ends elsewhere. Resuming from a parameters file starts from the statistics saved
    beside the parameters (as the Python API given them, not init_stats()), and the test figures
    are inference-mode ones with the saved statistics."""
    from compiler.cli import main
    from compiler.train import TrainConfig, train
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.toml").write_text(SPEC.format(kind="batchnorm", extra="") + "[train]\nepochs = 6\nlr = 0.02\n")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3)) + 5
    y = np.stack([x[:, 0], -x[:, 1]], axis=1)
    np.savez(tmp_path / "d.npz", x=x, y=y)

    def run(*flags):
        assert main(["train", "b.toml", "--data", "d.npz", "-q", *flags]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    def saved(name):
        with np.load(tmp_path / name) as f:
            return {k: f[k] for k in f.files}

    run("--out", "full.npz")
    run("--epochs", "3", "--checkpoint-every", "3", "--out", "half.npz")
    ckpt = saved("half.ckpt.npz")
    stat_keys = {"running/running_mean2", "running/running_var2", "bestrunning/running_mean2", "bestrunning/running_var2"}
    assert stat_keys <= set(ckpt)
    assert not np.allclose(ckpt["running/running_mean2"], 0.0)   # moved from init_stats() (mean 0, var 1)
    run("--resume", "half.ckpt.npz", "--out", "resumed.npz")
    full, resumed = saved("full.npz"), saved("resumed.npz")
    assert {"running_mean2", "running_var2"} <= set(full)
    assert sorted(full) == sorted(resumed)
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    # the resumed run does read the checkpoint's statistics: other statistics, another end
    other = dict(ckpt, **{k: np.full_like(ckpt[k], 1.0 if "var" in k else 0.0) for k in stat_keys})
    np.savez(tmp_path / "other.ckpt.npz", **other)
    run("--resume", "other.ckpt.npz", "--out", "other.npz")
    assert not np.allclose(saved("other.npz")["running_mean2"], full["running_mean2"])

    # from a parameters file: its statistics are the starting ones
    out = run("--resume", "half.npz", "--epochs", "1", "--test", "d.npz", "--out", "one.npz")
    m = bpc.compile_model(loads_spec((tmp_path / "b.toml").read_text(), "b.toml").model).load()
    half = saved("half.npz")
    start = {k: half.pop(k) for k in m.STATS}
    cfg = TrainConfig(lr=0.02, epochs=1)   # the spec's [train] with --epochs 1, other keys defaults
    api = train(m, {"x": x, "y": y}, cfg, params={k: v.copy() for k, v in half.items()}, stats=dict(start))
    fresh = train(m, {"x": x, "y": y}, cfg, params={k: v.copy() for k, v in half.items()})
    one = saved("one.npz")
    for k in m.STATS:
        np.testing.assert_allclose(one[k], api.stats[k], rtol=1e-12, err_msg=k)
    assert not np.allclose(one["running_mean2"], fresh.stats["running_mean2"])
    # the test line: inference mode with the saved statistics (not the batch's, nor init_stats())
    test_loss = float(re.search(r"test\s+loss (\S+)", out).group(1))
    params = {k: one[k] for k in m.PARAMS}
    stats = {k: one[k] for k in m.STATS}
    assert test_loss == pytest.approx(m.loss(params, x, y, stats=stats), rel=1e-5)
    assert test_loss != pytest.approx(m.loss(params, x, y, stats=m.init_stats()), rel=1e-3)
    assert test_loss != pytest.approx(m.loss(params, x, y, training=True), rel=1e-3)


def _bn_conv_model():
    """conv -> batchnorm -> relu -> batchnorm -> dense: two norms, per channel on images."""
    net = bpc.Network("bn_conv")
    h = net.conv2d(net.input("x", shape=(4, 4, 2)), 3, 3, padding="same")
    h = net.activation(net.batchnorm(h), "relu")
    h = net.batchnorm(net.flatten(h))
    return net.build(net.dense(h, 2), "mse", net.target("y", 2))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("build", [lambda: _bn_model((3, 2, 4), name="bn_infer"), _bn_conv_model],
                         ids=["image", "conv"])
def test_batchnorm_inference_uses_only_the_running_statistics(backend, build):
    """In inference mode a sample's outputs, loss and gradients do not depend on the other
    samples of its batch: each sample alone gives what it gives in a batch, even beside samples
    of 1e150, inf or nan (whose batch statistics would be inf or nan). The batch statistics
    are computed in training mode only (under the training flag in both targets)."""
    model = build()
    m = _load(model, backend)
    params, stats = m.init_params(0), m.init_stats()
    rng = np.random.default_rng(3)
    stats = {k: (rng.uniform(0.5, 2.0, v.shape) if "var" in k else rng.normal(size=v.shape)) for k, v in stats.items()}
    shape = next(iter(m.INPUTS.values()))
    x = rng.normal(size=(4, *shape))
    y = rng.normal(size=(4, 2))
    alone = np.concatenate([m.forward(params, x[i:i + 1], stats=stats) for i in range(4)])
    for bad in (1e150, np.inf, np.nan):
        xb = np.concatenate([x, np.full((2, *shape), bad)])
        with np.errstate(all="ignore"):    # the bad samples' own outputs are inf or nan
            out = m.forward(params, xb, stats=stats)
        np.testing.assert_allclose(out[:4], alone, rtol=1e-13, atol=1e-13)
    # the loss and gradients of a batch are the mean of its samples' (running statistics fixed)
    loss, grads = m.backward(params, x, y, stats=stats)
    each = [m.backward(params, x[i:i + 1], y[i:i + 1], stats=stats) for i in range(4)]
    assert loss == pytest.approx(np.mean([e[0] for e in each]), rel=1e-12)
    for k in grads:
        np.testing.assert_allclose(grads[k], np.mean([e[1][k] for e in each], axis=0), rtol=1e-10, atol=1e-13)
    # training mode does depend on the batch (the test above could not pass by accident)
    assert not np.allclose(m.forward(params, x, training=True)[:1], m.forward(params, x[:1], training=True))
    if backend == "numpy":
        from compiler.core.program import build_program
        program = build_program(model)
        batch_stats = {program.names[u] for u in program.training_only}
        assert {"Mb1", "Vb1"} <= batch_stats or {"Mb2", "Vb2"} <= batch_stats, batch_stats
        source = bpc.compile_model(model).source
        for fn in ("forward", "loss", "backward"):
            body = source[source.index(f"def {fn}("):].split("\n\n\n")[0]
            block = False
            for line in body.splitlines():
                if line.strip().startswith("if bn_training:"):
                    block = True
                elif block and not line.startswith("        "):
                    block = False
                if re.match(r"\s+(Mb|Vb)\d+ = ", line) and "np.zeros" not in line:
                    assert block, f"{fn}: {line.strip()} outside the training-only block"
