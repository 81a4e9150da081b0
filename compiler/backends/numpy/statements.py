"""The NumPy backend's statement emitter: prints a Program's statements as vectorised NumPy code.

Each op's statement is registered with the op (``compiler.core.ops``, key "numpy") and gets
this emitter, whose methods are the helpers op statements share; elementwise math comes from
``print_numpy`` (with the in-place form below); the module's structure comes from
``templates/numpy_module.py.j2``.
"""
from __future__ import annotations

import re

import sympy as sp

from compiler.core import ir, ops, scalar_functions
from compiler.core.ops.ew import factored, shared_subexpressions
from compiler.core.ir import ARG, N
from compiler.core.ir import format_shape as shape_code
from compiler.core.simplify import use_counts
from compiler.backends.constants import numeric_constants_to_floats
from compiler.backends.numpy.printer import NumpyPrinter, print_numpy


def _per_sample_size(shape):
    """Numbers per sample (the batch axis left out); a symbolic size other than n counts as large."""
    size = 1
    for d in shape:
        if d != N:
            size *= int(d) if isinstance(d, int) or getattr(d, "is_Integer", False) else 10 ** 9
    return size


def _is_call(code):
    """Whether ``code`` is one call ``f(...)``: a name whose parenthesis closes at the very end."""
    m = re.match(r"[A-Za-z_][\w.]*\(", code)
    if not m or not code.endswith(")"):
        return False
    depth = 0
    for i in range(m.end() - 1, len(code)):
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        if depth == 0:
            return i == len(code) - 1
    return False


def _suffix(arg_shape, out_shape):
    if ir.alignment(arg_shape, out_shape) == "left":
        return "[" + ", ".join([":"] * len(arg_shape) + ["None"] * (len(out_shape) - len(arg_shape))) + "]"
    return ""


