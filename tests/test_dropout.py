"""Dropout: the training flag of the generated modules on both targets (the same masks for one
seed, NumPy and C agreeing to 1e-10), the gradient with a fixed mask against central
differences, rate 0 (exactly the identity: no mask, no flag), rates near 1 (finite), bad rates
and bad flags, the spec layer type, and training with dropout (`bpc train` and the module's
train_step: training mode in the steps, inference mode in evaluation)."""
import types

import numpy as np
import pytest

import compiler as bpc
from compiler.core import ir
from compiler.core.ir import ARG
from compiler.errors import BpcError
from compiler.gradcheck import check_gradients
from compiler.spec.loader import SpecError, loads_spec
from compiler.train.loop import TrainConfig, evaluate, train
from model_table import BACKENDS, NEEDS_CC

BACKEND_PARAMS = [pytest.param(b, marks=NEEDS_CC if b == "c" else ()) for b in BACKENDS]


def _net(rate=0.5, second=0.25, name="drop"):
    net = bpc.Network(name)
    h = net.dense(net.input("x", 3), 6, "tanh")
    h = net.dropout(h, rate)
    h = net.dense(h, 5, "relu")
    h = net.dropout(h, second)
    return net.build(net.dense(h, 2), "mse", net.target("y", 2))


_LOADED = {}


def _load(model_fn, backend, dtype="float64", **kw):
    key = (model_fn.__name__, tuple(sorted(kw.items())), backend, dtype)
    if key not in _LOADED:
        model = model_fn(**kw)
        _LOADED[key] = (bpc.compile_model(model, dtype) if backend == "numpy" else
                        bpc.compile_model_c(model, dtype=dtype)).load()
    return _LOADED[key]


def _data(n=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.normal(size=(n, 2))


def _params(m):
    return {k: np.array(v) + 0.1 for k, v in m.init_params(seed=3).items()}   # b != 0: relu kinks away


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_the_interface_says_which_masks_and_rates(backend):
    m = _load(_net, backend)
    assert m.DROPOUT == {"mask1": 0.5, "mask2": 0.25}
    assert "training=False, seed=None" in m.__doc__ and "DROPOUT" in m.__doc__
    assert "mask1" not in m.INPUTS and set(m.INPUTS) == {"x"}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_inference_is_the_network_without_dropout(backend):
    m, plain = _load(_net, backend), _load(_net, backend, rate=0.0, second=0.0)
    assert not hasattr(plain, "DROPOUT")
    x, y = _data()
    p = _params(m)
    np.testing.assert_array_equal(m.forward(p, x), plain.forward(p, x))
    np.testing.assert_array_equal(m.forward(p, x, training=False, seed=5), plain.forward(p, x))
    assert m.loss(p, x, y) == plain.loss(p, x, y)
    (l1, g1), (l2, g2) = m.backward(p, x, y), plain.backward(p, x, y)
    assert l1 == l2 and all(np.array_equal(g1[k], g2[k]) for k in g1)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_rate_zero_is_exactly_the_identity(backend):
    net = bpc.Network("nodrop")
    x = net.input("x", 3)
    assert net.dropout(x, 0) is x and net.dropout(x, 0.0) is x
    m = _load(_net, backend, rate=0.0, second=0.0)
    assert "training" not in m.__doc__
    with pytest.raises(TypeError):
        m.forward(_params(m), _data()[0], training=True, seed=0)


@NEEDS_CC
@pytest.mark.parametrize("seed", [0, 1, (4, 2)])
def test_numpy_and_c_draw_the_same_masks(seed):
    mn, mc = _load(_net, "numpy"), _load(_net, "c")
    x, y = _data(17)
    p = _params(mn)
    fn, fc = mn.forward(p, x, training=True, seed=seed), mc.forward(p, x, training=True, seed=seed)
    assert np.abs(fn - fc).max() <= 1e-10
    assert not np.array_equal(fn, mn.forward(p, x))                  # the masks did something
    (ln, gn), (lc, gc) = mn.backward(p, x, y, training=True, seed=seed), mc.backward(p, x, y, training=True, seed=seed)
    assert abs(ln - lc) <= 1e-10 and all(np.abs(gn[k] - gc[k]).max() <= 1e-10 for k in gn)
    assert ln == mn.loss(p, x, y, training=True, seed=seed)          # one seed: the same masks in every function
    assert abs(mc.loss(p, x, y, training=True, seed=seed) - lc) <= 1e-12
    # a Generator is a seed too, drawn from like default_rng(seed)
    same = mn.forward(p, x, training=True, seed=np.random.default_rng(seed))
    np.testing.assert_array_equal(same, fn)
    assert not np.array_equal(mn.forward(p, x, training=True, seed=99), fn)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_gradient_with_a_fixed_mask_matches_central_differences(backend):
    m = _load(_net, backend)
    x, y = _data(11)
    fixed = types.SimpleNamespace(
        backward=lambda params, *a: m.backward(params, *a, training=True, seed=7),
        loss=lambda params, *a: m.loss(params, *a, training=True, seed=7))
    rows = check_gradients(fixed, _params(m), [x, y], rtol=1e-6, atol=1e-9)
    assert all(r.ok for r in rows), rows
    g_train = m.backward(_params(m), x, y, training=True, seed=7)[1]["W1"]
    assert not np.allclose(g_train, m.backward(_params(m), x, y)[1]["W1"])   # not the inference gradient


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("rate", [0.5, 0.9, 1 - 1e-9])
def test_masks_drop_the_rate_and_scale_the_rest(backend, rate):
    # dropout, then a scale a (ones): forward returns x * mask
    # (a scale, because the C wrapper of a model without parameters fails: see the report)
    net = bpc.Network("only")
    h = net.dropout(net.input("x", 50), rate)
    h = ir.ew(ARG[0] * ARG[1], [h, net.param("a", (50,), ("value", 1))])
    m = _load(lambda rate=rate: net.build(h, "mse", net.target("y", 50)), backend, rate=rate)
    x = np.ones((400, 50))
    a = {"a": np.ones(50)}
    out = m.forward(a, x, training=True, seed=1)
    assert np.isfinite(out).all()
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-15)
    if rate < 0.99:
        assert abs(1 - kept.mean() - rate) < 0.02                      # 20000 draws
        assert abs(out.mean() - 1) < 0.05                              # inverted: mean kept
    loss, grads = m.backward(a, x, np.zeros((400, 50)), training=True, seed=1)
    assert np.isfinite(loss) and np.isfinite(grads["a"]).all()


