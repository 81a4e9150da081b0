"""Reverse-mode chain rule over the tensor IR: one adjoint rule per op, one reverse sweep.

A rule gets the forward node, the adjoint ``g`` of its output and which inputs want a
gradient; it returns one adjoint contribution per input (None where there is none). Rules
build their results from the same IR constructors as the forward graph, so the backward
graph shares forward values (elementwise derivatives are rewritten in terms of the forward
output where possible: tanh' = 1 - y**2, sigmoid' = y*(1 - y), exp' = y, relu' = step(y)).
"""
from __future__ import annotations

import operator
from functools import reduce

import sympy as sp

from compiler.core import ir
from compiler.errors import ShapeError, UnsupportedError
from compiler.core.ir import ARG


def unbroadcast(contrib, arg_shape):
    """Sum ``contrib`` over the axes along which an argument of ``arg_shape`` was broadcast."""
    if contrib is None or contrib.shape == tuple(arg_shape):
        return contrib
    padded = ir.padded_to(arg_shape, contrib.shape)
    axes = [i for i, (a, o) in enumerate(zip(padded, contrib.shape)) if a == 1 and o != 1]
    rank_extra = len(contrib.shape) - len(arg_shape)
    if ir.alignment(arg_shape, contrib.shape) == "left":
        axes += list(range(len(arg_shape), len(contrib.shape)))
    else:
        axes += list(range(rank_extra))
    summed = ir.reduce_sum(contrib, axes)
    return ir.reshape(summed, arg_shape)


def _ew_rule(node, g, wants):
    expr = node.attr("expr")
    k = len(node.inputs)
    y = sp.Symbol("_y", real=True)
    partials = _Partials(expr)
    reuse = not expr.is_Symbol and not expr.is_Add
    position = {ARG[i]: i for i in range(k)}
    out = []
    for i, inp in enumerate(node.inputs):
        if not wants[i]:
            out.append(None)
            continue
        d = partials.diff(ARG[i])
        if reuse:
            # the exact occurrences first: cheap, and what is left is small (the derivative of
            # tanh(big sum) holds the sum, which subs would walk for every input)
            d = d.xreplace({expr: y})
        if d.has(sp.DiracDelta):
            # derivatives of sign/step: zero almost everywhere, as for relu at its kink
            d = d.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))
        if reuse:
            d = d.subs(expr, y)  # reuse the forward output
        # bind only the inputs the derivative uses: the term of one input of a big sum needs
        # few of them, and binding all k for each input would be quadratic in k
        used = sorted((position[s] for s in d.free_symbols if s in position))
        bind = {ARG[j]: ARG[m + 1] for m, j in enumerate(used)}
        bind[y] = ARG[len(used) + 1]
        args = [g, *(node.inputs[j] for j in used), node]
        contrib = ir.ew(ARG[0] * d.xreplace(bind), args, shape=node.shape)
        out.append(unbroadcast(contrib, inp.shape))
    return out


class _Partials:
    """The partial derivatives of one expression, each visiting only the subterms that hold its
    symbol. SymPy's ``diff`` walks every term of a sum for every symbol (and recomputes free
    symbols as it goes), which is quadratic in the number of inputs of a big sum; here each sum
    and product indexes its arguments by symbol once. The results are SymPy's: a sum's
    derivative is the sum of its terms' derivatives (zero terms vanish either way); products,
    powers with a constant exponent and functions of one argument follow SymPy's own
    ``_eval_derivative``; anything else goes to ``sp.diff``."""

    def __init__(self, expr):
        self.expr = expr
        self._free = {}
        self._index = {}

    def free(self, e):
        out = self._free.get(e)
        if out is None:
            if e.is_Symbol:
                out = frozenset((e,))
            elif e.is_Add or e.is_Mul:
                out = frozenset().union(*(self.free(a) for a in e.args))
            else:
                out = frozenset(e.free_symbols)
            self._free[e] = out
        return out

    def index(self, e):
        """symbol -> positions of the arguments of ``e`` that hold it."""
        out = self._index.get(e)
        if out is None:
            out = {}
            for j, a in enumerate(e.args):
                for s in self.free(a):
                    out.setdefault(s, []).append(j)
            self._index[e] = out
        return out

    def diff(self, s, e=None):
        e = self.expr if e is None else e
        if s not in self.free(e):
            return sp.Integer(0)
        if e.is_Add:
            return sp.Add(*[self.diff(s, e.args[j]) for j in self.index(e)[s]])
        if e.is_Mul:
            args = list(e.args)
            terms = []
            for j in self.index(e)[s]:
                d = self.diff(s, args[j])
                if d:
                    terms.append(reduce(operator.mul, args[:j] + [d] + args[j + 1:], sp.Integer(1)))
            return sp.Add.fromiter(terms)
        if e.is_Pow and s not in self.free(e.exp):
            return e * (self.diff(s, e.base) * e.exp / e.base)        # Pow._eval_derivative, dexp = 0
        if isinstance(e, sp.Function) and len(e.args) == 1:
            try:
                outer = e.fdiff(1)
            except Exception:      # noqa: BLE001  (no closed form: let SymPy decide)
                return sp.diff(e, s)
            if outer.has(sp.Derivative):     # sign, Abs, ...: SymPy's diff knows better
                return sp.diff(e, s)
            return outer * self.diff(s, e.args[0])                  # Function._eval_derivative
        return sp.diff(e, s)


