"""The table of scalar functions: one record per function an elementwise node may apply.

Every consumer reads this table: the names a spec may call (``spec.safe_expr``), the functions
generated code supports (``functions.check_supported``), the built-in activations named after
a function (``functions.ACTIVATIONS``), stabilize's whole-function rewrites, the derivative the
reverse sweep uses (``adjoints``), the NumPy and C spellings (the two printers and the in-place
statements of ``backends.numpy.statements``) and the helpers those call (defined in generated
modules through the templates' ``scalar_helpers`` filter). Adding a function is one record,
with the sources of any helpers its spellings call; ``tests/test_scalar_functions.py`` makes
each record a test row.

``sigmoid``, ``softplus``, ``relu`` and ``step`` are opaque SymPy functions whose derivatives
(the ``derivative`` column) are written in terms of each other (softplus' = sigmoid,
sigmoid' = sigmoid*(1 - sigmoid), relu' = step(relu)), so that ``sympy.diff`` never produces
``exp(x)/(exp(x) + 1)`` and the backends can print each one in a form that stays finite at
+-1000.

Columns are SymPy expressions of the argument ``X`` (and ``X2``, the second argument of the
two-argument ``Max``/``Min``) and of the function's value ``Y``, so that a derivative reuses the
forward output where that saves work (tanh' = 1 - Y**2, exp' = Y, relu' = step(Y)).
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import sympy as sp

from compiler.core import scalar_c_math

X = sp.Symbol("x", real=True)     # the argument, in every expression column
X2 = sp.Symbol("x2", real=True)   # the second argument of a two-argument function
Y = sp.Symbol("y", real=True)     # the function's value f(X), in the derivative column


class sigmoid(sp.Function):
    """Logistic function 1/(1 + exp(-x)), printed in a stable form."""

    nargs = 1

    def fdiff(self, argindex=1):
        return derivative_at(self)

    @classmethod
    def eval(cls, x):
        if x == 0:
            return sp.Rational(1, 2)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return definition_at(self)


class softplus(sp.Function):
    """log(1 + exp(x)), printed as logaddexp(0, x)."""

    nargs = 1

    def fdiff(self, argindex=1):
        return derivative_at(self)

    @classmethod
    def eval(cls, x):
        if x == 0:
            return sp.log(2)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return definition_at(self)


class step(sp.Function):
    """Heaviside step with step(0) = 0; its derivative is taken as 0 (as for relu at 0)."""

    nargs = 1

    def fdiff(self, argindex=1):
        return derivative_at(self)

    def _eval_is_real(self):
        return True


class relu(sp.Function):
    """max(0, x). Its derivative step(relu(x)) equals step(x) and reuses the forward output."""

    nargs = 1

    def fdiff(self, argindex=1):
        return derivative_at(self)

    def _eval_is_real(self):
        return self.args[0].is_real


@dataclass(frozen=True)
class ScalarFunction:
    """One scalar function and everything each stage needs to know about it."""

    sympy: type                 # the SymPy class (printers dispatch on it, by identity)
    derivative: sp.Expr         # df/dX in X and Y = f(X); two-argument functions: d/dX f(X, X2)
    domain: tuple               # (lo, hi): where tests sample f and compare its derivative
    numpy: str | None = None    # NumPy code, the argument at {0} (and {1}: folded over the args)
    c: str | None = None        # C function, before the float suffix ``f``
    spec_names: tuple = ()      # names a spec expression may call it by (none: internal only)
    numpy_helper: str | None = None   # the definition of the helper the NumPy code calls
    c_helper: object = None           # the same in C: a string.Template of $real and $fs, or a function of real, fs
    numpy_out: bool = False     # the NumPy call takes ``out=`` (in-place statements use it)
    stable: sp.Expr | None = None       # what stabilize turns f(X) into; then f has no spellings
    definition: sp.Expr | None = None   # the textbook form that stabilize turns into f
    activation: str | None = None       # a built-in activation under its name, initialised so
    arity: int = 1              # 2: a left fold over two or more arguments (Max, Min)
    rtol: float = 1e-6          # of the derivative against central differences, in the tests

    @property
    def name(self):
        return self.sympy.__name__

    def takes(self, count):
        """Whether an application to ``count`` arguments is this function's."""
        return count == 1 if self.arity == 1 else count >= 2

    @property
    def numpy_in_place(self):
        """The NumPy call with ``{out}`` where the ``out=`` keyword goes (None if it has none)."""
        if not self.numpy_out:
            return None
        return self.numpy[:-1] + "{out})"


