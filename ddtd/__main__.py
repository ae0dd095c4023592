"""``python -m ddtd ...`` runs the command line (:mod:`ddtd.cli`)."""

import sys

from .cli import main

sys.exit(main())
