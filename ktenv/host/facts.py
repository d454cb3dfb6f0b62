"""Host facts, live or replayed: GPUs (NVML or nvidia-smi), /proc, /sys, disk.

`live_facts()` reads this host; `recorded_facts(dir)` replays a directory
written by `record(dir)` (`doctor --record`), so doctor, launch and smoke can
answer for another machine and be tested on real recordings. Every consumer
of host facts (build, check, serve) takes a `HostFacts` from here.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import cpu
from . import gpu as gpumod

ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "KT_KERNEL_CPU_VARIANT")


@dataclass
class HostFacts:
    gpu: gpumod.GpuHost
    cpuinfo_text: str
    meminfo_text: str
    sysfs_root: str
    disk_path: str
    disk_free_bytes: int | None
    env: dict = field(default_factory=dict)
    origin: str = "this host"


def live_facts(disk_path: str = ".") -> HostFacts:
    """This host's facts; KTENV_HOST_RECORDING=DIR replays a recording instead.

    The variable lets doctor and launch answer for another machine (a user's
    recording, a fixture); every report names its origin, so it cannot pass
    for this host unnoticed.
    """
    recording = os.environ.get("KTENV_HOST_RECORDING")
    if recording:
        return recorded_facts(recording)
    try:
        free = cpu.disk_free(disk_path)
    except OSError:
        free = None
    return HostFacts(
        gpu=gpumod.detect(),
        cpuinfo_text=_read("/proc/cpuinfo"),
        meminfo_text=_read("/proc/meminfo"),
        sysfs_root="/sys",
        disk_path=str(Path(disk_path).resolve()),
        disk_free_bytes=free,
        env={k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    )


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# Only what numa_nodes and the recording's reader need; the rest of /sys is noise.
_SYS_NODE_FILES = ("online", "possible", "has_cpu", "has_memory")
_SYS_NODEN_FILES = ("cpulist", "cpumap", "distance", "meminfo")
_SYS_CPU_FILES = ("online", "possible", "present")


def record(out_dir: str | Path, disk_path: str = ".") -> Path:
    """Write this host's raw facts under out_dir (see tests/fixtures/doctor/README.md)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        (out / "nvml.json").write_text(json.dumps(gpumod.read_nvml(), indent=1) + "\n")
    except RuntimeError as e:
        (out / "nvml.json").write_text(json.dumps({"error": str(e)}) + "\n")
    try:
        query, plain = gpumod.read_nvidia_smi()
        (out / "nvidia-smi-query.csv").write_text(query)
        (out / "nvidia-smi.txt").write_text(plain)
    except RuntimeError as e:
        (out / "nvidia-smi.error").write_text(str(e) + "\n")
    for name in ("cpuinfo", "meminfo"):
        (out / name).write_text(_read(f"/proc/{name}"))
    _copy_sysfs(Path("/sys"), out / "sys")
    usage = shutil.disk_usage(disk_path)
    (out / "disk.json").write_text(json.dumps({"path": str(Path(disk_path).resolve()), "free_bytes": usage.free, "total_bytes": usage.total}) + "\n")
    (out / "env.json").write_text(json.dumps({k: os.environ[k] for k in ENV_KEYS if k in os.environ}) + "\n")
    (out / "host.json").write_text(json.dumps({
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "uname": list(platform.uname()),
        "python": sys.version.split()[0],
    }, indent=1) + "\n")
    return out


def _copy_sysfs(src: Path, dst: Path) -> None:
    def copy(rel: str) -> None:
        text = _read(str(src / rel))
        if text:
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)

    node = src / "devices/system/node"
    for f in _SYS_NODE_FILES:
        copy(f"devices/system/node/{f}")
    for d in sorted(node.glob("node[0-9]*")):
        for f in _SYS_NODEN_FILES:
            copy(f"devices/system/node/{d.name}/{f}")
    cpu = src / "devices/system/cpu"
    for f in _SYS_CPU_FILES:
        copy(f"devices/system/cpu/{f}")
    for d in sorted(cpu.glob("cpu[0-9]*")):
        copy(f"devices/system/cpu/{d.name}/online")
        for t in sorted((d / "topology").glob("*")):
            copy(f"devices/system/cpu/{d.name}/topology/{t.name}")


def recorded_facts(directory: str | Path, use_nvml: bool = True) -> HostFacts:
    """Replay a recording: the same fallback (NVML, then nvidia-smi) as live."""
    d = Path(directory)

    def nvml() -> dict:
        path = d / "nvml.json"
        if not path.exists():
            raise RuntimeError("not recorded")
        data = json.loads(path.read_text())
        if "error" in data:
            raise RuntimeError(data["error"])
        return data

    def smi() -> tuple[str, str]:
        if (d / "nvidia-smi.error").exists():
            raise RuntimeError((d / "nvidia-smi.error").read_text().strip())
        return (d / "nvidia-smi-query.csv").read_text(), (d / "nvidia-smi.txt").read_text()

    disk = json.loads((d / "disk.json").read_text()) if (d / "disk.json").exists() else {}
    env = json.loads((d / "env.json").read_text()) if (d / "env.json").exists() else {}
    return HostFacts(
        gpu=gpumod.detect(nvml=nvml if use_nvml else None, smi=smi),
        cpuinfo_text=(d / "cpuinfo").read_text(),
        meminfo_text=(d / "meminfo").read_text(),
        sysfs_root=str(d / "sys"),
        disk_path=disk.get("path", "?"),
        disk_free_bytes=disk.get("free_bytes"),
        env=env,
        origin=f"recording {d}",
    )


# --- CPU sizing shared by doctor, launch and tune -------------------------------

def numa_summary(facts: HostFacts) -> list[dict]:
    """[{node, logical_cpus, physical_cores}] for nodes that have CPUs."""
    nodes = []
    for n in cpu.numa_nodes(facts.sysfs_root):
        logical = len(n.cpus)
        physical = n.physical_cores
        if logical:
            nodes.append({"node": n.id, "logical_cpus": logical, "physical_cores": physical})
    if not nodes:
        # No NUMA directory (a kernel without CONFIG_NUMA): one node of everything.
        info = cpu.cpu_info(facts.cpuinfo_text)
        nodes.append({"node": 0, "logical_cpus": info.logical_cpus, "physical_cores": info.logical_cpus})
    return nodes


def kt_threads(nodes: list[dict], gpu_ranks: int) -> tuple[int, int]:
    """(--kt-cpuinfer, --kt-threadpool-count) for this host.

    One thread pool per NUMA node with CPUs (KT-Kernel keeps each pool's
    experts in its node's memory). Threads count physical cores only: threads
    put on hyper-threads were reported ~10x slower. Each GPU rank's scheduler
    process feeds its GPU from the CPU and stalls every decode step if it has
    to fight the MoE threads for a core, so one physical core per rank (at
    least one) is left free, taken evenly from the nodes. KT-Kernel splits the
    threads evenly over the pools, so the count is a multiple of the pool
    count and no pool gets more threads than its smallest node has cores.
    """
    pools = max(1, len(nodes))
    smallest = min(n["physical_cores"] for n in nodes) if nodes else 1
    reserve_per_pool = math.ceil(max(1, gpu_ranks) / pools)
    per_pool = max(1, smallest - reserve_per_pool)
    return per_pool * pools, pools
