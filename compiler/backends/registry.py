"""The table of backends: each is a renderer of a Lowered model (compiler.backends.lowering).

A backend registers its name, the element types it supports and where its renderer lives
(imported on first use, so that the NumPy target never loads the C backend, and the CLI can
list the backends without loading SymPy). Every op
(compiler.core.ops) carries a statement for each backend named here; tests/test_ops_registry.py
fails when one is missing.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from compiler import dtypes
from compiler.errors import ModelError


@dataclass(frozen=True)
class Backend:
    name: str
    dtypes: tuple            # element types it can compile for (None: follow the inputs)
    module: str              # the module of its renderer and statement emitter
    renderer: str            # render(lowered, **options) -> the compiled result

    def render(self, lowered, **options):
        return getattr(importlib.import_module(self.module), self.renderer)(lowered, **options)


BACKENDS = {
    "numpy": Backend("numpy", (None, *dtypes.NAMES), "compiler.backends.numpy.module", "render_numpy"),
    "c": Backend("c", dtypes.NAMES, "compiler.backends.c.backend", "render_c"),
}


def compile_for(backend, model, dtype=None, second_order=None, **options):
    """Lower ``model`` once and render it with ``backend`` (a name in BACKENDS). ``second_order``:
    also emit hvp and gnvp (None: the backend's default, on for numpy, off for c)."""
    if second_order is None:
        second_order = backend != "c"
    from compiler.backends.lowering import lower
    b = BACKENDS[backend]
    if dtype not in b.dtypes:
        raise ModelError(f"the {backend} backend needs dtype " + " or ".join(d for d in b.dtypes if d)
                         + f", not {dtype!r}")
    return b.render(lower(model, dtype, second_order), **options)
