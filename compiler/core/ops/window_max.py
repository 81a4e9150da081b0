"""The maximum over each window: ``window_max`` of windows p (m, k, c) -> (m, c), the largest
of the k entries of each (row, channel); no attrs. Its adjoint ``window_max_grad`` (p, g) ->
(m, k, c), which only the backward graph holds, routes each adjoint entry to the first
position of its window's maximum (the argmax; zero elsewhere), as max pooling does in every
framework. A max pooling layer is ``window_max`` of ``im2col`` rows seen as (m, k, c).
"""
from __future__ import annotations

from compiler.core import ir
from compiler.core.ir import ARG, format_shape, make
from compiler.core.ops import Op, first_order_only, register
from compiler.errors import ShapeError


def window_max(p):
    if len(p.shape) != 3:
        raise ShapeError(f"window max needs windows (rows, window size, channels), got {format_shape(p.shape)}")
    return make("window_max", (p,), (p.shape[0], p.shape[2]))


def window_max_grad(p, g):
    if len(p.shape) != 3 or tuple(g.shape) != (p.shape[0], p.shape[2]):
        raise ShapeError(f"window max gradient: windows {format_shape(p.shape)} and adjoint "
                         f"{format_shape(g.shape)} do not match")
    return make("window_max_grad", (p, g), p.shape)


def _adjoint(node, g, wants):
    return [window_max_grad(node.inputs[0], g)]


def _max_jvp(node, t):
    # the tangent at each window's (first) maximum: the windows' tangents weighted by the
    # argmax indicator, which is window_max_grad of an adjoint of ones
    (p,), (tp,) = node.inputs, t
    if tp is None:
        return None
    ones = ir.ew(1, [], shape=node.shape)
    return ir.reduce_sum(ir.ew(ARG[0] * ARG[1], [window_max_grad(p, ones), tp], shape=p.shape), (1,))


def pool_windows(st, pp):
    """Whether im2col ``pp``'s windows tile its image (kernel = stride, no padding, no pixel
    left over) and serve only a max pool: ``pp`` is reshaped to windows (m, k, c) used only by
    their window maximum and its adjoint, and each adjoint is reshaped to rows and added back
    by col2im of the same geometry. Then the NumPy statements keep the windows in image layout:
    ``pp`` is a view of the image (n, OH, kh, OW, kw, C), not im2col's copy, the adjoint is
    routed straight into an image, and col2im is a reshape (no copy, no permutation)."""
    if pp.op != "im2col" or pp.uid in st.outputs:
        return False
    (H, W, C), (kh, kw), stride, pads = (pp.attr(a) for a in ("image", "kernel", "stride", "pads"))
    if (kh, kw) != tuple(stride) or any(pads) or H % kh or W % kw:
        return False
    users = st.users.get(pp.uid, [])
    if len(users) != 1 or users[0].op != "reshape" or not _plain(st, users[0]):
        return False
    q = users[0]
    if tuple(q.shape) != (pp.shape[0], kh * kw, C):
        return False
    for u in st.users.get(q.uid, []):
        if u.op == "window_max" and _plain(st, u):
            continue
        if u.op != "window_max_grad" or u.inputs[0] is not q or u.inputs[1] is q or not _plain(st, u):
            return False
        after = st.users.get(u.uid, [])
        if len(after) != 1 or after[0].op != "reshape" or not _plain(st, after[0]):
            return False
        back = st.users.get(after[0].uid, [])
        if len(back) != 1 or back[0].op != "col2im" or any(
                back[0].attr(a) != pp.attr(a) for a in ("image", "kernel", "stride", "pads")):
            return False
        if not (_plain(st, back[0]) and st.private(back[0])):
            return False   # col2im is then a view of the adjoint's array: it must never be returned
    return True


def _plain(st, node):
    return node.uid not in st.outputs and node.uid not in st.p.inline


