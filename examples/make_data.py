"""Write the data files of the training examples (deterministic; the outputs are committed).

    python examples/make_data.py            # poly_noisy.csv and spirals.csv (numpy only)
    python examples/make_data.py --digits   # also digits_{train,test}.npz (needs scikit-learn)

* ``poly_noisy.csv``: 200 samples ``x`` uniform in [-1, 1] of the cubic
  ``0.5 x^3 - 1.2 x^2 + 0.3 x + 0.8`` plus Gaussian noise (sigma 0.05); header ``x,y``.
* ``spirals.csv``: two interleaved spiral arms, 300 points each, with noise; columns ``x0,x1,y``
  (``y`` the arm, 0 or 1).
* ``digits_train.npz`` / ``digits_test.npz``: scikit-learn's bundled copy of the UCI optical
  digits (1797 8x8 images, pixel values 0..16 scaled to [0, 1], float32; labels 0..9), split
  80/20 stratified by class with seed 0: 1438 training and 359 test images. See data/README.md.
* ``digits_halves_train.npz`` / ``digits_halves_test.npz``: the same digits as two inputs, ``top``
  (image rows 0-3) and ``bottom`` (rows 4-7), 32 pixels each, and ``y`` (always written, from the
  digits files just exported or from the committed ones).
"""
import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "data"
POLY = (0.5, -1.2, 0.3, 0.8)     # highest degree first, like numpy.polyfit


def poly(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, n)
    y = np.polyval(POLY, x) + rng.normal(0.0, 0.05, n)
    return x, y


def spirals(per_arm=300, noise=0.08, seed=0):
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0.0, 1.0, (2, per_arm))) * 3.0 * np.pi    # denser towards the centre
    arms = []
    for k in range(2):
        r = t[k] / (3.0 * np.pi)
        angle = t[k] + k * np.pi
        pts = np.column_stack([r * np.cos(angle), r * np.sin(angle)]) + rng.normal(0.0, noise * 0.5, (per_arm, 2))
        arms.append(pts)
    x = np.vstack(arms)
    y = np.repeat([0, 1], per_arm)
    order = rng.permutation(len(y))
    return x[order], y[order]


def digits(seed=0, test_fraction=0.2):
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[:int(round(test_fraction * len(idx)))]] = True
    return (x[~test], y[~test]), (x[test], y[test])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits", action="store_true", help="also export the digits (needs scikit-learn)")
    ap.add_argument("--out", type=Path, default=HERE, help="output directory (default: examples/data)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    x, y = poly()
    with open(out / "poly_noisy.csv", "w") as f:
        f.write("x,y\n" + "".join(f"{float(a)!r},{float(b)!r}\n" for a, b in zip(x, y)))
    x, y = spirals()
    with open(out / "spirals.csv", "w") as f:
        f.write("x0,x1,y\n" + "".join(f"{a:.6f},{b:.6f},{c}\n" for (a, b), c in zip(x, y)))
    if args.digits:
        (xt, yt), (xs, ys) = digits()
        np.savez_compressed(out / "digits_train.npz", x=xt, y=yt.astype(np.uint8))
        np.savez_compressed(out / "digits_test.npz", x=xs, y=ys.astype(np.uint8))
    for part in ("train", "test"):
        # two views of each digit for a model with two inputs (one array per input, named like it)
        source = out / f"digits_{part}.npz" if args.digits else HERE / f"digits_{part}.npz"
        with np.load(source) as d:
            np.savez_compressed(out / f"digits_halves_{part}.npz", top=d["x"][:, :32], bottom=d["x"][:, 32:],
                                y=d["y"])
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir() if p.suffix in ('.csv', '.npz')))} in {out}")


if __name__ == "__main__":
    main()
