"""``permute``: the axes of one input in a new order (attr ``axes``, a permutation of
range(rank), as ``np.transpose(x, axes)``: axis i of the result is axis ``axes[i]`` of the
input). Multi-head attention splits (n, T, heads*dk) into heads (n, heads, T, dk) with it.
Its adjoint is the inverse permutation. NumPy prints a view (``x.transpose(axes)``); C copies.
"""
from __future__ import annotations

from compiler.core.ir import format_shape, make
from compiler.core.ops import Op, linear_jvp, register
from compiler.errors import ShapeError


def permute(a, axes):
    axes = tuple(int(i) for i in axes)
    if sorted(axes) != list(range(len(a.shape))):
        raise ShapeError(f"permute of {format_shape(a.shape)} needs a permutation of its {len(a.shape)} "
                         f"axes, got {axes}")
    if axes == tuple(range(len(axes))):
        return a
    if a.op == "permute":     # two permutations are one
        inner = a.attr("axes")
        return permute(a.inputs[0], tuple(inner[i] for i in axes))
    return make("permute", (a,), tuple(a.shape[i] for i in axes), (("axes", axes),))


def inverse(axes):
    out = [0] * len(axes)
    for i, a in enumerate(axes):
        out[a] = i
    return tuple(out)


def _adjoint(node, g, wants):
    return [permute(g, inverse(node.attr("axes")))]


def _numpy(st, node):
    return [f"{st.name(node)} = {st.ref(node.inputs[0])}.transpose({node.attr('axes')})"]


def _c(st, node):
    (a,) = node.inputs
    axes = node.attr("axes")
    idx = st.idx_vars(node.shape)
    src = ["0"] * len(axes)
    for i, ax in enumerate(axes):
        src[ax] = idx[i]
    return st.loops(node.shape, [f"{st.target(node, idx)} = {st.elem(a, src)};"])


def _text(node, a, fm):
    return f"{a[0]}.transpose({node.attr('axes')})"


def _latex(node, a, fm):
    return rf"\operatorname{{permute}}_{{{','.join(map(str, node.attr('axes')))}}}\left({a[0]}\right)"


register(Op("permute", (permute,), _adjoint, _text, _latex, statements={"numpy": _numpy, "c": _c},
            jvp=linear_jvp(lambda node, t: permute(t, node.attr("axes")))))
