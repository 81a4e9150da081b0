"""The table of models every backend is tested on: (id, builder) pairs, builder() -> Model; and
its axes: targets (backend x compiled dtype), data dtypes with their tolerances, batch sizes."""
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import sympy as sp

import compiler as bpc
from compiler.gradcheck import TrainingMode

x_ = sp.Symbol("x")


def _net(sizes, act, loss="mse", kind=None, name="net"):
    return lambda: bpc.mlp(sizes, activation=act, loss=loss, target_kind=kind, name=name)


def _poly():
    a, b, c, d, x = sp.symbols("a b c d x")
    return bpc.expression_model(a * x**3 + b * x**2 + c * x + d, {a: 0.5, b: -0.3, c: 0.2, d: 0.1}, [x],
                                name="poly")


def _expr_multi():
    w, k, s, x1, x2, y = sp.symbols("w k s x1 x2 y")
    pred = w * sp.sin(k * x1) + sp.exp(-s**2 * x2**2) + sp.log(1 + sp.exp(w * x2))
    p = sp.Symbol("p")
    return bpc.expression_model(pred, {w: 0.7, k: 1.3, s: 0.4}, [x1, x2], [y],
                                loss=sp.log(sp.cosh(p - y)) + sp.Rational(1, 100) * w**2, name="expr_multi")


def _custom_loss():
    p, y = sp.symbols("p y")
    net = bpc.Network("custom_loss")
    x = net.input("x", 3)
    h = net.dense(x, 4, "softplus")
    out = net.dense(h, 2)
    return net.build(out, loss=sp.sqrt(1 + (p - y) ** 2) - 1, target=net.target("y", 2))


def _matrix(loss_kind):
    def build():
        x = sp.MatrixSymbol("x", 3, 1)
        y = sp.MatrixSymbol("y", 2, 1)
        W1, b1 = sp.MatrixSymbol("W1", 4, 3), sp.MatrixSymbol("b1", 4, 1)
        W2, b2 = sp.MatrixSymbol("W2", 2, 4), sp.MatrixSymbol("b2", 2, 1)
        h = (W1 * x + b1).applyfunc(sp.Lambda(x_, x_ / (1 + sp.exp(-x_))))
        out = W2 * (sp.HadamardProduct(h, h.applyfunc(sp.tanh)) + sp.HadamardPower(h, 2)) + b2
        if loss_kind == "expr":
            loss = (out - y).T * (out - y)
        else:
            loss = loss_kind
        return bpc.from_matrix_expr(out, [x], [y], loss=loss, name="matrix_" + ("expr" if loss_kind == "expr" else "mse"))
    return build


def _matrix_rows():
    x = sp.MatrixSymbol("x", 1, 3)
    y = sp.MatrixSymbol("y", 1, 1)
    W, c = sp.MatrixSymbol("W", 3, 2), sp.MatrixSymbol("c", 2, 1)
    alpha = sp.Symbol("alpha")
    out = (x * W).applyfunc(sp.tanh) * c * alpha
    return bpc.from_matrix_expr(out, [x], [y], loss="mse", init={"alpha": ("value", 0.8)}, name="matrix_rows")


def _matrix_scalar_row():
    x = sp.MatrixSymbol("x", 3, 1)
    y = sp.MatrixSymbol("y", 1, 2)
    a, c = sp.MatrixSymbol("a", 3, 1), sp.MatrixSymbol("c", 1, 2)
    out = (a.T * x).applyfunc(sp.tanh) * c        # one number per sample times a parameter row
    return bpc.from_matrix_expr(out, [x], [y], init={"a": ("glorot", 3, 1), "c": ("glorot", 1, 2)},
                                name="matrix_scalar_row")


def _norm(kind, loss="mse"):
    def build():
        net = bpc.Network(kind)
        h = net.dense(net.input("x", 3), 5, "tanh")
        h = getattr(net, kind)(h, eps=1e-3)
        h = net.dense(h, 4, "relu" if kind == "rmsnorm" else "tanh")
        if kind == "layernorm":
            h = net.layernorm(h)          # a norm straight before the output layer, default eps
        out = net.dense(h, 2)
        return net.build(out, loss, net.target("y", 2))
    return build