class NumpyStatements:
    """Prints the statements of one Program."""

    # Elementwise results with at least this many numbers per sample update a dead input in
    # place (``dZ = dH; _dZ_0 = H*H; ...; dZ *= _dZ_0``): at such sizes every temporary is an
    # allocation that glibc returns to the OS and faults back on the next call. Smaller ones keep
    # the one-line form (``dZ = dH*(1 - H*H)``), which reads better and costs no more.
    INPLACE_MIN_SIZE = 32

    def __init__(self, program):
        self.p = program
        self.helpers = set()
        self.begin_function()
        outputs = [*program.predictions, program.loss, *(g for _, g in program.grads if g is not None),
                   *(u for _, u in program.stat_updates)]
        order, self.uses = use_counts(outputs)
        self.users = ir.consumers(order)
        self.outputs = {o.uid for o in outputs}
        self._private = {}

    def begin_function(self, nodes=None):
        """Start the statements of one function (``nodes``: its statements' nodes, in order)."""
        self.needs_dt = False    # whether they refer to the local dt (the inputs' dtype)
        self.order = None if nodes is None else {node.uid: k for k, node in enumerate(nodes)}
        self.current = None      # the node whose statement is being printed (set by the caller)
        self.emitted = set()     # uids of the nodes whose statements it has so far

    def private(self, node):
        """Whether ``node``'s array can never reach the caller: it is not returned, and every
        value that may share its memory (a view of it, an elementwise statement that may update
        it in place, a plain alias) is private too. Such arrays may live in per-thread scratch
        buffers reused from call to call."""
        known = self._private.get(node.uid)
        if known is None:
            known = node.uid not in self.outputs and all(
                self.private(u) for u in self.users.get(node.uid, []) if self._may_share(node, u))
            self._private[node.uid] = known
        return known

    def _may_share(self, x, user):
        """Whether ``user``'s array may be (a view of) ``x``'s."""
        if user.op in _VIEW_OPS:
            return True
        return user.op == "ew" and user.shape == x.shape and (self.uses[x.uid] == 1 or user.attr("expr").is_Symbol)

    def owned(self, node):
        """Whether ``node``'s array is one this function made (a product, an elementwise result,
        ...; or a view or reshaped copy of one), never a parameter, a caller's array or an inline
        expression, and the value's single use anywhere in the program is the statement at
        hand (or its last use in this function: ``last_use``): that statement may overwrite it."""
        if node.uid in self.p.inline or node.shape == ():
            return False
        if self.uses[node.uid] != 1:
            return self.last_use(node)
        if node.op in _VIEW_OPS:
            return self.owned(node.inputs[0])
        if node.op == "ew":
            return not node.attr("expr").is_Symbol
        return node.op in _OWNED_OPS

    def last_use(self, node):
        """Whether the statement at hand is the last in this function to read ``node``, a value
        of several uses that this function made in an array of its own (not a view, an alias or
        an output), no view or inline expression of it is read elsewhere, and the statement's own
        value never reaches the caller: then it may overwrite ``node`` as if it were its single
        use (a GELU's derivative in its forward values' arrays, the softmax adjoint in dA's)."""
        order, cur = self.order, self.current
        if order is None or cur is None or cur.uid not in order or node.uid in self.outputs:
            return False
        # (window_max: its adjoint's statement reads the forward maximum, outside the graph's edges)
        if node.op not in _OWNED_OPS or node.op in ("softmax", "causal_mask", "key_mask", "window_max") or (
                node.op == "ew" and node.attr("expr").is_Symbol):
            return False
        for user in self.users.get(node.uid, []):
            if user.op in _VIEW_OPS or user.op in ("causal_mask", "key_mask") or (
                    user.op == "ew" and user.attr("expr").is_Symbol and user.uid not in self.p.inline):
                return False     # an alias of its array
            if any(k > order[cur.uid] for k in self._reads(user, order)):
                return False
        return self.private(cur)

    def _reads(self, user, order):
        """Positions in this function of the statements that evaluate ``user``: its own, or for an
        inline expression those of the statements it is written into."""
        if user.uid not in self.p.inline and not self._deferred(user):
            return [order[user.uid]] if user.uid in order else []
        return [k for u in self.users.get(user.uid, []) for k in self._reads(u, order)]

    def _deferred(self, node):
        """Whether ``node``'s statement does not compute it, and the statements of its users read
        its operands instead: an im2col that is not formed (each product with it reads the
        image), a product that its col2im computes (a transposed convolution)."""
        from compiler.core.ops.windows import convolved, fused_product
        if node.op == "im2col":
            return convolved(self, node)
        if node.op == "matmul":
            users = self.users.get(node.uid, [])
            return len(users) == 1 and users[0].op == "col2im" and fused_product(self, users[0]) is node
        return False

    def scratch(self, name, shape, operands):
        """``_scratch(name, shape, *operands)``: the call that returns this thread's reusable
        array for ``name`` with the dtype of an operation on ``operands``."""
        self.helpers.add("scratch")
        operands = list(dict.fromkeys(operands))
        return f"_scratch({name!r}, {shape_code(shape)}, {', '.join(operands)})"

    def returned(self, name, shape, operands):
        """``_returned(name, shape, *operands)``: the call that returns the array this thread
        returned last time for ``name`` when the caller has let go of it, else a new one (for
        large results written in place: a fresh one is faulted in page by page each call)."""
        self.helpers.add("returned")
        operands = list(dict.fromkeys(operands))
        return f"_returned({name!r}, {shape_code(shape)}, {', '.join(operands)})"

    # -- operands -----------------------------------------------------------------------
    def name(self, node):
        return self.p.names[node.uid]

    def ref(self, node, bare=False):
        """Code for using ``node`` as an operand (``bare``: as a whole function argument)."""
        if node.uid in self.p.inline:
            if not node.inputs:
                return self._fill(node)
            code = self._ew_code(node)
            return code if bare else "(" + code + ")"
        return self.name(node)

    def _fill(self, node):
        value, helpers = print_numpy(node.attr("expr"), {})
        self.helpers |= helpers
        if node.shape == ():
            return value
        self.needs_dt = True
        return f"np.full({shape_code(node.shape)}, {value}, dtype=dt)"

    def _ew_code(self, node):
        symbols = {}
        for i, inp in enumerate(node.inputs):
            symbols[ARG[i]] = self.ref(inp) + _suffix(inp.shape, node.shape)
        code, helpers = print_numpy(factored(node.attr("expr")), symbols)
        self.helpers |= helpers
        return self._materialise(node, code)

    def _materialise(self, node, code):
        """Full-shape array of an elementwise result whose inputs do not span its shape."""
        if ir.covered([i.shape for i in node.inputs], node.shape):
            return code
        self.needs_dt = True
        return f"np.full({shape_code(node.shape)}, {code}, dtype=dt)"

    # -- helpers of the op records' statements (compiler.core.ops) --------------------------
    @staticmethod
    def shape_code(shape):
        return shape_code(shape)

    def large(self, node):
        """Whether ``node`` has enough numbers per sample to be worth a reused buffer."""
        return _per_sample_size(node.shape) >= self.INPLACE_MIN_SIZE

    def product_terms(self, node):
        """``(coefficient code, [operand codes])`` when ``node`` is an inline elementwise value
        ``c*a*b`` (or ``c*a**2``, or ``c*a``) of full-shape arrays and a number ``c`` (None
        when it is 1): a sum of it needs no array of the product (``np.einsum``). Else None."""
        if node.op != "ew" or node.uid not in self.p.inline:
            return None
        coeff, factors = factored(node.attr("expr")).as_coeff_mul()
        args = {ARG[i]: inp for i, inp in enumerate(node.inputs)}
        operands = []
        for f in factors:
            base, power = f.as_base_exp()
            if base not in args or power not in (1, 2):
                return None
            inp = args[base]
            if inp.shape != node.shape or inp.uid in self.p.inline:
                return None
            operands += [self.name(inp)] * int(power)
        if not 1 <= len(operands) <= 2 or not coeff.is_number:
            return None
        code = None
        if coeff != 1:
            code, helpers = print_numpy(coeff, {})
            self.helpers |= helpers
        return code, operands

    def constant(self, node):
        """Code of an inline constant's value."""
        value, helpers = print_numpy(node.attr("expr"), {})
        self.helpers |= helpers
        return value

    def computed(self, node):
        """Whether ``node`` is surely an ndarray: a value this function computed, or an inlined
        expression over a batch array (not a caller's value, which may be a list or a Python
        number). Then its methods can be called, which skips the Python-level wrappers of
        np.sum/np.mean (1-2 us a call, a tenth of a small network's step)."""
        if node.uid in self.p.inline:
            return node.op == "ew" and N in node.shape and any(N in i.shape for i in node.inputs)
        return node.op not in ("input", "param")

    def method_target(self, node):
        """``node`` as the object of a method call: a name, a call, or a parenthesised expression."""
        code = self.ref(node, bare=True)
        return code if _ATOM.fullmatch(code) or _is_call(code) else f"({code})"

    # -- statements: lists of code lines ---------------------------------------------------
    def statement(self, node):
        return ops.statement("numpy", node)(self, node)

    def elementwise(self, node):
        out = self.name(node)
        if not node.inputs:
            return [f"{out} = {self._fill(node)}" if node.shape else f"{out} = np.asarray({self._fill(node)}, dtype=dt)"]
        expr = factored(node.attr("expr"))
        reps, body = shared_subexpressions(numeric_constants_to_floats(expr))
        symbols = {ARG[i]: self.ref(inp) + _suffix(inp.shape, node.shape) for i, inp in enumerate(node.inputs)}
        if not reps and node.shape != () and self.large(node):
            lines = InPlace(self, node, out, symbols).cached_lines(body)
            if lines is not None:
                return lines
        lines = []
        for k, (sym, sub) in enumerate(reps):
            tmp = f"_{out}_{k}"
            code, h = print_numpy(sub, symbols)
            self.helpers |= h
            lines.append(f"{tmp} = {code}")
            symbols[sym] = tmp
        code, h = print_numpy(body, symbols)
        self.helpers |= h
        lines.append(f"{out} = {self._materialise(node, code)}")
        return lines


