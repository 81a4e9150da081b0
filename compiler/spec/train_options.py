"""The options of a training run, declared once: ``TrainConfig``'s fields, each with its type,
range and, for the options ``bpc train`` takes on its command line, the flag's help. It lives in
the spec package because a spec's ``[train]`` table is part of the spec language; the training
loop reads it from here, down the pipeline.

One declaration serves every place an option can come from: a spec's ``[train]`` table (checked
by the spec loader, so ``bpc compile``, ``show``, ``check`` and ``train`` all refuse a bad one),
``bpc train``'s flags (built from these fields by ``add_flag``) and ``TrainConfig`` in the
library (``TrainConfig.validate``). Pure Python, no numpy: the spec loader and ``bpc --help``
import it (``compiler.train.loop`` re-exports ``TrainConfig``, ``TrainError`` and ``DEFAULT_LR``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace

from compiler.errors import BpcError

# lbfgs and newton-cg: full-batch second-order fits through scipy (compiler/train/second_order.py)
SECOND_ORDER = ("lbfgs", "newton-cg")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", *SECOND_ORDER)
SCHEDULES = ("constant", "step", "cosine")
MAX_INT = 2**63 - 1      # what numpy and C can count to; an epoch count beyond it is no plan
DEFAULT_LR = {"sgd": 0.01, "momentum": 0.01, "nesterov": 0.01, "adam": 0.001,
              "lbfgs": 1.0, "newton-cg": 1.0}     # (second-order methods take no learning rate)


class TrainError(BpcError):
    """Bad training data or options."""


@dataclass(frozen=True)
class Option:
    """One option: ``kind`` is "choice", "int", "float" or "bool"; numbers must lie in
    [low, high) (``low_open``: (low, high)); ``optional``: None is allowed (it means the default).
    ``help``: the help of ``bpc train``'s flag (``{default}`` is the field's default), None for
    an option of the library alone; ``metavar`` names the flag's value."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    optional: bool = False
    choices: tuple = ()
    in_spec: bool = True          # may be set in a spec's [train] table
    help: str | None = None
    metavar: str | None = None
    default: object = None

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")


def _option(default, kind, low=None, high=None, **declaration):
    return field(default=default, metadata={"option": Option("", kind, low, high, default=default, **declaration)})


@dataclass
class TrainConfig:
    """Options of a training run; ``validate()`` checks them (``train`` calls it)."""

    optimizer: str = _option("adam", "choice", choices=OPTIMIZERS,
                             help="default: {default}; lbfgs and newton-cg (exact Hessian-vector products) fit "
                             "the whole training set with scipy, epochs = iterations")
    lr: float | None = _option(      # None: 0.01 for SGD/momentum, 0.001 for Adam
        None, "float", 0, low_open=True, optional=True, metavar="LR",
        help=f"learning rate (default: {DEFAULT_LR['adam']:g} for adam, {DEFAULT_LR['sgd']:g} otherwise)")
    epochs: int = _option(100, "int", 1, metavar="N", help="default: {default}")
    batch_size: int | None = _option(   # None or 0: the whole training set in one batch
        32, "int", 0, optional=True, metavar="N", help="default: {default}; 0 = the whole training set")
    momentum: float = _option(0.9, "float", 0, 1, metavar="M", help="momentum/nesterov coefficient (default: {default})")
    beta1: float = _option(0.9, "float", 0, 1, in_spec=False)       # adam
    beta2: float = _option(0.999, "float", 0, 1, in_spec=False)
    eps: float = _option(1e-8, "float", 0, low_open=True, in_spec=False)
    weight_decay: float = _option(   # L2 added to the gradient for SGD/momentum; decoupled (AdamW) for Adam
        0.0, "float", 0, metavar="WD", help="L2 for sgd/momentum, decoupled (AdamW) for adam (default: {default})")
    schedule: str = _option("constant", "choice", choices=SCHEDULES, help="learning-rate schedule per epoch")
    step_size: int | None = _option(   # step: epochs between decays (default: a third of the run)
        None, "int", 1, optional=True, metavar="N", help="step schedule: epochs between decays (default: epochs/3)")
    gamma: float = _option(0.1, "float", 0, low_open=True, metavar="G", help="step schedule: decay factor (default: {default})")
    min_lr: float = _option(0.0, "float", 0, metavar="LR", help="cosine schedule: final learning rate (default: {default})")
    clip: float | None = _option(None, "float", 0, low_open=True, optional=True, metavar="NORM",
                                 help="clip the global gradient norm to NORM")
    dp_clip: float | None = _option(   # DP-SGD: each sample's gradient clipped to this L2 norm
        None, "float", 0, low_open=True, optional=True, metavar="C",
        help="DP-SGD: clip each sample's gradient (all parameters together) to L2 norm C; needs --dp-noise")
    dp_noise: float | None = _option(  # DP-SGD: noise multiplier sigma (noise std sigma*C on the summed gradient)
        None, "float", 0, optional=True, metavar="SIGMA",
        help="DP-SGD: add N(0, (SIGMA*C)^2) noise to the sum of the clipped gradients; needs --dp-clip")
    dp_delta: float = _option(1e-5, "float", 0, 1, low_open=True, metavar="DELTA",
                              help="DP-SGD: the delta at which epsilon is reported (default: {default})")
    seed: int = _option(0, "int", 0, metavar="S", help="initialisation, split and shuffling (default: {default})")
    shuffle: bool = _option(True, "bool", in_spec=False)
    val_split: float = _option(0.0, "float", 0, 1, metavar="F", help="fraction held out for validation (default: {default})")
    patience: int | None = _option(None, "int", 1, optional=True, metavar="N",
                                   help="early stopping after N epochs without improvement of the validation loss "
                                   "(of the training loss without a validation split)")
    min_delta: float = _option(0.0, "float", 0, metavar="D", help="smallest improvement that counts (default: {default})")
    vanish_ratio: float = _option(   # warn when a parameter's gradient norm is this much below the largest
        1e-4, "float", 0, in_spec=False)
    vanish_floor: float = _option(1e-6, "float", 0, in_spec=False)   # ... and the largest is above this
    explode_norm: float = _option(1e3, "float", 0, low_open=True, in_spec=False)   # warn above this global norm
    tol: float = _option(1e-12, "float", 0, low_open=True, metavar="TOL",
                         help="lbfgs/newton-cg: scipy's convergence tolerance (default: {default})")
    log_every: int | None = _option(   # epochs between log lines (default: about 10 lines per run)
        None, "int", 1, optional=True, in_spec=False, metavar="N",
        help="epochs between log lines (default: about 10 lines)")

    def validate(self):
        """Check every option against its declaration; raises TrainError naming the option."""
        for name in OPTIONS:
            try:
                check_option(name, getattr(self, name))
            except OptionError as e:
                raise TrainError(f"{name} {e}") from None
        if (self.dp_clip is None) != (self.dp_noise is None):
            raise TrainError("DP-SGD needs both dp_clip (--dp-clip C) and dp_noise (--dp-noise SIGMA)")
        if self.dp_clip is not None and self.clip is not None:
            raise TrainError("clip and dp_clip together: DP-SGD clips each sample's gradient (dp_clip); "
                             "leave clip out")
        return self

    @property
    def private(self):
        """Whether the run is DP-SGD."""
        return self.dp_clip is not None

    @property
    def base_lr(self):
        return DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)


