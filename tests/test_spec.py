"""Spec files build the same models as the Python API, and the safe expression parser accepts
exactly its whitelist. (Hostile and malformed specs: tests/test_bad_input.py.)"""
from dataclasses import replace
from pathlib import Path

import pytest
import sympy as sp

from compiler import compile_model, expression_model, mlp
from compiler.frontends.nn import Network
from compiler.spec.safe_expr import ExprError, parse, parse_constant
from compiler.spec.loader import SpecError, load_spec, loads_spec, source_name

ROOT = Path(__file__).resolve().parent.parent
x, y, p, a, b, c, d = sp.symbols("x y p a b c d", real=True)


def same_source(spec, api_model, dtype=None):
    """The spec's module equals the API model's, once both claim the same source file."""
    api = replace(api_model, source=spec.model.source, source_text=spec.model.source_text,
                  description=spec.model.description)
    return compile_model(spec.model, dtype).source == compile_model(api, dtype).source


def _swish_net():
    net = Network("swish_beta")
    h = net.input("x", 3)
    h = net.dense(h, 8, x / (1 + sp.exp(-1.5 * x)))
    h = net.dense(h, 1)
    return net.build(h, (p - y) ** 2 / 2, net.target("y", 1))


def _named_layers():
    net = Network("named")
    h = net.input("features", 4)
    h = net.dense(h, 5, "relu", name="hidden")
    h = net.activation(h, "softplus")
    h = net.dense(h, 2, name="out")
    return net.build(h, "bce_with_logits", net.target("labels", 2))


EXAMPLES = [
    ("examples/mlp_tanh.toml", lambda: mlp([2, 16, 16, 1], "tanh", "mse", name="mlp_tanh")),
    ("examples/mlp_classifier.toml",
     lambda: mlp([64, 32, 10], "tanh", "softmax_cross_entropy", name="mlp_classifier")),
    ("examples/poly_fit.toml",
     lambda: expression_model(a * x**3 + b * x**2 + c * x + d, {a: 0.0, b: 0.0, c: 0.0, d: 0.0}, [x],
                              [y], (p - y) ** 2, name="poly_fit")),
    ("examples/swish_beta.json", _swish_net),
]