def _dropout():
    net = bpc.Network("dropout")
    h = net.dropout(net.input("x", 3), 0.2)
    h = net.dropout(net.dense(h, 5, "tanh"), 0.5)
    return net.build(net.dense(h, 3), "softmax_cross_entropy", net.target("y", kind="label"))


def _batchnorm(name):
    def build():
        net = bpc.Network(name)
        # an activation before each batchnorm: a bias straight before one has a zero gradient
        # (the batch mean removes it), which a relative comparison of backends cannot judge
        h = net.batchnorm(net.dense(net.input("x", 3), 5, "tanh"), eps=1e-3)
        h = net.batchnorm(net.dense(h, 4, "tanh"), momentum=0.3)
        return net.build(net.dense(h, 2), "mse", net.target("y", 2))
    return build


def _batchnorm_image():
    """conv -> batchnorm per channel (statistics over batch, height and width) -> dense."""
    net = bpc.Network("bn_image")
    h = net.conv2d(net.input("x", shape=(4, 3, 2)), 3, 2, padding="same", activation="tanh")
    h = net.batchnorm(h)
    return net.build(net.dense(net.flatten(h), 3), "softmax_cross_entropy", net.target("y", kind="label"))


def _residual_mlp():
    """Residual blocks (``h + block(h)``, by operator and by layer) and a gate, on a 1-D target
    against a 1-unit output (the (n,) / (n, 1) rule)."""
    net = bpc.Network("residual_mlp")
    x = net.input("x", 3)
    h = net.dense(x, 4, "tanh")
    h = net.dense(h, 4, "tanh") + h
    h = net.add(net.dense(h, 4, "softplus"), h)
    h = net.multiply(h, net.dense(x, 4, "sigmoid"))
    return net.build(net.dense(h, 1), "mse", net.target("y"))


def _two_input_concat():
    """Two inputs joined by concat, two outputs with a weighted loss each: class logits
    (labels) and a regression head on the concatenation."""
    net = bpc.Network("two_input")
    a, b = net.input("a", 3), net.input("b", 2)
    c = net.concat(net.dense(a, 4, "tanh"), b)
    z = net.dense(c, 3)
    r = net.dense(net.concat(c, a), 2)
    return net.build(losses=[(z, "softmax_cross_entropy", net.target("y", kind="label")),
                             (r, "mse", net.target("t", 2), 0.5)])


def _cnn_maxpool():
    """conv ("same", odd size) -> max pool -> flatten -> dense, softmax over integer labels."""
    net = bpc.Network("cnn_max")
    x = net.input("x", shape=(5, 5, 2))
    h = net.conv2d(x, 3, 3, padding="same", activation="tanh")
    h = net.maxpool2d(h, 2)
    z = net.dense(net.flatten(h), 3)
    return net.build(z, "softmax_cross_entropy", net.target("y", kind="label"))


def _cnn_avgpool():
    """conv (stride 2, "valid") -> conv ("same") -> average pool -> flatten -> dense, mse."""
    net = bpc.Network("cnn_avg")
    x = net.input("x", shape=(7, 6, 1))
    h = net.conv2d(x, 2, (3, 2), stride=2, activation="relu")
    h = net.conv2d(h, 3, 2, padding="same", activation="softplus")
    h = net.avgpool2d(h, 2, stride=1)
    z = net.dense(net.flatten(h), 2)
    return net.build(z, "mse", net.target("y", 2))


def _char_lm():
    """Token ids -> embedding + positions -> a causal transformer block -> logits per position,
    softmax cross-entropy over (n, T) labels (issue 13)."""
    net = bpc.Network("char_lm")
    x = net.input("x", kind="ids", length=4)
    h = net.positional(net.embedding(x, 5, 4))
    h = net.transformer_block(h, heads=2, mlp=6, causal=True)
    z = net.dense(net.layernorm(h), 5)
    return net.build(z, "softmax_cross_entropy", net.target("y", kind="label", length=4))


