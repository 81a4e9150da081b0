"""LaTeX that a reader can trust (issue 15, item 2): every model-table model's and every
example's gradient formulas parse (matplotlib's mathtext, line by line), elementwise products
are written with \\odot and matrix products by juxtaposition, no internal helper names (dM3m,
db1T, db2_s) appear, an unused parameter's name is escaped, and constants print as written."""
from pathlib import Path

import pytest
import sympy as sp

import compiler as bpc
from compiler.backends.show import latex_lines, render
from compiler.core import ir
from compiler.core.formulas import Formulas, latex_name
from compiler.core.ir import ARG
from mathtext_check import assert_lines_parse, notebook_lines, parses
from model_table import MODELS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").iterdir() if p.suffix in (".toml", ".json"))


def compiled_example(name):
    spec = bpc.load_spec(ROOT / "examples" / name)
    return bpc.compile_model(spec.model, spec.dtype)


def elementwise_products(node):
    """Whether the ew node's formula multiplies two values that are not scalars (shape ())."""
    scalars = {ARG[i] for i, x in enumerate(node.inputs) if x.shape == ()} | {ir.N}
    expr = sp.factor_terms(node.attr("expr"))
    for sub in sp.preorder_traversal(expr):
        for part in (sp.fraction(sub)[0], sp.fraction(sub)[1]) if sub.is_Mul else ():
            tensors = [f for f in sp.Mul.make_args(part) if not f.free_symbols <= scalars]
            if len(tensors) >= 2:
                return True
    return False


def check_products(compiled):
    """Every chain line of an ew node with an elementwise product holds \\odot; no matrix
    product of two named values does."""
    program = compiled.program
    fm = Formulas(program)
    checked = 0
    for _, g in program.grads:
        if g is None:
            continue
        for node in ir.topo_order([g]):
            if node.uid not in program.backward_only or node.uid in program.inline:
                continue
            line = fm.line(node, latex=True)
            if node.op == "ew" and elementwise_products(node):
                assert r"\odot" in line, line
                checked += 1
            if node.op == "matmul" and not any(i.uid in program.inline for i in node.inputs):
                assert r"\odot" not in line, line
    return checked


@pytest.mark.parametrize("model_id, build", MODELS, ids=[m[0] for m in MODELS])
def test_model_table_latex_parses_and_marks_elementwise_products(model_id, build):
    compiled = bpc.compile_model(build())
    assert_lines_parse(latex_lines(compiled.program, compiled.program.grads))
    for text in compiled.latex.values():
        assert_lines_parse(text.split(r" \\ "))
    program, fm = compiled.program, Formulas(compiled.program)   # and every forward line
    assert_lines_parse([fm.line(n, latex=True) for n in (*program.forward_nodes, *program.loss_nodes)])
    check_products(compiled)


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_latex_parses_and_marks_elementwise_products(example):
    compiled = compiled_example(example)
    text = render(compiled.model, compiled.program, "latex")
    lines = [line.strip().rstrip("\\").strip() for line in text.splitlines()]
    assert_lines_parse([line for line in lines if line and not line.startswith(("%", r"\begin", r"\end"))])
    check_products(compiled)


def test_the_products_check_can_fail():
    # a tanh MLP has elementwise products (dH1 * (1 - H1**2)); the checker counts them
    assert check_products(compiled_example("mlp_tanh.toml")) >= 2
    assert not parses(r"\frac{\partial L}{\partial a_b_c} = 0")     # the old unescaped name


# exact lines: \odot for the elementwise product, juxtaposition for the matrix product
@pytest.mark.parametrize("param, expected", [
    ("W1", [r"\mathrm{dZ}_{2} = \frac{2 \left(Z_{2} - y\right)}{n}",
            r"\mathrm{dH}_{1} = \mathrm{dZ}_{2} W_{2}^{\top}",
            r"\mathrm{dZ}_{1} = \mathrm{dH}_{1} \odot \left(1 - H_{1}^{2}\right)",
            r"\mathrm{dW}_{1} = x^{\top} \mathrm{dZ}_{1}"]),
    ("b2", [r"\mathrm{dZ}_{2} = \frac{2 \left(Z_{2} - y\right)}{n}",
            r"\mathrm{db}_{2} = \sum_{\mathrm{axis}\,0} \mathrm{dZ}_{2}"]),
])
def test_tanh_mlp_latex(param, expected):
    compiled = bpc.compile_model(bpc.mlp([2, 3, 1], "tanh", name="tiny"))
    assert compiled.latex[param].split(r" \\ ") == expected


