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
from compiler.core.simplify import ShareCache, fuse, op_counts, share, split_deep, use_counts
from compiler.core.tangents import gauss_newton_vector, hessian_vector, loss_heads


@dataclass(frozen=True)
class SecondOrder:
    """One second-order entry point, ``hvp`` or ``gnvp``: (loss, grads, product) for
    parameters and a direction ``v`` (one ``direction`` leaf per parameter). Simplified on its
    own (fusion and sharing over its loss, gradients and products together), so backward's
    statements are not changed by it; ``inline`` is its own, ``only`` the uids of its nodes
    that are not the loss's or the gradients' (the product's own statements)."""

    name: str                   # "hvp" or "gnvp"
    loss: object
    grads: tuple                # (param node, grad node or None) in PARAMS order
    products: tuple             # (param node, product node or None) in PARAMS order
    nodes: tuple                # schedule
    inline: frozenset
    only: frozenset
    updates: tuple = ()         # the running statistics' next values, as this entry point computes them


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
    directions: tuple = ()      # (param node, its direction leaf v_<name>) in PARAMS order
    hvp: object = None          # SecondOrder: the Hessian-vector product
    gnvp: object = None         # SecondOrder: the Gauss-Newton-vector product (built-in losses), or None
    heads: tuple = ()           # a model of several outputs: forward's predictions (nodes), in the order of
                                # model.heads (the first is ``prediction``); empty for one output

    @property
    def predictions(self):
        """What forward returns: the predictions of every output (one node for one output)."""
        return self.heads or (self.prediction,)

    def per_example_view(self):
        """This program as seen by the statements of per_example_grads: its outputs and inline set."""
        from dataclasses import replace
        pe = self.per_example
        return replace(self, loss=pe.loss, grads=pe.grads, inline=pe.inline, backward_only=pe.only)

    def view(self, second):
        """This program as seen by the statements of ``second`` (its inline set)."""
        from dataclasses import replace
        # grads: every array the entry point returns (its gradients and products), so that no
        # printer keeps a returned array in reusable scratch memory
        # training_only: its uids are backward's; the entry point's own graph computes everything
        return replace(self, inline=second.inline, backward_only=second.only, loss=second.loss, training_only=frozenset(),
                       grads=second.grads + second.products,
                       stat_updates=tuple((s, u) for (s, _), u in zip(self.stat_updates, second.updates)))


