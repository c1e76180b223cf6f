"""``python -m iii``: the command line (see :mod:`iii.cli`)."""

import sys

from iii.cli import main

sys.exit(main())
