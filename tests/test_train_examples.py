"""The training examples of docs/training.md and README.md, run end to end as a user runs them (the
`bpc train` command in a fresh interpreter), with their claims checked: the cubic equals
numpy.polyfit's, digits reach >= 96% test accuracy in well under a minute, the spirals are
separated and their decision boundary is drawn. Plus: the committed data files are what
examples/make_data.py writes."""
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples"
DATA = EX / "data"


def bpc_train(tmp_path, *argv):
    """Train as a user does; returns (stdout, wall seconds). Training times are claims of the README
    measured by benchmarks, not asserted here: a loaded machine would fail a correct run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "compiler", "train", *map(str, argv)], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return r.stdout, time.monotonic() - start


def accuracy(out, split):
    return float(re.search(rf"^\s*{split}\s+loss \S+\s+accuracy ([\d.]+)%", out, re.M).group(1))


def test_polynomial_fit_matches_polyfit(tmp_path):
    out, _ = bpc_train(tmp_path, EX / "train_poly.toml", "--data", DATA / "poly_noisy.csv", "--out", "poly.npz")
    assert "completed 1000 epochs" in out
    data = np.loadtxt(DATA / "poly_noisy.csv", delimiter=",", skiprows=1)
    reference = np.polyfit(data[:, 0], data[:, 1], 3)
    with np.load(tmp_path / "poly.npz") as p:
        fitted = np.array([float(p[k]) for k in "abcd"])
    np.testing.assert_allclose(fitted, reference, rtol=0, atol=1e-9)       # the claim is 1e-3
    r = subprocess.run([sys.executable, str(EX / "compare_polyfit.py"), str(tmp_path / "poly.npz"),
                        str(DATA / "poly_noisy.csv")], capture_output=True, text=True)
    assert r.returncode == 0 and "agrees to 0.001" in r.stdout
    with np.load(tmp_path / "poly.npz") as p:          # and the script can say no
        np.savez(tmp_path / "off.npz", **dict(p, a=p["a"] + 0.01))
    r = subprocess.run([sys.executable, str(EX / "compare_polyfit.py"), str(tmp_path / "off.npz"),
                        str(DATA / "poly_noisy.csv")], capture_output=True, text=True)
    assert r.returncode == 1 and "DOES NOT agree" in r.stdout


def test_digits_reach_96_percent_on_held_out_data(tmp_path):
    out, _ = bpc_train(tmp_path, EX / "train_digits.toml", "--data", DATA / "digits_train.npz",
                             "--test", DATA / "digits_test.npz", "--out", "digits.npz")
    assert "completed 60 epochs" in out
    assert accuracy(out, "test") >= 96.0, out
    with np.load(DATA / "digits_test.npz") as t:
        assert t["x"].shape == (359, 64) and sorted(set(t["y"].tolist())) == list(range(10))


def test_cnn_digits_reach_98_5_percent_on_held_out_data(tmp_path):
    """The flat (n, 64) rows of the data files feed the CNN's declared [8, 8, 1] input."""
    out, _ = bpc_train(tmp_path, EX / "cnn_digits.toml", "--data", DATA / "digits_train.npz",
                             "--test", DATA / "digits_test.npz", "--out", "cnn.npz")
    assert "completed 30 epochs" in out
    assert accuracy(out, "test") >= 98.5, out


def test_spirals_with_decision_boundary(tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = bpc_train(tmp_path, EX / "train_spirals.toml", "--data", DATA / "spirals.csv",
                       "--boundary", "spirals.png", "--plot", "loss.png", "--plot-grads", "--out", "s.npz")
    assert accuracy(out, "validation") >= 97.0 and accuracy(out, "training") >= 97.0, out
    for name in ("spirals.png", "loss.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_residual_mlp_separates_the_spirals(tmp_path):
    """examples/residual_mlp.toml (add skips named by `from`), trained as a user trains it."""
    out, _ = bpc_train(tmp_path, EX / "residual_mlp.toml", "--data", DATA / "spirals.csv", "--out", "r.npz")
    assert "completed 300 epochs" in out
    assert accuracy(out, "validation") >= 99.0 and accuracy(out, "training") >= 99.0, out


def test_two_view_digits_concat_two_inputs(tmp_path):
    """examples/two_view_digits.toml: two named inputs (the top and bottom halves of each digit),
    each through its own dense branch, joined by concat; its data holds one array per input."""
    out, _ = bpc_train(tmp_path, EX / "two_view_digits.toml", "--data", DATA / "digits_halves_train.npz",
                             "--test", DATA / "digits_halves_test.npz", "--out", "tv.npz")
    assert "completed 60 epochs" in out
    assert accuracy(out, "test") >= 96.5, out
    with np.load(DATA / "digits_halves_test.npz") as h, np.load(DATA / "digits_test.npz") as d:
        assert sorted(h.files) == ["bottom", "top", "y"]
        assert np.array_equal(np.concatenate([h["top"], h["bottom"]], axis=1), d["x"])
        assert np.array_equal(h["y"], d["y"])
    # the one-array digits file for this two-input model: refused, saying what the file must hold
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "compiler", "train", str(EX / "two_view_digits.toml"),
                        "--data", str(DATA / "digits_train.npz")], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no array named 'top', 'bottom'" in r.stderr
    assert "one array per input, named like it: numpy.savez(path, top=..., bottom=..., y=...)" in r.stderr


def test_committed_data_is_what_make_data_writes(tmp_path):
    args = [sys.executable, str(EX / "make_data.py"), "--out", str(tmp_path)]
    if importlib.util.find_spec("sklearn") is not None:
        args.append("--digits")
    subprocess.run(args, check=True, capture_output=True)
    for f in sorted(tmp_path.iterdir()):
        assert f.read_bytes() == (DATA / f.name).read_bytes(), f.name
