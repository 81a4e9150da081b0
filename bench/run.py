"""Run the benchmarks and print markdown tables (``python -m bench --help``).

Sections (``--only`` picks some): ``step`` the 784-256-128-10 training step, ``small`` 2-16-16-1
nets where call overhead dominates, ``peak`` the fraction of the machine's matmul throughput the
step reaches, ``compile`` compile time against depth and width, ``block`` a transformer block's
training step, generated NumPy and C, against PyTorch and JAX (bench/block.py), ``cnn`` two CNN
training steps likewise (bench/cnn.py); not run by default: ``c`` the C
target against hand NumPy, hand C, PyTorch and JAX, ``blas`` its loops against gemm
(bench/c_target.py), ``dask`` data-parallel training on 1 and 2 Dask workers against one process
(bench/dask_scaling.py; needs dask.distributed), ``per_example`` per-example gradients against
torch.func and JAX vmap (bench/per_example.py), ``moments`` the polynomial fit with its data
moments hoisted (bench/moments.py), ``hvp`` Hessian-vector products (bench/hvp.py).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler as bpc  # noqa: E402
from compiler.core import ir  # noqa: E402

from bench import moments, per_example  # noqa: E402
from bench.cpu import cpu_name  # noqa: E402
from bench.frameworks import make_jax, make_torch  # noqa: E402
from bench.block import block_section  # noqa: E402
from bench.hvp import hvp_section  # noqa: E402
from bench.reference import HandMLP  # noqa: E402
from bench.timing import compare, measure, spread  # noqa: E402

BIG = [784, 256, 128, 10]
SMALL = [2, 16, 16, 1]
NOTES = []


def note(text):
    NOTES.append(text)
    print(f"  note: {text}", flush=True)


def params_list(mod, dtype):
    p = mod.init_params(seed=0, dtype=dtype)
    return p, [p[name] for name in mod.PARAMS]


def matmul_flops(sizes, n):
    """FLOPs of the matrix products of one step: forward, the weight gradients, and the input
    gradients of every layer but the first (nobody needs dL/dx)."""
    macs = sum(a * b for a, b in zip(sizes, sizes[1:]))
    return 2 * n * (3 * macs - sizes[0] * sizes[1])


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _frameworks(args):
    every = (("PyTorch eager", make_torch, "torch"), ("JAX jit(value_and_grad)", make_jax, "jax"))
    skip = set(filter(None, args.skip.split(",")))
    return [(label, make) for label, make, key in every if key not in skip]


def _warn_if_noisy(what, samples):
    """A note when the two NumPy candidates' rounds spread widely (the frameworks' own spread
    is larger by nature: thread pools, dispatch)."""
    worst = max(("generated NumPy", "hand-written NumPy"), key=lambda k: spread(samples[k]))
    if spread(samples[worst]) > 0.2:
        note(f"{what}: noisy machine ({worst}: interquartile range {spread(samples[worst]):.0%} of the median); "
             "rerun before trusting these ratios")


def _check(name, got, ref, dtype):
    tol = 1e-4 if dtype == np.float32 else 1e-10
    if not np.isclose(float(got), float(ref), rtol=tol, atol=tol):
        raise SystemExit(f"{name}: loss {float(got)} differs from the reference's {float(ref)}")


def step_section(args, rows_out):
    """(a) one forward+backward step of the 784-256-128-10 MLP at batch 256."""
    n = 256
    rng = np.random.default_rng(0)
    results = []
    for dtype in (np.float32, np.float64):
        dt = np.dtype(dtype)
        mod = bpc.compile_model(bpc.mlp(BIG, args.activation, "softmax_cross_entropy", name="bench_big")).load()
        p, plist = params_list(mod, dt)
        x = rng.standard_normal((n, BIG[0])).astype(dt)
        y = rng.integers(0, BIG[-1], n)
        hand = HandMLP(BIG, args.activation, "xent")
        ref_loss = hand.step(plist, x, y)[0]
        _check("generated", mod.backward(p, x, y)[0], ref_loss, dt)
        products = _products(plist, x)
        fns = {"generated NumPy": lambda: mod.backward(p, x, y),
               "hand-written NumPy": lambda: hand.step(plist, x, y),
               "the 8 matrix products alone": products}
        for label, make in _frameworks(args):
            fn, info = make(plist, x, y, args.activation, "xent")
            if fn is None:
                note(f"{label} skipped: {info}")
                continue
            _check(label, fn()[0], ref_loss, dt)
            fns[label] = fn
        print(f"  timing {dt.name} ...", flush=True)
        samples = measure(fns, rounds=args.rounds)
        t = {name: statistics.median(v) for name, v in samples.items()}
        _warn_if_noisy(f"step {dt.name}", samples)
        results.append((dt.name, t))
    rows = []
    for dname, t in results:
        base = t["hand-written NumPy"]
        for name, sec in t.items():
            rows.append((dname, name, f"{sec * 1e3:.2f}", f"{sec / base:.2f}x",
                         f"{t['generated NumPy'] / sec:.2f}x" if name != "generated NumPy" else ""))
    text = table(["dtype", "implementation", "ms per step", "time / hand NumPy", "generated time / this"], rows)
    rows_out["step"] = (text, results)
    return text


def _products(plist, x):
    """The 8 matrix products of the step with preallocated outputs: the floor NumPy code hits."""
    W1, W2, W3 = plist[0], plist[2], plist[4]
    n = x.shape[0]
    H1, H2, Z = (np.empty((n, w), x.dtype) for w in BIG[1:])
    D1, D2 = np.empty_like(H1), np.empty_like(H2)
    G1, G2, G3 = np.empty_like(W1), np.empty_like(W2), np.empty_like(W3)

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


def peak_section(args, rows_out):
    """(c) the machine's matmul throughput (a large square product) and the step's share of it."""
    step = rows_out.get("step")
    rows = []
    for dt in (np.float32, np.float64):
        m = 2048
        a = np.random.default_rng(1).standard_normal((m, m)).astype(dt)
        c = np.empty_like(a)
        # the best round: a peak is what the machine can do, and other load only lowers it
        t = compare({"peak": lambda: np.matmul(a, a, out=c)}, rounds=7, warmup=2, target=0.2, stat=min)["peak"]
        peak = 2 * m ** 3 / t
        flops = matmul_flops(BIG, 256)
        row = [np.dtype(dt).name, f"{peak / 1e9:.0f}", f"{flops / peak * 1e3:.2f}"]
        if step:
            times = dict(step[1])[np.dtype(dt).name]
            for name in ("generated NumPy", "hand-written NumPy", "the 8 matrix products alone"):
                row.append(f"{flops / times[name] / peak:.0%}")
        rows.append(row)
    header = ["dtype", "peak GFLOP/s (2048^3 @, best round)", "ms at peak"]
    if step:
        header += ["generated NumPy", "hand NumPy", "8 products alone"]
    text = (f"{matmul_flops(BIG, 256) / 1e6:.0f} MFLOP of matrix products per step; share of peak:\n\n"
            + table(header, rows))
    rows_out["peak"] = text
    return text


def small_section(args, rows_out):
    """(b) 2-16-16-1 tanh MSE, float64, batch 1 and 32: call overhead dominates."""
    rng = np.random.default_rng(0)
    model = bpc.mlp(SMALL, "tanh", "mse", name="bench_small")
    mod = bpc.compile_model(model).load()
    cmod, why = None, None
    try:
        from compiler.backends.c.backend import compile_model_c
        cmod = compile_model_c(model, "float64").load()
    except ImportError as e:
        why = f"C target skipped: compiler.backends.c.backend not available ({e})"
    except Exception as e:  # no compiler, build failure
        why = f"C target skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if why:
        note(why)
    rows = []
    for n in (1, 32):
        p, plist = params_list(mod, np.float64)
        x = rng.standard_normal((n, SMALL[0]))
        y = rng.standard_normal((n, 1))
        hand = HandMLP(SMALL, "tanh", "mse")
        ref = hand.step(plist, x, y)[0]
        _check("generated", mod.backward(p, x, y)[0], ref, np.float64)
        fns = {"generated NumPy": lambda: mod.backward(p, x, y), "hand-written NumPy": lambda: hand.step(plist, x, y)}
        if cmod is not None:
            # the C module's own parameter container (one flat buffer, as init_params gives it)
            # is its fast path; a plain dict of arrays is packed on every call
            cp = cmod.init_params(0)
            for k in cp:
                cp[k][...] = p[k]
            _check("C", cmod.backward(cp, x, y)[0], ref, np.float64)
            _check("C", cmod.backward(p, x, y)[0], ref, np.float64)
            fns["generated C (cffi)"] = lambda: cmod.backward(cp, x, y)
            # the lean path: gradients into a buffer the caller keeps (no result made per call)
            kept = cmod.Params()
            fns["generated C, grads= kept buffer"] = lambda: cmod.backward(cp, x, y, grads=kept)
            fns["generated C, plain dict params"] = lambda: cmod.backward(p, x, y)
            # the floor: the raw cffi call of the C function, every pointer made once
            ffi, raw = cmod._ffi, cmod._lib.bench_small_backward
            ptrs = [ffi.from_buffer("double[]", a) for a in (cp.flat, x, y)]
            lp, gp = ffi.new("double[]", 1), ffi.new("double[]", cmod.NUM_PARAMS)
            fns["raw cffi call of the C function (floor)"] = lambda: raw(*ptrs, n, lp, gp, ffi.NULL)
        for label, make in _frameworks(args):
            # one torch thread: at this size its thread pool only adds overhead, and its
            # spinning workers collide with other runtimes' on a 2-core machine
            fn, info = make(plist, x, y, "tanh", "mse", **({"threads": 1} if make is make_torch else {}))
            if fn is None:
                if n == 1:
                    note(f"{label} skipped: {info}")
                continue
            _check(label, fn()[0], ref, np.float64)
            fns[label] = fn
        print(f"  timing batch {n} ...", flush=True)
        samples = measure(fns, rounds=args.rounds, target=0.01)
        t = {name: statistics.median(v) for name, v in samples.items()}
        _warn_if_noisy(f"small net batch {n}", samples)
        base = t["hand-written NumPy"]
        for name, sec in t.items():
            rows.append((n, name, f"{sec * 1e6:.1f}", f"{sec / base:.2f}x"))
    text = table(["batch", "implementation", "us per step", "time / hand NumPy"], rows)
    rows_out["small"] = text
    return text


def compile_section(args, rows_out):
    """(d) compile time (model -> imported module) against depth and width."""
    def once(sizes, k):
        ir._intern.clear()   # no nodes shared with earlier compiles: each timing starts cold
        t0 = time.perf_counter()
        bpc.compile_model(bpc.mlp(sizes, "tanh", "softmax_cross_entropy", name=f"ct{k}")).load()
        return time.perf_counter() - t0

    def timed(sizes, k):
        return sorted(once(sizes, k) for _ in range(args.compile_repeats))[args.compile_repeats // 2]

    depth_rows, widths_rows = [], []
    depths = [1, 2, 4, 8, 16, 32]
    dt = []
    for d in depths:
        t = timed([32] + [64] * d + [10], d)
        dt.append(t)
        depth_rows.append((d, f"{t * 1e3:.0f}"))
    slope = np.polyfit(depths, dt, 1)[0]
    wt = []
    widths = [16, 64, 256, 1024]
    for w in widths:
        t = timed([32, w, w, w, w, 10], 100 + w)
        wt.append(t)
        widths_rows.append((w, f"{t * 1e3:.0f}"))
    big = timed(BIG, 999)
    fresh = _fresh_compile_seconds()
    text = (table(["hidden layers (width 64)", "compile ms"], depth_rows)
            + f"\n\nslope {slope * 1e3:.1f} ms per layer; t(32)/t(16) = {dt[-1] / dt[-2]:.2f} (2.0 = linear)\n\n"
            + table(["width (4 hidden layers)", "compile ms"], widths_rows)
            + f"\n\nt(1024)/t(16) = {wt[-1] / wt[0]:.2f} (1.0 = independent of width)\n\n"
            + f"784-256-128-10 tanh softmax-CE: {big * 1e3:.0f} ms in this process; {fresh * 1e3:.0f} ms in a fresh "
            "interpreter, imports of sympy/jinja2/compiler included (target < 1000 ms)")
    rows_out["compile"] = text
    return text


def _fresh_compile_seconds():
    """Wall time of ``import compiler; compile_model(784-256-128-10).load()`` in a new interpreter."""
    import subprocess
    code = ("import time; t0 = time.perf_counter(); import compiler as bpc; "
            "bpc.compile_model(bpc.mlp([784, 256, 128, 10], 'tanh', 'softmax_cross_entropy', name='fresh')).load(); "
            "print(time.perf_counter() - t0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


SECTIONS = {"step": step_section, "peak": peak_section, "small": small_section, "compile": compile_section,
            "block": lambda args, rows_out: block_section(args, rows_out, note)}
from bench.c_target import blas_section, c_section  # noqa: E402
SECTIONS.update(c=c_section, blas=blas_section)
# sections in modules of their own: section(args, rows_out, note, table, skipped frameworks)
for _m in (per_example, moments):
    SECTIONS[_m.__name__.rsplit(".", 1)[1]] = (lambda m: lambda args, rows: m.section(
        args, rows, note, table, set(filter(None, args.skip.split(",")))))(_m)

from bench.cnn import cnn_section  # noqa: E402  (the CNN training steps: bench/cnn.py)

SECTIONS["cnn"] = lambda args, rows_out: cnn_section(args, rows_out, note=note)


def dask_section(args, rows_out):
    from bench.dask_scaling import section     # needs dask.distributed: not in the default --only
    return section(args, rows_out)


SECTIONS["dask"] = dask_section
SECTIONS["hvp"] = hvp_section


def describe():
    cfg = np.show_config(mode="dicts")
    blas = cfg.get("Build Dependencies", {}).get("blas", {})
    return (f"{cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, NumPy {np.__version__} "
            f"({blas.get('name', '?')} {blas.get('version', '')}); OPENBLAS_CORETYPE="
            f"{os.environ.get('OPENBLAS_CORETYPE', '(unset: OpenBLAS detection)')}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="step,peak,small,compile,block,cnn", help="comma-separated sections")
    ap.add_argument("--rounds", type=int, default=31, help="timing rounds (median reported)")
    ap.add_argument("--compile-repeats", type=int, default=3)
    ap.add_argument("--activation", default="tanh", choices=["tanh", "relu"])
    ap.add_argument("--skip", default="", help="comma-separated frameworks not to run: torch,jax (c: the C rows of block and cnn) "
                    "(their thread pools add noise to the NumPy-only comparison)")
    ap.add_argument("--coretype", default=None, help="OPENBLAS_CORETYPE (or 'default'); read in __main__")
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads of sections c, blas, cnn, per_example and hvp "
                    "(threadpoolctl; cnn, per_example and hvp also set PyTorch's and XLA's)")
    args = ap.parse_args(argv)
    os.environ.setdefault("BPC_CACHE", tempfile.mkdtemp(prefix="bpc-bench-"))
    header = f"Machine: {describe()}\nCommand: python -m bench {' '.join(argv or [])}".rstrip()
    print(header, flush=True)
    results, parts = {}, [header]
    titles = {"step": f"Training step, MLP 784-256-128-10 {args.activation}, softmax cross-entropy, batch 256",
              "peak": "Share of the machine's matrix-multiply peak",
              "small": "Small net 2-16-16-1 tanh, MSE, float64 (call overhead)",
              "compile": "Compile time (model -> imported module)",
              "block": "Training step of a transformer block (generated NumPy and C, PyTorch, JAX), one thread each",
              "c": "The C target against hand-written NumPy and C, PyTorch and JAX",
              "blas": "The C target's matrix products: its loops against the BLAS's gemm",
              "dask": "Data-parallel training on Dask: 1 and 2 single-threaded workers against one process",
              "cnn": "CNN training step, float32 (generated NumPy and C, PyTorch eager, JAX jit)",
              "per_example": per_example.TITLE, "moments": moments.TITLE}
    titles["hvp"] = f"Hessian-vector product, MLP 784-256-128-10 {args.activation}, softmax cross-entropy, batch 256"
    for name in args.only.split(","):
        print(f"\n## {titles[name]}", flush=True)
        text = SECTIONS[name](args, results)
        print("\n" + text, flush=True)
        parts.append(f"## {titles[name]}\n\n{text}")
    if NOTES:
        parts.append("Notes: " + "; ".join(NOTES))
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join(parts) + "\n")
    return 0
