"""Spec files (TOML or JSON) -> Model: ``loader`` reads and checks them; ``safe_expr`` and
``safe_matrix_expr`` parse their expressions through an AST whitelist (nothing is evaluated)."""
from compiler.spec.loader import Spec, SpecError, load_spec, loads_spec, source_name

__all__ = ["Spec", "SpecError", "load_spec", "loads_spec", "source_name"]
