"""Readable names for the values nobody named.

The frontends name what a user declared (``Z1``, ``H1``, ``S2``) and the reverse sweep names
each adjoint after its value (``dZ1``). What is left, a row sum inside a norm, the share of an
adjoint that flows back through one of several users, a reshape between two products, is named
here from what it computes, so that formulas read ``sum_H1 = sum(H1, axis=1)`` and
``dh1 = dS2 + dh1_Zf2`` instead of ``t1`` and ``t4``.

Conventions (also in the README, "How it works"):

- ``sum_X``: a sum of X (``sum_A4_times_dA4``: of A4*dA4, a softmax adjoint's row sum);
- ``dX_C``: the part of dX that flows back through X's user C (``dh1_Wf2`` through ``h1 @ Wf2``),
  when X has several users;
- ``X_flat`` / ``X_col``: X reshaped to fewer / more axes; ``X_T``: transposed;
  ``X_part``: a slice of X; ``X_plus_Y``, ``X_times_Y``: a sum, a product; ``X_Y``: another
  expression of X and Y;
- ``exp_X``: a function of X; ``X_e``: another expression in X alone;
- ``dX`` of any of these: its adjoint. A name that would pass 32 characters stays ``t<k>``.
"""
from __future__ import annotations

import re

import sympy as sp

# how many operand names a derived name is made of, at most: longer names stop being readable
_WIDTH = 2
_LONGEST = 32
_TEMP = re.compile(r"t\d+")


def derived_name(node, name_of):
    """A name for the unnamed ``node`` from its operation and its operands' names, or None.

    ``name_of(input_node)`` returns an input's name (None if it has none); inputs without names
    (constants, unnamed helpers) are skipped."""
    operands = []
    for i in node.inputs:
        n = name_of(i)
        if n and not _TEMP.fullmatch(n) and n not in operands:
            operands.append(n)
    if not operands:
        return None
    first = operands[0]
    op = node.op
    if op in ("sum", "mean"):
        return _short(f"{op}_" + "_".join(operands[:_WIDTH]))
    if op == "reshape":
        before, after = len(node.inputs[0].shape), len(node.shape)
        return _short(f"{first}_flat" if after < before else f"{first}_col" if after > before else f"{first}_r")
    if op in ("transpose", "permute"):
        return _short(f"{first}_T")
    if op == "slice_last":
        return _short(f"{first}_part")
    if op == "ew":
        expr = node.attr("expr")
        if len(operands) == 2 and len(node.inputs) == 2:
            # a residual sum or a gate: H1_plus_H2 (H1_H2 would read as "the part of dH1 through H2")
            word = "plus" if isinstance(expr, sp.Add) else "times" if isinstance(expr, sp.Mul) else None
            if word:
                return _short(f"{operands[0]}_{word}_{operands[1]}")
        if len(operands) == 1 and isinstance(expr, sp.Function):
            return _short(f"{type(expr).__name__.lower()}_{first}")     # exp_x, tanh_Z1
        if len(operands) == 1:
            return _short(f"{first}_e")     # an expression in X alone (X itself names X)
    return _short("_".join(operands[:_WIDTH]))


def _short(name):
    """Derived names of derived names grow; past a line's worth they stop helping a reader."""
    return name if len(name) <= _LONGEST else None


def contribution_name(adjoint_name, value_name, user_name):
    """The name of the part of ``adjoint_name`` (dX) that flows back through X's user: the
    user's name without X's own (``dh1_Wf2`` through ``h1Wf2``, ``dh1_Zf2`` through ``Zf2``)."""
    path = user_name
    if value_name and user_name.startswith(value_name):
        path = user_name[len(value_name):].lstrip("_") or user_name
    return f"{adjoint_name}_{path}"
