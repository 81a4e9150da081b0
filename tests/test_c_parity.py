"""The C module is a peer of the NumPy module (issue 14, item 4): the same update steps
(sgd, momentum, nesterov, adam, clipping, train_step) with the same signatures, state and
errors, agreeing to 1e-10 in float64; the same constants; data of the other float precision
converted; `bpc train --target c` running the NumPy target's run; and a clear message, with the
NumPy target still working, when cffi, the C compiler or Python.h is missing. (The table of
argument kinds and bad arguments on both targets: tests/test_module_inputs.py.)"""
import copy
import json
import os
import re
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import compiler as bpc
from compiler.backends.c import backend as c_backend
from compiler.cli import main
from compiler.errors import UnsupportedError
from compiler.gradcheck import random_batch
from compiler.train.loop import TrainConfig, train
from model_table import NEEDS_CC, PRECISIONS, build, model, perturbed
from test_train_cli import CLF_SPEC

pytestmark = NEEDS_CC

# how close the two targets' parameters, state and losses must be after the steps of a row
TOLERANCE = {"float64": 1e-10, "float32": 2e-5}


def modules(model_id, dtype):
    """(NumPy module, C module), both compiled for ``dtype``."""
    return build(model_id, "numpy", dtype), build(model_id, "c", dtype)


# how a row hands over its parameters and gradients: what a user may pass
def as_params(m, p, form):
    if form == "init":        # init_params' container (on C: a Params, one flat array)
        q = m.init_params(0)
        for k in q:
            q[k][...] = p[k]
        return q
    if form == "dict":
        return {k: v.copy() for k, v in p.items()}
    if form == "floats":      # scalar parameters as Python floats: replaced, not updated in place
        return {k: float(v) for k, v in p.items()}
    if form == "fortran":     # arrays C cannot take as they are: updated on a copy written back
        return {k: np.asfortranarray(v) for k, v in p.items()}
    raise AssertionError(form)


def as_grads(grads, form):
    if form == "result":      # backward's own result
        return grads
    if form == "dict":
        return {k: np.array(v) for k, v in grads.items()}
    if form == "one":         # the steps update only the parameters named in grads
        first = next(iter(grads))
        return {first: grads[first]}
    raise AssertionError(form)


# (id, model, function, keyword arguments, params form, grads form)
STEPS = [
    ("sgd", "mlp_tanh_mse", "sgd_step", dict(lr=0.1), "init", "result"),
    ("sgd, weight decay", "mlp_tanh_mse", "sgd_step", dict(lr=0.1, weight_decay=0.05), "init", "result"),
    ("momentum", "mlp_tanh_mse", "momentum_step", dict(lr=0.1, momentum=0.8), "init", "result"),
    ("nesterov, weight decay", "mlp_tanh_mse", "momentum_step", dict(lr=0.1, nesterov=True, weight_decay=0.01),
     "init", "result"),
    ("adam", "mlp_tanh_mse", "adam_step", dict(lr=0.01), "init", "result"),
    ("adamw", "mlp_tanh_mse", "adam_step", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1),
     "init", "result"),
    ("adam, plain dicts", "softmax_labels", "adam_step", dict(lr=0.01), "dict", "dict"),
    ("momentum, plain params, backward's grads", "softmax_labels", "momentum_step", dict(lr=0.05), "dict", "result"),
    ("adam, one parameter's gradient", "mlp_tanh_mse", "adam_step", dict(lr=0.01), "init", "one"),
    ("nesterov, one parameter's gradient", "mlp_tanh_mse", "momentum_step", dict(lr=0.1, nesterov=True),
     "dict", "one"),
    ("sgd, scalar params as floats", "poly_fit", "sgd_step", dict(lr=0.05), "floats", "result"),
    ("adam, scalar params as floats", "poly_fit", "adam_step", dict(lr=0.05, weight_decay=0.01), "floats", "dict"),
    ("momentum, Fortran-order params", "mlp_tanh_mse", "momentum_step", dict(lr=0.1), "fortran", "dict"),
    ("train_step sgd", "mlp_tanh_mse", "train_step", dict(optimizer="sgd", lr=0.1), "init", None),
    ("train_step momentum, clip", "mlp_tanh_mse", "train_step", dict(optimizer="momentum", lr=0.1, clip=0.5),
     "init", None),
    ("train_step nesterov, weight decay", "softmax_labels", "train_step",
     dict(optimizer="nesterov", lr=0.1, weight_decay=0.01), "init", None),
    ("train_step adam, clip", "softmax_labels", "train_step", dict(optimizer="adam", lr=0.01, clip=0.1), "init", None),
    ("train_step adam, plain dict", "poly_fit", "train_step", dict(optimizer="adam", lr=0.05, clip=1.0), "dict", None),
    ("train_step with dropout", "dropout", "train_step", dict(optimizer="adam", lr=0.01, clip=1.0), "init", None),
]


