"""The backend-neutral half of a compile: everything every backend renders from.

``lower(model, dtype)`` builds the Program once and derives from it what does not depend on
the target language: the gradient formulas (text and LaTeX), the content hash, the generated
module's Python interface (PARAMS, INPUTS, TARGETS, TARGET_KINDS, CLASSES, LOSS, the argument
lists, the prediction's description) and the ``init_params`` code. Every backend is a renderer
of the resulting ``Lowered`` (see ``compiler.backends.registry``); none runs another.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp

from compiler import __version__
from compiler.backends.constants import numeric_constants_to_floats
from compiler.core import ir
from compiler.core.formulas import Formulas
from compiler.core.ir import format_shape as shape_code
from compiler.core.moments import plan as moments_plan
from compiler.core.program import build_program
from compiler.errors import ModelError, UnsupportedError

FLOAT32_MAX = 3.4028234663852886e38

_INIT_DOCS = {"zeros": "zero biases", "value": "declared values", "glorot": "Glorot-uniform weights",
              "he": "He-normal weights"}


@dataclass(frozen=True)
class Interface:
    """The generated module's Python-level interface, as Python code and text (the NumPy module
    and the C target's wrapper are both Python modules with this interface)."""

    params_shapes: str       # PARAMS
    inputs_shapes: str       # INPUTS
    targets_shapes: str      # TARGETS
    target_kinds: str        # TARGET_KINDS
    classes: str             # CLASSES
    loss_kind: str           # LOSS
    prediction_doc: str
    data_args: str           # "x"
    all_args: str            # "x, y"
    has_labels: bool
    has_tokens: bool = False  # integer token ids or labels with a per-sample shape, e.g. (T,)
    vocab: str = "{}"         # VOCAB: input of token ids -> vocabulary size (emitted when not empty)
    dropout: str = "{}"      # DROPOUT: mask name -> rate (a model with dropout takes a mode)
    mode_args: str = ""      # ", training=False[, seed=None][, stats=None]" for dropout / batchnorm, else ""
    has_dropout: bool = False
    stats_shapes: str = "{}"     # STATS: batchnorm running statistic -> shape
    stats_init: str = "{}"       # its value before training (means 0, variances 1)
    outputs: str = ""            # OUTPUTS of a model of several outputs: their names, forward's order ("" for one)
    output_losses: str = "{}"    # OUTPUT_LOSSES: output -> the loss that scores it (its first)
    output_targets: str = "{}"   # OUTPUT_TARGETS: output -> that loss's target


@dataclass(frozen=True)
class Lowered:
    """A model lowered for rendering: its Program plus what every backend shares."""

    model: object
    program: object
    dtype: object            # None, "float32" or "float64"
    formulas: dict           # param -> gradient formula chain, text
    latex: dict              # param -> gradient formula chain, LaTeX
    source_hash: str
    classes: dict            # target uid -> number of classes (targets of softmax losses)
    interface: Interface
    init_lines: tuple        # the body of init_params (Python, NumPy)
    init_doc: str
    lines: Formulas          # the formula of each scheduled value (generated code's comments)
    moments: object = None   # MomentsPlan (compiler.core.moments) when the data moments can be hoisted


