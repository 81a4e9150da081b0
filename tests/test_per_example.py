"""Per-example gradients (issue 16, item 2): on every model of the table and both targets, the
rows of ``per_example_grads`` average to ``backward``'s gradient and each row equals the
gradient of a batch of that sample alone (which the table's tests check against central
differences); models whose forward mixes samples raise a clear error instead."""
import ast
import inspect

import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from compiler.core import ir
from compiler.core.ir import ARG
from compiler.core.model import Model
from compiler.core.per_example import PerExampleError, derive
from compiler.gradcheck import random_batch
from model_table import MODELS, NEEDS_CC, build, perturbed, rel_err

MIXES = {"batchnorm", "batchnorm_image", "batchnorm_inference"}
TARGETS = [pytest.param("numpy", id="numpy"), pytest.param("c", id="c", marks=NEEDS_CC)]
BATCH = 5


def _module(model_id, backend):
    mod = build(model_id, backend, "float64" if backend == "c" else None)
    return getattr(mod, "module", mod)      # batchnorm rows are wrapped in a mode


@pytest.mark.parametrize("backend", TARGETS)
@pytest.mark.parametrize("model_id", [m for m, _ in MODELS])
def test_rows_are_batch_of_one_gradients(model_id, backend):
    mod = _module(model_id, backend)
    params = perturbed(mod)
    arrays = random_batch(mod, batch=BATCH, seed=3)
    if model_id in MIXES:
        with pytest.raises(NotImplementedError, match="mixes samples"):
            mod.per_example_grads(params, *arrays)
        return
    losses, grads = mod.per_example_grads(params, *arrays)
    loss, batch_grads = mod.backward(params, *arrays)
    assert losses.shape == (BATCH,)
    assert abs(losses.mean() - loss) <= 1e-12 * max(1.0, abs(loss))
    for k, g in batch_grads.items():
        assert grads[k].shape == (BATCH,) + np.shape(g), k
        assert rel_err(grads[k].mean(axis=0), g) < 1e-12, k
    for i in range(BATCH):
        one_loss, one = mod.backward(params, *[a[i:i + 1] for a in arrays])
        assert abs(losses[i] - one_loss) <= 1e-12 * max(1.0, abs(one_loss))
        for k, g in one.items():
            assert rel_err(grads[k][i], g) < 1e-12, (k, i)


@pytest.mark.parametrize("backend", TARGETS)
def test_float32_stays_float32(backend):
    mod = build("mlp_tanh_mse", backend, "float32" if backend == "c" else None)
    params = {k: np.asarray(v, np.float32) for k, v in perturbed(mod).items()}
    arrays = [a.astype(np.float32) for a in random_batch(mod, batch=4, seed=0)]
    losses, grads = mod.per_example_grads(params, *arrays)
    ref_losses, ref = _module("mlp_tanh_mse", "numpy").per_example_grads(
        {k: v.astype(np.float64) for k, v in params.items()}, *[a.astype(np.float64) for a in arrays])
    assert losses.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    assert rel_err(losses, ref_losses) < 1e-5
    for k in ref:
        assert rel_err(grads[k], ref[k]) < 1e-5, k


def test_numpy_has_no_loop_and_shows_the_formulas():
    mod = _module("cnn_maxpool", "numpy")
    tree = ast.parse(inspect.getsource(mod.per_example_grads))
    loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While, ast.comprehension))]
    # at most loops over a kernel's offsets (as in backward), none over samples
    assert all(isinstance(n, ast.For) and ast.unparse(n.iter) in ("range(2)", "range(3)") for n in loops)
    text = inspect.getsource(_module("mlp_tanh_mse", "numpy").per_example_grads)
    # a dense layer's per-sample outer product, the biases' adjoints kept per sample, no 1/n
    assert "# dW1_i = per_sample(x.T @ dZ1_i)" in text
    assert "np.einsum('ni,nj->nij', x, dZ1_i)" in text      # small: a new array (see below)
    assert "'b1': dZ1_i" in text and "/n" not in text.split("def per_example_grads")[-1]


