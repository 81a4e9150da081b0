"""The NumPy backend: prints a Program's statements as vectorised NumPy code.

Each op has one statement printer (``_stmt_<op>``); elementwise math comes from
``printing.print_numpy``; the module's structure comes from ``templates/numpy_module.py.j2``.
"""
from __future__ import annotations

import sympy as sp

from . import ir
from .ir import ARG, N
from .printing import numeric_constants_to_floats, print_formula, print_latex, print_numpy, latex_name


def shape_code(shape):
    parts = ["n" if d == N else str(d) for d in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _suffix(arg_shape, out_shape):
    if ir.alignment(arg_shape, out_shape) == "left":
        return "[" + ", ".join([":"] * len(arg_shape) + ["None"] * (len(out_shape) - len(arg_shape))) + "]"
    return ""


class NumpyStatements:
    """Prints the statements of one Program."""

    def __init__(self, program):
        self.p = program
        self.helpers = set()
        self.needs_dt = False

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
        code, helpers = print_numpy(sp.factor_terms(node.attr("expr")), symbols)
        self.helpers |= helpers
        return self._materialise(node, code)

    def _materialise(self, node, code):
        """Full-shape array of an elementwise result whose inputs do not span its shape."""
        if ir.covered([i.shape for i in node.inputs], node.shape):
            return code
        self.needs_dt = True
        return f"np.full({shape_code(node.shape)}, {code}, dtype=dt)"

    # -- statements: lists of code lines ---------------------------------------------------
    def statement(self, node):
        return getattr(self, "_stmt_" + node.op)(node, self.name(node))

    def _stmt_ew(self, node, out):
        if not node.inputs:
            return [f"{out} = {self._fill(node)}" if node.shape else f"{out} = np.asarray({self._fill(node)}, dtype=dt)"]
        expr = sp.factor_terms(node.attr("expr"))
        reps, (body,) = sp.cse([numeric_constants_to_floats(expr)],
                               symbols=sp.numbered_symbols("_c"), optimizations=None)
        symbols = {ARG[i]: self.ref(inp) + _suffix(inp.shape, node.shape) for i, inp in enumerate(node.inputs)}
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

    def _stmt_matmul(self, node, out):
        a, b = node.inputs
        ta = ".T" if node.attr("ta") else ""
        tb = ".T" if node.attr("tb") else ""
        return [f"{out} = {self.ref(a)}{ta} @ {self.ref(b)}{tb}"]

    def _stmt_transpose(self, node, out):
        return [f"{out} = {self.ref(node.inputs[0])}.T"]

    def _stmt_reshape(self, node, out):
        return [f"{out} = {self.ref(node.inputs[0])}.reshape({shape_code(node.shape)})"]

    def _stmt_sum(self, node, out):
        x = node.inputs[0]
        axes = node.attr("axes")
        if len(axes) == len(x.shape):
            return [f"{out} = np.sum({self.ref(x, bare=True)})"]
        ax = str(axes[0]) if len(axes) == 1 else str(tuple(axes))
        return [f"{out} = np.sum({self.ref(x, bare=True)}, axis={ax})"]

    def _stmt_mean(self, node, out):
        return [f"{out} = np.mean({self.ref(node.inputs[0], bare=True)})"]

    def _stmt_lse(self, node, out):
        self.helpers.add("logsumexp")
        return [f"{out} = _logsumexp({self.ref(node.inputs[0])})"]

    def _stmt_softmax(self, node, out):
        self.helpers.add("softmax")
        return [f"{out} = _softmax({self.ref(node.inputs[0])})"]

    def _stmt_xent(self, node, out):
        z, l, y = (self.ref(i) for i in node.inputs)
        if node.attr("kind") == "label":
            return [f"{out} = {l} - {z}[np.arange(n), {y}]"]
        return [f"{out} = {l} - np.sum({y} * {z}, axis=1)"]

    def _stmt_xent_grad(self, node, out):
        zn, ln, yn, gn = node.inputs
        z, l, y = self.ref(zn), self.ref(ln), self.ref(yn)
        lines = [f"{out} = np.exp({z} - {l}[:, None])"]
        if node.attr("kind") == "label":
            lines.append(f"{out}[np.arange(n), {y}] -= 1")
        else:
            lines.append(f"{out} -= {y}")
        if gn.uid in self.p.inline and not gn.inputs:
            value, h = print_numpy(gn.attr("expr"), {})
            self.helpers |= h
            if value != "1":
                lines.append(f"{out} *= {value}")
        else:
            lines.append(f"{out} *= {self.ref(gn)}[:, None]")
        return lines


# ---- formulas (text and LaTeX), shared by comments, FORMULAS and `show` ----------------------

class Formulas:
    """Readable right-hand sides of each scheduled node, in text and LaTeX."""

    def __init__(self, program):
        self.p = program

    def _name(self, node, latex):
        n = self.p.names[node.uid]
        return latex_name(n) if latex else n

    def operand(self, node, latex=False, bare=False):
        if node.uid in self.p.inline:
            rhs = self.rhs(node, latex)
            if bare or not node.inputs:
                return rhs
            return r"\left(" + rhs + r"\right)" if latex else "(" + rhs + ")"
        return self._name(node, latex)

    def rhs(self, node, latex=False):
        op = node.op
        ins = node.inputs
        if op == "ew":
            symbols = {ARG[i]: self._sym(inp, latex) for i, inp in enumerate(ins)}
            expr = sp.factor_terms(node.attr("expr"))
            return print_latex(expr, symbols) if latex else print_formula(expr, symbols)
        a = [self.operand(i, latex, bare=op in ("sum", "mean")) for i in ins]
        if op == "matmul":
            ta, tb = node.attr("ta"), node.attr("tb")
            if latex:
                t = "^{\\top}"
                return f"{a[0]}{t if ta else ''} {a[1]}{t if tb else ''}"
            return f"{a[0]}{'.T' if ta else ''} @ {a[1]}{'.T' if tb else ''}"
        if op == "transpose":
            return f"{a[0]}^{{\\top}}" if latex else f"{a[0]}.T"
        if op == "reshape":
            return a[0] if latex else f"reshape({a[0]}, {shape_code(node.shape)})"
        if op == "sum":
            axes = node.attr("axes")
            if len(axes) == len(ins[0].shape):
                return rf"\sum {a[0]}" if latex else f"sum({a[0]})"
            return (rf"\sum_{{\mathrm{{axis}}\,{','.join(map(str, axes))}}} {a[0]}" if latex
                    else f"sum({a[0]}, axis={axes[0] if len(axes) == 1 else axes})")
        if op == "mean":
            return rf"\operatorname{{mean}}\left({a[0]}\right)" if latex else f"mean({a[0]})"
        if op == "lse":
            return rf"\operatorname{{logsumexp}}\left({a[0]}\right)" if latex else f"logsumexp({a[0]}, axis=1)"
        if op == "softmax":
            return rf"\operatorname{{softmax}}\left({a[0]}\right)" if latex else f"softmax({a[0]})"
        if op == "xent":
            if node.attr("kind") == "label":
                return f"{a[1]} - {a[0]}_{{{a[2]}}}" if latex else f"{a[1]} - {a[0]}[{a[2]}]"
            return (rf"{a[1]} - \sum_j {a[2]} \odot {a[0]}" if latex else f"{a[1]} - sum({a[2]}*{a[0]}, axis=1)")
        if op == "xent_grad":
            y = a[2] if node.attr("kind") != "label" else (
                rf"\operatorname{{onehot}}\left({a[2]}\right)" if latex else f"onehot({a[2]})")
            g = ins[3]
            if latex:
                core = rf"\left(\operatorname{{softmax}}\left({a[0]}\right) - {y}\right)"
            else:
                core = f"(softmax({a[0]}) - {y})"
            if g.uid in self.p.inline and not g.inputs:
                val = g.attr("expr")
                if val == 1:
                    return core
                inv = 1 / val
                if inv.is_Symbol or inv.is_Integer or inv.is_Mul:
                    return rf"\frac{{{core}}}{{{sp.latex(inv)}}}" if latex else f"{core}/{inv}"
                return f"{sp.latex(val)} {core}" if latex else f"{core}*{val}"
            return rf"{core} \odot {a[3]}" if latex else f"{core}*{a[3]}[:, None]"
        raise KeyError(op)

    def _sym(self, node, latex):
        if node.uid in self.p.inline:
            return self.operand(node, latex)
        return self._name(node, latex)

    def line(self, node, latex=False):
        return f"{self._name(node, latex)} = {self.rhs(node, latex)}"

    def chain(self, grad, latex=False):
        """The backward statements ``grad`` depends on, in order, as formulas."""
        nodes = [n for n in ir.topo_order([grad]) if n.uid in self.p.backward_only and n.uid not in self.p.inline]
        return [self.line(n, latex) for n in nodes]
