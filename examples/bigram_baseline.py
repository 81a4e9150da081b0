"""The bigram baseline of the character-level language model (examples/char_transformer.toml).

    python examples/bigram_baseline.py [--data examples/data] [--alpha 0.1]

Counts character pairs in the training windows (``python_docs_train.npz``, written by
examples/make_text_data.py), predicts the next character from the current one with add-alpha
smoothed frequencies, and prints the mean cross-entropy over the positions of the validation
windows (``python_docs_val.npz``): the same positions, targets and split on which ``bpc train
--test`` reports the transformer's loss. In nats and in bits per character.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
VOCAB = 96


def fit(x, y, alpha=0.1, vocab=VOCAB):
    """log P(next | current) (vocab, vocab) from the pairs (x[i, t], y[i, t]), add-alpha smoothed."""
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (np.asarray(x, np.int64).ravel(), np.asarray(y, np.int64).ravel()), 1.0)
    counts += alpha
    return np.log(counts / counts.sum(axis=1, keepdims=True))


def cross_entropy(logp, x, y):
    """Mean over every position of -log P(y | x), in nats."""
    return float(-np.mean(logp[np.asarray(x, np.int64), np.asarray(y, np.int64)]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="directory of python_docs_{train,val}.npz")
    ap.add_argument("--alpha", type=float, default=0.1, help="add-alpha smoothing of the pair counts")
    args = ap.parse_args(argv)
    try:
        with np.load(args.data / "python_docs_train.npz") as t, np.load(args.data / "python_docs_val.npz") as v:
            train, val = (t["x"], t["y"]), (v["x"], v["y"])
    except FileNotFoundError as e:
        print(f"{e.filename}: not found; write it with: python examples/make_text_data.py", file=sys.stderr)
        return 2
    logp = fit(*train, alpha=args.alpha)
    tr, va = cross_entropy(logp, *train), cross_entropy(logp, *val)
    print(f"bigram (add-{args.alpha:g}): training {tr:.4f} nats ({tr / math.log(2):.4f} bits) per character, "
          f"validation {va:.4f} nats ({va / math.log(2):.4f} bits) per character")
    return 0


if __name__ == "__main__":
    sys.exit(main())
