"""`python build.py tune`: measure which kt-kernel variant (and method) is fastest on this CPU.

kt-kernel picks its CPU variant by ISA rank ("amx" above "avx512_bf16" above
...), and measured, the rank is wrong where it matters: on an Intel AMX host
the amx build prefills at half the speed of avx512_base. So `tune` measures:
for each variant this CPU runs and each method the variant offers (MXFP4,
the checkpoint's own format; AMXINT4, which needs converted experts and which
kt-kernel compiles into its AVX512 builds too, so it runs without AMX), a short
MoE benchmark at the model's expert shape (envs/model.toml) with the threads
the server will use, decode and prefill, in interleaved rounds (envs/tune.toml).
The winner per method and workload is decided by tune_decide; the measurement
is cached per (CPU, kt-kernel version, threads, shape, rounds) in ktenv's cache.

Public API (what `env --tune`, activation and launch call):
  tune(target, *, workload="mixed", threads=None, rounds=None, variant=None,
       progress=print, use_cache=True, facts=None) -> dict
  env_vars(result, method="MXFP4") -> {"KT_KERNEL_CPU_VARIANT": ...}
  stamp_entry(result) -> dict                  what the env stamp records
  record(result, prefix)                       <prefix>/ktenv-tune.json + the stamp's "kt_tune" entry
  save(result, prefix) / load(prefix)          <prefix>/ktenv-tune.json alone
  launch_env(prefix, server_args, user_env) -> (env vars, notes)   what launch exports and says
  advice(result, workload) -> list[str]        (tune_decide) sentences for launch
  render(result) -> str
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..build.ktkernel import variants as ktv
from ..errors import KtenvError
from ..host import cpu as hostcpu
from ..host import gpu as gpumod
from ..host.facts import HostFacts, kt_threads, live_facts, numa_summary
from ..spec import Spec, launch_profile
from ..spec.model import ExpertShape, KtKernel
from ..target import STAMP, Target, read_stamp
from ..tools import cache_dir
from . import tune_decide
from .tune_decide import WORKLOADS, advice, stats  # noqa: F401 - advice is part of this module's API
from .tune_measure import Timing, measure

# Bump when kt_tune.py or the way samples are taken changes: old cache entries must not answer.
MEASURE_VERSION = 1
METHODS = ("MXFP4", "AMXINT4")
ENV_FILE = "ktenv-tune.json"

def amxint4_costs(spec: Spec, settings: dict) -> dict:
    """What advice quotes: the format's loss (serve.toml [convert], shared with convert) and the kernel's own."""
    return {"rel_diff_vs_mxfp4": float(spec.knowledge.serve.get("convert", {}).get("lossy_rel_diff", 0.29)),
            "rel_diff_vs_int4_emulation": settings["amxint4"]["kernel_vs_int4_emulation"],
            "swiglu_clamp_dropped": settings["amxint4"]["swiglu_clamp_dropped"]}


def amxint4_variants(kt: KtKernel) -> list[str]:
    """kt-kernel compiles AMXInt4_MOE into every build with its AVX512 MoE kernels ("Required ISA:
    AVX512F + AVX512BW", kt_kernel/utils/amx.py): the AMX and all AVX512 variants, not avx2."""
    return [v for v in kt.variants if kt.toggles[v].get("AVX512") == "ON"]


def methods_for(kt: KtKernel, variant: str) -> list[str]:
    return [m for m in METHODS if m != "AMXINT4" or variant in amxint4_variants(kt)]


def llc_bytes(sysfs_root: str | Path = "/sys") -> int | None:
    """The size of the largest cache cpu0 sees (the last level), or None where /sys does not say."""
    best = None
    for d in sorted((Path(sysfs_root) / "devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(size[-1:].upper(), 1)
        digits = size.rstrip("KkMmGg")
        if digits.isdigit():
            best = max(best or 0, int(digits) * mult)
    return best


def bench_shape(model: ExpertShape, name: str, settings: dict, llc: int | None, chunk: int) -> tuple[dict, Timing]:
    """The benchmark's experts and token counts (envs/tune.toml [bench] says why)."""
    b = settings["bench"]
    per_expert = 3 * model.hidden * model.intermediate * (0.5 + 1 / 32)  # MXFP4 nibbles + one scale per 32
    need_experts = math.ceil(b["llc_multiple"] * (llc or 0) / per_expert)
    experts = min(model.routed, max(b["min_experts"], model.top_k, need_experts))
    prefill = max(1, round(chunk * experts / model.routed))
    shape = {"experts": experts, "hidden": model.hidden, "intermediate": model.intermediate, "topk": model.top_k,
             "model_experts": model.routed, "model": name, "prefill_chunk": chunk,
             "tokens_per_expert": round(prefill * model.top_k / experts, 1), "llc_bytes": llc,
             "weights_bytes": int(per_expert * experts)}
    timing = Timing(decode_qlen=b["decode_tokens"], prefill_qlen=prefill, decode_seconds=float(b["decode_seconds"]),
                    decode_min_iters=b["decode_min_iters"], prefill_seconds=float(b["prefill_seconds"]),
                    prefill_min_iters=b["prefill_min_iters"])
    return shape, timing


def server_threads(spec: Spec, arch: str, facts: HostFacts) -> dict:
    """The MoE threads one pool of the server gets here: launch's --kt-cpuinfer / --kt-threadpool-count."""
    visible = gpumod.visible_gpus(facts.gpu.gpus, facts.env)
    ranks = max(1, len([g for g in visible.gpus
                        if (a := gpumod.arch_for_cc(spec, g.compute_capability)) and a.name == arch]))
    nodes = numa_summary(facts)
    cpuinfer, pools = kt_threads(nodes, ranks)
    return {"threads": cpuinfer // pools, "cpuinfer": cpuinfer, "pools": pools, "gpu_ranks": ranks,
            "nodes": [n["node"] for n in nodes]}


def kt_kernel_version(prefix: str | Path) -> str | None:
    """kt-kernel's version in the env, from its dist-info (no import: a cache hit must cost milliseconds)."""
    for meta in sorted(Path(prefix).glob("lib/python3*/site-packages/kt_kernel-*.dist-info/METADATA")):
        for line in meta.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


def cache_path(key: str) -> Path:
    return cache_dir() / "tune" / f"{key}.json"


def refuse_variant(kt: KtKernel, variant: str, flags) -> None:
    """KtenvError (exit 2) when this CPU cannot run `variant`."""
    if variant not in kt.variants:
        raise KtenvError(f"--variant {variant!r} is not a kt-kernel variant; the names are {', '.join(kt.variants)}.")
    missing = ktv.missing_instructions(kt, variant, flags)
    if missing:
        raise KtenvError(
            f"--variant {variant} needs {', '.join(missing)}, which this CPU lacks; kt-kernel does not check a "
            "forced variant, so the server would die with 'Illegal instruction' (SIGILL) on its first MoE "
            f"forward. This CPU runs {', '.join(ktv.runnable_variants(kt, flags)) or 'none'}; "
            "drop --variant to measure them.")


def tune(target: Target, *, workload: str = "mixed", threads: int | None = None, rounds: int | None = None,
         variant: str | None = None, progress: Callable[[str], None] = print, use_cache: bool = True,
         facts: HostFacts | None = None) -> dict:
    """Measure (or read from the cache) and decide, for the env of `target`.

    variant: force this variant instead of measuring (refused if this CPU cannot run it).
    The result's "choice" is what to export as KT_KERNEL_CPU_VARIANT for the
    MXFP4 checkpoint; "decisions" holds every workload and method.
    """
    if workload not in WORKLOADS:
        raise KtenvError(f"--workload must be one of {', '.join(WORKLOADS)}, not {workload!r}.")
    target.require_env()
    spec, kt, model = target.spec, target.kt, target.spec.knowledge.model
    settings = spec.knowledge.tune
    facts = facts or live_facts()
    if facts.origin != "this host":
        raise KtenvError(f"tune measures this machine's CPU, but the host facts come from {facts.origin} "
                         "(KTENV_HOST_RECORDING). Unset it and rerun on the machine that will serve.")
    cpu = hostcpu.cpu_info(facts.cpuinfo_text)
    runnable = ktv.runnable_variants(kt, cpu.flags)
    if not runnable:
        raise KtenvError("This CPU lacks AVX2, the least any kt-kernel build needs; there is nothing to tune.")
    if variant:
        refuse_variant(kt, variant, cpu.flags)
    host = server_threads(spec, target.arch.name, facts)
    if threads is not None:
        if not 1 <= threads <= cpu.logical_cpus:
            raise KtenvError(f"--threads {threads}: this host has {cpu.logical_cpus} logical CPUs; give 1 to that "
                             f"(the server's pool gets {host['threads']}).")
        host["threads"], host["threads_from"] = threads, "--threads"
    else:
        host["threads_from"] = "host (launch's --kt-cpuinfer per thread pool)"
    version = kt_kernel_version(target.prefix)
    if not version:
        raise KtenvError(f"kt-kernel is not installed in {target.prefix}; rebuild it: {target.build_hint()}.")
    chunk = int(launch_profile(spec, target.arch.name).get("args", {}).get("chunked-prefill-size")
                or settings["bench"]["prefill_chunk_fallback"])
    shape, timing = bench_shape(model.experts, model.name, settings, llc_bytes(facts.sysfs_root), chunk)
    rounds = settings["bench"]["rounds"] if rounds is None else rounds
    if rounds < 1:
        raise KtenvError("--rounds must be at least 1 (4 or more to tell a winner from noise).")
    methods = {v: methods_for(kt, v) for v in runnable}
    inputs = {"measure_version": MEASURE_VERSION, "cpu_model": cpu.model, "cpu_vendor": cpu.vendor,
              "isa": hostcpu.isa_summary(cpu.flags), "kt_kernel": version, "threads": host["threads"],
              "shape": shape, "timing": asdict(timing), "rounds": rounds, "methods": methods}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_path(key)
    measured, cache_state = None, "miss"
    if use_cache and path.exists():
        try:
            measured, cache_state = json.loads(path.read_text()), "hit"
            progress(f"tune: measurement from the cache ({path}), taken {measured.get('measured_at')}")
        except (OSError, ValueError):
            measured = None
    if measured is None and variant:
        measured, cache_state = {"rows": [], "failed": {}, "load": None, "seconds": 0}, "forced"
    elif measured is None:
        if os.environ.get("KT_KERNEL_CPU_VARIANT"):
            progress(f"tune: note: KT_KERNEL_CPU_VARIANT={os.environ['KT_KERNEL_CPU_VARIANT']} is set here; "
                     "tune sets it per variant for its own processes.")
        progress(f"tune: {len(runnable)} variant(s) on {host['threads']} thread(s), {shape['experts']} experts, "
                 f"decode {timing.decode_qlen} / prefill {timing.prefill_qlen} tokens, {rounds} rounds")
        prefix: tuple[str, ...] = ()
        if len(host["nodes"]) > 1 and (numactl := shutil.which("numactl")):
            # One pool is measured; keep it and its memory on one node, as the server's pools are.
            prefix = (numactl, f"--cpunodebind={host['nodes'][0]}", f"--membind={host['nodes'][0]}")
        measured = measure(str(target.python), runnable, methods, shape, host["threads"], timing, rounds,
                           cache_dir() / "tune" / "logs" / key, progress, prefix)
        measured["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(measured, indent=1) + "\n")
        os.replace(tmp, path)  # a reader sees the old entry or the whole new one
    skipped = {} if any(v in amxint4_variants(kt) for v in runnable) else {
        "AMXINT4": "kt-kernel builds AMXInt4_MOE only into its AVX512 and AMX variants, and this CPU runs neither."}
    result = {
        "ktenv_tune": MEASURE_VERSION, "key": key, "key_inputs": inputs, "cache": cache_state, "cache_file": str(path),
        "arch": target.arch.name, "prefix": str(target.prefix), "cpu": {"model": cpu.model, "vendor": cpu.vendor,
                                                                         "isa": inputs["isa"]},
        "kt_kernel_version": version, "host": host, "threads": host["threads"], "shape": shape,
        "timing": asdict(timing), "rounds": rounds, "runnable": runnable,
        "default_variant": ktv.best_variant(kt, cpu.flags),
        "settings": {"tie_margin": settings["decide"]["tie_margin"], "advice_factor": settings["decide"]["advice_factor"]},
        "amxint4_costs": amxint4_costs(spec, settings),
        "methods_skipped": skipped, "forced": variant,
        **{k: measured.get(k) for k in ("failed", "load", "seconds", "measured_at", "logs")},
        "rows": [dict(r, stats={p: stats(tune_decide.series(r, p)) for p in ("decode", "prefill", "mixed")})
                 for r in measured["rows"]],
    }
    return finish(result, workload)


def finish(result: dict, workload: str) -> dict:
    """(Re)compute the decisions for every workload and the choice for `workload` from the rows."""
    margin = result["settings"]["tie_margin"]
    result["decisions"] = {w: tune_decide.decide(result["rows"], w, margin, result["default_variant"])
                           for w in WORKLOADS} if result["rows"] else {}
    result["workload"] = workload
    if result.get("forced"):
        chosen, why = result["forced"], "forced with --variant"
    else:
        pick = result["decisions"].get(workload, {}).get("MXFP4", {})
        chosen, why = pick.get("variant"), pick.get("why", "no measurement")
    result["choice"] = {"variant": chosen, "method": "MXFP4", "workload": workload, "why": why,
                        "amxint4_variant": result["decisions"].get(workload, {}).get("AMXINT4", {}).get("variant")}
    result["advice"] = tune_decide.advice(result, workload)
    return result


def env_vars(result: dict, method: str = "MXFP4") -> dict[str, str]:
    """What activation and launch export: the tuned variant for the method the server will run."""
    variant = result["choice"]["variant"] if method == "MXFP4" else result["choice"].get("amxint4_variant")
    return {"KT_KERNEL_CPU_VARIANT": variant} if variant else {}


def stamp_entry(result: dict) -> dict:
    """The env stamp's "kt_tune" entry: enough to find the table again (cache key) and to export the variant."""
    return {"variant": result["choice"]["variant"], "method": "MXFP4", "workload": result["workload"],
            "why": result["choice"]["why"], "amxint4_variant": result["choice"]["amxint4_variant"],
            "key": result["key"], "kt_kernel_version": result["kt_kernel_version"], "threads": result["threads"],
            "cpu_model": result["cpu"]["model"], "measured_at": result.get("measured_at"), "forced": result["forced"]}


def save(result: dict, prefix: str | Path) -> Path:
    """Write the result into the env (<prefix>/ktenv-tune.json), atomically."""
    path = Path(prefix) / ENV_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def record(result: dict, prefix: str | Path) -> Path:
    """save() the result into the env and put stamp_entry() into its stamp (`tune` and `env --tune`).

    The stamp's no-op check compares only the keys the build wants, so the
    extra "kt_tune" entry never makes `env` rebuild; a rebuild starts a fresh
    env without it (rerun `tune`: the measurement is cached).
    """
    path = save(result, prefix)
    stamp = read_stamp(Path(prefix))
    if stamp is not None:
        stamp["kt_tune"] = stamp_entry(result)
        tmp = Path(prefix) / f".{STAMP}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, Path(prefix) / STAMP)
    return path


def load(prefix: str | Path) -> dict | None:
    """The result saved in the env, or None if it was never tuned."""
    try:
        return json.loads((Path(prefix) / ENV_FILE).read_text())
    except (OSError, ValueError):
        return None


def launch_env(prefix: str | Path, server_args: list[str], user_env: dict,
               cpu_model: str | None = None) -> tuple[dict[str, str], list[str]]:
    """(env vars, notes) for `launch` on this host: the tuned KT_KERNEL_CPU_VARIANT for the command's
    --kt-method and tune's advice; ({}, []) when the env was never tuned (kt-kernel picks by ISA rank).

    Nothing is exported when the user set the variable (theirs wins), when the
    result is for another CPU or another kt-kernel (say so: rerun tune), or
    for a method tune does not measure.
    """
    result = load(prefix)
    if not result:
        return {}, []
    finish(result, result.get("workload") or "mixed")
    method = "MXFP4"
    for i, tok in enumerate(server_args):  # the last --kt-method wins, as in argparse
        if tok == "--kt-method" and i + 1 < len(server_args):
            method = server_args[i + 1].upper()
        elif tok.startswith("--kt-method="):
            method = tok.split("=", 1)[1].upper()
    here = cpu_model or hostcpu.cpu_info().model
    if result["cpu"]["model"] != here or result["kt_kernel_version"] != kt_kernel_version(prefix):
        return {}, [f"The tuned kt-kernel variant in {Path(prefix) / ENV_FILE} was measured for {result['cpu']['model']} "
                    f"with kt-kernel {result['kt_kernel_version']}, not this {here} with kt-kernel "
                    f"{kt_kernel_version(prefix)}; kt-kernel picks by ISA rank. Rerun `build.py tune`."]
    env = env_vars(result, method) if method in METHODS else {}
    if not env:
        return {}, [f"tune measured no variant for --kt-method {method}; kt-kernel picks by ISA rank."]
    if user_env.get("KT_KERNEL_CPU_VARIANT"):
        return {}, [f"KT_KERNEL_CPU_VARIANT={user_env['KT_KERNEL_CPU_VARIANT']} from your environment wins over "
                    f"the tuned {env['KT_KERNEL_CPU_VARIANT']}."]
    if method == "AMXINT4":
        return env, [f"KT_KERNEL_CPU_VARIANT={env['KT_KERNEL_CPU_VARIANT']}: the fastest kt-kernel variant for "
                     f"AMXINT4 that `build.py tune` measured here ({result['workload']} workload)."]
    return env, list(result["advice"]) or [
        f"KT_KERNEL_CPU_VARIANT={env['KT_KERNEL_CPU_VARIANT']}: tuned ({result['choice']['why']})."]


def render(result: dict) -> str:
    sh, t, host = result["shape"], result["timing"], result["host"]
    out = [f"CPU: {result['cpu']['model']} ({result['cpu']['isa']}); kt-kernel {result['kt_kernel_version']}; "
           f"{result['threads']} thread(s) [{host['threads_from']}; server: --kt-cpuinfer {host['cpuinfer']} "
           f"--kt-threadpool-count {host['pools']}]",
           f"shape: {sh['model']} experts (hidden {sh['hidden']}, intermediate {sh['intermediate']}, top-{sh['topk']}), "
           f"{sh['experts']} of {sh['model_experts']} experts ({sh['weights_bytes'] / 1e6:.0f} MB of MXFP4); "
           f"decode {t['decode_qlen']} token, prefill {t['prefill_qlen']} tokens ({sh['tokens_per_expert']} per expert, "
           f"as a {sh['prefill_chunk']}-token chunk on the full model)"]
    load_seen = result.get("load")
    if result["cache"] == "forced":
        out.append(f"not measured: --variant {result['forced']} forced (no cached measurement for this key).")
    else:
        out.append(f"{result['rounds']} interleaved rounds, {result.get('seconds')} s, measured {result.get('measured_at')}"
                   + (f", load {load_seen['before'][0]} -> {load_seen['after'][0]}" if load_seen else "")
                   + f" ({'from the cache' if result['cache'] == 'hit' else 'fresh'}); tok/s per round from the "
                   "fastest quarter of its forwards, medians over rounds")
    out += ["", f"{'variant':12s} {'method':8s} {'decode tok/s':>13s} {'IQR':>5s} {'prefill tok/s':>14s} {'IQR':>5s}"]
    winners = {p.get("winner"): m for m, p in result["decisions"].get(result["workload"], {}).items()}
    order = list(result["runnable"])
    for r in sorted(result["rows"], key=lambda r: (r["method"] != "MXFP4", order.index(r["variant"]))):
        cols = []
        for p in ("decode", "prefill"):
            s = r["stats"][p]
            cols.append(f"{s['median']:13.1f} {s['spread'] * 100:4.0f}%" if s and s["spread"] is not None
                        else f"{'-':>13s} {'':5s}")
        key = f"{r['variant']}/{r['method']}"
        mark = f"  <- {result['workload']} pick for {winners[key]}" if key in winners else ""
        if r["variant"] == result["default_variant"] and r["method"] == "MXFP4":
            mark += "  (kt-kernel's own pick)"
        out.append(f"{r['variant']:12s} {r['method']:8s} {cols[0]} {cols[1]}{mark}")
    for k, why in (result.get("failed") or {}).items():
        out.append(f"  {k}: failed: {why}")
    c = result["choice"]
    out += ["", f"choice ({c['workload']} workload): KT_KERNEL_CPU_VARIANT={c['variant']} for MXFP4 ({c['why']})"
            + (f"; for AMXINT4: {c['amxint4_variant']}" if c.get("amxint4_variant") else "")]
    out += [f"note: {a}" for a in result["advice"]]
    return "\n".join(out) + "\n"