def test_scalar_factors_multiply_by_juxtaposition():
    a, b, x = sp.symbols("a b x")
    compiled = bpc.compile_model(bpc.expression_model(a * sp.sin(b * x), {a: 1.0, b: 0.5}, [x], name="s"))
    # a and b are numbers (shape ()); dp, x and cos(b x) are batches: their product is elementwise
    assert compiled.latex["b"].split(r" \\ ")[-1] == (
        r"\mathrm{db} = \sum a \mathrm{dp} \odot x \odot \cos{\left(b x \right)}")


def test_no_internal_names_in_latex():
    compiled = compiled_example("matrix_mlp.toml")
    names = set(compiled.program.names.values())
    # the matrix frontend's helpers (b1T: b1 as a row, M3m: a product before it becomes one
    # number per sample, b2_s: b2 as a number) and their adjoints name generated code ...
    internal = {"b1T", "db1T", "dcT", "dM3m", "db2_s"}
    assert internal <= names
    assert "db1T" in compiled.source
    # ... not the formulas for people
    texts = [render(compiled.model, compiled.program, "latex"), compiled._repr_latex_(), *compiled.latex.values()]
    for name in internal:
        for text in texts:
            assert latex_name(name) not in text, name
    lines = latex_lines(compiled.program, compiled.program.grads)
    assert r"\mathrm{db}_{2} &= \sum \mathrm{dZ}_{4}" in lines
    assert r"\mathrm{dA}_{1} &= \mathrm{dZ}_{4} W_{2}" in lines


def test_unused_parameter_name_is_escaped():
    a, b, x = sp.symbols("a b_c_d x")
    compiled = bpc.compile_model(bpc.expression_model(a * x, {a: 0.0, b: 0.0}, [x], name="unused"))
    text = render(compiled.model, compiled.program, "latex", "b_c_d")
    line = next(line for line in text.splitlines() if r"\partial" in line)
    assert line.strip() == r"\frac{\partial L}{\partial b_{\mathrm{c\_d}}} &= 0"
    assert parses(line.replace("&=", "="))
    assert_lines_parse(notebook_lines(compiled._repr_latex_()))


@pytest.mark.parametrize("build, in_formulas", [
    # the built-in constant; GELU's tanh is computed once, forward, so the gradient's formula
    # shows its derivative's 3*0.044715
    (lambda: bpc.mlp([2, 3, 1], "gelu", name="gelu"), "0.134145"),
    (lambda: bpc.mlp([2, 3, 1], sp.Symbol("x") * sp.tanh(0.044715 * sp.Symbol("x")), name="user"), "0.044715"),
])
def test_constants_print_as_written(build, in_formulas):
    compiled = bpc.compile_model(build())
    comments = "\n".join(line for line in compiled.source.splitlines() if line.lstrip().startswith("#"))
    for text in (compiled.formulas["W1"], compiled.latex["W1"], comments):
        assert in_formulas in text
    # (up to backward: the second derivative in hvp/gnvp rightly holds 2*0.044715 = 0.08943)
    first_order = compiled.source[:compiled.source.index("\ndef hvp(")]
    for text in (compiled.formulas["W1"], compiled.latex["W1"], first_order):
        assert "8943" not in text and "200000" not in text and "26829" not in text
    assert "0.044715" in compiled.source


A, B, C, D, S = sp.symbols("a b c d s")


# the elementwise printer alone: (expression, scalar symbols, LaTeX)
PRODUCTS = [
    (A * B, (), r"a \odot b"),
    (A * (1 - B**2), (), r"a \odot \left(1 - b^{2}\right)"),
    (-A * B, (), r"- a \odot b"),
    (S * A * B, (S,), r"s a \odot b"),
    (sp.Float("1.5") * A * B, (), r"1.5 a \odot b"),
    (2 * A * B / ir.N, (), r"\frac{2 a \odot b}{n}"),
    (A * B / (C * D), (), r"\frac{a \odot b}{c \odot d}"),
    (A / (C * D), (), r"\frac{a}{c \odot d}"),
    (S * A, (S,), r"a s"),                       # one tensor: sympy's juxtaposition, unchanged
    (2 * A, (), r"2 a"),
    (A / B, (), r"\frac{a}{b}"),
    (sp.sin(A * B), (), r"\sin{\left(a \odot b \right)}"),
]


@pytest.mark.parametrize("expr, scalars, expected", PRODUCTS, ids=[str(r[0]) for r in PRODUCTS])
def test_elementwise_printer(expr, scalars, expected):
    from compiler.core.formulas import print_latex
    assert print_latex(expr, {}, scalars) == expected
    assert parses(expected)
