"""Training library: update steps against hand-computed values, clipping, schedules, data checks,
early stopping, divergence, interrupts, resume, gradient-norm warnings."""
import math

import numpy as np
import pytest

import compiler as bpc
from compiler.train.loop import (TrainConfig, TrainError, check_data, evaluate, load_params, lr_at,
                            save_params, task, train, update_steps)


@pytest.fixture(scope="module")
def steps():
    return update_steps()


@pytest.fixture(scope="module")
def linear():
    """y = w*x + b by mean squared error: a model whose optimum is known in closed form."""
    return bpc.compile_model(bpc.mlp([1, 1], loss="mse", name="linear")).load()


@pytest.fixture(scope="module")
def classifier():
    return bpc.compile_model(bpc.mlp([2, 8, 3], "tanh", "softmax_cross_entropy", name="clf")).load()


def line_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 1))
    return {"x": x, "y": 2.0 * x - 0.5 + 0.01 * rng.standard_normal((n, 1))}


# ------------------------------------------------------------------------------- update steps

def test_sgd_step_by_hand(steps):
    p = {"w": np.array([1.0, -2.0]), "s": np.array(3.0)}
    w = p["w"]
    steps.sgd_step(p, {"w": np.array([0.5, 0.25]), "s": np.array(-1.0)}, lr=0.1)
    assert p["w"] is w                                   # in place
    np.testing.assert_allclose(p["w"], [0.95, -2.025], rtol=0, atol=1e-15)
    np.testing.assert_allclose(p["s"], 3.1, rtol=0, atol=1e-15)
    steps.sgd_step(p, {"w": np.zeros(2), "s": np.array(0.0)}, lr=0.1, weight_decay=0.5)
    np.testing.assert_allclose(p["w"], [0.95 * 0.95, -2.025 * 0.95], rtol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_step_by_hand(steps, nesterov):
    p, state = {"w": np.array([1.0])}, {}
    g1, g2, lr, mu = 0.5, -0.25, 0.1, 0.9
    steps.momentum_step(p, {"w": np.array([g1])}, state, lr=lr, momentum=mu, nesterov=nesterov)
    steps.momentum_step(p, {"w": np.array([g2])}, state, lr=lr, momentum=mu, nesterov=nesterov)
    v1 = g1
    v2 = mu * v1 + g2
    if nesterov:
        expect = 1.0 - lr * (g1 + mu * v1) - lr * (g2 + mu * v2)
    else:
        expect = 1.0 - lr * v1 - lr * v2
    np.testing.assert_allclose(p["w"], [expect], rtol=1e-14)
    np.testing.assert_allclose(state["velocity"]["w"], [v2], rtol=1e-14)


def test_adam_step_by_hand(steps):
    p, state = {"w": np.array([1.0, 2.0])}, {}
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    g1, g2 = np.array([0.3, -4.0]), np.array([-0.1, 1.0])
    steps.adam_step(p, {"w": g1}, state, lr=lr)
    # first step: m_hat = g, v_hat = g**2, so the update is lr*g/(|g| + eps)
    np.testing.assert_allclose(p["w"], [1.0 - lr * 0.3 / (0.3 + eps), 2.0 + lr * 4.0 / (4.0 + eps)], rtol=1e-14)
    steps.adam_step(p, {"w": g2}, state, lr=lr)
    m = (1 - b1) * (b1 * g1 + g2)
    v = (1 - b2) * (b2 * g1**2 + g2**2)
    mhat, vhat = m / (1 - b1**2), v / (1 - b2**2)
    first = np.array([1.0 - lr * 0.3 / (0.3 + eps), 2.0 + lr * 4.0 / (4.0 + eps)])
    np.testing.assert_allclose(p["w"], first - lr * mhat / (np.sqrt(vhat) + eps), rtol=1e-13)
    assert state["t"] == 2


def test_adamw_weight_decay_is_decoupled(steps):
    p, state = {"w": np.array([2.0])}, {}
    steps.adam_step(p, {"w": np.array([0.0])}, state, lr=0.1, weight_decay=0.5)
    # zero gradient: the Adam part is 0, the decay alone moves p by lr*wd*p
    np.testing.assert_allclose(p["w"], [2.0 - 0.1 * 0.5 * 2.0], rtol=1e-14)


@pytest.mark.parametrize("name", ["sgd_step", "momentum_step", "adam_step"])
def test_float32_stays_float32(steps, name):
    p = {"w": np.ones((3, 2), np.float32), "s": np.asarray(1.0, np.float32)}
    g = {"w": np.full((3, 2), 0.5, np.float32), "s": np.asarray(0.5, np.float32)}
    state = {}
    for _ in range(2):
        getattr(steps, name)(p, g, state, lr=0.1)
    assert p["w"].dtype == np.float32 and p["s"].dtype == np.float32
    assert all(a.dtype == np.float32 for d in state.values() if isinstance(d, dict) for a in d.values())


# every step function with a state that is not a dict: sgd ignores it, the others say what to pass
# (momentum_step(state=None) was an AttributeError from inside the step)
@pytest.mark.parametrize("name, state, error", [
    ("sgd_step", None, None),
    ("sgd_step", {}, None),
    ("momentum_step", None, "momentum_step keeps its running averages in state: pass a dict"),
    ("momentum_step", [], "got list"),
    ("adam_step", None, "adam_step keeps its running averages in state: pass a dict"),
    ("adam_step", "state", "got str"),
])
def test_step_state_that_is_not_a_dict(steps, name, state, error):
    p = {"w": np.array([1.0])}
    call = lambda: getattr(steps, name)(p, {"w": np.array([0.5])}, state=state, lr=0.1)  # noqa: E731
    if error is None:
        call()
        assert p["w"][0] == pytest.approx(0.95)
    else:
        with pytest.raises(TypeError, match=error):
            call()
        assert p["w"][0] == 1.0                              # nothing updated


@pytest.mark.parametrize("optimizer", ["momentum", "nesterov", "adam"])
def test_train_step_with_state_none_says_what_to_pass(linear, optimizer):
    params = linear.init_params(seed=0)
    before = {k: np.array(v) for k, v in params.items()}
    x, y = np.ones((4, 1)), np.zeros((4, 1))
    with pytest.raises(TypeError, match=r"train_step\(optimizer=.*pass a dict"):
        linear.train_step(params, None, x, y, optimizer=optimizer)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    linear.train_step(params, None, x, y, optimizer="sgd")   # sgd keeps no state


def test_scalar_params_that_cannot_be_updated_in_place_are_replaced(steps):
    p = {"a": 1.0}
    steps.sgd_step(p, {"a": np.float64(2.0)}, lr=0.25)
    assert float(p["a"]) == 0.5


def test_clip_grad_norm(steps):
    g = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    clipped, norm = steps.clip_grad_norm(g, 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped["a"], [0.6])
    np.testing.assert_allclose(clipped["b"], [[0.8]])
    assert g["a"][0] == 3.0                                  # input untouched
    same, norm = steps.clip_grad_norm(g, 10.0)
    assert same is g and norm == 5.0
    big = {"a": np.full(4, 1e30, np.float32)}                # squares overflow float32; the norm must not
    _, norm = steps.clip_grad_norm(big, 1.0)
    assert norm == pytest.approx(2e30)


# ------------------------------------------------------------------------------- generated module

def test_generated_module_carries_the_same_update_steps(linear):
    src = bpc.compile_model(bpc.mlp([1, 1], loss="mse", name="linear")).source
    for fn in ("def sgd_step(", "def momentum_step(", "def adam_step(", "def train_step(", "def clip_grad_norm("):
        assert fn in src
    data = line_data()
    cfg = TrainConfig(optimizer="nesterov", lr=0.1, epochs=5, batch_size=0, clip=0.5)
    lib = train(linear, data, cfg).params
    params, state = linear.init_params(seed=0), {}
    for _ in range(5):
        linear.train_step(params, state, data["x"], data["y"], optimizer="nesterov", lr=0.1, clip=0.5)
    for k in params:
        np.testing.assert_array_equal(params[k], lib[k])


def test_generated_train_step_refuses_a_nan_loss(linear):
    params = linear.init_params()
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises(FloatingPointError):
        linear.train_step(params, {}, np.array([[np.nan]]), np.array([[1.0]]), lr=0.1)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    with pytest.raises(ValueError, match="unknown optimizer"):
        linear.train_step(params, {}, np.ones((1, 1)), np.ones((1, 1)), optimizer="lbfgs")


# ------------------------------------------------------------------------------- schedules

def test_schedules():
    c = TrainConfig(lr=1.0, epochs=10, schedule="constant")
    assert [lr_at(c, e) for e in (1, 10)] == [1.0, 1.0]
    c = TrainConfig(lr=1.0, epochs=10, schedule="step", step_size=3, gamma=0.5)
    assert [lr_at(c, e) for e in range(1, 11)] == [1, 1, 1, .5, .5, .5, .25, .25, .25, .125]
    c = TrainConfig(lr=1.0, epochs=5, schedule="cosine", min_lr=0.1)
    got = [lr_at(c, e) for e in range(1, 6)]
    assert got[0] == 1.0 and got[-1] == pytest.approx(0.1) and got[2] == pytest.approx(0.55)
    assert all(a > b for a, b in zip(got, got[1:]))
    assert TrainConfig(optimizer="adam").base_lr == 0.001 and TrainConfig(optimizer="sgd").base_lr == 0.01


def test_history_records_the_schedule(linear):
    r = train(linear, line_data(), TrainConfig(optimizer="sgd", lr=0.4, epochs=6, schedule="step",
                                               step_size=2, gamma=0.5, batch_size=16))
    assert r.history.lr == [0.4, 0.4, 0.2, 0.2, 0.1, 0.1]
    assert r.history.epoch == list(range(1, 7))


@pytest.mark.parametrize("field,value", [
    ("optimizer", "rmsprop"), ("schedule", "linear"), ("lr", 0), ("lr", -1.0), ("lr", math.nan),
    ("epochs", 0), ("epochs", 2.5), ("batch_size", -1), ("momentum", 1.0), ("clip", 0.0),
    ("val_split", 1.0), ("patience", 0), ("weight_decay", -0.1), ("seed", -1), ("epochs", True),
])
def test_bad_config_is_refused(linear, field, value):
    with pytest.raises(TrainError, match=field):
        train(linear, line_data(), TrainConfig(**{field: value}))


# ------------------------------------------------------------------------------- convergence

def test_full_batch_gradient_descent_finds_the_least_squares_line(linear):
    data = line_data(200, seed=1)
    r = train(linear, data, TrainConfig(optimizer="momentum", lr=0.3, epochs=400, batch_size=0))
    slope, intercept = np.polyfit(data["x"][:, 0], data["y"][:, 0], 1)
    assert r.stopped == "completed"
    assert float(r.params["W1"][0, 0]) == pytest.approx(slope, abs=1e-8)
    assert float(r.params["b1"][0]) == pytest.approx(intercept, abs=1e-8)
    assert r.final["train_accuracy"] is None


def test_seeded_runs_are_reproducible(classifier):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 2))
    data = {"x": x, "y": (x[:, 0] > 0).astype(int) + (x[:, 1] > 1)}
    cfg = TrainConfig(epochs=3, batch_size=16, val_split=0.25, seed=7)
    a, b = train(classifier, data, cfg), train(classifier, data, cfg)
    assert a.history.train_loss == b.history.train_loss
    c = train(classifier, data, TrainConfig(epochs=3, batch_size=16, val_split=0.25, seed=8))
    assert c.history.train_loss != a.history.train_loss


