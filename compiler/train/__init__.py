"""Training with a generated module: ``loop`` (train, optimizers' schedule, checkpoints),
``data`` (reading .npz/.csv) and ``plot`` (loss curves, decision boundaries). The options
(``TrainConfig``) are declared once in ``compiler.spec.train_options``.

The names of ``loop`` are re-exported here (``from compiler.train import train, TrainConfig``),
lazily, so that importing this package does not pay for numpy.

The package itself is callable: ``compiler.train(module, data, config, client=client)`` is
``compiler.train.loop.train`` (the API the Dask issue names; a package cannot also be a function
of the same name, so the module object gets a ``__call__``)."""
import importlib
import sys
import types

_LOOP = ("TrainConfig", "TrainError", "TrainResult", "History", "StopRequest", "Checkpoint", "train",
         "evaluate", "save_params", "load_params", "check_params", "check_data", "split", "lr_at",
         "save_checkpoint", "load_checkpoint", "update_steps", "DEFAULT_LR")

__all__ = list(_LOOP)


def __getattr__(name):
    if name in _LOOP:
        value = getattr(importlib.import_module("compiler.train.loop"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compiler.train' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return self.train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
