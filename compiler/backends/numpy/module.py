"""Compile a Model: build its Program, render the NumPy module, write it atomically, load it."""
from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import sympy as sp

from compiler import __version__, dtypes
from compiler.core import ir
from compiler.backends.cache import cache_dir, write_cached  # noqa: F401  (cache_dir re-exported for the C backend)
from compiler.errors import ModelError, UnsupportedError
from compiler.freetext import py_comment
from compiler.files import write_atomic  # noqa: F401  (re-exported: the C backend writes through it)
from compiler.backends.numpy.statements import Formulas, NumpyStatements, shape_code
from compiler.backends.numpy.printer import numeric_constants_to_floats
from compiler.core.program import build_program
from compiler.backends.templates import render

DTYPES = (None, *dtypes.NAMES)     # None: follow the inputs


@dataclass(frozen=True)
class CompiledModule:
    """The result of compiling a model: generated source plus its formulas and statistics."""

    model: object
    program: object
    source: str
    formulas: dict       # param -> gradient formula chain, text
    latex: dict          # param -> gradient formula chain, LaTeX
    source_hash: str
    dtype: object

    @property
    def stats(self):
        return self.program.stats

    @property
    def module_name(self):
        return f"bpc_{self.model.name}_{self.source_hash[7:19]}"

    def write(self, path):
        """Write the module to ``path`` atomically (a failed write leaves no partial file)."""
        return write_atomic(Path(path), self.source)

    def load(self, path=None):
        """Import the generated module (written to ``path``, or to the bpc cache) and return it."""
        if path is None:
            path = cache_dir() / "numpy" / f"{self.module_name}.py"
            if not path.is_file() or path.read_text() != self.source:
                path = write_cached(path, self.source, "numpy")
        else:
            path = self.write(path)
        return load_module(path, self.module_name)


