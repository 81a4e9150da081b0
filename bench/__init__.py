"""bpc benchmarks: ``python -m bench`` (see bench/README.md). Importing this package must not
import numpy: ``bench/__main__.py`` sets OPENBLAS_CORETYPE first."""
