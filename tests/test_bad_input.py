"""Malformed and hostile spec files: each must stop `bpc compile` with exit code 2 and one clear
message naming the file and the field (and the column inside an expression), with no traceback,
no file written and no side effect. Payloads that would run code try to create MARKER; the test
asserts it never appears."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.cli import main

ROOT = Path(__file__).resolve().parent.parent

NET = """
[network]
input = {{ name = "x", size = 2 }}
target = {{ name = "y", size = 1 }}
loss = {loss}
[[network.layers]]
units = {units}
activation = {act}
"""


def net(act='"tanh"', units="1", loss='"mse"', extra=""):
    return extra + NET.format(act=act, units=units, loss=loss)


EXPR = """
[expression]
prediction = {pred}
params = {params}
inputs = {inputs}
{more}
"""


def expr(pred='"a*x"', params="{ a = 1.0 }", inputs='["x"]', more=""):
    return EXPR.format(pred=pred, params=params, inputs=inputs, more=more)


MAT = """
[matrix]
inputs = {inputs}
targets = {targets}
params = {params}
output = {output}
{more}
"""


def mat(output='"W*x + b"', params="{ W = [1, 2], b = [1, 1] }", inputs="{ x = [2, 1] }",
        targets="{ y = [1, 1] }", more=""):
    return MAT.format(output=output, params=params, inputs=inputs, targets=targets, more=more)


def toml_str(text):
    return json.dumps(text)   # a JSON string literal is a valid TOML basic string


SYSTEM = "__import__('os').system('touch MARKER')"

# (id, file name, content (str or bytes), words the message must contain after "<file>: ")
CASES = [
    # -- the file itself
    ("empty file", "m.toml", "", "the file is empty"),
    ("only blanks", "m.toml", " \n\t\n", "the file is empty"),
    ("binary garbage", "m.toml", bytes(range(256)) * 4, "binary file"),
    ("not utf-8", "m.toml", b"[model]\nname = \"\xff\xfe\"\n", "not UTF-8"),
    ("invalid toml", "m.toml", "[network\nunits = ", "not valid TOML"),
    ("invalid json", "m.json", '{"network": ', "not valid JSON"),
    ("json top-level array", "m.json", "[1, 2]", "top level must be a table"),
    ("json NaN", "m.json", '{"model": {"name": NaN}}', "NaN is not a number"),
    ("json duplicate key", "m.json", '{"model": {"name": "a", "name": "b"}}', "appears twice"),
    ("json nested 100000 deep", "m.json", "[" * 100000 + "]" * 100000, "nested too deeply"),
    ("toml 5000-digit integer", "m.toml", "[model]\nname = " + "9" * 5000 + "\n", "not valid TOML: a number has too many digits"),
    ("json 5000-digit integer", "m.json", '{"model": {"name": ' + "9" * 5000 + "}}", "not valid JSON: a number has too many digits"),
    ("unknown extension", "m.yaml", "network: {}", "unknown spec file type '.yaml'"),
    ("file name injection", 'm""".toml', net(), "file name"),
    # -- structure and types
    ("no model table", "m.toml", "[model]\nname = \"m\"\n", "exactly one of the tables [network], [expression] and [matrix]"),
    ("network and expression", "m.toml", net() + expr(), "exactly one of the tables"),
    ("unknown top-level field", "m.toml", "[netwrok]\n", "netwrok: unknown field; did you mean 'network'"),
    ("unknown layer field", "m.toml", net().replace("units =", "unit ="), "network.layers[0].unit: unknown field; did you mean 'units'"),
    ("model is not a table", "m.toml", 'model = "m"\n' + net(), "model: must be a table, not a string"),
    ("model name wrong type", "m.toml", "[model]\nname = 3\n" + net(), "model.name: must be a string, not an integer"),
    ("model name injection", "m.toml", '[model]\nname = "x; import os"\n' + net(), "model.name: model name 'x; import os' is not allowed"),
    ("model name dunder", "m.toml", '[model]\nname = "__class__"\n' + net(), "model.name: model name '__class__' is not allowed"),
    ("model name reserved", "m.toml", '[model]\nname = "loss"\n' + net(), "model.name: model name 'loss' is reserved"),
    ("model name look-alike", "m.toml", '[model]\nname = "m\u043edel"\n' + net(), "model.name: model name"),
    ("bad file stem as default name", "my-model.toml", net(), "model.name: missing, and the file name 'my-model'"),
    ("dtype float16", "m.toml", '[model]\ndtype = "float16"\n' + net(), "model.dtype: must be one of float32, float64"),
    ("description code injection", "m.toml",
     "[model]\ndescription = '''x\"\"\"\nimport os; os.system(\"touch MARKER\")\n\"\"\"'''\n" + net(),
     "model.description: three quotes in a row"),
    ("description backslash", "m.toml", "[model]\ndescription = 'a \\N{x}'\n" + net(), "model.description: a backslash"),
    ("train not a table", "m.toml", 'train = 3\n' + net(), "[train]: must be a table"),
    # -- network fields
    ("missing input", "m.toml", net().replace('input = { name = "x", size = 2 }', ""), "network.input: missing"),
    ("input size 0", "m.toml", net().replace("size = 2", "size = 0"), "network.input.size: must be an integer from 1"),
    ("input name injection", "m.toml", net().replace('name = "x"', 'name = "x\\"); import os #"'), "network.input.name: input name"),
    ("width 0", "m.toml", net(units="0"), "network.layers[0].units: must be an integer from 1 to 1048576, got 0"),
    ("width -3", "m.toml", net(units="-3"), "network.layers[0].units: must be an integer from 1 to 1048576, got -3"),
    ("width string", "m.toml", net(units='"16"'), "network.layers[0].units: must be a positive integer, not a string"),
    ("width float", "m.toml", net(units="16.5"), "network.layers[0].units: must be a positive integer, not a number 16.5"),
    ("width boolean", "m.toml", net(units="true"), "network.layers[0].units: must be a positive integer, not a boolean"),
    ("width huge", "m.toml", net(units="1000000000000"), "network.layers[0].units: must be an integer from 1 to 1048576"),
    ("layers not an array", "m.toml", net().split("[[network.layers]]")[0].replace("loss =", "layers = 3\nloss ="),
     "network.layers: must be an array of tables"),
    ("layers empty", "m.toml", net().split("[[network.layers]]")[0].replace("loss =", "layers = []\nloss ="),
     "network.layers: is empty"),
    ("missing units", "m.toml", net().replace("units = 1", ""), "network.layers[0].units: missing"),
    ("layer type unknown", "m.toml", net().replace("units = 1", 'units = 1\ntype = "conv"'), "network.layers[0].type: must be one of 'dense', 'activation'"),
    ("shape mismatch output vs target", "m.toml", net(units="3"), "network.loss: mse: output shape (n, 3) and target shape (n, 1) differ"),
    ("label target with size", "m.toml", net().replace('{ name = "y", size = 1 }', '{ name = "y", size = 1, kind = "label" }'),
     "network.target.size: integer labels"),
    ("label target with mse", "m.toml", net().replace('{ name = "y", size = 1 }', '{ name = "y", kind = "label" }'),
     "network.loss: loss 'mse' needs real-valued targets"),
    ("unknown target kind", "m.toml", net().replace("size = 1 }", 'size = 1, kind = "onehot" }'), "network.target.kind: must be 'real' or 'label'"),
    ("unknown activation", "m.toml", net(act='"tanhh"'), "network.layers[0].activation: unknown activation 'tanhh'; did you mean 'tanh'?"),
    ("unknown function", "m.toml", net(act='"x + foo(x)"'), "network.layers[0].activation, column 5: unknown function 'foo'"),
    ("undefined symbol", "m.toml", net(act='"x*z"'), "network.layers[0].activation, column 3: undefined name 'z'"),
    ("os.system payload", "m.toml", net(act=toml_str(SYSTEM)), "network.layers[0].activation, column 17: attribute access"),
    ("class attribute", "m.toml", net(act='"().__class__"'), "network.layers[0].activation, column 3: attribute access"),
    ("subclasses escape", "m.toml", net(act=toml_str("().__class__.__base__.__subclasses__()")), "attribute access"),
    ("lambda", "m.toml", net(act='"lambda x: x"'), "network.layers[0].activation, column 1: a lambda is not allowed"),
    ("string literal", "m.toml", net(act=toml_str("x + 'a'")), "network.layers[0].activation, column 5: string literals"),
    ("keyword argument", "m.toml", net(act='"Max(x, 0, evaluate=False)"'), "network.layers[0].activation, column 11: keyword arguments"),
    ("statement after", "m.toml", net(act='"x; import os"'), "network.layers[0].activation, column 2: syntax error"),
    ("dunder name", "m.toml", net(act='"__class__"'), "network.layers[0].activation, column 1: undefined name '__class__'"),
    ("cyrillic look-alike", "m.toml", net(act=toml_str("\u0445*2")), "network.layers[0].activation, column 1: character U+0445 CYRILLIC"),
    ("fullwidth look-alike", "m.toml", net(act=toml_str("\uff58*2")), "column 1: character U+FF58 FULLWIDTH"),
    ("exponent tower", "m.toml", net(act='"x + 9**9**9"'), "network.layers[0].activation, column 6: the power 9**387420489 is too large"),
    ("10 MB expression", "m.toml", net(act='"' + "x+" * 5_000_000 + 'x"'), "network.layers[0].activation: expression is 10000001 characters long"),
    ("activation is a number", "m.toml", net(act="2"), "network.layers[0].activation: must be a string, not an integer"),
    ("eval in activation", "m.toml", net(act=toml_str("eval('1')")), "column 1: unknown function 'eval'"),
    ("division by zero in a constant", "m.toml", net(act='"x*beta"', extra='[constants]\nbeta = "1/0"\n'),
     "constants.beta, column 2: division by zero"),
    ("constant named x", "m.toml", net(extra="[constants]\nx = 1\n"), "constants.x: constant 'x' clashes"),
    ("constant not a number", "m.toml", net(extra="[constants]\nk = [1, 2]\n"), "constants.k: must be a number or a constant expression"),
    ("constant named like a function", "m.toml", net(extra="[constants]\nexp = 2\n"), "constants.exp: constant name 'exp' is a built-in function"),
    ("unknown loss", "m.toml", net(loss='"mae"'), "network.loss: unknown loss 'mae'"),
    ("loss undefined symbol", "m.toml", net(loss='"(p - t)**2"'), "network.loss, column 6: undefined name 't'"),
    ("loss payload", "m.toml", net(loss=toml_str("open('MARKER', 'w')")), "network.loss, column 1: unknown function 'open'"),
    # -- expression models
    ("missing prediction", "m.toml", expr().replace('prediction = "a*x"', ""), "expression.prediction: missing"),
    ("prediction not a string", "m.toml", expr(pred="5"), "expression.prediction: must be a string, not an integer"),
    ("params empty", "m.toml", expr(params="{}"), "expression.params: is empty"),
    ("param init not a number", "m.toml", expr(params='{ a = "abc" }'), "expression.params.a, column 1: undefined name 'abc'"),
    ("param init boolean", "m.toml", expr(params="{ a = true }"), "expression.params.a: must be a number, not a boolean"),
    ("param init infinite", "m.toml", expr(params="{ a = inf }"), "expression.params.a: must be a finite number"),
    ("param name injection", "m.toml", expr(params='{ "a; import os" = 1 }'), "expression.params.a; import os: parameter name"),
    ("param named like a function", "m.toml", expr(pred='"exp*x"', params="{ exp = 1 }"), "expression.params.exp: parameter name 'exp' is a built-in"),
    ("prediction undefined symbol", "m.toml", expr(pred='"a*z"'), "expression.prediction, column 3: undefined name 'z'"),
    ("name declared twice", "m.toml", expr(params="{ x = 1 }", pred='"x"'), "expression.inputs[0]: 'x' is already declared in expression.params.x"),
    ("inputs not an array", "m.toml", expr(inputs='"x"'), "expression.inputs: must be an array of names"),
    ("unused input", "m.toml", expr(inputs='["x", "u"]'), "expression: symbol(s) u are declared but not used"),
    ("loss keyword payload", "m.toml", expr(more='loss = "(p - y)**2 + exp(x=1)"'), "expression.loss, column 18: keyword arguments"),
    ("loss uses an input", "m.toml", expr(more='loss = "(p - x)**2"'), "expression.loss, column 6: undefined name 'x'"),
    # -- matrix-expression models
    ("matrix payload", "m.toml", mat(output=toml_str(SYSTEM)), "matrix.output, column 17: attribute access"),
    ("matrix .T attribute", "m.toml", mat(output='"(W*x).T + b"'), "matrix.output, column 6: attribute access"),
    ("matrix product shape mismatch", "m.toml", mat(output='"W*W*x + b"'),
     "matrix.output, column 2: shape mismatch: cannot multiply a 1x2 matrix by a 1x2 matrix"),
    ("matrix sum shape mismatch", "m.toml", mat(output='"W*x + x"'),
     "matrix.output, column 5: shape mismatch: cannot add a 1x1 matrix and a 2x1 matrix"),
    ("matrix hadamard shape mismatch", "m.toml", mat(output='"hadamard(W*x, x) + b"'),
     "matrix.output, column 1: shape mismatch: hadamard() of matrices of shapes 1x1, 2x1"),
    ("matrix plus scalar", "m.toml", mat(output='"W*x + 1"'), "matrix.output, column 5: cannot add a 1x1 matrix and a scalar"),
    ("matrix power", "m.toml", mat(output='"(W*x + b)**2"'), "matrix.output, column 10: powers of matrices are not allowed"),
    ("matrix divided by matrix", "m.toml", mat(output='"b/(W*x)"'), "matrix.output, column 2: cannot divide by a matrix"),
    ("matrix zero from cancellation", "m.toml", mat(output='"W*x - W*x + b"'), "matrix.output, column 5: this - gives a zero matrix"),
    ("matrix outer product of data", "m.toml", mat(output='"W*(x*T(x))*x + b"'),
     "matrix.output, column 5: per sample, this product is a 2x2 matrix"),
    ("matrix lambda in loss", "m.toml", mat(more='loss = "(lambda p: p)(p)"'), "matrix.loss, column 1: only calls of named functions"),
    ("matrix keyword argument", "m.toml", mat(output='"tanh(W*x, evaluate=False) + b"'),
     "matrix.output, column 11: keyword arguments are not allowed"),
    ("matrix string literal", "m.toml", mat(output="\"hadamard('x', x)\""), "matrix.output, column 10: string literals"),
    ("matrix indexing", "m.toml", mat(output='"W[0]*x + b"'), "matrix.output, column 1: indexing is not allowed"),
    ("matrix cyrillic name", "m.toml", mat(output=toml_str("W*\u0445 + b")), "matrix.output, column 3: character U+0445 CYRILLIC"),
    ("matrix exponent tower", "m.toml", mat(output='"W*x*9**9**9 + b"'), "matrix.output, column 6: the power 9**387420489 is too large"),
    ("matrix 10 MB output", "m.toml", mat(output='"' + "W*x+" * 2_500_000 + 'b"'),
     "matrix.output: expression is 10000001 characters long"),
    ("matrix unknown function", "m.toml", mat(output='"sum(W*x) + b"'), "matrix.output, column 1: unknown function 'sum'"),
    ("matrix transpose of two", "m.toml", mat(output='"T(W*x + b, x)"'), "matrix.output, column 1: T() transposes one matrix"),
    ("matrix target in output", "m.toml", mat(output='"W*x + y"'), "matrix.output, column 7: undefined name 'y'"),
    ("matrix output without input", "m.toml", mat(output='"2*b"'), "matrix.output: does not depend on any input"),
    ("matrix input not a vector", "m.toml", mat(inputs="{ x = [2, 2] }"), "matrix.inputs.x: an input is one vector per sample"),
    ("matrix width 0", "m.toml", mat(params="{ W = [0, 2], b = [1, 1] }"), "matrix.params.W[0]: must be an integer from 1"),
    ("matrix shape as text", "m.toml", mat(params='{ W = "1x2", b = [1, 1] }'), "matrix.params.W: must be a shape [rows, columns]"),
    ("matrix huge parameter", "m.toml", mat(params="{ W = [1048576, 1048576], b = [1, 1] }"),
     "matrix.params.W: 1048576x1048576 is 1099511627776 numbers"),
    ("matrix param name injection", "m.toml", mat(params='{ "W; import os" = [1, 2], b = [1, 1] }'),
     "matrix.params.W; import os: parameter name 'W; import os' is not allowed"),
    ("matrix param named T", "m.toml", mat(params="{ T = [1, 2], b = [1, 1] }", output='"T*x + b"'),
     "matrix.params.T: parameter name 'T' is a function of matrix expressions"),
    ("matrix scalar named like a function", "m.toml", mat(more="scalars = { exp = 1 }"), "matrix.scalars.exp: parameter name 'exp' is a built-in"),
    ("matrix unknown field", "m.toml", mat(more='ouptut = "x"'), "matrix.ouptut: unknown field; did you mean 'output'"),
    ("matrix loss not 1x1", "m.toml", mat(params="{ W = [2, 2], b = [2, 1] }", targets="{ y = [2, 1] }", more='loss = "p - y"'),
     "matrix.loss: must be a 1x1 matrix per sample"),
    ("matrix loss plus scalar", "m.toml", mat(more='loss = "T(p - y)*(p - y) + 1"'), "matrix.loss, column 18: cannot add a 1x1 matrix and a scalar"),
    ("matrix unknown loss", "m.toml", mat(more='loss = "mae"'), "matrix.loss: unknown loss 'mae'"),
    ("matrix init unknown scheme", "m.toml", mat(more='init = { W = "xavier" }'), "matrix.init.W: must be one of glorot, he, zeros"),
    ("matrix init undeclared", "m.toml", mat(more='init = { V = "he" }'), "matrix.init.V: 'V' is not a matrix parameter"),
    ("matrix unused parameter", "m.toml", mat(params="{ W = [1, 2], b = [1, 1], V = [2, 2] }"), "matrix.params.V: 'V' is declared but not used"),
    ("matrix label target not 1x1", "m.toml", mat(targets="{ y = [2, 1] }", more='target_kind = "label"\nloss = "cross_entropy"'),
     "matrix.targets.y: an integer label is one class index per sample"),
    ("matrix prediction symbol clash", "m.toml",
     mat(params="{ W = [1, 2], b = [1, 1], p = [1, 1] }", more='loss = "T(p - y)*(p - y)"'),
     "matrix.prediction_symbol: the loss names the output 'p'"),
    ("matrix prediction symbol without a loss expression", "m.toml", mat(more='prediction_symbol = "q"'),
     "matrix.prediction_symbol: names the output in a loss expression"),
    ("matrix activation payload", "m.toml", mat(output='"act(W*x) + b"', more="activations = { act = " + toml_str(SYSTEM) + " }"),
     "matrix.activations.act, column 17: attribute access"),
    ("matrix and network", "m.toml", mat() + net(), "exactly one of the tables [network], [expression] and [matrix], not [network] and [matrix]"),
    ("json matrix payload in loss", "m.json",
     json.dumps({"matrix": {"inputs": {"x": [2, 1]}, "targets": {"y": [1, 1]}, "params": {"W": [1, 2]},
                            "output": "W*x", "loss": "T(p - y)*" + SYSTEM}}),
     "matrix.loss, column 26: attribute access"),
    ("json width -3", "m.json", json.dumps({"network": {"input": {"size": 2}, "target": {"size": 1},
                                                         "layers": [{"units": -3}]}}),
     "network.layers[0].units: must be an integer from 1 to 1048576, got -3"),
    ("json payload", "m.json", json.dumps({"expression": {"prediction": SYSTEM, "params": {"a": 1}, "inputs": ["x"]}}),
     "expression.prediction, column 17: attribute access"),
]


