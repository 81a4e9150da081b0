"""Show what the compiler derived for a model: each parameter's gradient as a chain of named
adjoints with shapes, the operation counts before and after simplification, or the forward and
backward graph as Graphviz DOT text (render with: bpc show SPEC --format dot | dot -Tsvg > g.svg).
The renderers are compiler/backends/show.py's, shared with a compiled model's ``show()``.
"""
from __future__ import annotations

from compiler.freetext import terminal
from compiler.cli._common import add_spec_argument, load


def add_arguments(parser):
    add_spec_argument(parser)
    parser.add_argument("--param", metavar="NAME", default=None,
                        help="only the gradient of this parameter")
    parser.add_argument("--hvp", action="store_true",
                        help="the Hessian-vector product (hvp) and, for built-in losses, the "
                        "Gauss-Newton-vector product (gnvp) formulas instead of the gradients'")
    parser.add_argument("--format", choices=("text", "latex", "dot"), default="text",
                        help="text (default): formulas with shapes and operation counts; latex: the "
                        "gradient formulas as LaTeX; dot: the computational graph for Graphviz")


def run(args):
    from compiler.backends.numpy.module import compile_model
    from compiler.backends.show import render
    from compiler.errors import BpcError
    spec = load(args.spec)
    compiled = compile_model(spec.model, dtype=spec.dtype)
    try:
        text = render(compiled.model, compiled.program, args.format, args.param, hvp=args.hvp)
    except BpcError as e:   # an unknown --param: name the spec file
        raise BpcError(f"{spec.path}: {e}") from None
    print(terminal(text))
    return 0
