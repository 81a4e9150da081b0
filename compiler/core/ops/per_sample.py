"""Per-sample forms of the reductions over the batch that make parameter gradients; only the
per-example gradients (``compiler.core.per_example``) hold them.

``sample_product`` (a (k*n, i), b (k*n, j)) -> (n, i, j): for each sample, the product
``a_s.T @ b_s`` of its k rows (rows are batch-first: sample s owns rows s*k .. s*k + k - 1). With
k = 1 (a dense layer) it is the outer product ``einsum('ni,nj->nij')``; with k > 1 (the
positions of a sequence, the windows of a convolution) a batched product that sums a sample's
rows, never across samples. It is the per-sample form of ``matmul(a, b, ta=True)``. No attrs.

``embed_grad_each`` (ids (n, T), g (n, T, d)) -> (n, vocab, d): each sample's scatter-add
``dE[s, ids[s, t]] += g[s, t]``, the per-sample form of ``embed_grad``. Attr ``vocab``.
"""
from __future__ import annotations

import sympy as sp

from compiler.core.ir import N, format_shape, make
from compiler.core.ops import Op, first_order_only, register, tangent_sum
from compiler.core.ops.embed import check_ids
from compiler.errors import ShapeError


_LARGE = 4096   # entries per sample from which the product is written into a reused array


def _rows(dim):
    if dim == N:
        return 1
    k = sp.simplify(dim / N) if isinstance(dim, sp.Basic) else None
    if k is None or not k.is_Integer or k <= 0:
        return None
    return int(k)


def sample_product(a, b):
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[0] or _rows(a.shape[0]) is None:
        raise ShapeError(f"a per-sample product needs two 2-D values with the same batch-first rows, got "
                         f"{format_shape(a.shape)} and {format_shape(b.shape)}")
    return make("sample_product", (a, b), (N, a.shape[1], b.shape[1]))


def embed_grad_each(ids, g, vocab):
    check_ids(ids, "per-sample embedding gradient")
    if tuple(g.shape[:-1]) != tuple(ids.shape):
        raise ShapeError(f"embedding gradient of {format_shape(g.shape)} for ids {format_shape(ids.shape)}")
    return make("embed_grad_each", (ids, g), (N, int(vocab), g.shape[-1]), (("vocab", int(vocab)),))


# ---- sample_product -----------------------------------------------------------------------

def _product_numpy(st, node):
    a, b = node.inputs
    out, x, y = st.name(node), st.ref(a), st.ref(b)
    k = _rows(a.shape[0])
    i, j = node.shape[1], node.shape[2]
    # written into the array returned last call when the caller has dropped it (a fresh one of
    # this size costs page faults, the kernel zeroing it, as much as the product itself)
    size = i * j
    large = bool(getattr(size, "is_Integer", isinstance(size, int))) and int(size) >= _LARGE
    into = f", out={st.returned(out, (N, i, j), [x, y])}" if large and x.isidentifier() and y.isidentifier() else ""
    if k == 1:   # the outer product of each sample's rows (einsum: faster than a broadcast multiply or matmul)
        return [f"{out} = np.einsum('ni,nj->nij', {x}, {y}{into})"]
    return [f"{out} = np.matmul({x}.reshape(n, {k}, {i}).transpose(0, 2, 1), {y}.reshape(n, {k}, {j}){into})"]


def _product_c(st, node):
    a, b = node.inputs
    out = st.name(node)
    k = _rows(a.shape[0])
    i, j = int(node.shape[1]), int(node.shape[2])
    real = st.real
    A = st.elem(a, ["_r", "_i"])
    B = st.elem(b, ["_r", "_j"])
    if k == 1:
        return ["for (size_t _q = 0; _q < n; _q++) {",
                "    const size_t _r = _q;",
                f"    {real} *const _o = {out} + _q*{i * j};",
                f"    for (size_t _i = 0; _i < {i}; _i++) {{",
                f"        const {real} _a = {A};",
                f"        for (size_t _j = 0; _j < {j}; _j++) _o[_i*{j} + _j] = _a * {B};",
                "    }", "}"]
    return ["for (size_t _q = 0; _q < n; _q++) {",
            f"    {real} *const _o = {out} + _q*{i * j};",
            f"    for (size_t _i = 0; _i < {i * j}; _i++) _o[_i] = {st.lit(0)};",
            f"    for (size_t _l = 0; _l < {k}; _l++) {{",
            f"        const size_t _r = _q*{k} + _l;",
            f"        for (size_t _i = 0; _i < {i}; _i++) {{",
            f"            const {real} _a = {A};",
            f"            for (size_t _j = 0; _j < {j}; _j++) _o[_i*{j} + _j] += _a * {B};",
            "        }", "    }", "}"]


register(Op("sample_product", (sample_product,), first_order_only,
            text=lambda node, a, fm: f"per_sample({a[0]}.T @ {a[1]})",
            latex=lambda node, a, fm: rf"\operatorname{{per\_sample}}\left({a[0]}^{{\top}} {a[1]}\right)",
            statements={"numpy": _product_numpy, "c": _product_c},
            # bilinear: the tangent is the sum of the products with one factor's tangent each
            jvp=lambda node, t: tangent_sum([None if t[0] is None else sample_product(t[0], node.inputs[1]),
                                             None if t[1] is None else sample_product(node.inputs[0], t[1])],
                                            node.shape)))


# ---- embed_grad_each ----------------------------------------------------------------------

def _each_numpy(st, node):
    ids, g = node.inputs
    out = st.name(node)
    return [f"{out} = np.zeros({st.shape_code(node.shape)}, dtype={st.ref(g)}.dtype)",
            f"np.add.at({out}, (np.arange(n)[:, None], {st.ref(ids)}.reshape(n, -1)), "
            f"{st.ref(g)}.reshape(n, -1, {node.shape[2]}))   # repeated ids add up"]


def _each_c(st, node):
    ids, g = node.inputs
    out = st.name(node)
    vocab, d = int(node.shape[1]), int(node.shape[2])
    per = st.size_code(ids.shape[1:])
    return [f"for (size_t _i = 0; _i < {st.size_code(node.shape)}; _i++) {out}[_i] = {st.lit(0)};",
            "for (size_t _q = 0; _q < n; _q++) {",
            f"    for (size_t _t = 0; _t < {per}; _t++) {{",
            f"        const size_t _i = _q*{per} + _t;",
            f"        const size_t _r = _q*{vocab} + (size_t){st.name(ids)}[_i];",
            f"        for (size_t _j = 0; _j < {d}; _j++) {out}[_r*{d} + _j] += {st.source_flat(g, f'_i*{d} + _j')};",
            "    }", "}"]


register(Op("embed_grad_each", (embed_grad_each,), first_order_only,
            text=lambda node, a, fm: f"scatter_add_per_sample({a[0]}, {a[1]})",
            latex=lambda node, a, fm: rf"\operatorname{{scatter\_add\_per\_sample}}\left({a[0]},\, {a[1]}\right)",
            statements={"numpy": _each_numpy, "c": _each_c},
            # linear in g (the ids are integers: no tangent)
            jvp=lambda node, t: None if t[1] is None else embed_grad_each(node.inputs[0], t[1], node.attr("vocab"))))
