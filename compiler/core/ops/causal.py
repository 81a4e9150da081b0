"""``causal_mask``: one input s (..., T, T) of attention scores (query i, key j on the last two
axes) with every future entry, j > i, replaced by attr ``fill``: ``where(j <= i, s, fill)``.

Attention fills with a large finite negative number (-1e9), not -inf: the max-subtracted
softmax of a row then never computes inf - inf (no NaN), and exp(fill - max) is exactly 0, so a
future position gets exactly zero weight and exactly zero gradient. The adjoint is the same
mask with fill 0 (a masked entry does not depend on s).
"""
from __future__ import annotations

from compiler.core.ir import format_shape, make
from compiler.core.ops import Op, register
from compiler.errors import ShapeError


def causal_mask(s, fill):
    if len(s.shape) < 2 or s.shape[-1] != s.shape[-2]:
        raise ShapeError(f"a causal mask needs square (queries, keys) scores on the last two axes, "
                         f"got {format_shape(s.shape)}")
    return make("causal_mask", (s,), s.shape, (("fill", float(fill)),))


def _adjoint(node, g, wants):
    return [causal_mask(g, 0.0)]


def _fill(node):
    f = node.attr("fill")
    return "0" if f == 0 else repr(f)


def _numpy(st, node):
    T = node.shape[-1]
    # np.tri: True on and below the diagonal (j <= i)
    return [f"{st.name(node)} = np.where(np.tri({T}, dtype=bool), {st.ref(node.inputs[0])}, {_fill(node)})"]


def _c(st, node):
    (s,) = node.inputs
    T = int(node.shape[-1])
    out = st.name(node)
    lead = st.size_code(node.shape[:-2])
    return [f"for (size_t _q = 0; _q < {lead}; _q++)",
            f"for (size_t _i = 0; _i < {T}; _i++)",
            f"for (size_t _j = 0; _j < {T}; _j++) {{",
            f"    const size_t _at = (_q*{T} + _i)*{T} + _j;",
            f"    {out}[_at] = _j <= _i ? {st.source_flat(s, '_at')} : {st.lit(node.attr('fill'))};",
            "}"]


register(Op("causal_mask", (causal_mask,), _adjoint,
            text=lambda node, a, fm: f"causal_mask({a[0]}, fill={_fill(node)})",
            latex=lambda node, a, fm: (rf"\operatorname{{causal}}\left({a[0]}\right)" if node.attr("fill") == 0
                                       else rf"\operatorname{{causal}}_{{{_fill(node)}}}\left({a[0]}\right)"),
            statements={"numpy": _numpy, "c": _c}))
