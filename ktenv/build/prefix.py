"""The one backend-specific step of a build: make the prefix with its Python.

`uv`: `uv venv --relocatable` over an interpreter the PyPI lock was made for
(found on this machine, never downloaded). `conda`: the packages of
lock/<arch>/conda-lock.yml (python, nvcc, compilers, hwloc, ...) linked from
the conda lock. Everything before (lock check, file lock, no-op check) and
after (PyPI layer, kt-kernel, patches, payload, checks, stamp, swap) is
build/pipeline.py's, the same for both.

A backend says what identifies its prefix in the env's stamp (`want`), makes
the prefix in the hidden build directory (`make`), and may check and fix up
the result after the PyPI layer (`after_pypi`, `before_swap`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KtenvError
from ..tools import cache_dir
from .python import find_python, identity
from .sync import run as _run


@dataclass
class Made:
    python: Path          # the interpreter inside the build directory
    version: str          # X.Y
    python_path: str      # what the stamp and report call the interpreter


class UvBackend:
    name = "uv"
    # uv pip sync: the venv holds nothing but the lock.
    sync_mode = "sync"

    def __init__(self, target, requested: str | None):
        self.target = target
        self.python, self.version = find_python(target.lock.python, requested)
        self.requested = requested

    def want(self) -> dict:
        # The interpreter the env is built on (its base prefix): an env built by
        # the host's Python must not pass for one built inside `nix develop`.
        out = {"backend": self.name, "python_base_prefix": identity(self.python)["base_prefix"]}
        if self.requested:
            out["python_requested"] = self.requested
        return out

    def make(self, tmp: Path, prefix: Path, uv: str, progress) -> Made:
        proc = _run([uv, "venv", "--relocatable", "--no-project", "--python", self.python,
                     "--python-preference", "only-system", str(tmp)])
        if proc.returncode != 0:
            raise KtenvError(f"`uv venv` failed for {self.python}:\n{proc.stderr.strip()[-1500:]}")
        return Made(tmp / "bin" / "python", self.version, self.python)

    def pypi_requirements(self, work: Path) -> Path:
        """What the PyPI layer installs: the whole lock."""
        return self.target.lock.requirements

    def after_pypi(self, tmp: Path) -> None:
        pass

    def before_swap(self, tmp: Path, prefix: Path) -> dict:
        return {}


@dataclass
class CondaBackend:
    """The conda prefix of lock/<arch>/conda-lock.yml; the PyPI layer goes into its python."""
    target: object
    requested: str | None = None
    channel: str | None = None
    cache: Path | None = None
    name: str = "conda"
    # uv pip install --no-deps: uv pip sync would uninstall conda's own Python
    # packages (pip), which the lock does not list.
    sync_mode: str = "install"
    _files: dict = field(default_factory=dict)

    def __post_init__(self):
        from ..lock import conda as condalock

        t = self.target
        self.lock_path = t.lock_dir / condalock.LOCK_FILE
        # Offline: the conda lock matches envs/ and the PyPI lock beside it.
        self.doc = condalock.check(t.spec, t.arch.name, t.lock_dir, channel_url=self.channel)
        self.cache = Path(self.cache) if self.cache else cache_dir() / "conda"
        from .conda import check_requested_python, conda_packages

        pinned = next((p["version"] for p in conda_packages(self.doc) if p["name"] == "python"), "")
        if not pinned:
            raise KtenvError(f"{self.lock_path} has no python package; the PyPI layer has nothing to install into. Relock.")
        check_requested_python(self.requested, ".".join(pinned.split(".")[:2]), pinned)
        self.version = ".".join(pinned.split(".")[:2])
        if self.version not in t.lock.python:
            raise KtenvError(f"{self.lock_path} pins python {pinned}, but {t.lock.requirements} was made for Python "
                             f"{' or '.join(t.lock.python)}. Relock both: build.py lock --arch {t.arch.name} --conda")

    def want(self) -> dict:
        return {"backend": self.name,
                "conda_lock_sha256": "sha256:" + hashlib.sha256(self.lock_path.read_bytes()).hexdigest()}

    def make(self, tmp: Path, prefix: Path, uv: str, progress) -> Made:
        from . import conda

        conda.host_check(self.target.lock_dir)
        fetched = conda.fetch_all(self.doc, self.cache, progress)
        conda.install(fetched, tmp, prefix, self.cache, self.doc["metadata"]["platforms"][0], progress)
        version = conda.check_python(tmp, self.doc, self.requested)
        self._files = conda.conda_files(tmp)
        return Made(tmp / "bin" / "python", version, str(prefix / "bin" / "python"))

    def pypi_requirements(self, work: Path) -> Path:
        """The PyPI lock less what the conda layer provides (pip, at the same version)."""
        from ..lock import conda as condalock

        req = self.target.lock.requirements
        out = work / f"{req.parent.name}-pypi-layer.txt"
        out.write_text(condalock.pypi_layer(self.doc, req))
        return out

    def after_pypi(self, tmp: Path) -> None:
        from . import conda

        conda.check_no_overlap(tmp, self._files)

    def before_swap(self, tmp: Path, prefix: Path) -> dict:
        from . import conda
        from ..lock.conda import pip_packages

        scripts = conda.relocate_scripts(tmp, prefix)
        return {"conda": {"lock": str(self.lock_path), "packages": len(conda.conda_packages(self.doc)),
                          "pip_entries": len(pip_packages(self.doc)), "files": len(self._files),
                          "channels": [c["url"] for c in self.doc["metadata"].get("channels", [])],
                          "relocated_scripts": len(scripts)}}


def backend(target, name: str, requested: str | None, channel: str | None = None, cache: Path | None = None):
    if name == "uv":
        if channel:
            raise KtenvError("--channel is for --backend conda (the channel its lock was made against); the uv backend installs from the PyPI lock only.")
        return UvBackend(target, requested)
    if name == "conda":
        return CondaBackend(target, requested, channel, cache)
    raise KtenvError(f"Unknown backend {name!r}: use uv or conda.")
