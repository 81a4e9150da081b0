"""Sequence layers of ``Network`` (a mixin): ``embedding``, ``positional``, ``attention`` and
``transformer_block``, on batch-first sequences (n, T, d).

Token ids are an input of kind "ids", (n, T) integers (``net.input("x", kind="ids",
length=T)``). Every layer is composed from ops of ``compiler.core.ops``, so the reverse sweep
derives its gradient and ``bpc show`` prints it as named formulas:

- ``embedding``: ``E[x]`` with a table ``E<k>`` (vocab, dim); its adjoint is the scatter-add
  ``dE = scatter_add(x, dEm)``, which sums the rows of a repeated id;
- ``positional``: ``h + P<k>``, a learned (T, d) table broadcast over the batch;
- ``attention`` (multi-head self-attention, d = heads * dk): projections ``Q = h Wq``,
  ``K = h Wk``, ``V = h Wv`` split into heads (n, heads, T, dk) by a reshape and a ``permute``;
  scores ``S = Q K^T / sqrt(dk)`` (``bmm``), future keys masked (``causal_mask``, fill -1e9)
  and padded keys too (``key_mask``, m the (n, T) mask, 1 keep, 0 pad); weights
  ``A = softmax(S)`` over the keys (max-subtracted: no overflow at large logits, and a fully
  masked row is uniform, not NaN); ``O = A V`` merged back to (n, T, d); output ``O Wo + bo``.
  The backward pass then has ``dA = dO V^T``, the softmax adjoint ``dS = A*(dA - sum(dA*A))``,
  ``dQ = dS K / sqrt(dk)``, ``dK = dS^T Q / sqrt(dk)`` and ``dV = A^T dO`` as named values;
- ``transformer_block``: pre-norm, ``h + attention(layernorm(h))`` then
  ``h + dense(dense(layernorm(h), mlp, gelu), d)``.
"""
from __future__ import annotations

import sympy as sp

from compiler.core import ir
from compiler.core.ir import ARG, N, Node
from compiler.errors import ModelError, ShapeError

MASK_FILL = -1e9     # a masked score: exp(fill - max) is exactly 0, and fill - fill is 0, not NaN


def _positive(v, what):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ModelError(f"{what} must be a positive integer, got {v!r}")
    return v


def check_sequence(h, what):
    """Check that ``h`` is a batch of sequences of vectors (n, T, d)."""
    if len(h.shape) != 3 or h.shape[0] != N:
        raise ShapeError(f"{what} needs a batch of sequences (n, T, d), got {ir.format_shape(h.shape)}"
                         + ("; embed token ids first (net.embedding)" if h.attr("kind") == "ids" else ""))