def test_classifier_accuracy(classifier):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 1)
    r = train(classifier, {"x": x, "y": y}, TrainConfig(lr=0.02, epochs=40, val_split=0.2))
    assert task(classifier) == "multiclass"
    assert r.final["val_accuracy"] > 0.9 and r.final["train_accuracy"] > 0.9
    assert len(r.history.val_accuracy) == 40
    probs = classifier.forward(r.params, x)
    assert evaluate(classifier, r.params, {"x": x, "y": y})["accuracy"] == np.mean(probs.argmax(1) == y)


def test_binary_accuracy():
    mod = bpc.compile_model(bpc.mlp([2, 1], loss="bce", name="logreg")).load()
    assert task(mod) == "binary"
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0], [-2.0, 1.0]])
    y = np.array([[1.0], [0.0], [1.0], [1.0]])
    params = {"W1": np.array([[1.0], [0.0]]), "b1": np.array([0.0])}
    assert evaluate(mod, params, {"x": x, "y": y})["accuracy"] == 0.75


# ------------------------------------------------------------------------------- data checks

@pytest.mark.parametrize("data,match", [
    ({"x": np.ones((4, 1))}, "no array named 'y'"),
    ({"x": np.ones((4, 2)), "y": np.ones((4, 1))}, "'x' must have shape"),
    ({"x": np.ones((4, 1)), "y": np.ones((5, 1))}, "different numbers of samples"),
    ({"x": np.array([[1.0], [np.nan], [2.0], [np.inf]]), "y": np.ones((4, 1))}, "NaN or Inf .*sample 1, 2 sample"),
    ({"x": np.array([["a"]] * 4), "y": np.ones((4, 1))}, "must hold numbers"),
    ({"x": np.ones((0, 1)), "y": np.ones((0, 1))}, "no samples"),
])
def test_bad_data_is_refused(linear, data, match):
    with pytest.raises(TrainError, match=match):
        check_data(linear, data)


