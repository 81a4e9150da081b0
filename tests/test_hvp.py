"""Second order (issue 16, item 1): ``hvp`` (forward over reverse) and ``gnvp`` (J^T H_loss J v).

Every op of the op table has a tangent rule; on every model of the model table and both
targets, ``hvp`` equals central differences of ``backward`` along v and returns backward's loss
and gradients; on small models the Hessian built column by column from ``hvp`` equals the exact
Hessian (closed form, or SymPy's), and ``gnvp`` is symmetric positive semi-definite and equals
the Hessian where the model is linear in its parameters (MSE)."""
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from compiler.core import ops
from compiler.gradcheck import random_batch
from model_table import MODELS, NEEDS_CC, build, perturbed, rel_err

MODEL_IDS = [m[0] for m in MODELS]
TARGETS = [pytest.param("numpy", id="numpy"), pytest.param("c", id="c", marks=NEEDS_CC)]
# every (model, target) of the table but char_lm in C: its C module with hvp and gnvp takes gcc
# 40-120 s to build; its ops' tangent rules are backend-neutral graphs, checked on NumPy here and
# printed by the same C statements as its forward and backward (tests/test_sequence.py)
CASES = [pytest.param(m, t, id=f"{m}-{t}", marks=NEEDS_CC if t == "c" else ())
         for m in MODEL_IDS for t in ("numpy", "c") if not (m == "char_lm" and t == "c")]


def _build(model_id, target):
    return build(model_id, target, "float64" if target == "c" else None, second_order=True)


def _compile(model, target):
    return (bpc.compile_model(model) if target == "numpy" else bpc.compile_model_c(model, second_order=True)).load()


def test_every_op_has_a_tangent_rule():
    missing = [name for name, op in ops.REGISTRY.items() if op.jvp is None]
    assert not missing, f"ops without a jvp (tangent) rule: {missing}"
    assert len(ops.REGISTRY) >= 23        # the table itself was enumerated, not an empty dict


def _direction(mod, seed):
    rng = np.random.default_rng(seed)
    v = {k: rng.standard_normal(np.shape(a)) for k, a in mod.init_params(0).items()}
    norm = np.sqrt(sum(float(np.sum(a * a)) for a in v.values()))
    return {k: a / norm for k, a in v.items()}


def _flat(d, names):
    return np.concatenate([np.ravel(np.asarray(d[k], np.float64)) for k in names])


@pytest.mark.parametrize("model_id, target", CASES)
def test_hvp_against_central_differences_of_backward(model_id, target):
    mod = _build(model_id, target)
    params = perturbed(mod, seed=4)
    arrays = random_batch(mod, batch=7, seed=6)
    v = _direction(mod, 8)
    loss, grads = mod.backward(params, *arrays)
    loss2, grads2, hv = mod.hvp(params, v, *arrays)
    names = list(mod.PARAMS)
    assert list(hv) == names and list(grads2) == names
    assert loss2 == pytest.approx(loss, rel=1e-13, abs=1e-15)
    assert rel_err(_flat(grads2, names), _flat(grads, names)) < 1e-12
    eps = 1e-6
    gp = mod.backward({k: params[k] + eps * v[k] for k in names}, *arrays)[1]
    gm = mod.backward({k: params[k] - eps * v[k] for k in names}, *arrays)[1]
    fd = (_flat(gp, names) - _flat(gm, names)) / (2 * eps)
    err = rel_err(_flat(hv, names), fd)
    assert err < 1e-5, f"{model_id} on {target}: hvp differs from central differences of backward by {err:.2e}"
    for k in names:
        assert np.shape(hv[k]) == mod.PARAMS[k]
    if hasattr(mod, "gnvp"):
        # J^T H J is positive semi-definite: v^T G v >= 0 along any direction
        for seed in (8, 9, 10):
            w = _direction(mod, seed)
            _, grads3, gv = mod.gnvp(params, w, *arrays)
            assert rel_err(_flat(grads3, names), _flat(grads, names)) < 1e-12
            assert float(_flat(w, names) @ _flat(gv, names)) >= -1e-12 * max(1.0, np.abs(_flat(gv, names)).max())


