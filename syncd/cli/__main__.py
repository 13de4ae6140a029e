"""``python -m syncd.cli``: the ``syncd`` command where its console script is not installed."""

import sys

from syncd.cli import main

sys.exit(main())
