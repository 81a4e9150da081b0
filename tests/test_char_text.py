"""The character-level language model example on real text (issue 13, item 5): the corpus script
is deterministic and its windows share no character between training and validation; the
committed corpus is what the script writes from the Python it was built with; the example spec
trains with `bpc train` on those windows (a few steps lower the loss); the bigram baseline and
generate_text.py run on the result. The full run's figures are claims of the README, measured
there, not asserted here (minutes on a loaded machine)."""
import gzip
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples"
SPEC = EX / "char_transformer.toml"
_spec = importlib.util.spec_from_file_location("make_text_data", EX / "make_text_data.py")
mtd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mtd)


def _run(*argv, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return r.stdout


def test_corpus_script_is_deterministic(tmp_path):
    modules = ("abc", "bisect", "textwrap", "no_such_module")
    text, missing = mtd.build_corpus(modules)
    assert missing == ["no_such_module"]
    assert text == mtd.build_corpus(modules)[0] and len(text) > 1000
    assert all(c == "\n" or " " <= c <= "~" for c in text)
    a, b = tmp_path / "a.txt.gz", tmp_path / "b.txt.gz"
    assert mtd.write_corpus(text, a) == mtd.write_corpus(text, b)
    assert a.read_bytes() == b.read_bytes() and mtd.read_corpus(a) == text


def test_committed_corpus():
    text = mtd.read_corpus()
    assert 500_000 <= len(text) <= 5_000_000
    assert mtd.decode(mtd.encode(text)) == text
    digest = hashlib.sha256(mtd.CORPUS.read_bytes()).hexdigest()
    readme = (EX / "data" / "README.md").read_text()
    assert digest in readme                                    # the README names the file it describes
    built_with = re.search(r"built with CPython (\d+\.\d+\.\d+)", readme).group(1)
    if sys.version.split()[0] == built_with:                   # the same standard library: the same bytes
        assert mtd.build_corpus()[0] == text


def test_windows_and_split_share_no_character():
    ids = np.arange(65 * 40, dtype=np.int64) % 96
    x, y = mtd.windows(ids)
    assert x.shape == y.shape == (40, 64)
    assert np.array_equal(x[:, 1:], y[:, :-1])                  # y is x shifted by one
    (xt, yt), (xv, yv) = mtd.split(x, y, every=4, block=3)
    assert len(xt) + len(xv) == 40 and len(xv) == 9            # blocks 3, 7, 11 of 3 windows (the last has 1)
    positions = np.arange(65 * 40).reshape(40, 65)
    held = (np.arange(40) // 3) % 4 == 3
    assert not set(positions[held].ravel()) & set(positions[~held].ravel())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        mtd.encode("caf\u00e9")


def test_example_trains_and_samples(tmp_path):
    out = _run(EX / "make_text_data.py", "--out", tmp_path)
    assert "python_docs_train.npz" in out and "python_docs_val.npz" in out
    with np.load(tmp_path / "python_docs_train.npz") as f:
        x, y = f["x"], f["y"]
    assert x.dtype == np.uint8 and x.shape[1:] == (64,) and len(x) > 10_000
    np.savez(tmp_path / "small.npz", x=x[:64], y=y[:64])
    # two epochs of two steps each (bpc train as a user runs it, on a slice of the real windows)
    out = _run("-m", "compiler", "train", SPEC, "--data", tmp_path / "small.npz", "--test", tmp_path / "small.npz",
               "--epochs", "2", "--batch-size", "32", "--log-every", "1", "--out", tmp_path / "p.npz", cwd=tmp_path)
    losses = [float(v) for v in re.findall(r"^epoch \d+/2\s+loss (\S+)", out, re.M)]
    assert len(losses) == 2 and losses[1] < losses[0] < 4.6, out      # ln 96 = 4.56 at the start
    final = float(re.search(r"^\s*test\s+loss (\S+)", out, re.M).group(1))
    assert final < losses[0]
    text = _run(EX / "generate_text.py", tmp_path / "p.npz", "--prompt", "Return the ", "--chars", "20")
    assert text.startswith("Return the ") and len(text.rstrip("\n")) >= len("Return the ")
    assert len(text) == len("Return the ") + 20 + 1                  # the sample and print's newline
    out = _run(EX / "bigram_baseline.py", "--data", tmp_path)
    nats = [float(v) for v in re.findall(r"([\d.]+) nats", out)]
    assert len(nats) == 2 and 2.0 < nats[1] < 3.5, out


def test_generated_module_is_the_example_compiled():
    """generate_text.py reads generated/char_transformer.py: the spec's module (tests/test_generated.py
    checks its bytes), float32, with the token-id interface the script uses."""
    path = ROOT / "generated" / "char_transformer.py"
    spec = importlib.util.spec_from_file_location("char_transformer_generated", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    assert m.VOCAB == {"x": 96} and m.INPUTS == {"x": (64,)} and m.DTYPE == "float32"
    params = m.init_params(seed=0)
    p = m.forward(params, np.zeros((2, 64), np.int64))
    assert p.shape == (2, 64, 96) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-5)
