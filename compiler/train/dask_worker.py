"""bpc's code on a Dask worker: load a generated module shipped as source (and, for the C
target, its built extension with the C source beside it), run ``backward`` on a slice of a
shard, add partial sums, and sum the loss and accuracy counts of an evaluation partition.

This file imports nothing of bpc and numpy only inside its functions: the client uploads it to
every worker as source text (``Client.upload_file``) and imports it there, so a worker needs
Python, dask.distributed and numpy (plus cffi for a C module, and a C compiler only when the
shipped extension does not load there), not bpc. Every function returns plain data (numbers,
dicts of ndarrays): nothing the client could not unpickle.
"""
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading

_MODULES = {}                 # payload digest -> the module loaded from it on this worker
_LOCK = threading.Lock()


def _worker():
    """(address, a directory of this worker's own) of the calling Dask worker."""
    try:
        from distributed import get_worker
        w = get_worker()
        return w.address, w.local_directory
    except Exception:         # not inside a worker (a direct call in a test)
        return "this process", tempfile.gettempdir()


def load(payload, here=None):
    """The generated module of ``payload`` (see compiler.train.shipping), loaded once per worker
    (``here``: this worker's address and directory, when get_worker cannot tell)."""
    digest = payload["digest"]
    module = _MODULES.get(digest)
    if module is None:
        with _LOCK:
            module = _MODULES.get(digest)
            if module is None:
                module = _MODULES[digest] = _load(payload, here or _worker())
    return module


def _load(payload, here):
    address, root = here
    where = f"dask worker {address}"
    try:
        import numpy  # noqa: F401
    except ImportError:
        raise RuntimeError(f"{where}: numpy is not installed there, and the generated module needs it "
                           "(pip install numpy on every worker)") from None
    name = payload["name"]
    if payload["target"] == "c":
        try:
            import _cffi_backend  # noqa: F401
        except ImportError:
            raise RuntimeError(f"{where}: cffi is not installed there; the model {name!r} is compiled for the "
                               "C target, whose extension needs cffi on every worker (pip install cffi; "
                               "or train the NumPy target)") from None
    directory = os.path.join(root, "bpc-modules", payload["digest"][:24])
    os.makedirs(directory, exist_ok=True)
    for filename, data in payload["files"].items():
        if hashlib.sha256(data).hexdigest() != payload["sha256"][filename]:
            raise RuntimeError(f"{where}: the shipped file {filename} of {name!r} arrived damaged")
        _write(os.path.join(directory, filename), data)
    path = os.path.join(directory, payload["entry"])
    try:
        return _import(path, f"{name}_{payload['digest'][:12]}")
    except ImportError as e:
        if payload["target"] != "c" or not payload.get("extension"):
            raise RuntimeError(f"{where}: cannot import the generated module {name!r}: {e}") from None
        # the extension built on the client does not load here (another platform, libc or
        # Python): build it again from the C source shipped beside it, as the wrapper does
        # when no extension is beside it (needs cffi and a C compiler on this worker)
        try:
            os.remove(os.path.join(directory, payload["extension"]))
        except OSError:
            pass
        try:
            return _import(path, f"{name}_{payload['digest'][:12]}")
        except ImportError as e2:
            raise RuntimeError(f"{where}: the C extension of {name!r} built on the client does not load there "
                               f"({e}), and rebuilding it there failed: {e2}") from None


