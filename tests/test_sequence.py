"""Language models (issue 13): token ids, embeddings, sequences (n, T, d), attention and the
transformer block, on both targets.

A table of models (one head and several, causal or not, padding masks, repeated ids, a loss
mask) is checked against float64 central differences, and the C target against the NumPy
target to 1e-10. Then what the issue asks of each piece: the gradient of a future position is
exactly zero under a causal mask (and not without one), padded positions neither change nor
receive anything, no NaN from a fully masked row and no overflow at large logits, the ids
checks of the generated modules, the spec loader's fields and errors, `bpc show`'s named
formulas (dQ, dK, dV, the softmax adjoint dS) in text and LaTeX, and no Python loop in the
NumPy code. The ops themselves are rows of test_core_rules.py's op table."""
import re
from dataclasses import replace

import numpy as np
import pytest

import compiler as bpc
from compiler.errors import BpcError
from compiler.gradcheck import check_gradients, format_table
from compiler.spec.loader import SpecError, loads_spec
from mathtext_check import assert_lines_parse
from model_table import BACKENDS, NEEDS_CC

T, VOCAB, D = 6, 5, 8
BACKEND_PARAMS = [pytest.param(b, marks=NEEDS_CC if b == "c" else ()) for b in BACKENDS]


def _lm(heads=2, causal=True, mask=False, loss_mask=False, block=True, vocab=VOCAB, name="lm"):
    """ids -> embedding -> positional -> (transformer block | attention) -> layernorm -> logits."""
    net = bpc.Network(name)
    x = net.input("x", kind="ids", length=T)
    m = net.input("m", T) if mask or loss_mask else None
    h = net.positional(net.embedding(x, vocab, D))
    if block:
        h = net.transformer_block(h, heads, mlp=12, causal=causal, mask=m if mask else None)
    else:
        h = net.attention(h, heads, causal=causal, mask=m if mask else None)
    z = net.dense(net.layernorm(h), vocab)
    return net.build(z, "softmax_cross_entropy", net.target("y", kind="label", length=T),
                     loss_mask=m if loss_mask else None)


MODELS = {
    "one_head": lambda: _lm(heads=1, block=False),
    "four_heads": lambda: _lm(heads=4, block=False),
    "not_causal": lambda: _lm(causal=False, block=False),
    "padding_mask": lambda: _lm(mask=True, loss_mask=True, block=False),
    "block_causal": lambda: _lm(),
    "block_mask_not_causal": lambda: _lm(causal=False, mask=True),
    "block_loss_mask": lambda: _lm(loss_mask=True),
    "repeated_ids": lambda: _lm(vocab=2, block=False),     # six ids of two kinds: every row repeats
}


def _load(model, backend):
    if backend == "numpy":
        return bpc.compile_model(model, "float64").load()
    return bpc.compile_model_c(model, dtype="float64").load()


def _batch(module, seed, n=3):
    """(params, arrays) for ``module``: random params, ids, labels, and a padding mask whose last
    positions are 0 (a different number per sample, one sample unpadded)."""
    rng = np.random.default_rng(seed)
    params = {k: 0.7 * rng.standard_normal(s) for k, s in module.PARAMS.items()}
    arrays = []
    for name in module.INPUTS:
        if name == "x":
            arrays.append(rng.integers(0, module.VOCAB["x"], size=(n, T)))
        else:
            arrays.append(np.array([[1.0] * (T - k) + [0.0] * k for k in range(n)]))
    arrays.append(rng.integers(0, module.CLASSES["y"], size=(n, T)))
    return params, arrays


@pytest.mark.parametrize("model", sorted(MODELS))
def test_gradients_match_central_differences(model):
    m = _load(MODELS[model](), "numpy")
    for seed in (0, 1):
        params, arrays = _batch(m, seed)
        rows = check_gradients(m, params, arrays, rtol=1e-5, atol=1e-9)
        assert rows and all(r.ok for r in rows), "\n" + format_table([r for r in rows if not r.ok])


@NEEDS_CC
@pytest.mark.parametrize("model", sorted(MODELS))
def test_c_agrees_with_numpy(model):
    built = MODELS[model]()
    py, c = _load(built, "numpy"), _load(built, "c")
    params, arrays = _batch(py, 3)
    np.testing.assert_allclose(c.forward(params, *arrays[:-1]), py.forward(params, *arrays[:-1]), rtol=0, atol=1e-10)
    (lc, gc), (lp, gp) = c.backward(params, *arrays), py.backward(params, *arrays)
    assert abs(lc - lp) <= 1e-10
    for k in gp:
        np.testing.assert_allclose(gc[k], gp[k], rtol=0, atol=1e-10, err_msg=k)


