"""Check a generated module's gradients against central finite differences (float64)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GradCheckRow:
    name: str
    max_abs_error: float
    max_rel_error: float
    ok: bool


def random_batch(module, batch=5, seed=0, scale=1.0):
    """Random inputs and targets for ``module``: integer labels for label targets, one-hot
    rows for the one-hot targets of a softmax loss, standard normal values otherwise."""
    rng = np.random.default_rng(seed)
    arrays = [scale * rng.standard_normal((batch, *shape)) for shape in module.INPUTS.values()]
    for name, shape in module.TARGETS.items():
        classes = module.CLASSES.get(name)
        if module.TARGET_KINDS[name] == "label":
            arrays.append(rng.integers(0, classes, size=batch))
        elif classes:
            arrays.append(np.eye(classes)[rng.integers(0, classes, size=batch)])
        else:
            arrays.append(rng.standard_normal((batch, *shape)))
    return arrays


def check_gradients(module, params, arrays, eps=1e-6, rtol=1e-5, atol=1e-8):
    """Compare ``module.backward`` with central differences of ``module.loss`` for every
    parameter entry. Returns a list of GradCheckRow (one per parameter)."""
    params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
    _, grads = module.backward(params, *arrays)
    rows = []
    for name, value in params.items():
        g = np.asarray(grads[name], dtype=np.float64)
        if g.shape != value.shape:
            rows.append(GradCheckRow(name, float("inf"), float("inf"), False))
            continue
        fd = np.zeros_like(value)
        flat, fdf = value.reshape(-1), fd.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            up = module.loss(params, *arrays)
            flat[i] = old - eps
            down = module.loss(params, *arrays)
            flat[i] = old
            fdf[i] = (up - down) / (2 * eps)
        abs_err = np.abs(g - fd)
        rel_err = abs_err / np.maximum(np.maximum(np.abs(g), np.abs(fd)), atol)
        ok = bool(np.all(abs_err <= atol + rtol * np.maximum(np.abs(g), np.abs(fd))))
        rows.append(GradCheckRow(name, float(abs_err.max(initial=0.0)), float(rel_err.max(initial=0.0)), ok))
    return rows


def format_table(rows):
    lines = [f"{'parameter':<14} {'max abs error':>14} {'max rel error':>14}  verdict"]
    for r in rows:
        lines.append(f"{r.name:<14} {r.max_abs_error:>14.3e} {r.max_rel_error:>14.3e}  {'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)
