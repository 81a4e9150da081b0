"""The C backend: the tanh helper, the wrapper's argument checks, the build cache, build errors,
and the standalone C files. (The model table on both backends: tests/test_core_gradients.py.)"""
import dataclasses
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import compiler as bpc
from compiler.backends.c import backend as c_backend
from compiler.backends.c.backend import CBuildError, compile_model_c
from compiler.errors import ModelError, UnsupportedError
from compiler.gradcheck import random_batch
from model_table import MODELS, build, model, perturbed, rel_err

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler")

_MODELS = dict(MODELS)


def built(model_id, dtype="float64"):
    """(model, NumPy module, C module), built once per session (tests/model_table.py)."""
    return model(model_id), build(model_id, "numpy", dtype), build(model_id, "c", dtype)


# ---- the C helpers ---------------------------------------------------------------------------
# (the model table on both backends: tests/test_core_gradients.py for gradients, float32 and
# NumPy against C; tests/test_core_stability.py for inputs at +-1000)

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_c_tanh_helper_matches_numpy(dtype):
    """bpc_tanh (inlined, from expm1) against numpy.tanh: every branch, tiny and subnormal
    numbers, the +-1 and +-22 thresholds, +-inf and nan."""
    _, npm, cm = built("matrix_rows", dtype)
    dt = np.dtype(dtype)
    p = cm.init_params(0)
    p["W"][...] = [[1, 0], [0, 0], [0, 0]]   # out = tanh(x0) * 1 + tanh(0) * 0, times alpha = 1
    p["c"][...] = [[1], [0]]
    p["alpha"][...] = 1
    rng = np.random.default_rng(0)
    special = [0.0, -0.0, 1e-310, -1e-310, 1e-30, 0.5, 1.0, -1.0, np.nextafter(1.0, 0), 21.99, 22.0, -22.0,
               30.0, 1000.0, -1000.0, np.inf, -np.inf, np.nan]
    values = np.concatenate([special, rng.standard_normal(500) * np.repeat([1e-8, 0.1, 1.0, 5.0, 30.0], 100)])
    x = np.zeros((values.size, 3), dt)
    x[:, 0] = values
    got = cm.forward(p, x).reshape(-1)
    # +-inf and nan pass through x @ W (inf * 0 is nan), as in the NumPy module
    with np.errstate(invalid="ignore"):
        want = npm.forward(dict(p), x).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=2 * np.finfo(dt).eps, atol=0)
    finite = np.isfinite(values)
    np.testing.assert_allclose(got[finite], np.tanh(x[finite, 0]), rtol=2 * np.finfo(dt).eps, atol=0)


# ---- the wrapper: arguments, results ------------------------------------------------------

def test_wrapper_rejects_bad_arrays():
    _, _, cm = built("mlp_tanh_mse")
    p = cm.init_params(0)
    x = np.zeros((4, 3))
    y = np.zeros((4, 2))
    with pytest.raises(ValueError, match="real numbers, got dtype complex128"):
        cm.forward(p, x.astype(np.complex128))
    with pytest.raises(ValueError, match=r"shape \(batch,\) \+ \(3,\)"):
        cm.backward(p, np.zeros((4, 2)), y)
    with pytest.raises(ValueError, match="shape"):
        cm.forward(p, np.zeros(3))
    with pytest.raises(ValueError, match="batch sizes"):
        cm.loss(p, x, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="empty"):
        cm.loss(p, x[:0], y[:0])
    with pytest.raises(ValueError, match="empty"):   # as by the NumPy module (tests/test_module_inputs.py)
        cm.forward(p, x[:0])
    bad = dict(p)
    bad["W1"] = np.zeros((5, 3))
    with pytest.raises(ValueError, match=r"parameter 'W1' must have shape \(3, 5\)"):
        cm.loss(bad, x, y)
    del bad["W1"]
    with pytest.raises(ValueError, match="no entry 'W1'"):
        cm.loss(bad, x, y)
    with pytest.raises(ValueError, match="compiled for float64"):
        cm.init_params(0, dtype="float32")