def test_data_shapes_are_adapted(linear, classifier):
    got = check_data(linear, [np.arange(3), np.arange(3.0)])       # (n,) for a (1,) input, ints -> float
    assert got["x"].shape == (3, 1) and got["x"].dtype == np.float64
    assert check_data(classifier, {"x": np.ones((2, 2)), "y": np.array([0.0, 2.0])})["y"].dtype.kind == "i"


@pytest.mark.parametrize("labels", [[0, 3], [0, -1], [0.5, 1.0], [True, False], [0.0, 7.0], [2**40, 0],
                                    np.array([1, 9], np.uint8), [0.0, -2.0]], ids=str)
def test_labels_are_refused_as_the_module_refuses_them(classifier, labels):
    """check_data judges labels with the generated modules' own functions: the same verdict and
    message before the run (bool labels used to pass it and fail at the first step)."""
    x, y = np.ones((2, 2)), np.asarray(labels)
    with pytest.raises(ValueError) as module_error:
        classifier.loss(classifier.init_params(), x, y)
    with pytest.raises(TrainError) as train_error:
        check_data(classifier, {"x": x, "y": y})
    assert str(module_error.value).startswith("y ")
    assert str(train_error.value) == "data: target 'y' " + str(module_error.value)[2:]


def test_nan_in_data_stops_before_training(linear):
    data = line_data()
    data["y"][5, 0] = np.nan
    with pytest.raises(TrainError, match="'y' holds NaN or Inf .first at sample 5"):
        train(linear, data, TrainConfig(epochs=1))