@pytest.mark.parametrize("path,api", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_examples_equal_the_python_api(path, api, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_spec(ROOT / path)
    assert spec.model.source == path          # relative to the working directory
    assert spec.model.source_text == (ROOT / path).read_text()
    assert same_source(spec, api())


# (id, TOML text, JSON text, equivalent Python API model)
ROUND_TRIPS = [
    ("named-layers-bce",
     """
[model]
name = "named"
[network]
input = { name = "features", size = 4 }
target = { name = "labels", size = 2 }
loss = "bce_with_logits"
[[network.layers]]
units = 5
activation = "relu"
name = "hidden"
[[network.layers]]
type = "activation"
activation = "softplus"
[[network.layers]]
units = 2
name = "out"
""",
     {"model": {"name": "named"},
      "network": {"input": {"name": "features", "size": 4}, "target": {"name": "labels", "size": 2},
                  "loss": "bce_with_logits",
                  "layers": [{"units": 5, "activation": "relu", "name": "hidden"},
                             {"type": "activation", "activation": "softplus"},
                             {"units": 2, "name": "out"}]}},
     _named_layers),
    ("constants-and-layer-constants",
     """
[model]
name = "consts"
[constants]
k = "1/4"
[network]
input = { size = 3 }
target = { size = 2 }
loss = "k*(p - y)**2"
[[network.layers]]
units = 4
activation = "x*sigmoid(beta*x)"
constants = { beta = "2*k" }
[[network.layers]]
units = 2
activation = "log(1 + exp(x))"
""",
     {"model": {"name": "consts"}, "constants": {"k": "1/4"},
      "network": {"input": {"size": 3}, "target": {"size": 2}, "loss": "k*(p - y)**2",
                  "layers": [{"units": 4, "activation": "x*sigmoid(beta*x)", "constants": {"beta": "2*k"}},
                             {"units": 2, "activation": "log(1 + exp(x))"}]}},
     lambda: _consts()),
    ("expression-regularised-two-inputs",
     """
[model]
name = "plane"
dtype = "float32"
[expression]
prediction = "w1*u + w2*v + w0"
params = { w1 = 0.5, w2 = "-1/2", w0 = 0 }
inputs = ["u", "v"]
targets = ["t"]
prediction_symbol = "q"
loss = "(q - t)**2 + w1**2/100"
""",
     {"model": {"name": "plane", "dtype": "float32"},
      "expression": {"prediction": "w1*u + w2*v + w0", "params": {"w1": 0.5, "w2": "-1/2", "w0": 0},
                     "inputs": ["u", "v"], "targets": ["t"], "prediction_symbol": "q",
                     "loss": "(q - t)**2 + w1**2/100"}},
     lambda: _plane()),
    ("label-classifier-softmax",
     """
[model]
name = "clf"
[network]
input = { size = 5 }
target = { kind = "label" }
loss = "cross_entropy"
[[network.layers]]
units = 3
""",
     {"model": {"name": "clf"},
      "network": {"input": {"size": 5}, "target": {"kind": "label"}, "loss": "cross_entropy",
                  "layers": [{"units": 3}]}},
     lambda: mlp([5, 3], loss="softmax_cross_entropy", name="clf")),
    ("one-hot-classifier-softmax",
     """
[model]
name = "onehot"
[network]
input = { size = 5 }
target = { size = 3 }
loss = "softmax_cross_entropy"
[[network.layers]]
units = 4
activation = "gelu"
[[network.layers]]
units = 3
""",
     {"model": {"name": "onehot"},
      "network": {"input": {"size": 5}, "target": {"size": 3}, "loss": "softmax_cross_entropy",
                  "layers": [{"units": 4, "activation": "gelu"}, {"units": 3}]}},
     lambda: mlp([5, 4, 3], "gelu", "softmax_cross_entropy", target_kind="onehot", name="onehot")),
]


def _consts():
    net = Network("consts")
    h = net.input("x", 3)
    s = sp.Symbol("s", real=True)
    h = net.dense(h, 4, s * 1 / (1 + sp.exp(-sp.Rational(1, 2) * s)))
    h = net.dense(h, 2, sp.log(1 + sp.exp(s)))
    return net.build(h, sp.Rational(1, 4) * (p - y) ** 2, net.target("y", 2))


def _plane():
    w0, w1, w2, u, v, t, q = sp.symbols("w0 w1 w2 u v t q", real=True)
    return expression_model(w1 * u + w2 * v + w0, {w1: 0.5, w2: -0.5, w0: 0.0}, [u, v], [t],
                            (q - t) ** 2 + w1**2 / 100, prediction_symbol="q", name="plane")


@pytest.mark.parametrize("toml_text,json_obj,api", [r[1:] for r in ROUND_TRIPS], ids=[r[0] for r in ROUND_TRIPS])
def test_toml_json_and_python_api_agree(toml_text, json_obj, api):
    import json
    from_toml = loads_spec(toml_text, "model.toml", "toml")
    from_json = loads_spec(json.dumps(json_obj), "model.json", "json")
    dtype = from_toml.dtype
    assert dtype == from_json.dtype
    assert same_source(from_toml, api(), dtype)
    assert same_source(from_json, api(), dtype)


def test_model_source_is_the_file_name_outside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    f = tmp_path / "fit.toml"
    f.write_text((ROOT / "examples/poly_fit.toml").read_text())
    spec = load_spec(f)
    assert spec.model.source == "fit.toml"
    # the same file anywhere compiles to the same bytes
    g = tmp_path / "sub" / "fit.toml"
    g.parent.mkdir()
    g.write_text(f.read_text())
    assert compile_model(load_spec(g).model).source == compile_model(spec.model).source


def test_model_source_does_not_depend_on_where_bpc_is_installed(tmp_path, monkeypatch):
    # the label comes from the path and the working directory only: a copy of the repository
    # anywhere (or bpc installed into site-packages) names examples/<file> from its root
    (tmp_path / "examples").mkdir()
    f = tmp_path / "examples" / "fit.toml"
    f.write_text((ROOT / "examples/poly_fit.toml").read_text())
    monkeypatch.chdir(tmp_path)
    assert load_spec("examples/fit.toml").model.source == "examples/fit.toml"
    assert load_spec(f).model.source == "examples/fit.toml"
    assert source_name(f, cwd=tmp_path / "examples") == "fit.toml"
    assert source_name(ROOT / "examples/poly_fit.toml", cwd=ROOT) == "examples/poly_fit.toml"


def test_an_explicit_source_name_is_checked(tmp_path):
    f = tmp_path / "fit.toml"
    f.write_text((ROOT / "examples/poly_fit.toml").read_text())
    assert load_spec(f, source="models/fit.toml").model.source == "models/fit.toml"
    for bad in ['a"""b.toml', "/abs/fit.toml", "a/../b.toml", "a\\b.toml", ""]:
        with pytest.raises(SpecError, match="source name"):
            load_spec(f, source=bad)


def test_default_model_name_is_the_file_stem(tmp_path):
    f = tmp_path / "cubic.toml"
    f.write_text('[expression]\nprediction = "a*x"\nparams = {a = 1}\ninputs = ["x"]\n')
    assert load_spec(f).model.name == "cubic"


def test_train_table_is_checked_and_kept():   # the bad values: tests/test_spec_train.py
    spec = loads_spec('[expression]\nprediction = "a*x"\nparams = {a = 1}\ninputs = ["x"]\n'
                      '[train]\nepochs = 3\noptimizer = "adam"\nlr = 1\n', "m.toml")
    assert spec.train == {"epochs": 3, "optimizer": "adam", "lr": 1.0}
    assert type(spec.train["lr"]) is float


# ---- the safe expression parser --------------------------------------------------------------
beta = sp.Float(1.5)
SYMS = {"x": x}
CONSTS = {"beta": beta}

GOOD = [
    ("x", x),
    ("2*x + 1", 2 * x + 1),
    ("x/(1 + exp(-beta*x))", x / (1 + sp.exp(-beta * x))),
    ("-x**2", -x**2),
    ("+x", x),
    ("x**-1", 1 / x),
    ("2**10", sp.Integer(1024)),
    ("1/3", sp.Rational(1, 3)),
    ("0.5*x", sp.Float(0.5) * x),
    ("1e-3", sp.Float(1e-3)),
    ("pi*x", sp.pi * x),
    ("E", sp.E),
    ("Max(x, 0)", sp.Max(x, 0)),
    ("max(0, x)", sp.Max(x, 0)),
    ("abs(x)", sp.Abs(x)),
    ("tanh(sinh(cosh(x)))", sp.tanh(sp.sinh(sp.cosh(x)))),
    ("  x  +  1 ", x + 1),
    ("(" * 50 + "x" + ")" * 50, x),
    ("9**9", sp.Integer(387420489)),
    ("2.0**1000", sp.Float(2.0) ** 1000),
]


@pytest.mark.parametrize("text,expected", GOOD, ids=[g[0][:30] for g in GOOD])
def test_parse_accepts(text, expected):
    assert parse(text, SYMS, CONSTS) == expected


# (text, words the message must contain, 1-based column or None)
BAD = [
    ("", "empty", None),
    ("y", "undefined name 'y'", 1),
    ("x + z", "undefined name 'z'", 5),
    ("foo(x)", "unknown function 'foo'", 1),
    ("exp", "is a function", 1),
    ("x(1)", "is not a function", 1),
    ("__import__('os').system('true')", "attribute access", 17),
    ("().__class__", "attribute access", 3),
    ("x.real", "attribute access", 2),
    ("lambda: 1", "lambda", 1),
    ("'abc'", "string literals", 1),
    ("b'abc'", "string literals", 1),
    ("Max(x, 0, evaluate=False)", "keyword arguments", 11),
    ("exp(*[x])", "starred", 5),
    ("x; import os", "syntax error", 2),
    ("import os", "syntax error", 1),
    ("x = 1", "syntax error", 3),
    ("__class__", "undefined name '__class__'", 1),
    ("\u0445 + 1", "U+0445 CYRILLIC SMALL LETTER HA", 1),
    ("x + \uff58", "FULLWIDTH", 5),
    ("x\n+1", "one line", 2),
    ("x + \x1b[31m", "control character", 5),
    ("9**9**9", "too large", 2),
    ("10**400", "too large", 3),
    ("2.0**5000", "too large", 4),
    ("1e999", "too large for float64", 1),
    ("1" * 41, "longer than 40", 1),
    ("x" * 4001, "limit is 4000", None),
    ("-" * 3000 + "x", "nested too deeply", None),
    ("(" * 300 + "x" + ")" * 300, "nested parentheses", 201),
    ("   x + y", "undefined name 'y'", 8),
    ("x+" * 300 + "x", "more than 200 levels", None),
    ("1/0", "division by zero", 2),
    ("x/(beta - 1.5)", "division by zero", 2),
    ("0**-1", "division by zero", 2),
    ("log(0)", "not finite", 1),
    ("x*exp(exp(exp(100)))", "exp(exp(100)) is not finite", 7),    # evalf of it would hang
    ("E**(10**300)", "is not finite", 1),
    ("sqrt(-1)*x", "I is not a real number", 1),
    ("log(-2)", "is not a real number", 1),
    ("x // 2", "operator //", 3),
    ("x % 2", "operator %", 3),
    ("x ^ 2", "use ** for powers", 3),
    ("x @ x", "operator @", 3),
    ("x if x else 1", "conditional", 1),
    ("x < 1", "comparison", 1),
    ("x[0]", "indexing", 1),
    ("[x]", "list", 1),
    ("not x", "operator not", 1),
    ("~x", "operator ~", 1),
    ("True", "True is not allowed", 1),
    ("None", "None is not allowed", 1),
    ("1j", "complex", 1),
    ("exp()", "needs an argument", 1),
    ("exp(x, x)", "cannot call exp with 2", 1),
    ("f'{x}'", "f-string", 1),
    ("(y := 1)", "assignment", 2),
]


@pytest.mark.parametrize("text,words,column", BAD, ids=[repr(t[0][:24]) for t in BAD])
def test_parse_refuses(text, words, column):
    with pytest.raises(ExprError) as info:
        parse(text, SYMS, CONSTS)
    assert words in info.value.message
    assert info.value.column == column


def test_parse_never_evaluates_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ["__import__('os').system('touch pwned')", "eval('1')", "exec('x=1')",
                 "open('pwned', 'w')", "getattr(x, 'func')", "globals()", "breakpoint()"]:
        with pytest.raises(ExprError):
            parse(text, SYMS, CONSTS)
    assert list(tmp_path.iterdir()) == []


def test_constants():
    assert parse_constant("sqrt(2/pi)") == sp.sqrt(2 / sp.pi)
    with pytest.raises(ExprError, match="must not use symbols"):
        parse(" ", {}) if False else parse_constant("x + 1", {"x": x})


def test_errors_quote_the_expression_with_a_caret():
    text = '[network]\ninput = {size = 2}\ntarget = {size = 1}\nlayers = [{units = 1, activation = "x + foo(x)"}]\n'
    with pytest.raises(SpecError) as info:
        loads_spec(text, "net.toml")
    first, excerpt, caret = str(info.value).split("\n")
    assert first.startswith("net.toml: network.layers[0].activation, column 5: unknown function 'foo'")
    assert excerpt.strip() == "x + foo(x)"
    assert caret.index("^") == excerpt.index("foo")
