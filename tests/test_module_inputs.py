"""What the generated modules accept and refuse, on every target alike: the NumPy module (dtype
following the inputs, and compiled for float64) and the C module. Each bad argument gets a
ValueError naming the argument and the problem, with the same message on every target; nothing
is silently dropped (an imaginary part, a mask) or half-converted."""
import re
import shutil

import numpy as np
import pytest

try:
    import pandas   # optional: the table uses a DataFrame-like class, and real pandas if present
except ImportError:
    pandas = None

import compiler as bpc
from model_table import MODELS

HAVE_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
TARGETS = ["numpy", "numpy_float64", pytest.param("c", marks=pytest.mark.skipif(not HAVE_CC, reason="no C compiler"))]
TARGET_IDS = ["numpy", "numpy_float64", "c"]
_MODELS = {"mlp": dict(MODELS)["mlp_tanh_mse"], "labels": dict(MODELS)["softmax_labels"],
           "poly": dict(MODELS)["poly_fit"], "one": lambda: bpc.mlp([3, 4, 1], name="mlp_one_output")}
_built = {}


def module(target, model_id):
    key = (target, model_id)
    if key not in _built:
        model = _MODELS[model_id]()
        if target == "c":
            from compiler.backends.c.backend import compile_model_c
            _built[key] = compile_model_c(model).load()
        else:
            _built[key] = bpc.compile_model(model, None if target == "numpy" else "float64").load()
    return _built[key]


class Series:
    """A pandas-like column: an array-like with a shape that is no ndarray (pandas is optional)."""

    def __init__(self, values):
        self.values = np.asarray(values)
        self.shape = self.values.shape

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)


class Frame:
    """A pandas-like DataFrame: columns by name (``frame["W1"]`` is a Series), iterates over
    its column names, converts to a 2-D array; not a dict."""

    def __init__(self, columns):
        self.columns = {k: Series(v) for k, v in columns.items()}

    def __getitem__(self, key):
        return self.columns[key]

    def __iter__(self):
        return iter(self.columns)

    def keys(self):
        return self.columns.keys()

    def __array__(self, dtype=None, copy=None):
        a = np.stack([c.values for c in self.columns.values()], axis=1)
        return a if dtype is None else a.astype(dtype)


def batch(m, n=3, seed=0):
    """Parameters (init_params, perturbed) and a batch (x, y) for module m."""
    rng = np.random.default_rng(seed)
    p = {k: np.asarray(v + 0.1 * rng.standard_normal(np.shape(v)), v.dtype) for k, v in m.init_params(seed).items()}
    x = rng.standard_normal((n, *m.INPUTS["x"]))
    if m.TARGET_KINDS.get("y") == "label":
        y = np.arange(n) % m.CLASSES["y"]
    else:
        y = rng.standard_normal((n, *m.TARGETS["y"]))
    return p, x, y


def masked(a):
    a = np.ma.masked_array(a)
    a[0] = np.ma.masked
    return a


def replace(p, **entries):
    return {**p, **entries}


ALL = ("forward", "loss", "backward")
WITH_TARGETS = ("loss", "backward")

