#!/usr/bin/env python3
"""Benchmark `build.py env` against plain uv on the same lock, in the same run.

    python bench/bench_env.py [--arch sm90] [--second-arch sm89] [--rounds 3] [--json]

1. sync overhead: ktenv's venv + disk preflight + hash-checked sync, against
   `uv venv` + `uv pip sync --require-hashes` of the same requirements.txt,
   interleaved round by round so that load on the machine hits both alike.
   Target: ktenv / raw <= 1.10.
2. no-op rebuild of an up-to-date env (in-process, and the whole CLI).
   Target: <= 1 s.
3. a warm full build of a second arch's env (sync, patches, payload from
   the content cache, kt-kernel and payload checks, uv pip check, swap).
   Target: <= 10 s.

Needs warm caches to mean anything: run `build.py env` once first (or accept
one cold round). Envs are built under a temporary directory and deleted.
The payload cache defaults to $KTENV_CACHE_DIR, else /tmp/ktenv-test-cache
(the one the tests share; content-addressed, so sharing it is safe).
The headline, printed last, is the warm second-arch build time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("KTENV_CACHE_DIR", "/tmp/ktenv-test-cache")

from ktenv import materialize, tools  # noqa: E402


def raw_sync(lock_dir: Path, where: Path) -> float:
    uv = tools.uv_bin()
    env = materialize._uv_env()
    t0 = time.monotonic()
    subprocess.run([uv, "venv", "-q", "--python-preference", "only-system", "--python", "3.11", str(where)], check=True, env=env)
    subprocess.run([uv, "pip", "sync", "-q", "--require-hashes", "--python", str(where / "bin/python"), str(lock_dir / "requirements.txt")], check=True, env=env)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm90")
    ap.add_argument("--second-arch", default="sm89")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    lock_a = REPO / "lock" / args.arch
    lock_b = REPO / "lock" / args.second_arch
    quiet = materialize.Progress(quiet=True)
    out: dict = {"load_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-env-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        raw, ours, ours_total = [], [], []
        for i in range(args.rounds):
            # Alternate which goes first: each follows the deletion of a 10 GB
            # (hard-linked) tree, and the first of a pair pays for it more.
            for which in (("raw", "ktenv") if i % 2 == 0 else ("ktenv", "raw")):
                if which == "raw":
                    raw.append(raw_sync(lock_a, tmp / f"raw{i}"))
                    shutil.rmtree(tmp / f"raw{i}")
                else:
                    r = materialize.build(lock_a, tmp / f"env{i}", materialize.Options(), quiet)
                    ours.append(r["seconds"]["venv"] + r["seconds"]["preflight"] + r["seconds"]["sync"])
                    ours_total.append(r["seconds"]["total"])
                    if i < args.rounds - 1:
                        shutil.rmtree(tmp / f"env{i}")
            print(f"round {i + 1}: raw uv venv+sync {raw[-1]:.2f} s; ktenv venv+preflight+sync {ours[-1]:.2f} s "
                  f"(full build {ours_total[-1]:.2f} s: {json.dumps(r['seconds'])})", flush=True)
        out["raw_sync_s"] = round(statistics.median(raw), 3)
        out["ktenv_sync_s"] = round(statistics.median(ours), 3)
        out["sync_ratio"] = round(out["ktenv_sync_s"] / out["raw_sync_s"], 3)
        out["sync_ratio_per_round_median"] = round(statistics.median(o / r for o, r in zip(ours, raw)), 3)
        out["ktenv_full_build_s"] = round(statistics.median(ours_total), 3)

        kept = tmp / f"env{args.rounds - 1}"
        noop = []
        for _ in range(5):
            r = materialize.build(lock_a, kept, materialize.Options(), quiet)
            assert r["status"] == "up-to-date", r["status"]
            noop.append(r["seconds"])
        out["noop_s"] = round(statistics.median(noop), 4)
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, str(REPO / "build.py"), "env", "--arch", args.arch, "--prefix", str(kept)], capture_output=True, text=True, cwd=REPO)
        out["noop_cli_s"] = round(time.monotonic() - t0, 3)
        assert p.returncode == 0 and "up to date" in p.stdout, p.stderr
        shutil.rmtree(kept)

        if (lock_b / "requirements.txt").exists():
            r = materialize.build(lock_b, tmp / args.second_arch, materialize.Options(), quiet)
            out["second_arch"] = args.second_arch
            out["second_arch_steps_s"] = r["seconds"]
            out["second_arch_payload_cache_hit"] = r["payload"].get("cache_hit")
            out["warm_second_arch_build_s"] = r["seconds"]["total"]
            shutil.rmtree(tmp / args.second_arch)
    out["load_after"] = os.getloadavg()[0]

    if args.json:
        print(json.dumps(out, indent=1))
    print(f"raw uv venv+sync (median of {args.rounds}): {out['raw_sync_s']:.2f} s")
    print(f"ktenv venv+preflight+sync (median): {out['ktenv_sync_s']:.2f} s  ratio {out['sync_ratio']:.2f}, "
          f"median of per-round ratios {out['sync_ratio_per_round_median']:.2f} (target <= 1.10)")
    print(f"ktenv full build, first arch (median): {out['ktenv_full_build_s']:.2f} s")
    print(f"no-op rebuild: {out['noop_s'] * 1000:.0f} ms in-process, {out['noop_cli_s']:.2f} s whole CLI (target <= 1 s)")
    print(f"machine load: {out['load_before']:.1f} before, {out['load_after']:.1f} after, {out['cpus']} CPUs")
    if "warm_second_arch_build_s" in out:
        print(f"warm_second_arch_build_s ({out['second_arch']}, target <= 10): {out['warm_second_arch_build_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
