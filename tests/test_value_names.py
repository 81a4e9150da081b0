"""Every value in a formula has a readable name (compiler/core/naming.py): no `t1`, `t2`."""
import re

import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from compiler.core.formulas import Formulas
from compiler.core.program import build_program
from model_table import MODELS

_TEMP = re.compile(r"t\d+")


def _lines(model):
    program = build_program(model)
    fm = Formulas(program)
    lines = [fm.line(n) for n in (*program.forward_nodes, *program.loss_nodes, *program.backward_nodes)]
    return program, lines


@pytest.mark.parametrize("model_id, builder", MODELS, ids=[m[0] for m in MODELS])
def test_no_numbered_temporaries(model_id, builder):
    program, _ = _lines(builder())
    scheduled = {n.uid for n in (*program.forward_nodes, *program.loss_nodes, *program.backward_nodes)}
    temps = sorted(name for uid, name in program.names.items() if uid in scheduled and _TEMP.fullmatch(name))
    assert not temps, f"{model_id}: numbered temporaries {temps}"


@pytest.mark.parametrize("model_id, expected", [
    # the share of dh1 through each of h1's users, named by the path
    ("residual_mlp", "dZ1 = (1 - H1**2)*(dH1_W2 + dH1_plus_H2)"),
    ("residual_mlp", "dH1_W2 = dZ2 @ W2.T"),
    ("residual_mlp", "H1_plus_H2 = H1 + H2"),
    # an unnamed input of a dense layer (a residual sum) is X, not the model's input x
    ("residual_mlp", "XW3 = H1_plus_H2 @ W3"),
    # a norm's row sum and its adjoint
    ("layernorm", "sum_H1 = sum(H1, axis=1)"),
    ("layernorm", "dsum_H1 = dM2/5"),
    # the softmax adjoint's row sum, and the three paths of attention's input
    ("char_lm", "dS4 = A4*(dA4 - sum_A4_times_dA4)"),
    ("char_lm", "dX4 = dX4_XK4 + dX4_XQ4 + dX4_XV4"),
])
def test_named_from_what_they_compute(model_id, expected):
    builder = dict(MODELS)[model_id]
    _, lines = _lines(builder())
    assert any(expected in line for line in lines), "\n".join(lines)


def test_derived_names_never_take_a_declared_name():
    # a parameter called like the derived name of a row sum: the derived one gets a suffix
    x, y = sp.symbols("x y")
    sum_x = sp.Symbol("sum_x")
    model = bpc.expression_model(sum_x * x, {sum_x: 1.5}, [x], name="clash")
    program = build_program(model)
    names = list(program.names.values())
    assert names.count("sum_x") == 1
    module = bpc.compile_model(model).load()
    loss, grads = module.backward(module.init_params(), np.array([1.0, 2.0]), np.array([0.5, 1.0]))
    assert np.isfinite(loss) and set(grads) == {"sum_x"}
