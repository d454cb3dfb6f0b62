#!/usr/bin/env python3
"""The JIT cost of a first server start: compile, for the arch and without a GPU, the kernels
sglang-kt's DeepSeek-V4 path compiles at first use (`smoke --tier toolchain`), cold caches.

    python bench/bench_jit.py --arch sm90 [--prefix .envs/sm90] [--cuda-home PATH] [--json]

Prints each kernel's compile time and which toolkit compiled it; the headline,
printed last, is the total (what the first forward waits for, one process, no GPU
contention). Needs a built env and a usable CUDA toolkit (`build.py toolchain`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm90")
    ap.add_argument("--prefix")
    ap.add_argument("--cuda-home")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    env = dict(os.environ, **({"KTENV_CUDA_HOME": a.cuda_home} if a.cuda_home else {}))
    cmd = [sys.executable, str(REPO / "build.py"), "smoke", "--arch", a.arch, "--tier", "toolchain", "--json"]
    if a.prefix:
        cmd += ["--prefix", a.prefix]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    try:
        rep = json.loads(p.stdout)
    except ValueError:
        print(f"smoke did not report (exit {p.returncode}): {p.stderr[-1500:]}", file=sys.stderr)
        return 2
    tc = next((r for r in rep["results"] if r["name"] == "toolchain"), {})
    rows = [(r["name"][8:], r["status"], (r.get("detail") or {}).get("seconds")) for r in rep["results"]
            if r["name"].startswith("compile ")]
    total = round(sum(s for _, st, s in rows if st == "passed" and s), 1)
    if a.json:
        print(json.dumps({"arch": a.arch, "toolkit": (tc.get("detail") or {}).get("version"), "kernels": rows,
                          "total_s": total}, indent=1))
    else:
        print(f"{a.arch}: {tc.get('status')} {tc.get('evidence', '')[:200]}")
        for name, status, seconds in rows:
            print(f"  {name:<20} {status:<8} {seconds if seconds is not None else '-'} s")
    print(f"jit_first_start_total_s: {total}")
    return 0 if all(st == "passed" for _, st, _ in rows) and rows else 1


if __name__ == "__main__":
    sys.exit(main())
