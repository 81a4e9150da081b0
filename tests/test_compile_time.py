"""Compile time (issue 13, item 8; issue 12, item 8): what the compile does to be fast must not
change what it emits. The caches of the compile path leave a module's source unchanged when
other models were compiled in between; the cyclic garbage collector is off while a model
compiles and as it was after; the LaTeX chains made on first use equal the formulas they stand
for; and hvp/gnvp of large graphs, printed without formula comments and without shared
subexpressions, compute the same products as the full form (checked against central
differences of backward). Timings themselves are the benchmark's job (python -m
bench.compile_scaling), not a test's."""
import gc
import pickle

import numpy as np
import pytest

import compiler as bpc
import compiler.backends.lowering as lowering
import compiler.backends.numpy.module as numpy_module
import compiler.core.program as program_module
from compiler.core.formulas import Formulas
from compiler.gradcheck import random_batch
from model_table import MODELS, perturbed, rel_err


def _model(model_id):
    return dict(MODELS)[model_id]()


def _transformer():
    net = bpc.Network("tiny_transformer")
    x = net.input("x", kind="ids", length=6)
    h = net.positional(net.embedding(x, 11, 8))
    h = net.transformer_block(h, 2, mlp=16, causal=True)
    z = net.dense(net.layernorm(h), 11)
    return net.build(z, "softmax_cross_entropy", net.target("y", kind="label", length=6))


def test_the_caches_change_no_source():
    first = bpc.compile_model(_transformer()).source
    for model_id in ("mlp_gelu", "softmax_labels"):
        bpc.compile_model(_model(model_id))          # other models through the same caches
    assert bpc.compile_model(_transformer()).source == first


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_off_while_compiling_and_as_it_was_after(monkeypatch, enabled):
    seen = []
    lower = lowering.lower

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return lower(*args, **kwargs)

    monkeypatch.setattr(numpy_module, "lower", spy)
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        bpc.compile_model(_model("mlp_tanh_mse"))
        assert seen == [False]
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_latex_chains_made_on_first_use_equal_the_formulas():
    compiled = bpc.compile_model(_model("mlp_gelu"))
    fm = Formulas(compiled.program)
    expected = {p.name: r" \\ ".join(fm.chain(g, latex=True)) or fm.line(g, latex=True) if g is not None else "0"
                for p, g in compiled.program.grads}
    assert dict(compiled.latex) == expected and compiled.latex == expected
    assert list(compiled.latex) == [p.name for p in compiled.model.params] and len(compiled.latex) == len(expected)
    copy = pickle.loads(pickle.dumps(compiled.latex))
    assert type(copy) is dict and copy == expected


def _hvp_text(source, name):
    start = source.index(f"\ndef {name}(")
    return source[start:source.index("\ndef ", start + 1)]


@pytest.mark.parametrize("model_id", ["mlp_gelu", "softmax_labels"])
def test_large_second_order_entry_points_compute_the_same_products(monkeypatch, model_id):
    full = bpc.compile_model(_model(model_id))
    monkeypatch.setattr(numpy_module, "COMMENTED_SECOND_ORDER_MAX", 0)
    monkeypatch.setattr(program_module, "SHARED_SECOND_ORDER_MAX", 0)
    plain = bpc.compile_model(_model(model_id))
    for name in ("hvp", "gnvp"):
        text = _hvp_text(plain.source, name)
        body = text[text.index('"""', text.index('"""') + 3):]
        assert "printed without formula comments" in text
        assert not [line for line in body.splitlines() if line.strip().startswith("#")]
        assert [line for line in _hvp_text(full.source, name).splitlines() if line.strip().startswith("# ")]
    if model_id == "mlp_gelu":      # GELU's tanh is backward's shared value, which hvp reuses in either form
        shared = lambda c: {c.program.names[n.uid] for n in c.program.hvp.nodes} & {"tanh_Z1"}  # noqa: E731
        assert shared(full) == {"tanh_Z1"} and shared(plain) == {"tanh_Z1"}
        assert _hvp_text(plain.source, "hvp").count("np.tanh(") == 1
    a, b = full.load(), plain.load()
    params = perturbed(a, seed=3)
    arrays = random_batch(a, batch=5, seed=4)
    rng = np.random.default_rng(5)
    v = {k: rng.standard_normal(np.shape(p)) for k, p in params.items()}
    names = list(a.PARAMS)
    flat = lambda d: np.concatenate([np.ravel(d[k]) for k in names])  # noqa: E731
    for name in ("hvp", "gnvp"):
        loss_a, grads_a, prod_a = getattr(a, name)(params, v, *arrays)
        loss_b, grads_b, prod_b = getattr(b, name)(params, v, *arrays)
        assert loss_b == pytest.approx(loss_a, rel=1e-13)
        assert rel_err(flat(grads_b), flat(grads_a)) < 1e-12
        assert rel_err(flat(prod_b), flat(prod_a)) < 1e-12
    eps = 1e-6
    gp = b.backward({k: params[k] + eps * v[k] for k in names}, *arrays)[1]
    gm = b.backward({k: params[k] - eps * v[k] for k in names}, *arrays)[1]
    fd = (flat(gp) - flat(gm)) / (2 * eps)
    assert rel_err(flat(b.hvp(params, v, *arrays)[2]), fd) < 1e-5