@pytest.mark.parametrize("name,filename,content,words", CASES, ids=[c[0] for c in CASES])
def test_bad_spec(tmp_path, monkeypatch, capsys, name, filename, content, words):
    marker = tmp_path / "MARKER"
    monkeypatch.chdir(tmp_path)         # payloads write MARKER relative to here
    if isinstance(content, str):
        content = content.replace("MARKER", str(marker)).encode("utf-8")
        words = words.replace("MARKER", str(marker))
    spec = tmp_path / filename
    spec.write_bytes(content)
    out = tmp_path / "out" / "model.py"
    before = sorted(p.name for p in tmp_path.rglob("*"))

    code = main(["compile", str(spec), "-o", str(out)])

    err = capsys.readouterr().err
    assert code == 2
    lines = err.rstrip("\n").split("\n")
    assert lines[0].startswith(f"bpc: error: {spec}: "), err[:500]
    assert words in lines[0], err[:500]
    # one message: the first line, plus at most the expression excerpt and its caret
    assert len(lines) in (1, 3), err[:500]
    assert "Traceback" not in err
    assert len(err) < 1000                # a 10 MB expression is not echoed back
    assert not marker.exists()
    assert not out.parent.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40
    assert sum(c[0].startswith(("matrix", "json matrix")) for c in CASES) >= 15


def test_missing_file(capsys, tmp_path):
    assert main(["compile", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: no such file" in capsys.readouterr().err


def test_directory_instead_of_file(capsys, tmp_path):
    d = tmp_path / "dir.toml"
    d.mkdir()
    assert main(["compile", str(d)]) == 2
    assert "dir.toml: not a regular file" in capsys.readouterr().err


def test_hostile_specs_in_a_real_process(tmp_path):
    """The console entry point itself: exit 2, one line on stderr, no traceback, no marker."""
    marker = tmp_path / "MARKER"
    for i, act in enumerate([SYSTEM, "x; import os", "9**9**9"]):
        spec = tmp_path / f"m{i}.toml"
        spec.write_text(net(act=toml_str(act.replace("MARKER", str(marker)))))
        r = subprocess.run([sys.executable, "-m", "compiler", "compile", str(spec), "-o", str(tmp_path / "o.py")],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(f"bpc: error: {spec}: network.layers[0].activation, column ")
        assert "Traceback" not in r.stderr
        assert r.stdout == ""
    assert not marker.exists()
    assert not (tmp_path / "o.py").exists()
