"""``reshape``: one input's elements in row-major order under a new shape (the node's own);
no attrs."""
from __future__ import annotations

import sympy as sp

from compiler.core import ir
from compiler.core.ir import format_shape, make, size_of
from compiler.core.ops import Op, linear_jvp, register
from compiler.errors import ShapeError


def reshape(a, shape):
    shape = tuple(shape)
    if shape == a.shape:
        return a
    if sp.simplify(size_of(shape) - size_of(a.shape)) != 0:
        raise ShapeError(f"cannot reshape {format_shape(a.shape)} to {format_shape(shape)}")
    if a.op == "ew" and not a.inputs:
        return ir.ew(a.attr("expr"), (), shape=shape)   # a constant stays a constant
    # a transposed vector has the same flat order as the vector: reshape the vector itself
    while a.op == "reshape" or (a.op == "transpose" and 1 in a.shape):
        a = a.inputs[0]
    if a.shape == shape:
        return a
    return make("reshape", (a,), shape)


def _adjoint(node, g, wants):
    return [reshape(g, node.inputs[0].shape)]


def _numpy(st, node):
    from compiler.core.ops.window_max import pooled_windows
    if pooled_windows(st, node) is not None:   # pool windows kept in image layout (window_max.py)
        return [f"{st.name(node)} = {st.ref(node.inputs[0])}   # in image layout"]
    return [f"{st.name(node)} = {st.ref(node.inputs[0])}.reshape({st.shape_code(node.shape)})"]


def _c(st, node):
    (a,) = node.inputs
    if node.uid in st.aliases:
        return [f"const {st.real} *const {st.name(node)} = {st.name(a)};  /* same data, new shape */"]
    # a scalar or inline source: copy element by element (row-major order is unchanged)
    return st.copy_flat(node, a)


register(Op("reshape", (reshape,), _adjoint,
            text=lambda node, a, fm: f"reshape({a[0]}, {format_shape(node.shape)})",
            latex=lambda node, a, fm: a[0],
            statements={"numpy": _numpy, "c": _c},
            jvp=linear_jvp(lambda node, t: reshape(t, node.shape))))
