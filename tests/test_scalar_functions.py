"""The table of scalar functions against SymPy, central differences and every printer.

Each row of ``scalar_functions.SCALAR_FUNCTIONS`` is a test row here: its derivative column
against ``sympy.diff`` of its textbook form, its NumPy and C spellings (values against SymPy,
gradients against central differences on the row's input domain), its stable rewrite, its
names in specs and among the activations. The other direction too: no printer, template or
spec whitelist knows a function the table does not.
"""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from compiler.backends.c.printer import CPrinter, CPrinterFloat, print_c
from compiler.backends.numpy.printer import NumpyPrinter, print_numpy
from compiler.core import functions, scalar_functions
from compiler.core.scalar_functions import SCALAR_FUNCTIONS, X, X2, Y
from compiler.errors import UnsupportedError
from compiler.gradcheck import check_gradients
from compiler.spec import safe_expr

ROOT = Path(__file__).resolve().parent.parent
ROWS = {f.name: f for f in SCALAR_FUNCTIONS}
PRINTED = [f.name for f in SCALAR_FUNCTIONS if f.stable is None]
has_cc = shutil.which("cc") is not None or shutil.which("gcc") is not None


def applied(f, *args):
    """f applied to X (and X2 for a two-argument function), or to ``args``."""
    return f.sympy(*(args or (X, X2)[:f.arity]))


def textbook(expr):
    """``expr`` with the table's own primitives replaced by their textbook forms (SymPy's
    classes only), so that SymPy's diff and evalf know everything in it."""
    while True:
        out = expr.replace(lambda e: (f := scalar_functions.lookup(e)) is not None and f.definition is not None,
                           scalar_functions.definition_at)
        out = out.replace(lambda e: isinstance(e, scalar_functions.step), lambda e: sp.Heaviside(e.args[0], 0))   # step(0) = 0
        if out == expr:
            return out
        expr = out


def samples(f, count=7, seed=0):
    rng = np.random.default_rng(seed)
    lo, hi = f.domain
    return rng.uniform(lo, hi, size=(count, f.arity))


def value(expr, point):
    return float(expr.xreplace(dict(zip((X, X2), map(sp.Float, point)))).evalf(30))


# ---- the table itself ------------------------------------------------------------------------

def test_rows_are_consistent():
    assert len(ROWS) == len(SCALAR_FUNCTIONS)
    spec_names = [n for f in SCALAR_FUNCTIONS for n in f.spec_names]
    assert len(spec_names) == len(set(spec_names))
    for f in SCALAR_FUNCTIONS:
        lo, hi = f.domain
        assert lo < hi and f.arity in (1, 2) and f.rtol > 0, f.name
        assert f.derivative.free_symbols <= {X, X2, Y}, f.name
        if f.stable is not None:
            # rewritten before printing: no spellings of its own, a printable stable form
            assert (f.numpy, f.c, f.numpy_helper, f.c_helper) == (None, None, None, None), f.name
            assert all(isinstance(s, scalar_functions.PRINTED) for s in sp.preorder_traversal(f.stable)
                       if isinstance(s, (sp.Function, sp.Max, sp.Min))), f.name
        else:
            assert f.numpy and f.c, f"{f.name} lacks a NumPy or a C spelling"
            assert f.numpy.count("{0}") == 1 and f.numpy.count("{1}") == (f.arity == 2), f.name
            assert f.numpy_in_place is None or f.numpy_in_place.count("{out}") == 1, f.name


@pytest.mark.parametrize("name", list(ROWS))
def test_derivative_column_is_sympys(name):
    f = ROWS[name]
    y = applied(f)
    got = f.derivative.xreplace({Y: y})
    want = sp.diff(textbook(y), X)
    if f.definition is None and f.arity == 1:
        # what the reverse sweep reads is exactly SymPy's own derivative (flat parts: 0), so the
        # generated code does not depend on which of the two it uses
        flat = sp.diff(y, X).replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))
        assert scalar_functions.derivative_at(y) == flat
    for point in samples(f, seed=1):
        g, w = value(textbook(got), point), value(want, point)
        assert abs(g - w) <= 1e-12 * max(1.0, abs(w)), (name, point, g, w)


@pytest.mark.parametrize("name", [f.name for f in SCALAR_FUNCTIONS if f.definition is not None or f.stable is not None])
def test_stabilize_rewrites_into_the_table(name):
    f = ROWS[name]
    if f.definition is not None:
        assert functions.stabilize(f.definition) == applied(f)
    if f.stable is not None:
        assert functions.stabilize(applied(f)) == f.stable


