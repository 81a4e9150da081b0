"""The tensor-level IR: small immutable nodes, interned so equal nodes are shared.

Every value has a shape whose entries are ints or the batch symbol ``N`` (printed ``n``).
Data arrays are batch-first. Broadcasting follows NumPy (right-aligned), with one addition:
an array whose first axis is the batch axis, combined with a higher-rank batch array, is
left-aligned (a per-sample number ``(n,)`` against ``(n, k)`` means ``A[:, None]``).

The leaves of a graph (``Node.op``, inputs, attrs):

==========  ======================  ===========================================
op          inputs                  attrs
==========  ======================  ===========================================
input       -                       name, role ("data" | "target" | "mask" | "stat" | "mode"),
                                    kind ("real" | "label" | "ids": integer token ids); a mask
                                    (dropout) also has rate; a stat is a batchnorm running
                                    statistic (with init), the mode the training flag
param       -                       name
==========  ======================  ===========================================

Every other op is a record of ``compiler.core.ops``, one module per op or small family
(``ew``, ``matmul``, ``transpose``, ``reshape``, ``sum``/``mean``, ``lse``/``softmax``,
``xent``/``xent_grad``, ``concat``/``slice_last``, ``embed``/``embed_grad``, ``permute``, ``bmm``,
``causal_mask``/``key_mask``), whose docstring gives its inputs and attributes and which holds its
constructor, adjoint rule, formulas and backend statements; the constructors are reachable
here as ``ir.<name>`` (``ir.ew``, ``ir.matmul``, ``ir.reduce_sum``, ...). Nodes also take the
Python operators ``+ - * / @`` (``compiler.core.operators``), so ``h + x`` is a residual.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import threading
import weakref
from dataclasses import dataclass, field

import sympy as sp
from sympy.printing.repr import ReprPrinter

from compiler.errors import ShapeError

N = sp.Symbol("n", integer=True, positive=True)


class Symbols:
    """``S[i]``: the i-th of an endless family of real symbols (``_a0``, ``_a1``, ...), made on
    first use; ``S[:k]`` is the first k. An elementwise node may have any number of inputs
    (an expression model with 100 parameters), so no fixed tuple can hold them all."""

    def __init__(self, prefix):
        self.prefix = prefix
        self._made = []
        self._lock = threading.Lock()    # models may be compiled from several threads

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(i.stop)[i])
        if i >= len(self._made):
            with self._lock:             # else two threads could append the same name twice
                while len(self._made) <= i:
                    self._made.append(sp.Symbol(f"{self.prefix}{len(self._made)}", real=True))
        return self._made[i]


ARG = Symbols("_a")
_uids = itertools.count()


@dataclass(frozen=True, eq=False)
class Node:
    op: str
    inputs: tuple
    shape: tuple
    attrs: tuple = ()
    digest: str = ""  # structural hash: equal computations, equal digest, in any process
    # the canonical order of an elementwise node's inputs (ops.ew): by what each computes locally
    # (its op, shape and attributes other than a leaf's name, with those of its inputs), then by
    # digest; so the same layer in every block of a deep network orders its inputs alike and is
    # the same expression (whose derivatives, factored form and printing are memoised per
    # expression), where digest order gave each block another permutation
    rank: tuple = ()
    uid: int = field(default_factory=lambda: next(_uids))

    def attr(self, key, default=None):
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def name(self):
        return self.attr("name")

    def __repr__(self):
        return f"<{self.op} {self.name or self.digest[:6]} {format_shape(self.shape)}>"

    # -- operators: ``h + x`` (a residual), ``h * g`` (a gate), ``h @ W``, elementwise with
    # NumPy broadcasting; see compiler.core.operators for what each accepts
    __array_ufunc__ = None     # ``ndarray + node`` reaches __radd__ (which says what to write)

    def __add__(self, other):
        return _operators().binary("+", self, other)

    def __radd__(self, other):
        return _operators().binary("+", other, self)

    def __sub__(self, other):
        return _operators().binary("-", self, other)

    def __rsub__(self, other):
        return _operators().binary("-", other, self)

    def __mul__(self, other):
        return _operators().binary("*", self, other)

    def __rmul__(self, other):
        return _operators().binary("*", other, self)

    def __truediv__(self, other):
        return _operators().binary("/", self, other)

    def __rtruediv__(self, other):
        return _operators().binary("/", other, self)

    def __matmul__(self, other):
        return _operators().binary("@", self, other)

    def __rmatmul__(self, other):
        return _operators().binary("@", other, self)

    def __neg__(self):
        return _operators().binary("*", -1, self)


def _operators():
    from compiler.core import operators     # imports the ops, which import this module
    return operators


def format_shape(shape):
    """``(n, 3)``, ``(4,)``, ``()``: a shape as a Python tuple (the batch axis is ``n``), the same
    text in messages, in ``bpc show`` and in generated code."""
    return "(" + ", ".join(_dim_text(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def size_of(shape):
    out = sp.Integer(1)
    for d in shape:
        out *= d
    return out


# weak, so that a long-running process compiling many models does not keep them all
_intern = weakref.WeakValueDictionary()


class _MemoRepr(ReprPrinter):
    """SymPy's ``srepr``, each subexpression printed once per process: the expressions that
    simplification makes (fusing, sharing, renumbering inputs) are mostly new combinations of
    subexpressions printed before."""

    _memo = {}

    def _print(self, expr, **kwargs):
        if kwargs or not isinstance(expr, sp.Basic) or not expr.args:
            return super()._print(expr, **kwargs)
        key = (type(expr), expr)
        text = self._memo.get(key)
        if text is None:
            text = super()._print(expr)
            if len(self._memo) >= 1 << 16:
                self._memo.clear()
            self._memo[key] = text
        return text


@functools.lru_cache(maxsize=16384)
def _srepr(expr):
    # the same few expressions recur in every layer of a deep network: printed once each
    return _MemoRepr().doprint(expr)


_DIM_TEXT = {}


def _dim_text(d):
    # str(N) goes through SymPy's printer: a tenth of a large model's compile when done per node
    try:
        return _DIM_TEXT[d]
    except KeyError:
        text = _DIM_TEXT[d] = str(d)
        return text
    except TypeError:          # unhashable: not a dimension this IR makes, printed as it is
        return str(d)


def make(op, inputs, shape, attrs=()):
    """Create a node, or return the existing node with the same op, inputs, shape and attrs."""
    attrs = tuple(sorted(attrs, key=lambda kv: kv[0]))
    shape_text = [_dim_text(d) for d in shape]
    attrs_text = [(k, _srepr(v) if isinstance(v, sp.Basic) else repr(v)) for k, v in attrs]
    text = repr((op, [i.digest for i in inputs], shape_text, attrs_text))
    digest = hashlib.sha1(text.encode()).hexdigest()[:20]
    node = _intern.get(digest)
    if node is None:
        local = _local_rank(op, tuple(shape_text), tuple(attrs_text))
        context = local[0] + hashlib.sha1((local + "".join(i.rank[1] for i in inputs)).encode()).hexdigest()[:12]
        rank = (context, local, digest)
        node = Node(op, tuple(inputs), tuple(shape), attrs, digest, rank)
        _intern[digest] = node
    return node


@functools.lru_cache(maxsize=1 << 14)
def _local_rank(op, shape_text, attrs_text):
    # what a node computes apart from its inputs and a leaf's name (a hash, the same in any process)
    # (computed values before parameters, parameters before data: ``Z - y``, ``b x`` in LaTeX)
    kind = {"param": "1", "input": "2"}.get(op, "0")
    return kind + hashlib.sha1(repr((op, shape_text, [kv for kv in attrs_text if kv[0] != "name"])).encode()).hexdigest()[:12]


def is_batch(shape):
    return len(shape) > 0 and shape[0] == N


def alignment(arg_shape, out_shape):
    """How ``arg_shape`` maps onto ``out_shape``: 'same', 'left' (pad trailing axes) or 'right'.

    Raises ShapeError when the two cannot broadcast.
    """
    arg_shape, out_shape = tuple(arg_shape), tuple(out_shape)
    if arg_shape == out_shape:
        return "same"
    ra, ro = len(arg_shape), len(out_shape)
    if ra > ro:
        raise ShapeError(f"cannot broadcast {format_shape(arg_shape)} to {format_shape(out_shape)}")
    if ra and ra < ro and arg_shape[0] == N and out_shape[0] == N:
        mode, padded = "left", arg_shape + (1,) * (ro - ra)
    else:
        mode, padded = "right", (1,) * (ro - ra) + arg_shape
    for a, o in zip(padded, out_shape):
        if a != o and a != 1:
            raise ShapeError(f"cannot broadcast {format_shape(arg_shape)} to {format_shape(out_shape)}")
    return mode


def broadcast_shapes(shapes):
    """The shape several arrays broadcast to, under the alignment rule of this module."""
    shapes = [tuple(s) for s in shapes]
    if not shapes:
        return ()
    rank = max(len(s) for s in shapes)
    out = [1] * rank
    for s in shapes:
        if len(s) < rank and s and s[0] == N and any(len(t) == rank and t[0] == N for t in shapes):
            padded = s + (1,) * (rank - len(s))
        else:
            padded = (1,) * (rank - len(s)) + s
        for i, d in enumerate(padded):
            if d == 1:
                continue
            if out[i] == 1:
                out[i] = d
            elif out[i] != d:
                raise ShapeError("shapes " + ", ".join(format_shape(t) for t in shapes) + " do not broadcast")
    return tuple(out)


def padded_to(arg_shape, out_shape):
    """``arg_shape`` padded with 1s to the rank of ``out_shape``, as broadcasting places it."""
    mode = alignment(arg_shape, out_shape)
    extra = len(out_shape) - len(arg_shape)
    if mode == "left":
        return tuple(arg_shape) + (1,) * extra
    return (1,) * extra + tuple(arg_shape)


def covered(arg_shapes, out_shape):
    """Whether arrays of ``arg_shapes`` broadcast to all of ``out_shape`` by themselves (if not,
    an elementwise result must be materialised at its full shape)."""
    out_shape = tuple(out_shape)
    padded = [padded_to(s, out_shape) for s in arg_shapes]
    return all(d == 1 or any(p[i] == d for p in padded) for i, d in enumerate(out_shape))


# ---- constructors -------------------------------------------------------------------------

def input_node(name, shape, role, kind="real"):
    return make("input", (), shape, (("name", name), ("role", role), ("kind", kind)))


def mask_node(name, shape, rate):
    """A dropout mask: drawn by the generated module, not passed by its caller."""
    return make("input", (), shape, (("name", name), ("role", "mask"), ("kind", "real"), ("rate", float(rate))))


def stat_node(name, shape, init):
    """A running statistic of a batchnorm layer, ``init`` its value before training: state passed
    in and updated by the generated module (its ``stats`` argument), never trained by the optimizer."""
    return make("input", (), shape, (("name", name), ("role", "stat"), ("kind", "real"), ("init", float(init))))


def mode_node(name):
    """The training flag as a number (1 in training, 0 in inference), set by the generated module."""
    return make("input", (), (), (("name", name), ("role", "mode"), ("kind", "real")))


def param_node(name, shape):
    return make("param", (), shape, (("name", name),))


def topo_order(outputs, stop=frozenset()):
    """Nodes reachable from ``outputs``, inputs before users, in a deterministic order.

    Nodes whose uid is in ``stop`` are left out, and so is what only they lead to."""
    # depth first, each node after its inputs in their order (an iterator per open node: the
    # hottest loop of a compile, called for every schedule, use count and formula chain)
    seen, order = set(), []
    add, append = seen.add, order.append
    for out in outputs:
        if out.uid in seen or out.uid in stop:
            continue
        add(out.uid)
        stack = [(out, iter(out.inputs))]
        push, pop = stack.append, stack.pop
        while stack:
            node, it = stack[-1]
            for inp in it:
                uid = inp.uid
                if uid not in seen and uid not in stop:
                    add(uid)
                    push((inp, iter(inp.inputs)))
                    break
            else:
                pop()
                append(node)
    return order


def consumers(order):
    """uid -> list of nodes (in ``order``) that use it."""
    users = {n.uid: [] for n in order}
    for n in order:
        for i in n.inputs:
            users.setdefault(i.uid, []).append(n)
    return users


def __getattr__(name):
    # the op constructors (ir.ew, ir.matmul, ...) live with their ops in compiler.core.ops,
    # which imports this module: resolved on first use, not at import
    from compiler.core import ops
    try:
        value = ops.CONSTRUCTORS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value      # found once; later lookups are plain attribute reads
    return value
