"""Lock time: ktenv against raw `uv pip compile` on the same input, in the same run.

Warm means uv's cache and ktenv's metadata cache are already filled (run once
first). Raw uv gets exactly what ktenv hands it: the same requirements,
overrides (lockstep versions included), constraints, cut-off and both Pythons.
Targets: overhead <= 10 %; all four archs warm <= 10 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ktenv import lockfile, rules, spec as specmod  # noqa: E402
from ktenv.resolve import uv_env  # noqa: E402
from ktenv.tools import uv_bin  # noqa: E402


def raw_uv(inputs, lockstep: dict[str, str], work: Path) -> float:
    (work / "requirements.in").write_text("".join(r + "\n" for r in inputs.requirements))
    (work / "overrides.txt").write_text("".join(o + "\n" for o in inputs.overrides + [f"{k}=={v}" for k, v in lockstep.items()]))
    (work / "constraints.txt").write_text("".join(c + "\n" for c in inputs.constraints))
    start = time.monotonic()
    for py in inputs.python:
        subprocess.run(
            [uv_bin(), "pip", "compile", "requirements.in", "--override", "overrides.txt", "--constraint", "constraints.txt",
             "--python-version", py, "--python-platform", inputs.platform, "--exclude-newer", inputs.exclude_newer,
             "--index-url", inputs.index_url, "--generate-hashes", "--no-header", "--no-python-downloads", "--quiet",
             "-o", f"out-{py}.txt"],
            cwd=work, check=True, env=uv_env(),
        )
    return time.monotonic() - start


def ktenv_lock(args: list[str]) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, str(REPO / "build.py"), "lock", *args], check=True, cwd=REPO, capture_output=True)
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm90")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    spec = specmod.load(REPO / "envs")
    inputs = rules.inputs(spec, a.arch)
    lockstep = lockfile.read(REPO / "lock" / a.arch).lockstep
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lock"
        ktenv_lock(["--arch", a.arch, "--out", str(out)])  # warm both caches
        raw, ours = [], []
        for i in range(a.repeat):
            w = Path(tmp) / f"raw{i}"
            w.mkdir()
            raw.append(raw_uv(inputs, lockstep, w))
            ours.append(ktenv_lock(["--arch", a.arch, "--out", str(Path(tmp) / f"k{i}")]))
        all4 = ktenv_lock(["--all", "--lock-dir", str(Path(tmp) / "all")])
    r, k = statistics.median(raw), statistics.median(ours)
    print(f"raw uv pip compile ({a.arch}, {len(inputs.python)} Pythons), median of {a.repeat}: {r:.2f} s")
    print(f"ktenv lock --arch {a.arch} (same input, + lockstep pick, departures, metadata), median: {k:.2f} s")
    print(f"ktenv lock --all, four archs, warm: {all4:.2f} s (target <= 10 s)")
    print(f"lock_overhead_ratio: {k / r:.2f}")


if __name__ == "__main__":
    main()