def test_wrapper_rejects_bad_labels():
    _, npm, cm = built("softmax_labels")
    p = cm.init_params(0)
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels in 0\.\.2, got 3"):
        cm.backward(p, x, np.array([0, 3, 1]))
    with pytest.raises(ValueError, match=r"labels in 0\.\.2, got -1"):
        cm.loss(p, x, np.array([-1, 0, 1]))
    with pytest.raises(ValueError, match=r"integer class labels in 0\.\.2, got 0\.5"):
        cm.loss(p, x, np.array([0.5, 0.0, 1.0]))
    y32 = np.array([0, 2, 1], dtype=np.int32)   # any integer dtype is fine
    assert cm.loss(p, x, y32) == pytest.approx(npm.loss(dict(p), x, y32), rel=1e-12)


def test_wrapper_accepts_inputs_like_the_numpy_module():
    """Integer and boolean data arrays and nested lists of integers are converted to the
    module's dtype (a copy), as by the NumPy module; the results agree."""
    for dtype in ("float64", "float32"):
        _, npm, cm = built("mlp_tanh_mse", dtype)
        p = perturbed(cm, 3)
        x = np.arange(12).reshape(4, 3) % 5 - 2
        y = np.array([[1, 0], [0, 1], [2, -1], [0, 0]])
        tol = 1e-12 if dtype == "float64" else 1e-5
        for how, xs, ys in [("int64", x, y), ("int32", x.astype(np.int32), y.astype(np.int8)),
                            ("uint8 and bool", (x > 0).astype(np.uint8), y.astype(bool)),
                            ("nested lists", x.tolist(), y.tolist())]:
            xf, yf = np.asarray(xs).astype(dtype), np.asarray(ys).astype(dtype)
            ref_loss, ref = npm.backward(p, xf, yf)
            ref_out = npm.forward(p, xf)
            for _ in range(2):   # the second call after the shapes are known (the fast check)
                loss, g = cm.backward(p, xs, ys)
                assert loss == pytest.approx(ref_loss, rel=tol), (dtype, how)
                assert all(rel_err(g[k], ref[k]) <= tol for k in ref), (dtype, how)
                assert cm.loss(p, xs, ys) == pytest.approx(ref_loss, rel=tol), (dtype, how)
                out = cm.forward(p, xs)
                assert out.dtype == np.dtype(dtype) and rel_err(out, ref_out) <= tol, (dtype, how)
            assert npm.loss(p, xs, ys) == pytest.approx(ref_loss, rel=tol), (dtype, how)   # NumPy agrees


def test_wrapper_accepts_float_labels_like_the_numpy_module():
    """Float labels holding integers are converted, as by the NumPy module; other floats and
    out-of-range labels raise the same ValueErrors as integer labels."""
    _, npm, cm = built("softmax_labels")
    p = perturbed(cm, 4)
    x = random_batch(cm, batch=3, seed=4)[0]
    labels = np.array([0, 2, 1])
    ref_loss, ref = npm.backward(p, x, labels)
    for how, y in [("float64", labels.astype(np.float64)), ("float32", labels.astype(np.float32)),
                   ("list of floats", [0.0, 2.0, 1.0]), ("strided floats", np.repeat(labels, 2).astype(float)[::2])]:
        loss, g = cm.backward(p, x, y)
        assert loss == pytest.approx(ref_loss, rel=1e-12), how
        assert all(rel_err(g[k], ref[k]) <= 1e-12 for k in ref), how
        assert cm.loss(p, x, y) == pytest.approx(ref_loss, rel=1e-12), how
        assert npm.loss(p, x, y) == pytest.approx(ref_loss, rel=1e-12), how
    bad = [(np.array([0.0, 1.5, 1.0]), r"integer class labels in 0\.\.2, got 1\.5"),
           (np.array([0.0, np.nan, 1.0]), r"integer class labels in 0\.\.2, got nan"),
           (np.array([0.0, 3.0, 1.0]), r"labels in 0\.\.2, got 3$"),
           (np.array([-1.0, 0.0, 1.0]), r"labels in 0\.\.2, got -1$"),
           (np.array([0.0, np.inf, 1.0]), r"labels in 0\.\.2, got inf"),
           ([0.0, 1.0, 7.0], r"labels in 0\.\.2, got 7$"),
           (np.array([[0.0, 1.0, 2.0]]), "1-D")]
    for y, message in bad:
        for fn in (cm.loss, cm.backward):
            with pytest.raises(ValueError, match=message):
                fn(p, x, y)
        if not np.isinf(np.asarray(y)).any():   # (the NumPy module casts inf to an integer first)
            with pytest.raises(ValueError):
                npm.loss(p, x, y)


