"""envs/toolchain.toml: which nvcc each arch (or arch list) needs, the host compilers each
nvcc takes, and the pinned toolkit sources. Loaded and validated here; the rules that use
it are in toolchain.py (which re-exports these names)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import Version

from ..errors import SpecError

FILE = "toolchain.toml"


@dataclass(frozen=True)
class Archive:
    path: str
    sha256: str
    size: int
    map: tuple[tuple[str, str], ...]

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def dest(self, member: str) -> str | None:
        """Where an archive member goes in the toolkit, or None to leave it out.

        A `map` source ending in "/" takes everything under that folder; any
        other source takes that file and files whose name continues it
        (libcudart.so.12 also takes libcudart.so.12.4.127).
        """
        member = member.removeprefix("./")
        for src, dst in self.map:
            if member.startswith(src):
                rest = member[len(src):]
                return (dst + rest) if rest or not src.endswith("/") else None
        return None


@dataclass(frozen=True)
class Source:
    name: str
    version: str
    base_url: str
    archives: tuple[Archive, ...]
    reason: str = ""
    evidence: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def release(self) -> str:
        return ".".join(self.version.split(".")[:2])

    @property
    def download_size(self) -> int:
        return sum(a.size for a in self.archives)

    def url(self, archive: Archive) -> str:
        return self.base_url + archive.path


@dataclass(frozen=True)
class ArchNeed:
    min_nvcc: str
    targets: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Policy:
    path: Path
    max_gcc: dict[str, int]
    archs: dict[str, ArchNeed]
    min_nvcc_by_sm: dict[str, str]
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class Need:
    arch: str
    major: int  # torch's CUDA major
    torch_cuda: str  # e.g. "12.8"
    min_nvcc: str
    targets: tuple[str, ...]
    why_min: str


def _need_key(path: Path, table: dict, key: str, typ, where: str):
    if key not in table or not isinstance(table[key], typ):
        raise SpecError(f"{path}: {where} needs `{key}` ({typ.__name__}).")
    return table[key]


def default_envs() -> Path:
    """envs/ of the working directory (how the CLI runs), else the one beside this package."""
    here = Path("envs")
    return here if (here / FILE).exists() else Path(__file__).resolve().parents[2] / "envs"


def load(envs_dir: Path | str = "envs") -> Policy:
    path = Path(envs_dir) / FILE
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path} is missing: it names the CUDA toolkit the JIT kernels need.") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: {e}") from None
    tc = data.get("toolchain", {})
    max_gcc = {str(k): int(v) for k, v in tc.get("max_gcc", {}).items()}
    archs = {}
    for name, a in data.get("arch", {}).items():
        archs[name] = ArchNeed(str(Version(_need_key(path, a, "min_nvcc", str, f"[arch.{name}]"))),
                               tuple(a.get("targets", ())), _need_key(path, a, "reason", str, f"[arch.{name}]"))
    sources = []
    for i, s in enumerate(data.get("source", [])):
        where = f"[[source]] #{i + 1}"
        arcs = []
        for a in _need_key(path, s, "archive", list, where):
            sha = _need_key(path, a, "sha256", str, where + " archive")
            if not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise SpecError(f"{path}: {where}: {a.get('path')} has no valid sha256; every archive must be pinned.")
            arcs.append(Archive(_need_key(path, a, "path", str, where), sha, int(_need_key(path, a, "size", int, where)),
                                tuple(tuple(m) for m in _need_key(path, a, "map", list, where))))
        sources.append(Source(_need_key(path, s, "name", str, where), _need_key(path, s, "version", str, where),
                              _need_key(path, s, "base_url", str, where), tuple(arcs),
                              _need_key(path, s, "reason", str, where), s.get("evidence", "")))
    by_sm = {str(k): str(Version(v)) for k, v in tc.get("min_nvcc_by_sm", {}).items()}
    return Policy(path, max_gcc, archs, by_sm, tuple(sources))


def need(policy: Policy, arch: str, torch_cuda: str) -> Need:
    """What `arch` with a torch built for CUDA `torch_cuda` ("12.8") asks of nvcc."""
    if arch not in policy.archs:
        raise SpecError(f"{policy.path} has no [arch.{arch}]: ktenv does not know which nvcc can compile for it.")
    a = policy.archs[arch]
    return Need(arch, Version(torch_cuda).major, torch_cuda, a.min_nvcc, a.targets, a.reason)


def need_for_sms(policy: Policy, sms: str, torch_cuda: str | None, nvcc_major: int) -> Need:
    """The Need of an arch list such as kt-kernel's CPUINFER_CUDA_ARCHS ("80;86;89;90;120").

    torch_cuda None (no torch in the build python): only the arch list is judged.
    """
    nums = [x.strip().removeprefix("sm_").rstrip("af") for x in sms.replace(",", ";").split(";") if x.strip()]
    unknown = [n for n in nums if n not in policy.min_nvcc_by_sm]
    if unknown:
        raise SpecError(f"{policy.path} [toolchain.min_nvcc_by_sm] does not know sm_{', sm_'.join(unknown)}; "
                        "add the first CUDA version whose nvcc targets it.")
    worst = max(nums, key=lambda n: Version(policy.min_nvcc_by_sm[n])) if nums else None
    min_nvcc = policy.min_nvcc_by_sm[worst] if worst else "0"
    major = Version(torch_cuda).major if torch_cuda else nvcc_major
    return Need(f"arch list {sms}", major, torch_cuda or f"{nvcc_major}.x (no torch to compare)", min_nvcc,
                tuple(f"sm_{n}" for n in nums), f"sm_{worst} is a target since CUDA {min_nvcc}" if worst else "")


