"""The op registry: one record per tensor op, holding everything bpc knows about it.

An op module (one per op or small family, beside this file) defines the op's graph
constructor (its shape rule), its adjoint rule, its formula in plain text and LaTeX, and its
statement for every backend, and registers them as one ``Op``. The reverse sweep
(``compiler.core.adjoints``), the formulas (``compiler.core.formulas``) and each backend's
statement emitter look ops up here; ``ir.<constructor>`` resolves to the constructors
registered here. tests/test_ops_registry.py fails when an op lacks a part, or a backend of
``compiler.backends.registry.BACKENDS`` lacks a statement for some op.

Backend statements are registered by name (``statements={"numpy": f, "c": g}``): each is
``f(emitter, node) -> list of code lines``, where the emitter is that backend's statement
printer (``NumpyStatements``, ``CStatements``) with the backend's shared helpers as methods;
op modules import nothing from the backends.

Adjoint rules get the forward node, the adjoint ``g`` of its output and which inputs want a
gradient; they return one adjoint contribution per input (None where there is none), built
from the same constructors as the forward graph, so the backward graph shares forward values.
Formula functions get the node, its operands' formulas (in the same notation) and the
``Formulas`` being printed.

Tangent (``jvp``) rules get the node and the tangent of each input (None where it is zero) and
return the node's tangent (None when zero), built from the same constructors: forward-mode
differentiation of any graph, forward or backward. ``compiler.core.tangents`` pushes them
through a gradient graph to get Hessian-vector products (forward over reverse);
tests/test_tangents.py fails when an op has none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from compiler.errors import UnsupportedError


@dataclass(frozen=True)
class Op:
    name: str
    constructors: tuple          # functions that build this op's nodes (ir.<function name>)
    adjoint: Callable            # (node, g, wants) -> contributions, one per input
    text: Callable               # (node, operands, formulas) -> plain-text right-hand side
    latex: Callable              # (node, operands, formulas) -> LaTeX right-hand side
    statements: Mapping = field(default_factory=dict)   # backend name -> (emitter, node) -> lines
    reduction: bool = False      # reduces its input whole: an elementwise input prints inline
    jvp: Callable = None         # (node, tangents of its inputs, None where zero) -> tangent or None


REGISTRY = {}
CONSTRUCTORS = {}


def register(op):
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name!r} is registered twice")
    for f in op.constructors:
        if f.__name__ in CONSTRUCTORS:
            raise ValueError(f"constructor {f.__name__!r} is registered twice")
        CONSTRUCTORS[f.__name__] = f
    REGISTRY[op.name] = op
    return op


def get(name):
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnsupportedError(f"no operation {name!r} is registered") from None


def statement(backend, node):
    """The printer of ``node``'s statement in ``backend``."""
    fn = get(node.op).statements.get(backend)
    if fn is None:
        raise UnsupportedError(f"the {backend} backend has no statement for operation {node.op!r}")
    return fn


def first_order_only(node, g, wants):
    """The adjoint of an op that only appears in gradients: bpc differentiates once."""
    raise UnsupportedError(f"no adjoint rule for operation {node.op!r}")


def tangent_sum(parts, shape):
    """The sum of the tangent contributions ``parts`` (None entries are zero), or None."""
    from compiler.core import ir
    from compiler.core.ir import ARG
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len(parts) == 1 and tuple(parts[0].shape) == tuple(shape):
        return parts[0]
    return ir.ew(sum(ARG[i] for i in range(len(parts))), parts, shape=shape)


def linear_jvp(build):
    """The tangent rule of an op linear in its first input: ``build(node, t0)`` (the op applied
    to the tangent, same attrs); zero when that tangent is."""
    def rule(node, t):
        return None if t[0] is None else build(node, t[0])
    return rule


def _register_all():
    """Import every op module of this package: each registers its ops (so adding an op is
    adding a module). In name order, so the registry's order does not depend on the file system."""
    import importlib
    import pkgutil
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")


_register_all()    # after the definitions above, which the op modules import
