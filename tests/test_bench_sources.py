"""The benchmark scripts are not run by the tests (they take minutes and need PyTorch and JAX), but
they must stay valid Python that starts: a merge once left ``python -m bench`` with an
IndentationError that no test saw."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_bench_source_compiles(path):
    compile(path.read_text(), str(path), "exec")


def test_bench_help_starts():
    out = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--only" in out.stdout
