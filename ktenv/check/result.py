"""What every smoke tier reports, and the context it runs in.

A result is passed, failed, needs-gpu (it could only fail here for want of
the NVIDIA driver, and the evidence says so) or skipped (with the reason);
nothing that did not run is ever reported as passed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from packaging.version import InvalidVersion, Version

from .. import probe as proberun
from ..build import activate, toolchain
from ..lock.model import Entry, Lock
from ..spec import Arch, Spec
from ..target import Target
from .forks import ForkServer

PASSED, FAILED, NEEDS_GPU, SKIPPED = "passed", "failed", "needs-gpu", "skipped"


def _cores() -> int:
    """The cores this process may run on (a container's CPU set can be smaller than os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Probes are CPU-bound (imports): one forked process per core at a time.
IMPORT_WORKERS = _cores()
IMPORT_TIMEOUT = 600


@dataclass
class Result:
    tier: str
    name: str
    status: str
    evidence: str
    remedy: str = ""
    detail: dict = field(default_factory=dict)


@dataclass
class Context:
    target: Target
    env: dict  # the environment every probe runs with (see child_env)
    cpu_flags: frozenset = frozenset()
    workers: int = IMPORT_WORKERS
    modules: list[str] | None = None  # restrict the import sweep (tests); None = all
    extra_args: list[str] = field(default_factory=list)  # extra server flags (launch tiers)
    work: Path | None = None  # where launch-gpu keeps its model and log
    cpu_flags_given: bool = False  # cpu_flags describe another CPU (judging an env for another machine)
    model: str | None = None  # the user's checkpoint (smoke --model): server-args loads its config
    compile_jit: bool = False  # the toolchain tier compiles the first-start kernels (asked for with --tier toolchain)
    forks: ForkServer | None = None  # while one runs (fork_server()), probes are forked from it
    last_forks: dict | None = None  # the last fork server's summary (CPU seconds, preload times)

    @property
    def spec(self) -> Spec:
        return self.target.spec

    @property
    def arch(self) -> Arch:
        return self.target.arch

    @property
    def prefix(self) -> Path:
        return self.target.prefix

    python_override: Path | None = None  # tests run a stand-in interpreter

    @property
    def python(self) -> Path:
        return self.python_override or self.target.python

    @python.setter
    def python(self, value: Path) -> None:
        self.python_override = Path(value)

    @property
    def lock(self) -> Lock:
        return self.target.lock

    @cached_property
    def requirements(self) -> list[dict]:
        """name, version and marker of every locked package (what the inventory probe compares)."""
        return [{"name": e.name, "version": e.version, "marker": e.marker} for e in self.lock.entries()]

    def remedy_rebuild(self) -> str:
        """For an env that is not what its lock says (other versions, packages added or gone): a repair cannot fix that."""
        return f"Rebuild the env from its lock: {self.target.build_hint()}"

    def remedy_repair(self) -> str:
        """For files of the env deleted or changed: reinstall just those distributions."""
        return (f"Reinstall the damaged distributions: {self.target.build_hint()} --repair (only those, hash-checked "
                "from the lock; `--check` lists the damaged files first)")

    def remedy_files(self) -> str:
        """For a failure that a damaged file may cause, or the lock itself."""
        hint = self.target.build_hint()
        return (f"If files of the env were deleted or changed, `{hint} --check` names them and `{hint} --repair` "
                "reinstalls them; if it finds none, the env is as its lock made it and the fault is in the lock")


def child_env(target: Target, base: dict | None = None) -> dict:
    """The env activated as launch runs it (build/activate.py: its bin/ first, the CUDA toolkit it
    recorded, a conda prefix's activation) plus the stack's and arch's [env], made safe for probing."""
    base = dict(os.environ if base is None else base)
    if target.built:
        tc = toolchain.for_env(target.spec.root, target.arch.name, target.prefix, base)
        base = activate.activation(target.prefix, tc, base)
    extra = {k: v for k, v in target.inputs.env.items() if k not in base}
    return proberun.child_env(base, extra)


def probe(ctx: Context, script: str, args: list[str], stdin: dict | None = None,
          timeout: float = IMPORT_TIMEOUT, env: dict | None = None, warm: bool = True) -> tuple[dict | None, str]:
    """Run probes/<script> with the env's python: (its report or None, why not).

    While a fork server runs for this context, and the probe wants the server's
    environment, it runs as a child forked from the server (same script, argv
    and stdin, its own process): from the warm parent, or with warm=False from
    the bare one, which starts it at once instead of after the preload.
    Otherwise in a new process.
    """
    if ctx.forks is not None and ctx.forks.serves(env or ctx.env):
        run = ctx.forks.script(script, args, stdin=stdin, timeout=timeout, parent="warm" if warm else "bare")
    else:
        run = proberun.run(ctx.python, script, args, stdin=stdin, timeout=timeout, env=env or ctx.env)
    return run.result, run.why


@contextlib.contextmanager
def fork_server(ctx: Context):
    """ctx.forks for the duration: the one already running, or a new one stopped at the end.

    Its warm parent imports envs/loaders.toml [smoke] preload once; see probes/fork_server.py.
    """
    if ctx.forks is not None and ctx.forks.serves(ctx.env):
        yield ctx.forks
        return
    server = ForkServer(ctx.python, ctx.env, ctx.spec.knowledge.loaders.preload_for(ctx.target.stack), ctx.workers,
                        IMPORT_TIMEOUT)
    ctx.forks = server
    try:
        yield server
    finally:
        ctx.forks = None
        ctx.last_forks = server.close()


def version(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def entries_by_name(lock: Lock) -> dict[str, Entry]:
    return {e.name: e for e in lock.entries()}
