"""The op registry is complete: every op has a constructor, an adjoint rule, a formula in text
and LaTeX, and a statement for every registered backend; every backend covers every op."""
import pytest

from compiler.backends.registry import BACKENDS
from compiler.core import ir, ops
from compiler.core.adjoints import RULES


def missing(registry, backends):
    """What each op lacks, as readable problems (empty when the registry is complete)."""
    problems = []
    for name, op in registry.items():
        if op.name != name:
            problems.append(f"{name}: registered under another name ({op.name})")
        if not op.constructors:
            problems.append(f"{name}: no constructor")
        for part in ("adjoint", "text", "latex"):
            if not callable(getattr(op, part, None)):
                problems.append(f"{name}: no {part}")
        for backend in backends:
            if not callable(op.statements.get(backend)):
                problems.append(f"{name}: no statement for backend {backend}")
        for backend in op.statements:
            if backend not in backends:
                problems.append(f"{name}: a statement for unregistered backend {backend}")
    return problems


def test_registry_is_complete():
    assert missing(ops.REGISTRY, BACKENDS) == []


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_covers_every_op(backend):
    lacking = [name for name, op in ops.REGISTRY.items() if backend not in op.statements]
    assert lacking == [], f"backend {backend} has no statement for {lacking}"


def _op(**changes):
    fields = dict(name="probe", constructors=(lambda: None,), adjoint=lambda n, g, w: [],
                  text=lambda n, a, f: "", latex=lambda n, a, f: "",
                  statements={"numpy": lambda st, n: [], "c": lambda st, n: []})
    fields.update(changes)
    return ops.Op(**fields)


@pytest.mark.parametrize("changes, problem", [
    ({"adjoint": None}, "probe: no adjoint"),
    ({"text": None}, "probe: no text"),
    ({"latex": None}, "probe: no latex"),
    ({"constructors": ()}, "probe: no constructor"),
    ({"statements": {"numpy": lambda st, n: []}}, "probe: no statement for backend c"),
    ({"statements": {"numpy": lambda st, n: [], "c": lambda st, n: [], "cuda": lambda st, n: []}},
     "probe: a statement for unregistered backend cuda"),
])
def test_the_check_catches(changes, problem):
    assert missing({"probe": _op(**changes)}, BACKENDS) == [problem]
    assert missing({"probe": _op()}, BACKENDS) == []


def test_a_new_backend_must_cover_every_op():
    problems = missing(ops.REGISTRY, {**BACKENDS, "cuda": None})
    assert len(problems) == len(ops.REGISTRY) and all("backend cuda" in p for p in problems)


def test_constructors_resolve_through_ir():
    for name, f in ops.CONSTRUCTORS.items():
        assert getattr(ir, name) is f
    for name in ("ew", "matmul", "transpose", "reshape", "reduce_sum", "mean", "lse", "softmax", "xent", "xent_grad"):
        assert name in ops.CONSTRUCTORS
    with pytest.raises(AttributeError):
        ir.no_such_constructor


@pytest.mark.parametrize("name", sorted(ops.REGISTRY))
def test_each_op_is_documented_in_its_module(name):
    import sys
    op = ops.REGISTRY[name]
    module = sys.modules[op.constructors[0].__module__]
    assert module.__name__.startswith("compiler.core.ops.")
    assert f"``{name}``" in (module.__doc__ or ""), f"{module.__name__}'s docstring does not describe {name}"


def test_every_op_module_is_registered():
    # adding an op is adding a module: the package imports every module in it
    import pkgutil
    modules = {m.name for m in pkgutil.iter_modules(ops.__path__)}
    defined = {op.constructors[0].__module__.rsplit(".", 1)[1] for op in ops.REGISTRY.values()}
    assert modules == defined


def test_rules_are_the_registry_adjoints():
    assert set(RULES) == set(ops.REGISTRY) - {"xent_grad", "slice_last", "window_max_grad", "embed_grad",
                                              "sample_product", "embed_grad_each", "zeros_like"}
    # xent_grad, slice_last (the adjoint of concat), window_max_grad and embed_grad (the
    # scatter-add of an embedding), and the per-sample forms sample_product and embed_grad_each
    # (per-example gradients), exist only in gradients, zeros_like only in tangents (of a concat
    # with data): differentiating them again is refused, not silently zero
    s = ir.slice_last(ir.input_node("a", (ir.N, 5), "data"), 1, 3)
    with pytest.raises(ops.UnsupportedError, match="no adjoint rule for operation 'slice_last'"):
        ops.get(s.op).adjoint(s, s, [True])
    p = ir.input_node("p", (ir.N, 4, 2), "data")
    node = ir.window_max_grad(p, ir.window_max(p))
    with pytest.raises(ops.UnsupportedError, match="no adjoint rule for operation 'window_max_grad'"):
        ops.get(node.op).adjoint(node, p, [True] * 2)
    z, l, g = (ir.input_node(n, s, "data") for n, s in (("z", (ir.N, 3)), ("l", (ir.N,)), ("g", (ir.N,))))
    y = ir.input_node("y", (ir.N, 3), "target")
    node = ir.xent_grad(z, l, y, g, "onehot")
    with pytest.raises(ops.UnsupportedError, match="no adjoint rule for operation 'xent_grad'"):
        ops.get(node.op).adjoint(node, g, [True] * 4)
    ids = ir.input_node("ids", (ir.N, 4), "data", "ids")
    node = ir.embed_grad(ids, ir.input_node("g", (ir.N, 4, 3), "data"), 7)
    with pytest.raises(ops.UnsupportedError, match="no adjoint rule for operation 'embed_grad'"):
        ops.get(node.op).adjoint(node, g, [True] * 2)


@pytest.mark.parametrize("cls", ["compiler.backends.numpy.statements.NumpyStatements",
                                 "compiler.backends.c.backend.CStatements"])
def test_emitters_hold_no_per_op_statements(cls):
    # one place per op: an emitter dispatches through the registry instead of _stmt_<op> methods
    import importlib
    module, name = cls.rsplit(".", 1)
    emitter = getattr(importlib.import_module(module), name)
    assert not [m for m in dir(emitter) if m.startswith("_stmt_")]
