"""Simplification passes, each ``graph -> graph``: elementwise fusion and operation counts.

Interning already shares equal subexpressions between forward and backward (common
subexpression elimination at the tensor level), elementwise derivatives already reuse forward
outputs, and zero adjoints were never built. What is left here:

- ``fuse``: an elementwise node used exactly once (or a broadcast constant, used anywhere) is
  folded into the elementwise node that uses it, so ``g = 1/n; dZ = g*2*(Z - Y)`` becomes
  ``dZ = 2*(Z - Y)/n`` and ``Z = XW + b; H = tanh(Z)`` becomes ``H = tanh(XW + b)`` when the
  backward pass does not need ``Z``.
- ``share``: a costly subexpression (a function call, a power) that several elementwise nodes
  compute becomes one node they all read: GELU's ``tanh`` computed forward is the one its
  derivative uses, and a polynomial model's ``x**3`` is computed once for the prediction and
  its gradient.
"""
from __future__ import annotations

import functools
from collections import Counter

import sympy as sp

from compiler.core import ir
from compiler.core.functions import stabilize
from compiler.core.ir import ARG


def use_counts(outputs):
    order = ir.topo_order(outputs)
    count = Counter()
    for node in order:
        for i in node.inputs:
            count[i.uid] += 1
    for o in outputs:
        count[o.uid] += 1
    return order, count


def fuse(outputs, names, cache=None, fixed=frozenset()):
    """Fold single-use elementwise nodes and broadcast constants into their elementwise users.

    Returns (new outputs, names carried over to the new nodes). ``cache``: a dict shared by
    the fusions of several graphs over the same nodes (backward, per-example gradients, hvp and
    gnvp each fuse the loss and its gradients): a node whose inputs fused to the same nodes,
    with the same single uses, fuses to the same node, built once. ``fixed``: uids of nodes of
    an already simplified graph (with every input of each in it too), kept as they are: hvp and
    gnvp are built on backward's simplified graph, whose nodes only gain users.
    """
    order, count = use_counts(outputs)
    cache = {} if cache is None else cache
    memo = {}
    new_names = {}
    for node in order:
        if not node.inputs or node.uid in fixed:
            new = node
        else:
            new_inputs = [memo[i.uid] for i in node.inputs]
            if node.op == "ew":
                key = (node.uid, tuple(i.uid for i in new_inputs), tuple(count[i.uid] == 1 for i in node.inputs))
            else:
                key = (node.uid, tuple(i.uid for i in new_inputs))
            new = cache.get(key)
            if new is None:
                if node.op == "ew":
                    new = _fuse_ew(node, memo, count)
                elif node.op == "sum":
                    new = ir.reduce_sum(new_inputs[0], node.attr("axes"))
                elif all(a is b for a, b in zip(new_inputs, node.inputs)):
                    new = node      # what make would return: the same op on the same inputs
                else:
                    new = ir.make(node.op, new_inputs, node.shape, node.attrs)
                cache[key] = new
        memo[node.uid] = new
        if node.digest in names:
            new_names.setdefault(new.digest, names[node.digest])
    return [memo[o.uid] for o in outputs], new_names


# Bounds on one fused elementwise expression. Without them a chain of k single-use elementwise
# nodes (the backward pass of k activation layers, or exp(exp(...)) forward) fuses into one
# expression k levels deep with k inputs: Python refuses to parse more than 200 nested
# parentheses, and the printers recurse once per level. A child that would break a bound stays
# a statement of its own, so every printed expression is shallow and reads as a formula.
MAX_FUSED_HEIGHT = 24
MAX_FUSED_INPUTS = 24


def height(expr):
    """Levels of the expression tree (a symbol or number is 1), computed without recursion."""
    best, stack = 0, [(expr, 1)]
    while stack:
        e, h = stack.pop()
        best = max(best, h)
        stack.extend((a, h + 1) for a in e.args)
    return best


def split_deep(outputs, names):
    """Split every elementwise expression deeper than MAX_FUSED_HEIGHT into a chain of
    elementwise nodes of bounded depth (``sin(sin(...(x)))`` 150 levels deep, as a spec may
    write it: differentiating or printing it in one piece exceeds Python's recursion limit).

    Returns (new outputs, names carried over to the new nodes); the graph itself when no
    expression is that deep (the usual case costs one height per elementwise node).
    """
    order = ir.topo_order(outputs)
    if not any(n.op == "ew" and height(n.attr("expr")) > MAX_FUSED_HEIGHT for n in order):
        return list(outputs), names
    memo, new_names = {}, dict(names)
    for node in order:
        if not node.inputs:
            new = node
        elif node.op == "ew":
            new = _split_ew(node.attr("expr"), [memo[i.uid] for i in node.inputs], node.shape)
        else:
            new = ir.make(node.op, [memo[i.uid] for i in node.inputs], node.shape, node.attrs)
        memo[node.uid] = new
        if node.digest in names:
            new_names.setdefault(new.digest, names[node.digest])
    return [memo[o.uid] for o in outputs], new_names


