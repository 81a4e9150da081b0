"""The ``cnn`` section of ``python -m bench``: one training step (loss + every gradient) of two
convolutional networks in float32, the generated NumPy and C modules beside PyTorch eager and
JAX ``jit(value_and_grad)``, timed interleaved (bench/timing.py), wall and CPU time. The C
module runs its lean path (bench/block.py's ``make_c``: its own Params, a kept gradient buffer),
its loss and gradients checked against the NumPy module's first.

- ``digits``: the architecture of examples/cnn_digits.toml (8x8x1; conv 3x3x32, conv 3x3x32,
  max pool 2, conv 3x3x64, max pool 2, dense 10; "same" padding, relu), batch 256;
- ``rgb32``: 32x32x3 inputs, conv 3x3x32, conv 3x3x64 ("valid", relu), max pool 2, dense 10,
  batch 64.

Every candidate starts from the same parameters and its loss is checked against the generated
module's before timing. PyTorch runs channels-first (NCHW, its default layout: what a user of
PyTorch writes); the weights are converted once, outside the timed step. ``python -m bench.cnn
--profile`` prints where the generated step spends its time, statement by statement.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import compiler as bpc  # noqa: E402

from bench.timing import measure, spread  # noqa: E402

# (name, per-sample input shape, batch, layers): ("conv", filters, kernel, padding),
# ("maxpool", pool), ("flatten",), ("dense", units); relu after every convolution
MODELS = [
    ("digits", (8, 8, 1), 256, [("conv", 32, 3, "same"), ("conv", 32, 3, "same"), ("maxpool", 2),
                                ("conv", 64, 3, "same"), ("maxpool", 2), ("flatten",), ("dense", 10)]),
    ("rgb32", (32, 32, 3), 64, [("conv", 32, 3, "valid"), ("conv", 64, 3, "valid"), ("maxpool", 2),
                                ("flatten",), ("dense", 10)]),
]
CLASSES = 10


def build(name, shape, layers):
    """The bpc model of a layer list (the digits one must equal examples/cnn_digits.toml's)."""
    net = bpc.Network(f"bench_cnn_{name}")
    h = net.input("x", shape=shape)
    for layer in layers:
        kind = layer[0]
        if kind == "conv":
            h = net.conv2d(h, layer[1], kernel=layer[2], padding=layer[3], activation="relu")
        elif kind == "maxpool":
            h = net.maxpool2d(h, layer[1])
        elif kind == "flatten":
            h = net.flatten(h)
        else:
            h = net.dense(h, layer[1])
    return net.build(h, loss="softmax_cross_entropy", target=net.target("y", kind="label"))


def _shapes(shape, layers):
    """Per layer with parameters: its (H, W, C) input shape."""
    out, (H, W, C) = [], shape
    for layer in layers:
        if layer[0] == "conv":
            out.append((H, W, C))
            k = layer[2]
            if layer[3] == "valid":
                H, W = H - k + 1, W - k + 1
            C = layer[1]
        elif layer[0] == "maxpool":
            H, W = H // layer[1], W // layer[1]
        elif layer[0] == "dense":
            out.append((H, W, C))
    return out


def make_torch(plist, x, y, shape, layers):
    """PyTorch eager, NCHW: a zero-argument step, or (None, why)."""
    try:
        import torch
    except Exception as e:
        return None, f"torch not installed ({type(e).__name__}); pip install torch==2.13.0 (CPU)"
    F = torch.nn.functional
    ins = _shapes(shape, layers)
    ps, k = [], 0
    for layer in layers:
        if layer[0] not in ("conv", "dense"):
            continue
        W, b = plist[2 * k], plist[2 * k + 1]
        H_, W_, C = ins[k]
        if layer[0] == "conv":   # rows (kh, kw, c) x filters -> (filters, c, kh, kw)
            kk = layer[2]
            W = W.reshape(kk, kk, C, -1).transpose(3, 2, 0, 1)
        elif W.shape[0] == H_ * W_ * C and C > 1:   # NHWC flatten order -> NCHW's (c, h, w)
            W = W.reshape(H_, W_, C, -1).transpose(2, 0, 1, 3).reshape(H_ * W_ * C, -1)
        ps += [torch.from_numpy(np.ascontiguousarray(W)).requires_grad_(),
               torch.from_numpy(np.array(b)).requires_grad_()]
        k += 1
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    ty = torch.from_numpy(np.asarray(y, np.int64))

    def step():
        for p in ps:
            p.grad = None
        h, k = tx, 0
        for layer in layers:
            if layer[0] == "conv":
                h = torch.relu(F.conv2d(h, ps[2 * k], ps[2 * k + 1], padding=layer[3]))
                k += 1
            elif layer[0] == "maxpool":
                h = F.max_pool2d(h, layer[1])
            elif layer[0] == "flatten":
                h = h.flatten(1)
            else:
                h = torch.addmm(ps[2 * k + 1], h, ps[2 * k])
                k += 1
        value = F.cross_entropy(h, ty)
        value.backward()
        return value.item(), [p.grad for p in ps]

    return step, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def make_jax(plist, x, y, shape, layers):
    """JAX jit(value_and_grad), NHWC/HWIO (the generated module's layout): a step, or (None, why)."""
    try:
        import jax
    except Exception as e:
        return None, f"jax not installed ({type(e).__name__}); pip install jax"
    jnp, lax = jax.numpy, jax.lax
    ins = _shapes(shape, layers)
    ws, k = [], 0
    for layer in layers:
        if layer[0] == "conv":
            kk = layer[2]
            ws += [plist[2 * k].reshape(kk, kk, ins[k][2], -1), plist[2 * k + 1]]
            k += 1
        elif layer[0] == "dense":
            ws += [plist[2 * k], plist[2 * k + 1]]
            k += 1

    def loss_fn(ps, x, y):
        h, k = x, 0
        for layer in layers:
            if layer[0] == "conv":
                h = lax.conv_general_dilated(h, ps[2 * k], (1, 1), layer[3].upper(),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
                h = jax.nn.relu(h + ps[2 * k + 1])
                k += 1
            elif layer[0] == "maxpool":
                p = layer[1]
                h = lax.reduce_window(h, -jnp.inf, lax.max, (1, p, p, 1), (1, p, p, 1), "VALID")
            elif layer[0] == "flatten":
                h = h.reshape(h.shape[0], -1)
            else:
                h = h @ ps[2 * k] + ps[2 * k + 1]
                k += 1
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    f = jax.jit(jax.value_and_grad(loss_fn))
    cpu = jax.devices("cpu")[0]
    jps = [jax.device_put(p, cpu) for p in ws]
    jx, jy = jax.device_put(x, cpu), jax.device_put(np.asarray(y, np.int32), cpu)

    def step():
        value, grads = f(jps, jx, jy)
        jax.block_until_ready(grads)
        return value, grads

    return step, f"jax {jax.__version__}"


def setup(name, shape, n, layers, seed=0):
    """(generated module, params dict, params list, x, y) of one benchmark model in float32."""
    mod = bpc.compile_model(build(name, shape, layers), dtype="float32").load()
    p = mod.init_params(seed=seed, dtype=np.float32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + shape).astype(np.float32)
    y = rng.integers(0, CLASSES, n)
    return mod, p, [p[k] for k in mod.PARAMS], x, y


def _check_digits_spec(layers):
    """The digits model is examples/cnn_digits.toml's: the same parameter shapes and loss."""
    spec_mod = bpc.compile_model(bpc.load_spec(ROOT / "examples" / "cnn_digits.toml").model).load()
    ours = bpc.compile_model(build("digits", (8, 8, 1), layers)).load()
    if spec_mod.PARAMS != ours.PARAMS:
        raise SystemExit(f"bench/cnn.py's digits model differs from examples/cnn_digits.toml: "
                         f"{ours.PARAMS} vs {spec_mod.PARAMS}")


def cnn_section(args, rows_out, frameworks=None, note=print):
    """Wall and CPU time per step of each model, per candidate, and the ratios to PyTorch."""
    skip = set(filter(None, getattr(args, "skip", "").split(",")))
    threads = getattr(args, "threads", None)
    limit = None
    if threads:
        import os
        from threadpoolctl import threadpool_limits
        limit = threadpool_limits(threads)   # NumPy's BLAS
        # XLA reads its flags when jax is first imported (before that, in this process)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={threads}").strip()
        try:
            import torch
            torch.set_num_threads(threads)
        except Exception:
            pass
    try:
        return _cnn_section(args, rows_out, skip, note)
    finally:
        if limit is not None:
            limit.unregister()


def _cnn_section(args, rows_out, skip, note):
    rows, results = [], {}
    _check_digits_spec(MODELS[0][3])
    for name, shape, n, layers in MODELS:
        mod, p, plist, x, y = setup(name, shape, n, layers)
        ref, ref_grads = mod.backward(p, x, y)
        ref_grads = {k: np.array(v) for k, v in ref_grads.items()}
        fns = {"generated NumPy": lambda mod=mod, p=p, x=x, y=y: mod.backward(p, x, y)}
        if "c" not in skip:
            from bench.block import C_LABEL, make_c
            fn, info = make_c(build(name, shape, layers), p, x, y, np.float32, (ref, ref_grads),
                              threads=getattr(args, "threads", None) or 1)
            if fn is None:
                note(f"{C_LABEL} skipped: {info}")
            else:
                fns[C_LABEL] = fn
        for label, make, key in (("PyTorch eager", make_torch, "torch"),
                                 ("JAX jit(value_and_grad)", make_jax, "jax")):
            if key in skip:
                continue
            fn, info = make(plist, x, y, shape, layers)
            if fn is None:
                note(f"{label} skipped: {info}")
                continue
            got = float(fn()[0])
            if not np.isclose(got, ref, rtol=1e-4, atol=1e-4):
                raise SystemExit(f"cnn {name}: {label}'s loss {got} differs from the generated module's {ref}")
            fns[label] = fn
        print(f"  timing {name} ...", flush=True)
        cpu = {}
        wall = measure(fns, rounds=max(5, args.rounds // 2), warmup=2, target=0.2, cpu=cpu)
        if spread(wall["generated NumPy"]) > 0.2:
            note(f"cnn {name}: noisy machine (generated NumPy: interquartile range "
                 f"{spread(wall['generated NumPy']):.0%} of the median); rerun before trusting these ratios")
        t = {k: statistics.median(v) for k, v in wall.items()}
        c = {k: statistics.median(v) for k, v in cpu.items()}
        results[name] = (t, c)
        base_t, base_c = t.get("PyTorch eager"), c.get("PyTorch eager")
        for label in fns:
            rows.append((f"{name} {shape[0]}x{shape[1]}x{shape[2]}, batch {n}", label,
                         f"{t[label] * 1e3:.1f}", f"{c[label] * 1e3:.1f}",
                         f"{t[label] / base_t:.2f}" if base_t else "",
                         f"{c[label] / base_c:.2f}" if base_c else ""))
    from bench.run import table
    text = table(["model", "implementation", "ms per step (wall)", "CPU ms per step",
                  "wall / PyTorch", "CPU / PyTorch"], rows)
    rows_out["cnn"] = (text, results)
    return text


def profile(name="digits", repeats=20, top=25, clock=time.process_time):
    """Seconds per statement of the generated backward (the module's source, run line by line),
    CPU time by default (robust to other processes' load; run with OPENBLAS_NUM_THREADS=1 so
    that BLAS threads spinning do not count)."""
    model = next(m for m in MODELS if m[0] == name)
    _, shape, n, layers = model
    mod, p, _, x, y = setup(*model)
    import inspect
    src = inspect.getsource(mod.backward).splitlines()
    body = [line[4:] for line in src[2:] if line.strip() and not line.strip().startswith("#")]
    body = [line for line in body if not line.startswith("return")]
    env = dict(vars(mod), params=p, x=x, y=y)
    # group the lines into statements (a 'for' and its indented body are one)
    stmts = []
    for line in body:
        if line.startswith(" ") and stmts:
            stmts[-1] += "\n" + line
        else:
            stmts.append(line)
    codes = [compile(s, "<profile>", "exec") for s in stmts]
    samples = [[] for _ in codes]
    for r in range(repeats + 2):
        e = dict(env)
        for i, c in enumerate(codes):
            t0 = clock()
            exec(c, e)
            if r >= 2:
                samples[i].append(clock() - t0)
    # the median of each statement: other processes' load hits a few rounds, not the middle
    times = [statistics.median(v) for v in samples]
    total = sum(times)
    order = sorted(range(len(codes)), key=lambda i: -times[i])
    print(f"{name}: {total * 1e3:.2f} ms per backward ({clock.__name__}; sum of the statements' medians)")
    for i in order[:top]:
        print(f"{times[i] * 1e3:8.3f} ms {times[i] / total:6.1%}  {stmts[i].splitlines()[0][:110]}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="python -m bench.cnn")
    ap.add_argument("--profile", default="digits", help="model to profile: digits or rgb32")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    profile(a.profile, a.repeats)
