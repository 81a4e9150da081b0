"""What the compiler derived for a model, for people: each parameter's gradient as a chain of
named adjoints with shapes and the operation counts (text), the chains as LaTeX, or the forward
and backward graph as Graphviz DOT. ``bpc show`` prints these, and so do a compiled model's
``show()``, ``_repr_latex_()`` (Jupyter) and one-line ``repr`` (the Displayed mixin of
CompiledModule and CompiledC), so every view is rendered once, here.
"""
from __future__ import annotations

from typing import TextIO

from compiler.core.formulas import Formulas, latex_name
from compiler.core.ir import format_shape, topo_order
from compiler.errors import BpcError
from compiler.freetext import dot_string, latex_comment, terminal

FORMATS = ("text", "latex", "dot")


def gradients(model, program, param=None):
    """``[(param node, gradient node or None)]`` of every parameter, or of ``param`` alone
    (a BpcError naming the parameters if the model has none of that name)."""
    grads = list(program.grads)
    if param is None:
        return grads
    chosen = [(p, g) for p, g in grads if p.name == param]
    if not chosen:
        known = ", ".join(p.name for p, _ in grads)
        raise BpcError(f"model {model.name!r} has no parameter {param!r}; its parameters are: {known}")
    return chosen


def render(model, program, format="text", param=None, hvp=False):
    """The text of ``bpc show`` (format "text", "latex" or "dot") for all parameters or one;
    ``hvp``: the Hessian-vector (and Gauss-Newton-vector) products' formulas instead."""
    if format not in FORMATS:
        raise BpcError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    grads = gradients(model, program, param)
    if hvp:
        if format == "dot":
            raise BpcError("--hvp prints formulas: use --format text or latex")
        return _second_order(model, program, [p for p, _ in grads], latex=format == "latex")
    renderer = {"text": _text, "latex": _latex, "dot": _dot}[format]
    return renderer(model, program, grads, whole=param is None)


def _rows(rows, indent="  "):
    """Formula lines with their shapes right of them, aligned."""
    width = min(max((len(a) for a, _ in rows), default=0), 72)
    return [f"{indent}{a:<{width}}  {b}".rstrip() for a, b in rows]


def _text(model, program, grads, whole):
    fm = Formulas(program)
    out = []
    if whole:
        out.append(f"model {model.name}  (from {terminal(model.source)})")
        if model.description:
            out.extend("  " + line for line in terminal(model.description).split("\n"))
        leaf = lambda n: f"{n.name} {format_shape(n.shape)}"   # noqa: E731
        out.append("  inputs:     " + ", ".join(leaf(x) for x in model.inputs))
        out.append("  targets:    " + ", ".join(f"{leaf(y)} {y.attr('kind')}" for y in model.targets))
        out.append("  parameters: " + ", ".join(leaf(p) for p in model.params))
        if program.heads:
            out.append("  outputs:    " + ", ".join(
                f"{h.name} = {program.names.get(node.uid, node.name)} {format_shape(node.shape)} ({h.loss_kind}, "
                f"target {h.target.name})" for h, node in zip(model.heads, program.heads))
                + " (forward returns this tuple)")
        if model.masks:
            out.append("  dropout:    " + ", ".join(f"{leaf(m)} rate {m.attr('rate')}" for m in model.masks)
                       + " (ones unless training=True)")
        if model.stats:
            out.append("  batchnorm:  " + ", ".join(leaf(s) for s, _ in model.stats)
                       + f" (running statistics, the stats argument; {model.mode.name} is 1 if training=True, else 0)")
        out.append("  (n is the batch size)")
        out.append("")
        out.append("forward:")
        seen, rows = set(), []
        for node in (*program.forward_nodes, *program.loss_nodes):
            if node.uid not in seen:
                seen.add(node.uid)
                rows.append((fm.line(node), format_shape(node.shape)))
        out.extend(_rows(rows))
        out.append("")
    for p, g in grads:
        out.append(f"gradient of {p.name}, shape {format_shape(p.shape)}:")
        if g is None:
            out.append(f"  d{p.name} = 0   (the loss does not depend on {p.name})")
        else:
            out.extend(_rows([(fm.line(n), format_shape(n.shape)) for n in _chain(program, g)]))
        out.append("")
    if whole:
        out.extend(_stats(program.stats))
    return "\n".join(out).rstrip("\n") + "\n"