def _matmul_rule(node, g, wants):
    a, b = node.inputs
    ta, tb = node.attr("ta"), node.attr("tb")
    da = db = None
    if wants[0]:
        # C = op(A) @ op(B):  d op(A) = G @ op(B).T,  d op(B) = op(A).T @ G
        da = ir.matmul(b, g, ta=tb, tb=True) if ta else ir.matmul(g, b, tb=not tb)
    if wants[1]:
        db = ir.matmul(g, a, ta=True, tb=ta) if tb else ir.matmul(a, g, ta=not ta)
    return [da, db]


def _transpose_rule(node, g, wants):
    return [ir.transpose(g)]


def _reshape_rule(node, g, wants):
    return [ir.reshape(g, node.inputs[0].shape)]


def _sum_rule(node, g, wants):
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


def _mean_rule(node, g, wants):
    x = node.inputs[0]
    return [ir.ew(ARG[0] / ir.size_of(x.shape), [g], shape=x.shape)]


def _lse_rule(node, g, wants):
    z = node.inputs[0]
    # d lse / dz = softmax(z) = exp(z - lse): stable, and reuses the forward lse
    return [ir.ew(sp.exp(ARG[0] - ARG[1]) * ARG[2], [z, node, g], shape=z.shape)]


def _softmax_rule(node, g, wants):
    z = node.inputs[0]
    t = ir.reduce_sum(ir.ew(ARG[0] * ARG[1], [g, node]), (1,))
    return [ir.ew(ARG[1] * (ARG[0] - ARG[2]), [g, node, t], shape=z.shape)]


def _xent_rule(node, g, wants):
    z, l, y = node.inputs
    # the rule for z already includes the path through lse: (softmax(z) - onehot(y)) * g
    return [ir.xent_grad(z, l, y, g, node.attr("kind")) if wants[0] else None, None, None]


RULES = {
    "ew": _ew_rule,
    "matmul": _matmul_rule,
    "transpose": _transpose_rule,
    "reshape": _reshape_rule,
    "sum": _sum_rule,
    "mean": _mean_rule,
    "lse": _lse_rule,
    "softmax": _softmax_rule,
    "xent": _xent_rule,
}


def gradients(loss, params):
    """Adjoints of ``loss`` (a scalar node) for each of ``params``.

    Returns ``(grads, adjoints)``: grads maps param uid -> adjoint node (None where the loss
    does not depend on the parameter); adjoints maps every forward node uid on a path from a
    parameter to the loss -> its accumulated adjoint node.
    """
    if loss.shape != ():
        raise ShapeError(f"the loss must be a scalar, it has shape {ir.format_shape(loss.shape)}")
    order = ir.topo_order([loss])
    param_ids = {p.uid for p in params}
    needs = {}
    for node in order:
        needs[node.uid] = node.uid in param_ids or any(needs[i.uid] for i in node.inputs)
    adj = {loss.uid: ir.ew(1, [], shape=())}
    for node in reversed(order):
        g = adj.get(node.uid)
        if g is None or not node.inputs:
            continue
        wants = [needs[i.uid] for i in node.inputs]
        if not any(wants):
            continue
        rule = RULES.get(node.op)
        if rule is None:
            raise UnsupportedError(f"no adjoint rule for operation {node.op!r}")
        for inp, contrib in zip(node.inputs, rule(node, g, wants)):
            if contrib is None or not needs[inp.uid]:
                continue
            if contrib.shape != inp.shape:
                raise ShapeError(f"internal: adjoint of {inp!r} has shape {ir.format_shape(contrib.shape)}")
            prev = adj.get(inp.uid)
            adj[inp.uid] = contrib if prev is None else ir.ew(ARG[0] + ARG[1], [prev, contrib], shape=inp.shape)
    grads = {p.uid: adj.get(p.uid) for p in params}
    return grads, {uid: a for uid, a in adj.items() if needs.get(uid)}
