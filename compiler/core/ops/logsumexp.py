"""Row-wise log-sum-exp ``lse`` (n, k) -> (n,) and ``softmax`` (n, k) -> (n, k) of one input z,
both stable (a row's maximum is subtracted before exponentiating wherever the unshifted sum
would leave the safe range); no attrs. A row is the last
axis: logits (n, T, k) of a sequence (or attention scores (n, heads, T, T)) give ``lse`` of
shape (n, T) and a softmax over each row of k."""
from __future__ import annotations

import sympy as sp

from compiler.core import ir
from compiler.core.ir import ARG, format_shape, make
from compiler.core.ops import Op, linear_jvp, register
from compiler.errors import ShapeError


def rows(z, what):
    """Check that ``z`` holds (batch, classes) logits, or (batch, ..., classes)."""
    if len(z.shape) < 2:
        raise ShapeError(f"{what} needs (batch, classes) logits, got {format_shape(z.shape)}")


def flat_rows(st, z):
    """(rows, classes) of logits ``z`` in a backend's size code: every axis but the last is a row."""
    return st.size_code(z.shape[:-1]), st.dims(z.shape)[-1]


def lse(z):
    rows(z, "log-sum-exp")
    return make("lse", (z,), z.shape[:-1])


def softmax(z):
    rows(z, "softmax")
    return make("softmax", (z,), z.shape)


# ---- lse ----------------------------------------------------------------------------------

def _lse_adjoint(node, g, wants):
    z = node.inputs[0]
    # d lse / dz = softmax(z) = exp(z - lse): stable, and reuses the forward lse
    return [ir.ew(sp.exp(ARG[0] - ARG[1]) * ARG[2], [z, node, g], shape=z.shape)]


def _lse_jvp(node, t):
    z = node.inputs[0]
    # d lse = sum(softmax(z) * dz) over the row
    return ir.reduce_sum(ir.ew(sp.exp(ARG[0] - ARG[1]) * ARG[2], [z, node, t[0]], shape=z.shape), (len(z.shape) - 1,))


def _lse_numpy(st, node):
    st.helpers.add("logsumexp")
    z = node.inputs[0]
    if len(z.shape) > 2:     # rows of every position: one call on the flattened rows
        k = z.shape[-1]
        return [f"{st.name(node)} = _logsumexp({st.ref(z)}.reshape(-1, {k})).reshape({st.shape_code(node.shape)})"]
    return [f"{st.name(node)} = _logsumexp({st.ref(z)})"]


# the range of a row's sum of unshifted exponentials in which they are used as they are (the
# NumPy module's _shifted_exp): finite and at least the square root of the smallest normal
# number; a row outside it (overflow, underflow, inf or nan) is done again shifted by its maximum
SAFE_SUM = {"float": ("0x1p-63f", "0x1.fffffep+127f"), "double": ("0x1p-511", "0x1.fffffffffffffp+1023")}


def _exp_rows(st, rows, k, zij, z0, out=None):
    """C lines opening ``for (_i < rows) {`` with ``_s`` the sum of row _i's exp(z - _m) (and each
    term in ``out``, an element expression of _i, _j, when given) and ``_m`` its shift: 0 where the
    unshifted sum is in SAFE_SUM's range (no maximum to find: a reduction over a short row costs
    more than its exponentials), else the row's maximum, as usual. The same result either way,
    up to rounding; a row's result depends on that row alone."""
    lo, hi = SAFE_SUM[st.real]
    exp, real = st.exp(), st.real

    size = int(k) if str(k).isdigit() else k

    def pass_(shift, acc):
        # the terms (into out, when given), then their sum in partial sums (st.row_sum)
        arg = f"{zij} - _m" if shift else zij
        if out is None:
            return st.row_sum(size, "_j", f"{exp}({arg})", acc)
        return [f"for (size_t _j = 0; _j < {k}; _j++) {out} = {exp}({arg});"] + st.row_sum(size, "_j", out, acc)
    return [f"for (size_t _i = 0; _i < {rows}; _i++) {{",
            f"    {real} _m = {st.lit(0)};",
            *("    " + line for line in pass_(False, "_s")),
            f"    if (!(_s >= {lo} && _s <= {hi})) {{",
            f"        _m = {z0};",
            f"        for (size_t _j = 1; _j < {k}; _j++) if ({zij} > _m) _m = {zij};",
            *("        " + line for line in pass_(True, "_t")),
            "        _s = _t;",
            "    }"]


