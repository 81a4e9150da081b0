"""Bad models get one clear BpcError that names the problem, never a traceback from deep inside."""
import pytest
import sympy as sp

import compiler as bpc
from compiler.errors import BpcError, ModelError, ShapeError, UnsupportedError

x, y, a, b, p, q = sp.symbols("x y a b p q")


def _net_with_target_size(size):
    net = bpc.Network("n")
    h = net.dense(net.input("x", 2), 3)
    return net.build(h, "mse", net.target("y", size))


def _dense_on_scalar_input():
    net = bpc.Network("n")
    return net.dense(net.input("x"), 3)


def _two_targets_no_choice():
    net = bpc.Network("n")
    h = net.dense(net.input("x", 2), 3)
    net.target("y1", 3)
    net.target("y2", 3)
    return net.build(h, "mse")


def _mse_on_labels():
    net = bpc.Network("n")
    h = net.dense(net.input("x", 2), 3)
    return net.build(h, "mse", net.target("y", kind="label"))


def _matrix_bad_product():
    xm = sp.MatrixSymbol("x", 3, 1)
    W = sp.MatrixSymbol("W", 4, 2)
    return bpc.from_matrix_expr(W * sp.MatrixSymbol("z", 2, 1) + sp.ZeroMatrix(4, 1) + W * xm[:2, :],
                                [xm], [sp.MatrixSymbol("y", 4, 1)])


CASES = [
    ("unknown activation", lambda: bpc.mlp([2, 3, 1], "tanhh"), ModelError, "unknown activation 'tanhh'"),
    ("activation of two symbols", lambda: bpc.mlp([2, 3, 1], x * y), ModelError, "one symbol"),
    ("unsupported function", lambda: bpc.mlp([2, 3, 1], sp.gamma(x)), UnsupportedError, "gamma"),
    ("activation of wrong type", lambda: bpc.mlp([2, 3, 1], 3.5), ModelError, "name or a SymPy expression"),
    ("unknown loss", lambda: bpc.mlp([2, 3, 1], loss="hinge"), ModelError, "unknown loss 'hinge'"),
    ("loss with an undefined symbol", lambda: bpc.mlp([2, 3, 1], loss=(p - y) ** 2 + q), ModelError, "undefined symbol(s) q"),
    ("output and target shapes differ", lambda: _net_with_target_size(2), ShapeError, "(n, 3) and target shape (n, 2)"),
    ("dense on a per-sample scalar", _dense_on_scalar_input, ShapeError, "dense layer needs a (batch, features)"),
    ("width 0", lambda: bpc.mlp([2, 0, 1]), ModelError, "positive integer, got 0"),
    ("width -3", lambda: bpc.mlp([2, -3, 1]), ModelError, "positive integer, got -3"),
    ("width not an int", lambda: bpc.mlp([2, 2.5, 1]), ModelError, "positive integer, got 2.5"),
    ("too few sizes", lambda: bpc.mlp([2]), ModelError, "at least an input and an output"),
    ("mse on labels", _mse_on_labels,
     ModelError, "integer labels"),
    ("two targets, none chosen", _two_targets_no_choice, ModelError, "give the target"),
    ("keyword as a name", lambda: bpc.Network("class"), ModelError, "reserved"),
    ("reserved input name", lambda: bpc.Network("m").input("np", 2), ModelError, "reserved"),
    ("injection in a name", lambda: bpc.Network("x; import os"), ModelError, "not allowed"),
    ("dunder name", lambda: bpc.Network("__class__"), ModelError, "not allowed"),
    ("unicode look-alike name", lambda: bpc.Network("mоdel"), ModelError, "not allowed"),
    ("duplicate input", lambda: [n := bpc.Network("n"), n.input("x", 2), n.input("x", 2)], ModelError, "already used"),
    ("expression: undefined symbol", lambda: bpc.expression_model(a * x + b, {a: 0}, [x]), ModelError,
     "undefined symbol(s) b"),
    ("expression: no data", lambda: bpc.expression_model(a, {a: 0}, []), ModelError, "at least one data input"),
    ("expression: bad initial value", lambda: bpc.expression_model(a * x, {a: "zero"}, [x]), ModelError,
     "must be a finite number"),
    ("expression: loss symbol unknown", lambda: bpc.expression_model(a * x, {a: 0}, [x], loss=(p - q) ** 2),
     ModelError, "undefined symbol(s) q"),
    ("expression: duplicate symbol", lambda: bpc.expression_model(a * x, {a: 0}, [a]), ModelError, "more than once"),
    ("expression: loss as text is never evaluated", lambda: bpc.expression_model(
        a * x, {a: 0}, [x], loss="__import__('os').system('touch /tmp/bpc_pwned')"), ModelError, "SymPy expression"),
    ("expression: not sympy", lambda: bpc.expression_model("a*x", {a: 0}, [x]), ModelError, "SymPy expression"),
    ("matrix: unsupported construct", _matrix_bad_product, BpcError, ""),
    ("matrix: not a matrix", lambda: bpc.from_matrix_expr(x, [x], [y]), ModelError, "matrix expression"),
    ("docstring injection in a description", lambda: __import__("dataclasses").replace(
        bpc.mlp([2, 1]), description='"""\nimport os\n"""'), ModelError, "three quotes in a row"),
    ("backslash in a source", lambda: __import__("dataclasses").replace(bpc.mlp([2, 1]), source="a\\b"),
     ModelError, "source: a backslash"),
    ("zero activation", lambda: bpc.mlp([2, 3, 1], activation=0 * x), ModelError, "identically zero"),
    ("zero loss", lambda: bpc.mlp([2, 1], loss=p - p), ModelError, "does not depend on the prediction"),
    ("expression: zero prediction", lambda: bpc.expression_model(0 * a * x, {a: 0}, [x]), ModelError,
     "does not depend on any parameter"),
    ("expression: loss without p", lambda: bpc.expression_model(a * x, {a: 0}, [x], loss=y**2), ModelError,
     "does not depend on the prediction"),
    ("expression: nan initial value", lambda: bpc.expression_model(a * x, {a: float("nan")}, [x]), ModelError,
     "finite number"),
    ("matrix: identically zero", lambda: bpc.from_matrix_expr(
        sp.MatrixSymbol("W", 2, 3) * sp.MatrixSymbol("x", 3, 1) - sp.MatrixSymbol("W", 2, 3) * sp.MatrixSymbol("x", 3, 1)
        + sp.MatrixSymbol("b", 2, 1) * 0, [sp.MatrixSymbol("x", 3, 1)], [sp.MatrixSymbol("y", 2, 1)]), BpcError, ""),
    ("bad dtype", lambda: bpc.compile_model(bpc.mlp([1, 1]), dtype="float16"), ModelError, "float32 or float64"),
]


def test_numbers_of_other_types_are_accepted():
    import numpy as np
    assert bpc.mlp([np.int64(2), 3, 1]).params[0].shape == (2, 3)
    assert bpc.expression_model(a * x, {a: sp.pi / 4}, [x]).init["a"] == ("value", pytest.approx(0.785398163))


@pytest.mark.parametrize("what,build,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_model_gets_a_clear_error(what, build, error, message):
    with pytest.raises(error) as info:
        build()
    assert message in str(info.value)
    assert isinstance(info.value, BpcError)
