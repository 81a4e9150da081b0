"""Free text (descriptions, source labels, formulas) on its way into generated files and output.

Free text is data, never code. It is checked once, by ``check_text``, whether the model comes
from a spec file or from the Python API; and it reaches each kind of output only through the one
rendering function of this module for that kind, which makes it inert there on its own, even for
text the check would refuse (defence in depth: a future caller that forgets the check still
cannot break out):

====================  =============================================================
``c_comment``         lines inside a C ``/* ... */`` block (headers, sources)
``py_docstring``      text inside a Python triple-quoted docstring
``py_comment``        ``#`` comment lines in Python
``latex_comment``     ``%`` comment lines in LaTeX
``dot_string``        a quoted Graphviz DOT string
``terminal``          what the CLI prints (no terminal control sequences)
====================  =============================================================

Every renderer first splits the text into lines the way Python does (``str.splitlines``: LF,
CR, CRLF, VT, FF, the file/group/record separators, NEL, U+2028 and U+2029) and spells each
remaining non-printable character (C0/C1 controls, escape sequences, bidirectional overrides,
lone surrogates) as ``<U+XXXX>``. So no output ever holds a raw line break it did not put there
itself, a carriage return or a control character. Each renderer then escapes what is special to
its target: ``*/``, ``/*``, trigraphs (``??``) and backslashes in C; backslashes and
triple quotes in Python strings; ``^^`` in TeX; quotes and backslashes in DOT.
"""
from __future__ import annotations

import re

from compiler.errors import ModelError

MAX_TEXT = 2000


def check_text(text, what, multiline=True):
    """Validate free text that will be written into generated files; returns it unchanged.

    Refused: anything but a ``str``, more than ``MAX_TEXT`` characters, backslashes, three
    quotes in a row, and every character that is not printable (line breaks other than ``\\n``,
    tabs, control and format characters such as bidirectional overrides), plus ``\\n`` itself
    when ``multiline`` is false. The message says which character and where."""
    if not isinstance(text, str):
        raise ModelError(f"{what} must be text, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise ModelError(f"{what} is {len(text)} characters long; the limit is {MAX_TEXT}")
    for i, ch in enumerate(text):
        if ch == "\\":
            problem = "a backslash"
        elif text.startswith('"""', i) or text.startswith("'''", i):
            problem = "three quotes in a row"
        elif ch == "\n":
            if multiline:
                continue
            problem = "a line break"
        elif not ch.isprintable():
            problem = f"the character U+{ord(ch):04X}"
        else:
            continue
        raise ModelError(f"{what}: {problem} (at character {i + 1}) is not allowed")
    return text


def _lines(text):
    """``text`` as lines of printable characters (see the module docstring)."""
    text = str(text)
    return ["".join(ch if ch.isprintable() else f"<U+{ord(ch):04X}>" for ch in line)
            for line in (text.splitlines() or [""])]


def _replace_all(s, old, new):
    # until none is left: a replacement may create a new occurrence next to it ("???" -> "? ??")
    while old in s:
        s = s.replace(old, new)
    return s


def c_comment(text, lead=" * "):
    """Lines for the inside of a C block comment, each starting with ``lead``: no ``*/`` can
    close it, no ``/*`` nests, no trigraph (``??/`` is a backslash under -std=c99) and no
    backslash (a backslash-newline would splice lines)."""
    out = []
    for line in _lines(text):
        line = line.replace("\\", "<U+005C>")
        line = _replace_all(line, "??", "? ?")
        line = _replace_all(_replace_all(line, "*/", "* /"), "/*", "/ *")
        out.append((lead + line).rstrip())
    return "\n".join(out)


def py_docstring(text):
    """Text for the inside of a Python triple-quoted (non-raw) string: backslashes doubled, and
    a quote escaped when the same quote follows it or the text ends with it, so that no three
    quotes of either kind can end the string."""
    s = "\n".join(line.replace("\\", "\\\\").rstrip() for line in _lines(text))
    return _QUOTE_RUN.sub(r"\\\1", s)


_QUOTE_RUN = re.compile(r"([\"'])(?=\1|\Z)")


def py_comment(text, lead="# "):
    """``#`` comment lines in Python: every line of ``text`` is a comment of its own."""
    return "\n".join((lead + line).rstrip() for line in _lines(text))


def latex_comment(text):
    """``%`` comment lines in LaTeX (``^^`` is TeX's character-code notation: broken up)."""
    return "\n".join(("% " + _replace_all(line, "^^", "^ ^")).rstrip() for line in _lines(text))


def dot_string(text):
    """A quoted DOT string literal: quotes and backslashes escaped, lines joined by ``\\n``."""
    return '"' + "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in _lines(text)) + '"'


def terminal(text):
    """Text for the CLI's own output: line breaks as ``\\n`` only, no control sequences."""
    return "\n".join(_lines(text))


# the jinja2 filters of the templates (compiler/backends/templates.py registers them)
FILTERS = {f.__name__: f for f in (c_comment, py_docstring, py_comment, latex_comment, dot_string)}
