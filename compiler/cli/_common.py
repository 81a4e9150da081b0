"""Helpers shared by the spec-driven subcommands (compile, show, check). Imports stay inside
functions: this module is imported while ``bpc --help`` builds its parser."""
from __future__ import annotations


def add_spec_argument(parser):
    parser.add_argument("spec", metavar="SPEC", help="model spec file (.toml or .json; see docs/spec.md)")


def load(path):
    """The Spec in ``path``; every problem is a SpecError (exit code 2) naming the file."""
    from compiler.spec.loader import load_spec
    return load_spec(path)




def write_error(path, e):
    from compiler.errors import BpcError
    reason = getattr(e, "strerror", None) or str(e)
    return BpcError(f"cannot write {path}: {reason}")
