"""From a Model to a Program: gradients, naming, simplification, and per-function schedules.

A Program holds the simplified graph's three entry points (forward, loss, backward), a
readable unique name for every value, and the statements of each function in order. It is
what the backends print; it does not know any backend's syntax.
"""
from __future__ import annotations

from dataclasses import dataclass

from compiler.core import ir, ops
from compiler.core.adjoints import gradients
from compiler.core.naming import contribution_name, derived_name
from compiler.core.simplify import fuse, op_counts, share, split_deep, use_counts


@dataclass(frozen=True)
class Program:
    model: object
    prediction: object          # node
    loss: object                # node
    grads: tuple                # (param node, grad node or None) in PARAMS order
    names: dict                 # uid -> name, for every scheduled node
    inline: frozenset           # uids of nodes printed inside their single user
    forward_nodes: tuple        # schedule of forward()
    loss_nodes: tuple           # schedule of loss()
    backward_nodes: tuple       # schedule of backward()
    backward_only: frozenset    # uids of backward() nodes not computed by loss()
    stats: dict
    stat_updates: tuple = ()    # (running statistic leaf, node of its next value), every function computes them
    # uids of values that only training mode needs (batch statistics, the statistics' next
    # values): in inference mode the training flag multiplies them by 0 wherever they are used,
    # so the backends compute them only in training mode (and give them zeros otherwise)
    training_only: frozenset = frozenset()


def build_program(model):
    (prediction, loss, *updates), names = split_deep([model.prediction, model.loss, *(u for _, u in model.stats)],
                                                     dict(model.names))
    leaf_names = {leaf.digest: leaf.name for leaf in model.leaves}
    forward = ir.topo_order([prediction, loss, *updates])
    _name_unnamed(forward, names, leaf_names)
    trace = []
    grads, adjoints = gradients(loss, model.params, trace)
    # adjoint names: the node closest to the loss names its adjoint first (dZ2 before dXW2)
    for node in reversed(ir.topo_order([loss])):
        a = adjoints.get(node.uid)
        base = names.get(node.digest)
        if a is not None and base:
            names.setdefault(a.digest, "d" + base)
    for p in model.params:
        g = grads.get(p.uid)
        if g is not None:
            names.setdefault(g.digest, "d" + p.name)
    # the part of an adjoint that flows back through one of its value's several users
    users = {}
    for inp, _, _ in trace:
        users[inp.uid] = users.get(inp.uid, 0) + 1
    for inp, user, contrib in trace:
        total, user_name = names.get(adjoints[inp.uid].digest), names.get(user.digest)
        if users[inp.uid] > 1 and total and user_name:
            value_name = leaf_names.get(inp.digest) or names.get(inp.digest)
            names.setdefault(contrib.digest, contribution_name(total, value_name, user_name))
    _name_unnamed(ir.topo_order([loss, *(g for g in grads.values() if g is not None)]), names, leaf_names)

    grad_nodes = [grads[p.uid] for p in model.params if grads[p.uid] is not None]
    before = op_counts([loss, *grad_nodes])
    outs, names = fuse([prediction, loss, *grad_nodes, *updates], names)
    outs, names = share(outs, names)
    pred, loss = outs[0], outs[1]
    new_grads, updates = outs[2:len(outs) - len(updates)], outs[len(outs) - len(updates):]
    it = iter(new_grads)
    grad_pairs = tuple((p, next(it) if grads[p.uid] is not None else None) for p in model.params)
    after = op_counts([loss, *new_grads])

    order, count = use_counts(outs)
    outputs = {o.uid for o in outs}
    users = ir.consumers(order)
    inline = set()
    for node in order:
        if node.uid in outputs or node.op != "ew":
            continue
        us = users.get(node.uid, [])
        if not node.inputs:
            inline.add(node.uid)     # broadcast constants are printed where they are used
        elif count[node.uid] == 1 and us and ops.get(us[0].op).reduction:
            inline.add(node.uid)

    leaves = {n.uid for n in model.leaves}
    uniq = _unique_names(order, names, model)

    def schedule(roots):
        return tuple(n for n in ir.topo_order(roots)
                     if n.uid not in leaves and n.uid not in inline)

    fwd = schedule([pred, *updates])
    lss = schedule([loss, *updates])
    bwd = schedule([loss, *new_grads, *updates])
    loss_ids = {n.uid for n in lss}
    return Program(model, pred, loss, grad_pairs, uniq, frozenset(inline), fwd, lss, bwd,
                   frozenset(n.uid for n in bwd if n.uid not in loss_ids),
                   {"before_simplification": before, "after_simplification": after},
                   tuple(zip((s for s, _ in model.stats), updates)),
                   _training_only(model.mode, order, users, {o.uid for o in outs[:len(outs) - len(updates)]},
                                  updates))


def _training_only(mode, order, users, outputs, updates):
    """uids of the values that inference mode does not need: the running statistics' next
    values, and every value whose users are such values or elementwise expressions from which
    it vanishes when the training flag ``mode`` is 0 (``Mb*t + running*(1 - t)``)."""
    if mode is None:
        return frozenset()
    only = {u.uid for u in updates}
    for node in reversed(order):
        if node.uid in only or not node.inputs or node.uid in outputs:
            continue
        us = users.get(node.uid, [])
        if us and all(u.uid in only or _vanishes_in_inference(u, node, mode) for u in us):
            only.add(node.uid)
    return frozenset(only)


def _vanishes_in_inference(user, node, mode):
    if user.op != "ew":
        return False
    uids = [i.uid for i in user.inputs]
    if mode.uid not in uids:
        return False
    at_zero = user.attr("expr").xreplace({ir.ARG[uids.index(mode.uid)]: 0})
    return ir.ARG[uids.index(node.uid)] not in at_zero.free_symbols


def _name_unnamed(order, names, leaf_names):
    """Give each unnamed value of ``order`` a name derived from what it computes (naming.py)."""
    def name_of(node):
        return leaf_names.get(node.digest) or names.get(node.digest)
    for node in order:
        if node.inputs and node.digest not in names:
            base = derived_name(node, name_of)
            if base:
                names[node.digest] = base


def _unique_names(order, names, model):
    """uid -> a unique identifier; leaves keep their declared names."""
    out, taken = {}, set()
    for leaf in model.leaves:
        out[leaf.uid] = leaf.name
        taken.add(leaf.name)
    k = 0
    for node in order:
        if node.uid in out:
            continue
        base = names.get(node.digest)
        if base is None:
            k += 1
            base = f"t{k}"
            while base in taken:
                k += 1
                base = f"t{k}"
        name, j = base, 2
        while name in taken:
            name = f"{base}_{j}"
            j += 1
        out[node.uid] = name
        taken.add(name)
    return out
