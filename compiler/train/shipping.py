"""What reaches Dask workers: bpc's worker code (``dask_worker.py``, uploaded as source) and a
generated module as a payload of files, never a pickled module or closure.

A payload is a dict of plain data: the module's source text (a NumPy module), or the C target's
Python wrapper, its ``<prefix>.c`` and ``<prefix>.h`` and the built extension (a C module),
each with its SHA-256, and the digest of them all, which names the module on the worker.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
import weakref
from pathlib import Path

from compiler.spec.train_options import TrainError

_RUNTIME = Path(__file__).with_name("dask_worker.py")
_uploaded = weakref.WeakKeyDictionary()      # client -> the runtime's module name, once uploaded


def runtime_name():
    """The worker code's module name: its content digest in it, so that clients of two bpc
    versions on one cluster never import each other's."""
    return "bpc_dask_worker_" + hashlib.sha256(_RUNTIME.read_bytes()).hexdigest()[:12]


def runtime():
    """The worker code as a module of the name it has on the workers (functions are pickled by
    reference to it: the same name on both sides)."""
    name = runtime_name()
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, _RUNTIME)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def upload_runtime(client):
    """Upload the worker code to the cluster (its workers, and the ones that join later: Dask
    keeps the upload as a plugin), once per client; returns the module (client side)."""
    module = runtime()
    if _uploaded.get(client) != module.__name__:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="bpc-dask-") as d:
            path = Path(d) / f"{module.__name__}.py"
            path.write_bytes(_RUNTIME.read_bytes())
            try:
                client.upload_file(str(path), load=True)
            except Exception as e:
                raise TrainError(f"cannot install bpc's worker code on the Dask cluster: {type(e).__name__}: {e}") from None
        _uploaded[client] = module.__name__
    return module


def payload(module):
    """The files of a loaded generated module (``compile_model(...).load()``, the C target's
    ``load()``, or a module imported from a written file), as data for the workers."""
    where = getattr(module, "__name__", "the module")
    path = getattr(module, "__file__", None)
    if not path or not Path(path).is_file():
        raise TrainError(f"cannot send {where} to Dask workers: it was not imported from a file "
                         "(load it with compile_model(...).load() or load_module(path))")
    files, entry, extension = {}, Path(path).name, None
    files[entry] = Path(path).read_bytes()
    ext_name = getattr(module, "_EXT", None)
    target = "c" if ext_name is not None and hasattr(module, "_lib") else "numpy"
    if target == "c":
        ext = sys.modules.get(ext_name)
        so = Path(getattr(ext, "__file__", "") or "")
        if not so.is_file():
            raise TrainError(f"cannot send {where} to Dask workers: its C extension {ext_name} has no file")
        extension = so.name
        files[extension] = so.read_bytes()
        prefix = ext_name[len("_bpc_"):-17]          # _bpc_<prefix>_<16 hex digits>
        for suffix in (".c", ".h"):
            for d in (so.parent, Path(path).parent):
                if (d / (prefix + suffix)).is_file():
                    files[prefix + suffix] = (d / (prefix + suffix)).read_bytes()
                    break
            else:
                raise TrainError(f"cannot send {where} to Dask workers: {prefix}{suffix}, the C source of its "
                                 f"extension, is neither beside {so} nor beside {path}")
    sha = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    digest = hashlib.sha256("".join(f"{k}:{sha[k]};" for k in sorted(sha)).encode()).hexdigest()
    name = "bpc_shipped_" + "".join(c if c.isalnum() else "_" for c in Path(path).stem)
    return {"target": target, "name": name, "entry": entry, "extension": extension, "files": files,
            "sha256": sha, "digest": digest}


def payload_nbytes(p):
    return sum(len(v) for v in p["files"].values())
