"""Sections ``c`` and ``blas`` of ``python -m bench``: the C target against hand-written NumPy, hand-written
C, PyTorch and JAX, in one run (issue 14, item 5); and the measurement behind the C target's
threshold between its own loops and the BLAS's gemm (``GEMM_MIN_MACS``).

Every figure is CPU time of the process (``_cpu``: candidates interleaved, medians; the
matmul peak the best round), so that a machine shared with other work still gives fair ratios.

``c``: (a) 2-16-16-1 tanh, MSE, float64, batch 1 and 32: time per backward (loss and every
gradient) relative to a hand-written C function called through cffi with its pointers made once
(bench/hand_c.py), with the raw cffi call of the generated C function (every pointer made once:
the floor the wrapper adds to) beside it. (b) 784-256-128-10 tanh, softmax cross-entropy, batch
256, float32 and float64: the generated C step (backward into a kept gradient buffer) against
the hand-written NumPy step and against the floor of its 8 matrix products (through the same
BLAS, preallocated outputs), and the share of the machine's matmul peak (a 2048^3 product
through that BLAS, best round) each reaches. BLAS threads: ``--threads`` (default 1), set for
NumPy's BLAS and the C target's through threadpoolctl and for PyTorch by set_num_threads.

(c) The scalar functions of the elementwise loops: a loop applying each of the C target's
vectorisable helpers (compiler/core/scalar_c_math.py) against the same loop calling libm (the
form the C target used before), over 100000 arguments, CPU time per element.

``blas``: d-d-d linear nets (batch d, so that every product is d^3 multiply-adds), built with
every product on the loops and with every product on gemm, one BLAS thread: where gemm starts
to win is the threshold (products at and above GEMM_MIN_MACS multiply-adds go to gemm). Then the
batched products (``bmm``: attention's Q @ K^T, weights @ V and their adjoints) of a causal
transformer block's training step, built twice from the same source: its batched products on
the loops (their gemm branch switched off in the source) against one gemm per batch index
(the default); the 2-D products take gemm above the threshold in both builds.
"""
from __future__ import annotations

import ctypes
import statistics

import numpy as np

BIG = [784, 256, 128, 10]
SMALL = [2, 16, 16, 1]


def _cpu(fns, **kw):
    """{name: [CPU seconds per call in each round]}, timed interleaved: the figures of this module
    are CPU time of the process (the machine may be shared; BLAS runs one thread unless
    --threads says otherwise, and then a thread's work counts as it costs)."""
    from bench.timing import measure
    cpu = {}
    measure(fns, cpu=cpu, **kw)
    return cpu


def _limits(args):
    from threadpoolctl import threadpool_limits
    from compiler.backends.c.blas import preload
    preload()    # the C target's BLAS, so that the limit reaches it too
    return threadpool_limits(limits=args.threads, user_api="blas")


def _c_module(model, dtype, **kw):
    from compiler.backends.c.backend import compile_model_c
    return compile_model_c(model, dtype).load(**kw)


