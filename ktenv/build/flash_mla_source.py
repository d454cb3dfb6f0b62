"""Which FlashMLA and CUTLASS sources a flash_mla build may use: the pin in envs/ and the checks against it.

envs/sm90.toml [flash_mla] pins a FlashMLA commit and the CUTLASS commit its
submodule records, each with git's object ids of the paths the build reads.
A source is identified by recomputing those ids from the files on disk
(git's blob and tree encoding), so a clone, an archive without .git and a
checkout someone built in place are all recognised, and a local edit or
another revision is refused with what to do instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import KtenvError, SpecError

# Files upstream's .gitignore names (build output, caches) are not source: a
# checkout someone built in place must still be recognised.
_IGNORED = re.compile(r"^(\.git|build|dist|__pycache__|\.cache|\.vscode|\.clangd|compile_commands\.json)$"
                      r"|\.(so|pyc|png|egg-info)$|perf\.csv$")


@dataclass(frozen=True)
class Pin:
    commit: str
    trees: dict
    min_cuda: str
    build_env: dict
    sass: tuple
    cutlass_commit: str
    cutlass_trees: dict
    repository: str
    cutlass_repository: str
    required: bool
    reason: str
    source: Path

    @property
    def short(self) -> str:
        return self.commit[:7]


def pin_for(arch) -> Pin | None:
    """The arch's [flash_mla] table, checked; None when the arch has none."""
    t, path = arch.flash_mla, arch.source
    if not t:
        return None
    c = t.get("cutlass") or {}
    want = {"required": bool, "reason": str, "repository": str, "commit": str, "trees": dict,
            "min_cuda": str, "build_env": dict, "sass": list}
    for key, kind in want.items():
        if not isinstance(t.get(key), kind):
            raise SpecError(f"{path}: [flash_mla].{key} must be a {kind.__name__}; ktenv cannot build flash_mla without it.")
    for key in ("repository", "commit", "trees"):
        if not c.get(key):
            raise SpecError(f"{path}: [flash_mla.cutlass].{key} is missing; it pins the CUTLASS headers FlashMLA compiles against.")
    for name, value in [("commit", t["commit"]), ("cutlass.commit", c["commit"])] + list(t["trees"].items()) \
            + list(c["trees"].items()):
        if not re.fullmatch(r"[0-9a-f]{40}", str(value)):
            raise SpecError(f"{path}: [flash_mla] {name} = {value!r} is not a 40-digit git object id.")
    return Pin(t["commit"], dict(t["trees"]), t["min_cuda"], {k: str(v) for k, v in t["build_env"].items()},
               tuple(t["sass"]), c["commit"], dict(c["trees"]), t["repository"], c["repository"], t["required"],
               " ".join(t["reason"].split()), path)


# --- what the source is ------------------------------------------------------------

def _blob_id(data: bytes) -> bytes:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).digest()


def tree_id(path: str | Path, gitlinks: Mapping[str, str] | None = None) -> str | None:
    """git's object id for this directory (or file) as it is on disk; None for an empty directory.

    gitlinks: {name: commit} entries of this directory that are submodules;
    they stand as git records them, whatever is checked out there.
    """
    p = Path(path)
    if p.is_file():
        return _blob_id(p.read_bytes()).hex()
    raw = _tree(p, dict(gitlinks or {}))
    return raw.hex() if raw else None


def _tree(d: Path, gitlinks: dict) -> bytes | None:
    # A submodule is recorded by its commit whether or not (or whatever) it is checked out.
    entries = [(name, b"160000", bytes.fromhex(commit)) for name, commit in gitlinks.items()]
    for e in os.scandir(d):
        if _IGNORED.search(e.name) or e.name in gitlinks:
            continue
        if e.is_symlink():
            entries.append((e.name, b"120000", _blob_id(os.readlink(e.path).encode())))
        elif e.is_dir():
            sub = _tree(Path(e.path), {})
            if sub:  # git has no empty directories
                entries.append((e.name + "/", b"40000", sub))
        else:
            mode = b"100755" if e.stat().st_mode & 0o100 else b"100644"
            entries.append((e.name, mode, _blob_id(Path(e.path).read_bytes())))
    if not entries:
        return None
    body = b"".join(m + b" " + n.rstrip("/").encode() + b"\0" + h for n, m, h in sorted(entries))
    return hashlib.sha1(b"tree %d\0" % len(body) + body).digest()