OPTIONS = {f.name: replace(f.metadata["option"], name=f.name) for f in fields(TrainConfig)}

# the keys a spec's [train] table may hold (the long options of `bpc train`, with underscores)
SPEC_KEYS = tuple(name for name, o in OPTIONS.items() if o.in_spec)
# the options `bpc train` takes as flags (--batch-size for batch_size)
FLAG_KEYS = tuple(name for name, o in OPTIONS.items() if o.help is not None)


def add_flag(group, name):
    """Add the flag of option ``name`` to an argparse parser or group: its type, choices,
    metavar and help from the declaration; its default None (the spec's, else TrainConfig's)."""
    o = OPTIONS[name]
    kwargs = {"choices": o.choices} if o.kind == "choice" else {"type": {"int": int, "float": float}[o.kind]}
    if o.metavar:
        kwargs["metavar"] = o.metavar
    group.add_argument(o.flag, dest=name, help=o.help.format(default=_show_default(o.default)), **kwargs)


def _show_default(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


class OptionError(ValueError):
    """A bad option value; the message says why, without naming the option (callers add
    where it came from: ``--epochs``, ``spec.toml: [train] epochs``, ``epochs``)."""


def check_option(name, value):
    """``value`` checked against the option ``name`` and normalised (ints of a float option
    become floats); raises OptionError saying what is wrong."""
    o = OPTIONS[name]
    if value is None:
        if o.optional:
            return None
        raise OptionError(f"must be given, got {value!r}")
    if o.kind == "choice":
        if not isinstance(value, str) or value not in o.choices:
            raise OptionError(f"must be one of {', '.join(o.choices)}, got {_short(value)}")
        return value
    if o.kind == "bool":
        if not isinstance(value, bool) and type(value).__name__ != "bool_":   # numpy's bool too
            raise OptionError(f"must be true or false, got {_short(value)}")
        return bool(value)
    integer = o.kind == "int"
    kinds = numbers.Integral if integer else numbers.Real     # numpy's scalars register with these
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, kinds):
        raise OptionError(f"must be {'an integer' if integer else 'a finite number'}, got {_short(value)}")
    if integer:
        value = int(value)
        if value > MAX_INT:
            raise OptionError(f"must be at most {MAX_INT}, got {value}")
    else:
        if isinstance(value, numbers.Integral) and abs(int(value)) > 2**1023:
            raise OptionError(f"must be a finite number, got {_short(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise OptionError(f"must be a finite number, got {value!r}")
    if o.low is not None and (value <= o.low if o.low_open else value < o.low):
        raise OptionError(f"must be {'>' if o.low_open else '>='} {o.low}, got {value!r}")
    if o.high is not None and value >= o.high:
        raise OptionError(f"must be < {o.high}, got {value!r}")
    return value


def check_spec_table(table, error):
    """A spec's [train] table checked and normalised: ``{key: value}``. For the first bad key,
    raises ``error(key, message)`` (the caller's exception, naming its file)."""
    out = {}
    for key, value in table.items():
        if key not in SPEC_KEYS:
            import difflib
            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(SPEC_KEYS)}"
            raise error(key, f"unknown option; {hint}")
        if value is None:   # TOML has no null; in JSON, leaving the key out is how to say "default"
            raise error(key, "must not be null; leave the key out for the default")
        try:
            out[key] = check_option(key, value)
        except OptionError as e:
            raise error(key, str(e)) from None
    return out


def _short(value, limit=40):
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."
