"""Graph networks: operators on Network nodes, merge layers, several inputs, targets and
losses, the target-shape rule, and the same models from spec files (``from``, merge layer
types, ``[[network.losses]]``), with their errors. (Gradients of the merge layers and of
concat on every target: the op table, tests/test_core_rules.py, and the model table's
residual_mlp and two_input_concat.)"""
import json
from dataclasses import replace

import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from compiler.core import ir
from compiler.errors import ModelError, ShapeError
from compiler.frontends.nn import Network
from compiler.spec.loader import SpecError, loads_spec


def _net():
    net = Network("ops")
    x = net.input("x", 3)
    return net, x, net.dense(x, 3, "tanh")


# ---- operators ------------------------------------------------------------------------------

def _eval(node, x, h):
    """The value of ``node`` (an elementwise expression of x and h) at numbers x, h."""
    env = {x.uid: 1.5, h.uid: -0.5}
    values = [env[i.uid] for i in node.inputs]
    return float(node.attr("expr").subs(dict(zip(ir.ARG, values))))


# (id, operator expression, its value at x = 1.5, h = -0.5)
OPERATORS = [
    ("residual", lambda x, h: h + x, 1.0),
    ("gate", lambda x, h: h * x, -0.75),
    ("difference", lambda x, h: h - x, -2.0),
    ("quotient", lambda x, h: h / x, -1 / 3),
    ("scaled", lambda x, h: 2 * h, -1.0),
    ("shifted", lambda x, h: 1 - h, 1.5),
    ("negated", lambda x, h: -h, 0.5),
    ("by a numpy float", lambda x, h: h * np.float64(3.0), -1.5),
    ("number over node", lambda x, h: 3 / x, 2.0),
]


@pytest.mark.parametrize("build,value", [o[1:] for o in OPERATORS], ids=[o[0] for o in OPERATORS])
def test_operators_build_elementwise_nodes(build, value):
    net, x, h = _net()
    node = build(x, h)
    assert node.op == "ew" and node.shape == (ir.N, 3)
    assert _eval(node, x, h) == pytest.approx(value)


def test_residual_by_operator_is_the_add_layer():
    net, x, h = _net()
    assert (h + x) is net.add(h, x) and (x + h) is (h + x)       # one interned node
    assert (h * x) is net.multiply(h, x)
    assert 0 + h is h                                           # sum(nodes) works


def test_matmul_operator_is_the_matrix_product():
    net, x, h = _net()
    W = net.param("V", (3, 2), ("zeros",))
    assert (h @ W) is ir.matmul(h, W)


# (id, bad expression, words of the ModelError)
UNSUPPORTED = [
    ("matmul by a number", lambda x, h: h @ 2, ["matrix product", "h * 2"]),
    ("number matmul", lambda x, h: 2 @ h, ["matrix product"]),
    ("numpy array", lambda x, h: h + np.ones(3), ["ndarray", "net.param", "net.input"]),
    ("array on the left", lambda x, h: np.ones(3) * h, ["ndarray", "net.param"]),
    ("list", lambda x, h: h * [1, 2, 3], ["list", "net.param"]),
    ("sympy expression", lambda x, h: h + sp.Symbol("s"), ["net.activation"]),
    ("string", lambda x, h: h + "x", ["str", "graph values"]),
    ("boolean", lambda x, h: h * True, ["bool"]),
    ("infinity", lambda x, h: h * float("inf"), ["finite"]),
    ("identically zero", lambda x, h: h - h, ["identically zero"]),
]


