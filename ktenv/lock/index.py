"""What the package index says: versions published before a cut-off, and the
dependencies a published wheel declares.

uv answers "what resolves"; two questions it does not answer are asked here:
which versions of several packages exist in common (lockstep rules), and what
each locked package declares (so `explain` can show every departure from
upstream). The index's JSON simple API (PEP 691, upload times from PEP 700)
gives the first; the second is read from each wheel's METADATA with two HTTP
range requests, because this index serves no separate metadata files.
Declared metadata never changes for a published file, so it is cached on disk.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from email.parser import HeaderParser

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version

from ..errors import ResolveError
from ..tools import cache_dir

JSON_ACCEPT = "application/vnd.pypi.simple.v1+json"
TIMEOUT = 30


@dataclass(frozen=True)
class File:
    filename: str
    url: str
    sha256: str
    version: Version
    upload_time: str
    is_wheel: bool


def _get(url: str, headers: dict | None = None) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise
        raise ResolveError(f"The package index answered HTTP {e.code} for {url}. Retry later, or check the index URL in envs/stack.toml.") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ResolveError(
            f"Could not reach the package index ({url}): {getattr(e, 'reason', e)}. "
            "Resolving a lock needs the network; `lock --check` and `explain` work offline."
        ) from None


class Index:
    """The package index (PyPI's JSON simple API): versions with upload times, and each wheel's
    declared requirements, read with HTTP range requests and cached in ktenv's cache.

    The resolver, the lockstep pick and the departure check ask an index only
    `versions`, `requires_dist` and `requires_dist_many`; `RecordedIndex`
    answers the same from a file, so they are tested offline."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._files: dict[str, list[File]] = {}

    def files(self, name: str) -> list[File]:
        name = canonicalize_name(name)
        if name not in self._files:
            try:
                raw = _get(f"{self.url}/{name}/", {"Accept": JSON_ACCEPT})
            except urllib.error.HTTPError:
                raise ResolveError(f"The index has no project named {name!r}. Check the package name in envs/.") from None
            files = []
            for f in json.loads(raw)["files"]:
                if f.get("yanked"):
                    continue
                fn = f["filename"]
                try:
                    if fn.endswith(".whl"):
                        version, wheel = parse_wheel_filename(fn)[1], True
                    else:
                        version, wheel = parse_sdist_filename(fn)[1], False
                except (InvalidWheelFilename, InvalidSdistFilename):
                    continue
                files.append(File(fn, f["url"], f["hashes"].get("sha256", ""), version, f.get("upload-time", ""), wheel))
            self._files[name] = files
        return self._files[name]

    def versions(self, name: str, exclude_newer: str) -> set[Version]:
        """Versions with at least one file uploaded before the cut-off."""
        # RFC 3339 UTC strings of the same shape compare correctly as text.
        return {f.version for f in self.files(name) if f.upload_time and f.upload_time[:19] < exclude_newer[:19]}

    def requires_dist(self, name: str, version: str) -> list[str] | None:
        """The Requires-Dist lines of a published wheel, or None for sdist-only releases."""
        key = cache_dir() / "metadata" / f"{canonicalize_name(name)}-{version}.json"
        if key.exists():
            return json.loads(key.read_text())["requires_dist"]
        wheels = [f for f in self.files(name) if f.is_wheel and f.version == Version(version)]
        if not wheels:
            return None
        meta = _remote_wheel_metadata(sorted(wheels, key=lambda f: f.filename)[0].url)
        reqs = HeaderParser().parsestr(meta).get_all("Requires-Dist") or []
        key.parent.mkdir(parents=True, exist_ok=True)
        tmp = key.with_suffix(".tmp")
        tmp.write_text(json.dumps({"requires_dist": reqs}))
        tmp.replace(key)
        return reqs

    def requires_dist_many(self, pins: dict[str, str]) -> dict[str, list[str] | None]:
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = pool.map(lambda kv: (kv[0], self.requires_dist(*kv)), sorted(pins.items()))
            return dict(results)


def _range(url: str, spec: str) -> bytes:
    return _get(url, {"Range": f"bytes={spec}"})


def _remote_wheel_metadata(url: str) -> str:
    """Read *.dist-info/METADATA out of a remote wheel with range requests."""
    tail = _range(url, "-65536")
    eocd = tail.rfind(b"PK\x05\x06")
    if eocd < 0:
        raise ResolveError(f"{url} does not end like a zip archive; cannot read its metadata.")
    cd_size, cd_offset = struct.unpack("<II", tail[eocd + 12 : eocd + 20])
    cd = _range(url, f"{cd_offset}-{cd_offset + cd_size - 1}")
    pos = 0
    while pos < len(cd) and cd[pos : pos + 4] == b"PK\x01\x02":
        method, = struct.unpack("<H", cd[pos + 10 : pos + 12])
        csize, = struct.unpack("<I", cd[pos + 20 : pos + 24])
        nlen, elen, clen = struct.unpack("<HHH", cd[pos + 28 : pos + 34])
        local, = struct.unpack("<I", cd[pos + 42 : pos + 46])
        fname = cd[pos + 46 : pos + 46 + nlen].decode()
        pos += 46 + nlen + elen + clen
        parts = fname.split("/")
        if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "METADATA":
            # The local header's name/extra lengths may differ from the central
            # directory's, so read it before the data.
            blob = _range(url, f"{local}-{local + 30 + 1024 + csize}")
            n, e = struct.unpack("<HH", blob[26:30])
            data = blob[30 + n + e : 30 + n + e + csize]
            return (zlib.decompress(data, -15) if method == 8 else data).decode()
    raise ResolveError(f"{url}: no .dist-info/METADATA in the wheel.")


class RecordedIndex:
    """An index answered from a recording (`record(index, pins, names, path)`): offline and exact."""

    def __init__(self, path: str | Path):
        data = json.loads(Path(path).read_text())
        self.url = data["url"]
        self._versions = {n: [(Version(v), t) for v, t in vs] for n, vs in data["versions"].items()}
        self._requires = data["requires_dist"]

    def versions(self, name: str, exclude_newer: str) -> set[Version]:
        name = canonicalize_name(name)
        if name not in self._versions:
            raise ResolveError(f"The recording has no versions of {name!r}; record it again with that package.")
        return {v for v, t in self._versions[name] if t and t[:19] < exclude_newer[:19]}

    def requires_dist(self, name: str, version: str) -> list[str] | None:
        key = f"{canonicalize_name(name)}=={version}"
        if key not in self._requires:
            raise ResolveError(f"The recording has no metadata for {key}; record it again from the lock.")
        return self._requires[key]

    def requires_dist_many(self, pins: dict[str, str]) -> dict[str, list[str] | None]:
        return {n: self.requires_dist(n, v) for n, v in sorted(pins.items())}


def record(index: Index, pins: dict[str, str], names: list[str], path: str | Path) -> None:
    """Write what `index` says of these pins (declared requirements) and names (versions with
    upload times) to `path`, for RecordedIndex."""
    versions = {canonicalize_name(n): sorted({(str(f.version), f.upload_time) for f in index.files(n)},
                                             key=lambda x: (Version(x[0]), x[1])) for n in names}
    requires = {f"{canonicalize_name(n)}=={v}": index.requires_dist(n, v) for n, v in sorted(pins.items())}
    Path(path).write_text(json.dumps({"url": index.url, "versions": versions, "requires_dist": requires},
                                     indent=1, sort_keys=True) + "\n")