MODELS = [
    ("mlp_tanh_mse", _net([3, 5, 4, 2], "tanh", name="mlp_tanh")),
    ("mlp_relu_mse", _net([3, 6, 2], "relu", name="mlp_relu")),
    ("mlp_sigmoid_mse", _net([2, 4, 1], "sigmoid", name="mlp_sigmoid")),
    ("mlp_softplus", _net([2, 4, 1], "softplus", name="mlp_softplus")),
    ("mlp_swish", _net([2, 4, 1], "swish", name="mlp_swish")),
    ("mlp_gelu", _net([2, 4, 1], "gelu", name="mlp_gelu")),
    ("mlp_mish", _net([2, 3, 1], "mish", name="mlp_mish")),
    ("mlp_leaky_relu", _net([2, 4, 1], "leaky_relu", name="mlp_leaky")),
    ("mlp_custom_swish15", _net([2, 4, 1], x_ / (1 + sp.exp(-sp.Rational(3, 2) * x_)), name="mlp_custom")),
    ("mlp_handwritten_softplus", _net([2, 4, 1], sp.log(1 + sp.exp(x_)), name="mlp_hsoftplus")),
    ("mlp_max_relu", _net([2, 4, 1], sp.Max(0, x_), name="mlp_maxrelu")),
    ("softmax_labels", _net([4, 6, 3], "tanh", "softmax_cross_entropy", name="clf_labels")),
    ("softmax_onehot", _net([4, 5, 3], "relu", "softmax_cross_entropy", "onehot", name="clf_onehot")),
    ("bce_logits", _net([3, 4, 2], "tanh", "bce_with_logits", name="bce")),
    ("custom_loss", _custom_loss),
    ("poly_fit", _poly),
    ("expr_multi", _expr_multi),
    ("matrix_mse", _matrix("mse")),
    ("matrix_expr_loss", _matrix("expr")),
    ("matrix_rows", _matrix_rows),
    ("matrix_scalar_row", _matrix_scalar_row),
    ("layernorm", _norm("layernorm")),
    ("rmsnorm", _norm("rmsnorm", "bce_with_logits")),
    ("dropout", _dropout),      # in inference mode (the default): the masks are ones
    ("batchnorm", _batchnorm("batchnorm")),             # training mode: batch statistics (see MODES)
    ("batchnorm_image", _batchnorm_image),              # training mode, per channel of an image
    ("batchnorm_inference", _batchnorm("bn_infer")),    # inference mode: given running statistics
    ("residual_mlp", _residual_mlp),
    ("two_input_concat", _two_input_concat),
    ("cnn_maxpool", _cnn_maxpool),
    ("cnn_avgpool", _cnn_avgpool),
    ("char_lm", _char_lm),
]

# models whose loss and gradients must stay finite at inputs of +-1000 (token ids are not
# numbers: char_lm's large scores and fully masked rows are tests/test_sequence.py's)
STABLE_MODELS = [m for m in MODELS if m[0] not in ("expr_multi", "char_lm")]


# ---- the axes every model is tested on ------------------------------------------------------
#
# A (backend, compiled dtype) pair is a target; the NumPy target also compiles with dtype=None
# ("follow the inputs": one module for float64 and float32 data). Each (model, target) is built
# once per session: the C builds are most of the suite's time.

BACKENDS = ("numpy", "c")
BATCHES = (1, 7, 64)
HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
NEEDS_CC = pytest.mark.skipif(not HAS_CC, reason="no C compiler")


@dataclass(frozen=True)
class Precision:
    """How a dtype's results are checked. float64: ``backward`` against central finite
    differences of ``loss`` at (rtol, atol). float32: loss and gradients against the same
    target's float64 module on the same (float32-rounded) numbers, at (rtol, atol * scale),
    scale = max(1, largest float64 magnitude). ``agree``: NumPy against C in this dtype
    (largest difference over largest magnitude)."""
    dtype: str
    rtol: float
    atol: float
    agree: float


PRECISIONS = {
    "float64": Precision("float64", rtol=1e-6, atol=1e-9, agree=1e-12),
    # measured worst cases over the table: float32 against float64 ~7e-6 relative (mlp_gelu),
    # NumPy against C 6e-6 in float32 (char_lm's layer-norm scale g3 at batch 7: two layer
    # norms, attention and an MLP in one chain, summed in another order; 7e-7 without it) and
    # 2e-16 in float64
    "float32": Precision("float32", rtol=2e-4, atol=2e-5, agree=1e-5),
}


@dataclass(frozen=True)
class Row:
    """One target and one data dtype: ``compiled`` is the dtype the module was compiled for
    (None: it follows the inputs), ``dtype`` the dtype of the data and parameters it is given."""
    backend: str
    compiled: object
    dtype: str

    @property
    def id(self):
        return f"{self.backend}-{self.compiled or 'any'}-{self.dtype}"

    @property
    def reference(self):
        """The float64 row a float32 row is checked against (same backend, same mode)."""
        return Row(self.backend, self.compiled and "float64", "float64")

    def param(self):
        return pytest.param(self, id=self.id, marks=NEEDS_CC if self.backend == "c" else ())


