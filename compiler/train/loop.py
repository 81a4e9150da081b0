"""Training a compiled module: optimizers, learning-rate schedules, clipping, mini-batches,
early stopping, divergence and interrupt handling, and a history of the run.

Works with any loaded module that has the generated interface (``PARAMS``, ``INPUTS``,
``TARGETS``, ``init_params``, ``forward``, ``loss``, ``backward``). The update steps themselves
(``sgd_step``, ``momentum_step``, ``adam_step``, ``clip_grad_norm``) are the ones emitted into
every generated module from ``templates/numpy_optim.py.j2``: one implementation, so a run here
and a hand-written loop over the generated file's ``train_step`` update identically.

Example::

    module = compile_model(mlp([64, 64, 10], "relu", "softmax_cross_entropy")).load()
    result = train(module, {"x": X, "y": labels},
                   TrainConfig(optimizer="adam", lr=1e-3, epochs=50, val_split=0.2, patience=10))
    result.params, result.history.val_loss, result.final["val_accuracy"]

Conventions: epochs are numbered from 1; the learning-rate schedule is evaluated once per
epoch; data arrays are batch-first and named like the module's INPUTS and TARGETS.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np

# the options, TrainConfig and TrainError are declared in options (pure Python); re-exported here
from compiler.spec.train_options import DEFAULT_LR, SECOND_ORDER, TrainConfig, TrainError  # noqa: F401
from compiler.train import privacy


def lr_at(config, epoch):
    """The learning rate of ``epoch`` (1-based) under the config's schedule."""
    lr, e = config.base_lr, epoch - 1
    if config.schedule == "step":
        size = config.step_size or max(1, config.epochs // 3)
        return lr * config.gamma ** (e // size)
    if config.schedule == "cosine":
        span = max(1, config.epochs - 1)
        return config.min_lr + (lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(e, span) / span))
    return lr


@functools.lru_cache(maxsize=None)
def update_steps():
    """The update steps of the generated modules (rendered from ``numpy_optim.py.j2``), as a
    namespace: ``sgd_step``, ``momentum_step``, ``adam_step``, ``clip_grad_norm``, ``grad_norm``."""
    return _rendered("numpy_optim.py.j2", "bpc_update_steps")


@functools.lru_cache(maxsize=None)
def module_checks():
    """The argument checks of the generated modules (rendered from ``_checks.py.j2``), as a
    namespace: ``check_data`` judges class labels with the functions the modules call."""
    return _rendered("_checks.py.j2", "bpc_module_checks")


def _rendered(name, module_name):
    import types
    from collections.abc import Mapping

    from compiler.backends.templates import render, template_dir
    namespace = types.ModuleType(module_name)
    namespace.np, namespace._Mapping = np, Mapping
    # has_tokens: the checks of token ids and of a sequence's labels too (modules render them
    # only when they have such arguments)
    exec(compile(render(name, has_tokens=True), str(template_dir() / name), "exec"), namespace.__dict__)
    return namespace


def _step_function(config):
    steps = update_steps()
    if config.optimizer == "sgd":
        return functools.partial(steps.sgd_step, weight_decay=config.weight_decay)
    if config.optimizer in ("momentum", "nesterov"):
        return functools.partial(steps.momentum_step, momentum=config.momentum,
                                 nesterov=config.optimizer == "nesterov", weight_decay=config.weight_decay)
    return functools.partial(steps.adam_step, beta1=config.beta1, beta2=config.beta2, eps=config.eps,
                             weight_decay=config.weight_decay)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def data_names(module):
    """Names of the arrays ``backward`` takes, in order: INPUTS then TARGETS."""
    return list(module.INPUTS) + list(module.TARGETS)


def task(module):
    """"multiclass", "binary" or "regression": what accuracy means for this module."""
    loss = getattr(module, "LOSS", None)
    if len(module.TARGETS) == 1:
        (target,) = module.TARGETS
        if target in getattr(module, "CLASSES", {}) or loss == "softmax_cross_entropy":
            return "multiclass"
        if loss == "bce_with_logits" or (loss is None and "sigmoid of the logits" in (module.forward.__doc__ or "")):
            return "binary"
    return "regression"


def scored_outputs(module):
    """The outputs whose accuracy evaluation counts: ``[(name, output index, target index, kind)]``,
    kind "multiclass" or "binary" (see ``task``); the target index counts INPUTS then TARGETS.
    A module of one output: ``[(None, None, ...)]`` for a classifier, ``[]`` for a regression. A
    module of several (OUTPUTS): each output scored by softmax cross-entropy or BCE, by name."""
    n_in = len(module.INPUTS)
    outputs = getattr(module, "OUTPUTS", None)
    if not outputs:
        kind = task(module)
        return [] if kind == "regression" else [(None, None, n_in, kind)]
    targets = list(module.TARGETS)
    kinds = {"softmax_cross_entropy": "multiclass", "bce_with_logits": "binary"}
    return [(name, i, n_in + targets.index(module.OUTPUT_TARGETS[name]), kinds[module.OUTPUT_LOSSES[name]])
            for i, name in enumerate(outputs) if module.OUTPUT_LOSSES[name] in kinds]


def count_correct(kind, pred, y):
    """The samples of a chunk classified right (a float: per sample, the fraction of its positions
    or outputs that are right): ``pred`` the probabilities forward returns, ``y`` the targets."""
    if kind == "multiclass":
        # a sequence's labels (n, T) against probabilities (n, T, classes): per sample,
        # the fraction of its positions classified right
        labels = y if y.ndim == pred.ndim - 1 else np.argmax(y, axis=-1)
        return float(np.sum(np.argmax(pred, axis=-1) == labels)) / max(1, labels[0].size)
    # per sample, the fraction of its outputs on the right side of 0.5
    if pred.shape != y.shape and pred.size == y.size:
        pred = pred.reshape(y.shape)    # a (n, 1) output against a (n,) target
    return float(np.sum((pred > 0.5) == (y > 0.5))) / max(1, y[0].size)


def check_data(module, data, what="data"):
    """Validate ``data`` (a dict name -> array, or a sequence in the order of INPUTS then
    TARGETS) against the module and return a dict of arrays ready for ``backward``.

    Raises TrainError naming the array and the problem: missing or unknown arrays, wrong
    per-sample shapes, different sample counts, labels that are not integers in range,
    NaN or Inf values (with the first bad row)."""
    names = data_names(module)
    if not isinstance(data, dict):
        data = list(data)
        if len(data) != len(names):
            raise TrainError(f"{what}: expected {len(names)} arrays ({', '.join(names)}), got {len(data)}")
        data = dict(zip(names, data))
    missing = [n for n in names if n not in data]
    if missing:
        several = (f"; a model with several inputs reads one array per input, named like it: "
                   f"numpy.savez(path, {', '.join(f'{n}=...' for n in names)})" if len(module.INPUTS) > 1 else "")
        raise TrainError(f"{what}: no array named {', '.join(map(repr, missing))} (the model needs "
                         f"{', '.join(names)}; found {', '.join(map(repr, data)) or 'none'}){several}")
    kinds = getattr(module, "TARGET_KINDS", {})
    classes = getattr(module, "CLASSES", {})
    vocab = getattr(module, "VOCAB", {})
    out, count = {}, None
    for name in names:
        shape = tuple(module.INPUTS.get(name, module.TARGETS.get(name)))
        a = np.asarray(data[name])
        label = kinds.get(name) == "label"
        if a.dtype.kind not in "biuf":
            raise TrainError(f"{what}: array {name!r} must hold numbers, got dtype {a.dtype}")
        want = shape    # () for one label per sample, (T,) for a sequence's labels or token ids
        if a.ndim >= 1 and a.shape[1:] != want:
            if a.shape[1:] and want and math.prod(a.shape[1:]) == math.prod(want):
                a = a.reshape((a.shape[0],) + want)       # (n, 8, 8) for (64,); (n, 64) for (8, 8, 1)
            elif want == (1,) and a.ndim == 1:
                a = a.reshape(-1, 1)
            elif want == () and a.shape[1:] == (1,):
                a = a.reshape(-1)
        if a.ndim == 0 or a.shape[1:] != want:
            raise TrainError(f"{what}: array {name!r} must have shape (samples,) + {want}, got {a.shape}")
        if a.shape[0] == 0:
            raise TrainError(f"{what}: no samples (array {name!r} is empty)")
        if count is None:
            count = a.shape[0]
        elif a.shape[0] != count:
            raise TrainError(f"{what}: arrays have different numbers of samples "
                             f"({names[0]!r}: {count}, {name!r}: {a.shape[0]})")
        if a.dtype.kind == "f":
            finite = np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
            if not finite.all():
                row = int(np.argmin(finite))
                raise TrainError(f"{what}: array {name!r} holds NaN or Inf (first at sample {row}, "
                                 f"{int((~finite).sum())} sample(s) in all); clean the data first")
        if name in vocab or (label and shape):
            a = _tokens(a, what, name, vocab.get(name, classes.get(name)), shape,
                        "token ids" if name in vocab else "labels")
        elif label:
            a = _labels(a, f"{what}: target {name!r}", classes.get(name))
        elif a.dtype.kind != "f":
            a = a.astype(np.float64)
        out[name] = a
    return out


def _tokens(a, where, name, classes, shape, kind):
    """Token ids or a sequence's labels, judged by the modules' ``_tokens`` (integers in range)."""
    try:
        return module_checks()._tokens(a, name, classes, shape, kind)
    except ValueError as e:
        raise TrainError(f"{where}: {e}") from None


def _labels(a, name, classes):
    """Class labels as an integer array, judged as the generated modules judge their arguments
    (the same functions): floats holding integers are converted; anything else, or a label
    outside 0..classes-1, is a TrainError. ``classes`` None (a module without CLASSES): >= 0."""
    checks = module_checks()
    bound = np.iinfo(np.int64).max if classes is None else classes
    try:
        if a.dtype.kind not in "iu":
            a = checks._label_array(a, name, bound)
        if a.size and (a.min() < 0 or a.max() >= bound):
            raise checks._label_range(a, name, bound)
    except ValueError as e:
        raise TrainError(str(e)) from None
    return a


def split(data, fraction, seed=0):
    """``(train, validation)``: a random ``fraction`` of the samples held out (seeded)."""
    n = len(next(iter(data.values())))
    if not fraction:
        return data, None
    k = int(round(n * fraction))
    if k < 1 or k >= n:
        raise TrainError(f"a validation split of {fraction} of {n} samples leaves "
                         f"{n - k} for training and {k} for validation; both need at least one")
    order = np.random.default_rng([seed, 1]).permutation(n)
    val, tr = order[:k], np.sort(order[k:])
    return ({k_: v[tr] for k_, v in data.items()}, {k_: v[np.sort(val)] for k_, v in data.items()})


def _rows(data, index):
    return [a[index] for a in data.values()]


def evaluate(module, params, data, chunk=8192, stats=None):
    """``{"loss": ..., "accuracy": ... or None, "accuracies": {...}}`` on ``data`` (checked dict),
    in chunks of ``chunk`` positions (samples of one position, or ``chunk // T`` sequences of T
    token ids: a language model's attention holds T*T scores per head and sample), in inference
    mode (a model with batchnorm normalises with the running statistics ``stats``; default: those
    before training, ``init_stats()``). A model of several outputs has no single accuracy
    ("accuracy" None): "accuracies" holds each classifier output's, by name ({} otherwise)."""
    arrays = list(data.values())
    positions = max([math.prod(module.INPUTS[k]) for k in getattr(module, "VOCAB", {})] or [1])
    chunk = max(1, chunk // positions)
    mode = {}
    if getattr(module, "STATS", None):
        mode = {"stats": stats if stats is not None else module.init_stats(_float_dtype(arrays))}
    n = len(arrays[0])
    scored = scored_outputs(module)
    total, correct = 0.0, [0.0] * len(scored)
    n_in = len(module.INPUTS)
    for lo in range(0, n, chunk):
        part = [a[lo:lo + chunk] for a in arrays]
        m = len(part[0])
        total += module.loss(params, *part, **mode) * m
        if scored:
            out = module.forward(params, *part[:n_in], **mode)
            for k, (_, i, t, kind) in enumerate(scored):
                correct[k] += count_correct(kind, np.asarray(out if i is None else out[i]), part[t])
    return accuracy_result(total / n, scored, [c / n for c in correct])


def accuracy_result(loss, scored, accuracies):
    """evaluate's dict from the loss and the accuracy of each scored output (scored_outputs)."""
    single = len(scored) == 1 and scored[0][0] is None
    return {"loss": loss, "accuracy": accuracies[0] if single else None,
            "accuracies": {} if single else {s[0]: a for s, a in zip(scored, accuracies)}}


def _float_dtype(arrays):
    return np.float32 if arrays and arrays[0].dtype == np.float32 else np.float64


def check_stats(module, arrays, where="stats"):
    """The running statistics (STATS) of a batchnorm model among ``arrays`` (a saved parameters
    file holds them beside the parameters), checked; None for a model without them or a file
    without them (then training starts from init_stats())."""
    names = list(getattr(module, "STATS", None) or {})
    if not names or not any(k in arrays for k in names):
        return None
    missing = [k for k in names if k not in arrays]
    if missing:
        raise TrainError(f"{where}: running statistics missing: {', '.join(missing)} (the model has {', '.join(names)})")
    out = {}
    for name in names:
        a = np.array(arrays[name])
        if a.shape != tuple(module.STATS[name]) or a.dtype.kind != "f" or not np.all(np.isfinite(a)):
            raise TrainError(f"{where}: running statistic {name!r} must be finite floats of shape "
                             f"{tuple(module.STATS[name])}, got {a.dtype} {a.shape}")
        out[name] = a
    return out


def load_params(module, path):
    """Parameters saved with ``save_params`` (or any ``.npz`` of arrays named like PARAMS),
    checked against the module's parameter names and shapes."""
    return check_params(module, read_npz(path), str(path))


def read_npz(path):
    """The arrays of a ``.npz`` file as a dict; a clear TrainError for anything else (no pickles)."""
    from pathlib import Path
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"{path}: no such file" if not p.exists() else f"{path}: not a file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic[:2] != b"PK":
            raise TrainError(f"{path}: not a readable .npz file (a .npz is the zip archive numpy.savez writes)")
        with np.load(p, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except TrainError:
        raise
    except ValueError as e:
        raise TrainError(f"{path}: cannot read the archive ({e})") from None
    except Exception as e:                       # zipfile.BadZipFile, OSError, EOFError, ...
        raise TrainError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


def check_params(module, params, where="params"):
    """The parameters among ``params``, checked (a batchnorm model's running statistics, saved
    beside them, are read by ``check_stats``)."""
    missing = [k for k in module.PARAMS if k not in params]
    extra = [k for k in params if k not in module.PARAMS and k not in (getattr(module, "STATS", None) or {})]
    if missing or extra:
        raise TrainError(f"{where}: parameters do not match the model (missing: {', '.join(missing) or 'none'}; "
                         f"unknown: {', '.join(extra) or 'none'})")
    out = {}
    for name, shape in module.PARAMS.items():
        a = np.array(params[name])              # a private, writeable copy
        if a.shape != tuple(shape):
            raise TrainError(f"{where}: parameter {name!r} has shape {a.shape}, the model needs {tuple(shape)}")
        if a.dtype.kind != "f":
            raise TrainError(f"{where}: parameter {name!r} must be floating point, got {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise TrainError(f"{where}: parameter {name!r} holds NaN or Inf")
        out[name] = a
    return out


def save_params(params, path, stats=None):
    """Write the parameters (and a batchnorm model's running statistics ``stats``, beside them
    under their STATS names) to ``path`` as ``.npz`` atomically (never a partial file)."""
    from pathlib import Path

    from compiler.files import atomic_file

    with atomic_file(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in {**params, **(stats or {})}.items()})
    return Path(path)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

@dataclass
class History:
    """Per-epoch record of a run (lists indexed like ``epoch``)."""

    epoch: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)      # mean of the epoch's mini-batch losses
    val_loss: list = field(default_factory=list)        # empty without a validation split
    val_accuracy: list = field(default_factory=list)    # classifiers with a validation split
    val_accuracies: dict = field(default_factory=dict)  # several outputs: classifier output -> its val_accuracy
    grad_norm: list = field(default_factory=list)       # epoch mean of the global norm, before clipping
    param_grad_norms: dict = field(default_factory=dict)  # name -> epoch means of that gradient's norm
    seconds: list = field(default_factory=list)         # wall time at the end of each epoch

    def as_dict(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class TrainResult:
    """What ``train`` returns. ``params`` are the ones to keep: the best on validation (or, without
    a validation split, the final ones; after Ctrl-C the best so far; after divergence the last
    parameters whose loss was finite)."""

    params: dict
    history: History
    stopped: str            # "completed" | "early_stopping" | "diverged" | "interrupted" | "workers_lost"
    message: str
    best_epoch: int | None
    final: dict             # train_loss, train_accuracy, val_loss, val_accuracy (None where absent);
                            # train_accuracies, val_accuracies: per classifier output of a model of several
    warnings: list
    stats: dict | None = None   # batchnorm: the running statistics that go with params
    privacy: dict | None = None  # DP-SGD: epsilon at delta and how it was reached (privacy_report)


class _Reporter:
    """Progress bar on a terminal (stderr), log lines on stdout, warnings on stderr."""

    def __init__(self, verbose, total, stream=None):
        from compiler.progress import Progress
        self.verbose = verbose
        self.progress = Progress(total, "steps", stream, log_every=None) if verbose else None

    def log(self, line):
        if self.verbose:
            self.progress.write(line, sys.stdout)

    def warn(self, line):
        if self.verbose:
            self.progress.write(f"bpc: warning: {line}", sys.stderr)

    def advance(self, steps, status):
        if self.verbose:
            self.progress.update(steps, status)

    def close(self):
        if self.verbose:
            self.progress.close()


def _copy(params):
    return {k: np.array(v, copy=True) for k, v in params.items()}


def _fmt(v):
    return "-" if v is None else f"{v:.4g}"


class StopRequest:
    """Asks a running ``train`` to stop after its current step, as Ctrl-C does (the result
    keeps the best parameters so far). Safe to call from a signal handler or another thread:
    it only sets an attribute, and ``train`` polls it between steps, so no exception is ever
    raised into the middle of the run's bookkeeping or of a save."""

    def __init__(self):
        self.reason = None

    def request(self, reason="stop requested"):
        if self.reason is None:
            self.reason = reason

    def is_set(self):
        return self.reason is not None


class _Stopped(Exception):
    """Raised by the loop itself (between steps) when a StopRequest is set."""


# options that only watch a run: a checkpoint may be resumed with other values of these
RESUMABLE_CHANGES = ("epochs", "patience", "min_delta", "log_every", "vanish_ratio", "vanish_floor",
                     "explode_norm")
CHECKPOINT_KEY = "bpc/checkpoint"       # "/" cannot occur in a parameter name
CHECKPOINT_VERSION = 1


@dataclass
class Checkpoint:
    """The whole state of a run at the end of an epoch: resuming from it continues the run
    exactly as if it had not stopped (same updates, schedule, shuffling and early stopping)."""

    epoch: int
    params: dict                 # the current parameters (not the best)
    state: dict                  # the optimizer's state (Adam's moments and step count, velocities)
    rng: dict                    # the shuffling generator's state
    best: float
    best_epoch: int | None
    best_params: dict | None
    since_best: int
    history: History
    warned: list                 # warnings already given (each once per run)
    warnings: list
    config: dict                 # TrainConfig fields of the run
    data_digest: str             # of the training and validation data, as split
    running: dict | None = None      # batchnorm running statistics of params
    best_running: dict | None = None  # ... and of best_params


def _digest(*sets):
    h = hashlib.sha256()
    for data in sets:
        for name, a in (data or {}).items():
            a = np.ascontiguousarray(a)
            h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.data)
    return h.hexdigest()


def save_checkpoint(ckpt, path):
    """Write a Checkpoint to ``path`` (.npz, no pickles) atomically."""
    from pathlib import Path

    from compiler.files import atomic_file
    arrays, scalars = {}, {}
    for name, a in ckpt.params.items():
        arrays[f"params/{name}"] = np.asarray(a)
    for name, a in (ckpt.best_params or {}).items():
        arrays[f"best/{name}"] = np.asarray(a)
    for group, stats in (("running", ckpt.running), ("bestrunning", ckpt.best_running)):
        for name, a in (stats or {}).items():
            arrays[f"{group}/{name}"] = np.asarray(a)
    for key, value in ckpt.state.items():
        if isinstance(value, dict):
            for name, a in value.items():
                arrays[f"state/{key}/{name}"] = np.asarray(a)
        else:
            scalars[key] = value.item() if isinstance(value, np.generic) else value
    meta = {"version": CHECKPOINT_VERSION, "epoch": ckpt.epoch, "state": scalars, "rng": ckpt.rng,
            "best": ckpt.best, "best_epoch": ckpt.best_epoch, "since_best": ckpt.since_best,
            "history": ckpt.history.as_dict(), "warned": ckpt.warned, "warnings": ckpt.warnings,
            "config": ckpt.config, "data_digest": ckpt.data_digest, "has_best": ckpt.best_params is not None}
    arrays[CHECKPOINT_KEY] = np.array(json.dumps(meta))     # floats round-trip exactly through repr
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def is_checkpoint(arrays):
    return CHECKPOINT_KEY in arrays


def load_checkpoint(module, path):
    """A Checkpoint written by ``train(..., checkpoint=...)``, checked against the module."""
    return checkpoint_from_arrays(module, read_npz(path), str(path))


def checkpoint_from_arrays(module, arrays, where):
    if not is_checkpoint(arrays):
        raise TrainError(f"{where}: not a bpc checkpoint (a parameters file? those resume the parameters only)")
    try:
        meta = json.loads(str(arrays[CHECKPOINT_KEY]))
        if meta.get("version") != CHECKPOINT_VERSION:
            raise TrainError(f"{where}: checkpoint format {meta.get('version')!r}; this bpc reads "
                             f"{CHECKPOINT_VERSION}")
        part = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}  # noqa: E731
        params = check_params(module, part("params/"), where)
        best_params = check_params(module, part("best/"), where) if meta["has_best"] else None
        state = dict(meta["state"])
        for key, a in part("state/").items():
            group, _, name = key.partition("/")
            state.setdefault(group, {})[name] = np.array(a)
        h = meta["history"]
        # (val_accuracies: absent from the checkpoints of a bpc before models of several outputs)
        history = History(**{f.name: h[f.name] for f in fields(History) if f.name in h or f.name != "val_accuracies"})
        running = check_stats(module, part("running/"), where)
        best_running = check_stats(module, part("bestrunning/"), where)
        return Checkpoint(int(meta["epoch"]), params, state, meta["rng"], float(meta["best"]), meta["best_epoch"],
                          best_params, int(meta["since_best"]), history, [_key(k) for k in meta["warned"]],
                          list(meta["warnings"]), dict(meta["config"]), str(meta["data_digest"]),
                          running, best_running)
    except TrainError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TrainError(f"{where}: a damaged checkpoint ({type(e).__name__}: {e})") from None


def _key(k):
    return tuple(k) if isinstance(k, list) else k


def _resume_check(config, ckpt, digest):
    ours = {f.name: getattr(config, f.name) for f in fields(config)}
    changed = [f"{k} {ckpt.config.get(k)!r} -> {ours[k]!r}" for k in ours
               if k not in RESUMABLE_CHANGES and ckpt.config.get(k) != ours[k]]
    if changed:
        raise TrainError("the checkpoint's run had other options (" + "; ".join(changed) + "); resume with the "
                         "same options, or start a new run from its parameters")
    if ckpt.data_digest != digest:
        raise TrainError("the checkpoint's run had other training or validation data; resume with the same "
                         "data, or start a new run from its parameters")
    if ckpt.epoch >= config.epochs:
        raise TrainError(f"the checkpoint is at epoch {ckpt.epoch} of the run; epochs {config.epochs} leaves "
                         "nothing to train (epochs counts the whole run: give more)")


def _history_upto(h, k):
    """The first ``k`` epochs of a History (a new one)."""
    def upto(v):
        return {n: vs[:k] for n, vs in v.items()} if isinstance(v, dict) else v[:k]
    return History(**{f.name: upto(getattr(h, f.name)) for f in fields(History)})


def _run_dtype(module, train_set):
    first = next(iter(train_set.values()))
    return getattr(module, "DTYPE", None) or (np.float32 if first.dtype == np.float32 else np.float64)


def _in_module_dtype(module, data):
    """``data`` with its float arrays in the dtype the module was compiled for (if it was):
    converted once for the run, instead of by the module at every step (float64 data for a
    float32 module). The data's digest is taken before, so checkpoints do not depend on it."""
    dtype = getattr(module, "DTYPE", None)
    if data is None or dtype is None:
        return data
    return {k: a.astype(dtype) if a.dtype.kind == "f" and a.dtype != dtype else a for k, a in data.items()}


def _upcast(params, dtype, warn):
    """float16 (or any float other than float32/64) parameters are trained in ``dtype``:
    float16 has 11 significant bits and overflows at 65504, so small updates round away and
    Adam's squared gradients overflow; runs diverged at their second step."""
    odd = [k for k, a in params.items() if a.dtype not in (np.float32, np.float64)]
    if not odd:
        return params
    kinds = sorted({str(params[k].dtype) for k in odd})
    warn("dtype", f"parameter(s) {', '.join(odd)} are {'/'.join(kinds)}: trained in {np.dtype(dtype).name} "
                  "(bpc trains in float32 or float64; float16 loses small updates and overflows)")
    return {k: (a.astype(dtype) if k in odd else a) for k, a in params.items()}


def train(module, data, config=None, *, params=None, val_data=None, verbose=False, on_epoch=None,
          stop=None, resume=None, checkpoint=None, checkpoint_every=None, stats=None, client=None):
    """Train ``module`` on ``data`` and return a TrainResult.

    ``data``: a dict name -> array (names of INPUTS and TARGETS) or a sequence in that order.
    ``params``: initial parameters (e.g. ``load_params``); default ``init_params(seed)``
    in the dtype of the module (or float32 when the inputs are float32). float16 parameters
    are trained in that dtype instead, with a warning.
    ``val_data``: a separate validation set; otherwise ``config.val_split`` of ``data`` is held out.
    ``verbose``: progress bar on a terminal, a log line every ``log_every`` epochs, warnings.
    ``on_epoch(epoch, history)``: called after every epoch; return True to stop.
    ``stop``: a StopRequest (anything with ``is_set()``), checked after every step.
    ``checkpoint``, ``checkpoint_every``: write a Checkpoint to the path ``checkpoint`` after
    every ``checkpoint_every``-th epoch and after the last one, and, when the run is stopped
    (interrupted or early stopping), of its last complete epoch.
    ``stats``: a batchnorm model's running statistics to start from (default ``init_stats()``);
    every step updates them, evaluation uses them, and the result carries those of its params.
    ``resume``: a Checkpoint (``load_checkpoint``) to continue from: the same options (but
    ``epochs``, which counts the whole run, and the monitoring options) and the same data.
    ``client``: a ``dask.distributed.Client``: the gradients of every global batch are computed
    on its workers (compiler.train.distributed), the rest of the run is this one; a run that
    loses all its workers stops (``stopped == "workers_lost"``) keeping the last step's parameters.

    Ctrl-C (or a StopRequest) stops the run; the result carries the best parameters so far
    (``stopped == "interrupted"``). A NaN or Inf loss or gradient stops the run and keeps the
    last parameters whose loss was finite (``stopped == "diverged"``).
    """
    config = (config or TrainConfig()).validate()
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise TrainError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
        if checkpoint is None:
            raise TrainError("checkpoint_every needs a checkpoint path")
    if resume is not None and params is not None:
        raise TrainError("give either params or a checkpoint to resume from, not both")
    data = check_data(module, data)
    if val_data is not None:
        if config.val_split:
            raise TrainError("give either a validation set or a validation split, not both")
        train_set, val_set = data, check_data(module, val_data, "validation data")
    else:
        train_set, val_set = split(data, config.val_split, config.seed)
    digest = _digest(train_set, val_set)
    if resume is not None:
        _resume_check(config, resume, digest)
        params = resume.params
    elif params is None:
        params = module.init_params(seed=config.seed, dtype=_run_dtype(module, train_set))
    params = check_params(module, params)
    train_set, val_set = _in_module_dtype(module, train_set), _in_module_dtype(module, val_set)
    if config.optimizer in SECOND_ORDER:
        if client is not None or config.private:
            raise TrainError(f"--optimizer {config.optimizer} is a full-batch fit in one process: no Dask client "
                             "and no DP-SGD (leave those out, or use a first-order optimizer)")
        return _second_order(module, config, train_set, val_set, params, verbose, resume, checkpoint)

    run = _Run(module, config, train_set, val_set, params, digest, resume, verbose, checkpoint, checkpoint_every)
    if config.private:
        if client is not None:
            raise TrainError("DP-SGD runs on one process: its per-example clipping is not distributed to Dask "
                             "workers (leave out the client, or dp_clip/dp_noise)")
        _check_private(module, train_set, params)
    if getattr(module, "STATS", None) and run.running is None:
        run.running = dict(stats) if stats is not None else module.init_stats(_run_dtype(module, train_set))
        run.last_good_running = dict(run.running)
    stopped, message, in_step = "completed", "", False
    try:
        if client is not None:
            from compiler.train.distributed import DaskGradients
            run.remote = DaskGradients(client, module, train_set, run.warn)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite values are handled
            for epoch in range(run.start + 1, config.epochs + 1):
                end = _epoch(run, epoch, stop, on_epoch)
                if end is not None:
                    stopped, message = end
                    break
    except _Diverged as e:
        stopped, message, in_step = "diverged", str(e), e.in_step
    except TrainError as e:
        from compiler.train.distributed import WorkersLost
        if not isinstance(e, WorkersLost):
            raise
        stopped, message = "workers_lost", str(e)
    except (KeyboardInterrupt, _Stopped) as e:
        stopped = "interrupted"
        reason = getattr(stop, "reason", None) if isinstance(e, _Stopped) else None
        message = (f"interrupted{f' by {reason}' if reason else ''} during epoch {run.epoch}; kept the best "
                   "parameters so far" + (f" (epoch {run.best_epoch}, {run.monitor} {run.best:.6g})" if run.best_epoch
                                          else " (no epoch completed: the last parameters with a finite loss)"))
    finally:
        run.report.close()
        if run.remote is not None:
            run.remote.close()
    if run.snapshot is not None and run.snapshot.epoch > run.written and stopped in ("interrupted", "early_stopping",
                                                                                     "workers_lost"):
        run.save_snapshot()        # a stopped run can be resumed from its last complete epoch
    return _outcome(run, stopped, message, in_step)


def _second_order(module, config, train_set, val_set, params, verbose, resume, checkpoint):
    """A full-batch L-BFGS or Newton-CG fit (compiler/train/second_order.py) as a TrainResult."""
    from compiler.train import second_order
    second_order.check_second_order(module, config)
    if resume is not None or checkpoint is not None:
        raise TrainError(f"--optimizer {config.optimizer} runs in one go: no --checkpoint or --resume")
    history = History(param_grad_norms={k: [] for k in module.PARAMS})
    report = _Reporter(verbose, config.epochs)
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            params, stopped, message = second_order.fit(module, config, train_set, val_set, params,
                                                        data_names(module), verbose, history, report, evaluate)
    except KeyboardInterrupt:
        stopped, message = "interrupted", f"interrupted; kept the initial parameters ({config.optimizer})"
    finally:
        report.close()
    final = {"train_loss": None, "train_accuracy": None, "val_loss": None, "val_accuracy": None,
             "train_accuracies": {}, "val_accuracies": {}}
    ev = evaluate(module, params, train_set)
    final.update(train_loss=ev["loss"], train_accuracy=ev["accuracy"], train_accuracies=ev["accuracies"])
    if val_set is not None:
        ev = evaluate(module, params, val_set)
        final.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"], val_accuracies=ev["accuracies"])
    return TrainResult(params, history, stopped, message, None, final, [])


def _check_private(module, train_set, params):
    """DP-SGD needs per-example gradients: a TrainError naming why a module has none."""
    if not hasattr(module, "per_example_grads"):
        raise TrainError("DP-SGD needs the module's per_example_grads (compile it again with this bpc)")
    one = [a[:1] for a in train_set.values()]
    mode = {"training": True, "seed": 0} if getattr(module, "DROPOUT", None) else {}
    try:
        module.per_example_grads(params, *one, **mode)
    except NotImplementedError as e:
        raise TrainError(f"DP-SGD: {e}") from None


def privacy_report(run_or_config, steps, n, batch):
    """The accounting of a DP-SGD run (compiler.train.privacy): a dict of epsilon at delta, the
    best order, steps, sampling rate, noise multiplier and clip norm."""
    config = run_or_config
    q = batch / n
    eps, order = privacy.epsilon(q, config.dp_noise, steps, config.dp_delta)
    return {"epsilon": eps, "delta": config.dp_delta, "order": order, "steps": steps, "sampling_rate": q,
            "noise_multiplier": config.dp_noise, "clip": config.dp_clip}


class _Diverged(Exception):
    """A NaN or Inf loss or gradient (``in_step``: at a step, so the last parameters with a
    finite loss are kept) or validation loss (the best parameters are kept): the run stops."""

    def __init__(self, message, in_step):
        super().__init__(message)
        self.in_step = in_step


class _Run:
    """The state of one run, which its steps and epochs update in place: parameters, optimizer
    state, shuffling generator, history, the best epoch so far, warnings, the last snapshot."""

    def __init__(self, module, config, train_set, val_set, params, digest, resume, verbose, checkpoint,
                 checkpoint_every):
        self.module, self.config, self.train_set, self.val_set = module, config, train_set, val_set
        self.digest, self.checkpoint, self.checkpoint_every = digest, checkpoint, checkpoint_every
        self.n = len(next(iter(train_set.values())))
        self.batch = self.n if not config.batch_size else min(config.batch_size, self.n)
        self.steps_per_epoch = -(-self.n // self.batch)
        self.update = _step_function(config)
        self.clip = update_steps().clip_grad_norm
        self.rng = np.random.default_rng([config.seed, 2])
        self.log_every = config.log_every or max(1, config.epochs // 10)
        self.names = list(module.PARAMS)
        self.history = History(param_grad_norms={k: [] for k in self.names})
        self.start = 0
        self.state = {}
        self.best, self.best_epoch, self.best_params, self.since_best = math.inf, None, None, 0
        self.warned, self.warnings = set(), []
        # batchnorm: the running statistics of params, of best_params and of last_good (None without)
        self.running = self.best_running = self.last_good_running = None
        if resume is not None:
            self.start, self.history = resume.epoch, copy.deepcopy(resume.history)
            self.state = copy.deepcopy(resume.state)
            self.rng.bit_generator.state = resume.rng
            self.best, self.best_epoch, self.since_best = resume.best, resume.best_epoch, resume.since_best
            self.best_params = _copy(resume.best_params) if resume.best_params is not None else None
            self.warned, self.warnings = set(resume.warned), list(resume.warnings)
            self.running, self.best_running = resume.running, resume.best_running
            self.last_good_running = dict(self.running) if self.running is not None else None
        self.report = _Reporter(verbose, (config.epochs - self.start) * self.steps_per_epoch)
        dtype = _run_dtype(module, train_set)
        self.params = _upcast(params, dtype, self.warn)
        if resume is not None and self.best_params is not None:
            self.best_params = _upcast(self.best_params, dtype, lambda *a: None)
        self.snapshot, self.written = None, self.start  # the state at the end of the last epoch; the last epoch saved
        self.last_good = _copy(self.params)
        self.monitor = "validation loss" if val_set is not None else "training loss"
        self.t0 = time.monotonic() - (self.history.seconds[-1] if self.history.seconds else 0.0)
        self.epoch = self.start
        self.remote = None      # compiler.train.distributed.DaskGradients: the gradients from Dask workers
        # DP-SGD: steps taken (for the accounting) and the sum over them of the fraction of
        # samples whose gradient was clipped; a resumed run continues the count
        self.dp_steps = self.start * self.steps_per_epoch
        self.dp_clipped = 0.0

    def warn(self, key, text):
        if key not in self.warned:
            self.warned.add(key)
            self.warnings.append(text)
            self.report.warn(text)

    def take_snapshot(self, epoch):
        # copies: the next epoch updates params and state in place; the history only grows, so
        # its first `epoch` entries are the snapshot's
        return Checkpoint(epoch, _copy(self.params), copy.deepcopy(self.state), self.rng.bit_generator.state,
                          self.best, self.best_epoch, self.best_params, self.since_best, None,
                          sorted(self.warned, key=str), list(self.warnings),
                          {f.name: getattr(self.config, f.name) for f in fields(self.config)}, self.digest,
                          _copy(self.running) if self.running is not None else None, self.best_running)

    def save_snapshot(self):
        try:
            # the history holds epochs 1, 2, ...: the snapshot's are its first snapshot.epoch entries
            save_checkpoint(replace(self.snapshot, history=_history_upto(self.history, self.snapshot.epoch)),
                            self.checkpoint)
        except OSError as e:        # the run matters more than its checkpoint
            self.warn(("checkpoint", str(e)), f"cannot write the checkpoint {self.checkpoint}: "
                                              f"{e.strerror or e}; training continues")
        self.written = self.snapshot.epoch


def _step(run, index, lr, where, step=()):
    """One mini-batch (``index``: its rows): loss and gradients, the finiteness check, clipping
    and the update of ``run.params`` in place. Returns the loss and each gradient's squared
    norm; raises _Diverged (the parameters untouched) when one of them is not finite. A module
    with dropout runs in training mode, its masks seeded by the run's seed and ``step`` (epoch,
    step), so a run (and a resumed one) draws the same masks; evaluation stays in inference mode."""
    mode = {"training": True, "seed": (run.config.seed, *step)} if getattr(run.module, "DROPOUT", None) else {}
    running = None
    if run.running is not None:      # batchnorm: batch statistics, and the running ones' next values
        running = dict(run.running)
        mode.update(training=True, stats=running)
    if run.remote is not None:       # the same global batch, its slices on Dask workers
        value, grads = run.remote(run.params, index if run.steps_per_epoch > 1 else None, mode, where)
    else:
        arrays = _rows(run.train_set, index) if run.steps_per_epoch > 1 else list(run.train_set.values())
        if run.config.private:
            # DP-SGD: each sample's gradient clipped, the sum noised (seeded by the run's seed and
            # the step, so a resumed run draws the same noise), divided by the batch size
            losses, per_example = run.module.per_example_grads(run.params, *arrays, **mode)
            value = float(np.mean(losses))
            grads, clipped = privacy.private_gradient(per_example, run.config.dp_clip, run.config.dp_noise,
                                                      np.random.default_rng([run.config.seed, 3, *step]))
            run.dp_steps += 1
            run.dp_clipped += clipped
        else:
            value, grads = run.module.backward(run.params, *arrays, **mode)
    sq = {k: float(np.vdot(g64, g64)) for k, g in grads.items() for g64 in [np.asarray(g, dtype=np.float64)]}
    if not math.isfinite(value) or not all(math.isfinite(v) for v in sq.values()):
        bad = [k for k, v in sq.items() if not math.isfinite(v)]
        what = f"the loss is {value}" if not math.isfinite(value) else "a gradient is not finite"
        raise _Diverged(f"{what} at {where}" + (f" (non-finite gradient of {', '.join(bad)})" if bad else "")
                        + "; stopped and kept the last parameters with a finite loss. "
                        "Try a lower learning rate, --clip, or check the data scale.", in_step=True)
    run.last_good = _copy(run.params)
    if running is not None:
        run.last_good_running, run.running = run.running, running
    if run.config.clip is not None:
        grads, _ = run.clip(grads, run.config.clip)
    run.update(run.params, grads, run.state, lr=lr)
    return value, sq


def _epoch(run, epoch, stop, on_epoch):
    """Epoch ``epoch``: its steps over the (shuffled) training set, then its record (history,
    validation, warnings, best parameters, checkpoint, log line). Returns ``(stopped, message)``
    when the run ends after it (early stopping, the callback), else None; raises _Diverged, and
    _Stopped when ``stop`` is set before a step."""
    config, history = run.config, run.history
    run.epoch = epoch
    lr = lr_at(config, epoch)
    order = run.rng.permutation(run.n) if config.shuffle and run.steps_per_epoch > 1 else np.arange(run.n)
    loss_sum, norm_sum, seen = 0.0, 0.0, 0
    pnorm_sum = dict.fromkeys(run.names, 0.0)
    for s in range(run.steps_per_epoch):
        if stop is not None and stop.is_set():
            raise _Stopped
        index = order[s * run.batch:(s + 1) * run.batch]
        value, sq = _step(run, index, lr, f"epoch {epoch}, step {s + 1}", (epoch, s))
        loss_sum += value * len(index)
        seen += len(index)
        norm_sum += math.sqrt(sum(sq.values()))
        for k, v in sq.items():
            pnorm_sum[k] += math.sqrt(v)
        run.report.advance(1, f"epoch {epoch}/{config.epochs} loss {loss_sum / seen:.4g}")
    history.epoch.append(epoch)
    history.lr.append(lr)
    history.train_loss.append(loss_sum / run.n)
    history.grad_norm.append(norm_sum / run.steps_per_epoch)
    for k in run.names:
        history.param_grad_norms[k].append(pnorm_sum[k] / run.steps_per_epoch)
    val = None
    if run.val_set is not None:
        ev = evaluate(run.module, run.params, run.val_set, stats=run.running)
        val = ev["loss"]
        history.val_loss.append(val)
        if ev["accuracy"] is not None:
            history.val_accuracy.append(ev["accuracy"])
        for name, acc in ev["accuracies"].items():
            history.val_accuracies.setdefault(name, []).append(acc)
        if not math.isfinite(val):
            raise _Diverged(f"the validation loss is {val} at epoch {epoch}; stopped and kept the best "
                            "parameters. Try a lower learning rate or --clip.", in_step=False)
    history.seconds.append(time.monotonic() - run.t0)
    _gradient_warnings(history, epoch, config, run.warn)
    monitored = val if val is not None else history.train_loss[-1]
    if monitored < run.best - config.min_delta:
        run.best, run.best_epoch, run.since_best = monitored, epoch, 0
        run.best_params = _copy(run.params)
        run.best_running = run.running
    else:
        run.since_best += 1
    if run.checkpoint_every:
        run.snapshot = run.take_snapshot(epoch)
        if epoch % run.checkpoint_every == 0 or epoch == config.epochs:
            run.save_snapshot()
    if epoch % run.log_every == 0 or epoch == run.start + 1 or epoch == config.epochs:
        run.report.log(_epoch_line(epoch, config.epochs, history, run.val_set is not None))
    if config.patience and run.since_best >= config.patience and epoch < config.epochs:
        return "early_stopping", (f"early stopping at epoch {epoch}: the {run.monitor} has not improved for "
                                  f"{config.patience} epochs (best {run.best:.6g} at epoch {run.best_epoch})")
    if on_epoch is not None and on_epoch(epoch, history):
        return "early_stopping", f"stopped by the callback at epoch {epoch}"
    return None


def _outcome(run, stopped, message, in_step):
    """The TrainResult of a run that ended ``stopped``: the parameters to keep (see TrainResult),
    the message, and the final loss and accuracy on the training and validation sets."""
    params, best = run.params, run.best_params
    # (params, running statistics) chosen together
    current, best_pair = (params, run.running), (best, run.best_running)
    last_good = (run.last_good, run.last_good_running)
    if stopped == "diverged":
        params, running = last_good if in_step else (best_pair if best is not None else current)
    elif stopped == "interrupted":
        params, running = best_pair if best is not None else last_good
    elif stopped == "early_stopping" or (stopped == "completed" and run.val_set is not None):
        params, running = best_pair if best is not None else current
    else:
        params, running = current
    if stopped == "completed":
        message = f"completed {run.config.epochs} epochs"
        if run.val_set is not None:
            message += f"; kept the parameters of epoch {run.best_epoch} (best validation loss {run.best:.6g})"
    final = {"train_loss": None, "train_accuracy": None, "val_loss": None, "val_accuracy": None,
             "train_accuracies": {}, "val_accuracies": {}}
    try:
        ev = evaluate(run.module, params, run.train_set, stats=running)
        final.update(train_loss=ev["loss"], train_accuracy=ev["accuracy"], train_accuracies=ev["accuracies"])
        if run.val_set is not None:
            ev = evaluate(run.module, params, run.val_set, stats=running)
            final.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"], val_accuracies=ev["accuracies"])
    except KeyboardInterrupt:
        pass
    dp = None
    if run.config.private:
        dp = privacy_report(run.config, run.dp_steps, run.n, run.batch)
        done = run.dp_steps - run.start * run.steps_per_epoch
        dp["clipped_fraction"] = run.dp_clipped / done if done else 0.0
        message += (f"; DP-SGD: (epsilon {dp['epsilon']:.3g}, delta {dp['delta']:g}) after {dp['steps']} steps "
                    f"(sampling rate {dp['sampling_rate']:.3g}, noise multiplier {dp['noise_multiplier']:g}, "
                    f"clip {dp['clip']:g}; RDP accountant)")
    return TrainResult(params, run.history, stopped, message, run.best_epoch, final, run.warnings, running, dp)


def _epoch_line(epoch, epochs, h, has_val):
    width = len(str(epochs))
    parts = [f"epoch {epoch:{width}d}/{epochs}", f"loss {h.train_loss[-1]:.6g}"]
    if has_val:
        parts.append(f"val {h.val_loss[-1]:.6g}")
        if h.val_accuracy:
            parts.append(f"val acc {100 * h.val_accuracy[-1]:.2f}%")
        parts += [f"val acc {name} {100 * acc[-1]:.2f}%" for name, acc in h.val_accuracies.items()]
    parts.append(f"lr {h.lr[-1]:.3g}")
    norms = " ".join(f"{k} {v[-1]:.2e}" for k, v in h.param_grad_norms.items())
    parts.append(f"|grad| {h.grad_norm[-1]:.3e} ({norms})")
    return "  ".join(parts)


def _gradient_warnings(h, epoch, config, warn):
    norms = {k: v[-1] for k, v in h.param_grad_norms.items()}
    top = max(norms.values(), default=0.0)
    if h.grad_norm[-1] > config.explode_norm:
        warn("explode", f"exploding gradients at epoch {epoch}: global gradient norm {h.grad_norm[-1]:.3g} "
             f"> {config.explode_norm:g}" + ("" if config.clip else "; consider --clip or a lower learning rate"))
    if top > config.vanish_floor and len(norms) > 1:
        for k, v in norms.items():
            if v < config.vanish_ratio * top:
                warn(("vanish", k), f"vanishing gradient at epoch {epoch}: parameter {k!r} has gradient norm "
                     f"{v:.3g}, {top / v if v else math.inf:.3g} times below the largest ({top:.3g})")