class SequenceLayers:
    """Methods of ``Network`` for token ids (n, T) and sequences (n, T, d)."""

    def embedding(self, x: Node, vocab: int, dim: int, name: str | None = None) -> Node:
        """The rows of a learned table ``E<k>`` (vocab, dim) for token ids ``x`` (n, T): (n, T, dim)."""
        if not isinstance(x, ir.Node) or x.op != "input" or x.attr("kind") != "ids":
            raise ModelError("an embedding reads an input of token ids (net.input(name, kind='ids', "
                             f"length=T)), got {x!r}")
        vocab, dim = _positive(vocab, "embedding vocab"), _positive(dim, "embedding dim")
        self._layers += 1
        k = name or str(self._layers)
        E = self.param(f"E{k}", (vocab, dim), ("glorot", vocab, dim))
        return self._name(ir.embed(E, x), f"Em{k}")

    def positional(self, h: Node, length: int | None = None, name: str | None = None) -> Node:
        """``h + P<k>``: a learned embedding of each of the ``length`` positions (default: the
        sequence length T of h, which it must equal), shape (T, d), added to every sequence."""
        check_sequence(h, "positional embedding")
        T, d = int(h.shape[1]), int(h.shape[2])
        if length is not None and _positive(length, "positional length") != T:
            raise ShapeError(f"positional embedding of length {length} for sequences of length {T}: "
                             "they must be equal (leave length out to use T)")
        self._layers += 1
        k = name or str(self._layers)
        P = self.param(f"P{k}", (T, d), ("glorot", T, d))
        return self._name(ir.ew(ARG[0] + ARG[1], [h, P]), f"H{k}")

    def _heads(self, flat, W, shape, k, letter):
        """``flat @ W`` (n*T, heads*dk) split into heads (n, heads, T, dk), named ``<letter><k>``
        (the projection ``X<letter><k>``, its split ``<letter>s<k>``)."""
        n, T, H, dk = shape
        proj = self._name(ir.matmul(flat, W), f"X{letter}{k}")
        split = self._name(ir.reshape(proj, (N, T, H, dk)), f"{letter}s{k}")
        return self._name(ir.permute(split, (0, 2, 1, 3)), f"{letter}{k}")

    def attention(self, h: Node, heads: int, causal: bool = False, mask: Node | None = None,
                  name: str | None = None) -> Node:
        """Multi-head self-attention of ``h`` (n, T, d) with ``heads`` heads of d/heads each;
        ``causal``: a position attends to itself and earlier ones only; ``mask``: an input (n, T)
        of 1 (keep) and 0 (padding), padded keys get no weight. See the module docstring."""
        check_sequence(h, "attention")
        heads = _positive(heads, "attention heads")
        if not isinstance(causal, bool):
            raise ModelError(f"attention causal must be true or false, got {causal!r}")
        T, d = int(h.shape[1]), int(h.shape[2])
        if d % heads:
            raise ShapeError(f"attention over {d} features cannot be split into {heads} heads; "
                             "the width must be a multiple of heads")
        if mask is not None:
            if not isinstance(mask, ir.Node) or mask.op != "input" or mask.attr("kind") != "real" \
                    or mask.shape != (N, T):
                raise ModelError(f"an attention mask is an input of shape (n, {T}) (1 keep, 0 padding), "
                                 f"declared with net.input(name, {T}); got {mask!r}")
        dk = d // heads
        self._layers += 1
        k = name or str(self._layers)
        flat = self._name(ir.reshape(h, (N * T, d)), f"X{k}")
        shape = (N, T, heads, dk)
        Q, K, V = (self._heads(flat, self.param(f"W{c.lower()}{k}", (d, d), ("glorot", d, d)), shape, k, c)
                   for c in "QKV")
        scores = self._name(ir.bmm(Q, K, tb=True), f"QK{k}")
        s = ir.ew(ARG[0] / sp.sqrt(dk), [scores])
        if causal:
            s = ir.causal_mask(self._name(s, f"Sc{k}"), MASK_FILL)
        if mask is not None:
            s = ir.key_mask(self._name(s, f"Sk{k}"), mask, MASK_FILL)
        s = self._name(s, f"S{k}")
        A = self._name(ir.softmax(s), f"A{k}")
        O = self._name(ir.bmm(A, V), f"O{k}")
        merged = self._name(ir.reshape(self._name(ir.permute(O, (0, 2, 1, 3)), f"Ot{k}"), (N * T, d)), f"Oc{k}")
        Wo = self.param(f"Wo{k}", (d, d), ("glorot", d, d))
        bo = self.param(f"bo{k}", (d,), ("zeros",))
        out = self._name(ir.matmul(merged, Wo), f"OW{k}")
        out = self._name(ir.reshape(out, (N, T, d)), f"OWs{k}")
        return self._name(ir.ew(ARG[0] + ARG[1], [out, bo]), f"Att{k}")

    def transformer_block(self, h: Node, heads: int, mlp: int, causal: bool = False, mask: Node | None = None,
                          name: str | None = None) -> Node:
        """A pre-norm transformer block on ``h`` (n, T, d): ``h + attention(layernorm(h))``, then
        ``h + dense(dense(layernorm(h), mlp, gelu), d)``."""
        check_sequence(h, "transformer block")
        mlp = _positive(mlp, "transformer block mlp")
        d = int(h.shape[2])
        sub = (lambda part: f"{name}{part}") if name else (lambda part: None)
        a = self.attention(self.layernorm(h, name=sub("n1")), heads, causal, mask, name=sub("a"))
        h = self._name(ir.ew(ARG[0] + ARG[1], [h, a]), f"R{self._layers}")
        m = self.dense(self.dense(self.layernorm(h, name=sub("n2")), mlp, "gelu", name=sub("m1")), d,
                       name=sub("m2"))
        return self._name(ir.ew(ARG[0] + ARG[1], [h, m]), f"R{self._layers}")
