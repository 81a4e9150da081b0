"""The C backend: a Program printed as standalone C99 (a .c and a .h), plus a Python wrapper
built with cffi (API mode) that offers the same interface as the generated NumPy modules.

C calling convention (documented again in the generated header):

* every array is flat, row-major, of the element type (``double`` or ``float``);
* ``params`` holds every parameter in PARAMS order, each row-major, at the offsets
  ``<P>_OFFSET_<name>``; ``grads`` has the same layout;
* data and targets are batch-first arrays of ``n`` samples; integer class labels are
  ``int64_t``;
* ``work`` is caller-provided scratch of ``<prefix>_work_size(n)`` elements (or NULL: the
  function then mallocs and frees it itself);
* functions return 0, or a negative ``<P>_ERR_*`` code (bad label, empty batch, no memory).

Each op's statement (C loops) is registered with the op (``compiler.core.ops``, key "c") and
gets the ``CStatements`` emitter, whose methods are the helpers op statements share; scalar
math comes from the C printer; the file structure comes from ``templates/c_model.{c,h}.j2`` and the wrapper
from ``templates/c_wrapper.py.j2``. Builds are cached under ``cache_dir()/c`` by a hash of
everything that can change the binary: among it the BLAS linked for the larger matrix products
(``compiler.backends.c.blas``: the scipy-openblas32 wheel when installed, else the portable
loops) and, when the compiler takes ``-march=native``, the CPU and instruction sets that flag
expands to on this machine (``_native``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.util
import io
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import sympy as sp

from compiler import __version__
from compiler.core import ir, ops
from compiler.core.formulas import Formulas
from compiler.core.ops.ew import factored, shared_subexpressions
from compiler.core.model import Model
from compiler.core.program import Program, direction_arg
from compiler.backends import cache as _cache
from compiler.backends.c import blas as _blas
from compiler.backends.c.printer import PRINTERS, print_c
from compiler.backends.pause_gc import paused
from compiler.backends.cache import cache_dir, load_module
from compiler.backends.lowering import is_tokens, lower, shape_code, statement
from compiler.backends.show import Displayed
from compiler.errors import BpcError, ModelError, UnsupportedError
from compiler.files import write_atomic
from compiler.freetext import c_comment
from compiler.core.ir import ARG, N
from compiler.backends.templates import render

CFLAGS = ("-O3", "-fno-math-errno", "-fPIC")   # never -ffast-math: it breaks inf/nan handling
# matrix products of at least this many multiply-adds call the BLAS's gemm when the extension
# is built with one; below, the loops are faster. Measured by `python -m bench --only blas`
# (README: gemm wins from d-d-d products of 512 multiply-adds in double, 1728 in float; the
# loops from 216 and 512)
GEMM_MIN_MACS = {"float64": 400, "float32": 1000}
LOOP_VARS = ("_i", "_j", "_k", "_l", "_m", "_o", "_p", "_q")
SUM_LANES = 16     # partial sums of a long row (CStatements.row_sum)

# counts of the builds and cache hits of this process (tests assert a second load builds nothing)
stats = {"builds": 0, "cache_hits": 0, "damaged": 0}


class CBuildError(BpcError):
    """The C compiler rejected the generated code (its full output is in the message)."""


def _dims(shape):
    """C expression of each dimension (the batch axis is ``n``)."""
    return ["n" if d == N else str(d) for d in shape]


def _size_coeffs(shape):
    """(a, b) with size = a*n + b. An axis may be a multiple of the batch (k*n: the n*OH*OW
    rows of an image batch's windows)."""
    k, has_n = 1, False
    for d in shape:
        if d == N:
            has_n = True
        elif getattr(d, "has", None) and d.has(N):
            has_n = True
            k *= int(d / N)
        else:
            k *= int(d)
    return (k, 0) if has_n else (0, k)


def _size_code(shape):
    """C expression of the number of elements of ``shape`` (a size_t expression)."""
    a, b = _size_coeffs(shape)
    if a:
        return "n" if a == 1 else f"{a}*n"
    return str(b)


def _flat_index(shape, idx):
    """Row-major flat index of per-axis index expressions ``idx`` in ``shape``."""
    terms = []
    for a, (d, i) in enumerate(zip(shape, idx)):
        if i == "0":
            continue
        stride = _size_code(shape[a + 1:])
        terms.append(i if stride == "1" else f"{i}*{stride}")
    return " + ".join(terms) or "0"


class CStatements:
    """Prints the statements of one Program as C loops, for one element type."""

    def __init__(self, program, dtype, cnames):
        self.p = program
        self.dtype = dtype
        self.printer = PRINTERS[dtype]
        self.real = self.printer.real
        self.fs = self.printer.fsuffix
        self.cnames = cnames
        self.helpers = set()
        self.uses_gemm = False   # whether a matrix product may call bpc_gemm (an optimised BLAS)
        self.gemm_forms = set()  # which of bpc_gemm ("plain"), bpc_gemm_add ("add"), bpc_gemm_ld ("ld") are called
        self.begin_function((), {})

    def begin_function(self, nodes, direct, inline=()):
        """Start the statements of one function computing ``nodes`` (in order); ``direct``: uids
        of values written straight into an output array; ``inline``: uids of further values
        printed inside their single user (``c_inline``), beside the program's own."""
        self.inline = set(self.p.inline) | set(inline)
        self.locals = {n.uid for n in nodes if n.shape == ()}    # scalars held in local variables
        # reshapes that are pointers to their input's data
        self.aliases = {n.uid for n in nodes if n.op == "reshape" and n.shape != ()
                        and n.inputs[0].uid not in self.locals and n.inputs[0].uid not in self.inline
                        and n.uid not in direct}
        # uid -> (C array, heads, elements per sample, row stride): the matrices of a value that
        # lives inside another array (head_views), as the batched products read or write them
        self.strided = {}
        # matrix products summed into one array (sums_of_products): uid -> (the sum's C array,
        # whether the product adds to what the earlier ones wrote there)
        self.accumulate = {}
        self.used = set()        # C names the statements refer to (which params to bind, which args are unused)
        self.uses_nf = False     # whether they use the batch size as a floating value (_nf)

    def lit(self, value):
        return self.printer({})._lit(value)

    def exp(self):
        """The name of the vectorisable exp (compiler/core/scalar_c_math.py) that op statements
        call in their loops (libm's exp keeps a loop scalar)."""
        self.helpers.add("exp")
        return f"bpc_exp{self.fs}"

    def name(self, node, use=True):
        """The C name of ``node``; ``use``: the code being written refers to it."""
        cname = self.cnames[node.uid]
        if use:
            self.used.add(cname)
        return cname

    def expr(self, e, symbols):
        code, helpers = print_c(e, symbols, self.dtype)
        self.helpers |= helpers
        if N in e.free_symbols:
            self.uses_nf = True      # the printer writes the batch size as _nf
        return code

    # -- operands -------------------------------------------------------------------------
    def elem(self, node, idx):
        """C expression of ``node``'s element at per-axis indices ``idx`` (a list, one per
        axis of node.shape; "0" on size-1 axes)."""
        if node.uid in self.inline:
            if not node.inputs:
                return "(" + self.expr(node.attr("expr"), {}) + ")"
            if node.op == "causal_mask":     # where(j <= i, s, fill) on the last two axes
                (s,) = node.inputs
                return f"({idx[-1]} <= {idx[-2]} ? {self.elem(s, idx)} : {self.lit(node.attr('fill'))})"
            return "(" + self.ew_code(node, idx) + ")"
        if node.uid in self.locals:
            return self.name(node)
        return f"{self.name(node)}[{_flat_index(node.shape, idx)}]"

    def operand_idx(self, inp, out_shape, idx):
        """Indices into ``inp`` for the element ``idx`` of a result of ``out_shape``."""
        padded = ir.padded_to(inp.shape, out_shape)
        own = [i if p != 1 else "0" for p, i in zip(padded, idx)]
        if ir.alignment(inp.shape, out_shape) == "left":
            return own[:len(inp.shape)]
        return own[len(out_shape) - len(inp.shape):]

    def ew_symbols(self, node, idx):
        return {ARG[i]: self.elem(inp, self.operand_idx(inp, node.shape, idx))
                for i, inp in enumerate(node.inputs)}

    def ew_code(self, node, idx):
        return self.expr(factored(node.attr("expr")), self.ew_symbols(node, idx))

    # -- loops ----------------------------------------------------------------------------
    @staticmethod
    def loops(shape, body, vars_=None):
        """Nested for-loops over ``shape`` around ``body`` (a list of lines)."""
        vars_ = vars_ or LOOP_VARS[:len(shape)]
        lines, depth = [], 0
        for d, v in zip(_dims(shape), vars_):
            if d == "1":
                continue
            lines.append("    " * depth + f"for (size_t {v} = 0; {v} < {d}; {v}++) {{")
            depth += 1
        lines += ["    " * depth + b for b in body]
        lines += ["    " * (depth - 1 - k) + "}" for k in range(depth)]
        return lines

    @staticmethod
    def block(lines):
        return ["{"] + ["    " + line for line in lines] + ["}"]

    @staticmethod
    def idx_vars(shape):
        return [LOOP_VARS[a] if d != 1 else "0" for a, d in enumerate(shape)]

    def target(self, node, idx):
        if node.uid in self.locals:
            return self.name(node)
        return f"{self.name(node)}[{_flat_index(node.shape, idx)}]"

    # -- helpers of the op records' statements (compiler.core.ops) ------------------------
    @staticmethod
    def dims(shape):
        return _dims(shape)

    @staticmethod
    def size_code(shape):
        return _size_code(shape)

    def target_flat(self, node, index):
        return self.name(node) if node.uid in self.locals else f"{self.name(node)}[{index}]"

    def source_flat(self, src, index):
        """Element ``index`` (a flat, row-major C index) of ``src``."""
        if src.uid in self.inline or src.uid in self.locals:
            if src.uid in self.inline and src.inputs:
                raise UnsupportedError(f"internal: cannot copy inline value {src!r}")
            return self.elem(src, ["0"] * len(src.shape))
        return f"{self.name(src)}[{index}]"

    def copy_flat(self, node, src):
        # a value of one element (a scalar local, or a (1, 1) array) is copied without a loop,
        # so there is no loop variable to index with
        if node.uid in self.locals or _size_code(node.shape) == "1":
            return [f"{self.target_flat(node, '0')} = {self.source_flat(src, '0')};"]
        return [f"for (size_t _i = 0; _i < {_size_code(node.shape)}; _i++) "
                f"{self.target_flat(node, '_i')} = {self.source_flat(src, '_i')};"]

    def row_sum(self, k, var, value, acc="_s"):
        """Lines declaring ``acc`` and leaving in it the sum of ``value`` (an expression of the
        loop variable ``var``) over ``var`` in [0, k). A row of at least 2*SUM_LANES numbers is
        summed in SUM_LANES interleaved partial sums, then those in order: gcc vectorises that
        loop as it is (a single running sum, in order, it vectorises only as a chain of scalar
        additions, 4-5 times slower), and the result is as deterministic and no less accurate."""
        real, zero = self.real, self.lit(0)
        if not isinstance(k, int) or k < 2 * SUM_LANES:
            return [f"{real} {acc} = {zero};", f"for (size_t {var} = 0; {var} < {k}; {var}++) {acc} += {value};"]
        full = k // SUM_LANES * SUM_LANES
        lines = [f"{real} {acc}_lanes[{SUM_LANES}] = {{{zero}}};",
                 f"for (size_t {var}_0 = 0; {var}_0 < {full}; {var}_0 += {SUM_LANES}) {{",
                 f"    for (size_t _u = 0; _u < {SUM_LANES}; _u++) {{",
                 f"        const size_t {var} = {var}_0 + _u;",
                 f"        {acc}_lanes[_u] += {value};",
                 "    }", "}",
                 f"{real} {acc} = {zero};",
                 f"for (size_t _u = 0; _u < {SUM_LANES}; _u++) {acc} += {acc}_lanes[_u];"]
        if full < k:
            lines.append(f"for (size_t {var} = {full}; {var} < {k}; {var}++) {acc} += {value};")
        return lines

    # -- statements -----------------------------------------------------------------------
    def statement(self, node):
        return ops.statement("c", node)(self, node)

    def elementwise_body(self, node, idx, tag=""):
        """(lines computing ``node``'s element at ``idx``, the C expression of its value): its
        shared subexpressions in locals ``_c<tag><k>``."""
        expr = factored(node.attr("expr"))
        reps, body_expr = shared_subexpressions(expr)
        symbols = self.ew_symbols(node, idx)
        body = []
        for k, (sym, sub) in enumerate(reps):
            tmp = f"_c{tag}{k}"
            body.append(f"const {self.real} {tmp} = {self.expr(sub, symbols)};")
            symbols[sym] = tmp
        return body, self.expr(body_expr, symbols)

    def elementwise(self, node):
        idx = self.idx_vars(node.shape)
        body, value = self.elementwise_body(node, idx)
        body.append(f"{self.target(node, idx)} = {value};")
        if node.uid in self.locals and body[:-1]:
            return self.block(body)
        return self.loops(node.shape, body)

    def fused_elementwise(self, nodes):
        """One loop nest computing the elementwise ``nodes`` (consecutive statements of one
        shape, each reading the earlier ones at its own element): every element of their inputs
        is fetched once. Each value is stored and later statements read it back, printed as in
        their own loops (gcc forwards the stored value): the same terms in the same order, and no
        multiplication of one contracted into an addition of another (a product also stored is
        never turned into an fma), so the results are bit for bit those of separate loops (a
        loss and a backward that group their statements differently agree exactly)."""
        idx = self.idx_vars(nodes[0].shape)
        body = []
        for g, node in enumerate(nodes):
            lines, value = self.elementwise_body(node, idx, f"{g}_")
            body += lines + [f"{self.target(node, idx)} = {value};"]
        return self.loops(nodes[0].shape, body)


@dataclass(frozen=True, repr=False)
class CompiledC(Displayed):
    """A model compiled to C: the C source, header and Python wrapper, and how to build them.
    ``repr`` is one line; ``show()`` prints what ``bpc show`` prints; in a notebook it shows
    the gradient formulas."""

    TARGET = "c"

    model: Model
    program: Program
    dtype: str
    prefix: str
    c_source: str
    header: str
    wrapper_source: str
    cdef: str
    formulas: dict[str, str]
    latex: dict[str, str]
    source_hash: str
    ext_source: str = ""     # the cffi extension's C source: includes <prefix>.c, adds the glue

    @property
    def c_hash(self) -> str:
        return _hash(self.c_source, self.header, self.cdef, self.ext_source)

    @property
    def ext_name(self) -> str:
        """Name of the cffi extension module (unique per C source, so models never collide)."""
        return f"_bpc_{self.prefix}_{self.c_hash[:16]}"

    def write(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write ``<prefix>.c``, ``<prefix>.h`` and the wrapper ``<prefix>.py`` to ``out_dir``
        (each atomically). Importing the wrapper builds the extension beside it on first use."""
        out = Path(out_dir)
        paths = [write_atomic(out / f"{self.prefix}.h", self.header),
                 write_atomic(out / f"{self.prefix}.c", self.c_source),
                 write_atomic(out / f"{self.prefix}.py", self.wrapper_source)]
        return paths

    def build(self, cache: str | os.PathLike | None = None, blas: str = "auto") -> Path:
        """Build (or find in the cache) the cffi extension; returns the path of the shared library.
        ``blas``: "auto" links the scipy-openblas32 wheel's BLAS for the larger matrix products
        when it is installed, and builds the portable loops when not; "none" always builds the
        loops; "scipy-openblas32" requires the wheel (compiler.backends.c.blas)."""
        return build_extension(self, cache, blas)

    def load(self, cache: str | os.PathLike | None = None, blas: str = "auto") -> ModuleType:
        """Build or reuse the extension, and return the wrapper module (same interface as the
        NumPy modules: PARAMS, INPUTS, TARGETS, init_params, forward, loss, backward, ...).
        ``blas``: as for build()."""
        so = self.build(cache, blas)
        ext = _import_extension(self.ext_name, so)
        wrapper = Path(so).parent / f"{self.prefix}.py"
        if not wrapper.is_file() or wrapper.read_text() != self.wrapper_source:
            # (the wrapper finds its extension in sys.modules: it need not lie beside it)
            wrapper = _cache.write_cached(wrapper, self.wrapper_source, f"c/{Path(so).parent.name}")
        sys.modules[self.ext_name] = ext
        return load_module(wrapper, f"bpc_c_{self.prefix}_{self.c_hash[:12]}")


# Every C identifier named after the model (parameters, inputs, intermediate values) carries
# this prefix: no model name can then clash with a C keyword, a GNU extension (asm, typeof), a
# libc or compiler macro (M_PI, WEOF, errno, stdin, unix) or the generated code's own names,
# which never start with it. The API keeps its names: the functions are <prefix>_*, the
# offsets <P>_OFFSET_<name>.
C_NAME_PREFIX = "v_"


SECOND_ORDER = ("hvp", "gnvp")     # entry points that take a direction v and write a product hv


def _c_names(program):
    """uid -> C identifier: ``v_<name>`` for each of the program's names (see C_NAME_PREFIX)."""
    out, taken = {}, set()
    for uid, name in sorted(program.names.items(), key=lambda kv: kv[0]):
        c = C_NAME_PREFIX + name
        while c in taken:
            c += "_"
        out[uid] = c
        taken.add(c)
    return out


@paused
def compile_model_c(model: Model, dtype: str | type = "float64", prefix: str | None = None,
                    second_order: bool = False) -> CompiledC:
    """Compile ``model`` to standalone C plus a cffi wrapper (returns a CompiledC).

    ``dtype``: "float64" (C double) or "float32" (C float). ``prefix``: the C symbol prefix
    (default: the model's name). ``second_order``: also emit ``hvp`` and (built-in losses)
    ``gnvp``; off by default in C, where they make the C compiler's work 2.5-5 times longer.
    """
    dtype = str(getattr(dtype, "__name__", dtype))
    if dtype not in PRINTERS:
        raise ModelError(f"the C backend needs dtype float32 or float64, not {dtype!r}")
    _check_prefix(prefix or model.name)
    return render_c(lower(model, dtype, second_order), prefix)


def _check_prefix(prefix):
    # the prefix only ever starts longer names (<prefix>_forward, <P>_OK, ...), so C keywords and
    # macros are fine; no leading underscore (reserved in C), ASCII only
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", prefix):
        raise ModelError(f"C prefix {prefix!r} is not a usable C identifier (a letter, then letters, "
                         "digits or underscores)")


def render_c(lowered, prefix=None):
    """The C source, header and wrapper of a Lowered model (a CompiledC)."""
    model, program, dtype, iface = lowered.model, lowered.program, lowered.dtype, lowered.interface
    if dtype not in PRINTERS:
        raise ModelError(f"the C backend needs dtype float32 or float64, not {dtype!r}")
    prefix = prefix or model.name
    _check_prefix(prefix)
    cnames = _c_names(program)
    real = PRINTERS[dtype].real
    P = prefix.upper()

    params = []
    offset = 0
    for p in model.params:
        size = int(sp.Integer(ir.size_of(p.shape)))
        params.append({"name": p.name, "cname": cnames[p.uid], "offset": offset, "size": size,
                       "shape": tuple(int(d) for d in p.shape), "shape_code": shape_code(p.shape)})
        offset += size
    n_params = offset

    data, targets, masks = list(model.inputs), list(model.targets), list(model.masks)
    # batchnorm: the running statistics and the training flag are inputs too; the statistics'
    # next values are outputs of every function, into stats_out (STATS' order, flat)
    state = [s for s, _ in model.stats] + ([model.mode] if model.mode is not None else [])
    stats, offset = [], 0
    for s, u in program.stat_updates:
        size = int(sp.Integer(ir.size_of(s.shape)))
        stats.append({"name": s.name, "offset": offset, "size": size, "shape": tuple(int(d) for d in s.shape),
                      "node": u})
        offset += size
    stats_dest = [(q["node"], "ptr", f"stats_out + {q['offset']}") for q in stats]
    st = CStatements(program, dtype, cnames)
    writer = _CFunctions(lowered, st, params)

    pred = program.prediction
    pred_dest = [(pred, "ptr" if pred.shape != () else "scalar", "out" if pred.shape != () else "out[0]")]
    # several outputs: one after the other in out, each n * its per-sample size (OUTPUTS' order)
    heads, out_size = [], 0
    for h, node in zip(model.heads, program.heads):
        per = tuple(int(d) for d in node.shape[1:])
        heads.append({"name": h.name, "offset": out_size, "size": math.prod(per), "per_sample": per,
                      "shape_doc": shape_code(node.shape), "node": node})
        out_size += math.prod(per)
    if heads:
        pred_dest = [(q["node"], "ptr", f"out + {q['offset']}*n" if q["offset"] else "out") for q in heads]
    loss_dest = [(program.loss, "scalar", "*loss")]
    grad_dest = []
    info_of = {q["name"]: q for q in params}
    for p, g in program.grads:
        info = info_of[p.name]
        dest = f"grads + {info['offset']}" if p.shape != () else f"grads[{info['offset']}]"
        grad_dest.append((g, "ptr" if p.shape != () else "scalar", dest, info))
    zero_grads = [info for g, _, _, info in grad_dest if g is None]
    functions = [
        # dropout masks are input arrays of the C functions, drawn by the wrapper (or the caller)
        writer.function("forward", data + masks + state, program.forward_nodes, pred_dest + stats_dest),
        writer.function("loss", data + targets + masks + state, program.loss_nodes, loss_dest + stats_dest),
        writer.function("backward", data + targets + masks + state, program.backward_nodes,
                        loss_dest + [(g, k, d) for g, k, d, _ in grad_dest if g is not None] + stats_dest,
                        zero_grads),
    ]
    # second order: hvp (and gnvp), each over its own view of the program; v is a flat array of
    # params' layout, the product goes to hv (same layout), the loss and gradients as backward's
    directions = {p.uid: v for p, v in program.directions}
    for so in (program.hvp, program.gnvp):
        if so is None:
            continue
        view = program.view(so)
        st2 = CStatements(view, dtype, cnames)
        w2 = _CFunctions(replace(lowered, program=view, lines=Formulas(view)), st2, params)
        dirs = [dict(cname=cnames[directions[p.uid].uid], offset=q["offset"], shape_code=q["shape_code"])
                for p, q in zip(model.params, params)]
        g_dest, h_dest = [], []
        for (p, g), (_, h) in zip(so.grads, so.products):
            info = info_of[p.name]
            scalar = p.shape == ()
            if g is not None:
                g_dest.append((g, "scalar" if scalar else "ptr",
                               f"grads[{info['offset']}]" if scalar else f"grads + {info['offset']}"))
            if h is not None:
                h_dest.append((h, "scalar" if scalar else "ptr",
                               f"hv[{info['offset']}]" if scalar else f"hv + {info['offset']}"))
        zero_h = [info_of[p.name] for p, h in so.products if h is None]
        s_stats = [(u, "ptr", f"stats_out + {q['offset']}") for (_, u), q in zip(view.stat_updates, stats)]
        functions.append(w2.function(so.name, data + targets + masks + state, so.nodes,
                                     [(so.loss, "scalar", "*loss")] + g_dest + h_dest + s_stats, zero_grads,
                                     directions=dirs, zero_hv=zero_h))
        st.helpers |= st2.helpers
        st.uses_gemm |= st2.uses_gemm
        st.gemm_forms |= st2.gemm_forms
    if program.per_example is not None:
        functions.append(_per_example_function(lowered, cnames, params, info_of,
                                               data + targets + masks + state, stats_dest, st))
    work_a = max(f["work"][0] for f in functions)
    work_b = max(f["work"][1] for f in functions)

    formulas, latex = lowered.formulas, lowered.latex
    common = dict(
        stack_work_bytes=STACK_WORK_BYTES,
        model_name=model.name, version=__version__, source=model.source, source_hash=lowered.source_hash,
        description=model.description, prefix=prefix, P=P, real=real, dtype=dtype, fs=st.fs,
        params=params, n_params=n_params, inputs=writer.arg_list(data), targets=writer.arg_list(targets), masks=writer.arg_list(masks),
        state=writer.arg_list(state), stats=[{k: v for k, v in q.items() if k != "node"} for q in stats], n_stats=offset,
        functions=functions, zero_grads=zero_grads, work_a=work_a, work_b=work_b,
        per_example_error=program.per_example_error,
        moments=_moments_context(lowered, info_of, real, st),
        heads=[{k: v for k, v in q.items() if k != "node"} for q in heads],
        pred_size=f"{out_size}*n" if heads else _size_code(pred.shape), pred_shape_doc=shape_code(pred.shape),
        pred_per_sample=tuple(int(d) for d in (pred.shape[1:] if ir.is_batch(pred.shape) else pred.shape)), pred_batched=ir.is_batch(pred.shape),
        helpers=sorted(st.helpers), prediction_doc=iface.prediction_doc,
        gemm=st.uses_gemm, gemm_forms=st.gemm_forms, gemm_min_macs=GEMM_MIN_MACS[dtype], gemm_letter="d" if dtype == "float64" else "s",
        formulas=[(p["name"], formulas[p["name"]]) for p in params],
        steps=_step_args(real), steps_def=dict(_step_args(real, "restrict ")),
    )
    common["packed_backward"] = _packed_backward(common) is not None
    if common["moments"]:
        common["moment_protos"] = dict(_moment_protos(common, "restrict "))
        common["moment_decls"] = dict(_moment_protos(common))
    header = render("c_model.h.j2", **common)
    c_source = render("c_model.c.j2", **common)
    cdef = _cdef(common)
    ext_source = _ext_source(common)
    hash_ = _hash(c_source, header, cdef, ext_source)
    ext_name = f"_bpc_{prefix}_{hash_[:16]}"
    wrapper = render(
        "c_wrapper.py.j2", **common, ext_name=ext_name, cdef=cdef, init_lines=list(lowered.init_lines),
        cflags=list(CFLAGS), ext_source=ext_source, stack_batch=_stack_batch(work_a, work_b, dtype),
        inputs_shapes=iface.inputs_shapes, targets_shapes=iface.targets_shapes,
        target_kinds=iface.target_kinds, classes=iface.classes, params_shapes=iface.params_shapes,
        data_args=iface.data_args, all_args=iface.all_args, mode_args=iface.mode_args, dropout=iface.dropout,
        loss_kind=iface.loss_kind, outputs=iface.outputs, output_losses=iface.output_losses,
        output_targets=iface.output_targets,
        has_dropout=iface.has_dropout, stats_shapes=iface.stats_shapes, stats_init=iface.stats_init,
        has_tokens=iface.has_tokens, vocab=iface.vocab, varg=direction_arg(model),
    )
    return CompiledC(model, program, dtype, prefix, c_source, header, wrapper, cdef, formulas, latex,
                     lowered.source_hash, ext_source)


class _CFunctions:
    """Writes the C entry points of one model (the template context of each function)."""

    def __init__(self, lowered, st, params):
        self.lowered, self.st, self.params = lowered, st, params
        self.program = lowered.program
        self.real = st.real
        p = self.program
        self.users = ir.consumers(ir.topo_order([*p.predictions, p.loss, *(g for _, g in p.grads if g is not None),
                                                 *(u for _, u in p.stat_updates)]))

    def arg_list(self, leaves):
        out = []
        for x in leaves:
            integer = x.attr("kind") in ("label", "ids")      # class labels or token ids: int64_t
            ctype = "int64_t" if integer else self.real
            out.append({"name": x.name, "cname": self.st.name(x, use=False), "ctype": ctype,
                        "label": integer, "tokens": is_tokens(x),
                        "what": "token ids" if x.attr("kind") == "ids" else "labels",
                        "classes": self.lowered.classes.get(x.uid),
                        "mask": x.attr("role") == "mask", "rate": x.attr("rate"),
                        "stat": x.attr("role") == "stat", "mode": x.attr("role") == "mode",
                        "internal": x.attr("role") in ("mask", "stat", "mode"),
                        "per_sample": tuple(int(d) for d in x.shape[1:]),
                        "size": _size_code(x.shape), "shape_doc": shape_code(x.shape)})
        return out

    def training_block(self, run):
        """Statements that only training mode needs (batch statistics and their gradients, the
        running statistics' next values) under ``if (training flag)``; in inference mode the
        values that other statements read are zeros (which the flag multiplies), never
        whatever an earlier call left in the work buffer."""
        if not run:
            return []
        st, only = self.st, self.program.training_only
        zeros = []
        for node, _ in run:
            if node.uid in st.aliases:
                continue   # a pointer into its input's data: nothing of its own to zero
            if any(u.uid not in only for u in self.users.get(node.uid, [])):
                if node.uid in st.locals:
                    zeros.append(f"{st.name(node)} = {st.lit(0)};")
                else:
                    zeros.append(f"for (size_t _i = 0; _i < {_size_code(node.shape)}; _i++) "
                                 f"{st.name(node)}[_i] = {st.lit(0)};")
        lines = [f"if ({st.elem(self.lowered.model.mode, [])} != 0) {{   /* training mode only */"]
        lines += ["    " + line if line else line for _, body in run for line in body]
        lines += (["} else {"] + ["    " + z for z in zeros] if zeros else []) + ["}"]
        return lines

    def function(self, fname, leaves, nodes, outputs, zero_grads=(), directions=(), zero_hv=()):
        """outputs: list of (node, destination kind, C destination) where kind is 'ptr'
        (a non-scalar output array), or 'scalar' (written as ``dest = value``)."""
        st, real, fm = self.st, self.real, self.lowered.lines
        scheduled = {n.uid for n in nodes}
        direct = {}
        for node, kind, dest in outputs:
            if kind == "ptr" and node.uid in scheduled and node.op != "reshape" and node.uid not in direct \
                    and node.shape != ():
                direct[node.uid] = dest
        out_uids = {node.uid for node, _, _ in outputs}
        users = _users(self.program, nodes, [node for node, _, _ in outputs])
        inline = c_inline(self.program, nodes, users, out_uids)
        nodes = [n for n in nodes if n.uid not in inline]
        st.begin_function(nodes, direct, inline)
        views, into = head_views(self.program, nodes, users, out_uids, st)
        for p, x in views.items():      # a permutation read by products only: x's array
            st.strided[p.uid] = (st.name(x), int(p.shape[1]), _per_sample(x.shape), int(p.shape[1] * p.shape[3]))
        for o, p in into.items():       # a product written straight into its permutation's array
            st.strided[o.uid] = (st.name(p, use=False), int(o.shape[1]), _per_sample(p.shape),
                                 int(o.shape[1] * o.shape[3]))
        bare = {p.uid: x for p, x in views.items()} | {p.uid: o for o, p in into.items()}
        unstored_views = {p.uid for p in views} | {o.uid for o in into}
        for total, products in sums_of_products(self.program, nodes, users, out_uids, st).items():
            for k, m in enumerate(products):
                st.accumulate[m.uid] = (st.name(total, use=False), k > 0)
                unstored_views.add(m.uid)
            bare[total.uid] = products[-1]
        # (a sum written by its products has no statement of its own to fuse)
        groups = fused_groups(self.program, nodes, set(st.locals) | set(bare))
        grouped = {n.uid: g for g in groups for n in g}
        decls, work_a, work_b = [], 0, 0
        for node, kind, dest in outputs:
            if node.uid in direct and direct[node.uid] == dest:
                decls.append(f"{real} *restrict const {st.name(node, use=False)} = {dest};  /* {shape_code(node.shape)}, output */")
        for n in nodes:
            if n.uid in unstored_views:
                continue
            if n.uid in st.locals or n.uid in direct or n.uid in st.aliases:
                if n.uid in st.locals:
                    decls.append(f"{real} {st.name(n, use=False)};")
                continue
            a, b = _size_coeffs(n.shape)
            off = " + ".join(t for t in ([f"{work_a}*n" if work_a != 1 else "n"] if work_a else [])
                             + ([str(work_b)] if work_b else [])) or "0"
            decls.append(f"{real} *restrict const {st.name(n, use=False)} = _work + {off};  /* {shape_code(n.shape)} */")
            work_a += a
            work_b += b
        body, only = [], []   # only: a run of training-only statements, emitted under one if
        for n in nodes:
            if n.uid in grouped:
                group = grouped[n.uid]
                if n is not group[0]:
                    continue
                lines = [""] + [f"/* {c_comment(fm.line(m), lead='')} */" for m in group]
                lines += _fused_statement(st, fm, group)
                body += self.training_block(only)
                only = []
                body += lines
                continue
            if n.uid in bare:       # no statement: a view, or the array products wrote
                what = ("a view of" if n.uid in unstored_views else
                        "written by the product" if n.op == "permute" else "summed by the products, the last")
                lines = ["", f"/* {c_comment(fm.line(n), lead='')}: {what} {st.name(bare[n.uid], use=False)} */"]
            else:
                lines = ["", *(f"/* {c_comment(fm.line(m), lead='')} */" for m in _inlined(n, inline)),
                         f"/* {c_comment(fm.line(n), lead='')} */", *statement(st, fm, n)]
            if n.uid in self.program.training_only:
                only.append((n, lines))
                continue
            body += self.training_block(only)
            only = []
            body += lines
        body += self.training_block(only)
        tail = []
        for node, kind, dest in outputs:
            if node.uid in direct and direct[node.uid] == dest:
                continue
            if kind == "scalar":
                tail.append(f"{dest} = {st.elem(node, ['0'] * len(node.shape)) if node.shape else _scalar(st, node)};")
            else:
                tail.extend(_copy_out(st, node, dest))
        # what the statements referred to, as the emitter recorded it (no search of the text)
        used = st.used
        param_decls = [f"const {real} *restrict const {p['cname']} = params + {p['offset']};  /* {p['shape_code']} */"
                       for p in self.params if p["cname"] in used]
        dir_decls = [f"const {real} *const {d['cname']} = v + {d['offset']};  /* {d['shape_code']}, direction */"
                     for d in directions if d["cname"] in used]
        args = self.arg_list(leaves)
        labels = [x for x in args if x["label"]]
        unused = [x["cname"] for x in args if x["cname"] not in used]
        if directions and not dir_decls:
            unused.insert(0, "v")
        if not param_decls:
            unused.insert(0, "params")
        param_decls += dir_decls
        for info in zero_grads:
            tail.append(f"for (size_t _i = 0; _i < {info['size']}; _i++) grads[{info['offset']} + _i] = {st.lit(0)};"
                        f"  /* d{info['name']} = 0: the loss does not depend on {info['name']} */")
        for info in zero_hv:
            tail.append(f"for (size_t _i = 0; _i < {info['size']}; _i++) hv[{info['offset']} + _i] = {st.lit(0)};"
                        f"  /* zero: the gradient of {info['name']} does not change along v */")
        fn = {"name": fname, "leaves": args, "stats": bool(self.program.stat_updates)}
        return {"name": fname, "leaves": args, "stats": fn["stats"], "decls": param_decls + decls, "unused": unused,
                "proto": _proto_args(fn, real), "definition": _proto_args(fn, real, "restrict "),
                "body": body, "tail": tail, "work": (work_a, work_b), "labels": labels,
                "uses_nf": st.uses_nf, "needs_batch": fname != "forward", "second": fname in SECOND_ORDER}


def _users(program, nodes, outputs):
    """{uid: [uids of the statements reading it]} over the statements ``nodes`` of one function
    and the values it returns (``outputs``, read by a user ``None``); a value printed inside its
    user (the program's inline set) reads its inputs where that user is."""
    users = {}

    def reads(user, node):
        for i in node.inputs:
            if i.uid in program.inline and i.inputs:
                reads(user, i)
            else:
                users.setdefault(i.uid, []).append(user)
    for n in nodes:
        reads(n.uid, n)
    for o in outputs:
        if o is not None:
            users.setdefault(o.uid, []).append(None)
    return users


def _inlined(node, inline):
    """The values of ``inline`` printed inside ``node``'s statement, inputs first (their formulas
    go in its comment)."""
    out = []
    for i in node.inputs:
        if i.uid in inline:
            out += _inlined(i, inline) + [i]
    return out


HEADS = (0, 2, 1, 3)     # the permutation between (n, T, heads, dk) and (n, heads, T, dk)


def _per_sample(shape):
    size = 1
    for d in shape[1:]:
        size *= int(d)
    return size


def _head_perm(node):
    return (node.op == "permute" and node.attr("axes") == HEADS and len(node.shape) == 4
            and all(isinstance(d, int) or getattr(d, "is_Integer", False) for d in node.shape[1:]))


def head_views(program, nodes, users, outputs, st):
    """({permutation: its input} read in place, {product: permutation} written in place): a
    head permutation (n, T, h, dk) <-> (n, h, T, dk) that only batched products read is a view
    of its input (each head's (T, dk) matrix at row stride h*dk), and a batched product read by
    a head permutation alone writes its matrices straight into that permutation's array: no
    copy either way (attention's Q, K, V split into heads, the heads merged back, and their
    adjoints)."""
    by_uid = {n.uid: n for n in nodes}
    views, into = {}, {}
    for n in nodes:
        if not _head_perm(n) or n.uid in outputs or n.uid in program.training_only:
            continue
        x, us = n.inputs[0], users.get(n.uid, [])
        if (us and all(u in by_uid and by_uid[u].op == "bmm" for u in us) and x.uid not in st.inline
                and x.uid not in st.locals):
            views[n] = x
    for n in nodes:
        if not _head_perm(n) or n in views or n.uid in outputs or n.uid in program.training_only:
            continue
        o, us = n.inputs[0], users.get(n.inputs[0].uid, [])
        if (o.op == "bmm" and o.uid in by_uid and o.uid not in outputs and us == [n.uid]
                and o.uid not in program.training_only):
            into[o] = n
    # a product's operand that is itself written in place elsewhere is read where it lives
    views = {p: x for p, x in views.items() if x not in into}
    return views, into


def sums_of_products(program, nodes, users, outputs, st):
    """{sum: [its matrix products, in statement order]}: an elementwise sum of two or more
    matrix products (nothing else, no factors) each read by the sum alone, each product written
    straight into the sum's array, the later ones adding to it (gemm's beta = 1): the gradient
    of an input read by several products (attention's Q, K and V projections) with no arrays of
    the terms and no pass to add them."""
    order = {n.uid: k for k, n in enumerate(nodes)}
    found = {}
    for n in nodes:
        if (n.op != "ew" or len(n.inputs) < 2 or n.uid in st.locals or n.uid in program.training_only
                or n.uid in st.inline or len(n.shape) != 2):
            continue
        expr = n.attr("expr")
        args = [ARG[i] for i in range(len(n.inputs))]
        if not (expr.is_Add and sorted(expr.args, key=str) == sorted(args, key=str)):
            continue
        ms = n.inputs
        if len({m.uid for m in ms}) != len(ms) or not all(
                m.op == "matmul" and m.uid in order and m.uid not in outputs and m.shape == n.shape
                and users.get(m.uid) == [n.uid] and m.uid not in program.training_only
                and not any(x.uid in st.inline or x.uid in st.locals for x in m.inputs) for m in ms):
            continue
        found[n] = sorted(ms, key=lambda m: order[m.uid])
    return found


# values the C backend prints inside their single user (besides the program's inline set),
# and the ops of the users that read them element by element (``CStatements.elem``)
C_INLINE_OPS = ("ew", "causal_mask")


def c_inline(program, nodes, users, outputs):
    """uids of the values printed inside their one user, a statement of the same shape that reads
    them element by element: an elementwise value read once by a causal mask, or a causal mask
    read once by an elementwise statement (a scaled and masked score matrix, the softmax adjoint
    masked and scaled: one loop, no array between them). Elementwise chains are already one
    value (``compiler.core.simplify.fuse``); a mask was not."""
    by_uid = {n.uid: n for n in nodes}
    inline = set()
    for n in nodes:
        us = users.get(n.uid, [])
        if (n.op not in C_INLINE_OPS or not n.inputs or n.uid in outputs or n.shape == ()
                or n.uid in program.training_only or len(us) != 1 or us[0] not in by_uid):
            continue
        u = by_uid[us[0]]
        # one of the two a mask (a selection: exact), so the value and the printed form of the
        # other are those of its own statement; elementwise into elementwise is the program's
        # fusion (compiler.core.simplify.fuse), the same for every function
        if ({n.op, u.op} == set(C_INLINE_OPS) and u.shape == n.shape
                and u.uid not in program.training_only):
            inline.add(n.uid)
    return inline


def fused_groups(program, nodes, exclude):
    """Runs of consecutive elementwise statements of one shape (two or more), each emitted as one
    loop nest (``CStatements.fused_elementwise``): GELU's pre-activation, tanh and output, a
    norm's scaled and shifted values. ``exclude``: scalars, and values with no statement of their
    own (a sum its products wrote, a view)."""
    groups, run = [], []

    def fusable(n):
        return (n.op == "ew" and n.inputs and n.uid not in exclude and n.uid not in program.inline
                and n.uid not in program.training_only)
    for n in nodes:
        if fusable(n) and run and n.shape == run[0].shape:
            run.append(n)
            continue
        if len(run) > 1:
            groups.append(run)
        run = [n] if fusable(n) else []
    if len(run) > 1:
        groups.append(run)
    return groups


def _fused_statement(st, fm, group):
    try:
        return st.fused_elementwise(group)
    except UnsupportedError as e:
        raise UnsupportedError(f"model {st.p.model.name!r}: cannot generate {fm.line(group[0])}: {e}") from None


def _moments_context(lowered, info_of, real, st):
    """The C of the hoisted moments (compiler.core.moments), or None: precompute's loops over the
    samples (statistics in double, summed per block of rows and then over the blocks) and the
    scalar statements of loss_from_moments and backward_from_moments, in double."""
    plan = lowered.moments
    if plan is None:
        return None
    from compiler.backends import moments_code

    def printer(e, symbols):
        code, helpers = print_c(e, symbols, "float64")
        st.helpers |= helpers
        return code

    D = len(plan.data)
    terms = moments_code.product_terms(plan)
    pre = []
    for i, d in enumerate(plan.data):
        x = f"{C_NAME_PREFIX}{d}"
        # the corrected two-pass mean and variance, each sum over blocks of 4096 rows
        pre += [f"double _mean{i} = 0.0, _dev{i} = 0.0, _var{i} = 0.0;",
                "for (size_t _lo = 0; _lo < n; _lo += 4096) {",
                "    double _b = 0.0;",
                f"    for (size_t _j = _lo; _j < (n - _lo < 4096 ? n : _lo + 4096); _j++) _b += (double){x}[_j];",
                f"    _mean{i} += _b;",
                "}",
                f"_mean{i} /= (double)n;",
                "for (size_t _lo = 0; _lo < n; _lo += 4096) {",
                "    double _b = 0.0, _q = 0.0;",
                f"    for (size_t _j = _lo; _j < (n - _lo < 4096 ? n : _lo + 4096); _j++) {{",
                f"        const double _e = (double){x}[_j] - _mean{i};",
                "        _b += _e;",
                "        _q += _e*_e;",
                "    }",
                f"    _dev{i} += _b;",
                f"    _var{i} += _q;",
                "}",
                f"_var{i} = (_var{i} - _dev{i}*_dev{i}/(double)n) / (double)n;",
                f"_mean{i} += _dev{i} / (double)n;",
                f"double _scale{i} = _var{i} > 0.0 ? sqrt(_var{i}) : 0.0;",
                f"if (!(_scale{i} > 0.0)) _scale{i} = 1.0;"]
    pre += [f"double _tot[{len(terms)}] = {{0}};",
            "for (size_t _lo = 0; _lo < n; _lo += 4096) {   /* blocks of rows: each summed, then added */",
            f"    double _blk[{len(terms)}] = {{0}};",
            "    const size_t _hi = n - _lo < 4096 ? n : _lo + 4096;",
            "    for (size_t _j = _lo; _j < _hi; _j++) {"]
    for i, d in enumerate(plan.data):
        top = plan.max_power[i]
        if top:
            pre.append(f"        const double _u{i}_1 = ((double){C_NAME_PREFIX}{d}[_j] - _mean{i}) / _scale{i};")
        for k in range(2, top + 1):
            pre.append(f"        const double _u{i}_{k} = _u{i}_{k - 1} * _u{i}_1;")
    for j, t in enumerate(terms):
        pre.append(f"        _blk[{j}] += {'*'.join(f'_u{i}_{k}' for i, k in t)};")
    pre += ["    }", f"    for (size_t _k = 0; _k < {len(terms)}; _k++) _tot[_k] += _blk[_k];", "}"]
    pre += [f"stats[{i}] = _mean{i};" for i in range(D)] + [f"stats[{D + i}] = _scale{i};" for i in range(D)]
    pre.append(f"for (size_t _k = 0; _k < {len(terms)}; _k++) stats[{2 * D} + _k] = _tot[_k] / (double)n;")
    bind = [f"const double {C_NAME_PREFIX}{p} = (double)params[{info_of[p]['offset']}];" for p in plan.params]
    bind += [f"const double {v} = stats[{i}];" for i, v in enumerate(moments_code.stat_locals(plan).values())]
    loss = moments_code.statements(plan, [plan.loss], printer, "const double ", C_NAME_PREFIX)
    roots = [plan.loss] + [g for g in plan.grads if g is not None]
    back = moments_code.statements(plan, roots, printer, "const double ", C_NAME_PREFIX)
    tail = [f"grads[{info_of[p]['offset']}] = ({real}){g.name if g is not None else '0.0'};"
            for p, g in zip(plan.params, plan.grads)]
    return {"stats": list(plan.stats), "count": len(plan.stats), "data": [f"{C_NAME_PREFIX}{d}" for d in plan.data],
            "data_names": list(plan.data), "precompute": pre, "bind": bind, "loss": [x + ";" for x in loss],
            "backward": [x + ";" for x in back], "grads": tail, "loss_name": plan.loss.name,
            "doc": moments_code.doc(plan)}


def _per_example_function(lowered, cnames, params, info_of, leaves, stats_dest, st):
    """per_example_grads: its statements over the program's per-example view. The losses go to
    ``loss`` (n values), the gradients to ``grads`` parameter by parameter, each (n,) + its shape
    at offset <P>_OFFSET_<name>*n (n*<P>_NUM_PARAMS values in all)."""
    program = lowered.program
    view = program.per_example_view()
    st2 = CStatements(view, lowered.dtype, cnames)
    writer = _CFunctions(replace(lowered, program=view, lines=Formulas(view)), st2, params)
    pe = program.per_example
    dest, zero = [(pe.loss, "ptr", "loss")], []
    for p, g in pe.grads:
        info = info_of[p.name]
        if g is None:
            zero.append(info)
        else:
            dest.append((g, "ptr", f"grads + {info['offset']}*n" if info["offset"] else "grads"))
    fn = writer.function("per_example_grads", leaves, pe.nodes, dest + stats_dest)
    for info in zero:
        fn["tail"].append(f"for (size_t _i = 0; _i < {info['size']}*n; _i++) grads[{info['offset']}*n + _i] = "
                          f"{st2.lit(0)};  /* d{info['name']} = 0: the loss does not depend on {info['name']} */")
    st.helpers |= st2.helpers
    st.uses_gemm |= st2.uses_gemm
    st.gemm_forms |= st2.gemm_forms
    return fn


def _scalar(st, node):
    """Value of a scalar node at the end of a function."""
    if node.uid in st.locals:
        return st.name(node)
    return st.elem(node, [])


def _copy_out(st, node, dest):
    """Lines copying ``node`` (a leaf, inline value, alias or second use) to the array ``dest``."""
    size = _size_code(node.shape)
    if node.uid in st.inline and node.inputs:
        idx = st.idx_vars(node.shape)
        return ["{", f"    {st.real} *const _dst = {dest};"] + \
            ["    " + line for line in st.loops(node.shape, [f"_dst[{_flat_index(node.shape, idx)}] = {st.elem(node, idx)};"])] + ["}"]
    src = st.source_flat(node, "_i")
    return [f"for (size_t _i = 0; _i < {size}; _i++) ({dest})[_i] = {src};"]


def _dict_code(d):
    return "{" + ", ".join(f"{k!r}: {v}" for k, v in d.items()) + "}"


def _hash(*texts):
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()


# elements of stack scratch the C functions use when given work == NULL (templates/c_model.c.j2)
STACK_WORK_BYTES = 16384


def _stack_batch(work_a, work_b, dtype):
    """The largest batch whose scratch fits the C functions' stack buffer (-1: none)."""
    elems = STACK_WORK_BYTES // (8 if dtype == "float64" else 4)
    if work_b > elems:
        return -1
    return (elems - work_b) // work_a if work_a else 1 << 62


def _cdef(ctx):
    """The declarations cffi needs: the header's prototypes (without comments or macros) and
    the wrapper's glue functions (see ``_ext_source``)."""
    prefix = ctx["prefix"]
    lines = [f"size_t {prefix}_work_size(size_t n);"]
    for fn in ctx["functions"]:
        lines.append(f"int {prefix}_{fn['name']}({fn['proto']});")
    lines += [f"void {prefix}_{name}({args});" for name, args in ctx["steps"]]
    lines.append(f"double {prefix}_sum_squares(const {ctx['real']} *x, size_t count);")
    if ctx["moments"]:
        lines += [f"int {prefix}_{name}({args});" for name, args in _moment_protos(ctx)]
    for fn in ctx["functions"]:
        lines.append(f"int _bpc_{prefix}_{fn['name']}({_glue_args(fn)});")
    packed = _packed_backward(ctx)
    if packed:
        lines += packed[0] + [packed[1] + ";"]
    lines.append(f"void _bpc_{prefix}_pack({_pack_args(ctx)});")
    lines.append(f"int _bpc_{prefix}_blas_threads(int k);")
    return "\n".join(lines) + "\n"


def _packed_backward(ctx):
    """(the lines of a struct of backward's glue arguments, the prototype of a glue taking one
    pointer to it, the struct's fields as that glue passes them on), or None for a model with
    batch statistics (no lean path). The wrapper's lean
    path (a repeat call with the same objects and a kept gradient buffer) fills one struct
    when it remembers a call and then passes one argument instead of one per array: cffi
    converts each argument on every call, 20-30 ns apiece, a tenth of a small model's call."""
    fn = next((f for f in ctx["functions"] if f["name"] == "backward"), None)
    if fn is None or fn["stats"]:
        return None
    prefix = ctx["prefix"]
    fields = [("const void *", "params")] + [("const void *", f"_a{k}") for k in range(len(fn["leaves"]))]
    fields += [("size_t ", "n"), ("void *", "grads"), ("void *", "work")]
    struct = ["typedef struct {"] + [f"    {t}{name};" for t, name in fields] + [f"}} _bpc_{prefix}_backward_args;"]
    passed = ", ".join(f"a->{name}" for _, name in fields)
    return struct, f"int _bpc_{prefix}_backward_packed(const _bpc_{prefix}_backward_args *a)", passed


def _pack_args(ctx):
    return ", ".join(["void *dst"] + [f"const void *_p{k}" for k in range(len(ctx["params"]))])


def _glue_args(fn):
    """The glue's arguments: untyped pointers named by position (_a0, ...)."""
    args = ["const void *params"] + (["const void *v"] if fn["name"] in SECOND_ORDER else [])
    args += [f"const void *_a{k}" for k in range(len(fn["leaves"]))] + ["size_t n"]
    args.append("void *out" if fn["name"] == "forward" else "void *loss" if fn["name"] == "loss"
                else "void *loss, void *grads" if fn["name"] == "per_example_grads" else "void *grads")
    if fn["name"] in SECOND_ORDER:
        args.append("void *hv")
    if fn["stats"]:
        args.append("void *stats_out")
    return ", ".join(args + ["void *work"])


def _ext_source(ctx):
    """C source of the cffi extension: ``<prefix>.c`` plus one glue function per entry point,
    taking untyped pointers (the wrapper checks dtypes itself, and an untyped
    ``ffi.from_buffer`` costs half a typed one); backward's glue writes the loss just after
    the gradients, so that one fresh buffer per call holds both. ``_pack`` copies parameters
    given as separate arrays into the C layout (for a plain dict of arrays)."""
    prefix, P, real = ctx["prefix"], ctx["P"], ctx["real"]
    out = [f'#include "{prefix}.c"', "#include <string.h>", ""]
    for fn in ctx["functions"]:
        names = ["params"] + (["v"] if fn["name"] in SECOND_ORDER else [])
        names += [f"_a{k}" for k in range(len(fn["leaves"]))] + ["n"]
        if fn["name"] == "forward":
            names.append("out")
        elif fn["name"] == "loss":
            names.append("loss")
        elif fn["name"] == "per_example_grads":
            names += ["loss", "grads"]
        else:
            names += [f"({real} *)grads + {P}_NUM_PARAMS", "grads"]
        if fn["name"] in SECOND_ORDER:
            names.append("hv")
        if fn["stats"]:
            names.append("stats_out")
        out += [f"static int _bpc_{prefix}_{fn['name']}({_glue_args(fn)})",
                "{", f"    return {prefix}_{fn['name']}({', '.join(names + ['work'])});", "}", ""]
    packed = _packed_backward(ctx)
    if packed:
        struct, proto, passed = packed
        out += struct + ["static " + proto, "{", f"    return _bpc_{prefix}_backward({passed});", "}", ""]
    out += [f"static void _bpc_{prefix}_pack({_pack_args(ctx)})", "{"]
    out += [f"    memcpy(({real} *)dst + {p['offset']}, _p{k}, sizeof({real}) * {p['size']});  /* {p['name']} */"
            for k, p in enumerate(ctx["params"])]
    out += ["}", ""]
    out += _BLAS_THREADS_GLUE.replace("@prefix@", prefix).splitlines() + [""]
    return "\n".join(out)


# the BLAS's thread count (built with scipy-openblas32: its openblas_set/get_num_threads, with
# the symbol prefix); 0 from a build without a BLAS (compiler.backends.c.blas)
_BLAS_THREADS_GLUE = """\
#if defined(BPC_CBLAS) && defined(BPC_OPENBLAS)
#define BPC_GLUE_CAT_(a, b) a##b
#define BPC_GLUE_CAT(a, b) BPC_GLUE_CAT_(a, b)
void BPC_GLUE_CAT(BPC_CBLAS_PREFIX, openblas_set_num_threads)(int k);
int BPC_GLUE_CAT(BPC_CBLAS_PREFIX, openblas_get_num_threads)(void);
#endif
static int _bpc_@prefix@_blas_threads(int k)
{
#if defined(BPC_CBLAS) && defined(BPC_OPENBLAS)
    if (k > 0) {
        BPC_GLUE_CAT(BPC_CBLAS_PREFIX, openblas_set_num_threads)(k);
    }
    return BPC_GLUE_CAT(BPC_CBLAS_PREFIX, openblas_get_num_threads)();
#else
    (void)k;
    return 0;
#endif
}"""


def _moment_protos(ctx, restrict=""):
    """(name, argument list) of the hoisted-moments functions (templates/c_model.h.j2)."""
    r, x, m = restrict, ctx["real"], ctx["moments"]
    data = ", ".join(f"const {x} *{r}{d}" for d in m["data"])
    return [("precompute", f"{data}, size_t n, double *{r}stats"),
            ("loss_from_moments", f"const {x} *{r}params, const double *{r}stats, double *{r}loss"),
            ("backward_from_moments", f"const {x} *{r}params, const double *{r}stats, double *{r}loss, {x} *{r}grads")]


def _step_args(real, restrict=""):
    """(name, argument list) of each update step (templates/c_model.h.j2 documents them)."""
    r, x = restrict, real
    return [("sgd_step", f"{x} *{r}params, const {x} *{r}grads, size_t count, {x} lr, {x} weight_decay"),
            ("momentum_step", f"{x} *{r}params, const {x} *{r}grads, {x} *{r}velocity, size_t count, {x} lr, "
                              f"{x} momentum, int nesterov, {x} weight_decay"),
            ("adam_step", f"{x} *{r}params, const {x} *{r}grads, {x} *{r}m, {x} *{r}v, size_t count, {x} lr, "
                          f"{x} beta1, {x} one_minus_beta1, {x} beta2, {x} one_minus_beta2, {x} eps, {x} c1, "
                          f"{x} c2, {x} lr_weight_decay")]


def _proto_args(fn, real, restrict=""):
    r = restrict
    args = [f"const {real} *{r}params"]
    if fn["name"] in SECOND_ORDER:
        args.append(f"const {real} *{r}v")
    args += [f"const {x['ctype']} *{r}{x['cname']}" for x in fn["leaves"]]
    args.append("size_t n")
    if fn["name"] == "forward":
        args.append(f"{real} *{r}out")
    else:
        args.append(f"{real} *{r}loss")
    if fn["name"] in ("backward", "per_example_grads", *SECOND_ORDER):
        args.append(f"{real} *{r}grads")
    if fn["name"] in SECOND_ORDER:
        args.append(f"{real} *{r}hv")
    if fn["stats"]:
        args.append(f"{real} *{r}stats_out")
    args.append(f"{real} *{r}work")
    return ", ".join(args)


# ---- building -----------------------------------------------------------------------------

def _compiler_command():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)


@functools.lru_cache(maxsize=None)
def _toolchain():
    """(compiler argv, its version text, Python include dir); a clear error when missing."""
    cc = _compiler_command()
    if not cc or shutil.which(cc[0]) is None:
        raise UnsupportedError(
            f"the C target needs a C compiler, and {cc[0] if cc else 'cc'!r} was not found "
            "(install gcc or clang, or set CC); the NumPy target (compile_model) still works")
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        raise UnsupportedError(
            f"the C target needs the Python development headers (Python.h not found in {include}; "
            "e.g. apt install python3-dev); the NumPy target (compile_model) still works")
    try:
        import cffi  # noqa: F401
    except ImportError:
        raise UnsupportedError("the C target needs cffi (pip install cffi, or the 'c' extra of bpc); "
                               "the NumPy target (compile_model) still works") from None
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError as e:
        raise UnsupportedError(f"cannot run the C compiler {cc[0]!r}: {e}; the NumPy target still works") from None
    return tuple(cc), version.strip(), include


@functools.lru_cache(maxsize=None)
def _native():
    """(flags, machine description) for code tuned to this machine's CPU: ``-march=native`` when
    the compiler takes it, with what it expands to here (the instruction sets found, AVX2 or
    AVX-512 on x86) as the description that keys the build cache, so that a cache shared by
    machines of different CPUs never hands one of them a build it cannot run. ((), "") when the
    compiler refuses it (the build then runs the portable baseline of the target)."""
    cc = list(_toolchain()[0])
    try:
        proc = subprocess.run([*cc, "-march=native", "-###", "-E", "-x", "c", os.devnull],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return (), ""
    text = proc.stderr + proc.stdout
    if proc.returncode != 0:
        return (), ""
    # the lines of the commands it would run: the CPU and its features, spelled out
    described = " ".join(line.strip() for line in text.splitlines() if "march" in line or "target-cpu" in line)
    return ("-march=native",), described


def _link_flags():
    if sys.platform == "darwin":
        return ["-bundle", "-undefined", "dynamic_lookup"]
    if sys.platform == "win32":
        raise UnsupportedError("building the C target on Windows is not supported yet; "
                               "the NumPy target (compile_model) still works")
    return ["-shared"]


def build_extension(compiled, cache=None, blas="auto"):
    """Build ``compiled``'s cffi extension into the cache, unless it is already there; with the
    BLAS ``blas`` chooses (compiler.backends.c.blas.choose), or the portable loops."""
    cc, cc_version, include = _toolchain()   # first: a missing cffi, compiler or Python.h is a clear error
    import cffi

    lib = _blas.choose(blas)
    ffi = cffi.FFI()
    ffi.cdef(compiled.cdef)
    ffi.set_source(compiled.ext_name, compiled.ext_source)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    native, machine = _native()
    flags = [*CFLAGS, *native, *_link_flags(), *(lib.compile_flags if lib else [])]
    libs = [*(lib.link_flags if lib else []), "-lm"]
    key = hashlib.sha256("\0".join([
        compiled.c_hash, compiled.ext_name, " ".join(cc), cc_version, " ".join(flags), " ".join(libs),
        lib.key() if lib else "no BLAS", machine, sys.version, suffix, cffi.__version__, sys.platform]).encode()).hexdigest()
    root = Path(cache) if cache is not None else cache_dir() / "c"
    so = _cached(root, key, compiled.ext_name + suffix)
    if so is not None:
        stats["cache_hits"] += 1
        return so
    try:
        root.mkdir(parents=True, exist_ok=True)
        _cache.remove_stale_builds(root)
        tmp = _cache.build_dir(root)
    except OSError as e:   # a read-only cache, or a cache path that is a file
        root = _cache.fallback_dir("c", root, e)
        so = _cached(root, key, compiled.ext_name + suffix)
        if so is not None:
            stats["cache_hits"] += 1
            return so
        tmp = _cache.build_dir(root)
    final_dir = root / key[:32]
    so = final_dir / f"{compiled.ext_name}{suffix}"
    try:
        (tmp / f"{compiled.prefix}.h").write_text(compiled.header)
        (tmp / f"{compiled.prefix}.c").write_text(compiled.c_source)
        glue = tmp / f"{compiled.ext_name}.c"
        with contextlib.redirect_stdout(io.StringIO()):   # cffi announces "generating ..."
            ffi.emit_c_code(str(glue))
        out = tmp / so.name
        # no -I for the build directory: "<prefix>.c" and "<prefix>.h" are found beside the glue
        # by their quoted includes, and a model named limits or stdio cannot hide a system header
        # relative file names, run in the build directory: its random name does not end up in
        # the library, so builds of the same key are byte-identical (one checksum for all)
        cmd = [*cc, *flags, f"-I{include}", glue.name, "-o", out.name, *libs]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise CBuildError(f"the C compiler failed on the code generated for model {compiled.model.name!r} "
                              f"(exit {proc.returncode}).\ncommand: {shlex.join(cmd)}\n"
                              f"{proc.stdout}{proc.stderr}")
        final_dir.mkdir(parents=True, exist_ok=True)
        for name, text in ((f"{compiled.prefix}.c", compiled.c_source), (f"{compiled.prefix}.h", compiled.header)):
            write_atomic(final_dir / name, text)
        # the checksum first, then the library (each atomically): an installed library always has
        # its checksum; a concurrent build of the same key writes the same bytes
        _cache.record_checksum(out)
        os.replace(_cache.checksum_path(out), _cache.checksum_path(so))
        os.replace(out, so)
        stats["builds"] += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return so


def _cached(root, key, filename):
    """The cached library ``root/<key>/<filename>`` if it is there and intact, else None; a
    damaged one (truncated, emptied, overwritten: loading it could kill the process with
    SIGBUS) is reported with a warning, and replaced by the rebuild."""
    so = root / key[:32] / filename
    state = _cache.verify(so)
    if state == "ok":
        return so
    if state == "damaged":
        stats["damaged"] += 1
        warnings.warn(f"bpc: the cached C extension {so} does not match the checksum recorded when it "
                      "was built (truncated or overwritten?); rebuilding it", _cache.CacheWarning, stacklevel=4)
    return None


def _import_extension(name, path):
    # (the same C source built with and without a BLAS: one name, two libraries)
    known = sys.modules.get(name)
    if known is not None and getattr(known, "__file__", None) == str(path):
        return known
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
