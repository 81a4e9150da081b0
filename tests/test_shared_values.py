"""Forward values are computed once and reused by the backward pass (issue 15, item 7): a
costly subexpression (a function call, a power) that several elementwise statements compute
becomes one named value. The table gives a model, the text that must appear exactly once in its
NumPy backward(), and the value that now holds it."""
import re
from pathlib import Path

import pytest
import sympy as sp

import compiler as bpc
from compiler.gradcheck import check_gradients, random_batch
from compiler.spec.loader import load_spec

ROOT = Path(__file__).resolve().parent.parent
X = sp.Symbol("x")


def _backward(source):
    return source[source.index("def backward("):].split("\ndef ", 1)[0]


CASES = [
    ("polynomial x**3, x**2", lambda: load_spec(ROOT / "examples" / "train_poly.toml").model,
     [r"(?<![*\w])x\*x\*x(?![*\w])", r"(?<![*\w])x\*x(?![*\w])"], ["x_pow3", "x_pow2"]),
    ("GELU's tanh", lambda: bpc.mlp([3, 5, 1], "gelu", name="g"), [r"np\.tanh\("], ["tanh_Z1"]),
    ("swish's sigmoid", lambda: load_spec(ROOT / "examples" / "swish_beta.json").model,
     [r"_sigmoid\("], ["sigmoid_Z1"]),
    ("sin in the prediction and its gradient",
     lambda: bpc.expression_model(sp.Symbol("a") * sp.sin(sp.Symbol("b") * X),
                                  {sp.Symbol("a"): 1.0, sp.Symbol("b"): 0.5}, [X], name="sn"),
     [r"np\.sin\("], ["sin_x"]),
]


@pytest.mark.parametrize("name, build, once, shared", CASES, ids=[c[0] for c in CASES])
def test_costly_values_are_computed_once(name, build, once, shared):
    compiled = bpc.compile_model(build())
    body = _backward(compiled.source)
    for text in once:
        assert len(re.findall(text, body)) == 1, (text, body)
    for value in shared:
        assert re.search(rf"^    {value} = ", body, re.M), body
    # and the gradients are still right
    module = compiled.load()
    params = module.init_params(seed=1)
    rows = check_gradients(module, params, random_batch(module, batch=4, seed=1))
    assert all(r.ok for r in rows)


def test_the_c_target_shares_them_too():
    from compiler.backends.c.backend import compile_model_c
    compiled = compile_model_c(bpc.mlp([3, 5, 1], "gelu", name="gc"))
    backward = compiled.c_source[compiled.c_source.index("_backward("):]
    backward = backward.split("\nint ")[0]     # (per_example_grads follows)
    code = "\n".join(line for line in backward.splitlines() if not line.strip().startswith("/*"))
    assert code.count("bpc_tanh(") == 1