def test_params_fast_path_and_plain_dicts_agree():
    _, npm, cm = built("mlp_tanh_mse")
    arrays = random_batch(cm, batch=5, seed=9)
    p = cm.init_params(3)
    assert isinstance(p, dict) and p.flat.shape == (cm.NUM_PARAMS,)
    l0, g0 = cm.backward(p, *arrays)
    # in-place updates (including `p[k] -= ...`) keep the flat storage and are seen by C
    p["W1"] -= 0.1 * g0["W1"]
    p.flat[cm.OFFSETS["b2"]] += 0.5
    plain = {k: np.array(v) for k, v in p.items()}
    assert cm.backward(p, *arrays)[0] == pytest.approx(npm.backward(plain, *arrays)[0], rel=1e-12)
    # replacing an entry: C must see the new array (slow path), not the old storage
    p["W2"] = np.zeros_like(p["W2"])
    plain["W2"] = np.zeros_like(plain["W2"])
    assert cm.loss(p, *arrays) == pytest.approx(npm.loss(plain, *arrays), rel=1e-12)
    # grads are fresh each call, never overwritten by a later call
    _, g1 = cm.backward(plain, *arrays)
    before = {k: np.array(v) for k, v in g1.items()}
    cm.backward(cm.init_params(5), *arrays)
    for k in before:
        np.testing.assert_array_equal(g1[k], before[k])
    # Params pickle as plain dicts of arrays
    back = pickle.loads(pickle.dumps(p))
    assert type(back) is dict and all(np.array_equal(back[k], p[k]) for k in p)


def _other_inputs(cm, arrays, seed):
    """A batch like ``arrays`` with other values (so that recycled gradients would differ)."""
    return random_batch(cm, batch=np.shape(arrays[0])[0], seed=seed)


def _snapshot(g):
    return {k: np.array(v) for k, v in g.items()}


def _same(g, snap):
    return set(g) == set(snap) and all(np.array_equal(g[k], snap[k]) for k in snap)


def test_recycled_gradients_are_never_seen_to_change():
    """backward recycles a result only when nothing refers to it: every way of keeping a
    result, or a part of it, keeps its values."""
    import weakref
    _, npm, cm = built("mlp_tanh_mse")
    p = cm.init_params(1)
    arrays = random_batch(cm, batch=1, seed=1)
    keep = {
        "Params": lambda g: g,
        "one array": lambda g: g["W2"],
        "a view of an array": lambda g: g["W2"][1:],
        "a reshaped array": lambda g: g["b1"].reshape(-1, 1),
        "flat": lambda g: g.flat,
        "values": lambda g: list(g.values()),
        "items view": lambda g: g.items(),
        "memoryview": lambda g: memoryview(g["W1"]),
        "the array's base": lambda g: g["W1"].base,
        "a weak reference": lambda g: weakref.ref(g["W2"]),
    }
    for how, take in keep.items():
        for _ in range(3):   # fresh, recycled and alternating ring entries
            _, g = cm.backward(p, *arrays)
            snap = _snapshot(g)
            kept = take(g)
            del g
            for seed in range(4):
                cm.backward(p, *_other_inputs(cm, arrays, 10 + seed))
            held = kept() if how == "a weak reference" else kept
            if held is None:   # a weakly referenced array that was not recycled has died: fine
                continue
            if how == "Params":
                assert _same(held, snap), how
            elif how == "flat":
                np.testing.assert_array_equal(held, np.concatenate([snap[k].ravel() for k in cm.PARAMS]))
            elif how == "values":
                assert all(np.array_equal(a, snap[k]) for a, k in zip(held, cm.PARAMS)), how
            elif how == "items view":
                assert all(np.array_equal(a, snap[k]) for k, a in held), how
            elif how == "memoryview":
                np.testing.assert_array_equal(np.asarray(held), snap["W1"])
            elif how == "the array's base":
                np.testing.assert_array_equal(held[:cm.NUM_PARAMS], np.concatenate([snap[k].ravel() for k in cm.PARAMS]))
            else:
                ref = {"one array": snap["W2"], "a view of an array": snap["W2"][1:],
                       "a reshaped array": snap["b1"].reshape(-1, 1), "a weak reference": snap["W2"]}[how]
                np.testing.assert_array_equal(held, ref)
            del kept, held