# ---- helpers: what a spelling calls, defined once in each generated module that calls it --------

_NUMPY_SIGMOID = """\
def _sigmoid(x):
    # exp(-log(1 + exp(-x))): finite and exact for every x, no overflow at -1000
    return np.exp(-np.logaddexp(0.0, -x))"""

_NUMPY_ERF = """\
_erf_scalar = np.frompyfunc(__import__("math").erf, 1, 1)


def _erf(x):
    # numpy has no erf; math.erf elementwise is exact but slow
    return _erf_scalar(x).astype(x.dtype)"""

# C helpers: $real is the element type, $fs the suffix of its math functions (expf, ...)
_C_RELU = """\
/* max(x, 0), propagating nan like numpy.maximum */
static $real bpc_relu$fs($real x)
{
    return x < 0 ? ($real)0 : x;
}"""

_C_STEP = """\
/* Heaviside step with step(0) = 0 (the derivative of relu taken at its kink) */
static $real bpc_step$fs($real x)
{
    return x > 0 ? ($real)1 : (x <= 0 ? ($real)0 : x);
}"""

_C_SIGN = """\
static $real bpc_sign$fs($real x)
{
    return x > 0 ? ($real)1 : (x < 0 ? ($real)-1 : x);
}"""

_C_MAX = """\
/* the larger of a and b, nan if either is nan (numpy.maximum; fmax would drop the nan) */
static $real bpc_max$fs($real a, $real b)
{
    return (a >= b || a != a) ? a : b;
}"""

_C_MIN = """\
static $real bpc_min$fs($real a, $real b)
{
    return (a <= b || a != a) ? a : b;
}"""


def _entry(sympy, derivative, domain=(-3.0, 3.0), **columns):
    return ScalarFunction(sympy, sp.sympify(derivative), domain, **columns)


def _libm(sympy, c, derivative, domain=(-3.0, 3.0), numpy=None, **columns):
    """A NumPy ufunc (``out=`` and all) that a spec calls by its SymPy name; C spells it ``c``
    (a libm function, or a helper: ``bpc_tanh``)."""
    return _entry(sympy, derivative, domain, numpy=f"np.{numpy or sympy.__name__}({{0}})", c=c,
                  numpy_out=True, spec_names=(sympy.__name__,), **columns)


