"""Reductions of one input: ``sum`` over the axes of attr ``axes`` (a sorted tuple of ints),
``mean`` over every axis (to a scalar; no attrs)."""
from __future__ import annotations

from compiler.core import ir
from compiler.core.ir import ARG, make, size_of
from compiler.core.ops import Op, linear_jvp, register
from compiler.errors import ShapeError


def reduce_sum(a, axes):
    axes = tuple(sorted(set(axes)))
    if not axes:
        return a
    shape = tuple(d for i, d in enumerate(a.shape) if i not in axes)
    if a.op == "ew" and all(i.shape == () for i in a.inputs):
        # the sum of a broadcast scalar is the scalar times the number of terms
        count = size_of(tuple(a.shape[i] for i in axes))
        return ir.ew(a.attr("expr") * count, a.inputs, shape=shape)
    return make("sum", (a,), shape, (("axes", axes),))


def mean(a):
    return make("mean", (a,), ())


# ---- sum ----------------------------------------------------------------------------------

def _sum_adjoint(node, g, wants):
    x = node.inputs[0]
    axes = node.attr("axes")
    keep = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    try:
        placed = ir.padded_to(g.shape, x.shape)
    except ShapeError:
        placed = None
    if placed != keep:
        g = ir.reshape(g, keep)
    return [ir.ew(ARG[0], [g], shape=x.shape)]


def _whole(node):
    return len(node.attr("axes")) == len(node.inputs[0].shape)


def _sum_text(node, a, fm):
    if _whole(node):
        return f"sum({a[0]})"
    axes = node.attr("axes")
    return f"sum({a[0]}, axis={axes[0] if len(axes) == 1 else axes})"


def _sum_latex(node, a, fm):
    if _whole(node):
        return rf"\sum {a[0]}"
    return rf"\sum_{{\mathrm{{axis}}\,{','.join(map(str, node.attr('axes')))}}} {a[0]}"


def _einsum(st, node):
    """The sum over the last axis, or over all axes but the last, of a product ``c*a*b`` as
    ``c*np.einsum(...)``: no array of the product (a layer norm's row variance, the softmax
    adjoint's row sums, a norm's scale gradient). None for other sums."""
    x = node.inputs[0]
    axes, rank = node.attr("axes"), len(x.shape)
    terms = st.product_terms(x) if rank >= 2 and st.large(x) else None
    if terms is None or rank > 8 or axes not in ((rank - 1,), tuple(range(rank - 1))):
        return None
    coeff, operands = terms
    coeff = None if coeff is None else ("-" if coeff == "-1" else coeff + "*")
    if len(operands) == 1:       # c*a: the sum of a, times c (no array of c*a)
        if _short_rows(x, axes):
            return [f"{st.name(node)} = {coeff or ''}np.einsum('...i->...', {operands[0]})"]
        ax = axes[0] if len(axes) == 1 else axes
        return [f"{st.name(node)} = {coeff or ''}{operands[0]}.sum(axis={ax})"]
    letters = "abcdefgh"[:rank]
    kept = letters[:-1] if axes == (rank - 1,) else letters[-1]
    spec = f"{letters},{letters}->{kept}"
    code = f"np.einsum({spec!r}, {operands[0]}, {operands[1]})"
    return [f"{st.name(node)} = {coeff or ''}{code}"]


def _short_rows(x, axes):
    """Whether a sum of ``x`` is over its last axis alone, of at most 1024 numbers: NumPy's
    ``sum`` spends more on each short row than on its numbers (a layer norm's row sums of
    (n, T, 128) take 3 times as long as ``np.einsum('...i->...')``, which sums a short row
    as accurately)."""
    k = x.shape[-1] if x.shape else None
    return len(x.shape) >= 2 and tuple(axes) == (len(x.shape) - 1,) and isinstance(k, int) and k <= 1024


