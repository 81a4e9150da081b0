"""DP-SGD (issue 16, item 2): the RDP accountant against published values, the private
gradient's clipping, noise and seeding, and `bpc train --dp-clip C --dp-noise SIGMA` on both
targets, with the accounting reported."""
import math

import numpy as np
import pytest

import compiler as bpc
from compiler.cli import main
from compiler.train import privacy
from compiler.train.loop import TrainConfig, TrainError, train
from model_table import NEEDS_CC, build, perturbed


# Google's dp_accounting (rdp_privacy_accountant_test.py): q = 0.01, sigma = 2.5, 50 steps
@pytest.mark.parametrize("order, value", [(5, 2.18075656e-03), (50, 2.38460375e-02), (100, 1.67416308e02)])
def test_rdp_of_the_sampled_gaussian_matches_dp_accounting(order, value):
    assert 50 * privacy.rdp_sampled_gaussian(0.01, 2.5, order) == pytest.approx(value, rel=1e-6)


def test_epsilon_conversion_matches_dp_accounting():
    # dp_accounting's pure-DP case: RDP 1.1 at every order 2..32, delta 1e-5 -> 1.32783806176 at order 32
    orders = range(2, 33)
    best = min((1.1 + math.log1p(-1 / a) - (math.log(1e-5) + math.log(a)) / (a - 1), a) for a in orders)
    assert best[0] == pytest.approx(1.32783806176, rel=1e-10) and best[1] == 32
    # the Gaussian mechanism (q = 1) with sigma 4.530877117 is (1, 1e-6)-DP (ibid.; their orders are
    # finer than integers, so the integer orders give a slightly larger epsilon)
    eps, _ = privacy.epsilon(1.0, 4.530877117, 1, 1e-6)
    assert 1.0 <= eps < 1.0 + 1e-5


def test_accounting_behaves():
    q, sigma = 256 / 60000, 1.1
    e1 = privacy.epsilon(q, sigma, 1000, 1e-5)[0]
    assert privacy.epsilon(q, sigma, 2000, 1e-5)[0] > e1                 # more steps, more loss
    assert privacy.epsilon(q, 2 * sigma, 1000, 1e-5)[0] < e1             # more noise, less
    assert privacy.epsilon(q, sigma, 1000, 1e-7)[0] > e1                 # smaller delta, larger epsilon
    assert privacy.epsilon(q, sigma, 0, 1e-5)[0] == 0.0
    assert privacy.epsilon(q, 0.0, 10, 1e-5)[0] == math.inf              # no noise: no privacy
    assert privacy.rdp_sampled_gaussian(1.0, 2.0, 7) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="delta"):
        privacy.epsilon(q, sigma, 10, 1.5)


def test_private_gradient_clips_each_sample_then_noises_the_sum():
    g = {"w": np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]), "b": np.array([0.0, 0.0, 0.0])}
    out, clipped = privacy.private_gradient(g, 1.0, 0.0, np.random.default_rng(0))
    # sample 0 (norm 5) is scaled to norm 1, sample 1 (0.5) kept, sample 2 (0) kept; mean over 3
    assert np.allclose(out["w"], (np.array([0.6, 0.8]) + np.array([0.3, 0.4])) / 3)
    assert clipped == pytest.approx(1 / 3)
    # the norm is over all parameters together
    g2 = {"w": np.array([[3.0]]), "b": np.array([4.0])}
    out2, _ = privacy.private_gradient(g2, 1.0, 0.0, np.random.default_rng(0))
    assert out2["w"] == pytest.approx(0.6) and out2["b"] == pytest.approx(0.8)
    # noise: std sigma*C on the sum, /n; seeded
    big = {"w": np.zeros((4, 20000))}
    a, _ = privacy.private_gradient(big, 2.0, 1.5, np.random.default_rng(1))
    b, _ = privacy.private_gradient(big, 2.0, 1.5, np.random.default_rng(1))
    assert np.array_equal(a["w"], b["w"])
    assert np.std(a["w"]) == pytest.approx(1.5 * 2.0 / 4, rel=0.03)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=NEEDS_CC)])
def test_dp_sgd_without_noise_or_clipping_is_sgd(backend):
    mod = build("softmax_labels", backend, "float64" if backend == "c" else None)
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(40, 4)), "y": rng.integers(0, 3, size=40)}
    p0 = perturbed(mod)
    base = dict(epochs=3, batch_size=8, optimizer="sgd", lr=0.1, seed=4)
    plain = train(mod, data, TrainConfig(**base), params={k: v.copy() for k, v in p0.items()})
    dp = train(mod, data, TrainConfig(**base, dp_clip=1e9, dp_noise=0.0), params={k: v.copy() for k, v in p0.items()})
    for k in plain.params:
        assert np.allclose(plain.params[k], dp.params[k], rtol=1e-10, atol=1e-12), k
    assert dp.privacy["epsilon"] == math.inf and dp.privacy["steps"] == 15
    assert dp.privacy["sampling_rate"] == pytest.approx(8 / 40)


def test_dp_sgd_is_seeded_and_refuses_what_it_cannot_do():
    mod = build("mlp_tanh_mse")
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(30, 3)), "y": rng.normal(size=(30, 2))}
    cfg = TrainConfig(epochs=2, batch_size=10, optimizer="sgd", lr=0.05, dp_clip=0.5, dp_noise=1.0, seed=2)
    r1, r2 = train(mod, data, cfg), train(mod, data, cfg)
    assert all(np.array_equal(r1.params[k], r2.params[k]) for k in r1.params)
    expected = privacy.epsilon(10 / 30, 1.0, 6, 1e-5)[0]
    assert r1.privacy["epsilon"] == pytest.approx(expected) and "DP-SGD: (epsilon" in r1.message
    with pytest.raises(TrainError, match="needs both"):
        TrainConfig(dp_clip=1.0).validate()
    with pytest.raises(TrainError, match="clip and dp_clip"):
        TrainConfig(dp_clip=1.0, dp_noise=1.0, clip=1.0).validate()
    bn = bpc.compile_model(_bn()).load()
    with pytest.raises(TrainError, match="DP-SGD: per-example gradients are not defined .*mixes samples"):
        train(bn, {"x": rng.normal(size=(8, 3)), "y": rng.normal(size=(8, 1))}, cfg)


def _bn():
    net = bpc.Network("bn_dp")
    h = net.batchnorm(net.dense(net.input("x", 3), 4, "tanh"))
    return net.build(net.dense(h, 1), "mse", net.target("y", 1))


def test_bpc_train_reports_epsilon(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(int)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    (tmp_path / "m.toml").write_text('[model]\nname = "dpnet"\n[network]\ninput = { name = "x", size = 2 }\n'
                                     'target = { name = "y", kind = "label" }\nloss = "softmax_cross_entropy"\n'
                                     '[[network.layers]]\nunits = 8\nactivation = "tanh"\n'
                                     '[[network.layers]]\nunits = 2\n')
    code = main(["train", "m.toml", "--data", "d.npz", "--epochs", "3", "--batch-size", "10", "-q",
                 "--dp-clip", "1.0", "--dp-noise", "1.1", "--dp-delta", "1e-3", "--out", "p.npz"])
    out, err = capsys.readouterr()
    assert code == 0, err
    eps = privacy.epsilon(10 / 50, 1.1, 15, 1e-3)[0]
    assert f"DP-SGD: (epsilon {eps:.3g}, delta 0.001) after 15 steps" in out
    code = main(["train", "m.toml", "--data", "d.npz", "--epochs", "1", "-q", "--dp-clip", "1.0"])
    err = capsys.readouterr().err
    assert code == 2 and "needs both" in err
