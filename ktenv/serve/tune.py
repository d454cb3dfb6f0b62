"""`python build.py tune`: measure which kt-kernel variant (and method) is fastest on this CPU.

kt-kernel picks its CPU variant by ISA rank ("amx" above "avx512_bf16" above
...), and measured, the rank is wrong where it matters: on an Intel AMX host
the amx build prefills at half the speed of avx512_base. So `tune` measures:
for each variant this CPU runs and each method the variant offers (MXFP4,
the checkpoint's own format; AMXINT4, which needs converted experts and which
kt-kernel compiles into its AVX512 builds too, so it runs without AMX), a short
MoE benchmark at DeepSeek-V4-Flash's expert shape (envs/tune.toml) with the
threads the server will use, decode and prefill, in interleaved rounds. The
winner per method and workload is decided by tune_decide; the measurement is
cached per (CPU, kt-kernel version, threads, shape, rounds) in ktenv's cache.

Public API (the lead wires these):
  tune(python, *, arch, envs="envs", workload="mixed", threads=None, rounds=None,
       variant=None, progress=print, use_cache=True, facts=None) -> dict
  env_vars(result, method="MXFP4") -> {"KT_KERNEL_CPU_VARIANT": ...}
  stamp_entry(result) -> dict                 what the env stamp records
  advice(result, workload) -> list[str]       (from tune_decide) sentences for launch
  save(result, prefix) / load(prefix)          <prefix>/ktenv-tune.json, written by `env --tune`
  for_launch(prefix, workload, method) -> (env vars, notes)   what launch exports and prints
  render(result) -> str
  run(args) -> int                            the CLI
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .. import doctor, hostinfo, ktkernel, rules
from .. import gpu as gpumod
from .. import spec as specmod
from ..errors import KtenvError, SpecError
from ..tools import cache_dir
from . import tune_decide
from .tune_decide import WORKLOADS, advice, stats  # noqa: F401 - advice is part of this module's API
from .tune_measure import Timing, measure

# Bump when kt_tune.py or the way samples are taken changes: old cache entries must not answer.
MEASURE_VERSION = 1
METHODS = ("MXFP4", "AMXINT4")
# kt-kernel compiles AMXInt4_MOE into its AVX512 and AMX builds only ("Required
# ISA: AVX512F + AVX512BW", kt_kernel/utils/amx.py); its avx2 build lacks it.
AMXINT4_VARIANTS = frozenset(ktkernel.VARIANTS) - {"avx2"}

_KEYS = {
    "model": {"name": str, "hidden": int, "intermediate": int, "experts": int, "topk": int, "weights": str,
              "reason": str, "evidence": list},
    "bench": {"min_experts": int, "llc_multiple": (int, float), "decode_tokens": int, "prefill_chunk_fallback": int,
              "rounds": int, "decode_seconds": (int, float), "decode_min_iters": int, "prefill_seconds": (int, float),
              "prefill_min_iters": int, "reason": str, "evidence": list},
    "decide": {"tie_margin": float, "advice_factor": float, "reason": str, "evidence": list},
    "amxint4": {"rel_diff_vs_mxfp4": float, "rel_diff_vs_int4_emulation": float, "swiglu_clamp_dropped": bool,
                "reason": str, "evidence": list},
}


def load_settings(envs: str | Path = "envs") -> dict:
    """envs/tune.toml, checked: every table and key known, typed, with a reason."""
    path = Path(envs) / "tune.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: missing. It holds the model's expert shape and the benchmark settings `tune` "
                        "needs; restore it from the repository.") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}.") from None
    for table, keys in _KEYS.items():
        t = data.get(table)
        if not isinstance(t, dict):
            raise SpecError(f"{path}: no [{table}] table.")
        for k, v in t.items():
            if k not in keys:
                raise SpecError(f"{path}: [{table}] has an unknown key {k!r}; known: {', '.join(keys)}.")
            if not isinstance(v, keys[k]) or isinstance(v, bool) and keys[k] is not bool:
                raise SpecError(f"{path}: [{table}].{k} = {v!r} has the wrong type.")
        missing = [k for k in keys if k not in t]
        if missing:
            raise SpecError(f"{path}: [{table}] lacks {', '.join(missing)} (every setting needs its value and a reason).")
    extra = set(data) - set(_KEYS)
    if extra:
        raise SpecError(f"{path}: unknown table(s) {', '.join(sorted(extra))}.")
    return data


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


def bench_shape(settings: dict, llc: int | None, chunk: int) -> tuple[dict, Timing]:
    """The benchmark's experts and token counts (see envs/tune.toml [bench] for why)."""
    m, b = settings["model"], settings["bench"]
    per_expert = 3 * m["hidden"] * m["intermediate"] * (0.5 + 1 / 32)  # MXFP4 nibbles + one scale per 32
    need = math.ceil(b["llc_multiple"] * (llc or 0) / per_expert)
    experts = min(m["experts"], max(b["min_experts"], m["topk"], need))
    prefill = max(1, round(chunk * experts / m["experts"]))
    shape = {"experts": experts, "hidden": m["hidden"], "intermediate": m["intermediate"], "topk": m["topk"],
             "model_experts": m["experts"], "model": m["name"], "prefill_chunk": chunk,
             "tokens_per_expert": round(prefill * m["topk"] / experts, 1), "llc_bytes": llc,
             "weights_bytes": int(per_expert * experts)}
    timing = Timing(decode_qlen=b["decode_tokens"], prefill_qlen=prefill, decode_seconds=float(b["decode_seconds"]),
                    decode_min_iters=b["decode_min_iters"], prefill_seconds=float(b["prefill_seconds"]),
                    prefill_min_iters=b["prefill_min_iters"])
    return shape, timing


