"""The import graph of compiler/ points one way, down the pipeline (docs/architecture.md,
issue 11): shared utilities <- core <- frontends <- spec; core <- backends (numpy and c are
siblings); backends <- train; cli <- everything, and only compiler/__main__.py imports cli.

Every module is parsed with ``ast`` (nothing is imported), and every import in it counts, at
module level or inside a function: ``import compiler.x``, ``from compiler.x import y``,
``from compiler import x`` (a submodule, or a lazily exported name resolved to the module that
defines it) and ``importlib.import_module("compiler.x")`` with a literal name.

A rule the code breaks today is marked ``xfail(strict=True)`` with the reason: when the code is
fixed the row passes, strict xfail turns that into a failure, and the mark must be removed.
"""
import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "compiler"
# the shared utilities at the top of the package (a new top-level module must be placed here, or
# in a layer, deliberately: test_every_module_has_a_layer fails until it is)
SHARED = ("compiler", "compiler.errors", "compiler.files", "compiler.freetext", "compiler.limits",
          "compiler.gradcheck", "compiler.dtypes", "compiler.progress")


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _lazy_exports():
    """``compiler.__init__``'s table of lazily exported names -> defining module."""
    tree = ast.parse(MODULES["compiler"].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return {name: f"compiler.{module}" for name, module in ast.literal_eval(node.value).items()}
    raise AssertionError("compiler/__init__.py has no _EXPORTS table")


EXPORTS = _lazy_exports()


def _resolve(importer, level, module):
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if not level:
        return module
    package = importer.split(".")
    if not MODULES[importer].name == "__init__.py":
        package = package[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name):
    """The compiler modules ``name`` imports, as (imported module, line) pairs."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:                      # from compiler.core import ir
                    found.append((sub, node.lineno))
                elif base == "compiler" and alias.name in EXPORTS:   # from compiler import compile_model
                    found.append((EXPORTS[alias.name], node.lineno))
                else:                                   # from compiler.core.ir import N; __version__
                    found.append((base, node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return list(dict.fromkeys((m, line) for m, line in found if m == "compiler" or m.startswith("compiler.")))


def layer(name):
    """The layer a module belongs to: "shared", "core", "frontends", "spec", "backends" (the
    shared backend modules: templates, cache), "backends.numpy", "backends.c", "train", "cli",
    "main" (compiler/__main__.py)."""
    if name in SHARED:
        return "shared"
    if name == "compiler.__main__":
        return "main"
    parts = name.split(".")
    if parts[1] == "backends" and len(parts) > 2 and parts[2] in ("numpy", "c"):
        return f"backends.{parts[2]}"
    return parts[1]


def test_every_module_has_a_layer():
    layers = {"shared", "main", "core", "frontends", "spec", "backends", "backends.numpy", "backends.c", "train",
              "cli"}
    assert {name: layer(name) for name in MODULES if layer(name) not in layers} == {}
    # and every import names a module that exists (a renamed module must not hide an arrow)
    missing = {(name, m) for name in MODULES for m, _ in imports_of(name) if m not in MODULES}
    assert missing == set()


@dataclass(frozen=True)
class Rule:
    """Modules of layer ``importer`` may import compiler modules of their own layer and of the
    ``allowed`` layers only; ``why`` is the rule in words."""
    importer: str
    allowed: tuple
    why: str


ALL = ("shared", "core", "frontends", "spec", "backends", "backends.numpy", "backends.c", "train", "cli")

RULES = [
    pytest.param(Rule("shared", ("shared",), "the utilities sit under everything"), id="shared"),
    pytest.param(Rule("core", ("shared",), "core imports nothing from frontends, spec, backends, train, cli"),
                 id="core"),
    pytest.param(Rule("frontends", ("shared", "core"), "frontends import only core and shared utilities"),
                 id="frontends"),
    pytest.param(Rule("spec", ("shared", "core", "frontends"), "spec imports core, frontends and shared"),
                 id="spec"),
    pytest.param(Rule("backends", ("shared", "core"), "the shared backend modules serve both renderers"),
                 id="backends"),
    pytest.param(Rule("backends.numpy", ("shared", "core", "backends"),
                      "a renderer imports core and shared; numpy and c are siblings"), id="backends.numpy"),
    pytest.param(Rule("backends.c", ("shared", "core", "backends"),
                      "a renderer imports core and shared; c must not import numpy"), id="backends.c"),
    pytest.param(Rule("train", tuple(x for x in ALL if x != "cli"), "train imports nothing from cli"),
                 id="train"),
    pytest.param(Rule("cli", ALL, "cli may import everything"), id="cli"),
    pytest.param(Rule("main", ("cli",), "python -m compiler runs the CLI"), id="main"),
]


@pytest.mark.parametrize("rule", RULES)
def test_imports_point_down_the_pipeline(rule):
    wrong = [f"{name}:{line} imports {m} ({layer(m)})"
             for name in MODULES if layer(name) == rule.importer
             for m, line in imports_of(name) if layer(m) not in rule.allowed + (rule.importer,)]
    assert wrong == [], f"{rule.why}:\n" + "\n".join(wrong)


def test_only_main_imports_the_cli():
    wrong = [f"{name}:{line} imports {m}" for name in MODULES if layer(name) not in ("cli", "main")
             for m, line in imports_of(name) if layer(m) == "cli"]
    assert wrong == []


def test_imports_inside_the_package_are_absolute():
    relative = [f"{name}:{node.lineno}" for name in MODULES
                for node in ast.walk(ast.parse(MODULES[name].read_text()))
                if isinstance(node, ast.ImportFrom) and node.level]
    assert relative == []


# the checker itself: each kind of import it must see, in a module it is given as text
CHECKER_CASES = [
    ("import compiler.cli.app", "compiler.cli.app"),
    ("from compiler.backends.numpy import module", "compiler.backends.numpy.module"),
    ("from compiler.backends.numpy.module import compile_model", "compiler.backends.numpy.module"),
    ("from compiler import compile_model", "compiler.backends.numpy.module"),
    ("from compiler import limits", "compiler.limits"),
    ("from compiler import __version__", "compiler"),
    ("def f():\n    from compiler.train import loop", "compiler.train.loop"),
    ("import importlib\nimportlib.import_module('compiler.cli')", "compiler.cli"),
    ("from ..numpy import printer", "compiler.backends.numpy.printer"),
    ("from . import printer", "compiler.backends.c.printer"),
]


@pytest.mark.parametrize("source,expected", CHECKER_CASES)
def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch, source, expected):
    path = tmp_path / "compiler" / "backends" / "c" / "probe.py"
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    monkeypatch.setitem(MODULES, "compiler.backends.c.probe", path)
    assert [m for m, _ in imports_of("compiler.backends.c.probe")] == [expected]
