"""Per-example gradients: the gradient graph rewritten so that each reduction over the batch
axis that makes a parameter gradient keeps that axis (issue 16, item 2).

``derive(model, loss, grads, names)`` takes the raw (unsimplified) loss and gradient nodes and
returns the per-example loss (n,) and gradients (n,) + the parameter's shape, as new nodes.
The rewrite computes the gradient graph *as for a batch of one, for every sample at once*:

* a value with a batch axis is already computed per sample (every op on batch-first arrays
  acts on each sample's rows alone, except the reductions below); it is rebuilt with the batch
  size ``n`` replaced by 1 in elementwise expressions, which removes the ``1/n`` of the mean
  loss: row i then holds what a batch holding sample i alone would compute;
* a value without a batch axis that does not depend on the data (a parameter, a constant, a
  regulariser's gradient) is the same for every sample (with n = 1 as well);
* a reduction over the batch axis becomes its per-sample form, a value with a new leading
  batch axis ("spread"):

  ==============================  =================================================
  sum over axes that include 0    sum over the other axes (bias: the adjoint itself)
  mean (the loss)                 mean over each sample's entries (its own loss)
  ``X.T @ dZ`` over batch rows    ``sample_product``: ``X_i.T @ dZ_i`` per sample (a
                                  dense layer's outer product; the positions of a
                                  sequence and the windows of a convolution are summed
                                  per sample, not across samples)
  ``embed_grad``                  ``embed_grad_each``: each sample's scatter-add
  ==============================  =================================================

* elementwise ops, reshapes and transposes of spread values act on each sample's slice.

A spread value that meets a batch value again means that the forward mixes samples (the batch
mean and variance of batchnorm in training mode, a loss that is not a mean of per-sample
terms): then a per-example gradient is not the gradient of one sample's loss, and
``PerExampleError`` says so. The mean of the per-example gradients is the batch gradient (for
a mean loss), and each equals the gradient of a batch of that sample alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from compiler.core import ir
from compiler.core.ir import ARG, N
from compiler.errors import ModelError


class PerExampleError(ModelError):
    """The model has no per-example gradients (its forward mixes samples), or bpc has no
    per-sample form of one of its reductions over the batch."""


@dataclass(frozen=True)
class PerExample:
    loss: object         # node (n,): each sample's loss
    grads: tuple         # per parameter, node (n,) + shape, or None (the loss does not depend on it)


def rows_per_sample(dim):
    """k when a batch-first axis has k*n rows (k rows per sample), else None."""
    if dim == N:
        return 1
    if isinstance(dim, sp.Basic) and dim.has(N):
        k = sp.simplify(dim / N)
        if k.is_Integer and k > 0:
            return int(k)
    return None


def _batched(node):
    return bool(node.shape) and rows_per_sample(node.shape[0]) is not None


class _Rewrite:
    def __init__(self, model, names):
        self.model, self.names = model, names
        self.memo, self.spread = {}, set()

    def fail(self, reason):
        raise PerExampleError(f"per-example gradients are not defined for model {self.model.name!r}: {reason}")

    def label(self, node):
        name = self.names.get(node.digest)
        return repr(name) if name else f"a {node.op} of shape {ir.format_shape(node.shape)}"

    def mark(self, new, old):
        self.spread.add(new.uid)
        self._name(new, old)
        return new

    def _name(self, new, old):
        base = self.names.get(old.digest)
        if base and new.digest != old.digest:
            self.names.setdefault(new.digest, base + "_i")

    def run(self, outputs):
        for node in ir.topo_order([o for o in outputs if o is not None]):
            ins = [self.memo[i.uid] for i in node.inputs]
            new = self.node(node, ins)
            if new.uid not in self.spread:
                self._name(new, node)
            self.memo[node.uid] = new
        return [None if o is None else self.memo[o.uid] for o in outputs]

    def node(self, node, ins):
        if not ins:
            if node.op == "ew":
                return ir.ew(_one(node.attr("expr")), [], shape=node.shape)
            return node
        spread = [i.uid in self.spread for i in ins]
        batch = [not s and _batched(i) for i, s in zip(ins, spread)]
        op = node.op
        if any(spread):
            if any(batch):
                j = batch.index(True)
                k = spread.index(True)
                self.fail(f"{self.label(node.inputs[k])}, a value summed over the batch, is combined with "
                          f"{self.label(node.inputs[j])}, a value per sample: the forward mixes samples "
                          "(statistics of the batch, or a loss that is not a mean over samples)")
            return self.mark(self.on_spread(node, ins, spread), node)
        if op == "ew":
            return ir.ew(_one(node.attr("expr")), ins, shape=node.shape)
        if not any(batch) or _batched(node):
            # per sample (or no data at all): the same op on the rewritten inputs
            if op == "sum":
                return ir.reduce_sum(ins[0], node.attr("axes"))
            return ir.make(op, ins, node.shape, node.attrs)
        # a reduction over the batch axis
        return self.mark(self.reduction(node, ins), node)

    def on_spread(self, node, ins, spread):
        op = node.op
        if op == "ew":
            rank = len(node.shape)
            lifted = []
            for i, s in zip(ins, spread):
                if s and len(i.shape) - 1 < rank:   # (n,) + s against (n,) + a longer shape: align right
                    i = ir.reshape(i, (N,) + (1,) * (rank - len(i.shape) + 1) + tuple(i.shape[1:]))
                lifted.append(i)
            return ir.ew(_one(node.attr("expr")), lifted, shape=(N,) + tuple(node.shape))
        if op == "sum":
            return ir.reduce_sum(ins[0], [a + 1 for a in node.attr("axes")])
        if op == "reshape":
            return ir.reshape(ins[0], (N,) + tuple(node.shape))
        if op == "transpose":
            return ir.permute(ins[0], (0, 2, 1))
        if op == "mean":
            return _sample_mean(ins[0], 1)
        self.fail(f"{self.label(node)} ({op}) uses a value summed over the batch, and bpc has no "
                  "per-sample form of that")

    def reduction(self, node, ins):
        op = node.op
        if op == "sum":
            x = ins[0]
            axes = node.attr("axes")
            if 0 not in axes:
                self.fail(f"{self.label(node)} sums a batch-first value without its batch axis")
            k = rows_per_sample(x.shape[0])
            rest = [a for a in axes if a != 0]
            if k == 1:
                return ir.reduce_sum(x, rest)
            y = ir.reshape(x, (N, k) + tuple(x.shape[1:]))
            return ir.reduce_sum(y, [1] + [a + 1 for a in rest])
        if op == "mean":
            return _sample_mean(ins[0], rows_per_sample(ins[0].shape[0]))
        if op == "matmul":
            a, b = ins
            ta, tb = node.attr("ta"), node.attr("tb")
            if ta and not tb and _batched(a) and _batched(b):
                return ir.sample_product(a, b)
        if op == "embed_grad":
            return ir.embed_grad_each(ins[0], ins[1], node.attr("vocab"))
        self.fail(f"{self.label(node)} ({op}) reduces over the batch axis, and bpc has no per-sample "
                  "form of it")


def _one(expr):
    """``expr`` for a batch of one: the 1/n of a mean becomes 1."""
    return expr.xreplace({N: sp.Integer(1)}) if expr.has(N) else expr


def _sample_mean(x, k):
    """(n,): the mean of each sample's entries of ``x`` (batch-first, k rows per sample)."""
    per = int(sp.Integer(ir.size_of(x.shape[1:]))) * k
    if per == 1:
        return ir.reshape(x, (N,))
    flat = ir.reshape(x, (N, per))
    return ir.ew(ARG[0] / per, [ir.reduce_sum(flat, [1])], shape=(N,))


def derive(model, loss, grads, names):
    """PerExample of ``loss`` and ``grads`` (raw nodes, one per parameter or None); ``names``
    (digest -> name) gets names for the new nodes (``dW1_i``, ``L_i``). Raises
    PerExampleError when the model mixes samples."""
    rw = _Rewrite(model, names)
    if model.stats:
        rw.fail("batchnorm normalises with the mean and variance of the whole batch in training mode, "
                "which mixes samples (per-example gradients of batchnorm models are not emitted, in either mode)")
    new_loss, *new_grads = rw.run([loss, *grads])
    out = []
    for p, g in zip(model.params, new_grads):
        if g is not None and g.uid not in rw.spread:
            # no data in it (a regulariser): the same for every sample
            g = ir.ew(ARG[0], [g], shape=(N,) + tuple(p.shape))
        out.append(g)
    if new_loss.uid not in rw.spread:
        new_loss = ir.ew(ARG[0], [new_loss], shape=(N,))
    base = names.get(loss.digest, "L")
    names.setdefault(new_loss.digest, base + "_i")
    for p, g in zip(model.params, out):
        if g is not None:
            names.setdefault(g.digest, f"d{p.name}_i")
    return PerExample(new_loss, tuple(out))
