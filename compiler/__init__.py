"""bpc, the backprop compiler: symbolic reverse-mode differentiation of neural networks
declared with SymPy, emitted as standalone vectorised NumPy modules.

Public API (imported lazily, so that ``bpc --help`` does not pay for SymPy)::

    from compiler import mlp, Network, expression_model, from_matrix_expr, compile_model
    from compiler import compile_model_c      # the C target, through cffi

    model = mlp([2, 16, 16, 1], activation="tanh", loss="mse")
    compiled = compile_model(model)        # .source, .formulas, .latex, .write(path), .load()
    module = compiled.load()               # forward / loss / backward / init_params
    result = compiler.train(module, data, config)   # = compiler.train.train; client= for Dask
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BpcError": "errors", "ModelError": "errors", "ShapeError": "errors", "UnsupportedError": "errors",
    "ACTIVATIONS": "core.functions", "relu": "core.functions", "sigmoid": "core.functions",
    "softplus": "core.functions",
    "Model": "core.model",
    "LOSSES": "frontends.nn", "Network": "frontends.nn", "mlp": "frontends.nn",
    "expression_model": "frontends.expression",
    "from_matrix_expr": "frontends.matrix",
    "load_spec": "spec.loader", "loads_spec": "spec.loader",
    "CompiledModule": "backends.numpy.module", "compile_model": "backends.numpy.module",
    "load_module": "backends.numpy.module",
    "compile_model_c": "backends.c.backend", "CompiledC": "backends.c.backend", "CBuildError": "backends.c.backend",
    "check_gradients": "gradcheck", "random_batch": "gradcheck",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name == "train":   # the training package, callable: compiler.train(module, data, config, client=...)
        return importlib.import_module(".train", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'compiler' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)

