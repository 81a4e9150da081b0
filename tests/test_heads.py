"""Models of several outputs (issue 12): ``forward`` returns one prediction per distinct output,
a tuple in the order of the losses (OUTPUTS names them), on both targets; each head equals what
a one-head network with the same trunk and weights predicts; ``bpc train`` reports the accuracy
of each classifier output. (Single-output modules return one array: tests/test_generated.py
holds them byte for byte.)"""
from dataclasses import replace

import numpy as np
import pytest

import compiler as bpc
from compiler.cli import main
from compiler.spec.loader import loads_spec
from compiler.train.loop import evaluate
from model_table import NEEDS_CC

# a shared trunk, a regression head ("value", MSE against t) and a classifier head ("digit",
# softmax cross-entropy against labels y); the regression head is scored first
HEADS_TOML = """
[model]
name = "heads"
[network]
input = { name = "x", size = 4 }
[[network.target]]
name = "t"
size = 1
[[network.target]]
name = "y"
kind = "label"
[[network.layers]]
units = 6
activation = "tanh"
name = "trunk"
[[network.layers]]
from = "trunk"
units = 1
name = "value"
[[network.layers]]
from = "trunk"
units = 3
name = "digit"
[[network.losses]]
output = "value"
target = "t"
[[network.losses]]
output = "digit"
target = "y"
loss = "softmax_cross_entropy"
weight = 0.5
[train]
optimizer = "adam"
lr = 0.05
batch_size = 16
epochs = 30
val_split = 0.25
"""


def _network(heads=("value", "digit")):
    """The model of HEADS_TOML built in Python, with the losses of ``heads`` alone (in that order)."""
    net = bpc.Network("heads")
    h = net.dense(net.input("x", 4), 6, "tanh", name="trunk")
    outputs = {"value": net.dense(h, 1, name="value"), "digit": net.dense(h, 3, name="digit")}
    targets = {"value": net.target("t", 1) if "value" in heads else None,
               "digit": net.target("y", kind="label") if "digit" in heads else None}
    losses = {"value": (outputs["value"], "mse", targets["value"]),
              "digit": (outputs["digit"], "softmax_cross_entropy", targets["digit"], 0.5)}
    if len(heads) == 1:
        return net.build(*losses[heads[0]][:3])
    return net.build(losses=[losses[k] for k in heads])


def _from_spec():
    return loads_spec(HEADS_TOML, "heads.toml", "toml").model


def _load(model, target):
    if target == "c":
        return bpc.compile_model_c(model, "float64").load()
    return bpc.compile_model(model).load()


def _data(n=9, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 4)), rng.standard_normal((n, 1)), rng.integers(0, 3, n)


