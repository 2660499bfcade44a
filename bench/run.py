"""``make bench``: the service side by side with a bare Starlette app, in one run (see bench/harness.py)."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script by the Makefile: make the repository importable (``bench`` and ``service``).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.harness import main

    main()