def build_program(model, second_order=True):
    # the predictions of a model's other outputs (several heads), after everything else
    extra = [h.prediction for h in model.heads[1:]]
    (prediction, loss, *updates), names = split_deep([model.prediction, model.loss, *(u for _, u in model.stats),
                                                      *extra], dict(model.names))
    updates, extra = updates[:len(updates) - len(extra)], updates[len(updates) - len(extra):]
    leaf_names = {leaf.digest: leaf.name for leaf in model.leaves}
    forward = ir.topo_order([prediction, loss, *updates, *extra])
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
    # one cache for the fusions of backward, per-example gradients, hvp and gnvp: they share the
    # loss and most of the gradients' graph, which is fused once
    fused, shared, shared2 = {}, ShareCache(), ShareCache(compound=True)
    pe_outs, pe_names, pe_error = _per_example(model, loss, [grads[p.uid] for p in model.params], dict(names),
                                               leaf_names, (fused, shared))
    outs, names = fuse([prediction, loss, *grad_nodes, *updates, *extra], names, fused)
    outs, names = share(outs, names, shared)
    pred, loss = outs[0], outs[1]
    m = len(outs) - len(extra)
    new_grads, updates, extra = outs[2:m - len(updates)], outs[m - len(updates):m], outs[m:]
    predictions = (pred, *extra) if extra else ()
    it = iter(new_grads)
    grad_pairs = tuple((p, next(it) if grads[p.uid] is not None else None) for p in model.params)
    after = op_counts([loss, *new_grads])

    inline = _inline_set(outs)
    for k_, v_ in pe_names.items():
        names.setdefault(k_, v_)

    # second order: backward's simplified graph differentiated once more, its nodes kept as they
    # are (so hvp and gnvp compute the loss and gradients with backward's very statements) and
    # only the new nodes simplified (second_order=False: backward alone, a faster compile)
    taken = {leaf.name for leaf in model.leaves}      # (once: a model may declare thousands of parameters)
    directions = tuple(ir.input_node(_direction_name(p, taken), p.shape, "direction") for p in model.params)
    seconds = []
    if second_order:
        base_grads = [g for _, g in grad_pairs]
        base = {n.uid: n for n in ir.topo_order([loss, *new_grads, *updates])}
        fixed = frozenset(base)
        dir_names = {**leaf_names, **{d.digest: d.name for d in directions}}
        hv, tan = hessian_vector(base_grads, model.params, directions)
        for p, h in zip(model.params, hv):
            if h is not None:
                names.setdefault(h.digest, "Hv_" + p.name)
        _name_values(tan, names, "t", base)
        _name_unnamed(ir.topo_order([h for h in hv if h is not None]), names, dir_names)
        seconds.append(_second("hvp", loss, base_grads, hv, updates, names, (fused, shared2), fixed))
        heads = loss_heads(model, loss)
        if heads is not None:
            gv, parts = gauss_newton_vector(model, loss, model.params, directions, heads)
            for p, g in zip(model.params, gv):
                if g is not None:
                    names.setdefault(g.digest, "Gv_" + p.name)
            _name_values(parts.get("tangents", {}), names, "t", base)
            _name_values(parts.get("curvature", {}), names, "u", base)
            _name_values(parts.get("back", {}), names, "ud", base)
            _name_unnamed(ir.topo_order([g for g in gv if g is not None]), names, dir_names)
            seconds.append(_second("gnvp", loss, base_grads, gv, updates, names, (fused, shared2), fixed))
    second_outs = [o for _, outs_ in seconds for o in outs_ if o is not None]

    leaves = {n.uid for n in model.leaves} | {d.uid for d in directions}
    uniq = _unique_names(ir.topo_order([*outs, *(o for o in pe_outs if o is not None), *second_outs]), names, model,
                         directions)

    def schedule(roots, inline_set=inline):
        return tuple(n for n in ir.topo_order(roots)
                     if n.uid not in leaves and n.uid not in inline_set)

    fwd = schedule([pred, *extra, *updates])
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
    built = {}
    for so, so_outs in seconds:
        k = len(model.params)
        s_loss, s_grads, s_prods, s_updates = so_outs[0], so_outs[1:1 + k], so_outs[1 + k:1 + 2 * k], so_outs[1 + 2 * k:]
        s_inline = _inline_set(so_outs)
        nodes = schedule([s_loss, *(g for g in s_grads if g is not None), *(h for h in s_prods if h is not None),
                          *s_updates], s_inline)
        base = {n.uid for n in ir.topo_order([s_loss, *(g for g in s_grads if g is not None), *s_updates])}
        built[so] = SecondOrder(so, s_loss, tuple(zip(model.params, s_grads)), tuple(zip(model.params, s_prods)),
                                nodes, frozenset(s_inline), frozenset(n.uid for n in nodes if n.uid not in base),
                                tuple(s_updates))
    order = ir.topo_order(outs)
    return Program(model, pred, loss, grad_pairs, uniq, frozenset(inline), fwd, lss, bwd,
                   frozenset(n.uid for n in bwd if n.uid not in loss_ids),
                   {"before_simplification": before, "after_simplification": after},
                   tuple(zip((s for s, _ in model.stats), updates)),
                   _training_only(model.mode, order, ir.consumers(order),
                                  {o.uid for o in (*outs[:m - len(updates)], *extra)}, updates),
                   per_example=per_example, per_example_error=pe_error,
                   directions=tuple(zip(model.params, directions)), hvp=built.get("hvp"), gnvp=built.get("gnvp"),
                   heads=predictions)


