"""The table of models every backend is tested on: (id, builder) pairs; builder() -> Model."""
import sympy as sp

import compiler as bpc

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
]

# models whose loss and gradients must stay finite at inputs of +-1000
STABLE_MODELS = [m for m in MODELS if m[0] not in ("expr_multi",)]
