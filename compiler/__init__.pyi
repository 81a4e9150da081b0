"""Types of the public API for type checkers: ``compiler/__init__.py`` imports these names
lazily (through ``__getattr__``), which a type checker cannot follow. Keep it in step with
``_EXPORTS`` (tests/test_polish.py checks that both list the same names)."""
from compiler.errors import (
    BpcError as BpcError, ModelError as ModelError, ShapeError as ShapeError,
    UnsupportedError as UnsupportedError
)
from compiler.core.functions import (
    ACTIVATIONS as ACTIVATIONS, relu as relu, sigmoid as sigmoid, softplus as softplus
)
from compiler.core.model import Model as Model
from compiler.frontends.nn import LOSSES as LOSSES, Network as Network, mlp as mlp
from compiler.frontends.expression import expression_model as expression_model
from compiler.frontends.matrix import from_matrix_expr as from_matrix_expr
from compiler.spec.loader import load_spec as load_spec, loads_spec as loads_spec
from compiler.backends.numpy.module import (
    CompiledModule as CompiledModule, compile_model as compile_model, load_module as load_module
)
from compiler.backends.c.backend import (
    compile_model_c as compile_model_c, CompiledC as CompiledC, CBuildError as CBuildError
)
from compiler.gradcheck import check_gradients as check_gradients, random_batch as random_batch

__version__: str
__all__: list[str]
