"""Parse untrusted matrix-expression strings (a spec's ``[matrix]`` section) into SymPy matrix
expressions for ``from_matrix_expr``, without ``eval``.

The text goes through the same limits and AST whitelist as ``safe_expr`` (this builder is a
subclass of its ``_Builder``); only the meaning of some nodes changes:

- names resolve to what the caller declares: ``MatrixSymbol``s, scalar ``Symbol``s, constants;
- ``*`` is the matrix product (a scalar times a matrix scales it), ``+``/``-`` add matrices of
  one shape, ``/`` divides a matrix by a scalar; ``**`` stays scalar-only (a matrix power is
  not elementwise, which is what users usually mean: they write ``hadamard(a, a)``, which SymPy
  may rewrite as a ``HadamardPower``: compiled, as long as its exponent is a positive integer);
- ``T(a)`` / ``transpose(a)`` transpose (``a.T`` would be attribute access, which stays refused);
- ``hadamard(a, b, ...)`` is the elementwise product;
- a scalar function, a built-in activation name or a caller-given activation applied to one
  matrix is ``applyfunc`` (``tanh(W1*x + b1)``); further arguments must be numbers
  (``Max(h, 0)``).

SymPy's ShapeError on a mismatched product or sum becomes an ``ExprError`` at the operator's
column, with both shapes.
"""
from __future__ import annotations

import ast

import sympy as sp
from sympy.matrices.expressions.applyfunc import ElementwiseApplyFunction
from sympy.matrices.expressions.hadamard import HadamardPower
from sympy.matrices.expressions.special import ZeroMatrix
from sympy.matrices.exceptions import ShapeError as SympyShapeError

from compiler.spec.safe_expr import _BINOPS, ExprError, _Builder, _col, _show, parse_with

# the matrix classes from_matrix_expr compiles; SymPy may build others while canonicalising
SUPPORTED = (sp.MatrixSymbol, sp.MatAdd, sp.MatMul, sp.Transpose, sp.HadamardProduct, HadamardPower,
             ElementwiseApplyFunction)
TRANSPOSE = ("T", "transpose")
HADAMARD = "hadamard"
MATRIX_FUNCTIONS = (*TRANSPOSE, HADAMARD)


def matrix_function_names():
    """Names this parser reads as functions beyond the scalar ones (a declared symbol may
    not use one)."""
    from compiler.core.functions import ACTIVATIONS
    return set(MATRIX_FUNCTIONS) | set(ACTIVATIONS)


def parse_matrix(text, symbols, constants=None, activations=None, data=()):
    """Parse ``text`` into a SymPy matrix expression or scalar.

    ``symbols`` maps names to MatrixSymbols, Symbols or whole matrix expressions (a loss may
    name the output); ``activations`` maps extra function names to expressions of
    ``functions._x`` that apply elementwise. ``data`` holds the per-sample (batched) symbols:
    a product of them that is a matrix per sample is refused here, with its column, rather
    than later by the compiler, without one.
    """
    result = parse_with(_MatrixBuilder, text, symbols, constants, activations=activations or {},
                        data=frozenset(data))
    if not isinstance(result, sp.Basic):
        result = sp.sympify(result)  # a plain number: sympify of a number never evaluates code
    # a safety net behind the per-node checks in _checked: the whole tree, once
    for part in sp.preorder_traversal(result):
        if isinstance(part, sp.MatrixExpr) and not isinstance(part, SUPPORTED):
            raise ExprError(f"SymPy turned part of this expression into a {type(part).__name__}, which the "
                            "compiler does not support")
    return result


def is_matrix(value):
    return isinstance(value, sp.MatrixExpr)


def shape_text(value):
    return "x".join(str(d) for d in value.shape) if is_matrix(value) else "scalar"


def _a(value):
    return f"a {shape_text(value)} matrix" if is_matrix(value) else "a scalar"


