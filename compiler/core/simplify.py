"""Simplification passes, each ``graph -> graph``: elementwise fusion and operation counts.

Interning already shares equal subexpressions between forward and backward (common
subexpression elimination at the tensor level), elementwise derivatives already reuse forward
outputs, and zero adjoints were never built. What is left here:

- ``fuse``: an elementwise node used exactly once (or a broadcast constant, used anywhere) is
  folded into the elementwise node that uses it, so ``g = 1/n; dZ = g*2*(Z - Y)`` becomes
  ``dZ = 2*(Z - Y)/n`` and ``Z = XW + b; H = tanh(Z)`` becomes ``H = tanh(XW + b)`` when the
  backward pass does not need ``Z``.
"""
from __future__ import annotations

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


def fuse(outputs, names):
    """Fold single-use elementwise nodes and broadcast constants into their elementwise users.

    Returns (new outputs, names carried over to the new nodes).
    """
    order, count = use_counts(outputs)
    memo = {}
    new_names = {}
    for node in order:
        if node.op == "ew" and node.inputs:
            new = _fuse_ew(node, memo, count)
        elif node.op == "sum":
            new = ir.reduce_sum(memo[node.inputs[0].uid], node.attr("axes"))
        else:
            new = ir.make(node.op, [memo[i.uid] for i in node.inputs], node.shape, node.attrs)
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


def _fuse_ew(node, memo, count):
    expr = node.attr("expr")
    args, subs = [], {}
    top = height(expr)
    for i, inp in enumerate(node.inputs):
        new_inp = memo[inp.uid]
        inline = new_inp.op == "ew" and (not new_inp.inputs or (count[inp.uid] == 1 and new_inp.shape == node.shape))
        if inline and new_inp.inputs:
            # an upper bound of the fused height: the child replaces a leaf of this expression
            inline = (top + height(new_inp.attr("expr")) - 1 <= MAX_FUSED_HEIGHT
                      and len(args) + len(new_inp.inputs) + len(node.inputs) - i - 1 <= MAX_FUSED_INPUTS)
        if inline:
            child = new_inp.attr("expr")
            offset = len(args)
            subs[ARG[i]] = child.xreplace({ARG[j]: _tmp(offset + j) for j in range(len(new_inp.inputs))})
            args.extend(new_inp.inputs)
        else:
            subs[ARG[i]] = _tmp(len(args))
            args.append(new_inp)
    fused = expr.xreplace(subs).xreplace({_tmp(j): ARG[j] for j in range(len(args))})
    return ir.ew(stabilize(fused), args, shape=node.shape)


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
