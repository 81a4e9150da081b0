"""Each adjoint rule, op by op, against float64 central finite differences.

Every row builds ``out = op(...)`` from parameters and a data input and uses the loss
``mean(out * R) + mean(X**2)`` with a random weighting parameter ``R``, so the rule is tested
for an arbitrary upstream adjoint, not just for ones.

A row's columns: the op, the input domain its data are drawn from, and the tolerance of the
check. An elementwise op of one argument gets ``X + shift`` as its input (``shift`` a
parameter with ``|shift| <= SHIFT``), and X is drawn so that ``X + shift`` stays in the
domain: the op is written as itself (``log(x)``, not ``log(1 + x**2)``), and where it is
checked is a column, not a disguise. The unary rows also run on every target (NumPy and C,
float64 and float32), all in one model so that each target costs one build.
"""
import functools
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import sympy as sp

from compiler.core import ir
from compiler.backends.numpy.module import compile_model
from compiler.core.functions import relu, sigmoid, softplus, stabilize
from compiler.gradcheck import check_gradients, format_table
from compiler.core.ir import ARG, N
from compiler.core.model import Model
from model_table import ROWS, as_dtype, float32_mismatches

a0, a1 = ARG[0], ARG[1]


@dataclass(frozen=True)
class Domain:
    """Where an op's input lies: the union of the closed ``intervals`` (low, high)."""
    name: str
    intervals: tuple

    def contains(self, values):
        return bool(np.all(np.any([(lo <= values) & (values <= hi) for lo, hi in self.intervals], axis=0)))

    def sample(self, rng, shape, margin):
        """Uniform draws from the intervals shrunk by ``margin`` at both ends."""
        lows = np.array([lo + margin for lo, _ in self.intervals])
        highs = np.array([hi - margin for _, hi in self.intervals])
        which = rng.choice(len(lows), size=shape, p=(highs - lows) / (highs - lows).sum())
        return rng.uniform(lows[which], highs[which])


# moderate values: central differences of a loss of size L carry an error ~1e-10*L, so
# exploding values (exp, x**4, cosh of large inputs) would test the check, not the rule
REAL = Domain("real", ((-2.0, 2.0),))
POSITIVE = Domain("positive, away from 0", ((0.25, 3.0),))
NONZERO = Domain("away from the kink at 0", ((-2.0, -0.25), (0.25, 2.0)))
INSIDE_POLES = Domain("inside tan's poles at +-pi/2", ((-1.2, 1.2),))
SHIFT = 0.1     # |shift| of a unary row's input; every domain is wider than 2*SHIFT


@dataclass(frozen=True)
class Op:
    """One row: ``build()`` -> the op's output node; its input domain; the check's tolerance."""
    build: Callable
    domain: Domain = REAL
    rtol: float = 1e-6
    atol: float = 1e-9


def P(name, shape):
    return ir.param_node(name, shape)


def X():
    return ir.input_node("X", (N, 3), "data")


def Z():
    return ir.matmul(X(), P("W", (3, 4)))


def U():
    """A unary row's input: the data plus a parameter per column, so that the rule's derivative
    reaches a parameter at the point X + shift of the domain."""
    return ir.ew(a0 + a1, [X(), P("shift", (3,))])


def unary(expr, domain=REAL, **tolerance):
    return Op(lambda: ir.ew(expr, [U()]), domain, **tolerance)


UNARY = {
    "exp": unary(sp.exp(a0)), "log": unary(sp.log(a0), POSITIVE), "tanh": unary(sp.tanh(a0)),
    "sigmoid": unary(sigmoid(a0)), "softplus": unary(softplus(a0)), "relu": unary(relu(a0), NONZERO),
    "sin": unary(sp.sin(a0)), "cos": unary(sp.cos(a0)), "atan": unary(sp.atan(a0)), "asinh": unary(sp.asinh(a0)),
    "sqrt": unary(sp.sqrt(a0), POSITIVE), "abs": unary(sp.Abs(a0), NONZERO), "erf": unary(sp.erf(a0)),
    "cube": unary(a0**3), "pow4": unary(a0**4), "inverse": unary(1 / a0, NONZERO), "cosh": unary(sp.cosh(a0)),
    "sinh": unary(sp.sinh(a0)), "tan": unary(sp.tan(a0), INSIDE_POLES), "max": unary(sp.Max(a0, a0 / 2), NONZERO),
    "log_sigmoid": unary(stabilize(sp.log(sigmoid(a0)))),
    "handwritten_sigmoid": unary(stabilize(sp.exp(a0) / (1 + sp.exp(a0)))),
    "power_real": unary(a0 ** sp.Rational(3, 2), POSITIVE), "sign_times": unary(sp.sign(a0) * a0**2, NONZERO),
}


