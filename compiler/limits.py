"""Memory limits checked before anything is allocated: a legal spec may still declare
parameters that no machine can hold (a dense layer of 10**6 x 10**6 is 7.3 TiB in float64).

Two bounds, both on an estimate from the parameters' shapes alone:

- a fixed cap on the parameters' memory (default 16 GiB, ``--max-param-memory`` on ``bpc
  compile``, ``check`` and ``train``), the same on every machine, so a spec compiles or not
  regardless of where;
- for the commands that allocate (``check``, ``train``), the machine's physical memory, against
  the parameters times the copies the command keeps (gradients, finite differences, optimizer
  state, the best parameters so far).
"""
from __future__ import annotations

import math
import os
import re

from compiler import dtypes
from compiler.errors import BpcError

DEFAULT_MAX_PARAM_BYTES = 16 * 1024**3
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


class MemoryLimitError(BpcError):
    """The arrays a model needs exceed a limit; the message gives the estimate."""


def parse_size(text):
    """Bytes from ``'16GiB'``, ``'500MB'``, ``'2e9'`` or ``'none'`` (no cap: returns None)."""
    t = str(text).strip().lower()
    if t in ("none", "off", "unlimited"):
        return None
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*(ki|mi|gi|ti|k|m|g|t)?b?", t)
    if not m:
        raise ValueError(f"not a size: {text!r} (write e.g. 16GiB, 500MB, 2e9 or none)")
    value = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"not a usable size: {text!r}")
    return int(value)


def format_bytes(n):
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def parameter_bytes(shapes, dtype=None):
    """[(name, shape, bytes)] for ``shapes`` (name -> shape, e.g. a generated module's PARAMS,
    or a Model's parameters), largest first; ``dtype`` None counts float64."""
    itemsize = dtypes.ITEMSIZE.get(dtype or dtypes.DEFAULT, 8)
    rows = [(name, tuple(int(d) for d in shape), math.prod(int(d) for d in shape) * itemsize)
            for name, shape in shapes.items()]
    return sorted(rows, key=lambda r: -r[2])


def model_shapes(model):
    return {p.name: p.shape for p in model.params}


def physical_memory():
    """Bytes of physical memory of this machine, or None when the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_parameter_memory(shapes, dtype=None, limit=DEFAULT_MAX_PARAM_BYTES, copies=None, what=""):
    """Raise MemoryLimitError, with the estimate and the largest parameters, when the parameters
    of ``shapes`` in ``dtype`` exceed ``limit`` bytes (None: no cap), or when ``copies`` of them
    (the arrays a command keeps at once) exceed this machine's physical memory."""
    rows = parameter_bytes(shapes, dtype)
    total = sum(r[2] for r in rows)
    name = dtype or dtypes.DEFAULT

    def detail():
        top = ", ".join(f"{n} {'x'.join(map(str, s)) or 'scalar'}: {format_bytes(b)}" for n, s, b in rows[:3])
        more = f", and {len(rows) - 3} more" if len(rows) > 3 else ""
        return f"{top}{more}"

    prefix = f"{what}: " if what else ""
    if limit is not None and total > limit:
        raise MemoryLimitError(
            f"{prefix}the parameters would need {format_bytes(total)} in {name} ({detail()}); the limit is "
            f"{format_bytes(limit)}. Make the layers smaller, or raise the limit with --max-param-memory "
            "if this machine has the memory")
    if copies:
        phys = physical_memory()
        if phys is not None and total * copies > phys:
            raise MemoryLimitError(
                f"{prefix}this needs about {format_bytes(total * copies)} ({copies} copies of "
                f"{format_bytes(total)} of {name} parameters: {detail()}), more than this machine's "
                f"{format_bytes(phys)} of memory")
    return total


def add_argument(parser):
    """The ``--max-param-memory SIZE`` option of the commands that check the limit."""
    def size(text):
        import argparse
        try:
            return parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parser.add_argument("--max-param-memory", metavar="SIZE", type=size, default=DEFAULT_MAX_PARAM_BYTES,
                        help="refuse a model whose parameters need more memory than SIZE, before "
                        "anything is allocated (default 16GiB; e.g. 500MB, 64GiB, none)")