def small_c(args, run, note):
    import compiler as bpc
    from bench import hand_c
    from bench.frameworks import make_jax, make_torch
    from bench.reference import HandMLP
    model = bpc.mlp(SMALL, "tanh", "mse", name="bench_csmall")
    npm = bpc.compile_model(model).load()
    cm = _c_module(model, "float64")
    rows = []
    rng = np.random.default_rng(0)
    for n in (1, 32):
        x, y = rng.standard_normal((n, SMALL[0])), rng.standard_normal((n, 1))
        cp = cm.init_params(0)
        plist = [np.array(cp[k]) for k in cm.PARAMS]
        pd = dict(zip(cm.PARAMS, plist))
        hand = HandMLP(SMALL, "tanh", "mse")
        ref = hand.step(plist, x, y)[0]
        kept = cm.Params()
        ffi, raw = cm._ffi, getattr(cm._lib, "bench_csmall_backward")
        ptrs = [ffi.from_buffer("double[]", a) for a in (cp.flat, x, y)]
        lp, gp = ffi.new("double[]", 1), ffi.new("double[]", cm.NUM_PARAMS)
        fns = {"generated C, grads= kept buffer": lambda: cm.backward(cp, x, y, grads=kept),
               "generated C, fresh grads": lambda: cm.backward(cp, x, y),
               "raw cffi call of the generated C (floor)": lambda: raw(*ptrs, n, lp, gp, ffi.NULL),
               "generated NumPy": lambda: npm.backward(pd, x, y),
               "hand-written NumPy": lambda: hand.step(plist, x, y)}
        hc, why = hand_c.make(plist, x, y)
        if hc is None:
            note(why)
        else:
            fns["hand-written C (cffi, pointers made once)"] = hc
        for label, make in (("PyTorch eager", make_torch), ("JAX jit(value_and_grad)", make_jax)):
            if ("torch" if make is make_torch else "jax") in args.skip.split(","):
                continue
            fn, info = make(plist, x, y, "tanh", "mse", **({"threads": 1} if make is make_torch else {}))
            if fn is None:
                if n == 1:
                    note(f"{label} skipped: {info}")
                continue
            fns[label] = fn
        for name, fn in fns.items():
            got = fn()
            value = lp[0] if name.startswith("raw") else (got[0] if isinstance(got, tuple) else got)
            if not np.isclose(float(value), ref, rtol=1e-10):
                raise SystemExit(f"{name}: loss {float(value)} differs from the reference's {ref}")
        print(f"  timing 2-16-16-1 batch {n} ...", flush=True)
        t = {k: statistics.median(v) for k, v in _cpu(fns, rounds=args.rounds, target=0.01).items()}
        base = t.get("hand-written C (cffi, pointers made once)")
        for name, sec in sorted(t.items(), key=lambda kv: kv[1]):
            rows.append((n, name, f"{sec * 1e6:.2f}", f"{sec / base:.2f}x" if base else "",
                         f"{sec / t['hand-written NumPy']:.2f}x"))
    return run.table(["batch", "implementation", "us per call", "time / hand C", "time / hand NumPy"], rows)


def _blas_gemm(dtype):
    """(gemm of the C target's BLAS through ctypes, its scalar type), or None."""
    from compiler.backends.c.blas import find_scipy_openblas32
    found = find_scipy_openblas32()
    if found is None:
        return None
    lib = ctypes.CDLL(found.library, mode=ctypes.RTLD_GLOBAL)
    fn = lib.scipy_cblas_dgemm if dtype == np.float64 else lib.scipy_cblas_sgemm
    return fn, (ctypes.c_double if dtype == np.float64 else ctypes.c_float)


def _products(plist, x, gemm=None):
    """The 8 matrix products of the step into preallocated outputs (NumPy's matmul, or ``gemm``)."""
    W1, W2, W3 = plist[0], plist[2], plist[4]
    n, dt = x.shape[0], x.dtype
    H1, H2, Z = (np.empty((n, w), dt) for w in BIG[1:])
    D1, D2 = np.empty_like(H1), np.empty_like(H2)
    G1, G2, G3 = np.empty_like(W1), np.empty_like(W2), np.empty_like(W3)
    if gemm is None:
        def run():
            np.matmul(x, W1, out=H1)
            np.matmul(H1, W2, out=H2)
            np.matmul(H2, W3, out=Z)
            np.matmul(H2.T, Z, out=G3)
            np.matmul(Z, W3.T, out=D2)
            np.matmul(H1.T, D2, out=G2)
            np.matmul(D2, W2.T, out=D1)
            np.matmul(x.T, D1, out=G1)
        return run
    fn, real = gemm
    one, zero = real(1), real(0)
    ptr = {id(a): a.ctypes.data_as(ctypes.c_void_p) for a in (x, W1, W2, W3, H1, H2, Z, D1, D2, G1, G2, G3)}
    calls = []
    for ta, tb, a, b, c in ((0, 0, x, W1, H1), (0, 0, H1, W2, H2), (0, 0, H2, W3, Z), (1, 0, H2, Z, G3),
                            (0, 1, Z, W3, D2), (1, 0, H1, D2, G2), (0, 1, D2, W2, D1), (1, 0, x, D1, G1)):
        m, k = (a.shape[1], a.shape[0]) if ta else a.shape
        cols = c.shape[1]
        calls.append((101, 112 if ta else 111, 112 if tb else 111, m, cols, k, one, ptr[id(a)], a.shape[1],
                      ptr[id(b)], b.shape[1], zero, ptr[id(c)], cols))

    def run():
        for args_ in calls:
            fn(*args_)
    run.keep = (H1, H2, Z, D1, D2, G1, G2, G3)
    return run


