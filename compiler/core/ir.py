"""The tensor-level IR: small immutable nodes, interned so equal nodes are shared.

Every value has a shape whose entries are ints or the batch symbol ``N`` (printed ``n``).
Data arrays are batch-first. Broadcasting follows NumPy (right-aligned), with one addition:
an array whose first axis is the batch axis, combined with a higher-rank batch array, is
left-aligned (a per-sample number ``(n,)`` against ``(n, k)`` means ``A[:, None]``).

Ops (``Node.op``) and their attributes:

==========  ======================  ===========================================
op          inputs                  attrs
==========  ======================  ===========================================
input       -                       name, role ("data" | "target"), kind ("real" | "label")
param       -                       name
ew          any (maybe none)        expr: SymPy expression of symbols ARG[i]
matmul      a, b                    ta, tb (transpose flags)
transpose   a                       -
reshape     a                       - (the node's shape is the new shape)
sum         a                       axes (tuple of ints)
mean        a                       - (over every axis)
lse         z (n, k)                - (row-wise log-sum-exp, shape (n,))
softmax     z (n, k)                -
xent        z, lse, y               kind ("label" | "onehot")
xent_grad   z, lse, y, adj          kind
==========  ======================  ===========================================
"""
from __future__ import annotations

import hashlib
import itertools
import threading
import weakref
from dataclasses import dataclass, field

import sympy as sp

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


def format_shape(shape):
    """``(n, 3)``, ``(4,)``, ``()``: a shape as a Python tuple (the batch axis is ``n``), the same
    text in messages, in ``bpc show`` and in generated code."""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def size_of(shape):
    out = sp.Integer(1)
    for d in shape:
        out *= d
    return out


# weak, so that a long-running process compiling many models does not keep them all
_intern = weakref.WeakValueDictionary()


def make(op, inputs, shape, attrs=()):
    """Create a node, or return the existing node with the same op, inputs, shape and attrs."""
    attrs = tuple(sorted(attrs, key=lambda kv: kv[0]))
    text = repr((op, [i.digest for i in inputs], [str(d) for d in shape],
                 [(k, sp.srepr(v) if isinstance(v, sp.Basic) else repr(v)) for k, v in attrs]))
    digest = hashlib.sha1(text.encode()).hexdigest()[:20]
    node = _intern.get(digest)
    if node is None:
        node = Node(op, tuple(inputs), tuple(shape), attrs, digest)
        _intern[digest] = node
    return node


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


def param_node(name, shape):
    return make("param", (), shape, (("name", name),))


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
    keep = sorted(first_of.items(), key=lambda kv: inputs[kv[1]].digest)  # canonical order
    renum = {ARG[i]: ARG[j] for j, (_, i) in enumerate(keep)}
    expr = expr.xreplace(renum)
    new_inputs = tuple(inputs[i] for _, i in keep)
    if expr == ARG[0] and len(new_inputs) == 1 and new_inputs[0].shape == out_shape:
        return new_inputs[0]
    return make("ew", new_inputs, out_shape, (("expr", expr),))


def matmul(a, b, ta=False, tb=False):
    # fold explicit transposes into the flags so that W*x and x.T*W.T intern to one node
    if a.op == "transpose":
        a, ta = a.inputs[0], not ta
    if b.op == "transpose":
        b, tb = b.inputs[0], not tb
    sa = a.shape[::-1] if ta else a.shape
    sb = b.shape[::-1] if tb else b.shape
    if len(sa) != 2 or len(sb) != 2:
        raise ShapeError(f"matrix product needs 2-D operands, got {format_shape(sa)} and {format_shape(sb)}")
    if sa[1] != sb[0]:
        raise ShapeError(f"matrix product of {format_shape(sa)} and {format_shape(sb)}: inner sizes {sa[1]} and {sb[0]} differ")
    a_const, b_const = (x.op == "ew" and not x.inputs for x in (a, b))
    if sa[1] == 1 and (a_const or b_const):
        # an outer product with a constant (the adjoint of a loss term of parameters alone) is
        # a scaling: c (r, 1) @ B (1, m) is c*B, A (r, 1) @ c (1, m) is c*A
        const, other = (a, transpose(b) if tb else b) if a_const else (b, transpose(a) if ta else a)
        return ew(const.attr("expr") * ARG[0], [other], shape=(sa[0], sb[1]))
    return make("matmul", (a, b), (sa[0], sb[1]), (("ta", ta), ("tb", tb)))


