"""Shared by the build tests: copies of lock/sm90 (optionally mutated) and the env CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path


from ktenv.lock import model as lockmodel
from ktenv.target import STAMP

from conftest import REPO, run_cli
from test_payload import shared_cache

LOCK = REPO / "lock" / "sm90"
CACHE_ENV = {"KTENV_CACHE_DIR": str(shared_cache().parent)}
# A Python no machine has: `find_python` must name it.
ABSENT_PYTHON = "3.99"


def copy_lock(dst_root: Path, mutate=None, meta=None) -> Path:
    """A copy of lock/sm90 under dst_root/sm90, optionally with requirements.txt changed (and its hash kept true)."""
    d = dst_root / "sm90"
    shutil.copytree(LOCK, d)
    req = d / "requirements.txt"
    if mutate:
        req.write_text(mutate(req.read_text()))
        text = (d / "lock.toml").read_text()
        text = re.sub(r'requirements_sha256 = "[^"]+"', f'requirements_sha256 = "{lockmodel.sha256_file(req)}"', text)
        (d / "lock.toml").write_text(text)
    if meta:
        (d / "lock.toml").write_text(meta((d / "lock.toml").read_text()))
    return dst_root


def add_comment(text: str) -> str:
    return text + "# a harmless change that makes this a different lock\n"


def tamper_hash(text: str) -> str:
    """Every hash of the idna entry replaced: uv must refuse the artifact."""
    start = text.index("\nidna==")
    end = text.index("\n", text.index("# via", start))
    return text[:start] + re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, text[start:end]) + text[end:]


def env_cli(prefix: Path, lock_root: Path | None = None, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    args = ["env", "--arch", "sm90", "--prefix", str(prefix)]
    if lock_root:
        args += ["--lock-dir", str(lock_root)]
    return run_cli(*args, *extra, env=CACHE_ENV, timeout=timeout)


def debris(prefix: Path) -> list[str]:
    return sorted(p.name for p in prefix.parent.glob(f".{prefix.name}.ktenv-*") if not p.name.endswith(".lock"))


def stamp(prefix: Path) -> dict:
    return json.loads((prefix / STAMP).read_text())
