"""``transpose``: the transpose of one 2-D input; no attrs."""
from __future__ import annotations

from compiler.core import ir
from compiler.core.ir import format_shape, make
from compiler.core.ops import Op, linear_jvp, register
from compiler.errors import ShapeError


def transpose(a):
    if len(a.shape) != 2:
        raise ShapeError(f"transpose needs a 2-D value, got {format_shape(a.shape)}")
    if a.op == "transpose":
        return a.inputs[0]
    if a.op == "ew" and not a.inputs:
        return ir.ew(a.attr("expr"), (), shape=a.shape[::-1])   # a constant stays a constant
    return make("transpose", (a,), a.shape[::-1])


def _adjoint(node, g, wants):
    return [transpose(g)]


def _numpy(st, node):
    return [f"{st.name(node)} = {st.ref(node.inputs[0])}.T"]


def _c(st, node):
    (a,) = node.inputs
    idx = st.idx_vars(node.shape)
    return st.loops(node.shape, [f"{st.target(node, idx)} = {st.elem(a, idx[::-1])};"])


register(Op("transpose", (transpose,), _adjoint,
            text=lambda node, a, fm: f"{a[0]}.T",
            latex=lambda node, a, fm: f"{a[0]}^{{\\top}}",
            statements={"numpy": _numpy, "c": _c},
            jvp=linear_jvp(lambda node, t: transpose(t))))
