"""Interleaved timing: every candidate is run in turn within each round (in a rotating order),
so that load from other processes on a shared machine hits all of them alike; the median over
rounds is kept."""
from __future__ import annotations

import statistics
import time


def calibrate(fn, target=0.02):
    """Calls per round so that one round of ``fn`` takes about ``target`` seconds."""
    fn()
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(10000, int(target / dt)))


def compare(fns, rounds=15, warmup=3, target=0.02, stat=statistics.median):
    """{name: median (or ``stat``) seconds per call} for the callables in ``fns``, timed interleaved."""
    return {name: stat(v) for name, v in measure(fns, rounds, warmup, target).items()}


def spread(samples):
    """(75th - 25th percentile) / median of one candidate's rounds: above ~0.2 the machine was
    too busy for its ratios to mean much (rerun)."""
    q = statistics.quantiles(samples, n=4)
    return (q[2] - q[0]) / statistics.median(samples)


def measure(fns, rounds=15, warmup=3, target=0.02, clock=time.perf_counter, cpu=None):
    """{name: [seconds per call in each round]} for the callables in ``fns``, timed interleaved
    (``clock``: wall time by default; ``time.process_time`` gives the CPU time of the process).
    ``cpu``: a dict to fill likewise with the process's CPU seconds per call (all its threads:
    a runtime that spins two cores for one second of wall time costs two)."""
    loops = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        loops[name] = calibrate(fn, target)
    samples = {name: [] for name in fns}
    if cpu is not None:
        cpu.update({name: [] for name in fns})
    names = list(fns)
    for r in range(rounds):
        # rotate the order, so that no candidate always runs right after the same one (another
        # runtime's worker threads may still be spinning), and settle each with one untimed call
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = fns[name], loops[name]
            fn()
            c0, t0 = time.process_time(), clock()
            for _ in range(n):
                fn()
            t1, c1 = clock(), time.process_time()
            samples[name].append((t1 - t0) / n)
            if cpu is not None:
                cpu[name].append((c1 - c0) / n)
    return samples


class threads_limited:
    """``with threads_limited(k, note, "section"):`` every candidate on ``k`` threads (None: the
    libraries' defaults): NumPy's BLAS (threadpoolctl), PyTorch's intra-op pool and XLA's (its
    flags are read when JAX starts its CPU backend: a JAX started earlier in the process keeps its
    threads, which is noted). On a shared 2-core machine, idle BLAS threads spin while other jobs
    hold the cores, and a call that takes 3 ms alone takes 70 ms of CPU: that measures the load,
    not the code."""

    def __init__(self, k, note=print, section=""):
        self.k, self.note, self.section, self.limit = k, note, section, None

    def __enter__(self):
        import os
        import sys
        if not self.k:
            return self
        flags = f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={self.k}"
        if "jax" in sys.modules:
            if flags not in os.environ.get("XLA_FLAGS", ""):
                self.note(f"{self.section}: JAX was started before this section and keeps its threads")
        else:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
        try:
            import torch
            torch.set_num_threads(self.k)
        except Exception:  # noqa: BLE001 - not installed
            pass
        from threadpoolctl import threadpool_limits
        self.limit = [threadpool_limits(self.k)]
        return self

    def again(self):
        """Limit as well the thread pools of libraries loaded since (a compiled C module's
        BLAS: threadpoolctl limits the libraries loaded when it is called)."""
        if self.k:
            from threadpoolctl import threadpool_limits
            self.limit.append(threadpool_limits(self.k))

    def __exit__(self, *exc):
        for limit in reversed(self.limit or []):
            limit.unregister()
        return False
