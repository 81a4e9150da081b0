"""Image windows: ``im2col`` and its adjoint ``col2im``, the two halves of a convolution as one
matrix product.

``im2col`` takes an image batch x (n, H, W, C) (batch-first, channels last) and gives every
window of attr ``kernel`` (kh, kw), placed every ``stride`` (sh, sw) pixels over x zero-padded
by ``pads`` (top, bottom, left, right), as one row: shape (n*OH*OW, kh*kw*C), rows in (sample,
out row, out column) order, each row in (kernel row, kernel column, channel) order. A
convolution is then ``im2col(x) @ W`` with W (kh*kw*C, filters): one BLAS product.

``col2im`` (rows (n*OH*OW, kh*kw*C) -> an image of attr ``image`` (the per-sample (H, W, C)),
same attrs otherwise) adds every row back onto the pixels its window covers: the adjoint of
``im2col`` (a scatter-add), and ``im2col`` is the adjoint of ``col2im``.

NumPy statements are vectorised: ``sliding_window_view`` copied once for im2col, or, when the
rows are used only in matrix products (a convolution ``im2col(x) @ W`` and its weights'
adjoint ``im2col(x).T @ dZ``), not formed at all: each product copies the windows of a chunk
of samples into a small buffer that stays in cache (``convolved``). A convolution's input
adjoint ``col2im(dZ @ W.T)`` is computed as a transposed convolution (the windows of dZ times
the flipped kernel, chunked likewise; no scatter-add) when that copies at most 3 times the
product's size, else as one product per kernel offset, each added onto the image in one
vectorised add; other col2im by one vectorised add per kernel offset (never a loop over
samples or pixels).
C statements are plain loops.
"""
from __future__ import annotations

import numbers

from compiler.core.ir import N, format_shape, make
from compiler.core.ops import Op, linear_jvp, register
from compiler.errors import ShapeError

PADDINGS = ("valid", "same")