def _perturbed(module, seed=1):
    """Parameters with nonzero biases (init_params zeroes them)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape) * 0.7 for k, v in module.init_params(0).items()}


def test_the_spec_builds_the_python_model():
    spec = _from_spec()
    ref = replace(_network(), source=spec.source, source_text=spec.source_text)
    assert bpc.compile_model(spec).source == bpc.compile_model(ref).source


# (source of the model, target)
ROWS = [pytest.param(make, target, id=f"{name}-{target}", marks=NEEDS_CC if target == "c" else ())
        for name, make in (("python", _network), ("toml", _from_spec)) for target in ("numpy", "c")]


@pytest.mark.parametrize("make,target", ROWS)
def test_forward_returns_each_head_as_its_one_head_network_does(make, target):
    m = _load(make(), target)
    assert m.OUTPUTS == ("value", "digit")
    assert m.OUTPUT_LOSSES == {"value": "mse", "digit": "softmax_cross_entropy"}
    assert m.OUTPUT_TARGETS == {"value": "t", "digit": "y"}
    assert m.LOSS == "mse"       # the first loss's, as before
    params = _perturbed(m)
    x, t, y = _data()
    out = m.forward(params, x)
    assert isinstance(out, tuple) and [a.shape for a in out] == [(9, 1), (9, 3)]
    assert all(a.dtype == np.float64 for a in out)
    total = 0.0
    for k, name in enumerate(m.OUTPUTS):
        one = _load(_network((name,)), "numpy")
        assert not hasattr(one, "OUTPUTS")
        mine = {p: params[p] for p in one.PARAMS}
        want = one.forward(mine, x)
        assert isinstance(want, np.ndarray)
        np.testing.assert_allclose(out[k], want, rtol=1e-12, atol=1e-15)
        total += (0.5 if name == "digit" else 1.0) * one.loss(mine, x, t if name == "value" else y)
    assert m.loss(params, x, t, y) == pytest.approx(total, rel=1e-12)


@NEEDS_CC
@pytest.mark.parametrize("make", [_network, _from_spec], ids=["python", "toml"])
def test_c_and_numpy_forward_agree(make):
    model = make()
    npm, cm = _load(model, "numpy"), _load(model, "c")
    assert cm.OUTPUTS == npm.OUTPUTS and cm.OUTPUT_LOSSES == npm.OUTPUT_LOSSES
    assert cm.OUTPUT_TARGETS == npm.OUTPUT_TARGETS
    params = _perturbed(npm, 3)
    for n in (1, 5, 300):       # 300: past the C wrapper's stack scratch
        x = _data(n, n)[0]
        got, want = cm.forward(params, x), npm.forward(params, x)
        assert isinstance(got, tuple) and len(got) == len(want) == 2
        for a, b in zip(got, want):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        assert not np.shares_memory(got[0], cm.forward(params, x)[0])    # fresh arrays on every call


# (id, losses over outputs z (2 units), r (1 unit) and targets, OUTPUTS, what each output predicts)
SCORED_TWICE = [
    ("first loss predicts", lambda z, r, tz, tr, lab: [(z, "mse", tz), (r, "mse", tr), (z, "softmax_cross_entropy", lab)],
     ("Z2", "Z3"), ("logits", "value")),
    ("softmax first", lambda z, r, tz, tr, lab: [(z, "softmax_cross_entropy", lab), (r, "mse", tr), (z, "mse", tz)],
     ("Z2", "Z3"), ("probabilities", "value")),
    ("one output, two losses", lambda z, r, tz, tr, lab: [(z, "mse", tz), (z, "softmax_cross_entropy", lab)],
     None, ("logits",)),
]


@pytest.mark.parametrize("losses,outputs,kinds", [s[1:] for s in SCORED_TWICE], ids=[s[0] for s in SCORED_TWICE])
def test_an_output_scored_twice_is_returned_once_at_its_first_position(losses, outputs, kinds):
    net = bpc.Network("twice")
    x = net.input("x", 3)
    h = net.dense(x, 4, "tanh")
    z, r = net.dense(h, 2), net.dense(h, 1)
    tz, tr, lab = net.target("tz", 2), net.target("tr", 1), net.target("lab", kind="label")
    model = net.build(losses=losses(z, r, tz, tr, lab))
    m = bpc.compile_model(model).load()
    assert getattr(m, "OUTPUTS", None) == outputs
    params = _perturbed(m)
    xs = _data(5)[0][:, :3]
    out = m.forward(params, xs)
    out = out if outputs else (out,)
    hidden = np.tanh(xs @ params["W1"] + params["b1"])
    logits = hidden @ params["W2"] + params["b2"]
    value = hidden @ params["W3"] + params["b3"] if "W3" in params else None    # (r unused: no W3)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    want = {"logits": logits, "value": value, "probabilities": e / e.sum(axis=1, keepdims=True)}
    assert len(out) == len(kinds)
    for got, kind in zip(out, kinds):
        np.testing.assert_allclose(got, want[kind], rtol=1e-12)


def test_interface_says_what_forward_returns():
    compiled = bpc.compile_model(_network())
    m = compiled.load()
    for doc in (m.__doc__, m.forward.__doc__):
        assert "a tuple of 2 arrays, one per output of OUTPUTS: value (n, 1), the model output; " \
               "digit (n, 3), class probabilities (softmax of the logits)" in " ".join(doc.split())
    assert 'OUTPUTS = (\'value\', \'digit\')' in compiled.source
    from compiler.backends.show import render
    text = render(compiled.model, compiled.program)
    assert "outputs:    value = Zvalue (n, 1) (mse, target t), digit = P (n, 3) (softmax_cross_entropy, target y)" in text


@NEEDS_CC
def test_c_header_and_wrapper_say_where_each_output_is():
    c = bpc.compile_model_c(_network(), "float64")
    assert "value (n, 1) at out, digit (n, 3) at out + 1*n" in " ".join(c.header.split())
    assert "a tuple of 2 arrays" in c.wrapper_source and "OUTPUTS = ('value', 'digit')" in c.wrapper_source


def test_evaluate_scores_each_classifier_output():
    m = _load(_network(), "numpy")
    params = _perturbed(m)
    x, t, y = _data(40, 2)
    ev = evaluate(m, params, {"x": x, "t": t, "y": y}, chunk=16)   # several chunks
    probs = m.forward(params, x)[1]
    assert ev["accuracy"] is None and list(ev["accuracies"]) == ["digit"]
    assert ev["accuracies"]["digit"] == pytest.approx(np.mean(np.argmax(probs, axis=1) == y), abs=1e-15)
    assert ev["loss"] == pytest.approx(m.loss(params, x, t, y), rel=1e-12)


@pytest.mark.parametrize("target", ["numpy", pytest.param("c", marks=NEEDS_CC)])
def test_bpc_train_reports_each_head(tmp_path, monkeypatch, capsys, target):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "heads.toml").write_text(HEADS_TOML)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 4))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5)
    t = x[:, 2:3] - 0.5 * x[:, 3:4]
    np.savez(tmp_path / "train.npz", x=x, t=t, y=y)
    np.savez(tmp_path / "test.npz", x=x[:40], t=t[:40], y=y[:40])
    code = main(["train", "heads.toml", "--data", "train.npz", "--test", "test.npz", "--target", target,
                 "--out", "p.npz", "--history", "h.json"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, err
    import re
    for row in ("training", "validation", "test"):
        line = next(s for s in out.splitlines() if s.startswith(f"  {row} "))
        match = re.search(r"accuracy digit (\d+\.\d+)%", line)
        assert match and "accuracy value" not in line, line
        assert float(match.group(1)) > 60, line      # three blobs split by two lines: learnt
    assert re.search(r"val acc digit \d+\.\d+%", out), out            # the epoch lines
    import json
    history = json.loads((tmp_path / "h.json").read_text())
    assert len(history["val_accuracies"]["digit"]) == len(history["epoch"]) and not history["val_accuracy"]


@pytest.mark.parametrize("target", ["numpy", pytest.param("c", marks=NEEDS_CC)])
def test_an_output_that_feeds_another_is_returned_unchanged(target):
    """A head computed from another head's value (the trunk itself scored): neither target may
    compute the second in the first's returned memory."""
    net = bpc.Network("feeds")
    x = net.input("x", 3)
    h = net.dense(x, 40, "tanh", name="trunk")     # 40 wide: the NumPy module's in-place sizes
    z = net.dense(net.activation(h, "sigmoid"), 2, name="top")
    m = _load(net.build(losses=[(h, "mse", net.target("t", 40)), (z, "bce_with_logits", net.target("f", 2))]),
              target)
    assert m.OUTPUTS == ("trunk", "top")
    params = _perturbed(m)
    xs = _data(7)[0][:, :3]
    trunk, top = m.forward(params, xs)
    want = np.tanh(xs @ params["Wtrunk"] + params["btrunk"])
    logits = (1 / (1 + np.exp(-want))) @ params["Wtop"] + params["btop"]
    np.testing.assert_allclose(trunk, want, rtol=1e-12)
    np.testing.assert_allclose(top, 1 / (1 + np.exp(-logits)), rtol=1e-12)