_CUT = ir.Symbols("_s")


def _bind(expr, bound, shape=None):
    """An elementwise node for ``expr``, whose symbols are keys of ``bound`` (symbol -> node)."""
    syms = sorted(expr.free_symbols, key=lambda s: s.name)
    return ir.ew(expr.xreplace({s: ARG[i] for i, s in enumerate(syms)}), [bound[s] for s in syms], shape=shape)


def _split_ew(expr, inputs, shape):
    """``expr`` over ``inputs`` as a chain of nodes: a subexpression that reaches the height
    bound becomes a node of its own, and a symbol in what is left. Iterative: the expression
    may be deeper than the recursion limit."""
    bound = {ARG[i]: node for i, node in enumerate(inputs)}
    rebuilt, tall = {}, {}
    stack = [(expr, False)]
    while stack:
        e, done = stack.pop()
        if e in rebuilt:
            continue
        if not done:
            stack.append((e, True))
            stack.extend((a, False) for a in e.args if a not in rebuilt)
            continue
        if not e.args:
            r, h = e, 1
        else:
            r, h = e.func(*[rebuilt[a] for a in e.args]), 1 + max(tall[a] for a in e.args)
        if h >= MAX_FUSED_HEIGHT and r.free_symbols:
            cut = _CUT[len(bound)]
            bound[cut] = _bind(r, bound)
            r, h = cut, 1
        rebuilt[e], tall[e] = r, h
    return _bind(rebuilt[expr], bound, shape)


def rebind(node, inputs):
    """The elementwise ``node`` over new ``inputs`` (one per input, same shapes): what
    ``ir.ew(expr, inputs)`` gives, without walking the expression when the new inputs keep
    the canonical order (ascending ranks, no two the same) that ``ir.ew`` would sort them into."""
    ranks = [i.rank for i in inputs]
    if all(a < b for a, b in zip(ranks, ranks[1:])):
        return ir.make("ew", inputs, node.shape, node.attrs)
    return ir.ew(node.attr("expr"), inputs, shape=node.shape)


@functools.lru_cache(maxsize=1 << 14)
def _stabilized(expr):
    return stabilize(expr)


def _fuse_ew(node, memo, count):
    expr = node.attr("expr")
    args, pattern = [], []
    top = _height(expr)
    for i, inp in enumerate(node.inputs):
        new_inp = memo[inp.uid]
        inline = new_inp.op == "ew" and (not new_inp.inputs or (count[inp.uid] == 1 and new_inp.shape == node.shape))
        if inline and new_inp.inputs:
            # an upper bound of the fused height: the child replaces a leaf of this expression
            inline = (top + _height(new_inp.attr("expr")) - 1 <= MAX_FUSED_HEIGHT
                      and len(args) + len(new_inp.inputs) + len(node.inputs) - i - 1 <= MAX_FUSED_INPUTS)
        if inline:
            pattern.append((new_inp.attr("expr"), len(new_inp.inputs)))
            args.extend(new_inp.inputs)
        else:
            pattern.append(None)
            args.append(new_inp)
    if not any(pattern):
        # nothing folded in: the expression is the node's own (over the same positions)
        fused = _stabilized(expr)
        if fused == expr:
            return rebind(node, args)
        return ir.ew(fused, args, shape=node.shape)
    return ir.ew(_folded(expr, tuple(pattern)), args, shape=node.shape)


@functools.lru_cache(maxsize=1 << 14)
def _height(expr):
    return height(expr)


@functools.lru_cache(maxsize=1 << 14)
def _folded(expr, pattern):
    """``expr`` with each ARG[i] whose ``pattern[i]`` is (child expression, its input count)
    replaced by the child, over the inputs renumbered in order (a child's inputs in the place
    of ARG[i]), stabilized. Memoised: the blocks of a deep network fold the same expressions."""
    subs, k = {}, 0
    for i, child in enumerate(pattern):
        if child is None:
            subs[ARG[i]] = _tmp(k)
            k += 1
        else:
            child_expr, m = child
            subs[ARG[i]] = child_expr.xreplace({ARG[j]: _tmp(k + j) for j in range(m)})
            k += m
    fused = expr.xreplace(subs).xreplace({_tmp(j): ARG[j] for j in range(k)})
    return _stabilized(fused)


