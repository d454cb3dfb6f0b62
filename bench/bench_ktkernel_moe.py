"""KT-Kernel MoE throughput per CPU variant: does the env's (tuned) choice prefill as fast as the fastest?

    python bench/bench_ktkernel_moe.py --python .envs/sm90/bin/python [--arch sm90] [--rounds 8]

Two steps, both with ktenv's own code:
1. `tune` (ktenv/serve/tune.py) decides the variant the env exports
   (KT_KERNEL_CPU_VARIANT), from its cache or measured now;
2. a fresh, independent set of interleaved rounds (the same probe, the same
   V4-Flash expert shape and threads, MXFP4 only) checks that choice out of
   sample, so a lucky tune round cannot pass the benchmark.
It prints tune's table (every variant and method), the check's table, and
kt-kernel's own ISA-ranked pick for comparison. The headline (last line) is
the env's choice's prefill over the fastest variant's, as the median of the
per-round ratios (pairing cancels the load that both saw in that round):
1.00 means the choice is the fastest, >= 0.95 is the target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ktenv import spec  # noqa: E402
from ktenv.progress import Progress  # noqa: E402
from ktenv.serve import tune, tune_decide  # noqa: E402
from ktenv.serve.tune_measure import Timing, measure  # noqa: E402
from ktenv.target import resolve  # noqa: E402
from ktenv.tools import cache_dir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True, help="the env's python (has torch and kt_kernel)")
    ap.add_argument("--arch", default="sm90", help="the env's arch (for the launch profile's prefill chunk)")
    ap.add_argument("--envs", default=str(Path(__file__).resolve().parent.parent / "envs"))
    ap.add_argument("--workload", choices=tune_decide.WORKLOADS, default="mixed")
    ap.add_argument("--rounds", type=int, help="rounds of the out-of-sample check (default: envs/tune.toml's)")
    ap.add_argument("--remeasure", action="store_true", help="measure tune's table again instead of its cache")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    python = os.path.abspath(args.python)  # absolute, not resolved: a venv's python keeps its venv
    target = resolve(spec.load(args.envs), args.arch, prefix=Path(python).parent.parent,
                     lock_root=Path(args.envs).parent / "lock")
    progress = Progress(sys.stdout)

    print("step 1: tune (the env's choice)", flush=True)
    result = tune.tune(target, workload=args.workload, use_cache=not args.remeasure, progress=progress)
    print(tune.render(result), flush=True)
    choice, default = result["choice"]["variant"], result["default_variant"]
    if not choice:
        print("tune made no choice; no headline")
        return 1

    rounds = args.rounds or result["rounds"]
    print(f"step 2: out-of-sample check, MXFP4, {rounds} fresh interleaved rounds", flush=True)
    timing = Timing(**result["timing"])
    check = measure(python, result["runnable"], {v: ["MXFP4"] for v in result["runnable"]}, result["shape"],
                    result["threads"], timing, rounds, cache_dir() / "tune" / "logs" / f"bench-{result['key']}",
                    progress)
    rows = {r["variant"]: r for r in check["rows"]}
    print(f"\n{'variant':12s} {'decode tok/s':>13s} {'IQR':>5s} {'prefill tok/s':>14s} {'IQR':>5s}   "
          f"(medians of {rounds} rounds; load {check['load']['before'][0]} -> {check['load']['after'][0]})")
    for v in result["runnable"]:
        if v not in rows:
            print(f"{v:12s} failed: {check['failed'].get(f'{v}/MXFP4')}")
            continue
        d, p = (tune_decide.stats(rows[v]["samples"][ph]) for ph in ("decode", "prefill"))
        marks = ("  <- env's choice (tune)" if v == choice else "") + ("  (kt-kernel's own pick)" if v == default else "")
        print(f"{v:12s} {d['median']:13.1f} {d['spread'] * 100:4.0f}% {p['median']:14.1f} {p['spread'] * 100:4.0f}%{marks}")

    def versus(v: str, phase: str) -> tuple[str, float]:
        """(fastest variant by median, median of v's per-round ratio to it)."""
        fastest = max(rows, key=lambda x: tune_decide.median(rows[x], phase) or 0)
        r = tune_decide.paired_ratios(rows[v], rows[fastest], phase)
        return fastest, round(statistics.median(r), 3) if r else 0.0

    if choice not in rows:
        print("the env's choice did not run in the check; no headline")
        return 1
    out = {}
    for phase in ("decode", "prefill"):
        fastest, ratio = versus(choice, phase)
        own = versus(default, phase)[1] if default in rows else None
        out[phase] = {"fastest": fastest, "choice_over_fastest": ratio, "kt_kernel_pick_over_fastest": own}
        print(f"{phase}: env's choice {choice} / fastest {fastest} = {ratio:.2f}"
              + (f"; kt-kernel's own pick {default} = {own:.2f}" if own is not None else ""))
    if args.json:
        print(json.dumps({"choice": choice, "default": default, "tune_key": result["key"], "check": check,
                          "ratios": out, "load": check["load"]}))
    print(f"kt_moe_env_choice_over_fastest_prefill: {out['prefill']['choice_over_fastest']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
