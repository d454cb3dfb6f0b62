#!/usr/bin/env python3
"""Benchmark the smoke CPU tiers (import, kernel, launch-cpu): the fork server
against a new interpreter per probe, on the same env, in the same run.

    python bench/bench_smoke.py [--arch sm90] [--prefix PATH] [--rounds 2]
                                [--baseline per-process|git:REF|none] [--json]

new          `smoke` as it runs now: one fork server per smoke; every module,
             check and probe is a process forked from a parent that imported
             torch and the stack's heavy shared imports once.
per-process  the same checks, each in a new interpreter, the way the tiers ran
             them before the fork server: one process per module (retried
             after torch when it misses a shared library), per named check and
             self-check, then the kernel and launch probes; modules
             `workers` at a time (one per core).
git:REF      `build.py smoke` of an older ktenv (git archive REF, e.g. the
             commit before the fork server) against the same env.

Rounds alternate the two ways so that load on a shared machine hits both.
Reported per way and round: wall seconds, CPU seconds (this process and
every child it waited for), the load average before; and whether both ways
judged every module alike (the fork server must not lose coverage). The
headline, printed last, is the new way's median wall time (target: <= 45 s
on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ktenv import probe as proberun  # noqa: E402
from ktenv import spec as specmod  # noqa: E402
from ktenv import target as targetmod  # noqa: E402
from ktenv.check import smoke, tier_import, tier_kernel, tier_launch  # noqa: E402
from ktenv.check.selfcheck import selfcheck_results  # noqa: E402

CPU_TIERS = ["import", "kernel", "launch-cpu"]
MISSING_SO = re.compile(r"lib\S+\.so\S*: cannot open shared object")


def cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def modules_of(results: list[dict]) -> dict[str, str]:
    sweep = next(r for r in results if r["name"] == "module imports")
    return {m: v["status"] for m, v in sweep["detail"]["modules"].items()}


def run_new(ctx) -> dict:
    t, c = time.monotonic(), cpu()
    rep = smoke.smoke(ctx, CPU_TIERS)
    return {"wall": round(time.monotonic() - t, 1), "cpu": round(cpu() - c, 1), "tiers": rep["seconds"],
            "ok": rep["ok"], "modules": modules_of(rep["results"]), "counts": rep["counts"]}


def _one_module(ctx, m: str) -> dict:
    run = proberun.run(ctx.python, "smoke_import.py", ["import", m], env=ctx.env)
    r = run.result
    if r and not r["ok"] and not r.get("needs_gpu") and MISSING_SO.search(r["error"]):
        again = proberun.run(ctx.python, "smoke_import.py", ["import", m, "--after", "torch"], env=ctx.env).result
        if again and (again.get("ok") or again.get("needs_gpu")):
            r = {**again, "after": ["torch"]}
    return r if r is not None else {"died": run.why}


def run_per_process(ctx) -> dict:
    """What the tiers did before the fork server: every probe a new interpreter."""
    assert ctx.forks is None
    t, c = time.monotonic(), cpu()
    tiers = {}
    inv = proberun.run(ctx.python, "smoke_import.py", ["inventory"], stdin={"requirements": ctx.requirements},
                       env=ctx.env).result
    mods = sorted({m for ms in inv["modules"].values() for m in ms})
    with ThreadPoolExecutor(ctx.workers) as pool:
        raw = dict(zip(mods, pool.map(lambda m: _one_module(ctx, m), mods)))
    modules = {m: tier_import._import_result(ctx, m, r).status for m, r in raw.items()}
    results = [tier_import._torch(ctx), tier_import._server_args(ctx), tier_import._kt_kernel(ctx),
               *tier_import._flashinfer(ctx), tier_import._tilelang(ctx), tier_import._transformers(ctx),
               tier_import._payload(ctx, Path(inv["site_packages"])), *selfcheck_results(ctx)]
    tiers["import"] = round(time.monotonic() - t, 1)
    t1 = time.monotonic()
    results += tier_kernel.kernel_tier(ctx)
    tiers["kernel"] = round(time.monotonic() - t1, 1)
    t1 = time.monotonic()
    results += tier_launch.launch_cpu_tier(ctx)
    tiers["launch-cpu"] = round(time.monotonic() - t1, 1)
    return {"wall": round(time.monotonic() - t, 1), "cpu": round(cpu() - c, 1), "tiers": tiers,
            "ok": all(r.status != "failed" for r in results) and "failed" not in modules.values(), "modules": modules}


def run_git(ref: str, args) -> dict:
    """The smoke CLI of ktenv at `ref` (its own code and lock/), against the same env."""
    with tempfile.TemporaryDirectory(prefix="ktenv-bench-baseline-") as tmp:
        blob = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=__import__("io").BytesIO(blob)) as tar:
            tar.extractall(tmp, filter="data")
        cmd = [sys.executable, str(Path(tmp) / "build.py"), "smoke", "--arch", args.arch, "--prefix", str(args.prefix),
               "--json"] + [a for tier in CPU_TIERS for a in ("--tier", tier)]
        t, c = time.monotonic(), cpu()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        wall, used = round(time.monotonic() - t, 1), round(cpu() - c, 1)
    rep = json.loads(p.stdout)
    return {"wall": wall, "cpu": used, "tiers": rep["seconds"], "ok": rep["ok"], "modules": modules_of(rep["results"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm90")
    ap.add_argument("--prefix", type=Path, default=None, help="the env to smoke (default .envs/<arch>)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", default="per-process", help="per-process, git:REF or none")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.prefix = (args.prefix or REPO / ".envs" / args.arch).resolve()
    spec = specmod.load(REPO / "envs")
    target = targetmod.resolve(spec, args.arch, lock_root=REPO / "lock", prefix=args.prefix)
    ways = {"new": lambda: run_new(smoke.context(target))}
    if args.baseline == "per-process":
        ways["per-process"] = lambda: run_per_process(smoke.context(target))
    elif args.baseline.startswith("git:"):
        ways[args.baseline] = lambda: run_git(args.baseline[4:], args)
    out = {"arch": args.arch, "cores": os.cpu_count(), "workers": smoke.context(target).workers, "rounds": []}
    for n in range(args.rounds):
        for way in (list(ways) if n % 2 == 0 else list(ways)[::-1]):
            load = os.getloadavg()[0]
            got = ways[way]()
            got.update(way=way, round=n + 1, load_before=round(load, 2))
            out["rounds"].append(got)
            print(f"round {n + 1} {way:12} {got['wall']:6.1f} s wall, {got['cpu']:6.1f} s CPU "
                  f"(load {load:.1f} before; tiers {got['tiers']}; ok {got['ok']})", file=sys.stderr, flush=True)
    for way in ways:
        mine = [r for r in out["rounds"] if r["way"] == way]
        out[way] = {"wall_median": statistics.median(r["wall"] for r in mine),
                    "cpu_median": statistics.median(r["cpu"] for r in mine)}
    new_mods = out["rounds"][0]["modules"] if out["rounds"][0]["way"] == "new" else out["rounds"][1]["modules"]
    for r in out["rounds"]:
        if r["way"] != "new":
            differ = {m: (s, r["modules"].get(m)) for m, s in new_mods.items() if r["modules"].get(m) != s}
            differ.update({m: (None, s) for m, s in r["modules"].items() if m not in new_mods})
            out.setdefault("differences", {})[f"{r['way']} round {r['round']}"] = differ
    for r in out["rounds"]:
        r.pop("modules")
    if args.json:
        print(json.dumps(out, indent=1))
    for way in ways:
        print(f"{way}: median {out[way]['wall_median']:.1f} s wall, {out[way]['cpu_median']:.1f} s CPU "
              f"over {args.rounds} round(s)")
    for way in [w for w in ways if w != "new"]:
        pairs = [(a["wall"], b["wall"]) for a in out["rounds"] for b in out["rounds"]
                 if a["way"] == "new" and b["way"] == way and a["round"] == b["round"]]
        out[way]["ratio_per_round"] = [round(n / o, 2) for n, o in pairs]
        print(f"new / {way} wall, per round: {', '.join(map(str, out[way]['ratio_per_round']))}")
    for name, differ in out.get("differences", {}).items():
        print(f"modules judged differently, new vs {name}: {differ or 'none'} ({len(new_mods)} modules)")
    print(f"cores {out['cores']}, workers {out['workers']}; load average now {os.getloadavg()[0]:.1f}")
    print(f"smoke_cpu_tiers_seconds: {out['new']['wall_median']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
