"""Facts defined once (issue 11, item 4), and every place that used to repeat them agreeing with
the one definition: dtype names, the [train] options and bpc train's flags, target kinds,
[matrix] activations, shapes as text."""
import argparse
import dataclasses

import pytest
import sympy as sp

import compiler as bpc
from compiler import dtypes, limits
from compiler.backends.c.printer import PRINTERS
from compiler.cli.app import build_parser
from compiler.core.ir import N, format_shape
from compiler.errors import ModelError
from compiler.spec.loader import SpecError, loads_spec
from compiler.spec.train_options import FLAG_KEYS, OPTIONS, SPEC_KEYS, TrainConfig


def _subparser(name):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flags(name):
    return {a.option_strings[-1]: a for a in _subparser(name)._actions if a.option_strings}


# ------------------------------------------------------------------------------------- dtypes

@pytest.mark.parametrize("command", ["compile", "train"])
def test_dtype_flags_offer_the_dtype_names(command):
    assert tuple(_flags(command)["--dtype"].choices) == dtypes.NAMES


def test_every_dtype_has_an_itemsize_and_a_c_printer():
    assert set(dtypes.ITEMSIZE) == set(dtypes.NAMES) == set(PRINTERS)
    assert dtypes.DEFAULT in dtypes.NAMES


@pytest.mark.parametrize("dtype", dtypes.NAMES)
def test_each_dtype_name_is_accepted_by_spec_compile_and_memory_estimate(dtype):
    spec = loads_spec(SPEC.replace('name = "line"', f'name = "line"\ndtype = "{dtype}"'), "s.toml", "toml")
    assert spec.dtype == dtype
    assert f"DTYPE = {dtype!r}" in bpc.compile_model(spec.model, dtype=dtype).source
    ((_, _, size),) = limits.parameter_bytes({"W": (3, 5)}, dtype)
    assert size == 15 * dtypes.ITEMSIZE[dtype]


@pytest.mark.parametrize("dtype", ["float16", "double", "int32"])
def test_other_dtype_names_are_refused_naming_the_known_ones(dtype):
    with pytest.raises(SpecError, match="must be one of " + ", ".join(dtypes.NAMES)):
        loads_spec(SPEC.replace('name = "line"', f'name = "line"\ndtype = "{dtype}"'), "s.toml", "toml")
    with pytest.raises(ModelError):
        bpc.compile_model(bpc.mlp([1, 1]), dtype=dtype)


# ---------------------------------------------------------------------------- [train] options

def test_options_are_trainconfig_fields_with_its_defaults():
    assert list(OPTIONS) == [f.name for f in dataclasses.fields(TrainConfig)]
    for name, o in OPTIONS.items():
        assert o.default == getattr(TrainConfig(), name), name
    assert set(SPEC_KEYS) <= set(FLAG_KEYS)


@pytest.mark.parametrize("key", FLAG_KEYS)
def test_each_flag_of_bpc_train_comes_from_its_option(key):
    o = OPTIONS[key]
    action = _flags("train")[o.flag]
    assert action.dest == key and action.default is None       # None: the spec's value, else the field's
    if o.kind == "choice":
        assert tuple(action.choices) == o.choices
    else:
        assert action.type is {"int": int, "float": float}[o.kind]
    if "{default}" in o.help:
        shown = f"{o.default:g}" if isinstance(o.default, float) else str(o.default)
        assert f"default: {shown}" in action.help


def test_bpc_train_has_no_option_flags_beyond_the_declared_ones():
    others = {"--data", "--test", "--dtype", "--target", "--out", "--resume", "--checkpoint-every", "--checkpoint", "--plot",
              "--plot-grads", "--boundary", "--history", "--threads", "--max-param-memory", "--quiet", "--help",
              "--workers", "--scheduler"}
    assert set(_flags("train")) - others == {OPTIONS[k].flag for k in FLAG_KEYS}


# ------------------------------------------------------------------------------- target kinds

