"""The masks of attention scores, both ``where(keep, s, fill)`` with attr ``fill``:

``causal_mask``: one input s (..., T, T) of attention scores (query i, key j on the last two
axes) with every future entry, j > i, replaced by ``fill``.

``key_mask``: inputs s (n, ..., T) and m (n, T), the padding mask (1 keep, 0 padding); the
entries of s whose key j is padding in its sample, m[b, j] == 0, are replaced by ``fill``.

Attention fills with a large finite negative number (-1e9), not -inf: the max-subtracted
softmax of a row then never computes inf - inf (no NaN; a row of padding only is uniform), and
exp(fill - max) is exactly 0, so a masked key gets exactly zero weight and exactly zero
gradient. A selection, not arithmetic: ``s*m + fill*(1 - m)`` would read ``s + 1e9 - 1e9``
once SymPy expands it, and lose s's last seven digits. The adjoint of each is the same mask
with fill 0 (a masked entry does not depend on s); the mask m gets none (it is data).
"""
from __future__ import annotations

from compiler.core.ir import N, format_shape, make
from compiler.core.ops import Op, linear_jvp, register
from compiler.errors import ShapeError


def causal_mask(s, fill):
    if len(s.shape) < 2 or s.shape[-1] != s.shape[-2]:
        raise ShapeError(f"a causal mask needs square (queries, keys) scores on the last two axes, "
                         f"got {format_shape(s.shape)}")
    return make("causal_mask", (s,), s.shape, (("fill", float(fill)),))


def key_mask(s, m, fill):
    if len(s.shape) < 2 or s.shape[0] != N or m.shape != (N, s.shape[-1]):
        raise ShapeError(f"a key mask (n, T) of scores (n, ..., T): got scores {format_shape(s.shape)} "
                         f"and mask {format_shape(m.shape)}")
    return make("key_mask", (s, m), s.shape, (("fill", float(fill)),))


def _adjoint(node, g, wants):
    return [causal_mask(g, 0.0)]


def _key_adjoint(node, g, wants):
    return [key_mask(g, node.inputs[1], 0.0), None]


def _fill(node):
    f = node.attr("fill")
    return "0" if f == 0 else format(f, "g")      # -1e+09


def _numpy(st, node):
    T = node.shape[-1]
    (s,) = node.inputs
    if st.owned(s) and st.large(node):
        # the dead input updated in place: the future keys (j > i, off np.tri) get the fill
        return [f"{st.name(node)} = {st.ref(s)}",
                f"np.copyto({st.name(node)}, {_fill(node)}, where=~np.tri({T}, dtype=bool))"]
    # np.tri: True on and below the diagonal (j <= i)
    return [f"{st.name(node)} = np.where(np.tri({T}, dtype=bool), {st.ref(s)}, {_fill(node)})"]


def _c(st, node):
    # one loop nest over every axis, the score read element by element: a scaled score or a
    # softmax adjoint printed inside it (compiler.backends.c.backend.c_inline) costs no array
    (s,) = node.inputs
    idx = st.idx_vars(node.shape)
    keep = f"{idx[-1]} <= {idx[-2]}"
    return st.loops(node.shape, [f"{st.target(node, idx)} = {keep} ? {st.elem(s, idx)} : {st.lit(node.attr('fill'))};"])


def _key_numpy(st, node):
    s, m = node.inputs
    keys = ", ".join([":"] + ["None"] * (len(s.shape) - 2) + [":"])
    if st.owned(s) and st.large(node):
        return [f"{st.name(node)} = {st.ref(s)}",
                f"np.copyto({st.name(node)}, {_fill(node)}, where={st.ref(m)}[{keys}] == 0)"]
    return [f"{st.name(node)} = np.where({st.ref(m)}[{keys}] != 0, {st.ref(s)}, {_fill(node)})"]


def _key_c(st, node):
    s, m = node.inputs
    T = int(node.shape[-1])
    per = int(st.size_code(node.shape[1:]))       # entries per sample
    return [f"for (size_t _q = 0; _q < {st.size_code(node.shape)}; _q++) {{",
            f"    const size_t _b = _q / {per}, _j = _q % {T};",
            f"    {st.name(node)}[_q] = {st.source_flat(m, f'_b*{T} + _j')} != 0 ? {st.source_flat(s, '_q')} : "
            f"{st.lit(node.attr('fill'))};",
            "}"]


def _latex_fill(name, node, a):
    if node.attr("fill") == 0:
        return rf"\operatorname{{{name}}}\left({a}\right)"
    return rf"\operatorname{{{name}}}_{{{_fill(node)}}}\left({a}\right)"


register(Op("key_mask", (key_mask,), _key_adjoint,
            text=lambda node, a, fm: f"key_mask({a[0]}, {a[1]}, fill={_fill(node)})",
            latex=lambda node, a, fm: _latex_fill("mask", node, f"{a[0]},\\, {a[1]}"),
            statements={"numpy": _key_numpy, "c": _key_c},
            # a selection: the kept entries' tangents, zero where the fill is (a constant)
            jvp=linear_jvp(lambda node, t: key_mask(t, node.inputs[1], 0.0))))
register(Op("causal_mask", (causal_mask,), _adjoint,
            text=lambda node, a, fm: f"causal_mask({a[0]}, fill={_fill(node)})",
            latex=lambda node, a, fm: _latex_fill("causal", node, a[0]),
            statements={"numpy": _numpy, "c": _c},
            jvp=linear_jvp(lambda node, t: causal_mask(t, 0.0))))