@pytest.mark.parametrize("build,words", [u[1:] for u in UNSUPPORTED], ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_operands_say_what_to_write(build, words):
    net, x, h = _net()
    with pytest.raises(ModelError) as e:
        build(x, h)
    msg = str(e.value).replace("value * 2", "h * 2")
    assert all(w in msg for w in words), msg


# (id, builder of a merge from a fresh network, words of the ShapeError)
BAD_MERGES = [
    ("add widths differ", lambda n, x: n.add(n.dense(x, 4), x), ["add", "(n, 4), (n, 3)", "dense"]),
    ("operator widths differ", lambda n, x: n.dense(x, 4) + x, ["(n, 4) + (n, 3)", "do not broadcast"]),
    ("multiply widths differ", lambda n, x: n.multiply(x, n.dense(x, 2)), ["multiply", "(n, 3), (n, 2)"]),
    ("concat of a per-sample number", lambda n, x: n.concat(x, n.input("u")), ["concat", "(n, 3), (n,)"]),
    ("concat batch with parameter", lambda n, x: n.concat(x, n.param("q", (2, 2), ("zeros",))),
     ["every axis but the last"]),
]


@pytest.mark.parametrize("build,words", [b[1:] for b in BAD_MERGES], ids=[b[0] for b in BAD_MERGES])
def test_merge_shape_errors_name_the_shapes(build, words):
    net = Network("m")
    x = net.input("x", 3)
    with pytest.raises(ShapeError) as e:
        build(net, x)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_merge_needs_two_values():
    net, x, h = _net()
    with pytest.raises(ModelError, match="at least two"):
        net.concat(h)


# ---- several losses ---------------------------------------------------------------------------

def _two_heads(weight=0.25):
    net = Network("heads")
    x = net.input("x", 3)
    h = net.dense(x, 4, "tanh")
    z, r = net.dense(h, 2), net.dense(h, 1)
    y, t = net.target("y", 2), net.target("t")
    return net, z, r, y, t


def test_weighted_losses_sum_and_forward_returns_every_output():
    net, z, r, y, t = _two_heads()
    m = net.build(losses=[(z, "mse", y), {"output": r, "loss": "mse", "target": t, "weight": 0.25}])
    mod = bpc.compile_model(m).load()
    assert list(mod.TARGETS) == ["y", "t"] and mod.TARGETS["t"] == ()
    params = mod.init_params(1)
    rng = np.random.default_rng(0)
    xs, ys, ts = rng.standard_normal((5, 3)), rng.standard_normal((5, 2)), rng.standard_normal(5)
    h = np.tanh(xs @ params["W1"] + params["b1"])
    zs, rs = h @ params["W2"] + params["b2"], h @ params["W3"] + params["b3"]
    want = np.mean((zs - ys) ** 2) + 0.25 * np.mean((rs[:, 0] - ts) ** 2)
    assert mod.loss(params, xs, ys, ts) == pytest.approx(want, rel=1e-12)
    assert mod.OUTPUTS == ("Z2", "Z3")          # unnamed layers: their values' names
    got_z, got_r = mod.forward(params, xs)
    np.testing.assert_allclose(got_z, zs, rtol=1e-12)
    np.testing.assert_allclose(got_r, rs, rtol=1e-12)


# (id, losses argument, words of the ModelError)
BAD_LOSSES = [
    ("empty", lambda z, r, y, t: [], ["empty"]),
    ("not a list", lambda z, r, y, t: {"output": z}, ["list"]),
    ("short entry", lambda z, r, y, t: [(z,)], ["(output, loss, target[, weight])"]),
    ("unknown key", lambda z, r, y, t: [{"output": z, "wieght": 2}], ["wieght"]),
    ("zero weight", lambda z, r, y, t: [(z, "mse", y, 0)], ["positive"]),
    ("target is an output", lambda z, r, y, t: [(z, "mse", r)], ["target of this network"]),
    ("no target with two", lambda z, r, y, t: [(z, "mse")], ["give the target", "2 targets"]),
    ("shape mismatch", lambda z, r, y, t: [(z, "mse", t)], ["(n, 2)", "(n,)", "size 2"]),
]


@pytest.mark.parametrize("losses,words", [b[1:] for b in BAD_LOSSES], ids=[b[0] for b in BAD_LOSSES])
def test_bad_losses(losses, words):
    net, z, r, y, t = _two_heads()
    with pytest.raises((ModelError, ShapeError)) as e:
        net.build(losses=losses(z, r, y, t))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_output_and_losses_together_are_refused():
    net, z, r, y, t = _two_heads()
    with pytest.raises(ModelError, match="not both"):
        net.build(z, "mse", y, losses=[(r, "mse", t)])


# ---- the target-shape rule ----------------------------------------------------------------------

@pytest.mark.parametrize("target_size", [None, 1])
@pytest.mark.parametrize("loss", ["mse", "bce_with_logits", "expression"])
def test_one_number_per_sample_is_n_or_n_by_1(target_size, loss):
    p, yy = sp.symbols("p y", real=True)
    kind = (p - yy) ** 4 if loss == "expression" else loss
    net = Network("rule")
    x = net.input("x", 2)
    out = net.dense(x, 1)
    m = net.build(out, kind, net.target("y", target_size))
    mod = bpc.compile_model(m).load()
    params = mod.init_params(0)
    xs, ys = np.random.default_rng(1).standard_normal((6, 2)), np.random.default_rng(2).uniform(0, 1, 6)
    z = (xs @ params["W1"] + params["b1"])[:, 0]
    per = {"mse": (z - ys) ** 2, "bce_with_logits": np.logaddexp(0, z) - ys * z, "expression": (z - ys) ** 4}
    y_arg = ys if target_size is None else ys[:, None]
    assert mod.loss(params, xs, y_arg) == pytest.approx(np.mean(per[loss]), rel=1e-12)
    assert mod.forward(params, xs).shape == (6, 1)      # the prediction keeps the output's shape


def test_a_1d_output_against_an_n_by_1_target():
    net = Network("rule")
    x = net.input("x", 2)
    out = net.param("w", (2,), ("zeros",))
    m = net.build(ir.reduce_sum(ir.ew(ir.ARG[0] * ir.ARG[1], [x, out]), (1,)), "mse", net.target("y", 1))
    assert m.loss is not None and bpc.compile_model(m).load().TARGETS == {"y": (1,)}


def test_other_target_shapes_give_the_expected_shape_and_the_reshape():
    net = Network("rule")
    out = net.dense(net.input("x", 2), 3)
    with pytest.raises(ShapeError) as e:
        net.build(out, "mse", net.target("y"))
    msg = str(e.value)
    assert "must have shape (n, 3)" in msg and "size 3" in msg and "y.reshape(len(y), 3)" in msg, msg


# ---- spec files -----------------------------------------------------------------------------------

RESIDUAL_TOML = """
[model]
name = "res"
[network]
input = { size = 3 }
target = { size = 1 }
[[network.layers]]
units = 4
activation = "tanh"
name = "h1"
[[network.layers]]
units = 4
activation = "tanh"
name = "h2"
[[network.layers]]
type = "add"
from = ["h1", "h2"]
name = "r"
[[network.layers]]
units = 1
from = "r"
"""


def _residual_api():
    net = Network("res")
    x = net.input("x", 3)
    h1 = net.dense(x, 4, "tanh", name="h1")
    r = net.add(h1, net.dense(h1, 4, "tanh", name="h2"), name="r")
    return net.build(net.dense(r, 1), "mse", net.target("y", 1))


TWO_INPUT_TOML = """
[model]
name = "two"
[network]
[[network.input]]
name = "a"
size = 3
[[network.input]]
name = "b"
size = 2
[[network.target]]
name = "y"
kind = "label"
[[network.target]]
name = "t"
size = 1
[[network.layers]]
from = "a"
units = 4
activation = "tanh"
name = "ha"
[[network.layers]]
type = "concat"
from = ["ha", "b"]
name = "c"
[[network.layers]]
units = 3
name = "logits"
[[network.layers]]
from = "c"
units = 1
name = "gate"
activation = "sigmoid"
[[network.layers]]
type = "multiply"
from = ["gate", "c"]
activation = "tanh"
[[network.layers]]
units = 1
name = "value"
[[network.losses]]
output = "logits"
target = "y"
loss = "softmax_cross_entropy"
[[network.losses]]
output = "value"
target = "t"
weight = "1/2"
"""


def _two_input_api():
    net = Network("two")
    a, b = net.input("a", 3), net.input("b", 2)
    c = net.concat(net.dense(a, 4, "tanh", name="ha"), b, name="c")
    logits = net.dense(c, 3, name="logits")
    g = net.multiply(net.dense(c, 1, "sigmoid", name="gate"), c)
    value = net.dense(net.activation(g, "tanh"), 1, name="value")
    y, t = net.target("y", kind="label"), net.target("t", 1)
    return net.build(losses=[(logits, "softmax_cross_entropy", y), (value, "mse", t, 0.5)])


def _toml_to_json(text):
    import tomllib
    return json.dumps(tomllib.loads(text))


@pytest.mark.parametrize("text,api", [(RESIDUAL_TOML, _residual_api), (TWO_INPUT_TOML, _two_input_api)],
                         ids=["residual", "two-input"])
def test_graph_specs_equal_the_python_api(text, api):
    for spec in (loads_spec(text, "m.toml", "toml"), loads_spec(_toml_to_json(text), "m.json", "json")):
        ref = replace(api(), source=spec.model.source, source_text=spec.model.source_text)
        assert bpc.compile_model(spec.model).source == bpc.compile_model(ref).source


def test_dense_names_do_not_change_with_graph_fields():
    # a layer's `name` still names its parameters (W<name>, b<name>), as in chains
    spec = loads_spec(TWO_INPUT_TOML, "m.toml", "toml")
    assert {"Wha", "bha", "Wlogits", "Wgate", "Wvalue"} <= {p.name for p in spec.model.params}


def _edit(text, old, new):
    assert old in text, old
    return text.replace(old, new, 1)


# (id, spec text, words of the SpecError: each names the field)
BAD_SPECS = [
    ("unknown from", _edit(RESIDUAL_TOML, '["h1", "h2"]', '["h1", "h9"]'),
     ["network.layers[2].from[1]", "unknown layer or input 'h9'", "known so far: x, h1, h2"]),
    ("forward reference", _edit(RESIDUAL_TOML, 'from = "r"', 'from = "r"\nname = "out"').replace(
        '["h1", "h2"]', '["h1", "out"]'),
     ["network.layers[2].from[1]", "'out' is network.layers[3], which comes later", "no cycles"]),
    ("a layer taking itself", _edit(RESIDUAL_TOML, '["h1", "h2"]', '["h1", "r"]'),
     ["network.layers[2].from[1]", "'r' is itself"]),
    ("add shapes differ", _edit(RESIDUAL_TOML, '["h1", "h2"]', '["h1", "x"]'),
     ["network.layers[2]: add of shapes (n, 4), (n, 3)"]),
    ("concat of a target", _edit(TWO_INPUT_TOML, 'from = ["ha", "b"]', 'from = ["ha", "t"]'),
     ["network.layers[1].from[1]", "unknown layer or input 't'"]),
    ("merge of one", _edit(RESIDUAL_TOML, '["h1", "h2"]', '["h1"]'),
     ["network.layers[2].from", "at least two"]),
    ("merge with units", _edit(RESIDUAL_TOML, 'type = "add"', 'type = "add"\nunits = 4'),
     ["network.layers[2].units", "no units"]),
    ("dense with two sources", _edit(RESIDUAL_TOML, 'from = "r"', 'from = ["r", "h1"]'),
     ["network.layers[3].from", "takes one value", "'add' or 'concat'"]),
    ("from not a string", _edit(RESIDUAL_TOML, 'from = "r"', 'from = 3'),
     ["network.layers[3].from", "must be a string"]),
    ("first layer of two inputs", _edit(TWO_INPUT_TOML, 'from = "a"\n', ""),
     ["network.layers[0].from", "missing", "2 inputs (a, b)"]),
    ("layer named like an input", _edit(TWO_INPUT_TOML, 'name = "ha"', 'name = "b"'),
     ["network.layers[0].name", "'b' is already the name of an input"]),
    ("unknown loss output", _edit(TWO_INPUT_TOML, 'output = "logits"', 'output = "logit"'),
     ["network.losses[0].output", "unknown layer 'logit'"]),
    ("unknown loss target", _edit(TWO_INPUT_TOML, 'target = "t"', 'target = "z"'),
     ["network.losses[1].target", "unknown target 'z'; targets: y, t"]),
    ("loss shape mismatch", _edit(TWO_INPUT_TOML, 'output = "value"', 'output = "c"'),
     ["network.losses[1]", "output shape (n, 6) and target shape (n, 1) differ"]),
    ("negative weight", _edit(TWO_INPUT_TOML, 'weight = "1/2"', "weight = -1"),
     ["network.losses[1].weight", "positive"]),
    ("target without a loss", _edit(TWO_INPUT_TOML, '[[network.losses]]\noutput = "value"\ntarget = "t"\n'
                                    'weight = "1/2"', ""),
     ["network.losses", "target(s) t have no loss"]),
    ("two targets without losses", TWO_INPUT_TOML.split("[[network.losses]]")[0],
     ["network.target", "2 targets", "[[network.losses]]"]),
    ("loss and losses", _edit(TWO_INPUT_TOML, "[network]\n", '[network]\nloss = "mse"\n'),
     ["network.loss", "not both"]),
    ("unknown loss field", _edit(TWO_INPUT_TOML, 'weight = "1/2"', "wieght = 2"),
     ["network.losses[1].wieght", "did you mean 'weight'"]),
    ("input declared twice", _edit(TWO_INPUT_TOML, 'name = "b"\nsize = 2', 'name = "a"\nsize = 2'),
     ["network.input[1].name", "declared twice"]),
    ("unnamed input of several", _edit(TWO_INPUT_TOML, 'name = "b"\nsize = 2', "size = 2"),
     ["network.input[1].name", "missing"]),
]


@pytest.mark.parametrize("text,words", [b[1:] for b in BAD_SPECS], ids=[b[0] for b in BAD_SPECS])
def test_bad_graph_specs_name_the_field(text, words):
    with pytest.raises(SpecError) as e:
        loads_spec(text, "m.toml", "toml")
    msg = str(e.value)
    assert msg.startswith("m.toml: ") and all(w in msg for w in words), msg


def test_accuracy_of_a_1_unit_output_against_a_1d_target():
    """Training's accuracy compares each sample's probability with its own target (not an
    (n, 1) against (n,) broadcast to (n, n))."""
    from compiler.train.loop import evaluate
    net = Network("binary")
    x = net.input("x", 2)
    mod = bpc.compile_model(net.build(net.dense(x, 1), "bce_with_logits", net.target("y"))).load()
    params = {"W1": np.array([[1.0], [0.0]]), "b1": np.zeros(1)}
    xs = np.array([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [-2.0, 0.0]])
    ys = np.array([1.0, 0.0, 0.0, 0.0])          # three right, one wrong
    assert evaluate(mod, params, {"x": xs, "y": ys})["accuracy"] == pytest.approx(0.75)


@pytest.mark.parametrize("weight", [2, 0.5, 1, 3, 0.25])
def test_the_gradient_formula_of_a_weighted_softmax_loss_states_its_scale(weight):
    """FORMULAS say dZ = weight*(softmax(Z) - onehot(y))/n: the text, read as arithmetic with
    the bracket as 1, gives weight/n (it once printed n/2 as '/n/2', a quarter of 2/n)."""
    import compiler as bpc
    net = bpc.Network("w")
    x = net.input("x", 3)
    h = net.dense(x, 4, "tanh")
    a, b = net.dense(h, 1), net.dense(h, 2)
    y1, y2 = net.target("y1", 1), net.target("y2", kind="label")
    model = net.build(losses=[(a, "mse", y1, 1), (b, "softmax_cross_entropy", y2, weight)])
    line = next(s for s in bpc.compile_model(model).formulas["W3"].split("; ") if s.startswith("dZ3 = "))
    rhs = line[len("dZ3 = "):].replace("(softmax(Z3) - onehot(y2))", "1")
    n = 7.0
    assert eval(rhs, {"n": n}) == pytest.approx(weight / n), line   # our own formula text, not user input


def test_loss_weights_print_as_written():
    """0.3 stays 0.3 in the generated code and formulas (not 3/10); integer weights stay integers."""
    import compiler as bpc
    net = bpc.Network("w")
    x = net.input("x", 3)
    h = net.dense(x, 4, "tanh")
    a, b = net.dense(h, 1), net.dense(h, 2)
    y1, y2 = net.target("y1", 1), net.target("y2", kind="label")
    compiled = bpc.compile_model(net.build(losses=[(a, "mse", y1, 0.3), (b, "softmax_cross_entropy", y2, 2)]))
    assert "    L = 0.3*L1 + 2*L2" in compiled.source.splitlines()
    assert "3/10" not in compiled.source
