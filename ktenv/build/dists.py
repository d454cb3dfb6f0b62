"""Installed distributions seen through their dist-info: names, versions, RECORD.

Files are never edited in place: uv hard-links installed files from its cache,
so an in-place write would change the cache and every other env built from it.
`write_replacing` writes a new inode and renames it over the old path;
`update_record` keeps RECORD truthful afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from ..errors import KtenvError


class DistError(KtenvError):
    """An env's site-packages is not what ktenv expects."""


@dataclass(frozen=True)
class Dist:
    name: str  # canonical (PEP 503)
    version: str
    dist_info: Path

    @property
    def site(self) -> Path:
        return self.dist_info.parent


def site_packages(prefix: Path) -> Path:
    found = sorted(Path(prefix).glob("lib/python3*/site-packages"))
    if len(found) != 1:
        raise DistError(f"{prefix}: expected one lib/python3.X/site-packages, found {len(found)}. Is this a virtual environment?")
    return found[0]


def dist_of(dist_info: Path) -> Dist:
    """The distribution a dist-info folder names (name-version.dist-info)."""
    name, _, version = dist_info.name[: -len(".dist-info")].partition("-")
    return Dist(canonicalize_name(name), version, dist_info)


def installed(site: Path) -> dict[str, Dist]:
    """Installed distributions by canonical name, from dist-info directory names alone (fast)."""
    return {d.name: d for d in map(dist_of, site.glob("*.dist-info"))}


def b64_digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def read_record(dist: Dist) -> list[list[str]]:
    with open(dist.dist_info / "RECORD", newline="") as f:
        return [row for row in csv.reader(f) if row]


def record_entries(dists) -> Iterator[tuple[Dist, str, str]]:
    """(distribution, normalised path, recorded hash) for every RECORD row; dists without a RECORD are passed over."""
    for dist in dists:
        try:
            rows = read_record(dist)
        except FileNotFoundError:
            continue
        for row in rows:
            yield dist, os.path.normpath(row[0]), row[1] if len(row) > 1 else ""


def write_replacing(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write via a new inode: never through a hard link into uv's cache."""
    tmp = path.with_name(f".{path.name}.ktenv-{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, mode if mode is not None else (path.stat().st_mode & 0o777 if path.exists() else 0o644))
    os.replace(tmp, path)


def update_record(dist: Dist, changed: dict[Path, bytes], dropped: set[str] = frozenset()) -> None:
    """Set RECORD's hash and size for each changed file, add rows for new ones, drop rows for `dropped` paths."""
    rel = {os.path.relpath(p, dist.site): data for p, data in changed.items()}
    rows, seen = [], set()
    for row in read_record(dist):
        path = os.path.normpath(row[0])
        if path in dropped and path not in rel:
            continue
        if path in rel:
            rows.append([row[0], b64_digest(rel[path]), str(len(rel[path]))])
            seen.add(path)
        else:
            rows.append(row)
    for path in sorted(set(rel) - seen):
        rows.append([path, b64_digest(rel[path]), str(len(rel[path]))])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    write_replacing(dist.dist_info / "RECORD", buf.getvalue().encode())


def replace_tree(dist: Dist, top: str, files: dict[str, bytes], modes: dict[str, int] | None = None) -> dict:
    """Replace everything `dist` installs under the top-level name `top` with `files` (paths relative to site-packages).

    Used to put a source-built package in place of the wheel's copy while the
    distribution's other top-level packages stay (kt-kernel's wheel also
    carries sgl_kernel/, triton_kernels/ and a payload part). RECORD follows.
    """
    old = {os.path.normpath(r[0]) for r in read_record(dist)}
    old = {p for p in old if p == top or p.startswith(top + "/")}
    for p in old:
        with contextlib.suppress(FileNotFoundError):
            (dist.site / p).unlink()
    target = dist.site / top
    if target.is_dir():
        shutil.rmtree(target)  # stale __pycache__ and anything RECORD did not list
    written = {}
    for rel, data in sorted(files.items()):
        if rel != top and not rel.startswith(top + "/"):
            raise DistError(f"replace_tree({top}): {rel} is outside {top}/")
        path = dist.site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, (modes or {}).get(rel, 0o644))
        written[path] = data
    update_record(dist, written, dropped=old)
    return {"removed": len(old), "written": len(written)}
