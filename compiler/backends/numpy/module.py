"""The NumPy renderer: a Lowered model (compiler.backends.lowering) printed as a standalone
NumPy module; CompiledModule writes it atomically and loads it."""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

from compiler import __version__, dtypes
from compiler.backends.cache import cache_dir, load_module, write_cached
from compiler.backends import moments_code
from compiler.backends.lowering import is_tokens, lower, per_sample, statement
from compiler.backends.numpy.printer import print_numpy
from compiler.backends.pause_gc import paused
from compiler.backends.numpy.statements import NumpyStatements, shape_code
from compiler.backends.show import Displayed
from compiler.backends.templates import render
from compiler.core import ir
from compiler.core.formulas import Formulas
from compiler.core.model import Model
from compiler.core.program import Program, direction_arg
from compiler.errors import ModelError
from compiler.files import write_atomic
from compiler.freetext import py_comment

DTYPES = (None, *dtypes.NAMES)     # None: follow the inputs

# hvp and gnvp of more statements than this are printed without a formula comment per statement:
# printing those formulas was a quarter of the time to compile a 12-block transformer (its hvp
# has 3100 statements, gnvp 2700; issue 13, item 8 asks for under 2 s), and nobody reads
# thousands of them in a module: `bpc show --hvp` prints them. Smaller modules keep them.
COMMENTED_SECOND_ORDER_MAX = 1500

HVP_DOC = ("The loss, its gradient and the Hessian-vector product Hv for the direction v (a dict "
           "shaped like params): the gradient differentiated once more along v (forward over reverse).")
GNVP_DOC = ("The loss, its gradient and the Gauss-Newton-vector product J^T H_loss J v for the "
            "direction v (a dict shaped like params): positive semi-definite.")


@dataclass(frozen=True, repr=False)
class CompiledModule(Displayed):
    """The result of compiling a model: generated source plus its formulas and statistics.
    ``repr`` is one line; ``show()`` prints what ``bpc show`` prints; in a notebook it shows
    the gradient formulas."""

    TARGET = "numpy"

    model: Model
    program: Program
    source: str
    formulas: dict[str, str]   # param -> gradient formula chain, text
    latex: dict[str, str]      # param -> gradient formula chain, LaTeX
    source_hash: str
    dtype: str | None          # None: follow the inputs

    @property
    def stats(self) -> dict:
        return self.program.stats

    @property
    def module_name(self) -> str:
        # (the model's hash, and whether the module has hvp: the two variants are two files)
        return f"bpc_{self.model.name}_{self.source_hash[7:19]}" + ("" if self.program.hvp is not None else "_fo")

    def write(self, path: str | os.PathLike) -> Path:
        """Write the module to ``path`` atomically (a failed write leaves no partial file)."""
        return write_atomic(Path(path), self.source)

    def load(self, path: str | os.PathLike | None = None) -> ModuleType:
        """Import the generated module (written to ``path``, or to the bpc cache) and return it."""
        if path is None:
            path = cache_dir() / "numpy" / f"{self.module_name}.py"
            if not path.is_file() or path.read_text() != self.source:
                path = write_cached(path, self.source, "numpy")
        else:
            path = self.write(path)
        return load_module(path, self.module_name)


@paused
def compile_model(model: Model, dtype: str | type | None = None, second_order: bool = True) -> CompiledModule:
    """Compile ``model`` to a standalone NumPy module (returns a CompiledModule).

    ``dtype``: None (follow the inputs' dtype), "float32" or "float64" (cast inputs to it).
    ``second_order``: also emit ``hvp`` and (built-in losses) ``gnvp``; False compiles faster.
    """
    if dtype is not None:
        dtype = str(getattr(dtype, "__name__", dtype))
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be float32 or float64, not {dtype!r}")
    return render_numpy(lower(model, dtype, second_order))


