"""The typed form of envs/*.toml: what the stack is, per arch, and what ktenv knows about it.

Everything here is plain data built by `ktenv.spec.load`; nothing does I/O.
Stack knowledge (model sizes, what a dispatch path imports, kt-kernel's
variants) lives in envs/ beside the stack and the rules, with the stack
releases it was read from, so code never hard-codes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from ..errors import SpecError

RULE_KINDS = ("override", "lockstep", "constrain", "add", "remove", "replace")


@dataclass(frozen=True)
class Release:
    version: str
    exclude_newer: str
    released: str = ""


@dataclass(frozen=True)
class Sizes:
    """Disk sizes the env builder and doctor plan with (envs/stack.toml [sizes])."""
    env_bytes: int
    linked_env_bytes: int
    payload_scratch_bytes: int


@dataclass(frozen=True)
class Stack:
    default: str
    root: tuple[str, ...]
    python: tuple[str, ...]
    platform: str
    cuda: str
    torch_cuda: str
    index_url: str
    releases: dict[str, Release]
    launch: dict
    env: dict[str, str]
    sizes: Sizes
    name: str = ""

    def release(self, version: str | None) -> Release:
        version = version or self.default
        if version not in self.releases:
            known = ", ".join(sorted(self.releases, key=Version))
            raise SpecError(
                f"Unknown stack version {version!r}. envs/stack.toml knows {known}. "
                "To lock another release, add a [stack.versions.\"X\"] entry with its "
                "resolution cut-off (exclude_newer) and rerun."
            )
        return self.releases[version]

    def root_requirements(self, version: str) -> list[str]:
        return [r.replace("{version}", version) for r in self.root]


@dataclass(frozen=True)
class Arch:
    name: str
    title: str
    compute_capability: str
    supported: bool
    source: Path
    validated: bool = False
    min_cuda: str = ""
    reason: str = ""
    evidence: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    paths: dict = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    launch: dict = field(default_factory=dict)
    # The [flash_mla] table (sm90): the FlashMLA revision ktenv builds and why;
    # validated by ktenv.build.flash_mla_source.pin_for, its only reader.
    flash_mla: dict = field(default_factory=dict)

    @property
    def sm_number(self) -> int:
        return int(self.name[2:])

    @property
    def cc(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)


@dataclass(frozen=True)
class Rule:
    id: str
    kind: str
    reason: str
    evidence: tuple[str, ...]
    stack: SpecifierSet
    source: Path
    line: int
    package: str = ""
    packages: tuple[str, ...] = ()
    spec: SpecifierSet | None = None
    with_: str = ""
    archs: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.source.name}:{self.line}"

    def touches(self) -> tuple[str, ...]:
        """Canonical names of every package this rule changes."""
        names = list(self.packages) or [self.package]
        if self.with_:
            names.append(Requirement(self.with_).name)
        return tuple(canonicalize_name(n) for n in names if n)

    def applies(self, arch: str, stack_version: str) -> bool:
        if self.archs and arch not in self.archs:
            return False
        return self.stack.contains(Version(stack_version), prereleases=True)


# --- stack knowledge (envs/model.toml, loaders.toml, cuda.toml, ktkernel.toml) ---

@dataclass(frozen=True)
class Known:
    """One fact with the stack releases it holds for and why it is believed."""
    stack: SpecifierSet
    reason: str = ""
    evidence: tuple[str, ...] = ()

    def holds(self, stack_version: str) -> bool:
        return self.stack.contains(Version(stack_version), prereleases=True)


@dataclass(frozen=True)
class ExpertShape:
    layers: int
    routed: int
    shared: int
    top_k: int
    hidden: int
    intermediate: int


@dataclass(frozen=True)
class Model:
    name: str
    weights_bytes: int
    ram_bytes: int
    ram_slack: float
    experts: ExpertShape
    bad_tp: dict[int, Known]  # tensor-parallel size -> why it fails


@dataclass(frozen=True)
class PathNeed:
    """What sglang imports for one [arch.paths] choice, and whether it can fall back."""
    known: Known
    required: bool
    symbols: tuple[str, ...]
    fallback: str = ""
    min_flashinfer: str = ""
    remedy: str = ""  # what the import tier tells the user when a required path is missing


SELFCHECK_KINDS = ("quirk", "needs-gpu", "host", "covered")


@dataclass(frozen=True)
class SelfCheckNote:
    """A warning an upstream self-check (kt doctor, sglang.check_env) gives in a correct env, and why."""
    tool: str
    item: str
    says: str  # regular expression on what the tool printed for `item`
    kind: str  # one of SELFCHECK_KINDS
    known: Known


@dataclass(frozen=True)
class Loaders:
    import_exempt: dict[str, Known]
    paths: dict[tuple[str, str], PathNeed]  # (path kind, choice) -> need
    common_ops: dict[str, str]  # compute capability -> sgl_kernel/<dir>/common_ops
    common_ops_default: str
    audit_loaded: tuple[tuple[str, str], ...]  # (path regex, why)
    audit_blind: tuple[tuple[str, str], ...]
    preload: tuple[tuple[str, ...], Known] | None = None  # [smoke] preload: the fork server's warm imports
    selfcheck: tuple[SelfCheckNote, ...] = ()

    def common_ops_dir(self, compute_capability: str) -> str:
        return self.common_ops.get(compute_capability, self.common_ops_default)

    def preload_for(self, stack_version: str) -> list[str]:
        if self.preload is None or not self.preload[1].holds(stack_version):
            return []
        return list(self.preload[0])


@dataclass(frozen=True)
class KtKernel:
    variants: tuple[str, ...]  # best first
    requires: dict[str, tuple[str, ...]]  # variant -> /proc/cpuinfo flags
    toggles: dict[str, dict[str, str]]  # variant -> CMake toggles
    default_cuda_archs: str
    min_setuptools: tuple[int, ...]
    min_cmake: tuple[int, ...]


@dataclass(frozen=True)
class Knowledge:
    model: Model
    loaders: Loaders
    min_driver: dict[str, str]  # CUDA version -> oldest Linux driver
    kt_kernel: KtKernel
    serve: dict  # envs/serve.toml as read (keys checked): launch sizing and convert
    tune: dict  # envs/tune.toml as read (keys and types checked): how `tune` measures and decides
    toolchain: object  # spec.toolchain.Policy (envs/toolchain.toml): the nvcc each arch needs, pinned toolkits


@dataclass(frozen=True)
class Spec:
    root: Path
    stack: Stack
    archs: dict[str, Arch]
    rules: tuple[Rule, ...]
    knowledge: Knowledge

    def arch(self, name: str) -> Arch:
        """The arch, or a SpecError that tells the user what to do instead."""
        if name not in self.archs:
            known = ", ".join(self.supported_archs())
            raise SpecError(
                f"Unknown arch {name!r}. Supported archs are {known} "
                "(compute capability 8.9 -> sm89, 9.0 -> sm90, 10.0 -> sm100, 12.0 -> sm120). "
                "`python build.py doctor` tells which one this machine's GPU needs."
            )
        arch = self.archs[name]
        if not arch.supported:
            raise SpecError(
                f"{arch.name} ({arch.title}) is not supported. {arch.reason} "
                f"Evidence: {', '.join(arch.evidence)}.",
                exit_code=3,
            )
        return arch

    def supported_archs(self) -> list[str]:
        """Supported arch names in compute-capability order (sm89 before sm100)."""
        return [a.name for a in sorted(self.archs.values(), key=lambda a: a.sm_number) if a.supported]
