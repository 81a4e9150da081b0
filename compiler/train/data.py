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

The numbers are parsed by pandas' C reader when pandas is installed (``pip install
"bpc[fast-csv]"``), else by ``numpy.loadtxt`` (about 3x and 1.2x faster than a csv-module loop on a
45 MB file); when the fast reader refuses a file, the careful reader below finds the line and
column at fault and says so, so errors read the same either way.
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


def _rows(p):
    """(line number, cells) of the header and data rows, in order: comment lines (``#``) and
    blank lines are dropped."""
    with open(p, newline="", encoding="utf-8-sig") as f:
        for i, row in enumerate(csv.reader(f), start=1):
            if row and not row[0].lstrip().startswith("#") and any(c.strip() for c in row):
                yield i, row


def _read(p, read):
    """``read()``, with the faults of reading ``p`` as TrainErrors naming it."""
    try:
        return read()
    except UnicodeDecodeError:
        raise TrainError(f"{p}: not a text CSV file (not UTF-8)") from None
    except csv.Error as e:
        raise TrainError(f"{p}: malformed CSV ({e})") from None
    except OSError as e:
        raise TrainError(f"{p}: cannot read ({e.strerror or e})") from None


def _fast_values(p, skip_header, ncols):
    """The (rows, ncols) float64 table of a well-formed file, or None to let the careful reader
    explain what is wrong (the fast readers' own messages name no line or column we can trust).
    Comment and blank lines are dropped here, so that both readers see the same rows and neither
    accepts what the careful one refuses (a ``#`` after a number, for one)."""
    import io
    try:
        import pandas as pd
    except ImportError:
        pd = None
    lines = [line for line in p.read_text(encoding="utf-8-sig").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    lines = lines[1:] if skip_header else lines
    if not lines:
        return None
    body = io.StringIO("\n".join(lines))
    try:
        if pd is not None:
            values = pd.read_csv(body, header=None, comment=None, dtype=np.float64,
                                 engine="c").to_numpy(dtype=np.float64)
        else:
            values = np.loadtxt(body, delimiter=",", comments=None, dtype=np.float64, ndmin=2)
    except (ValueError, TypeError, IndexError):
        return None
    except Exception as e:                    # pandas' ParserError and EmptyDataError
        if type(e).__module__.startswith("pandas"):
            return None
        raise
    if values.ndim != 2 or values.shape[1] != ncols or np.isnan(values).any():
        return None                           # ragged rows and empty cells (NaN): the careful reader
    return values


def _load_csv(p, module):
    first_row = _read(p, lambda: next(_rows(p), None))
    if first_row is not None and len(first_row[1]) <= MAX_COLUMNS:
        sizes = _sizes(module)
        line, first = first_row
        header = None if all(_is_number(c) for c in first) else [c.strip() for c in first]
        if header is not None:
            columns = _columns_from_header(p, header, sizes)
        else:
            columns = _columns_in_order(p, line, first, sizes)
        values = _read(p, lambda: _fast_values(p, header is not None, len(first)))
        if values is not None and len(values):
            return _split(values, columns, sizes)
    return _load_csv_carefully(p, module)


def _columns_in_order(p, line, first, sizes):
    """Without a header: the inputs' columns, then the targets', in their order."""
    width = sum(k for _, k in sizes.values())
    if len(first) != width:
        layout = ", ".join(f"{n} ({k} column{'s' if k != 1 else ''})" for n, (_, k) in sizes.items())
        raise TrainError(f"{p}: line {line} has {len(first)} columns; without a header the model needs "
                         f"{width}: {layout}, in that order (or add a header row naming them)")
    columns, start = {}, 0
    for name, (_, k) in sizes.items():
        columns[name] = list(range(start, start + k))
        start += k
    return columns


def _split(values, columns, sizes):
    return {name: values[:, columns[name]].reshape((len(values),) + shape) for name, (shape, _) in sizes.items()}


def _load_csv_carefully(p, module):
    """Row by row with the csv module: slow, but names the line and column of every fault."""
    rows = _read(p, lambda: list(_rows(p)))
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
        columns = _columns_in_order(p, line, first, sizes)
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
    return _split(values, columns, sizes)


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
