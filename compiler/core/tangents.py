"""Forward-mode differentiation over the tensor IR, and the second-order products built on it.

``tangents`` pushes tangents through any graph with the op records' ``jvp`` rules
(compiler.core.ops): each node's tangent is built from the same constructors as the node, so
it shares the graph's values. Pushed through a gradient graph, forward and backward nodes
alike, the tangents of the gradients are the Hessian-vector product (forward over reverse):

    Hv = d/de grad(params + e*v) at e = 0

with every forward value and adjoint of ``backward`` reused, none recomputed.

The Gauss-Newton-vector product of a built-in loss L(z) of the network's outputs z (the
logits or predictions the loss reads: mean squared error, softmax cross-entropy, sigmoid
binary cross-entropy) is ``J^T H_L J v``: the tangent ``J v`` of z, then the tangent of z's
adjoint with only z moving (``H_L J v``: the loss's curvature, positive semi-definite for these
convex losses), then one more reverse sweep from z (``J^T``).
"""
from __future__ import annotations

from compiler.core import ir, ops
from compiler.core.adjoints import gradients, vjp
from compiler.core.functions import softplus
from compiler.core.ir import ARG
from compiler.errors import ShapeError


def tangents(outputs, seeds):
    """uid -> tangent node (None where zero) of every node ``outputs`` depend on; ``seeds``
    maps uids to given tangents (the directions of parameters; anything not reached from a seed
    has tangent zero)."""
    tan = {}
    for node in ir.topo_order(outputs):
        if node.uid in seeds:
            tan[node.uid] = seeds[node.uid]
            continue
        t = [tan.get(i.uid) for i in node.inputs]
        if not any(x is not None for x in t):
            tan[node.uid] = None
            continue
        out = ops.get(node.op).jvp(node, t)
        if out is not None and tuple(out.shape) != tuple(node.shape):
            raise ShapeError(f"internal: tangent of {node!r} has shape {ir.format_shape(out.shape)}")
        tan[node.uid] = out
    return tan


def hessian_vector(grads, params, directions):
    """The tangents of ``grads`` (gradient nodes, None where zero) in the directions
    ``directions`` (one node per parameter, shaped like it): Hv, one node (or None) per entry."""
    tan = tangents([g for g in grads if g is not None], {p.uid: v for p, v in zip(params, directions)})
    return [tan.get(g.uid) if g is not None else None for g in grads], tan


def loss_heads(model, loss=None):
    """The nodes z a built-in loss reads (logits of softmax cross-entropy, predictions of mean
    squared error and of sigmoid cross-entropy), or None when the loss is anything else (an
    expression loss, whose curvature need not be positive semi-definite) or depends on the
    parameters other than through them."""
    loss = model.loss if loss is None else loss
    if model.loss_kind == "expression":
        return None
    targets = {t.uid for t in model.targets}
    heads = {}
    for node in ir.topo_order([loss]):
        hit = [i for i in node.inputs if i.uid in targets]
        if not hit:
            continue
        if node.op == "xent":
            z = node.inputs[0]
        elif node.op == "ew" and len(node.inputs) == 2:
            z = node.inputs[0] if node.inputs[1] is hit[0] else node.inputs[1]
            y = hit[0]
            if node not in (ir.ew((ARG[0] - ARG[1]) ** 2, [z, y]), ir.ew(softplus(ARG[0]) - ARG[0] * ARG[1], [z, y])):
                return None
        else:
            return None
        heads.setdefault(z.uid, z)
    heads = list(heads.values())
    if not heads:
        return None
    stop = frozenset(z.uid for z in heads)
    params = {p.uid for p in model.params}
    if any(n.uid in params for n in ir.topo_order([loss], stop=stop)):
        return None
    return heads


def gauss_newton_vector(model, loss, params, directions, heads):
    """``J^T H_L J v`` for the loss heads ``heads`` (see loss_heads): one node (or None) per
    parameter, and the named intermediate values (uid -> (node, role): "t" tangents J v, "u" the
    loss curvature applied to them, "g" the reverse sweep)."""
    tan = tangents(heads, {p.uid: v for p, v in zip(params, directions)})
    _, adj = gradients(loss, heads)
    seeds = {z.uid: tan.get(z.uid) for z in heads}
    roots = [adj[z.uid] for z in heads if adj.get(z.uid) is not None]
    curv = tangents(roots, seeds) if roots else {}
    pairs = []
    for z in heads:
        a = adj.get(z.uid)
        u = curv.get(a.uid) if a is not None else None
        if u is not None:
            pairs.append((z, u))
    if not pairs:
        return [None] * len(params), {}
    grads, back = vjp(pairs, params)
    return [grads.get(p.uid) for p in params], {"tangents": tan, "curvature": {z.uid: u for z, u in pairs},
                                                "back": back}
