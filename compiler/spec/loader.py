"""Model spec files (TOML or JSON) -> Model, through the same builders as the Python API.

The format is documented in ``docs/spec.md``. Spec files are untrusted: nothing in them is
evaluated as Python. Expressions go through ``safe_expr`` (an AST whitelist); every name that
reaches generated code goes through ``model.check_name``; every field is type-checked, and an
unknown field is an error (a typo must not be silently ignored).

Every error is a ``SpecError`` whose message starts with the file and the field, e.g.
``examples/net.toml: network.layers[1].activation, column 7: unknown function 'foo'``.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from compiler import dtypes
from compiler.errors import BpcError, ModelError
from compiler.spec.sequence_layers import SEQUENCE_LAYERS, SEQUENCE_LAYER_KEYS, sequence_layer

MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_WIDTH = 1 << 20          # of one layer, input or target (beyond it init_params cannot allocate)
MAX_LAYERS = 256
SOURCE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")

# image layers (compiler/frontends/image.py): their types and the keys each one allows
IMAGE_LAYERS = {"conv2d": ("filters", "kernel", "stride", "padding", "activation"),
                "maxpool2d": ("pool", "stride"), "avgpool2d": ("pool", "stride"), "flatten": ()}
IMAGE_LAYER_KEYS = ("filters", "kernel", "stride", "padding", "pool")
MAX_IMAGE_RANK = 3

TOP_KEYS = ("model", "constants", "network", "expression", "matrix", "train")
MODEL_KEYS = ("name", "description", "dtype")
NETWORK_KEYS = ("input", "target", "layers", "loss", "losses", "loss_mask")
LOSS_KEYS = ("output", "target", "loss", "weight")
INPUT_KEYS = ("name", "size", "shape", "kind", "length")
TARGET_KEYS = ("name", "size", "kind", "length")
LAYER_KEYS = ("type", "units", "activation", "name", "constants", "eps", "momentum", "rate",
              "from") + IMAGE_LAYER_KEYS + SEQUENCE_LAYER_KEYS
NORM_LAYERS = ("layernorm", "rmsnorm", "batchnorm")   # Network methods of the same names
LAYER_OPTIONS = {"eps": NORM_LAYERS, "momentum": ("batchnorm",), "rate": ("dropout",),   # the layer types that take each key
                 **{key: tuple(k for k, keys in IMAGE_LAYERS.items() if key in keys) for key in IMAGE_LAYER_KEYS},
                 **{key: tuple(k for k, (keys, _) in SEQUENCE_LAYERS.items() if key in keys)
                    for key in SEQUENCE_LAYER_KEYS}}
MERGE_LAYERS = ("add", "concat", "multiply")     # Network methods of the same names
EXPRESSION_KEYS = ("prediction", "params", "inputs", "targets", "loss", "prediction_symbol")
MATRIX_KEYS = ("inputs", "targets", "params", "scalars", "init", "activations", "output", "loss",
               "target_kind", "prediction_symbol")
MAX_PARAM_NUMBERS = 1 << 26   # of one matrix parameter (beyond it init_params cannot allocate)
MATRIX_INITS = ("glorot", "he", "zeros")


class SpecError(ModelError):
    """A spec file that cannot be turned into a model; the message names file and field."""


@dataclass(frozen=True)
class Spec:
    """A loaded spec: the model plus the file-level options the Model does not carry."""

    path: str                     # as given by the caller, used in messages
    model: object                 # compiler.core.model.Model
    kind: str                     # "network" | "expression" | "matrix"
    dtype: object = None          # None | "float32" | "float64"
    train: dict = field(default_factory=dict)   # the [train] table, checked: option -> value


def load_spec(path: str | os.PathLike, source: str | None = None) -> Spec:
    """Read a spec file (``.toml`` or ``.json``) and build its model.

    ``source`` is the name the generated header gives the file (``Source: ...``); by default
    the path as given, relative to the working directory when the file lies under it, else
    the file name (see ``source_name``)."""
    label = _printable(str(path))
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise SpecError(f"{label}: unknown spec file type {p.suffix or '(none)'!r}; use .toml or .json")
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise SpecError(f"{label}: not a regular file")
        if size > MAX_FILE_BYTES:
            raise SpecError(f"{label}: file is {size} bytes; a spec may be at most {MAX_FILE_BYTES}")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{label}: no such file") from None
    except OSError as e:
        raise SpecError(f"{label}: cannot read: {e.strerror or e}") from None
    if source is None:
        source = source_name(p)
    elif not isinstance(source, str) or not SOURCE_RE.match(source):
        raise SpecError(f"{label}: source name {_printable(str(source))!r} is not allowed (it is written into "
                        "the generated code): use letters, digits, '_', '-', '.' and '/' between parts")
    return loads_spec(raw, label, suffix[1:], source=source)


def loads_spec(data: str | bytes, filename: str = "<spec>", fmt: str = "toml",
               source: str | None = None) -> Spec:
    """Build a Spec from text or bytes in format ``fmt`` ("toml" or "json")."""
    text = _decode(data, filename)
    tree = _parse(text, filename, fmt)
    loader = _Loader(filename, tree)
    spec = loader.load()
    if source is None:
        source = Path(filename).name
        if not SOURCE_RE.match(source):
            raise SpecError(f"{_printable(filename)}: the file name is not allowed (it is written into the "
                            "generated code): use letters, digits, '_', '-' and '.'")
    model = replace(spec.model, source=source, source_text=text)
    return replace(spec, model=model)


def source_name(path, cwd=None):
    """The name the generated header gives a spec file: independent of where bpc is installed.

    The path relative to the working directory (``cwd``, default the current one), with '/'
    separators, when the file lies under it (``bpc compile examples/m.toml`` from the
    repository root writes ``Source: examples/m.toml``); else the file name. It is printed
    into the generated module's docstring, so it must be plain: a file name holding three
    double quotes would otherwise close the docstring and run code."""
    path = Path(path)
    rel = _relative_to_cwd(path, Path(cwd) if cwd is not None else None)
    if rel is not None and SOURCE_RE.match(rel):
        return rel
    if not SOURCE_RE.match(path.name):
        raise SpecError(f"{_printable(str(path))}: the file name {_printable(path.name)!r} is not allowed "
                        "(it is written into the generated code): use letters, digits, '_', '-' and '.'")
    return path.name


def _relative_to_cwd(path, cwd):
    """``path`` relative to ``cwd`` as a posix string, or None when it lies outside it. Lexical
    first (a symlinked spec keeps the name it was given), then with both sides resolved (a
    working directory reached through a symlink)."""
    try:
        base = Path(os.path.abspath(cwd if cwd is not None else os.getcwd()))
        full = Path(os.path.abspath(base / path))
        for a, b in ((full, base), (full.parent.resolve() / full.name, base.resolve())):
            try:
                rel = a.relative_to(b)
            except ValueError:
                continue
            return rel.as_posix() if rel.parts else None
    except (OSError, RuntimeError):   # RuntimeError: a symlink loop
        pass
    return None


def _printable(text, limit=200):
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_description(text, where, filename):
    """The description is written into generated files: the same check as for the Python API."""
    from compiler.freetext import check_text
    try:
        return check_text(text, where)
    except ModelError as e:
        raise SpecError(f"{filename}: {e}") from None


def _decode(data, filename):
    if isinstance(data, str):
        text = data
    else:
        if b"\0" in data:
            raise SpecError(f"{filename}: this is a binary file, not a TOML or JSON spec")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"{filename}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\0" in text:
        raise SpecError(f"{filename}: this is a binary file, not a TOML or JSON spec")
    return text


def _parse(text, filename, fmt):
    if not text.strip():
        raise SpecError(f"{filename}: the file is empty; a spec needs a [model] table and a [network] "
                        "or [expression] table (see docs/spec.md)")
    try:
        if fmt == "toml":
            import tomllib
            try:
                tree = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise SpecError(f"{filename}: not valid TOML: {e}") from None
            except ValueError as e:   # int() of a literal beyond Python's 4300-digit limit
                raise SpecError(f"{filename}: not valid TOML: {_value_error(e)}") from None
        elif fmt == "json":
            try:
                tree = json.loads(text, parse_constant=_json_constant, object_pairs_hook=_json_object)
            except json.JSONDecodeError as e:
                raise SpecError(f"{filename}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
            except ValueError as e:
                raise SpecError(f"{filename}: not valid JSON: {_value_error(e)}") from None
        else:
            raise SpecError(f"{filename}: unknown spec format {fmt!r}; use toml or json")
    except RecursionError:
        raise SpecError(f"{filename}: the file is nested too deeply") from None
    if not isinstance(tree, dict):
        raise SpecError(f"{filename}: the top level must be a table (object), not {_type(tree)}")
    return tree


def _value_error(e):
    text = str(e)
    return "a number has too many digits" if "integer string conversion" in text else text


def _json_constant(name):
    raise ValueError(f"{name} is not a number a spec may use")


def _json_object(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def _type(v):
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


class _Loader:
    def __init__(self, filename, tree):
        self.file = filename
        self.tree = tree

    # -- errors -----------------------------------------------------------------------------
    def error(self, where, message):
        return SpecError(f"{self.file}: {where}: {message}")

    def expr_error(self, where, text, e):
        if e.column is None:
            return self.error(where, e.message)
        return SpecError(f"{self.file}: {where}, column {e.column}: {e.message}\n{_excerpt(text, e.column)}")

    def wrap(self, where, fn, *args, **kwargs):
        """Call a builder; its ModelError/ShapeError gets the file and field in front."""
        try:
            return fn(*args, **kwargs)
        except SpecError:
            raise
        except BpcError as e:
            raise self.error(where, str(e)) from None

    # -- typed access ------------------------------------------------------------------------
    def table(self, value, where, keys):
        if not isinstance(value, dict):
            raise self.error(where, f"must be a table, not {_type(value)}")
        for k in value:
            if k not in keys:
                hint = difflib.get_close_matches(str(k), keys, n=1)
                also = f"; did you mean {hint[0]!r}?" if hint else f"; allowed: {', '.join(keys)}"
                raise self.error(f"{where}.{k}" if where else str(k), f"unknown field{also}")
        return value

    def string(self, value, where):
        if not isinstance(value, str):
            raise self.error(where, f"must be a string, not {_type(value)}")
        return value

    def name(self, value, where, what):
        from compiler.core.model import check_name
        from compiler.spec.safe_expr import reserved_names
        self.string(value, where)
        try:
            check_name(value, what)
        except ModelError as e:
            raise self.error(where, str(e)) from None
        if value in reserved_names():
            raise self.error(where, f"{what} name {value!r} is a built-in function or constant of "
                                    "expressions; choose another")
        return value

    def integer(self, value, where, lo=1, hi=MAX_WIDTH):
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(where, f"must be a positive integer, not {_type(value)} {_short(value)}")
        if not lo <= value <= hi:
            raise self.error(where, f"must be an integer from {lo} to {hi}, got {value}")
        return value

    def number(self, value, where, constants):
        """A finite real: a TOML/JSON number, or a string with a constant expression."""
        import sympy as sp
        from compiler.spec.safe_expr import ExprError, parse_constant
        if isinstance(value, bool):
            raise self.error(where, "must be a number, not a boolean")
        if isinstance(value, int):
            if abs(value) > 2**1023:
                raise self.error(where, "number is too large for float64")
            return sp.Integer(value)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise self.error(where, f"must be a finite number, got {value}")
            return sp.Float(value)
        if isinstance(value, str):
            try:
                return parse_constant(value, constants)
            except ExprError as e:
                raise self.expr_error(where, value, e) from None
        raise self.error(where, f"must be a number or a constant expression string, not {_type(value)}")

    def expression(self, text, where, symbols, constants):
        from compiler.spec.safe_expr import ExprError, parse
        self.string(text, where)
        try:
            return parse(text, symbols, constants)
        except ExprError as e:
            raise self.expr_error(where, text, e) from None

    def constants(self, value, where, inherited, taken):
        """Named constants (in order; each may use the ones before it)."""
        out = dict(inherited)
        if value is None:
            return out
        if not isinstance(value, dict):
            raise self.error(where, f"must be a table of name = number, not {_type(value)}")
        for k, v in value.items():
            self.name(k, f"{where}.{k}", "constant")
            if k in taken:
                raise self.error(f"{where}.{k}", f"constant {k!r} clashes with the symbol {k!r} of this "
                                                 "model; rename the constant")
            out[k] = self.number(v, f"{where}.{k}", out)
        return out

    # -- the spec ----------------------------------------------------------------------------
    def load(self):
        tree = self.table(self.tree, "", TOP_KEYS)
        model_t = self.table(tree.get("model", {}), "model", MODEL_KEYS)
        stem = Path(self.file).stem
        if "name" in model_t:
            name = self.name(model_t["name"], "model.name", "model")
        else:
            try:
                from compiler.core.model import check_name
                name = check_name(stem, "model")
            except ModelError:
                raise self.error("model.name", f"missing, and the file name {stem!r} is not a valid model "
                                               "name (a letter, then letters, digits or _); set model.name") from None
        description = _check_description(self.string(model_t.get("description", ""), "model.description"),
                                         "model.description", self.file)
        dtype = model_t.get("dtype")
        if dtype is not None and dtype not in dtypes.NAMES:
            raise self.error("model.dtype", f"must be one of {', '.join(dtypes.NAMES)}, not {_short(dtype)}")
        train = self.train_table(tree.get("train", {}))
        kinds = [k for k in ("network", "expression", "matrix") if k in tree]
        if len(kinds) != 1:
            raise self.error("(top level)", "a spec needs exactly one of the tables [network], [expression] "
                             "and [matrix]" + (f", not {' and '.join(f'[{k}]' for k in kinds)}" if kinds else ""))
        kind = kinds[0]
        build = {"network": self.network, "expression": self.expression_model, "matrix": self.matrix_model}[kind]
        model = build(tree[kind], name, tree.get("constants"))
        if description:
            model = replace(model, description=description)
        return Spec(self.file, model, kind, dtype, train)

    def train_table(self, value):
        """The [train] table, checked like `bpc train` checks its options (one table of options,
        compiler/spec/train_options.py), so every command refuses a bad one, not only `bpc train`."""
        from compiler.spec.train_options import check_spec_table
        if not isinstance(value, dict):
            raise SpecError(f"{self.file}: [train]: must be a table, not {_type(value)}")
        return check_spec_table(value, lambda key, message: SpecError(
            f"{self.file}: [train] {_printable(str(key), 60)}: {message}"))

    def network(self, net_t, name, constants_t):
        from compiler.frontends.nn import Network
        net_t = self.table(net_t, "network", NETWORK_KEYS)
        for key in ("input", "target", "layers"):
            if key not in net_t:
                raise self.error(f"network.{key}", "missing")
        inputs = self.network_inputs(net_t["input"])
        targets = self.network_targets(net_t["target"], inputs)
        # in activation and loss expressions, x (and p, y) are the variables, not constants
        constants = self.constants(constants_t, "constants", {}, {"x", "p", "y"})

        layers = net_t["layers"]
        if not isinstance(layers, list):
            raise self.error("network.layers", f"must be an array of tables, not {_type(layers)}")
        if not layers:
            raise self.error("network.layers", "is empty; give at least one layer")
        if len(layers) > MAX_LAYERS:
            raise self.error("network.layers", f"has {len(layers)} layers; the limit is {MAX_LAYERS}")

        net = self.wrap("model.name", Network, name)
        # the values a layer's `from` may name: the inputs, then each named layer once built
        scope = {x_name: self.wrap(f"network.input{where}", net.input, x_name, x_size, shape=x_shape, **ids)
                 for where, x_name, x_size, x_shape, ids in inputs}
        later = {lay.get("name"): i for i, lay in enumerate(layers)
                 if isinstance(lay, dict) and isinstance(lay.get("name"), str)}
        h = None
        names = set()
        for i, layer in enumerate(layers):
            where = f"network.layers[{i}]"
            layer = self.table(layer, where, LAYER_KEYS)
            kind = self.string(layer.get("type", "dense"), f"{where}.type")
            if kind not in ("dense", "activation", *NORM_LAYERS, "dropout", *MERGE_LAYERS, *IMAGE_LAYERS,
                            *SEQUENCE_LAYERS):
                raise self.error(f"{where}.type", "must be one of 'dense', 'activation', "
                                 f"{', '.join(map(repr, NORM_LAYERS))}, 'dropout', "
                                 f"{', '.join(map(repr, MERGE_LAYERS))}, "
                                 f"{', '.join(map(repr, IMAGE_LAYERS))}, "
                                 f"{', '.join(map(repr, SEQUENCE_LAYERS))}; not {kind!r}")
            for key, kinds in LAYER_OPTIONS.items():
                if key in layer and kind not in kinds:
                    raise self.error(f"{where}.{key}", f"only {_listing(kinds)} layers take {key}, "
                                     f"not a {kind} layer")
            lconst = self.constants(layer.get("constants"), f"{where}.constants", constants, {"x"})
            act = self.activation(layer.get("activation", "identity"), f"{where}.activation", lconst)
            lname = None
            if "name" in layer:
                lname = self.name(layer["name"], f"{where}.name", "layer")
                if lname in names:
                    raise self.error(f"{where}.name", f"layer name {lname!r} is used twice")
                if lname in scope or any(lname == t[1] for t in targets):
                    raise self.error(f"{where}.name", f"{lname!r} is already the name of an input or target")
                names.add(lname)
            srcs = self.layer_sources(layer, where, i, h, scope, later)
            if kind in MERGE_LAYERS:
                if len(srcs) < 2:
                    raise self.error(f"{where}.from", f"a {kind} layer merges at least two layers or inputs; "
                                     "list them, e.g. from = [\"h1\", \"x\"]")
                if "units" in layer:
                    raise self.error(f"{where}.units", f"a {kind} layer has no units of its own; remove units")
                h = self.wrap(where, getattr(net, kind), *srcs, name=lname)
                if "activation" in layer:
                    h = self.wrap(where, net.activation, h, act)
            else:
                if len(srcs) != 1:
                    raise self.error(f"{where}.from", f"a {kind} layer takes one value, got {len(srcs)}; "
                                     "merge them first with an 'add' or 'concat' layer")
                (h,) = srcs
                if kind in NORM_LAYERS:
                    h = self.norm_layer(net, h, layer, where, kind, lname)
                elif kind == "dropout":
                    h = self.dropout_layer(net, h, layer, where, lname)
                elif kind in IMAGE_LAYERS:
                    h = self.image_layer(net, h, layer, kind, where, act, lname)
                elif kind in SEQUENCE_LAYERS:
                    h = sequence_layer(self, net, h, layer, kind, where, lname, scope)
                elif kind == "dense":
                    if "units" not in layer:
                        raise self.error(f"{where}.units", "missing (the layer's width)")
                    units = self.integer(layer["units"], f"{where}.units")
                    h = self.wrap(where, net.dense, h, units, act, name=lname)
                else:
                    if "units" in layer:
                        raise self.error(f"{where}.units", "an activation layer keeps its input's width; remove units")
                    if "activation" not in layer:
                        raise self.error(f"{where}.activation", "missing")
                    h = self.wrap(where, net.activation, h, act, name=lname)
            if lname is not None:
                scope[lname] = h

        tg = {t_name: self.wrap(f"network.target{twhere}", net.target, t_name, t_size, t_kind, length=t_length)
              for twhere, t_name, t_size, t_kind, t_length in targets}
        loss_mask = None
        if "loss_mask" in net_t:
            m = self.string(net_t["loss_mask"], "network.loss_mask")
            if m not in scope or scope[m].op != "input":
                raise self.error("network.loss_mask", f"unknown input {_short(m)}; the loss mask is an input "
                                 "(n, T) of weights per position (1 keep, 0 padding)")
            if "losses" in net_t:
                raise self.error("network.loss_mask", "weighs network.loss; with [[network.losses]] give none")
            loss_mask = scope[m]
        if "losses" not in net_t:
            if len(tg) != 1:
                raise self.error("network.target", f"the network has {len(tg)} targets; give one "
                                 "[[network.losses]] entry (output, target, loss, weight) for each")
            loss = self.loss(net_t.get("loss", "mse"), "network.loss", constants)
            return self.wrap("network.loss", net.build, h, loss, next(iter(tg.values())), loss_mask=loss_mask)
        if "loss" in net_t:
            raise self.error("network.loss", "give either network.loss or [[network.losses]], not both")
        entries = self.network_losses(net_t["losses"], h, scope, tg, constants)
        return self.wrap("network.losses", net.build, losses=entries)

    def network_inputs(self, value):
        """[(where suffix, name, size, shape, ids)] of ``network.input``: one table or an array of
        tables; ids: the keywords (kind, length) of an input of token ids, else {}."""
        many = isinstance(value, list)
        if many and not value:
            raise self.error("network.input", "is empty; declare at least one input")
        out = []
        for k, in_t in enumerate(value if many else [value]):
            sub = f"[{k}]" if many else ""
            in_t = self.table(in_t, f"network.input{sub}", INPUT_KEYS)
            if many and "name" not in in_t:
                raise self.error(f"network.input{sub}.name", "missing (several inputs need names)")
            x_name = self.name(in_t.get("name", "x"), f"network.input{sub}.name", "input")
            x_kind = self.string(in_t.get("kind", "real"), f"network.input{sub}.kind")
            ids = {}
            if x_kind == "ids":
                for key in ("size", "shape"):
                    if key in in_t:
                        raise self.error(f"network.input{sub}.{key}", "an input of token ids has a length "
                                         f"(ids per sample), not a {key}; remove {key}")
                if "length" not in in_t:
                    raise self.error(f"network.input{sub}.length", "missing (the number of token ids per sample)")
                x_size = x_shape = None
                ids = {"kind": "ids", "length": self.integer(in_t["length"], f"network.input{sub}.length")}
            elif x_kind != "real":
                raise self.error(f"network.input{sub}.kind", f"must be 'real' or 'ids', not {_short(x_kind)}")
            elif "length" in in_t:
                raise self.error(f"network.input{sub}.length", "only an input of token ids (kind = 'ids') "
                                 "has a length; give size")
            else:
                x_size, x_shape = self.input_size(in_t, f"network.input{sub}")
            if any(x_name == o[1] for o in out):
                raise self.error(f"network.input{sub}.name", f"input {x_name!r} is declared twice")
            out.append((sub, x_name, x_size, x_shape, ids))
        return out

    def network_targets(self, value, inputs):
        """[(where suffix, name, size, kind, length)] of ``network.target``: one table or an array of
        tables (length: labels of a sequence, one per position)."""
        from compiler.core.model import check_target_kind
        many = isinstance(value, list)
        if many and not value:
            raise self.error("network.target", "is empty; declare at least one target")
        out = []
        for k, tg_t in enumerate(value if many else [value]):
            sub = f"[{k}]" if many else ""
            where = f"network.target{sub}"
            tg_t = self.table(tg_t, where, TARGET_KEYS)
            if many and "name" not in tg_t:
                raise self.error(f"{where}.name", "missing (several targets need names)")
            y_name = self.name(tg_t.get("name", "y"), f"{where}.name", "target")
            y_kind = self.string(tg_t.get("kind", "real"), f"{where}.kind")
            self.wrap(f"{where}.kind", check_target_kind, y_kind)
            y_length = None
            if "length" in tg_t:
                if y_kind != "label":
                    raise self.error(f"{where}.length", "only labels of a sequence (kind = 'label') have a "
                                     "length; a real target takes size")
                y_length = self.integer(tg_t["length"], f"{where}.length")
            if y_kind == "label":
                if "size" in tg_t:
                    raise self.error(f"{where}.size", "integer labels are one class index per sample (or per "
                                     "position, with length); give no size (the number of classes is the "
                                     "last layer's width)")
                y_size = None
            else:
                if "size" not in tg_t:
                    raise self.error(f"{where}.size", "missing (the number of target values per sample)")
                y_size = self.integer(tg_t["size"], f"{where}.size")
            if any(y_name == x[1] for x in inputs):
                raise self.error(f"{where}.name", f"{y_name!r} is already the input's name")
            if any(y_name == o[1] for o in out):
                raise self.error(f"{where}.name", f"target {y_name!r} is declared twice")
            out.append((sub, y_name, y_size, y_kind, y_length))
        return out

    def layer_sources(self, layer, where, i, previous, scope, later):
        """The values a layer takes: its ``from`` (a name or an array of names of inputs and
        earlier named layers), by default the previous layer (the only input, for the first)."""
        if "from" not in layer:
            if previous is not None:
                return [previous]
            if len(scope) != 1:
                raise self.error(f"{where}.from", f"missing: the network has {len(scope)} inputs "
                                 f"({', '.join(scope)}); name the one(s) this layer takes")
            return list(scope.values())
        value = layer["from"]
        names = value if isinstance(value, list) else [value]
        if not names:
            raise self.error(f"{where}.from", "is empty; name at least one input or earlier layer")
        out = []
        for k, v in enumerate(names):
            at = f"{where}.from" + (f"[{k}]" if isinstance(value, list) else "")
            self.string(v, at)
            if v in scope:
                out.append(scope[v])
            elif v in later:
                what = "itself" if later[v] == i else f"network.layers[{later[v]}], which comes later"
                raise self.error(at, f"{v!r} is {what}; a layer takes only inputs and earlier layers "
                                 "(a network has no cycles)")
            else:
                raise self.error(at, f"unknown layer or input {_short(v)}; known so far: "
                                 f"{', '.join(scope) or 'none'} (a layer needs a name to be used in from)")
        return out

    def network_losses(self, value, last, scope, targets, constants):
        """``[[network.losses]]``: (output, loss, target, weight) entries for ``Network.build``."""
        if not isinstance(value, list) or not value:
            raise self.error("network.losses", "must be a non-empty array of tables "
                             "([[network.losses]] with output, target, loss, weight)")
        entries, used = [], set()
        for k, loss_t in enumerate(value):
            where = f"network.losses[{k}]"
            loss_t = self.table(loss_t, where, LOSS_KEYS)
            out = last
            if "output" in loss_t:
                o = self.string(loss_t["output"], f"{where}.output")
                if o not in scope:
                    raise self.error(f"{where}.output", f"unknown layer {_short(o)}; named layers and inputs: "
                                     f"{', '.join(scope)}")
                out = scope[o]
            if "target" in loss_t:
                t = self.string(loss_t["target"], f"{where}.target")
                if t not in targets:
                    raise self.error(f"{where}.target", f"unknown target {_short(t)}; targets: {', '.join(targets)}")
            elif len(targets) == 1:
                t = next(iter(targets))
            else:
                raise self.error(f"{where}.target", f"missing (the network has targets {', '.join(targets)})")
            used.add(t)
            loss = self.loss(loss_t.get("loss", "mse"), f"{where}.loss", constants)
            weight = float(self.number(loss_t.get("weight", 1), f"{where}.weight", constants))
            if not weight > 0 or not math.isfinite(weight):
                raise self.error(f"{where}.weight", f"must be a positive number, got {weight}")
            try:
                from compiler.frontends.nn import apply_loss
                apply_loss(loss, out, targets[t], {})      # its shape error names this entry
            except BpcError as e:
                raise self.error(where, str(e)) from None
            entries.append((out, loss, targets[t], weight))
        unused = [t for t in targets if t not in used]
        if unused:
            raise self.error("network.losses", f"target(s) {', '.join(unused)} have no loss; add an entry for each")
        return entries

    def dropout_layer(self, net, h, layer, where, name):
        """A `dropout` layer: keeps the width; `rate` (required) from 0 up to, not including, 1."""
        for key in ("units", "activation", "constants"):
            if key in layer:
                raise self.error(f"{where}.{key}", f"a dropout layer takes only rate (and name); remove {key}")
        if "rate" not in layer:
            raise self.error(f"{where}.rate", "missing (the probability of dropping each value, e.g. 0.5)")
        rate = self.number(layer["rate"], f"{where}.rate", {})
        if not 0 <= rate < 1:
            raise self.error(f"{where}.rate", f"must be from 0 up to (not including) 1, got {layer['rate']!r}")
        return self.wrap(where, net.dropout, h, float(rate), name=name)

    def norm_layer(self, net, h, layer, where, kind, name):
        """A `layernorm`, `rmsnorm` or `batchnorm` layer: keeps the width; `eps`, and for
        batchnorm `momentum` (of its running statistics, above 0 and at most 1)."""
        for key, why in (("units", "keeps its input's width"), ("activation", "has no activation "
                         "(add an activation layer after it)"), ("constants", "has no expression")):
            if key in layer:
                raise self.error(f"{where}.{key}", f"a {kind} layer {why}; remove {key}")
        eps = 1e-5
        if "eps" in layer:
            eps = self.number(layer["eps"], f"{where}.eps", {})
            if not eps > 0:
                raise self.error(f"{where}.eps", f"must be a positive number, got {layer['eps']!r}")
        options = {}
        if "momentum" in layer:
            momentum = self.number(layer["momentum"], f"{where}.momentum", {})
            if not 0 < momentum <= 1:
                raise self.error(f"{where}.momentum", f"must be above 0 and at most 1, got {layer['momentum']!r}")
            options["momentum"] = float(momentum)
        return self.wrap(where, getattr(net, kind), h, float(eps), name=name, **options)

    def input_size(self, in_t, where):
        """(size, shape) of an input table: ``size = k`` features, or ``shape = [H, W, C]``."""
        if "shape" in in_t:
            if "size" in in_t:
                raise self.error(f"{where}.shape", "give size or shape, not both")
            shape = in_t["shape"]
            if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_IMAGE_RANK:
                raise self.error(f"{where}.shape", f"must be an array of 1 to {MAX_IMAGE_RANK} positive "
                                 f"integers (e.g. [8, 8, 1]: height, width, channels), not {_short(shape)}")
            shape = [self.integer(d, f"{where}.shape[{i}]") for i, d in enumerate(shape)]
            if math.prod(shape) > MAX_WIDTH:
                raise self.error(f"{where}.shape", f"has {math.prod(shape)} numbers per sample; the limit is {MAX_WIDTH}")
            return None, tuple(shape)
        if "size" not in in_t:
            raise self.error(f"{where}.size", "missing (the number of features per sample, or give "
                             "shape = [height, width, channels])")
        return self.integer(in_t["size"], f"{where}.size"), None

    def image_layer(self, net, h, layer, kind, where, act, lname):
        """An image layer of a [network] (conv2d, maxpool2d, avgpool2d, flatten)."""
        allowed = IMAGE_LAYERS[kind]
        for key in (*IMAGE_LAYER_KEYS, "units", "activation", "constants"):
            if key in layer and key not in allowed and not (key == "constants" and "activation" in allowed):
                article = "an" if kind[0] in "aeiou" else "a"
                raise self.error(f"{where}.{key}", f"{article} {kind} layer has no {key!r}"
                                 + (f" (it takes {', '.join(allowed)})" if allowed else ""))

        def size(key, default=None):
            if key not in layer:
                if default is None:
                    raise self.error(f"{where}.{key}", "missing")
                return default
            v = layer[key]
            if isinstance(v, list):
                if len(v) != 2:
                    raise self.error(f"{where}.{key}", f"must be an integer or [rows, columns], not {_short(v)}")
                return tuple(self.integer(d, f"{where}.{key}[{i}]", hi=1 << 16) for i, d in enumerate(v))
            return self.integer(v, f"{where}.{key}", hi=1 << 16)

        if kind == "conv2d":
            filters = self.integer(layer.get("filters"), f"{where}.filters") if "filters" in layer else None
            if filters is None:
                raise self.error(f"{where}.filters", "missing (the number of output channels)")
            padding = self.string(layer.get("padding", "valid"), f"{where}.padding")
            if padding not in ("valid", "same"):
                raise self.error(f"{where}.padding", f"must be 'valid' or 'same', not {_short(padding)}")
            return self.wrap(where, net.conv2d, h, filters, size("kernel"), size("stride", 1), padding, act,
                             name=lname)
        if kind == "flatten":
            return self.wrap(where, net.flatten, h, name=lname)
        pool = size("pool")
        stride = size("stride", pool)
        method = net.maxpool2d if kind == "maxpool2d" else net.avgpool2d
        return self.wrap(where, method, h, pool, stride, name=lname)

    def activation(self, value, where, constants):
        import sympy as sp
        from compiler.core.functions import ACTIVATIONS
        from compiler.core.model import NAME_RE
        self.string(value, where)
        if value in ACTIVATIONS:
            return value
        if NAME_RE.match(value) and value != "x" and value not in constants:
            hint = difflib.get_close_matches(value, ACTIVATIONS, n=1)
            also = f"did you mean {hint[0]!r}? " if hint else ""
            raise self.error(where, f"unknown activation {value!r}; {also}built-ins are "
                             f"{', '.join(sorted(ACTIVATIONS))}, or write an expression of x")
        x = sp.Symbol("x", real=True)
        return self.expression(value, where, {"x": x}, constants)

    def loss(self, value, where, constants):
        import sympy as sp
        from compiler.core.model import NAME_RE
        from compiler.frontends.nn import LOSSES, LOSS_ALIASES
        self.string(value, where)
        if value in LOSSES or value in LOSS_ALIASES:
            return value
        if NAME_RE.match(value) and value not in ("p", "y") and value not in constants:
            known = sorted((*LOSSES, *LOSS_ALIASES))
            hint = difflib.get_close_matches(value, known, n=1)
            also = f"did you mean {hint[0]!r}? " if hint else ""
            raise self.error(where, f"unknown loss {value!r}; {also}built-ins are {', '.join(LOSSES)}, "
                             "or write an expression of p (prediction) and y (target)")
        syms = {s: sp.Symbol(s, real=True) for s in ("p", "y")}
        return self.expression(value, where, syms, constants)

    def expression_model(self, ex_t, name, constants_t):
        import sympy as sp
        from compiler.frontends.expression import expression_model
        ex_t = self.table(ex_t, "expression", EXPRESSION_KEYS)
        for key in ("prediction", "params", "inputs"):
            if key not in ex_t:
                raise self.error(f"expression.{key}", "missing")
        declared = {}   # name -> field that declares it

        def declare(n, where, what):
            self.name(n, where, what)
            if n in declared:
                raise self.error(where, f"{n!r} is already declared in {declared[n]}")
            declared[n] = where
            return sp.Symbol(n, real=True)

        def name_list(value, where, what):
            if not isinstance(value, list):
                raise self.error(where, f"must be an array of names, not {_type(value)}")
            return [declare(v, f"{where}[{i}]", what) for i, v in enumerate(value)]

        params_t = ex_t["params"]
        if not isinstance(params_t, dict):
            raise self.error("expression.params", f"must be a table of name = initial value, not {_type(params_t)}")
        if not params_t:
            raise self.error("expression.params", "is empty; declare at least one parameter to fit")
        psyms = [declare(k, f"expression.params.{k}", "parameter") for k in params_t]
        inputs = name_list(ex_t["inputs"], "expression.inputs", "input")
        if not inputs:
            raise self.error("expression.inputs", "is empty; declare at least one data symbol")
        targets = name_list(ex_t.get("targets", ["y"]), "expression.targets", "target")
        if not targets:
            raise self.error("expression.targets", "is empty; declare at least one target symbol")
        psym_name = self.string(ex_t.get("prediction_symbol", "p"), "expression.prediction_symbol")
        psym = declare(psym_name, "expression.prediction_symbol", "prediction symbol")

        constants = self.constants(constants_t, "constants", {}, set(declared))
        # stored as float, as the Python API stores it (("value", float(v)))
        inits = {s: float(self.number(v, f"expression.params.{s.name}", constants).evalf(30))
                 for s, v in zip(psyms, params_t.values())}
        pred = self.expression(ex_t["prediction"], "expression.prediction",
                               {s.name: s for s in (*psyms, *inputs)}, constants)
        loss = None
        if "loss" in ex_t:
            loss = self.expression(ex_t["loss"], "expression.loss",
                                   {s.name: s for s in (psym, *targets, *psyms)}, constants)
        elif len(targets) != 1:
            raise self.error("expression.loss", "missing: the default (p - y)**2 needs exactly one target")
        return self.wrap("expression", expression_model, pred, inits, inputs, targets=targets,
                         loss=loss, prediction_symbol=psym.name, name=name)


    def matrix_model(self, mt, name, constants_t):
        """The [matrix] table: a per-sample SymPy matrix network, built by from_matrix_expr."""
        import sympy as sp
        from compiler.core.functions import activation as resolve_activation
        from compiler.frontends.matrix import from_matrix_expr
        from compiler.core.model import NAME_RE, check_target_kind
        from compiler.frontends.nn import LOSS_ALIASES, LOSSES
        from compiler.spec.safe_matrix_expr import is_matrix, matrix_function_names, shape_text
        mt = self.table(mt, "matrix", MATRIX_KEYS)
        for key in ("inputs", "targets", "output"):
            if key not in mt:
                raise self.error(f"matrix.{key}", "missing")
        if "params" not in mt and "scalars" not in mt:
            raise self.error("matrix.params", "missing: declare at least one parameter (in params or scalars)")
        functions = matrix_function_names()
        declared = {}   # name -> field that declares it

        def declare(n, where, what):
            self.name(n, where, what)
            if n in functions:
                raise self.error(where, f"{what} name {n!r} is a function of matrix expressions "
                                        "(T, transpose, hadamard or a built-in activation); choose another")
            if n in declared:
                raise self.error(where, f"{n!r} is already declared in {declared[n]}")
            declared[n] = where
            return n

        def table_of(key, what):
            value = mt.get(key, {})
            if not isinstance(value, dict):
                raise self.error(f"matrix.{key}", f"must be a table of {what}, not {_type(value)}")
            return value

        def shapes(key, what, vector):
            out = {}
            for k, v in table_of(key, "name = [rows, columns]").items():
                where = f"matrix.{key}.{k}"
                declare(k, where, what)
                if not isinstance(v, list) or len(v) != 2:
                    raise self.error(where, f"must be a shape [rows, columns], not {_type(v)} {_short(v)}")
                r, c = self.integer(v[0], f"{where}[0]"), self.integer(v[1], f"{where}[1]")
                if vector and r != 1 and c != 1:
                    raise self.error(where, f"{'an' if what[0] in 'aeiou' else 'a'} {what} is one vector per "
                                            "sample: a column [k, 1] or a row "
                                            f"[1, k], not [{r}, {c}]")
                if r * c > MAX_PARAM_NUMBERS:
                    raise self.error(where, f"{r}x{c} is {r * c} numbers; the limit is {MAX_PARAM_NUMBERS}")
                out[k] = sp.MatrixSymbol(k, r, c)
            return out

        inputs = shapes("inputs", "input", True)
        if not inputs:
            raise self.error("matrix.inputs", "is empty; declare at least one input")
        targets = shapes("targets", "target", True)
        if not targets:
            raise self.error("matrix.targets", "is empty; declare at least one target")
        kind = self.string(mt.get("target_kind", "real"), "matrix.target_kind")
        self.wrap("matrix.target_kind", check_target_kind, kind)
        if kind == "label":
            (t, sym), *more = targets.items()
            if more:
                raise self.error("matrix.target_kind", "'label' needs exactly one target")
            if sym.shape != (1, 1):
                raise self.error(f"matrix.targets.{t}", "an integer label is one class index per sample: "
                                                        "give the shape [1, 1]")
        params = shapes("params", "parameter", False)
        scalars_t = table_of("scalars", "name = initial value")
        scalars = {k: sp.Symbol(declare(k, f"matrix.scalars.{k}", "parameter"), real=True) for k in scalars_t}
        if not params and not scalars:
            raise self.error("matrix.params", "is empty; declare at least one parameter (in params or scalars)")
        acts_t = table_of("activations", "name = activation")
        for k in acts_t:
            declare(k, f"matrix.activations.{k}", "activation")
        loss_t = self.string(mt.get("loss", "mse"), "matrix.loss")
        builtin_loss = loss_t in LOSSES or loss_t in LOSS_ALIASES
        psym = None
        if builtin_loss and "prediction_symbol" in mt:
            raise self.error("matrix.prediction_symbol", f"names the output in a loss expression; the built-in "
                                                         f"loss {loss_t!r} has none: remove it")
        if not builtin_loss:
            psym = self.string(mt.get("prediction_symbol", "p"), "matrix.prediction_symbol")
            if psym in declared and "prediction_symbol" not in mt:
                raise self.error("matrix.prediction_symbol", f"the loss names the output {psym!r} (the default "
                                 f"prediction symbol), but {psym!r} is already declared in {declared[psym]}; "
                                 "set prediction_symbol to another name")
            declare(psym, "matrix.prediction_symbol", "prediction symbol")

        constants = self.constants(constants_t, "constants", {}, set(declared))
        activations = {}
        for k, v in acts_t.items():
            where = f"matrix.activations.{k}"
            # resolved now, so that an unsupported function is refused naming the field
            activations[k], _ = self.wrap(where, resolve_activation, self.activation(v, where, constants))
        inits = {s.name: ("value", float(self.number(v, f"matrix.scalars.{s.name}", constants).evalf(30)))
                 for s, v in zip(scalars.values(), scalars_t.values())}
        for k, v in table_of("init", "name = initialisation").items():
            where = f"matrix.init.{k}"
            if k in scalars:
                raise self.error(where, f"{k!r} is a scalar; give its initial value in matrix.scalars")
            if k not in params:
                raise self.error(where, f"{k!r} is not a matrix parameter (declared: "
                                        f"{', '.join(params) or 'none'})")
            if v not in MATRIX_INITS:
                raise self.error(where, f"must be one of {', '.join(MATRIX_INITS)}, not {_short(v)}")
            r, c = (int(d) for d in params[k].shape)   # SymPy Integers would make the limits SymPy Floats
            inits[k] = {"glorot": ("glorot", c, r), "he": ("he", c), "zeros": ("zeros",)}[v]

        data = set(inputs.values()) | set(targets.values())
        output = self.matrix_expression(mt["output"], "matrix.output", {**inputs, **params, **scalars},
                                        constants, activations, data)
        if not is_matrix(output):
            raise self.error("matrix.output", "must be a matrix expression of the inputs; this one is a scalar")
        if not set(inputs.values()) & output.atoms(sp.MatrixSymbol):
            raise self.error("matrix.output", "does not depend on any input")
        if builtin_loss:
            if len(targets) != 1:
                raise self.error("matrix.loss", f"the built-in loss {loss_t!r} needs exactly one target, "
                                                f"got {len(targets)}")
            loss = loss_t
        else:
            if NAME_RE.match(loss_t) and loss_t not in declared and loss_t not in constants:
                known = sorted((*LOSSES, *LOSS_ALIASES))
                hint = difflib.get_close_matches(loss_t, known, n=1)
                also = f"did you mean {hint[0]!r}? " if hint else ""
                raise self.error("matrix.loss", f"unknown loss {loss_t!r}; {also}built-ins are {', '.join(LOSSES)}, "
                                 f"or write a 1x1 matrix expression of {psym} (the output) and the targets")
            loss = self.matrix_expression(loss_t, "matrix.loss", {psym: output, **targets, **params, **scalars},
                                          constants, activations, data)
            if not is_matrix(loss) or loss.shape != (1, 1):
                raise self.error("matrix.loss", f"must be a 1x1 matrix per sample (e.g. T({psym} - y)*({psym} - y)); "
                                                f"this one is {shape_text(loss)}")

        # a declared symbol that nothing uses is most likely a typo elsewhere
        used = set()
        for e in (output, loss):
            if isinstance(e, sp.Basic):
                used |= {a for a in e.atoms(sp.MatrixSymbol, sp.Symbol) if not isinstance(a, sp.Dummy)}
        for key, table in (("inputs", inputs), ("params", params), ("scalars", scalars),
                           *((("targets", targets),) if not builtin_loss else ())):
            for k, s in table.items():
                if s not in used:
                    raise self.error(f"matrix.{key}.{k}", f"{k!r} is declared but not used")
        return self.wrap("matrix", from_matrix_expr, output, inputs=list(inputs.values()),
                         targets=list(targets.values()), loss=loss,
                         params=[*params.values(), *scalars.values()], target_kind=kind, init=inits, name=name)

    def matrix_expression(self, text, where, symbols, constants, activations, data):
        from compiler.spec.safe_expr import ExprError
        from compiler.spec.safe_matrix_expr import parse_matrix
        self.string(text, where)
        try:
            return parse_matrix(text, symbols, constants, activations, data)
        except ExprError as e:
            raise self.expr_error(where, text, e) from None


def _short(value, limit=40):
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def _excerpt(text, column, width=60):
    """Two lines: the expression around ``column`` (made printable) and a caret under it."""
    i = column - 1
    start = max(0, i - width // 2)
    end = min(len(text), start + width)
    part = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text[start:end])
    prefix = "..." if start > 0 else ""
    suffix = "..." if end < len(text) else ""
    return f"    {prefix}{part}{suffix}\n    {' ' * (len(prefix) + i - start)}^"


def _listing(words):
    """'a', 'a and b', 'a, b and c'."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"