# ------------------------------------------------------------------------------- stopping

def test_early_stopping_restores_the_best_epoch(linear):
    train_set = line_data(64, seed=0)
    val_set = {"x": train_set["x"], "y": -train_set["y"]}         # learning the line makes this worse
    r = train(linear, train_set, TrainConfig(optimizer="sgd", lr=0.1, epochs=100, patience=3,
                                             batch_size=0), val_data=val_set)
    assert r.stopped == "early_stopping"
    best = int(np.argmin(r.history.val_loss)) + 1
    assert r.best_epoch == best and len(r.history.epoch) == best + 3
    assert r.final["val_loss"] == pytest.approx(min(r.history.val_loss), rel=1e-12)


def test_early_stopping_monitors_training_loss_without_validation(linear):
    r = train(linear, line_data(), TrainConfig(optimizer="sgd", lr=0.1, epochs=500, patience=5,
                                               min_delta=1e-3, batch_size=0))
    assert r.stopped == "early_stopping" and "training loss" in r.message
    assert len(r.history.epoch) < 500


class Scripted:
    """A module wrapper whose backward misbehaves on a chosen call (NaN loss or Ctrl-C)."""

    def __init__(self, module, bad_call, kind):
        self.m, self.bad_call, self.kind, self.calls, self.seen = module, bad_call, kind, 0, []
        for attr in ("PARAMS", "INPUTS", "TARGETS", "TARGET_KINDS", "CLASSES", "DTYPE",
                     "init_params", "forward", "loss"):
            setattr(self, attr, getattr(module, attr))

    def backward(self, params, *arrays):
        self.calls += 1
        self.seen.append({k: np.array(v, copy=True) for k, v in params.items()})
        if self.calls == self.bad_call:
            if self.kind == "interrupt":
                raise KeyboardInterrupt
            value, grads = self.m.backward(params, *arrays)
            return (math.nan, grads) if self.kind == "nan" else (value, dict(grads, W1=grads["W1"] * np.inf))
        return self.m.backward(params, *arrays)


