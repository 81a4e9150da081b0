"""Image layers (conv2d, maxpool2d, avgpool2d, flatten; issue 12, item 2): forward values against
a direct NumPy evaluation (loops over pixels, written independently of im2col), on both
backends; the generated modules' checks of image inputs; the errors of bad layers; the
gradient formulas `bpc show` prints; spec files. (Adjoints against finite differences:
tests/test_core_rules.py's op table; the CNNs of tests/model_table.py on every target.)"""
import json
import re

import numpy as np
import pytest

import compiler as bpc
from compiler.cli import main as cli_main
from compiler.errors import BpcError
from compiler.gradcheck import random_batch
from compiler.spec.loader import SpecError, loads_spec
from model_table import NEEDS_CC

TARGETS = ["numpy", pytest.param("c", marks=NEEDS_CC)]


def _load(model, backend):
    if backend == "numpy":
        return bpc.compile_model(model, "float64").load()
    from compiler.backends.c.backend import compile_model_c
    return compile_model_c(model, "float64").load()


def _function_source(source, name):
    """The text of function ``name`` in a generated module's source."""
    start = source.index(f"\ndef {name}(")
    end = source.find("\ndef ", start + 1)
    return source[start:end if end >= 0 else len(source)]


# ---- an independent reference: direct loops over output pixels ------------------------------

