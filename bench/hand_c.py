"""A hand-written C reference: loss and all gradients of a 2-16-16-1 tanh MLP with MSE (float64),
written as an expert would for this size (the layers in one pass per sample, libm's tanh,
sizes known at compile time), built with cffi with the flags of bpc's own builds
(-O3 -fno-math-errno, -march=native when the compiler takes it) and called with every pointer
made once: the floor any wrapper or generator can aim at. Parameters in bpc's layout (W1 (2, 16),
b1, W2 (16, 16), b2, W3 (16, 1), b3), gradients likewise."""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

SOURCE = r"""
#include <math.h>
#include <stddef.h>
#include <string.h>
#define D0 2
#define D1 16
#define D2 16

int hand_backward(const double *restrict p, const double *restrict x, const double *restrict y, size_t n,
                  double *restrict loss, double *restrict g)
{
    const double *W1 = p, *b1 = p + D0*D1, *W2 = b1 + D1, *b2 = W2 + D1*D2, *W3 = b2 + D2, *b3 = W3 + D2;
    double *dW1 = g, *db1 = g + D0*D1, *dW2 = db1 + D1, *db2 = dW2 + D1*D2, *dW3 = db2 + D2, *db3 = dW3 + D2;
    memset(g, 0, sizeof(double) * (D0*D1 + D1 + D1*D2 + D2 + D2 + 1));
    double total = 0.0;
    const double scale = 2.0 / (double)n;
    for (size_t i = 0; i < n; i++) {
        const double *xi = x + i*D0;
        double h1[D1], h2[D2], d1[D1], d2[D2];
        for (int j = 0; j < D1; j++) {
            double s = b1[j];
            for (int k = 0; k < D0; k++) s += xi[k] * W1[k*D1 + j];
            h1[j] = tanh(s);
        }
        for (int j = 0; j < D2; j++) h2[j] = b2[j];
        for (int k = 0; k < D1; k++) {
            const double a = h1[k];
            for (int j = 0; j < D2; j++) h2[j] += a * W2[k*D2 + j];
        }
        double z = b3[0];
        for (int j = 0; j < D2; j++) {
            h2[j] = tanh(h2[j]);
            z += h2[j] * W3[j];
        }
        const double diff = z - y[i];
        total += diff * diff;
        const double dz = scale * diff;
        db3[0] += dz;
        for (int j = 0; j < D2; j++) {
            dW3[j] += h2[j] * dz;
            d2[j] = dz * W3[j] * (1.0 - h2[j] * h2[j]);
            db2[j] += d2[j];
        }
        for (int k = 0; k < D1; k++) {
            double s = 0.0;
            for (int j = 0; j < D2; j++) {
                dW2[k*D2 + j] += h1[k] * d2[j];
                s += W2[k*D2 + j] * d2[j];
            }
            d1[k] = s * (1.0 - h1[k] * h1[k]);
            db1[k] += d1[k];
        }
        for (int k = 0; k < D0; k++)
            for (int j = 0; j < D1; j++) dW1[k*D1 + j] += xi[k] * d1[j];
    }
    *loss = total / (double)n;
    return 0;
}
"""

CDEF = ("int hand_backward(const double *p, const double *x, const double *y, size_t n, double *loss, "
        "double *g);")


def build():
    """The compiled module (ffi, lib), or (None, why)."""
    try:
        import cffi
        from compiler.backends.c.backend import CFLAGS, _native
    except Exception as e:   # no cffi, or no C backend
        return None, f"hand C skipped: {type(e).__name__}: {e}"
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    name = "_bpc_bench_hand_c"
    ffi.set_source(name, SOURCE, libraries=["m"], extra_compile_args=[*CFLAGS, *_native()[0]])
    tmp = os.path.join(os.environ.get("BPC_CACHE") or tempfile.gettempdir(), "bench-hand-c")
    try:
        path = ffi.compile(tmpdir=tmp)
    except Exception as e:   # no compiler
        return None, f"hand C skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module, None


def make(params, x, y):
    """A zero-argument callable running the hand C function on fixed pointers (returns the loss),
    and the gradient buffer it writes, or (None, why)."""
    import numpy as np
    module, why = build()
    if module is None:
        return None, why
    ffi, lib = module.ffi, module.lib
    flat = np.ascontiguousarray(np.concatenate([np.ravel(p) for p in params]), np.float64)
    x, y = np.ascontiguousarray(x, np.float64), np.ascontiguousarray(y, np.float64)
    g = np.empty_like(flat)
    out = ffi.new("double[]", 1)
    pp, xp, yp, gp = (ffi.from_buffer("double[]", a) for a in (flat, x, y, g))
    n, fn = x.shape[0], lib.hand_backward

    def run():
        fn(pp, xp, yp, n, out, gp)
        return out[0], g
    # (keep the arrays alive as long as the pointers)
    run.arrays = (flat, x, y, g)
    return run, None
