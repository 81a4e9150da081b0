"""Train a model on data from a .npz or .csv file and save its parameters (.npz).

SPEC is a model spec (.toml/.json; its optional [train] table gives default options, which
command-line options override), compiled for --target numpy (default) or c, or a generated
module (.py: a NumPy module or a C target's wrapper). Data: .npz arrays named like
the model's inputs and targets, or .csv (a header naming the columns, or inputs' columns then
targets' columns); see docs/training.md.

Shows a progress bar on a terminal and log lines (loss, validation loss, learning rate,
per-parameter gradient norms) otherwise; warns on vanishing or exploding gradients; stops on a
NaN/Inf loss keeping the last good parameters (exit 1); Ctrl-C, SIGTERM and SIGHUP save the best
parameters so far (exit 130, 143, 129). Every output is checked before the run; --checkpoint-every
N saves the whole state of the run, which --resume continues exactly. Prints the final loss (and
accuracy for classifiers) on the training, validation and --test data. --workers N (a local
Dask cluster) or --scheduler ADDRESS (an existing one) computes each step's gradients
data-parallel on Dask workers, with the same updates (compiler/train/distributed.py).
"""
from __future__ import annotations

import argparse

from compiler import dtypes, limits
from compiler.backends.registry import BACKENDS
from compiler.spec.train_options import FLAG_KEYS, OPTIONS, SECOND_ORDER, SPEC_KEYS, add_flag


def add_arguments(parser):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("spec", metavar="SPEC", help="model spec (.toml/.json) or generated module (.py)")
    parser.add_argument("--data", metavar="FILE", required=True, help="training data, .npz or .csv")
    parser.add_argument("--test", metavar="FILE", help="held-out data to evaluate the final parameters on")
    o = parser.add_argument_group("optimisation (defaults: the spec's [train] table, else as shown)")
    for key in SPEC_KEYS:              # a spec's [train] keys are these flags, with underscores
        add_flag(o, key)
    o.add_argument("--dtype", choices=dtypes.NAMES, help="compile for this dtype (default: the spec's)")
    o.add_argument("--target", choices=tuple(BACKENDS), default="numpy",
                   help="compile the spec for this backend (default: numpy; c needs cffi, a C compiler and "
                   "the Python headers); the run is the same, update steps included")
    out = parser.add_argument_group("output")
    out.add_argument("--out", metavar="FILE", help="parameters .npz to write (default: <model name>_params.npz)")
    out.add_argument("--resume", metavar="FILE",
                     help="continue from a checkpoint (--checkpoint-every: the exact run, with optimizer state, "
                     "epoch, schedule and shuffling), or start from parameters saved in a .npz")
    out.add_argument("--checkpoint-every", type=int, metavar="N",
                     help="every N epochs, after the last and when stopped, save the run's whole state to --checkpoint")
    out.add_argument("--checkpoint", metavar="FILE",
                     help="the checkpoint file (default: --out with .ckpt.npz for .npz)")
    out.add_argument("--plot", metavar="PNG", help="write the training/validation loss curves")
    out.add_argument("--plot-grads", action="store_true", help="add per-parameter gradient norms to --plot")
    out.add_argument("--boundary", metavar="PNG", help="write the decision boundary (classifier with 2 input features)")
    out.add_argument("--history", metavar="JSON", help="write the per-epoch history as JSON")
    add_flag(out, "log_every")
    out.add_argument("--threads", type=int, metavar="N", default=None,
                     help="BLAS threads while training, set through threadpoolctl (default: 1, fastest for "
                     "small layers and safe on a busy machine, unless OMP_NUM_THREADS, OPENBLAS_NUM_THREADS "
                     "or MKL_NUM_THREADS is set: then the library keeps what that says)")
    limits.add_argument(out)
    d = parser.add_argument_group("distributed (Dask: pip install \"bpc[dask]\")")
    where = d.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N",
                       help="train data-parallel on a local Dask cluster of N single-threaded worker processes; "
                       "each step's global batch is split over them, the updates are the single-process run's")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="train on the existing Dask cluster whose scheduler listens at ADDRESS "
                       "(tcp://host:8786); with --workers or --scheduler, --test may name a directory or a "
                       "glob of .npz/.csv partitions, evaluated on the workers")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines, only the summary")


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def run(args):
    import contextlib
    import os

    if args.threads is not None and args.threads < 1:
        from compiler.errors import BpcError
        raise BpcError(f"--threads must be >= 1, got {args.threads}")
    threads = args.threads
    if threads is None and not any(os.environ.get(var) for var in THREAD_VARIABLES):
        threads = 1
    if threads is None:
        limit = contextlib.nullcontext()
    else:
        # at run time, for this call only (bpc train inside a longer Python process gives the
        # BLAS its threads back), rather than environment variables that bind only before numpy
        # is first imported
        from threadpoolctl import threadpool_limits
        if getattr(args, "target", None) == "c":
            # the C module's BLAS (if any) is loaded with the module, after this point: load it
            # first, so that the limit reaches it too
            from compiler.backends.c.blas import preload
            preload()
        limit = threadpool_limits(limits=threads, user_api="blas")
    with limit:
        return _run(args)