@pytest.mark.parametrize("name", [n for f in SCALAR_FUNCTIONS for n in f.spec_names])
def test_spec_names_call_the_table(name):
    f = next(f for f in SCALAR_FUNCTIONS if name in f.spec_names)
    args = ", ".join(["x", "x2"][:f.arity])
    parsed = safe_expr.parse(f"{name}({args})", {"x": X, "x2": X2})
    assert parsed == applied(f)


def test_spec_whitelist_is_the_table():
    assert set(scalar_functions.SPEC_FUNCTIONS) == {n for f in SCALAR_FUNCTIONS for n in f.spec_names} | {"sqrt"}
    for name in ["acos", "gamma", "floor", "DiracDelta", "step", "eval", "exec"]:
        with pytest.raises(safe_expr.ExprError, match="unknown function"):
            safe_expr.parse(f"{name}(x)", {"x": X})


def test_spec_documentation_lists_the_table():
    text = (ROOT / "docs" / "spec.md").read_text()
    listed = re.search(r"calls with positional arguments of: `([^`]*)`", text).group(1).split()
    assert sorted(listed) == sorted(scalar_functions.SPEC_FUNCTIONS)


def test_activations_named_after_functions_are_the_table():
    x = functions._x
    named = {f.name: (f.sympy(x), f.activation) for f in SCALAR_FUNCTIONS if f.activation}
    assert {k: v for k, v in functions.ACTIVATIONS.items() if k in ROWS} == named


# ---- the printers know the table and nothing else ---------------------------------------------

def _function_classes():
    """Every SymPy class a printer method could be named after."""
    return {name for name in dir(sp) if isinstance(getattr(sp, name), type)
            and issubclass(getattr(sp, name), (sp.Function, sp.Max, sp.Min))}


@pytest.mark.parametrize("printer", [NumpyPrinter, CPrinter, CPrinterFloat])
def test_no_printer_knows_a_function_the_table_does_not(printer):
    own = {m[len("_print_"):] for cls in printer.__mro__ if cls.__module__.startswith("compiler.")
           for m in vars(cls) if m.startswith("_print_")}
    known = own & (_function_classes() | {"sigmoid", "softplus", "relu", "step"}) - {"Function"}
    assert known == set(ROWS), known ^ set(ROWS)


UNKNOWN = [sp.acos(X), sp.floor(X), sp.gamma(X), sp.DiracDelta(X), sp.Heaviside(X), sp.LambertW(X),
           sp.Function("tanh")(X), sp.ceiling(X), sp.Mod(X, 2), sp.Max(X, 1) ** sp.acos(X)]


@pytest.mark.parametrize("expr", UNKNOWN, ids=str)
def test_printers_refuse_what_the_table_does_not_spell(expr):
    with pytest.raises(UnsupportedError, match="not supported"):
        print_numpy(expr, {X: "x"})
    for dtype in ("float64", "float32"):
        with pytest.raises(UnsupportedError, match="not supported"):
            print_c(expr, {X: "x"}, dtype)


def test_helpers_are_defined_by_the_table_alone():
    """Every helper a spelling calls is defined in its record (C for both element types); the
    module templates define only the helpers of tensor ops."""
    numpy_blocks = set(re.findall(r'\{% if "(\w+)" in helpers %\}', (ROOT / "templates" / "numpy_module.py.j2").read_text()))
    c_blocks = set(re.findall(r'\{% if "(\w+)" in helpers %\}', (ROOT / "templates" / "c_model.c.j2").read_text()))
    image_ops = {"padded", "im2col", "conv", "col2im", "col2im_product", "conv_transpose", "window_max", "route_to_argmax"}
    assert numpy_blocks == {"scratch", "returned", "colsum", "logsumexp", "softmax", "softmax_into"} | image_ops and c_blocks == set()
    for f in SCALAR_FUNCTIONS:
        callee = f.numpy.split("(")[0] if f.numpy else None
        if f.numpy_helper:
            (code,) = scalar_functions.helper_sources({f.name}, "numpy_helper")
            assert f"\ndef {callee}(" in "\n" + code, f.name
        else:
            assert callee is None or callee.startswith("np."), f"{f.name} calls {callee}, which nothing defines"
        if f.c_helper:
            for real, fs in (("double", ""), ("float", "f")):
                (code,) = scalar_functions.helper_sources({f.name}, "c_helper", real=real, fs=fs)
                assert re.search(rf"^static (inline )?{real} {f.c}{fs}\(", code, re.M), (f.name, real)
                assert "$" not in code and ("double" not in code or real == "double"), (f.name, real)
        else:
            assert f.c is None or not f.c.startswith("bpc_"), f"{f.name} calls {f.c}, which nothing defines"