_TMP = ir.Symbols("_f")


def _tmp(i):
    return _TMP[i]


def op_counts(outputs):
    """Counts of tensor operations and of scalar operations inside elementwise nodes."""
    order = ir.topo_order(outputs)
    tensor_ops = Counter(n.op for n in order if n.op not in ("input", "param"))
    scalar_ops = sum(sp.count_ops(n.attr("expr")) for n in order if n.op == "ew")
    return {"tensor_ops": dict(sorted(tensor_ops.items())), "total_tensor_ops": sum(tensor_ops.values()),
            "scalar_ops_in_elementwise": int(scalar_ops)}


def _costly(e):
    """A subexpression worth computing once: a function call (tanh, exp, erf, ...) or a power
    other than a reciprocal (``Z**2``, ``x**3``, ``sqrt(v)``)."""
    if isinstance(e, sp.Function):
        return True
    return isinstance(e, sp.Pow) and e.exp != -1 and not e.base.is_Number


def _keys(expr, compound=False):
    """The costly subexpressions of ``expr`` with free symbols, each once; ``compound``: its sums
    too (``1 - H**2``, tanh's derivative, by which a second-order entry point multiplies in the
    adjoint, the tangent and the tangent of the adjoint)."""
    out, stack, seen = [], [expr], set()
    while stack:
        e = stack.pop()
        if e in seen:
            continue
        seen.add(e)
        if (_costly(e) or compound and e.is_Add) and e.free_symbols:
            out.append(e)
        stack.extend(e.args)
    return out


_LEAF = ir.Symbols("_u")     # an input of the graph, by position in the node order
_SHARED = ir.Symbols("_h")   # a shared subexpression


class ShareCache:
    """What ``share`` computes per node, kept across the graphs of one program (backward,
    per-example gradients, hvp, gnvp share most of their nodes): each node's symbol ``_u<k>``
    (k: the order in which nodes were first seen, which is the position in the first graph),
    each elementwise node's expression over its inputs' symbols, and its costly subexpressions."""

    def __init__(self, compound=False):
        self.compound = compound    # sums are shared too (see _keys)
        self.index = {}       # uid -> k of its symbol _LEAF[k]
        self.nodes = []       # k -> node
        self.exprs = {}       # uid -> expression over _LEAF symbols (made when needed)
        self.keys_of = {}     # uid -> its costly subexpressions over _LEAF symbols

    def see(self, order):
        for n in order:
            if n.uid not in self.index:
                self.index[n.uid] = len(self.nodes)
                self.nodes.append(n)

    def keys(self, n):
        """The costly subexpressions of n's expression, over its inputs' symbols."""
        hit = self.keys_of.get(n.uid)
        if hit is None:
            keys = _arg_keys(n.attr("expr"), self.compound)
            if keys:
                to_leaf = self._to_leaf(n)
                keys = tuple(k.xreplace(to_leaf) for k in keys)
            hit = self.keys_of[n.uid] = keys
        return hit

    def expr(self, n):
        """n's expression over its inputs' symbols."""
        hit = self.exprs.get(n.uid)
        if hit is None:
            hit = self.exprs[n.uid] = n.attr("expr").xreplace(self._to_leaf(n))
        return hit

    def _to_leaf(self, n):
        return {ARG[i]: _LEAF[self.index[a.uid]] for i, a in enumerate(n.inputs)}


@functools.lru_cache(maxsize=1 << 14)
def _arg_keys(expr, compound=False):
    # per expression: the layers of a deep network repeat the same elementwise expressions
    return tuple(_keys(expr, compound))


@functools.lru_cache(maxsize=1 << 14)
def _share_rank(key):
    # larger first (sympy's count_ops, then the printed form: a deterministic order)
    return -sp.count_ops(key), -len(key.args), sp.srepr(key)