def test_a_returned_gradient_is_written_again_only_once_the_caller_has_dropped_it():
    # per_example_grads writes its large per-sample products into the array it returned last
    # call, if nothing but its cache refers to it (no dict, view or memoryview): no page faults
    mod = bpc.compile_model(bpc.mlp([64, 128, 4], "tanh", "mse", name="pe_reuse")).load()
    p = mod.init_params(seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 64)), rng.standard_normal((32, 4))
    x2 = rng.standard_normal((32, 64))
    first = mod.per_example_grads(p, x, y)[1]
    kept = first["W1"].copy()
    second = mod.per_example_grads(p, x2, y)[1]          # ``first`` still held: a new array
    assert second["W1"] is not first["W1"] and np.array_equal(first["W1"], kept)
    view = second["W1"][3]                               # a view keeps its base alive as well
    address = second["W1"].__array_interface__["data"][0]
    del second
    third = mod.per_example_grads(p, x, y)[1]
    assert third["W1"].__array_interface__["data"][0] != address
    assert np.array_equal(third["W1"], kept)
    expect = view.copy()
    address = third["W1"].__array_interface__["data"][0]
    del third
    fourth = mod.per_example_grads(p, x2, y)[1]          # nothing refers to ``third``: reused
    assert fourth["W1"].__array_interface__["data"][0] == address
    assert np.array_equal(view, expect) and np.array_equal(fourth["W1"][3], expect)


def _mean_model(outer):
    """An expression model whose loss is ``outer`` of the batch mean of (w*x - y)**2."""
    x, y = ir.input_node("x", (ir.N,), "data"), ir.input_node("y", (ir.N,), "target")
    w = ir.param_node("w", ())
    p = ir.ew(ARG[0] * ARG[1], [w, x])
    loss = ir.ew(outer(ARG[0]), [ir.mean(ir.ew((ARG[0] - ARG[1]) ** 2, [p, y]))], shape=())
    return Model("mixed", (x,), (y,), (w,), p, loss, names={p.digest: "p"}, init={"w": ("value", 0.5)})


def test_a_loss_that_is_not_a_mean_over_samples_is_refused():
    # log(mean(...)): each sample's gradient depends on the whole batch
    model = _mean_model(sp.log)
    with pytest.raises(PerExampleError, match="mixes samples"):
        from compiler.core.adjoints import gradients
        grads, _ = gradients(model.loss, model.params)
        derive(model, model.loss, [grads[model.params[0].uid]], {})
    mod = bpc.compile_model(model).load()    # the module compiles; the function says why not
    with pytest.raises(NotImplementedError, match="per-example gradients are not defined for model 'mixed'"):
        mod.per_example_grads({"w": 0.5}, [1.0, 2.0], [1.0, 0.0])
    # a scaled mean is a mean: 3*mean(...) has per-example gradients, 3*(w*x_i - y_i)*2*x_i
    lin = bpc.compile_model(_mean_model(lambda a: 3 * a)).load()
    losses, grads = lin.per_example_grads({"w": 0.5}, [1.0, 2.0], [1.0, 0.0])
    assert np.allclose(losses, 3 * np.array([0.25, 1.0]))
    assert np.allclose(grads["w"], 3 * 2 * np.array([-0.5 * 1.0, 1.0 * 2.0]))


def test_regulariser_gradient_is_in_every_row():
    # expr_multi's loss has w**2/100: a term without data, the same in each sample's gradient
    mod = _module("expr_multi", "numpy")
    params = perturbed(mod)
    arrays = random_batch(mod, batch=3, seed=1)
    _, grads = mod.per_example_grads(params, *arrays)
    for i in range(3):
        _, one = mod.backward(params, *[a[i:i + 1] for a in arrays])
        assert np.isclose(grads["w"][i], one["w"], rtol=1e-12)
