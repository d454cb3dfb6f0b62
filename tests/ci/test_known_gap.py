""".ci/known_gap.py: an arch's smoke may fail only where its known gap is, and the gap must still be there."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / ".ci" / "known_gap.py"
GAP = "path sparse_mla=flash_mla"


def _run(tmp_path, results: list[tuple[str, str]], *expected: str) -> subprocess.CompletedProcess:
    report = tmp_path / "smoke.json"
    report.write_text(json.dumps({"arch": "sm90", "results": [
        {"tier": "import", "name": n, "status": s, "evidence": f"{n} evidence", "remedy": ""} for n, s in results]}))
    return subprocess.run([sys.executable, str(SCRIPT), str(report), *expected], capture_output=True, text=True)


def test_exactly_the_known_gap_passes(tmp_path):
    p = _run(tmp_path, [("torch", "passed"), (GAP, "failed"), ("kernel", "needs-gpu")], GAP)
    assert p.returncode == 0 and "known gap, as expected: path sparse_mla=flash_mla" in p.stdout


def test_another_failure_fails(tmp_path):
    p = _run(tmp_path, [("torch", "failed"), (GAP, "failed")], GAP)
    assert p.returncode == 1 and "1 check(s) failed besides the known gap: torch" in p.stderr


def test_a_closed_gap_fails_so_the_arch_moves_to_the_passing_ones(tmp_path):
    p = _run(tmp_path, [("torch", "passed"), (GAP, "passed")], GAP)
    assert p.returncode == 1 and "the known gap closed" in p.stderr


def test_ci_run_treats_sm90_as_the_flash_mla_gap_and_passes_on_sm120():
    text = (REPO / ".ci" / "run").read_text()
    assert "ktenv smoke --arch sm120 --tier import --tier kernel --tier launch-cpu\n" in text
    assert f'.ci/known_gap.py "$gap/smoke-sm90.json" "{GAP}"' in text
