"""Parse untrusted expression strings into SymPy objects without ``eval``.

``sympify`` and ``parse_expr`` evaluate Python code, so a spec file could run
``__import__('os').system(...)`` through them. Here the text is parsed by ``ast.parse`` (which
only builds a tree, it runs nothing) and the tree is walked with a whitelist: numbers, names
given by the caller, ``+ - * / **``, unary signs, and calls of the functions a spec may call
(the ``spec_names`` of ``scalar_functions.SCALAR_FUNCTIONS``) with positional arguments. The SymPy objects are built here,
node by node.

Limits are checked before any work that could blow up: the text's length and characters
(ASCII only, so that a Cyrillic 'а' cannot pose as a Latin 'a', and so that Python's NFKC
normalisation of identifiers cannot turn a full-width 'ｘ' into 'x'), the length of number
literals, the tree's depth and size, and the size of every numeric power (``9**9**9``) before
SymPy computes it. Every error is an ``ExprError`` carrying the 1-based column.
"""
from __future__ import annotations

import ast
import math
import unicodedata

import sympy as sp

from compiler.errors import ModelError

MAX_CHARS = 4000        # a hand-written formula; longer text is refused before parsing
MAX_DEPTH = 200         # of the syntax tree (a sum of k terms is k deep)
MAX_NODES = 2000        # of the syntax tree
MAX_DIGITS = 40         # in one number literal
MAX_POWER_BITS = 1100   # |exponent| * log2(base) of a numeric power: beyond float64 range

# names that mean a number; a declared symbol may not reuse them
CONSTANTS = {"pi": sp.pi, "E": sp.E}


class ExprError(ModelError):
    """A rejected expression; ``column`` is 1-based (None when it concerns the whole text)."""

    def __init__(self, message, column=None):
        super().__init__(message)
        self.message = message
        self.column = column


def _functions():
    from compiler.core.scalar_functions import SPEC_FUNCTIONS
    return SPEC_FUNCTIONS


def reserved_names():
    """Names an expression reads as functions or constants (a declared symbol may not use one)."""
    return set(_functions()) | set(CONSTANTS)


def _describe_char(ch):
    name = unicodedata.name(ch, None) or "control character"
    return f"U+{ord(ch):04X} {name}"


