"""Errors the compiler raises for bad input: each names what is wrong and where."""


class BpcError(Exception):
    """Base class of every error bpc raises on purpose (bad model, bad spec, bad call)."""


class ShapeError(BpcError):
    """Two values whose shapes cannot be combined."""


class UnsupportedError(BpcError):
    """A function, operation or construct the compiler does not (yet) support."""


class ModelError(BpcError):
    """A model that is incomplete or inconsistent (missing parameter, bad name, ...)."""
