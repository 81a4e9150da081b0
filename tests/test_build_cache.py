"""The build cache: where it is, what happens when it is damaged or cannot be written, and the
removal of interrupted builds. A damaged library is loaded only in a subprocess: on the old code
a truncated one killed the interpreter with SIGBUS."""
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import compiler as bpc
from compiler.backends import cache
from compiler.backends.cache import CacheWarning
from model_table import MODELS

ROOT = Path(__file__).resolve().parent.parent
HAVE_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
_MODELS = dict(MODELS)


def compiled_c(model_id="poly_fit"):
    from compiler.backends.c.backend import compile_model_c
    return compile_model_c(_MODELS[model_id]())


def reference_loss(model_id="poly_fit"):
    m = bpc.compile_model(_MODELS[model_id]()).load()
    x = np.linspace(-1, 1, 7)
    return m.loss(m.init_params(0), x, x ** 3)


# ---- a damaged library is rebuilt, never loaded ----------------------------------------------

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# (id, how the cached library is damaged, in place; whether a warning is expected)
DAMAGE = [
    ("truncated to half", _truncate, True),                                     # was SIGBUS
    ("truncated to 4 KiB", lambda p: p.write_bytes(p.read_bytes()[:4096]), True),
    ("emptied (0 bytes)", lambda p: p.write_bytes(b""), True),                 # was ImportError
    ("garbage of the same size", lambda p: p.write_bytes(os.urandom(p.stat().st_size)), True),
    ("one byte flipped", _flip_one_byte, True),
    ("checksum missing (a build from before checksums)", lambda p: cache.checksum_path(p).unlink(), False),
    ("checksum garbage", lambda p: cache.checksum_path(p).write_text("not a digest\n"), True),
]

LOAD_SCRIPT = textwrap.dedent("""
    import sys, warnings
    sys.path[:0] = [{root!r}, {tests!r}]
    import numpy as np
    from compiler.backends.c import backend as c_backend
    from compiler.backends.c.backend import compile_model_c
    from model_table import MODELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = compile_model_c(dict(MODELS)["poly_fit"]()).load(cache={cache!r})
    x = np.linspace(-1, 1, 7)
    print(repr(m.loss(m.init_params(0), x, x ** 3)))
    print(c_backend.stats["builds"], c_backend.stats["damaged"])
    print(" | ".join(str(w.message) for w in caught))
""")


@needs_cc
@pytest.mark.parametrize("name,damage,warns", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, name, damage, warns):
    so = compiled_c().build(cache=tmp_path)
    assert cache.verify(so) == "ok"
    damage(so)
    run = subprocess.run([sys.executable, "-c", LOAD_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"),
                                                                      cache=str(tmp_path))],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])   # -7 was SIGBUS
    loss, counts, messages = run.stdout.split("\n")[:3]
    assert float(loss) == pytest.approx(reference_loss(), rel=1e-12)
    assert counts == ("1 1" if warns else "1 0")                       # rebuilt once
    assert ("does not match the checksum recorded when it was built" in messages) == warns
    assert cache.verify(so) == "ok"                                     # replaced by the rebuild


@needs_cc
def test_a_build_records_the_checksum_of_the_library(tmp_path):
    so = compiled_c().build(cache=tmp_path)
    assert cache.checksum_path(so).read_text() == cache.file_digest(so) + "\n"
    again = compiled_c().build(cache=tmp_path / "other")
    assert cache.file_digest(again) == cache.file_digest(so)   # builds are byte-identical


# ---- a cache that cannot be written: a private temporary cache, with a warning --------------

