"""``python -m compiler`` runs the ``bpc`` command line."""
import sys

from compiler.cli import main

sys.exit(main())
