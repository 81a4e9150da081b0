"""bpc, the backprop compiler: symbolic reverse-mode differentiation of neural networks
declared with SymPy, emitted as standalone vectorised NumPy modules.

Public API::

    from compiler import mlp, Network, expression_model, from_matrix_expr, compile_model
"""
__version__ = "0.1.0"

from .errors import BpcError, ModelError, ShapeError, UnsupportedError  # noqa: E402
from .functions import ACTIVATIONS, relu, sigmoid, softplus  # noqa: E402
from .nn import LOSSES, Network, mlp  # noqa: E402
from .expression_model import expression_model  # noqa: E402
from .matrix_frontend import from_matrix_expr  # noqa: E402
from .model import Model  # noqa: E402
from .emit import CompiledModule, compile_model, load_module  # noqa: E402

__all__ = [
    "ACTIVATIONS", "LOSSES", "BpcError", "CompiledModule", "Model", "ModelError", "Network",
    "ShapeError", "UnsupportedError", "compile_model", "expression_model", "from_matrix_expr",
    "load_module", "mlp",
    "relu", "sigmoid", "softplus",
]
