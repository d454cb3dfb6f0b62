"""Provision a pinned CUDA toolkit into ktenv's cache (~/.cache/ktenv/cuda/<source>).

A source in envs/toolchain.toml is a list of archives (NVIDIA's redist
.tar.xz, or Debian .deb packages), each with its URL, size and sha256, and a
`map` from archive paths to a standard CUDA_HOME layout (bin/, include/,
lib64/, nvvm/). provision():

  1. downloads each archive (or takes it from --from-dir), checking size and
     sha256 before anything is extracted;
  2. extracts only the mapped members into a hidden sibling folder (a .deb is
     read in Python: an `ar` archive holding data.tar.*, so no dpkg is needed);
  3. writes an nvcc.profile that points nvcc at its own folder (the archives'
     profiles name the paths they were packaged for), runs `nvcc --version`,
     and renames the folder into place: a killed run leaves nothing half-made.

The archives are deleted after extraction: only the toolkit is kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import KtenvError
from ..spec.toolchain import Archive, Source
from ..tools import cache_dir

MANIFEST = "ktenv-toolkit.json"
CHUNK = 1 << 20

# nvcc reads nvcc.profile beside itself; $(_HERE_) is its own folder, so the
# toolkit works wherever the cache is.
NVCC_PROFILE = """\
# written by ktenv: this toolkit's own folders, wherever it lives
TOP = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
LD_LIBRARY_PATH += $(TOP)/lib64:
PATH += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES += "-I$(TOP)/include" $(_SPACE_)
LIBRARIES =+ $(_SPACE_) "-L$(TOP)/lib64/stubs" "-L$(TOP)/lib64"
CUDAFE_FLAGS +=
PTXAS_FLAGS +=
"""


def toolkits_dir() -> Path:
    return cache_dir() / "cuda"


def installed(source: Source, root: Path | None = None) -> Path | None:
    """The provisioned toolkit of `source` in the cache, if it is complete."""
    home = (root or toolkits_dir()) / source.name
    try:
        m = json.loads((home / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    want = sorted(a.sha256 for a in source.archives)
    return home if m.get("archives") == want and (home / "bin" / "nvcc").exists() else None


def _download(url: str, archive: Archive, dest: Path, progress: Callable[[str], None], timeout: float) -> None:
    h = hashlib.sha256()
    got = 0
    last = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
            while chunk := r.read(CHUNK):
                f.write(chunk)
                h.update(chunk)
                got += len(chunk)
                if time.monotonic() - last > 10:
                    last = time.monotonic()
                    progress(f"  {archive.filename}: {got / 1e6:.0f} of {archive.size / 1e6:.0f} MB")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        dest.unlink(missing_ok=True)
        raise KtenvError(f"Cannot download {url}: {getattr(e, 'reason', e)}. The toolkit archive could not be "
                         "fetched from here; download it where it can be reached and pass its folder with "
                         "--from-dir, or install a CUDA toolkit and pass --cuda-home.") from None
    _check(dest, archive, h.hexdigest(), got, url)


def _check(path: Path, archive: Archive, digest: str, size: int, origin: str) -> None:
    if size != archive.size or digest != archive.sha256:
        path.unlink(missing_ok=True)
        raise KtenvError(
            f"{archive.filename} from {origin} is not the pinned file: {size} bytes, sha256 {digest}; "
            f"envs/toolchain.toml pins {archive.size} bytes, sha256 {archive.sha256}. Nothing was extracted. "
            "A mirror served another build, or the download was damaged; retry, or fetch the file by hand "
            "and compare its sha256.")


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest(), path.stat().st_size


class _Window:
    """A read-only view of length bytes of f from its current offset (one `ar` member)."""

    def __init__(self, f: BinaryIO, length: int):
        self.f, self.left = f, length

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data


def _deb_data(f: BinaryIO, name: str) -> tuple[_Window, str]:
    """The data.tar.* member of a .deb (an `ar` archive): a reader and its compression."""
    if f.read(8) != b"!<arch>\n":
        raise KtenvError(f"{name} is not a Debian package (no ar header).")
    while True:
        head = f.read(60)
        if len(head) < 60:
            raise KtenvError(f"{name} has no data.tar member.")
        member = head[:16].decode().strip().rstrip("/")
        size = int(head[48:58].decode().strip())
        if member.startswith("data.tar"):
            return _Window(f, size), member.rsplit(".", 1)[-1]
        f.seek(size + (size & 1), os.SEEK_CUR)  # members are 2-byte aligned


def _members(path: Path):
    """(TarInfo, file object or None) for every member of a .tar.xz or a .deb's data.tar.*."""
    with open(path, "rb") as raw:
        if path.name.endswith(".deb"):
            window, comp = _deb_data(raw, path.name)
            if comp == "xz":
                stream = lzma.LZMAFile(window)
            elif comp == "tar":
                stream = window
            else:
                raise KtenvError(f"{path.name}: data.tar.{comp} is not supported (ktenv reads xz).")
            tar = tarfile.open(fileobj=stream, mode="r|")
        else:
            tar = tarfile.open(fileobj=raw, mode="r|*")
        with tar:
            for info in tar:
                yield info, (tar.extractfile(info) if info.isfile() else None)


