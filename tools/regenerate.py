"""Regenerate generated/<model>.py from every spec under examples/ (run after changing the
compiler, the NumPy backend or its template; tests/test_generated.py checks they agree).

    python tools/regenerate.py            # rewrite generated/ from examples/
    python tools/regenerate.py --check    # only report which files differ (exit 1 if any)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler.backends.numpy.module import compile_model, write_atomic  # noqa: E402
from compiler.spec.loader import load_spec, source_name  # noqa: E402

EXAMPLES = ROOT / "examples"
GENERATED = ROOT / "generated"


def example_specs():
    """Every spec file directly under examples/ (data files live in subdirectories)."""
    return sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".toml", ".json") and p.is_file())


def generate(spec_path):
    """(output path, generated source) of one example, as `bpc compile` run from the repository
    root would write it (its header names examples/<file>), wherever this runs from."""
    spec = load_spec(spec_path, source=source_name(spec_path, cwd=ROOT))
    compiled = compile_model(spec.model, dtype=spec.dtype)
    return GENERATED / f"{spec.model.name}.py", compiled.source


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a file differs")
    args = parser.parse_args(argv)
    stale = []
    for spec_path in example_specs():
        out, source = generate(spec_path)
        current = out.read_text(encoding="utf-8") if out.is_file() else None
        if current == source:
            continue
        stale.append(out)
        if not args.check:
            write_atomic(out, source)
            print(f"wrote {out.relative_to(ROOT)}")
    if args.check and stale:
        print("out of date: " + ", ".join(str(p.relative_to(ROOT)) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
