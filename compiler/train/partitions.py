"""Distributed evaluation: the loss and accuracy of parameters over a dataset read as partitions
(``.npz`` or ``.csv`` files, each read by a Dask worker, never all of them by one process), equal
to compiler.train.loop.evaluate over the same rows concatenated, up to the order of the sums.

Every worker returns ``(samples, loss sum, correct count)`` of its partitions; the sums are
added by a tree of tasks on the workers, and the client divides once. CSV partitions share one
layout: the first one's header (or, without one, the inputs' then the targets' columns), which
every other must repeat; they are parsed with pandas where the worker has it, else numpy.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from compiler.spec.train_options import TrainError
from compiler.train import shipping
from compiler.train.loop import accuracy_result, data_names, scored_outputs


def partition_paths(spec):
    """The partition files of ``spec``: a directory (its .npz and .csv files), a glob pattern,
    one file, or a list of them; sorted, so that the order is the same on every run."""
    if isinstance(spec, (list, tuple)):
        out = [p for s in spec for p in partition_paths(s)]
    else:
        text = str(spec)
        if Path(text).is_dir():
            out = sorted(str(p) for p in Path(text).iterdir() if p.suffix.lower() in (".npz", ".csv"))
            if not out:
                raise TrainError(f"{text}: a directory without .npz or .csv partitions")
        elif any(c in text for c in "*?["):
            out = sorted(glob.glob(text))
            if not out:
                raise TrainError(f"{text}: no file matches")
        else:
            out = [text]
    for p in out:
        if not os.path.isfile(p):
            raise TrainError(f"{p}: no such file")
        if Path(p).suffix.lower() not in (".npz", ".csv"):
            raise TrainError(f"{p}: partitions must be .npz or .csv files")
    suffixes = {Path(p).suffix.lower() for p in out}
    if len(suffixes) > 1:
        raise TrainError("partitions must be all .npz or all .csv files, not a mix")
    return out


def layout(module, paths):
    """What a worker needs to read and check a partition: per-sample shapes (a label target:
    one integer per sample), which targets are labels, and for CSV the columns of each array."""
    kinds = getattr(module, "TARGET_KINDS", {})
    shapes = {n: (() if kinds.get(n) == "label" else tuple(module.INPUTS.get(n, module.TARGETS.get(n))))
              for n in data_names(module)}
    out = {"shapes": shapes, "labels": sorted(n for n in shapes if kinds.get(n) == "label"), "dtype": None,
           "header": None, "ncols": None, "columns": None}
    csvs = [p for p in paths if p.lower().endswith(".csv")]
    if csvs:
        from compiler.train import data as reader
        first = reader._read(Path(csvs[0]), lambda: next(reader._rows(Path(csvs[0])), None))
        if first is None:
            raise TrainError(f"{csvs[0]}: no data rows")
        sizes = reader._sizes(module)
        line, cells = first
        if all(reader._is_number(c) for c in cells):
            columns = reader._columns_in_order(Path(csvs[0]), line, cells, sizes)
            out["ncols"] = len(cells)
        else:
            out["header"] = [c.strip() for c in cells]
            columns = reader._columns_from_header(Path(csvs[0]), out["header"], sizes)
            out["ncols"] = len(cells)
        out["columns"] = {n: (columns[n], list(sizes[n][0])) for n in sizes}
    return out


def evaluate_partitions(module, params, partitions, client, stats=None):
    """``{"loss", "accuracy" (None for regression), "accuracies", "samples", "partitions"}`` (as
    compiler.train.loop.evaluate's, with the samples and partitions counted) of ``params`` over
    the partition files ``partitions`` (see partition_paths), each read and evaluated by a worker
    of ``client``, in inference mode (``stats``: a batchnorm model's running statistics)."""
    from compiler.train.distributed import _first_line, require_dask
    require_dask()
    paths = partition_paths(partitions)
    spec = layout(module, paths)
    rt = shipping.upload_runtime(client)
    payload = shipping.payload(module)
    workers = sorted(client.nthreads())
    if not workers:
        raise TrainError("the Dask cluster has no workers to evaluate on")
    failed = client.run(rt.check, payload, on_error="return")
    bad = [str(r) for r in failed.values() if isinstance(r, BaseException)]
    if bad:
        raise TrainError("cannot load the model on the Dask workers: " + "; ".join(bad))
    [payload_f] = client.scatter([payload], broadcast=True, hash=False)
    plain = {k: np.asarray(v) for k, v in params.items()}
    [params_f] = client.scatter([plain], broadcast=True, hash=False)
    scored = scored_outputs(module)
    parts = [client.submit(rt.partition_sums, payload_f, params_f, os.path.abspath(p), spec,
                           [(i, t, kind) for _, i, t, kind in scored], stats,
                           pure=False) for p in paths]
    while len(parts) > 1:
        pairs = [client.submit(rt.add, a, b, pure=False) for a, b in zip(parts[::2], parts[1::2])]
        parts = pairs + (parts[-1:] if len(parts) % 2 else [])
    try:
        n, total, correct = parts[0].result()
    except Exception as e:
        if type(e).__name__ == "PartitionError":
            _explain(module, str(e))
            raise TrainError(str(e)) from None
        raise TrainError(f"distributed evaluation failed: {type(e).__name__}: {_first_line(e)}") from None
    return {**accuracy_result(total / n, scored, [c / n for c in correct]), "samples": n,
            "partitions": len(paths)}


def _explain(module, message):
    """A partition a worker could not read: where the client can read the file too, its own
    reader names the line and column at fault (raises TrainError); else nothing."""
    path = message.split(": ", 1)[0]
    if os.path.isfile(path):
        from compiler.train.data import load_data
        load_data(path, module)
