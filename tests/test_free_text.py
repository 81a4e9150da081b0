"""Free text is data, never code: every free-text field x every target x a payload list.

Free text (a model's description and its source label) reaches generated files and the CLI's
output only through ``compiler.freetext``'s renderers. The tables below check three things:

1. each renderer alone makes every payload inert in its target (a C compiler's preprocessor,
   Python's parser, TeX's comment rule, DOT's string syntax, a terminal);
2. every output bpc writes (NumPy module, C header and source, C wrapper, ``bpc show`` as text,
   LaTeX and DOT, CLI errors) is, with the payload, the same program as with plain text. This
   runs with the input check switched off, so that the renderers are tested on their own;
3. with the check on, the attack of the security report (a C constructor smuggled out of a
   comment, which ran a command on import) is refused or harmless, from a spec file and from
   the Python API, through to building and importing the C module.
"""
import ast
import dataclasses
import io
import re
import shutil
import subprocess
import sys
import tokenize
from contextlib import redirect_stdout
from pathlib import Path

import pytest

import compiler as bpc
from compiler import freetext
from compiler.core import model as model_mod
from compiler.errors import ModelError
from compiler.spec.loader import SpecError, loads_spec

ROOT = Path(__file__).resolve().parent.parent
HAVE_CC = shutil.which("gcc") is not None or shutil.which("cc") is not None
CC = shutil.which("gcc") or shutil.which("cc")

CONSTRUCTOR = '__attribute__((constructor)) static void p(void){ system("touch MARKER"); }'
PAYLOADS = {
    "plain": "A plain description.",
    "close C comment": "*/ " + CONSTRUCTOR + " /*",
    "close C comment, newline": "x */\n" + CONSTRUCTOR + "\n/* y",
    "nested comment opener": "/* a /* b */",
    "star slash split by newline": "a *\n/ b",
    "trigraph backslash": "??/\nint evil = 1;",
    "trigraphs": "??= ??( ??) ??< ??> ??' ??! ??- ???/",
    "backslash newline": "line\\\n" + CONSTRUCTOR,
    "backslash escapes": "\\N{oops} \\x \\u12 \\",
    "triple double quotes": 'x"""\nimport os; os.system("touch MARKER")\n"""',
    "triple single quotes": "x'''\nimport os\n'''",
    "quote at the end": 'ends with a quote"',
    "carriage return": "a\rimport os\r",
    "crlf": "a\r\nimport os",
    "python line separators": "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i",
    "nul and controls": "a\x00b\x07c\x08d\x7fe",
    "terminal escapes": "\x1b[2J\x1b]0;pwned\x07\x1b[31mred",
    "bidi override": "admin\u202e\u2066 // \u2069\u202c",
    "lone surrogate": "a\ud800b",
    "hash comment line": "x\n# -*- coding: rot13 -*-\nimport os",
    "latex": "\\end{aligned} $x$ & # ^^J % \\input{/etc/passwd}",
    "tex char codes": "^^M\\input^^Jx",
    "dot": 'x"]; evil [label="y', 
    "dot backslash": "a\\\"b\\",
    "cpp directives": "\n#include </etc/passwd>\n#define forward evil",
    "long line": "*/" * 500,
}
BENIGN = "plain text"


# ---- 1. each renderer alone ------------------------------------------------------------------

def _expected_lines(text):
    return ["".join(ch if ch.isprintable() else f"<U+{ord(ch):04X}>" for ch in line)
            for line in (text.splitlines() or [""])]


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_no_renderer_output_holds_a_raw_control_character(payload):
    for render in (freetext.c_comment, freetext.py_docstring, freetext.py_comment,
                   freetext.latex_comment, freetext.dot_string, freetext.terminal):
        out = render(payload)
        assert all(ch.isprintable() or ch == "\n" for ch in out), (render.__name__, out)
        assert "\r" not in out


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_py_docstring_keeps_the_text_and_closes_nothing(payload):
    body = freetext.py_docstring(payload)
    for opener in ('"""', "'''"):
        tree = ast.parse(f"x = {opener}{body}{opener}\ny = 1\n")
        assert [type(s).__name__ for s in tree.body] == ["Assign", "Assign"]
        value = tree.body[0].value.value
        assert value == "\n".join(line.rstrip() for line in _expected_lines(payload))


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_py_comment_is_only_comments(payload):
    src = freetext.py_comment(payload) + "\nx = 1\n"
    kinds = {tokenize.tok_name[t.type] for t in tokenize.generate_tokens(io.StringIO(src).readline)
             if t.start[0] <= src.count("\n") - 1}
    assert kinds <= {"COMMENT", "NL"}, kinds
    assert [type(s).__name__ for s in ast.parse(src).body] == ["Assign"]


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_latex_comment_is_only_comments(payload):
    for line in freetext.latex_comment(payload).split("\n"):
        assert line.startswith("%") and "^^" not in line