def pooled_windows(st, node):
    """For a reshape or col2im ``node``: the im2col whose windows ``pool_windows`` keeps in
    image layout, when ``node`` is the reshape of those windows, or the reshape or col2im of
    their adjoint; else None."""
    chain = []
    while node.op in ("reshape", "col2im", "window_max_grad") and len(chain) < 4:
        chain.append(node.op)
        node = node.inputs[0]
    ok = chain in (["reshape"], ["reshape", "window_max_grad", "reshape"],
                   ["col2im", "reshape", "window_max_grad", "reshape"])
    return node if ok and node.op == "im2col" and pool_windows(st, node) else None


def _keep(st, node):
    """The buffer name argument of the helper: the value's name when its array may live in a
    reused buffer (large and private: NumpyStatements.private), else nothing."""
    if st.large(node) and st.private(node):
        st.helpers.add("scratch")
        return f", {st.name(node)!r}"
    return ""


def _max_numpy(st, node):
    st.helpers.add("window_max")
    return [f"{st.name(node)} = _window_max({st.ref(node.inputs[0], bare=True)}{_keep(st, node)})"]


def _grad_numpy(st, node):
    p, g = node.inputs
    out = st.name(node)
    # (g may be the tangent rule's inline constant of ones: ref gives it as an array)
    st.helpers |= {"route_to_argmax", "window_max"}
    # the forward's window maximum of p, when this function has computed it (it is never
    # updated in place: window_max is not an op whose result a statement may overwrite)
    best = next((u for u in st.users.get(p.uid, []) if u.op == "window_max" and u.uid in st.emitted), None)
    keep = _keep(st, node)
    reuse = f", best={st.name(best)}" if best is not None else ""
    if reuse and not keep:
        keep = ", None"
    return [f"{out} = _route_to_argmax({st.ref(p, bare=True)}, {st.ref(g, bare=True)}{keep}{reuse})"]


def _argmax_loop(st, p, body):
    """Loops over (row, channel) finding ``_a``, the first index of the window's maximum ``_m``."""
    m, k, c = st.dims(p.shape)
    at = f"(_r*{k} + _k)*{c} + _c"
    return ["for (size_t _r = 0; _r < " + m + "; _r++)",
            f"for (size_t _c = 0; _c < {c}; _c++) {{",
            f"    {st.real} _m = {st.name(p)}[_r*{k}*{c} + _c];",
            "    size_t _a = 0;",
            f"    for (size_t _k = 1; _k < {k}; _k++) if ({st.name(p)}[{at}] > _m) {{ _m = {st.name(p)}[{at}]; _a = _k; }}",
            *["    " + line for line in body], "}"]


def _max_c(st, node):
    (p,) = node.inputs
    c = st.dims(p.shape)[2]
    return st.block(_argmax_loop(st, p, [f"{st.name(node)}[_r*{c} + _c] = _m;", "(void)_a;"]))


def _grad_c(st, node):
    p, g = node.inputs
    m, k, c = st.dims(p.shape)
    out = st.name(node)
    return st.block(_argmax_loop(st, p, [
        "(void)_m;",
        f"for (size_t _k = 0; _k < {k}; _k++) {out}[(_r*{k} + _k)*{c} + _c] = {st.lit(0)};",
        f"{out}[(_r*{k} + _a)*{c} + _c] = {st.elem(g, ['_r', '_c'])};"]))


register(Op("window_max", (window_max,), _adjoint,
            text=lambda node, a, fm: f"max({a[0]}, axis=1)",
            latex=lambda node, a, fm: rf"\max_{{\mathrm{{window}}}} {a[0]}",
            statements={"numpy": _max_numpy, "c": _max_c}, jvp=_max_jvp))
register(Op("window_max_grad", (window_max_grad,), first_order_only,
            text=lambda node, a, fm: f"route_to_argmax({a[1]}, {a[0]})",
            latex=lambda node, a, fm: rf"\operatorname{{route}}_{{\arg\max {a[0]}}}\left({a[1]}\right)",
            statements={"numpy": _grad_numpy, "c": _grad_c},
            jvp=lambda node, t: None if t[1] is None else window_max_grad(node.inputs[0], t[1])))