ROWS = ([Row(backend, dtype, dtype) for backend in BACKENDS for dtype in PRECISIONS]
        + [Row("numpy", None, dtype) for dtype in PRECISIONS])

_models = {}
_built = {}


def model(model_id):
    """The Model of ``model_id``, made once per session (so NumPy and C compile one object)."""
    if model_id not in _models:
        _models[model_id] = dict(MODELS)[model_id]()
    return _models[model_id]


def _running_stats(module):
    """Running statistics away from their initial values (seeded), for the inference rows."""
    rng = np.random.default_rng(5)
    return {k: (rng.uniform(0.5, 2.0, size=v.shape) if k.startswith("running_var") else rng.normal(size=v.shape))
            for k, v in module.init_stats(np.float64).items()}


class _Inference:
    """A batchnorm module called in inference mode with fixed running statistics."""

    def __init__(self, module):
        # (test_core_gradients copies a module as type(mod)("broken") with its __dict__)
        self.module, self.stats = module, _running_stats(module) if hasattr(module, "init_stats") else None

    def __getattr__(self, name):
        value = getattr(self.module, name)
        if name in ("forward", "loss", "backward", "hvp", "gnvp"):
            return lambda *a, **kw: value(*a, stats=self.stats, **kw)
        return value


# how the table calls a model's functions, when not with their defaults: batchnorm's inference
# mode needs running statistics, so its rows run in training mode or with given statistics
MODES = {"batchnorm": TrainingMode, "batchnorm_image": TrainingMode, "batchnorm_inference": _Inference}


def build(model_id, backend="numpy", dtype=None, second_order=False):
    """The loaded module of ``model_id`` for ``backend`` compiled for ``dtype`` (None: NumPy
    follows the inputs), built once per session, called in the mode of MODES. NumPy modules
    always have hvp (and gnvp); C modules only with ``second_order`` (a longer C build)."""
    key = (model_id, backend, dtype, second_order and backend == "c")
    if key not in _built:
        if backend == "numpy":
            _built[key] = bpc.compile_model(model(model_id), dtype).load()
        else:
            from compiler.backends.c.backend import compile_model_c
            _built[key] = compile_model_c(model(model_id), dtype or "float64", second_order=second_order).load()
        if model_id in MODES:
            _built[key] = MODES[model_id](_built[key])
    return _built[key]


def perturbed(module, seed=1, scale=0.3, dtype=None):
    """Initial parameters plus noise (so that zero biases test nothing special), in ``dtype``
    (default: the dtype of the module's own initial parameters)."""
    rng = np.random.default_rng(seed)
    return {k: np.asarray(v + scale * rng.standard_normal(np.shape(v)), dtype=dtype or v.dtype)
            for k, v in module.init_params(seed).items()}


def as_dtype(arrays, dtype):
    """Data arrays cast to ``dtype`` (labels stay integers)."""
    return [a.astype(dtype) if a.dtype.kind == "f" else a for a in arrays]


def rel_err(a, b):
    """Largest difference of ``a`` from ``b`` over the largest magnitude of ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-300))


def float32_mismatches(mod, ref, params, arrays, precision=PRECISIONS["float32"]):
    """Where ``mod`` (float32) differs from ``ref`` (float64) on the same float32-rounded
    numbers by more than the float32 tolerance; [] when it agrees."""
    loss, grads = mod.backward(params, *arrays)
    params64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    loss64, grads64 = ref.backward(params64, *as_dtype(arrays, np.float64))
    bad = []
    if abs(loss - loss64) > precision.rtol * abs(loss64) + precision.atol * max(1.0, abs(loss64)):
        bad.append(("loss", loss, loss64))
    for k, g64 in grads64.items():
        g = np.asarray(grads[k])
        scale = max(1.0, float(np.max(np.abs(g64), initial=0.0)))
        if g.shape != g64.shape or not np.allclose(g, g64, rtol=precision.rtol, atol=precision.atol * scale):
            bad.append((k, float(np.max(np.abs(g - g64), initial=0.0)), scale))
    return bad