def test_a_checkpoint_keeps_each_heads_history_and_resumes(tmp_path):
    from compiler.train import TrainConfig, load_checkpoint, train
    m = _load(_network(), "numpy")
    x, t, y = _data(48, 4)
    data = {"x": x, "t": t, "y": y}
    config = TrainConfig(optimizer="adam", lr=0.02, epochs=4, batch_size=16, val_split=0.25)
    whole = train(m, data, config)
    ckpt = tmp_path / "run.ckpt.npz"
    train(m, data, replace(config, epochs=2), checkpoint=ckpt, checkpoint_every=1)
    saved = load_checkpoint(m, ckpt)
    assert list(saved.history.val_accuracies) == ["digit"] and len(saved.history.val_accuracies["digit"]) == 2
    # the checkpoint of a bpc before several outputs (no val_accuracies) still loads
    import json
    from compiler.train.loop import CHECKPOINT_KEY
    with np.load(ckpt) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays[CHECKPOINT_KEY]))
    del meta["history"]["val_accuracies"]
    np.savez(tmp_path / "old.ckpt.npz", **{**arrays, CHECKPOINT_KEY: np.array(json.dumps(meta))})
    assert load_checkpoint(m, tmp_path / "old.ckpt.npz").history.val_accuracies == {}
    resumed = train(m, data, config, resume=saved)
    assert resumed.history.val_accuracies == whole.history.val_accuracies
    assert len(whole.history.val_accuracies["digit"]) == 4 and not whole.history.val_accuracy
    assert list(resumed.final["val_accuracies"]) == ["digit"] and resumed.final["val_accuracy"] is None


@NEEDS_CC
def test_heads_with_batchnorm_and_dropout_agree_on_both_targets():
    """Several outputs beside the running statistics (stats_out) and dropout masks of the C
    functions: the same predictions and next statistics as NumPy, in both modes."""
    net = bpc.Network("heads_bn")
    h = net.dropout(net.batchnorm(net.dense(net.input("x", 4), 5, "tanh")), 0.3)
    model = net.build(losses=[(net.dense(h, 2, name="a"), "mse", net.target("t", 2)),
                              (net.dense(h, 3, name="b"), "softmax_cross_entropy", net.target("y", kind="label"))])
    mn, mc = _load(model, "numpy"), _load(model, "c")
    params = _perturbed(mn, 5)
    x = _data(6, 5)[0]
    sn, sc = mn.init_stats(), mc.init_stats()
    for training in (True, False, True):
        fn = mn.forward(params, x, training=training, seed=2, stats=sn)
        fc = mc.forward(params, x, training=training, seed=2, stats=sc)
        assert len(fn) == len(fc) == 2
        for a, b in zip(fc, fn):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        for k in sn:
            np.testing.assert_allclose(sc[k], sn[k], rtol=1e-10, atol=1e-12)
    assert not all(np.allclose(v, mn.init_stats()[k]) for k, v in sn.items())     # training mode moved them