def test_recycling_happens_and_results_stay_correct():
    """Dropped results are recycled (the same objects come back, at most two per thread), and
    every result equals the NumPy module's, also after the caller modified a dropped one."""
    _, npm, cm = built("mlp_tanh_mse")
    p = cm.init_params(2)
    plain = {k: np.array(v) for k, v in p.items()}
    seen = set()
    for seed in range(8):
        arrays = random_batch(cm, batch=[1, 3][seed % 2], seed=seed)
        loss, g = cm.backward(p, *arrays)
        ref_loss, ref = npm.backward(plain, *arrays)
        assert type(g) is cm.Params and type(loss) is float and loss == pytest.approx(ref_loss, rel=1e-12)
        assert all(rel_err(g[k], ref[k]) <= 1e-12 for k in ref)
        assert g.flat.shape == (cm.NUM_PARAMS,) and np.array_equal(g.flat, np.concatenate([g[k].ravel() for k in cm.PARAMS]))
        seen.add(id(g))
        g["W1"] *= 3.0          # in place: the result stays recyclable
        if seed == 5:
            g["b1"] = np.zeros(5)   # replaced: never recycled again
        del g
    if cm._RECYCLE:
        assert len(seen) <= 3 and len(cm._tls.ring) <= cm._RING


def test_training_loop_keeps_the_previous_result():
    """In place updates with the previous result still referenced (the ring alternates), and
    a result kept for good (it must not change and must not slow later calls down)."""
    _, npm, cm = built("mlp_tanh_mse")
    arrays = random_batch(cm, batch=4, seed=3)
    p = cm.init_params(4)
    plain = {k: np.array(v) for k, v in p.items()}
    _, first = cm.backward(p, *arrays)
    first_snap = _snapshot(first)
    prev = None
    for step in range(6):
        loss, g = cm.backward(p, *arrays)
        ref_loss, ref = npm.backward(plain, *arrays)
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        assert all(rel_err(g[k], ref[k]) <= 1e-12 for k in ref)
        if prev is not None:
            assert _same(prev[0], prev[1])   # the previous result is intact
            assert prev[0] is not g
        p.flat -= 0.1 * g.flat
        for k in plain:
            plain[k] -= 0.1 * ref[k]
        prev = (g, _snapshot(g))
        del g
    assert _same(first, first_snap)


def test_without_recycling_every_result_is_fresh(monkeypatch):
    """Where reference counts cannot prove a result unused (no GIL, not CPython), none is
    recycled: every call returns new arrays."""
    import threading
    _, npm, cm = built("mlp_tanh_mse")
    monkeypatch.setattr(cm, "_RECYCLE", False)
    p = cm.init_params(1)
    arrays = random_batch(cm, batch=1, seed=2)
    out = []

    def run():   # a new thread: its ring is made with _RECYCLE off
        for _ in range(5):
            cm.backward(p, *arrays)   # dropped at once: would be recycled
            out.append(cm.backward(p, *arrays)[1])
        rings.append(list(cm._tls.ring))
    rings = []
    th = threading.Thread(target=run)
    th.start()
    th.join()
    results = out
    assert rings == [[((), None)]]   # no recyclable entries
    assert len({id(g) for g in results}) == len(results)
    ref = npm.backward(dict(p), *arrays)[1]
    assert all(rel_err(g[k], ref[k]) <= 1e-12 for g in results for k in ref)