def _git_head(path: Path) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 and (path / ".git").exists() else None


def check_source(source: str | Path, pin: Pin) -> dict:
    """Refuse anything but the pinned FlashMLA sources; returns how it was identified."""
    src = Path(source).resolve()
    if not (src / "setup.py").is_file() or not (src / "flash_mla" / "flash_mla_interface.py").is_file():
        raise KtenvError(f"--flash-mla-source {src} is not a FlashMLA checkout (no setup.py and flash_mla/"
                         f"flash_mla_interface.py). Clone {pin.repository} and pass its root directory.")
    cutlass_link = {"cutlass": pin.cutlass_commit}
    found = {rel: tree_id(src / rel, cutlass_link if rel == "csrc" else None) for rel in pin.trees}
    differ = sorted(rel for rel, want in pin.trees.items() if found.get(rel) != want)
    head = _git_head(src)
    if not differ:
        return {"commit": pin.commit, "identified_by": "git HEAD" if head == pin.commit else "file contents",
                "path": str(src)}
    fix = (f"`git -C {src} fetch origin && git -C {src} checkout {pin.commit}`, then "
           f"`git -C {src} submodule update --init csrc/cutlass`")
    if head and head != pin.commit:
        raise KtenvError(f"The FlashMLA checkout {src} is at commit {head[:12]}, but ktenv builds {pin.commit[:12]}: "
                         f"the revision with the SM90 kernels and the V4 KV-cache interface that sglang-kt calls "
                         f"({pin.source.name} [flash_mla] says why). Check it out with {fix}; nothing was built.")
    if head:
        raise KtenvError(f"The FlashMLA checkout {src} is at the pinned commit {pin.commit[:12]} but has local changes "
                         f"in {', '.join(differ)}. ktenv builds the pinned sources unchanged; stash or revert them "
                         f"(`git -C {src} status`), or use a clean checkout; nothing was built.")
    raise KtenvError(f"The files of {src} ({', '.join(differ)}) are not those of FlashMLA commit {pin.commit[:12]}, "
                     f"which ktenv builds ({pin.source.name} [flash_mla] says why). Use a checkout of that commit: "
                     f"`git clone {pin.repository}` and {fix}; nothing was built.")


def find_cutlass(source: str | Path, pin: Pin, cutlass: str | Path | None = None) -> Path:
    """The CUTLASS directory to compile against: `cutlass`, else the checkout's csrc/cutlass, at the pinned commit."""
    where = Path(cutlass).resolve() if cutlass else Path(source).resolve() / "csrc" / "cutlass"
    how = f"--cutlass-source {where}" if cutlass else f"{where} (FlashMLA's submodule)"
    if not (where / "include" / "cutlass" / "cutlass.h").is_file():
        hint = ("" if cutlass else f" It is empty in archives and in clones without submodules: run "
                f"`git -C {Path(source).resolve()} submodule update --init csrc/cutlass`, or pass --cutlass-source")
        raise KtenvError(f"No CUTLASS headers at {how} (no include/cutlass/cutlass.h).{hint or ' Pass'} a checkout of "
                         f"{pin.cutlass_repository} at commit {pin.cutlass_commit[:12]}, the one FlashMLA "
                         f"{pin.short} pins (PyPI's nvidia-cutlass is an older release).")
    differ = sorted(rel for rel, want in pin.cutlass_trees.items() if tree_id(where / rel) != want)
    if differ:
        head = _git_head(where)
        at = f" (it is at {head[:12]})" if head else ""
        raise KtenvError(f"The CUTLASS headers at {how}{at} differ in {', '.join(differ)} from commit "
                         f"{pin.cutlass_commit[:12]}, which FlashMLA {pin.short} pins; its kernels are written against "
                         f"exactly those headers. Check that commit out there (`git submodule update --init "
                         f"csrc/cutlass` in the FlashMLA checkout does it); nothing was built.")
    return where
