"""Second-order fitting (issue 16, item 3): ``--optimizer lbfgs`` and ``--optimizer newton-cg``.

Both are full batch and deterministic, for curve fitting and small models: the parameters are
one float64 vector, and ``scipy.optimize.minimize`` drives the generated module. L-BFGS takes
the loss and gradient from ``backward`` (``jac=True``); Newton-CG also the exact Hessian-vector
product from the module's ``hvp`` (``hessp``), so each Newton step solves H p = -g by conjugate
gradients with exact curvature, never a finite difference. ``epochs`` bounds the iterations;
``tol`` is the tolerance: L-BFGS-B's gtol (its ftol is float64's resolution), Newton-CG's xtol. scipy is an optional dependency (``pip install "bpc[opt]"``).
"""
from __future__ import annotations

import math
import time

import numpy as np

from compiler.spec.train_options import SECOND_ORDER, TrainError


def _scipy_minimize():
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise TrainError("--optimizer lbfgs and newton-cg need scipy, which is not installed: "
                         "pip install 'bpc[opt]' (or pip install scipy)") from None
    return minimize


def check_second_order(module, config):
    """Refuse what a full-batch, deterministic second-order fit cannot honour, naming it."""
    name = config.optimizer
    if getattr(module, "DROPOUT", None) or getattr(module, "STATS", None):
        raise TrainError(f"--optimizer {name} needs a deterministic loss: this model has "
                         f"{'dropout' if getattr(module, 'DROPOUT', None) else 'batchnorm'}; use sgd, momentum, nesterov or adam")
    if not hasattr(module, "hvp") and name == "newton-cg":
        raise TrainError("--optimizer newton-cg needs a module with hvp (recompile it with this bpc)")
    for option, bad in (("clip", config.clip is not None), ("patience", config.patience is not None),
                        ("schedule", config.schedule != "constant")):
        if bad:
            raise TrainError(f"--optimizer {name} takes no --{option} (it is a full-batch second-order "
                             "method: no learning rate, schedule or clipping)")


class _Objective:
    """The loss as a function of the flat parameter vector (float64), with its gradient and
    Hessian-vector products from the module; the last evaluation is remembered for the log."""

    def __init__(self, module, arrays, like, weight_decay):
        self.module, self.arrays, self.wd = module, arrays, weight_decay
        self.names = list(module.PARAMS)
        self.shapes = [module.PARAMS[k] for k in self.names]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.dtype = np.asarray(like[self.names[0]]).dtype
        self.evals = self.hvps = 0
        self.last = None

    def unflat(self, x):
        out, at = {}, 0
        for k, s, shape in zip(self.names, self.sizes, self.shapes):
            out[k] = np.asarray(x[at:at + s].reshape(shape), self.dtype)
            at += s
        return out

    def flat(self, d):
        return np.concatenate([np.ravel(np.asarray(d[k], np.float64)) for k in self.names])

    def __call__(self, x):
        self.evals += 1
        loss, grads = self.module.backward(self.unflat(x), *self.arrays)
        g = self.flat(grads)
        if self.wd:
            loss += 0.5 * self.wd * float(x @ x)
            g = g + self.wd * x
        self.last = (np.array(x), float(loss), g)
        return float(loss), g

    def hessp(self, x, p):
        self.hvps += 1
        _, _, hv = self.module.hvp(self.unflat(x), self.unflat(p), *self.arrays)
        out = self.flat(hv)
        return out + self.wd * p if self.wd else out


def fit(module, config, train_set, val_set, params, names, verbose, history, report, evaluate):
    """Run L-BFGS or Newton-CG from ``params`` on the whole ``train_set``; returns (params,
    stopped, message). ``history`` gets a row per iteration (epoch = iteration)."""
    minimize = _scipy_minimize()
    arrays = [train_set[k] for k in names]
    obj = _Objective(module, arrays, params, config.weight_decay)
    x0 = obj.flat(params)
    t0 = time.monotonic()
    iteration = [0]

    def record(xk):
        iteration[0] += 1
        k = iteration[0]
        if obj.last is None or not np.array_equal(obj.last[0], xk):
            obj(xk)
        _, loss, g = obj.last
        history.epoch.append(k)
        history.lr.append(math.nan)
        history.train_loss.append(loss)
        history.grad_norm.append(float(np.linalg.norm(g)))
        at = 0
        for name, s in zip(obj.names, obj.sizes):
            history.param_grad_norms[name].append(float(np.linalg.norm(g[at:at + s])))
            at += s
        if val_set is not None:
            ev = evaluate(module, obj.unflat(xk), val_set)
            history.val_loss.append(ev["loss"])
            if ev["accuracy"] is not None:
                history.val_accuracy.append(ev["accuracy"])
            for name, acc in ev["accuracies"].items():
                history.val_accuracies.setdefault(name, []).append(acc)
        history.seconds.append(time.monotonic() - t0)
        report.advance(1, f"loss {loss:.6g}")
        every = config.log_every or max(1, config.epochs // 10)
        if k % every == 0 or k == 1:
            report.log(f"iteration {k}  loss {loss:.6g}  |grad| {history.grad_norm[-1]:.3e}")

    method = {"lbfgs": "L-BFGS-B", "newton-cg": "Newton-CG"}[config.optimizer]
    kwargs = {"hessp": obj.hessp} if config.optimizer == "newton-cg" else {}
    options = {"maxiter": config.epochs}
    if config.optimizer == "lbfgs":
        # gtol: the largest gradient entry; ftol: the relative decrease of the loss per step, at
        # float64's resolution (a loss tolerance of tol would stop a least-squares fit with the
        # parameters still sqrt(tol) away)
        options.update(maxfun=max(15000, 20 * config.epochs), gtol=config.tol, ftol=10 * np.finfo(float).eps)
    else:
        options["xtol"] = config.tol
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        res = minimize(obj, x0, jac=True, method=method, callback=record, options=options, **kwargs)
    x = res.x
    loss, _ = obj(x)
    if not math.isfinite(loss):
        return params, "diverged", (f"{config.optimizer} reached a non-finite loss; kept the initial parameters "
                                    f"({res.message})")
    detail = (f"{config.optimizer}: {res.nit} iterations, {obj.evals} loss and gradient evaluations"
              + (f", {obj.hvps} Hessian-vector products" if config.optimizer == "newton-cg" else "")
              + f"; {'converged' if res.success else 'stopped'}: {_text(res.message)}")
    return obj.unflat(x), "completed", detail


def _text(message):
    return message.decode() if isinstance(message, bytes) else str(message)


__all__ = ["SECOND_ORDER", "check_second_order", "fit"]
