"""Synchronous data-parallel training on Dask (``train(..., client=client)``, ``bpc train --workers N``
or ``--scheduler ADDRESS``).

The training set is cut into contiguous shards, one per worker, scattered once. The run itself
(seeds, shuffling, global mini-batches, clipping, the optimizer step, early stopping,
checkpoints) is compiler.train.loop's, unchanged: only the gradients of a global batch come from
here. Each step the parameters go to each worker once (inside its task); every worker runs
the generated ``backward`` on the rows of the batch that live in its shard and returns sums
(``m``, ``m * loss``, ``m * gradient`` for its ``m`` rows); the sums are added pairwise on the
workers (a tree of ``add`` tasks); the client receives one sum and divides by the batch size. So
the gradient is the single-process one up to the order of a few floating-point additions.

Faults: a worker that dies takes its shard with it. Its rows are scattered again from the
client's copy, split over the remaining workers, and only the lost slices are recomputed: the
step goes on. With no worker left (after ``grace`` seconds of waiting for one to join), the run
stops (``stopped == "workers_lost"``) keeping the parameters of the last complete step.
"""
from __future__ import annotations

import time
from concurrent.futures import CancelledError
from dataclasses import dataclass

import numpy as np

from compiler.spec.train_options import TrainError
from compiler.train import shipping


GRACE_SECONDS = 5.0   # how long a run without workers waits for one to join before it stops
CONNECT_SECONDS = 20  # how long --scheduler ADDRESS may take to answer
RETRIES = 5        # attempts of a step that fail while no worker of the run is lost


class WorkersLost(TrainError):
    """No Dask worker is left to train on."""


class _Lost(Exception):
    """A step lost a worker (or the data on it): recover and retry."""


@dataclass
class _Shard:
    lo: int             # its rows of the training set: lo .. hi - 1
    hi: int
    worker: str
    future: object      # the scattered dict of arrays

    def rows(self, index):
        """The batch rows (``index``: global row numbers) in this shard, as local row numbers in
        the batch's order; None for all of them in order (a full batch)."""
        if index is None:
            return None
        local = index[(index >= self.lo) & (index < self.hi)] - self.lo
        if len(local) == self.hi - self.lo and np.array_equal(local, np.arange(len(local))):
            return None
        return local


def require_dask():
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise TrainError('training on Dask needs dask.distributed: pip install "bpc[dask]" '
                         '(or pip install "dask[distributed]")') from None