# helpers are defined in table order
SCALAR_FUNCTIONS = (
    _libm(sp.exp, "bpc_exp", Y, c_helper=scalar_c_math.c_exp, activation="glorot"),
    _libm(sp.log, "bpc_log", 1 / X, domain=(0.1, 5.0), c_helper=scalar_c_math.c_log),
    _libm(sp.tanh, "bpc_tanh", 1 - Y**2, c_helper=scalar_c_math.c_tanh, activation="glorot"),
    _libm(sp.sinh, "sinh", sp.cosh(X)),
    _libm(sp.cosh, "cosh", sp.sinh(X)),
    _libm(sp.sin, "sin", sp.cos(X), activation="glorot"),
    _libm(sp.cos, "cos", -sp.sin(X)),
    _libm(sp.tan, "tan", Y**2 + 1, domain=(-1.2, 1.2)),
    _libm(sp.atan, "atan", 1 / (X**2 + 1), numpy="arctan"),
    _libm(sp.asinh, "asinh", 1 / sp.sqrt(X**2 + 1), numpy="arcsinh"),
    _entry(sp.Abs, sp.sign(X), numpy="np.abs({0})", c="fabs", numpy_out=True, spec_names=("abs", "Abs")),
    _entry(sigmoid, Y * (1 - Y), numpy="_sigmoid({0})", numpy_helper=_NUMPY_SIGMOID, c="bpc_sigmoid",
           c_helper=scalar_c_math.c_sigmoid, spec_names=("sigmoid",), definition=1 / (1 + sp.exp(-X)), activation="glorot"),
    _entry(softplus, sigmoid(X), numpy="np.logaddexp(0.0, {0})", numpy_out=True, c="bpc_softplus",
           c_helper=scalar_c_math.c_softplus, spec_names=("softplus",), definition=sp.log(1 + sp.exp(X)), activation="he"),
    _entry(relu, step(Y), numpy="np.maximum({0}, 0.0)", numpy_out=True, c="bpc_relu", c_helper=_C_RELU,
           spec_names=("relu",), definition=sp.Max(0, X), activation="he"),
    # sign and step are flat almost everywhere: 0, as the derivative of relu at its kink;
    # np.heaviside takes out= too, but numpy_out stays off so that generated modules stay as they are
    _entry(step, 0, numpy="np.heaviside({0}, 0.0)", c="bpc_step", c_helper=_C_STEP),
    _entry(sp.sign, 0, numpy="np.sign({0})", c="bpc_sign", c_helper=_C_SIGN, numpy_out=True,
           spec_names=("sign",)),
    _entry(sp.erf, 2 * sp.exp(-X**2) / sp.sqrt(sp.pi), numpy="_erf({0})", numpy_helper=_NUMPY_ERF, c="erf",
           spec_names=("erf",)),
    _entry(sp.Heaviside, 0, spec_names=("Heaviside",), stable=step(X)),
    _entry(sp.Max, sp.Heaviside(X - X2), numpy="np.maximum({0}, {1})", c="bpc_max", c_helper=_C_MAX,
           spec_names=("Max", "max"), arity=2),
    _entry(sp.Min, sp.Heaviside(X2 - X), numpy="np.minimum({0}, {1})", c="bpc_min", c_helper=_C_MIN,
           spec_names=("Min", "min"), arity=2),
)

BY_CLASS = {f.sympy: f for f in SCALAR_FUNCTIONS}

# name -> SymPy constructor, for every name a spec expression may call; sqrt builds no function
# of its own (sqrt(u) is the power u**(1/2), which each printer spells in its _print_Pow)
SPEC_FUNCTIONS = {**{name: f.sympy for f in SCALAR_FUNCTIONS for name in f.spec_names}, "sqrt": sp.sqrt}

# the classes generated code may contain (stabilize rewrites the others into these)
PRINTED = tuple(f.sympy for f in SCALAR_FUNCTIONS if f.stable is None)


def lookup(expr):
    """The record of the function ``expr`` applies (by class: a ``sympy.Function("tanh")`` of
    the user's is not ours), or None."""
    return BY_CLASS.get(type(expr))


def derivative_at(expr):
    """The derivative of the one-argument function application ``expr`` (f(u)) with respect to
    its argument u, from the table, reusing ``expr`` itself for f(u); None if not in the table."""
    f = lookup(expr)
    if f is None or f.arity != 1:
        return None
    return f.derivative.xreplace({X: expr.args[0], Y: expr})


def definition_at(expr):
    """The textbook form of ``expr`` (an application of a function with a definition)."""
    return BY_CLASS[type(expr)].definition.xreplace({X: expr.args[0]})


def helper_sources(names, column, **values):
    """The definitions of the helpers that the functions named in ``names`` call, in table
    order: ``column`` is "numpy_helper" or "c_helper", ``values`` fill the C sources' $real
    and $fs. The module templates call this (as the filter ``scalar_helpers``)."""
    out = []
    for f in SCALAR_FUNCTIONS:
        source = getattr(f, column)
        if source and f.name in names:
            # (a C helper is a template of $real and $fs, or a function of them: scalar_c_math)
            out.append(source(**values) if callable(source) else string.Template(source).substitute(values))
    return out


def route_functions(printer):
    """Class decorator for a printer: every table function prints through its
    ``_print_Function`` (SymPy's StrPrinter has ``_print_exp``, ``_print_Max``, ... of its own,
    which would bypass the table)."""
    for f in SCALAR_FUNCTIONS:
        setattr(printer, f"_print_{f.name}", printer._print_Function)
    return printer