DOT_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_dot_string_is_one_string_literal(payload):
    assert DOT_STRING.fullmatch(freetext.dot_string(payload))


def _preprocess(c_text, tmp_path, name="t.c"):
    """The C token stream (comments removed, trigraphs and line splices applied, as in the
    -std=c99 builds); a payload that escapes its comment shows up in it."""
    path = tmp_path / name
    path.write_text(c_text)
    r = subprocess.run([CC, "-std=c99", "-E", "-P", "-trigraphs", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_c_comment_leaves_no_tokens(payload, tmp_path):
    block = "/* title\n" + freetext.c_comment(payload) + "\n */\nint x;\n"
    inline = "int y; /* " + freetext.c_comment(payload, lead="") + " */\nint x;\n"
    assert _preprocess(block, tmp_path) == ["int", "x;"]
    assert _preprocess(inline, tmp_path) == ["int", "y;", "int", "x;"]
    assert "??" not in block and "\\" not in block


def test_every_template_field_of_free_text_goes_through_a_renderer():
    """The templates print description and source only through a filter of freetext."""
    from compiler.backends.templates import template_dir
    for path in template_dir().glob("*.j2"):
        for m in re.finditer(r"\{\{([^}]*\b(description|source)\b[^}]*)\}\}", path.read_text()):
            expr = m.group(1)
            if "source_hash" in expr or "ext_source" in expr:
                continue
            assert re.search(r"\|\s*(c_comment|py_docstring|py_comment|latex_comment|dot_string)\b", expr), \
                f"{path.name}: {{{{{expr}}}}} writes free text without a renderer"


# ---- 2. every output, with the check switched off --------------------------------------------

FIELDS = ("description", "source")


def _model(field, text):
    return dataclasses.replace(bpc.mlp([2, 3, 1], activation="tanh"), **{field: text})


@pytest.fixture
def unchecked(monkeypatch):
    """Models accept any text: the renderers alone must make it inert."""
    anything = lambda text, what, multiline=True: text   # noqa: E731
    monkeypatch.setattr(model_mod, "check_text", anything)
    monkeypatch.setattr(freetext, "check_text", anything)


def _py_program(src):
    """A module's AST without its docstring and with hashes blanked: what the text does."""
    tree = ast.parse(src)
    assert isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant)
    return re.sub(r"sha256:[0-9a-f]+|_bpc_\w+_[0-9a-f]{16}", "HASH", ast.dump(ast.Module(tree.body[1:], [])))


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_numpy_module_is_the_same_program(unchecked, field, payload):
    src = bpc.compile_model(_model(field, payload)).source
    assert _py_program(src) == _py_program(bpc.compile_model(_model(field, BENIGN)).source)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_c_files_are_the_same_program(unchecked, field, payload, tmp_path):
    from compiler.backends.c.backend import compile_model_c
    bad, good = compile_model_c(_model(field, payload)), compile_model_c(_model(field, BENIGN))
    assert _py_program(bad.wrapper_source) == _py_program(good.wrapper_source)
    for part in ("header", "c_source"):
        a, b = getattr(bad, part), getattr(good, part)
        # the header is included by the source: give the preprocessor both under their names
        (tmp_path / f"{bad.prefix}.h").write_text(bad.header if part == "c_source" else "")
        tokens_bad = _preprocess(a, tmp_path, "bad.c")
        (tmp_path / f"{good.prefix}.h").write_text(good.header if part == "c_source" else "")
        assert tokens_bad == _preprocess(b, tmp_path, "good.c"), part


def _show(spec_text, fmt, monkeypatch, tmp_path):
    from compiler import cli
    path = tmp_path / "m.toml"
    path.write_text(spec_text)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["show", "m.toml", "--format", fmt]) == 0
    return out.getvalue()


