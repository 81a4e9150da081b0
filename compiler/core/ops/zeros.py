"""``zeros_like``: zeros of one input's shape (and, in NumPy, dtype); no attrs. Only tangent
graphs hold it: the tangent of a concatenation whose parts do not all have one (data joined to
features) is the parts' tangents with zeros in place of the missing ones. Its value does not
depend on its input: a zero tangent; bpc differentiates tangent graphs no further (no
adjoint rule)."""
from __future__ import annotations

from compiler.core.ir import make
from compiler.core.ops import Op, first_order_only, register


def zeros_like(a):
    return make("zeros_like", (a,), a.shape)


def _numpy(st, node):
    return [f"{st.name(node)} = np.zeros_like({st.ref(node.inputs[0], bare=True)})"]


def _c(st, node):
    return [f"for (size_t _i = 0; _i < {st.size_code(node.shape)}; _i++) {st.name(node)}[_i] = {st.lit(0)};"]


register(Op("zeros_like", (zeros_like,), first_order_only,
            text=lambda node, a, fm: f"zeros_like({a[0]})",
            latex=lambda node, a, fm: r"\mathbf{0}",
            statements={"numpy": _numpy, "c": _c}, jvp=lambda node, t: None))
