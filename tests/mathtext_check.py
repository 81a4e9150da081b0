"""Whether LaTeX renders, for the tests: matplotlib's mathtext (installed with the test extra)
parses each ``a = b`` line; it has no aligned environment, so displays are checked line by line."""
import pytest

mathtext = pytest.importorskip("matplotlib.mathtext")
PARSER = mathtext.MathTextParser("path")


def parses(line):
    """Whether mathtext renders one ``a = b`` line (no aligned environment: one line each)."""
    try:
        PARSER.parse(f"${line}$")
    except ValueError:
        return False
    return True


def assert_lines_parse(lines):
    assert lines
    for line in lines:
        assert parses(line.replace("&=", "=")), line


def notebook_lines(latex):
    """The lines of a ``_repr_latex_`` display (``$$\\begin{aligned} ... \\end{aligned}$$``)."""
    assert latex.startswith("$$\\begin{aligned}\n") and latex.endswith("\n\\end{aligned}$$")
    body = latex[len("$$\\begin{aligned}\n"):-len("\n\\end{aligned}$$")]
    return [line.strip() for line in body.split(" \\\\\n")]