def _second_order(model, program, params, latex):
    """Each parameter's Hessian-vector product Hv (and Gauss-Newton-vector product Gv) as the
    chain of tangent statements after backward's: t<name> is the tangent of <name> along the
    direction v (v_<param>), forward values and adjoints reused."""
    chosen = {p.uid for p in params}
    out = [latex_comment(_title(model)) if latex else _title(model),
           ("% " if latex else "") + "direction v: v_<param>, shaped like <param>; t<name>: the tangent of <name> along v", ""]
    for so, what in ((program.hvp, "Hessian-vector product"), (program.gnvp, "Gauss-Newton-vector product J^T H_loss J v")):
        if so is None:
            out.append(("% " if latex else "") + f"(no {what.split(' J')[0]}: the loss is not a built-in one)")
            continue
        view = program.view(so)
        fm = Formulas(view)
        for p, h in so.products:
            if p.uid not in chosen:
                continue
            head = f"{what} for {p.name}, shape {format_shape(p.shape)}"
            if h is None:
                out += [("% " if latex else "") + head + ": 0", ""]
                continue
            if latex:
                out += [f"% {head}", r"\begin{aligned}",
                        " \\\\\n".join("  " + line.replace(" = ", " &= ", 1) for line in fm.chain(h, latex=True)),
                        r"\end{aligned}", ""]
            else:
                nodes = [n for n in topo_order([h]) if n.uid in so.only and n.uid not in so.inline]
                out += [head + ":"] + _rows([(fm.line(n), format_shape(n.shape)) for n in nodes]) + [""]
    return "\n".join(out).rstrip("\n") + "\n"


def _chain(program, grad):
    return [n for n in topo_order([grad]) if n.uid in program.backward_only and n.uid not in program.inline]


def _stats(stats):
    before, after = stats["before_simplification"], stats["after_simplification"]
    ops = sorted(set(before["tensor_ops"]) | set(after["tensor_ops"]))
    rows = [(op, before["tensor_ops"].get(op, 0), after["tensor_ops"].get(op, 0)) for op in ops]
    rows.append(("all tensor operations", before["total_tensor_ops"], after["total_tensor_ops"]))
    rows.append(("scalar ops in elementwise nodes", before["scalar_ops_in_elementwise"],
                 after["scalar_ops_in_elementwise"]))
    width = max(len(r[0]) for r in rows)
    out = ["operation counts (loss and gradients):", f"  {'':<{width}}  {'before':>6}  {'after':>6}"]
    out += [f"  {name:<{width}}  {b:>6}  {a:>6}" for name, b, a in rows]
    out.append("  (before: the chain rule's raw output; after: fusion, reuse of forward values and sharing)")
    return out


def zero_gradient_latex(p):
    r"""``\frac{\partial L}{\partial W_{1}} &= 0``: the line of a parameter the loss ignores."""
    return rf"\frac{{\partial L}}{{\partial {latex_name(p.name)}}} &= 0"


def latex_lines(program, grads, fm=None):
    """The aligned lines (``name &= formula``) of the gradients' chains, each line once."""
    fm = fm or Formulas(program)
    lines = []
    for p, g in grads:
        if g is None:
            lines.append(zero_gradient_latex(p))
        else:
            lines.extend(line.replace(" = ", " &= ", 1) for line in fm.chain(g, latex=True))
    return list(dict.fromkeys(lines))


def _latex(model, program, grads, whole):
    fm = Formulas(program)
    out = [latex_comment(_title(model)), ""]
    for p, g in grads:
        out.append(f"% gradient of {p.name}, shape {format_shape(p.shape)}")
        out.append(r"\begin{aligned}")
        out.append(" \\\\\n".join("  " + line for line in latex_lines(program, [(p, g)], fm)))
        out.append(r"\end{aligned}")
        out.append("")
    return "\n".join(out)


