"""Softmax cross-entropy of logits ``z`` against integer labels or one-hot/probability rows:
``xent`` (z, lse(z), y) -> (n,) per-sample losses, and its gradient ``xent_grad``
(z, lse, y, adj) -> (softmax(z) - onehot(y)) * adj, which only the backward graph holds.
Attr ``kind``: "label" (integer labels, shape (n,)) or "onehot" (rows of the logits' shape).
Logits of a sequence, (n, T, k), have a row per position: labels (n, T), losses (n, T)."""
from __future__ import annotations

import sympy as sp

from compiler.core import ir
from compiler.core.ir import ARG, N, format_shape, make
from compiler.core.ops import Op, first_order_only, register, tangent_sum
from compiler.core.ops.logsumexp import flat_rows, lse, rows
from compiler.errors import ShapeError


def xent(z, y, kind):
    rows(z, "softmax cross-entropy")
    if kind == "label" and y.shape != z.shape[:-1]:
        raise ShapeError(f"integer labels must have shape {format_shape(z.shape[:-1])}, got {format_shape(y.shape)}")
    if kind == "onehot" and y.shape != z.shape:
        raise ShapeError(f"one-hot targets must have the logits' shape {format_shape(z.shape)}, got {format_shape(y.shape)}")
    return make("xent", (z, lse(z), y), z.shape[:-1], (("kind", kind),))


def xent_grad(z, l, y, adj, kind):
    return make("xent_grad", (z, l, y, adj), z.shape, (("kind", kind),))


# ---- xent ---------------------------------------------------------------------------------

def _xent_adjoint(node, g, wants):
    z, l, y = node.inputs
    # the rule for z already includes the path through lse: (softmax(z) - onehot(y)) * g
    return [xent_grad(z, l, y, g, node.attr("kind")) if wants[0] else None, None, None]


def _xent_jvp(node, t):
    # xent = l - z[y] (labels) or l - sum(y*z) (rows), as a function of its inputs (z, l, y)
    z, l, y = node.inputs
    tz, tl, ty = t
    last = (len(z.shape) - 1,)
    parts = [tl]
    if tz is not None and node.attr("kind") == "label":
        # -tz[y] = sum((softmax(z) - onehot(y)) * tz) - sum(softmax(z) * tz), with the rows of
        # xent_grad (adjoint 1) as (softmax(z) - onehot(y))
        ones = ir.ew(1, [], shape=l.shape)
        parts.append(ir.reduce_sum(ir.ew(ARG[0] * ARG[3] - sp.exp(ARG[1] - ARG[2]) * ARG[3],
                                         [xent_grad(z, l, y, ones, "label"), z, l, tz], shape=z.shape), last))
    elif tz is not None:
        parts.append(ir.reduce_sum(ir.ew(-ARG[0] * ARG[1], [y, tz], shape=z.shape), last))
    if ty is not None:
        parts.append(ir.reduce_sum(ir.ew(-ARG[0] * ARG[1], [ty, z], shape=z.shape), last))
    return tangent_sum(parts, node.shape)


def _xent_text(node, a, fm):
    if node.attr("kind") == "label":
        return f"{a[1]} - {a[0]}[{a[2]}]"
    return f"{a[1]} - sum({a[2]}*{a[0]}, axis=1)"


def _xent_latex(node, a, fm):
    if node.attr("kind") == "label":
        return rf"{a[1]} - {a[0]}\left[{a[2]}\right]"   # (Z_{2}_{y} would be a double subscript)
    return rf"{a[1]} - \sum_j {a[2]} \odot {a[0]}"


def _xent_numpy(st, node):
    out = st.name(node)
    z, l, y = (st.ref(i) for i in node.inputs)
    if len(node.shape) > 1:      # a row per position of a sequence
        if node.attr("kind") == "label":
            return [f"{out} = {l} - np.take_along_axis({z}, {y}[..., None], axis=-1)[..., 0]"]
        return [f"{out} = {l} - np.sum({y} * {z}, axis=-1)"]
    if node.attr("kind") == "label":
        return [f"{out} = {l} - {z}[np.arange(n), {y}]"]
    return [f"{out} = {l} - np.sum({y} * {z}, axis=1)"]