def share(outputs, names, cache=None, fixed=frozenset()):
    """Compute once what several elementwise nodes compute: the forward's ``tanh`` of a GELU
    that its derivative needs again, ``x**3`` of a polynomial model in the prediction and in a
    gradient. A costly subexpression (see ``_costly``) of the same values in two or more
    elementwise nodes becomes a node of its own, which they then read; larger ones first, so
    ``tanh(k*(Z + 0.044715*Z**3))`` is shared whole, and ``Z**3`` too if it is also used apart.

    Returns (new outputs, names: the shared nodes are named after what they compute).
    ``cache``: a ShareCache shared by the graphs of one program. ``fixed``: uids of nodes kept
    as they are (an already simplified graph, closed under inputs; see ``fuse``): only the
    other nodes share subexpressions among themselves.
    """
    cache = ShareCache() if cache is None else cache
    order = ir.topo_order(outputs)
    cache.see(order)
    position = {n.uid: k for k, n in enumerate(order)}
    ew_nodes = [n for n in order if n.op == "ew" and n.inputs and n.uid not in fixed]
    # each elementwise expression over its inputs' symbols, so that equal subexpressions of
    # different nodes are equal expressions
    by_uid = {n.uid: n for n in ew_nodes}
    exprs, holders = {}, {}

    def expr(uid):
        e = exprs.get(uid)
        if e is None:
            e = exprs[uid] = cache.expr(by_uid[uid])
        return e

    for n in ew_nodes:
        for key in cache.keys(n):
            holders.setdefault(key, []).append(n.uid)
    shared = [k for k, us in holders.items() if len(us) >= 2]
    if not shared:
        return list(outputs), names
    # larger first; equal ranks hold none of each other, so their order changes no result
    shared.sort(key=_share_rank)
    hoisted = {}                      # symbol -> its expression (over _u and earlier _h symbols)
    changed = set()                   # uids whose expression now reads a shared value
    for key in shared:
        users = [uid for uid in holders[key] if expr(uid).has(key)]
        users += [s for s, e in hoisted.items() if e.has(key)]
        if len(users) < 2:
            continue
        sym = _SHARED[len(hoisted)]
        hoisted = {s: e.xreplace({key: sym}) for s, e in hoisted.items()}
        hoisted[sym] = key
        for uid in holders[key]:
            exprs[uid] = expr(uid).xreplace({key: sym})
            changed.add(uid)
    if not hoisted:
        return list(outputs), names

    memo, new_names = {}, dict(names)

    def bind(expr, shape=None):
        # n (the batch size) may appear in an expression: it stays a symbol, not an input
        syms = sorted((s for s in expr.free_symbols if s.name.startswith((_LEAF.prefix, _SHARED.prefix))),
                      key=lambda s: s.name)
        return ir.ew(expr.xreplace({s: ARG[i] for i, s in enumerate(syms)}), [bound(s) for s in syms], shape=shape)

    def bound(sym):
        if sym.name.startswith(_LEAF.prefix):
            return memo[cache.nodes[int(sym.name[len(_LEAF.prefix):])].uid]
        if sym not in made:
            made[sym] = bind(hoisted[sym])
            new_names.setdefault(made[sym].digest,
                                 _shared_name(hoisted[sym], lambda k: order[k], position, cache, new_names))
        return made[sym]

    made = {}
    for node in order:
        same_inputs = all(memo[i.uid] is i for i in node.inputs)
        if node.uid in changed:
            new = bind(exprs[node.uid], node.shape)
        elif node.uid in by_uid and not same_inputs:
            new = rebind(node, [memo[i.uid] for i in node.inputs])
        elif node.inputs and not same_inputs:
            new = ir.make(node.op, [memo[i.uid] for i in node.inputs], node.shape, node.attrs)
        else:
            new = node        # what binding or making it again would give: nothing it reads changed
        memo[node.uid] = new
        if node.digest in names:
            new_names.setdefault(new.digest, names[node.digest])
    return [memo[o.uid] for o in outputs], new_names


def _shared_name(expr, at, position, cache, names):
    """``x_pow3`` for x**3, ``tanh_Z1`` for tanh(...Z1...), ``sin_x`` for sin(b*x): what a shared
    value computes (named after the first of its inputs in the graph's order that is not a
    parameter, else its first)."""
    nodes = [cache.nodes[int(s.name[len(_LEAF.prefix):])] for s in expr.free_symbols if s.name.startswith(_LEAF.prefix)]
    leaves = sorted((n.op == "param", position[n.uid]) for n in nodes)
    base = names.get(at(leaves[0][1]).digest, "t") if leaves else "t"
    if isinstance(expr, sp.Pow) and expr.exp.is_Integer:
        return f"{base}_pow{expr.exp}" if expr.exp > 0 else f"{base}_pow_m{-expr.exp}"
    if isinstance(expr, sp.Pow):
        return f"{base}_pow"
    if expr.is_Add:
        return f"{base}_e"          # 1 - H1**2: H1_e, another expression in H1 (core/naming.py)
    return f"{type(expr).__name__.lower()}_{base}"
