"""The options of a training run, declared once: their types and ranges.

One table serves every place an option can come from: a spec's ``[train]`` table (checked by
the spec loader, so ``bpc compile``, ``show``, ``check`` and ``train`` all refuse a bad one),
``bpc train``'s command line and ``TrainConfig`` in the library (``TrainConfig.validate``).
Pure Python, no numpy: the spec loader imports it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
SCHEDULES = ("constant", "step", "cosine")
MAX_INT = 2**63 - 1      # what numpy and C can count to; an epoch count beyond it is no plan


@dataclass(frozen=True)
class Option:
    """One option: ``kind`` is "choice", "int", "float" or "bool"; numbers must lie in
    [low, high) (``low_open``: (low, high)); ``optional``: None is allowed (it means the default)."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    optional: bool = False
    choices: tuple = ()
    in_spec: bool = True          # may be set in a spec's [train] table


OPTIONS = {o.name: o for o in (
    Option("optimizer", "choice", choices=OPTIMIZERS),
    Option("lr", "float", 0, low_open=True, optional=True),
    Option("epochs", "int", 1),
    Option("batch_size", "int", 0, optional=True),
    Option("momentum", "float", 0, 1),
    Option("beta1", "float", 0, 1, in_spec=False),
    Option("beta2", "float", 0, 1, in_spec=False),
    Option("eps", "float", 0, low_open=True, in_spec=False),
    Option("weight_decay", "float", 0),
    Option("schedule", "choice", choices=SCHEDULES),
    Option("step_size", "int", 1, optional=True),
    Option("gamma", "float", 0, low_open=True),
    Option("min_lr", "float", 0),
    Option("clip", "float", 0, low_open=True, optional=True),
    Option("seed", "int", 0),
    Option("shuffle", "bool", in_spec=False),
    Option("val_split", "float", 0, 1),
    Option("patience", "int", 1, optional=True),
    Option("min_delta", "float", 0),
    Option("vanish_ratio", "float", 0, in_spec=False),
    Option("vanish_floor", "float", 0, in_spec=False),
    Option("explode_norm", "float", 0, low_open=True, in_spec=False),
    Option("log_every", "int", 1, optional=True, in_spec=False),
)}

# the keys a spec's [train] table may hold (the long options of `bpc train`, with underscores)
SPEC_KEYS = tuple(name for name, o in OPTIONS.items() if o.in_spec)


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