def _flops(n):
    macs = sum(a * b for a, b in zip(BIG, BIG[1:]))
    return 2 * n * (3 * macs - BIG[0] * BIG[1])


def big_c(args, run, note):
    import compiler as bpc
    from bench.frameworks import make_jax, make_torch
    from bench.reference import HandMLP
    n = 256
    rng = np.random.default_rng(0)
    rows, peak_rows = [], []
    for dtype in (np.float32, np.float64):
        dt = np.dtype(dtype)
        model = bpc.mlp(BIG, "tanh", "softmax_cross_entropy", name="bench_cbig")
        cm = _c_module(model, dt.name)
        npm = bpc.compile_model(model).load()
        cp = cm.init_params(0)
        plist = [np.array(cp[k]) for k in cm.PARAMS]
        x, y = rng.standard_normal((n, BIG[0])).astype(dt), rng.integers(0, BIG[-1], n)
        hand = HandMLP(BIG, "tanh", "xent")
        ref = hand.step(plist, x, y)[0]
        kept = cm.Params()
        gemm = _blas_gemm(dtype)
        fns = {"generated C, grads= kept buffer": lambda: cm.backward(cp, x, y, grads=kept),
               "generated NumPy": lambda: npm.backward(dict(zip(cm.PARAMS, plist)), x, y),
               "hand-written NumPy": lambda: hand.step(plist, x, y),
               "8 products alone (NumPy's BLAS)": _products(plist, x)}
        if gemm is not None:
            fns["8 products alone (the C target's BLAS)"] = _products(plist, x, gemm)
        else:
            note("the C target has no BLAS here (scipy-openblas32 not installed): its loops run every product")
        for label, make in (("PyTorch eager", make_torch), ("JAX jit(value_and_grad)", make_jax)):
            if ("torch" if make is make_torch else "jax") in args.skip.split(","):
                continue
            fn, info = make(plist, x, y, "tanh", "xent", **({"threads": args.threads} if make is make_torch else {}))
            if fn is None:
                note(f"{label} skipped: {info}")
                continue
            fns[label] = fn
        tol = 1e-4 if dt == np.float32 else 1e-10
        for name, fn in fns.items():
            got = fn()
            if isinstance(got, tuple) and not np.isclose(float(got[0]), ref, rtol=tol):
                raise SystemExit(f"{name}: loss {float(got[0])} differs from the reference's {ref}")
        print(f"  timing 784-256-128-10 {dt.name} ...", flush=True)
        t = {k: statistics.median(v) for k, v in _cpu(fns, rounds=args.rounds).items()}
        floor = t.get("8 products alone (the C target's BLAS)", t["8 products alone (NumPy's BLAS)"])
        m = 2048
        a = np.random.default_rng(1).standard_normal((m, m)).astype(dt)
        c = np.empty_like(a)
        peak_fns = {"NumPy's BLAS": lambda: np.matmul(a, a, out=c)}
        if gemm is not None:
            fn, real = gemm
            pa, pc = a.ctypes.data_as(ctypes.c_void_p), c.ctypes.data_as(ctypes.c_void_p)
            peak_fns["the C target's BLAS"] = lambda: fn(101, 111, 111, m, m, m, real(1), pa, m, pa, m, real(0), pc, m)
        best = {k: min(v) for k, v in _cpu(peak_fns, rounds=5, warmup=1, target=0.2).items()}
        peak = max(2 * m ** 3 / s for s in best.values())
        for name, sec in sorted(t.items(), key=lambda kv: kv[1]):
            rows.append((dt.name, name, f"{sec * 1e3:.2f}", f"{sec / t['hand-written NumPy']:.2f}x",
                         f"{sec / floor:.2f}x", f"{_flops(n) / sec / peak:.0%}"))
        peak_rows.append((dt.name, f"{peak / 1e9:.0f}", ", ".join(f"{k} {2 * m ** 3 / s / 1e9:.0f}" for k, s in best.items())))
    return (run.table(["dtype", "implementation", "ms per step", "time / hand NumPy", "time / 8 products (floor)",
                       "share of matmul peak"], rows)
            + f"\n\n{_flops(n) / 1e6:.0f} MFLOP of matrix products per step; matmul peak (2048^3, best round, "
            f"{args.threads} thread(s)):\n\n" + run.table(["dtype", "peak GFLOP/s", "per BLAS"], peak_rows))


