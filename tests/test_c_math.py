"""The vectorisable scalar helpers of the C target (compiler/core/scalar_c_math.py: exp, tanh,
sigmoid, log, softplus; issue 14, item 2), compiled on their own with the build's flags and
called through ctypes over wide ranges of arguments, in float and double: their largest error
in ulp against libm's (NumPy's ufuncs), +-0, +-inf, nan, subnormals and the ends of each range
as libm's; and gcc vectorises a loop that applies each of them (its -fopt-info report), which is
what they are for."""
import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest

from compiler.backends.c import backend as c_backend
from compiler.core import scalar_functions
from model_table import NEEDS_CC

pytestmark = NEEDS_CC

NAMES = ("exp", "tanh", "sigmoid", "log", "softplus")
TYPES = {"float64": ("double", ""), "float32": ("float", "f")}


def _source():
    lines = ["#include <math.h>", "#include <stddef.h>", "#include <stdint.h>", "#include <string.h>"]
    for dtype, (real, fs) in TYPES.items():
        lines += scalar_functions.helper_sources(set(NAMES), "c_helper", real=real, fs=fs)
        for name in NAMES:
            lines.append(f"void apply_{name}{fs}(const {real} *restrict x, {real} *restrict y, size_t n)\n"
                         f"{{\n    for (size_t i = 0; i < n; i++) y[i] = bpc_{name}{fs}(x[i]);\n}}")
    return "\n\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the library, gcc's report of the loops it vectorised, by line, or None if not gcc)."""
    d = tmp_path_factory.mktemp("cmath")
    src = d / "cmath.c"
    src.write_text(_source())
    cc = list(c_backend._toolchain()[0])
    flags = [*c_backend.CFLAGS, *c_backend._native()[0], "-std=c99", "-shared"]
    gcc = "Free Software Foundation" in subprocess.run([*cc, "--version"], capture_output=True, text=True).stdout
    report = ["-fopt-info-vec-optimized"] if gcc else []
    proc = subprocess.run([*cc, *flags, *report, str(src), "-o", str(d / "cmath.so"), "-lm"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    vectorised = {int(m) for m in re.findall(r"cmath\.c:(\d+):\d+: optimized: loop vectorized", proc.stderr)}
    return ctypes.CDLL(str(d / "cmath.so")), src.read_text().splitlines(), (vectorised if gcc else None)


def _apply(lib, name, x):
    fs = TYPES[x.dtype.name][1]
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    getattr(lib, f"apply_{name}{fs}")(x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p),
                                      ctypes.c_size_t(x.size))
    return y


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return np.where(x >= 0, 1 / (1 + np.exp(-x)), np.exp(x) / (1 + np.exp(x)))


REFERENCE = {"exp": np.exp, "tanh": np.tanh, "sigmoid": _sigmoid, "log": np.log,
             "softplus": lambda x: np.logaddexp(x.dtype.type(0), x)}
# long double of 64 mantissa bits (x86): a reference for double within a thousandth of an ulp;
# elsewhere libm's double, which is itself up to an ulp off: the bounds take one ulp more
EXACT_DOUBLE = np.finfo(np.longdouble).nmant >= 63


def _exact(name, x):
    """The function at x (float32: computed in double; float64: in long double) and the ulp
    allowance of that reference."""
    wide = np.float64 if x.dtype == np.float32 else (np.longdouble if EXACT_DOUBLE else np.float64)
    with np.errstate(all="ignore"):
        return REFERENCE[name](x.astype(wide)), 0.0 if wide != x.dtype else 1.0


def _arguments(name, dtype):
    """Wide ranges: every binade log covers, exp's range to overflow and past underflow, ..."""
    rng = np.random.default_rng(7)
    fi = np.finfo(dtype)
    big = float(np.log(fi.max))           # 709.78 / 88.72
    if name == "log":
        lo, hi = np.log10(float(fi.smallest_subnormal)), np.log10(float(fi.max))
        x = np.concatenate([10 ** rng.uniform(lo, hi, 200000), rng.uniform(0.5, 2.0, 100000),
                            1 + rng.uniform(-1e-6, 1e-6, 20000), [fi.tiny, fi.smallest_subnormal, fi.max, 1.0]])
    elif name in ("exp", "softplus"):
        x = np.concatenate([rng.uniform(-big - 20, big, 200000), rng.uniform(-40, 40, 100000),
                            rng.uniform(-1e-3, 1e-3, 20000), [big, -big, -big - 14.5]])
    else:                                   # tanh, sigmoid
        x = np.concatenate([rng.uniform(-40, 40, 200000), rng.uniform(-1, 1, 100000),
                            rng.uniform(-1e-4, 1e-4, 20000), [fi.tiny, -fi.smallest_subnormal]])
    return x.astype(dtype)


def _ulps(got, want, dtype):
    """Errors in units of the last place of ``dtype`` at the reference's binade (the reference
    ``want`` may be wider than ``dtype``)."""
    spacing = np.spacing(np.abs(want).astype(dtype)).astype(want.dtype)
    return (np.abs(got.astype(want.dtype) - want) / spacing).astype(np.float64)


# the largest error in ulp against the exact value, per function (scalar_c_math's docstring:
# measured 0.93, 2.18, 2.08, 0.78, 1.74 in double; NumPy's double ufuncs measure 0.70 (exp),
# 1.16 (tanh), 0.60 (log), 1.36 (logaddexp) on the same arguments, its float32 exp and log 2.3
# and 3.2)
BOUND = {"exp": 1.0, "tanh": 2.5, "sigmoid": 2.5, "log": 1.0, "softplus": 2.0}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_ulp_error(built, name, dtype):
    lib = built[0]
    x = _arguments(name, np.dtype(dtype))
    got = _apply(lib, name, x)
    want, slack = _exact(name, x)
    ok = np.isfinite(want) & (np.abs(want) <= np.finfo(dtype).max)
    assert np.array_equal(np.isfinite(got), ok), x[np.isfinite(got) != ok][:5]
    err = _ulps(got[ok], want[ok], dtype)
    worst = int(np.argmax(err))
    assert err.max() <= BOUND[name] + slack, (x[ok][worst], got[ok][worst], want[ok][worst], err.max())


SPECIAL = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 1e-300, -1e-300, 5e-324, -5e-324,
           1e-40, 1e-45, 700.0, -700.0, 1000.0, -1000.0, 3.4e38, -3.4e38, 1.7e308, -1.7e308]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_special_values_as_libm(built, name, dtype):
    """+-0, +-inf, nan, subnormals, overflowing and huge arguments: the same class of value
    (inf of the same sign, nan, zero of the same sign) as libm, and finite values close to it."""
    with np.errstate(all="ignore"):
        x = np.array(SPECIAL, dtype=dtype)
        want = REFERENCE[name](x)      # libm (NumPy) in the type itself
    got = _apply(built[0], name, x)
    for a, g, w in zip(x, got, want):
        if np.isnan(w):
            assert np.isnan(g), (name, a, g)
        elif np.isinf(w) or w == 0:
            assert g == w and np.signbit(g) == np.signbit(w), (name, a, g, w)
        else:
            assert _ulps(np.array([g]), np.array([w]), dtype)[0] <= BOUND[name] + 3, (name, a, g, w)


