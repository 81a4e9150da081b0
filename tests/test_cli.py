"""The bpc command line: compile / show / check, exit codes 0, 1, 2, atomic writes, a --help
that imports neither SymPy nor NumPy. Runs in-process through compiler.cli.main (fast); a few
runs go through a real interpreter."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from compiler import compile_model
from compiler.cli import main
from compiler.spec.loader import load_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {p.name: p for p in (ROOT / "examples").iterdir() if p.suffix in (".toml", ".json")}
TANH = ROOT / "examples" / "mlp_tanh.toml"
POLY = ROOT / "examples" / "poly_fit.toml"


def run(*argv):
    return main([str(a) for a in argv])


# ---- compile -------------------------------------------------------------------------------

def test_compile_writes_the_module(tmp_path, capsys):
    out = tmp_path / "m.py"
    assert run("compile", TANH, "-o", out) == 0
    assert out.read_text() == compile_model(load_spec(TANH).model).source
    assert f"wrote {out}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["m.py"]     # no temporary left behind


def test_compile_defaults_to_generated_model_name(tmp_path, monkeypatch):
    # a copy of the repository's layout anywhere: the same bytes as the committed module,
    # whose header names the spec relative to the working directory, not to where bpc lives
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "poly_fit.toml").write_bytes(POLY.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert run("compile", "examples/poly_fit.toml") == 0
    assert (tmp_path / "generated" / "poly_fit.py").read_text() == (ROOT / "generated" / "poly_fit.py").read_text()


@pytest.mark.parametrize("cwd,given,label", [
    (".", "examples/poly_fit.toml", "examples/poly_fit.toml"),
    (".", "./examples/../examples/poly_fit.toml", "examples/poly_fit.toml"),
    (".", "ABS", "examples/poly_fit.toml"),
    ("examples", "poly_fit.toml", "poly_fit.toml"),
    ("elsewhere", "../examples/poly_fit.toml", "poly_fit.toml"),      # outside the working directory
])
def test_compile_source_label_is_relative_to_the_working_directory(tmp_path, monkeypatch, capsys, cwd, given, label):
    (tmp_path / "examples").mkdir()
    (tmp_path / "elsewhere").mkdir()
    spec = tmp_path / "examples" / "poly_fit.toml"
    spec.write_bytes(POLY.read_bytes())
    monkeypatch.chdir(tmp_path / cwd)
    assert run("compile", spec if given == "ABS" else given, "-o", "-") == 0
    head = capsys.readouterr().out[:400]
    assert f"\nSource: {label}\n" in head


def test_compile_into_a_directory_and_to_stdout(tmp_path, capsys):
    assert run("compile", POLY, "-o", tmp_path) == 0
    assert (tmp_path / "poly_fit.py").is_file()
    capsys.readouterr()
    assert run("compile", POLY, "-o", "-") == 0
    assert capsys.readouterr().out == (tmp_path / "poly_fit.py").read_text()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compile_dtype_option(tmp_path, dtype):
    out = tmp_path / "m.py"
    assert run("compile", POLY, "--dtype", dtype, "-o", out) == 0
    assert f"DTYPE = {dtype!r}" in out.read_text()


def test_spec_dtype_is_used_and_the_option_overrides_it(tmp_path):
    spec = tmp_path / "m.toml"
    spec.write_text('[model]\ndtype = "float32"\n[expression]\nprediction = "a*x"\nparams = {a = 1}\ninputs = ["x"]\n')
    assert run("compile", spec, "-o", tmp_path / "a.py") == 0
    assert "DTYPE = 'float32'" in (tmp_path / "a.py").read_text()
    assert run("compile", spec, "--dtype", "float64", "-o", tmp_path / "b.py") == 0
    assert "DTYPE = 'float64'" in (tmp_path / "b.py").read_text()


def test_a_failed_compile_keeps_the_good_file(tmp_path, capsys):
    out = tmp_path / "m.py"
    assert run("compile", POLY, "-o", out) == 0
    good = out.read_bytes()
    bad = tmp_path / "bad.toml"
    bad.write_text(POLY.read_text().replace('"a*x**3', '"a*x**3 + foo(x)'))
    assert run("compile", bad, "-o", out) == 2
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "m.py"]


def test_an_interrupted_write_keeps_the_good_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.py"
    assert run("compile", POLY, "-o", out) == 0
    good = out.read_bytes()

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    assert run("compile", TANH, "-o", out) == 130
    assert out.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.py"]


@pytest.mark.parametrize("output", ["m.txt", "m.toml"])
def test_compile_refuses_outputs_that_are_not_modules(tmp_path, capsys, output):
    spec = tmp_path / "m.toml"
    spec.write_text(POLY.read_text())
    assert run("compile", spec, "-o", tmp_path / output) == 2
    assert "must end in .py" in capsys.readouterr().err
    assert spec.read_text() == POLY.read_text()            # never overwrites the spec itself
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml"]


# (output file name, words the error must contain): each would be written, then fail to import
# by name or shadow a module for code in its directory
BAD_MODULE_NAMES = [
    ("numpy.py", "would shadow the numpy module"),
    ("threading.py", "would shadow the standard library's threading module"),
    ("math.py", "would shadow the standard library's math module"),
    ("json.py", "would shadow the standard library's json module"),
    ("sympy.py", "would shadow the sympy module"),
    ("compiler.py", "would shadow the compiler module"),
    ("my-model.py", "'my-model' is not an importable module name"),
    ("2fit.py", "'2fit' is not an importable module name"),
    ("class.py", "'class' is not an importable module name"),
    ("my.model.py", "'my.model' is not an importable module name"),
    ("caf\u00e9.py", "is not an importable module name"),
    ("__init__.py", "special module name"),
]


@pytest.mark.parametrize("output,words", BAD_MODULE_NAMES, ids=[b[0] for b in BAD_MODULE_NAMES])
def test_compile_refuses_module_names_that_cannot_be_imported_or_shadow(tmp_path, capsys, output, words):
    assert run("compile", POLY, "-o", tmp_path / "out" / output) == 2
    err = capsys.readouterr().err
    assert words in err and "choose another file name with -o" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_compile_refuses_a_model_name_that_shadows_as_the_default_output(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "m.toml"
    spec.write_text('[model]\nname = "json"\n[expression]\nprediction = "a*x"\nparams = {a = 1}\ninputs = ["x"]\n')
    monkeypatch.chdir(tmp_path)
    for argv in (["compile", spec], ["compile", spec, "-o", "out/"]):
        assert run(*argv) == 2
        err = capsys.readouterr().err
        assert "would shadow the standard library's json module" in err and "choose another model.name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml"]
    assert run("compile", spec, "-o", "json_fit.py") == 0          # an explicit, harmless file name
    assert run("compile", spec, "-o", "-") == 0                    # standard output has no module name


@pytest.mark.parametrize("output", ["fit.py", "Fit_2.py", "match.py", "_private.py"])
def test_compile_accepts_importable_module_names(tmp_path, output):
    assert run("compile", POLY, "-o", tmp_path / output) == 0
    assert (tmp_path / output).is_file()


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run("compile", POLY, "-o", blocker / "sub" / "m.py") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bpc: error: cannot write {blocker / 'sub' / 'm.py'}: ")
    assert "Traceback" not in err


def test_c_target_without_the_c_backend(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "compiler.backends.c.backend", None)   # import now fails as if missing
    assert run("compile", POLY, "--target", "c", "-o", tmp_path) == 2
    err = capsys.readouterr().err
    assert "C target is not available" in err and "--target numpy" in err
    assert list(tmp_path.iterdir()) == []


def _has_c_backend():
    try:
        import compiler.backends.c.backend  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_c_backend(), reason="compiler.backends.c.backend not present")
def test_c_target_writes_a_directory(tmp_path, capsys):
    assert run("compile", POLY, "--target", "c", "-o", tmp_path) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poly_fit.c", "poly_fit.h", "poly_fit.py"]
    assert run("compile", POLY, "--target", "c", "-o", tmp_path) == 0     # its own files: replaced


@pytest.mark.skipif(not _has_c_backend(), reason="compiler.backends.c.backend not present")
def test_c_target_never_replaces_the_numpy_module(tmp_path, capsys):
    assert run("compile", POLY, "-o", tmp_path) == 0
    numpy_module = (tmp_path / "poly_fit.py").read_bytes()
    assert run("compile", POLY, "--target", "c", "-o", tmp_path) == 2
    assert "would replace" in capsys.readouterr().err
    assert (tmp_path / "poly_fit.py").read_bytes() == numpy_module
    assert [p.name for p in tmp_path.iterdir()] == ["poly_fit.py"]


# model names whose C wrapper <name>.py would shadow a module for code in its directory: the
# C target refuses them as the NumPy target does (one check, commands/compile.py)
C_SHADOWING_NAMES = [("json", "the standard library's json"), ("random", "the standard library's random"),
                     ("threading", "the standard library's threading"), ("operator", "the standard library's operator"),
                     ("weakref", "the standard library's weakref"), ("collections", "the standard library's collections"),
                     ("cffi", "the cffi"), ("sympy", "the sympy")]


@pytest.mark.parametrize("name,words", C_SHADOWING_NAMES, ids=[c[0] for c in C_SHADOWING_NAMES])
def test_c_target_refuses_model_names_that_shadow_a_module(tmp_path, capsys, name, words):
    spec = tmp_path / "m.toml"
    spec.write_text(f'[model]\nname = "{name}"\n[expression]\nprediction = "a*x"\nparams = {{a = 1}}\ninputs = ["x"]\n')
    assert run("compile", spec, "--target", "c", "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"a module named {name!r} would shadow {words} module" in err, err
    assert "choose another model.name" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.toml"]


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compile", str(POLY), "--target", "fortran"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert main([]) == 2


# ---- show ----------------------------------------------------------------------------------

def test_show_text(capsys):
    assert run("show", TANH) == 0
    out = capsys.readouterr().out
    assert "model mlp_tanh  (from examples/mlp_tanh.toml)" in out
    assert re.search(r"dZ1 = dH1\*\(1 - H1\*\*2\)\s+\(n, 16\)", out)     # tanh' reuses the forward value
    assert re.search(r"dW1 = x\.T @ dZ1\s+\(2, 16\)", out)
    assert "operation counts" in out and "before" in out and "after" in out
    for p in ("W1", "b1", "W2", "b2", "W3", "b3"):
        assert f"gradient of {p}, shape" in out


def test_show_one_param(capsys):
    assert run("show", EXAMPLES["mlp_classifier.toml"], "--param", "W2") == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "gradient of W2, shape (32, 10):",
        "  dZ2 = (softmax(Z2) - onehot(y))/n  (n, 10)",
        "  dW2 = H1.T @ dZ2                   (32, 10)",
    ]


def test_show_unknown_param(capsys):
    assert run("show", POLY, "--param", "zz") == 2
    assert "has no parameter 'zz'; its parameters are: a, b, c, d" in capsys.readouterr().err


def test_show_latex(capsys):
    assert run("show", POLY, "--param", "a", "--format", "latex") == 0
    out = capsys.readouterr().out
    assert out.startswith("% model poly_fit (from ")    # a title of comment lines, then the formulas
    assert "\n\n% gradient of a, shape ()\n\\begin{aligned}\n" in out
    assert "&=" in out and out.rstrip().endswith("\\end{aligned}")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_show_dot_is_a_well_formed_graph(capsys, name):
    assert run("show", EXAMPLES[name], "--format", "dot") == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].startswith("digraph ") and lines[-1] == "}"
    node_ids = set()
    for line in lines[1:-1]:
        m = re.fullmatch(r'  (n\d+) \[label="(?:[^"\\]|\\.)*", .*\];', line)
        if m:
            node_ids.add(m.group(1))
            continue
        e = re.fullmatch(r"  (n\d+) -> (n\d+);", line)
        if e:
            assert {e.group(1), e.group(2)} <= node_ids        # edges only between declared nodes
            continue
        assert re.fullmatch(r'  (rankdir|node|edge|labelloc)\b.*;|  label="(?:[^"\\]|\\.)*";', line), line
    assert "lightsalmon" in out and "peripheries=2" in out     # backward nodes, gradients


def test_show_is_deterministic(capsys):
    assert run("show", TANH, "--format", "dot") == 0
    first = capsys.readouterr().out
    assert run("show", TANH, "--format", "dot") == 0
    assert capsys.readouterr().out == first


# ---- check ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_check_examples_pass(capsys, name):
    assert run("check", EXAMPLES[name]) == 0
    out = capsys.readouterr().out
    assert "parameter" in out and "max abs error" in out and "max rel error" in out and "verdict" in out
    assert "FAIL" not in out


def test_check_fails_on_a_wrong_gradient(capsys, monkeypatch):
    import compiler.gradcheck as gc
    real = gc.check_gradients

    def corrupted(module, params, arrays, **kw):
        backward = module.backward

        def bad_backward(params, *arrays):
            loss, grads = backward(params, *arrays)
            return loss, {k: (v * 1.01 if k == "b" else v) for k, v in grads.items()}
        module.backward = bad_backward
        return real(module, params, arrays, **kw)
    monkeypatch.setattr(gc, "check_gradients", corrupted)
    assert run("check", POLY) == 1
    out = capsys.readouterr().out
    assert re.search(r"^b .*FAIL$", out, re.M)
    assert "FAILED: b" in out


def test_check_fails_when_the_loss_is_not_finite(tmp_path, capsys):
    spec = tmp_path / "logfit.toml"
    spec.write_text('[expression]\nprediction = "a*log(x)"\nparams = {a = 1}\ninputs = ["x"]\n')
    assert run("check", spec) == 1
    assert "not finite" in capsys.readouterr().out


def test_check_bad_spec_exits_2(tmp_path, capsys):
    spec = tmp_path / "m.toml"
    spec.write_text("[expression]\n")
    assert run("check", spec) == 2
    assert "expression.prediction: missing" in capsys.readouterr().err


# ---- the console entry point ---------------------------------------------------------------

def test_help_imports_neither_sympy_nor_numpy():
    code = ("import sys; from compiler.cli import build_parser; build_parser().format_help(); "
            "heavy = sorted(m for m in ('sympy', 'numpy', 'jinja2') if m in sys.modules); "
            "print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


@pytest.mark.parametrize("argv", [["--help"], ["compile", "--help"], ["show", "--help"], ["check", "--help"]])
def test_help_in_a_real_process(argv):
    r = subprocess.run([sys.executable, "-m", "compiler", *argv], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage: bpc" in r.stdout


def test_compile_and_check_in_a_real_process(tmp_path):
    out = tmp_path / "m.py"
    r = subprocess.run([sys.executable, "-m", "compiler", "compile", str(POLY), "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == (ROOT / "generated" / "poly_fit.py").read_text()


@pytest.mark.parametrize("argv", [["show", str(TANH)], ["show", str(TANH), "--format", "dot"],
                                  ["compile", str(POLY), "-o", "-"]], ids=["show", "dot", "compile"])
def test_a_closed_pipe_is_quiet(argv):
    """`bpc show X | true`: the reader is gone before bpc writes; no traceback, exit 141."""
    p = subprocess.Popen([sys.executable, "-m", "compiler", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141
    assert err == ""


def test_c_target_refuses_standard_output(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("compile", TANH, "--target", "c", "-o", "-") == 2
    assert "cannot go to standard output" in capsys.readouterr().err
    assert not (tmp_path / "-").exists()