# (id, model, functions, (params, x, y) -> (params, x, y) for the call, the message (a regex))
BAD = [
    # -- complex numbers: the imaginary part would be dropped, or complex gradients returned
    ("complex data", "mlp", ALL, lambda p, x, y: (p, x + 0.5j, y),
     r"^x must hold real numbers, got dtype complex128 \(complex numbers, whose imaginary part would be lost\)$"),
    ("complex data with zero imaginary part", "mlp", ALL, lambda p, x, y: (p, x.astype(np.complex64), y),
     r"^x must hold real numbers, got dtype complex64 "),
    ("complex data as lists", "poly", ALL, lambda p, x, y: (p, [1 + 2j, 0.5], y[:2]), r"^x must hold real numbers, got dtype complex128"),
    ("complex target", "mlp", WITH_TARGETS, lambda p, x, y: (p, x, y * 1j), r"^y must hold real numbers, got dtype complex128"),
    ("complex parameter", "mlp", ALL, lambda p, x, y: (replace(p, W1=p["W1"] + 1j), x, y),
     r"^parameter 'W1' must hold real numbers, got dtype complex128 \(complex numbers"),
    ("complex scalar parameter", "poly", ALL, lambda p, x, y: (replace(p, a=0.5 + 1j), x, y),
     r"^parameter 'a' must hold real numbers, got dtype complex128"),
    # -- dates and durations are not numbers
    ("datetime64 data", "mlp", ALL, lambda p, x, y: (p, x.astype("datetime64[s]"), y),
     r"^x must hold real numbers, got dtype datetime64\[s\] \(dates\)$"),
    ("timedelta64 data", "mlp", ALL, lambda p, x, y: (p, x.astype("timedelta64[ms]"), y),
     r"^x must hold real numbers, got dtype timedelta64\[ms\] \(durations\)$"),
    ("datetime64 target", "mlp", WITH_TARGETS, lambda p, x, y: (p, x, y.astype("datetime64[D]")), r"^y must hold real numbers, got dtype datetime64"),
    ("datetime64 labels", "labels", WITH_TARGETS, lambda p, x, y: (p, x, y.astype("datetime64[D]")), r"^y must hold real numbers, got dtype datetime64"),
    ("timedelta64 parameter", "poly", ALL, lambda p, x, y: (replace(p, b=np.timedelta64(3, "s")), x, y),
     r"^parameter 'b' must hold real numbers, got dtype timedelta64\[s\] \(durations\)$"),
    # -- masked arrays: the mask would be ignored
    ("masked data", "mlp", ALL, lambda p, x, y: (p, masked(x), y), r"^x is a masked array, and the mask would be ignored"),
    ("masked data, nothing masked", "mlp", ALL, lambda p, x, y: (p, np.ma.masked_array(x), y), r"^x is a masked array"),
    ("masked target", "mlp", WITH_TARGETS, lambda p, x, y: (p, x, masked(y)), r"^y is a masked array"),
    ("masked labels", "labels", WITH_TARGETS, lambda p, x, y: (p, x, masked(y)), r"^y is a masked array"),
    ("masked parameter", "mlp", ALL, lambda p, x, y: (replace(p, b1=masked(p["b1"])), x, y), r"^parameter 'b1' is a masked array"),
    # -- params: a dict name -> array, nothing else
    ("params as a list", "mlp", ALL, lambda p, x, y: (list(p.values()), x, y),
     r"^params must be a dict of parameter arrays, name -> array \(see PARAMS; init_params\(\) makes one\), got list$"),
    ("params as a tuple", "poly", ALL, lambda p, x, y: (tuple(p.values()), x, y), r"^params must be a dict .* got tuple$"),
    ("params as a DataFrame", "poly", ALL, lambda p, x, y: (Frame({k: [v] for k, v in p.items()}), x, y),
     r"^params must be a dict .* got Frame$"),
    ("params as a string", "mlp", ALL, lambda p, x, y: (str(p), x, y), r"^params must be a dict .* got str$"),
    ("params as an array", "poly", ALL, lambda p, x, y: (np.array(list(p.values())), x, y), r"^params must be a dict .* got ndarray$"),
    ("missing parameter", "mlp", ALL, lambda p, x, y: ({k: v for k, v in p.items() if k != "W2"}, x, y),
     r"^params has no entry 'W2' \(expected W1, b1, W2, b2, W3, b3\)$"),
    ("parameter as a string", "mlp", ALL, lambda p, x, y: (replace(p, W1="W1"), x, y),
     r"^parameter 'W1' must be an array of real numbers, got a str 'W1'$"),
    ("scalar parameter as a string", "poly", ALL, lambda p, x, y: (replace(p, a="0.5"), x, y),
     r"^parameter 'a' must be an array of real numbers, got a str '0.5'$"),
    ("parameter as strings", "mlp", ALL, lambda p, x, y: (replace(p, b1=[str(v) for v in p["b1"]]), x, y),
     r"^parameter 'b1' must hold real numbers, got dtype <U\d+ \(strings\)$"),
    ("parameter as np.matrix", "mlp", ALL, lambda p, x, y: (replace(p, W1=np.matrix(p["W1"])), x, y),
     r"^parameter 'W1' is an np.matrix \(always 2-D, \* multiplies matrices\)"),
    ("vector parameter as np.matrix", "mlp", ALL, lambda p, x, y: (replace(p, b1=np.matrix(p["b1"])), x, y),
     r"^parameter 'b1' is an np.matrix"),
    ("parameter as a DataFrame column", "poly", ALL, lambda p, x, y: (replace(p, a=Series([0.5])), x, y),
     r"^parameter 'a' must have shape \(\), got \(1,\)$"),
    # -- data: arrays of numbers
    ("data as strings", "mlp", ALL, lambda p, x, y: (p, x.astype(str), y), r"^x must hold real numbers, got dtype <U\d+ \(strings\)$"),
    ("data as a string", "poly", ALL, lambda p, x, y: (p, "1 2 3", y), r"^x must be an array of real numbers, got a str '1 2 3'$"),
    ("data as bytes", "poly", ALL, lambda p, x, y: (p, b"123", y), r"^x must be an array of real numbers, got a bytes b'123'$"),
    ("data as objects", "mlp", ALL, lambda p, x, y: (p, x.astype(object), y), r"^x must hold real numbers, got dtype object \(Python objects\)$"),
    ("data as np.matrix", "mlp", ALL, lambda p, x, y: (p, np.matrix(x), y), r"^x is an np.matrix"),
    ("ragged data", "mlp", ALL, lambda p, x, y: (p, [[1.0, 2.0, 3.0], [1.0]], y[:2]), r"^x must be an array of real numbers \("),
    # -- data of the wrong shape: the message names the reshape that fits, when one does
    ("one sample without a batch axis", "mlp", ALL, lambda p, x, y: (p, x[0], y),
     r"^x must have shape \(batch,\) \+ \(3,\), got \(3,\); for one sample: np.reshape\(x, \(1, 3\)\)$"),
    ("samples flattened", "mlp", ALL, lambda p, x, y: (p, x.ravel(), y),
     r"^x must have shape \(batch,\) \+ \(3,\), got \(9,\); for one sample per row: np.reshape\(x, \(-1, 3\)\)$"),
    ("samples as columns", "mlp", ALL, lambda p, x, y: (p, x[:2].T, y),
     r"^x must have shape \(batch,\) \+ \(3,\), got \(3, 2\); samples are rows: x.T$"),
    ("a number for a batch", "poly", ALL, lambda p, x, y: (p, 2.0, y),
     r"^x must have shape \(batch,\) \+ \(\), got \(\); pass an array with one entry per sample$"),
    ("two numbers per sample for one", "poly", ALL, lambda p, x, y: (p, np.stack([x, x], 1), y),
     r"^x must have shape \(batch,\) \+ \(\), got \(3, 2\)$"),
    ("labels as a matrix", "labels", WITH_TARGETS, lambda p, x, y: (p, x, np.stack([y, y], 1)),
     r"^y must be a 1-D array of integer class labels, got shape \(3, 2\)$"),
    # -- labels: the message names the offending value
    ("label too large", "labels", WITH_TARGETS, lambda p, x, y: (p, x, np.array([0, 3, 1])), r"^y must hold labels in 0\.\.2, got 3$"),
    ("label negative", "labels", WITH_TARGETS, lambda p, x, y: (p, x, np.array([0, 1, -5], np.int32)), r"^y must hold labels in 0\.\.2, got -5$"),
    ("label int64 max", "labels", WITH_TARGETS, lambda p, x, y: (p, x, np.array([0, 2**63 - 1, 1])),
     r"^y must hold labels in 0\.\.2, got 9223372036854775807$"),
    ("float label inf", "labels", WITH_TARGETS, lambda p, x, y: (p, x, np.array([0.0, np.inf, 1.0])), r"^y must hold labels in 0\.\.2, got inf$"),
    ("float label -inf", "labels", WITH_TARGETS, lambda p, x, y: (p, x, np.array([0.0, 1.0, -np.inf])), r"^y must hold labels in 0\.\.2, got -inf$"),
    ("float label 1e20", "labels", WITH_TARGETS, lambda p, x, y: (p, x, np.array([1e20, 1.0, 0.0])),
     r"^y must hold labels in 0\.\.2, got 100000000000000000000$"),
    ("float label nan", "labels", WITH_TARGETS, lambda p, x, y: (p, x, np.array([0.0, np.nan, 1.0])),
     r"^y must be integer class labels in 0\.\.2, got nan$"),
    ("float label 0.5", "labels", WITH_TARGETS, lambda p, x, y: (p, x, [0.0, 0.5, 1.0]), r"^y must be integer class labels in 0\.\.2, got 0\.5$"),
    ("boolean labels", "labels", WITH_TARGETS, lambda p, x, y: (p, x, np.array([True, False, True])),
     r"^y must be integer class labels in 0\.\.2, got dtype bool$"),
    ("complex labels", "labels", WITH_TARGETS, lambda p, x, y: (p, x, y + 0j), r"^y must hold real numbers, got dtype complex128"),
    ("string labels", "labels", WITH_TARGETS, lambda p, x, y: (p, x, ["0", "1", "2"]), r"^y must hold real numbers, got dtype <U1 \(strings\)$"),
    # -- the batch
    ("empty batch", "mlp", ALL, lambda p, x, y: (p, x[:0], y[:0]),
     r"^the batch is empty: forward, loss and backward need at least one sample$"),
    ("empty batch of labels", "labels", ALL, lambda p, x, y: (p, x[:0], y[:0]), r"^the batch is empty"),
    ("empty batch as lists", "poly", ALL, lambda p, x, y: (p, [], []), r"^the batch is empty"),
]
if pandas is not None:
    BAD.append(("params as a pandas DataFrame", "poly", ALL,
                lambda p, x, y: (pandas.DataFrame([{k: float(v) for k, v in p.items()}]), x, y),
                r"^params must be a dict .* got DataFrame$"))

