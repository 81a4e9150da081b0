"""Compile time against model size: ``python -m bench.compile_scaling [--quick]``.

Each case is compiled cold (the IR's intern table cleared) at sizes growing 4x a step; the
table gives the CPU seconds of the compile and the ratio to the previous size (linear growth
gives about 4, quadratic 16). Cases:

- declared parameters: an ``[expression]`` spec declaring n scalar parameters, two of them
  used (the shape of the issue's "100k parameters" spec), through the NumPy and C backends;
- parameters in one sum: an expression model whose prediction sums n parameters, and the tanh
  of such a sum;
- layers: an MLP of n tanh layers of width 4 (the Python API; a spec allows 256);
- residual CNN: n convolutions (3x3, 16 filters, same padding, relu) on 8x8x1 images, each
  after the first with a skip (``conv(h) + h``), then a max pool and a dense layer of 10
  (issue 12, item 8: 20 layers must compile to an imported module in under 1 s, warm);
- transformer blocks: a causal character model (vocabulary 96, T = 64, d = 128, 4 heads, MLP
  512) of n pre-norm blocks, compiled and imported (issue 13, item 8: 12 blocks in under 2 s).

Each case first compiles its smallest size untimed, so SymPy's caches and the first import of
the compile path are warm, as in a session that compiles several models.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sympy as sp  # noqa: E402

import compiler as bpc  # noqa: E402
from compiler.core import ir  # noqa: E402
from compiler.spec.loader import loads_spec  # noqa: E402


def declared(n):
    params = ", ".join(f"a{i} = 0.0" for i in range(n))
    text = f'[expression]\nprediction = "a0*x + a1"\nparams = {{ {params} }}\ninputs = ["x"]\n'
    return loads_spec(text, "declared.toml").model


def summed(n):
    a, x = sp.symbols(f"a0:{n}"), sp.Symbol("x")
    return bpc.expression_model(sp.Add(*[ai * x**(i % 3) for i, ai in enumerate(a)]), params=list(a),
                                inputs=[x], name="summed")


def tanh_of_sum(n):
    a, x = sp.symbols(f"a0:{n}"), sp.Symbol("x")
    return bpc.expression_model(sp.tanh(sp.Add(*[ai * x**(i % 3) for i, ai in enumerate(a)])), params=list(a),
                                inputs=[x], name="tanh_sum")


def layers(n):
    return bpc.mlp([2] + [4] * n + [1], activation="tanh", loss="mse", name="deep")


def residual_cnn(n):
    net = bpc.Network("rescnn")
    h = net.conv2d(net.input("x", shape=(8, 8, 1)), 16, kernel=3, padding="same", activation="relu")
    for _ in range(n - 1):
        h = net.conv2d(h, 16, kernel=3, padding="same", activation="relu") + h
    z = net.dense(net.flatten(net.maxpool2d(h, 2)), 10)
    return net.build(z, loss="softmax_cross_entropy", target=net.target("y", kind="label"))


def transformer(n, T=64, d=128, vocab=96, heads=4):
    net = bpc.Network("transformer")
    x = net.input("x", kind="ids", length=T)
    h = net.positional(net.embedding(x, vocab, d))
    for _ in range(n):
        h = net.transformer_block(h, heads, mlp=4 * d, causal=True)
    z = net.dense(net.layernorm(h), vocab)
    return net.build(z, "softmax_cross_entropy", net.target("y", kind="label", length=T))



def numpy_target(model):
    bpc.compile_model(model)


def numpy_imported(model):
    bpc.compile_model(model).load()     # written to the bpc cache and imported


def c_target(model):
    from compiler.backends.c.backend import compile_model_c
    compile_model_c(model)          # C source and wrapper text; no C compiler run


CASES = {
    # name: (builder, compile, sizes, quick sizes); building the model (spec parsing) is timed too
    "declared parameters, NumPy": (declared, numpy_target, [1000, 4000, 16000, 64000], [1000, 4000, 16000]),
    "declared parameters, C": (declared, c_target, [1000, 4000, 16000, 64000], [1000, 4000]),
    "parameters in one sum, NumPy": (summed, numpy_target, [64, 256, 1024], [64, 256]),
    "tanh of a sum of parameters, NumPy": (tanh_of_sum, numpy_target, [64, 256, 1024], [64, 256]),
    "layers (width 4), NumPy": (layers, numpy_target, [8, 32, 128, 512], [8, 32, 128]),
    "residual CNN layers, NumPy, imported": (residual_cnn, numpy_imported, [5, 20, 80], [5, 20]),
    "transformer blocks, NumPy, compiled and imported": (transformer, numpy_imported, [3, 12, 48], [3, 12]),
}


def seconds(build, compile_fn, n):
    ir._intern.clear()
    t0 = time.process_time()
    compile_fn(build(n))
    return time.process_time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (about 20 s in all)")
    ap.add_argument("--only", help="run the cases whose name contains this text")
    args = ap.parse_args(argv)
    print("| case | n | compile s | ratio to n/4 |")
    print("|---|---|---|---|")
    for name, (build, compile_fn, sizes, quick) in CASES.items():
        if args.only and args.only not in name:
            continue
        prev = None
        seconds(build, compile_fn, (quick if args.quick else sizes)[0])     # warm-up, untimed
        for n in (quick if args.quick else sizes):
            t = seconds(build, compile_fn, n)
            ratio = f"{t / prev:.1f}" if prev else ""
            print(f"| {name} | {n} | {t:.2f} | {ratio} |", flush=True)
            prev = t
    return 0


if __name__ == "__main__":
    sys.exit(main())