def lower(model, dtype=None, second_order=True):
    """Lower ``model`` for a backend. ``dtype`` is already a name (None, "float32", "float64");
    each backend checks which it supports. ``second_order``: also the ``hvp`` and ``gnvp`` entry
    points (False: backward alone, a faster compile)."""
    program = build_program(model, second_order)
    fm = Formulas(program)
    if dtype == "float32":
        _check_float32_constants(program, fm)

    classes = token_classes(model, program)
    for node in (*program.loss_nodes, *program.backward_nodes):
        if node.op == "xent":
            classes[node.inputs[2].uid] = int(node.inputs[0].shape[-1])

    formulas = {}
    for p, g in program.grads:
        formulas[p.name] = "0" if g is None else "; ".join(fm.chain(g)) or fm.line(g)
    latex = LatexChains(program, fm)

    data, targets = list(model.inputs), list(model.targets)
    interface = Interface(
        params_shapes=_dict_code({p.name: shape_code(p.shape) for p in model.params}),
        inputs_shapes=_dict_code({x.name: shape_code(per_sample(x)) for x in data}),
        targets_shapes=_dict_code({x.name: shape_code(per_sample(x)) for x in targets}),
        target_kinds=_dict_code({x.name: repr(x.attr("kind")) for x in targets}),
        classes=_dict_code({x.name: str(classes[x.uid]) for x in targets if x.uid in classes}),
        loss_kind=model.loss_kind,
        prediction_doc=prediction_doc(model),
        data_args=", ".join(x.name for x in data),
        all_args=", ".join(x.name for x in data + targets),
        has_labels=any(x.attr("kind") == "label" for x in targets),
        has_tokens=any(is_tokens(x) for x in data + targets),
        vocab=_dict_code({x.name: str(classes[x.uid]) for x in data if x.attr("kind") == "ids"}),
        dropout=_dict_code({m.name: repr(m.attr("rate")) for m in model.masks}),
        mode_args=mode_args(model),
        has_dropout=bool(model.masks),
        stats_shapes=_dict_code({s.name: shape_code(s.shape) for s, _ in model.stats}),
        stats_init=_dict_code({s.name: repr(s.attr("init")) for s, _ in model.stats}),
        outputs=repr(tuple(h.name for h in model.heads)) if model.heads else "",
        output_losses=_dict_code({h.name: repr(h.loss_kind) for h in model.heads}),
        output_targets=_dict_code({h.name: repr(h.target.name) for h in model.heads}),
    )
    schemes = sorted({model.init[p.name][0] for p in model.params})
    init_doc = ", ".join(_INIT_DOCS[s] for s in schemes) or "none"
    inits = tuple(init_line(p.name, p.shape, model.init[p.name]) for p in model.params)
    return Lowered(model, program, dtype, formulas, latex, model_hash(model, dtype), classes, interface,
                   inits, init_doc, fm, moments_plan(model))


class LatexChains(Mapping):
    """param -> its gradient's formula chain in LaTeX, made on first use: a compile that nobody
    shows (training, a benchmark) does not print every backward statement in LaTeX too (a
    tenth of a second for a 12-block transformer). Equal to the dict it stands for, and
    pickled as one."""

    def __init__(self, program, fm):
        self._program, self._fm, self._made = program, fm, None

    def _chains(self):
        if self._made is None:
            fm, made = self._fm, {}
            for p, g in self._program.grads:
                made[p.name] = "0" if g is None else r" \\ ".join(fm.chain(g, latex=True)) or fm.line(g, latex=True)
            self._made = made
        return self._made

    def __getitem__(self, name):
        return self._chains()[name]

    def __iter__(self):
        return iter(self._chains())

    def __len__(self):
        return len(self._program.grads)

    def __repr__(self):
        return repr(self._chains())

    def __reduce__(self):
        return dict, (dict(self._chains()),)


def mode_args(model):
    """The keyword arguments of a model that has a training mode (dropout, batchnorm)."""
    if not model.masks and not model.stats:
        return ""
    return ", training=False" + (", seed=None" if model.masks else "") + (", stats=None" if model.stats else "")


def per_sample(node):
    return tuple(node.shape[1:])


def is_tokens(node):
    """Whether a leaf holds integers with a per-sample shape: token ids (n, T), or labels (n, T)
    of a sequence (checked by the modules' ``_tokens``)."""
    return node.attr("kind") == "ids" or (node.attr("kind") == "label" and len(node.shape) > 1)


def token_classes(model, program):
    """input uid -> vocabulary size of each input of token ids (the smallest table it indexes);
    a ModelError when token ids reach anything but an embedding."""
    ids = {x.uid: x for x in model.inputs if x.attr("kind") == "ids"}
    out = {}
    for node in ir.topo_order([*program.predictions, program.loss]):
        for k, i in enumerate(node.inputs):
            if i.uid not in ids:
                continue
            if node.op != "embed" or k != 1:
                raise ModelError(f"input {i.name!r} holds integer token ids; feed it to an embedding "
                                 f"(net.embedding), not to {node.op}")
            vocab = int(node.inputs[0].shape[0])
            out[i.uid] = min(vocab, out.get(i.uid, vocab))
    return out


