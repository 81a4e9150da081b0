"""Data-parallel training on Dask against one process (issue 17, item 5).

One training step (``backward`` of the global batch plus the Adam update), float64 NumPy target,
for the digits MLP (examples/train_digits.toml, 64-256-10) and the digits CNN
(examples/cnn_digits.toml), at several global batch sizes, run three ways, interleaved round by
round (bench.timing): one single-threaded process; a LocalCluster of 1 and of 2 single-threaded
worker processes (compiler.train.distributed: shards scattered once, the parameters sent inside
each step's tasks, slice sums added on the workers, one update on the client).

Reported: time per step and samples/s (wall, median of the rounds), the speedup and scaling
efficiency of 2 workers over one process, the per-step overhead of Dask (1 worker minus one
process: the same arithmetic, plus scheduling and communication), and CPU seconds per step
(the client process, which hosts the scheduler, and each worker), which load from other
processes on a shared machine disturbs less than wall time (each process's idle background CPU,
measured over 2 s beforehand, is taken off in proportion to the wall time of the steps).

    python -m bench.dask_scaling [--rounds 5] [--steps 4] [--markdown FILE]
    python -m bench --only dask
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCHES = {"MLP 64-256-10": [32, 256, 1438], "CNN (cnn_digits)": [32, 256, 1438]}
if os.environ.get("BPC_BENCH_QUICK"):        # a smoke run
    BATCHES = {"MLP 64-256-10": [32], "CNN (cnn_digits)": [32]}
SPECS = {"MLP 64-256-10": "train_digits.toml", "CNN (cnn_digits)": "cnn_digits.toml"}


IDLE_SECONDS = 2.0


def _single_thread_env():
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"     # inherited by the spawned workers


def _load(spec_name):
    from compiler.backends.numpy.module import compile_model
    from compiler.spec.loader import load_spec
    from compiler.train.data import load_data
    spec = load_spec(ROOT / "examples" / spec_name)
    module = compile_model(spec.model, dtype="float64").load()
    data = load_data(ROOT / "examples" / "data" / "digits_train.npz", module)
    return module, data


class _Stepper:
    """One training step of a global batch (the next of a seeded shuffle), in one process
    (``gradients`` None) or through a DaskGradients."""

    def __init__(self, module, data, batch, gradients=None):
        from compiler.train.loop import update_steps
        self.module, self.data, self.batch, self.gradients = module, data, batch, gradients
        self.n = len(data["x"])
        self.params = module.init_params(seed=0)
        self.state = {}
        self.adam = update_steps().adam_step
        self.rng = np.random.default_rng(0)
        self.order, self.at = self.rng.permutation(self.n), 0

    def __call__(self):
        if self.at + self.batch > self.n:
            self.order, self.at = self.rng.permutation(self.n), 0
        index = self.order[self.at:self.at + self.batch] if self.batch < self.n else None
        self.at += self.batch
        if self.gradients is None:
            arrays = [a[index] for a in self.data.values()] if index is not None else list(self.data.values())
            value, grads = self.module.backward(self.params, *arrays)
        else:
            value, grads = self.gradients(self.params, index, {})
        self.adam(self.params, grads, self.state, lr=1e-3)
        return value


def _cpu(clients):
    """CPU seconds so far: this process (client and the LocalClusters' schedulers), and each
    worker of each client."""
    out = {"client": time.process_time()}
    for name, client in clients.items():
        for i, (_, t) in enumerate(sorted(client.run(time.process_time).items())):
            out[f"{name} worker {i + 1}"] = t
    return out


def run(rounds=5, steps=4, out=print):
    _single_thread_env()
    from threadpoolctl import threadpool_limits
    from distributed import Client, LocalCluster

    from bench.timing import measure
    from compiler.train.distributed import DaskGradients

    clusters, clients = {}, {}
    for w in (1, 2):
        clusters[w] = LocalCluster(n_workers=w, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   silence_logs=logging.CRITICAL)
        clients[w] = Client(clusters[w])
    rows, notes = [], []
    try:
        with threadpool_limits(1):
            for model, batches in BATCHES.items():
                module, data = _load(SPECS[model])
                for batch in batches:
                    grads = {w: DaskGradients(clients[w], module, data) for w in (1, 2)}
                    fns = {"one process": _Stepper(module, data, batch),
                           "dask 1 worker": _Stepper(module, data, batch, grads[1]),
                           "dask 2 workers": _Stepper(module, data, batch, grads[2])}
                    samples = measure(fns, rounds=rounds, warmup=1, target=0.05)
                    wall = {k: statistics.median(v) for k, v in samples.items()}
                    # CPU per step, each candidate alone for `steps` steps
                    cpu = {}
                    for name, fn in fns.items():
                        who = {"one process": {}, "dask 1 worker": {"1w": clients[1]},
                               "dask 2 workers": {"2w": clients[2]}}[name]
                        # the background CPU of each process (event loops, heartbeats, the
                        # workers' memory monitors) runs with the wall clock, which load from
                        # other processes stretches: its idle rate is measured and taken off
                        a = _cpu(who)
                        time.sleep(IDLE_SECONDS)
                        b = _cpu(who)
                        idle = {k: (b[k] - a[k]) / IDLE_SECONDS for k in a}
                        t0 = time.perf_counter()
                        for _ in range(steps):
                            fn()
                        wall_s = time.perf_counter() - t0
                        c = _cpu(who)
                        cpu[name] = {k: max(0.0, c[k] - b[k] - idle[k] * wall_s) / steps for k in a}
                    for g in grads.values():
                        g.close()
                    rows.append((model, batch, wall, cpu))
                    out(_row(rows[-1]))
    finally:
        for w in (1, 2):
            clients[w].close()
            clusters[w].close()
    return rows, notes


def _row(r):
    model, batch, wall, cpu = r
    one, d1, d2 = wall["one process"], wall["dask 1 worker"], wall["dask 2 workers"]
    w2 = [v for k, v in cpu["dask 2 workers"].items() if "worker" in k]
    return (f"| {model} | {batch} | {one * 1e3:.1f} | {d1 * 1e3:.1f} | {d2 * 1e3:.1f} | {batch / one:,.0f} | "
            f"{batch / d2:,.0f} | {one / d2:.2f}x ({100 * one / d2 / 2:.0f}%) | {(d1 - one) * 1e3:.1f} | "
            f"{cpu['one process']['client'] * 1e3:.1f} | {cpu['dask 2 workers']['client'] * 1e3:.1f} | "
            f"{' / '.join(f'{t * 1e3:.1f}' for t in w2)} |")


HEADER = ("| model | batch | ms/step one process | ms/step Dask 1 worker | ms/step Dask 2 workers | samples/s one "
          "process | samples/s 2 workers | speedup 2 workers (efficiency) | Dask overhead ms/step (1 worker - one "
          "process) | CPU ms/step one process | CPU ms/step client+scheduler (2 workers) | CPU ms/step per worker "
          "(2 workers) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def load_note():
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


def section(args, rows_out):
    """``python -m bench --only dask``."""
    before = load_note()
    lines = []
    rows, _ = run(rounds=max(3, min(getattr(args, "rounds", 5), 7)), out=lambda s: lines.append(s))
    text = HEADER + "\n" + "\n".join(lines) + f"\n\nMeasured under: {before} before, {load_note()} after."
    rows_out["dask"] = text
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.dask_scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps timed for CPU seconds")
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    before = load_note()
    print(HEADER, flush=True)
    lines = []
    run(args.rounds, args.steps, out=lambda s: (lines.append(s), print(s, flush=True)))
    after = load_note()
    print(f"\nMeasured under: {before} before, {after} after.")
    if args.markdown:
        Path(args.markdown).write_text(HEADER + "\n" + "\n".join(lines) + f"\n\nMeasured under: {before} before, "
                                       f"{after} after.\n")


if __name__ == "__main__":
    main()