def test_gradients_into_a_buffer_the_caller_keeps():
    """backward(..., grads=g) writes into g (Params(), or an earlier result) and returns it,
    with the values of a fresh result, for every batch size and with dropout; anything else is
    refused with a ValueError saying what grads must be."""
    for model_id, mode in (("mlp_tanh_mse", {}), ("dropout", {"training": True, "seed": 3})):
        _, npm, cm = built(model_id)
        p = cm.init_params(1)
        g = cm.Params()
        for batch in (1, 7, 300):
            arrays = random_batch(cm, batch=batch, seed=batch)
            ref_loss, ref = npm.backward(dict(p), *arrays, **mode)
            loss, out = cm.backward(p, *arrays, **mode, grads=g)
            assert out is g and loss == pytest.approx(ref_loss, rel=1e-12)
            assert all(rel_err(g[k], ref[k]) <= 1e-12 for k in ref), (model_id, batch)
            _, fresh = cm.backward(p, *arrays, **mode)
            assert cm.backward(p, *arrays, **mode, grads=fresh)[1] is fresh and _same(fresh, _snapshot(g))
    _, _, cm = built("mlp_tanh_mse")
    p = cm.init_params(1)
    arrays = random_batch(cm, batch=2, seed=0)
    replaced = cm.Params()
    replaced["b1"] = np.zeros(5)
    other = build("mlp_relu_mse", "c", "float64").Params()
    for bad, what in [(p, "params itself"), (dict(p), "dict"), (replaced, "a Params whose arrays were replaced"),
                      (cm.Params(np.zeros(cm.NUM_PARAMS)), "a Params over a flat array of yours"),
                      (other, "a Params of another module"), (np.zeros(cm.NUM_PARAMS + 1), "ndarray")]:
        with pytest.raises(ValueError, match=r"^grads must be a Params of this module to write the gradients into "
                                             r"\(Params\(\), or an earlier result of backward\), not " + what):
            cm.backward(p, *arrays, grads=bad)


def test_plain_dict_params_with_recycled_results():
    _, npm, cm = built("mlp_tanh_mse")
    arrays = random_batch(cm, batch=2, seed=4)
    plain = {k: np.array(v) for k, v in cm.init_params(6).items()}
    for _ in range(3):
        loss, g = cm.backward(plain, *arrays)
        assert loss == pytest.approx(npm.backward(plain, *arrays)[0], rel=1e-12)
        for k in plain:
            plain[k] = plain[k] - 0.2 * g[k]


def test_plain_dict_params_in_every_form():
    """Plain dicts take a packing fast path when every array is C-contiguous and exact; the
    other forms (non-contiguous or Fortran-order arrays, nested lists, dict subclasses) are
    copied by the general path; all agree with the NumPy module."""
    import collections
    _, npm, cm = built("mlp_tanh_mse")
    arrays = random_batch(cm, batch=3, seed=8)
    base = perturbed(npm, 8)
    ref_loss, ref = npm.backward(base, *arrays)
    forms = {
        "exact": {k: np.array(v) for k, v in base.items()},
        "fortran": {k: np.asfortranarray(v) for k, v in base.items()},
        "strided": {k: np.repeat(v[..., None], 2, axis=-1)[..., 0] for k, v in base.items()},
        "lists": {k: v.tolist() for k, v in base.items()},
        "ordered dict": collections.OrderedDict(reversed(list(base.items()))),
    }
    for how, params in forms.items():
        loss, g = cm.backward(params, *arrays)
        assert loss == pytest.approx(ref_loss, rel=1e-12), how
        assert all(rel_err(g[k], ref[k]) <= 1e-12 for k in ref), how
        assert cm.loss(params, *arrays) == pytest.approx(ref_loss, rel=1e-12), how