def _lse_input():
    return ir.ew(3 * a0, [Z()])


OPS = {
    **{f"ew_{k}": v for k, v in UNARY.items()},
    "ew_bias_broadcast": Op(lambda: ir.ew(a0 + a1, [Z(), P("b", (4,))])),
    "ew_row_broadcast": Op(lambda: ir.ew(a0 * a1, [Z(), P("b", (1, 4))])),
    "ew_per_sample_broadcast": Op(lambda: ir.ew(a0 * a1, [Z(), ir.reduce_sum(ir.ew(sp.tanh(a0), [Z()]), (1,))])),
    "ew_scalar_param": Op(lambda: ir.ew(a0 * sp.exp(a1), [Z(), P("s", ())])),
    "ew_params_only": Op(lambda: ir.ew(a0 * a1**2, [P("u", (4,)), P("s", ())])),
    "ew_same_input_twice": Op(lambda: ir.ew(a0 * a1, [Z(), Z()])),
    "matmul": Op(lambda: ir.matmul(X(), P("W", (3, 4)))),
    "matmul_ta": Op(lambda: ir.matmul(X(), Z(), ta=True)),
    "matmul_tb": Op(lambda: ir.matmul(X(), P("V", (4, 3)), tb=True)),
    "matmul_ta_tb": Op(lambda: ir.matmul(P("A", (3, 2)), P("B", (4, 3)), ta=True, tb=True)),
    "matmul_chain": Op(lambda: ir.matmul(ir.ew(sp.tanh(a0), [Z()]), P("V", (4, 2)))),
    "transpose": Op(lambda: ir.transpose(P("A", (3, 2)))),
    "reshape": Op(lambda: ir.reshape(P("A", (4, 3)), (2, 6))),
    "sum_axis0": Op(lambda: ir.reduce_sum(ir.ew(sp.sin(a0), [Z()]), (0,))),
    "sum_axis1": Op(lambda: ir.reduce_sum(ir.ew(sp.sin(a0), [Z()]), (1,))),
    "sum_all": Op(lambda: ir.reduce_sum(ir.ew(sp.sin(a0), [Z()]), (0, 1))),
    "sum_param_axis1": Op(lambda: ir.reduce_sum(P("A", (3, 4)), (1,))),
    "mean": Op(lambda: ir.mean(ir.ew(sp.sin(a0), [Z()]))),
    "logsumexp": Op(lambda: ir.lse(_lse_input())),
    "softmax": Op(lambda: ir.softmax(_lse_input())),
    "xent_labels": Op(lambda: ir.xent(_lse_input(), ir.input_node("y", (N,), "target", "label"), "label")),
    "concat": Op(lambda: ir.concat(ir.ew(sp.tanh(a0), [Z()]), X())),
    "concat_part_twice": Op(lambda: ir.concat(Z(), X(), Z())),
    "concat_under_mean": Op(lambda: ir.mean(ir.concat(ir.ew(sp.tanh(a0), [Z()]), X()))),   # scalar adjoint
    "concat_params": Op(lambda: ir.concat(P("A", (3, 2)), P("B", (3, 1)))),
    # the merge layers are elementwise: a residual and a gate, as the operators build them
    "merge_add_residual": Op(lambda: ir.ew(sp.tanh(a0), [Z()]) + Z()),
    "merge_multiply_gate": Op(lambda: ir.ew(sigmoid(a0), [Z()]) * Z()),
    "xent_onehot": Op(lambda: ir.xent(_lse_input(), ir.input_node("Y", (N, 4), "target"), "onehot")),
}


def _image(h, w, c):
    """A batch of (h, w, c) images that depends on the data and on a parameter."""
    return ir.reshape(ir.matmul(X(), P("A", (3, h * w * c))), (N, h, w, c))


