"""Benchmark section ``block``: one training step (loss + every gradient) of a transformer block,
generated NumPy and generated C against PyTorch eager and JAX ``jit(value_and_grad)``, interleaved
in one run.

The model: x (n, T, d) -> pre-norm causal transformer block (layernorm, 4-head self-attention,
residual, layernorm, dense mlp gelu, dense d, residual) -> softmax cross-entropy of the block's
d outputs at every position against integer labels y (n, T) in 0..d-1: the loss touches every
output, and every parameter of the block gets a gradient. Batch 16, T 64, d 128, 4 heads, MLP
512, float32 (issue 13, item 7).

    python -m bench --only block                 # the section, with PyTorch and JAX if installed
    python -m bench.block --profile              # where the generated step's time goes, per statement
    python -m bench.block --profile-c            # the same for the generated C step (timers in the C)

The PyTorch step is written as a PyTorch user writes it: ``F.layer_norm``,
``F.scaled_dot_product_attention(is_causal=True)`` (its fused CPU kernel) and ``F.gelu(approximate
="tanh")``; a second PyTorch row spells the attention out as bpc builds it (scores, a causal
``masked_fill``, ``softmax``, products). JAX is the same written-out block under ``jit``. Every
candidate's loss is checked against the generated module's before timing. The generated C module
(``compile_model_c(model, "float32").load()``, OpenBLAS's gemm for its products when the
scipy-openblas32 wheel is installed, one BLAS thread) is called on its lean path: its own Params
holding the same parameters and a kept gradient buffer (``backward(params, x, y, grads=kept)``);
its loss and every gradient are checked against the NumPy module's first.
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = {"n": 16, "T": 64, "d": 128, "heads": 4, "mlp": 512}
NAMES = ("g1", "s1", "Wq2", "Wk2", "Wv2", "Wo2", "bo2", "g3", "s3", "W4", "b4", "W5", "b5")


def block_model(T=64, d=128, heads=4, mlp=512):
    import compiler as bpc
    net = bpc.Network("bench_block")
    x = net.input("x", shape=(T, d))
    h = net.transformer_block(x, heads=heads, mlp=mlp, causal=True)
    return net.build(h, loss="softmax_cross_entropy", target=net.target("y", kind="label", length=T))


def data(module, n=16, T=64, d=128, dtype=np.float32, seed=0):
    """(params, x, y): the module's initial parameters (biases and norms perturbed, so that no
    gradient is trivially structured) and a random batch."""
    rng = np.random.default_rng(seed)
    params = module.init_params(seed=seed, dtype=dtype)
    for k, v in params.items():
        if v.ndim == 1:
            v += (0.1 * rng.standard_normal(v.shape)).astype(dtype)
    x = rng.standard_normal((n, T, d)).astype(dtype)
    y = rng.integers(0, d, (n, T))
    return params, x, y


C_LABEL = "generated C"


def make_c(model, params, x, y, dtype=np.float32, ref=None, threads=1):
    """The generated C module's step on its lean path (its own Params with the NumPy module's
    parameters, a kept gradient buffer; ``threads`` BLAS threads), or (None, why). ``ref``: the
    NumPy module's (loss, grads), against which the C step's are checked (float32: 1e-4 of each
    gradient's largest magnitude; float64: 1e-10). Also used by bench/cnn.py."""
    from compiler.backends.c.backend import compile_model_c
    try:
        from compiler.backends.c.backend import _toolchain
        _toolchain()
    except Exception as e:   # no compiler, cffi or Python.h
        return None, f"no C toolchain ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    from compiler.backends.c.blas import preload
    preload()
    module = compile_model_c(model, np.dtype(dtype).name).load()
    module.blas_threads(threads)
    cp, kept = module.Params(), module.Params()
    for k in module.PARAMS:
        cp[k][...] = params[k]
    if ref is not None:
        tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
        loss, grads = module.backward(cp, x, y, grads=kept)
        if not np.isclose(loss, ref[0], rtol=tol, atol=tol):
            raise SystemExit(f"generated C: loss {loss} differs from the NumPy module's {ref[0]}")
        for k in module.PARAMS:
            want, got = np.asarray(ref[1][k]), np.asarray(grads[k])
            err = float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1e-30)
            if not err <= tol:
                raise SystemExit(f"generated C: gradient of {k} differs from the NumPy module's "
                                 f"(largest difference {err:.2e} of its largest magnitude)")
    info = f"generated C ({'OpenBLAS gemm' if module.blas_threads() else 'no BLAS: loops'})"
    return (lambda: module.backward(cp, x, y, grads=kept)), info


