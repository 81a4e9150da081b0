"""Compile a model and compare its parameters' gradients with float64 central finite
differences of its loss, on random data at the initial parameters. Each parameter with more
than --entries entries is checked on a seeded random sample of them (the same on every run with
the same --seed; every parameter gets some); the others entry by entry. Prints one row per
parameter (entries checked, max abs error, max rel error, verdict) and says what was sampled;
progress goes to stderr. Exit code 1 when any parameter fails.
"""
from __future__ import annotations

from compiler import limits
from compiler.cli._common import add_spec_argument, load

DEFAULT_ENTRIES = 64
# the arrays of parameter size a check keeps: parameters, their float64 copy, gradients
CHECK_COPIES = 3


def add_arguments(parser):
    add_spec_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data, parameters and "
                        "sampled entries (default 0)")
    parser.add_argument("--batch", type=_positive, default=5, help="random samples per check (default 5)")
    parser.add_argument("--entries", type=_entries, default=DEFAULT_ENTRIES, metavar="K",
                        help=f"check at most K entries of each parameter, a seeded random sample "
                        f"(default {DEFAULT_ENTRIES}; 'all' checks every entry: two loss evaluations each)")
    limits.add_argument(parser)


def _positive(text):
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 10000:
        raise argparse.ArgumentTypeError("must be from 1 to 10000")
    return value


def _entries(text):
    import argparse
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer or 'all': {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1 (or 'all')")
    return value


class _Progress:
    """The calls ``progress(name, done, count)`` of check_gradients, per parameter, as one
    ``compiler.progress.Progress`` over all entries: a bar on a terminal, else a plain line at
    most every 10 seconds; nothing for a check quicker than half a second."""

    def __init__(self, total, stream=None, clock=None, delay=0.5, redraw=0.1):
        from compiler.progress import Progress
        self.progress = Progress(total, "entries", stream, delay=delay, clock=clock, redraw=redraw)
        self.current, self.done = None, 0

    def __call__(self, name, done, count):
        if name != self.current:
            self.current, self.done = name, 0
        self.progress.update(done - self.done, f"checking {name}: entry {done} of {count}")
        self.done = done

    def close(self):
        self.progress.close()


def run(args):
    import tempfile
    from pathlib import Path

    import numpy as np

    from compiler.backends.numpy.module import compile_model
    from compiler.gradcheck import as_trained, check_gradients, format_table, random_batch
    spec = load(args.spec)
    # before anything is allocated: an estimate, not an allocation error
    limits.check_parameter_memory(limits.model_shapes(spec.model), "float64", args.max_param_memory,
                                  copies=CHECK_COPIES, what=spec.path)
    # the spec's dtype is ignored here: finite differences need float64 to be meaningful
    compiled = compile_model(spec.model, dtype="float64")
    with tempfile.TemporaryDirectory(prefix="bpc-check-") as tmp:
        module = as_trained(compiled.load(Path(tmp) / f"{compiled.module_name}.py"))
    params = module.init_params(seed=args.seed)
    arrays = random_batch(module, batch=args.batch, seed=args.seed)
    sizes = {k: int(np.size(v)) for k, v in params.items()}
    progress = _Progress(sum(s if args.entries is None else min(s, args.entries) for s in sizes.values()))
    try:
        with np.errstate(all="ignore"):
            loss = module.loss(params, *arrays)
            rows = check_gradients(module, params, arrays, entries=args.entries, seed=args.seed,
                                   progress=progress)
    finally:
        progress.close()
    print(f"gradient check of {spec.model.name} ({spec.path}): float64, {args.batch} random samples, "
          f"seed {args.seed}, loss {loss:.6g}"
          + ("; batchnorm in training mode (batch statistics)" if getattr(module, "STATS", None) else ""))
    print(format_table(rows))
    print(_coverage(rows, args.seed))
    failed = [r.name for r in rows if not r.ok]
    if not np.isfinite(loss):
        print("FAILED: the loss is not finite on this random data (a log or sqrt of a negative input?)")
        return 1
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    on = " on the entries checked" if any(r.sampled for r in rows) else ""
    print(f"ok: all {len(rows)} parameter gradients agree with finite differences{on}")
    return 0


def _coverage(rows, seed):
    """What was checked: the sampled parameters one per line, the others in one line."""
    lines = [f"checked {r.checked} of {r.size} entries of {r.name} (sampled, seed {seed})"
             for r in rows if r.sampled]
    whole = [r.name for r in rows if not r.sampled]
    if whole:
        lines.append(f"checked every entry of {', '.join(whole)}" if len(whole) <= 20 else
                     f"checked every entry of {len(whole)} parameters ({', '.join(whole[:5])}, ...)")
    return "\n".join(lines)
