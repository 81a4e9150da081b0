"""``bmm``: the batched matrix product ``op(A) @ op(B)`` of inputs a (..., m, k) and b (..., k, p)
with equal leading (batch) axes, one matrix product per leading index; attrs ``ta``/``tb``
transpose the last two axes of a/b (``Q @ K.mT``, the scores of attention, is
``bmm(Q, K, tb=True)``). The adjoint is two batched products, as for ``matmul``.

NumPy: one ``np.matmul`` over the whole batch (no Python loop over samples or heads); C: a
loop over the leading axes around the matrix product: one gemm call per leading index when the
build has an optimised BLAS and each product is large enough (``BPC_GEMM``, the threshold of
``matmul``'s: templates/c_model.c.j2), the portable loops otherwise. A head permutation
(n, T, h, dk) <-> (n, h, T, dk) read only by products, or taking a product's result, is no copy
in C: the products read or write each head's (T, dk) matrix inside the (n, T, h*dk) array with
row stride h*dk (``head_views`` in compiler.backends.c.backend).
"""
from __future__ import annotations

from compiler.core.ir import format_shape, make
from compiler.core.ops import Op, register
from compiler.core.ops.matmul import product_adjoint, product_jvp, product_latex
from compiler.core.ops.permute import inverse
from compiler.errors import ShapeError


def _last2(shape, t):
    return (shape[-1], shape[-2]) if t else (shape[-2], shape[-1])


def bmm(a, b, ta=False, tb=False):
    if len(a.shape) < 3 or len(b.shape) < 3:
        raise ShapeError(f"batched matrix product needs operands of 3 or more axes, got "
                         f"{format_shape(a.shape)} and {format_shape(b.shape)}")
    if a.shape[:-2] != b.shape[:-2]:
        raise ShapeError(f"batched matrix product of {format_shape(a.shape)} and {format_shape(b.shape)}: "
                         "the leading (batch) axes differ")
    (m, ka), (kb, p) = _last2(a.shape, ta), _last2(b.shape, tb)
    if ka != kb:
        raise ShapeError(f"batched matrix product of {format_shape(a.shape)}{'.mT' if ta else ''} and "
                         f"{format_shape(b.shape)}{'.mT' if tb else ''}: inner sizes {ka} and {kb} differ")
    return make("bmm", (a, b), a.shape[:-2] + (m, p), (("ta", bool(ta)), ("tb", bool(tb))))


def _text(node, a, fm):
    return f"{a[0]}{'.mT' if node.attr('ta') else ''} @ {a[1]}{'.mT' if node.attr('tb') else ''}"


def _numpy(st, node):
    a, b = node.inputs
    x = st.ref(a) + (".swapaxes(-1, -2)" if node.attr("ta") else "")
    y = st.ref(b) + (".swapaxes(-1, -2)" if node.attr("tb") else "")
    out = st.name(node)
    users = st.users.get(node.uid, [])
    if (len(users) == 1 and users[0].op == "permute" and st.large(node)
            and a.uid not in st.p.inline and b.uid not in st.p.inline):
        # the heads merged back, (n, h, T, dk) -> (n, T, h, dk): the products are written
        # straight into an array of the permuted layout, so the permutation is that array and
        # the reshape after it, to (n*T, d) rows for the next matrix product, is a view, not a copy
        perm = users[0]
        if st.private(node):
            buf = st.scratch(out, perm.shape, [st.ref(a), st.ref(b)])
        else:
            buf = f"np.empty({st.shape_code(perm.shape)}, np.result_type({st.ref(a)}, {st.ref(b)}))"
        return [f"{out} = np.matmul({x}, {y}, out={buf}.transpose({inverse(perm.attr('axes'))}))"]
    if st.private(node) and st.large(node) and a.uid not in st.p.inline and b.uid not in st.p.inline:
        # attention scores and their adjoint: this thread's buffer, reused from call to call
        return [f"{out} = np.matmul({x}, {y}, out={st.scratch(out, node.shape, [st.ref(a), st.ref(b)])})"]
    return [f"{out} = np.matmul({x}, {y})"]