def _rows(m, *shape):
    """Rows (n*m, *shape) that depend on the data and on a parameter (the input of an op on
    image windows)."""
    size = m
    for d in shape:
        size *= d
    return ir.reshape(ir.matmul(X(), P("A", (3, size))), (N * m, *shape))


def _col2im(image, kernel, stride=1, padding="valid"):
    """col2im with the geometry of im2col on ``image`` (h, w, c), of data-dependent rows."""
    probe = ir.im2col(ir.input_node("probe", (N, *image), "data"), kernel, stride, padding)
    rows = int(probe.shape[0] / N)
    return ir.col2im(_rows(rows, probe.shape[1]), image, probe.attr("kernel"), probe.attr("stride"),
                     probe.attr("pads"))


def _window_max(m, k, c):
    return ir.window_max(_rows(m, k, c))


# image geometries: (image (h, w, c), kernel, stride, padding); the edge cases of issue 12
WINDOWS = {
    "3x3_valid": ((5, 5, 2), 3, 1, "valid"),
    "kernel_is_input": ((4, 3, 2), (4, 3), 1, "valid"),
    "stride2_valid": ((7, 6, 1), (3, 2), 2, "valid"),
    "stride3_overhang": ((7, 7, 1), 2, 3, "valid"),
    "same_odd": ((5, 5, 2), 3, 1, "same"),
    "same_even_kernel": ((5, 4, 1), 2, 1, "same"),
    "same_stride2_odd": ((7, 5, 3), (2, 3), 2, "same"),
}

IMAGE_OPS = {
    **{f"im2col_{k}": Op(lambda g=g: ir.im2col(_image(*g[0]), *g[1:])) for k, g in WINDOWS.items()},
    **{f"col2im_{k}": Op(lambda g=g: _col2im(*g)) for k, g in WINDOWS.items()},
    "window_max": Op(lambda: _window_max(2, 4, 3)),
    "window_max_one": Op(lambda: _window_max(1, 1, 2)),
    "window_max_pool": Op(lambda: ir.window_max(ir.reshape(ir.im2col(_image(4, 6, 2), 2, 2), (N * 6, 4, 2)))),
}
OPS.update(IMAGE_OPS)


def _seq(*shape, param="A"):
    """A batch (n, *shape) that depends on the data and on a parameter (the input of a sequence op)."""
    size = 1
    for d in shape:
        size *= d
    return ir.reshape(ir.matmul(X(), P(param, (3, size))), (N, *shape))


def _ids(T=6):
    """Token ids (n, T); the data draw ids in 0..2, so a row of 6 repeats some."""
    return ir.input_node("ids", (N, T), "data", "ids")


def _key_mask():
    """A padding mask (n, 4) of the data: keys whose first feature is positive are kept."""
    return ir.ew(sp.Heaviside(a0, 0), [ir.reshape(ir.matmul(X(), P("M", (3, 4))), (N, 4))])


def _scores(T, fill):
    """Softmax over causally masked scores (n, 2, T, T), as attention computes them."""
    return ir.softmax(ir.causal_mask(_seq(2, T, T), fill))


