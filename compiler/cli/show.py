"""Show what the compiler derived for a model: each parameter's gradient as a chain of named
adjoints with shapes, the operation counts before and after simplification, or the forward and
backward graph as Graphviz DOT text (render with: bpc show SPEC --format dot | dot -Tsvg > g.svg).
"""
from __future__ import annotations

from compiler.freetext import dot_string, latex_comment, terminal
from compiler.cli._common import add_spec_argument, load


def add_arguments(parser):
    add_spec_argument(parser)
    parser.add_argument("--param", metavar="NAME", default=None,
                        help="only the gradient of this parameter")
    parser.add_argument("--format", choices=("text", "latex", "dot"), default="text",
                        help="text (default): formulas with shapes and operation counts; latex: the "
                        "gradient formulas as LaTeX; dot: the computational graph for Graphviz")


def run(args):
    from compiler.backends.numpy.module import compile_model
    from compiler.errors import BpcError
    spec = load(args.spec)
    compiled = compile_model(spec.model, dtype=spec.dtype)
    program = compiled.program
    grads = [(p, g) for p, g in program.grads]
    if args.param is not None:
        grads = [(p, g) for p, g in grads if p.name == args.param]
        if not grads:
            known = ", ".join(p.name for p, _ in program.grads)
            raise BpcError(f"{spec.path}: model {spec.model.name!r} has no parameter {args.param!r}; "
                           f"its parameters are: {known}")
    render = {"text": _text, "latex": _latex, "dot": _dot}[args.format]
    print(terminal(render(compiled, grads, whole=args.param is None)))
    return 0


def _rows(rows, indent="  "):
    """Formula lines with their shapes right of them, aligned."""
    width = min(max((len(a) for a, _ in rows), default=0), 72)
    return [f"{indent}{a:<{width}}  {b}".rstrip() for a, b in rows]


def _text(compiled, grads, whole):
    from compiler.core.ir import format_shape
    from compiler.core.formulas import Formulas
    program, model = compiled.program, compiled.model
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
        if model.masks:
            out.append("  dropout:    " + ", ".join(f"{leaf(m)} rate {m.attr('rate')}" for m in model.masks)
                       + " (ones unless training=True)")
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
        out.extend(_stats(compiled.stats))
    return "\n".join(out).rstrip("\n") + "\n"


def _chain(program, grad):
    from compiler.core.ir import topo_order
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


def _latex(compiled, grads, whole):
    from compiler.core.ir import format_shape
    from compiler.core.formulas import Formulas
    fm = Formulas(compiled.program)
    out = [latex_comment(_title(compiled.model)), ""]
    for p, g in grads:
        out.append(f"% gradient of {p.name}, shape {format_shape(p.shape)}")
        out.append(r"\begin{aligned}")
        if g is None:
            out.append(rf"  \frac{{\partial L}}{{\partial {p.name}}} &= 0")
        else:
            lines = [fm.line(n, latex=True).replace(" = ", " &= ", 1) for n in _chain(compiled.program, g)]
            out.append(" \\\\\n".join("  " + line for line in lines))
        out.append(r"\end{aligned}")
        out.append("")
    return "\n".join(out)


def _dot(compiled, grads, whole):
    """The forward (blue) and backward (orange) graph; leaves grey/yellow; gradients doubled."""
    from compiler.core.ir import format_shape, topo_order
    from compiler.core.formulas import Formulas
    program = compiled.program
    fm = Formulas(program)
    outputs = [g for _, g in grads if g is not None]
    roots = [program.prediction, program.loss, *outputs] if whole else outputs
    order = topo_order(roots)
    forward = {n.uid for n in topo_order([program.prediction, program.loss])}
    grad_ids = {g.uid for g in outputs}
    ids = {n.uid: f"n{i}" for i, n in enumerate(order)}
    out = [f"digraph {dot_string(compiled.model.name)} {{",
           f"  label={dot_string(_title(compiled.model))};",
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