def _flat_xent_c(st, node):
    z, l, y = node.inputs
    rows, k = flat_rows(st, z)
    out, zn = st.name(node), st.name(z)
    if node.attr("kind") == "label":
        return [f"for (size_t _i = 0; _i < {rows}; _i++) {out}[_i] = {st.name(l)}[_i] - {zn}[_i*{k} + (size_t){st.name(y)}[_i]];"]
    return [f"for (size_t _i = 0; _i < {rows}; _i++) {{",
            f"    {st.real} _s = {st.lit(0)};",
            f"    for (size_t _j = 0; _j < {k}; _j++) _s += {st.name(y)}[_i*{k} + _j] * {zn}[_i*{k} + _j];",
            f"    {out}[_i] = {st.name(l)}[_i] - _s;", "}"]


def _xent_c(st, node):
    z, l, y = node.inputs
    if len(node.shape) > 1:
        return _flat_xent_c(st, node)
    k = st.dims(z.shape)[1]
    li = st.elem(l, ["_i"])
    if node.attr("kind") == "label":
        return [f"for (size_t _i = 0; _i < n; _i++) {st.name(node)}[_i] = {li} - {st.name(z)}[_i*{k} + (size_t){st.name(y)}[_i]];"]
    return ["for (size_t _i = 0; _i < n; _i++) {",
            f"    {st.real} _s = {st.lit(0)};",
            f"    for (size_t _j = 0; _j < {k}; _j++) _s += {st.elem(y, ['_i', '_j'])} * {st.elem(z, ['_i', '_j'])};",
            f"    {st.name(node)}[_i] = {li} - _s;", "}"]


register(Op("xent", (xent,), _xent_adjoint, _xent_text, _xent_latex,
            statements={"numpy": _xent_numpy, "c": _xent_c}, jvp=_xent_jvp))


# ---- xent_grad ----------------------------------------------------------------------------

def _grad_jvp(node, t):
    # (exp(z - l) - onehot(y)) * g: linear in g; d exp(z - l) = exp(z - l) * (dz - dl)
    z, l, y, g = node.inputs
    tz, tl, ty, tg = t
    if ty is not None:
        raise ValueError("internal: softmax cross-entropy targets have no tangent")
    parts = [xent_grad(z, l, y, tg, node.attr("kind")) if tg is not None else None]
    inner = (ARG[2] if tz is not None else 0) - (ARG[3] if tl is not None else 0)
    if tz is not None or tl is not None:
        args = [z, l, tz if tz is not None else z, tl if tl is not None else l, g]
        parts.append(ir.ew(sp.exp(ARG[0] - ARG[1]) * inner * ARG[4], args, shape=z.shape))
    return tangent_sum(parts, node.shape)


def _constant_adjoint(fm, node):
    """The value of xent_grad's adjoint when it is an inline constant (the 1/n of a mean), else None."""
    g = node.inputs[3]
    return g.attr("expr") if g.uid in fm.p.inline and not g.inputs else None