@pytest.mark.parametrize("kind", ["nan", "inf_grad"])
def test_non_finite_loss_stops_and_keeps_the_last_good_params(linear, kind):
    mod = Scripted(linear, bad_call=7, kind=kind)
    r = train(mod, line_data(), TrainConfig(optimizer="sgd", lr=0.1, epochs=10, batch_size=16))
    assert r.stopped == "diverged"
    assert "epoch 2, step 3" in r.message and "last parameters with a finite loss" in r.message
    if kind == "inf_grad":
        assert "W1" in r.message
    for k in r.params:                      # the parameters of the last call whose loss was finite
        np.testing.assert_array_equal(r.params[k], mod.seen[5][k])
    assert all(np.all(np.isfinite(v)) for v in r.params.values())
    assert len(r.history.epoch) == 1


def test_real_divergence_is_caught(linear):
    r = train(linear, line_data(), TrainConfig(optimizer="sgd", lr=50.0, epochs=2000, batch_size=0))
    assert r.stopped == "diverged"
    assert all(np.all(np.isfinite(v)) for v in r.params.values())
    assert any("exploding" in w for w in r.warnings)


class OverflowingValidation(Scripted):
    """A module wrapper whose validation loss overflows from the ``bad_epoch``-th evaluation on."""

    def __init__(self, module, bad_epoch):
        super().__init__(module, bad_call=None, kind=None)
        del self.loss                    # the method below, not the module's
        self.bad_epoch, self.evaluations, self.after = bad_epoch, 0, []

    def loss(self, params, *arrays):
        self.evaluations += 1
        self.after.append({k: np.array(v, copy=True) for k, v in params.items()})
        return math.inf if self.evaluations >= self.bad_epoch else self.m.loss(params, *arrays)


@pytest.mark.parametrize("bad_epoch", [1, 2, 4])
def test_an_overflowing_validation_loss_stops_and_keeps_the_best_params(linear, bad_epoch):
    mod = OverflowingValidation(linear, bad_epoch)
    data = line_data(64)
    with np.errstate(over="raise"):
        r = train(mod, data, TrainConfig(optimizer="sgd", lr=0.05, epochs=10, batch_size=16, val_split=0.25))
        assert np.geterr()["over"] == "raise"        # the run's errstate ends with it
    assert r.stopped == "diverged" and f"validation loss is inf at epoch {bad_epoch}" in r.message
    assert len(r.history.val_loss) == bad_epoch and len(r.history.seconds) == bad_epoch - 1
    if bad_epoch == 1:       # no best epoch: the parameters the run ended with
        assert r.best_epoch is None
        kept = mod.after[0]
    else:
        assert r.best_epoch == int(np.argmin(r.history.val_loss[:-1])) + 1
        kept = mod.after[r.best_epoch - 1]
    for k in r.params:
        np.testing.assert_array_equal(r.params[k], kept[k])


