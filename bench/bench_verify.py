#!/usr/bin/env python3
"""Benchmark `build.py env --check` and the no-op `build.py env` that now runs its stat pass.

    python bench/bench_verify.py [--arch sm90] [--prefix PATH] [--rounds 5] [--deep] [--json]

1. the stat pass over every file of a built env (in-process, `verify.check`),
   wall and CPU seconds, with os.cpu_count() threads and with one;
2. the no-op `build.py env` as a user runs it (a whole CLI process, stat
   pass included). Target: <= 1 s on an intact env;
3. with --deep, the content pass over every file once (12 GB for sm90: reads
   the disk where the page cache cannot hold the env).

The env must exist (`python build.py env --arch ARCH` first); nothing is
changed in it. The machine's load average is printed with the numbers,
since on a shared machine it decides them. The headline, printed last, is
the median wall time of the no-op CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ktenv.build import verify  # noqa: E402


def timed(fn) -> tuple[float, float, object]:
    w, c = time.monotonic(), time.process_time()
    out = fn()
    return time.monotonic() - w, time.process_time() - c, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm90")
    ap.add_argument("--prefix", help="the env (default .envs/<arch>)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--deep", action="store_true", help="also hash every file once")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    prefix = Path(args.prefix or REPO / ".envs" / args.arch).resolve()
    if not (prefix / "bin" / "python").exists():
        print(f"no env at {prefix}: run `python build.py env --arch {args.arch}` first", file=sys.stderr)
        return 2
    out: dict = {"prefix": str(prefix), "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}

    verify.check(prefix)  # warm the dentry cache and write the index if it is missing
    for label, workers in (("threads", verify.WORKERS), ("one_thread", 1)):
        runs = [timed(lambda: verify.check(prefix, workers=workers)) for _ in range(args.rounds)]
        r = runs[-1][2]
        assert r["ok"], verify.render(r)
        out[f"stat_pass_{label}_s"] = round(statistics.median(w for w, _, _ in runs), 3)
        out[f"stat_pass_{label}_cpu_s"] = round(statistics.median(c for _, c, _ in runs), 3)
        out["files"], out["hashed_by_stat_pass"] = r["files"], r["hashed"]
        print(f"stat pass, {workers} thread(s): {out[f'stat_pass_{label}_s']:.3f} s wall, "
              f"{out[f'stat_pass_{label}_cpu_s']:.3f} s CPU, {r['files']} files, {r['hashed']} hashed", flush=True)

    cmd = [sys.executable, str(REPO / "build.py"), "env", "--arch", args.arch, "--prefix", str(prefix)]
    walls = []
    for _ in range(args.rounds):
        t0 = time.monotonic()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        walls.append(time.monotonic() - t0)
        assert p.returncode == 0 and "is up to date" in p.stdout, p.stdout + p.stderr
    out["noop_cli_s"] = round(statistics.median(walls), 3)
    print(f"no-op `build.py env` (whole CLI): median {out['noop_cli_s']:.3f} s of {args.rounds} "
          f"({', '.join(f'{w:.2f}' for w in walls)})", flush=True)

    if args.deep:
        w, c, r = timed(lambda: verify.check(prefix, deep=True))
        assert r["ok"], verify.render(r)
        out.update(deep_s=round(w, 1), deep_cpu_s=round(c, 1), deep_gb=round(r["hashed_bytes"] / 1e9, 2),
                   deep_files=r["hashed"])
        print(f"deep pass: {r['hashed']} files, {out['deep_gb']} GB in {w:.1f} s ({c:.1f} s CPU, "
              f"{out['deep_gb'] / w:.2f} GB/s)", flush=True)
    out["load_after"] = os.getloadavg()[0]
    print(f"load average {out['load_before']:.1f} before, {out['load_after']:.1f} after, on {out['cpus']} CPUs")
    if args.json:
        print(json.dumps(out, indent=1))
    print(f"env_noop_cli_s: {out['noop_cli_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