def load_module(path, name=None):
    """Import a generated module from a file path (a fresh module object each call)."""
    path = Path(path)
    name = name or "bpc_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def model_hash(model, dtype):
    h = hashlib.sha256()
    # the spec's text, not its path: the same model hashes the same wherever it is compiled from
    for part in (__version__, model.name, str(dtype), model.source_text, model.loss_kind,
                 model.prediction.digest, model.loss.digest,
                 repr(sorted(model.init.items())), repr(sorted(model.names.items())),
                 repr([n.name for n in (*model.inputs, *model.targets, *model.params)])):
        h.update(part.encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def _init_line(name, shape, init):
    kind = init[0]
    target = f"params[{name!r}]"
    if kind == "zeros":
        return f"{target} = np.zeros({shape_code(shape)}, dtype=dtype)"
    if kind == "value":
        if shape:
            return f"{target} = np.full({shape_code(shape)}, {float(init[1])!r}, dtype=dtype)"
        return f"{target} = np.asarray({float(init[1])!r}, dtype=dtype)"
    if kind == "glorot":
        lim = math.sqrt(6.0 / (int(init[1]) + int(init[2])))
        return f"{target} = rng.uniform(-{lim!r}, {lim!r}, size={shape_code(shape)}).astype(dtype)"
    if kind == "he":
        std = math.sqrt(2.0 / int(init[1]))
        return f"{target} = rng.normal(0.0, {std!r}, size={shape_code(shape)}).astype(dtype)"
    raise ModelError(f"unknown initialisation {init!r} for parameter {name!r}")


def _per_sample(node):
    return tuple(node.shape[1:])


def compile_model(model, dtype=None):
    """Compile ``model`` to a standalone NumPy module (returns a CompiledModule).

    ``dtype``: None (follow the inputs' dtype), "float32" or "float64" (cast inputs to it).
    """
    if dtype is not None:
        dtype = str(getattr(dtype, "__name__", dtype))
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be float32 or float64, not {dtype!r}")
    program = build_program(model)
    st = NumpyStatements(program)
    fm = Formulas(program)
    if dtype == "float32":
        _check_float32_constants(program, fm)
    names = program.names

    classes = {}   # target uid -> number of classes, for the targets of softmax losses
    for node in (*program.loss_nodes, *program.backward_nodes):
        if node.op == "xent":
            classes[node.inputs[2].uid] = node.inputs[0].shape[1]

    def prologue(leaves, roots):
        lines = []
        for x in leaves:
            if x.attr("kind") == "label":
                lines.append(f"{x.name} = _labels({x.name}, {x.name!r}, {classes[x.uid]})")
            else:
                lines.append(f"{x.name} = _data({x.name}, {x.name!r}, {shape_code(_per_sample(x))})")
        lines.append(f"n = _batch({', '.join(x.name for x in leaves)})")
        used = {node.uid for node in ir.topo_order(roots)}
        return lines, [f"{p.name} = _param(params, {p.name!r}, {shape_code(p.shape)})"
                       for p in model.params if p.uid in used]

    def function(fname, leaves, roots, nodes, ret, doc, comments=False):
        st.needs_dt = False
        body = []
        for node in nodes:
            if comments and node.uid in program.backward_only:
                body.append(py_comment(fm.line(node)))
            body.extend(statement(st, fm, node))
        pro, params = prologue(leaves, roots)
        if st.needs_dt:
            pro.append(f"dt = {leaves[0].name}.dtype")
        return {"name": fname, "args": ", ".join(x.name for x in leaves), "doc": doc,
                "prologue": pro + params, "body": body, "ret": ret}

    def ref(node):
        return st.ref(node) if node.uid in names else node.name

    data, targets = list(model.inputs), list(model.targets)
    grads_ret = []
    for p, g in program.grads:
        grads_ret.append(f"{p.name!r}: {ref(g)}" if g is not None else f"{p.name!r}: np.zeros_like({p.name})")
    pred_doc = _prediction_doc(model)
    functions = [
        function("forward", data, [program.prediction], program.forward_nodes, ref(program.prediction),
                 f"Predictions for a batch: {pred_doc}."),
        function("loss", data + targets, [program.loss], program.loss_nodes, f"float({ref(program.loss)})",
                 "The loss, averaged over the batch."),
        function("backward", data + targets, [program.loss, *(g for _, g in program.grads if g is not None)],
                 program.backward_nodes,
                 f"float({ref(program.loss)}), {{{', '.join(grads_ret)}}}",
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

    formulas, latex = {}, {}
    for p, g in program.grads:
        if g is None:
            formulas[p.name] = latex[p.name] = "0"
        else:
            formulas[p.name] = "; ".join(fm.chain(g)) or fm.line(g)
            latex[p.name] = r" \\ ".join(fm.chain(g, latex=True)) or fm.line(g, latex=True)

    source_hash = model_hash(model, dtype)
    inits = [_init_line(p.name, p.shape, model.init[p.name]) for p in model.params]
    schemes = sorted({model.init[p.name][0] for p in model.params})
    init_doc = ", ".join({"zeros": "zero biases", "value": "declared values", "glorot": "Glorot-uniform weights",
                          "he": "He-normal weights"}[s] for s in schemes) or "none"
    text = render(
        "numpy_module.py.j2",
        model_name=model.name, version=__version__, source=model.source, source_hash=source_hash,
        loss_kind=model.loss_kind,
        description=model.description, data_args=", ".join(x.name for x in data),
        all_args=", ".join(x.name for x in data + targets), prediction_doc=pred_doc,
        dtype=dtype, dtype_doc=(f"inputs are cast to {dtype}" if dtype else
                                "follows the inputs (float32 stays float32; integers become float64)"),
        params_shapes=_dict_code({p.name: shape_code(p.shape) for p in model.params}),
        inputs_shapes=_dict_code({x.name: shape_code(_per_sample(x)) for x in data}),
        targets_shapes=_dict_code({x.name: shape_code(_per_sample(x)) for x in targets}),
        target_kinds=_dict_code({x.name: repr(x.attr("kind")) for x in targets}),
        classes=_dict_code({x.name: str(classes[x.uid]) for x in targets if x.uid in classes}),
        formulas=[(p.name, formulas[p.name]) for p in model.params],
        init_doc=init_doc, init_lines=inits,
        has_labels=any(x.attr("kind") == "label" for x in targets),
        helpers=sorted(st.helpers), functions=functions,
    )
    return CompiledModule(model, program, text, formulas, latex, source_hash, dtype)


FLOAT32_MAX = 3.4028234663852886e38


def _check_float32_constants(program, fm):
    """A module compiled for float32 computes in float32: NumPy casts a larger literal to inf.
    (Modules that follow the inputs' dtype cannot know it; the C target checks in its printer.)"""
    nodes = {n.uid: n for n in (*program.forward_nodes, *program.loss_nodes, *program.backward_nodes)}
    for n in list(nodes.values()):
        for i in n.inputs:
            if i.uid in program.inline:
                nodes.setdefault(i.uid, i)
    for node in nodes.values():
        if node.op != "ew":
            continue
        for c in numeric_constants_to_floats(node.attr("expr")).atoms(sp.Number):
            if abs(float(c)) > FLOAT32_MAX:
                where = fm.line(node) if node.uid in program.names else fm.rhs(node)
                raise UnsupportedError(f"model {program.model.name!r}: cannot generate {where} for float32: "
                                       f"the constant {float(c):.3g} is beyond float32 range (3.4e38)")


def statement(st, fm, node):
    """``st.statement(node)``; an UnsupportedError names the derived formula it arose in (a
    derivative or a fusion can produce what the model itself does not contain, such as a
    constant beyond float64)."""
    try:
        return st.statement(node)
    except UnsupportedError as e:
        raise UnsupportedError(f"model {st.p.model.name!r}: cannot generate {fm.line(node)}: {e}") from None


def _dict_code(d):
    return "{" + ", ".join(f"{k!r}: {v}" for k, v in d.items()) + "}"


def _prediction_doc(model):
    if model.loss_kind == "softmax_cross_entropy":
        return "class probabilities (softmax of the logits), shape (batch, classes)"
    if model.loss_kind == "bce_with_logits":
        return "probabilities (sigmoid of the logits)"
    return "the model output, shape (batch,) + per-sample output shape"


# used by the other backends, which share initialisation and documentation with this one
init_line = _init_line
prediction_doc = _prediction_doc