def _pads(size, k, s, padding):
    if padding == "valid":
        return (size - k) // s + 1, 0
    out = -(-size // s)
    return out, max((out - 1) * s + k - size, 0) // 2


def ref_conv(x, W, b, kernel, stride, padding):
    n, H, Wd, C = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    (oh, pt), (ow, pl) = _pads(H, kh, sh, padding), _pads(Wd, kw, sw, padding)
    K = W.reshape(kh, kw, C, -1)
    out = np.zeros((n, oh, ow, K.shape[3]))
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for c in range(kw):
                    y, z = i * sh + a - pt, j * sw + c - pl
                    if 0 <= y < H and 0 <= z < Wd:
                        out[:, i, j] += x[:, y, z] @ K[a, c]
    return out + b


def ref_pool(x, pool, stride, reduce):
    n, H, W, C = x.shape
    oh, ow = (H - pool) // stride + 1, (W - pool) // stride + 1
    out = np.zeros((n, oh, ow, C))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = reduce(x[:, i * stride:i * stride + pool, j * stride:j * stride + pool], axis=(1, 2))
    return out


GEOMETRIES = [   # (image, filters, kernel, stride, padding)
    ((6, 5, 2), 3, (3, 3), (1, 1), "valid"),
    ((5, 5, 1), 2, (3, 3), (1, 1), "same"),
    ((7, 6, 3), 4, (2, 3), (2, 2), "same"),
    ((7, 7, 2), 2, (3, 2), (2, 3), "valid"),
    ((4, 3, 2), 2, (4, 3), (1, 1), "valid"),      # kernel = input size
]


@pytest.mark.parametrize("backend", TARGETS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[f"{g[0]}-{g[2]}-{g[3]}-{g[4]}" for g in GEOMETRIES])
def test_conv_forward_matches_direct_loops(backend, geometry):
    image, filters, kernel, stride, padding = geometry
    net = bpc.Network("conv")
    x = net.input("x", shape=image)
    h = net.conv2d(x, filters, kernel, stride=stride, padding=padding, activation="tanh")
    model = net.build(net.flatten(h), "mse", net.target("y", int(np.prod(h.shape[1:]))))
    mod = _load(model, backend)
    params = {k: v + 0.1 for k, v in mod.init_params(0).items()}
    (xb,) = random_batch(mod, batch=3, seed=1)[:1]
    want = np.tanh(ref_conv(xb, params["W1"], params["b1"], kernel, stride, padding)).reshape(3, -1)
    np.testing.assert_allclose(mod.forward(params, xb), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", TARGETS)
@pytest.mark.parametrize("kind,reduce", [("maxpool2d", np.max), ("avgpool2d", np.mean)])
@pytest.mark.parametrize("pool,stride", [(2, 2), (3, 1), (2, 3)])
def test_pool_forward_matches_direct_loops(backend, kind, reduce, pool, stride):
    net = bpc.Network("pool")
    x = net.input("x", shape=(7, 8, 2))
    h = getattr(net, kind)(x, pool, stride)
    model = net.build(net.flatten(h), "mse", net.target("y", int(np.prod(h.shape[1:]))))
    mod = _load(model, backend)
    xb = np.random.default_rng(2).standard_normal((4, 7, 8, 2))
    np.testing.assert_allclose(mod.forward({}, xb), ref_pool(xb, pool, stride, reduce).reshape(4, -1),
                               rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", TARGETS)
def test_maxpool_gradient_goes_to_the_first_maximum(backend):
    """Ties (a constant image) send each window's gradient to its first entry, on both backends."""
    net = bpc.Network("ties")
    x = net.input("x", shape=(2, 2, 1))
    h = net.flatten(net.maxpool2d(net.conv2d(x, 1, 1), 2))
    mod = _load(net.build(h, "mse", net.target("y", 1)), backend)
    params = {"W1": np.ones((1, 1)), "b1": np.zeros(1)}
    _, g = mod.backward(params, np.ones((1, 2, 2, 1)), np.zeros((1, 1)))
    # d/dW of (max of 4 equal values W*1)**2 = 2*W through one entry, not four
    np.testing.assert_allclose(g["W1"], [[2.0]])


# (image, pool, stride, whether the NumPy module keeps the windows in image layout: they tile it)
POOL_LAYOUTS = [((8, 6, 3), 2, 2, True), ((4, 6, 2), (2, 3), (2, 3), True), ((7, 6, 2), 2, 2, False),
                ((6, 6, 2), 3, 1, False), ((6, 6, 2), 2, 3, False)]


@NEEDS_CC
@pytest.mark.parametrize("case", POOL_LAYOUTS, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in POOL_LAYOUTS])
def test_maxpool_adjoint_in_every_layout_agrees_with_c(case):
    """Max pooling of a 2x2 convolution with weights in {-1, 0, 1} of images with pixels in
    {0, 1} (many ties between different windows of the input, each routed to its pool window's
    first maximum): the NumPy module, whose windows are a view of the image when they tile it
    (no im2col copy, the adjoint routed straight into the image), gives the C module's
    gradients."""
    from compiler.backends.c.backend import compile_model_c
    image, pool, stride, tiled = case
    net = bpc.Network("pool_layout")
    h = net.conv2d(net.input("x", shape=image), 3, 2, padding="same")
    h = net.conv2d(net.maxpool2d(h, pool, stride), 2, 1, activation="tanh")
    model = net.build(net.dense(net.flatten(h), 2), "mse", net.target("y", 2))
    source = bpc.compile_model(model, "float64").source
    body = _function_source(source, "backward")
    assert ("# the pool's windows tile the image: a view" in body) == tiled
    assert ("_col2im(" in body) != tiled
    numpy_mod, c_mod = bpc.compile_model(model, "float64").load(), compile_model_c(model, "float64").load()
    params = numpy_mod.init_params(3)
    rng = np.random.default_rng(6)
    params["W1"] = rng.integers(-1, 2, params["W1"].shape).astype(float)
    x, y = random_batch(numpy_mod, 4, 5)
    batch = (rng.integers(0, 2, x.shape).astype(float), y)
    (v1, g1), (v2, g2) = numpy_mod.backward(params, *batch), c_mod.backward(params, *batch)
    assert v1 == pytest.approx(v2, rel=1e-12)
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-10, atol=1e-12, err_msg=k)
    pe1, pe2 = numpy_mod.per_example_grads(params, *batch), c_mod.per_example_grads(params, *batch)
    for k in pe1[1]:
        np.testing.assert_allclose(pe1[1][k], pe2[1][k], rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("backend", TARGETS)
def test_image_inputs_are_checked(backend):
    net = bpc.Network("checked")
    x = net.input("x", shape=(4, 4, 1))
    mod = _load(net.build(net.flatten(net.avgpool2d(x, 2)), "mse", net.target("y", 4)), backend)
    assert mod.INPUTS == {"x": (4, 4, 1)}
    assert mod.forward({}, np.zeros((2, 4, 4, 1))).shape == (2, 4)
    for bad in (np.zeros((2, 16)), np.zeros((2, 4, 4)), np.zeros((2, 4, 1, 4))):
        with pytest.raises(ValueError, match=r"shape \(batch,\) \+ \(4, 4, 1\)"):
            mod.forward({}, bad)


# ---- bad layers --------------------------------------------------------------------------

def _image_net(shape=(5, 5, 1)):
    net = bpc.Network("bad")
    return net, net.input("x", shape=shape)


BAD_LAYERS = [
    ("kernel larger than input", lambda n, x: n.conv2d(x, 2, 6), r"kernel of 6 pixels is larger than the input's 5"),
    ("kernel larger, columns", lambda n, x: n.conv2d(x, 2, (1, 7)), r"7 pixels is larger than the input's 5"),
    ("stride 0", lambda n, x: n.conv2d(x, 2, 3, stride=0), r"stride must be a positive integer"),
    ("negative stride", lambda n, x: n.conv2d(x, 2, 3, stride=(1, -1)), r"stride must be a positive integer"),
    ("kernel 0", lambda n, x: n.conv2d(x, 2, 0), r"kernel must be a positive integer"),
    ("kernel triple", lambda n, x: n.conv2d(x, 2, (2, 2, 2)), r"kernel must be a positive integer or a pair"),
    ("bad padding", lambda n, x: n.conv2d(x, 2, 3, padding="full"), r"padding must be 'valid' or 'same'"),
    ("filters 0", lambda n, x: n.conv2d(x, 0, 3), r"filters must be a positive integer"),
    ("pool too big", lambda n, x: n.maxpool2d(x, 6), r"6 pixels is larger than the input's 5"),
    ("pool stride 0", lambda n, x: n.avgpool2d(x, 2, stride=0), r"stride must be a positive integer"),
    ("conv on features", lambda n, x: n.conv2d(n.flatten(x), 2, 3), r"batch of images \(n, height, width"),
    ("pool on features", lambda n, x: n.maxpool2d(n.flatten(x), 2), r"batch of images"),
    ("dense on images", lambda n, x: n.dense(x, 3), r"got \(n, 5, 5, 1\); flatten it first"),
    ("size and shape", lambda n, x: n.input("z", 3, shape=(2, 2)), r"give size or shape, not both"),
    ("empty shape", lambda n, x: n.input("z", shape=()), r"shape is empty"),
    ("zero in shape", lambda n, x: n.input("z", shape=(2, 0, 1)), r"shape dimension must be a positive"),
]


@pytest.mark.parametrize("build,message", [b[1:] for b in BAD_LAYERS], ids=[b[0] for b in BAD_LAYERS])
def test_bad_layers_are_refused(build, message):
    net, x = _image_net()
    with pytest.raises(BpcError, match=message):
        build(net, x)


# ---- formulas ------------------------------------------------------------------------------

def _two_convs():
    net = bpc.Network("convs")
    x = net.input("x", shape=(6, 6, 1))
    h = net.conv2d(x, 2, 3, activation="tanh")
    h = net.conv2d(h, 3, 2, stride=2)
    return net.build(net.flatten(h), "mse", net.target("y", 12))


def test_formulas_are_the_algebra_of_convolution():
    compiled = bpc.compile_model(_two_convs())
    w1 = compiled.formulas["W1"].split("; ")
    # rows of the adjoint -> dW2 = im2col(H1)^T @ dPW2 and dH1 = col2im(dPW2 @ W2^T)
    assert "dPW2 = reshape(dF1, (4*n, 3))" in w1     # dF1: the adjoint of the flattened output
    assert "dP2 = dPW2 @ W2.T" in w1
    assert "dH1 = col2im(dP2)" in w1
    assert w1[-1] == "dW1 = P1.T @ dPW1"
    assert compiled.formulas["W2"].split("; ")[-1] == "dW2 = P2.T @ dPW2"
    latex = compiled.latex["W1"]
    assert r"\mathrm{dH}_{1} = \operatorname{col2im}\left(\mathrm{dP}_{2}\right)" in latex
    assert r"\mathrm{dW}_{1} = P_{1}^{\top} \mathrm{dPW}_{1}" in latex
    program = compiled.program
    p1 = next(n for n in program.forward_nodes if program.names[n.uid] == "P1")
    from compiler.core.formulas import Formulas
    assert Formulas(program).line(p1) == "P1 = im2col(x)"
    assert Formulas(program).line(p1, latex=True) == r"P_{1} = \operatorname{im2col}\left(x\right)"


# ---- spec files --------------------------------------------------------------------------

CNN_TOML = """
[model]
name = "cnn"
[network]
input = { name = "x", shape = [6, 6, 1] }
target = { name = "y", kind = "label" }
loss = "softmax_cross_entropy"
[[network.layers]]
type = "conv2d"
filters = 2
kernel = 3
padding = "same"
activation = "relu"
[[network.layers]]
type = "maxpool2d"
pool = 2
[[network.layers]]
type = "conv2d"
filters = 3
kernel = [2, 1]
stride = [1, 2]
activation = "tanh"
[[network.layers]]
type = "avgpool2d"
pool = 2
stride = 1
[[network.layers]]
type = "flatten"
[[network.layers]]
units = 4
"""

CNN_JSON = {"model": {"name": "cnn"}, "network": {
    "input": {"name": "x", "shape": [6, 6, 1]}, "target": {"name": "y", "kind": "label"},
    "loss": "softmax_cross_entropy",
    "layers": [{"type": "conv2d", "filters": 2, "kernel": 3, "padding": "same", "activation": "relu"},
               {"type": "maxpool2d", "pool": 2},
               {"type": "conv2d", "filters": 3, "kernel": [2, 1], "stride": [1, 2], "activation": "tanh"},
               {"type": "avgpool2d", "pool": 2, "stride": 1}, {"type": "flatten"}, {"units": 4}]}}


def _cnn_api():
    net = bpc.Network("cnn")
    x = net.input("x", shape=(6, 6, 1))
    h = net.conv2d(x, 2, 3, padding="same", activation="relu")
    h = net.maxpool2d(h, 2)
    h = net.conv2d(h, 3, (2, 1), stride=(1, 2), activation="tanh")
    h = net.avgpool2d(h, 2, stride=1)
    z = net.dense(net.flatten(h), 4)
    return net.build(z, "softmax_cross_entropy", net.target("y", kind="label"))


def test_spec_toml_json_and_api_agree():
    from dataclasses import replace
    api = _cnn_api()
    for spec in (loads_spec(CNN_TOML, "cnn.toml"), loads_spec(json.dumps(CNN_JSON), "cnn.json", "json")):
        same = replace(api, source=spec.model.source, source_text=spec.model.source_text)
        assert bpc.compile_model(spec.model).source == bpc.compile_model(same).source
    assert [p.name for p in api.params] == ["W1", "b1", "W2", "b2", "W3", "b3"]


def _layer_spec(layer, shape="[5, 5, 1]"):
    return f"""
[network]
input = {{ shape = {shape} }}
target = {{ size = 1 }}
[[network.layers]]
{layer}
[[network.layers]]
type = "flatten"
[[network.layers]]
units = 1
"""


BAD_SPECS = [
    ('type = "conv2d"\nkernel = 3', r"layers\[0\]\.filters: missing"),
    ('type = "conv2d"\nfilters = 2', r"layers\[0\]\.kernel: missing"),
    ('type = "conv2d"\nfilters = 2\nkernel = 6', r"layers\[0\]: .*kernel of 6 pixels is larger than the input's 5"),
    ('type = "conv2d"\nfilters = 2\nkernel = 3\nstride = 0', r"layers\[0\]\.stride: must be an integer from 1"),
    ('type = "conv2d"\nfilters = 2\nkernel = [3, 3, 3]', r"layers\[0\]\.kernel: must be an integer or \[rows, columns\]"),
    ('type = "conv2d"\nfilters = 2\nkernel = 3\npadding = "full"', r"layers\[0\]\.padding: must be 'valid' or 'same'"),
    ('type = "conv2d"\nfilters = 2\nkernel = 3\npool = 2', r"layers\[0\]\.pool: only maxpool2d and avgpool2d layers take pool, not a conv2d"),
    ('units = 3\nkernel = 2', r"layers\[0\]\.kernel: only conv2d layers take kernel, not a dense layer"),
    ('type = "maxpool2d"\npool = 2\nconstants = { a = 1 }', r"layers\[0\]\.constants: a maxpool2d layer has no 'constants'"),
    ('type = "maxpool2d"', r"layers\[0\]\.pool: missing"),
    ('type = "maxpool2d"\npool = 2\nunits = 3', r"layers\[0\]\.units: a maxpool2d layer has no 'units'"),
    ('type = "avgpool2d"\npool = 2\nactivation = "tanh"', r"an avgpool2d layer has no 'activation'"),
    ('type = "flatten"\nkernel = 2', r"layers\[0\]\.kernel: only conv2d layers take kernel, not a flatten"),
    ('type = "conv3d"', r"layers\[0\]\.type: must be one of 'dense', 'activation', .*'conv2d'"),
    ('units = 3', r"layers\[1\]: .*flatten needs|layers\[0\]: dense layer needs .*flatten it first"),
]


@pytest.mark.parametrize("layer,message", BAD_SPECS, ids=[b[0].replace("\n", " ") for b in BAD_SPECS])
def test_bad_image_specs_name_the_field(layer, message):
    with pytest.raises(SpecError, match=message):
        loads_spec(_layer_spec(layer), "bad.toml")


@pytest.mark.parametrize("shape,message", [
    ("[]", r"network\.input\.shape: must be an array of 1 to 3"),
    ("[8, 8, 1, 1]", r"network\.input\.shape: must be an array of 1 to 3"),
    ("[8, 0, 1]", r"network\.input\.shape\[1\]: must be an integer from 1"),
    ('"8x8"', r"network\.input\.shape: must be an array"),
    ("[2048, 2048, 1]", r"network\.input\.shape: has 4194304 numbers per sample"),
])
def test_bad_input_shapes_are_refused(shape, message):
    with pytest.raises(SpecError, match=message):
        loads_spec(_layer_spec('type = "maxpool2d"\npool = 1', shape), "bad.toml")


def test_size_and_shape_together_are_refused():
    text = _layer_spec('type = "maxpool2d"\npool = 1').replace("shape = [5, 5, 1]", "size = 25, shape = [5, 5, 1]")
    with pytest.raises(SpecError, match=r"network\.input\.shape: give size or shape, not both"):
        loads_spec(text, "bad.toml")


def test_bpc_show_prints_col2im(tmp_path, capsys):
    spec = tmp_path / "cnn.toml"
    spec.write_text(CNN_TOML)
    assert cli_main(["show", str(spec), "--param", "W1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"dPool1 = col2im\(dP2\)\s+\(n, 3, 3, 2\)", out), out
    assert re.search(r"dW1 = P1\.T @ dPW1\s+\(9, 2\)", out), out
    assert cli_main(["show", str(spec), "--param", "W1", "--format", "latex"]) == 0
    assert r"\operatorname{col2im}" in capsys.readouterr().out


def test_flat_rows_are_reshaped_to_a_declared_image_shape(tmp_path):
    """bpc train's data rule: (n, 64) rows feed an input of shape [8, 8, 1] (row-major), and a
    size that does not agree is refused with the expected shape."""
    from compiler.train.data import load_data
    from compiler.train.loop import TrainError
    net = bpc.Network("rows")
    x = net.input("x", shape=(8, 8, 1))
    mod = bpc.compile_model(net.build(net.flatten(net.maxpool2d(x, 2)), "mse", net.target("y", 16))).load()
    flat = np.arange(3 * 64, dtype=np.float64).reshape(3, 64)
    np.savez(tmp_path / "d.npz", x=flat, y=np.zeros((3, 16)))
    data = load_data(tmp_path / "d.npz", mod)
    np.testing.assert_array_equal(data["x"], flat.reshape(3, 8, 8, 1))
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 63)), y=np.zeros((3, 16)))
    with pytest.raises(TrainError, match=r"array 'x' must have shape \(samples,\) \+ \(8, 8, 1\), got \(3, 63\)"):
        load_data(tmp_path / "bad.npz", mod)


@pytest.mark.parametrize("backend", TARGETS)
def test_image_layers_in_a_graph(backend):
    """A residual convolution (h + conv(h)) and a pooled image joined with a second input by
    concat: gradients against central differences on each backend."""
    from compiler.gradcheck import check_gradients, format_table
    net = bpc.Network("res_cnn")
    x, a = net.input("x", shape=(5, 5, 2)), net.input("a", 3)
    h = net.conv2d(x, 3, 3, padding="same", activation="tanh")
    h = net.conv2d(h, 3, 3, padding="same", activation="tanh") + h
    f = net.concat(net.flatten(net.avgpool2d(h, 2)), a)
    mod = _load(net.build(net.dense(f, 2), "mse", net.target("y", 2)), backend)
    params = mod.init_params(0)
    rows = check_gradients(mod, params, random_batch(mod, 4, 1))
    assert rows and all(r.ok for r in rows), format_table(rows)


# The NumPy statement of a convolution's input adjoint col2im(dZ @ W.T) depends on its geometry
# (compiler/core/ops/windows.py): a transposed convolution (stride 1, dZ's windows at most 3
# times the product), one product per kernel offset (otherwise), the plain scatter-add (pool windows).
INPUT_ADJOINTS = [   # (image, first filters, second filters, kernel, stride, padding, helper)
    ((5, 5, 2), 3, 3, 3, 1, "same", "_conv_transpose("),
    ((6, 5, 2), 3, 2, (3, 2), 1, "same", "_conv_transpose("),      # asymmetric 'same' padding
    ((6, 6, 1), 2, 3, 3, 1, "valid", "_col2im_product("),          # full padding would copy more
    ((6, 6, 1), 3, 1, 2, 1, "valid", "_conv_transpose("),
    ((7, 6, 2), 2, 3, 3, 2, "same", "_col2im_product("),           # stride 2
    ((4, 4, 2), 2, 2, 4, 1, "same", "_conv_transpose("),           # kernel = input size, pads 1 and 2
    ((6, 6, 1), 2, 3, (3, 2), 1, "valid", "_col2im_product("),
]


@pytest.mark.parametrize("backend", TARGETS)
@pytest.mark.parametrize("case", INPUT_ADJOINTS, ids=[f"{c[0]}-{c[3]}-{c[4]}-{c[5]}" for c in INPUT_ADJOINTS])
def test_input_adjoint_of_every_numpy_form(backend, case):
    """Two convolutions, so that the first one's gradients run through the second one's input
    adjoint: against central differences on each backend, the NumPy module using the form
    the case names."""
    from compiler.gradcheck import check_gradients, format_table
    image, f1, f2, kernel, stride, padding, helper = case
    net = bpc.Network("two_conv")
    h = net.conv2d(net.input("x", shape=image), f1, kernel, stride=stride, padding=padding, activation="tanh")
    h = net.conv2d(h, f2, kernel, stride=stride, padding=padding, activation="tanh")
    model = net.build(net.dense(net.flatten(h), 2), "mse", net.target("y", 2))
    if backend == "numpy":
        source = bpc.compile_model(model, "float64").source
        assert f"    dH1 = {helper}" in source, [line for line in source.splitlines() if "dH1 = " in line]
    mod = _load(model, backend)
    rows = check_gradients(mod, mod.init_params(0), random_batch(mod, 3, 1), entries=None)
    assert rows and all(r.ok for r in rows), format_table(rows)


def _chunked_cnn():
    """Convolutions of stride 1 ("same") and 2 ("valid"), max pooling, and a dense layer."""
    net = bpc.Network("chunked_cnn")
    h = net.conv2d(net.input("x", shape=(7, 6, 2)), 3, 3, padding="same", activation="tanh")
    h = net.conv2d(h, 4, (3, 2), stride=2, padding="valid", activation="relu")
    h = net.maxpool2d(net.conv2d(h, 4, 2, padding="same", activation="tanh"), 2)
    return net.build(net.dense(net.flatten(h), 3), "softmax_cross_entropy", net.target("y", kind="label"))


def test_convolutions_take_im2col_rows_a_chunk_of_samples_at_a_time():
    """A convolution's rows im2col(x) are never formed: _conv and _conv_weight_grad copy the
    windows of a chunk of samples at a time. With chunks of one sample (and of a few), the
    gradients still agree with central differences and with one chunk for the whole batch."""
    from compiler.gradcheck import check_gradients, format_table
    compiled = bpc.compile_model(_chunked_cnn(), "float64")
    body = _function_source(compiled.source, "backward")
    assert body.count(" = _conv(") == 3 and body.count(" = _conv_weight_grad(") == 3
    formed = re.findall(r"(\w+) = _im2col\(", body)
    assert formed == ["Pp1"], formed   # only the pooling windows
    mod = compiled.load()
    params = mod.init_params(0)
    batch = random_batch(mod, 5, 1)
    whole = mod.backward(params, *batch)
    default = mod._CHUNK_BYTES
    try:
        for chunk in (1, 2 * 42 * 8 * 8):   # one sample per chunk; two (the last chunk: one)
            mod._CHUNK_BYTES = chunk
            value, grads = mod.backward(params, *batch)
            assert value == pytest.approx(whole[0], rel=1e-13)
            for k, g in grads.items():
                np.testing.assert_allclose(g, whole[1][k], rtol=1e-11, atol=1e-13, err_msg=k)
        mod._CHUNK_BYTES = 1
        rows = check_gradients(mod, params, batch, entries=None)
        assert rows and all(r.ok for r in rows), format_table(rows)
    finally:
        mod._CHUNK_BYTES = default


def test_image_statements_never_return_a_reused_buffer():
    """Gradients, losses and predictions of a CNN (whose large intermediate values live in
    buffers reused from call to call) are not changed by a later call with other data."""
    mod = bpc.compile_model(_chunked_cnn(), "float64").load()
    params = mod.init_params(0)
    first, second = random_batch(mod, 6, 1), random_batch(mod, 6, 2)
    value, grads = mod.backward(params, *first)
    probs, per_example = mod.forward(params, first[0]), mod.per_example_grads(params, *first)
    kept = ({k: g.copy() for k, g in grads.items()}, probs.copy(),
            per_example[0].copy(), {k: g.copy() for k, g in per_example[1].items()})
    mod.backward(params, *second)
    mod.forward(params, second[0])
    mod.per_example_grads(params, *second)
    for k in grads:
        np.testing.assert_array_equal(grads[k], kept[0][k], err_msg=k)
        np.testing.assert_array_equal(per_example[1][k], kept[3][k], err_msg=k)
    np.testing.assert_array_equal(probs, kept[1])
    np.testing.assert_array_equal(per_example[0], kept[2])
    assert mod.backward(params, *first)[0] == value


def test_float32_stays_float32_through_every_image_statement():
    """A float32 CNN (padding, both input-adjoint forms, max and average pools) computes in
    float32: every gradient is float32 and matches the float64 module's to float32 precision."""
    net = bpc.Network("cnn32")
    h = net.conv2d(net.input("x", shape=(8, 8, 2)), 4, 3, padding="same", activation="relu")
    h = net.conv2d(h, 4, 3, padding="same", activation="relu")
    h = net.maxpool2d(h, 2)
    h = net.conv2d(h, 6, 3, padding="valid", activation="relu")
    h = net.avgpool2d(h, 2)
    model = net.build(net.dense(net.flatten(h), 3), "softmax_cross_entropy", net.target("y", kind="label"))
    source = bpc.compile_model(model, "float32").source
    assert "_conv_transpose(" in source and "_col2im_product(" in source
    m32, m64 = bpc.compile_model(model, "float32").load(), bpc.compile_model(model, "float64").load()
    p64 = m64.init_params(0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 8, 8, 2)), rng.integers(0, 3, 5)
    _, g64 = m64.backward(p64, x, y)
    _, g32 = m32.backward({k: v.astype(np.float32) for k, v in p64.items()}, x.astype(np.float32), y)
    for k, g in g32.items():
        assert g.dtype == np.float32, k
        np.testing.assert_allclose(g, g64[k], rtol=1e-3, atol=1e-5, err_msg=k)