def run_steps(m, row, steps=4):
    """(losses, parameters, state) after ``steps`` steps of ``row`` on module ``m``."""
    _, model_id, fn, kwargs, pform, gform = row
    params, state, losses = as_params(m, perturbed(m, 1), pform), {}, []
    for step in range(steps):
        data = random_batch(m, batch=5, seed=step)
        if fn == "train_step":
            seed = {"seed": step} if getattr(m, "DROPOUT", None) else {}
            losses.append(m.train_step(params, state, *data, **kwargs, **seed))
        else:
            loss, grads = m.backward(params, *data)
            losses.append(loss)
            assert getattr(m, fn)(params, as_grads(grads, gform), state, **kwargs) is params
    return losses, params, state


def flat_state(state):
    """{"m/W1": array, "t": 3, ...}: the state's numbers, whatever containers hold them."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": np.asarray(v) for k, v in value.items()})
        else:
            out[key] = value
    return out


def close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and np.allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("row", STEPS, ids=[r[0] for r in STEPS])
def test_every_update_step_agrees_on_both_targets(row, dtype):
    npm, cm = modules(row[1], dtype)
    tol = TOLERANCE[dtype]
    (nl, np_params, ns), (cl, c_params, cs) = run_steps(npm, row), run_steps(cm, row)
    assert close(nl, cl, tol), (nl, cl)
    assert set(np_params) == set(c_params) == set(npm.PARAMS)
    for k in np_params:
        assert close(np_params[k], c_params[k], tol), k
        # an array stays an array of the module's dtype; a float becomes a 0-d array on both targets
        # (of the module's dtype on C; the NumPy module's arithmetic with a float may widen it)
        assert type(np_params[k]) is type(c_params[k]) and np.asarray(c_params[k]).dtype == np.dtype(dtype)
    # the same state, entry for entry (the C module's moments hold every parameter: zeros
    # for those no gradient has reached, where the NumPy module has no entry yet)
    ns, cs = flat_state(ns), flat_state(cs)
    assert set(ns) <= set(cs)
    for k in cs:
        if k in ns:
            assert close(ns[k], cs[k], tol), k
        else:
            assert not np.any(cs[k]), k
    if row[2] != "sgd_step":     # something happened: a step changed the parameters
        assert not close(np_params[next(iter(np_params))], perturbed(npm, 1)[next(iter(np_params))], 0)


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_clipping_and_norms_agree(dtype):
    npm, cm = modules("mlp_tanh_mse", dtype)
    data = random_batch(cm, batch=5, seed=3)
    p = perturbed(cm, 2)
    _, ng = npm.backward(p, *data)
    _, cg = cm.backward(as_params(cm, p, "init"), *data)
    tol = TOLERANCE[dtype]
    norm = npm.grad_norm(ng)
    for grads in (cg, dict(cg)):     # a Params (one C loop) and a plain dict
        assert cm.grad_norm(grads) == pytest.approx(norm, rel=tol)
        for max_norm in (norm / 3, None, 2 * norm):
            nc, n1 = npm.clip_grad_norm(ng, max_norm)
            cc, n2 = cm.clip_grad_norm(grads, max_norm)
            assert n1 == pytest.approx(n2, rel=tol)
            assert (cc is grads) == (nc is ng), max_norm    # unclipped: the input itself
            assert all(close(nc[k], cc[k], tol) and cc[k].dtype == np.dtype(dtype) for k in nc)
        assert all(close(ng[k], grads[k], tol) for k in ng)   # the input is never changed


def test_state_moves_between_targets():
    """A state begun on one target continues on the other (a checkpoint of either resumes on
    both): 2 Adam steps on NumPy then 2 on C equal 4 on NumPy, and the other way round."""
    npm, cm = modules("softmax_labels", "float64")
    batches = [random_batch(cm, batch=6, seed=s) for s in range(4)]

    def steps(m, params, state, which):
        for s in which:
            m.train_step(params, state, *batches[s], optimizer="adam", lr=0.02, weight_decay=0.01)
        return params, state

    ref, ref_state = steps(npm, perturbed(npm, 1), {}, range(4))
    for first, second in ((npm, cm), (cm, npm)):
        p, state = steps(first, as_params(first, perturbed(npm, 1), "init"), {}, range(2))
        state = copy.deepcopy(state)          # as a checkpoint keeps it: plain dicts of arrays
        assert all(type(v) in (dict, int) for v in state.values())
        p = as_params(second, {k: np.asarray(v) for k, v in p.items()}, "init")
        p, state = steps(second, p, state, range(2, 4))
        assert state["t"] == 4
        for k in ref:
            assert close(p[k], ref[k], 1e-12), (first.__name__, k)
            assert close(state["m"][k], ref_state["m"][k], 1e-12) and close(state["v"][k], ref_state["v"][k], 1e-12)


def message(fn):
    try:
        fn()
    except Exception as e:
        return type(e), str(e)
    raise AssertionError("no error")


# (id, call on a module m with params p and a batch (x, y)): the same error on both targets
ERRORS = [
    ("momentum without a state", lambda m, p, x, y: m.momentum_step(p, m.backward(p, x, y)[1], None)),
    ("adam with a list as state", lambda m, p, x, y: m.adam_step(p, m.backward(p, x, y)[1], [])),
    ("train_step with an unknown optimizer", lambda m, p, x, y: m.train_step(p, {}, x, y, optimizer="lbfgs")),
    ("train_step adam without a state", lambda m, p, x, y: m.train_step(p, None, x, y)),
    ("train_step with an unknown option", lambda m, p, x, y: m.train_step(p, {}, x, y, optimizer="sgd", beta1=0.9)),
    ("train_step on a NaN loss", lambda m, p, x, y: m.train_step(p, {}, np.full_like(x, np.nan), y, lr=0.1)),
    ("train_step on bad data", lambda m, p, x, y: m.train_step(p, {}, x[:, :2], y, optimizer="sgd")),
    ("train_step without targets", lambda m, p, x, y: m.train_step(p, {}, x, optimizer="sgd")),
]


@pytest.mark.parametrize("row", ERRORS, ids=[r[0] for r in ERRORS])
def test_update_steps_fail_alike_and_leave_params_unchanged(row):
    npm, cm = modules("mlp_tanh_mse", "float64")
    x, y = random_batch(cm, batch=4, seed=0)
    got = []
    for m in (npm, cm):
        p = as_params(m, perturbed(m, 1), "init")
        before = {k: v.copy() for k, v in p.items()}
        got.append(message(lambda: row[1](m, p, x, y)))
        assert all(np.array_equal(p[k], before[k]) for k in p)
    assert got[0] == got[1]
    assert "Traceback" not in got[0][1]


def test_train_step_takes_huge_finite_gradients():
    """A gradient whose square overflows (2e300) is finite: train_step updates with it on both
    targets (the C module's one-loop finiteness check falls back to the exact one)."""
    npm, cm = modules("poly_fit", "float64")
    x, y = np.array([1e100]), np.array([1.0])
    got = []
    for m in (npm, cm):
        p = as_params(m, {k: np.zeros(()) for k in m.PARAMS}, "init")
        loss = m.train_step(p, {}, x, y, optimizer="sgd", lr=1e-302)
        got.append((loss, {k: float(v) for k, v in p.items()}))
    assert got[0] == got[1] and got[0][0] == 1.0 and got[0][1]["a"] == pytest.approx(0.02)


def test_the_same_constants():
    npm, cm = modules("softmax_labels", "float64")
    public = {k for k in dir(npm) if not k.startswith("_")}
    # hvp and gnvp: in C only when compiled with second_order=True (tests/test_hvp.py runs them)
    assert public - {"hvp", "gnvp"} <= set(dir(cm)) and {"hvp", "gnvp"} <= public
    assert {"hvp", "gnvp"} <= set(dir(build("softmax_labels", "c", "float64", second_order=True)))
    for k in public:
        if k.isupper() and k != "OPTIMIZERS":
            assert getattr(npm, k) == getattr(cm, k), k
    assert cm.LOSS == "softmax_cross_entropy" and set(cm.OPTIMIZERS) == set(npm.OPTIMIZERS)


# ---- data of the other float precision: converted, and the results those of converted data ----

@pytest.mark.parametrize("dtype", PRECISIONS)
def test_the_other_float_precision_is_converted(dtype):
    """Data (and, on C, parameters) of the other float type give the results of the same values
    converted to the module's dtype, in that dtype, on both targets."""
    other = "float32" if dtype == "float64" else "float64"
    npm, cm = modules("softmax_onehot", dtype)
    x, y = (a.astype(other) for a in random_batch(cm, batch=5, seed=1))
    xd, yd = x.astype(dtype), y.astype(dtype)
    p = perturbed(cm, 1)
    for m, params, ref in ((npm, p, p), (cm, {k: v.astype(other) for k, v in p.items()},
                                          {k: v.astype(other).astype(dtype) for k, v in p.items()})):
        want_loss, want = m.backward(ref, xd, yd)
        loss, grads = m.backward(params, x, y)
        assert loss == pytest.approx(want_loss, rel=1e-12, abs=0)
        assert all(grads[k].dtype == np.dtype(dtype) and close(grads[k], want[k], 1e-12) for k in want)
        out = m.forward(params, x)
        assert out.dtype == np.dtype(dtype) and close(out, m.forward(ref, xd), 1e-12)
    assert np.allclose(cm.forward(p, x), npm.forward(p, x), rtol=PRECISIONS[dtype].agree, atol=0)


# ---- bpc train: the C module's run is the NumPy module's --------------------------------------

RUNS = [
    ("adam, mini-batches, clip", "softmax_labels", TrainConfig(optimizer="adam", lr=0.01, epochs=4, batch_size=8, clip=0.5)),
    ("nesterov, cosine", "mlp_tanh_mse", TrainConfig(optimizer="nesterov", lr=0.05, epochs=4, batch_size=10,
                                                     schedule="cosine")),
    ("sgd, full batch, weight decay", "poly_fit", TrainConfig(optimizer="sgd", lr=0.05, epochs=5, batch_size=0,
                                                              weight_decay=0.01)),
    ("adam with dropout", "dropout", TrainConfig(optimizer="adam", lr=0.01, epochs=3, batch_size=8)),
]


@pytest.mark.parametrize("row", RUNS, ids=[r[0] for r in RUNS])
def test_training_a_c_module_is_training_the_numpy_module(row):
    _, model_id, config = row
    npm, cm = modules(model_id, "float64")
    data = random_batch(cm, batch=40, seed=7)
    a, b = train(npm, data, config), train(cm, data, config)
    assert a.stopped == b.stopped == "completed"
    assert np.allclose(a.history.train_loss, b.history.train_loss, rtol=1e-10, atol=0)
    assert np.allclose(a.history.val_loss, b.history.val_loss, rtol=1e-10, atol=0)
    assert a.history.train_loss[-1] != a.history.train_loss[0]
    for k in a.params:
        assert close(a.params[k], b.params[k], 1e-10), k


# the classifier of tests/test_train_cli.py, compiled for one dtype, with a [train] table
CSV_SPEC = CLF_SPEC.replace('name = "clf"', 'name = "clf_c"\ndtype = "{dtype}"') + """
[train]
optimizer = "adam"
lr = 0.02
epochs = 6
batch_size = 16
clip = 1.0
"""


@pytest.fixture
def csv_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for dtype in PRECISIONS:
        (tmp_path / f"clf_{dtype}.toml").write_text(CSV_SPEC.replace("{dtype}", dtype))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 2))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    (tmp_path / "clf.csv").write_text("x0,x1,y\n" + "".join(f"{a!r},{b!r},{c}\n" for (a, b), c in zip(x.tolist(), y)))
    return tmp_path


