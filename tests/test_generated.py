"""The committed generated/ modules are exactly what the compiler emits for examples/.

When the compiler, the NumPy backend or its template changes on purpose, regenerate them with
``python tools/regenerate.py`` and commit the result.
"""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bpc_regenerate", ROOT / "tools" / "regenerate.py")
regenerate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regenerate)

EXAMPLES = regenerate.example_specs()
FIX = "regenerate with: python tools/regenerate.py"


def test_the_required_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"poly_fit.toml", "mlp_tanh.toml", "mlp_classifier.toml"} <= names


@pytest.mark.parametrize("spec_path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_generated_module_is_up_to_date(spec_path):
    out, source = regenerate.generate(spec_path)
    assert out.is_file(), f"{out.relative_to(ROOT)} is missing; {FIX}"
    committed = out.read_bytes()
    fresh = source.encode("utf-8")
    if committed != fresh:
        at = next((i for i, (a, b) in enumerate(zip(committed, fresh)) if a != b), min(len(committed), len(fresh)))
        line = committed[:at].count(b"\n") + 1
        pytest.fail(f"{out.relative_to(ROOT)} differs from what {spec_path.relative_to(ROOT)} compiles to "
                    f"(first difference on line {line}); {FIX}")


@pytest.mark.parametrize("spec_path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_generated_header_names_the_example(spec_path):
    out, _ = regenerate.generate(spec_path)
    head = out.read_text(encoding="utf-8")[:2000]
    assert f"Source: {spec_path.relative_to(ROOT).as_posix()}" in head