def model_hash(model, dtype):
    h = hashlib.sha256()
    # the spec's text, not its path: the same model hashes the same wherever it is compiled from
    for part in (__version__, model.name, str(dtype), model.source_text, model.loss_kind,
                 model.prediction.digest, model.loss.digest, *(u.digest for _, u in model.stats),
                 repr(sorted(model.init.items())), repr(sorted(model.names.items())),
                 repr([n.name for n in (*model.inputs, *model.targets, *model.params)]),
                 *(f"{h.name}:{h.prediction.digest}" for h in model.heads)):
        h.update(part.encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def init_line(name, shape, init):
    kind = init[0]
    target = f"params[{name!r}]"
    if kind == "zeros":
        return f"{target} = np.zeros({shape_code(shape)}, dtype=dtype)"
    if kind == "value":
        if shape:
            return f"{target} = np.full({shape_code(shape)}, {float(init[1])!r}, dtype=dtype)"
        return f"{target} = np.asarray({float(init[1])!r}, dtype=dtype)"
    if kind == "glorot":
        lim = math.sqrt(6.0 / (int(init[1]) + int(init[2])))
        return f"{target} = rng.uniform(-{lim!r}, {lim!r}, size={shape_code(shape)}).astype(dtype)"
    if kind == "he":
        std = math.sqrt(2.0 / int(init[1]))
        return f"{target} = rng.normal(0.0, {std!r}, size={shape_code(shape)}).astype(dtype)"
    raise ModelError(f"unknown initialisation {init!r} for parameter {name!r}")


def prediction_doc(model):
    """What forward returns, in words: one output's prediction, or the tuple of several."""
    if model.heads:
        return (f"a tuple of {len(model.heads)} arrays, one per output of OUTPUTS: " + "; ".join(
            f"{h.name} {ir.format_shape(h.prediction.shape)}, {_output_doc(h.loss_kind, h.prediction, False)}"
            for h in model.heads))
    return _output_doc(model.loss_kind, model.prediction)


def _output_doc(loss_kind, prediction, shape=True):
    """One output's prediction in words (``shape``: with its shape in words)."""
    if loss_kind == "softmax_cross_entropy":
        if len(prediction.shape) == 3:
            return "class probabilities (softmax of the logits) at every position" + (
                ", shape (batch, T, classes)" if shape else "")
        return "class probabilities (softmax of the logits)" + (", shape (batch, classes)" if shape else "")
    if loss_kind == "bce_with_logits":
        return "probabilities (sigmoid of the logits)"
    return "the model output" + (", shape (batch,) + per-sample output shape" if shape else "")


def _check_float32_constants(program, fm):
    """A module compiled for float32 computes in float32: a larger literal becomes inf.
    (Modules that follow the inputs' dtype cannot know it.)"""
    nodes = {n.uid: n for n in (*program.forward_nodes, *program.loss_nodes, *program.backward_nodes)}
    for n in list(nodes.values()):
        for i in n.inputs:
            if i.uid in program.inline:
                nodes.setdefault(i.uid, i)
    for node in nodes.values():
        if node.op != "ew":
            continue
        for c in numeric_constants_to_floats(node.attr("expr")).atoms(sp.Number):
            if abs(float(c)) > FLOAT32_MAX:
                where = fm.line(node) if node.uid in program.names else fm.rhs(node)
                raise UnsupportedError(f"model {program.model.name!r}: cannot generate {where} for float32: "
                                       f"the constant {float(c):.3g} is beyond float32 range (3.4e38)")


def statement(st, fm, node):
    """``st.statement(node)``; an UnsupportedError names the derived formula it arose in (a
    derivative or a fusion can produce what the model itself does not contain, such as a
    constant beyond float64)."""
    try:
        return st.statement(node)
    except UnsupportedError as e:
        raise UnsupportedError(f"model {st.p.model.name!r}: cannot generate {fm.line(node)}: {e}") from None


def _dict_code(d):
    return "{" + ", ".join(f"{k!r}: {v}" for k, v in d.items()) + "}"
