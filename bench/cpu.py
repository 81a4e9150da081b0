"""Machine facts the benchmarks depend on; no numpy import here (see choose_coretype)."""
from __future__ import annotations

import os
import platform


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


SKYLAKEX_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}


def choose_coretype(argv):
    """Set OPENBLAS_CORETYPE before numpy is imported.

    numpy's bundled OpenBLAS detects AMD Zen 4/5 (AVX-512) as Haswell and runs its AVX2
    kernels at about half speed; SKYLAKEX selects the AVX-512 kernels (1.6-1.9x on matrix
    products). On a CPU without AVX-512 that kernel dies with SIGILL, so it is chosen only when
    /proc/cpuinfo lists the AVX-512 subsets it needs. ``--coretype NAME`` forces a kernel,
    ``--coretype default`` leaves OpenBLAS's own detection; a value already in the environment
    is kept.
    """
    forced = None
    for i, a in enumerate(argv):
        if a == "--coretype" and i + 1 < len(argv):
            forced = argv[i + 1]
        elif a.startswith("--coretype="):
            forced = a.split("=", 1)[1]
    if forced == "default":
        os.environ.pop("OPENBLAS_CORETYPE", None)
    elif forced:
        if forced.upper() in ("SKYLAKEX", "COOPERLAKE", "SAPPHIRERAPIDS") and not SKYLAKEX_FLAGS <= cpu_flags():
            print(f"warning: this CPU does not list {', '.join(sorted(SKYLAKEX_FLAGS))}; "
                  f"OPENBLAS_CORETYPE={forced} may die with SIGILL", flush=True)
        os.environ["OPENBLAS_CORETYPE"] = forced
    elif "OPENBLAS_CORETYPE" not in os.environ and SKYLAKEX_FLAGS <= cpu_flags():
        os.environ["OPENBLAS_CORETYPE"] = "SKYLAKEX"
    return os.environ.get("OPENBLAS_CORETYPE", "default")
