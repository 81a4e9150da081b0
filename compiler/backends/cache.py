"""Where bpc caches generated modules and C builds: the location, the fallback when it cannot be
written, checksums of built files, the removal of builds that were interrupted, and the import
of a generated module by its path.

The location is ``$BPC_CACHE`` if set, else the platform's user cache directory plus ``bpc``,
as platformdirs knows it: ``$XDG_CACHE_HOME/bpc`` (default ``~/.cache/bpc``) on Linux and
other Unix systems, ``~/Library/Caches/bpc`` on macOS, ``%LOCALAPPDATA%\\bpc`` on Windows.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType

from compiler.backends.pause_gc import paused
from compiler.files import write_atomic

# a build directory no process of this host owns, or older than this, is a leftover
STALE_BUILD_SECONDS = 3600
BUILD_PREFIX = ".build-"


class CacheWarning(UserWarning):
    """The cache could not be used as it is (not writable, a damaged file): bpc carried on."""


def cache_dir():
    """The bpc cache: ``$BPC_CACHE``, else the platform's convention (see the module docstring)."""
    env = os.environ.get("BPC_CACHE")
    if env:
        return Path(env)
    import platformdirs
    # opinion=False: no extra "Cache" folder on Windows; the XDG spec's rule that a relative
    # $XDG_CACHE_HOME is ignored is platformdirs' too
    return platformdirs.user_cache_path("bpc", appauthor=False, opinion=False)


_fallback = None
_warned = set()


def fallback_dir(sub, wanted, error):
    """``sub`` in this process's private temporary cache (mode 0700, removed at exit), used
    because ``wanted`` could not be written (``error``); warns once per location."""
    global _fallback
    if _fallback is None:
        _fallback = Path(tempfile.mkdtemp(prefix="bpc-cache-"))
        atexit.register(shutil.rmtree, _fallback, True)
    if str(wanted) not in _warned:
        _warned.add(str(wanted))
        reason = getattr(error, "strerror", None) or str(error)
        warnings.warn(f"bpc: cannot write to the cache {wanted} ({reason}); using a private temporary "
                      f"cache, {_fallback}, for this process (set BPC_CACHE to a writable directory "
                      "to keep builds)", CacheWarning, stacklevel=3)
    path = _fallback / sub
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_cached(path, text, sub):
    """Write ``text`` to ``path`` in the cache atomically; where that fails (a read-only cache, a
    cache path that is a file), to ``sub/<name>`` in the private fallback. Returns the path written."""
    try:
        return write_atomic(path, text)
    except OSError as e:
        return write_atomic(fallback_dir(sub, Path(path).parent, e) / Path(path).name, text)


# ---- checksums of built files -------------------------------------------------------------

def checksum_path(path):
    return Path(path).with_name(Path(path).name + ".sha256")


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_checksum(path):
    """Record ``path``'s SHA-256 beside it (``<name>.sha256``), for verify()."""
    write_atomic(checksum_path(path), file_digest(path) + "\n")


def verify(path):
    """"ok" if ``path`` matches the checksum recorded when it was built, "missing" if there is no
    file or no checksum, "damaged" if they differ (a truncated, emptied or overwritten file,
    which must never be loaded: a truncated shared library kills the process with SIGBUS)."""
    try:
        if not Path(path).is_file():
            return "missing"
        recorded = checksum_path(path).read_text().strip()
        actual = file_digest(path)
    except FileNotFoundError:
        return "missing"   # (a library from before checksums were recorded: rebuilt, silently)
    except OSError:
        return "damaged"
    return "ok" if actual == recorded else "damaged"


# ---- build directories --------------------------------------------------------------------

def _host():
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def build_dir(root):
    """A fresh build directory in ``root``, named after this process and host (so that
    remove_stale_builds can tell a concurrent build from a leftover)."""
    return Path(tempfile.mkdtemp(dir=root, prefix=f"{BUILD_PREFIX}{os.getpid()}@{_host()}."))


_OWNER = re.compile(re.escape(BUILD_PREFIX) + r"(\d+)@([A-Za-z0-9-]+)\.")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, OSError):
        return True   # another user's process (or a pid this OS cannot signal): assume it lives
    return True


def is_stale(path, now=None):
    """A build directory is a leftover if its owner, a process of this host, is dead; one of
    another host (a shared cache), or from before owners were recorded, once it is older than
    STALE_BUILD_SECONDS. A build in progress on this host is never stale."""
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except OSError:
        return False
    m = _OWNER.match(path.name)
    # (not on Windows, where os.kill(pid, 0) would send CTRL_C_EVENT: age alone decides there)
    if m and m.group(2) == _host() and sys.platform != "win32":
        return not _alive(int(m.group(1)))
    return age > STALE_BUILD_SECONDS


def remove_stale_builds(root):
    """Remove the leftover build directories (see is_stale) in ``root``; returns their names."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            path = Path(entry.path)
            if entry.name.startswith(BUILD_PREFIX) and entry.is_dir(follow_symlinks=False) and is_stale(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(entry.name)
    return sorted(removed)


@paused
def load_module(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """Import a generated module from a file path (a fresh module object each call)."""
    path = Path(path)
    name = name or "bpc_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
