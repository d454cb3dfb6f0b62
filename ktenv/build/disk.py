"""Disk preflight: before anything is downloaded, the env (hard-linked from a warm
uv cache on the same filesystem, or a full copy) plus sgl-kernel's payload
scratch must fit, or the build stops saying how many GB are missing."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import KtenvError
from ..host.cpu import disk_free
from ..spec.model import Sizes
from ..tools import uv_bin
from .sync import run as _run

GB = 1e9


class DiskFull(KtenvError):
    exit_code = 4


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"

def _device(path: Path) -> int:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.stat().st_dev


def _free(path: Path) -> int:
    return disk_free(path)


def uv_cache_dir() -> Path:
    proc = _run([uv_bin(), "cache", "dir"], timeout=60)
    return Path(proc.stdout.strip() or os.path.expanduser("~/.cache/uv"))


def all_cached(python: Path, requirements: Path) -> tuple[bool, str]:
    """Would `uv pip sync` need the network? Asked of uv itself, offline and without installing."""
    proc = _run([uv_bin(), "pip", "sync", "--dry-run", "--offline", "--require-hashes", "--python", str(python), str(requirements)], timeout=300)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return False, "not all of the lock is in uv's cache"
    m = re.search(r"Would download (\d+) package", text)
    if m and int(m.group(1)) > 0:
        return False, f"{m.group(1)} package(s) to download"
    return True, "everything is in uv's cache"


def preflight(sizes: Sizes, prefix: Path, python: Path, requirements: Path, cache: Path | None = None) -> dict:
    """Refuse, before any download, a build that cannot fit on the prefix's filesystem."""
    full, linked, scratch = sizes.env_bytes, sizes.linked_env_bytes, sizes.payload_scratch_bytes
    cache = cache or uv_cache_dir()
    same_fs = _device(prefix.parent) == _device(cache)
    if _free(prefix.parent) >= full + scratch and (same_fs or _free(cache) >= full):
        # Room for the worst case: no need to ask uv what it would download.
        return {"cached": None, "why": "room for a full download", "same_filesystem_as_uv_cache": same_fs,
                "need": {str(prefix.parent): full + scratch}, "free": {str(prefix.parent): _free(prefix.parent)}}
    cached, why = all_cached(python, requirements)
    env_bytes = linked if (cached and same_fs) else full
    need = {prefix.parent: env_bytes + scratch}
    if not cached and not same_fs:
        need[cache] = full  # downloads land in uv's cache first
    report = {"cached": cached, "why": why, "same_filesystem_as_uv_cache": same_fs, "need": {}, "free": {}}
    for where, n in need.items():
        free = _free(where)
        report["need"][str(where)] = n
        report["free"][str(where)] = free
        if free < n:
            how = ("linked from uv's cache" if env_bytes == linked else
                   f"{_gb(full)} of packages ({why}" + (", and uv's cache is on another filesystem" if not same_fs else "") + ")")
            detail = f"the env ({how}) plus {_gb(scratch)} for sgl-kernel's CUDA payload" if where == prefix.parent else \
                f"{_gb(full)} of downloads into uv's cache ({cache})"
            raise DiskFull(
                f"Not enough disk space to build {prefix}: it needs about {_gb(n)} on the filesystem of {where} "
                f"for {detail}, and {_gb(free)} is free — {_gb(n - free)} missing. Nothing was downloaded or changed. "
                "Free space there, or pass --prefix on a larger filesystem (UV_CACHE_DIR moves uv's cache)."
            )
    return report
