"""Data moments hoisted (issue 16, item 4): for expression models whose loss is a polynomial in
the data, precompute reduces the data once and loss_from_moments / backward_from_moments equal
the per-sample loss and backward to 1e-10 relative, on both targets, also on data with large
offsets (x near 1e3) at degree 5; other models get no precompute, and say why."""
import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from compiler.core.moments import decline_reason, evaluate_stats, plan
from model_table import NEEDS_CC

TARGETS = [pytest.param("numpy", id="numpy"), pytest.param("c", id="c", marks=NEEDS_CC)]
x_, y_, w_, k_ = sp.symbols("x y w k")
A = sp.symbols("a0:6")


def _poly(degree, loss=None, name="poly"):
    return bpc.expression_model(sum(a * x_**i for i, a in enumerate(A[:degree + 1])),
                                {a: 0.0 for a in A[:degree + 1]}, [x_], loss=loss, name=name)


def _two_inputs():
    x1, x2 = sp.symbols("x1 x2")
    return bpc.expression_model(w_ * x1 * x2 + k_ * x1**2 + A[0], {w_: 0.3, k_: -0.2, A[0]: 0.1}, [x1, x2],
                                name="cross")


def _robust():
    # a polynomial loss that is not a square: (p - y)**4 + 0.1*(p - y)**2, and a parameter-only term
    p = sp.Symbol("p")
    return bpc.expression_model(A[0] + A[1] * x_, {A[0]: 0.0, A[1]: 0.0}, [x_], [y_],
                                loss=(p - y_)**4 + sp.Rational(1, 10) * (p - y_)**2 + A[1]**2, name="quartic")


MODELS = {"deg5": lambda: _poly(5), "deg1": lambda: _poly(1, name="line"), "cross": _two_inputs,
          "quartic": _robust}
_built = {}


def _module(key, backend):
    if (key, backend) not in _built:
        model = MODELS[key]()
        _built[key, backend] = (bpc.compile_model(model) if backend == "numpy"
                                else bpc.compile_model_c(model, "float64")).load()
    return _built[key, backend]


def _data(mod, n, offset, rng):
    arrays = []
    for name in [*mod.INPUTS, *mod.TARGETS]:
        scale = 10.0 if name.startswith("x") else 1.0
        arrays.append(offset + scale * rng.standard_normal(n) if name.startswith("x") else rng.standard_normal(n))
    return arrays


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("backend", TARGETS)
@pytest.mark.parametrize("key, offset", [("deg5", 1e3), ("deg5", 0.0), ("deg1", 1e3), ("cross", 1e3),
                                         ("cross", -5.0), ("quartic", 1e3), ("quartic", 0.0)])
def test_hoisted_equals_per_sample(backend, key, offset):
    mod = _module(key, backend)
    rng = np.random.default_rng(7)
    arrays = _data(mod, 10000, offset, rng)
    moments = mod.precompute(*arrays)
    for seed in range(3):
        params = {k: rng.standard_normal() for k in mod.PARAMS}
        loss, grads = mod.backward(params, *arrays)
        assert _rel(mod.loss_from_moments(params, moments), loss) < 1e-10
        hl, hg = mod.backward_from_moments(params, moments)
        assert _rel(hl, loss) < 1e-10
        for name, g in grads.items():
            assert _rel(float(hg[name]), float(g)) < 1e-10, (name, float(hg[name]), float(g))


@pytest.mark.parametrize("backend", TARGETS)
def test_precompute_statistics_and_errors(backend):
    mod = _module("deg5", backend)
    rng = np.random.default_rng(0)
    x, y = 1e3 + rng.standard_normal(200_000), rng.standard_normal(200_000)   # several chunks
    got = mod.precompute(x, y)
    ref = evaluate_stats(plan(MODELS["deg5"]()), [x, y])
    assert list(got) == list(mod.MOMENT_STATS) == list(ref)
    for k in ref:
        assert abs(got[k] - ref[k]) <= 1e-9 * max(1.0, abs(ref[k])), k
    assert abs(got["m_x2"] - 1.0) < 1e-12 and abs(got["m_x1"]) < 1e-12      # standardized
    params = mod.init_params()
    with pytest.raises(ValueError, match="moments has no entry 'mean_x'"):
        mod.loss_from_moments(params, {})
    with pytest.raises(ValueError, match="moments must be the dict that precompute returns"):
        mod.backward_from_moments(params, [1.0])
    with pytest.raises(ValueError, match="different batch sizes"):
        mod.precompute(x, y[:10])
    const = mod.precompute(np.full(5, 2.0), np.arange(5.0))      # constant data: scale 1, no division by 0
    assert const["scale_x"] == 1.0 and np.isfinite(mod.loss_from_moments(params, const))


def test_train_poly_example_and_declines():
    from compiler.spec.loader import load_spec
    from pathlib import Path
    p = plan(load_spec(Path(__file__).resolve().parent.parent / "examples" / "train_poly.toml").model)
    assert p is not None and p.quadratic
    assert "m_x6" in p.stats and "m_x3_y1" in p.stats and "m_y2" in p.stats
    assert "not a polynomial in the data" in decline_reason(
        bpc.expression_model(sp.exp(w_ * x_), {w_: 1.0}, [x_]))
    p_ = sp.Symbol("p")
    assert "not a polynomial" in decline_reason(
        bpc.expression_model(w_ * x_, {w_: 1.0}, [x_], loss=sp.log(sp.cosh(p_ - y_))))
    assert "is not a number" in decline_reason(bpc.mlp([2, 3, 1]))
    many = sp.symbols("c0:65")
    assert "65 parameters (at most 64)" in decline_reason(
        bpc.expression_model(sum(c * x_**(i % 3) for i, c in enumerate(many)), list(many), [x_]))
    mod = bpc.compile_model(bpc.expression_model(sp.exp(w_ * x_), {w_: 1.0}, [x_])).load()
    assert not hasattr(mod, "precompute") and not hasattr(mod, "MOMENT_STATS")
