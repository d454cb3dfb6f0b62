"""`doctor`: what this host has, which --arch it needs, what to fix.

`collect(spec, facts) -> dict` finds every problem with its remedy (this dict
is the `--json` output); `render(report) -> str` is the human text. The facts
come from `ktenv.host.facts` (live, or a recording).
"""

from __future__ import annotations

from ..build.ktkernel import variants as ktvariants
from ..errors import KtenvError
from ..host import cpu as hostcpu
from ..host import gpu as gpumod
from ..host.facts import HostFacts, kt_threads, numa_summary
from ..spec import Spec



def _problem(problems: list, pid: str, severity: str, message: str, remedy: str) -> None:
    problems.append({"id": pid, "severity": severity, "message": message, "remedy": remedy})


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def _gb(n: int) -> str:
    return f"{n / 10**9:.0f} GB"


def collect(spec: Spec, facts: HostFacts, stack_version: str | None = None) -> dict:
    model = spec.knowledge.model
    kt = spec.knowledge.kt_kernel
    stack_version = stack_version or spec.stack.default
    bad_tp = {n: k for n, k in model.bad_tp.items() if k.holds(stack_version)}
    env_bytes = spec.stack.sizes.env_bytes
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
            f"No NVIDIA GPU was found on this host. {why} {model.name} is served on a GPU of "
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
                floor = spec.knowledge.min_driver.get(need_cuda)
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
    cpu = hostcpu.cpu_info(facts.cpuinfo_text)
    isa = hostcpu.isa_features(cpu.flags)
    variant = ktvariants.best_variant(kt, cpu.flags)
    if not variant:
        _problem(problems, "cpu-isa", "error",
                 f"The CPU ({cpu.model}) lacks AVX2, the least KT-Kernel's CPU MoE kernels need.",
                 "Serve on an x86-64 CPU with AVX2 (AVX512/AMX are faster).")
    try:
        forced = ktvariants.check_override(kt, cpu.flags, facts.env)
    except KtenvError as e:
        forced = None
        _problem(problems, "kt-kernel-variant", "error", str(e),
                 "unset KT_KERNEL_CPU_VARIANT (kt-kernel then picks the best variant this CPU runs).")
    nodes = numa_summary(facts)
    physical = sum(n["physical_cores"] for n in nodes)
    logical = sum(n["logical_cpus"] for n in nodes)
    ranks = len(groups.get(recommended, [])) if recommended else 1
    cpuinfer, pools = kt_threads(nodes, ranks)
    if ranks in bad_tp:
        _problem(problems, "tp-size", "warning",
                 f"{ranks} GPUs means --tensor-parallel-size {ranks}: {bad_tp[ranks].reason} "
                 f"({', '.join(bad_tp[ranks].evidence)}).",
                 "If the server fails so, serve on 2 (or 8) GPUs via CUDA_VISIBLE_DEVICES.")

    # Memory and disk against the model.
    mem = hostcpu.memory_bytes(facts.meminfo_text)
    if mem < model.ram_bytes * model.ram_slack:
        _problem(problems, "memory", "error",
                 f"This host has {_gib(mem)} of RAM; {model.name} keeps its routed experts in RAM and needs "
                 f">= {model.ram_bytes / 2**30:.0f} GiB (doc/en/DeepSeek-V4-Flash.md), so loading would fail or swap.",
                 f"Serve on a host with >= {model.ram_bytes / 2**30:.0f} GiB of RAM, or raise --kt-num-gpu-experts so more experts "
                 "live on the GPUs (each costs GPU memory).")
    disk_need = model.weights_bytes + env_bytes
    if facts.disk_free_bytes is not None and facts.disk_free_bytes < disk_need:
        _problem(problems, "disk", "warning",
                 f"{_gib(facts.disk_free_bytes)} free at {facts.disk_path}; the weights take ~{_gb(model.weights_bytes)} "
                 f"and an environment ~{_gb(env_bytes)}.",
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
            "isa": isa, "isa_summary": hostcpu.isa_summary(cpu.flags), "kt_kernel_variant": variant,
            "kt_kernel_variant_forced": forced,
        },
        "numa": nodes,
        "physical_cores": physical,
        "logical_cpus": logical,
        "kt": {"cpuinfer": cpuinfer, "threadpool_count": pools},
        "memory": {"total_bytes": mem, "needed_bytes": model.ram_bytes},
        "model": {"name": model.name, "weights_bytes": model.weights_bytes, "env_bytes": env_bytes},
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
    out.append(f"Memory: {_gib(m['total_bytes'])} ({r['model']['name']} needs >= {m['needed_bytes'] / 2**30:.0f} GiB)")
    dk = r["disk"]
    out.append(f"Disk: {_gib(dk['free_bytes'])} free at {dk['path']} (weights ~{_gb(r['model']['weights_bytes'])} + env ~{_gb(r['model']['env_bytes'])})")
    out.append("")
    if r["problems"]:
        out.append(f"Problems ({len(r['problems'])}):")
        for p in r["problems"]:
            out.append(f"  [{p['severity']}] {p['message']}")
            out.append(f"      fix: {p['remedy']}")
    else:
        out.append("No problems found.")
    return "\n".join(out) + "\n"
