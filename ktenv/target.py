"""One target, resolved once: which spec, arch, stack, lock, env prefix and interpreter a command is about.

The CLI resolves a `Target` from its arguments and hands it to a stage; no
stage works the prefix or the lock directory out again. For an env that
exists, its stamp (written by the build) is the truth about what it was built
from: `smoke`, `audit` and `launch` follow the stamp's stack and lock
directory, and refuse a `--stack` that contradicts it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import KtenvError
from .lock import model as lockmodel
from .spec import Arch, Inputs, Spec
from .spec import inputs as spec_inputs

# The file inside every env ktenv builds that says what it was built from.
STAMP = "ktenv-stamp.json"
STAMP_FORMAT = 2


def read_stamp(prefix: Path) -> dict | None:
    """The env's stamp, or None when there is no (readable) one."""
    try:
        return json.loads((Path(prefix) / STAMP).read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Target:
    spec: Spec
    arch: Arch
    stack: str
    lock_dir: Path
    prefix: Path
    stamp: dict | None = None

    @property
    def python(self) -> Path:
        """The env's interpreter (it may not exist yet)."""
        return self.prefix / "bin" / "python"

    @property
    def built(self) -> bool:
        return self.python.exists()

    @cached_property
    def lock(self) -> lockmodel.Lock:
        return lockmodel.read(self.lock_dir)

    @cached_property
    def inputs(self) -> Inputs:
        return spec_inputs(self.spec, self.arch.name, self.stack)

    @property
    def kt(self):
        return self.spec.knowledge.kt_kernel

    def build_hint(self) -> str:
        """The command that builds this target's env."""
        cmd = f"python build.py env --arch {self.arch.name}"
        if self.stack != self.spec.stack.default:
            cmd += f" --stack {self.stack}"
        if self.prefix != default_prefix(self.arch.name):
            cmd += f" --prefix {self.prefix}"
        return cmd

    def require_env(self) -> "Target":
        """Self, or the one error every command gives for an env that is not there."""
        if not self.built:
            raise KtenvError(f"There is no environment for {self.arch.name} at {self.prefix} (no {self.python}). "
                             f"Build it first: {self.build_hint()}.")
        return self


def default_prefix(arch: str) -> Path:
    return Path(os.path.abspath(Path(".envs") / arch))


def resolve(spec: Spec, arch: str, *, stack: str | None = None, lock_root: str | Path = "lock",
            prefix: str | Path | None = None, follow_stamp: bool = True) -> Target:
    """The target for `--arch arch [--stack S] [--prefix P]`.

    follow_stamp: for commands that use a built env (smoke, audit, launch),
    take the stack and lock directory the env was built from; a --stack that
    disagrees with the env is refused. `env` itself passes False: it builds
    what it is asked for.
    """
    a = spec.arch(arch)  # refuses unknown and unsupported archs with the reason
    where = Path(os.path.abspath(prefix)) if prefix else default_prefix(a.name)
    stamp = read_stamp(where)
    if follow_stamp and stamp is not None:
        built_stack = stamp.get("stack")
        if stamp.get("arch") not in (None, a.name):
            raise KtenvError(
                f"The env at {where} was built for {stamp.get('arch')}, not {a.name}. Pass --arch {stamp.get('arch')}, "
                f"or point --prefix at the {a.name} env.")
        if stack and built_stack and stack != built_stack:
            raise KtenvError(
                f"The env at {where} was built from stack {built_stack}, but --stack {stack} was asked for. "
                f"Rebuild it (python build.py env --arch {a.name} --stack {stack}"
                + (f" --prefix {prefix}" if prefix else "") + "), or drop --stack to check the env as built.")
        version = spec.stack.release(built_stack or stack).version
        lock_dir = lockmodel.lock_dir(Path(lock_root), a.name, version, spec.stack.default)
        if stamp.get("lock_dir") and Path(stamp["lock_dir"]).is_absolute() and Path(stamp["lock_dir"]).is_dir():
            lock_dir = Path(stamp["lock_dir"])  # the lock it was built from, wherever the command runs
        return Target(spec, a, version, lock_dir, where, stamp)
    version = spec.stack.release(stack).version
    return Target(spec, a, version, lockmodel.lock_dir(Path(lock_root), a.name, version, spec.stack.default), where, stamp)