pytestmark = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")


def call(m, fn, args):
    params, x, y = args
    f = getattr(m, fn)
    return f(params, x) if fn == "forward" else f(params, x, y)


def message(target, row, fn):
    _, model_id, _, make, _ = row
    m = module(target, model_id)
    with pytest.raises(ValueError) as err:
        call(m, fn, make(*batch(m)))
    return str(err.value)


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("row", BAD, ids=[r[0] for r in BAD])
def test_bad_argument_is_a_clear_value_error(target, row):
    for fn in row[2]:
        text = message(target, row, fn)
        assert re.search(row[4], text), (fn, text)
        assert "Traceback" not in text and len(text) < 300


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("row", BAD, ids=[r[0] for r in BAD])
def test_every_target_gives_the_same_message(row):
    for fn in row[2]:
        assert len({message(t, row, fn) for t in TARGET_IDS}) == 1, fn


# (id, model, (params, x, y) -> (params, x, y) for the call): accepted, with the result of the
# plain float64 arrays
GOOD = [
    ("integer data", "mlp", lambda p, x, y: (p, np.round(x).astype(np.int32), y), lambda x: np.round(x)),
    ("boolean data", "mlp", lambda p, x, y: (p, x > 0, y), lambda x: (x > 0).astype(float)),
    ("nested lists", "mlp", lambda p, x, y: (p, x.tolist(), y.tolist()), None),
    ("DataFrame data", "mlp", lambda p, x, y: (p, Frame({i: x[:, i] for i in range(x.shape[1])}), y), None),
    ("memmap-like ndarray subclass", "mlp", lambda p, x, y: (p, x.view(Sub), y), None),
    ("parameters as lists", "mlp", lambda p, x, y: ({k: v.tolist() for k, v in p.items()}, x, y), None),
    ("scalar parameters as floats", "poly", lambda p, x, y: ({k: float(v) for k, v in p.items()}, x, y), None),
    ("float labels holding integers", "labels", lambda p, x, y: (p, x, y.astype(np.float32)), None),
    ("labels of another integer type", "labels", lambda p, x, y: (p, x, y.astype(np.uint8)), None),
    ("labels as a list", "labels", lambda p, x, y: (p, x, y.tolist()), None),
    # arrays that are not C-contiguous are copied (the C module too), never refused
    ("strided data (every other row)", "mlp", lambda p, x, y: (p, np.repeat(x, 2, axis=0)[::2], np.repeat(y, 2, axis=0)[::2]), None),
    ("Fortran-order data", "mlp", lambda p, x, y: (p, np.asfortranarray(x), np.asfortranarray(y)), None),
    ("a column of a wider array", "poly", lambda p, x, y: (p, np.stack([x, x], 1)[:, 0], y), None),
    ("Fortran-order parameters", "mlp", lambda p, x, y: ({k: np.asfortranarray(v) for k, v in p.items()}, x, y), None),
    ("strided labels", "labels", lambda p, x, y: (p, x, np.repeat(y, 2)[::2]), None),
]


