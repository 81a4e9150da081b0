"""Backward pass of a 2-16-16-1 tanh MLP (MSE, float64): the C target against the NumPy
target, in one run, at batch 1 and 32. Prints a Markdown table of median microseconds.

    python bench/c_vs_numpy.py [--repeats 21] [--number 2000]

Four C columns: ``backward(params, x, y)`` with the Params from ``init_params`` (the fast
path), the same writing into a gradient buffer the caller keeps (``grads=``, the lean path),
the same with a plain dict of arrays (checked and packed on every call), and the raw cffi call
with every pointer made once (the floor the wrapper adds to). A second table: one Adam
``train_step`` (backward, finiteness check, update) on each module.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import compiler as bpc  # noqa: E402
from compiler.backends.c.backend import compile_model_c  # noqa: E402


def median_us(fns, number, repeats):
    """Median microseconds per call of each function; the functions take turns in every
    repeat, so that a change of machine load affects them alike."""
    for fn in fns:
        for _ in range(max(number // 10, 10)):   # warm-up
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            out.append((time.perf_counter() - t0) / number * 1e6)
    return [statistics.median(t) for t in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--number", type=int, default=2000)
    args = ap.parse_args()
    os.environ.setdefault("BPC_CACHE", tempfile.mkdtemp(prefix="bpc-bench-"))

    model = bpc.mlp([2, 16, 16, 1], activation="tanh", loss="mse")
    npm = bpc.compile_model(model, "float64").load()
    cm = compile_model_c(model, "float64").load()
    rows = []
    for batch in (1, 32):
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, 2))
        y = rng.standard_normal((batch, 1))
        p_np = npm.init_params(0)
        p_c = cm.init_params(0)
        p_dict = dict(p_c)
        g_kept = cm.Params()
        ln, gn = npm.backward(p_np, x, y)
        lc, gc = cm.backward(p_c, x, y)
        assert abs(ln - lc) <= 1e-12 * abs(ln) and all(np.allclose(gn[k], gc[k], rtol=1e-12, atol=1e-15) for k in gn)

        ffi, lib = cm._ffi, cm._lib
        pp, xp, yp = ffi.from_buffer("double[]", p_c.flat), ffi.from_buffer("double[]", x), ffi.from_buffer("double[]", y)
        gp, lp = ffi.new("double[]", cm.NUM_PARAMS), ffi.new("double[]", 1)
        wp = ffi.new("double[]", lib.mlp_work_size(batch))
        # lr 0: the parameters stay those of the first call, so every call does the same work
        s_np, s_c = {}, {}
        t_np, t_c, t_ck, t_cd, t_raw, ts_np, ts_c = median_us([
            lambda: npm.backward(p_np, x, y),
            lambda: cm.backward(p_c, x, y),
            lambda: cm.backward(p_c, x, y, grads=g_kept),
            lambda: cm.backward(p_dict, x, y),
            lambda: lib.mlp_backward(pp, xp, yp, batch, lp, gp, wp),
            lambda: npm.train_step(p_np, s_np, x, y, optimizer="adam", lr=0.0),
            lambda: cm.train_step(p_c, s_c, x, y, optimizer="adam", lr=0.0),
        ], args.number, args.repeats)
        rows.append((batch, t_np, t_c, t_ck, t_cd, t_raw, ts_np, ts_c))

    print("backward of a 2-16-16-1 tanh MLP, MSE, float64; median us per call "
          f"({args.repeats} repeats of {args.number} calls)\n")
    print("| batch | NumPy module | C module, Params | speed-up | C, grads= kept | speed-up | C module, plain dict "
          "| speed-up | raw cffi call | C, grads= kept / raw |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch, t_np, t_c, t_ck, t_cd, t_raw, _, _ in rows:
        print(f"| {batch} | {t_np:.2f} | {t_c:.2f} | {t_np / t_c:.1f}x | {t_ck:.2f} | {t_np / t_ck:.1f}x | {t_cd:.2f} "
              f"| {t_np / t_cd:.1f}x | {t_raw:.2f} | {t_ck / t_raw:.2f}x |")
    print("\ntrain_step(params, state, x, y, optimizer='adam') (backward, finiteness check, Adam update); median us\n")
    print("| batch | NumPy module | C module | speed-up |")
    print("|---|---|---|---|")
    for batch, *_, ts_np, ts_c in rows:
        print(f"| {batch} | {ts_np:.2f} | {ts_c:.2f} | {ts_np / ts_c:.1f}x |")


if __name__ == "__main__":
    main()
