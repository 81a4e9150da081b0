"""The test file that ``bpc compile --emit-test`` writes beside a generated module.

The file checks that module's gradients against central differences with numpy alone, so a
user who ships only the generated module can verify it on their own machine. Its checker is
``compiler/gradcheck.py``, copied in verbatim: one implementation serves ``bpc check``, the
Python API and every emitted test.
"""
from __future__ import annotations

import inspect

from compiler import gradcheck
from compiler.backends.templates import render

# A C module compiled for float32 computes in float32, so central differences need a larger step
# and looser bounds. A NumPy module computes in the parameters' precision: the check hands it
# float64 parameters, and float64 bounds hold (its DTYPE casts the data only).
_TOLERANCES = {
    "float64": dict(eps=1e-6, rtol=1e-5, atol=1e-8),
    "float32": dict(eps=1e-3, rtol=2e-2, atol=1e-3),
}


def _gradcheck_source():
    source = inspect.getsource(gradcheck)
    body = source.split('"""', 2)[2]                   # drop the module docstring
    body = body.replace("from __future__ import annotations\n", "", 1)
    return body.strip("\n")


def emitted_test_name(module_file: str) -> str:
    """``test_<module stem>.py`` for the module file ``<stem>.py``."""
    return f"test_{module_file[:-len('.py')]}.py"


def render_test(module_file: str, target: str, dtype: str | None, entries: int = 32) -> str:
    """The source of the test for the generated module ``module_file`` (a file name such as
    ``mlp_tanh.py``, imported from the test's own directory)."""
    single = target == "c" and dtype == "float32"
    tol = _TOLERANCES["float32" if single else "float64"]
    if single:
        note = ("The module computes in float32, so the differences use a step of "
                f"{tol['eps']:g} and a relative tolerance of {tol['rtol']:g}, and leave out the\n"
                "entries where a relu or max switches within the step (at most half of them).")
    else:
        note = (f"The module is checked in float64 (step {tol['eps']:g}, relative tolerance "
                f"{tol['rtol']:g}).")
    return render("module_test.py.j2", module_file=module_file, test_file=emitted_test_name(module_file),
                  target=target, entries=entries, tolerance_note=note,
                  gradcheck_source=_gradcheck_source(), cast=target == "c", dtype=dtype,
                  skip_kinks=single, **{k: repr(v) for k, v in tol.items()})
