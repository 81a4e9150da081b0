"""Image layers of ``Network`` (a mixin): ``conv2d``, ``maxpool2d``, ``avgpool2d``, ``flatten``.

Images are batch-first and channels last, (n, H, W, C). Every layer goes through the windows
op (``ir.im2col``: each window a row, shape (n*OH*OW, kh*kw*C)), so its heavy work is one
matrix product, and its adjoint a scatter-add (``col2im``):

- ``conv2d``: ``activation(reshape(im2col(x) @ W, (n, OH, OW, filters)) + b)``, W of shape
  (kh*kw*C, filters), rows in (kernel row, kernel column, channel) order;
- ``maxpool2d``: the largest entry of each window, per channel (``ir.window_max``; its
  gradient goes to the first maximum of the window);
- ``avgpool2d``: the mean of each window, per channel;
- ``flatten``: (n, H, W, C) -> (n, H*W*C), row-major (so a flattened image is the
  ``reshape(n, -1)`` of the NumPy array).

Pooling windows do not overlap the border ("valid"); their stride defaults to the pool size.
A convolution's parameters are ``W<k>``, ``b<k>``, k counting the layers with parameters (as for
dense layers); pools and flattens, which have none, are counted apart (``Pool<j>``, ``F<j>``).
"""
from __future__ import annotations

from collections.abc import Sequence

import sympy as sp

from compiler.core import ir
from compiler.core.functions import activation as resolve_activation
from compiler.core.ir import ARG, N, Node
from compiler.core.ops.windows import check_image, geometry, pair
from compiler.errors import ModelError, ShapeError


def _positive(v, what):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ModelError(f"{what} must be a positive integer, got {v!r}")
    return v


class ImageLayers:
    """Methods of ``Network`` for batches of images (n, H, W, C)."""

    def _count(self, kind):
        """The number of this layer among the parameter-free layers of ``kind``."""
        counts = self.__dict__.setdefault("_image_counts", {})
        counts[kind] = counts.get(kind, 0) + 1
        return str(counts[kind])

    def _windows(self, x, kernel, stride, padding, what, k):
        """im2col of x, its output size, with the checks of ``what`` (ShapeErrors that say which
        layer and which size)."""
        kernel = pair(kernel, f"{what} {k}: kernel")
        stride = pair(stride, f"{what} {k}: stride")
        (h, w) = (int(d) for d in x.shape[1:3])
        try:
            (oh, _, _), (ow, _, _) = (geometry(s, kk, st, padding, f"{what} {k}: kernel")
                                      for s, kk, st in ((h, kernel[0], stride[0]), (w, kernel[1], stride[1])))
        except ShapeError as e:
            raise ShapeError(f"{e} (input {ir.format_shape(x.shape)})") from None
        return ir.im2col(x, kernel, stride, padding), kernel, (oh, ow)

    def conv2d(self, x: Node, filters: int, kernel: int | Sequence[int], stride: int | Sequence[int] = 1,
               padding: str = "valid", activation: str | sp.Expr = "identity", name: str | None = None) -> Node:
        """A 2-D convolution of ``x`` (n, H, W, C) with ``filters`` kernels of ``kernel`` (an int
        or (kh, kw)) pixels, every ``stride`` pixels, ``padding`` "valid" or "same", plus a bias
        per filter, then ``activation``; weights Glorot- or He-initialised by activation."""
        check_image(x, "conv2d layer")
        self._layers += 1
        k = name or str(self._layers)
        filters = _positive(filters, "conv2d filters")
        act_expr, scheme = resolve_activation(activation)
        cols, (kh, kw), (oh, ow) = self._windows(x, kernel, stride, padding, "conv2d layer", k)
        c = int(x.shape[3])
        fan_in, fan_out = kh * kw * c, kh * kw * filters
        init = ("he", fan_in) if scheme == "he" else ("glorot", fan_in, fan_out)
        W = self.param(f"W{k}", (fan_in, filters), init)
        b = self.param(f"b{k}", (filters,), ("zeros",))
        self._name(cols, f"P{k}")
        pw = self._name(ir.matmul(cols, W), f"PW{k}")
        conv = self._name(ir.reshape(pw, (N, oh, ow, filters)), f"C{k}")
        z = self._name(ir.ew(ARG[0] + ARG[1], [conv, b]), f"Z{k}")
        return self._apply(z, act_expr, f"H{k}")

    def _pool(self, x, pool, stride, what, name):
        check_image(x, what)
        k = name or self._count("pool")
        pool = pair(pool, f"{what} {k}: pool")
        stride = pool if stride is None else stride
        cols, (ph, pw), (oh, ow) = self._windows(x, pool, stride, "valid", what, k)
        c = int(x.shape[3])
        self._name(cols, f"Pp{k}")
        return k, self._name(ir.reshape(cols, (cols.shape[0], ph * pw, c)), f"Q{k}"), (oh, ow, c)

    def maxpool2d(self, x: Node, pool: int | Sequence[int], stride: int | Sequence[int] | None = None,
                  name: str | None = None) -> Node:
        """The largest value of each ``pool`` (int or (ph, pw)) window of ``x`` (n, H, W, C), per
        channel, every ``stride`` pixels (default: the pool size)."""
        k, windows, (oh, ow, c) = self._pool(x, pool, stride, "maxpool2d layer", name)
        m = self._name(ir.window_max(windows), f"Max{k}")
        return self._name(ir.reshape(m, (N, oh, ow, c)), f"Pool{k}")

    def avgpool2d(self, x: Node, pool: int | Sequence[int], stride: int | Sequence[int] | None = None,
                  name: str | None = None) -> Node:
        """The mean of each ``pool`` window of ``x`` (n, H, W, C), per channel, every ``stride``
        pixels (default: the pool size)."""
        k, windows, (oh, ow, c) = self._pool(x, pool, stride, "avgpool2d layer", name)
        size = windows.shape[1]
        s = ir.ew(ARG[0] / sp.Integer(size), [ir.reduce_sum(windows, (1,))])
        m = self._name(s, f"Avg{k}")
        return self._name(ir.reshape(m, (N, oh, ow, c)), f"Pool{k}")

    def flatten(self, x: Node, name: str | None = None) -> Node:
        """(n, d1, d2, ...) -> (n, d1*d2*...), row-major."""
        if len(x.shape) < 2 or x.shape[0] != N:
            raise ShapeError(f"flatten needs a batch (n, ...), got {ir.format_shape(x.shape)}")
        k = name or self._count("flatten")
        size = 1
        for d in x.shape[1:]:
            size *= int(d)
        return self._name(ir.reshape(x, (N, size)), f"F{k}")