# sequence ops of issue 13: embeddings (repeated ids), heads (permute), batched products,
# causal masks, softmax and cross-entropy over the last axis of (n, T, k) and (n, h, T, T)
SEQUENCE_OPS = {
    "embed_repeated_ids": Op(lambda: ir.embed(P("E", (4, 3)), _ids())),
    "embed_composed": Op(lambda: ir.ew(sp.tanh(a0), [ir.embed(P("E", (5, 2)), _ids(7))])),
    "permute_heads": Op(lambda: ir.permute(_seq(3, 2, 4), (0, 2, 1, 3))),
    "permute_3d": Op(lambda: ir.permute(_seq(3, 4), (0, 2, 1))),
    "bmm": Op(lambda: ir.bmm(_seq(2, 3, 4), ir.ew(sp.sin(a0), [_seq(2, 4, 5, param="B")]))),
    "bmm_ta": Op(lambda: ir.bmm(_seq(2, 4, 3), ir.ew(sp.sin(a0), [_seq(2, 4, 5, param="B")]), ta=True)),
    "bmm_tb": Op(lambda: ir.bmm(_seq(2, 3, 4), ir.ew(sp.sin(a0), [_seq(2, 5, 4, param="B")]), tb=True)),
    "bmm_ta_tb": Op(lambda: ir.bmm(_seq(3, 4), ir.ew(sp.sin(a0), [_seq(5, 3, param="B")]), ta=True, tb=True)),
    "bmm_same_operand": Op(lambda: ir.bmm(_seq(2, 3, 4), _seq(2, 3, 4), tb=True)),
    "causal_mask": Op(lambda: ir.causal_mask(_seq(2, 4, 4), -5.0)),
    "causal_softmax": Op(lambda: _scores(4, -1e9)),
    "key_mask": Op(lambda: ir.key_mask(_seq(2, 3, 4), _key_mask(), -5.0)),
    "key_mask_softmax": Op(lambda: ir.softmax(ir.key_mask(_seq(2, 3, 4), _key_mask(), -1e9))),
    "softmax_last_axis": Op(lambda: ir.softmax(ir.ew(3 * a0, [_seq(3, 4)]))),
    "softmax_heads": Op(lambda: ir.softmax(ir.ew(3 * a0, [_seq(2, 3, 4)]))),
    "logsumexp_last_axis": Op(lambda: ir.lse(ir.ew(3 * a0, [_seq(3, 4)]))),
    "xent_sequence_labels": Op(lambda: ir.xent(ir.ew(3 * a0, [_seq(3, 4)]),
                                               ir.input_node("y", (N, 3), "target", "label"), "label")),
}
OPS.update(SEQUENCE_OPS)


def _model(out):
    if out.shape and sp.sympify(out.shape[0]).has(N) and (out.shape[0] != N or len(out.shape) > 2):
        # image values and their windows: weighted per sample, as (n, numbers per sample)
        size = ir.size_of(out.shape) / N
        out = ir.reshape(out, (N, int(size)))
    r = P("R", out.shape) if not ir.is_batch(out.shape) else None
    x = X()
    if r is not None:
        term = ir.mean(ir.ew(a0 * a1, [out, r]))
    else:
        # a per-sample weighting that depends on the data keeps the batch axis honest
        k = out.shape[1] if len(out.shape) == 2 else None
        weight = ir.matmul(x, P("R", (3, k))) if k else ir.reduce_sum(ir.ew(sp.cos(a0), [x]), (1,))
        term = ir.mean(ir.ew(a0 * a1, [out, weight]))
    loss = ir.ew(a0 + a1, [term, ir.mean(ir.ew(a0**2, [x]))])
    order = ir.topo_order([loss])
    params = tuple(sorted((n for n in order if n.op == "param"), key=lambda n: n.name))
    targets = tuple(n for n in order if n.op == "input" and n.attr("role") == "target")
    ids = tuple(n for n in order if n.op == "input" and n.attr("kind") == "ids")
    return Model("rule", (x, *ids), targets, params, out if ir.is_batch(out.shape) else loss, loss, {},
                 {p.name: ("zeros",) for p in params})


def _data(mod, batch, rng, domain):
    arrays = [domain.sample(rng, (batch, 3), SHIFT)]
    arrays += [rng.integers(0, 3, size=(batch, *shape)) for name, shape in mod.INPUTS.items() if name != "X"]
    for name, shape in mod.TARGETS.items():
        if mod.TARGET_KINDS[name] == "label":
            arrays.append(rng.integers(0, 4, size=(batch, *shape)))
        else:
            arrays.append(np.eye(4)[rng.integers(0, 4, size=batch)])
    return arrays


def _params(mod, rng):
    return {k: rng.uniform(-SHIFT, SHIFT, s) if k == "shift" else 0.5 * rng.standard_normal(s)
            for k, s in mod.PARAMS.items()}


def _check(name, row, seed):
    """check_gradients rows of op ``row`` at a seeded draw from its domain."""
    mod = compile_model(_model(row.build())).load()
    rng = np.random.default_rng(zlib.crc32(name.encode()) + seed)
    params = _params(mod, rng)
    arrays = _data(mod, 5, rng, row.domain)
    if "shift" in params:   # a unary row: its op is checked at X + shift, which must be in the domain
        assert row.domain.contains(arrays[0] + params["shift"]), name
    return check_gradients(mod, params, arrays, rtol=row.rtol, atol=row.atol)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("op", sorted(OPS))
