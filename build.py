#!/usr/bin/env python3
"""ktenv's entry point: `python build.py <command> ...` (see README.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ktenv.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