def _grad_formula(node, a, fm, latex):
    if node.attr("kind") != "label":
        y = a[2]
    else:
        y = rf"\operatorname{{onehot}}\left({a[2]}\right)" if latex else f"onehot({a[2]})"
    if latex:
        core = rf"\left(\operatorname{{softmax}}\left({a[0]}\right) - {y}\right)"
    else:
        core = f"(softmax({a[0]}) - {y})"
    val = _constant_adjoint(fm, node)
    if val is not None:
        if val == 1:
            return core
        # SymPy places the factor: (...)/n, 2*(...)/n, (...)/(2*n); a hand-made "core/inv" read
        # n/2 as "/n/2", a quarter of the value
        c = sp.Symbol("_xent_core")
        if latex:
            out = sp.latex(val * c, symbol_names={c: core, N: "n"})
            # a fraction bar groups its numerator: no parentheses around it
            bare = core[len(r"\left("):-len(r"\right)")]
            return out.replace(rf"\frac{{{core}}}", rf"\frac{{{bare}}}")
        return sp.sstr(val * c).replace("_xent_core", core)
    return rf"{core} \odot {a[3]}" if latex else f"{core}*{a[3]}[{':' if len(node.shape) == 2 else '...'}, None]"


def _grad_numpy(st, node):
    out = st.name(node)
    zn, ln, yn, gn = node.inputs
    z, l, y = st.ref(zn), st.ref(ln), st.ref(yn)
    rows = ":" if len(node.shape) == 2 else "..."
    lines = [f"{out} = np.exp({z} - {l}[{rows}, None])"]
    if node.attr("kind") == "label" and len(node.shape) > 2:
        # the fresh array's rows as a 2-D view: one row per position of every sequence
        lines.append(f"{out}.reshape(-1, {node.shape[-1]})[np.arange({y}.size), {y}.reshape(-1)] -= 1")
    elif node.attr("kind") == "label":
        lines.append(f"{out}[np.arange(n), {y}] -= 1")
    else:
        lines.append(f"{out} -= {y}")
    if gn.uid in st.p.inline and not gn.inputs:
        value = st.constant(gn)
        if value != "1":
            lines.append(f"{out} *= {value}")
    else:
        lines.append(f"{out} *= {st.ref(gn)}[{rows}, None]")
    return lines


def _flat_grad_c(st, node):
    z, l, y, g = node.inputs
    rows, k = flat_rows(st, z)
    e = f"{st.exp()}({st.name(z)}[_i*{k} + _j] - {st.name(l)}[_i])"
    if node.attr("kind") == "label":
        e = f"{e} - ((size_t){st.name(y)}[_i] == _j ? {st.lit(1)} : {st.lit(0)})"
    else:
        e = f"{e} - {st.name(y)}[_i*{k} + _j]"
    scale = "" if g.uid in st.p.inline and not g.inputs and g.attr("expr") == 1 else f" * {st.source_flat(g, '_i')}"
    return [f"for (size_t _i = 0; _i < {rows}; _i++) {{",
            f"    for (size_t _j = 0; _j < {k}; _j++) {st.name(node)}[_i*{k} + _j] = ({e}){scale};", "}"]


def _grad_c(st, node):
    z, l, y, g = node.inputs
    if len(node.shape) > 2:
        return _flat_grad_c(st, node)
    k = st.dims(z.shape)[1]
    e = f"{st.exp()}({st.elem(z, ['_i', '_j'])} - {st.elem(l, ['_i'])})"
    if node.attr("kind") == "label":
        e = f"{e} - ((size_t){st.name(y)}[_i] == _j ? {st.lit(1)} : {st.lit(0)})"
    else:
        e = f"{e} - {st.elem(y, ['_i', '_j'])}"
    if g.uid in st.p.inline and not g.inputs and g.attr("expr") == 1:
        scale = ""
    else:
        scale = " * " + st.elem(g, st.operand_idx(g, node.shape, ["_i", "_j"]))
    return ["for (size_t _i = 0; _i < n; _i++) {",
            f"    for (size_t _j = 0; _j < {k}; _j++) {st.name(node)}[_i*{k} + _j] = ({e}){scale};", "}"]


register(Op("xent_grad", (xent_grad,), first_order_only,
            text=lambda node, a, fm: _grad_formula(node, a, fm, latex=False),
            latex=lambda node, a, fm: _grad_formula(node, a, fm, latex=True),
            statements={"numpy": _grad_numpy, "c": _grad_c}, jvp=_grad_jvp))
