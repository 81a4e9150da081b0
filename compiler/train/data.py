"""Reading training data for ``bpc train``: ``.npz`` archives and ``.csv`` tables.

``.npz``: one array per model input and target, named like them (``INPUTS`` then ``TARGETS``
of the generated module), batch-first. ``(n,)`` is accepted for a one-number-per-sample
array, and the per-sample axes are reshaped to the declared shape when the sizes agree
(``(n, 8, 8)`` images for a ``(64,)`` input, flat ``(n, 64)`` rows for an ``(8, 8, 1)`` image input).

``.csv`` (comma-separated, lines starting with ``#`` ignored), either

* with a header row naming the columns: a one-number input or target ``x`` is the column
  ``x``; a vector ``x`` of size k is the columns ``x0 .. x{k-1}`` (or ``x_0``, or ``x[0]``).
  Every column must belong to an input or target (a typo is an error, not ignored); or
* without a header: the inputs' columns first, in the order of INPUTS, then the targets'
  columns, in the order of TARGETS; the row width must be exactly the sum of their sizes.

A target of integer class labels is one column of integers.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from compiler.train.loop import TrainError, check_data, data_names, read_npz

MAX_COLUMNS = 100_000


def load_data(path, module, what="data"):
    """The arrays of the data file ``path`` for ``module``, checked (see ``train.check_data``)."""
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"{path}: no such file" if not p.exists() else f"{path}: not a file")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        arrays = _load_npz(p)
    elif suffix == ".csv":
        arrays = _load_csv(p, module)
    else:
        raise TrainError(f"{path}: data must be a .npz or .csv file (see docs/training.md)")
    return check_data(module, arrays, what=f"{path}")


def _load_npz(p):
    return read_npz(p)


def _sizes(module):
    """name -> (per-sample shape, column count) in the order of INPUTS then TARGETS."""
    kinds = getattr(module, "TARGET_KINDS", {})
    out = {}
    for name in data_names(module):
        shape = tuple(module.INPUTS.get(name, module.TARGETS.get(name)))
        shape = () if kinds.get(name) == "label" else shape
        out[name] = (shape, math.prod(shape))
    return out


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _load_csv(p, module):
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = [(i, row) for i, row in enumerate(csv.reader(f), start=1)
                    if row and not row[0].lstrip().startswith("#") and any(c.strip() for c in row)]
    except UnicodeDecodeError:
        raise TrainError(f"{p}: not a text CSV file (not UTF-8)") from None
    except csv.Error as e:
        raise TrainError(f"{p}: malformed CSV ({e})") from None
    except OSError as e:
        raise TrainError(f"{p}: cannot read ({e.strerror or e})") from None
    if not rows:
        raise TrainError(f"{p}: no data rows")
    sizes = _sizes(module)
    width = sum(k for _, k in sizes.values())
    line, first = rows[0]
    header = None
    if not all(_is_number(c) for c in first):
        header = [c.strip() for c in first]
        rows = rows[1:]
        if not rows:
            raise TrainError(f"{p}: a header but no data rows")
    if len(rows[0][1]) > MAX_COLUMNS:
        raise TrainError(f"{p}: more than {MAX_COLUMNS} columns")
    if header is not None:
        columns = _columns_from_header(p, header, sizes)
    else:
        if len(first) != width:
            layout = ", ".join(f"{n} ({k} column{'s' if k != 1 else ''})" for n, (_, k) in sizes.items())
            raise TrainError(f"{p}: line {line} has {len(first)} columns; without a header the model needs "
                             f"{width}: {layout}, in that order (or add a header row naming them)")
        columns, start = {}, 0
        for name, (_, k) in sizes.items():
            columns[name] = list(range(start, start + k))
            start += k
    ncols = len(header) if header is not None else width
    values = np.empty((len(rows), ncols), dtype=np.float64)
    for r, (line, row) in enumerate(rows):
        if len(row) != ncols:
            raise TrainError(f"{p}: line {line} has {len(row)} columns, expected {ncols}")
        for c, cell in enumerate(row):
            try:
                values[r, c] = float(cell)
            except ValueError:
                name = f" ({header[c]!r})" if header is not None else ""
                raise TrainError(f"{p}: line {line}, column {c + 1}{name}: "
                                 f"{cell.strip()[:40]!r} is not a number") from None
    out = {}
    for name, (shape, _) in sizes.items():
        block = values[:, columns[name]]
        out[name] = block.reshape((len(rows),) + shape)
    return out


def _columns_from_header(p, header, sizes):
    position = {}
    for c, h in enumerate(header):
        if not h:
            raise TrainError(f"{p}: header column {c + 1} is empty")
        if h in position:
            raise TrainError(f"{p}: header names column {h!r} twice")
        position[h] = c
    columns, used = {}, set()
    for name, (shape, k) in sizes.items():
        if k == 1 and name in position:
            columns[name] = [position[name]]
        else:
            for style in ("{}{}", "{}_{}", "{}[{}]"):
                names = [style.format(name, i) for i in range(k)]
                if all(n in position for n in names):
                    columns[name] = [position[n] for n in names]
                    break
            else:
                want = name if k == 1 else f"{name}0 .. {name}{k - 1}"
                raise TrainError(f"{p}: the header has no column(s) for {name!r} (expected {want}); "
                                 f"found {', '.join(header[:12])}{' ...' if len(header) > 12 else ''}")
        used.update(columns[name])
    extra = [h for c, h in enumerate(header) if c not in used]
    if extra:
        raise TrainError(f"{p}: column(s) {', '.join(map(repr, extra[:8]))} match no input or target of the "
                         f"model ({', '.join(sizes)}); remove them or rename them")
    return columns
