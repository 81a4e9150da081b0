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

from . import ir
from .functions import stabilize
from .ir import ARG


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
# parentheses, the printers recurse once per level, and ARG runs out of symbols. A child that
# would break a bound stays a statement of its own, so every printed expression is shallow.
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


_TMP = tuple(sp.Symbol(f"_f{i}", real=True) for i in range(len(ARG)))


def _tmp(i):
    return _TMP[i]


def op_counts(outputs):
    """Counts of tensor operations and of scalar operations inside elementwise nodes."""
    order = ir.topo_order(outputs)
    tensor_ops = Counter(n.op for n in order if n.op not in ("input", "param"))
    scalar_ops = sum(sp.count_ops(n.attr("expr")) for n in order if n.op == "ew")
    return {"tensor_ops": dict(sorted(tensor_ops.items())), "total_tensor_ops": sum(tensor_ops.values()),
            "scalar_ops_in_elementwise": int(scalar_ops)}