def bpc_train(spec, target, *extra):
    history = f"{spec}-{target}.json"
    code = main(["train", spec, "--data", "clf.csv", "--target", target, "-q", "--out", f"{spec}-{target}.npz",
                 "--history", history, *extra])
    return code, json.loads(open(history).read())


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_bpc_train_target_c_on_csv_data(csv_work, dtype, capsys):
    """CSV data (float64) trains a C module of either precision (converted once for the run),
    with the NumPy target's loss trajectory."""
    spec = f"clf_{dtype}.toml"
    (code_n, numpy_run), (code_c, c_run) = bpc_train(spec, "numpy"), bpc_train(spec, "c")
    assert code_n == code_c == 0, capsys.readouterr().err
    assert len(c_run["train_loss"]) == 6
    tol = 1e-10 if dtype == "float64" else 1e-4
    assert np.allclose(numpy_run["train_loss"], c_run["train_loss"], rtol=tol, atol=0)
    assert np.allclose(numpy_run["val_loss"], c_run["val_loss"], rtol=tol, atol=0)
    saved = np.load(f"{spec}-c.npz")
    assert all(saved[k].dtype == np.dtype(dtype) for k in saved.files)


def test_target_applies_to_specs_only(csv_work, capsys):
    bpc.compile_model(model("softmax_labels")).write(csv_work / "clf_module.py")
    assert main(["train", "clf_module.py", "--data", "clf.csv", "--target", "c"]) == 2
    assert "--target applies when compiling a spec" in capsys.readouterr().err