class Sub(np.ndarray):
    """An ndarray subclass that changes nothing (like np.memmap): accepted as an array."""


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("row", GOOD, ids=[r[0] for r in GOOD])
def test_accepted_arguments_give_the_plain_array_result(target, row):
    _, model_id, make, as_plain = row
    m = module(target, model_id)
    p, x, y = batch(m)
    params, xs, ys = make(p, x, y)
    x_ref = as_plain(x) if as_plain else x
    y_ref = np.asarray(ys, np.float64) if m.TARGET_KINDS.get("y") != "label" else np.asarray(ys).astype(np.int64)
    ref_loss, ref_grads = m.backward(p, x_ref, y_ref)
    loss, grads = m.backward(params, xs, ys)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert all(np.allclose(grads[k], ref_grads[k], rtol=1e-12, atol=0) for k in ref_grads)
    assert np.allclose(m.forward(params, xs), m.forward(p, x_ref), rtol=1e-12, atol=0)


# One target shape for every frontend: a per-sample value of one number accepts (batch,) and
# (batch, 1) alike (mlp([3, 4, 1]) wants (batch, 1), an expression model (batch,)); integer labels
# accept a column. (id, model, (x, y) -> (x, y) for the call)
ONE_NUMBER = [
    ("1-D target for one output", "one", lambda x, y: (x, y[:, 0])),
    ("Series target for one output", "one", lambda x, y: (x, Series(y[:, 0]))),
    ("list target for one output", "one", lambda x, y: (x, y[:, 0].tolist())),
    ("column target for a per-sample number", "poly", lambda x, y: (x, y[:, None])),
    ("column data for a per-sample number", "poly", lambda x, y: (x[:, None], y)),
    ("one-column DataFrame as data", "poly", lambda x, y: (Frame({"x": x}), y)),
    ("labels as a column", "labels", lambda x, y: (x, y[:, None])),
]


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
@pytest.mark.parametrize("row", ONE_NUMBER, ids=[r[0] for r in ONE_NUMBER])
def test_one_number_per_sample_in_either_shape(target, row):
    _, model_id, make = row
    m = module(target, model_id)
    p, x, y = batch(m)
    xs, ys = make(x, y)
    ref_loss, ref_grads = m.backward(p, x, y)
    loss, grads = m.backward(p, xs, ys)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert all(np.array_equal(grads[k], ref_grads[k]) for k in ref_grads)
    assert np.array_equal(m.forward(p, xs), m.forward(p, x))