def make_torch(params, x, y, heads, sdpa=True, threads=None):
    """forward + backward of the block in PyTorch eager, or (None, why)."""
    try:
        import torch
    except Exception as e:
        return None, f"torch not installed ({type(e).__name__}); pip install torch==2.13.0"
    if threads:
        torch.set_num_threads(threads)
    F = torch.nn.functional
    ps = [torch.from_numpy(np.array(params[k])).requires_grad_() for k in NAMES]
    tx, ty = torch.from_numpy(x), torch.from_numpy(np.asarray(y, np.int64))
    n, T, d = x.shape
    dk = d // heads
    future = torch.ones(T, T, dtype=torch.bool).triu(1)

    def step():
        for p in ps:
            p.grad = None
        g1, s1, Wq, Wk, Wv, Wo, bo, g3, s3, W4, b4, W5, b5 = ps
        h = F.layer_norm(tx, (d,), g1, s1, 1e-5)
        q, k, v = ((h @ W).view(n, T, heads, dk).transpose(1, 2) for W in (Wq, Wk, Wv))
        if sdpa:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(dk))
            o = torch.softmax(s.masked_fill(future, -1e9), dim=-1) @ v
        r = tx + torch.addmm(bo, o.transpose(1, 2).reshape(n * T, d), Wo).view(n, T, d)
        h2 = F.layer_norm(r, (d,), g3, s3, 1e-5).view(n * T, d)
        m = torch.addmm(b5, F.gelu(torch.addmm(b4, h2, W4), approximate="tanh"), W5)
        value = F.cross_entropy(r.view(n * T, d) + m, ty.view(-1))
        value.backward()
        return value.item(), [p.grad for p in ps]

    return step, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def make_jax(params, x, y, heads):
    """``jit(value_and_grad)`` of the block in JAX on the CPU, or (None, why)."""
    try:
        import jax
    except Exception as e:
        return None, f"jax not installed ({type(e).__name__}); pip install jax"
    jnp = jax.numpy
    n, T, d = x.shape
    dk = d // heads
    keep = np.tri(T, dtype=bool)

    def norm(h, g, s):
        mu = h.mean(-1, keepdims=True)
        c = h - mu
        return c * jax.lax.rsqrt((c * c).mean(-1, keepdims=True) + 1e-5) * g + s

    def loss_fn(ps, x, y):
        g1, s1, Wq, Wk, Wv, Wo, bo, g3, s3, W4, b4, W5, b5 = ps
        h = norm(x, g1, s1)
        q, k, v = ((h @ W).reshape(n, T, heads, dk).transpose(0, 2, 1, 3) for W in (Wq, Wk, Wv))
        s = jnp.where(keep, (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(dk), -1e9)
        o = (jax.nn.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(n, T, d)
        r = x + o @ Wo + bo
        out = r + jax.nn.gelu(norm(r, g3, s3) @ W4 + b4, approximate=True) @ W5 + b5
        logp = jax.nn.log_softmax(out, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))

    f = jax.jit(jax.value_and_grad(loss_fn))
    cpu = jax.devices("cpu")[0]
    jps = [jax.device_put(params[k], cpu) for k in NAMES]
    jx, jy = jax.device_put(x, cpu), jax.device_put(np.asarray(y, np.int32), cpu)

    def step():
        value, grads = f(jps, jx, jy)
        jax.block_until_ready(grads)
        return float(value), grads

    return step, f"jax {jax.__version__}"


def candidates(skip=(), dtype=np.float32):
    """({label: step callable}, loss of the generated step, notes) for one run."""
    import compiler as bpc
    s = SIZES
    model = block_model(s["T"], s["d"], s["heads"], s["mlp"])
    module = bpc.compile_model(model, np.dtype(dtype).name).load()
    params, x, y = data(module, s["n"], s["T"], s["d"], dtype)
    ref, ref_grads = module.backward(params, x, y)
    ref_grads = {k: np.array(v) for k, v in ref_grads.items()}
    fns, notes = {"generated NumPy": lambda: module.backward(params, x, y)}, []
    makers = []
    if "c" not in skip:
        fn, info = make_c(model, params, x, y, dtype, (ref, ref_grads))
        if fn is None:
            notes.append(f"{C_LABEL} skipped: {info}")
        else:
            fns[C_LABEL] = fn
            notes.append(info)
    if "torch" not in skip:
        makers += [("PyTorch eager (scaled_dot_product_attention)", lambda: make_torch(params, x, y, s["heads"])),
                   ("PyTorch eager, attention written out", lambda: make_torch(params, x, y, s["heads"], sdpa=False))]
    if "jax" not in skip:
        makers.append(("JAX jit(value_and_grad)", lambda: make_jax(params, x, y, s["heads"])))
    for label, make in makers:
        fn, info = make()
        if fn is None:
            notes.append(f"{label} skipped: {info}")
            continue
        got = fn()[0]
        if not np.isclose(got, ref, rtol=1e-4, atol=1e-4):
            raise SystemExit(f"{label}: loss {got} differs from the generated module's {ref}")
        fns[label] = fn
    return fns, ref, notes


def one_thread(note=print):
    """One thread for every candidate (NumPy's BLAS is limited by the caller, threadpoolctl):
    PyTorch's intra-op pool and XLA's (its flags are read when JAX starts its CPU backend, so a
    JAX already started keeps its threads, which is noted). On a shared 2-core machine two BLAS
    threads wait on each other while other jobs hold the cores: a step then takes 5-30x longer
    and no ratio means anything."""
    import os
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    if "jax" in sys.modules:
        note("block: JAX was started before this section and keeps its default threads")
    elif flags not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    try:
        import torch
        torch.set_num_threads(1)
    except Exception:
        pass


def block_section(args, rows_out, note=print):
    """The ``block`` section of ``python -m bench``: a markdown table of ms per step and the
    ratio of the generated step's time to each candidate's."""
    from threadpoolctl import threadpool_limits

    from bench.timing import measure, spread
    skip = set(filter(None, getattr(args, "skip", "").split(",")))
    one_thread(note)
    with threadpool_limits(1):
        fns, _, notes = candidates(skip)
        for text in notes:
            note(text)
        print("  timing float32 (CPU time, then wall time) ...", flush=True)
        cpu = measure(fns, rounds=args.rounds, clock=time.process_time)
        wall = measure(fns, rounds=args.rounds)
    for what, samples in (("CPU", cpu), ("wall", wall)):
        for b in ("generated NumPy", C_LABEL):
            if b in samples and spread(samples[b]) > 0.2:
                note(f"block ({what} time): noisy machine ({b}: interquartile range "
                     f"{spread(samples[b]):.0%} of the median); rerun before trusting these ratios")
    tc = {name: statistics.median(v) for name, v in cpu.items()}
    tw = {name: statistics.median(v) for name, v in wall.items()}
    bases = [b for b in ("generated NumPy", C_LABEL) if b in fns]
    header = ["implementation", "CPU ms per step", "wall ms per step"]
    for b in bases:
        header += [f"{b} / this (CPU)", f"{b} / this (wall)"]
    rows = []
    for name in fns:
        row = [name, f"{tc[name] * 1e3:.2f}", f"{tw[name] * 1e3:.2f}"]
        for b in bases:
            row += [f"{tc[b] / tc[name]:.2f}x", f"{tw[b] / tw[name]:.2f}x"]
        rows.append(row)
    s = SIZES
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average %.1f/%.1f/%.1f (1/5/15 min) after the run" % os.getloadavg()
    text = (f"batch {s['n']}, T {s['T']}, d {s['d']}, {s['heads']} heads, MLP {s['mlp']}, float32, causal, one "
            f"thread each{load}; a ratio <= 1.00x: that generated step is no slower than the candidate\n\n"
            + "\n".join(out))
    t = {"cpu": tc, "wall": tw}
    rows_out["block"] = (text, t)
    return text


# ---- where the time goes ------------------------------------------------------------------

def profile(module, params, x, y, repeats=100):
    """[(seconds per call, source line)] of ``backward``'s statements, slowest first: the
    function's body is re-run with a timer around each top-level statement."""
    import ast
    import inspect
    import textwrap
    src = textwrap.dedent(inspect.getsource(module.backward))
    fn = ast.parse(src).body[0]
    lines = src.splitlines()
    body, labels = [], []
    for i, stmt in enumerate(fn.body):
        text = " ".join(lines[stmt.lineno - 1:stmt.end_lineno]).strip()
        if isinstance(stmt, ast.Expr) and isinstance(getattr(stmt, "value", None), ast.Constant):
            continue                                   # the docstring
        labels.append(text)
        k = len(labels) - 1
        start = ast.parse(f"_t0 = _clock()").body[0]
        stop = ast.parse(f"_acc[{k}] += _clock() - _t0").body[0]
        if isinstance(stmt, ast.Return):
            tmp = ast.parse("_ret = 0").body[0]
            tmp.value = stmt.value
            body += [start, tmp, stop, ast.parse("return _ret").body[0]]
        else:
            body += [start, stmt, stop]
    fn.body = body
    fn.name = "_timed_backward"
    tree = ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[]))
    acc = [0.0] * len(labels)
    namespace = dict(module.__dict__, _clock=time.process_time, _acc=acc)
    exec(compile(tree, f"<timed {module.__name__}.backward>", "exec"), namespace)
    timed = namespace["_timed_backward"]
    for _ in range(3):
        timed(params, x, y)
    acc[:] = [0.0] * len(labels)
    for _ in range(repeats):
        timed(params, x, y)
    return sorted(((a / repeats, label) for a, label in zip(acc, labels)), reverse=True)