def render_numpy(lowered):
    """The NumPy module of a Lowered model (a CompiledModule)."""
    model, program, dtype, iface = lowered.model, lowered.program, lowered.dtype, lowered.interface
    st = NumpyStatements(program)
    writer = _Functions(lowered, st)
    data, targets = list(model.inputs), list(model.targets)
    grads_ret = []
    for p, g in program.grads:
        grads_ret.append(f"{p.name!r}: {writer.ref(g)}" if g is not None else f"{p.name!r}: np.zeros_like({p.name})")
    functions = [
        writer.function("forward", data, list(program.predictions), program.forward_nodes,
                        ", ".join(writer.ref(p) for p in program.predictions),   # several: a tuple
                        f"Predictions for a batch: {iface.prediction_doc}."),
        writer.function("loss", data + targets, [program.loss], program.loss_nodes,
                        f"float({writer.ref(program.loss)})", "The loss, averaged over the batch."),
        writer.function("backward", data + targets, [program.loss, *(g for _, g in program.grads if g is not None)],
                        program.backward_nodes, f"float({writer.ref(program.loss)}), {{{', '.join(grads_ret)}}}",
                        "The loss and its gradient for every parameter (reverse-mode chain rule).", comments=True),
    ]
    # backward's prologue also binds params whose gradient is zero (np.zeros_like needs them)
    bwd = functions[2]
    bound = set(bwd["prologue"])     # a set: a list scan per parameter is quadratic in their number
    for p, g in program.grads:
        line = f"{p.name} = _param(params, {p.name!r}, {shape_code(p.shape)})"
        if g is None and line not in bound:
            bwd["prologue"].append(line)
            bound.add(line)

    # second order: hvp (and gnvp for the built-in losses), each printed over its own view of
    # the program (its own fusion and inline values); the direction v is a dict like params
    for so, doc in ((program.hvp, HVP_DOC), (program.gnvp, GNVP_DOC)):
        if so is None:
            continue
        view = program.view(so)
        st2 = NumpyStatements(view)
        w2 = _Functions(replace(lowered, program=view, lines=Formulas(view)), st2)
        dirs = dict((p.uid, v) for p, v in program.directions)
        prods = {p.uid: h for p, h in so.products}
        ret_g = [f"{p.name!r}: {w2.ref(g)}" if g is not None else f"{p.name!r}: np.zeros_like({p.name})"
                 for p, g in so.grads]
        ret_h = [f"{p.name!r}: {w2.ref(prods[p.uid])}" if prods[p.uid] is not None else f"{p.name!r}: np.zeros_like({p.name})"
                 for p, _ in so.grads]
        roots = [so.loss, *(g for _, g in so.grads if g is not None), *(h for _, h in so.products if h is not None)]
        fn = w2.function(so.name, data + targets, roots, so.nodes,
                         f"float({w2.ref(so.loss)}), {{{', '.join(ret_g)}}}, {{{', '.join(ret_h)}}}", doc,
                         comments=len(so.nodes) <= COMMENTED_SECOND_ORDER_MAX)
        if len(so.nodes) > COMMENTED_SECOND_ORDER_MAX:
            fn["doc"] += (f"\n    ({len(so.nodes)} statements, printed without formula comments: `bpc show --hvp` "
                          "prints the formulas.)")
        used = {n.uid for n in ir.topo_order(roots)}
        varg = direction_arg(model)
        fn["args"] = f"{varg}, " + fn["args"]
        bound = set(fn["prologue"])
        for p, _ in so.grads:
            line = f"{p.name} = _param(params, {p.name!r}, {shape_code(p.shape)})"
            if line not in bound:
                fn["prologue"].append(line)
                bound.add(line)
            if dirs[p.uid].uid in used:
                fn["prologue"].append(f"{dirs[p.uid].name} = _direction({varg}, {p.name!r}, {shape_code(p.shape)})")
        functions.append(fn)
        st.helpers |= st2.helpers
    functions.append(_per_example_function(lowered, st, data + targets))
    if lowered.moments is not None:
        functions += _moment_functions(lowered.moments, data + targets, st)

    text = render(
        "numpy_module.py.j2",
        model_name=model.name, version=__version__, source=model.source, source_hash=lowered.source_hash,
        loss_kind=iface.loss_kind,
        description=model.description, data_args=iface.data_args,
        all_args=iface.all_args, prediction_doc=iface.prediction_doc,
        dtype=dtype, dtype_doc=(f"inputs are cast to {dtype}" if dtype else
                                "follows the inputs (float32 stays float32; integers become float64)"),
        params_shapes=iface.params_shapes, inputs_shapes=iface.inputs_shapes,
        targets_shapes=iface.targets_shapes, target_kinds=iface.target_kinds, classes=iface.classes,
        formulas=[(p.name, lowered.formulas[p.name]) for p in model.params],
        init_doc=lowered.init_doc, init_lines=list(lowered.init_lines),
        outputs=iface.outputs, output_losses=iface.output_losses, output_targets=iface.output_targets,
        has_labels=iface.has_labels, has_tokens=iface.has_tokens, vocab=iface.vocab, mode_args=iface.mode_args, dropout=iface.dropout,
        has_dropout=iface.has_dropout, stats_shapes=iface.stats_shapes, stats_init=iface.stats_init,
        helpers=sorted(st.helpers), functions=functions, has_gnvp=program.gnvp is not None,
        has_hvp=program.hvp is not None,
        moment_stats=list(lowered.moments.stats) if lowered.moments is not None else None,
    )
    return CompiledModule(model, program, text, lowered.formulas, lowered.latex, lowered.source_hash, dtype)


