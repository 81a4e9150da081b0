"""Compare the cubic fitted by `bpc train` with numpy.polyfit's least-squares coefficients.

    bpc train examples/train_poly.toml --data examples/data/poly_noisy.csv --out poly.npz
    python examples/compare_polyfit.py poly.npz examples/data/poly_noisy.csv

Exit code 0 when every coefficient agrees to --tol (default 1e-3), 1 otherwise.
"""
import argparse
import sys

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params", help=".npz written by bpc train (parameters a, b, c, d)")
    ap.add_argument("data", help="the CSV it was trained on (columns x, y)")
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args(argv)
    data = np.loadtxt(args.data, delimiter=",", skiprows=1, ndmin=2)
    reference = np.polyfit(data[:, 0], data[:, 1], 3)
    with np.load(args.params) as p:
        fitted = np.array([float(p[k]) for k in "abcd"])
    print(f"{'':>6} {'bpc train':>14} {'numpy.polyfit':>14} {'difference':>11}")
    for name, got, ref in zip("abcd", fitted, reference):
        print(f"{name:>6} {got:14.9f} {ref:14.9f} {abs(got - ref):11.2e}")
    worst = float(np.max(np.abs(fitted - reference)))
    ok = worst <= args.tol
    print(f"max difference {worst:.2e}: {'agrees' if ok else 'DOES NOT agree'} to {args.tol:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
