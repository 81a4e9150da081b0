"""The ``bpc`` command line. Each subcommand lives in ``compiler/cli/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> exit code``; those modules import nothing heavy at
module level, so ``bpc --help`` is instant.

Exit codes: 0 success, 1 a check failed, 2 bad input (usage, spec or model errors), 130 interrupted,
141 the reader of standard output went away (``bpc show ... | head``: quietly, like other tools).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from compiler import __version__

# name -> help line; the module compiler.cli.<name> implements it
COMMANDS = {
    "compile": "compile a model spec into a module",
    "show": "show the derived gradient formulas, operation counts and graph of a model",
    "check": "compile a model and compare its gradients with finite differences",
    "train": "train a model on data",
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="bpc", description="bpc, the backprop compiler: SymPy-declared networks -> symbolic "
        "backpropagation -> standalone NumPy (and C) modules.")
    parser.add_argument("--version", action="version", version=f"bpc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_line in COMMANDS.items():
        try:
            module = importlib.import_module(f"compiler.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"compiler.cli.{name}":
                continue  # not built yet
            raise
        p = sub.add_parser(name, help=help_line, description=(module.__doc__ or help_line).strip())
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from compiler.errors import BpcError
    from compiler.freetext import terminal
    try:
        return int(args._run(args) or 0)
    except BpcError as e:
        print(f"bpc: error: {terminal(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bpc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141


def _quiet_stdout():
    """The reader closed the pipe: send what is still buffered nowhere, so that Python's flush
    at exit does not print a second BrokenPipeError."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):   # stdout without a file descriptor
        pass


if __name__ == "__main__":
    sys.exit(main())