@pytest.mark.parametrize("rate", [-0.1, 1, 1.0, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_bad_rates_are_clear_errors(rate):
    net = bpc.Network("bad")
    with pytest.raises(BpcError, match="dropout rate must be a number from 0 up to"):
        net.dropout(net.input("x", 3), rate)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("kwargs,message", [
    ({"training": True}, "training=True draws the dropout masks: give seed="),
    ({"training": "yes", "seed": 0}, "training must be True or False, not 'yes'"),
    ({"training": 1, "seed": 0}, "training must be True or False, not 1"),
    ({"training": True, "seed": -1}, "seed must be a non-negative int"),
    ({"training": True, "seed": "abc"}, "seed must be a non-negative int"),
])
def test_bad_mode_arguments(backend, kwargs, message):
    m = _load(_net, backend)
    x, y = _data()
    for call in (lambda: m.forward(_params(m), x, **kwargs), lambda: m.backward(_params(m), x, y, **kwargs)):
        with pytest.raises(ValueError, match=message):
            call()


SPEC = """
[network]
input = {{ size = 3 }}
target = {{ size = 2 }}
[[network.layers]]
units = 6
activation = "tanh"
[[network.layers]]
type = "dropout"
{extra}
[[network.layers]]
units = 2
"""


@pytest.mark.parametrize("extra,rate,mask", [("rate = 0.5", 0.5, "mask1"), ('rate = "1/4"', 0.25, "mask1"),
                                             ('rate = 0.1\nname = "a"', 0.1, "maska"), ("rate = 0", 0, None)])
def test_spec_dropout_layer(extra, rate, mask):
    spec = loads_spec(SPEC.format(extra=extra), "m.toml")
    assert [(m.name, m.attr("rate")) for m in spec.model.masks] == ([(mask, rate)] if mask else [])


@pytest.mark.parametrize("extra,message", [
    ("", "network.layers[1].rate: missing"),
    ("rate = 1", "network.layers[1].rate: must be from 0 up to (not including) 1, got 1"),
    ("rate = -0.5", "network.layers[1].rate: must be from 0 up to (not including) 1, got -0.5"),
    ('rate = "half"', "network.layers[1].rate"),
    ("rate = true", "network.layers[1].rate: must be a number, not a boolean"),
    ("rate = 0.5\nunits = 6", "network.layers[1].units: a dropout layer takes only rate"),
    ("rate = 0.5\neps = 0.1", "network.layers[1].eps: only layernorm, rmsnorm and batchnorm layers take eps, not a dropout layer"),
    ("rate = 0.5\nratio = 0.1", "network.layers[1].ratio: unknown field; did you mean 'rate'?"),
])
def test_spec_dropout_errors(extra, message):
    with pytest.raises(SpecError) as e:
        loads_spec(SPEC.format(extra=extra), "m.toml")
    assert message in str(e.value)


def test_spec_rate_on_a_dense_layer_is_refused():
    with pytest.raises(SpecError, match=r"network.layers\[0\].rate: only dropout layers take rate, not a dense layer"):
        loads_spec(SPEC.format(extra="rate = 0.5").replace('activation = "tanh"', 'activation = "tanh"\nrate = 0.2'),
                   "m.toml")


class _Spy:
    """A module whose calls are recorded with their mode."""

    def __init__(self, module):
        self._m, self.calls = module, []

    def __getattr__(self, name):
        value = getattr(self._m, name)
        if name in ("forward", "loss", "backward"):
            def call(*a, **kw):
                self.calls.append((name, kw.get("training", False), kw.get("seed")))
                return value(*a, **kw)
            return call
        return value


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_training_runs_steps_in_training_mode_and_evaluates_in_inference(backend):
    m = _load(_net, backend, rate=0.2, second=0.1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3))
    y = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)
    spy = _Spy(m)
    cfg = TrainConfig(optimizer="adam", lr=0.01, epochs=30, batch_size=40, val_split=0.25, seed=3)
    result = train(spy, {"x": x, "y": y}, cfg)
    steps = [c for c in spy.calls if c[0] == "backward"]
    assert steps and all(training for _, training, _ in steps)
    seeds = [s for _, _, s in steps]
    assert len(set(seeds)) == len(seeds) and seeds[0] == (3, 1, 0)     # the run's seed, epoch, step
    assert all(not training for name, training, _ in spy.calls if name != "backward")   # evaluation
    assert result.history.train_loss[-1] < 0.6 * result.history.train_loss[0]
    # the same run again: the same masks, the same parameters
    again = train(m, {"x": x, "y": y}, cfg)
    assert all(np.array_equal(result.params[k], again.params[k]) for k in result.params)
    assert evaluate(m, result.params, {"x": x, "y": y})["loss"] == m.loss(result.params, x, y)


