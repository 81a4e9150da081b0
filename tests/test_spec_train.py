"""Whole-spec validation (issue 10, item 3): a spec's [train] table is checked by the spec
loader, so `bpc compile`, `show`, `check` and `train` and the Python loader all refuse a bad
one alike: exit 2, one error naming the file and the field (`[train] epochs: ...`), no file
written. Every [train] field x bad values x each command."""
import json

import pytest

from compiler.cli import main
from compiler.spec.loader import SpecError, loads_spec
from compiler.spec.train_options import OPTIONS, SPEC_KEYS

MODEL = """
[model]
name = "line"
[expression]
prediction = "w*x + c"
params = { w = 0.0, c = 0.0 }
inputs = ["x"]
targets = ["y"]
"""

# values (as TOML text) that are wrong for every option of a kind, and what the error says
WRONG_TYPE = {
    "int": [('"abc"', "must be an integer"), ('"3"', "must be an integer"), ("2.5", "must be an integer"),
            ("3.0", "must be an integer"), ("true", "must be an integer"), ("[1]", "must be an integer"),
            ("{ a = 1 }", "must be an integer"), ("nan", "must be an integer"), ("inf", "must be an integer"),
            ('"__import__(\'os\')"', "must be an integer"), ("9223372036854775808", "must be at most"),
            ("1" + "0" * 40, "must be at most")],
    "float": [('"abc"', "must be a finite number"), ('"0.1"', "must be a finite number"),
              ("true", "must be a finite number"), ("[0.1]", "must be a finite number"),
              ("{ a = 1 }", "must be a finite number"), ("nan", "must be a finite number"),
              ("inf", "must be a finite number"), ("-inf", "must be a finite number"),
              ("1e400", "must be a finite number"), ('"__import__(\'os\')"', "must be a finite number"),
              ("1" + "0" * 400, "must be a finite number")],
    "choice": [('"__import__(\'os\')"', "must be one of"), ('"SGD"', "must be one of"), ('""', "must be one of"),
               ("1", "must be one of"), ("true", "must be one of"), ('["adam"]', "must be one of"),
               ("{ a = 1 }", "must be one of"), ('"adam\\n"', "must be one of")],
}
# values of the right type out of an option's range
OUT_OF_RANGE = {
    "lr": ["0", "-0.1", "-1"], "epochs": ["0", "-5"], "batch_size": ["-1"], "momentum": ["1", "-0.1", "1.5"],
    "weight_decay": ["-1e-9"], "step_size": ["0", "-1"], "gamma": ["0", "-0.5"], "min_lr": ["-1"],
    "clip": ["0", "-1"], "seed": ["-1"], "val_split": ["1", "1.0", "-0.1", "2"], "patience": ["0", "-3"],
    "min_delta": ["-0.001"], "tol": ["0", "-1e-12"], "dp_clip": ["0", "-1"], "dp_noise": ["-0.5"], "dp_delta": ["0", "1", "-1e-5"],
}
CASES = []
for key in SPEC_KEYS:
    CASES += [(key, text, msg) for text, msg in WRONG_TYPE[OPTIONS[key].kind]]
    CASES += [(key, text, "must be ") for text in OUT_OF_RANGE.get(key, [])]
CASES += [(key, "0.1", "unknown option") for key in ("learning_rate", "out", "data", "beta1", "log_every",
                                                     "__class__", "Epochs")]


def test_the_table_covers_every_train_field():
    assert {key for key, _, _ in CASES} >= set(SPEC_KEYS)
    assert set(OUT_OF_RANGE) == {k for k in SPEC_KEYS if OPTIONS[k].kind in ("int", "float")}


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "line.csv").write_text("x,y\n0,1\n1,3\n2,5\n")
    return tmp_path


COMMANDS = {
    "compile": ["compile", "spec.toml"],
    "compile-c": ["compile", "spec.toml", "--target", "c", "-o", "c_out"],
    "show": ["show", "spec.toml"],
    "check": ["check", "spec.toml"],
    "train": ["train", "spec.toml", "--data", "line.csv", "--epochs", "1"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("key,text,message", CASES, ids=[f"{k}={t[:20]}" for k, t, _ in CASES])
def test_every_command_refuses_a_bad_train_value(work, capsys, command, key, text, message):
    (work / "spec.toml").write_text(MODEL + f"[train]\n{key} = {text}\n")
    before = sorted(p.name for p in work.iterdir())
    code = main(COMMANDS[command])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith(f"bpc: error: spec.toml: [train] {key}: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert sorted(p.name for p in work.iterdir()) == before           # nothing written


@pytest.mark.parametrize("key,text,message", CASES, ids=[f"{k}={t[:20]}" for k, t, _ in CASES])
def test_the_python_loader_refuses_a_bad_train_value(key, text, message):
    with pytest.raises(SpecError) as e:
        loads_spec(MODEL + f"[train]\n{key} = {text}\n", "spec.toml")
    assert str(e.value).startswith(f"spec.toml: [train] {key}: ") and message in str(e.value)


@pytest.mark.parametrize("train,message", [
    ({"lr": None}, "[train] lr: must not be null"),
    ({"epochs": 1e3}, "[train] epochs: must be an integer"),
    ({"optimizer": {"__import__": "os"}}, "[train] optimizer: must be one of"),
    ([], "[train]: must be a table, not an array"),
    ("adam", "[train]: must be a table, not a string"),
])
def test_json_specs_too(train, message):
    tree = {"model": {"name": "line"}, "expression": {"prediction": "w*x", "params": {"w": 0}, "inputs": ["x"]},
            "train": train}
    with pytest.raises(SpecError, match=r"^spec\.json: " + message.replace("[", r"\[").replace("]", r"\]")):
        loads_spec(json.dumps(tree), "spec.json", fmt="json")


GOOD = [("optimizer", '"nesterov"', "nesterov"), ("lr", "1", 1.0), ("lr", "1e-5", 1e-5), ("epochs", "7", 7),
        ("batch_size", "0", 0), ("momentum", "0", 0.0), ("weight_decay", "0.01", 0.01),
        ("schedule", '"cosine"', "cosine"), ("step_size", "3", 3), ("gamma", "0.5", 0.5), ("min_lr", "0", 0.0),
        ("clip", "5", 5.0), ("seed", "123456789012", 123456789012), ("val_split", "0.25", 0.25),
        ("patience", "4", 4), ("min_delta", "1e-9", 1e-9), ("tol", "1e-10", 1e-10)]


@pytest.mark.parametrize("key,text,value", GOOD, ids=[f"{k}={t}" for k, t, _ in GOOD])
def test_good_values_are_kept_with_the_option_type(work, capsys, key, text, value):
    spec = loads_spec(MODEL + f"[train]\n{key} = {text}\n", "spec.toml")
    assert spec.train == {key: value} and type(spec.train[key]) is type(value)
    (work / "spec.toml").write_text(MODEL + f"[train]\n{key} = {text}\n")
    assert main(["show", "spec.toml"]) == 0
