"""`python -m bgeserve` is the `bgeserve` command."""

from __future__ import annotations

import sys

from bgeserve.cli import main

if __name__ == "__main__":
    sys.exit(main())
