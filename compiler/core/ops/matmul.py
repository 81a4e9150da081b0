"""``matmul``: the matrix product ``op(A) @ op(B)`` of inputs a, b (2-D), with transpose flags ``ta``/``tb`` (explicit
transposes fold into the flags, so ``W*x`` and ``x.T*W.T`` intern to one node)."""
from __future__ import annotations

from compiler.core import ir
from compiler.core.ir import ARG, format_shape, make
from compiler.core.ops import Op, register, tangent_sum
from compiler.errors import ShapeError


def matmul(a, b, ta=False, tb=False):
    # fold explicit transposes into the flags so that W*x and x.T*W.T intern to one node
    if a.op == "transpose":
        a, ta = a.inputs[0], not ta
    if b.op == "transpose":
        b, tb = b.inputs[0], not tb
    sa = a.shape[::-1] if ta else a.shape
    sb = b.shape[::-1] if tb else b.shape
    if len(sa) != 2 or len(sb) != 2:
        raise ShapeError(f"matrix product needs 2-D operands, got {format_shape(sa)} and {format_shape(sb)}")
    if sa[1] != sb[0]:
        raise ShapeError(f"matrix product of {format_shape(sa)} and {format_shape(sb)}: inner sizes {sa[1]} and {sb[0]} differ")
    a_const, b_const = (x.op == "ew" and not x.inputs for x in (a, b))
    if sa[1] == 1 and (a_const or b_const):
        # an outer product with a constant (the adjoint of a loss term of parameters alone) is
        # a scaling: c (r, 1) @ B (1, m) is c*B, A (r, 1) @ c (1, m) is c*A
        const, other = (a, ir.transpose(b) if tb else b) if a_const else (b, ir.transpose(a) if ta else a)
        return ir.ew(const.attr("expr") * ARG[0], [other], shape=(sa[0], sb[1]))
    return make("matmul", (a, b), (sa[0], sb[1]), (("ta", ta), ("tb", tb)))


def product_adjoint(product):
    """The adjoint rule of a product ``C = op(A) @ op(B)`` built by ``product(a, b, ta, tb)``
    (``matmul``, and ``bmm`` over its leading axes)."""
    def rule(node, g, wants):
        a, b = node.inputs
        ta, tb = node.attr("ta"), node.attr("tb")
        da = db = None
        if wants[0]:
            # C = op(A) @ op(B):  d op(A) = G @ op(B).T,  d op(B) = op(A).T @ G
            da = product(b, g, ta=tb, tb=True) if ta else product(g, b, tb=not tb)
        if wants[1]:
            db = product(g, a, ta=True, tb=ta) if tb else product(a, g, ta=not ta)
        return [da, db]
    return rule


def product_jvp(product):
    """The tangent rule of a product ``op(A) @ op(B)``: ``op(tA) @ op(B) + op(A) @ op(tB)``."""
    def rule(node, t):
        a, b = node.inputs
        ta, tb = node.attr("ta"), node.attr("tb")
        return tangent_sum([product(t[0], b, ta=ta, tb=tb) if t[0] is not None else None,
                            product(a, t[1], ta=ta, tb=tb) if t[1] is not None else None], node.shape)
    return rule


def _text(node, a, fm):
    return f"{a[0]}{'.T' if node.attr('ta') else ''} @ {a[1]}{'.T' if node.attr('tb') else ''}"


def product_latex(node, a, fm):
    t = "^{\\top}"
    return f"{a[0]}{t if node.attr('ta') else ''} {a[1]}{t if node.attr('tb') else ''}"


