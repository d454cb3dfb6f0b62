"""The env directory: one build per prefix (a file lock beside it), built in a
hidden sibling and swapped in with one rename, leftovers of killed builds
cleaned up, and the stamp that says whether an existing env is what a build
would make."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from ..errors import KtenvError
from ..target import STAMP
from .dists import site_packages


class BuildBusy(KtenvError):
    exit_code = 75  # EX_TEMPFAIL: try again later

def siblings(prefix: Path) -> dict[str, Path]:
    name = prefix.name
    return {
        "lock": prefix.parent / f".{name}.ktenv.lock",
        "build": prefix.parent / f".{name}.ktenv-build-{os.getpid()}",
        "old": prefix.parent / f".{name}.ktenv-old-{os.getpid()}",
    }


class BuildLock:
    """An exclusive flock beside the prefix; the holder's pid and start time are written into it."""

    def __init__(self, prefix: Path, wait: bool = True, progress=lambda m: None):
        self.prefix = prefix
        self.path = siblings(prefix)["lock"]
        self.wait = wait
        self.progress = progress
        self.f = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']}, started {time.strftime('%H:%M:%S', time.localtime(info['since']))}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            if not self.wait:
                self.f.close()
                raise BuildBusy(
                    f"Another build of {self.prefix} is running ({holder}); it holds {self.path}. "
                    "Wait for it to finish, or rerun without --no-wait to queue behind it."
                ) from None
            self.progress(f"waiting for another build of {self.prefix} ({holder}) to finish")
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        self.f.seek(0)
        self.f.truncate()
        self.f.write(json.dumps({"pid": os.getpid(), "since": time.time()}))
        self.f.flush()
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.f.truncate(0)
        fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
        self.f.close()


def clean_stale(prefix: Path, progress=lambda m: None) -> list[str]:
    """Remove what killed builds of this prefix left behind. Call only under BuildLock."""
    removed = []
    name = prefix.name
    olds = sorted(prefix.parent.glob(f".{name}.ktenv-old-*"))
    if not prefix.exists() and olds and (olds[-1] / STAMP).exists():
        # Killed between the two renames of the fallback swap: put the previous env back.
        os.rename(olds[-1], prefix)
        progress(f"restored the previous env at {prefix} from an interrupted swap")
        olds = olds[:-1]
    for p in olds + sorted(prefix.parent.glob(f".{name}.ktenv-build-*")):
        progress(f"removing {p.name}, left by an interrupted build")
        shutil.rmtree(p, ignore_errors=True)
        removed.append(str(p))
    return removed




def dist_infos(env: Path) -> list[str]:
    try:
        site = site_packages(env)
    except KtenvError:
        return []
    return sorted(p.name for p in site.glob("*.dist-info"))


def up_to_date(prefix: Path, want: dict) -> tuple[bool, str]:
    """Whether the env at prefix is what `want` describes; and if not, why not (for the log)."""
    try:
        stamp = json.loads((prefix / STAMP).read_text())
    except FileNotFoundError:
        return False, "no env yet" if not prefix.exists() else f"{prefix} has no {STAMP}"
    except ValueError:
        return False, f"{STAMP} is unreadable"
    for key, value in want.items():
        if stamp.get(key) != value:
            return False, f"{key} changed"
    if not (prefix / "bin" / "python").exists():
        return False, "bin/python is missing"
    if dist_infos(prefix) != stamp.get("dists"):
        return False, "the installed distributions differ from the ones it was built with"
    return True, "up to date"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in(tmp: Path, prefix: Path) -> str:
    """Make tmp the env at prefix in one step; the previous env (if any) is deleted afterwards."""
    if not prefix.exists():
        os.rename(tmp, prefix)
        return "rename"
    if _exchange(tmp, prefix):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous env
        return "exchange"
    old = siblings(prefix)["old"]
    os.rename(prefix, old)
    os.rename(tmp, prefix)
    shutil.rmtree(old, ignore_errors=True)
    return "rename-pair"


def check_replaceable(prefix: Path) -> None:
    if not prefix.exists():
        return
    if not prefix.is_dir() or (not (prefix / STAMP).exists() and any(prefix.iterdir())):
        raise KtenvError(
            f"{prefix} exists and is not an env ktenv built (it has no {STAMP}). ktenv replaces the whole "
            "directory when it builds, so it will not touch this one. Choose another --prefix, or move it away."
        )


def check_relocated(prefix: Path, tmp: Path) -> None:
    """After the rename, nothing in the env may still point at the build directory."""
    needle = os.fsencode(str(tmp))
    for p in list((prefix / "bin").iterdir()) + [prefix / "pyvenv.cfg"]:
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                if needle in f.read(1 << 20):
                    raise KtenvError(f"{p} still refers to the build directory {tmp}; uv did not make the env relocatable. Report this with your uv version.")
    proc = subprocess.run([str(prefix / "bin" / "python"), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    if proc.returncode != 0 or Path(proc.stdout.strip()) != prefix:
        raise KtenvError(f"{prefix}/bin/python does not run as this env after the swap: {proc.stdout.strip()} {proc.stderr.strip()[-400:]}")
