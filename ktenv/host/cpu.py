"""This host's CPU, NUMA layout, memory and disk, read from /proc and /sys.

Every reader takes the text or the root directory it parses, so tests (and
`doctor`'s recordings) can feed it another machine's files; `None` means "read
this machine". Nothing here imports a third-party package: doctor must run
before any environment exists.

Public API (stable; doctor, launch and ktkernel call it):
  cpu_info(cpuinfo_text=None) -> CpuInfo
  isa_features(flags) -> dict[str, bool]
  isa_summary(flags) -> str
  has_flag(flags, name) -> bool
  numa_nodes(sysfs_root="/sys") -> list[NumaNode]
  parse_cpulist(text) -> list[int]
  memory_bytes(meminfo_text=None) -> int
  memory_available_bytes(meminfo_text=None) -> int | None
  disk_free(path) -> int
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class CpuInfo:
    model: str  # "model name" of the first processor, e.g. "Intel(R) Xeon(R) Platinum 8462Y+"
    vendor: str  # vendor_id: GenuineIntel, AuthenticAMD, ...
    flags: frozenset[str]  # lower-case; the flags every listed processor has
    logical_cpus: int  # processors listed (online logical CPUs)


def cpu_info(cpuinfo_text: str | None = None) -> CpuInfo:
    """Parse /proc/cpuinfo (or the given text).

    `flags` is the intersection over all processors. kt-kernel's own loader
    reads only the first `flags` line; on the usual homogeneous CPU the two are
    the same, and where they differ (a hybrid part, a VM with odd CPUID masks)
    only the common set is safe, since a thread may run on any core.
    """
    if cpuinfo_text is None:
        cpuinfo_text = Path("/proc/cpuinfo").read_text()
    model = vendor = ""
    common: set[str] | None = None
    processors = 0
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        value = value.strip()
        if key == "processor":
            processors += 1
        elif key == "model name" and not model:
            model = value
        elif key == "vendor_id" and not vendor:
            vendor = value
        elif key == "flags":
            these = set(value.lower().split())
            common = these if common is None else common & these
    return CpuInfo(
        model=model or "unknown CPU",
        vendor=vendor or "unknown",
        flags=frozenset(common or ()),
        logical_cpus=processors or (os.cpu_count() or 1),
    )


def has_flag(flags: Iterable[str], name: str) -> bool:
    """True if `name` is among the flags, with or without its underscores.

    Linux spells some flags both ways across versions (avx512_vbmi appears as
    `avx512vbmi`, avx512_vnni as `avx512_vnni`); kt-kernel's loader and its
    CMake detection accept either spelling, so this does too.
    """
    s = flags if isinstance(flags, (set, frozenset)) else set(flags)
    return name in s or name.replace("_", "") in s


# The ISA features KT-Kernel's variants and build flags care about, in report order.
ISA_FEATURES = (
    "amx_tile", "amx_int8", "amx_bf16",
    "avx512f", "avx512bw", "avx512dq", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512_vbmi",
    "avx2", "fma", "f16c",
)


def isa_features(flags: Iterable[str]) -> dict[str, bool]:
    """{feature: present} for each of ISA_FEATURES."""
    s = frozenset(f.lower() for f in flags)
    return {name: has_flag(s, name) for name in ISA_FEATURES}


def isa_summary(flags: Iterable[str]) -> str:
    """One line for people: 'AMX (tile/int8/bf16), AVX512 F/BW/DQ/VL/VNNI/BF16/VBMI, AVX2, FMA, F16C'."""
    f = isa_features(flags)
    parts = []
    amx = [n for n in ("tile", "int8", "bf16") if f[f"amx_{n}"]]
    if amx:
        parts.append(f"AMX ({'/'.join(amx)})")
    avx512 = [label for key, label in (
        ("avx512f", "F"), ("avx512bw", "BW"), ("avx512dq", "DQ"), ("avx512vl", "VL"),
        ("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("avx512_vbmi", "VBMI"),
    ) if f[key]]
    if avx512:
        parts.append("AVX512 " + "/".join(avx512))
    parts += [label for key, label in (("avx2", "AVX2"), ("fma", "FMA"), ("f16c", "F16C")) if f[key]]
    return ", ".join(parts) or "none of AVX2/AVX512/AMX"


# --- NUMA -----------------------------------------------------------------------

@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]  # logical CPUs (hyper-threads included)
    physical_cores: int  # cores, each hyper-thread sibling group counted once


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]; '' -> []."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    return cpus


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _core_key(cpu_dir: Path, cpu: int) -> tuple:
    """What identifies the physical core a logical CPU belongs to.

    thread_siblings_list names every hyper-thread of the core, so all siblings
    share one key. Kernels that lack it still have core_id, which is unique only
    within a package, hence the pair. With neither, each logical CPU counts as a
    core: over-counting is the lesser harm, since it only over-subscribes.
    """
    topo = cpu_dir / f"cpu{cpu}" / "topology"
    for name in ("thread_siblings_list", "core_cpus_list"):
        text = _read(topo / name)
        if text:
            return ("siblings", tuple(parse_cpulist(text)))
    core, package = _read(topo / "core_id"), _read(topo / "physical_package_id")
    if core is not None:
        return ("core", package or "0", core)
    return ("cpu", cpu)


def numa_nodes(sysfs_root: str | Path = "/sys") -> list[NumaNode]:
    """The NUMA nodes under <sysfs_root>/devices/system/node, CPU-less nodes included.

    Without that directory (a kernel built without NUMA, some containers) the
    whole machine is one node: the online CPUs, or os.cpu_count() when even
    /sys/devices/system/cpu is missing.
    """
    root = Path(sysfs_root)
    cpu_dir = root / "devices/system/cpu"
    node_dir = root / "devices/system/node"
    groups: list[tuple[int, list[int]]] = []
    if node_dir.is_dir():
        for d in node_dir.iterdir():
            m = re.fullmatch(r"node(\d+)", d.name)
            if m:
                groups.append((int(m.group(1)), parse_cpulist(_read(d / "cpulist") or "")))
    if not groups:
        online = _read(cpu_dir / "online")
        cpus = parse_cpulist(online) if online else list(range(os.cpu_count() or 1))
        groups = [(0, cpus)]
    nodes = []
    for node_id, cpus in sorted(groups):
        cores = {_core_key(cpu_dir, c) for c in cpus}
        nodes.append(NumaNode(id=node_id, cpus=tuple(cpus), physical_cores=len(cores)))
    return nodes


# --- memory and disk --------------------------------------------------------------

def _meminfo_field(text: str, field: str) -> int | None:
    m = re.search(rf"^{field}:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def memory_bytes(meminfo_text: str | None = None) -> int:
    """MemTotal in bytes."""
    if meminfo_text is None:
        meminfo_text = Path("/proc/meminfo").read_text()
    total = _meminfo_field(meminfo_text, "MemTotal")
    if total is None:
        raise ValueError("no MemTotal line in the meminfo text")
    return total


def memory_available_bytes(meminfo_text: str | None = None) -> int | None:
    """MemAvailable in bytes (None on kernels older than 3.14, which lack it)."""
    if meminfo_text is None:
        meminfo_text = Path("/proc/meminfo").read_text()
    return _meminfo_field(meminfo_text, "MemAvailable")


def disk_free(path: str | Path) -> int:
    """Bytes free to this user on the filesystem that holds `path`.

    `path` may not exist yet (an env prefix about to be built): the nearest
    existing parent decides, which is where it will be created.
    """
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free