def _run(args):
    import sys
    from pathlib import Path

    import numpy as np

    from compiler.files import check_writable, remove_stale_temporaries
    from compiler.train.loop import (StopRequest, TrainConfig, TrainError, check_params, check_stats, checkpoint_from_arrays,
                         is_checkpoint, read_npz, save_params, train)
    from compiler.train.data import load_data

    module, defaults, label = _load_model(args)
    options = dict(defaults)
    for key in FLAG_KEYS:
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    try:
        config = TrainConfig(**options).validate()
    except TrainError as e:          # name the option as the user wrote it
        key, _, rest = str(e).partition(" ")
        if key not in FLAG_KEYS:
            raise
        raise TrainError(f"{OPTIONS[key].flag} {rest}") from None
    if args.plot_grads and not args.plot:
        raise TrainError("--plot-grads adds a panel to --plot; give --plot FILE.png too")
    for option in ("plot", "boundary"):
        if getattr(args, option):
            from compiler.train.plot import require_matplotlib
            require_matplotlib()                      # before training, not after
            if not getattr(args, option).lower().endswith(".png"):
                raise TrainError(f"--{option} {getattr(args, option)}: plots are written as PNG; name the file *.png")
    if args.boundary:
        from compiler.train.loop import task
        if len(module.INPUTS) != 1 or tuple(next(iter(module.INPUTS.values()))) != (2,) or task(module) == "regression":
            raise TrainError("--boundary needs a classifier with one input of 2 features" +
                             (" and one output (this model has several: OUTPUTS)" if hasattr(module, "OUTPUTS") else ""))
    out = Path(args.out) if args.out else Path(f"{label}_params.npz")
    if out.suffix.lower() != ".npz":
        raise TrainError(f"--out {out}: parameters are saved as .npz; name the file *.npz")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise TrainError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.checkpoint and not args.checkpoint_every:
        raise TrainError("--checkpoint names the file of --checkpoint-every N; give that too")
    checkpoint = None
    if args.checkpoint_every:
        checkpoint = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name[:-4] + ".ckpt.npz")
        if checkpoint.suffix.lower() != ".npz":
            raise TrainError(f"--checkpoint {checkpoint}: checkpoints are saved as .npz; name the file *.npz")
        if _same_file(checkpoint, out):
            raise TrainError(f"--checkpoint {checkpoint} is the --out file; choose another")
    for path, what in ((out, "--out"), (checkpoint, "--checkpoint")):
        for option in ("data", "test", "spec"):
            other = getattr(args, option)
            if path and other and _same_file(path, other):
                raise TrainError(f"{what} {path} is the --{option} file; choose another output" if option != "spec"
                                 else f"{what} {path} is the spec file; choose another output")
    if args.workers is not None and args.workers < 1:
        raise TrainError(f"--workers must be >= 1, got {args.workers}")
    distributed = args.workers is not None or args.scheduler is not None
    if distributed:
        from compiler.train.distributed import require_dask
        require_dask()
    data = load_data(args.data, module)
    test_parts = None
    if args.test and distributed and _partitioned(args.test):
        from compiler.train.partitions import partition_paths
        test, test_parts = None, partition_paths(args.test)
    else:
        test = load_data(args.test, module) if args.test else None
    params, resume, stats = None, None, None
    if args.resume:
        arrays = read_npz(args.resume)
        if is_checkpoint(arrays):
            resume = checkpoint_from_arrays(module, arrays, args.resume)
        else:
            params = check_params(module, arrays, args.resume)
            stats = check_stats(module, arrays, args.resume)     # batchnorm: saved beside the parameters

    # every output is checked before the run, not after it (a directory, a read-only or a full disk)
    nbytes = sum(int(_size(s)) for s in module.PARAMS.values()) * np.dtype(getattr(module, "DTYPE", None)
                                                                             or np.float64).itemsize
    outputs = [("--out", out, nbytes + 1024 * len(module.PARAMS) + 4096)]
    if checkpoint:
        outputs.append(("--checkpoint", checkpoint, 4 * nbytes + 2048 * len(module.PARAMS) + 65536
                        + 32 * config.epochs * (len(module.PARAMS) + 8)))
    for option in ("history", "plot", "boundary"):
        if getattr(args, option):
            outputs.append((f"--{option}", Path(getattr(args, option)), 65536))
    for option, path, size in outputs:
        remove_stale_temporaries(path)
        try:
            check_writable(path, size)
        except OSError as e:
            raise TrainError(f"{option} {path}: cannot write there: {e.strerror or e}") from None

    n = len(next(iter(data.values())))
    nparams = sum(int(_size(s)) for s in module.PARAMS.values())
    n_val = int(round(n * config.val_split))
    if not args.quiet:
        batch = "full batch" if not config.batch_size else f"batch {config.batch_size}"
        print(f"training {label} ({nparams} parameters) on {args.data}: {n - n_val} samples"
              + (f" + {n_val} for validation" if n_val else "")
              + (f"; {config.optimizer}, full batch, at most {config.epochs} iterations, tol {config.tol:g}"
                 if config.optimizer in SECOND_ORDER else
                 f"; {config.optimizer}, lr {config.base_lr:g} ({config.schedule}), {batch}, "
                 f"{config.epochs} epochs" + (f", clip {config.clip:g}" if config.clip else ""))
              + (f", resuming from {args.resume}" if args.resume else "")
              + (f" (epoch {resume.epoch})" if resume else ""), flush=True)
    stop = StopRequest()
    client = cluster = None
    if distributed:
        from compiler.train.distributed import connect
        client, cluster = connect(args.workers, args.scheduler)
        if not args.quiet:
            print(f"on Dask: {len(client.nthreads())} worker(s), scheduler {client.scheduler.address}", flush=True)
    try:
        with _stop_signals(stop):
            # from here on SIGINT, SIGTERM and SIGHUP never raise: they ask the run to stop after its
            # step, and a later one while the parameters are evaluated and saved is only noted
            result = train(module, data, config, params=params, verbose=not args.quiet, stop=stop,
                           resume=resume, checkpoint=checkpoint, checkpoint_every=args.checkpoint_every, stats=stats,
                           client=client)
            saved, save_error = _save(save_params, result.params, out, label, result.stats)
        test_ev = None
        if test_parts is not None and saved is not None and result.stopped != "workers_lost":
            from compiler.train.partitions import evaluate_partitions
            test_ev = evaluate_partitions(module, result.params, test_parts, client, stats=result.stats)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    for w in result.warnings if args.quiet else ():
        print(f"bpc: warning: {w}", file=sys.stderr)
    if saved is None:
        raise TrainError(f"cannot write {out}: {save_error}; nor in any fallback location "
                         f"({', '.join(str(d) for d in _fallback_dirs())}): the parameters are lost")
    written, failures = [f"parameters -> {saved}"], []
    if saved != out:
        failures.append(f"cannot write {out}: {save_error}; the parameters are saved in {saved} instead")
    if checkpoint and checkpoint.exists():
        written.append(f"checkpoint -> {checkpoint}")
    try:
        if args.plot and result.history.epoch:
            from compiler.train.plot import plot_history
            written.append(f"loss curves -> {plot_history(result.history, args.plot, args.plot_grads, title=label)}")
        if args.boundary:
            from compiler.train.plot import plot_decision_boundary
            written.append(f"decision boundary -> {plot_decision_boundary(module, result.params, data, args.boundary, stats=result.stats)}")
        if args.history:
            import json
            Path(args.history).parent.mkdir(parents=True, exist_ok=True)
            Path(args.history).write_text(json.dumps(result.history.as_dict(), indent=1) + "\n")
            written.append(f"history -> {args.history}")
    except OSError as e:
        failures.append(f"cannot write {e.filename or 'an output'}: {e.strerror or e} "
                        f"(the parameters are saved in {saved})")

    print(("" if args.quiet else "\n") + result.message)
    final = result.final
    rows = [("training", final["train_loss"], final["train_accuracy"], final.get("train_accuracies"))]
    if final["val_loss"] is not None:
        rows.append(("validation", final["val_loss"], final["val_accuracy"], final.get("val_accuracies")))
    if test is not None:
        from compiler.train.loop import evaluate
        ev = evaluate(module, result.params, test, stats=result.stats)      # inference mode
        rows.append(("test", ev["loss"], ev["accuracy"], ev["accuracies"]))
    if test_ev is not None:
        rows.append((f"test ({test_ev['partitions']} partitions, {test_ev['samples']} samples, on Dask)",
                     test_ev["loss"], test_ev["accuracy"], test_ev["accuracies"]))
    width = max(len(r[0]) for r in rows)
    for name, loss, acc, heads in rows:
        # a model of several outputs: the accuracy of each classifier output, by name
        each = "".join(f"  accuracy {head} {100 * a:.2f}%" for head, a in (heads or {}).items())
        print(f"  {name:<{width}}  " + ("not evaluated (interrupted)" if loss is None else f"loss {loss:.6g}"
                                        + ("" if acc is None else f"  accuracy {100 * acc:.2f}%") + each))
    for line in written:
        print("  " + line)
    from compiler.freetext import terminal
    for failure in failures:
        print(f"bpc: error: {terminal(failure)}", file=sys.stderr)
    if failures:
        return 2
    if result.stopped == "diverged":
        print(f"bpc: training diverged: {result.message}", file=sys.stderr)
        return 1
    if result.stopped == "workers_lost":
        print(f"bpc: {result.message}; the parameters are saved in {saved}", file=sys.stderr)
        return 1
    if result.stopped == "interrupted":
        why = f"interrupted by {stop.reason}" if stop.reason else "interrupted"
        print(f"bpc: {why}; the best parameters so far are saved in {saved}", file=sys.stderr)
        return 128 + _SIGNALS.get(stop.reason, 2)
    return 0


