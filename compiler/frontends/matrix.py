"""Networks written with SymPy matrix expressions, per sample, compiled over a batch.

Write the network for one sample, in the usual math notation, with ``MatrixSymbol``, ``*``,
``+``, ``.T``, ``applyfunc`` and ``HadamardProduct``::

    x = MatrixSymbol("x", 2, 1); y = MatrixSymbol("y", 1, 1)
    W1, b1 = MatrixSymbol("W1", 16, 2), MatrixSymbol("b1", 16, 1)
    W2, b2 = MatrixSymbol("W2", 1, 16), MatrixSymbol("b2", 1, 1)
    out = W2 * (W1 * x + b1).applyfunc(tanh) + b2
    model = from_matrix_expr(out, inputs=[x], targets=[y], loss="mse")

Data symbols are per-sample column (k, 1) or row (1, k) vectors; the compiler batches them as
``(n, k)`` arrays (each row a sample), so ``W1 * x`` becomes ``x @ W1.T``. Parameters keep the
shapes declared. The loss is a built-in name applied to ``output``, or a per-sample 1x1
matrix expression (e.g. ``(out - y).T * (out - y)``), averaged over the batch. SymPy's own
``diff`` is not used for matrices: the compiler's chain rule works on the batched graph.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sympy as sp
from sympy.matrices.expressions.applyfunc import ElementwiseApplyFunction
from sympy.matrices.expressions.hadamard import HadamardPower

from compiler.core import ir
from compiler.errors import ModelError, ShapeError, UnsupportedError
from compiler.core.functions import activation as resolve_activation, check_finite
from compiler.core.ir import ARG, N
from compiler.core.model import Model, check_name, check_target_kind
from compiler.frontends.nn import apply_loss, loss_kind

_x = sp.Symbol("x", real=True)


@dataclass(frozen=True)
class _Val:
    node: object
    batched: bool
    ps: tuple  # per-sample matrix shape (rows, cols); for parameters, the parameter shape

    @property
    def scalar(self):
        return self.ps == (1, 1)


def _dims(expr):
    r, c = expr.shape
    if not (isinstance(r, (int, sp.Integer)) and isinstance(c, (int, sp.Integer))):
        raise ShapeError(f"{expr} must have integer dimensions, got {expr.shape}")
    return int(r), int(c)


class _Converter:
    def __init__(self, inputs, targets, params, names):
        self.leaves = {}
        self.names = names
        self.counts = {}
        self.cache = {}
        for sym, node in (*inputs, *targets):
            self.leaves[sym] = _Val(node, True, _dims(sym) if isinstance(sym, sp.MatrixSymbol) else (1, 1))
        for sym, node in params:
            self.leaves[sym] = _Val(node, False, _dims(sym) if isinstance(sym, sp.MatrixSymbol) else (1, 1))

    def batched_node(self, v, ps=None):
        """The node of ``v`` shaped to broadcast against a batch of per-sample shape ``ps``."""
        if v.batched:
            return v.node
        r, c = v.ps
        if not isinstance(v.node.shape, tuple) or v.node.shape == ():
            return v.node
        base = self.names.get(_leaf(v.node).digest)
        if (r, c) == (1, 1):
            return self._named(ir.reshape(v.node, ()), base and base + "_s")
        if c == 1:
            # (k, 1) -> (1, k), which broadcasts against (n, k)
            return self._named(ir.transpose(v.node), base and base + "T")
        if r == 1:
            return v.node
        raise ShapeError(f"a parameter matrix of shape {v.ps} cannot combine elementwise with per-sample data")

    def _named(self, node, name):
        if name:
            self.names.setdefault(node.digest, name)
        return node

    # readable names for intermediate values, so adjoints read dZ1, dH1, ... not dt7
    _KIND_NAMES = {"MatAdd": "Z", "MatMul": "M", "HadamardProduct": "A", "HadamardPower": "A",
                   "ElementwiseApplyFunction": "H"}

    def convert(self, e):
        key = e
        if key in self.cache:
            return self.cache[key]
        out = self._convert(e)
        self.cache[key] = out
        prefix = self._KIND_NAMES.get(type(e).__name__)
        if prefix and out.node.digest not in self.names and out.node.op not in ("input", "param"):
            self.counts[prefix] = self.counts.get(prefix, 0) + 1
            self._named(out.node, f"{prefix}{self.counts[prefix]}")
            if out.node.op == "reshape":   # the product behind a per-sample number
                self._named(out.node.inputs[0], f"{prefix}{self.counts[prefix]}m")
        return out

    def _convert(self, e):
        if e in self.leaves:
            return self.leaves[e]
        if isinstance(e, sp.MatrixSymbol):
            raise ModelError(f"matrix symbol {e.name} is neither an input, a target nor a parameter")
        if isinstance(e, sp.Symbol):
            raise ModelError(f"symbol {e.name} is neither an input, a target nor a parameter")
        if isinstance(e, sp.Transpose):
            v = self.convert(e.arg)
            if v.batched:
                return _Val(v.node, True, v.ps[::-1])
            return _Val(ir.transpose(v.node) if len(v.node.shape) == 2 else v.node, False, v.ps[::-1])
        if isinstance(e, sp.MatAdd):
            return self._elementwise(sum(ARG[i] for i in range(len(e.args))), [self.convert(a) for a in e.args], e)
        if isinstance(e, sp.HadamardProduct):
            return self._elementwise(sp.Mul(*ARG[:len(e.args)]), [self.convert(a) for a in e.args], e)
        if isinstance(e, HadamardPower):
            if not (e.exp.is_Integer and e.exp > 0):
                raise UnsupportedError(f"{e}: only positive integer Hadamard powers are supported")
            return self._elementwise(ARG[0] ** int(e.exp), [self.convert(e.base)], e)
        if isinstance(e, ElementwiseApplyFunction):
            f, _ = resolve_activation(e.function)
            return self._elementwise(f.xreplace({_x: ARG[0]}), [self.convert(e.expr)], e)
        if isinstance(e, sp.MatMul):
            scalars = [a for a in e.args if not getattr(a, "is_Matrix", False)]
            mats = [a for a in e.args if getattr(a, "is_Matrix", False)]
            acc = self.convert(mats[0])
            for m in mats[1:]:
                acc = self._product(acc, self.convert(m), e)
            factor = sp.Mul(*scalars)
            if factor != 1:
                acc = self._scale(factor, acc, e)
            return acc
        if isinstance(e, sp.MatrixExpr):
            raise UnsupportedError(f"{type(e).__name__} ({e}) is not supported in matrix networks; "
                                   "use MatrixSymbol, +, *, .T, applyfunc and HadamardProduct")
        raise UnsupportedError(f"{e} ({type(e).__name__}) is not supported in matrix networks")

    def _scale(self, factor, v, where):
        syms = sorted(factor.free_symbols, key=lambda s: s.name)
        vals = [self.leaves.get(s) for s in syms]
        if any(x is None for x in vals):
            missing = [s.name for s, x in zip(syms, vals) if x is None]
            raise ModelError(f"symbol(s) {', '.join(missing)} in {where} are not declared")
        check_finite(factor, str(where))
        expr = factor.xreplace({s: ARG[i + 1] for i, s in enumerate(syms)}) * ARG[0]
        return self._elementwise(expr, [v, *vals], where)

    def _elementwise(self, expr, vals, where):
        shapes = {v.ps for v in vals if not v.scalar}
        if len(shapes) > 1:
            raise ShapeError(f"{where}: operands of shapes {sorted(shapes)} do not match")
        ps = shapes.pop() if shapes else (1, 1)
        batched = any(v.batched for v in vals)
        if not batched:
            nodes = [v.node for v in vals]
        else:
            nodes = [self.batched_node(v, ps) for v in vals]
            if ps != (1, 1):
                # one number per sample, (n,), meets vectors: as (n, 1) it broadcasts against
                # both (n, k) data and (1, k) parameter rows
                nodes = [ir.reshape(node, (N, 1)) if v.batched and v.scalar else node
                         for v, node in zip(vals, nodes)]
        node = ir.ew(expr, nodes)
        if node is None:
            raise ModelError(f"{where} is identically zero")
        return _Val(node, batched, ps)

    def _product(self, a, b, where):
        if a.ps[1] != b.ps[0]:
            raise ShapeError(f"{where}: cannot multiply {a.ps} by {b.ps}")
        if not a.batched and not b.batched:
            return _Val(ir.matmul(a.node, b.node), False, (a.ps[0], b.ps[1]))
        out_ps = (a.ps[0], b.ps[1])
        if a.scalar or b.scalar:   # (1,1) per sample times a vector: a scaling
            return self._elementwise(ARG[0] * ARG[1], [a, b], where)
        if out_ps[0] != 1 and out_ps[1] != 1:
            raise UnsupportedError(f"{where}: the product is a {out_ps[0]}x{out_ps[1]} matrix per sample; "
                                   "only vectors and scalars per sample are supported")
        if a.batched and b.batched:       # row . column per sample: a dot product
            return _Val(ir.reduce_sum(ir.ew(ARG[0] * ARG[1], [a.node, b.node]), (1,)), True, (1, 1))
        if not a.batched:                 # W (r, c) @ x (c, 1)  ->  X @ W.T
            node = ir.matmul(b.node, a.node, tb=True)
        else:                             # x.T (1, c) @ W (c, k)  ->  X @ W
            node = ir.matmul(a.node, b.node)
        if out_ps == (1, 1):              # one number per sample is held as (n,)
            node = ir.reshape(node, (N,))
        return _Val(node, True, out_ps)


def _leaf(node):
    while node.op in ("transpose", "reshape"):
        node = node.inputs[0]
    return node


def _leaf_shape(sym, what):
    if isinstance(sym, sp.MatrixSymbol):
        r, c = _dims(sym)
        if r != 1 and c != 1:
            raise ShapeError(f"{what} {sym.name} must be a per-sample vector (k, 1) or (1, k), got {(r, c)}")
        return (N,) if (r, c) == (1, 1) else (N, max(r, c))
    if isinstance(sym, sp.Symbol):
        return (N,)
    raise ModelError(f"{what} must be MatrixSymbols or Symbols, got {sym!r}")


def from_matrix_expr(output: sp.MatrixExpr, inputs: Sequence[sp.MatrixSymbol],
                     targets: Sequence[sp.MatrixSymbol], loss: str | sp.Expr = "mse",
                     params: Sequence[sp.MatrixSymbol | sp.Symbol] | None = None,
                     target_kind: str = "real", init: Mapping[str, tuple] | None = None,
                     name: str = "model") -> Model:
    """Build a Model from a per-sample SymPy matrix expression (see the module docstring).

    ``params`` defaults to every other MatrixSymbol (and Symbol) in the expressions. ``init``
    maps parameter names to ('glorot', fan_in, fan_out), ('he', fan_in), ('zeros',) or
    ('value', v); by default matrices are Glorot-initialised and vectors start at zero.
    ``target_kind='label'`` makes a single target hold integer class labels (for
    ``softmax_cross_entropy``).
    """
    if not isinstance(output, sp.MatrixExpr):
        raise ModelError(f"output must be a SymPy matrix expression, got {type(output).__name__}")
    check_target_kind(target_kind, "target_kind")
    names = {}
    inputs, targets = list(inputs), list(targets)
    in_nodes = []
    for s in inputs:
        node = ir.input_node(check_name(s.name, "input"), _leaf_shape(s, "input"), "data")
        names[node.digest] = s.name
        in_nodes.append((s, node))
    tg_nodes = []
    for s in targets:
        kind = target_kind
        node = ir.input_node(check_name(s.name, "target"), _leaf_shape(s, "target") if kind != "label" else (N,),
                             "target", kind)
        names[node.digest] = s.name
        tg_nodes.append((s, node))
    declared = {s for s, _ in (*in_nodes, *tg_nodes)}
    exprs = [output] + ([loss] if isinstance(loss, sp.Basic) else [])
    if params is None:
        found = set()
        for ex in exprs:
            found |= {a for a in sp.preorder_traversal(ex) if isinstance(a, (sp.MatrixSymbol, sp.Symbol))
                      and not isinstance(a, sp.Dummy)}
        # symbols bound inside applyfunc Lambdas are not parameters
        bound = set()
        for ex in exprs:
            for a in sp.preorder_traversal(ex):
                if isinstance(a, sp.Lambda):
                    bound |= set(a.variables)
        params = sorted(found - declared - bound, key=lambda s: s.name)
    p_nodes = []
    init = dict(init or {})
    inits = {}
    for s in params:
        if isinstance(s, sp.MatrixSymbol):
            shape = _dims(s)
        elif isinstance(s, sp.Symbol):
            shape = ()
        else:
            raise ModelError(f"parameters must be MatrixSymbols or Symbols, got {s!r}")
        node = ir.param_node(check_name(s.name, "parameter"), shape)
        names[node.digest] = s.name
        p_nodes.append((s, node))
    conv = _Converter(in_nodes, tg_nodes, p_nodes, names)
    out = conv.convert(output)
    if out.node.op not in ("input", "param"):
        names[out.node.digest] = "out"
    loss_val = conv.convert(loss) if isinstance(loss, sp.Basic) else None
    # parameters that enter a matrix product are weights (Glorot); the others start at zero
    weights = set()
    for node in ir.topo_order([out.node] + ([loss_val.node] if loss_val else [])):
        if node.op == "matmul":
            weights |= {_leaf(i).uid for i in node.inputs}
    for s, node in p_nodes:
        if s.name in init:
            inits[s.name] = tuple(init.pop(s.name))
        elif node.uid in weights:
            r, c = node.shape
            inits[s.name] = ("glorot", c, r)
        else:
            inits[s.name] = ("zeros",) if node.shape else ("value", 0.0)
    if init:
        raise ModelError(f"init given for unknown parameter(s) {', '.join(sorted(init))}")
    if not out.batched:
        raise ModelError("the output does not depend on any input")
    if isinstance(loss, str):
        if len(tg_nodes) != 1:
            raise ModelError(f"loss {loss!r} needs exactly one target, got {len(tg_nodes)}")
        pred, L = apply_loss(loss, out.node, tg_nodes[0][1], names)
    elif isinstance(loss, sp.MatrixExpr) or isinstance(loss, sp.Basic):
        lv = loss_val
        if lv.ps != (1, 1):
            raise ShapeError(f"the loss must be 1x1 per sample, got {lv.ps}")
        per = lv.node if lv.batched else ir.ew(ARG[0], [lv.node], shape=(N,))
        names.setdefault(per.digest, "E")
        pred, L = out.node, ir.mean(per)
        names.setdefault(L.digest, "L")
    else:
        raise ModelError(f"loss must be a name or a matrix expression, got {type(loss).__name__}")
    used = {n.uid for n in ir.topo_order([L, pred])}
    return Model(check_name(name, "model", reserved=False), tuple(n for _, n in in_nodes), tuple(n for _, n in tg_nodes),
                 tuple(n for _, n in p_nodes if n.uid in used), pred, L, names,
                 {n.name: inits[n.name] for _, n in p_nodes if n.uid in used},
                 loss_kind=loss_kind(loss))