def _position_gradient(backend, causal, t):
    """d loss / d P (the positional table) when only position ``t`` carries loss (loss mask)."""
    m = _load(_lm(causal=causal, loss_mask=True, name=f"pos_{int(causal)}"), backend)
    params, (x, _, y) = _batch(m, 4)
    weights = np.zeros((3, T))
    weights[:, t] = 1.0
    _, grads = m.backward(params, x, weights, y)
    return np.abs(grads["P2"]).sum(axis=1)      # one number per position


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("t", [0, 2, T - 1])
def test_causal_attention_gives_future_positions_exactly_zero_gradient(backend, t):
    per_position = _position_gradient(backend, True, t)
    assert (per_position[t + 1:] == 0.0).all(), per_position          # exactly, not approximately
    assert (per_position[:t + 1] > 0).all(), per_position
    if t < T - 1:   # without the mask the future does reach position t: the check can fail
        assert (_position_gradient(backend, False, t)[t + 1:] > 0).all()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("model, loss_masked", [("padding_mask", True), ("block_mask_not_causal", False)])
def test_padded_positions_change_nothing_and_receive_nothing(backend, model, loss_masked):
    m = _load(MODELS[model](), backend)
    params, (x, mask, y) = _batch(m, 5)
    mask = np.ones((3, T))
    mask[:, 4:] = 0.0                                   # the last two positions of every sample
    x2 = x.copy()
    x2[:, 4:] = (x[:, 4:] + 1) % m.VOCAB["x"]           # other ids at the padded positions
    p1, p2 = m.forward(params, x, mask), m.forward(params, x2, mask)
    np.testing.assert_array_equal(p1[:, :4], p2[:, :4])
    _, grads = m.backward(params, x, mask, y)
    # with the loss weighed by the mask too, a padded position has no path to the loss at all
    assert (grads["P2"][4:] == 0.0).all() == loss_masked
    assert (grads["P2"][:4] != 0.0).all()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_fully_masked_rows_and_large_logits_stay_finite(backend):
    m = _load(MODELS["padding_mask"](), backend)
    params, (x, mask, y) = _batch(m, 6)
    mask[0] = 0.0                                       # one sample entirely padding
    params["Wq3"] = params["Wq3"] * 1e3                 # scores of order 1e6: exp would overflow
    params["Wk3"] = params["Wk3"] * 1e3
    probs = m.forward(params, x, mask)
    loss, grads = m.backward(params, x, mask, y)
    assert np.isfinite(probs).all() and np.isfinite(loss)
    assert all(np.isfinite(g).all() for g in grads.values())
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-12)