def transpose(a):
    if len(a.shape) != 2:
        raise ShapeError(f"transpose needs a 2-D value, got {format_shape(a.shape)}")
    if a.op == "transpose":
        return a.inputs[0]
    if a.op == "ew" and not a.inputs:
        return ew(a.attr("expr"), (), shape=a.shape[::-1])   # a constant stays a constant
    return make("transpose", (a,), a.shape[::-1])


def reshape(a, shape):
    shape = tuple(shape)
    if shape == a.shape:
        return a
    if sp.simplify(size_of(shape) - size_of(a.shape)) != 0:
        raise ShapeError(f"cannot reshape {format_shape(a.shape)} to {format_shape(shape)}")
    if a.op == "ew" and not a.inputs:
        return ew(a.attr("expr"), (), shape=shape)   # a constant stays a constant
    # a transposed vector has the same flat order as the vector: reshape the vector itself
    while a.op == "reshape" or (a.op == "transpose" and 1 in a.shape):
        a = a.inputs[0]
    if a.shape == shape:
        return a
    return make("reshape", (a,), shape)


def reduce_sum(a, axes):
    axes = tuple(sorted(set(axes)))
    if not axes:
        return a
    shape = tuple(d for i, d in enumerate(a.shape) if i not in axes)
    if a.op == "ew" and all(i.shape == () for i in a.inputs):
        # the sum of a broadcast scalar is the scalar times the number of terms
        count = size_of(tuple(a.shape[i] for i in axes))
        return ew(a.attr("expr") * count, a.inputs, shape=shape)
    return make("sum", (a,), shape, (("axes", axes),))


def mean(a):
    return make("mean", (a,), ())


def _rows(z, what):
    if len(z.shape) != 2:
        raise ShapeError(f"{what} needs (batch, classes) logits, got {format_shape(z.shape)}")


def lse(z):
    _rows(z, "log-sum-exp")
    return make("lse", (z,), z.shape[:1])


def softmax(z):
    _rows(z, "softmax")
    return make("softmax", (z,), z.shape)


def xent(z, y, kind):
    _rows(z, "softmax cross-entropy")
    if kind == "label" and y.shape != z.shape[:1]:
        raise ShapeError(f"integer labels must have shape {format_shape(z.shape[:1])}, got {format_shape(y.shape)}")
    if kind == "onehot" and y.shape != z.shape:
        raise ShapeError(f"one-hot targets must have the logits' shape {format_shape(z.shape)}, got {format_shape(y.shape)}")
    return make("xent", (z, lse(z), y), z.shape[:1], (("kind", kind),))


def xent_grad(z, l, y, adj, kind):
    return make("xent_grad", (z, l, y, adj), z.shape, (("kind", kind),))


def topo_order(outputs, stop=frozenset()):
    """Nodes reachable from ``outputs``, inputs before users, in a deterministic order.

    Nodes whose uid is in ``stop`` are left out, and so is what only they lead to."""
    seen, order = set(), []
    for out in outputs:
        stack = [] if out.uid in stop else [(out, False)]
        while stack:
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if node.uid in seen:
                continue
            seen.add(node.uid)
            stack.append((node, True))
            for inp in reversed(node.inputs):
                if inp.uid not in seen and inp.uid not in stop:
                    stack.append((inp, False))
    return order


def consumers(order):
    """uid -> list of nodes (in ``order``) that use it."""
    users = {n.uid: [] for n in order}
    for n in order:
        for i in n.inputs:
            users.setdefault(i.uid, []).append(n)
    return users