def test_gcc_vectorises_each_helper(built):
    """Each apply loop is reported vectorised by gcc (without -ffast-math): no libm call left."""
    _, lines, vectorised = built
    if vectorised is None:
        pytest.skip("the compiler is not gcc: no -fopt-info report")
    loops = {i + 1: line for i, line in enumerate(lines) if "y[i] = bpc_" in line}
    assert len(loops) == 2 * len(NAMES)
    missing = [line.strip() for no, line in loops.items() if no not in vectorised]
    assert not missing, missing


CALL = re.compile(r"\bbpc_(exp|log|softplus|sigmoid|tanh)f?\(")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("activation,loss", [("softplus", "softmax_cross_entropy"), ("tanh", "bce"),
                                             ("sigmoid", "softmax_cross_entropy")])
def test_gcc_vectorises_the_generated_loops(tmp_path, activation, loss, dtype):
    """In a generated module of layers wide enough to vectorise (48 units, 40 classes), every
    loop that calls a helper is reported vectorised: the activations, their derivatives, and the
    exp inside log-sum-exp, softmax and the cross-entropy gradient (whose sum gcc keeps in order)."""
    import compiler as bpc
    from compiler.backends.c.backend import compile_model_c
    cc = list(c_backend._toolchain()[0])
    if "Free Software Foundation" not in subprocess.run([*cc, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("the compiler is not gcc: no -fopt-info report")
    compiled = compile_model_c(bpc.mlp([32, 48, 40], activation, loss, name="wide"), dtype)
    compiled.write(tmp_path)
    proc = subprocess.run([*cc, *c_backend.CFLAGS, *c_backend._native()[0], "-fopt-info-vec-optimized", "-c",
                           "wide.c", "-o", "wide.o"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    vectorised = {int(m) for m in re.findall(r"wide\.c:(\d+):\d+: optimized: loop vectorized", proc.stderr)}
    lines = (tmp_path / "wide.c").read_text().splitlines()
    calls, missing = 0, []
    for no, line in enumerate(lines):
        if CALL.search(line) and line.startswith(" ") and not line.lstrip().startswith("return"):
            loop = next(j for j in range(no, -1, -1) if "for (" in lines[j])   # the innermost loop
            calls += 1
            if loop + 1 not in vectorised:
                missing.append(line.strip())
    assert calls >= 6 and not missing, missing
