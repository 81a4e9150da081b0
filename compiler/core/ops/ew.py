"""``ew``: elementwise nodes, any number of inputs (maybe none: a constant); attr ``expr``, a
SymPy expression of symbols ARG[i] bound to the inputs, broadcast to the node's shape.

Elementwise derivatives are rewritten in terms of the forward output where possible
(tanh' = 1 - y**2, sigmoid' = y*(1 - y), exp' = y, relu' = step(y): the ``derivative`` column of
``scalar_functions.SCALAR_FUNCTIONS``), so the backward graph reuses forward values. Each backend prints the expression with its own scalar printer
(``emitter.elementwise``): elementwise math is the backend's printer's job.
"""
from __future__ import annotations

import functools
import operator
from functools import reduce

import sympy as sp

from compiler.core import ir, scalar_functions
from compiler.core.ir import ARG, alignment, broadcast_shapes, format_shape, make, padded_to
from compiler.core.ops import Op, register
from compiler.errors import ShapeError


def ew(expr, inputs, shape=None):
    """Elementwise node computing ``expr`` (in symbols ARG[i] bound to ``inputs[i]``).

    Duplicate inputs are merged, unused ones dropped and the rest renumbered in a canonical
    order, so that equal computations intern to one node. Returns an input unchanged when
    ``expr`` is just that input and the shapes agree; returns None when ``expr`` is zero.
    """
    expr = sp.sympify(expr)
    if expr == 0:
        return None
    inputs = list(inputs)
    out_shape = broadcast_shapes([i.shape for i in inputs] + ([tuple(shape)] if shape is not None else []))
    if shape is not None and tuple(shape) != out_shape:
        raise ShapeError(f"elementwise result {format_shape(out_shape)} is not the requested {format_shape(shape)}")
    # merge duplicates and drop unused inputs
    used = expr.free_symbols
    first_of = {}
    subs = {}
    for i, node in enumerate(inputs):
        if ARG[i] not in used:
            continue
        if node.uid in first_of:
            subs[ARG[i]] = ARG[first_of[node.uid]]
        else:
            first_of[node.uid] = i
    if subs:
        expr = expr.xreplace(subs)
    keep = sorted(first_of.items(), key=lambda kv: inputs[kv[1]].rank)  # canonical order (ir.Node.rank)
    if any(i != j for j, (_, i) in enumerate(keep)):
        expr = _renumbered(expr, tuple(i for _, i in keep))
    new_inputs = tuple(inputs[i] for _, i in keep)
    if expr == ARG[0] and len(new_inputs) == 1 and new_inputs[0].shape == out_shape:
        return new_inputs[0]
    return make("ew", new_inputs, out_shape, (("expr", expr),))


@functools.lru_cache(maxsize=1 << 15)
def _renumbered(expr, order):
    """``expr`` with ARG[order[j]] renamed ARG[j]: the same few expressions over inputs in
    another order recur in every layer."""
    return expr.xreplace({ARG[i]: ARG[j] for j, i in enumerate(order)})


def unbroadcast(contrib, arg_shape):
    """Sum ``contrib`` over the axes along which an argument of ``arg_shape`` was broadcast."""
    if contrib is None or contrib.shape == tuple(arg_shape):
        return contrib
    padded = padded_to(arg_shape, contrib.shape)
    axes = [i for i, (a, o) in enumerate(zip(padded, contrib.shape)) if a == 1 and o != 1]
    rank_extra = len(contrib.shape) - len(arg_shape)
    if alignment(arg_shape, contrib.shape) == "left":
        axes += list(range(len(arg_shape), len(contrib.shape)))
    else:
        axes += list(range(rank_extra))
    summed = ir.reduce_sum(contrib, axes)
    return ir.reshape(summed, arg_shape)


def _partial(partials, expr, i, y, reuse):
    """d expr / d ARG[i], with the forward output ``expr`` written as ``y`` where it occurs."""
    d = partials.diff(ARG[i])
    if reuse:
        # the exact occurrences first: cheap, and what is left is small (the derivative of
        # tanh(big sum) holds the sum, which subs would walk for every input)
        d = d.xreplace({expr: y})
    if d.has(sp.DiracDelta):
        # derivatives of sign/step: zero almost everywhere, as for relu at its kink
        d = d.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))
    if reuse:
        d = d.subs(expr, y)  # reuse the forward output
    return d


_Y = sp.Symbol("_y", real=True)     # the forward output in a partial derivative


@functools.lru_cache(maxsize=4096)
def _partials_of(expr):
    return _Partials(expr)


@functools.lru_cache(maxsize=1 << 15)
def partial(expr, i):
    """d expr / d ARG[i], the forward output written ``_y`` where it occurs (see _partial);
    memoised: the layers of a deep network repeat the same expressions, and the adjoint rule,
    the tangent rule (hvp, gnvp) and the per-example rules all take the same partials."""
    reuse = not expr.is_Symbol and not expr.is_Add
    return _partial(_partials_of(expr), expr, i, _Y, reuse)


def _ew_rule(node, g, wants):
    expr = node.attr("expr")
    k = len(node.inputs)
    y = _Y
    position = {ARG[i]: i for i in range(k)}
    out = []
    for i, inp in enumerate(node.inputs):
        if not wants[i]:
            out.append(None)
            continue
        d = partial(expr, i)
        # bind only the inputs the derivative uses: the term of one input of a big sum needs
        # few of them, and binding all k for each input would be quadratic in k
        used = sorted((position[s] for s in d.free_symbols if s in position))
        bind = {ARG[j]: ARG[m + 1] for m, j in enumerate(used)}
        bind[y] = ARG[len(used) + 1]
        args = [g, *(node.inputs[j] for j in used), node]
        contrib = ir.ew(ARG[0] * d.xreplace(bind), args, shape=node.shape)
        out.append(unbroadcast(contrib, inp.shape))
    return out


