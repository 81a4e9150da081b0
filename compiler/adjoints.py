"""Reverse-mode chain rule over the tensor IR: one adjoint rule per op, one reverse sweep.

A rule gets the forward node, the adjoint ``g`` of its output and which inputs want a
gradient; it returns one adjoint contribution per input (None where there is none). Rules
build their results from the same IR constructors as the forward graph, so the backward
graph shares forward values (elementwise derivatives are rewritten in terms of the forward
output where possible: tanh' = 1 - y**2, sigmoid' = y*(1 - y), exp' = y, relu' = step(y)).
"""
from __future__ import annotations

import sympy as sp

from . import ir
from .errors import ShapeError, UnsupportedError
from .ir import ARG


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
    shift = {ARG[i]: ARG[i + 1] for i in range(k)}
    out = []
    for i, inp in enumerate(node.inputs):
        if not wants[i]:
            out.append(None)
            continue
        d = sp.diff(expr, ARG[i])
        if d.has(sp.DiracDelta):
            # derivatives of sign/step: zero almost everywhere, as for relu at its kink
            d = d.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))
        if not expr.is_Symbol and not expr.is_Add:
            d = d.subs(expr, y)  # reuse the forward output
        d = d.xreplace({**shift, y: ARG[k + 1]})
        contrib = ir.ew(ARG[0] * d, [g, *node.inputs, node], shape=node.shape)
        out.append(unbroadcast(contrib, inp.shape))
    return out


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
