"""Compile a model spec into a standalone module.

The NumPy target writes one Python file (default generated/<model name>.py); the C target
writes its C source, header and Python wrapper into a directory (default generated/c/: the
wrapper is also named <model name>.py and must not replace the NumPy module). Files are written atomically: a failed
or interrupted compile leaves no partial file and keeps any previous good one.
"""
from __future__ import annotations

import os
import sys

from compiler import dtypes, limits
from compiler.backends.registry import BACKENDS
from compiler.cli._common import add_spec_argument, load, write_error


def add_arguments(parser):
    add_spec_argument(parser)
    parser.add_argument("--target", choices=tuple(BACKENDS), default="numpy",
                        help="backend (default: numpy)")
    parser.add_argument("--dtype", choices=dtypes.NAMES, default=None,
                        help="floating type of the generated code (default: the spec's model.dtype; "
                        "without either, numpy follows the inputs' dtype and c uses float64)")
    parser.add_argument("-o", "--output", metavar="OUT", default=None,
                        help="numpy: output .py file (an importable name that shadows no module such as "
                        "numpy or json), a directory, or - for standard output (default: "
                        "generated/<model name>.py); c: output directory (default: generated/c/; not -)")
    parser.add_argument("--emit-test", action="store_true",
                        help="also write test_<module>.py beside the module: a check of its gradients against "
                        "central differences that needs numpy alone (run it with pytest or python)")
    hvp = parser.add_mutually_exclusive_group()
    hvp.add_argument("--hvp", dest="second_order", action="store_true", default=None,
                     help="also emit the second-order entry points hvp and gnvp (default for numpy; for c "
                     "they make the C compiler's work 2.5-5 times longer, so c needs this flag)")
    hvp.add_argument("--no-hvp", dest="second_order", action="store_false",
                     help="emit backward alone, without hvp and gnvp (default for c; a large model compiles "
                     "about three times faster)")
    limits.add_argument(parser)


def run(args):
    spec = load(args.spec)
    dtype = args.dtype or spec.dtype
    limits.check_parameter_memory(limits.model_shapes(spec.model), dtype,
                                  args.max_param_memory, what=spec.path)
    if args.target == "c":
        return _compile_c(spec, dtype, args.output, args.emit_test, bool(args.second_order))
    from compiler.backends.numpy.module import compile_model, write_atomic
    out = _numpy_output(args.output, spec)
    if out is None and args.emit_test:
        from compiler.errors import BpcError
        raise BpcError("--emit-test writes test_<module>.py beside the module, which needs a file: "
                       "give -o FILE.py or a directory instead of -")
    compiled = compile_model(spec.model, dtype=dtype, second_order=args.second_order is not False)
    if out is None:
        sys.stdout.write(compiled.source)
        return 0
    try:
        write_atomic(out, compiled.source)
    except OSError as e:
        raise write_error(out, e) from None
    print(f"wrote {out}  ({compiled.source_hash[:19]})")
    if args.emit_test:
        _write_test(out, "numpy", compiled.dtype)
    return 0


def _write_test(module_path, target, dtype):
    """test_<module>.py beside ``module_path`` (see compiler.backends.emitted_test)."""
    from compiler.backends.emitted_test import emitted_test_name, render_test
    from compiler.files import write_atomic
    path = module_path.with_name(emitted_test_name(module_path.name))
    try:
        write_atomic(path, render_test(module_path.name, target, dtype))
    except OSError as e:
        raise write_error(path, e) from None
    print(f"wrote {path}")


def _numpy_output(option, spec):
    from pathlib import Path

    from compiler.spec.loader import SpecError
    if option == "-":
        return None
    if option is None:
        out = Path("generated") / f"{spec.model.name}.py"
        _check_module_name(out, "choose another model.name, or a file name with -o")
        return out
    out = Path(option)
    if out.is_dir() or option.endswith(("/", os.sep)):
        out = out / f"{spec.model.name}.py"
    if out.suffix != ".py":
        raise SpecError(f"output {option}: a generated NumPy module must end in .py (it is imported by file name)")
    named_by_option = not (out.is_dir() or option.endswith(("/", os.sep)))
    _check_module_name(out, "choose another file name with -o" if named_by_option else
                       "choose another model.name, or a file name with -o")
    try:
        if out.exists() and out.resolve() == Path(spec.path).resolve():
            raise SpecError(f"output {option} is the spec file itself; choose another output")
    except OSError:
        pass
    return out