def _flat_lse_c(st, node):
    z = node.inputs[0]
    rows, k = flat_rows(st, z)
    zij = st.source_flat(z, f"_i*{k} + _j")
    return _exp_rows(st, rows, k, zij, st.source_flat(z, f"_i*{k}")) + [
        f"    {st.name(node)}[_i] = _m + log{st.fs}(_s);", "}"]


def _lse_c(st, node):
    (z,) = node.inputs
    if len(z.shape) > 2:
        return _flat_lse_c(st, node)
    k = st.dims(z.shape)[1]
    return _exp_rows(st, "n", k, st.elem(z, ["_i", "_j"]), st.elem(z, ["_i", "0"])) + [
        f"    {st.name(node)}[_i] = _m + log{st.fs}(_s);", "}"]


register(Op("lse", (lse,), _lse_adjoint,
            text=lambda node, a, fm: f"logsumexp({a[0]}, axis={1 if len(node.shape) == 1 else -1})",
            latex=lambda node, a, fm: rf"\operatorname{{logsumexp}}\left({a[0]}\right)",
            statements={"numpy": _lse_numpy, "c": _lse_c}, jvp=linear_jvp(lambda node, t: _lse_jvp(node, [t]))))


# ---- softmax ------------------------------------------------------------------------------

def _softmax_adjoint(node, g, wants):
    z = node.inputs[0]
    t = ir.reduce_sum(ir.ew(ARG[0] * ARG[1], [g, node]), (len(z.shape) - 1,))
    return [ir.ew(ARG[1] * (ARG[0] - ARG[2]), [g, node, t], shape=z.shape)]


def _softmax_jvp(node, t):
    # d softmax = s * (dz - sum(s * dz)): the softmax adjoint's form (the Jacobian is symmetric)
    return _softmax_adjoint(node, t, [True])[0]


def _softmax_numpy(st, node):
    z = node.inputs[0]
    if len(z.shape) > 2 and st.large(node):
        # the rows of every position (attention weights: every head and query) in one buffer,
        # without the temporaries of the plain form: a scratch array when the weights never
        # reach the caller. Not the dead input itself: _shifted_exp may need z again.
        st.helpers.add("softmax_into")
        if st.private(node):
            dest = st.scratch(st.name(node), node.shape, [st.ref(z)])
        else:
            dest = f"np.empty_like({st.ref(z)})"
        return [f"{st.name(node)} = _softmax_into({st.ref(z)}, {dest})"]
    st.helpers.add("softmax")
    if len(z.shape) > 2:
        return [f"{st.name(node)} = _softmax({st.ref(z)}.reshape(-1, {z.shape[-1]})).reshape({st.shape_code(node.shape)})"]
    return [f"{st.name(node)} = _softmax({st.ref(z)})"]


def _flat_softmax_c(st, node):
    z = node.inputs[0]
    rows, k = flat_rows(st, z)
    out = f"{st.name(node)}[_i*{k} + _j]"
    return _exp_rows(st, rows, k, st.source_flat(z, f"_i*{k} + _j"), st.source_flat(z, f"_i*{k}"), out) + [
        f"    for (size_t _j = 0; _j < {k}; _j++) {out} /= _s;", "}"]


def _softmax_c(st, node):
    (z,) = node.inputs
    if len(z.shape) > 2:
        return _flat_softmax_c(st, node)
    k = st.dims(z.shape)[1]
    out = f"{st.name(node)}[_i*{k} + _j]"
    return _exp_rows(st, "n", k, st.elem(z, ["_i", "_j"]), st.elem(z, ["_i", "0"]), out) + [
        f"    for (size_t _j = 0; _j < {k}; _j++) {out} /= _s;", "}"]


register(Op("softmax", (softmax,), _softmax_adjoint,
            text=lambda node, a, fm: f"softmax({a[0]})",
            latex=lambda node, a, fm: rf"\operatorname{{softmax}}\left({a[0]}\right)",
            statements={"numpy": _softmax_numpy, "c": _softmax_c}, jvp=linear_jvp(_softmax_jvp)))