def _matrix_of(fn, mod, params, arrays):
    """The matrix of the linear map v -> fn(params, v, ...) (hvp or gnvp), column by column."""
    names = list(mod.PARAMS)
    sizes = [int(np.prod(mod.PARAMS[k], dtype=np.int64)) for k in names]
    total = sum(sizes)
    cols = []
    for j in range(total):
        e = np.zeros(total)
        e[j] = 1.0
        v, at = {}, 0
        for k, s in zip(names, sizes):
            v[k] = e[at:at + s].reshape(mod.PARAMS[k])
            at += s
        cols.append(_flat(fn(params, v, *arrays)[2], names))
    return np.array(cols).T


@pytest.mark.parametrize("target", TARGETS)
def test_exact_hessian_of_a_polynomial_fit(target):
    """loss = mean((a x^3 + b x^2 + c x + d - y)^2): H = (2/n) F^T F, F = [x^3, x^2, x, 1]
    (parameters in PARAMS order); linear in the parameters, so the Gauss-Newton matrix is H."""
    mod = _build("poly_fit", target)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-2, 2, 9), rng.standard_normal(9)
    params = {k: np.asarray(rng.standard_normal()) for k in mod.PARAMS}
    powers = {"a": 3, "b": 2, "c": 1, "d": 0}
    F = np.stack([x ** powers[k] for k in mod.PARAMS], axis=1)
    exact = 2 / len(x) * F.T @ F
    H = _matrix_of(mod.hvp, mod, params, [x, y])
    assert rel_err(H, exact) < 1e-13
    assert not hasattr(mod, "gnvp")       # an expression model: no built-in loss, no Gauss-Newton


@pytest.mark.parametrize("target", TARGETS)
def test_linear_model_mse_gauss_newton_equals_hessian(target):
    """A linear network with MSE: loss = mean((xW + b - y)^2) over n*k entries, H = (2/(n k))
    [x 1]^T [x 1] (kron) I_k; gnvp equals hvp and both the closed form."""
    model = bpc.mlp([3, 2], activation="identity", loss="mse", name="linear")
    mod = _compile(model, target)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    params = perturbed(mod, seed=2)
    H = _matrix_of(mod.hvp, mod, params, [x, y])
    G = _matrix_of(mod.gnvp, mod, params, [x, y])
    A = np.hstack([x, np.ones((6, 1))])
    exact = 2 / (6 * 2) * np.kron(A.T @ A, np.eye(2))      # rows: W1 (3x2 row-major), then b1 (2)
    assert rel_err(H, exact) < 1e-13
    assert rel_err(G, exact) < 1e-13


def _sympy_hessian(model_id, mod, params, arrays):
    """The exact Hessian of expr_multi's loss, by SymPy: mean over samples of
    log(cosh(p - y)) + w^2/100, p = w sin(k x1) + exp(-s^2 x2^2) + log(1 + exp(w x2))."""
    w, k, s, x1, x2, y = sp.symbols("w k s x1 x2 y")
    p = w * sp.sin(k * x1) + sp.exp(-s**2 * x2**2) + sp.log(1 + sp.exp(w * x2))
    per = sp.log(sp.cosh(p - y)) + sp.Rational(1, 100) * w**2
    syms = [{"w": w, "k": k, "s": s}[name] for name in mod.PARAMS]
    H = sp.lambdify([*syms, x1, x2, y], sp.hessian(per, syms), "numpy")
    vals = [float(params[name]) for name in mod.PARAMS]
    X1, X2, Y = (np.ravel(a) for a in arrays)
    return np.mean([np.array(H(*vals, a, b, c), dtype=float) for a, b, c in zip(X1, X2, Y)], axis=0)


@pytest.mark.parametrize("target", TARGETS)
def test_exact_hessian_of_a_nonlinear_expression_model(target):
    mod = _build("expr_multi", target)
    params = perturbed(mod, seed=3)
    arrays = random_batch(mod, batch=5, seed=4)
    H = _matrix_of(mod.hvp, mod, params, arrays)
    assert rel_err(H, _sympy_hessian("expr_multi", mod, params, arrays)) < 1e-12
    assert rel_err(H, H.T) < 1e-13


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model_id", ["mlp_tanh_mse", "softmax_labels", "bce_logits", "two_input_concat"])
def test_hessian_symmetric_and_gauss_newton_psd(model_id, target):
    mod = _build(model_id, target)
    params = perturbed(mod, seed=4)
    arrays = random_batch(mod, batch=7, seed=6)
    H = _matrix_of(mod.hvp, mod, params, arrays)
    assert rel_err(H, H.T) < 1e-12
    G = _matrix_of(mod.gnvp, mod, params, arrays)
    assert rel_err(G, G.T) < 1e-12
    eig = np.linalg.eigvalsh((G + G.T) / 2)
    assert eig.min() >= -1e-12 * eig.max(), f"Gauss-Newton matrix of {model_id} has eigenvalue {eig.min():.3g}"