# modules that generated code or the tools around it import, beyond the standard library's:
# a generated module of one of these names would shadow it for code in its directory
SHADOWED = frozenset({"numpy", "scipy", "sympy", "jinja2", "compiler", "bpc", "pytest", "conftest", "setuptools",
                      "pip", "pkg_resources", "wheel", "typing_extensions", "tomli", "matplotlib", "pandas",
                      "cffi"})


def _check_module_name(out, fix):
    """A generated module (the NumPy module, the C target's wrapper) is imported by its file
    name: the stem must be an importable identifier that shadows no module the generated code
    (numpy, threading, cffi, ...) or common tooling imports. ``fix`` says what to change."""
    import keyword

    from compiler.spec.loader import SpecError
    stem = out.name[:-len(".py")]
    if not stem.isidentifier() or not stem.isascii() or keyword.iskeyword(stem):
        raise SpecError(f"output {out}: {stem!r} is not an importable module name (a generated module is "
                        f"imported by its file name: ASCII letters, digits and '_', not starting with a digit, "
                        f"not a Python keyword); {fix}")
    if stem.startswith("__") and stem.endswith("__"):
        raise SpecError(f"output {out}: {stem!r} is a special module name, not a module of its own; {fix}")
    if stem in sys.stdlib_module_names or stem in SHADOWED:
        what = "the standard library's" if stem in sys.stdlib_module_names else "the"
        raise SpecError(f"output {out}: a module named {stem!r} would shadow {what} {stem} module for code in "
                        f"its directory (the generated code imports numpy, threading, ...); {fix}, "
                        f"e.g. {stem}_model.py")


def _compile_c(spec, dtype, option, emit_test=False, second_order=False):
    from pathlib import Path

    from compiler.errors import BpcError
    try:
        from compiler.backends.c.backend import compile_model_c
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("compiler.backends.c"):
            raise BpcError("the C target is not available in this build (compiler.backends.c.backend is missing); "
                           "the NumPy target works: bpc compile SPEC --target numpy") from None
        raise
    if option == "-":
        raise BpcError("output -: the C target writes a directory of files (source, header, wrapper), which "
                       "cannot go to standard output; give a directory with -o")
    out_dir = Path(option) if option else Path("generated") / "c"
    if out_dir.exists() and not out_dir.is_dir():
        raise BpcError(f"output {option}: the C target writes a directory of files; give a directory")
    # the wrapper <model name>.py is imported by its file name, as a NumPy module is
    _check_module_name(out_dir / f"{spec.model.name}.py",
                       "choose another model.name (the C target names its files after it)")
    # C has no "follow the inputs": a fixed type, float64 unless asked otherwise
    result = compile_model_c(spec.model, dtype or dtypes.DEFAULT, second_order=second_order)
    # the wrapper is <prefix>.py: a .py there without its .c beside it is some other module
    # (typically the NumPy one, from `-o generated`), which must not be replaced
    prefix = getattr(result, "prefix", spec.model.name)
    wrapper = out_dir / f"{prefix}.py"
    if wrapper.exists() and not (out_dir / f"{prefix}.c").exists():
        raise BpcError(f"output {out_dir}: writing the C wrapper would replace {wrapper}, which is not "
                       "from a C compile (the NumPy module?); choose another directory, e.g. generated/c")
    try:
        written = result.write(out_dir)
    except OSError as e:
        raise write_error(out_dir, e) from None
    if isinstance(written, (list, tuple)):
        for path in written:
            print(f"wrote {path}")
    else:
        print(f"wrote {written or out_dir}")
    if emit_test:
        _write_test(wrapper, "c", dtype or dtypes.DEFAULT)
    return 0