# the signals that stop a run as Ctrl-C does, by name; the exit code is 128 + the number
_SIGNALS = {"SIGINT": 2, "SIGHUP": 1, "SIGTERM": 15}


class _stop_signals:
    """While active, SIGINT, SIGTERM and SIGHUP set ``stop`` instead of raising or killing the
    process; the previous handlers come back on exit. A no-op outside the main thread."""

    def __init__(self, stop):
        self.stop, self.previous = stop, {}

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in _SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self.previous[number] = signal.signal(number, self._handler)
        return self

    def _handler(self, number, frame):
        import os
        import signal
        name = signal.Signals(number).name
        if self.stop.is_set():          # a second signal: the run is already stopping; say so
            os.write(2, f"\nbpc: {name}: already stopping; saving the best parameters (SIGKILL to quit "
                        "without saving)\n".encode())
        self.stop.request(name)

    def __exit__(self, *exc):
        import signal
        for number, handler in self.previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)   # None: set outside Python
        return False


def _partitioned(path):
    """--test names partitions (a directory or a glob), not one data file."""
    from pathlib import Path
    return Path(path).is_dir() or any(c in str(path) for c in "*?[")


def _fallback_dirs():
    """Where the parameters go when --out cannot be written after all: the working directory,
    the temporary directory, the home directory."""
    import tempfile
    from pathlib import Path
    out = [Path.cwd(), Path(tempfile.gettempdir())]
    try:
        out.append(Path.home())
    except (KeyError, RuntimeError):
        pass
    return out


