"""bpc, the backprop compiler: symbolic reverse-mode differentiation of neural networks
declared with SymPy, emitted as standalone vectorised NumPy modules.

Public API (imported lazily, so that ``bpc --help`` does not pay for SymPy)::

    from compiler import mlp, Network, expression_model, from_matrix_expr, compile_model
    from compiler import compile_model_c      # the C target, through cffi

    model = mlp([2, 16, 16, 1], activation="tanh", loss="mse")
    compiled = compile_model(model)        # .source, .formulas, .latex, .write(path), .load()
    module = compiled.load()               # forward / loss / backward / init_params
"""
import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "BpcError": "errors", "ModelError": "errors", "ShapeError": "errors", "UnsupportedError": "errors",
    "ACTIVATIONS": "functions", "relu": "functions", "sigmoid": "functions", "softplus": "functions",
    "LOSSES": "nn", "Network": "nn", "mlp": "nn",
    "expression_model": "expression_model",
    "from_matrix_expr": "matrix_frontend",
    "Model": "model",
    "CompiledModule": "emit", "compile_model": "emit", "load_module": "emit",
    "check_gradients": "gradcheck", "random_batch": "gradcheck",
    "compile_model_c": "c_backend", "CompiledC": "c_backend", "CBuildError": "c_backend",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'compiler' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)


class _Package(types.ModuleType):
    """The package, keeping ``compiler.expression_model`` the function: importing the submodule
    of that name (as loading a spec does) would otherwise set the package attribute to the
    module, so that ``bpc.expression_model(...)`` raised "'module' object is not callable"."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return      # the submodule stays reachable as sys.modules["compiler.<name>"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