def _concat_data():
    """A graph that joins features to raw data (concat(h, b)): the tangent of the join has
    zeros (zeros_like) where the data is."""
    net = bpc.Network("join_data")
    a, b = net.input("a", 3), net.input("b", 2)
    h = net.dense(a, 4, "tanh")
    return net.build(net.dense(net.concat(h, b), 2), loss="mse", target=net.target("y", 2))


@pytest.mark.parametrize("target", TARGETS)
def test_hvp_through_a_join_with_data(target):
    model = _concat_data()
    mod = _compile(model, target)
    params = perturbed(mod, seed=1)
    arrays = random_batch(mod, batch=5, seed=2)
    v = _direction(mod, 3)
    names = list(mod.PARAMS)
    hv = _flat(mod.hvp(params, v, *arrays)[2], names)
    eps = 1e-6
    fd = (_flat(mod.backward({k: params[k] + eps * v[k] for k in names}, *arrays)[1], names)
          - _flat(mod.backward({k: params[k] - eps * v[k] for k in names}, *arrays)[1], names)) / (2 * eps)
    assert rel_err(hv, fd) < 1e-6
    assert "zeros_like" in bpc.compile_model(model).source


@pytest.mark.parametrize("target", TARGETS)
def test_bad_direction_names_v(target):
    mod = _build("mlp_tanh_mse", target)
    params = mod.init_params(0)
    x, y = random_batch(mod, batch=3)
    v = {k: np.zeros_like(a) for k, a in params.items()}
    del v["W1"]
    with pytest.raises(ValueError, match=r"v \(the direction.*'W1'"):
        mod.hvp(params, v, x, y)
    bad = {**{k: np.zeros_like(a) for k, a in params.items()}, "W1": np.zeros((1, 1))}
    with pytest.raises(ValueError, match=r"v \(the direction.*shape"):
        mod.hvp(params, bad, x, y)


def test_show_hvp_text_and_latex(capsys):
    from compiler.cli.app import main
    from mathtext_check import parses
    spec = str(Path(__file__).resolve().parent.parent / "examples" / "mlp_tanh.toml")
    assert main(["show", spec, "--hvp"]) == 0
    text = capsys.readouterr().out
    assert "Hessian-vector product for W1, shape (2, 16):" in text
    assert "Gauss-Newton-vector product J^T H_loss J v for b3" in text
    assert "txW1 = x @ v_W1" in text and "Hv_W1 = x.T @ tdZ1" in text
    assert "tdZ2 = -2*H2*dH2*tH2 + H2_e*(dZ3_v_W3 + tdZ3_W3)" in text    # d(tanh') = -2 H tH, dH2 reused
    assert main(["show", spec, "--hvp", "--format", "latex", "--param", "W1"]) == 0
    tex = capsys.readouterr().out
    lines = [ln.strip().rstrip("\\").strip() for ln in tex.splitlines() if "&=" in ln]
    assert lines and all(parses(ln.replace("&=", "=")) for ln in lines)
    assert r"\mathrm{Hv\_W}_{1} &= x^{\top} \mathrm{tdZ}_{1}" in tex
    assert main(["show", spec, "--hvp", "--format", "dot"]) == 2
    assert "--hvp prints formulas" in capsys.readouterr().err


def test_derivative_factors_are_computed_once_in_hvp():
    """tanh's derivative 1 - H**2 is computed once in hvp, for the adjoint, the tangent and the
    tangent of the adjoint, which all multiply by it (issue 16, item 6: sums shared in hvp)."""
    factor = "1 - H{k}*H{k}"
    compiled = bpc.compile_model(bpc.mlp([3, 5, 4, 2], "tanh", "softmax_cross_entropy", name="factors"))
    src = compiled.source
    body = src[src.index("\ndef hvp("):src.index("\ndef ", src.index("\ndef hvp(") + 1)]
    for k in (1, 2):
        code = [ln.strip() for ln in body.splitlines() if not ln.strip().startswith("#")]
        assert code.count(f"H{k}_e = " + factor.format(k=k)) == 1, body
        assert sum(factor.format(k=k) in ln for ln in code) == 1, body
        assert sum(f"H{k}_e" in ln for ln in code) >= 4, body     # defined, read by dZ, tH and tdZ
    mod = compiled.load()
    params = perturbed(mod, seed=2)
    x, y = random_batch(mod, batch=6, seed=3)
    v = _direction(mod, 4)
    eps = 1e-6
    names = list(mod.PARAMS)
    flat = lambda d: np.concatenate([np.ravel(d[k]) for k in names])  # noqa: E731
    gp = mod.backward({k: params[k] + eps * v[k] for k in names}, x, y)[1]
    gm = mod.backward({k: params[k] - eps * v[k] for k in names}, x, y)[1]
    assert rel_err(flat(mod.hvp(params, v, x, y)[2]), (flat(gp) - flat(gm)) / (2 * eps)) < 1e-6