def test_one_head_equals_the_single_head_formula():
    """heads=1 computes softmax(Q K^T / sqrt(d)) V on whole rows: against NumPy written out."""
    net = bpc.Network("att1")
    x = net.input("x", kind="ids", length=T)
    h = net.embedding(x, VOCAB, D)
    out = net.attention(h, 1, causal=True)
    m = bpc.compile_model(net.build(net.dense(out, VOCAB), "softmax_cross_entropy",
                                    net.target("y", kind="label", length=T))).load()
    params, (ids, _) = _batch(m, 7)
    E = params["E1"][ids]
    q, k, v = (E @ params[f"W{c}2"] for c in "qkv")
    s = q @ k.transpose(0, 2, 1) / np.sqrt(D)
    s = np.where(np.tri(T, dtype=bool), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    att = a @ v @ params["Wo2"] + params["bo2"]
    z = att @ params["W3"] + params["b3"]
    want = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(m.forward(params, ids), want / want.sum(-1, keepdims=True), rtol=1e-12)


def test_heads_split_the_width():
    """Four heads differ from one head on the same parameters (each head has its own softmax)."""
    one, four = _load(_lm(heads=1, block=False, name="h1"), "numpy"), _load(_lm(heads=4, block=False, name="h4"), "numpy")
    params, (x, y) = _batch(one, 8)
    assert not np.allclose(one.forward(params, x), four.forward(params, x))


# ---- the generated modules' checks of token ids ------------------------------------------

BAD_IDS = [
    (lambda x: x.astype(np.float64), "x must hold integer token ids in 0..4, got dtype float64"),
    (lambda x: np.where(x == x[1, 2], 5, x), "x must hold token ids in 0..4, got 5 at x[1, 2]"),
    (lambda x: np.where(x == x[0, 0], -1, x), "x must hold token ids in 0..4, got -1 at x[0, 0]"),
    (lambda x: x[:, :4], "x must have shape (batch,) + (6,) of integer token ids, got (3, 4)"),
    (lambda x: x.astype(bool), "got dtype bool"),
    (lambda x: x.astype(str), "x must hold real numbers, got dtype <U"),
]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("bad, message", BAD_IDS)
def test_bad_ids_are_refused_with_a_clear_message(backend, bad, message):
    m = _load(_lm(block=False, name="ids_check"), backend)
    params, (x, y) = _batch(m, 9)
    x = np.where(x == 0, 1, x)      # no id equals the replaced entry by chance
    x[1, 2], x[0, 0] = 3, 2
    for call in (lambda a: m.forward(params, a), lambda a: m.loss(params, a, y), lambda a: m.backward(params, a, y)):
        with pytest.raises(ValueError) as e:
            call(bad(x))
        assert message in str(e.value)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_bad_sequence_labels_and_batches_are_refused(backend):
    m = _load(_lm(block=False, name="label_check"), backend)
    params, (x, y) = _batch(m, 10)
    y[2, 3] = VOCAB
    with pytest.raises(ValueError, match=r"y must hold labels in 0\.\.4, got 5 at y\[2, 3\]"):
        m.backward(params, x, y)
    with pytest.raises(ValueError, match="different batch sizes"):
        m.loss(params, x, y[:2] % VOCAB)
    with pytest.raises(ValueError, match="the batch is empty"):
        m.forward(params, x[:0])
    assert m.VOCAB == {"x": VOCAB} and m.INPUTS == {"x": (T,)} and m.TARGETS == {"y": (T,)}


def test_ids_reach_only_embeddings():
    net = bpc.Network("raw_ids")
    x = net.input("x", kind="ids", length=T)
    with pytest.raises(BpcError, match="embed token ids first"):
        net.dense(x, 3)
    h = net.embedding(x, VOCAB, D)
    z = net.dense(h * (x * 2), VOCAB)                # the ids as numbers: refused at compile time
    model = net.build(z, "softmax_cross_entropy", net.target("y", kind="label", length=T))
    with pytest.raises(BpcError, match="input 'x' holds integer token ids; feed it to an embedding"):
        bpc.compile_model(model)


# ---- the Python API's errors -------------------------------------------------------------

def _seq_net():
    net = bpc.Network("e")
    x = net.input("x", kind="ids", length=T)
    return net, x, net.embedding(x, VOCAB, D)


API_ERRORS = [
    (lambda: bpc.Network("e").input("x", 3, kind="ids"), "give length, not size or shape"),
    (lambda: bpc.Network("e").input("x", kind="ids"), "length must be a positive integer, got None"),
    (lambda: bpc.Network("e").input("x", kind="tokens", length=3), "kind must be 'real' or 'ids'"),
    (lambda: bpc.Network("e").input("x", length=3), "length is the number of token ids"),
    (lambda: bpc.Network("e").target("y", length=3), "length is for labels of a sequence"),
    (lambda: _seq_net()[0].embedding(_seq_net()[0].input("r", 3), 4, 2), "reads an input of token ids"),
    (lambda: _seq_net()[0].embedding(_seq_net()[1], 0, 2), "embedding vocab must be a positive integer"),
    (lambda: (lambda n, x, h: n.attention(h, 3))(*_seq_net()), "cannot be split into 3 heads"),
    (lambda: (lambda n, x, h: n.attention(h, 2, causal="yes"))(*_seq_net()), "causal must be true or false"),
    (lambda: (lambda n, x, h: n.attention(h, 2, mask=n.input("m", 3)))(*_seq_net()), "an attention mask is an input of shape (n, 6)"),
    (lambda: (lambda n, x, h: n.attention(n.input("r", 4), 2))(*_seq_net()), "attention needs a batch of sequences (n, T, d)"),
    (lambda: (lambda n, x, h: n.attention(x, 2))(*_seq_net()), "embed token ids first"),
    (lambda: (lambda n, x, h: n.positional(h, length=4))(*_seq_net()), "they must be equal"),
    (lambda: (lambda n, x, h: n.transformer_block(h, 2, mlp=0))(*_seq_net()), "transformer block mlp must be a positive integer"),
    (lambda: (lambda n, x, h: n.build(n.dense(h, 4), "softmax_cross_entropy", n.target("y", kind="label")))(*_seq_net()),
     "needs labels of shape (n, 6)"),
    (lambda: (lambda n, x, h: n.build(n.dense(h, 4), "mse", n.target("y", 4), loss_mask=n.input("m", T)))(*_seq_net()),
     "loss_mask weighs the positions of softmax cross-entropy over sequences"),
    (lambda: (lambda n, x, h: n.build(n.dense(h, 4), "softmax_cross_entropy", n.target("y", kind="label", length=T),
                                      loss_mask=n.input("m", 3)))(*_seq_net()), "loss_mask must be an input of shape (n, 6)"),
]


@pytest.mark.parametrize("call, message", API_ERRORS)
def test_api_errors(call, message):
    with pytest.raises(BpcError) as e:
        call()
    assert message in str(e.value)


# ---- spec files --------------------------------------------------------------------------

SPEC = """
[model]
name = "m"
[network]
input = [{{ name = "x", kind = "ids", length = 6 }}, {{ name = "m", size = 6 }}]
target = {{ name = "y", kind = "label", length = 6 }}
loss = "softmax_cross_entropy"
loss_mask = "m"
[[network.layers]]
type = "embedding"
vocab = 5
dim = 8
from = "x"
[[network.layers]]
type = "positional"
[[network.layers]]
type = "transformer_block"
heads = 2
mlp = 12
causal = true
mask = "m"
{extra}
[[network.layers]]
type = "layernorm"
[[network.layers]]
units = 5
"""


def test_spec_equals_the_python_api():
    spec = loads_spec(SPEC.format(extra=""), "m.toml")
    net = bpc.Network("m")
    x, m = net.input("x", kind="ids", length=6), net.input("m", 6)
    h = net.transformer_block(net.positional(net.embedding(x, 5, 8)), 2, 12, causal=True, mask=m)
    api = net.build(net.dense(net.layernorm(h), 5), "softmax_cross_entropy",
                    net.target("y", kind="label", length=6), loss_mask=m)
    api = replace(api, source=spec.model.source, source_text=spec.model.source_text)
    assert bpc.compile_model(spec.model).source == bpc.compile_model(api).source


SPEC_ERRORS = [
    ("[[network.layers]]\ntype = \"embedding\"\ndim = 4", "network.layers[3].vocab: missing"),
    ("[[network.layers]]\ntype = \"attention\"\nheads = 2\nunits = 3", "network.layers[3].units: an attention layer has no 'units'"),
    ("[[network.layers]]\ntype = \"attention\"\nheads = 3", "network.layers[3]: attention over 8 features cannot be split into 3 heads"),
    ("[[network.layers]]\ntype = \"attention\"\nheads = 2\ncausal = 1", "network.layers[3].causal: must be true or false"),
    ("[[network.layers]]\ntype = \"attention\"\nheads = 2\nmask = \"q\"", "network.layers[3].mask: unknown input 'q'"),
    ("[[network.layers]]\ntype = \"attention\"\nheads = 2\nmlp = 4", "network.layers[3].mlp: only transformer_block layers take mlp"),
    ("[[network.layers]]\ntype = \"dense\"\nunits = 4\nheads = 2", "network.layers[3].heads: only attention and transformer_block layers take heads"),
    ("[[network.layers]]\ntype = \"positional\"\nlength = 7", "network.layers[3]: positional embedding of length 7"),
    ("[[network.layers]]\ntype = \"transformer_block\"\nheads = 2", "network.layers[3].mlp: missing"),
    ("[[network.layers]]\ntype = \"embedding\"\nvocab = 5\ndim = 4", "an embedding reads an input of token ids"),
]


@pytest.mark.parametrize("extra, message", SPEC_ERRORS)
def test_spec_layer_errors(extra, message):
    with pytest.raises(SpecError) as e:
        loads_spec(SPEC.format(extra=extra), "m.toml")
    assert str(e.value).startswith("m.toml: ") and message in str(e.value)


@pytest.mark.parametrize("old, new, message", [
    ('{ name = "x", kind = "ids", length = 6 }', '{ name = "x", kind = "ids", size = 6 }', "network.input[0].size: an input of token ids has a length"),
    ('{ name = "x", kind = "ids", length = 6 }', '{ name = "x", kind = "ids" }', "network.input[0].length: missing"),
    ('{ name = "x", kind = "ids", length = 6 }', '{ name = "x", kind = "words", length = 6 }', "network.input[0].kind: must be 'real' or 'ids'"),
    ('{ name = "m", size = 6 }', '{ name = "m", length = 6 }', "network.input[1].length: only an input of token ids"),
    ('{ name = "x", kind = "ids", length = 6 }', '{ name = "x", kind = "ids", length = 0 }', "network.input[0].length: must be an integer from 1"),
    ('kind = "label", length = 6', 'kind = "real", length = 6', "network.target.length: only labels of a sequence"),
    ('kind = "label", length = 6', 'kind = "label", length = 5', "network.loss: softmax cross-entropy over sequences needs labels of shape (n, 6)"),
    ('loss_mask = "m"', 'loss_mask = "z"', "network.loss_mask: unknown input 'z'"),
])
def test_spec_field_errors(old, new, message):
    text = SPEC.format(extra="")
    assert old in text
    with pytest.raises(SpecError) as e:
        loads_spec(text.replace(old, new), "m.toml")
    assert str(e.value).startswith("m.toml: ") and message in str(e.value)


# ---- formulas and generated code ---------------------------------------------------------

def test_show_names_dq_dk_dv_and_the_softmax_adjoint():
    compiled = bpc.compile_model(_lm(causal=True, block=False))
    text = {p: compiled.formulas[p] for p in ("Wq3", "Wk3", "Wv3")}
    assert "dQ3 = dQK3 @ K3" in text["Wq3"]
    assert "dK3 = dQK3.mT @ Q3" in text["Wk3"]
    assert "dV3 = A3.mT @ dO3" in text["Wv3"]
    assert "dA3 = dO3 @ V3.mT" in text["Wq3"]
    assert "dS3 = A3*(dA3 - " in text["Wq3"]                      # the softmax adjoint
    assert "dSc3 = causal_mask(dS3, fill=0)" in text["Wq3"]
    assert "dE1 = scatter_add(x, " in compiled.formulas["E1"]
    for p in ("Wq3", "Wk3", "Wv3", "E1"):
        assert_lines_parse(compiled.latex[p].split(r" \\ "))
    latex = compiled.latex["Wq3"]
    assert r"\mathrm{dQ}_{3} = \mathrm{dQK}_{3} K_{3}" in latex
    assert r"\mathrm{dS}_{3} = A_{3} \odot" in latex


def test_numpy_code_has_no_python_loop():
    source = bpc.compile_model(_lm(mask=True, loss_mask=True)).source
    for fn in ("def forward", "def loss", "def backward"):
        body = source[source.index(fn):].split("\n\n\n")[0]
        assert not re.search(r"^\s*(for|while)\b", body, re.M), fn
    assert "np.add.at(" in source                                # the scatter-add of repeated ids


@NEEDS_CC
def test_masks_in_float32_on_both_targets():
    """The padding and causal masks (fill -1e9) in float32: NumPy and C against float64."""
    from model_table import float32_mismatches
    built = _lm(mask=True, loss_mask=True, name="f32")
    ref = _load(built, "numpy")
    params, arrays = _batch(ref, 12)
    params32 = {k: v.astype(np.float32) for k, v in params.items()}
    arrays32 = [a.astype(np.float32) if a.dtype.kind == "f" else a for a in arrays]
    for module in (bpc.compile_model(built, "float32").load(), bpc.compile_model_c(built, dtype="float32").load()):
        assert float32_mismatches(module, ref, params32, arrays32) == []
        assert module.forward(params32, *arrays32[:-1]).dtype == np.float32


# ---- bpc train's data checks, accuracy and evaluation in chunks ----------------------------

def test_training_data_of_token_ids():
    from compiler.train.loop import TrainError, check_data, evaluate
    m = _load(_lm(block=False, name="train_ids"), "numpy")
    params, (x, y) = _batch(m, 11, n=4)
    data = check_data(m, {"x": x.astype(np.uint8), "y": y.astype(np.uint8)}, "d.npz")
    assert data["x"].dtype.kind == "u" and data["y"].shape == (4, T)
    pred = m.forward(params, x)
    want = float(np.mean(np.argmax(pred, axis=-1) == y))
    assert evaluate(m, params, data)["accuracy"] == pytest.approx(want)
    # chunks count positions: 2*T positions are two sequences a chunk, the same loss as one call
    assert evaluate(m, params, data, chunk=2 * T)["loss"] == pytest.approx(m.loss(params, x, y), rel=1e-12)
    assert evaluate(m, params, data, chunk=1)["loss"] == pytest.approx(m.loss(params, x, y), rel=1e-12)
    for arrays, message in [
        ({"x": x.astype(float), "y": y}, "d.npz: x must hold integer token ids in 0..4, got dtype float64"),
        ({"x": np.where(x == x[3, 5], 9, x), "y": y}, "d.npz: x must hold token ids in 0..4, got 9"),
        ({"x": x, "y": np.full_like(y, 7)}, "d.npz: y must hold labels in 0..4, got 7 at y[0, 0]"),
        ({"x": x[:, :3], "y": y}, "d.npz: array 'x' must have shape (samples,) + (6,), got (4, 3)"),
    ]:
        with pytest.raises(TrainError) as e:
            check_data(m, arrays, "d.npz")
        assert message in str(e.value)