def _prescan(text):
    if not isinstance(text, str):
        raise ExprError(f"an expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ExprError(f"expression is {len(text)} characters long; the limit is {MAX_CHARS}")
    if not text.strip():
        raise ExprError("expression is empty")
    for i, ch in enumerate(text):
        if ord(ch) > 126 or (ord(ch) < 32 and ch not in " \t"):
            if ch in "\n\r":
                raise ExprError("expression must be on one line", i + 1)
            raise ExprError(f"character {_describe_char(ch)} is not allowed (only ASCII letters, digits, "
                            "operators and parentheses; names must be plain ASCII)", i + 1)
    # Python refuses overlong integer literals itself, but only after converting; catch them first
    run = 0
    for i, ch in enumerate(text):
        run = run + 1 if (ch.isalnum() or ch in "._") else 0
        if run > MAX_DIGITS and text[i - run + 1].isdigit():
            raise ExprError(f"number literal longer than {MAX_DIGITS} characters", i - run + 2)


def _tree(text):
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        msg = e.msg
        if "nested parentheses" in msg:
            msg = "too many nested parentheses"
        else:
            msg = f"syntax error ({msg})" if msg != "invalid syntax" else "syntax error"
        col = e.offset if e.lineno in (None, 1) else None
        raise ExprError(msg, col) from None
    except (RecursionError, MemoryError):
        raise ExprError("expression is nested too deeply") from None
    # depth and size, iteratively (the tree may be deeper than Python's recursion limit)
    count = 0
    stack = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise ExprError(f"expression is nested more than {MAX_DEPTH} levels deep", _col(node))
        if count > MAX_NODES:
            raise ExprError(f"expression has more than {MAX_NODES} parts", None)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return tree.body


def _col(node):
    off = getattr(node, "col_offset", None)
    return None if off is None else off + 1   # ASCII-only text: byte offset == character offset


_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_REFUSED_BINOPS = {ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.BitXor: "^ (use ** for powers)",
                   ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>"}
_NODE_WORDS = {
    ast.Attribute: "attribute access", ast.Lambda: "a lambda", ast.Subscript: "indexing",
    ast.Compare: "a comparison", ast.BoolOp: "and/or", ast.IfExp: "a conditional expression",
    ast.List: "a list", ast.Tuple: "a tuple", ast.Dict: "a dict", ast.Set: "a set",
    ast.ListComp: "a comprehension", ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator expression", ast.Starred: "a starred argument",
    ast.NamedExpr: "an assignment", ast.JoinedStr: "an f-string", ast.Await: "await",
    ast.Yield: "yield", ast.YieldFrom: "yield", ast.Slice: "a slice",
}


def parse(text, symbols, constants=None):
    """Parse ``text`` into a SymPy expression.

    ``symbols`` maps each name the expression may use to its SymPy symbol; ``constants`` maps
    further names to SymPy numbers. Anything else is an ExprError with a column.
    """
    result = parse_with(_Builder, text, symbols, constants)
    if not isinstance(result, sp.Basic):
        result = sp.sympify(result)  # a plain int/float: sympify of a number never evaluates code
    return result


def parse_with(builder, text, symbols, constants=None, **options):
    """Check ``text`` against the limits, then build it with ``builder`` (a ``_Builder``
    subclass; ``options`` go to its constructor). Columns refer to ``text`` as given."""
    _prescan(text)
    # Python reads leading blanks as an indent; drop them, keep columns true to the original
    stripped = text.lstrip(" \t")
    shift = len(text) - len(stripped)
    names = dict(CONSTANTS)
    names.update(constants or {})
    names.update(symbols)
    try:
        return builder(stripped, names, _functions(), **options).build(_tree(stripped))
    except ExprError as e:
        if e.column is not None:
            e.column += shift
        raise


def parse_constant(text, constants=None):
    """Parse a constant expression (no symbols) into a finite SymPy number."""
    value = parse(text, {}, constants)
    if not value.is_number:
        raise ExprError("a constant must not use symbols")
    try:
        f = float(value.evalf(30))
    except (TypeError, ValueError):
        raise ExprError(f"constant {_show(value)} is not a real number") from None
    if not math.isfinite(f):
        raise ExprError(f"constant {_show(value)} is not finite in float64")
    return value


class _Builder:
    def __init__(self, text, names, functions):
        self.text = text
        self.names = names
        self.functions = functions

    def _after(self, left, symbol):
        """Column of the operator ``symbol`` that follows the sub-expression ``left``."""
        i = self.text.find(symbol, getattr(left, "end_col_offset", 0) or 0)
        return i + 1 if i >= 0 else _col(left)

    def build(self, node):
        kind = type(node)
        if kind is ast.Constant:
            return self._constant(node)
        if kind is ast.Name:
            return self._name(node)
        if kind is ast.UnaryOp:
            arg = self.build(node.operand)
            if isinstance(node.op, ast.USub):
                return self._checked(-arg, node)
            if isinstance(node.op, ast.UAdd):
                return arg
            op = {ast.Not: "not", ast.Invert: "~"}.get(type(node.op), "this operator")
            raise ExprError(f"operator {op} is not allowed", _col(node))
        if kind is ast.BinOp:
            return self._binop(node)
        if kind is ast.Call:
            return self._call(node)
        what = _NODE_WORDS.get(kind, f"a {kind.__name__} expression")
        col = _col(node)
        if kind is ast.Attribute:
            col = self._after(node.value, ".")
        raise ExprError(f"{what} is not allowed in an expression", col)

    def _constant(self, node):
        v = node.value
        if isinstance(v, bool) or v is None or v is Ellipsis:
            raise ExprError(f"{v!r} is not allowed; use a number", _col(node))
        if isinstance(v, (str, bytes)):
            raise ExprError("string literals are not allowed", _col(node))
        if isinstance(v, complex):
            raise ExprError("complex numbers are not allowed", _col(node))
        if isinstance(v, int):
            return sp.Integer(v)
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ExprError("number literal is too large for float64", _col(node))
            return sp.Float(v)
        raise ExprError(f"literal of type {type(v).__name__} is not allowed", _col(node))

    def _name(self, node):
        name = node.id
        if name in self.names:
            return self.names[name]
        if name in self.functions:
            raise ExprError(f"{name!r} is a function; call it, e.g. {name}(x)", _col(node))
        known = ", ".join(sorted(n for n in self.names if n not in CONSTANTS)) or "none"
        raise ExprError(f"undefined name {name!r} (defined here: {known}; constants: pi, E)", _col(node))

    def _binop(self, node):
        op = type(node.op)
        if op not in _BINOPS:
            sym = _REFUSED_BINOPS.get(op, op.__name__)
            raise ExprError(f"operator {sym} is not allowed", self._after(node.left, sym[:1]))
        return self._combine(op, self.build(node.left), self.build(node.right), node)

    def _combine(self, op, a, b, node):
        """``a op b`` for built operands (``op`` an ast operator class in _BINOPS)."""
        if op is ast.Div or op is ast.Pow:
            if op is ast.Div and b.is_zero:
                raise ExprError("division by zero", self._after(node.left, "/"))
            if op is ast.Pow:
                self._check_power(a, b, node)
        try:
            if op is ast.Add:
                r = a + b
            elif op is ast.Sub:
                r = a - b
            elif op is ast.Mult:
                r = a * b
            elif op is ast.Div:
                r = a / b
            else:
                r = a ** b
        except (ArithmeticError, ValueError, TypeError) as e:
            raise ExprError(f"cannot evaluate {_BINOPS[op]}: {e}", self._after(node.left, _BINOPS[op])) from None
        return self._checked(r, node)

    def _check_power(self, base, exp, node):
        col = self._after(node.left, "*")
        if base.is_zero and exp.is_number and exp.is_extended_negative:
            raise ExprError("division by zero (zero to a negative power)", col)
        if not (isinstance(base, sp.Number) and isinstance(exp, sp.Number)):
            return
        # SymPy would compute the power exactly: bound its size first (9**9**9 has 3.7e8 digits)
        b = abs(base)
        if b == 0 or b == 1:
            return
        log2b = abs(_log2(b))
        if abs(float(exp)) * log2b > MAX_POWER_BITS:
            raise ExprError(f"the power {_show(base)}**{_show(exp)} is too large (beyond float64 range)", col)

    def _call(self, node):
        if not isinstance(node.func, ast.Name):
            if isinstance(node.func, ast.Attribute):
                raise ExprError("attribute access is not allowed in an expression",
                                self._after(node.func.value, "."))
            raise ExprError("only calls of named functions are allowed", _col(node))
        name = node.func.id
        fn = self.functions.get(name)
        if fn is None:
            if name in self.names:
                raise ExprError(f"{name!r} is not a function", _col(node))
            raise ExprError(f"unknown function {name!r}; allowed: {', '.join(sorted(self.functions))}",
                            _col(node))
        if node.keywords:
            raise ExprError(f"keyword arguments are not allowed (in the call of {name})",
                            _col(node.keywords[0]))
        if not node.args:
            raise ExprError(f"{name}() needs an argument", _col(node))
        args = [self.build(a) for a in node.args]
        try:
            r = fn(*args)
        except (TypeError, ValueError, ArithmeticError) as e:
            raise ExprError(f"cannot call {name} with {len(args)} argument(s): {e}", _col(node)) from None
        return self._checked(r, node)

    @staticmethod
    def _checked(r, node):
        if isinstance(r, sp.Basic) and r.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
            raise ExprError("the expression is not finite here (division by zero or log(0)?)", _col(node))
        if isinstance(r, sp.Number):
            try:
                ok = math.isfinite(float(r))
            except OverflowError:
                ok = False
            if not ok:
                raise ExprError("number is too large for float64", _col(node))
        elif isinstance(r, sp.Basic) and r.is_number:
            # Evaluated here, bottom-up, while every argument is known to be a float64-sized
            # real: later (in evalf or in the generated code) exp(exp(exp(100))) would hang or
            # be inf.
            real, imag = r.evalf(20).as_real_imag()
            if imag != 0:
                raise ExprError(f"{_show(r)} is not a real number", _col(node))
            try:
                ok = math.isfinite(float(real))
            except (OverflowError, TypeError):
                ok = False
            if not ok:
                raise ExprError(f"{_show(r)} is not finite in float64", _col(node))
        return r


def _show(expr, limit=60):
    text = str(expr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _log2(number):
    """log2 of a positive SymPy number, without computing anything large (math.log2 takes
    Python ints of any size)."""
    if isinstance(number, sp.Rational):
        return math.log2(int(number.p)) - math.log2(int(number.q))
    return math.log2(float(number))