def test_threads_get_their_own_results():
    """Concurrent backward calls (cffi releases the GIL) each get correct, unshared results."""
    import threading
    _, npm, cm = built("mlp_tanh_mse")
    p = cm.init_params(5)
    plain = {k: np.array(v) for k, v in p.items()}
    batches = [random_batch(cm, batch=1 + t % 3, seed=20 + t) for t in range(4)]
    refs = [npm.backward(plain, *b) for b in batches]
    failures = []

    def work(t):
        kept = []
        for i in range(300):
            loss, g = cm.backward(p, *batches[t])
            if abs(loss - refs[t][0]) > 1e-12 * abs(refs[t][0]) or \
                    any(rel_err(g[k], refs[t][1][k]) > 1e-12 for k in g):
                failures.append((t, i))
            if i % 50 == 0:
                kept.append((g, _snapshot(g)))
            del g
        failures.extend((t, "kept") for g, snap in kept if not _same(g, snap))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures


def test_label_models_with_recycled_results():
    _, npm, cm = built("softmax_labels")
    p = cm.init_params(0)
    plain = dict(p)
    x = np.random.default_rng(0).standard_normal((3, 4))
    labels = np.array([0, 2, 1])
    for _ in range(3):
        loss, g = cm.backward(p, x, labels)
        ref_loss, ref = npm.backward(plain, x, labels)
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        assert all(rel_err(g[k], ref[k]) <= 1e-12 for k in ref)
    with pytest.raises(ValueError, match="batch sizes"):
        cm.backward(p, x, labels[:2])


# ---- building, caching, errors ----------------------------------------------------------

def test_second_load_is_a_cache_hit_and_models_do_not_collide():
    model, _, first = built("mlp_relu_mse")
    builds = c_backend.stats["builds"]
    again = compile_model_c(_MODELS["mlp_relu_mse"]()).load()
    assert c_backend.stats["builds"] == builds
    params = first.init_params(0)
    arrays = random_batch(first, batch=3)
    assert again.loss(params, *arrays) == first.loss(params, *arrays)
    # same model name, different network: a different extension, both usable
    other = compile_model_c(bpc.mlp([3, 7, 2], activation="tanh", name=model.name)).load()
    assert c_backend.stats["builds"] == builds + 1
    assert other.PARAMS != first.PARAMS
    assert np.isfinite(other.loss(other.init_params(0), *random_batch(other, batch=3)))
    assert np.isfinite(first.loss(params, *arrays))


def test_generated_code_is_deterministic():
    a = compile_model_c(_MODELS["softmax_onehot"]())
    b = compile_model_c(_MODELS["softmax_onehot"]())
    assert (a.c_source, a.header, a.wrapper_source) == (b.c_source, b.header, b.wrapper_source)
    assert not any("fast-math" in f or f == "-Ofast" for f in c_backend.CFLAGS)
    assert "'-ffast-math'" not in a.wrapper_source
    assert "dZ2 = (softmax(Z2) - y)/n" in a.c_source     # the formula beside the gradient line


def test_compile_error_reports_the_compiler_output(tmp_path):
    good = compile_model_c(_MODELS["poly_fit"]())
    broken = dataclasses.replace(good, c_source=good.c_source.replace("return POLY_OK;", "return POLY_OK +;", 1))
    with pytest.raises(CBuildError) as err:
        broken.build(cache=tmp_path)
    assert "error" in str(err.value) and "poly.c" in str(err.value)


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "bpc-no-such-compiler")
    c_backend._toolchain.cache_clear()
    try:
        with pytest.raises(UnsupportedError, match="C compiler.*NumPy target"):
            compile_model_c(_MODELS["poly_fit"]()).build(cache=tmp_path)
    finally:
        c_backend._toolchain.cache_clear()


def test_bad_dtype_and_prefix():
    with pytest.raises(ModelError, match="float32 or float64"):
        compile_model_c(_MODELS["poly_fit"](), "float16")
    for prefix in ("1x", "_x", "a-b", "é"):
        with pytest.raises(ModelError, match="C identifier"):
            compile_model_c(_MODELS["poly_fit"](), prefix=prefix)


@pytest.mark.parametrize("name", ["int", "errno", "params", "limits", "stdio", "math", "bpc", "M"])
def test_model_names_that_are_c_or_header_names(tmp_path, name):
    """The model name is the C prefix: it only starts longer names, and the build directory is
    not an include directory, so that a model named like a system header does not hide it."""
    model = bpc.mlp([2, 3, 1], name=name)
    compiled = compile_model_c(model)
    _strict_c99(tmp_path, compiled)
    cm, npm = compiled.load(), bpc.compile_model(model).load()
    p = perturbed(npm, 2)
    x, y = random_batch(npm, batch=3, seed=2)
    assert cm.backward(p, x, y)[0] == pytest.approx(npm.backward(p, x, y)[0], rel=1e-12)