def _timed_c(source, prefix):
    """``source`` with a timer (thread CPU time) at each statement of ``<prefix>_backward``
    (each begins with its formula comment after a blank line), and the statements' labels."""
    import re
    start = source.index(f"int {prefix}_backward(")
    end = source.index("\n}\n", start)
    lines, labels, out = source[start:end].split("\n"), [], []
    for i, line in enumerate(lines):
        m = re.match(r"^    /\* (.*) \*/$", line)
        if m and i and not lines[i - 1]:
            out.append(f"    _bpc_mark({len(labels)});")
            labels.append(m.group(1))
        out.append(line)
    body = "\n".join(out)
    k = body.rfind("\n    return ") + 1
    body = body[:k] + f"    _bpc_mark({len(labels)});\n" + body[k:]
    timer = ("#include <time.h>\n"
             "static double _bpc_acc[4096], _bpc_last; static int _bpc_cur = -1;\n"
             "static double _bpc_now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); "
             "return t.tv_sec + 1e-9 * t.tv_nsec; }\n"
             "static void _bpc_mark(int k) { double t = _bpc_now(); if (_bpc_cur >= 0) _bpc_acc[_bpc_cur] += t - _bpc_last; "
             "_bpc_cur = k; _bpc_last = _bpc_now(); }\n")
    return source[:start] + timer + body + source[end:], labels