def server_threads(spec: specmod.Spec, arch: str, facts: doctor.HostFacts) -> dict:
    """The MoE threads one pool of the server gets here: launch's --kt-cpuinfer / --kt-threadpool-count."""
    visible = gpumod.visible_gpus(facts.gpu.gpus, facts.env)
    mine = [g for g in visible.gpus if (a := gpumod.arch_for_cc(spec, g.compute_capability)) and a.name == arch]
    nodes = doctor.numa_summary(facts)
    cpuinfer, pools = doctor.kt_threads(nodes, max(1, len(mine)))
    return {"threads": cpuinfer // pools, "cpuinfer": cpuinfer, "pools": pools, "gpu_ranks": max(1, len(mine)),
            "nodes": [n["node"] for n in nodes]}


def kt_kernel_version(python: str | Path) -> str | None:
    """kt-kernel's version in the env, from its dist-info (no import: a cache hit must cost milliseconds)."""
    prefix = Path(python).parent.parent
    for meta in sorted(prefix.glob("lib/python3*/site-packages/kt_kernel-*.dist-info/METADATA")):
        for line in meta.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


def methods_for(variant: str) -> list[str]:
    return [m for m in METHODS if m != "AMXINT4" or variant in AMXINT4_VARIANTS]


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def cache_path(key: str) -> Path:
    return cache_dir() / "tune" / f"{key}.json"


def refuse_variant(variant: str, flags) -> None:
    """KtenvError (exit 2) when this CPU cannot run `variant`."""
    if variant not in ktkernel.VARIANTS:
        raise KtenvError(f"--variant {variant!r} is not a kt-kernel variant; the names are {', '.join(ktkernel.VARIANTS)}.")
    missing = ktkernel.missing_instructions(variant, flags)
    if missing:
        raise KtenvError(
            f"--variant {variant} needs {', '.join(missing)}, which this CPU lacks; kt-kernel does not check a "
            "forced variant, so the server would die with 'Illegal instruction' (SIGILL) on its first MoE "
            f"forward. This CPU runs {', '.join(ktkernel.runnable_variants(flags)) or 'none'}; "
            "drop --variant to measure them.")


