"""Compile a model and compare every parameter's gradient with float64 central finite
differences of its loss, on random data at the initial parameters. Prints one row per
parameter (max abs error, max rel error, verdict); exit code 1 when any parameter fails.
"""
from __future__ import annotations

from ._common import add_spec_argument, load


def add_arguments(parser):
    add_spec_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data and parameters (default 0)")
    parser.add_argument("--batch", type=_positive, default=5, help="random samples per check (default 5)")


def _positive(text):
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 10000:
        raise argparse.ArgumentTypeError("must be from 1 to 10000")
    return value


def run(args):
    import tempfile
    from pathlib import Path

    import numpy as np

    from ..emit import compile_model
    from ..gradcheck import check_gradients, format_table, random_batch
    spec = load(args.spec)
    # the spec's dtype is ignored here: finite differences need float64 to be meaningful
    compiled = compile_model(spec.model, dtype="float64")
    with tempfile.TemporaryDirectory(prefix="bpc-check-") as tmp:
        module = compiled.load(Path(tmp) / f"{compiled.module_name}.py")
    params = module.init_params(seed=args.seed)
    arrays = random_batch(module, batch=args.batch, seed=args.seed)
    with np.errstate(all="ignore"):
        loss = module.loss(params, *arrays)
        rows = check_gradients(module, params, arrays)
    print(f"gradient check of {spec.model.name} ({spec.path}): float64, {args.batch} random samples, "
          f"seed {args.seed}, loss {loss:.6g}")
    print(format_table(rows))
    failed = [r.name for r in rows if not r.ok]
    if not np.isfinite(loss):
        print("FAILED: the loss is not finite on this random data (a log or sqrt of a negative input?)")
        return 1
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print(f"ok: all {len(rows)} parameter gradients agree with finite differences")
    return 0