def _spec(description):
    return ('[model]\nname = "m"\ndescription = ' + _toml_string(description) +
            '\n[network]\ninput = {name = "x", size = 2}\ntarget = {name = "y", size = 1}\n'
            'layers = [{type = "dense", units = 1}]\nloss = "mse"\n')


def _toml_string(text):
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                         and not 0xD800 <= ord(c) < 0xE000 else "?" for c in text) + '"'


@pytest.mark.parametrize("fmt", ["text", "latex", "dot"])
@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_bpc_show_output_is_inert(unchecked, monkeypatch, tmp_path, fmt, payload):
    out = _show(_spec(payload), fmt, monkeypatch, tmp_path)
    plain = _show(_spec(BENIGN), fmt, monkeypatch, tmp_path)
    assert all(ch.isprintable() or ch == "\n" for ch in out)
    if fmt == "latex":   # the text only adds comment lines
        extra = [line for line in out.splitlines() if line not in plain.splitlines()]
        assert all(line.startswith("%") for line in extra), extra
    if fmt == "dot":     # one string literal; the graph is otherwise unchanged
        assert len(out.splitlines()) == len(plain.splitlines())
        assert DOT_STRING.sub('""', out) == DOT_STRING.sub('""', plain)


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_cli_errors_print_no_control_characters(capsys, tmp_path, monkeypatch, payload):
    from compiler import cli
    (tmp_path / "m.toml").write_text(_spec(payload).replace('loss = "mse"', 'loss = "nope"'))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compile", "m.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bpc: error: ") and all(ch.isprintable() or ch == "\n" for ch in err)


# ---- 3. with the check: the reported attack, end to end ---------------------------------------

@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_one_check_for_spec_and_api(payload):
    """A description is refused by the spec loader exactly when the API refuses it."""
    def api():
        try:
            _model("description", payload)
            return None
        except ModelError as e:
            return str(e).split(": ", 1)[1]

    def spec():
        text = _spec(payload)
        try:
            loads_spec(text, "m.toml")
            return None
        except SpecError as e:
            return str(e).split("model.description: ", 1)[1]

    if all(ch.isprintable() or ch == "\n" for ch in payload):   # TOML can carry it verbatim
        assert api() == spec()
    elif api() is None:
        pytest.fail("a non-printable character was accepted")


@pytest.mark.parametrize("payload", ["A network.\nSecond line.", "ends with */"],
                         ids=["multi-line", "comment closer"])
def test_accepted_descriptions_reach_the_docstring(payload):
    m = _model("description", payload)
    src = bpc.compile_model(m).source
    assert payload.replace("*/", "*/") in ast.get_docstring(ast.parse(src), clean=False)


@pytest.mark.parametrize("field", FIELDS)
def test_source_label_is_one_line(field):
    if field == "source":
        with pytest.raises(ModelError, match="source: a line break"):
            _model("source", "a\nb")


ATTACKS = {
    "spec description": ("spec", "x */\n" + CONSTRUCTOR.replace("MARKER", "{marker}") + "\n/* y"),
    "api description": ("description", "x */\n" + CONSTRUCTOR.replace("MARKER", "{marker}") + "\n/* y"),
    "api source": ("source", "x */ " + CONSTRUCTOR.replace("MARKER", "{marker}") + " /* y"),
}


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("how, payload", list(ATTACKS.values()), ids=list(ATTACKS))
def test_reported_constructor_attack_builds_and_runs_nothing(how, payload, tmp_path):
    marker = tmp_path / "pwned"
    payload = payload.replace("{marker}", str(marker))
    out = tmp_path / "out"
    if how == "spec":
        (tmp_path / "m.toml").write_text(_spec(payload))
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from compiler import cli; "
                f"sys.exit(cli.main(['compile', 'm.toml', '--target', 'c', '-o', {str(out)!r}]))")
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    else:
        from compiler.backends.c.backend import compile_model_c
        compile_model_c(_model(how, payload)).write(out)
    # build and import the written module in a fresh interpreter: no constructor may run
    code = ("import sys, glob, os, importlib.util; d = sys.argv[1]; sys.path.insert(0, d)\n"
            "py = [p for p in glob.glob(os.path.join(d, '*.py'))][0]\n"
            "spec = importlib.util.spec_from_file_location('m', py); m = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(m); print(sorted(m.PARAMS))")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    header = next(out.glob("*.h")).read_text()
    assert "__attribute__" in header        # the text is there, as a comment