@pytest.mark.parametrize("name", PRINTED)
def test_spellings(name):
    f = ROWS[name]
    args = [sp.Symbol("u", real=True), sp.Symbol("v", real=True)][:f.arity]
    codes = {args[0]: "u", **({args[1]: "v"} if f.arity == 2 else {})}
    code, helpers = print_numpy(f.sympy(*args), codes)
    want = f.numpy.format("u", "v")
    assert code == want and helpers == ({f.name} if f.numpy_helper else set())
    for dtype, suffix in (("float64", ""), ("float32", "f")):
        code, helpers = print_c(f.sympy(*args), codes, dtype)
        assert code == f"{f.c}{suffix}({', '.join(codes.values())})" and helpers == ({f.name} if f.c_helper else set())
    if f.arity == 2:    # three or more arguments fold from the left
        w = sp.Symbol("w", real=True)
        code, _ = print_numpy(f.sympy(*args, w), {**codes, w: "w"})
        assert code in (f.numpy.format(f.numpy.format("u", "v"), "w"), f.numpy.format(f.numpy.format("u", "w"), "v"),
                        f.numpy.format(f.numpy.format("v", "w"), "u"), f.numpy.format(f.numpy.format("v", "u"), "w"),
                        f.numpy.format(f.numpy.format("w", "u"), "v"), f.numpy.format(f.numpy.format("w", "v"), "u"))


# ---- values and gradients of compiled code, on each row's domain --------------------------------

def _model(f):
    """p = f(a*x + b) (two-argument functions: f(a*x + b, c*z)), loss (p - y)**2: the gradient of
    a, b and c runs through the derivative column and both spellings."""
    a, b, c, x, z = sp.symbols("a b c x z", real=True)
    inner = [a * x + b, c * z][:f.arity]
    params = {a: 1.0, b: 0.0, **({c: 1.0} if f.arity == 2 else {})}
    return bpc.expression_model(f.sympy(*inner), params=params, inputs=[x, z][:f.arity])


BACKENDS = ["numpy", pytest.param("c", marks=pytest.mark.skipif(not has_cc, reason="no C compiler"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ROWS))
def test_compiled_function_values_and_gradients(name, backend):
    f = ROWS[name]
    model = _model(f)
    compiled = bpc.compile_model(model) if backend == "numpy" else bpc.compile_model_c(model)
    module = compiled.load()
    points = samples(f, count=9, seed=2)
    inputs = [np.ascontiguousarray(points[:, i]) for i in range(f.arity)]
    params = module.init_params(0)
    reference = textbook(functions.stabilize(applied(f)))
    want = np.array([value(reference, p) for p in points])
    got = np.asarray(module.forward(params, *inputs)).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    # the argument moves off the samples a little: central differences of a, b (and c) there
    params = {k: np.asarray(v + 0.01 * (i + 1)) for i, (k, v) in enumerate(sorted(params.items()))}
    target = np.random.default_rng(3).standard_normal(len(points))
    rows = check_gradients(module, params, [*inputs, target], rtol=f.rtol, atol=1e-9)
    assert rows and all(r.ok for r in rows), rows


@pytest.mark.skipif(not has_cc, reason="no C compiler")
def test_every_function_in_float32_c():
    """One model that calls every printed function: its float spellings (expf, fabsf, bpc_maxf,
    ...) compile and agree with the float64 NumPy module to float precision."""
    x = sp.Symbol("x", real=True)
    a = sp.Symbol("a", real=True)
    terms = []
    for f in SCALAR_FUNCTIONS:
        if f.stable is not None:
            continue
        lo, hi = f.domain
        inner = (lo + hi) / 2 + (hi - lo) / 4 * sp.tanh(a * x)       # inside the domain for every x
        terms.append(f.sympy(inner, *([inner / 2] if f.arity == 2 else [])))
    model = bpc.expression_model(sp.Add(*terms), params={a: 0.7}, inputs=[x])
    ref = bpc.compile_model(model, "float64").load()
    c32 = bpc.compile_model_c(model, "float32").load()
    xs = np.linspace(-3, 3, 13)
    params = ref.init_params(0)
    np.testing.assert_allclose(c32.forward({k: np.float32(v) for k, v in params.items()}, xs.astype(np.float32)).reshape(-1),
                               np.asarray(ref.forward(params, xs)).reshape(-1), rtol=1e-5, atol=1e-5)