def _matrix(st, x, q, rows, cols):
    """(C pointer to matrix ``q`` of ``x``, its row stride): the q-th (rows, cols) block of x's
    array, or of the array a head permutation reads or writes in place (``st.strided``)."""
    if x.uid in st.strided:
        base, h, step, ld = st.strided[x.uid]
        return f"{base} + ({q} / {h})*{step} + ({q} % {h})*{ld // h}", ld
    return f"{st.name(x)} + {q}*{rows * cols}", cols


def _c(st, node):
    a, b = node.inputs
    ta, tb = node.attr("ta"), node.attr("tb")
    m, p = (int(d) for d in node.shape[-2:])
    k = int(a.shape[-2] if ta else a.shape[-1])
    batch = st.size_code(node.shape[:-2])
    pa, lda = _matrix(st, a, "_q", *(int(d) for d in a.shape[-2:]))
    pb, ldb = _matrix(st, b, "_q", *(int(d) for d in b.shape[-2:]))
    pc, ldc = _matrix(st, node, "_q", m, p)
    A = (lambda i, kk: f"_a[{kk}*{lda} + {i}]") if ta else (lambda i, kk: f"_a[{i}*{lda} + {kk}]")
    B = (lambda kk, j: f"_b[{j}*{ldb} + {kk}]") if tb else (lambda kk, j: f"_b[{kk}*{ldb} + {j}]")
    real = st.real
    loops = _loops(st, node, A, B, (pa, pb, pc), ldc, real, batch, m, p, k)
    st.uses_gemm = True
    strided = (lda, ldb, ldc) != (int(a.shape[-1]), int(b.shape[-1]), p)
    st.gemm_forms.add("ld" if strided else "plain")
    call = (f"bpc_gemm_ld({int(ta)}, {int(tb)}, {m}, {p}, {k}, {pa}, {lda}, {pb}, {ldb}, {pc}, {ldc});" if strided
            else f"bpc_gemm({int(ta)}, {int(tb)}, {m}, {p}, {k}, {pa}, {pb}, {pc});")
    return ([f"if (BPC_GEMM({m}, {p}, {k})) {{",
             f"    for (size_t _q = 0; _q < {batch}; _q++)",
             f"        {call}",
             "} else {"]
            + ["    " + line for line in loops] + ["}"])


def _loops(st, node, A, B, ptrs, ldc, real, batch, m, p, k):
    """The products as portable loops (C99; gcc -O3 vectorises the innermost loop)."""
    tb = node.attr("tb")
    head = [f"for (size_t _q = 0; _q < {batch}; _q++) {{",
            f"    const {real} *const _a = {ptrs[0]};",
            f"    const {real} *const _b = {ptrs[1]};",
            f"    {real} *const _c = {ptrs[2]};",
            f"    for (size_t _i = 0; _i < {m}; _i++) {{"]
    if tb:   # rows of both operands are contiguous: dot products
        return head + [f"        for (size_t _j = 0; _j < {p}; _j++) {{",
                       f"            {real} _s = {st.lit(0)};",
                       f"            for (size_t _k = 0; _k < {k}; _k++) _s += {A('_i', '_k')} * {B('_k', '_j')};",
                       f"            _c[_i*{ldc} + _j] = _s;",
                       "        }", "    }", "}"]
    # a row of C accumulates rows of B (contiguous), k ascending as in the dot products
    return head + [f"        for (size_t _j = 0; _j < {p}; _j++) _c[_i*{ldc} + _j] = {st.lit(0)};",
                   f"        for (size_t _k = 0; _k < {k}; _k++) {{",
                   f"            const {real} _x = {A('_i', '_k')};",
                   f"            for (size_t _j = 0; _j < {p}; _j++) _c[_i*{ldc} + _j] += _x * {B('_k', '_j')};",
                   "        }", "    }", "}"]


register(Op("bmm", (bmm,), product_adjoint(bmm), _text, product_latex, statements={"numpy": _numpy, "c": _c},
            jvp=product_jvp(bmm)))