def test_c_names_avoid_c_keywords_and_library_functions():
    import sympy as sp
    exp_, double_ = sp.symbols("exp double")
    x = sp.Symbol("x")
    model = bpc.expression_model(exp_ * x + double_, {exp_: 0.5, double_: -0.25}, [x], name="kw")
    compiled = compile_model_c(model)
    assert "const double *restrict const v_exp = params + 0;" in compiled.c_source
    cm = compiled.load()
    npm = bpc.compile_model(model).load()
    arrays = random_batch(npm, batch=4)
    p = npm.init_params(0)
    assert cm.backward(p, *arrays)[0] == pytest.approx(npm.backward(p, *arrays)[0], rel=1e-12)


# C keywords, GNU extensions, libc and compiler macros, the generated code's own names (C and
# the Python wrapper's): as an input, a layer (W<name>, b<name>, ...) and a parameter, each builds
HOSTILE_NAMES = ["asm", "typeof", "M_PI", "EOF", "WEOF", "errno", "stdin", "NULL", "signed", "restrict",
                 "inline", "unix", "linux", "main", "exp", "tanh", "size_t", "int64_t", "INFINITY",
                 "abort", "work", "out", "v_x", "bpc_tanh", "Params", "NUM_PARAMS", "map", "any"]


def _hostile_network(name):
    net = bpc.Network("hostile")
    x = net.input(name, 3)
    y = net.target("y", kind="label")
    h = net.dense(x, 4, "tanh", name=name)
    return net.build(net.dense(h, 3), "softmax_cross_entropy", y)


