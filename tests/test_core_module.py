"""The generated module as a product: interface, standalone import, determinism, readability."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from model_table import MODELS


def test_interface_of_an_mlp_module():
    mod = bpc.compile_model(bpc.mlp([2, 16, 16, 1], "tanh", "mse", name="reg")).load()
    assert mod.PARAMS == {"W1": (2, 16), "b1": (16,), "W2": (16, 16), "b2": (16,), "W3": (16, 1), "b3": (1,)}
    assert mod.INPUTS == {"x": (2,)} and mod.TARGETS == {"y": (1,)} and mod.TARGET_KINDS == {"y": "real"}
    assert mod.LOSS == "mse"
    assert set(mod.FORMULAS) == set(mod.PARAMS)
    params = mod.init_params(seed=0)
    again = mod.init_params(seed=0)
    other = mod.init_params(seed=1)
    assert all(np.array_equal(params[k], again[k]) for k in params)
    assert not np.array_equal(params["W1"], other["W1"])
    assert np.all(params["b1"] == 0) and params["W1"].std() > 0.1
    # Glorot-uniform bound for tanh layers
    assert np.abs(params["W2"]).max() <= np.sqrt(6 / 32)


def test_he_initialisation_for_relu():
    mod = bpc.compile_model(bpc.mlp([400, 300, 1], "relu", name="he")).load()
    w = mod.init_params(seed=0)["W1"]
    assert w.std() == pytest.approx(np.sqrt(2 / 400), rel=0.05)


def test_label_targets_are_validated():
    mod = bpc.compile_model(bpc.mlp([2, 3], loss="softmax_cross_entropy", name="clf")).load()
    assert mod.TARGET_KINDS == {"y": "label"} and mod.TARGETS == {"y": ()} and mod.CLASSES == {"y": 3}
    assert mod.LOSS == "softmax_cross_entropy"
    params = mod.init_params()
    x = np.zeros((2, 2))
    with pytest.raises(ValueError, match="labels in 0..2"):
        mod.loss(params, x, np.array([0, 3]))
    with pytest.raises(ValueError, match="integer class labels"):
        mod.loss(params, x, np.array([0.5, 1.0]))
    assert np.isfinite(mod.loss(params, x, np.array([0.0, 2.0])))   # integral floats are fine


def test_shapes_are_validated():
    mod = bpc.compile_model(bpc.mlp([2, 3, 1], name="shp")).load()
    params = mod.init_params()
    with pytest.raises(ValueError, match=r"x must have shape \(batch,\) \+ \(2,\)"):
        mod.forward(params, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="different batch sizes"):
        mod.loss(params, np.zeros((4, 2)), np.zeros((5, 1)))


def test_parameters_are_validated():
    mod = bpc.compile_model(bpc.mlp([2, 4, 1], name="pv")).load()
    params = mod.init_params()
    x, y = np.zeros((3, 2)), np.zeros((3, 1))
    for bad in (np.array([0.3]), np.array(0.3), np.zeros((4, 1))):
        with pytest.raises(ValueError, match=r"parameter 'b1' must have shape \(4,\)"):
            mod.loss({**params, "b1": bad}, x, y)
    with pytest.raises(ValueError, match="no entry 'W2'"):
        mod.backward({k: v for k, v in params.items() if k != "W2"}, x, y)
    as_lists = {k: v.tolist() for k, v in params.items()}
    assert mod.loss(as_lists, x, y) == mod.loss(params, x, y)


def test_empty_batch_is_refused():
    mod = bpc.compile_model(bpc.mlp([2, 4, 1], name="empty")).load()
    for fn in (mod.loss, mod.backward):
        with pytest.raises(ValueError, match="the batch is empty"):
            fn(mod.init_params(), np.zeros((0, 2)), np.zeros((0, 1)))


def test_written_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = bpc.compile_model(bpc.mlp([2, 1], name="perm")).write(tmp_path / "perm.py")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_module_imports_with_numpy_alone(tmp_path):
    path = tmp_path / "standalone.py"
    bpc.compile_model(bpc.mlp([2, 4, 3], "gelu", "softmax_cross_entropy", name="alone")).write(path)
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("standalone", {str(path)!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        import numpy as np
        p = m.init_params(seed=0)
        loss, g = m.backward(p, np.ones((3, 2)), np.array([0, 1, 2]))
        heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('sympy', 'compiler', 'jinja2', 'mpmath'))
        assert not heavy, heavy
        print(round(loss, 6))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 0


@pytest.mark.parametrize("model_id", [m[0] for m in MODELS])
def test_same_model_same_bytes(model_id):
    build = dict(MODELS)[model_id]
    assert bpc.compile_model(build()).source == bpc.compile_model(build()).source


def test_same_bytes_across_processes(tmp_path):
    code = textwrap.dedent("""
        import sys; sys.path.insert(0, 'tests')
        import hashlib, compiler as bpc
        from model_table import MODELS
        print(hashlib.sha256(''.join(bpc.compile_model(b()).source for _, b in MODELS).encode()).hexdigest())
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
        assert r.returncode == 0, r.stderr
        outs.add(r.stdout)
    assert len(outs) == 1


