"""Adding an op is one module: a record registered with its constructor, adjoint rule, tangent
rule, formulas and a statement per backend is differentiated, printed and compiled on every backend, with
nothing else changed. (In a subprocess: the probe op must not stay in this process's registry.)"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent

# a new op, written as an op module of compiler/core/ops would be: row-wise sum of squares
OP_MODULE = r'''
"""``sumsq``: the row-wise sum of squares of one (n, k) input, shape (n,); no attrs."""
from compiler.core import ir
from compiler.core.ir import ARG, make
from compiler.core.ops import Op, register


def sumsq(z):
    return make("sumsq", (z,), z.shape[:1])


def _adjoint(node, g, wants):
    z = node.inputs[0]
    return [ir.ew(2 * ARG[0] * ARG[1], [z, g], shape=z.shape)]


def _jvp(node, t):
    z = node.inputs[0]
    return ir.reduce_sum(ir.ew(2 * ARG[0] * ARG[1], [z, t[0]], shape=z.shape), (1,))


def _numpy(st, node):
    return [f"{st.name(node)} = np.sum(np.square({st.ref(node.inputs[0])}), axis=1)"]


def _c(st, node):
    (z,) = node.inputs
    k = st.dims(z.shape)[1]
    zij = st.elem(z, ["_i", "_j"])
    return ["for (size_t _i = 0; _i < n; _i++) {",
            f"    {st.real} _s = {st.lit(0)};",
            f"    for (size_t _j = 0; _j < {k}; _j++) _s += {zij} * {zij};",
            f"    {st.name(node)}[_i] = _s;", "}"]


register(Op("sumsq", (sumsq,), _adjoint,
            text=lambda node, a, fm: f"sumsq({a[0]})",
            latex=lambda node, a, fm: rf"\sum_j {a[0]}^2",
            statements={"numpy": _numpy, "c": _c}, jvp=_jvp))
'''

SCRIPT = r'''
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import sumsq_op                                    # registers the op
import compiler as bpc
from compiler.core import ir
from compiler.core.ir import ARG
from compiler.core.formulas import Formulas
from compiler.core.model import Model
from compiler.gradcheck import check_gradients, random_batch

x = ir.input_node("x", (ir.N, 3), "data")
y = ir.input_node("y", (ir.N,), "target")
W = ir.param_node("W", (3, 4))
h = ir.matmul(x, W)
s = ir.sumsq(h)                                    # the new constructor, through ir
loss = ir.mean(ir.ew((ARG[0] - ARG[1]) ** 2, [s, y]))
model = Model("probe", (x,), (y,), (W,), s, loss, names={h.digest: "H", s.digest: "S"},
              init={"W": ("glorot", 3, 4)})
targets = sys.argv[2].split(",")
for target in targets:
    compiled = bpc.compile_model(model, "float64") if target == "numpy" else bpc.compile_model_c(model, "float64", second_order=True)
    fm = Formulas(compiled.program)
    assert fm.line(compiled.program.prediction) == "S = sumsq(H)"
    assert fm.line(compiled.program.prediction, latex=True) == r"S = \sum_j H^2"
    module = compiled.load()
    params = module.init_params(seed=0)
    arrays = random_batch(module, batch=5, seed=1)
    rows = check_gradients(module, params, arrays, rtol=1e-6, atol=1e-9)
    assert rows and all(r.ok for r in rows), rows
    # and its tangent rule: the Hessian-vector product against central differences of backward
    v = {"W": np.random.default_rng(2).standard_normal((3, 4))}
    hv = module.hvp(params, v, *arrays)[2]["W"]
    gp = module.backward({"W": params["W"] + 1e-6 * v["W"]}, *arrays)[1]["W"]
    gm = module.backward({"W": params["W"] - 1e-6 * v["W"]}, *arrays)[1]["W"]
    assert np.max(np.abs(hv - (gp - gm) / 2e-6)) < 1e-6 * np.max(np.abs(hv)), (hv, (gp - gm) / 2e-6)
    print(target, "ok")
'''


def test_an_op_module_is_all_a_new_op_needs(tmp_path):
    (tmp_path / "sumsq_op.py").write_text(textwrap.dedent(OP_MODULE))
    targets = ["numpy"] + (["c"] if shutil.which("cc") or shutil.which("gcc") else [])
    env = {**os.environ, "BPC_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), ",".join(targets)],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:-1] == [f"{t} ok" for t in targets]
