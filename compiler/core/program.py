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
from compiler.core.per_example import PerExampleError, derive as derive_per_example
from compiler.core.simplify import fuse, op_counts, share, split_deep, use_counts


@dataclass(frozen=True)
class PerExampleGrads:
    """The per-example entry point (compiler.core.per_example): each sample's loss (n,) and
    gradients (n,) + shape, simplified on their own (fusion and sharing over these outputs, so
    backward's statements do not change); ``inline`` is its own, ``only`` the uids of its nodes
    that do not compute the losses (the gradient statements, commented with their formulas)."""

    loss: object
    grads: tuple                # (param node, node or None) in PARAMS order
    nodes: tuple                # schedule
    inline: frozenset
    only: frozenset


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
    per_example: object = None  # PerExampleGrads, or None when the model has none (see per_example_error)
    per_example_error: str = ""

    def per_example_view(self):
        """This program as seen by the statements of per_example_grads: its outputs and inline set."""
        from dataclasses import replace
        pe = self.per_example
        return replace(self, loss=pe.loss, grads=pe.grads, inline=pe.inline, backward_only=pe.only)


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
    contributions = {}
    for inp, _, _ in trace:
        contributions[inp.uid] = contributions.get(inp.uid, 0) + 1
    for inp, user, contrib in trace:
        total, user_name = names.get(adjoints[inp.uid].digest), names.get(user.digest)
        if contributions[inp.uid] > 1 and total and user_name:
            value_name = leaf_names.get(inp.digest) or names.get(inp.digest)
            names.setdefault(contrib.digest, contribution_name(total, value_name, user_name))
    _name_unnamed(ir.topo_order([loss, *(g for g in grads.values() if g is not None)]), names, leaf_names)

    grad_nodes = [grads[p.uid] for p in model.params if grads[p.uid] is not None]
    before = op_counts([loss, *grad_nodes])
    pe_outs, pe_names, pe_error = _per_example(model, loss, [grads[p.uid] for p in model.params], dict(names),
                                               leaf_names)
    outs, names = fuse([prediction, loss, *grad_nodes, *updates], names)
    outs, names = share(outs, names)
    pred, loss = outs[0], outs[1]
    new_grads, updates = outs[2:len(outs) - len(updates)], outs[len(outs) - len(updates):]
    it = iter(new_grads)
    grad_pairs = tuple((p, next(it) if grads[p.uid] is not None else None) for p in model.params)
    after = op_counts([loss, *new_grads])

    inline = _inline_set(outs)
    for k_, v_ in pe_names.items():
        names.setdefault(k_, v_)

    leaves = {n.uid for n in model.leaves}
    uniq = _unique_names(ir.topo_order([*outs, *(o for o in pe_outs if o is not None)]), names, model)

    def schedule(roots, inline_set=inline):
        return tuple(n for n in ir.topo_order(roots)
                     if n.uid not in leaves and n.uid not in inline_set)

    fwd = schedule([pred, *updates])
    lss = schedule([loss, *updates])
    bwd = schedule([loss, *new_grads, *updates])
    loss_ids = {n.uid for n in lss}
    per_example = None
    if pe_outs:
        pe_inline = _inline_set([o for o in pe_outs if o is not None])
        roots = [o for o in pe_outs if o is not None]
        nodes = schedule(roots, pe_inline)
        losses = {n.uid for n in ir.topo_order([pe_outs[0]])}
        per_example = PerExampleGrads(pe_outs[0], tuple(zip(model.params, pe_outs[1:])), nodes,
                                      frozenset(pe_inline), frozenset(n.uid for n in nodes if n.uid not in losses))
    order = ir.topo_order(outs)
    return Program(model, pred, loss, grad_pairs, uniq, frozenset(inline), fwd, lss, bwd,
                   frozenset(n.uid for n in bwd if n.uid not in loss_ids),
                   {"before_simplification": before, "after_simplification": after},
                   tuple(zip((s for s, _ in model.stats), updates)),
                   _training_only(model.mode, order, ir.consumers(order),
                                  {o.uid for o in outs[:len(outs) - len(updates)]}, updates),
                   per_example=per_example, per_example_error=pe_error)


def _per_example(model, loss, grads, names, leaf_names):
    """(outputs [losses, grads (None where zero)...], names of their nodes, error text) of the
    per-example gradients, simplified like backward's; no outputs and the reason when the model
    has none."""
    try:
        pe = derive_per_example(model, loss, grads, names)
    except PerExampleError as e:
        return [], {}, str(e)
    raw = [pe.loss, *pe.grads]
    _name_unnamed(ir.topo_order([o for o in raw if o is not None]), names, leaf_names)
    outs, pe_names = fuse([o for o in raw if o is not None], names)
    outs, pe_names = share(outs, pe_names)
    it = iter(outs)
    return [next(it) if o is not None else None for o in raw], pe_names, ""


def _inline_set(outs):
    """uids of the values printed inside their user: broadcast constants, and elementwise
    values used once, by a reduction."""
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
    return inline


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
