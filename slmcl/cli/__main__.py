"""``python -m slmcl.cli``: the ``slmcl`` command without the console script (a checkout, a test)."""

from __future__ import annotations

import sys

from slmcl.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