# ---- elementwise statements as in-place ufunc calls ---------------------------------------

_BINARY = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}
# ops whose statement gives a fresh array (or updates an owned input in place)
_OWNED_OPS = ("matmul", "bmm", "ew", "xent_grad", "softmax", "causal_mask", "key_mask", "col2im")
_VIEW_OPS = ("reshape", "permute", "transpose")   # a view of their input (reshape: or a copy)
_NAME = re.compile(r"[A-Za-z_]\w*")
_NUMBER = re.compile(r"-?\d+(\.\d*)?(e-?\d+)?(/\d+)?")
_ATOM = re.compile(r"[A-Za-z_][\w.]*|\d+(\.\d*)?(e-?\d+)?")


class InPlace:
    """Prints one elementwise statement as NumPy ufunc calls that write into buffers (``out=``),
    so a statement allocates at most one temporary instead of one per operation.

    A statement may overwrite an input array when this function made it (a matrix product,
    another elementwise result, a softmax, a mask, or a reshape or permutation of one; never a
    parameter, a user's array or a view of one), it has the statement's shape, and the statement
    is its only use anywhere in the program (so it is dead afterwards in every function that
    computes it: ``NumpyStatements.owned``). Without such an input, a statement of several
    operations computes them all in its result's array; the result itself is a scratch array
    when it never reaches the caller (``NumpyStatements.private``). Values of smaller shapes
    (biases, per-row scalars, constants) stay ordinary expressions. ``lines`` returns None for
    a single operation on inputs it may not overwrite: the one-line form allocates no more.
    """

    def __init__(self, st, node, out, symbols):
        self.st, self.node, self.out = st, node, out
        self.full, self.reusable, self.table = set(), set(), {}
        for i, inp in enumerate(node.inputs):
            code = symbols[ARG[i]]
            sym = sp.Symbol(code, real=True)
            self.table[ARG[i]] = sym
            if inp.shape != node.shape or inp.uid in st.p.inline:
                continue
            self.full.add(sym)
            if st.owned(inp):
                self.reusable.add(sym)
        self.ops = []   # (kind, payload, operands): operands are ("sym", name) | ("val", k) | ("code", s) | ("gt0", operand)

    _memo = {}

    def cached_lines(self, expr):
        """``lines(expr)``, memoised over what it depends on: the same value printed by several
        functions (forward, backward, per_example_grads, hvp, gnvp each compute the forward
        pass) over the same names, inputs it may overwrite and scratch choice gives the same lines."""
        st = self.st
        key = (expr, tuple(self.table.items()), self.node.shape, self.out, frozenset(self.full),
               frozenset(self.reusable), st.private(self.node))
        hit = InPlace._memo.get(key)
        if hit is None:
            # every helper these lines need (not only those new to this module)
            kept, st.helpers = st.helpers, set()
            try:
                lines = self.lines(expr)
                hit = (tuple(lines) if lines is not None else None, frozenset(st.helpers))
            finally:
                st.helpers = kept | st.helpers
            if len(InPlace._memo) >= 1 << 15:
                InPlace._memo.clear()
            InPlace._memo[key] = hit
        lines, helpers = hit
        st.helpers |= helpers
        return list(lines) if lines is not None else None

    # -- pass 1: lower the expression tree to operations on whole arrays ------------------------
    def lines(self, expr):
        expr = expr.xreplace(self.table)
        if not (expr.free_symbols & self.full):
            return None
        try:
            top = self._lower(expr)
        except _Plain:
            return None
        if top[0] != "val" or not (expr.free_symbols & self.reusable or len(self.ops) > 1):
            return None   # one operation and no input to reuse: the one-line form allocates no more
        return self._emit()

    def _is_full(self, e):
        return bool(e.free_symbols & self.full)

    def _code(self, e):
        p = NumpyPrinter({s: s.name for s in e.free_symbols})
        code = p.doprint(e)
        self.st.helpers |= p.helpers
        return ("code", code)

    def _op(self, kind, payload, *operands):
        self.ops.append((kind, payload, operands))
        return ("val", len(self.ops) - 1)

    def _lower(self, e):
        if not self._is_full(e):
            return self._code(e)
        if e.is_Symbol:
            return ("sym", e.name)
        if e.is_Add:
            return self._lower_add(e)
        if e.is_Mul:
            return self._lower_mul(e)
        if e.is_Pow:
            return self._lower_pow(e)
        f = scalar_functions.lookup(e)
        if f is not None and f.numpy_in_place and len(e.args) == 1:
            return self._op("call", f.numpy_in_place, self._lower(e.args[0]))
        return self._fallback(e)

    def _fallback(self, e):
        reads = tuple(("sym", s.name) for s in sorted(e.free_symbols & self.full, key=str))
        return self._op("expr", self._code(e)[1], *reads)

    def _lower_add(self, e):
        small = sp.Add(*[t for t in e.args if not self._is_full(t)])
        pos, neg = [], []
        for t in e.args:
            if self._is_full(t):
                (neg if t.could_extract_minus_sign() else pos).append(t)
        if pos:
            v = self._lower(pos[0])
            for t in pos[1:]:
                v = self._op("bin", "add", v, self._lower(t))
            if small != 0:
                v = self._op("bin", "add", v, self._code(small))
        elif small != 0:
            v = self._op("bin", "subtract", self._code(small), self._lower(-neg[0]))
            neg = neg[1:]
        else:
            v = self._op("call", "np.negative({0}{out})", self._lower(-neg[0]))
            neg = neg[1:]
        for t in neg:
            v = self._op("bin", "subtract", v, self._lower(-t))
        return v

    def _lower_mul(self, e):
        coeff, factors = e.as_coeff_mul()
        num, den, steps, small = [], [], [], [coeff]
        for f in factors:
            if not self._is_full(f):
                small.append(f)
            elif type(f).__name__ == "step":
                steps.append(f)
            elif f.is_Pow and f.exp.is_Integer and f.exp < 0:
                den.append(f.base ** -f.exp)
            else:
                num.append(f)
        if not num:
            raise _Plain   # e.g. a lone step(x)*c: the one-line form keeps the dtype right
        num, small = self._distribute(num, small)
        v = self._lower(num[0])
        for f in num[1:]:
            v = self._op("bin", "multiply", v, self._lower(f))
        for f in steps:
            v = self._op("bin", "multiply", v, ("gt0", self._lower(f.args[0])))
        m = sp.Mul(*small)
        if m != 1:
            v = self._op("bin", "multiply", v, self._code(m))
        for f in den:
            v = self._op("bin", "divide", v, self._lower(f))
        return v

    def _distribute(self, num, small):
        """A number c times a sum whose every array term already has a number of its own
        (``c*x*(a*x**2 + b)``): ``x*(c*a*x**2 + c*b)``, one pass over the arrays fewer. Sums
        with a bare array term (``c*(x + 1)``) stay: there it would cost a pass more."""
        c = sp.Mul(*small)
        if not c.is_Number or c == 1:
            return num, small
        for i, f in enumerate(num):
            if f.is_Add and all(abs(t.as_coeff_Mul()[0]) != 1 for t in f.args if self._is_full(t)):
                return num[:i] + [sp.Add(*[c * t for t in f.args])] + num[i + 1:], [sp.Integer(1)]
        return num, small

    def _lower_pow(self, e):
        base, ex = e.as_base_exp()
        if base == sp.E:
            return self._op("call", "np.exp({0}{out})", self._lower(ex))
        if ex.is_Integer and 2 <= abs(int(ex)) <= 4:
            b = self._lower(base)
            v = self._op("bin", "multiply", b, b)
            for _ in range(abs(int(ex)) - 2):
                v = self._op("bin", "multiply", v, b)
            return v if ex > 0 else self._op("bin", "divide", ("code", "1.0"), v)
        if ex == -1:
            return self._op("bin", "divide", ("code", "1.0"), self._lower(base))
        if abs(ex) == sp.Rational(1, 2):
            v = self._op("call", "np.sqrt({0}{out})", self._lower(base))
            return v if ex > 0 else self._op("bin", "divide", ("code", "1.0"), v)
        return self._fallback(e)

    # -- pass 2: choose buffers by liveness and print -------------------------------------------
    def _emit(self):
        last = {}   # operand -> index of the last op reading it

        def reads(operand):
            if operand[0] == "gt0":
                return reads(operand[1])
            return [operand] if operand[0] in ("sym", "val") else []

        for k, (_, _, operands) in enumerate(self.ops):
            for o in operands:
                for r in reads(o):
                    last[r] = k
        # buffers: ("in", name) for a reusable input, ("tmp", i) for an array this statement allocates
        buf = {("sym", s.name): ("in", s.name) for s in self.reusable}   # operand -> its buffer
        holder = {}   # buffer -> operand whose value it holds now
        plan, temps = [], 0
        for k, (kind, payload, operands) in enumerate(self.ops):
            dest = None
            if kind != "expr":
                candidates = [r for o in operands for r in reads(o)]
                candidates += [holder[b] for b in sorted(holder) if holder[b] not in candidates]
                candidates += [("sym", s.name) for s in sorted(self.reusable, key=str)]
                for c in candidates:
                    b = buf.get(c)
                    if b is not None and last.get(c, -1) <= k and holder.get(b, c) == c:
                        dest = b
                        break
            new = dest is None
            if new:
                dest = ("tmp", temps)
                temps += 1
            plan.append((kind, payload, operands, dest, new))
            holder[dest] = ("val", k)   # once this value is dead, a later op may reuse the buffer
            buf[("val", k)] = dest
        result = plan[-1][3]
        if result[0] == "tmp" and plan[0][3] != result:
            return None   # the first line must bind the statement's name (its comment is above it)
        names = {result: self.out}
        for kind, payload, operands, dest, new in plan:
            if dest not in names:
                # a reused input keeps its own name (it is dead after this statement); only
                # temporaries get new ones
                names[dest] = dest[1] if dest[0] == "in" else f"_{self.out}_{len(names) - 1}"

        def show(o):
            if o[0] == "sym":
                return names.get(buf.get(o), o[1])
            if o[0] == "val":
                return names[buf[o]]
            if o[0] == "gt0":
                return f"({show(o[1])} > 0.0)"
            return o[1]

        lines = [f"{self.out} = {result[1]}"] if result[0] == "in" else []
        for kind, payload, operands, dest, new in plan:
            args = [show(o) for o in operands]
            d = names[dest]
            if new:
                lines.append(f"{d} = {self._print(kind, payload, args, self._scratch(kind, operands, args, d))}")
            elif kind == "bin" and args[0] == d:
                lines.append(f"{d} {_BINARY[payload]}= {args[1]}")
            elif kind == "bin" and args[1] == d and payload in ("add", "multiply"):
                lines.append(f"{d} {_BINARY[payload]}= {args[0]}")
            else:
                lines.append(self._print(kind, payload, args, d))
        return lines

    def _scratch(self, kind, operands, args, name):
        """The out= buffer of a new temporary: a scratch array when its dtype follows from
        array names and number literals alone; None (a plain allocation) otherwise."""
        if kind == "expr" or (name == self.out and not self.st.private(self.node)):
            return None
        arrays = []
        for o, a in zip(operands, args):
            if o[0] in ("sym", "val") or (o[0] == "code" and _NAME.fullmatch(a)):
                arrays.append(a)
            elif not (o[0] == "code" and _NUMBER.fullmatch(a)):
                return None
        return self.st.scratch(name, self.node.shape, arrays)

    @staticmethod
    def _print(kind, payload, names, dest):
        out = f", out={dest}" if dest else ""
        if kind == "expr":
            return payload
        if kind == "call":
            return payload.format(names[0], out=out)
        if dest:
            return f"np.{payload}({names[0]}, {names[1]}{out})"
        a, b = (n if _ATOM.fullmatch(n) or n.startswith("(") and n.endswith(")") else f"({n})" for n in names)
        op = _BINARY[payload]
        return f"{a} {op} {b}" if op in "+-" else f"{a}{op}{b}"


class _Plain(Exception):
    """Raised while lowering when the plain one-line form is the better choice."""
