"""The C target's matrix products through an optimised BLAS (issue 14, item 1): the
scipy-openblas32 wheel's CBLAS when it is installed (the 'cblas' extra), the portable loops when
it is not or when asked (blas="none"), with the same results; the built extension finds the
library by itself in a fresh interpreter; the thread count goes through the library's API
(and threadpoolctl), never through environment variables; the C source stays strict C99 both
ways. The vectorised elementwise forms (issue 14, item 2): the same values as libm's within
a few ulp, inf and nan as before (every branch: tests/test_c_backend.py's tanh test)."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import compiler as bpc
from compiler.backends.c import backend as c_backend
from compiler.backends.c import blas as c_blas
from compiler.backends.c.backend import compile_model_c
from compiler.errors import UnsupportedError
from model_table import NEEDS_CC

pytestmark = NEEDS_CC
HAS_WHEEL = c_blas.find_scipy_openblas32() is not None
NEEDS_WHEEL = pytest.mark.skipif(not HAS_WHEEL, reason="scipy-openblas32 not installed (the 'cblas' extra)")

# products of 64*32*24 = 49152 multiply-adds and more: above GEMM_MIN_MACS, so BLAS runs them
SIZES = [48, 32, 24, 5]
BATCH = 64


def _model(name="blasnet"):
    return bpc.mlp(SIZES, "tanh", "softmax_cross_entropy", name=name)


def _batch(dtype=np.float64):
    rng = np.random.default_rng(3)
    return rng.standard_normal((BATCH, SIZES[0])).astype(dtype), rng.integers(0, SIZES[-1], BATCH)


def _agree(cm, npm, dtype, tol, data=None):
    """The C module's loss and gradients against the NumPy module's, on ``data`` (x, y) or
    the default batch."""
    x, y = data if data is not None else _batch(dtype)
    p = cm.init_params(0)
    ref_loss, ref = npm.backward({k: np.array(v) for k, v in p.items()}, x, y)
    loss, g = cm.backward(p, x, y)
    assert abs(loss - ref_loss) <= tol * abs(ref_loss)
    for k in ref:
        assert np.max(np.abs(g[k] - ref[k])) <= tol * max(1.0, np.max(np.abs(ref[k]))), k
    return loss, g


def test_products_are_above_the_threshold():
    assert min(BATCH * a * b for a, b in zip(SIZES, SIZES[1:-1])) >= max(c_backend.GEMM_MIN_MACS.values())
    source = compile_model_c(_model()).c_source
    assert "bpc_gemm(1, 0, 48, 32, n, v_x, v_dZ1, v_dW1);" in source   # dW1 = x.T @ dZ1
    assert "#define BPC_GEMM_MIN_MACS" in source


@NEEDS_WHEEL
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_blas_and_loops_agree_with_numpy(dtype, tol):
    compiled = compile_model_c(_model(), dtype)
    npm = bpc.compile_model(_model(), dtype=dtype).load()
    with_blas, loops = compiled.load(blas="auto"), compiled.load(blas="none")
    assert with_blas.blas_threads() >= 1 and loops.blas_threads() == 0
    a, b = _agree(with_blas, npm, np.dtype(dtype), tol), _agree(loops, npm, np.dtype(dtype), tol)
    assert abs(a[0] - b[0]) <= tol * abs(b[0])


def test_fallback_without_the_wheel(monkeypatch, tmp_path):
    """No scipy-openblas32: blas='auto' builds the portable loops (another cache entry), which
    give NumPy's gradients; asking for the wheel is a clear error."""
    monkeypatch.setattr(c_blas, "find_scipy_openblas32", lambda: None)
    compiled = compile_model_c(_model("fallback"))
    so = compiled.build(cache=tmp_path)
    cm = compiled.load(cache=tmp_path)
    assert cm.blas_threads() == 0 and cm.blas_threads(3) == 0
    _agree(cm, bpc.compile_model(_model("fallback")).load(), np.float64, 1e-10)
    with pytest.raises(UnsupportedError, match="scipy-openblas32.*pip install"):
        compiled.build(cache=tmp_path, blas="scipy-openblas32")
    with pytest.raises(ValueError, match="blas must be one of"):
        compiled.build(cache=tmp_path, blas="mkl")
    monkeypatch.undo()
    if HAS_WHEEL:   # the same source with the wheel: another build, beside the first
        assert compiled.build(cache=tmp_path) != so


