"""``python -m attngen``; see :mod:`attngen.cli`."""

import sys

from .cli import main

sys.exit(main())
