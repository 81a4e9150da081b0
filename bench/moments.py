"""Data moments hoisted: a degree-5 polynomial fit with MSE (loss and all 6 gradients per step)
at 10k and 1M points: hand-written NumPy over the data against the generated
``backward_from_moments`` (NumPy and C) on statistics computed once by ``precompute``; timed
interleaved in one run (issue 16, items 4 and 6). ``python -m bench --only moments``."""
from __future__ import annotations

import statistics
import time

import numpy as np
import sympy as sp

import compiler as bpc
from bench.timing import measure

SIZES = (10_000, 1_000_000)
TITLE = "Polynomial fit, degree 5, MSE: a step (loss + 6 gradients) with the data moments hoisted"


def hand_step(coef, x, y):
    """Hand-written NumPy: Horner's prediction, residual, loss, and the gradient as a
    Vandermonde-free accumulation of r*x**k (what one writes without bpc)."""
    p = coef[5]
    for c in coef[4::-1]:
        p = p * x + c
    r = p - y
    loss = float(r @ r) / x.size
    g = np.empty(6)
    t = (2.0 / x.size) * r
    for k in range(6):
        g[k] = t.sum()
        if k < 5:
            t = t * x
    return loss, g


def section(args, rows_out, note, table, skipped):
    xs = sp.Symbol("x")
    a = sp.symbols("a0:6")
    model = bpc.expression_model(sum(c * xs**k for k, c in enumerate(a)), {c: 0.0 for c in a}, [xs], name="bench_fit")
    mod = bpc.compile_model(model).load()
    try:
        cmod = bpc.compile_model_c(model, "float64").load()
    except Exception as e:  # noqa: BLE001 - no compiler: the C row is left out
        cmod = None
        note(f"moments: generated C skipped ({type(e).__name__}: {e})")
    rng = np.random.default_rng(0)
    params = {c.name: rng.standard_normal() * 1e-3 for c in a}
    coef = np.array([params[f"a{k}"] for k in range(6)])
    rows, results = [], []
    for n in SIZES:
        x = rng.uniform(-1, 1, n)
        y = np.sin(3 * x) + 0.1 * rng.standard_normal(n)
        t0 = time.perf_counter()
        m = mod.precompute(x, y)
        pre = time.perf_counter() - t0
        ref_loss, ref_g = hand_step(coef, x, y)
        hl, hg = mod.backward_from_moments(params, m)
        if abs(hl - ref_loss) > 1e-10 * ref_loss or not np.allclose([hg[f"a{k}"] for k in range(6)], ref_g,
                                                                     rtol=1e-9, atol=1e-12):
            raise SystemExit("moments: the hoisted step differs from the hand-written one")
        fns = {"hand-written NumPy (per sample)": lambda: hand_step(coef, x, y),
               "generated backward (per sample)": lambda: mod.backward(params, x, y),
               "generated NumPy, moments hoisted": lambda: mod.backward_from_moments(params, m)}
        if cmod is not None:
            cm = cmod.precompute(x, y)
            cp = cmod.init_params()
            for k, v in params.items():
                cp[k][...] = v
            fns["generated C, moments hoisted"] = lambda: cmod.backward_from_moments(cp, cm)
        print(f"  timing n = {n} ...", flush=True)
        t = {k: statistics.median(v) for k, v in measure(fns, rounds=args.rounds).items()}
        results.append((n, t, pre))
        base = t["hand-written NumPy (per sample)"]
        for name, sec in t.items():
            rows.append((f"{n:,}", name, f"{sec * 1e6:.1f}", f"{sec / base:.3f}x"))
        rows.append((f"{n:,}", "precompute (once, NumPy)", f"{pre * 1e6:.0f}", ""))
    text = table(["points", "implementation", "us per step", "time / hand NumPy"], rows)
    rows_out["moments"] = (text, results)
    return text
