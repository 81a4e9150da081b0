"""Entry point of ``python -m bench``: choose the OpenBLAS kernel, then run the benchmarks.

OpenBLAS reads OPENBLAS_CORETYPE once, when numpy is imported, so it is set here before any
import of numpy (see bench/README.md for why).
"""
import sys

from bench.cpu import choose_coretype

if __name__ == "__main__":
    choose_coretype(sys.argv[1:])
    from bench.run import main

    sys.exit(main(sys.argv[1:]))