def test_ctrl_c_keeps_the_best_params_so_far(linear):
    # 48 training samples in batches of 16: call 9 is epoch 3, step 3
    mod = Scripted(linear, bad_call=9, kind="interrupt")
    data = line_data(64)
    r = train(mod, data, TrainConfig(optimizer="sgd", lr=0.05, epochs=10, batch_size=16, val_split=0.25))
    assert r.stopped == "interrupted" and "epoch 3" in r.message
    assert r.best_epoch == 2 and len(r.history.val_loss) == 2
    # epoch 2's parameters are those the first step of epoch 3 started from
    for k in r.params:
        np.testing.assert_array_equal(r.params[k], mod.seen[6][k])


def test_ctrl_c_before_the_first_epoch_keeps_the_last_good_params(linear):
    mod = Scripted(linear, bad_call=3, kind="interrupt")
    r = train(mod, line_data(64), TrainConfig(optimizer="sgd", lr=0.05, epochs=10, batch_size=16))
    assert r.stopped == "interrupted" and r.best_epoch is None
    for k in r.params:
        np.testing.assert_array_equal(r.params[k], mod.seen[1][k])


def test_callback_can_stop(linear):
    r = train(linear, line_data(), TrainConfig(epochs=50), on_epoch=lambda e, h: e == 4)
    assert len(r.history.epoch) == 4 and r.stopped == "early_stopping"


# ------------------------------------------------------------------------------- resume, params files

def test_resume_continues_where_a_run_stopped(linear, tmp_path):
    data = line_data()
    cfg = dict(optimizer="sgd", lr=0.1, batch_size=0)
    straight = train(linear, data, TrainConfig(epochs=20, **cfg)).params
    first = train(linear, data, TrainConfig(epochs=10, **cfg)).params
    save_params(first, tmp_path / "p.npz")
    resumed = train(linear, data, TrainConfig(epochs=10, **cfg), params=load_params(linear, tmp_path / "p.npz"))
    for k in straight:
        np.testing.assert_allclose(resumed.params[k], straight[k], rtol=1e-13)


def test_load_params_errors(linear, tmp_path):
    with pytest.raises(TrainError, match="no such file"):
        load_params(linear, tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TrainError, match="not a readable .npz"):
        load_params(linear, tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", W1=np.ones((1, 1)), c=np.ones(1))
    with pytest.raises(TrainError, match="missing: b1; unknown: c"):
        load_params(linear, tmp_path / "other.npz")
    np.savez(tmp_path / "shape.npz", W1=np.ones((2, 1)), b1=np.ones(1))
    with pytest.raises(TrainError, match="'W1' has shape"):
        load_params(linear, tmp_path / "shape.npz")


# ------------------------------------------------------------------------------- gradient norms

def test_per_parameter_gradient_norms_are_logged(linear):
    r = train(linear, line_data(), TrainConfig(optimizer="sgd", lr=0.1, epochs=3, batch_size=0))
    params = linear.init_params(seed=0)
    _, grads = linear.backward(params, *line_data().values())
    assert r.history.param_grad_norms["W1"][0] == pytest.approx(np.linalg.norm(grads["W1"]), rel=1e-12)
    assert r.history.grad_norm[0] == pytest.approx(
        math.hypot(np.linalg.norm(grads["W1"]), np.linalg.norm(grads["b1"])), rel=1e-12)


def test_vanishing_gradient_warning():
    deep = bpc.compile_model(bpc.mlp([4] + [16] * 8 + [1], "sigmoid", "mse", name="deep")).load()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4))
    r = train(deep, {"x": x, "y": x[:, :1]}, TrainConfig(optimizer="sgd", lr=0.01, epochs=2, vanish_ratio=1e-2))
    assert any("vanishing gradient" in w and "'W1'" in w for w in r.warnings)


def test_verbose_log_lines(linear, capsys):
    train(linear, line_data(), TrainConfig(epochs=20, val_split=0.25), verbose=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("epoch  1/20  loss ") and "val " in out[0] and "|grad|" in out[0] and "W1 " in out[0]
    assert out[-1].startswith("epoch 20/20") and len(out) == 11