def _extract(path: Path, archive: Archive, into: Path) -> int:
    n = 0
    for info, fobj in _members(path):
        rel = archive.dest(info.name)
        if rel is None or ".." in Path(rel).parts:
            continue
        out = into / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if info.isdir():
            out.mkdir(exist_ok=True)
        elif info.issym():
            if os.path.isabs(info.linkname):
                continue  # points into the system it was packaged for (/etc/nvcc.profile)
            if out.is_symlink() or out.exists():
                out.unlink()
            os.symlink(info.linkname, out)
        elif info.islnk():  # a hard link to a member extracted before it
            target = archive.dest(info.linkname)
            if target and (into / target).exists():
                if out.is_symlink() or out.exists():
                    out.unlink()
                shutil.copy2(into / target, out)
        elif info.isfile():
            if out.is_symlink() or out.exists():
                out.unlink()
            with open(out, "wb") as f:
                shutil.copyfileobj(fobj, f, CHUNK)
            os.chmod(out, 0o755 if info.mode & 0o111 else 0o644)
        n += 1
    return n


def nvcc_release(nvcc: Path, env: dict | None = None) -> str | None:
    """'12.4.131' from `nvcc --version` (its 'V12.4.131'), or None when it does not run."""
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60, env=env).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    import re

    m = re.search(r"\bV(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def provision(source: Source, *, root: Path | None = None, from_dir: Path | None = None,
              progress: Callable[[str], None] = print, timeout: float = 60) -> Path:
    """The toolkit of `source`, provisioned into <root or cache>/cuda/<name> if not there yet."""
    root = root or toolkits_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{source.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one provisioning per source at a time
        done = installed(source, root)
        if done:
            return done
        for stale in root.glob(f".{source.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{source.name}.", suffix=".tmp", dir=root))
        try:
            t0 = time.monotonic()
            home = work / "home"
            home.mkdir()
            progress(f"toolchain: provisioning CUDA {source.version} ({source.name}, "
                     f"{len(source.archives)} archives, {source.download_size / 1e9:.2f} GB) into {root / source.name}")
            for a in source.archives:
                local = (from_dir / a.filename) if from_dir else None
                if local and local.exists():
                    digest, size = _hash_file(local)
                    if (digest, size) != (a.sha256, a.size):
                        raise KtenvError(f"{local} is not the pinned {a.filename}: {size} bytes, sha256 {digest}; "
                                         f"envs/toolchain.toml pins {a.size} bytes, sha256 {a.sha256}. Nothing was "
                                         "extracted. Download the file again from " + source.url(a) + ".")
                    path = local
                else:
                    path = work / a.filename
                    progress(f"toolchain: downloading {source.url(a)} ({a.size / 1e6:.0f} MB)")
                    _download(source.url(a), a, path, progress, timeout)
                n = _extract(path, a, home)
                progress(f"toolchain: {a.filename}: {n} files")
                if path.parent == work:
                    path.unlink()
            (home / "lib").exists() or os.symlink("lib64", home / "lib")
            (home / "bin" / "nvcc.profile").unlink(missing_ok=True)
            (home / "bin" / "nvcc.profile").write_text(NVCC_PROFILE)
            got = nvcc_release(home / "bin" / "nvcc")
            if got != source.version:
                raise KtenvError(f"The provisioned nvcc ({home / 'bin' / 'nvcc'}) reports {got or 'nothing'}, not "
                                 f"{source.version}: the archives of {source.name} in envs/toolchain.toml do not make a "
                                 "working toolkit. Check its `map` entries.")
            (home / MANIFEST).write_text(json.dumps({
                "source": source.name, "version": source.version, "base_url": source.base_url,
                "archives": sorted(a.sha256 for a in source.archives),
                "seconds": round(time.monotonic() - t0, 1)}, indent=1) + "\n")
            final = root / source.name
            if final.exists():
                shutil.rmtree(final)
            home.rename(final)
            progress(f"toolchain: CUDA {source.version} ready at {final} in {time.monotonic() - t0:.0f} s")
            return final
        finally:
            shutil.rmtree(work, ignore_errors=True)