class _MatrixBuilder(_Builder):
    def __init__(self, text, names, functions, activations, data):
        super().__init__(text, names, functions)
        self.data = data
        from compiler.core.functions import ACTIVATIONS, _x
        from compiler.core.functions import activation as resolve_activation
        self.x = _x
        # elementwise-only functions: built-in activations that are not scalar functions, then
        # the caller's (which may shadow nothing: spec.py refuses such names)
        self.activations = {k: resolve_activation(k)[0] for k in ACTIVATIONS if k not in functions}
        self.activations.update(activations)

    def _name(self, node):
        if node.id in MATRIX_FUNCTIONS or node.id in self.activations:
            if node.id not in self.names:
                raise ExprError(f"{node.id!r} is a function; call it, e.g. {node.id}(h)", _col(node))
        return super()._name(node)

    def _combine(self, op, a, b, node):
        if not (is_matrix(a) or is_matrix(b)):
            return super()._combine(op, a, b, node)
        sym = _BINOPS[op]
        col = self._after(node.left, sym)
        if op is ast.Pow:
            raise ExprError("powers of matrices are not allowed; for an elementwise square write "
                            "hadamard(a, a)", col)
        if op in (ast.Add, ast.Sub) and not (is_matrix(a) and is_matrix(b)):
            raise ExprError(f"cannot {'add' if op is ast.Add else 'subtract'} {_a(a)} and {_a(b)}: both "
                            f"sides of {sym} must be matrices of one shape", col)
        if op is ast.Div:
            if is_matrix(b):
                raise ExprError(f"cannot divide by a matrix ({shape_text(b)}); only by a scalar", col)
            if b.is_zero:
                raise ExprError("division by zero", col)
        try:
            if op is ast.Add:
                r = a + b
            elif op is ast.Sub:
                r = a - b
            elif op is ast.Mult:
                r = a * b
            else:
                r = a / b
        except SympyShapeError:
            if op is ast.Mult:
                hint = ("; a 1x1 matrix is not a scalar: declare a scalar in [matrix].scalars"
                        if (1, 1) in (a.shape, b.shape) else "")
                raise ExprError(f"shape mismatch: cannot multiply a {shape_text(a)} matrix by a "
                                f"{shape_text(b)} matrix (inner sizes {a.shape[1]} and {b.shape[0]} differ)"
                                f"{hint}", col) from None
            raise ExprError(f"shape mismatch: cannot {'add' if op is ast.Add else 'subtract'} a "
                            f"{shape_text(a)} matrix and a {shape_text(b)} matrix", col) from None
        except (TypeError, ValueError, ArithmeticError) as e:
            raise ExprError(f"cannot evaluate {sym}: {e}", col) from None
        if isinstance(r, ZeroMatrix):
            raise ExprError(f"this {sym} gives a zero matrix; it carries no gradient", col)
        _no_power(r, col)
        if op is ast.Mult and is_matrix(a) and is_matrix(b) and 1 not in r.shape and (1, 1) not in (a.shape, b.shape) \
                and (self._batched(a) or self._batched(b)):
            raise ExprError(f"per sample, this product is a {shape_text(r)} matrix; data are batched by sample, "
                            "so a product involving data must give a vector or a 1x1 per sample", col)
        return self._checked(r, node)

    def _batched(self, value):
        return bool(self.data) and not self.data.isdisjoint(value.atoms(sp.MatrixSymbol))

    def _call(self, node):
        if not (isinstance(node.func, ast.Name) and (node.func.id in MATRIX_FUNCTIONS
                                                      or node.func.id in self.activations
                                                      or node.func.id in self.functions)):
            if isinstance(node.func, ast.Name) and node.func.id not in self.names:
                known = sorted({*self.functions, *MATRIX_FUNCTIONS, *self.activations})
                raise ExprError(f"unknown function {node.func.id!r}; allowed: {', '.join(known)}", _col(node))
            return super()._call(node)      # its refusals: attributes, calls of symbols, ...
        name = node.func.id
        if node.keywords:
            raise ExprError(f"keyword arguments are not allowed (in the call of {name})", _col(node.keywords[0]))
        if not node.args:
            raise ExprError(f"{name}() needs an argument", _col(node))
        args = [self.build(a) for a in node.args]
        mats = [i for i, a in enumerate(args) if is_matrix(a)]
        if name in TRANSPOSE:
            if len(args) != 1 or not mats:
                raise ExprError(f"{name}() transposes one matrix; got {len(args)} argument(s) of shape(s) "
                                f"{', '.join(shape_text(a) for a in args)}", _col(node))
            return self._checked(args[0].T, node)
        if name == HADAMARD:
            if len(args) < 2 or len(mats) != len(args):
                raise ExprError(f"hadamard() multiplies two or more matrices elementwise; got "
                                f"{', '.join(shape_text(a) for a in args)}", _col(node))
            shapes = {a.shape for a in args}
            if len(shapes) > 1:
                raise ExprError(f"shape mismatch: hadamard() of matrices of shapes "
                                f"{', '.join(shape_text(a) for a in args)}", _col(node))
            return self._checked(sp.HadamardProduct(*args), node)
        if not mats:
            if name in self.activations:
                if len(args) != 1:
                    raise ExprError(f"{name}() takes one argument, got {len(args)}", _col(node))
                return self._checked(self.activations[name].xreplace({self.x: args[0]}), node)
            return super()._call(node)
        if len(mats) > 1:
            raise ExprError(f"{name}() applies elementwise to one matrix; got {len(mats)} matrices "
                            "(multiply matrices elementwise with hadamard)", _col(node))
        k = mats[0]
        for i, a in enumerate(args):
            if i != k and not (isinstance(a, sp.Basic) and a.is_number):
                raise ExprError(f"when {name}() applies to a matrix, its other arguments must be numbers; "
                                f"argument {i + 1} is {_show(a)}", _col(node.args[i]))
        matrix = args[k]
        if name in self.activations:
            if len(args) != 1:
                raise ExprError(f"{name}() takes one argument, got {len(args)}", _col(node))
            # a Dummy, so that the bound variable never looks like a declared symbol named x
            d = sp.Dummy("x", real=True)
            return self._checked(matrix.applyfunc(sp.Lambda(d, self.activations[name].xreplace({self.x: d}))), node)
        fn = self.functions[name]
        if len(args) == 1:
            return self._checked(matrix.applyfunc(fn), node)   # as the Python API writes it
        d = sp.Dummy("x", real=True)
        try:
            body = fn(*[d if i == k else a for i, a in enumerate(args)])
        except (TypeError, ValueError, ArithmeticError) as e:
            raise ExprError(f"cannot call {name} with {len(args)} argument(s): {e}", _col(node)) from None
        return self._checked(matrix.applyfunc(sp.Lambda(d, body)), node)

    def _checked(self, r, node):
        if is_matrix(r):
            if isinstance(r, ZeroMatrix):
                raise ExprError("this is a zero matrix (e.g. h - h or 0*h); it carries no gradient", _col(node))
            _no_power(r, _col(node))
            return r
        return super()._checked(r, node)


def _no_power(r, col):
    """SymPy's MatMul rewrites hadamard(a, a) as HadamardPower(a, 2); from_matrix_expr compiles
    positive integer powers only: refuse any other one here, with its column, rather than later
    without one."""
    for part in (r, *r.args):
        if isinstance(part, HadamardPower) and not (part.exp.is_Integer and part.exp > 0):
            raise ExprError(f"{part} is a Hadamard power with exponent {part.exp}; the compiler supports "
                            "positive integer exponents only", col)