def tune(python: str | Path, *, arch: str, envs: str | Path = "envs", workload: str = "mixed",
         threads: int | None = None, rounds: int | None = None, variant: str | None = None,
         progress: Callable[[str], None] = print, use_cache: bool = True,
         facts: doctor.HostFacts | None = None) -> dict:
    """Measure (or read from the cache) and decide; the result for the env stamp, launch and the CLI.

    python: the env's interpreter (absolute path kept as given: a venv python must keep its venv).
    variant: force this variant instead of measuring (refused if this CPU cannot run it).
    The result's "choice" is what to export as KT_KERNEL_CPU_VARIANT for the
    MXFP4 checkpoint; "decisions" holds every workload and method.
    """
    if workload not in WORKLOADS:
        raise KtenvError(f"--workload must be one of {', '.join(WORKLOADS)}, not {workload!r}.")
    spec = specmod.load(envs)
    arch = spec.arch(arch).name  # refuses unknown and unsupported archs
    settings = load_settings(envs)
    facts = facts or doctor.live_facts()
    if facts.origin != "this host":
        raise KtenvError(f"tune measures this machine's CPU, but the host facts come from {facts.origin} "
                         "(KTENV_HOST_RECORDING). Unset it and rerun on the machine that will serve.")
    python = str(Path(python).absolute())
    if not Path(python).exists():
        raise KtenvError(f"There is no environment python at {python}; build it first: "
                         f"python build.py env --arch {arch}.")
    cpu = hostinfo.cpu_info(facts.cpuinfo_text)
    runnable = ktkernel.runnable_variants(cpu.flags)
    if not runnable:
        raise KtenvError("This CPU lacks AVX2, the least any kt-kernel build needs; there is nothing to tune.")
    if variant:
        refuse_variant(variant, cpu.flags)
    host = server_threads(spec, arch, facts)
    if threads is not None:
        if threads < 1 or threads > cpu.logical_cpus:
            raise KtenvError(f"--threads {threads}: this host has {cpu.logical_cpus} logical CPUs; give 1 to that "
                             f"(the server's pool gets {host['threads']}).")
        host["threads"], host["threads_from"] = threads, "--threads"
    else:
        host["threads_from"] = "host (launch's --kt-cpuinfer per thread pool)"
    version = kt_kernel_version(python)
    if not version:
        raise KtenvError(f"kt-kernel is not installed in the env of {python}; rebuild it with build.py env --arch {arch}.")
    chunk = int(rules.launch_profile(spec, arch).get("args", {}).get("chunked-prefill-size")
                or settings["bench"]["prefill_chunk_fallback"])
    shape, timing = bench_shape(settings, llc_bytes(facts.sysfs_root), chunk)
    rounds = settings["bench"]["rounds"] if rounds is None else rounds
    if rounds < 1:
        raise KtenvError("--rounds must be at least 1 (3 or more to tell a winner from noise).")
    inputs = {"measure_version": MEASURE_VERSION, "cpu_model": cpu.model, "cpu_vendor": cpu.vendor,
              "isa": hostinfo.isa_summary(cpu.flags), "kt_kernel": version, "threads": host["threads"],
              "shape": shape, "timing": asdict(timing), "rounds": rounds, "variants": runnable,
              "methods": {v: methods_for(v) for v in runnable}}
    key = cache_key(inputs)
    path = cache_path(key)
    measured = None
    if use_cache and path.exists():
        try:
            measured = json.loads(path.read_text())
            cache_state = "hit"
            progress(f"tune: measurement from the cache ({path}), taken {measured.get('measured_at')}")
        except (OSError, json.JSONDecodeError):
            measured = None
    if measured is None and variant:
        cache_state = "forced"
        measured = {"rows": [], "failed": {}, "load": None, "seconds": 0}
    elif measured is None:
        cache_state = "miss"
        if os.environ.get("KT_KERNEL_CPU_VARIANT"):
            progress(f"tune: note: KT_KERNEL_CPU_VARIANT={os.environ['KT_KERNEL_CPU_VARIANT']} is set here; "
                     "tune sets it per variant for its own processes.")
        progress(f"tune: {len(runnable)} variant(s) x methods on {host['threads']} thread(s), {shape['experts']} "
                 f"experts, decode {timing.decode_qlen} / prefill {timing.prefill_qlen} tokens, {rounds} rounds")
        prefix: tuple[str, ...] = ()
        if len(host["nodes"]) > 1 and (numactl := shutil.which("numactl")):
            # One pool is measured; keep it and its memory on one node as the server's pools are.
            prefix = (numactl, f"--cpunodebind={host['nodes'][0]}", f"--membind={host['nodes'][0]}")
        measured = measure(python, runnable, {v: methods_for(v) for v in runnable}, shape, host["threads"], timing,
                           rounds, cache_dir() / "tune" / "logs" / key, progress, prefix)
        measured["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(measured, indent=1) + "\n")
        os.replace(tmp, path)  # a reader sees the old entry or the whole new one
    result = {
        "ktenv_tune": MEASURE_VERSION, "key": key, "key_inputs": inputs, "cache": cache_state, "cache_file": str(path),
        "arch": arch, "python": python, "cpu": {"model": cpu.model, "vendor": cpu.vendor, "isa": inputs["isa"]},
        "kt_kernel_version": version, "host": host, "threads": host["threads"], "shape": shape,
        "timing": asdict(timing), "rounds": rounds, "runnable": runnable,
        "default_variant": ktkernel.best_variant(cpu.flags),
        "settings": {"tie_margin": settings["decide"]["tie_margin"], "advice_factor": settings["decide"]["advice_factor"]},
        "amxint4_costs": {k: v for k, v in settings["amxint4"].items() if k not in ("reason", "evidence")},
        "methods_skipped": {} if any(v in AMXINT4_VARIANTS for v in runnable) else
        {"AMXINT4": "kt-kernel builds AMXInt4_MOE only into its AVX512 and AMX variants, and this CPU runs neither."},
        "forced": variant,
        **{k: measured.get(k) for k in ("failed", "load", "seconds", "measured_at", "logs")},
    }
    result["rows"] = [dict(r, stats={p: stats(tune_decide.series(r, p)) for p in ("decode", "prefill", "mixed")})
                      for r in measured["rows"]]
    finish(result, workload)
    return result


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
    """The env stamp's "kt_tune" entry: enough to re-read the table (cache key) and to export the variant."""
    return {"variant": result["choice"]["variant"], "method": "MXFP4", "workload": result["workload"],
            "why": result["choice"]["why"], "amxint4_variant": result["choice"]["amxint4_variant"],
            "key": result["key"], "kt_kernel_version": result["kt_kernel_version"], "threads": result["threads"],
            "cpu_model": result["cpu"]["model"], "measured_at": result.get("measured_at"), "forced": result["forced"]}


ENV_FILE = "ktenv-tune.json"


def save(result: dict, prefix: str | Path) -> Path:
    """Write the result into the env (<prefix>/ktenv-tune.json), atomically; `env --tune` calls this."""
    path = Path(prefix) / ENV_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load(prefix: str | Path) -> dict | None:
    """The result `env --tune` saved in the env, or None if it was never tuned."""
    try:
        return json.loads((Path(prefix) / ENV_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def for_launch(prefix: str | Path, workload: str = "mixed", method: str = "MXFP4") -> tuple[dict[str, str], list[str]]:
    """(env vars, notes) for `launch`: the tuned KT_KERNEL_CPU_VARIANT for the method, and the advice.

    ({}, []) when the env was never tuned: kt-kernel then picks by ISA rank as before.
    """
    result = load(prefix)
    if not result:
        return {}, []
    finish(result, workload)
    return env_vars(result, method), list(result["advice"])


def render(result: dict) -> str:
    sh, t, host = result["shape"], result["timing"], result["host"]
    out = [f"CPU: {result['cpu']['model']} ({result['cpu']['isa']}); kt-kernel {result['kt_kernel_version']}; "
           f"{result['threads']} thread(s) [{host['threads_from']}; server: --kt-cpuinfer {host['cpuinfer']} "
           f"--kt-threadpool-count {host['pools']}]",
           f"shape: {sh['model']} experts (hidden {sh['hidden']}, intermediate {sh['intermediate']}, top-{sh['topk']}), "
           f"{sh['experts']} of {sh['model_experts']} experts ({sh['weights_bytes'] / 1e6:.0f} MB of MXFP4); "
           f"decode {t['decode_qlen']} token, prefill {t['prefill_qlen']} tokens ({sh['tokens_per_expert']} per expert, "
           f"as a {sh['prefill_chunk']}-token chunk on the full model)"]
    load = result.get("load")
    if result["cache"] == "forced" and not result["rows"]:
        out.append(f"not measured: --variant {result['forced']} forced (no cached measurement for this key).")
    else:
        out.append(f"{result['rounds']} interleaved rounds, {result.get('seconds')} s, measured {result.get('measured_at')}"
                   + (f", load {load['before'][0]} -> {load['after'][0]}" if load else "")
                   + f" ({'from the cache' if result['cache'] == 'hit' else 'fresh'})")
    out.append("")
    out.append(f"{'variant':12s} {'method':8s} {'decode tok/s':>13s} {'IQR':>5s} {'prefill tok/s':>14s} {'IQR':>5s}")
    dec = result["decisions"].get(result["workload"], {})
    winners = {p.get("winner"): m for m, p in dec.items()}
    for r in sorted(result["rows"], key=lambda r: (r["method"] != "MXFP4", ktkernel.VARIANTS.index(r["variant"]))):
        cols = []
        for p in ("decode", "prefill"):
            s = r["stats"][p]
            cols.append(f"{s['median']:13.1f} {s['spread'] * 100:4.0f}%" if s and s["spread"] is not None else f"{'-':>13s} {'':5s}")
        key = f"{r['variant']}/{r['method']}"
        mark = ""
        if key in winners:
            mark = f"  <- {result['workload']} pick for {winners[key]}"
        if r["variant"] == result["default_variant"] and r["method"] == "MXFP4":
            mark += "  (kt-kernel's own pick)"
        out.append(f"{r['variant']:12s} {r['method']:8s} {cols[0]} {cols[1]}{mark}")
    for k, why in (result.get("failed") or {}).items():
        out.append(f"  {k}: failed: {why}")
    out.append("")
    c = result["choice"]
    out.append(f"choice ({c['workload']} workload): KT_KERNEL_CPU_VARIANT={c['variant']} for MXFP4 ({c['why']})"
               + (f"; for AMXINT4: {c['amxint4_variant']}" if c.get("amxint4_variant") else ""))
    out += [f"note: {a}" for a in result["advice"]]
    return "\n".join(out) + "\n"


def run(args) -> int:
    prefix = Path(args.prefix) if args.prefix else Path(".envs") / args.arch
    python = prefix.absolute() / "bin" / "python"
    quiet = args.json
    result = tune(python, arch=args.arch, envs=args.envs, workload=args.workload, threads=args.threads,
                  rounds=args.rounds, variant=args.variant, use_cache=not args.remeasure,
                  progress=lambda s: print(s, file=sys.stderr if quiet else sys.stdout, flush=True))
    if result["choice"]["variant"]:
        # Recorded in the env, where launch (and activation) read it.
        result["recorded_in"] = str(save(result, prefix.absolute()))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(render(result), end="")
        if result.get("recorded_in"):
            print(f"recorded in {result['recorded_in']}: launch exports KT_KERNEL_CPU_VARIANT={result['choice']['variant']}")
    return 0 if result["choice"]["variant"] else 1
