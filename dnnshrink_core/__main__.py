"""``python -m dnnshrink_core`` runs the ``dnnshrink`` command line."""
import sys

from .cli import main

sys.exit(main())
