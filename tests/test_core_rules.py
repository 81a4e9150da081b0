"""Each adjoint rule, op by op, against float64 central finite differences.

Every row builds ``out = op(...)`` from parameters and a data input and uses the loss
``mean(out * R) + mean(X**2)`` with a random weighting parameter ``R``, so the rule is tested
for an arbitrary upstream adjoint, not just for ones.
"""
import zlib

import numpy as np
import pytest
import sympy as sp

from compiler.core import ir
from compiler.backends.numpy.module import compile_model
from compiler.core.functions import relu, sigmoid, softplus, stabilize
from compiler.gradcheck import check_gradients
from compiler.core.ir import ARG, N
from compiler.core.model import Model

a0, a1 = ARG[0], ARG[1]


def P(name, shape):
    return ir.param_node(name, shape)


def X():
    return ir.input_node("X", (N, 3), "data")


def Z():
    return ir.matmul(X(), P("W", (3, 4)))


UNARY = {
    "exp": sp.exp(a0), "log": sp.log(1 + a0**2), "tanh": sp.tanh(a0), "sigmoid": sigmoid(a0),
    "softplus": softplus(a0), "relu": relu(a0), "sin": sp.sin(a0), "cos": sp.cos(a0),
    "atan": sp.atan(a0), "asinh": sp.asinh(a0), "sqrt": sp.sqrt(1 + a0**2), "abs": sp.Abs(a0),
    "erf": sp.erf(a0), "cube": a0**3, "pow4": a0**4, "inverse": 1 / (1 + a0**2), "cosh": sp.cosh(a0),
    "sinh": sp.sinh(a0), "tan": sp.tan(a0 / 4), "max": sp.Max(a0, a0 / 2),
    "log_sigmoid": stabilize(sp.log(sigmoid(a0))), "handwritten_sigmoid": stabilize(sp.exp(a0) / (1 + sp.exp(a0))),
    "power_real": (2 + sp.tanh(a0)) ** sp.Rational(3, 2), "sign_times": sp.sign(a0) * a0**2,
}


def _unary(expr):
    return lambda: ir.ew(expr, [Z()])


def _lse_input():
    return ir.ew(3 * a0, [Z()])


OPS = {
    **{f"ew_{k}": _unary(v) for k, v in UNARY.items()},
    "ew_bias_broadcast": lambda: ir.ew(a0 + a1, [Z(), P("b", (4,))]),
    "ew_row_broadcast": lambda: ir.ew(a0 * a1, [Z(), P("b", (1, 4))]),
    "ew_per_sample_broadcast": lambda: ir.ew(a0 * a1, [Z(), ir.reduce_sum(ir.ew(sp.tanh(a0), [Z()]), (1,))]),
    "ew_scalar_param": lambda: ir.ew(a0 * sp.exp(a1), [Z(), P("s", ())]),
    "ew_params_only": lambda: ir.ew(a0 * a1**2, [P("u", (4,)), P("s", ())]),
    "ew_same_input_twice": lambda: ir.ew(a0 * a1, [Z(), Z()]),
    "matmul": lambda: ir.matmul(X(), P("W", (3, 4))),
    "matmul_ta": lambda: ir.matmul(X(), Z(), ta=True),
    "matmul_tb": lambda: ir.matmul(X(), P("V", (4, 3)), tb=True),
    "matmul_ta_tb": lambda: ir.matmul(P("A", (3, 2)), P("B", (4, 3)), ta=True, tb=True),
    "matmul_chain": lambda: ir.matmul(ir.ew(sp.tanh(a0), [Z()]), P("V", (4, 2))),
    "transpose": lambda: ir.transpose(P("A", (3, 2))),
    "reshape": lambda: ir.reshape(P("A", (4, 3)), (2, 6)),
    "sum_axis0": lambda: ir.reduce_sum(ir.ew(sp.sin(a0), [Z()]), (0,)),
    "sum_axis1": lambda: ir.reduce_sum(ir.ew(sp.sin(a0), [Z()]), (1,)),
    "sum_all": lambda: ir.reduce_sum(ir.ew(sp.sin(a0), [Z()]), (0, 1)),
    "sum_param_axis1": lambda: ir.reduce_sum(P("A", (3, 4)), (1,)),
    "mean": lambda: ir.mean(ir.ew(sp.sin(a0), [Z()])),
    "logsumexp": lambda: ir.lse(_lse_input()),
    "softmax": lambda: ir.softmax(_lse_input()),
    "xent_labels": lambda: ir.xent(_lse_input(), ir.input_node("y", (N,), "target", "label"), "label"),
    "xent_onehot": lambda: ir.xent(_lse_input(), ir.input_node("Y", (N, 4), "target"), "onehot"),
}


def _model(out):
    r = P("R", out.shape) if not ir.is_batch(out.shape) else None
    x = X()
    if r is not None:
        term = ir.mean(ir.ew(a0 * a1, [out, r]))
    else:
        # a per-sample weighting that depends on the data keeps the batch axis honest
        k = out.shape[1] if len(out.shape) == 2 else None
        weight = ir.matmul(x, P("R", (3, k))) if k else ir.reduce_sum(ir.ew(sp.cos(a0), [x]), (1,))
        term = ir.mean(ir.ew(a0 * a1, [out, weight]))
    loss = ir.ew(a0 + a1, [term, ir.mean(ir.ew(a0**2, [x]))])
    order = ir.topo_order([loss])
    params = tuple(sorted((n for n in order if n.op == "param"), key=lambda n: n.name))
    targets = tuple(n for n in order if n.op == "input" and n.attr("role") == "target")
    return Model("rule", (x,), targets, params, out if ir.is_batch(out.shape) else loss, loss, {},
                 {p.name: ("zeros",) for p in params})


def _data(mod, batch, rng):
    arrays = [rng.standard_normal((batch, 3))]
    for name, shape in mod.TARGETS.items():
        if mod.TARGET_KINDS[name] == "label":
            arrays.append(rng.integers(0, 4, size=batch))
        else:
            arrays.append(np.eye(4)[rng.integers(0, 4, size=batch)])
    return arrays


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("op", sorted(OPS))
def test_adjoint_rule(op, seed):
    model = _model(OPS[op]())
    mod = compile_model(model).load()
    rng = np.random.default_rng(zlib.crc32(op.encode()) + seed)
    # moderate values: central differences of a loss of size L carry an error ~1e-10*L, so
    # exploding values (exp, x**4, cosh of large inputs) would test the check, not the rule
    params = {k: 0.5 * rng.standard_normal(s) for k, s in mod.PARAMS.items()}
    arrays = _data(mod, 5, rng)
    rows = check_gradients(mod, params, arrays, rtol=1e-6, atol=1e-9)
    assert rows and all(r.ok for r in rows), rows


def test_every_rule_has_a_row():
    from compiler.core.adjoints import RULES
    row_of = {"ew": "ew_", "matmul": "matmul", "transpose": "transpose", "reshape": "reshape", "sum": "sum_",
              "mean": "mean", "lse": "logsumexp", "softmax": "softmax", "xent": "xent_"}
    for rule in RULES:
        assert any(k.startswith(row_of[rule]) for k in OPS), rule
