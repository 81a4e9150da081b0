"""Tensor networks: a small builder of inputs, dense layers, activations and losses.

Example::

    net = Network("classifier")
    x = net.input("x", 64)
    h = net.dense(x, 32, "tanh")
    z = net.dense(h, 10)
    model = net.build(z, loss="softmax_cross_entropy", target=net.target("y", kind="label"))

Conventions: data arrays are batch-first, ``(n, features)``; a dense layer computes
``x @ W + b`` with ``W`` of shape ``(in, out)``. Losses are means over the batch:

- ``mse``: mean over batch and outputs of ``(z - y)**2``;
- ``softmax_cross_entropy``: mean over the batch of ``logsumexp(z) - z[y]`` (integer labels,
  ``kind="label"``) or ``logsumexp(z) - sum(y*z)`` (one-hot or probability rows summing to 1);
- ``bce_with_logits``: mean over batch and outputs of ``softplus(z) - y*z``;
- a SymPy expression of the symbols ``p`` (prediction) and ``y`` (target), applied
  elementwise and averaged over batch and outputs.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Sequence

import sympy as sp

from compiler.core import ir
from compiler.errors import ModelError, ShapeError
from compiler.core.functions import activation as resolve_activation, check_supported, realify, sigmoid, softplus, stabilize
from compiler.core.ir import ARG, N
from compiler.core.ir import Node
from compiler.core.model import Head, Model, check_name, check_target_kind
from compiler.frontends.image import ImageLayers
from compiler.frontends.sequence import SequenceLayers

LOSSES = ("mse", "softmax_cross_entropy", "bce_with_logits")
# other names users reach for -> the built-in loss
LOSS_ALIASES = {"cross_entropy": "softmax_cross_entropy", "softmax_xent": "softmax_cross_entropy",
                "bce": "bce_with_logits", "binary_cross_entropy_with_logits": "bce_with_logits"}


class Network(ImageLayers, SequenceLayers):
    """Builder of a batch-first tensor network; ``build`` returns a Model."""

    def __init__(self, name="model"):
        self.name = check_name(name, "model", reserved=False)
        self.inputs, self.targets, self.params, self.masks, self.stats = [], [], [], [], []
        self.mode = None
        self.names, self.init = {}, {}
        self._layers = 0
        self._merges = 0
        self._used = set()
        self.layer_names = {}     # uid -> the name given to the layer that computes it (name=...)

    # -- naming ---------------------------------------------------------------------------
    def _claim(self, name, what):
        check_name(name, what)
        if name in self._used:
            raise ModelError(f"{what} name {name!r} is already used in model {self.name!r}")
        self._used.add(name)
        return name

    def _name(self, node, name):
        self.names.setdefault(node.digest, name)
        return node

    # -- leaves ---------------------------------------------------------------------------
    def input(self, name: str, size: int | None = None, shape: Sequence[int] | None = None,
              kind: str = "real", length: int | None = None) -> Node:
        """A data input: ``size`` features per sample (None for one number per sample), or a
        per-sample ``shape`` such as (H, W, C) for images (batch-first, channels last), or
        (``kind="ids"``) a sequence of ``length`` integer token ids per sample, shape (n, length)."""
        if kind == "ids":
            if size is not None or shape is not None:
                raise ModelError(f"input {name!r}: token ids are a sequence of length ids per sample; "
                                 "give length, not size or shape")
            shape = (N, _positive(length, f"input {name!r} length"))
            node = ir.input_node(self._claim(name, "input"), shape, "data", "ids")
            self.inputs.append(node)
            return self._name(node, name)
        if kind != "real":
            raise ModelError(f"input {name!r}: kind must be 'real' or 'ids', not {kind!r}")
        if length is not None:
            raise ModelError(f"input {name!r}: length is the number of token ids of an input of kind 'ids'; "
                             "a real input takes size or shape")
        if shape is not None:
            if size is not None:
                raise ModelError(f"input {name!r}: give size or shape, not both")
            shape = (N, *_shape(shape, f"input {name!r} shape"))
        else:
            shape = (N,) if size is None else (N, _positive(size, f"input {name!r} size"))
        node = ir.input_node(self._claim(name, "input"), shape, "data")
        self.inputs.append(node)
        return self._name(node, name)

    def target(self, name: str, size: int | None = None, kind: str = "real",
               length: int | None = None) -> Node:
        """A target: real values (``size`` per sample) or integer class labels (``kind='label'``);
        labels with ``length``: one class per position of a sequence, shape (n, length)."""
        if check_target_kind(kind, f"target {name!r}: kind") == "label" and size is not None:
            raise ModelError(f"target {name!r}: integer labels are one number per sample (or per "
                             "position, with length); give no size")
        if length is not None:
            if kind != "label":
                raise ModelError(f"target {name!r}: length is for labels of a sequence (kind 'label')")
            shape = (N, _positive(length, f"target {name!r} length"))
        else:
            shape = (N,) if size is None else (N, _positive(size, f"target {name!r} size"))
        node = ir.input_node(self._claim(name, "target"), shape, "target", kind)
        self.targets.append(node)
        return self._name(node, name)

    def param(self, name: str, shape: Sequence[int], init: tuple) -> Node:
        """A trainable parameter with an initialisation: ('zeros',), ('glorot', fan_in, fan_out),
        ('he', fan_in) or ('value', number)."""
        shape = tuple(_positive(d, f"parameter {name!r} dimension") for d in shape)
        node = ir.param_node(self._claim(name, "parameter"), shape)
        self.params.append(node)
        self.init[name] = tuple(init)
        return self._name(node, name)

    # -- layers ---------------------------------------------------------------------------
    def dense(self, x: Node, units: int, activation: str | sp.Expr = "identity",
              name: str | None = None) -> Node:
        """``activation(x @ W + b)``; W is Glorot- or He-initialised by activation, b zero. On a
        sequence (n, T, d) it acts on the last axis: one matrix product of the (n*T, d) rows."""
        seq = len(x.shape) == 3 and x.shape[0] == N and x.attr("kind") != "ids"
        if (len(x.shape) != 2 or x.shape[0] != N or x.attr("kind") == "ids") and not seq:
            raise ShapeError(f"dense layer needs a (batch, features) input or a sequence (batch, T, features), "
                             f"got {ir.format_shape(x.shape)}"
                             + ("; embed token ids first (net.embedding)" if x.attr("kind") == "ids" else
                                "; flatten it first" if len(x.shape) > 3 and x.shape[0] == N else ""))
        units = _positive(units, "dense layer width")
        self._layers += 1
        k = name or str(self._layers)
        act_expr, scheme = resolve_activation(activation)
        fan_in = x.shape[-1]
        init = ("he", fan_in) if scheme == "he" else ("glorot", fan_in, units)
        W = self.param(f"W{k}", (fan_in, units), init)
        b = self.param(f"b{k}", (units,), ("zeros",))
        # an unnamed input (a residual sum) is X, never a declared name it is not
        xn = self.names.get(x.digest, "X")
        rows = self._name(ir.reshape(x, (N * x.shape[1], fan_in)), f"X{k}") if seq else x
        xw = self._name(ir.matmul(rows, W), f"{xn}W{k}" if len(xn) <= 3 and not seq else f"XW{k}")
        if seq:
            xw = self._name(ir.reshape(xw, (N, x.shape[1], units)), f"XWs{k}")
        z = self._name(ir.ew(ARG[0] + ARG[1], [xw, b]), f"Z{k}")
        return self._apply(z, act_expr, f"H{k}")

    def activation(self, x: Node, activation: str | sp.Expr, name: str | None = None) -> Node:
        """Apply an activation (a built-in name or a SymPy expression of one symbol)."""
        act_expr, _ = resolve_activation(activation)
        return self._apply(x, act_expr, name or f"A{self._layers}")

    def layernorm(self, x, eps=1e-5, name=None):
        """Layer normalisation over the feature (last) axis: ``(x - mean) / sqrt(var + eps) * g + s``
        with learned scale ``g{k}`` (ones) and shift ``s{k}`` (zeros), per sample."""
        return self._norm(x, eps, name, center=True)

    def rmsnorm(self, x, eps=1e-5, name=None):
        """RMS normalisation over the feature (last) axis: ``x / sqrt(mean(x**2) + eps) * g``, with a
        learned scale ``g{k}`` (ones) and no shift, as defined by Zhang and Sennrich (2019)."""
        return self._norm(x, eps, name, center=False)

    def _norm(self, x, eps, name, center):
        # composed from sums over the last axis and elementwise nodes, so the gradient is derived
        # by the reverse sweep like any other (both backends, formulas in `bpc show`); the
        # backward reuses R = 1/sqrt(var + eps) (its derivative is -R**3/2)
        kind = "layernorm" if center else "rmsnorm"
        if len(x.shape) < 2 or x.shape[0] != N:
            raise ShapeError(f"{kind} needs a (batch, ..., features) input, got {ir.format_shape(x.shape)}")
        eps = _epsilon(eps, f"{kind} eps")
        d = x.shape[-1]
        if center and d == 1:
            raise ShapeError(f"layernorm over a single feature gives 0 for every input; it needs "
                             f"at least 2 features, got {ir.format_shape(x.shape)}")
        self._layers += 1
        k = name or str(self._layers)
        last = [len(x.shape) - 1]
        if center:
            mu = self._name(ir.ew(ARG[0] / d, [ir.reduce_sum(x, last)]), f"M{k}")
            x = self._name(ir.ew(ARG[0] - ARG[1], [x, mu]), f"C{k}")
        # the mean of squares as a sum of x**2/d: V stays a named value, and R reads 1/sqrt(V + eps)
        var = self._name(ir.reduce_sum(ir.ew(ARG[0] ** 2 / d, [x]), last), f"V{k}")
        r = self._name(ir.ew(1 / sp.sqrt(ARG[0] + eps), [var]), f"R{k}")
        xn = self._name(ir.ew(ARG[0] * ARG[1], [x, r]), f"Xn{k}")
        g = self.param(f"g{k}", (d,), ("value", 1))
        if not center:
            return self._name(ir.ew(ARG[0] * ARG[1], [xn, g]), f"H{k}")
        s = self.param(f"s{k}", (d,), ("zeros",))
        return self._name(ir.ew(ARG[0] * ARG[1] + ARG[2], [xn, g, s]), f"H{k}")

    def batchnorm(self, x, eps=1e-5, momentum=0.1, name=None):
        """Batch normalisation per feature (the last axis; per channel for (n, H, W, C) images, the
        statistics then also over H and W): ``(x - M) / sqrt(V + eps) * g + s`` with learned scale
        ``g{k}`` (ones) and shift ``s{k}`` (zeros). In training mode M and V are the batch's mean
        and (biased) variance, and the gradient runs through them; in inference mode they are the
        running statistics ``running_mean{k}`` (zeros at first) and ``running_var{k}`` (ones),
        state that the generated module reads from its ``stats`` argument and, in training mode,
        updates to ``(1 - momentum)*running + momentum*batch``."""
        if len(x.shape) < 2 or x.shape[0] != N:
            raise ShapeError(f"batchnorm needs a (batch, ..., features) input, got {ir.format_shape(x.shape)}")
        eps = _epsilon(eps, "batchnorm eps")
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 < float(momentum) <= 1:
            raise ModelError(f"batchnorm momentum must be a number above 0 and at most 1, got {momentum!r}")
        mom = sp.Float(float(momentum))
        self._layers += 1
        k = name or str(self._layers)
        d, axes = x.shape[-1], list(range(len(x.shape) - 1))
        count = sp.Mul(N, *x.shape[1:-1])
        if self.mode is None:
            self.mode = self._name(ir.mode_node(self._claim("bn_training", "batchnorm training flag")),
                                   "bn_training")
        t = self.mode
        run_m = self._name(ir.stat_node(self._claim(f"running_mean{k}", "batchnorm statistic"), (d,), 0),
                           f"running_mean{k}")
        run_v = self._name(ir.stat_node(self._claim(f"running_var{k}", "batchnorm statistic"), (d,), 1),
                           f"running_var{k}")
        # the statistics used are blended by the training flag t (1 or 0): in training M is the
        # batch mean and the backward pass runs through it; in inference the running mean, a
        # constant. Vb is the batch variance in training (C = x - Mb there) and unused otherwise.
        blend = ARG[0] * ARG[1] + (1 - ARG[0]) * ARG[2]
        mb = self._name(ir.ew(ARG[0] / count, [ir.reduce_sum(x, axes)]), f"Mb{k}")
        m = self._name(ir.ew(blend, [t, mb, run_m]), f"M{k}")
        c = self._name(ir.ew(ARG[0] - ARG[1], [x, m]), f"C{k}")
        vb = self._name(ir.reduce_sum(ir.ew(ARG[0] ** 2 / count, [c]), axes), f"Vb{k}")
        v = self._name(ir.ew(blend, [t, vb, run_v]), f"V{k}")
        r = self._name(ir.ew(1 / sp.sqrt(ARG[0] + eps), [v]), f"R{k}")
        xn = self._name(ir.ew(ARG[0] * ARG[1], [c, r]), f"Xn{k}")
        step = (1 - mom) * ARG[0] + mom * ARG[1]
        self.stats.append((run_m, self._name(ir.ew(step, [run_m, mb]), f"running_mean{k}_next")))
        self.stats.append((run_v, self._name(ir.ew(step, [run_v, vb]), f"running_var{k}_next")))
        g = self.param(f"g{k}", (d,), ("value", 1))
        s = self.param(f"s{k}", (d,), ("zeros",))
        return self._name(ir.ew(ARG[0] * ARG[1] + ARG[2], [xn, g, s]), f"H{k}")

    def dropout(self, x, rate, name=None):
        """Inverted dropout: ``x * mask``, the mask drawn by the generated module for each call in
        training mode (each entry 0 with probability ``rate``, else ``1/(1 - rate)``, so the
        expected value is ``x``) and all ones in inference mode. ``rate`` 0 is the identity (no
        mask); it must be at least 0 and below 1."""
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= float(rate) < 1:
            raise ModelError(f"dropout rate must be a number from 0 up to (not including) 1, got {rate!r}")
        if not ir.is_batch(x.shape):
            raise ShapeError(f"dropout needs a batch-first input, got {ir.format_shape(x.shape)}")
        if float(rate) == 0:
            return x
        k = name or str(len(self.masks) + 1)
        mask = ir.mask_node(self._claim(f"mask{k}", "dropout mask"), x.shape, float(rate))
        self.masks.append(mask)
        self._name(mask, f"mask{k}")
        return self._name(ir.ew(ARG[0] * ARG[1], [x, mask]), f"D{k}")

    def _apply(self, z, act_expr, name):
        xs = sp.Symbol("x", real=True)
        if act_expr == xs:
            return z
        if act_expr == 0:
            raise ModelError(f"activation of {name} is identically zero: the network would learn nothing")
        return self._name(ir.ew(act_expr.xreplace({xs: ARG[0]}), [z]), name)

    # -- merges: several earlier layers or inputs into one ----------------------------------
    def add(self, *xs, name=None):
        """The elementwise sum of ``xs`` (a residual ``h + x``); shapes broadcast like NumPy."""
        return self._merge("add", xs, name, "S")

    def multiply(self, *xs, name=None):
        """The elementwise product of ``xs`` (a gate ``h * g``); shapes broadcast like NumPy."""
        return self._merge("multiply", xs, name, "G")

    def concat(self, *xs, name=None):
        """``xs`` side by side along the last (feature) axis; the other axes must agree."""
        return self._merge("concat", xs, name, "C")

    def _merge(self, kind, xs, name, prefix):
        if len(xs) < 2:
            raise ModelError(f"{kind} merges at least two values, got {len(xs)}")
        shapes = ", ".join(ir.format_shape(x.shape) for x in xs)
        try:
            if kind == "concat":
                node = ir.concat(*xs)
            else:
                expr = sp.Add(*ARG[:len(xs)]) if kind == "add" else sp.Mul(*ARG[:len(xs)])
                node = ir.ew(expr, list(xs))
        except ShapeError:
            rule = ("every axis but the last must agree" if kind == "concat"
                    else "the shapes must agree or broadcast like NumPy")
            raise ShapeError(f"{kind} of shapes {shapes}: {rule}; project a value with a dense "
                             "layer to make them agree") from None
        self._merges += 1
        return self._name(node, name or f"{prefix}{self._merges}")

    # -- model ----------------------------------------------------------------------------
    def build(self, output: Node | None = None, loss: str | sp.Expr = "mse", target: Node | None = None, *,
              losses: Sequence | None = None, loss_mask: Node | None = None) -> Model:
        """The Model of ``output`` with the given loss against ``target`` (default: the only one).

        Several losses: ``losses=[(output, loss, target, weight), ...]`` (weight optional,
        default 1; or dicts with those keys; target defaults to the only one) trains their
        weighted sum; ``forward`` returns the prediction of each distinct output, a tuple in the
        order of the losses (an output scored twice appears once, at its first entry); with
        one output, one array.

        ``loss_mask``: for softmax cross-entropy over sequences (logits (n, T, classes), labels
        (n, T)), an input (n, T) of weights per position (1 keep, 0 padding): the loss is the
        mean over batch and positions of weight * cross-entropy."""
        if loss_mask is not None and losses is not None:
            raise ModelError("loss_mask weighs the loss of build(output, loss, target); with losses=[...] "
                             "give no loss_mask")
        if losses is None:
            if output is None:
                raise ModelError("give the output to train (build(output, loss, target)) or losses=[...]")
            entries = [(output, loss, target, 1)]
        else:
            if output is not None:
                raise ModelError("give either an output (with loss and target) or losses=[...], not both")
            if isinstance(losses, (str, dict)) or not hasattr(losses, "__iter__"):
                raise ModelError("losses must be a list of (output, loss, target[, weight]) entries")
            entries = [self._loss_entry(e, i) for i, e in enumerate(losses)]
            if not entries:
                raise ModelError("losses is empty; give at least one (output, loss, target) entry")
        terms, heads = [], {}
        for i, (out, kind, y, weight) in enumerate(entries):
            if y is None:
                if len(self.targets) != 1:
                    raise ModelError("give the target of the loss (the network has "
                                     f"{len(self.targets)} targets)")
                y = self.targets[0]
            pred, L = apply_loss(kind, out, y, self.names, loss_mask)
            terms.append((pred, L, weight))
            # an output scored by several losses is returned once, as its first loss predicts it
            heads.setdefault(out.uid, (out, pred, loss_kind(kind), y))
        pred, L = terms[0][0], terms[0][1]
        if len(terms) > 1:
            for i, (_, part, _) in enumerate(terms):
                self.names[part.digest] = f"L{i + 1}"
            L = self._name(ir.ew(sp.Add(*(_weight(w) * a for (_, _, w), a in zip(terms, ARG[:len(terms)]))),
                                 [t[1] for t in terms]), "L")
        heads = self._output_heads(list(heads.values())) if len(heads) > 1 else ()
        used = {n.uid for n in ir.topo_order([L, pred, *(h.prediction for h in heads)])}
        unused = [i.name for i in self.inputs if i.uid not in used]
        if unused:
            raise ModelError(f"input(s) {', '.join(unused)} are declared but the output does not use them")
        return Model(self.name, tuple(self.inputs), tuple(self.targets),
                     tuple(p for p in self.params if p.uid in used), pred, L,
                     dict(self.names), {p.name: self.init[p.name] for p in self.params if p.uid in used},
                     loss_kind=loss_kind(entries[0][1]), masks=tuple(m for m in self.masks if m.uid in used),
                     stats=tuple((s, u) for s, u in self.stats if s.uid in used),
                     mode=self.mode if self.mode is not None and self.mode.uid in used else None, heads=heads)

    def _output_heads(self, outputs):
        """The Heads of several outputs ((output, prediction, loss kind, target) in the order of
        the losses), each named after its layer (``name=``), else after its value (Z3, H2)."""
        heads, taken = [], set()
        for i, (out, pred, kind, y) in enumerate(outputs):
            base = self.layer_names.get(out.uid) or self.names.get(out.digest) or f"out{i + 1}"
            name, j = base, 2
            while name in taken:
                name, j = f"{base}_{j}", j + 1
            taken.add(name)
            heads.append(Head(name, pred, kind, y))
        return tuple(heads)

    def _loss_entry(self, entry, i):
        what = f"losses[{i}]"
        if isinstance(entry, dict):
            extra = set(entry) - {"output", "loss", "target", "weight"}
            if extra or "output" not in entry:
                raise ModelError(f"{what}: a loss entry has keys output, loss, target, weight "
                                 f"(output required){'; unknown: ' + ', '.join(sorted(map(str, extra))) if extra else ''}")
            entry = (entry["output"], entry.get("loss", "mse"), entry.get("target"), entry.get("weight", 1))
        elif not isinstance(entry, (tuple, list)) or not 2 <= len(entry) <= 4:
            raise ModelError(f"{what}: give (output, loss, target[, weight]) or a dict with those keys")
        out, kind, y, weight = (*entry, None, 1)[:4] if len(entry) == 2 else (*entry, 1)[:4]
        if not isinstance(out, ir.Node):
            raise ModelError(f"{what}: the output must be a layer or input of this network, not {type(out).__name__}")
        if y is not None and (not isinstance(y, ir.Node) or y.op != "input" or y.attr("role") != "target"):
            raise ModelError(f"{what}: the target must be a target of this network (net.target(...))")
        if (isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight)
                or weight <= 0):
            raise ModelError(f"{what}: the weight must be a positive finite number, got {weight!r}")
        return out, kind, y, weight


def _records_name(method):
    """``method`` (a layer of Network) that also records the ``name`` it is given for the node it
    returns: a model of several outputs names each after its layer (the module's OUTPUTS)."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def layer(self, *args, **kwargs):
        node = method(self, *args, **kwargs)
        name = signature.bind(self, *args, **kwargs).arguments.get("name")
        if name is not None and isinstance(node, Node):
            self.layer_names.setdefault(node.uid, name)
        return node
    return layer


for _layer in ("dense", "activation", "layernorm", "rmsnorm", "batchnorm", "dropout", "add", "multiply", "concat",
               "conv2d", "maxpool2d", "avgpool2d", "flatten", "embedding", "positional", "attention",
               "transformer_block"):
    setattr(Network, _layer, _records_name(getattr(Network, _layer)))
del _layer


def _weight(w):
    """A loss weight as the user wrote it: 2 stays 2, 0.3 prints 0.3 (nsimplify made it 3/10)."""
    return sp.Integer(int(w)) if float(w).is_integer() else sp.Float(float(w))


def loss_kind(loss):
    """The built-in name of ``loss`` (aliases resolved), or "expression"."""
    return LOSS_ALIASES.get(loss, loss) if isinstance(loss, str) else "expression"


def apply_loss(loss, z, y, names, mask=None):
    """(prediction node, scalar loss node) of ``loss`` applied to output ``z`` and target ``y``;
    ``mask``: weights per position of a sequence's softmax cross-entropy."""
    def named(node, name):
        names.setdefault(node.digest, name)
        return node

    if mask is not None and (not isinstance(loss, str) or LOSS_ALIASES.get(loss, loss) != "softmax_cross_entropy"
                             or len(z.shape) != 3):
        raise ModelError("loss_mask weighs the positions of softmax cross-entropy over sequences "
                         "(logits (n, T, classes)); this loss has none")

    if isinstance(loss, str):
        key = LOSS_ALIASES.get(loss, loss)
        if key not in LOSSES:
            raise ModelError(f"unknown loss {loss!r}; built-ins are {', '.join(LOSSES)}, "
                             "or give a SymPy expression of p (prediction) and y (target)")
        kind = y.attr("kind")
        if key == "softmax_cross_entropy":
            if len(z.shape) == 3 and z.shape[0] == N:
                return _sequence_xent(z, y, mask, named)
            if len(z.shape) != 2:
                raise ShapeError(f"softmax cross-entropy needs (batch, classes) logits, got {ir.format_shape(z.shape)}")
            ce = named(ir.xent(z, y, "label" if kind == "label" else "onehot"), "CE")
            named(ce.inputs[1], "LSE")
            return named(ir.softmax(z), "P"), named(ir.mean(ce), "L")
        if kind == "label":
            raise ModelError(f"loss {key!r} needs real-valued targets; {y.name!r} holds integer labels")
        zy = _same_shape(z, y, key)
        if key == "mse":
            per = ir.ew((ARG[0] - ARG[1]) ** 2, [zy, y])
            return z, named(ir.mean(named(per, "E")), "L")
        per = ir.ew(softplus(ARG[0]) - ARG[0] * ARG[1], [zy, y])
        pred = named(ir.ew(sigmoid(ARG[0]), [z]), "P")
        return pred, named(ir.mean(named(per, "E")), "L")
    if isinstance(loss, sp.Basic):
        p, yy = sp.Symbol("p", real=True), sp.Symbol("y", real=True)
        expr = stabilize(realify(loss))
        extra = expr.free_symbols - {p, yy}
        if extra:
            raise ModelError(f"loss expression {loss} uses undefined symbol(s) "
                             f"{', '.join(sorted(map(str, extra)))}; it may use p (prediction) and y (target)")
        check_supported(expr, "loss")
        if y.attr("kind") == "label":
            raise ModelError("an expression loss needs real-valued targets")
        zy = _same_shape(z, y, "loss expression")
        if expr == 0 or p not in expr.free_symbols:
            raise ModelError(f"loss expression {loss} does not depend on the prediction p")
        per = ir.ew(expr.xreplace({p: ARG[0], yy: ARG[1]}), [zy, y])
        return z, named(ir.mean(named(per, "E")), "L")
    raise ModelError(f"loss must be a name or a SymPy expression, got {type(loss).__name__}")


def _sequence_xent(z, y, mask, named):
    """Softmax cross-entropy of logits (n, T, classes) against labels (n, T): the mean over batch
    and positions, each position weighted by ``mask`` (n, T) when given."""
    T = z.shape[1]
    if y.attr("kind") != "label" or y.shape != (N, T):
        raise ShapeError(f"softmax cross-entropy over sequences needs labels of shape (n, {T}) "
                         f"(net.target(name, kind='label', length={T})), got {ir.format_shape(y.shape)} "
                         f"of kind {y.attr('kind')!r}")
    ce = named(ir.xent(z, y, "label"), "CE")
    named(ce.inputs[1], "LSE")
    if mask is not None:
        if not isinstance(mask, ir.Node) or mask.op != "input" or mask.attr("kind") != "real" \
                or mask.shape != (N, T):
            raise ModelError(f"loss_mask must be an input of shape (n, {T}) (net.input(name, {T})), got {mask!r}")
        ce = named(ir.ew(ARG[0] * ARG[1], [ce, mask]), "CEm")
    return named(ir.softmax(z), "P"), named(ir.mean(ce), "L")


def _same_shape(z, y, what):
    """``z`` in the target's shape. The target-shape rule of every frontend: one number per
    sample may be ``(n,)`` or ``(n, 1)`` on either side (the output is reshaped, the
    prediction keeps its shape); any other difference is an error giving the expected shape."""
    if z.shape == y.shape:
        return z
    if {z.shape, y.shape} == {(N,), (N, 1)}:
        return ir.reshape(z, y.shape)
    per = tuple(z.shape[1:])
    size = "no size (one number per sample)" if not per else f"size {per[0]}" if len(per) == 1 else f"shape {list(per)}"
    raise ShapeError(f"{what}: output shape {ir.format_shape(z.shape)} and target shape "
                     f"{ir.format_shape(y.shape)} differ; the target must have shape {ir.format_shape(z.shape)}: "
                     f"declare it with {size}, and give data of that shape "
                     f"(e.g. y.reshape({', '.join(['len(y)', *map(str, per)])}) when it holds the same numbers)")


def _epsilon(v, what):
    """A positive, finite float (the epsilon of a norm), as a SymPy Float."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < float(v) < float("inf"):
        raise ModelError(f"{what} must be a positive number, got {v!r}")
    return sp.Float(float(v))


def _shape(shape, what):
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise ModelError(f"{what} must be a list of positive integers, got {shape!r}")
    shape = tuple(shape)
    if not shape:
        raise ModelError(f"{what} is empty; give the per-sample dimensions, e.g. (8, 8, 1)")
    return tuple(_positive(d, f"{what} dimension") for d in shape)


def _positive(v, what):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ModelError(f"{what} must be a positive integer, got {v!r}")
    return int(v)


def mlp(sizes: Sequence[int], activation: str | sp.Expr = "tanh", loss: str | sp.Expr = "mse",
        output_activation: str | sp.Expr = "identity", target_kind: str | None = None,
        name: str = "mlp") -> Model:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]`` with one activation for the
    hidden layers. For ``softmax_cross_entropy`` the target holds integer labels unless
    ``target_kind='onehot'``."""
    if len(sizes) < 2:
        raise ModelError("an MLP needs at least an input and an output size")
    net = Network(name)
    h = net.input("x", sizes[0])
    for width in sizes[1:-1]:
        h = net.dense(h, width, activation)
    out = net.dense(h, sizes[-1], output_activation)
    lname = LOSS_ALIASES.get(loss, loss) if isinstance(loss, str) else loss
    if lname == "softmax_cross_entropy" and target_kind != "onehot":
        y = net.target("y", kind="label")
    else:
        y = net.target("y", sizes[-1])
    return net.build(out, loss, y)
