"""The optimised BLAS of the C target: which one a build links, and how.

The generated C code calls ``cblas_sgemm``/``cblas_dgemm`` for its larger matrix products when
it is compiled with ``-DBPC_CBLAS`` (see ``templates/c_model.c.j2``), and its own loops
otherwise. bpc builds with the BLAS of the ``scipy-openblas32`` wheel (the ``cblas`` extra of
bpc) when that wheel is installed, and with the portable loops when it is not: the choice is
made at build time, and is part of the build's cache key.

The wheel ships ``libscipy_openblas.so`` (``.dylib`` on macOS), whose symbols carry the prefix
``scipy_`` (``scipy_cblas_dgemm``): the build passes ``-DBPC_CBLAS_PREFIX=scipy_``. The
extension links the library by its full path, with an rpath to the wheel's ``lib`` directory,
so that it loads on its own in a fresh interpreter, whatever the working directory or
``LD_LIBRARY_PATH``.

Threads: OpenBLAS starts with one thread per core. bpc never sets environment variables for
it; a module's ``blas_threads(k)`` calls the library's ``openblas_set_num_threads``, and
threadpoolctl (``threadpool_limits(1, "blas")``) finds and limits the library as well once it
is loaded (``preload()``).
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

# choices of CompiledC.build/load(blas=...)
CHOICES = ("auto", "none", "scipy-openblas32")


@dataclass(frozen=True)
class Blas:
    """A CBLAS the C target can link: its name and version, its shared library and symbol prefix."""

    name: str
    version: str
    library: str        # absolute path of the shared library
    prefix: str         # of every symbol (scipy_cblas_dgemm)

    @property
    def compile_flags(self):
        return ["-DBPC_CBLAS", f"-DBPC_CBLAS_PREFIX={self.prefix}", "-DBPC_OPENBLAS"]

    @property
    def link_flags(self):
        return [self.library, f"-Wl,-rpath,{os.path.dirname(self.library)}"]

    def key(self):
        """What identifies this BLAS in a build's cache key."""
        return f"{self.name} {self.version} {self.library}"


@functools.lru_cache(maxsize=None)
def find_scipy_openblas32():
    """The BLAS of the scipy-openblas32 wheel, or None when it is not installed (or has no
    shared library where it says)."""
    if sys.platform == "win32":
        return None
    try:
        import scipy_openblas32 as wheel
    except ImportError:
        return None
    except Exception:   # a broken installation: the portable loops still work
        return None
    try:
        path = os.path.join(wheel.get_lib_dir(), wheel.get_library(fullname=True))
    except Exception:   # (an older wheel without these functions: the portable loops)
        return None
    if not os.path.isfile(path):
        return None
    return Blas("scipy-openblas32", getattr(wheel, "__version__", "?"), path, "scipy_")


def choose(blas="auto"):
    """The Blas a build links for the choice ``blas`` ("auto": scipy-openblas32 if installed,
    else none; "none": the portable loops; "scipy-openblas32": that one, or an error), or None."""
    from compiler.errors import UnsupportedError
    if blas not in CHOICES:
        raise ValueError(f"blas must be one of {', '.join(map(repr, CHOICES))}, not {blas!r}")
    if blas == "none":
        return None
    found = find_scipy_openblas32()
    if found is None and blas == "scipy-openblas32":
        raise UnsupportedError("blas='scipy-openblas32' needs the scipy-openblas32 wheel (pip install "
                               "scipy-openblas32, or the 'cblas' extra of bpc); blas='auto' falls back to "
                               "the portable loops")
    return found


def preload():
    """Load the BLAS the C target links (if installed) into this process, so that threadpoolctl's
    limits, set before a C module is loaded, reach it too."""
    if find_scipy_openblas32() is not None:
        import scipy_openblas32  # noqa: F401  (its import dlopens the library, RTLD_GLOBAL)