def _file(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a directory")
    return f


def _read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    probe = d / "probe"
    try:
        probe.write_text("")
    except PermissionError:
        return d
    probe.unlink()
    pytest.skip("permissions do not stop this user (root): see the simulated cases")


class _Refuse:
    """Makes creating anything inside ``root`` fail with ``errno`` (EACCES, EROFS), as a
    read-only directory or file system does for every user, root included (simulated: the test
    suite runs as root, for whom chmod 555 changes nothing)."""

    def __init__(self, monkeypatch, root, errno):
        import tempfile
        real_mkdtemp, real_mkstemp = tempfile.mkdtemp, tempfile.mkstemp

        def refuse(real):
            def wrapped(*args, dir=None, **kwargs):
                if dir is not None and Path(dir).resolve().is_relative_to(root.resolve()):
                    raise OSError(errno, os.strerror(errno), str(dir))
                return real(*args, dir=dir, **kwargs)
            return wrapped
        monkeypatch.setattr(tempfile, "mkdtemp", refuse(real_mkdtemp))
        monkeypatch.setattr(tempfile, "mkstemp", refuse(real_mkstemp))


def _simulated(errno):
    def make(tmp_path, monkeypatch):
        d = tmp_path / "cache"
        d.mkdir()
        _Refuse(monkeypatch, d, errno)
        return d
    return make


# (id, (tmp_path, monkeypatch) -> the cache path to use)
UNWRITABLE = [
    ("the cache is a regular file", lambda t, m: _file(t)),
    ("the cache is under a regular file", lambda t, m: _file(t) / "sub" / "cache"),
    ("read-only directory (chmod 555; skipped as root)", lambda t, m: _read_only_dir(t)),
    ("permission denied (simulated EACCES)", _simulated(13)),
    ("read-only file system (simulated EROFS)", _simulated(30)),
]


@needs_cc
@pytest.mark.parametrize("name,make", UNWRITABLE, ids=[u[0] for u in UNWRITABLE])
def test_c_build_in_an_unwritable_cache_falls_back_with_a_warning(tmp_path, monkeypatch, name, make):
    root = make(tmp_path, monkeypatch)
    with pytest.warns(CacheWarning, match=r"cannot write to the cache .*; using a private temporary cache"):
        m = compiled_c().load(cache=root)
    x = np.linspace(-1, 1, 7)
    assert m.loss(m.init_params(0), x, x ** 3) == pytest.approx(reference_loss(), rel=1e-12)
    assert not Path(m.__file__).resolve().is_relative_to(tmp_path.resolve())
    assert Path(m.__file__).resolve().is_relative_to(cache._fallback.resolve())


@pytest.mark.parametrize("name,make", UNWRITABLE, ids=[u[0] for u in UNWRITABLE])
def test_numpy_load_in_an_unwritable_cache_falls_back_with_a_warning(tmp_path, monkeypatch, name, make):
    monkeypatch.setenv("BPC_CACHE", str(make(tmp_path, monkeypatch)))
    model = bpc.mlp([2, 3, 1], name=f"fallback_{abs(hash(name)) % 10**6}")
    with pytest.warns(CacheWarning, match="cannot write to the cache"):
        m = bpc.compile_model(model).load()
    assert np.isfinite(m.loss(m.init_params(0), np.ones((2, 2)), np.ones((2, 1))))
    assert Path(m.__file__).resolve().is_relative_to(cache._fallback.resolve())


@needs_cc
def test_a_read_only_cache_that_holds_the_build_is_used_without_a_warning(tmp_path, monkeypatch):
    compiled_c().build(cache=tmp_path)
    compiled_c().load(cache=tmp_path)               # the wrapper is written beside the library
    _Refuse(monkeypatch, tmp_path, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compiled_c().load(cache=tmp_path)
    assert Path(m.__file__).resolve().is_relative_to(tmp_path.resolve())


# ---- interrupted builds are removed, builds in progress are not ------------------------------

def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


HOUR = 3600
# (id, directory name (PID: a dead process, ME: this process, HOST: this host), age in seconds,
# whether it is removed)
BUILD_DIRS = [
    ("owner dead, fresh", ".build-{PID}@{HOST}.a1", 5, True),
    ("owner dead, old", ".build-{PID}@{HOST}.a2", 2 * HOUR, True),
    ("owner alive (a concurrent build), fresh", ".build-{ME}@{HOST}.b1", 5, False),
    ("owner alive, running for hours", ".build-{ME}@{HOST}.b2", 5 * HOUR, False),
    ("another host's, fresh", ".build-{PID}@otherhost.c1", 5, False),
    ("another host's, old", ".build-{PID}@otherhost.c2", 2 * HOUR, True),
    ("no owner recorded (older bpc), fresh", ".build-k2j3h4", 5, False),
    ("no owner recorded (older bpc), old", ".build-x9y8z7", 2 * HOUR, True),
    ("a finished build, old", "e7f1c6c213c97c964a1740a3f5aab5b3", 2 * HOUR, False),
    ("another hidden directory, old", ".git", 2 * HOUR, False),
]


def _make_build_dirs(root):
    pid, names = _dead_pid(), {}
    now = time.time()
    for id_, pattern, age, removed in BUILD_DIRS:
        name = pattern.format(PID=pid, ME=os.getpid(), HOST=cache._host())
        (root / name).mkdir(parents=True)
        (root / name / "partial.o").write_text("")
        os.utime(root / name, (now - age, now - age))
        names[id_] = name
    (root / ".build-a-file").write_text("")
    return names


@pytest.mark.parametrize("id_,pattern,age,removed", BUILD_DIRS, ids=[b[0] for b in BUILD_DIRS])
def test_stale_build_directories_are_removed(tmp_path, id_, pattern, age, removed):
    names = _make_build_dirs(tmp_path)
    cache.remove_stale_builds(tmp_path)
    assert (tmp_path / names[id_]).exists() != removed
    assert (tmp_path / ".build-a-file").exists()


@needs_cc
def test_a_build_removes_the_leftovers_of_interrupted_builds(tmp_path):
    names = _make_build_dirs(tmp_path)
    compiled_c().build(cache=tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".build-"))
    assert left == sorted([".build-a-file"] + [names[b[0]] for b in BUILD_DIRS if not b[3] and b[1].startswith(".build-")])


# ---- the default location ----------------------------------------------------------------------

# (id, environment, the expected cache directory on Linux; ~ is HOME). On every platform the
# location is platformdirs' user cache directory (checked below for the one the tests run on).
LOCATIONS = [
    ("BPC_CACHE wins", {"BPC_CACHE": "/srv/bpc", "XDG_CACHE_HOME": "/xdg"}, "/srv/bpc"),
    ("XDG_CACHE_HOME", {"XDG_CACHE_HOME": "/xdg"}, "/xdg/bpc"),
    ("XDG_CACHE_HOME relative is ignored", {"XDG_CACHE_HOME": "rel/cache"}, "~/.cache/bpc"),
    ("XDG_CACHE_HOME empty is ignored", {"XDG_CACHE_HOME": ""}, "~/.cache/bpc"),
    ("no variable: ~/.cache", {}, "~/.cache/bpc"),
]


def _environment(monkeypatch, tmp_path, env):
    for var in ("BPC_CACHE", "XDG_CACHE_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("HOME", str(tmp_path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the table gives Linux's locations")
@pytest.mark.parametrize("id_,env,expected", LOCATIONS, ids=[c[0] for c in LOCATIONS])
def test_default_cache_location_on_linux(monkeypatch, tmp_path, id_, env, expected):
    _environment(monkeypatch, tmp_path, env)
    assert cache.cache_dir() == Path(expected.replace("~", str(tmp_path)))


@pytest.mark.parametrize("env", [{}, {"XDG_CACHE_HOME": "/xdg"}, {"LOCALAPPDATA": "/appdata/local"}])
def test_default_cache_location_is_platformdirs(monkeypatch, tmp_path, env):
    import platformdirs
    _environment(monkeypatch, tmp_path, env)
    assert cache.cache_dir() == platformdirs.user_cache_path("bpc", appauthor=False, opinion=False)