def test_generated_train_step_needs_a_seed_and_uses_it():
    m = _load(_net, "numpy")
    x, y = _data(20)
    p, q = _params(m), _params(m)
    with pytest.raises(ValueError, match="give seed="):
        m.train_step(p, {}, x, y)
    m.train_step(p, {}, x, y, seed=(0, 1), lr=0.1, optimizer="sgd")
    m.train_step(q, {}, x, y, seed=(0, 1), lr=0.1, optimizer="sgd")
    assert all(np.array_equal(p[k], q[k]) for k in p)
    r = _params(m)
    grads = m.backward(r, x, y, training=True, seed=(0, 1))[1]
    assert all(np.allclose(p[k], r[k] - 0.1 * grads[k]) for k in p)


def test_bpc_train_with_a_dropout_spec(tmp_path, monkeypatch, capsys):
    from compiler.cli import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.toml").write_text(SPEC.format(extra="rate = 0.3") + "[train]\nepochs = 20\nlr = 0.01\n")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3))
    np.savez(tmp_path / "d.npz", x=x, y=np.stack([x[:, 0], -x[:, 1]], axis=1))
    assert main(["train", "d.toml", "--data", "d.npz", "--out", "p.npz", "-q"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "completed 20 epochs" in out
    assert (tmp_path / "p.npz").is_file()


def test_dropout_of_one_number_per_sample_and_of_a_non_batch_value():
    net = bpc.Network("scalar")
    x = net.input("x")                     # (n,)
    h = net.dropout(x, 0.5)
    assert h.shape == x.shape
    with pytest.raises(BpcError, match=r"dropout needs a batch-first input, got \(3,\)"):
        net.dropout(net.param("w", (3,), ("zeros",)), 0.5)
    h = ir.ew(ARG[0] * ARG[1], [h, net.param("a", (), ("value", 2))])
    m = bpc.compile_model(net.build(h, "mse", net.target("y"))).load()
    out = m.forward({"a": np.array(2.0)}, np.ones(1000), training=True, seed=0)
    assert set(np.unique(out)) == {0.0, 4.0}
