"""The text of the character-level language model example (examples/char_transformer.toml).

    python examples/make_text_data.py                  # python_docs_{train,val}.npz from the corpus
    python examples/make_text_data.py --out DIR        # ... written in DIR (default examples/data)
    python examples/make_text_data.py --corpus         # rebuild the corpus itself (see below)

**The corpus** ``examples/data/python_docs.txt.gz`` is the documentation strings of a fixed list
of CPython standard library modules (``MODULES``, in that order), read from their source files with
``ast`` (nothing is imported or run): every module, class and function docstring in source order,
cleaned of indentation (``inspect.cleandoc``), exact repeats dropped, those with a character
outside printable ASCII left out, separated by blank lines. Python's source and documentation
are under the PSF License Agreement (https://docs.python.org/3/license.html), which allows
copying and redistribution with the notice; see examples/data/README.md. The committed file was
built with CPython 3.11.7; other Python versions have other docstrings (and some modules moved),
so ``--corpus`` under them writes other bytes, reported with its SHA-256. gzip with mtime 0:
the same text gives the same file.

**The windows and the split** (``--out``): the text as ids (``encode``: newline 0, the
printable ASCII characters ``' '..'~'`` 1..95, a vocabulary of 96) cut into pieces of 65 that
share no character: ``x`` (n, 64) a piece's first 64 ids, ``y`` (n, 64) the id that follows
each position (the piece shifted by one), both uint8: the arrays ``bpc train --data`` reads for
a model with an input ``x`` of kind ``ids`` and a label target ``y`` of length 64. In blocks of
16 consecutive windows, every tenth block goes to validation (``python_docs_val.npz``), the rest
to training (``python_docs_train.npz``).
"""
from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import inspect
import io
import sys
import sysconfig
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "python_docs.txt.gz"
CONTEXT = 64
SPLIT_EVERY, SPLIT_BLOCK = 10, 16   # one block of 16 windows in 10 is held out for validation
VOCAB = 96

# Standard library modules (a package stands for its .py files, sorted, tests left out), in
# the corpus's order.
MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "calendar", "cmd", "code",
    "codecs", "collections", "concurrent", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "difflib", "dis", "doctest", "email", "enum", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq",
    "hmac", "html", "http", "imaplib", "importlib", "inspect", "ipaddress", "json", "locale",
    "logging", "mailbox", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "pickletools", "platform", "poplib", "pprint", "pydoc", "queue", "random",
    "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest", "urllib", "uuid",
    "warnings", "weakref", "wsgiref", "xml", "xmlrpc", "zipfile", "_pydecimal", "_pyio",
)


def encode(text):
    """ids (uint8) of ``text``: newline 0, ' '..'~' 1..95; any other character is a ValueError."""
    try:
        b = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError as e:
        raise ValueError(f"character {text[e.start]!r} is outside the vocabulary (newline and printable "
                         "ASCII)") from None
    ids = b.astype(np.int64) - 31
    ids[b == 10] = 0
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB):
        bad = text[int(np.argmax((ids < 0) | (ids >= VOCAB)))]
        raise ValueError(f"character {bad!r} is outside the vocabulary (newline and printable ASCII)")
    return ids.astype(np.uint8)


def decode(ids):
    """The text of ``ids`` (the inverse of ``encode``)."""
    ids = np.asarray(ids, dtype=np.int64)
    return bytes(np.where(ids == 0, 10, ids + 31).astype(np.uint8)).decode("ascii")


def _sources(stdlib, name):
    path = stdlib / name
    if path.with_suffix(".py").is_file():
        return [path.with_suffix(".py")]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.py")
                      if not any(part.startswith(("test", "idle_test")) for part in p.relative_to(path).parts))
    return []


def _docstrings(tree):
    """Docstrings of a module, its classes and functions, in source order."""
    def walk(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        for child in ast.iter_child_nodes(node):
            yield from walk(child)
    yield from walk(tree)


def build_corpus(modules=MODULES, stdlib=None):
    """(text, missing modules): the docstrings of ``modules`` from the standard library at
    ``stdlib`` (default: this Python's)."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    seen, parts, missing = set(), [], []
    for name in modules:
        files = _sources(stdlib, name)
        if not files:
            missing.append(name)
        for path in files:
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError):
                continue
            for doc in _docstrings(tree):
                doc = inspect.cleandoc(doc).strip()
                if doc in seen or not all(c == "\n" or " " <= c <= "~" for c in doc):
                    continue
                seen.add(doc)
                parts.append(doc)
    return "\n\n".join(parts) + "\n", missing


def write_corpus(text, path=CORPUS):
    """gzip ``text`` to ``path`` with mtime 0 and no file name: the same text, the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(text.encode("ascii"))
    Path(path).write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def read_corpus(path=CORPUS):
    with gzip.open(path, "rb") as f:
        return f.read().decode("ascii")


def windows(ids, length=CONTEXT):
    """``x`` (n, length) and ``y`` (n, length): the text cut into pieces of length + 1 ids that
    share nothing, ``x`` a piece's first ``length`` ids and ``y`` its last ``length`` (the id
    after each position of ``x``)."""
    n = len(ids) // (length + 1)
    pieces = ids[:n * (length + 1)].reshape(n, length + 1)
    return pieces[:, :-1].copy(), pieces[:, 1:].copy()


def split(x, y, every=SPLIT_EVERY, block=SPLIT_BLOCK):
    """``((x, y) training, (x, y) validation)``: the windows in blocks of ``block`` consecutive
    ones (1040 characters of text), every ``every``-th block held out for validation. No
    character is in both parts, and both sample the whole corpus, not one end of it (the
    modules come in a fixed order, so the last tenth would be a few modules' docstrings)."""
    held = (np.arange(len(x)) // block) % every == every - 1
    return (x[~held], y[~held]), (x[held], y[held])


def write_windows(out, text):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, (x, y) in zip(("train", "val"), split(*windows(encode(text)))):
        path = out / f"python_docs_{part}.npz"
        np.savez(path, x=x, y=y)
        paths.append((path, len(x)))
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", action="store_true",
                    help=f"rebuild {CORPUS.name} from this Python's standard library")
    ap.add_argument("--out", type=Path, default=DATA, help="where the .npz windows go (default examples/data)")
    args = ap.parse_args(argv)
    if args.corpus:
        text, missing = build_corpus()
        digest = write_corpus(text)
        print(f"wrote {CORPUS} ({len(text):,} characters, sha256 {digest}) from Python "
              f"{sys.version.split()[0]}" + (f"; not found: {', '.join(missing)}" if missing else ""))
    text = read_corpus()
    for path, n in write_windows(args.out, text):
        print(f"wrote {path}: {n} windows of {CONTEXT} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
