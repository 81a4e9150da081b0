"""``concat``: its inputs side by side along the last axis (every other axis equal, no
broadcasting); no attrs. ``slice_last``: the entries ``start:stop`` of one input's last axis
(attrs ``start``, ``stop``), which only appears in gradients: the adjoint of a concatenation
is the adjoint's slices, one per input."""
from __future__ import annotations

import re

from compiler.core import ir
from compiler.core.ir import format_shape, make
from compiler.core.ops import Op, first_order_only, linear_jvp, register
from compiler.errors import ShapeError


def concat(*parts):
    if not parts:
        raise ShapeError("concat needs at least one value")
    if len(parts) == 1:
        return parts[0]
    lead = parts[0].shape[:-1]
    for p in parts:
        if not p.shape:
            raise ShapeError("concat joins along the last axis; a scalar has none")
        if p.shape[:-1] != lead:
            raise ShapeError("concat joins along the last axis; the other axes must agree, got "
                             + ", ".join(format_shape(q.shape) for q in parts))
    width = sum(int(p.shape[-1]) for p in parts)
    return make("concat", tuple(parts), lead + (width,))


def slice_last(a, start, stop):
    start, stop = int(start), int(stop)
    if not a.shape or not 0 <= start < stop <= int(a.shape[-1]):
        raise ShapeError(f"cannot take entries {start}:{stop} of the last axis of {format_shape(a.shape)}")
    if start == 0 and stop == a.shape[-1]:
        return a
    shape = a.shape[:-1] + (stop - start,)
    if a.op == "ew" and all(i.shape == () for i in a.inputs):
        # a broadcast scalar (a constant, the adjoint of a mean) stays one at the new shape
        return ir.ew(a.attr("expr"), a.inputs, shape=shape)
    if a.op == "concat":
        # the slice that is one of the joined parts is that part (one node, shared)
        offset = 0
        for p in a.inputs:
            if (offset, offset + p.shape[-1]) == (start, stop):
                return p
            offset += p.shape[-1]
    return make("slice_last", (a,), shape, (("start", start), ("stop", stop)))


def _offsets(node):
    out, offset = [], 0
    for p in node.inputs:
        out.append(offset)
        offset += int(p.shape[-1])
    return out


def _adjoint(node, g, wants):
    return [slice_last(g, o, o + p.shape[-1]) if w else None
            for p, o, w in zip(node.inputs, _offsets(node), wants)]


def _concat_jvp(node, t):
    if all(x is None for x in t):
        return None
    # a part without a tangent (data joined to features) contributes zeros of its shape
    return concat(*(x if x is not None else ir.zeros_like(p) for p, x in zip(node.inputs, t)))


def _concat_numpy(st, node):
    parts = ", ".join(st.ref(p, bare=True) for p in node.inputs)
    return [f"{st.name(node)} = np.concatenate(({parts}), axis=-1)"]


def _concat_c(st, node):
    lines = []
    for p, offset in zip(node.inputs, _offsets(node)):
        idx = st.idx_vars(p.shape)
        out = idx[:-1] + [f"({idx[-1]} + {offset})" if offset else idx[-1]]
        lines += st.loops(p.shape, [f"{st.target(node, out)} = {st.elem(p, idx)};"])
    return lines


def _slice_numpy(st, node):
    (a,) = node.inputs
    # a copy, not a view: a later statement may update the result in place
    return [f"{st.name(node)} = {st.ref(a)}[..., {node.attr('start')}:{node.attr('stop')}].copy()"]


def _slice_c(st, node):
    (a,) = node.inputs
    idx = st.idx_vars(node.shape)
    src = idx[:-1] + [f"({idx[-1]} + {node.attr('start')})"]
    return st.loops(node.shape, [f"{st.target(node, idx)} = {st.elem(a, src)};"])


register(Op("concat", (concat,), _adjoint,
            text=lambda node, a, fm: f"concat({', '.join(a)})",
            latex=lambda node, a, fm: r"\left[" + r" \;\middle|\; ".join(a) + r"\right]",
            statements={"numpy": _concat_numpy, "c": _concat_c}, jvp=_concat_jvp))

def _atom(code):
    return code if re.fullmatch(r"[\w.]+", code) else f"({code})"


register(Op("slice_last", (slice_last,), first_order_only,
            text=lambda node, a, fm: f"{_atom(a[0])}[..., {node.attr('start')}:{node.attr('stop')}]",
            # (an index, not a subscript: dC_{2}_{...} would be a double subscript)
            latex=lambda node, a, fm: f"{a[0]}\\left[:,\\,{node.attr('start')}:{node.attr('stop')}\\right]",
            statements={"numpy": _slice_numpy, "c": _slice_c},
            jvp=linear_jvp(lambda node, t: slice_last(t, node.attr("start"), node.attr("stop")))))
