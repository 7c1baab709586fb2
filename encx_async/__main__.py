"""``python -m encx_async``: the ``encx-async`` command line."""

from __future__ import annotations

import sys

from encx_async._cli import main

if __name__ == "__main__":
    sys.exit(main())
