"""The sequence layers of a spec's [network] (issue 13): ``embedding``, ``positional``,
``attention`` and ``transformer_block``, each read from its table by the same Network call
as the Python API (compiler/frontends/sequence.py). Every key is type-checked, and a key of
another layer type is refused naming the field."""
from __future__ import annotations

# layer type -> the keys it takes (besides type, name, from), and which are required
SEQUENCE_LAYERS = {
    "embedding": (("vocab", "dim"), ("vocab", "dim")),
    "positional": (("length",), ()),
    "attention": (("heads", "causal", "mask"), ("heads",)),
    "transformer_block": (("heads", "mlp", "causal", "mask"), ("heads", "mlp")),
}
SEQUENCE_LAYER_KEYS = ("vocab", "dim", "length", "heads", "mlp", "causal", "mask")
# keys of the other layer types, which no sequence layer takes
OTHER_KEYS = ("units", "activation", "constants")

_WHAT = {"vocab": "the number of distinct token ids", "dim": "the width of each embedding row",
         "heads": "the number of attention heads", "mlp": "the hidden width of the block's MLP"}


def sequence_layer(loader, net, h, layer, kind, where, name, scope):
    """Build one sequence layer of ``kind`` on ``h`` from its spec table ``layer``."""
    allowed, required = SEQUENCE_LAYERS[kind]
    article = "an" if kind[0] in "aeiou" else "a"
    for key in (*SEQUENCE_LAYER_KEYS, *OTHER_KEYS):
        if key in layer and key not in allowed:
            raise loader.error(f"{where}.{key}", f"{article} {kind} layer has no {key!r}"
                               + (f" (it takes {', '.join(allowed)})" if allowed else ""))
    for key in required:
        if key not in layer:
            raise loader.error(f"{where}.{key}", f"missing ({_WHAT[key]})")
    ints = {k: loader.integer(layer[k], f"{where}.{k}") for k in ("vocab", "dim", "length", "heads", "mlp")
            if k in layer}
    if kind == "embedding":
        return loader.wrap(where, net.embedding, h, ints["vocab"], ints["dim"], name=name)
    if kind == "positional":
        return loader.wrap(where, net.positional, h, ints.get("length"), name=name)
    causal = layer.get("causal", False)
    if not isinstance(causal, bool):
        raise loader.error(f"{where}.causal", f"must be true or false, not {causal!r}")
    mask = None
    if "mask" in layer:
        m = loader.string(layer["mask"], f"{where}.mask")
        if m not in scope or scope[m].op != "input":
            raise loader.error(f"{where}.mask", f"unknown input {m!r}; the padding mask is an input "
                               "(n, T) of 1 (keep) and 0 (padding), e.g. input = [..., {name = \"m\", size = T}]")
        mask = scope[m]
    if kind == "attention":
        return loader.wrap(where, net.attention, h, ints["heads"], causal, mask, name=name)
    return loader.wrap(where, net.transformer_block, h, ints["heads"], ints["mlp"], causal, mask, name=name)
