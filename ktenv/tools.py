"""Where ktenv's own tools and caches are: the pinned uv binary and ~/.cache/ktenv.

Every stage that runs uv or keeps a cache asks here, so one `KTENV_CACHE_DIR`
moves all of ktenv's caches and every stage runs the same uv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
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


def pinned_uv_version() -> str | None:
    """The uv version pyproject.toml pins (`uv==X`), or None when ktenv runs without its pyproject."""
    try:
        deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    except (OSError, KeyError, ValueError):
        return None
    return next((m.group(1) for d in deps if (m := re.fullmatch(r"uv==(\S+)", d.replace(" ", "")))), None)


def check_uv_pin(uv: str | None = None) -> str:
    """uv's version, refusing one other than the pin: a lock written by another uv is not byte-identical."""
    out = subprocess.run([uv or uv_bin(), "--version"], capture_output=True, text=True, check=True).stdout
    have, want = out.split()[1], pinned_uv_version()
    if want and have != want:
        raise KtenvError(
            f"uv {have} ({uv or uv_bin()}) is not the uv {want} that pyproject.toml pins, and uv's version is part of "
            "what makes a lock byte-identical: a lock written with it would differ from one written anywhere else. "
            "Install the pinned one (`pip install -e .` in ktenv's venv puts it first) or enter `nix develop`, "
            "whose uv is the pinned one.")
    return have
