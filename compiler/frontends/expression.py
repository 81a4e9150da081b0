"""Expression models: a scalar SymPy expression over parameters and per-sample data symbols.

Example (curve fitting)::

    a, b, c, d, x = sympy.symbols("a b c d x")
    model = expression_model(a*x**3 + b*x**2 + c*x + d, params={a: 0, b: 0, c: 0, d: 0},
                             inputs=[x])               # loss (p - y)**2, target y

Data symbols become 1-D batch arrays ``(n,)``; parameters stay scalars. The loss is a SymPy
expression of the prediction symbol ``p`` and the target symbols (and, for regularisation,
the parameters), averaged over the batch.
"""
from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence

import sympy as sp

from compiler.core import ir
from compiler.errors import ModelError
from compiler.core.functions import check_supported, realify, stabilize
from compiler.core.ir import ARG, N
from compiler.core.model import Model, check_name


def _symbols(items, what):
    out = []
    for s in items:
        if isinstance(s, str):
            s = sp.Symbol(s)
        if not isinstance(s, sp.Symbol):
            raise ModelError(f"{what} must be SymPy symbols or names, got {s!r}")
        check_name(s.name, what)
        out.append(sp.Symbol(s.name, real=True))
    return out


def expression_model(prediction: sp.Expr, params: Mapping[sp.Symbol, float],
                     inputs: Sequence[sp.Symbol], targets: Sequence[sp.Symbol] | None = None,
                     loss: sp.Expr | None = None, prediction_symbol: str = "p",
                     name: str = "model") -> Model:
    """Build a Model from a scalar expression.

    ``params`` maps parameter symbols (or names) to initial values, or lists symbols
    (initialised to 0). ``inputs`` lists the data symbols, ``targets`` the target symbols
    (default ``[y]``). ``loss`` is an expression of ``prediction_symbol`` and the targets;
    the default is ``(p - y)**2`` for a single target.
    """
    if not isinstance(prediction, sp.Basic):
        raise ModelError(f"the prediction must be a SymPy expression, got {type(prediction).__name__}")
    if isinstance(params, dict):
        pairs = list(params.items())
    else:
        pairs = [(p, 0.0) for p in params]
    psyms = _symbols([k for k, _ in pairs], "parameter")
    inits = {}
    for s, (_, v) in zip(psyms, pairs):
        if isinstance(v, sp.Basic) and v.is_number and v.is_real:
            v = float(v)                               # pi/4, sqrt(2), Rational(1, 3)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ModelError(f"initial value of parameter {s.name!r} must be a finite number, got {v!r}")
        inits[s.name] = ("value", float(v))
    xsyms = _symbols(inputs, "input")
    tsyms = _symbols(targets if targets is not None else ["y"], "target")
    psym = sp.Symbol(check_name(str(prediction_symbol), "prediction symbol"), real=True)
    all_names = [s.name for s in (*psyms, *xsyms, *tsyms)]
    dup = sorted(n for n, k in Counter(all_names).items() if k > 1)
    if dup:
        raise ModelError(f"symbol(s) {', '.join(dup)} are declared more than once")
    if psym.name in all_names:
        raise ModelError(f"the prediction symbol {psym.name!r} clashes with a declared symbol")

    expr = stabilize(realify(prediction))
    check_supported(expr, "prediction")
    known = {s.name: s for s in (*psyms, *xsyms)}
    extra = sorted(s.name for s in expr.free_symbols if s.name not in known)
    if extra:
        raise ModelError(f"the prediction uses undefined symbol(s) {', '.join(extra)}; declare them "
                         "as parameters or inputs")
    if not xsyms:
        raise ModelError("an expression model needs at least one data input")

    names = {}
    nodes = {}
    for s in psyms:
        nodes[s] = ir.param_node(s.name, ())
    for s in xsyms:
        nodes[s] = ir.input_node(s.name, (N,), "data")
    for s in tsyms:
        nodes[s] = ir.input_node(s.name, (N,), "target")
    for s, node in nodes.items():
        names[node.digest] = s.name

    def to_node(e, shape, nm):
        syms = sorted(e.free_symbols, key=lambda s: s.name)
        node = ir.ew(e.xreplace({s: ARG[i] for i, s in enumerate(syms)}), [nodes[s] for s in syms], shape=shape)
        names.setdefault(node.digest, nm)
        return node

    if not (expr.free_symbols & set(psyms)):
        raise ModelError(f"the prediction {prediction} does not depend on any parameter")
    pred = to_node(expr, (N,), psym.name)
    if loss is None:
        if len(tsyms) != 1:
            raise ModelError("give a loss expression: the default (p - y)**2 needs exactly one target")
        loss = (psym - tsyms[0]) ** 2
    if not isinstance(loss, sp.Basic):
        # never sympify text: it runs eval (spec files parse theirs with compiler.spec.safe_expr)
        raise ModelError(f"the loss must be a SymPy expression, got {type(loss).__name__}")
    lexpr = stabilize(realify(loss))
    check_supported(lexpr, "loss")
    if lexpr == 0 or not any(s.name == psym.name for s in lexpr.free_symbols):
        raise ModelError(f"the loss {loss} does not depend on the prediction {psym.name}")
    allowed = {psym.name, *(s.name for s in tsyms), *(s.name for s in psyms)}
    extra = sorted(s.name for s in lexpr.free_symbols if s.name not in allowed)
    if extra:
        raise ModelError(f"the loss uses undefined symbol(s) {', '.join(extra)}; it may use "
                         f"{psym.name} (the prediction), the targets and the parameters")
    # the loss sees the prediction as a node, so the gradient flows through it once
    syms = sorted(lexpr.free_symbols, key=lambda s: s.name)
    bind = [pred if s.name == psym.name else nodes[next(k for k in nodes if k.name == s.name)] for s in syms]
    per = ir.ew(lexpr.xreplace({s: ARG[i] for i, s in enumerate(syms)}), bind, shape=(N,))
    names.setdefault(per.digest, "E")
    L = ir.mean(per)
    names.setdefault(L.digest, "L")
    used = {n.uid for n in ir.topo_order([L])}
    unused_inputs = [s.name for s in (*xsyms, *tsyms) if nodes[s].uid not in used and nodes[s].uid not in {n.uid for n in ir.topo_order([pred])}]
    if unused_inputs:
        raise ModelError(f"symbol(s) {', '.join(unused_inputs)} are declared but not used")
    return Model(check_name(name, "model", reserved=False), tuple(nodes[s] for s in xsyms), tuple(nodes[s] for s in tsyms),
                 tuple(nodes[s] for s in psyms), pred, L, names, inits)