def c_section(args, rows_out):
    from bench import run
    notes = []

    def note(text):
        notes.append(text)
        run.note(text)
    try:
        from compiler.backends.c.backend import _toolchain
        _toolchain()
    except Exception as e:   # no compiler, cffi or Python.h
        text = f"C target skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows_out["c"] = text
        return text
    with _limits(args):
        text = ("2-16-16-1 tanh, MSE, float64 (backward: loss and every gradient)\n\n" + small_c(args, run, note)
                + "\n\n784-256-128-10 tanh, softmax cross-entropy, batch 256 (backward)\n\n" + big_c(args, run, note)
                + "\n\nScalar functions in a loop over 100000 arguments, ns per element (CPU time)\n\n"
                + elementwise(args, run))
    rows_out["c"] = text
    return text


def blas_section(args, rows_out):
    """Loops against gemm per product size (see the module docstring)."""
    import compiler as bpc
    from bench import run
    from compiler.backends.c import backend as cb
    from compiler.backends.c.blas import find_scipy_openblas32
    if find_scipy_openblas32() is None:
        text = "skipped: scipy-openblas32 is not installed (the C target then runs its loops for every product)"
        rows_out["blas"] = text
        return text
    rows = []
    saved = dict(cb.GEMM_MIN_MACS)
    try:
        for dtype in ("float64", "float32"):
            for d in (4, 6, 8, 12, 16, 24, 32, 48):
                model = bpc.mlp([d, d, d], "identity", "mse", name=f"bench_thr{d}")
                cb.GEMM_MIN_MACS = {k: 1 << 62 for k in saved}   # every product on the loops
                loops = cb.compile_model_c(model, dtype).load()
                cb.GEMM_MIN_MACS = {k: 1 for k in saved}         # every product on gemm
                gemm = cb.compile_model_c(model, dtype).load()
                gemm.blas_threads(1)
                rng = np.random.default_rng(0)
                x, y = (rng.standard_normal((d, d)).astype(dtype) for _ in range(2))
                pl, pg, gl, gg = loops.init_params(0), gemm.init_params(0), loops.Params(), gemm.Params()
                t = {k: statistics.median(v) for k, v in _cpu({"loops": lambda: loops.backward(pl, x, y, grads=gl),
                                                              "gemm": lambda: gemm.backward(pg, x, y, grads=gg)},
                                                             rounds=args.rounds).items()}
                rows.append((dtype, d, d ** 3, f"{t['loops'] * 1e6:.2f}", f"{t['gemm'] * 1e6:.2f}",
                             f"{t['loops'] / t['gemm']:.2f}"))
    finally:
        cb.GEMM_MIN_MACS = saved
    text = (run.table(["dtype", "d", "multiply-adds per product", "all loops, us", "all gemm, us",
                       "loops / gemm"], rows)
            + f"\n\n(backward of a d-d-d linear net at batch d: 5 products of d^3 each; the C target sends "
              f"products of at least GEMM_MIN_MACS multiply-adds to gemm: "
              + ", ".join(f"{v} in {k}" for k, v in saved.items()) + ")"
            + "\n\nBatched products (bmm) of a causal transformer block, backward at batch 16, one BLAS thread:\n\n"
            + _bmm_rows(args, run))
    rows_out["blas"] = text
    return text


BMM_BLOCKS = ((32, 64, 4, 128), (64, 128, 4, 512))   # (T, d, heads, mlp)