PER_EXAMPLE_DOC = ("Each sample's loss (batch,) and gradients, each with a leading batch axis (batch,)\n"
                   "    + the parameter's shape: row i is what backward gives for a batch of sample i alone,\n"
                   "    and the mean over rows is backward's gradient. No loop over samples: each batch sum\n"
                   "    of the gradient keeps its batch axis.")


def _per_example_function(lowered, st, leaves):
    """per_example_grads: its statements over the program's per-example view, or (a model whose
    forward mixes samples) a function that raises the reason."""
    program = lowered.program
    if program.per_example is None:
        return {"name": "per_example_grads", "args": ", ".join(x.name for x in leaves) + lowered.interface.mode_args,
                "doc": "Not available for this model: raises NotImplementedError (the reason).",
                "prologue": [], "body": [f"raise NotImplementedError({program.per_example_error!r})"], "ret": None}
    view = program.per_example_view()
    st2 = NumpyStatements(view)
    writer = _Functions(replace(lowered, program=view, lines=Formulas(view)), st2)
    pe = program.per_example
    ret = []
    for p, g in pe.grads:
        if g is None:
            ret.append(f"{p.name!r}: np.zeros((n,) + {shape_code(p.shape)}, dtype={writer.ref(pe.loss)}.dtype)")
        else:
            ret.append(f"{p.name!r}: {writer.ref(g)}")
    fn = writer.function("per_example_grads", leaves, [pe.loss, *(g for _, g in pe.grads if g is not None)],
                         pe.nodes, f"{writer.ref(pe.loss)}, {{{', '.join(ret)}}}", PER_EXAMPLE_DOC, comments=True)
    st.helpers |= st2.helpers
    return fn


def _moment_functions(plan, leaves, st):
    """precompute, loss_from_moments and backward_from_moments (compiler.core.moments)."""
    def printer(e, symbols):
        code, helpers = print_numpy(e, symbols)
        st.helpers |= helpers
        return code

    names = [x.name for x in leaves]
    pro = [f"{x.name} = _data({x.name}, {x.name!r}, ()).reshape(-1).astype(np.float64)" for x in leaves]
    pro.append(f"n = _batch({', '.join(names)})")
    body = []
    for i, d in enumerate(names):
        body += [f"_mean{i} = float(np.mean({d}))", f"_scale{i} = float(np.std({d})) or 1.0"]
    terms = moments_code.product_terms(plan)
    body += [f"_sums = np.zeros({len(terms)})",
             "for _lo in range(0, n, _CHUNK):   # chunks of rows: the powers of a chunk fit in memory"]
    for i, d in enumerate(names):
        top = plan.max_power[i]
        if top:
            body.append(f"    _u{i}_1 = ({d}[_lo:_lo + _CHUNK] - _mean{i}) / _scale{i}")
        for k in range(2, top + 1):
            body.append(f"    _u{i}_{k} = _u{i}_{k - 1} * _u{i}_1")
    prods = ["*".join(f"_u{i}_{k}" for i, k in t) for t in terms]
    body.append("    _sums += (" + ", ".join(f"np.sum({p})" for p in prods) + ("," if len(prods) == 1 else "") + ")")
    ret = ("{" + ", ".join([f"'mean_{d}': _mean{i}" for i, d in enumerate(names)]
                           + [f"'scale_{d}': _scale{i}" for i, d in enumerate(names)]
                           + [f"{name!r}: float(_sums[{j}]) / n" for j, name in enumerate(plan.stats[2 * len(names):])]) + "}")
    pre = {"name": "precompute", "signature": ", ".join(names), "args": "", "prologue": pro, "body": body, "ret": ret,
           "doc": textwrap.fill("The data reduced once to the sufficient statistics of the loss (float64), a dict: "
                                + moments_code.doc(plan) + ". loss_from_moments and backward_from_moments take "
                                "it: their cost does not depend on n.", 92, subsequent_indent="    ")}
    # Python floats: a step is a few hundred scalar operations, which NumPy scalars make 3-5x slower
    bind = [f"{p} = float(_param(params, {p!r}, ()))" for p in plan.params]
    unpack = [", ".join(moments_code.stat_locals(plan).values()) + f"{',' if len(plan.stats) == 1 else ''} = "
              f"_statistics(moments).tolist()"]
    loss_body = moments_code.statements(plan, [plan.loss], printer)
    loss_fn = {"name": "loss_from_moments", "args": "moments", "prologue": bind + unpack, "body": loss_body,
               "ret": f"float({plan.loss.name})",
               "doc": "The loss from precompute's statistics: equal to loss(params, data) on the same data."}
    roots = [plan.loss] + [g for g in plan.grads if g is not None]
    grads = ", ".join(f"{p!r}: np.float64({g.name})" if g is not None else f"{p!r}: np.float64(0.0)"
                      for p, g in zip(plan.params, plan.grads))
    back = {"name": "backward_from_moments", "args": "moments", "prologue": bind + unpack,
            "body": moments_code.statements(plan, roots, printer),
            "ret": f"float({plan.loss.name}), {{{grads}}}",
            "doc": "(loss, grads) from precompute's statistics: equal to backward(params, data) on the same data."}
    st.helpers.add("moments")
    return [pre, loss_fn, back]


