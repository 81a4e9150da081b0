"""Per-example gradients of the 784-256-128-10 MLP (softmax cross-entropy): the generated
``per_example_grads`` (NumPy and C) against ``torch.func.vmap(grad)`` and ``jax.vmap(jax.grad)``
(jit), each returning every sample's loss gradient for every parameter; timed interleaved in
one run (issue 16, item 6), CPU time of the process (all its threads) and wall time, every
candidate on ``--threads`` threads (default 1: on a shared machine idle BLAS threads spin and
their CPU time measures the load). ``python -m bench --only per_example``."""
from __future__ import annotations

import statistics

import numpy as np

import compiler as bpc
import time

from bench.timing import measure, spread, threads_limited

SIZES = [784, 256, 128, 10]
BATCH = 32
TITLE = f"Per-example gradients, MLP 784-256-128-10 tanh, softmax cross-entropy, batch {BATCH}"


def _torch(plist, x, y, threads=None):
    try:
        import torch
        from torch.func import grad, vmap
    except Exception as e:  # noqa: BLE001 - not installed or broken
        return None, f"torch not installed ({type(e).__name__})"
    ps = tuple(torch.from_numpy(np.array(p)) for p in plist)
    tx, ty = torch.from_numpy(x), torch.from_numpy(np.asarray(y, np.int64))
    F = torch.nn.functional

    def loss_one(ps, xi, yi):
        h = xi[None]
        for i in range(0, len(ps) - 2, 2):
            h = torch.tanh(h @ ps[i] + ps[i + 1])
        z = h @ ps[-2] + ps[-1]
        return F.cross_entropy(z, yi[None])

    f = vmap(grad(loss_one), in_dims=(None, 0, 0))
    return (lambda: f(ps, tx, ty)), f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def _jax(plist, x, y):
    try:
        import jax
    except Exception as e:  # noqa: BLE001
        return None, f"jax not installed ({type(e).__name__})"
    if x.dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy

    def loss_one(ps, xi, yi):
        h = xi
        for i in range(0, len(ps) - 2, 2):
            h = jnp.tanh(h @ ps[i] + ps[i + 1])
        z = h @ ps[-2] + ps[-1]
        return -jax.nn.log_softmax(z)[yi]

    f = jax.jit(jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0)))
    cpu = jax.devices("cpu")[0]
    jps = [jax.device_put(p, cpu) for p in plist]
    jx, jy = jax.device_put(x, cpu), jax.device_put(np.asarray(y, np.int32), cpu)

    def run():
        out = f(jps, jx, jy)
        jax.block_until_ready(out)
        return out

    return run, f"jax {jax.__version__}"


def section(args, rows_out, note, table, frameworks_skipped):
    with threads_limited(getattr(args, "threads", 1), note, "per_example") as threads:
        return _section(args, rows_out, note, table, frameworks_skipped, threads)


def _section(args, rows_out, note, table, frameworks_skipped, threads):
    rng = np.random.default_rng(0)
    model = bpc.mlp(SIZES, "tanh", "softmax_cross_entropy", name="bench_pe")
    results = []
    for dtype in (np.float32, np.float64):
        dt = np.dtype(dtype)
        mod = bpc.compile_model(model).load()
        p = mod.init_params(seed=0, dtype=dt)
        plist = [p[k] for k in mod.PARAMS]
        x = rng.standard_normal((BATCH, SIZES[0])).astype(dt)
        y = rng.integers(0, SIZES[-1], BATCH)
        ref = mod.per_example_grads(p, x, y)[1]
        fns = {"generated NumPy": lambda: mod.per_example_grads(p, x, y)}
        try:
            cmod = bpc.compile_model_c(model, dtype=dt.name).load()
            threads.again()      # the C module's BLAS, loaded just now
            cp = cmod.init_params(seed=0)
            _agree("generated C", cmod.per_example_grads(cp, x, y)[1]["W1"], ref["W1"], dt)
            fns["generated C"] = lambda: cmod.per_example_grads(cp, x, y)
        except Exception as e:  # noqa: BLE001 - no compiler: the C row is left out
            note(f"per_example: generated C skipped ({type(e).__name__}: {e})")
        for key, label, make in (("torch", "torch.func vmap(grad)", _torch), ("jax", "jax.jit(vmap(grad))", _jax)):
            if key in frameworks_skipped:
                continue
            fn, info = make(plist, x, y)
            if fn is None:
                note(f"per_example: {label} skipped: {info}")
                continue
            out = fn()
            _agree(label, np.asarray(out[0]), ref["W1"], dt)
            fns[label] = fn
        print(f"  timing per-example gradients {dt.name} ...", flush=True)
        cpu = measure(fns, rounds=args.rounds, clock=time.process_time)
        wall = measure(fns, rounds=args.rounds)
        for what, samples in (("CPU", cpu), ("wall", wall)):
            if spread(samples["generated NumPy"]) > 0.2:
                note(f"per_example {dt.name} ({what} time): noisy machine (interquartile range "
                     f"{spread(samples['generated NumPy']):.0%} of the median); rerun before trusting the ratios")
        results.append((dt.name, {k: statistics.median(v) for k, v in cpu.items()},
                        {k: statistics.median(v) for k, v in wall.items()}))
    rows = []
    for dname, tc, tw in results:
        cols = []
        for t in (tc, tw):
            peers = [v for k, v in t.items() if not k.startswith("generated")]
            cols.append((t, min(peers) if peers else None))
        for name in tc:
            row = [dname, name]
            for t, fastest in cols:
                row += [f"{t[name] * 1e3:.2f}", f"{t[name] / fastest:.2f}x" if fastest else ""]
            rows.append(tuple(row))
    k = getattr(args, "threads", 1)
    text = (f"{k or 'default'} thread(s) per candidate; time / fastest peer <= 1.00x: no slower than every peer\n\n"
            + table(["dtype", "implementation", "CPU ms per call", "CPU time / fastest peer", "wall ms per call",
                     "wall time / fastest peer"], rows))
    rows_out["per_example"] = (text, results)
    return text


def _agree(label, got, ref, dt):
    tol = 1e-3 if dt == np.float32 else 1e-9
    scale = max(1.0, float(np.max(np.abs(ref))))
    if got.shape != ref.shape or not np.allclose(got, ref, rtol=tol, atol=tol * scale):
        raise SystemExit(f"per_example: {label}'s per-sample gradient of W1 differs from the generated module's")
