"""PNG plots of a training run: loss curves (optionally with per-parameter gradient norms) and
the decision boundary of a classifier with a 2-D input. Needs matplotlib (the ``plot`` extra);
``require_matplotlib()`` says how to install it, so a run can check before it starts."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.files import atomic_file
from compiler.train.loop import TrainError, task


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise TrainError("plots need matplotlib, which is not installed: pip install matplotlib "
                         "(or pip install 'bpc[plot]')") from None
    return matplotlib


def _figure(*size):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise TrainError(f"{path}: plots are written as PNG; name the file *.png")
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def plot_history(history, path, grad_norms=False, title=None):
    """Training (and validation) loss per epoch on a log scale; with ``grad_norms`` a second
    panel of each parameter's gradient norm (epoch mean) and the global norm."""
    fig = _figure(7, 7 if grad_norms else 4.2)
    axes = fig.subplots(2 if grad_norms else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    positive = all(v > 0 for v in history.train_loss + history.val_loss)
    ax.plot(history.epoch, history.train_loss, label="training loss", color="C0")
    if history.val_loss:
        ax.plot(history.epoch, history.val_loss, label="validation loss", color="C1")
        best = int(np.argmin(history.val_loss))
        ax.plot(history.epoch[best], history.val_loss[best], "o", color="C1",
                label=f"best (epoch {history.epoch[best]})")
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title or "loss")
    if history.val_accuracy:
        acc = ax.twinx()
        acc.plot(history.epoch, [100 * a for a in history.val_accuracy], color="C2", alpha=0.6, lw=1)
        acc.set_ylabel("validation accuracy (%)", color="C2")
    if grad_norms:
        g = axes[1]
        g.plot(history.epoch, history.grad_norm, color="k", lw=2, label="global")
        for name, norms in history.param_grad_norms.items():
            g.plot(history.epoch, norms, lw=1, label=name)
        if all(v > 0 for vs in history.param_grad_norms.values() for v in vs) and history.grad_norm:
            g.set_yscale("log")
        g.set_ylabel("gradient norm (epoch mean)")
        g.grid(True, which="both", alpha=0.3)
        g.legend(fontsize="small", ncol=min(4, 1 + len(history.param_grad_norms)))
    axes[-1].set_xlabel("epoch")
    return _save(fig, path)


def plot_decision_boundary(module, params, data, path, resolution=300, title=None, stats=None):
    """The predicted class over the plane of a classifier with one input of 2 features, with the
    samples of ``data`` (a checked dict) on top (in inference mode: a batchnorm model's running
    statistics are ``stats``, default ``init_stats()``)."""
    names = list(module.INPUTS)
    if len(names) != 1 or tuple(module.INPUTS[names[0]]) != (2,) or task(module) == "regression":
        raise TrainError("a decision-boundary plot needs a classifier with one input of 2 features; "
                         f"this model has inputs {dict(module.INPUTS)} "
                         f"({'several outputs' if hasattr(module, 'OUTPUTS') else task(module)})")
    x = data[names[0]]
    y = data[list(module.TARGETS)[0]]
    labels = y if y.ndim == 1 else (np.argmax(y, axis=1) if y.shape[1] > 1 else (y[:, 0] > 0.5).astype(int))
    lo, hi = x.min(axis=0), x.max(axis=0)
    pad = 0.08 * np.maximum(hi - lo, 1e-9)
    g0, g1 = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], resolution),
                         np.linspace(lo[1] - pad[1], hi[1] + pad[1], resolution))
    grid = np.column_stack([g0.ravel(), g1.ravel()]).astype(x.dtype)
    mode = {"stats": stats if stats is not None else module.init_stats()} if getattr(module, "STATS", None) else {}
    probs = np.asarray(module.forward(params, grid, **mode))
    if probs.ndim == 2 and probs.shape[1] > 1:
        cls, conf = probs.argmax(axis=1), probs.max(axis=1)
    else:
        p1 = probs.reshape(len(grid))
        cls, conf = (p1 > 0.5).astype(int), np.maximum(p1, 1 - p1)
    k = int(max(cls.max(), labels.max())) + 1
    fig = _figure(6, 5.4)
    ax = fig.subplots()
    from matplotlib.colors import ListedColormap
    colors = [f"C{i % 10}" for i in range(k)]
    cmap = ListedColormap(colors)
    ax.contourf(g0, g1, cls.reshape(g0.shape), levels=np.arange(k + 1) - 0.5, cmap=cmap, alpha=0.25)
    ax.contour(g0, g1, conf.reshape(g0.shape), levels=[0.6, 0.8, 0.95], colors="k", linewidths=0.4, alpha=0.4)
    ax.contour(g0, g1, cls.reshape(g0.shape), levels=np.arange(k) + 0.5, colors="k", linewidths=1.2)
    ax.scatter(x[:, 0], x[:, 1], c=labels, cmap=cmap, vmin=-0.5, vmax=k - 0.5, s=12, edgecolors="k", linewidths=0.3)
    accuracy = None
    pred = np.asarray(module.forward(params, x))
    pred = pred.argmax(axis=1) if pred.ndim == 2 and pred.shape[1] > 1 else (pred.reshape(len(x)) > 0.5).astype(int)
    accuracy = float(np.mean(pred == labels))
    ax.set_title(title or f"decision boundary (accuracy on these samples {100 * accuracy:.1f}%)")
    ax.set_xlabel(f"{names[0]}[0]")
    ax.set_ylabel(f"{names[0]}[1]")
    return _save(fig, path)
