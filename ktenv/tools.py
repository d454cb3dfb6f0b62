"""Where ktenv's own tools and caches are: the pinned uv binary and ~/.cache/ktenv.

Every stage that runs uv or keeps a cache asks here, so one `KTENV_CACHE_DIR`
moves all of ktenv's caches and every stage runs the same uv.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import KtenvError


def uv_bin() -> str:
    """The uv that ktenv pins (its version is part of what makes a lock byte-identical)."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if not found:
            raise KtenvError("uv is not installed. Run `pip install -e .` (ktenv pins its uv version) and rerun.") from None
        return found


def cache_dir() -> Path:
    """$KTENV_CACHE_DIR, else $XDG_CACHE_HOME/ktenv, else ~/.cache/ktenv."""
    base = os.environ.get("KTENV_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "ktenv"
