"""The backend boundary: one neutral lowering, sibling renderers registered in one table; the C
backend neither imports the NumPy backend nor runs its compile."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import compiler as bpc
from compiler.backends.lowering import lower
from compiler.backends.registry import BACKENDS, compile_for

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "compiler"


def _imports(text, package):
    """Every module that source ``text`` of a module in ``package`` imports (relative imports
    resolved; ``from a import b`` lists both a and a.b, since b may be a submodule)."""
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names]
    return out


def _forbidden(imports, other):
    return [m for m in imports if m == f"compiler.backends.{other}" or m.startswith(f"compiler.backends.{other}.")]


@pytest.mark.parametrize("sibling, other", [("c", "numpy"), ("numpy", "c")])
def test_backends_do_not_import_each_other(sibling, other):
    files = sorted((PACKAGE / "backends" / sibling).glob("*.py"))
    assert len(files) >= 2
    for f in files:
        bad = _forbidden(_imports(f.read_text(), f"compiler.backends.{sibling}"), other)
        assert not bad, f"{f.relative_to(ROOT)} imports {bad} (backends are siblings)"


@pytest.mark.parametrize("text", [
    "from compiler.backends.numpy.module import compile_model\n",
    "import compiler.backends.numpy.printer as p\n",
    "from compiler.backends import numpy\n",
    "from ..numpy import statements\n",
    "def f():\n    from compiler.backends.numpy import module\n",
])
def test_the_import_check_catches(text):
    assert _forbidden(_imports(text, "compiler.backends.c"), "numpy")


def test_c_compile_never_loads_the_numpy_backend():
    code = ("import sys, compiler as bpc\n"
            "bpc.compile_model_c(bpc.mlp([2, 3, 2], loss='softmax_cross_entropy'), 'float32')\n"
            "print(sorted(m for m in sys.modules if m.startswith('compiler.backends.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "compiler.backends.c.backend" in out
    assert "compiler.backends.numpy" not in out, out


def test_backend_table():
    assert set(BACKENDS) == {"numpy", "c"}
    model = bpc.mlp([2, 3, 1])
    assert compile_for("numpy", model).source == bpc.compile_model(model).source
    assert compile_for("c", model, "float64").c_source == bpc.compile_model_c(model).c_source
    with pytest.raises(bpc.ModelError, match="float32 or float64"):
        compile_for("c", model, None)


@pytest.mark.parametrize("loss", ["mse", "softmax_cross_entropy"])
def test_lowered_is_what_both_backends_report(loss):
    model = bpc.mlp([3, 4, 2], loss=loss)
    lowered = lower(model, "float64")
    numpy_, c = bpc.compile_model(model, "float64"), bpc.compile_model_c(model, "float64")
    for compiled in (numpy_, c):
        assert compiled.formulas == lowered.formulas and compiled.latex == lowered.latex
        assert compiled.source_hash == lowered.source_hash
    for line in lowered.init_lines:
        assert line in numpy_.source and line in c.wrapper_source
    iface = lowered.interface
    for text in (iface.params_shapes, iface.inputs_shapes, iface.targets_shapes, iface.classes):
        assert text in numpy_.source and text in c.wrapper_source
