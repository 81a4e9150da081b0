"""Atomic file writes: a reader sees the old file or the new one, never a partial one."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """Open a temporary file beside ``path``; on success it replaces ``path`` (with the usual
    permissions, 0666 less the umask, not mkstemp's 0600); on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name lets remove_stale_temporaries tell a killed writer's file from a live one's
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    try:
        kwargs = {"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path, text):
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


def remove_stale_temporaries(path):
    """Remove the temporary files ``atomic_file`` left beside ``path`` when its process was
    killed in the middle of a write (SIGKILL, power loss): those whose writer is gone. Returns
    the paths removed."""
    path = Path(path)
    removed = []
    try:
        candidates = list(path.parent.glob(f".{glob_escape(path.name)}.*-*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        pid = tmp.name[len(path.name) + 2:].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)) or not tmp.is_file():
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def glob_escape(text):
    return "".join(f"[{ch}]" if ch in "*?[]" else ch for ch in text)


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:            # EPERM: it exists, as another user's
        return True
    return True


def check_writable(path, size=0):
    """Raise OSError (with a ``strerror`` that says why) unless a file of about ``size`` bytes
    can be written to ``path`` atomically: ``path`` is not a directory or a device, its
    directory exists or can be made, and accepts a file that large (a full disk or a read-only
    folder is found now, not after the work whose result it is to hold)."""
    import errno
    path = Path(path)
    if path.is_dir():
        raise OSError(errno.EISDIR, "it is a directory; give a file name")
    if path.exists() and not path.is_file():
        raise OSError(errno.EINVAL, "it exists and is not a regular file (a device, a pipe?)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OSError(errno.ENOTDIR, f"{parent} is a file, not a directory")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    try:
        if size > 0:
            try:
                os.posix_fallocate(fd, 0, size)         # reserves the blocks: ENOSPC if they are not there
            except (AttributeError, OSError) as e:
                if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.write(fd, bytes(min(size, 1 << 20)))  # no fallocate on this file system: a sample
        os.fsync(fd)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
