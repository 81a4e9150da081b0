"""The ``bpc`` command line: ``app`` builds the parser and dispatches; each subcommand is a
module of this package (``compile``, ``show``, ``check``, ``train``)."""
from compiler.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