def _sum_numpy(st, node):
    x = node.inputs[0]
    out = st.name(node)
    axes = node.attr("axes")
    ax = "" if len(axes) == len(x.shape) else "axis=" + (str(axes[0]) if len(axes) == 1 else str(tuple(axes)))
    lines = _einsum(st, node)
    if lines is not None:
        return lines
    if _short_rows(x, axes) and st.large(x):
        return [f"{out} = np.einsum('...i->...', {st.ref(x, bare=True)})"]
    if st.computed(x):
        target = st.method_target(x)
        if len(x.shape) == 2 and axes == (0,) and target.isidentifier():
            # a bias gradient: the column sums as a product with ones (BLAS gemv, 2-3x faster)
            st.helpers.add("colsum")
            return [f"{out} = _colsum({target})"]
        return [f"{out} = {target}.sum({ax})"]
    return [f"{out} = np.sum({st.ref(x, bare=True)}{', ' + ax if ax else ''})"]


def _sum_c(st, node):
    (x,) = node.inputs
    axes = node.attr("axes")
    idx = st.idx_vars(x.shape)
    value = st.elem(x, idx)
    if len(axes) == len(x.shape):
        return st.block([f"{st.real} _s = {st.lit(0)};"] + st.loops(x.shape, [f"_s += {value};"]) +
                        [f"{st.target(node, [])} = _s;"])
    out_idx = [i for a, i in enumerate(idx) if a not in axes]
    keep = len(x.shape) - len(axes)
    if list(axes) == [len(x.shape) - 1] and isinstance(x.shape[-1], int):
        # the last axis: each row's sum in partial sums (CStatements.row_sum), in a block of
        # its own (its locals)
        lines = st.row_sum(int(x.shape[-1]), idx[-1], value) + [f"{st.target(node, out_idx)} = _s;"]
        return st.loops(x.shape[:keep], st.block(lines))
    if sorted(axes) == list(range(keep, len(x.shape))):
        # the trailing axes: each sum in a local, in the same order (a loop gcc vectorises;
        # an accumulation into memory stays scalar)
        inner = st.loops(x.shape[keep:], [f"_s += {value};"], idx[keep:])
        return st.loops(x.shape[:keep], [f"{st.real} _s = {st.lit(0)};", *inner,
                                         f"{st.target(node, out_idx)} = _s;"])
    zero = [f"for (size_t _i = 0; _i < {st.size_code(node.shape)}; _i++) {st.name(node)}[_i] = {st.lit(0)};"]
    return zero + st.loops(x.shape, [f"{st.target(node, out_idx)} += {value};"])


register(Op("sum", (reduce_sum,), _sum_adjoint, _sum_text, _sum_latex,
            statements={"numpy": _sum_numpy, "c": _sum_c}, reduction=True,
            jvp=linear_jvp(lambda node, t: reduce_sum(t, node.attr("axes")))))


# ---- mean ---------------------------------------------------------------------------------

def _mean_adjoint(node, g, wants):
    x = node.inputs[0]
    return [ir.ew(ARG[0] / size_of(x.shape), [g], shape=x.shape)]


def _mean_numpy(st, node):
    x = node.inputs[0]
    out = st.name(node)
    if st.computed(x):
        return [f"{out} = {st.method_target(x)}.mean()"]
    return [f"{out} = np.mean({st.ref(x, bare=True)})"]


def _mean_c(st, node):
    (x,) = node.inputs
    idx = st.idx_vars(x.shape)
    size = st.size_code(x.shape)
    real = st.real
    count = (f"({real})n" if size == "n" else f"({real})({size})") if size != "1" else st.lit(1)
    return st.block([f"{real} _s = {st.lit(0)};"] + st.loops(x.shape, [f"_s += {st.elem(x, idx)};"]) +
                    [f"{st.target(node, [])} = _s / {count};"])


register(Op("mean", (mean,), _mean_adjoint,
            text=lambda node, a, fm: f"mean({a[0]})",
            latex=lambda node, a, fm: rf"\operatorname{{mean}}\left({a[0]}\right)",
            statements={"numpy": _mean_numpy, "c": _mean_c}, reduction=True,
            jvp=linear_jvp(lambda node, t: mean(t))))
