"""A cache of wheels built from source: kt-kernel's and flash_mla's source builds.

<root>/<key>/ holds one wheel and its build.json; the key is a hash of
everything that identifies the build. A build runs in a scratch directory
beside the entry and is renamed into place, so an entry is complete or
absent; one build at a time per cache root, because these builds are
memory-bound (each compiler process takes gigabytes), not CPU-bound.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# Run with the build's python in the source tree: PEP 517's build_wheel into argv[1].
BUILD_WHEEL = "import sys\nfrom setuptools import build_meta as b\nprint('KTENV_WHEEL', b.build_wheel(sys.argv[1]))\n"


def key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Slot:
    entry: Path  # <root>/<key>
    key: str
    hit: Path | None  # the cached wheel, when the entry is complete
    work: Path | None = None  # the scratch directory (None on a hit)

    @property
    def log(self) -> Path:
        return self.work / "build.log"  # type: ignore[operator]

    def keep_log(self) -> Path:
        """Copy the failed build's log out of the scratch directory (which goes) and return where."""
        keep = self.entry.parent / f"failed-{self.key}.log"
        shutil.copy(self.log, keep)
        return keep

    def publish(self, wheel: Path, meta: dict, scratch: tuple[str, ...] = ()) -> Path:
        """Move `wheel` and build.json (meta plus the built time) into the entry; `scratch`
        names the work directory's folders to drop first. Returns the cached wheel."""
        work = self.work
        assert work is not None
        meta = {**meta, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        shutil.move(str(wheel), work / wheel.name)
        (work / "build.json").write_text(json.dumps(meta, indent=1) + "\n")
        for d in scratch:
            shutil.rmtree(work / d, ignore_errors=True)
        if self.entry.exists():
            shutil.rmtree(self.entry)
        work.rename(self.entry)  # atomic: a cache entry is complete or absent
        return self.entry / wheel.name


@contextmanager
def slot(root: Path, key: str) -> Iterator[Slot]:
    """Hold the cache's lock for `key`: the cached wheel, or a scratch directory to build in
    (removed on the way out unless published)."""
    entry = Path(root) / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wheels = sorted(entry.glob("*.whl"))
        if wheels and (entry / "build.json").exists():
            yield Slot(entry, key, wheels[0])
            return
        work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
        work.chmod(0o755)  # mkdtemp makes it 0700; a cache may be shared
        try:
            yield Slot(entry, key, None, work)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
