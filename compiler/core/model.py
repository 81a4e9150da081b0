"""The Model: a forward graph (prediction and scalar loss) with its named inputs and params."""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field

from compiler.errors import ModelError
from compiler.freetext import check_text

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")

# names the generated code uses itself; a model's names must not shadow them
RESERVED = frozenset({
    "np", "n", "dt", "params", "grads", "loss", "forward", "backward", "init_params", "rng", "seed",
    "dtype", "float", "int", "len", "dict", "tuple", "range", "print", "numpy", "math",
    "PARAMS", "INPUTS", "TARGETS", "TARGET_KINDS", "FORMULAS", "DTYPE", "SOURCE_HASH",
    "None", "True", "False", "self", "cls", "object", "type", "ValueError", "KeyError",
    "training", "stats",
})


# what a target holds: real values, or integer class labels (one class index per sample)
TARGET_KINDS = ("real", "label")


def check_target_kind(kind, what=""):
    """``kind`` if it is one of TARGET_KINDS, else a ModelError: ``what`` (e.g. ``"target 'y':
    kind"``) then the problem; without ``what``, the problem alone (the spec loader names the
    field)."""
    if kind not in TARGET_KINDS:
        raise ModelError(f"{what} must be 'real' or 'label', not {kind!r}".lstrip())
    return kind


def check_name(name, what, reserved=True):
    """Validate an identifier that will reach generated code (``reserved``: also refuse the
    names the generated functions use for themselves, which model names cannot shadow)."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ModelError(f"{what} name {name!r} is not allowed: use a letter followed by letters, "
                         "digits or underscores (at most 64 characters)")
    if keyword.iskeyword(name) or keyword.issoftkeyword(name) or (reserved and name in RESERVED):
        raise ModelError(f"{what} name {name!r} is reserved in generated code; choose another")
    return name


@dataclass(frozen=True)
class Head:
    """One output of a model with several: its name (the layer's), its prediction node, and
    the first loss that scores it (its built-in name or "expression", and its target node)."""

    name: str
    prediction: object
    loss_kind: str
    target: object


@dataclass(frozen=True)
class Model:
    """A differentiable model ready to compile.

    ``inputs`` and ``targets`` are IR input nodes (batch-first), ``params`` IR param nodes;
    ``prediction`` is what the generated ``forward`` returns (with several ``heads``, the first
    of the tuple it returns) and ``loss`` the scalar batch
    mean that ``loss``/``backward`` return. ``names`` maps node digests to readable names;
    ``init`` maps each parameter name to its initialisation (see ``emit``); ``masks`` are the
    dropout masks (see ``Network.dropout``).
    """

    name: str
    inputs: tuple
    targets: tuple
    params: tuple
    prediction: object
    loss: object
    names: dict = field(default_factory=dict)
    init: dict = field(default_factory=dict)
    source: str = "Python API"      # where the model came from, named in the generated header
    source_text: str = ""           # the spec file's text, hashed into the header when given
    description: str = ""
    loss_kind: str = "expression"   # a built-in loss name, or "expression"
    # dropout masks: IR input nodes of role "mask" (attr "rate"), drawn by the generated module
    # (ones in inference, 0 or 1/(1 - rate) in training), never passed by the caller
    masks: tuple = ()
    # batchnorm running statistics: (IR input node of role "stat", the node of its next value)
    # pairs; the module reads each from its ``stats`` argument and, in training mode, stores the
    # next value back; ``mode`` is the training flag as a number (role "mode"), None without them
    stats: tuple = ()
    mode: object = None
    # several outputs (losses on k > 1 distinct outputs): one Head per output, in the order of
    # the losses; ``forward`` returns their predictions as a tuple (``prediction`` is the
    # first's). Empty for a model of one output, whose ``forward`` returns one array.
    heads: tuple = ()

    @property
    def leaves(self):
        """Every leaf the generated functions bind: inputs, targets, masks, statistics, mode, params."""
        return (*self.inputs, *self.targets, *self.masks, *(s for s, _ in self.stats),
                *((self.mode,) if self.mode is not None else ()), *self.params)

    def __post_init__(self):
        check_name(self.name, "model", reserved=False)
        seen = set()
        for node in self.leaves:
            if node.name in seen:
                raise ModelError(f"name {node.name!r} is used twice in model {self.name!r}")
            seen.add(node.name)
        # the same check as for a spec file's description (one rule, whichever way text comes in)
        check_text(self.source, "source", multiline=False)
        check_text(self.description, "description")
        if self.heads and (len(self.heads) < 2 or self.heads[0].prediction is not self.prediction
                           or len({h.name for h in self.heads}) != len(self.heads)):
            raise ModelError("heads: at least two outputs of distinct names, the first being the prediction")
        missing = [p.name for p in self.params if p.name not in self.init]
        if missing:
            raise ModelError(f"no initialisation given for parameter(s) {', '.join(missing)}")