def _per_example(model, loss, grads, names, leaf_names, caches=(None, None)):
    """(outputs [losses, grads (None where zero)...], names of their nodes, error text) of the
    per-example gradients, simplified like backward's; no outputs and the reason when the model
    has none."""
    try:
        pe = derive_per_example(model, loss, grads, names)
    except PerExampleError as e:
        return [], {}, str(e)
    raw = [pe.loss, *pe.grads]
    _name_unnamed(ir.topo_order([o for o in raw if o is not None]), names, leaf_names)
    outs, pe_names = fuse([o for o in raw if o is not None], names, caches[0])
    outs, pe_names = share(outs, pe_names, caches[1])
    it = iter(outs)
    return [next(it) if o is not None else None for o in raw], pe_names, ""


def direction_arg(model):
    """The name of hvp's and gnvp's direction argument: ``v``, unless a leaf of the model has
    that name (a parameter ``v`` of an expression model)."""
    taken = {leaf.name for leaf in model.leaves}
    name = "v"
    while name in taken:
        name += "_"
    return name


def _direction_name(p, taken):
    """``v_<param>``: the leaf of p's direction in the generated code, unique among the leaves
    (``taken``: their names)."""
    name = "v_" + p.name
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def _name_values(values, names, prefix, by_uid):
    """Name each derived value after the node it derives from: tZ1 (tangent of Z1), tdZ1, ..."""
    for uid, t in values.items():
        node = by_uid.get(uid) if t is not None else None
        base = names.get(node.digest) if node is not None else None
        if base:
            names.setdefault(t.digest, prefix + base)


# hvp and gnvp with at most this many new nodes (after fusion; backward's are not counted) are
# searched for shared subexpressions over all their nodes, backward's too (simplify.share, with
# sums: tanh's derivative 1 - H**2 is computed once for the adjoint, the tangent and the tangent
# of the adjoint); larger ones are not: for a 12-block transformer (1800 new nodes in hvp, 1400 in
# gnvp) sharing took a tenth of the compile (issue 13, item 8 asks for under 2 s), and their
# statements are backward's and the new nodes' as fused: the forward's tanh and exp are
# backward's shared values, which the tangents read, and what is computed again is a power
# such as H**2 or a derivative factor such as 1 - H**2.
SHARED_SECOND_ORDER_MAX = 1000


def _second(name, loss, raw_grads, products, updates, names, caches=(None, None), fixed=frozenset()):
    """(name, simplified outputs [loss, grads..., products..., updates...]) of one entry point;
    ``fixed``: the uids of backward's simplified graph, which it keeps as they are."""
    outs = [loss, *(g for g in raw_grads if g is not None), *(h for h in products if h is not None), *updates]
    outs, names2 = fuse(outs, names, caches[0], fixed)
    if len(ir.topo_order(outs)) - len(fixed) <= SHARED_SECOND_ORDER_MAX:
        # a small entry point is shared over all its nodes, backward's too: tanh's derivative
        # 1 - H**2, by which the adjoint, the tangent and the tangent of the adjoint multiply,
        # is computed once (caches[1] is a compound ShareCache: sums are shared too)
        outs, names2 = share(outs, names2, caches[1])
    for k, v in names2.items():
        names.setdefault(k, v)      # the simplified nodes' names beside the raw ones
    # put the Nones back: [loss, grads (with None), products (with None), updates]
    it = iter(outs[1:])
    g = [next(it) if x is not None else None for x in raw_grads]
    h = [next(it) if x is not None else None for x in products]
    return name, [outs[0], *g, *h, *list(it)]


def _inline_set(outs):
    """uids of the values printed inside their user: broadcast constants, and elementwise
    values used once, by a reduction."""
    outs = [o for o in outs if o is not None]
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


def _unique_names(order, names, model, extra_leaves=()):
    """uid -> a unique identifier; leaves keep their declared names."""
    out, taken = {}, set()
    for leaf in (*model.leaves, *extra_leaves):
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