def _strict_c99(tmp_path, compiled):
    compiled.write(tmp_path)
    cc = shutil.which("gcc") or shutil.which("cc")
    proc = subprocess.run([cc, "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-O2", "-c",
                           f"{compiled.prefix}.c", "-o", "model.o"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_build_and_match_numpy(tmp_path, name):
    model = _hostile_network(name)
    compiled = compile_model_c(model)
    assert f"v_{name}" in compiled.c_source and f"HOSTILE_OFFSET_W{name} " in compiled.header
    _strict_c99(tmp_path, compiled)
    cm, npm = compiled.load(), bpc.compile_model(model).load()
    p = perturbed(npm, 5)
    x, y = random_batch(npm, batch=5, seed=5)
    ref_loss, ref = npm.backward(p, x, y)
    fast = cm.init_params(0)   # the Params fast path, and a plain dict
    for k in fast:
        fast[k][...] = p[k]
    for params in (fast, p):
        loss, g = cm.backward(params, x, y)
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        assert set(g) == set(ref) and all(rel_err(g[k], ref[k]) <= 1e-12 for k in ref)
    assert rel_err(cm.forward(p, **{name: x}), npm.forward(p, x)) <= 1e-12
    assert cm.loss(p, **{name: x, "y": y}) == pytest.approx(ref_loss, rel=1e-12)


def test_hostile_names_as_parameters_and_targets(tmp_path):
    """Every hostile name as a parameter of one model (its offset macro, its gradient), with a
    hostile input and target."""
    import sympy as sp
    ps = [sp.Symbol(name) for name in HOSTILE_NAMES]
    x, t = sp.Symbol("stdout"), sp.Symbol("EDOM")
    pred = sum(p * sp.tanh(x + k / 7) for k, p in enumerate(ps))
    model = bpc.expression_model(pred, {p: 0.1 * (k - 5) for k, p in enumerate(ps)}, [x], [t], name="params")
    compiled = compile_model_c(model)
    assert all(f"PARAMS_OFFSET_{name} " in compiled.header for name in HOSTILE_NAMES)
    _strict_c99(tmp_path, compiled)
    cm, npm = compiled.load(), bpc.compile_model(model).load()
    xs, ts = random_batch(npm, batch=4, seed=6)
    p = npm.init_params(0)
    ref_loss, ref = npm.backward(p, xs, ts)
    loss, g = cm.backward(p, xs, ts)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert all(rel_err(g[k], ref[k]) <= 1e-12 for k in HOSTILE_NAMES)
    assert rel_err(cm.forward(cm.init_params(0), stdout=xs), npm.forward(p, xs)) <= 1e-12


# ---- the standalone C files --------------------------------------------------------------

@pytest.mark.parametrize("model_id,dtype", [("softmax_labels", "float64"), ("matrix_mse", "float64"),
                                            ("expr_multi", "float32"), ("mlp_gelu", "float32")])
def test_c_source_is_strict_c99(tmp_path, model_id, dtype):
    compiled = compile_model_c(_MODELS[model_id](), dtype)
    compiled.write(tmp_path)
    cc = shutil.which("gcc") or shutil.which("cc")
    proc = subprocess.run([cc, "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-O2", "-c",
                           f"{compiled.prefix}.c", "-o", "model.o"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_c_program_without_python(tmp_path):
    """A plain C program calls backward (work = NULL) and prints what the wrapper computes."""
    _, _, cm = built("softmax_labels")
    compiled = compile_model_c(_MODELS["softmax_labels"]())
    compiled.write(tmp_path)
    params = perturbed(cm, 2)
    x, y = random_batch(cm, batch=3, seed=1)
    flat = np.concatenate([np.ravel(params[k]) for k in cm.PARAMS])
    doubles = ", ".join(repr(float(v)) for v in flat)
    main = textwrap.dedent(f"""
        #include <stdio.h>
        #include "clf_labels.h"
        int main(void) {{
            const double params[CLF_LABELS_NUM_PARAMS] = {{{doubles}}};
            const double x[12] = {{{", ".join(repr(float(v)) for v in x.ravel())}}};
            const int64_t y[3] = {{{", ".join(str(int(v)) for v in y)}}};
            const int64_t bad[3] = {{0, 7, 1}};
            double loss, grads[CLF_LABELS_NUM_PARAMS];
            if (clf_labels_backward(params, x, y, 3, &loss, grads, NULL) != CLF_LABELS_OK) return 1;
            if (clf_labels_loss(params, x, bad, 3, &loss, NULL) != CLF_LABELS_ERR_LABEL) return 2;
            printf("%.17g", loss);
            for (int i = 0; i < CLF_LABELS_NUM_PARAMS; i++) printf(" %.17g", grads[i]);
            printf("\\n");
            return 0;
        }}
    """)
    (tmp_path / "main.c").write_text(main)
    cc = shutil.which("gcc") or shutil.which("cc")
    build = subprocess.run([cc, "-std=c99", "-O2", "main.c", "clf_labels.c", "-o", "main", "-lm"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(tmp_path / "main")], capture_output=True, text=True)
    assert run.returncode == 0, run.returncode
    values = np.array([float(v) for v in run.stdout.split()])
    loss, grads = cm.backward(params, x, y)
    assert values[0] == pytest.approx(loss, rel=1e-14)
    expected = np.concatenate([np.ravel(grads[k]) for k in cm.PARAMS])
    assert rel_err(values[1:], expected) <= 1e-14


def test_written_wrapper_builds_and_imports_in_a_fresh_interpreter(tmp_path):
    compiled = compile_model_c(_MODELS["poly_fit"]())
    compiled.write(tmp_path)
    script = textwrap.dedent("""
        import sys, numpy as np
        import poly
        assert "compiler" not in sys.modules
        p = poly.init_params(0)
        x = np.linspace(-1, 1, 5); y = x ** 3
        loss, grads = poly.backward(p, x, y)
        print(repr(loss), sorted(grads))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    npm = bpc.compile_model(_MODELS["poly_fit"]()).load()
    x = np.linspace(-1, 1, 5)
    expected = npm.loss(npm.init_params(0), x, x ** 3)
    loss_text, names = run.stdout.split(" ", 1)
    assert float(loss_text) == pytest.approx(expected, rel=1e-12)
    assert names.strip() == str(sorted(npm.PARAMS))