def _write(path, data):
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _import(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def check(payload, dask_worker=None):
    """Load the module here (the client's check before a run, through Client.run, which passes
    ``dask_worker``): this worker's address."""
    here = (dask_worker.address, dask_worker.local_directory) if dask_worker is not None else None
    load(payload, here)
    return here[0] if here else _worker()[0]


def pid():
    return os.getpid()


# ---- training -------------------------------------------------------------------------------

def backward_slice(payload, params, shard, rows, mode):
    """``(m, m * loss, {name: m * gradient})`` of the ``rows`` of ``shard`` (a dict of arrays;
    ``rows`` None: all of them, in order): sums, so that partial results add up and the client
    divides once by the global batch size."""
    import numpy as np
    module = load(payload)
    arrays = list(shard.values()) if rows is None else [a[rows] for a in shard.values()]
    m = len(arrays[0])
    value, grads = module.backward(params, *arrays, **mode)
    return m, float(value) * m, {k: np.array(g, copy=True) * m for k, g in grads.items()}


def add(a, b):
    """The sum of two partial results (of backward_slice, or of partition_sums)."""
    if isinstance(a[-1], dict):
        return tuple(x + y for x, y in zip(a[:-1], b[:-1])) + ({k: a[-1][k] + b[-1][k] for k in a[-1]},)
    if isinstance(a[-1], list):     # partition_sums: a correct count per scored output
        return tuple(x + y for x, y in zip(a[:-1], b[:-1])) + ([x + y for x, y in zip(a[-1], b[-1])],)
    return tuple(x + y for x, y in zip(a, b))


# ---- evaluation -----------------------------------------------------------------------------

def partition_sums(payload, params, source, layout, scored, stats=None, chunk=8192):
    """``(samples, loss sum, correct counts)`` of one partition in inference mode, as
    compiler.train.loop.evaluate sums them: ``source`` a dict of arrays or the path of a .npz
    or .csv file, read here by ``layout`` (see compiler.train.partitions); ``scored`` the
    outputs whose accuracy counts, ``(output index or None, target index, kind)`` each (one
    count per entry; see compiler.train.loop.scored_outputs)."""
    import numpy as np
    module = load(payload)
    data = source if isinstance(source, dict) else read_partition(source, layout)
    arrays = _prepare(data, layout, source if isinstance(source, str) else "a partition")
    mode = {"stats": stats} if stats is not None else {}
    n, n_in = len(arrays[0]), len(module.INPUTS)
    total, correct = 0.0, [0.0] * len(scored)
    for lo in range(0, n, chunk):
        part = [a[lo:lo + chunk] for a in arrays]
        m = len(part[0])
        total += module.loss(params, *part, **mode) * m
        if scored:
            out = module.forward(params, *part[:n_in], **mode)
        for k, (i, t, kind) in enumerate(scored):
            pred, y = np.asarray(out if i is None else out[i]), part[t]
            if kind == "multiclass":     # (compiler.train.loop.count_correct: this file imports no bpc)
                labels = y if y.ndim == pred.ndim - 1 else np.argmax(y, axis=-1)
                correct[k] += float(np.sum(np.argmax(pred, axis=-1) == labels)) / max(1, labels[0].size)
            else:
                if pred.shape != y.shape and pred.size == y.size:
                    pred = pred.reshape(y.shape)
                correct[k] += float(np.sum((pred > 0.5) == (y > 0.5))) / max(1, y[0].size)
    return n, total, correct


class PartitionError(ValueError):
    """A partition that cannot be read as the model's data (the client explains it further)."""


def read_partition(path, layout):
    """The arrays of one partition file, named like the model's inputs and targets."""
    import numpy as np
    if not os.path.isfile(path):
        raise PartitionError(f"{path}: no such file on dask worker {_worker()[0]}")
    if path.lower().endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except Exception as e:
            raise PartitionError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return _read_csv(path, layout)


def _read_csv(path, layout):
    import io

    import numpy as np
    with open(path, encoding="utf-8-sig") as f:
        lines = [line for line in f.read().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise PartitionError(f"{path}: no data rows")
    header = [c.strip() for c in lines[0].split(",")]
    try:
        [float(c) for c in header]
        header = None
    except ValueError:
        lines = lines[1:]
    if header is not None:
        if layout["header"] is None or header != layout["header"]:
            raise PartitionError(f"{path}: its header differs from the first partition's")
    elif layout["header"] is not None:
        raise PartitionError(f"{path}: no header, but the first partition has one")
    try:
        try:
            import pandas as pd
            values = pd.read_csv(io.StringIO("\n".join(lines)), header=None, dtype=np.float64,
                                 engine="c").to_numpy(dtype=np.float64)
        except ImportError:
            values = np.loadtxt(io.StringIO("\n".join(lines)), delimiter=",", dtype=np.float64, ndmin=2)
    except Exception as e:
        raise PartitionError(f"{path}: malformed CSV ({type(e).__name__}: {e})") from None
    if values.ndim != 2 or values.shape[1] != layout["ncols"] or np.isnan(values).any():
        raise PartitionError(f"{path}: rows of another width than {layout['ncols']} columns, or empty cells")
    return {name: values[:, cols].reshape((len(values),) + tuple(shape))
            for name, (cols, shape) in layout["columns"].items()}


def _prepare(data, layout, where):
    """The arrays in the order of INPUTS then TARGETS, shaped and checked as
    compiler.train.loop.check_data does it (the same reshapes; finite values; integer labels)."""
    import math

    import numpy as np
    out, count = [], None
    for name, shape in layout["shapes"].items():
        if name not in data:
            raise PartitionError(f"{where}: no array named {name!r}")
        a, want = np.asarray(data[name]), tuple(shape)
        if a.ndim >= 1 and a.shape[1:] != want:
            if a.shape[1:] and want and math.prod(a.shape[1:]) == math.prod(want):
                a = a.reshape((a.shape[0],) + want)
            elif want == (1,) and a.ndim == 1:
                a = a.reshape(-1, 1)
            elif want == () and a.shape[1:] == (1,):
                a = a.reshape(-1)
        if a.ndim == 0 or a.shape[1:] != want or a.dtype.kind not in "biuf":
            raise PartitionError(f"{where}: array {name!r} must hold numbers of shape (samples,) + {want}, "
                                 f"got {a.dtype} {a.shape}")
        if count is not None and len(a) != count:
            raise PartitionError(f"{where}: arrays have different numbers of samples")
        count = len(a)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise PartitionError(f"{where}: array {name!r} holds NaN or Inf")
        if name in layout["labels"]:
            if a.dtype.kind == "f":
                if not np.array_equal(a, np.round(a)):
                    raise PartitionError(f"{where}: target {name!r} holds labels that are not integers")
                a = a.astype(np.int64)
        elif a.dtype.kind != "f":
            a = a.astype(np.float64)
        if layout["dtype"] and a.dtype.kind == "f":
            a = a.astype(layout["dtype"])
        out.append(a)
    if not count:
        raise PartitionError(f"{where}: no samples")
    return out


def ignore_interrupts():
    """SIGINT ignored by this worker process: the workers of bpc train's own LocalCluster share
    the terminal's process group, and Ctrl-C is for the client (it stops the run after its step)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return True