def _ew_jvp(node, t):
    """Tangent of an elementwise node: the sum over inputs of its partial derivative (the same
    partials as the adjoint rule, forward output reused) times the input's tangent."""
    if not any(ti is not None for ti in t):
        return None
    expr = node.attr("expr")
    tangent, used = _tangent(expr, len(node.inputs), tuple(ti is not None for ti in t))
    if tangent is None:
        return None
    return ir.ew(tangent, [*node.inputs, node, *(t[i] for i in used)], shape=node.shape)


@functools.lru_cache(maxsize=1 << 14)
def _tangent(expr, k, has):
    """(sum over inputs i with a tangent (``has[i]``) of d expr/d ARG[i] * ARG[k + 1 + j], the
    inputs i whose term is not zero, in order: j counts them), or (None, ()); the forward output
    is ARG[k]. Memoised: every block of a deep network has the same expressions, and SymPy
    evaluates each function again as it substitutes."""
    terms, used = [], []
    for i, has_tangent in enumerate(has):
        if not has_tangent:
            continue
        d = partial(expr, i).xreplace({_Y: ARG[k]})
        if d == 0:
            continue
        terms.append(ARG[k + 1 + len(used)] * d)
        used.append(i)
    if not terms:
        return None, ()
    return sp.Add(*terms), tuple(used)


class _Partials:
    """The partial derivatives of one expression, each visiting only the subterms that hold its
    symbol. SymPy's ``diff`` walks every term of a sum for every symbol (and recomputes free
    symbols as it goes), which is quadratic in the number of inputs of a big sum; here each sum
    and product indexes its arguments by symbol once. The results are SymPy's: a sum's
    derivative is the sum of its terms' derivatives (zero terms vanish either way); products,
    powers with a constant exponent and functions of one argument follow SymPy's own
    ``_eval_derivative``, the functions of the scalar-function table with its ``derivative``
    column (SymPy's own derivative, the flat parts of sign and Heaviside as 0: a test keeps
    them equal); anything else goes to ``sp.diff``."""

    def __init__(self, expr):
        self.expr = expr
        self._free = {}
        self._index = {}

    def free(self, e):
        out = self._free.get(e)
        if out is None:
            if e.is_Symbol:
                out = frozenset((e,))
            elif e.is_Add or e.is_Mul:
                out = frozenset().union(*(self.free(a) for a in e.args))
            else:
                out = frozenset(e.free_symbols)
            self._free[e] = out
        return out

    def index(self, e):
        """symbol -> positions of the arguments of ``e`` that hold it."""
        out = self._index.get(e)
        if out is None:
            out = {}
            for j, a in enumerate(e.args):
                for s in self.free(a):
                    out.setdefault(s, []).append(j)
            self._index[e] = out
        return out

    def diff(self, s, e=None):
        e = self.expr if e is None else e
        if s not in self.free(e):
            return sp.Integer(0)
        if e.is_Add:
            return sp.Add(*[self.diff(s, e.args[j]) for j in self.index(e)[s]])
        if e.is_Mul:
            args = list(e.args)
            terms = []
            for j in self.index(e)[s]:
                d = self.diff(s, args[j])
                if d:
                    terms.append(reduce(operator.mul, args[:j] + [d] + args[j + 1:], sp.Integer(1)))
            return sp.Add.fromiter(terms)
        if e.is_Pow and s not in self.free(e.exp):
            return e * (self.diff(s, e.base) * e.exp / e.base)        # Pow._eval_derivative, dexp = 0
        outer = scalar_functions.derivative_at(e)
        if outer is not None:
            return outer * self.diff(s, e.args[0])                  # the chain rule, from the table
        if isinstance(e, sp.Function) and len(e.args) == 1:
            try:
                outer = e.fdiff(1)
            except Exception:      # noqa: BLE001  (no closed form: let SymPy decide)
                return sp.diff(e, s)
            if outer.has(sp.Derivative):     # sign, Abs, ...: SymPy's diff knows better
                return sp.diff(e, s)
            return outer * self.diff(s, e.args[0])                  # Function._eval_derivative
        return sp.diff(e, s)


@functools.lru_cache(maxsize=8192)
def factored(expr):
    """``sp.factor_terms(expr)``, the form every printer writes, computed once per expression:
    the layers of a deep network repeat the same expressions over other inputs (a transformer's
    blocks share every one), and factor_terms is most of a compile's printing time."""
    return sp.factor_terms(expr)


@functools.lru_cache(maxsize=8192)
def shared_subexpressions(expr):
    """``(replacements, body)`` of ``sp.cse`` on one expression (temporaries ``_c0``, ``_c1``,
    ...), once per expression, for the backends' elementwise statements."""
    reps, (body,) = sp.cse([expr], symbols=sp.numbered_symbols("_c"), optimizations=None)
    return tuple(reps), body


def _text(node, a, fm):
    return fm.print_text(factored(node.attr("expr")), {ARG[i]: x for i, x in enumerate(a)})


def _latex(node, a, fm):
    # inputs of shape () multiply by juxtaposition; products of the others are elementwise
    scalars = {ARG[i] for i, x in enumerate(node.inputs) if x.shape == ()}
    return fm.print_latex(factored(node.attr("expr")), {ARG[i]: x for i, x in enumerate(a)}, scalars)


register(Op("ew", (ew,), _ew_rule, _text, _latex, statements={
    "numpy": lambda st, node: st.elementwise(node),
    "c": lambda st, node: st.elementwise(node),
}, jvp=_ew_jvp))