@NEEDS_WHEEL
def test_thread_count_through_the_library_api():
    from threadpoolctl import threadpool_info, threadpool_limits   # (its import sets KMP_DUPLICATE_LIB_OK)
    cm = compile_model_c(_model()).load()
    before = cm.blas_threads()
    env = dict(os.environ)
    try:
        assert cm.blas_threads(1) == 1 and cm.blas_threads() == 1
        for bad in (0, -1, 1.5, "2", True):
            with pytest.raises(ValueError, match="k must be an int >= 1"):
                cm.blas_threads(bad)
        ours = [i for i in threadpool_info() if i["filepath"] == c_blas.find_scipy_openblas32().library]
        assert ours and ours[0]["num_threads"] == 1
        cm.blas_threads(2)
        with threadpool_limits(limits=1, user_api="blas"):
            assert cm.blas_threads() == 1
        assert cm.blas_threads() == 2
    finally:
        cm.blas_threads(before)
    assert dict(os.environ) == env     # nothing set behind the user's back


@NEEDS_WHEEL
def test_extension_finds_the_library_in_a_fresh_interpreter(tmp_path):
    """The built extension loads by itself (rpath): no import of scipy_openblas32 first, no
    LD_LIBRARY_PATH, another working directory; and a written wrapper built there uses it too."""
    compiled = compile_model_c(_model("fresh"))
    so = compiled.build(cache=tmp_path / "cache")
    compiled.write(tmp_path / "out")
    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location({compiled.ext_name!r}, {str(so)!r})
        ext = importlib.util.module_from_spec(spec); spec.loader.exec_module(ext)
        assert "scipy_openblas32" not in sys.modules
        print(ext.lib._bpc_fresh_blas_threads(0))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) >= 1
    wrapper = "import sys; sys.path.insert(0, 'out'); import fresh; print(fresh.blas_threads())"
    run = subprocess.run([sys.executable, "-c", wrapper], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) >= 1


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("defines", [[], ["-DBPC_CBLAS", "-DBPC_CBLAS_PREFIX=scipy_"], ["-DBPC_CBLAS"]])
def test_c_source_is_strict_c99_with_and_without_blas(tmp_path, dtype, defines):
    compiled = compile_model_c(bpc.mlp([4, 3, 2], "sigmoid", "mse", name="strict"), dtype)
    compiled.write(tmp_path)
    cc = shutil.which("gcc") or shutil.which("cc")
    proc = subprocess.run([cc, "-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-O2", *defines, "-c",
                           "strict.c", "-o", "model.o"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_vectorised_exp_and_sigmoid_match_numpy(dtype):
    """exp and sigmoid activations on both targets, across the range, at +-inf, nan and where
    exp overflows or underflows to subnormals."""
    dt = np.dtype(dtype)
    big = {"float64": [709.0, 709.7, 710.0, -708.0, -740.0, -746.0], "float32": [88.0, 88.7, 89.0, -87.0, -100.0, -104.0]}
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(-30, 30, 300), [0.0, -0.0, 1e-30, np.inf, -np.inf, np.nan], big[dtype]])
    for act in ("exp", "sigmoid"):
        model = bpc.mlp([1, 1], act, "mse", name=f"v{act}")
        cm, npm = compile_model_c(model, dtype).load(), bpc.compile_model(model, dtype=dtype).load()
        p = {"W1": np.ones((1, 1), dt), "b1": np.zeros(1, dt)}
        x = values.astype(dt).reshape(-1, 1)
        with np.errstate(all="ignore"):
            want = npm.forward(p, x).ravel()
        got = cm.forward(p, x).ravel()
        assert np.array_equal(np.isnan(got), np.isnan(want)), act
        ok = ~np.isnan(want)
        tiny = np.finfo(dt).tiny
        np.testing.assert_allclose(got[ok], want[ok], rtol=4 * np.finfo(dt).eps, atol=4 * tiny * np.finfo(dt).eps)


def test_machine_tuned_builds_are_keyed_by_the_machine(monkeypatch, tmp_path):
    """-march=native only with the CPU it expands to in the cache key: another CPU description is
    another build; a compiler that refuses -march=native gives a portable build that agrees."""
    flags, machine = c_backend._native()
    if flags:
        assert "-march=native" in flags and machine
    compiled = compile_model_c(_model("keyed"))
    here = compiled.build(cache=tmp_path, blas="none")
    monkeypatch.setattr(c_backend, "_native", lambda: (("-march=native",), machine + " -mno-such-cpu"))
    other = compiled.build(cache=tmp_path, blas="none")
    monkeypatch.setattr(c_backend, "_native", lambda: ((), ""))
    portable = compiled.build(cache=tmp_path, blas="none")
    assert len({here, other, portable}) == 3
    cm = compiled.load(cache=tmp_path, blas="none")
    _agree(cm, bpc.compile_model(_model("keyed")).load(), np.float64, 1e-10)



