"""Finds and renders the jinja2 templates (from a source checkout or an installed wheel)."""
from __future__ import annotations

import functools
from pathlib import Path

import jinja2

from compiler.freetext import FILTERS

_HERE = Path(__file__).resolve().parent.parent     # the compiler package
# a wheel carries them inside the package; a checkout (or editable install) beside it
_CANDIDATES = (_HERE / "templates", _HERE.parent / "templates")


def template_dir():
    for d in _CANDIDATES:
        if (d / "numpy_module.py.j2").is_file():
            return d
    raise FileNotFoundError("bpc templates not found (looked in " + ", ".join(map(str, _CANDIDATES)) + ")")


@functools.lru_cache(maxsize=None)
def environment():
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir())),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["pyrepr"] = repr
    # free text reaches generated files only through these (one per target: see freetext)
    env.filters.update(FILTERS)
    # the helpers that scalar functions call are defined in their table, not in the templates
    env.filters["scalar_helpers"] = _scalar_helpers
    return env


def _scalar_helpers(names, column, **values):
    # imported here: rendering the optimiser steps for training needs no SymPy
    from compiler.core.scalar_functions import helper_sources
    return helper_sources(names, column, **values)


def render(name, **context):
    return environment().get_template(name).render(**context)