# ---- a missing cffi, C compiler or Python.h: a clear message; the NumPy target still works ----

def no_cffi(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cffi", None)     # `import cffi` raises ImportError


def no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "bpc-no-such-compiler")


def no_python_h(monkeypatch, tmp_path):
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**paths, "include": str(tmp_path)})


MISSING = [("cffi", no_cffi, r"the C target needs cffi \(pip install cffi"),
           ("C compiler", no_compiler, r"the C target needs a C compiler, and 'bpc-no-such-compiler' was not found"),
           ("Python.h", no_python_h, r"the C target needs the Python development headers \(Python.h not found")]


@pytest.fixture
def fresh_toolchain():
    c_backend._toolchain.cache_clear()
    yield
    c_backend._toolchain.cache_clear()


@pytest.mark.parametrize("row", MISSING, ids=[r[0] for r in MISSING])
def test_missing_toolchain_is_a_clear_error(row, csv_work, monkeypatch, capsys, fresh_toolchain):
    _, simulate, text = row
    simulate(monkeypatch, csv_work)
    compiled = c_backend.compile_model_c(model("poly_fit"))
    with pytest.raises(UnsupportedError, match=text + r".*the NumPy target \(compile_model\) still works"):
        compiled.load(cache=csv_work / "cache")      # a fresh cache: nothing built to fall back on
    monkeypatch.setenv("BPC_CACHE", str(csv_work / "cache"))
    assert main(["train", "clf_float64.toml", "--data", "clf.csv", "--target", "c", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bpc: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    assert bpc_train("clf_float64.toml", "numpy")[0] == 0
    m = bpc.compile_model(model("poly_fit")).load()
    assert np.isfinite(m.loss(m.init_params(0), *random_batch(m, batch=3)))


WRAPPER_MISSING = [("cffi", "import sys; sys.modules['cffi'] = None\n", {},
                    r"the C extension _bpc_poly_\w+ is not built and cffi is not installed \(pip install cffi\)"),
                   ("C compiler", "", {"CC": "bpc-no-such-compiler"},
                    r"cannot build the C extension _bpc_poly_\w+ in .*: it needs a C compiler")]


@pytest.mark.parametrize("row", WRAPPER_MISSING, ids=[r[0] for r in WRAPPER_MISSING])
def test_written_wrapper_without_toolchain_says_what_is_missing(row, tmp_path):
    """The files of `bpc compile --target c`, imported on a machine without cffi or a C
    compiler: an ImportError that says which, not a traceback from inside cffi."""
    _, prelude, env, text = row
    c_backend.compile_model_c(model("poly_fit"), prefix="poly").write(tmp_path)
    code = prelude + ("try:\n    import poly\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ImportError: poly: "), proc.stdout
    assert re.search(text, proc.stdout), proc.stdout