class _Functions:
    """Writes the three entry points of one module (template context of each function)."""

    def __init__(self, lowered, st):
        self.lowered, self.st = lowered, st
        self.program, self.model = lowered.program, lowered.model

    def ref(self, node):
        return self.st.ref(node) if node.uid in self.program.names else node.name

    def prologue(self, leaves, roots):
        classes = self.lowered.classes
        lines = []
        for x in leaves:
            if is_tokens(x):
                what = "token ids" if x.attr("kind") == "ids" else "labels"
                lines.append(f"{x.name} = _tokens({x.name}, {x.name!r}, {classes[x.uid]}, "
                             f"{shape_code(per_sample(x))}, {what!r})")
            elif x.attr("kind") == "label":
                lines.append(f"{x.name} = _labels({x.name}, {x.name!r}, {classes[x.uid]})")
            else:
                lines.append(f"{x.name} = _data({x.name}, {x.name!r}, {shape_code(per_sample(x))})")
        lines.append(f"n = _batch({', '.join(x.name for x in leaves)})")
        if self.model.masks:
            # every mask, in DROPOUT's order, in every function: one seed, the same masks
            lines.append("_rng = _dropout_rng(training, seed)")
            lines += [f"{m.name} = _dropout_mask(_rng, n, {shape_code(per_sample(m))}, {m.attr('rate')!r}, "
                      f"{self.dtype_source(leaves)}.dtype)" for m in self.model.masks]
        if self.model.stats:
            lines.append(f"{self.model.mode.name} = _bn_mode(training, stats)")
            lines += [f"{s.name} = _stat(stats, {s.name!r}, {shape_code(s.shape)}, {self.dtype_source(leaves)}.dtype)"
                      for s, _ in self.model.stats]
        used = {node.uid for node in ir.topo_order(roots)}
        return lines, [f"{p.name} = _param(params, {p.name!r}, {shape_code(p.shape)})"
                       for p in self.model.params if p.uid in used]

    def dtype_source(self, leaves):
        """Code of the array whose dtype the computation follows: the first leaf of real
        numbers, else (a model of token ids and labels alone) the first parameter."""
        real = [x for x in leaves if x.attr("kind") not in ("label", "ids")]
        if real or not self.model.params:
            return (real or leaves)[0].name
        p = self.model.params[0]
        return f"_param(params, {p.name!r}, {shape_code(p.shape)})"

    def training_block(self, run):
        """Statements that only training mode needs (batch statistics and their gradients, the
        running statistics' next values), under ``if <training flag>:``; in inference mode their
        values are zeros, which the training flag multiplies wherever they are used."""
        if not run:
            return []
        st = self.st
        st.needs_dt = True
        lines = [f"if {self.program.names[self.model.mode.uid]}:   # training mode only"]
        lines += ["    " + line for _, body in run for line in body]
        # zeros for the values that statements outside the block read (others stay unbound)
        zeros = [node for node, _ in run
                 if any(u.uid not in self.program.training_only for u in st.users.get(node.uid, []))]
        if zeros:
            lines.append("else:")
            lines += [f"    {st.name(node)} = np.zeros({shape_code(node.shape)}, dtype=dt)" for node in zeros]
        return lines

    def function(self, fname, leaves, roots, nodes, ret, doc, comments=False):
        st, fm = self.st, self.lowered.lines
        st.begin_function(nodes)
        body, only = [], []   # only: a run of training-only statements, emitted under one if
        for node in nodes:
            lines = [py_comment(fm.line(node))] if comments and node.uid in self.program.backward_only else []
            st.current = node
            lines += statement(st, fm, node)
            st.emitted.add(node.uid)
            if node.uid in self.program.training_only:
                only.append((node, lines))
                continue
            body += self.training_block(only)
            only = []
            body += lines
        st.current = None
        body += self.training_block(only)
        if self.program.stat_updates:
            # training mode: the running statistics' next values replace the caller's entries
            body.append("if training and stats is not None:")
            body.append("    stats.update({" + ", ".join(f"{s.name!r}: {self.ref(u)}"
                                                 for s, u in self.program.stat_updates) + "})")
        pro, params = self.prologue(leaves, roots)
        if st.needs_dt:
            pro.append(f"dt = {self.dtype_source(leaves)}.dtype")
        return {"name": fname, "args": ", ".join(x.name for x in leaves) + self.lowered.interface.mode_args, "doc": doc,
                "prologue": pro + params, "body": body, "ret": ret}