def test_adjoint_rule(op, seed):
    rows = _check(op, OPS[op], seed)
    assert rows and all(r.ok for r in rows), rows


@pytest.mark.parametrize("op,domain", [("log", NONZERO), ("sqrt", REAL), ("power_real", REAL)])
def test_the_domain_column_matters(op, domain):
    """The same op drawn outside its domain (negative numbers for log, sqrt and x**1.5) fails
    the check: a domain is not decoration."""
    row = UNARY[op]
    wide = Op(row.build, domain, row.rtol, row.atol)
    with np.errstate(all="ignore"):
        assert not all(r.ok for seed in range(3) for r in _check(f"ew_{op}", wide, seed))


def _unary_model():
    """Every unary row in one model: op i reads its own data input X_i (drawn from its domain)
    plus its own shift_i, weighted by X_i @ R_i; a wrong rule shows in op i's own parameters."""
    terms, inputs, params = [], [], []
    for op, row in sorted(UNARY.items()):
        x = ir.input_node(f"X_{op}", (N, 3), "data")
        shift, weight = P(f"shift_{op}", (3,)), P(f"R_{op}", (3, 3))
        out = ir.ew(row.build().attr("expr"), [ir.ew(a0 + a1, [x, shift])])
        terms.append(ir.mean(ir.ew(a0 * a1, [out, ir.matmul(x, weight)])))
        inputs.append(x)
        params += [shift, weight]
    loss = terms[0]
    for term in terms[1:]:
        loss = ir.ew(a0 + a1, [loss, term])
    return Model("unary_rules", tuple(inputs), (), tuple(params), loss, loss, {},
                 {p.name: ("zeros",) for p in params})


def _unary_draw(module, seed):
    rng = np.random.default_rng(seed)
    ops = sorted(UNARY)
    arrays = [UNARY[op].domain.sample(rng, (5, 3), SHIFT) for op in ops]
    params = {k: rng.uniform(-SHIFT, SHIFT, s) if k.startswith("shift_") else 0.5 * rng.standard_normal(s)
              for k, s in module.PARAMS.items()}
    return params, arrays


@functools.lru_cache(maxsize=None)
def _unary_module(backend, dtype):
    if backend == "numpy":
        return compile_model(_unary_model(), dtype).load()
    from compiler.backends.c.backend import compile_model_c
    return compile_model_c(_unary_model(), dtype).load()


@pytest.mark.parametrize("row", [r.param() for r in ROWS if r.compiled])
def test_unary_rules_on_every_target(row):
    """The unary rows on every target and dtype, in one model (one build per target):
    float64 against finite differences at each row's tolerance, float32 against float64."""
    module = _unary_module(row.backend, row.compiled)
    for seed in (0, 1):
        params, arrays = _unary_draw(module, seed)
        if row.dtype == "float64":
            rows = check_gradients(module, params, arrays, rtol=min(r.rtol for r in UNARY.values()),
                                   atol=min(r.atol for r in UNARY.values()))
            assert rows and all(r.ok for r in rows), "\n" + format_table([r for r in rows if not r.ok])
        else:
            params32 = {k: v.astype(np.float32) for k, v in params.items()}
            ref = _unary_module(row.backend, "float64")
            assert float32_mismatches(module, ref, params32, as_dtype(arrays, np.float32)) == []


def test_every_rule_has_a_row():
    from compiler.core.adjoints import RULES
    row_of = {"ew": "ew_", "matmul": "matmul", "transpose": "transpose", "reshape": "reshape", "sum": "sum_",
              "mean": "mean", "lse": "logsumexp", "softmax": "softmax", "xent": "xent_", "concat": "concat",
              "im2col": "im2col_", "col2im": "col2im_", "window_max": "window_max", "embed": "embed_",
              "permute": "permute_", "bmm": "bmm", "causal_mask": "causal_", "key_mask": "key_mask"}
    for rule in RULES:
        assert any(k.startswith(row_of[rule]) for k in OPS), rule