def _numpy(st, node):
    a, b = node.inputs
    out = st.name(node)
    ta = ".T" if node.attr("ta") else ""
    tb = ".T" if node.attr("tb") else ""
    x, y = st.ref(a), st.ref(b)
    users = st.users.get(node.uid, [])
    if len(users) == 1 and users[0].op == "col2im":
        from compiler.core.ops.windows import fused_product
        if fused_product(st, users[0]) is node:
            return [f"# (not formed: {st.name(users[0])} = col2im({out}) computes it, see below)"]
    scratch = a.uid not in st.p.inline and b.uid not in st.p.inline and st.large(node) and st.private(node)
    if a.op == "im2col":
        from compiler.core.ops.windows import conv_statement, convolved
        if convolved(st, a):
            x0 = st.ref(a.inputs[0], bare=True)
            return conv_statement(st, node, st.scratch(out, node.shape, [x0, y]) if scratch else None)
    if scratch:
        # a fresh array each call would be returned to the OS by malloc and faulted back in
        return [f"{out} = np.matmul({x}{ta}, {y}{tb}, out={st.scratch(out, node.shape, [x, y])})"]
    return [f"{out} = {x}{ta} @ {y}{tb}"]


def _c(st, node):
    a, b = node.inputs
    ta, tb = node.attr("ta"), node.attr("tb")
    out = st.name(node)
    rows, cols = st.dims(node.shape)
    inner = st.dims(a.shape)[0 if ta else 1]

    def A(i, k):
        return st.elem(a, [k, i] if ta else [i, k])

    def B(k, j):
        return st.elem(b, [j, k] if tb else [k, j])

    # a term of a sum of products (compiler.backends.c.backend.sums_of_products): written into
    # the sum's array, or added to it
    out, add = st.accumulate.get(node.uid, (out, False))
    C = f"{out}[_i*{cols} + _j]" if cols != "1" else f"{out}[_i]"
    zero = st.lit(0)
    real = st.real
    loops = _loops(st, node, rows, cols, inner, A, B, C, zero, real, out, add)
    if not any(x.uid in st.inline or x.uid in st.locals for x in (a, b)):
        # two arrays: an optimised gemm when built with one and the product is large enough
        # (BPC_GEMM: templates/c_model.c.j2), these loops otherwise
        st.uses_gemm = True
        st.gemm_forms.add("add" if add else "plain")
        call = (f"bpc_gemm{'_add' if add else ''}({int(ta)}, {int(tb)}, {rows}, {cols}, {inner}, "
                f"{st.name(a)}, {st.name(b)}, {out});")
        return ([f"if (BPC_GEMM({rows}, {cols}, {inner})) {{", f"    {call}", "} else {"]
                + ["    " + line for line in loops] + ["}"])
    return loops


def _loops(st, node, rows, cols, inner, A, B, C, zero, real, out, add=False):
    """The product as portable loops (C99; gcc -O3 vectorises the innermost loop) into ``out``;
    ``add``: added to what ``out`` holds."""
    ta, tb = node.attr("ta"), node.attr("tb")
    if tb:  # rows of both operands are contiguous: dot products
        return [f"for (size_t _i = 0; _i < {rows}; _i++) {{",
                f"    for (size_t _j = 0; _j < {cols}; _j++) {{",
                f"        {real} _s = {zero};",
                f"        for (size_t _k = 0; _k < {inner}; _k++) _s += {A('_i', '_k')} * {B('_k', '_j')};",
                f"        {C} {'+=' if add else '='} _s;",
                "    }", "}"]
    clear = [] if add else [f"for (size_t _i = 0; _i < {st.size_code(node.shape)}; _i++) {out}[_i] = {zero};"]
    if ta:  # A^T B: walk the shared (often batch) axis outermost, rows of A and B contiguous
        return clear + [f"for (size_t _k = 0; _k < {inner}; _k++) {{",
                        f"    for (size_t _i = 0; _i < {rows}; _i++) {{",
                        f"        const {real} _a = {A('_i', '_k')};",
                        f"        for (size_t _j = 0; _j < {cols}; _j++) {C} += _a * {B('_k', '_j')};",
                        "    }", "}"]
    return clear + [f"for (size_t _i = 0; _i < {rows}; _i++) {{",
                    f"    for (size_t _k = 0; _k < {inner}; _k++) {{",
                    f"        const {real} _a = {A('_i', '_k')};",
                    f"        for (size_t _j = 0; _j < {cols}; _j++) {C} += _a * {B('_k', '_j')};",
                    "    }", "}"]


register(Op("matmul", (matmul,), product_adjoint(matmul), _text, product_latex, statements={"numpy": _numpy, "c": _c},
            jvp=product_jvp(matmul)))
