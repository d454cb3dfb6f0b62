"""Running uv for a build: a clean environment for it (no UV_* or VIRTUAL_ENV of
the caller's may change what is installed, never a downloaded Python), a child
that dies with the build, and `uv pip sync --require-hashes` with its summary
lines relayed as progress."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
from pathlib import Path

from ..errors import KtenvError
from ..progress import beat

try:
    _PRCTL = ctypes.CDLL(None).prctl  # looked up here: the child of a fork must not dlopen
except (AttributeError, OSError):  # not Linux
    _PRCTL = None


def die_with_parent() -> None:
    # A build killed with SIGKILL must not leave uv writing into a directory
    # the next build is about to delete. (The signal follows the thread that
    # started the child: _run and _sync are called from the main thread.)
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def uv_env() -> dict:
    env = dict(os.environ)
    env.update(UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")
    env.pop("VIRTUAL_ENV", None)  # never let an activated env stand in for the target
    return env


def run(cmd: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=uv_env(), timeout=timeout, preexec_fn=die_with_parent)






def uv_version(uv: str) -> str:
    proc = run([uv, "--version"])
    return proc.stdout.split()[1] if proc.returncode == 0 and len(proc.stdout.split()) > 1 else ""


def sync(uv: str, python: Path, requirements: Path, progress, mode: str = "sync") -> None:
    """Install the lock with hash checking; uv's own summary lines are relayed as they come.

    mode "sync": `uv pip sync`, the env holds exactly the lock (a venv).
    mode "install": `uv pip install --no-deps`, the same packages, but what the
    prefix already has (a conda prefix's own Python packages) is left alone."""
    if mode == "sync":
        cmd = [uv, "pip", "sync", "--require-hashes", "--python", str(python), str(requirements)]
    else:
        cmd = [uv, "pip", "install", "--no-deps", "--require-hashes", "--python", str(python), "-r", str(requirements)]
    progress(f"sync: installing {requirements} (hash-checked)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=uv_env(), preexec_fn=die_with_parent)
    tail: list[str] = []
    try:
        with beat(progress, "sync (downloading and installing)"):
            for line in proc.stdout:
                line = line.rstrip()
                tail = (tail + [line])[-40:]
                if re.match(r"^(Resolved|Prepared|Installed|Uninstalled|Audited) ", line):
                    progress(f"sync: {line}")
            rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        text = "\n".join(tail)
        if "Hash mismatch" in text:
            raise KtenvError(
                "An artifact does not match the sha256 the lock records, so nothing was installed and the previous "
                f"env (if any) is untouched:\n{text}\nEither the lock was tampered with or the index served a different "
                "file. Do not work around this; regenerate the lock from a trusted index with `python build.py lock`."
            )
        raise KtenvError(f"`uv pip {cmd[2]}` failed; the previous env (if any) is untouched:\n{text}")
