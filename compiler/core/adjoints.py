"""Reverse-mode chain rule over the tensor IR: one reverse sweep over the adjoint rules of the
op records (compiler.core.ops; the rules' contract is described there).
"""
from __future__ import annotations

from compiler.core import ir, ops
from compiler.core.ir import ARG
from compiler.errors import ShapeError


# op name -> adjoint rule, for the ops that have one (xent_grad appears only in gradients)
RULES = {name: op.adjoint for name, op in ops.REGISTRY.items() if op.adjoint is not ops.first_order_only}


def gradients(loss, params, trace=None):
    """Adjoints of ``loss`` (a scalar node) for each of ``params``.

    Returns ``(grads, adjoints)``: grads maps param uid -> adjoint node (None where the loss
    does not depend on the parameter); adjoints maps every forward node uid on a path from a
    parameter to the loss -> its accumulated adjoint node. If ``trace`` is a list, each
    contribution is appended to it as ``(input, user, contribution)`` (for naming them).
    """
    if loss.shape != ():
        raise ShapeError(f"the loss must be a scalar, it has shape {ir.format_shape(loss.shape)}")
    return vjp([(loss, ir.ew(1, [], shape=()))], params, trace)


def vjp(seeds, params, trace=None):
    """The reverse sweep from ``seeds``, (node, adjoint of node) pairs, to ``params``: the
    vector-Jacobian product. Returns ``(grads, adjoints)`` as ``gradients`` does (and fills
    ``trace`` as it does)."""
    order = ir.topo_order([node for node, _ in seeds])
    param_ids = {p.uid for p in params}
    needs = {}
    for node in order:
        needs[node.uid] = node.uid in param_ids or any(needs[i.uid] for i in node.inputs)
    adj = {}
    for node, a in seeds:
        prev = adj.get(node.uid)
        adj[node.uid] = a if prev is None else ir.ew(ARG[0] + ARG[1], [prev, a], shape=node.shape)
    for node in reversed(order):
        g = adj.get(node.uid)
        if g is None or not node.inputs:
            continue
        wants = [needs[i.uid] for i in node.inputs]
        if not any(wants):
            continue
        rule = ops.get(node.op).adjoint
        for inp, contrib in zip(node.inputs, rule(node, g, wants)):
            if contrib is None or not needs[inp.uid]:
                continue
            if contrib.shape != inp.shape:
                raise ShapeError(f"internal: adjoint of {inp!r} has shape {ir.format_shape(contrib.shape)}")
            if trace is not None:
                trace.append((inp, node, contrib))
            prev = adj.get(inp.uid)
            adj[inp.uid] = contrib if prev is None else ir.ew(ARG[0] + ARG[1], [prev, contrib], shape=inp.shape)
    grads = {p.uid: adj.get(p.uid) for p in params}
    return grads, {uid: a for uid, a in adj.items() if needs.get(uid)}
