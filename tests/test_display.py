"""A compiled model in Python and Jupyter (issue 15, item 3): a one-line repr, the gradient
formulas as a notebook display that renders, ``show()`` printing what ``bpc show`` prints, type
hints on the public API with a ``py.typed`` marker and a stub for the lazily exported names,
and the LICENSE."""
import ast
import inspect
import io
import re
import tomllib
from pathlib import Path

import pytest
import sympy as sp

import compiler as bpc
from compiler.cli.app import main
from compiler.errors import BpcError
from mathtext_check import assert_lines_parse, notebook_lines

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def big():
    return bpc.compile_model(bpc.mlp([784, 256, 128, 10], "relu", "softmax_cross_entropy", name="digits"),
                             "float32")


# (id, compile, the repr)
REPRS = [
    ("numpy float32", lambda: bpc.compile_model(bpc.mlp([784, 256, 128, 10], "relu", "softmax_cross_entropy",
                                                        name="digits"), "float32"),
     "<CompiledModule 'digits': x (784,) -> y (), 235,146 parameters in 6 arrays; dtype float32, target numpy>"),
    ("numpy following the inputs", lambda: bpc.compile_model(bpc.mlp([3, 8, 1], name="reg")),
     "<CompiledModule 'reg': x (3,) -> y (1,), 41 parameters in 4 arrays; dtype float32/float64 "
     "(follows the inputs), target numpy>"),
    ("c", lambda: bpc.compile_model_c(bpc.mlp([3, 8, 1], name="reg")),
     "<CompiledC 'reg': x (3,) -> y (1,), 41 parameters in 4 arrays; dtype float64, target c>"),
    ("expression model", lambda: bpc.compile_model(bpc.expression_model(
        sp.Symbol("a") * sp.Symbol("x"), {sp.Symbol("a"): 1.0}, [sp.Symbol("x")], name="line")),
     "<CompiledModule 'line': x () -> y (), 1 parameter in 1 array; dtype float32/float64 "
     "(follows the inputs), target numpy>"),
]


@pytest.mark.parametrize("make, expected", [r[1:] for r in REPRS], ids=[r[0] for r in REPRS])
def test_repr_is_one_line(make, expected):
    assert repr(make()) == expected


def test_notebook_shows_the_gradient_formulas(big):
    latex = big._repr_latex_()
    lines = notebook_lines(latex)
    assert_lines_parse(lines)                           # renders: mathtext parses every line
    heads = [line.split(" &= ")[0] for line in lines]
    for p in ("W_{1}", "b_{1}", "W_{2}", "b_{2}", "W_{3}", "b_{3}"):
        assert rf"\mathrm{{d{p[0]}}}_{{{p[-2]}}}" in heads, p   # every parameter's gradient
    assert len(heads) == len(set(heads))                # a line shared by chains is shown once


@pytest.mark.parametrize("example, options", [
    ("mlp_tanh.toml", {}),
    ("mlp_classifier.toml", {"format": "latex", "param": "W1"}),
    ("poly_fit.toml", {"format": "dot"}),
    ("matrix_mlp.toml", {"param": "b1"}),
])
def test_show_prints_what_bpc_show_prints(example, options, capsys):
    path = ROOT / "examples" / example
    argv = ["show", str(path)]
    for k, v in options.items():
        argv += [f"--{k}", v]
    assert main(argv) == 0
    cli = capsys.readouterr().out
    spec = bpc.load_spec(path)
    out = io.StringIO()
    assert bpc.compile_model(spec.model, spec.dtype).show(file=out, **options) is None
    assert out.getvalue() == cli
    bpc.compile_model_c(spec.model).show(**options)   # the C target shows the same derivation
    assert capsys.readouterr().out == cli


def test_show_refuses_an_unknown_parameter_or_format():
    compiled = bpc.compile_model(bpc.mlp([2, 3, 1], name="small"))
    with pytest.raises(BpcError, match=r"^model 'small' has no parameter 'W9'; its parameters are: W1, b1, W2, b2$"):
        compiled.show(param="W9")
    with pytest.raises(BpcError, match=r"^format must be one of text, latex, dot, not 'svg'$"):
        compiled.show(format="svg")


# ---- type hints ------------------------------------------------------------------------------

def _callables():
    """The public functions and the public methods of the public classes, by qualified name."""
    out = {}
    for name in bpc.__all__:
        obj = getattr(bpc, name)
        if inspect.isfunction(obj) and obj.__module__.startswith("compiler."):
            out[name] = obj
    for cls, methods in [(bpc.Network, ("input", "target", "param", "dense", "activation", "build")),
                         (bpc.CompiledModule, ("write", "load", "show")),
                         (bpc.CompiledC, ("write", "build", "load", "show"))]:
        for m in methods:
            out[f"{cls.__name__}.{m}"] = getattr(cls, m)
    return out


CALLABLES = _callables()


def test_the_public_functions_are_listed():
    assert {"mlp", "expression_model", "from_matrix_expr", "compile_model", "compile_model_c", "load_spec",
            "loads_spec", "load_module", "check_gradients", "random_batch"} <= set(CALLABLES)


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_public_api_has_type_hints(name):
    fn = CALLABLES[name]
    sig = inspect.signature(fn)
    missing = [p for p in sig.parameters.values()
               if p.name != "self" and p.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}: {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, name


def test_stub_lists_the_lazy_exports_and_py_typed_ships():
    stub = ast.parse((ROOT / "compiler" / "__init__.pyi").read_text())
    names = {alias.asname for node in stub.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert names == set(bpc.__all__)
    for node in stub.body:        # each name from the module _EXPORTS says
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                assert alias.name == alias.asname
                assert getattr(bpc, alias.name) is getattr(__import__(node.module, fromlist=["_"]), alias.name)
    assert (ROOT / "compiler" / "py.typed").is_file()
    # the wheel holds the package directory whole (py.typed and the stub with it)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["compiler"]


def test_license_is_mit_as_pyproject_says():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert re.search(r"^Copyright \(c\) \d{4} bpc developers$", text, re.M)
    assert "LICENSE" in project["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]
