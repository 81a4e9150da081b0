"""Token embeddings: ``embed`` looks up one row of a table per token id, and ``embed_grad``
adds rows back into the table (its adjoint), which only the backward graph holds.

``embed`` (E (vocab, d), ids (n, T)) -> (n, T, d): ``E[ids]``. ``ids`` is an input of kind
"ids" (integer token ids; the generated modules check that they lie in 0..vocab-1). No attrs.

``embed_grad`` (ids (n, T), g (n, T, d)) -> (vocab, d): the scatter-add ``dE[ids[b, t]] +=
g[b, t]``. A token that occurs several times gets the sum of its rows (NumPy: ``np.add.at``,
which accumulates repeated indices, unlike ``dE[ids] += g``). Attr ``vocab``.
"""
from __future__ import annotations

from compiler.core.ir import N, format_shape, make
from compiler.core.ops import Op, first_order_only, linear_jvp, register
from compiler.errors import ShapeError


def check_ids(ids, what):
    """Check that ``ids`` is a batch of integer token ids, an input of kind "ids"."""
    if ids.op != "input" or ids.attr("kind") != "ids":
        raise ShapeError(f"{what} needs an input of token ids (kind 'ids'), got {ids!r}")
    if not ids.shape or ids.shape[0] != N:
        raise ShapeError(f"{what} needs batch-first token ids, got {format_shape(ids.shape)}")


def embed(E, ids):
    check_ids(ids, "embedding")
    if len(E.shape) != 2:
        raise ShapeError(f"an embedding table is (vocab, dim), got {format_shape(E.shape)}")
    return make("embed", (E, ids), ids.shape + E.shape[1:])


def embed_grad(ids, g, vocab):
    check_ids(ids, "embedding gradient")
    if tuple(g.shape[:-1]) != tuple(ids.shape):
        raise ShapeError(f"embedding gradient of {format_shape(g.shape)} for ids {format_shape(ids.shape)}")
    return make("embed_grad", (ids, g), (int(vocab), g.shape[-1]), (("vocab", int(vocab)),))


def _adjoint(node, g, wants):
    E, ids = node.inputs
    return [embed_grad(ids, g, E.shape[0]) if wants[0] else None, None]


def _rows(st, ids):
    return st.size_code(ids.shape)


# ---- NumPy --------------------------------------------------------------------------------

def _embed_numpy(st, node):
    E, ids = node.inputs
    return [f"{st.name(node)} = {st.ref(E)}[{st.ref(ids)}]"]


def _grad_numpy(st, node):
    ids, g = node.inputs
    out = st.name(node)
    d = node.shape[1]
    return [f"{out} = np.zeros({st.shape_code(node.shape)}, dtype={st.ref(g)}.dtype)",
            f"np.add.at({out}, {st.ref(ids)}.reshape(-1), {st.ref(g)}.reshape(-1, {d}))   # repeated ids add up"]


# ---- C ------------------------------------------------------------------------------------

def _embed_c(st, node):
    E, ids = node.inputs
    d = st.dims(node.shape)[-1]
    return [f"for (size_t _i = 0; _i < {_rows(st, ids)}; _i++) {{",
            f"    const size_t _r = (size_t){st.name(ids)}[_i];",
            f"    for (size_t _j = 0; _j < {d}; _j++) {st.name(node)}[_i*{d} + _j] = {st.source_flat(E, f'_r*{d} + _j')};",
            "}"]


def _grad_c(st, node):
    ids, g = node.inputs
    out = st.name(node)
    d = st.dims(node.shape)[-1]
    return [f"for (size_t _i = 0; _i < {st.size_code(node.shape)}; _i++) {out}[_i] = {st.lit(0)};",
            f"for (size_t _i = 0; _i < {_rows(st, ids)}; _i++) {{",
            f"    const size_t _r = (size_t){st.name(ids)}[_i];",
            f"    for (size_t _j = 0; _j < {d}; _j++) {out}[_r*{d} + _j] += {st.source_flat(g, f'_i*{d} + _j')};",
            "}"]


register(Op("embed", (embed,), _adjoint,
            text=lambda node, a, fm: f"{a[0]}[{a[1]}]",
            latex=lambda node, a, fm: rf"{a[0]}\left[{a[1]}\right]",
            statements={"numpy": _embed_numpy, "c": _embed_c},
            jvp=linear_jvp(lambda node, t: embed(t, node.inputs[1]))))     # linear in the table
register(Op("embed_grad", (embed_grad,), first_order_only,
            text=lambda node, a, fm: f"scatter_add({a[0]}, {a[1]})",
            latex=lambda node, a, fm: rf"\operatorname{{scatter\_add}}\left({a[0]},\, {a[1]}\right)",
            statements={"numpy": _grad_numpy, "c": _grad_c},
            jvp=lambda node, t: None if t[1] is None else embed_grad(node.inputs[0], t[1], node.attr("vocab"))))
