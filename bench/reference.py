"""Hand-written NumPy references, written the way an expert would for speed: every
intermediate in a buffer allocated once per (batch, dtype) and reused (``out=``), in-place
elementwise updates, float32 kept float32. The gradients are fresh arrays on every call, as the
generated module's are (a caller may keep them), so the comparison is like for like.
"""
from __future__ import annotations

import numpy as np


class HandMLP:
    """loss and gradients of a dense MLP with tanh or relu hidden layers and, at the output,
    softmax cross-entropy on integer labels (``loss="xent"``) or mean squared error
    (``loss="mse"``, one output)."""

    def __init__(self, sizes, activation="tanh", loss="xent"):
        self.sizes = list(sizes)
        self.activation = activation
        self.loss_kind = loss
        self._buffers = {}

    def _bufs(self, n, dtype):
        key = (n, dtype)
        b = self._buffers.get(key)
        if b is None:
            widths = self.sizes[1:]
            b = {
                "H": [np.empty((n, w), dtype) for w in widths],     # activations (last: logits)
                "D": [np.empty((n, w), dtype) for w in widths],     # adjoints of pre-activations
                "T": [np.empty((n, w), dtype) for w in widths],     # scratch (derivatives)
                "rows": np.arange(n),
                "m": np.empty((n, 1), dtype),
                "s": np.empty((n, 1), dtype),
            }
            self._buffers[key] = b
        return b

    def step(self, params, x, y):
        """(loss, grads) for one batch; params is a list [W1, b1, W2, b2, ...]."""
        n = x.shape[0]
        dt = x.dtype
        b = self._bufs(n, dt)
        H, D, T = b["H"], b["D"], b["T"]
        layers = len(self.sizes) - 1
        relu = self.activation == "relu"
        a = x
        for i in range(layers):
            W, bias = params[2 * i], params[2 * i + 1]
            np.matmul(a, W, out=H[i])
            H[i] += bias
            if i < layers - 1:
                if relu:
                    np.maximum(H[i], 0, out=H[i])
                else:
                    np.tanh(H[i], out=H[i])
            a = H[i]
        Z = H[-1]
        G = D[-1]
        if self.loss_kind == "xent":
            rows = b["rows"]
            m, s = b["m"], b["s"]
            np.max(Z, axis=1, keepdims=True, out=m)
            np.subtract(Z, m, out=G)
            np.exp(G, out=G)
            np.sum(G, axis=1, keepdims=True, out=s)
            picked = Z[rows, y]
            loss = float(np.mean(np.log(s[:, 0]) + m[:, 0] - picked))
            np.divide(G, s, out=G)
            G[rows, y] -= 1
            G *= dt.type(1.0 / n)
        else:
            np.subtract(Z, y.reshape(Z.shape), out=G)
            loss = float(np.vdot(G, G) / n)
            G *= dt.type(2.0 / n)
        grads = [None] * (2 * layers)
        for i in range(layers - 1, -1, -1):
            a = x if i == 0 else H[i - 1]
            grads[2 * i] = a.T @ D[i]
            grads[2 * i + 1] = D[i].sum(axis=0)
            if i > 0:
                np.matmul(D[i], params[2 * i].T, out=D[i - 1])
                t = T[i - 1]
                if relu:
                    np.greater(H[i - 1], 0, out=t)
                else:
                    np.multiply(H[i - 1], H[i - 1], out=t)
                    np.subtract(1, t, out=t)
                D[i - 1] *= t
        return loss, grads
