"""Python operators on IR nodes: ``h + x``, ``h - x``, ``h * g``, ``h / g`` (elementwise, NumPy
broadcasting, numbers allowed on either side) and ``h @ W`` (the matrix product of 2-D values).

Anything else (an array, a list, a SymPy expression, a string) is refused with a ModelError
that says what to write instead: graph values combine only with graph values and numbers,
so that every number a model learns or reads is a declared parameter or input."""
from __future__ import annotations

import math
import numbers

import sympy as sp

from compiler.core import ir
from compiler.core.ir import ARG, Node, format_shape
from compiler.errors import ModelError, ShapeError

_EW = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def binary(op, a, b):
    """``a <op> b`` where at least one side is a Node."""
    for side in (a, b):
        if not isinstance(side, Node):
            _check_operand(op, side)
    if op == "@":
        if not (isinstance(a, Node) and isinstance(b, Node)):
            raise ModelError(f"@ is the matrix product of two values; to scale by a number write "
                             f"value * {a if not isinstance(a, Node) else b}")
        return ir.matmul(a, b)
    nodes = [s for s in (a, b) if isinstance(s, Node)]
    syms = iter(ARG[:len(nodes)])
    x, y = (next(syms) if isinstance(s, Node) else sp.Integer(int(s)) if isinstance(s, numbers.Integral)
            else sp.Float(float(s)) for s in (a, b))
    try:
        node = ir.ew(_EW[op](x, y), nodes)
    except ShapeError:
        shapes = [format_shape(s.shape) for s in nodes]
        raise ShapeError(f"{shapes[0]} {op} {shapes[1]}: the shapes do not broadcast; make them agree "
                         f"first (e.g. project one side with a dense layer to the other's width)") from None
    if node is None or (node.op == "ew" and node.attr("expr") == 0):
        raise ModelError(f"this {op} is identically zero: the result would carry no value and no gradient")
    return node


def _check_operand(op, v):
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        if not math.isfinite(v):
            raise ModelError(f"cannot use {v} in {op}: numbers in a model must be finite")
        return
    kind = type(v).__name__
    if isinstance(v, sp.Basic):
        hint = "to apply a formula write net.activation(value, expr) (an expression of x)"
    elif hasattr(v, "shape") or isinstance(v, (list, tuple)):
        hint = ("declare it as a parameter (net.param(name, shape, init)) or an input (net.input(name, "
                "size)) and combine the nodes")
    else:
        hint = "combine graph values with graph values (net.input, net.param, layers) or numbers"
    raise ModelError(f"cannot use a {kind} in {op} with a graph value; {hint}")
