"""`bpc compile --emit-test` writes test_<module>.py beside the module: a gradient check against
central differences that runs with numpy alone (issue 15, item 6).

Every example, on both targets (and float32 C for the examples with kinks and without), is
compiled with --emit-test into a fresh directory; the emitted test then runs in a separate
Python in which bpc, SymPy and jinja2 cannot be imported, as plain script and under pytest.
A module whose gradient is made wrong by hand must fail its emitted test.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".toml", ".json"))
NEEDS_CC = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")

# the emitted test must not need the compiler or its dependencies
_NUMPY_ALONE = ("import runpy, sys\n"
                "for name in ('compiler', 'sympy', 'jinja2'):\n"
                "    sys.modules[name] = None\n"
                "sys.argv = [sys.argv[1]]\n"
                "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def _compile(spec, out, *options):
    assert main(["compile", str(spec), "-o", f"{out}/", "--emit-test", *options]) == 0
    (test,) = out.glob("test_*.py")
    return test


def _run(test):
    return subprocess.run([sys.executable, "-c", _NUMPY_ALONE, test.name], cwd=test.parent,
                          capture_output=True, text=True, timeout=600)


CASES = ([pytest.param(p, "numpy", "float64", id=f"{p.stem}-numpy") for p in EXAMPLES]
         + [pytest.param(p, "c", "float64", id=f"{p.stem}-c", marks=NEEDS_CC) for p in EXAMPLES]
         + [pytest.param(ROOT / "examples" / f"{name}.toml", "c", "float32", id=f"{name}-c-float32",
                         marks=NEEDS_CC) for name in ("mlp_tanh", "cnn_digits", "train_digits")])


@pytest.mark.parametrize("spec, target, dtype", CASES)
def test_emitted_test_passes_with_numpy_alone(tmp_path, capsys, spec, target, dtype):
    test = _compile(spec, tmp_path, "--target", target, "--dtype", dtype)
    assert test.name == f"test_{test.name[5:]}" and (tmp_path / test.name[5:]).is_file()
    done = _run(test)
    assert done.returncode == 0, done.stdout + done.stderr
    # every parameter was compared, with both seeds
    rows = re.findall(r"^(\S+)\s+(\d+)/(\d+)\s", done.stdout, re.M)
    assert sorted(name for name, _, _ in rows) == sorted(2 * list(_params(tmp_path / test.name[5:])))
    assert all(int(k) > 0 for _, k, _ in rows)


def _params(module_file):
    (line,) = re.findall(r"^PARAMS = (\{.*\})$", module_file.read_text(), re.M)
    return re.findall(r"'(\w+)': \(", line)


def test_emitted_test_also_runs_under_pytest(tmp_path):
    test = _compile(ROOT / "examples" / "mlp_tanh.toml", tmp_path)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("target", ["numpy", pytest.param("c", marks=NEEDS_CC)])
def test_a_wrong_gradient_fails_its_emitted_test(tmp_path, target):
    test = _compile(ROOT / "examples" / "mlp_tanh.toml", tmp_path, "--target", target)
    module = tmp_path / test.name[5:]
    # scale one gradient by 1.01 after the fact: the loss is unchanged, so only the check sees it
    module.write_text(module.read_text() + (
        "\n_right_backward = backward\n\n\n"
        "def backward(params, *arrays):\n"
        "    value, grads = _right_backward(params, *arrays)\n"
        "    return value, {**grads, 'W1': grads['W1'] * 1.01}\n"))
    done = _run(test)
    assert done.returncode == 1 and "FAIL" in done.stdout, done.stdout + done.stderr


def test_emit_test_needs_a_file(capsys):
    assert main(["compile", str(ROOT / "examples" / "mlp_tanh.toml"), "-o", "-", "--emit-test"]) == 2
    assert "--emit-test" in capsys.readouterr().err