class DaskGradients:
    """``gradients(params, index, mode) -> (loss, grads)`` of the global batch ``index`` (rows of
    ``train_set``; None: all), computed on the workers of ``client``."""

    def __init__(self, client, module, train_set, warn=None, grace=None, poll=0.5):
        require_dask()
        if getattr(module, "STATS", None):
            raise TrainError("a model with batch normalisation cannot train on Dask yet: its batch statistics "
                             "would be each worker's slice's, not the global batch's; train it in one process")
        if getattr(module, "DROPOUT", None) and warn is not None:
            warn("dask-dropout", "dropout on Dask draws each worker slice's masks from (seed, epoch, step, "
                 "shard): a run as reproducible as in one process, but not the same masks")
        self.client, self.poll = client, poll
        self.grace = GRACE_SECONDS if grace is None else grace
        self.warn = warn or (lambda key, text: None)
        self.rt = shipping.upload_runtime(client)
        self.payload = shipping.payload(module)
        self.data = train_set                 # the client's copy: shards of lost workers come from it
        self.n = len(next(iter(train_set.values())))
        self.events = []                      # what happened to workers, in words
        self.steps = 0
        workers = self._workers(wait=True)
        self._check(workers)
        [self.payload_f] = client.scatter([self.payload], workers=workers, broadcast=True, hash=False)
        self.shards = []
        bounds = np.linspace(0, self.n, min(len(workers), self.n) + 1).round().astype(int)
        for (lo, hi), worker in zip(zip(bounds[:-1], bounds[1:]), workers):
            self.shards.append(self._scatter(int(lo), int(hi), worker))

    # ---- the cluster ------------------------------------------------------------------------

    def _workers(self, wait=False):
        workers = sorted(self.client.nthreads())
        if not workers and wait:
            try:
                self.client.wait_for_workers(1, timeout=self.grace)
            except Exception:            # dask's TimeoutError
                pass
            workers = sorted(self.client.nthreads())
        return workers

    def _check(self, workers):
        """Load the module on every worker first: a worker without numpy, cffi or a compiler is a
        clear error before the run, not a traceback in its middle."""
        out = self.client.run(self.rt.check, self.payload, workers=workers, on_error="return")
        bad = {w: r for w, r in out.items() if isinstance(r, BaseException)}
        if bad:
            raise TrainError("cannot load the model on the Dask workers: " + "; ".join(
                str(r) if "dask worker" in str(r) else f"{w}: {type(r).__name__}: {r}" for w, r in sorted(bad.items())))

    def _scatter(self, lo, hi, worker):
        part = {k: a[lo:hi] for k, a in self.data.items()}
        [future] = self._send([part], [worker])
        return _Shard(lo, hi, worker, future)

    def _send(self, data, workers, broadcast=False):
        """client.scatter; a worker that died meanwhile is a _Lost (the scheduler answers with a
        KeyError for a worker it has removed, the connection with CommClosedError)."""
        try:
            return self.client.scatter(data, workers=workers, broadcast=broadcast, hash=False)
        except (KeyError, OSError, TimeoutError, CancelledError) as e:
            raise _Lost(f"sending data failed ({type(e).__name__}: {_first_line(e)})") from None

    # ---- a step -----------------------------------------------------------------------------

    def __call__(self, params, index, mode, where=""):
        params = {k: np.asarray(v) for k, v in params.items()}     # plain arrays (the C Params is the module's)
        done, lost, retries = {}, None, 0
        while True:
            try:
                if lost is not None:
                    if not self._recover(lost, where):
                        retries += 1        # nothing of ours lost (the scheduler may not know yet)
                        if retries > RETRIES:
                            raise TrainError(f"the Dask cluster keeps failing at {where or 'a step'}: {lost}")
                        time.sleep(0.2 * retries)
                result = self._attempt(params, index, mode, done)
                self.steps += 1
                return result
            except _Lost as e:
                lost = str(e)

    def _attempt(self, params, index, mode, done):
        client = self.client
        workers = sorted({s.worker for s in self.shards})
        # the parameters travel inside the tasks (through the scheduler, one copy per worker):
        # a scatter to a worker that has just died can hang, a task on it only fails
        parts = []
        for i, s in enumerate(self.shards):
            rows = s.rows(index)
            if rows is not None and not len(rows):
                continue
            key = (s.lo, s.hi, s.worker)
            f = done.get(key)
            if f is None or f.status != "finished":
                m = dict(mode)
                if "seed" in m:                  # dropout: masks per slice (see the warning)
                    m["seed"] = (*m["seed"], s.lo)
                f = client.submit(self.rt.backward_slice, self.payload_f, params, s.future, rows, m,
                                  workers=[s.worker], allow_other_workers=False, pure=False)
                done[key] = f
            parts.append(f)
        while len(parts) > 1:              # the tree reduce, on the workers
            pairs = [client.submit(self.rt.add, a, b, pure=False) for a, b in zip(parts[::2], parts[1::2])]
            parts = pairs + (parts[-1:] if len(parts) % 2 else [])
        m, loss_sum, grads = self._result(parts[0], workers)
        return loss_sum / m, {k: g / m for k, g in grads.items()}

    def _result(self, future, workers):
        from distributed import wait
        while True:
            try:
                wait([future], timeout=self.poll)
                break
            except CancelledError as e:            # lost dependencies: a worker died with its shard
                raise _Lost(_first_line(e)) from None
            except TimeoutError:
                alive = set(self.client.nthreads())
                gone = [w for w in workers if w not in alive]
                if gone:
                    raise _Lost(f"worker {', '.join(gone)} left") from None
        if future.status == "error":
            exc = future.exception()
            if type(exc).__name__ in ("KilledWorker", "CommClosedError") or isinstance(exc, CancelledError):
                raise _Lost(f"{type(exc).__name__}: {exc}")
            raise TrainError(f"a Dask worker failed: {type(exc).__name__}: {exc}") from None
        try:
            return future.result()
        except CancelledError as e:
            raise _Lost(_first_line(e)) from None

    def _recover(self, reason, where):
        alive = self._workers(wait=True)
        if not alive:
            ours = sorted({s.worker for s in self.shards})
            raise WorkersLost(f"no Dask worker left{f' at {where}' if where else ''} (lost {', '.join(ours)}; "
                              f"none joined within {self.grace:g} s); stopped and kept the parameters of the last "
                              "complete step")
        lost = [s for s in self.shards if s.worker not in alive or s.future.status != "finished"]
        if not lost:                       # nothing of ours was lost: the step simply runs again
            return False
        if self.payload_f.status != "finished":
            [self.payload_f] = self._send([self.payload], alive, broadcast=True)
        keep = [s for s in self.shards if s not in lost]
        moved = []
        for s in lost:
            bounds = np.linspace(s.lo, s.hi, min(len(alive), s.hi - s.lo) + 1).round().astype(int)
            for (lo, hi), worker in zip(zip(bounds[:-1], bounds[1:]), alive):
                moved.append(self._scatter(int(lo), int(hi), worker))
        self.shards = sorted(keep + moved, key=lambda s: s.lo)
        gone = sorted({s.worker for s in lost} - set(alive))
        rows = ", ".join(f"{s.lo}..{s.hi - 1}" for s in lost)
        event = (f"lost Dask worker {', '.join(gone) or '(its data)'} at {where or 'a step'}: its rows {rows} went "
                 f"to {', '.join(alive)}, which recomputed its slice; training goes on")
        self.events.append(event)
        self.warn(("dask-lost", len(self.events)), event)
        return True

    def close(self):
        """Release the shards and the module on the cluster."""
        # (dropping the futures releases them; Client.cancel of a scattered key can trip an
        # assertion in the scheduler of dask 2026.8 when its tasks are done)
        self.shards, self.payload_f = [], None


def _first_line(e):
    text = str(e).strip().splitlines()
    return " ".join(t.strip() for t in text[:3] if t.strip()) or type(e).__name__


def connect(workers=None, scheduler=None, threads=1):
    """A Client: of a new LocalCluster of ``workers`` single-threaded processes on this machine,
    or of the cluster whose scheduler listens at ``scheduler``. Returns (client, cluster or None)."""
    require_dask()
    import logging

    from distributed import Client, LocalCluster
    if scheduler:
        try:
            return Client(scheduler, timeout=f"{CONNECT_SECONDS}s"), None
        except Exception as e:
            raise TrainError(f"--scheduler {scheduler}: cannot connect to a Dask scheduler there "
                             f"({type(e).__name__}: {e})") from None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                           dashboard_address=":0", silence_logs=logging.CRITICAL)
    client = Client(cluster)
    # the workers share the terminal's process group: Ctrl-C is the client's (the run stops
    # after its step and saves), not a kill of every worker
    client.run(shipping.upload_runtime(client).ignore_interrupts)
    return client, cluster