def _save(save_params, params, out, label, stats=None):
    """``(path, error)``: the parameters saved to ``out``, or, if that fails (the disk filled up
    during the run, say), to a fresh file in a fallback directory, so a finished run is never
    lost for want of a place; ``path`` is None if nowhere took them."""
    import os
    import time
    try:
        return save_params(params, out, stats), None
    except OSError as e:
        error = e.strerror or str(e)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for directory in _fallback_dirs():
        path = directory / f"bpc-rescued-{label}-{stamp}-{os.getpid()}.npz"
        try:
            return save_params(params, path, stats), error
        except OSError:
            continue
    return None, error


def _same_file(a, b):
    from pathlib import Path
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _size(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _load_model(args):
    """(loaded module, [train] defaults, model name) for a spec or a generated .py module."""
    from pathlib import Path

    from compiler.train.loop import TrainError
    path = Path(args.spec)
    if path.suffix == ".py":
        for option in ("dtype", "target"):
            if getattr(args, option) not in (None, "numpy"):
                raise TrainError(f"--{option} applies when compiling a spec; this is an already generated module")
        if not path.is_file():
            raise TrainError(f"{path}: no such file")
        from compiler.backends.numpy.module import load_module
        try:
            module = load_module(path)
        except Exception as e:        # the user's own file: report, do not trace back
            raise TrainError(f"{path}: cannot import the module ({type(e).__name__}: {e})") from None
        missing = [a for a in ("PARAMS", "INPUTS", "TARGETS", "init_params", "forward", "loss", "backward")
                   if not hasattr(module, a)]
        if missing:
            raise TrainError(f"{path}: not a bpc-generated module (no {', '.join(missing)})")
        try:
            shapes = {str(k): tuple(int(d) for d in v) for k, v in dict(module.PARAMS).items()}
        except (TypeError, ValueError):
            raise TrainError(f"{path}: PARAMS is not a dict of parameter shapes") from None
        _check_memory(shapes, getattr(module, "DTYPE", None), args, str(path))
        return module, {}, path.stem
    from compiler.cli._common import load
    from compiler.backends.numpy.module import compile_model
    spec = load(args.spec)
    defaults = spec.train               # checked by the spec loader
    dtype = args.dtype or spec.dtype
    if args.target == "c":
        dtype = dtype or dtypes.DEFAULT   # C has no "follow the inputs": float64 unless asked otherwise
    _check_memory(limits.model_shapes(spec.model), dtype, args, spec.path)
    if args.target == "c":
        from compiler.backends.c.backend import compile_model_c as compile_model
    # hvp and gnvp only where the run uses them (they triple a large model's compile)
    newton = (args.optimizer or defaults.get("optimizer")) == "newton-cg"
    compiled = compile_model(spec.model, dtype=dtype, second_order=newton)
    try:
        # through the module cache (and, for C, the build: a missing cffi, compiler or Python.h
        # is a clear error), before the run, not after it
        module = compiled.load()
    except OSError as e:
        from compiler.backends.numpy.module import cache_dir
        raise TrainError(f"cannot write the module cache {cache_dir()} ($BPC_CACHE): {e.strerror or e}") from None
    return module, defaults, spec.model.name


# parameters, gradients, two optimizer moments (Adam), the best parameters so far, an update
TRAIN_COPIES = 6


def _check_memory(shapes, dtype, args, what):
    """Before init_params: an estimate and exit 2, not an allocation error mid-way."""
    limits.check_parameter_memory(shapes, dtype, args.max_param_memory, copies=TRAIN_COPIES, what=what)
