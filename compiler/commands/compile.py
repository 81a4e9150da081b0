"""Compile a model spec into a standalone module.

The NumPy target writes one Python file (default generated/<model name>.py); the C target
writes its C source, header and Python wrapper into a directory (default generated/c/: the
wrapper is also named <model name>.py and must not replace the NumPy module). Files are written atomically: a failed
or interrupted compile leaves no partial file and keeps any previous good one.
"""
from __future__ import annotations

import os
import sys

from ._common import add_spec_argument, load, write_error


def add_arguments(parser):
    add_spec_argument(parser)
    parser.add_argument("--target", choices=("numpy", "c"), default="numpy",
                        help="backend (default: numpy)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                        help="floating type of the generated code (default: the spec's model.dtype; "
                        "without either, numpy follows the inputs' dtype and c uses float64)")
    parser.add_argument("-o", "--output", metavar="OUT", default=None,
                        help="numpy: output .py file, a directory, or - for standard output "
                        "(default: generated/<model name>.py); c: output directory (default: generated/c/)")


def run(args):
    spec = load(args.spec)
    dtype = args.dtype or spec.dtype
    if args.target == "c":
        return _compile_c(spec, dtype, args.output)
    from ..emit import compile_model, write_atomic
    from ..spec import SpecError
    out = _numpy_output(args.output, spec)
    compiled = compile_model(spec.model, dtype=dtype)
    if out is None:
        sys.stdout.write(compiled.source)
        return 0
    try:
        write_atomic(out, compiled.source)
    except OSError as e:
        raise write_error(out, e) from None
    print(f"wrote {out}  ({compiled.source_hash[:19]})")
    return 0


def _numpy_output(option, spec):
    from pathlib import Path

    from ..spec import SpecError
    if option == "-":
        return None
    if option is None:
        return Path("generated") / f"{spec.model.name}.py"
    out = Path(option)
    if out.is_dir() or option.endswith(("/", os.sep)):
        out = out / f"{spec.model.name}.py"
    if out.suffix != ".py":
        raise SpecError(f"output {option}: a generated NumPy module must end in .py (it is imported by file name)")
    try:
        if out.exists() and out.resolve() == Path(spec.path).resolve():
            raise SpecError(f"output {option} is the spec file itself; choose another output")
    except OSError:
        pass
    return out


def _compile_c(spec, dtype, option):
    from pathlib import Path

    from ..errors import BpcError
    try:
        from ..c_backend import compile_model_c
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(__package__.rsplit(".", 1)[0] + ".c_backend"):
            raise BpcError("the C target is not available in this build (compiler.c_backend is missing); "
                           "the NumPy target works: bpc compile SPEC --target numpy") from None
        raise
    out_dir = Path(option) if option else Path("generated") / "c"
    if out_dir.exists() and not out_dir.is_dir():
        raise BpcError(f"output {option}: the C target writes a directory of files; give a directory")
    # C has no "follow the inputs": a fixed type, float64 unless asked otherwise
    result = compile_model_c(spec.model, dtype or "float64")
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
    return 0