def pair(value, what):
    """``value`` (a positive int, or a pair of them) as (rows, columns); ShapeError otherwise."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0
                              for v in items):
        raise ShapeError(f"{what} must be a positive integer or a pair of them, got {value!r}")
    return tuple(int(v) for v in items)


def check_image(x, what):
    """Check that ``x`` is a batch of images (n, H, W, C)."""
    if len(x.shape) != 4 or x.shape[0] != N:
        raise ShapeError(f"{what} needs a batch of images (n, height, width, channels), got "
                         f"{format_shape(x.shape)}")


def geometry(size, kernel, stride, padding, what="window"):
    """(out size, pad before, pad after) along one axis of ``size`` pixels. "valid": windows
    inside the image; "same": ceil(size/stride) windows, the zero padding split evenly (the
    extra pixel after), as in TensorFlow."""
    if padding not in PADDINGS:
        raise ShapeError(f"padding must be 'valid' or 'same', not {padding!r}")
    if padding == "valid":
        if kernel > size:
            raise ShapeError(f"{what} of {kernel} pixels is larger than the input's {size} "
                             "(use padding = 'same', or a smaller kernel)")
        return (size - kernel) // stride + 1, 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def out_size(attrs_image, kernel, stride, pads):
    (H, W, _), (kh, kw), (sh, sw), (pt, pb, pl, pr) = attrs_image, kernel, stride, pads
    return (H + pt + pb - kh) // sh + 1, (W + pl + pr - kw) // sw + 1


def im2col(x, kernel, stride=1, padding="valid"):
    """The windows of ``x`` (n, H, W, C) as rows (n*OH*OW, kh*kw*C). ``padding``: "valid",
    "same", or explicit (top, bottom, left, right)."""
    check_image(x, "im2col")
    kernel, stride = pair(kernel, "kernel"), pair(stride, "stride")
    H, W, C = (int(d) for d in x.shape[1:])
    if isinstance(padding, str):
        (_, pt, pb), (_, pl, pr) = (geometry(s, k, st, padding, f"kernel of {kernel[0]}x{kernel[1]}: window")
                                    for s, k, st in ((H, kernel[0], stride[0]), (W, kernel[1], stride[1])))
        pads = (pt, pb, pl, pr)
    else:
        pads = tuple(int(p) for p in padding)
        if len(pads) != 4 or min(pads) < 0:
            raise ShapeError(f"explicit padding must be 4 non-negative integers, got {padding!r}")
    if H + pads[0] + pads[1] < kernel[0] or W + pads[2] + pads[3] < kernel[1]:
        raise ShapeError(f"kernel {kernel[0]}x{kernel[1]} is larger than the padded input "
                         f"{H + pads[0] + pads[1]}x{W + pads[2] + pads[3]}")
    oh, ow = out_size((H, W, C), kernel, stride, pads)
    attrs = (("kernel", kernel), ("stride", stride), ("pads", pads), ("image", (H, W, C)))
    return make("im2col", (x,), (N * oh * ow, kernel[0] * kernel[1] * C), attrs)


def col2im(cols, image, kernel, stride, pads):
    """Rows (n*OH*OW, kh*kw*C) added back onto an image batch (n, H, W, C), ``image`` = (H, W, C)."""
    image, kernel, stride, pads = (tuple(int(v) for v in t) for t in (image, kernel, stride, pads))
    oh, ow = out_size(image, kernel, stride, pads)
    want = (N * oh * ow, kernel[0] * kernel[1] * image[2])
    if tuple(cols.shape) != want:
        raise ShapeError(f"col2im of {format_shape(cols.shape)}: expected {format_shape(want)}")
    attrs = (("kernel", kernel), ("stride", stride), ("pads", pads), ("image", image))
    return make("col2im", (cols,), (N, *image), attrs)


def _attrs(node):
    return node.attr("image"), node.attr("kernel"), node.attr("stride"), node.attr("pads")


def _im2col_adjoint(node, g, wants):
    return [col2im(g, *_attrs(node))]


def _col2im_adjoint(node, g, wants):
    image, kernel, stride, pads = _attrs(node)
    return [im2col(g, kernel, stride, pads)]


# ---- NumPy ----------------------------------------------------------------------------------
# The statements call helpers of the generated module (templates/numpy_module.py.j2): _im2col,
# _col2im and _conv_transpose. Arrays that never leave the function live in per-thread
# buffers reused from call to call (named by the value), as matrix products' do.

def _keep(st, node, operand="_"):
    """The buffer name argument of a helper call: the value's name when its array may live in
    a reused buffer (large, private, and the operand a plain name), else nothing."""
    if st.large(node) and st.private(node) and operand.isidentifier():
        st.helpers.add("scratch")
        return f", {st.name(node)!r}"
    return ""


def _im2col_numpy(st, node):
    (x,) = node.inputs
    image, kernel, stride, pads = _attrs(node)
    src = st.ref(x, bare=True)
    st.helpers |= {"im2col", "padded", "scratch"} if any(pads) else {"im2col"}
    if convolved(st, node):
        return [f"# {st.name(node)} = im2col({src}): not formed; the products with it take its rows "
                "a chunk of samples at a time"]
    from compiler.core.ops.window_max import pool_windows
    if pool_windows(st, node):
        (H, W, C), (kh, kw) = image, kernel
        shape = st.shape_code((N, H // kh, kh, W // kw, kw, C))
        return [f"{st.name(node)} = {st.ref(x)}.reshape({shape})   # the pool's windows tile the image: a view"]
    return [f"{st.name(node)} = _im2col({src}, {kernel}, {stride}, {pads}{_keep(st, node, src)})"]


def convolved(st, node):
    """Whether the rows of im2col ``node`` are used only as the left operand of matrix products
    (``P @ W``, a convolution, and ``P.T @ dZ``, its weights' adjoint): then no statement forms
    them, and each product is computed by a helper that forms the rows of a chunk of samples at
    a time (_conv, _conv_weight_grad: at a large batch all rows are many times the cache)."""
    users = st.users.get(node.uid, [])
    return bool(users) and node.uid not in st.outputs and node.inputs[0].uid not in st.p.inline and all(
        u.op == "matmul" and u.inputs[0] is node and u.inputs[1] is not node for u in users)


def conv_statement(st, product, out_arg):
    """The statement of a matrix product ``P @ W`` or ``P.T @ dZ`` whose left operand P is an
    im2col that is not formed (``convolved``); ``out_arg``: the code of the result's buffer, or
    None for a new array."""
    p, other = product.inputs
    image, kernel, stride, pads = _attrs(p)
    x = st.ref(p.inputs[0], bare=True)
    y = st.ref(other) + (".T" if product.attr("tb") else "")
    st.helpers |= {"conv", "im2col", "padded", "scratch"}
    out = st.name(product)
    if product.attr("ta"):
        return [f"{out} = _conv_weight_grad({x}, {y}, {kernel}, {stride}, {pads}, {st.name(p)!r})"]
    buffer = f", out={out_arg}" if out_arg else ""
    return [f"{out} = _conv({x}, {y}, {kernel}, {stride}, {pads}, {st.name(p)!r}{buffer})"]


def fused_product(st, node):
    """For a col2im whose rows are a matrix product used nowhere else (``col2im(dZ @ W.T)``, a
    convolution's input adjoint): that product, which col2im's statement then computes itself
    (see transposed); else None."""
    (g,) = node.inputs
    if (g.op != "matmul" or st.uses[g.uid] != 1 or g.uid in st.outputs
            or any(i.uid in st.p.inline for i in g.inputs)):
        return None
    return g


def transposed(node, product):
    """Whether col2im(product) is best computed as a transposed convolution (stride 1): the
    windows of dZ, kh*kw*F numbers per input pixel, are then copied (a chunk of samples at a
    time, in cache) instead of the product's kh*kw*C per output pixel being added; worth it up
    to 3 times the size (measured, float32, one thread: 8x8x32 images 1.75x faster, 30x30,
    C 32 -> F 64 1.25x faster; C 8 -> F 64 on 16x16 1.1x and C 16 -> F 128 1.6x slower)."""
    (H, W, C), (kh, kw), (sh, sw), pads = _attrs(node)
    (pt, pb, pl, pr) = pads
    if (sh, sw) != (1, 1) or max(pt, pb) >= kh or max(pl, pr) >= kw:
        return False
    F = product.inputs[0].shape[0 if product.attr("ta") else 1]
    oh, ow = out_size((H, W, C), (kh, kw), (sh, sw), pads)
    return F * H * W <= 3 * C * oh * ow


def _col2im_numpy(st, node):
    (g,) = node.inputs
    image, kernel, stride, pads = _attrs(node)
    out = st.name(node)
    m = fused_product(st, node)
    if m is not None:
        a, b = m.inputs
        rows = st.ref(a) + (".T" if m.attr("ta") else "")
        weights = st.ref(b) + ("" if m.attr("tb") else ".T")
        st.helpers.add("scratch")   # the helpers' own arrays never leave them
        if transposed(node, m):
            st.helpers |= {"conv_transpose", "conv", "im2col", "padded"}
            keep = ", keep=True" if st.large(node) and st.private(node) else ""
            return [f"{out} = _conv_transpose({rows}, {weights}, {image}, {kernel}, {pads}, {out!r}{keep})"]
        st.helpers.add("col2im_product")
        keep = ", keep=True" if st.large(node) and st.private(node) else ""
        return [f"{out} = _col2im_product({rows}, {weights}, {image}, {kernel}, {stride}, {pads}, {out!r}{keep})"]
    from compiler.core.ops.window_max import pooled_windows
    if pooled_windows(st, node) is not None:   # routed straight into the image (window_max.py)
        return [f"{out} = {st.ref(g)}.reshape({st.shape_code(node.shape)})"]
    st.helpers.add("col2im")
    return [f"{out} = _col2im({st.ref(g, bare=True)}, {image}, {kernel}, {stride}, {pads}{_keep(st, node)})"]


# ---- C ------------------------------------------------------------------------------------

def _window_loops(node, inner):
    """Loops over samples, output pixels and kernel offsets around ``inner`` (lines run for each
    channel ``_c``, with ``_row``/``_col`` the flat row-major position in the rows array and
    ``_iy``/``_ix`` the (possibly out-of-image) input pixel)."""
    (H, W, C), (kh, kw), (sh, sw), (pt, pb, pl, pr) = _attrs(node)
    oh, ow = out_size((H, W, C), (kh, kw), (sh, sw), (pt, pb, pl, pr))
    padded = any((pt, pb, pl, pr))
    check = ["    if (_iy < 0 || _iy >= " + str(H) + " || _ix < 0 || _ix >= " + str(W) + ") continue;"] if padded else []
    return ["for (size_t _b = 0; _b < n; _b++)",
            f"for (size_t _oy = 0; _oy < {oh}; _oy++)",
            f"for (size_t _ox = 0; _ox < {ow}; _ox++)",
            f"for (size_t _ky = 0; _ky < {kh}; _ky++)",
            f"for (size_t _kx = 0; _kx < {kw}; _kx++) {{",
            f"    const long _iy = (long)(_oy*{sh} + _ky) - {pt}, _ix = (long)(_ox*{sw} + _kx) - {pl};",
            *check,
            f"    const size_t _at = (((_b*{oh} + _oy)*{ow} + _ox)*{kh} + _ky)*{kw * C} + _kx*{C};",
            f"    const size_t _px = ((_b*{H} + (size_t)_iy)*{W} + (size_t)_ix)*{C};",
            f"    for (size_t _c = 0; _c < {C}; _c++) {inner}",
            "}"]


def _im2col_c(st, node):
    (x,) = node.inputs
    out = st.name(node)
    zero = []
    if any(node.attr("pads")):   # windows over the padding read zeros
        zero = [f"for (size_t _i = 0; _i < {st.size_code(node.shape)}; _i++) {out}[_i] = {st.lit(0)};"]
    return zero + st.block(_window_loops(node, f"{out}[_at + _c] = {st.name(x)}[_px + _c];"))


def _col2im_c(st, node):
    (g,) = node.inputs
    out = st.name(node)
    zero = [f"for (size_t _i = 0; _i < {st.size_code(node.shape)}; _i++) {out}[_i] = {st.lit(0)};"]
    return zero + st.block(_window_loops(node, f"{out}[_px + _c] += {st.name(g)}[_at + _c];"))


def _latex_call(name):
    return lambda node, a, fm: rf"\operatorname{{{name}}}\left({a[0]}\right)"


register(Op("im2col", (im2col,), _im2col_adjoint,
            text=lambda node, a, fm: f"im2col({a[0]})", latex=_latex_call("im2col"),
            statements={"numpy": _im2col_numpy, "c": _im2col_c},
            jvp=linear_jvp(lambda node, t: im2col(t, node.attr("kernel"), node.attr("stride"), node.attr("pads")))))
register(Op("col2im", (col2im,), _col2im_adjoint,
            text=lambda node, a, fm: f"col2im({a[0]})", latex=_latex_call("col2im"),
            statements={"numpy": _col2im_numpy, "c": _col2im_c},
            jvp=linear_jvp(lambda node, t: col2im(t, *_attrs(node)))))

