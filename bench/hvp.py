"""The ``hvp`` section of ``python -m bench`` (issue 16, item 6): the Hessian-vector product of
the 784-256-128-10 MLP (softmax cross-entropy, batch 256) in the generated NumPy module against
``torch.func.jvp(torch.func.grad(f))`` and ``jax.jit(jax.jvp(jax.grad(f)))``, forward over
reverse in all three, timed interleaved in one run. Every candidate's Hv is first checked
against the generated module's. The generated module's ``backward`` is timed beside them for
scale (an HVP costs a few gradients)."""
from __future__ import annotations

import statistics

import numpy as np

import compiler as bpc

BIG = [784, 256, 128, 10]
N = 256


def _torch_hvp(plist, vlist, x, y, activation):
    try:
        import torch
        from torch.func import grad, jvp
    except Exception as e:  # noqa: BLE001  (not installed, or a broken install)
        return None, f"torch not available ({type(e).__name__})"
    ps = tuple(torch.from_numpy(np.array(p)) for p in plist)
    vs = tuple(torch.from_numpy(np.array(v)) for v in vlist)
    tx, ty = torch.from_numpy(x), torch.from_numpy(np.asarray(y, np.int64))
    act = torch.tanh if activation == "tanh" else torch.relu
    F = torch.nn.functional

    def loss(ps):
        h = tx
        for i in range(0, len(ps) - 2, 2):
            h = act(torch.addmm(ps[i + 1], h, ps[i]))
        return F.cross_entropy(torch.addmm(ps[-1], h, ps[-2]), ty)

    def run():
        g, hv = jvp(grad(loss), (ps,), (vs,))
        return [t.numpy() for t in hv]

    return run, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def _jax_hvp(plist, vlist, x, y, activation):
    try:
        import jax
    except Exception as e:  # noqa: BLE001
        return None, f"jax not available ({type(e).__name__})"
    if x.dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    act = jnp.tanh if activation == "tanh" else jax.nn.relu
    cpu = jax.devices("cpu")[0]
    jx, jy = jax.device_put(x, cpu), jax.device_put(np.asarray(y, np.int32), cpu)

    def loss(ps):
        h = jx
        for i in range(0, len(ps) - 2, 2):
            h = act(h @ ps[i] + ps[i + 1])
        logp = jax.nn.log_softmax(h @ ps[-2] + ps[-1])
        return -jnp.mean(jnp.take_along_axis(logp, jy[:, None], axis=1))

    f = jax.jit(lambda ps, vs: jax.jvp(jax.grad(loss), (ps,), (vs,)))
    jps = [jax.device_put(p, cpu) for p in plist]
    jvs = [jax.device_put(v, cpu) for v in vlist]

    def run():
        g, hv = f(jps, jvs)
        jax.block_until_ready(hv)
        return [np.asarray(t) for t in hv]

    return run, f"jax {jax.__version__}"


def hvp_section(args, rows_out):
    """Hessian-vector products of the 784-256-128-10 MLP, batch 256, float32 and float64: CPU
    time of the process (all its threads) and wall time, every candidate on ``--threads``
    threads (default 1)."""
    from bench.run import note
    from bench.timing import threads_limited
    with threads_limited(getattr(args, "threads", 1), note, "hvp"):
        return _hvp_section(args, rows_out)


def _hvp_section(args, rows_out):
    import time

    from bench.run import note, table   # (bench.run imports this module)
    from bench.timing import measure
    rng = np.random.default_rng(0)
    mod = bpc.compile_model(bpc.mlp(BIG, args.activation, "softmax_cross_entropy", name="bench_hvp")).load()
    skip = set(filter(None, args.skip.split(",")))
    results = []
    for dt in (np.dtype(np.float32), np.dtype(np.float64)):
        p = mod.init_params(seed=0, dtype=dt)
        v = {k: rng.standard_normal(a.shape).astype(dt) for k, a in p.items()}
        names = list(mod.PARAMS)
        plist, vlist = [p[k] for k in names], [v[k] for k in names]
        x = rng.standard_normal((N, BIG[0])).astype(dt)
        y = rng.integers(0, BIG[-1], N)
        ref = mod.hvp(p, v, x, y)[2]
        scale = max(float(np.max(np.abs(ref[k]))) for k in names)
        fns = {"generated NumPy hvp": lambda: mod.hvp(p, v, x, y),
               "generated NumPy backward (for scale)": lambda: mod.backward(p, x, y)}
        for label, make, key in (("torch.func.jvp(grad)", _torch_hvp, "torch"),
                                 ("jax.jit(jvp(grad))", _jax_hvp, "jax")):
            if key in skip:
                continue
            fn, info = make(plist, vlist, x, y, args.activation)
            if fn is None:
                note(f"{label} skipped: {info}")
                continue
            got = fn()
            err = max(float(np.max(np.abs(np.asarray(g, np.float64) - ref[k]))) for g, k in zip(got, names)) / scale
            if err > (1e-3 if dt == np.float32 else 1e-10):
                raise SystemExit(f"{label}: Hv differs from the generated module's by {err:.2e} (relative)")
            fns[label] = fn
        print(f"  timing hvp {dt.name} ...", flush=True)
        cpu = measure(fns, rounds=args.rounds, clock=time.process_time)
        wall = measure(fns, rounds=args.rounds)
        _warn_if_noisy_hvp(cpu, note, dt, "CPU")
        _warn_if_noisy_hvp(wall, note, dt, "wall")
        results.append((dt.name, {k: statistics.median(s) for k, s in cpu.items()},
                        {k: statistics.median(s) for k, s in wall.items()}))
    rows = []
    ours_key = "generated NumPy hvp"
    for dname, tc, tw in results:
        for name in tc:
            row = [dname, name]
            for t in (tc, tw):
                row += [f"{t[name] * 1e3:.2f}", f"{t[ours_key] / t[name]:.2f}x" if name != ours_key else ""]
            rows.append(tuple(row))
        peers = [k for k in tc if not k.startswith("generated")]
        if peers:
            row = [dname, "generated / fastest peer"]
            for t in (tc, tw):
                fastest = min(peers, key=t.get)
                row += ["", f"{t[ours_key] / t[fastest]:.2f} ({fastest})"]
            rows.append(tuple(row))
    k = getattr(args, "threads", 1)
    text = (f"{k or 'default'} thread(s) per candidate; generated / fastest peer <= 1.00: the goal is met\n\n"
            + table(["dtype", "implementation", "CPU ms per call", "generated hvp CPU time / this",
                     "wall ms per call", "generated hvp wall time / this"], rows))
    rows_out["hvp"] = (text, results)
    return text


def _warn_if_noisy_hvp(samples, note, dt, what="wall"):
    from bench.timing import spread
    ours = "generated NumPy hvp"
    if spread(samples[ours]) > 0.2:
        note(f"hvp {dt.name} ({what} time): noisy machine (generated hvp: interquartile range {spread(samples[ours]):.0%} of the "
             "median); rerun before trusting these ratios")
