"""``python -m compiler`` runs the ``bpc`` command line."""
import sys

from .cli import main

sys.exit(main())