def test_header_names_source_and_hash():
    src = bpc.compile_model(bpc.mlp([2, 3, 1], name="hdr")).source
    head = src.split('"""')[1]
    assert "generated by bpc" in head and "Source: Python API" in head and "sha256:" in head
    other = bpc.compile_model(bpc.mlp([2, 4, 1], name="hdr")).source
    assert src.split("Source hash: ")[1][:71] != other.split("Source hash: ")[1][:71]


def test_write_is_atomic_and_leaves_no_temporaries(tmp_path, monkeypatch):
    compiled = bpc.compile_model(bpc.mlp([2, 3, 1], name="atomic"))
    target = tmp_path / "atomic.py"
    target.write_text("# a good old module\n")

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        compiled.write(target)
    assert target.read_text() == "# a good old module\n"
    assert [p.name for p in tmp_path.iterdir()] == ["atomic.py"]
    monkeypatch.undo()
    compiled.write(target)
    assert target.read_text() == compiled.source


def test_formula_beside_each_gradient_line():
    src = bpc.compile_model(bpc.mlp([2, 3, 1], name="fm")).source
    body = src.split("def backward")[1].split("return")[0]
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    grads = [i for i, ln in enumerate(lines) if ln.startswith("d") and " = " in ln]
    assert grads
    for i in grads:
        assert lines[i - 1].startswith("# " + lines[i].split(" = ")[0] + " = "), lines[i - 1:i + 1]


def test_formulas_are_the_chain_of_named_adjoints():
    c = bpc.compile_model(bpc.mlp([2, 3, 1], "tanh", name="chain"))
    assert c.formulas["W2"] == "dZ2 = 2*(Z2 - y)/n; dW2 = H1.T @ dZ2"
    assert c.formulas["W1"] == ("dZ2 = 2*(Z2 - y)/n; dH1 = dZ2 @ W2.T; dZ1 = dH1*(1 - H1**2); "
                                "dW1 = x.T @ dZ1")
    assert r"H_{1}^{\top}" in c.latex["W2"]
    clf = bpc.compile_model(bpc.mlp([2, 3], loss="softmax_cross_entropy", name="clf"))
    assert clf.formulas["W1"] == "dZ1 = (softmax(Z1) - onehot(y))/n; dW1 = x.T @ dZ1"


@pytest.mark.parametrize("width", [3, 64])   # the one-line and the in-place statement forms
def test_simplification_reuses_forward_values(width):
    def backward_src(act, fn="backward"):
        src = bpc.compile_model(bpc.mlp([2, width, 1], act, name="s")).source
        return src.split(f"\ndef {fn}(")[1].split("\ndef ")[0]   # (up to the next function)
    # each activation is evaluated once (forward); its derivative is built from its output H1
    tanh = backward_src("tanh")
    assert tanh.count("np.tanh(") == 1 and "H1*H1" in tanh.replace("H1, H1", "H1*H1")
    # and so in hvp, whose second derivatives are built from H1 too
    assert backward_src("tanh", "hvp").count("np.tanh(") == 1
    sig = backward_src("sigmoid")
    assert sig.count("_sigmoid(") == 1 and ("1 - H1" in sig or "np.subtract(1, H1" in sig)
    ex = backward_src("exp")
    assert ex.count("np.exp(") == 1
    relu = backward_src("relu")
    assert relu.count("np.maximum(") == 1 and ("H1 > 0" in relu or "heaviside(H1" in relu)


def test_zero_adjoints_emit_nothing():
    a, b, x = sp.symbols("a b x")
    mod_c = bpc.compile_model(bpc.expression_model(a * x, {a: 1.0, b: 2.0}, [x], name="unused"))
    body = mod_c.source.split("def backward")[1]
    assert "db" not in body.split("return")[0]          # no statement for the unused parameter
    assert "'b': np.zeros_like(b)" in body
    assert "dx" not in body                              # data inputs get no adjoint
    mod = mod_c.load()
    loss, grads = mod.backward(mod.init_params(), np.array([1.0, 2.0]), np.array([0.0, 1.0]))
    assert grads["b"] == 0 and grads["a"] != 0


def test_operation_counts_drop_with_simplification():
    stats = bpc.compile_model(bpc.mlp([2, 8, 8, 1], "tanh", name="st")).stats
    before, after = stats["before_simplification"], stats["after_simplification"]
    assert after["total_tensor_ops"] < before["total_tensor_ops"]


def test_small_integer_powers_are_expanded():
    a, x = sp.symbols("a x")
    src = bpc.compile_model(bpc.expression_model(a * x**3, {a: 1.0}, [x], name="pw")).source
    assert "**" not in src.split("def forward")[1].split("return")[0]


@pytest.mark.parametrize("first", [
    "from compiler.spec.loader import load_spec; load_spec('examples/poly_fit.toml')",   # spec.py imports the submodule
    "import compiler.frontends.expression",
    "from compiler.frontends.expression import expression_model",
])
def test_expression_model_stays_the_function_after_its_submodule_is_imported(first):
    # in a fresh interpreter: the test order must not decide it
    code = f"import compiler as bpc; {first}; print(callable(bpc.expression_model))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"