def _bmm_rows(args, run):
    """The transformer block's backward with its batched products on the loops against on gemm."""
    import dataclasses
    import re
    from bench.block import block_model, data
    from compiler.backends.c import backend as cb
    rows = []
    for dtype in ("float64", "float32"):
        for T, d, heads, mlp in BMM_BLOCKS:
            compiled = cb.compile_model_c(block_model(T, d, heads, mlp), dtype)
            # the batched products' gemm branch (`if (BPC_GEMM(m, p, k)) { for (... _q ...) bpc_gemm`)
            # switched off: the loops of the same build run them
            source, count = re.subn(r"if \(BPC_GEMM\((\d+), (\d+), (\d+)\)\) \{\n(\s+)for \(size_t _q",
                                    r"if (0 && BPC_GEMM(\1, \2, \3)) {\n\4for (size_t _q", compiled.c_source)
            assert count, "no batched product on gemm in the block"
            variants = {"loops": dataclasses.replace(compiled, c_source=source).load(), "gemm": compiled.load()}
            for module in variants.values():
                module.blas_threads(1)
            params, x, y = data(variants["gemm"], n=16, T=T, d=d, dtype=np.dtype(dtype))
            kept = {k: m.Params() for k, m in variants.items()}
            losses = {k: m.backward(params, x, y)[0] for k, m in variants.items()}
            assert abs(losses["loops"] - losses["gemm"]) <= (1e-4 if dtype == "float32" else 1e-10) * abs(losses["gemm"])
            cpu = _cpu({k: (lambda m=m, g=kept[k]: m.backward(params, x, y, grads=g)) for k, m in variants.items()},
                       rounds=args.rounds)
            t = {k: statistics.median(v) for k, v in cpu.items()}
            rows.append((dtype, f"T={T} d={d} heads={heads}", f"{T}x{T}x{d // heads}",
                         f"{t['loops'] * 1e3:.2f}", f"{t['gemm'] * 1e3:.2f}", f"{t['loops'] / t['gemm']:.2f}"))
    return run.table(["dtype", "block", "a product (m x n x k)", "bmm on loops, CPU ms", "bmm on gemm, CPU ms",
                      "loops / gemm"], rows)


# libm's spelling of each helper (the C target's form before the helpers), $r the type, $f the suffix
LIBM = {"exp": "exp$f(x[i])", "tanh": "tanh$f(x[i])", "sigmoid": "($r)1 / (($r)1 + exp$f(-x[i]))",
        "log": "log$f(x[i])", "softplus": "(x[i] > 0 ? x[i] : ($r)0) + log1p$f(exp$f(-fabs$f(x[i])))"}
ARGUMENTS = {"exp": (-20, 20), "tanh": (-5, 5), "sigmoid": (-20, 20), "log": (1e-3, 1e3), "softplus": (-20, 20)}


def elementwise(args, run):
    """Each helper's loop against libm's, per element (see the module docstring, (c))."""
    import string
    import subprocess
    import tempfile
    from pathlib import Path
    from compiler.backends.c import backend as cb
    from compiler.core import scalar_functions
    lines = ["#include <math.h>", "#include <stddef.h>", "#include <stdint.h>", "#include <string.h>"]
    types = {"float64": ("double", ""), "float32": ("float", "f")}
    for real, fs in types.values():
        lines += scalar_functions.helper_sources(set(LIBM), "c_helper", real=real, fs=fs)
        for name, form in LIBM.items():
            call = string.Template(form).substitute(r=real, f=fs)
            for kind, body in (("bpc", f"bpc_{name}{fs}(x[i])"), ("libm", call)):
                lines.append(f"void loop_{kind}_{name}{fs}(const {real} *restrict x, {real} *restrict y, size_t n)"
                             f" {{ for (size_t i = 0; i < n; i++) y[i] = {body}; }}")
    d = Path(tempfile.mkdtemp(prefix="bpc_bench_ew"))
    (d / "ew.c").write_text("\n\n".join(lines) + "\n")
    cc = list(cb._toolchain()[0])
    subprocess.run([*cc, *cb.CFLAGS, *cb._native()[0], "-std=c99", "-shared", "ew.c", "-o", "ew.so", "-lm"],
                   cwd=d, check=True, capture_output=True)
    lib = ctypes.CDLL(str(d / "ew.so"))
    count = 100000
    rows = []
    rng = np.random.default_rng(0)
    for dtype, (real, fs) in types.items():
        for name, (lo, hi) in ARGUMENTS.items():
            x = rng.uniform(lo, hi, count).astype(dtype)
            y = np.empty_like(x)
            px, py = x.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p)
            fns = {kind: (lambda f=getattr(lib, f"loop_{kind}_{name}{fs}"): f(px, py, ctypes.c_size_t(count)))
                   for kind in ("libm", "bpc")}
            cpu = _cpu(fns, rounds=max(5, args.rounds // 3))
            t = {k: statistics.median(v) / count * 1e9 for k, v in cpu.items()}
            rows.append((dtype, name, f"{t['libm']:.2f}", f"{t['bpc']:.2f}", f"{t['libm'] / t['bpc']:.1f}x"))
    return run.table(["dtype", "function", "libm loop, ns", "vectorised helper, ns", "speed-up"], rows)
