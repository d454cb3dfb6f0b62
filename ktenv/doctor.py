"""`python build.py doctor`: what this host has, which --arch it needs, what to fix.

Three layers, so that each can be tested on recorded hosts:
- facts: `live_facts()` reads the host (NVML or nvidia-smi, /proc, /sys);
  `recorded_facts(dir)` replays a directory written by `record(dir)`;
- `collect(spec, facts) -> dict`: every finding and every problem with its
  remedy (this dict is the `--json` output);
- `render(report) -> str`: the human text.

`python -m ktenv.doctor record DIR` writes such a recording (raw outputs, no
interpretation) so a user's host can be replayed in a bug report or a test.
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

from . import gpu as gpumod
from . import hostinfo, ktkernel
from . import spec as specmod
from .errors import KtenvError

# What DeepSeek-V4-Flash asks of a host (doc/en/DeepSeek-V4-Flash.md,
# "Hardware Requirements"): ~340 GB of weights on disk and >= 256 GB of RAM,
# since the CPU holds the routed experts the GPUs do not.
MODEL = "DeepSeek-V4-Flash"
WEIGHTS_BYTES = 340 * 10**9
RAM_BYTES = 256 * 2**30
# MemTotal excludes what firmware and the kernel reserve, so a machine sold
# with 256 GB shows ~251 GiB: accept 5 % less before calling it too small.
RAM_SLACK = 0.95
ENV_BYTES = 10 * 10**9  # a built .envs/<arch>: 9.9 GB measured (FACTS.md)
# sglang-kt's DeepSeek-V4 raised NotImplementedError at this TP size.
KNOWN_BAD_TP = {4: "kvcache-ai/ktransformers#1998"}
ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "KT_KERNEL_CPU_VARIANT")


# --- facts -------------------------------------------------------------------

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
        free = hostinfo.disk_free(disk_path)
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


# --- sizing shared with launch --------------------------------------------------

def numa_summary(facts: HostFacts) -> list[dict]:
    """[{node, logical_cpus, physical_cores}] for nodes that have CPUs."""
    nodes = []
    for n in hostinfo.numa_nodes(facts.sysfs_root):
        logical = len(n.cpus)
        physical = n.physical_cores
        if logical:
            nodes.append({"node": n.id, "logical_cpus": logical, "physical_cores": physical})
    if not nodes:
        # No NUMA directory (a kernel without CONFIG_NUMA): one node of everything.
        cpu = hostinfo.cpu_info(facts.cpuinfo_text)
        nodes.append({"node": 0, "logical_cpus": cpu.logical_cpus, "physical_cores": cpu.logical_cpus})
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


# --- collect ------------------------------------------------------------------

def _problem(problems: list, pid: str, severity: str, message: str, remedy: str) -> None:
    problems.append({"id": pid, "severity": severity, "message": message, "remedy": remedy})


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _gb(n: int) -> str:
    return f"{n / 10**9:.0f} GB"


def collect(spec: specmod.Spec, facts: HostFacts) -> dict:
    problems: list[dict] = []
    host = facts.gpu
    supported = spec.supported_archs()

    # GPUs, each with the arch its compute capability needs.
    gpus = []
    for g in host.gpus:
        arch = gpumod.arch_for_cc(spec, g.compute_capability)
        gpus.append({
            "index": g.index, "name": g.name, "compute_capability": g.compute_capability,
            "memory_bytes": g.memory_bytes, "uuid": g.uuid, "pci_bus_id": g.pci_bus_id,
            "arch": arch.name if arch else None,
            "supported": bool(arch and arch.supported),
        })
    visible = gpumod.visible_gpus(host.gpus, facts.env)
    visible_idx = {g.index for g in visible.gpus}
    for g in gpus:
        g["visible"] = g["index"] in visible_idx
    if visible.note:
        _problem(problems, "cuda-visible-devices", "warning", visible.note,
                 "export CUDA_DEVICE_ORDER=PCI_BUS_ID, or list GPU UUIDs in CUDA_VISIBLE_DEVICES.")

    groups: dict[str, list[dict]] = {}
    for g in gpus:
        if g["visible"]:
            groups.setdefault(g["arch"] or f"cc {g['compute_capability'] or '?'}", []).append(g)

    recommended = None
    if not host.gpus:
        why = " ".join(host.notes) or "no GPU source answered."
        _problem(
            problems, "no-gpu", "error",
            f"No NVIDIA GPU was found on this host. {why} {MODEL} is served on a GPU of "
            f"arch {', '.join(supported)} with the routed experts on the CPU.",
            "Run doctor on the machine that will serve. Here you can still lock and build an "
            "environment for another machine (`python build.py env --arch sm120` needs no GPU) "
            "and run the CPU tiers of `python build.py smoke`.",
        )
    elif not visible.gpus:
        _problem(
            problems, "no-visible-gpu", "error",
            f"CUDA_VISIBLE_DEVICES={facts.env.get('CUDA_VISIBLE_DEVICES')!r} hides every GPU "
            f"({len(host.gpus)} present), so the server would find none.",
            "unset CUDA_VISIBLE_DEVICES, or set it to the GPUs to use (see the list above).",
        )
    else:
        usable = {a: gs for a, gs in groups.items() if a in supported}
        if usable:
            # The largest group of one arch, then the one with most memory.
            recommended = max(usable, key=lambda a: (len(usable[a]), sum(g["memory_bytes"] for g in usable[a]), spec.archs[a].sm_number))
        for a, gs in groups.items():
            if a in usable:
                continue
            names = ", ".join(f"{g['index']} ({g['name']})" for g in gs)
            arch = spec.archs.get(a)
            if arch is not None:
                msg = f"GPU {names} is {a} ({arch.title}), which is not supported: {arch.reason}"
            else:
                msg = (f"GPU {names} has compute capability {gs[0]['compute_capability'] or 'unknown'}, "
                       f"which no envs/*.toml describes; ktenv builds for {', '.join(supported)}.")
            _problem(problems, f"unsupported-gpu-{a.replace(' ', '')}", "error" if not usable else "warning", msg,
                     f"Serve on the {recommended} GPUs only (see the mixed-arch problem)." if usable
                     else f"Use a GPU of arch {', '.join(supported)}.")
        if len(groups) > 1 and recommended:
            pick = usable[recommended]
            indices = ",".join(str(g["index"]) for g in pick)
            others = "; ".join(f"{a}: " + ", ".join(f"{g['index']} ({g['name']})" for g in gs)
                               for a, gs in groups.items() if a != recommended)
            _problem(
                problems, "mixed-arch", "error",
                f"This host's visible GPUs are of {len(groups)} archs ({recommended}: "
                + ", ".join(f"{g['index']} ({g['name']})" for g in pick) + f"; {others}). "
                "FlashInfer's and Triton's JIT compile for one arch list, and one server across "
                "mixed archs fails with an arch mismatch (kvcache-ai/ktransformers#2039).",
                f"Serve on the {recommended} GPUs only: export CUDA_DEVICE_ORDER=PCI_BUS_ID "
                f"CUDA_VISIBLE_DEVICES={indices} (PCI_BUS_ID makes CUDA number GPUs as nvidia-smi "
                f"does) and use --arch {recommended}.",
            )

    # Driver: the newest CUDA it supports against the stack's and the arch's.
    need_cuda = spec.stack.cuda
    if recommended:
        arch_min = spec.archs[recommended].min_cuda
        if arch_min and gpumod.version_tuple(arch_min) > gpumod.version_tuple(need_cuda):
            need_cuda = arch_min
    driver = {"version": host.driver_version, "cuda": host.cuda_version, "needs_cuda": need_cuda, "ok": None}
    if host.gpus:
        if not host.cuda_version:
            _problem(problems, "driver-cuda-unknown", "warning",
                     f"The driver ({host.driver_version or 'version unknown'}) did not say which CUDA it supports.",
                     f"Check that `nvidia-smi` prints 'CUDA Version: {need_cuda}' or newer in its header.")
        else:
            driver["ok"] = gpumod.version_tuple(host.cuda_version) >= gpumod.version_tuple(need_cuda)
            if not driver["ok"]:
                floor = gpumod.MIN_LINUX_DRIVER.get(need_cuda)
                _problem(
                    problems, "driver-too-old", "error",
                    f"The NVIDIA driver {host.driver_version} supports CUDA up to {host.cuda_version}, but this "
                    f"stack's torch, FlashInfer and Triton kernels are built for CUDA {need_cuda}: kernels "
                    "fail to load with 'the provided PTX was compiled with an unsupported toolchain' "
                    "or 'CUDA driver version is insufficient'.",
                    f"Install an NVIDIA driver that supports CUDA {need_cuda}"
                    + (f" (Linux driver {floor} or newer)" if floor else "")
                    + "; `nvidia-smi` shows the supported CUDA version in its header.",
                )

    # CPU: ISA, the kt-kernel variant it gets, physical cores per node.
    cpu = hostinfo.cpu_info(facts.cpuinfo_text)
    isa = hostinfo.isa_features(cpu.flags)
    variant = ktkernel.best_variant(cpu.flags)
    if not variant:
        _problem(problems, "cpu-isa", "error",
                 f"The CPU ({cpu.model}) lacks AVX2, the least KT-Kernel's CPU MoE kernels need.",
                 "Serve on an x86-64 CPU with AVX2 (AVX512/AMX are faster).")
    try:
        forced = ktkernel.check_override(cpu.flags, facts.env)
    except KtenvError as e:
        forced = None
        _problem(problems, "kt-kernel-variant", "error", str(e),
                 "unset KT_KERNEL_CPU_VARIANT (kt-kernel then picks the best variant this CPU runs).")
    nodes = numa_summary(facts)
    physical = sum(n["physical_cores"] for n in nodes)
    logical = sum(n["logical_cpus"] for n in nodes)
    ranks = len(groups.get(recommended, [])) if recommended else 1
    cpuinfer, pools = kt_threads(nodes, ranks)
    if ranks in KNOWN_BAD_TP:
        _problem(problems, "tp-size", "warning",
                 f"{ranks} GPUs means --tensor-parallel-size {ranks}, at which sglang-kt's DeepSeek-V4 "
                 f"raised NotImplementedError ({KNOWN_BAD_TP[ranks]}).",
                 "If the server fails so, serve on 2 (or 8) GPUs via CUDA_VISIBLE_DEVICES.")

    # Memory and disk against the model.
    mem = hostinfo.memory_bytes(facts.meminfo_text)
    if mem < RAM_BYTES * RAM_SLACK:
        _problem(problems, "memory", "error",
                 f"This host has {_gib(mem)} of RAM; {MODEL} keeps its routed experts in RAM and needs "
                 f">= 256 GB (doc/en/DeepSeek-V4-Flash.md), so loading would fail or swap.",
                 "Serve on a host with >= 256 GB of RAM, or raise --kt-num-gpu-experts so more experts "
                 "live on the GPUs (each costs GPU memory).")
    disk_need = WEIGHTS_BYTES + ENV_BYTES
    if facts.disk_free_bytes is not None and facts.disk_free_bytes < disk_need:
        _problem(problems, "disk", "warning",
                 f"{_gib(facts.disk_free_bytes)} free at {facts.disk_path}; the weights take ~{_gb(WEIGHTS_BYTES)} "
                 f"and an environment ~{_gb(ENV_BYTES)}.",
                 "Put the weights on a disk with room (--model PATH), or free space; ignore this if "
                 "they are already downloaded elsewhere.")

    # Errors first: they are what stops a server.
    problems.sort(key=lambda p: p["severity"] != "error")
    return {
        "origin": facts.origin,
        "gpu_source": host.source,
        "gpu_notes": list(host.notes),
        "gpus": gpus,
        "cuda_visible_devices": facts.env.get("CUDA_VISIBLE_DEVICES"),
        "driver": driver,
        "arch": {
            "recommended": recommended,
            "title": spec.archs[recommended].title if recommended else None,
            "gpus": [g["index"] for g in groups.get(recommended, [])] if recommended else [],
            "tensor_parallel_size": ranks if recommended else None,
        },
        "cpu": {
            "model": cpu.model, "vendor": cpu.vendor, "logical_cpus": cpu.logical_cpus,
            "isa": isa, "isa_summary": hostinfo.isa_summary(cpu.flags), "kt_kernel_variant": variant,
            "kt_kernel_variant_forced": forced,
        },
        "numa": nodes,
        "physical_cores": physical,
        "logical_cpus": logical,
        "kt": {"cpuinfer": cpuinfer, "threadpool_count": pools},
        "memory": {"total_bytes": mem, "needed_bytes": RAM_BYTES},
        "disk": {"path": facts.disk_path, "free_bytes": facts.disk_free_bytes, "needed_bytes": disk_need},
        "problems": problems,
        "ok": not any(p["severity"] == "error" for p in problems),
    }


# --- render -------------------------------------------------------------------

def render(r: dict) -> str:
    out = [f"ktenv doctor ({r['origin']})", ""]
    d = r["driver"]
    if r["gpus"]:
        drv = f"driver {d['version'] or '?'}, supports CUDA {d['cuda'] or '?'}; the stack needs {d['needs_cuda']}"
        out.append(f"GPUs (via {r['gpu_source']}; {drv})")
        for g in r["gpus"]:
            arch = g["arch"] or "no ktenv arch"
            flag = "" if g["supported"] else "  (not supported)"
            hidden = "" if g["visible"] else "  (hidden by CUDA_VISIBLE_DEVICES)"
            out.append(f"  {g['index']}  {g['name']:<28} cc {g['compute_capability'] or '?':<5} "
                       f"{_gib(g['memory_bytes']):>10}  -> {arch}{flag}{hidden}  {g['uuid']}")
        if r["cuda_visible_devices"] is not None:
            out.append(f"  CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']}")
    else:
        out.append("GPUs: none found")
        for n in r["gpu_notes"]:
            out.append(f"  {n}")
    a = r["arch"]
    if a["recommended"]:
        out.append(f"Use: --arch {a['recommended']} ({a['title']}) on GPU {','.join(map(str, a['gpus']))}, "
                   f"--tensor-parallel-size {a['tensor_parallel_size']}")
    else:
        out.append("Use: no --arch fits this host's GPUs (see the problems below)")
    out.append("")
    c = r["cpu"]
    out.append(f"CPU: {c['model']} ({c['vendor']}), {c['logical_cpus']} logical CPUs")
    out.append(f"  ISA: {c['isa_summary']}")
    out.append(f"  kt-kernel variant: {c['kt_kernel_variant'] or 'none (needs AVX2)'}"
               + (f" (KT_KERNEL_CPU_VARIANT forces {c['kt_kernel_variant_forced']})" if c["kt_kernel_variant_forced"] else ""))
    out.append(f"NUMA: {len(r['numa'])} node(s), {r['physical_cores']} physical cores, {r['logical_cpus']} logical CPUs")
    for n in r["numa"]:
        out.append(f"  node {n['node']}: {n['physical_cores']} physical cores, {n['logical_cpus']} logical CPUs")
    k = r["kt"]
    out.append(f"  -> --kt-cpuinfer {k['cpuinfer']} --kt-threadpool-count {k['threadpool_count']} "
               "(physical cores only, one per GPU rank left free)")
    m = r["memory"]
    out.append(f"Memory: {_gib(m['total_bytes'])} ({MODEL} needs >= 256 GB)")
    dk = r["disk"]
    out.append(f"Disk: {_gib(dk['free_bytes'])} free at {dk['path']} (weights ~{_gb(WEIGHTS_BYTES)} + env ~{_gb(ENV_BYTES)})")
    out.append("")
    if r["problems"]:
        out.append(f"Problems ({len(r['problems'])}):")
        for p in r["problems"]:
            out.append(f"  [{p['severity']}] {p['message']}")
            out.append(f"      fix: {p['remedy']}")
    else:
        out.append("No problems found.")
    return "\n".join(out) + "\n"


def run(args) -> int:
    if getattr(args, "record", None):
        print(f"recorded this host's facts into {record(args.record)}")
        return 0
    spec = specmod.load(getattr(args, "envs", "envs"))
    facts = recorded_facts(args.host_facts) if getattr(args, "host_facts", None) else live_facts()
    report = collect(spec, facts)
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    else:
        print(render(report), end="")
    # Non-zero when something would stop a server, so scripts can gate on it.
    return 0 if report["ok"] else 1


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "record":
        print(record(argv[1]))
        return 0
    print("usage: python -m ktenv.doctor record DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