def _dot(model, program, grads, whole):
    """The forward (blue) and backward (orange) graph; leaves grey/yellow; gradients doubled."""
    fm = Formulas(program)
    outputs = [g for _, g in grads if g is not None]
    roots = [*program.predictions, program.loss, *outputs] if whole else outputs
    order = topo_order(roots)
    forward = {n.uid for n in topo_order([*program.predictions, program.loss])}
    grad_ids = {g.uid for g in outputs}
    ids = {n.uid: f"n{i}" for i, n in enumerate(order)}
    out = [f"digraph {dot_string(model.name)} {{",
           f"  label={dot_string(_title(model))};",
           "  labelloc=t;",
           "  rankdir=TB;",
           '  node [fontname="Helvetica", fontsize=10, style=filled];',
           "  edge [color=gray40];"]
    for n in order:
        name = program.names.get(n.uid) or n.name or n.op
        if n.op in ("input", "param"):
            role = "parameter" if n.op == "param" else n.attr("role")
            label = f"{name}\n{role} {format_shape(n.shape)}"
            attrs = ("shape=box, fillcolor=lightyellow" if n.op == "param" else "shape=ellipse, fillcolor=gray90")
        else:
            rhs = fm.rhs(n)
            if len(rhs) > 60:
                rhs = rhs[:57] + "..."
            label = f"{name} = {rhs}\n{format_shape(n.shape)}"
            color = "lightblue" if n.uid in forward else "lightsalmon"
            # dashed: printed inside its single user, not a separate statement
            style = "filled,rounded,dashed" if n.uid in program.inline else "filled,rounded"
            attrs = f"shape=box, style=\"{style}\", fillcolor={color}"
            if n.uid in grad_ids:
                attrs += ", peripheries=2"
        out.append(f"  {ids[n.uid]} [label={dot_string(label)}, {attrs}];")
    for n in order:
        for i in n.inputs:
            out.append(f"  {ids[i.uid]} -> {ids[n.uid]};")
    out.append("}")
    return "\n".join(out) + "\n"


def _title(model):
    """Model name, source and description: free text, escaped by each format's renderer."""
    title = f"model {model.name} (from {model.source})"
    return title + "\n" + model.description if model.description else title


def _sizes(model):
    """``x (784,) -> y (), 235,146 parameters in 6 arrays``: per-sample shapes and the count."""
    def leaf(n):
        return f"{n.name} {format_shape(n.shape[1:])}"
    count = 0
    for p in model.params:
        size = 1
        for d in p.shape:
            size *= int(d)
        count += size
    arrays = len(model.params)
    params = f"{count:,} parameter{'s' if count != 1 else ''} in {arrays} array{'s' if arrays != 1 else ''}"
    return (f"{', '.join(leaf(x) for x in model.inputs)} -> {', '.join(leaf(y) for y in model.targets)}, "
            f"{params}")


class Displayed:
    """How a compiled model shows itself: a one-line ``repr``, the gradient formulas in a
    notebook (``_repr_latex_``) and ``show()``, the Python twin of ``bpc show``. The class using
    it has ``model``, ``program`` and ``dtype`` fields and a ``TARGET`` name."""

    TARGET = ""

    def __repr__(self) -> str:
        dtype = self.dtype or "float32/float64 (follows the inputs)"
        return (f"<{type(self).__name__} {self.model.name!r}: {_sizes(self.model)}; "
                f"dtype {dtype}, target {self.TARGET}>")

    def _repr_latex_(self) -> str:
        lines = latex_lines(self.program, self.program.grads)
        return "$$\\begin{aligned}\n" + " \\\\\n".join("  " + line for line in lines) + "\n\\end{aligned}$$"

    def show(self, param: str | None = None, format: str = "text", file: TextIO | None = None) -> None:
        """Print what ``bpc show`` prints: ``format`` "text" (formulas with shapes and operation
        counts), "latex" (the gradient formulas) or "dot" (the graph, for Graphviz); ``param``:
        only this parameter's gradient. ``file``: where to print (default: sys.stdout)."""
        print(terminal(render(self.model, self.program, format, param)), file=file)
