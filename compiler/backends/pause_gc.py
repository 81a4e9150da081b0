"""Compiling without Python's cyclic garbage collector.

A compile allocates hundreds of thousands of small objects (SymPy expressions, nodes, strings)
and frees almost none until it ends, so the collector's passes over a heap that SymPy's caches
make large find nothing to free: they were an eighth of the time to compile a 12-block
transformer (issue 13, item 8). ``paused`` turns the collector off for the duration of a call
and back on after (only if it was on: a caller that turned it off keeps it off).
"""
from __future__ import annotations

import functools
import gc


def paused(fn):
    """Decorator: run ``fn`` with the cyclic garbage collector off."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_on = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_on:
                gc.enable()
    return wrapper