def profile_c(repeats=50):
    """[(CPU seconds per call, statement)] of the generated C backward, slowest first: the C
    source with a timer at each statement (thread CPU time), built as a program with the same
    flags and BLAS as the extension (one BLAS thread) and called on random data. A fused loop
    counts under its first statement; a statement printed inside another (a view, an inlined
    mask) costs nothing of its own."""
    import subprocess
    import tempfile
    from compiler.backends.c import backend as cb
    from compiler.backends.c.blas import find_scipy_openblas32
    s = SIZES
    compiled = cb.compile_model_c(block_model(s["T"], s["d"], s["heads"], s["mlp"]), "float32")
    prefix, n, nx, ny = compiled.prefix, s["n"], s["T"] * s["d"], s["T"]
    source, labels = _timed_c(compiled.c_source, prefix)
    count = sum(int(np.prod([int(d) for d in p.shape])) for p in compiled.model.params)
    lib = find_scipy_openblas32()
    main_c = f"""
#include <stdio.h>
#include <stdint.h>
{"void scipy_openblas_set_num_threads(int);" if lib else ""}
int main(void)
{{
    const size_t n = {n};
    float *params = malloc(sizeof(float) * {count}), *grads = malloc(sizeof(float) * {count});
    float *x = malloc(sizeof(float) * n * {nx}), *work = malloc(sizeof(float) * {prefix}_work_size(n)), loss;
    int64_t *y = malloc(sizeof(int64_t) * n * {ny});
    srand(1);
    for (size_t i = 0; i < {count}; i++) params[i] = (rand() / (float)RAND_MAX - 0.5f) * 0.2f;
    for (size_t i = 0; i < n * {nx}; i++) x[i] = (rand() / (float)RAND_MAX - 0.5f) * 3.0f;
    for (size_t i = 0; i < n * {ny}; i++) y[i] = rand() % {s["d"]};
    {"scipy_openblas_set_num_threads(1);" if lib else ""}
    for (int r = 0; r < 5; r++) {prefix}_backward(params, x, y, n, &loss, grads, work);
    for (int i = 0; i <= {len(labels)}; i++) _bpc_acc[i] = 0;
    for (int r = 0; r < {repeats}; r++) {prefix}_backward(params, x, y, n, &loss, grads, work);
    for (int i = 0; i < {len(labels)}; i++) printf("%.9g\\n", _bpc_acc[i] / {repeats});
    return 0;
}}
"""
    d = Path(tempfile.mkdtemp(prefix="bpc_profile_c"))
    (d / f"{prefix}.h").write_text(compiled.header)
    (d / f"{prefix}.c").write_text(source + main_c)
    cc = list(cb._toolchain()[0])
    cmd = [*cc, *cb.CFLAGS, *cb._native()[0], "-D_POSIX_C_SOURCE=199309L", *(lib.compile_flags if lib else []),
           f"{prefix}.c", "-o", "profile", *(lib.link_flags if lib else []), "-lm"]
    subprocess.run(cmd, cwd=d, check=True)
    out = subprocess.run([str(d / "profile")], cwd=d, check=True, capture_output=True, text=True).stdout.split()
    return sorted(((float(t), label) for t, label in zip(out, labels)), reverse=True)


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m bench.block", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="store_true", help="per-statement times of the generated backward")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--skip", default="", help="any of c,torch,jax (comma-separated)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="BLAS / framework threads (default 1)")
    ap.add_argument("--profile-c", action="store_true", help="per-statement times of the generated C backward")
    args = ap.parse_args(argv)
    if args.profile_c:
        rows = profile_c()
        total = sum(t for t, _ in rows)
        print(f"C backward: {total * 1e3:.2f} ms of CPU per call (a timer at each statement, thread CPU time)")
        for t, label in rows[:args.top]:
            print(f"{t * 1e3:8.3f} ms {t / total:6.1%}  {label[:110]}")
        return 0
    if args.profile:
        import compiler as bpc
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
        s = SIZES
        module = bpc.compile_model(block_model(s["T"], s["d"], s["heads"], s["mlp"]), "float32").load()
        params, x, y = data(module, s["n"], s["T"], s["d"])
        rows = profile(module, params, x, y)
        total = sum(t for t, _ in rows)
        print(f"backward: {total * 1e3:.2f} ms of CPU per call (statements timed one by one, process CPU time)")
        for t, label in rows[:args.top]:
            print(f"{t * 1e3:8.3f} ms {t / total:6.1%}  {label[:110]}")
        return 0
    print(block_section(args, {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