SPEC = """
[model]
name = "line"
[expression]
prediction = "w*x + c"
params = { w = 0.0, c = 0.0 }
inputs = ["x"]
targets = ["y"]
"""
NETWORK = """
[network]
input = { size = 2 }
target = { size = 1, kind = "KIND" }
layers = [{ units = 1 }]
"""
MATRIX = """
[matrix]
inputs = { x = [2, 1] }
targets = { y = [1, 1] }
params = { W = [1, 2] }
target_kind = "KIND"
output = "W*x"
"""


def _network_target(kind):
    bpc.Network("n").target("y", 1, kind=kind)


def _matrix_api(kind):
    x, y, w = sp.MatrixSymbol("x", 2, 1), sp.MatrixSymbol("y", 1, 1), sp.MatrixSymbol("W", 1, 2)
    bpc.from_matrix_expr(w * x, inputs=[x], targets=[y], target_kind=kind)


def _spec(table):
    return lambda kind: loads_spec("[model]\nname = \"m\"\n" + table.replace("KIND", kind), "m.toml", "toml")


ENTRIES = [("Network.target", _network_target, "target 'y': kind must be"),
           ("from_matrix_expr", _matrix_api, "target_kind must be"),
           ("[network] spec", _spec(NETWORK), "network.target.kind: must be"),
           ("[matrix] spec", _spec(MATRIX), "matrix.target_kind: must be")]


@pytest.mark.parametrize("entry,build,prefix", ENTRIES, ids=[e[0] for e in ENTRIES])
@pytest.mark.parametrize("kind", ["onehot", "lable", "Label", ""])
def test_every_entry_refuses_an_unknown_target_kind_alike(entry, build, prefix, kind):
    with pytest.raises(ModelError, match=f"{prefix} 'real' or 'label', not {kind!r}"):
        build(kind)


@pytest.mark.parametrize("entry,build,prefix", ENTRIES, ids=[e[0] for e in ENTRIES])
def test_every_entry_accepts_real_targets(entry, build, prefix):
    build("real")


# ------------------------------------------------------------------------ [matrix] activations

def _code(spec):
    """The generated module without its header and SOURCE_HASH (which follow the spec's text)."""
    lines = bpc.compile_model(spec.model).source.split("\nimport", 1)[1].splitlines()
    return [line for line in lines if not line.startswith("SOURCE_HASH")]


ACT_SPEC = """
[model]
name = "act"
[matrix]
inputs = { x = [2, 1] }
targets = { y = [1, 1] }
params = { W = [3, 2], V = [1, 3] }
activations = { act = "ACT" }
output = "V*act(W*x)"
"""


@pytest.mark.parametrize("builtin,written", [("softplus", "log(1 + exp(x))"), ("tanh", "tanh(x)"),
                                             ("swish", "x*sigmoid(x)")])
def test_a_matrix_activation_written_out_compiles_like_the_builtin(builtin, written):
    def source(act):
        return _code(loads_spec(ACT_SPEC.replace("ACT", act), "act.toml", "toml"))
    assert source(written) == source(builtin)


def test_a_builtin_activation_called_directly_is_the_declared_one():
    direct = loads_spec(ACT_SPEC.replace('activations = { act = "ACT" }\n', "").replace("act(", "gelu("),
                        "a.toml", "toml")
    declared = loads_spec(ACT_SPEC.replace("ACT", "gelu"), "a.toml", "toml")
    assert _code(direct) == _code(declared)


# ----------------------------------------------------------------------------- shapes as text

@pytest.mark.parametrize("shape,text", [((), "()"), ((N,), "(n,)"), ((N, 3), "(n, 3)"), ((4,), "(4,)"),
                                        ((2, 5), "(2, 5)"), ((sp.Integer(7), N), "(7, n)")])
def test_format_shape_is_python_tuple_text(shape, text):
    assert format_shape(shape) == text
    assert eval(text, {"n": 11}) == tuple(11 if d == N else int(d) for d in shape)
