"""Check a generated module's gradients against central finite differences (float64)."""
from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np


@dataclass(frozen=True)
class GradCheckRow:
    name: str
    max_abs_error: float
    max_rel_error: float
    ok: bool
    checked: int = 0      # entries compared with finite differences
    size: int = 0         # entries of the parameter
    kinks: int = 0        # entries left out: not differentiable within the step (see check_gradients)

    @property
    def sampled(self):
        return self.checked < self.size


class TrainingMode:
    """``module`` whose ``forward``, ``loss`` and ``backward`` run in training mode: a model with
    batchnorm then normalises with the batch's statistics (and the gradient runs through them),
    as every training step does; dropout masks, if any, are drawn from ``seed``. No running
    statistics are passed, so nothing is updated and every call is a pure function of its
    arguments (as finite differences need). Other attributes are the module's."""

    def __init__(self, module, seed=0):
        self.module = module
        self.mode = {"training": True, **({"seed": seed} if getattr(module, "DROPOUT", None) else {})}

    def __getattr__(self, name):
        value = getattr(self.module, name)
        if name in ("forward", "loss", "backward", "hvp", "gnvp"):
            return lambda *args, **kw: value(*args, **{**self.mode, **kw})
        return value


def as_trained(module):
    """``module`` in the mode its gradient is used in: training mode for a model with batchnorm
    (its inference mode needs running statistics), else the module itself."""
    return TrainingMode(module) if getattr(module, "STATS", None) else module


def random_batch(module: ModuleType, batch: int = 5, seed: int = 0, scale: float = 1.0) -> list[np.ndarray]:
    """Random inputs and targets for ``module``: token ids for inputs of ids (``VOCAB``), integer
    labels for label targets (one per position of a sequence), one-hot rows for the one-hot
    targets of a softmax loss, standard normal values otherwise."""
    rng = np.random.default_rng(seed)
    vocab = getattr(module, "VOCAB", {})
    arrays = [rng.integers(0, vocab[name], size=(batch, *shape)) if name in vocab
              else scale * rng.standard_normal((batch, *shape)) for name, shape in module.INPUTS.items()]
    for name, shape in module.TARGETS.items():
        classes = module.CLASSES.get(name)
        if module.TARGET_KINDS[name] == "label":
            arrays.append(rng.integers(0, classes, size=(batch, *shape)))
        elif classes:
            arrays.append(np.eye(classes)[rng.integers(0, classes, size=batch)])
        else:
            arrays.append(rng.standard_normal((batch, *shape)))
    return arrays


def sample_entries(name, size, entries, seed=0):
    """The flat indices of parameter ``name`` (``size`` entries) that a check compares: all of
    them when ``entries`` is None or at least ``size``, else ``entries`` distinct ones, sorted,
    drawn by a generator seeded with ``seed`` and the parameter's name, so that the sample is
    the same on every run and does not depend on the other parameters."""
    if entries is None or entries >= size:
        return np.arange(size)
    if entries < 1:
        raise ValueError(f"entries must be at least 1, got {entries}")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(size, size=entries, replace=False))


def check_gradients(module: ModuleType, params: Mapping[str, np.ndarray], arrays: Sequence[np.ndarray],
                    eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-8, entries: int | None = None,
                    seed: int = 0, progress: Callable[[str, int, int], None] | None = None,
                    skip_kinks: bool = False) -> list[GradCheckRow]:
    """Compare ``module.backward`` with central differences of ``module.loss``, entry by entry.

    ``entries``: at most this many entries of each parameter (a seeded sample, see
    ``sample_entries``; every parameter gets some); None compares every entry.
    ``progress(name, done, total)``, if given, is called as entries are checked.
    ``skip_kinks``: leave out the entries where the loss is not smooth within the step (a relu
    or max switches between ``p - eps`` and ``p + eps``: the two one-sided differences disagree
    by more than the tolerance, so the central one measures no derivative); a row fails when
    more than half of its entries are left out. Needed with the large steps of float32.
    Returns a list of GradCheckRow (one per parameter)."""
    params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    base, grads = module.backward(params, *arrays)
    rows = []
    for name, value in params.items():
        g = np.asarray(grads[name], dtype=np.float64)
        if g.shape != value.shape:
            rows.append(GradCheckRow(name, float("inf"), float("inf"), False, 0, value.size))
            continue
        index = sample_entries(name, value.size, entries, seed)
        fd = np.zeros(len(index))
        smooth = np.ones(len(index), dtype=bool)
        flat = value.reshape(-1)
        for k, i in enumerate(index):
            if progress is not None:
                progress(name, k, len(index))
            old = flat[i]
            flat[i] = old + eps
            up = module.loss(params, *arrays)
            flat[i] = old - eps
            down = module.loss(params, *arrays)
            flat[i] = old
            fd[k] = (up - down) / (2 * eps)
            if skip_kinks:
                right, left = (up - base) / eps, (base - down) / eps
                smooth[k] = abs(right - left) <= 2 * (atol + rtol * max(abs(right), abs(left)))
        if progress is not None:
            progress(name, len(index), len(index))
        ga, fd = g.reshape(-1)[index][smooth], fd[smooth]
        abs_err = np.abs(ga - fd)
        rel_err = abs_err / np.maximum(np.maximum(np.abs(ga), np.abs(fd)), atol)
        kinks = int(len(index) - smooth.sum())
        ok = bool(np.all(abs_err <= atol + rtol * np.maximum(np.abs(ga), np.abs(fd)))) and 2 * kinks <= len(index)
        rows.append(GradCheckRow(name, float(abs_err.max(initial=0.0)), float(rel_err.max(initial=0.0)), ok,
                                 len(index), value.size, kinks))
    return rows


def format_table(rows):
    width = max([len("entries")] + [len(f"{r.checked}/{r.size}") for r in rows])
    lines = [f"{'parameter':<14} {'entries':>{width}} {'max abs error':>14} {'max rel error':>14}  verdict"]
    for r in rows:
        kinks = f" ({r.kinks} at a kink, left out)" if r.kinks else ""
        lines.append(f"{r.name:<14} {f'{r.checked}/{r.size}':>{width}} {r.max_abs_error:>14.3e} "
                     f"{r.max_rel_error:>14.3e}  {'ok' if r.ok else 'FAIL'}{kinks}")
    return "\n".join(lines)
