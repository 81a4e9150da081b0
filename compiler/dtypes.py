"""The floating-point types generated code computes in, named once.

The spec loader (``model.dtype``), the CLI's ``--dtype``, both backends and the memory
estimates take their names from here; the C backend keeps one printer per name (a test checks
it has one for each). Pure Python: the CLI imports it for ``--help``.
"""
NAMES = ("float32", "float64")
DEFAULT = "float64"       # init_params without a dtype, the C backend, bpc check
ITEMSIZE = {"float32": 4, "float64": 8}