def _bmm_model(ta, tb, m=12, k=20, p=16):
    """loss = mean over samples of sum(C**2)/2, C = op(A) @ op(B) batched over 3 heads per sample,
    A and B computed from the data (every operand has an adjoint; dC = C): each product is
    m x p x k = 3840 multiply-adds, above GEMM_MIN_MACS in both precisions; m, k and p differ, so
    a wrong leading dimension or transpose flag cannot agree by accident."""
    import sympy as sp
    from compiler.core import ir
    from compiler.core.ir import ARG, N
    from compiler.core.model import Model
    x = ir.input_node("X", (N, 4), "data")
    sa, sb = ((k, m) if ta else (m, k)), ((p, k) if tb else (k, p))
    params = (ir.param_node("A", (4, 3 * sa[0] * sa[1])), ir.param_node("B", (4, 3 * sb[0] * sb[1])))

    def operand(w, shape):
        return ir.ew(sp.tanh(ARG[0]), [ir.reshape(ir.matmul(x, w), (N, 3, *shape))])
    c = ir.bmm(operand(params[0], sa), operand(params[1], sb), ta=ta, tb=tb)
    loss = ir.mean(ir.reduce_sum(ir.ew(ARG[0] ** 2 / 2, [c]), (1, 2, 3)))
    return Model(f"bmm{int(ta)}{int(tb)}", (x,), (), params, c, loss, {}, {q.name: ("zeros",) for q in params})


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_batched_products_on_gemm(ta, tb, dtype, tol):
    """bmm above the threshold: one gemm per batch index (issue 14, item 1) when built with a
    BLAS, the loops without; both agree with the NumPy module (loss and gradients, through every
    adjoint product and its flags)."""
    model = _bmm_model(ta, tb)
    compiled = compile_model_c(model, dtype)
    assert f"bpc_gemm({int(ta)}, {int(tb)}, 12, 16, 20, " in compiled.c_source   # the forward product
    assert "if (BPC_GEMM(12, 16, 20)) {" in compiled.c_source
    npm = bpc.compile_model(model, dtype=dtype).load()
    rng = np.random.default_rng(5)
    p = {q: (0.3 * rng.standard_normal(shape)).astype(dtype) for q, shape in npm.PARAMS.items()}
    x = rng.standard_normal((7, 4)).astype(dtype)
    ref_loss, ref = npm.backward(dict(p), x)
    for blas in ("auto", "none"):
        cm = compiled.load(blas=blas)
        loss, g = cm.backward(dict(p), x)
        assert abs(loss - ref_loss) <= tol * abs(ref_loss), blas
        for q in ref:
            assert np.max(np.abs(g[q] - ref[q])) <= tol * np.max(np.abs(ref[q])), (blas, q)


def _attention_block(name="blockc"):
    """A causal transformer block scored by softmax cross-entropy at every position: heads of
    (32, 16), rows of 32 (partial sums), products above GEMM_MIN_MACS in both precisions."""
    net = bpc.Network(name)
    h = net.transformer_block(net.input("x", shape=(32, 32)), heads=2, mlp=64, causal=True)
    return net.build(h, loss="softmax_cross_entropy", target=net.target("y", kind="label", length=32))


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-5)])
def test_attention_block_on_gemm_and_loops_agrees_with_numpy(dtype, tol):
    """The block's C step: the heads read and written in place by strided products (no
    transpose copies), the three products of the input gradient added into one array, the
    causal masks printed inside their neighbours, rows summed in partial sums; with the BLAS
    (if installed) and with the portable loops, NumPy's loss and gradients."""
    compiled = compile_model_c(_attention_block(), dtype)
    source = compiled.c_source
    backward = source[source.index("int blockc_backward("):]
    assert "bpc_gemm_ld(0, 1, 32, 32, 16, v_Qs2 + (_q / 2)*1024 + (_q % 2)*16, 32," in backward   # Q @ K^T
    assert "bpc_gemm_add(" in backward and "_s_lanes[16]" in backward
    assert ".transpose((0, 2, 1, 3)): a view of v_Qs2 */" in backward
    npm = bpc.compile_model(_attention_block(), dtype=dtype).load()
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((3, 32, 32)).astype(dtype), rng.integers(0, 32, (3, 32))
    modules = [compiled.load(blas="none")] + ([compiled.load(blas="auto")] if HAS_WHEEL else [])
    for cm in modules:
        _agree(cm, npm, dtype, tol, (x, y))
