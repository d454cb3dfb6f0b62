#!/usr/bin/env python3
"""CI: an arch's CPU smoke fails exactly at its known gap, and nowhere else.

    known_gap.py SMOKE.json [CHECK-NAME ...]

SMOKE.json is `build.py smoke --json` for one arch. The known gap is what
envs/ says that arch cannot have in CI (or the CHECK-NAMEs given): today
sm90's flash_mla, which sglang-kt needs on Hopper and which no wheel on PyPI
provides (envs/sm90.toml [flash_mla]), so its import tier's `path
sparse_mla=flash_mla` fails until `--flash-mla-source` builds it. An arch
without a gap must pass. Exit 1 when another check fails, and also when a gap
check passes: the gap has closed, so envs/ and this script should say so.
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def gaps_from_envs(arch_name: str) -> list[str]:
    sys.path.insert(0, str(REPO))
    from ktenv.spec import load

    arch = load(REPO / "envs").archs[arch_name]
    # flash_mla is built from a FlashMLA checkout that CI does not have.
    if arch.flash_mla.get("required") and arch.paths.get("sparse_mla") == "flash_mla":
        return ["path sparse_mla=flash_mla"]
    return []


def main(report_path: str, expected: list[str] | None = None) -> int:
    report = json.loads(Path(report_path).read_text())
    arch = report.get("arch", "?")
    expected = gaps_from_envs(arch) if expected is None else expected
    failed = {r["name"]: r for r in report["results"] if r["status"] == "failed"}
    others = sorted(set(failed) - set(expected))
    closed = sorted(set(expected) - set(failed))
    for name in sorted(set(failed) & set(expected)):
        print(f"{arch}: known gap, as expected: {name}: {' '.join(failed[name]['evidence'].split())[:300]}")
    for name in others:
        print(f"{arch}: FAILED {name}: {' '.join(failed[name]['evidence'].split())[:600]}", file=sys.stderr)
    if others:
        print(f"{arch}: {len(others)} check(s) failed besides the known gap: {', '.join(others)}", file=sys.stderr)
    if closed:
        print(f"{arch}: the known gap closed ({', '.join(closed)} did not fail): say so in envs/ and .ci/known_gap.py, "
              "so that this arch must pass", file=sys.stderr)
    if not others and not closed:
        c = report.get("counts", {})
        print(f"{arch}: smoke as expected ({c.get('passed', '?')} passed, {c.get('needs-gpu', '?')} need a GPU, "
              f"{len(expected)} known gap)")
    return 1 if others or closed else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2:] or None))