def test_returned_arrays_are_fresh_on_every_call():
    """Wide layers use reusable scratch buffers; hvp's and gnvp's returned gradients and
    products must never be among them (a later call would overwrite an earlier result)."""
    mod = bpc.compile_model(bpc.mlp([40, 48, 40, 10], "tanh", "softmax_cross_entropy", name="wide")).load()
    params = mod.init_params(0)
    x, y = random_batch(mod, batch=16, seed=1)
    for fn in (mod.hvp, mod.gnvp):
        _, g1, h1 = fn(params, _direction(mod, 1), x, y)
        keep = {k: (np.array(g1[k]), np.array(h1[k])) for k in g1}
        fn(params, _direction(mod, 2), x, y)
        for k, (g, h) in keep.items():
            assert np.array_equal(g1[k], g) and np.array_equal(h1[k], h), k


def test_second_order_can_be_left_out(tmp_path):
    from compiler.cli.app import main
    model = bpc.mlp([2, 3, 1], activation="tanh", name="first_only")
    full, lean = bpc.compile_model(model), bpc.compile_model(model, second_order=False)
    assert "def hvp(" in full.source and "def gnvp(" in full.source
    assert "def hvp(" not in lean.source and "def gnvp(" not in lean.source
    assert full.source_hash == lean.source_hash and full.module_name != lean.module_name   # two cache files
    from compiler.backends.c.backend import compile_model_c
    assert "_hvp(" not in compile_model_c(model).c_source          # C: opt-in (a longer gcc build)
    assert "_hvp(" in compile_model_c(model, second_order=True).c_source
    assert "def hvp(" in compile_model_c(model).wrapper_source   # ...but the name is there, with the way to get it
    body = [c.source.split("def backward(")[1].split("return ")[0] for c in (full, lean)]
    assert body[0] == body[1]
    spec = Path(__file__).resolve().parent.parent / "examples" / "mlp_tanh.toml"
    assert main(["compile", str(spec), "--no-hvp", "-o", str(tmp_path / "m.py")]) == 0
    assert "def hvp(" not in (tmp_path / "m.py").read_text()


@pytest.mark.parametrize("target", TARGETS)
def test_a_parameter_named_v(target):
    """hvp's direction argument is v, unless the model has a leaf of that name."""
    v, w, x = sp.symbols("v w x")
    model = bpc.expression_model(v * sp.tanh(w * x), {v: 0.5, w: -0.3}, [x], name="named_v")
    mod = _compile(model, target)
    params = {"v": np.asarray(0.7), "w": np.asarray(0.2)}
    xs, ys = np.linspace(-1, 1, 5), np.linspace(0, 1, 5)
    direction = {"v": np.asarray(1.0), "w": np.asarray(-2.0)}
    hv = mod.hvp(params, direction, xs, ys)[2]
    eps = 1e-6
    gp = mod.backward({k: params[k] + eps * direction[k] for k in params}, xs, ys)[1]
    gm = mod.backward({k: params[k] - eps * direction[k] for k in params}, xs, ys)[1]
    for k in params:
        assert float(hv[k]) == pytest.approx(float(gp[k] - gm[k]) / (2 * eps), rel=1e-6)


@NEEDS_CC
def test_a_c_module_without_second_order_says_how_to_get_it():
    from compiler.backends.c.backend import compile_model_c
    mod = compile_model_c(bpc.mlp([2, 3, 1], activation="tanh", name="first_only_c")).load()
    params = mod.init_params(seed=0)
    x, y = np.zeros((4, 2)), np.zeros((4, 1))
    for fn in (mod.hvp, mod.gnvp):
        with pytest.raises(NotImplementedError, match=r"second_order=True.*--hvp"):
            fn(params, params, x, y)
