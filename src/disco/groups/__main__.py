"""``python -m disco.groups MODULE:FACTORY``: the same as ``python -m disco groups``."""

from __future__ import annotations

import sys

from .explain import main

if __name__ == "__main__":
    sys.exit(main())
