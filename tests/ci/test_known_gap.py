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


def test_the_gap_comes_from_envs(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import known_gap

    assert known_gap.gaps_from_envs("sm90") == [GAP]
    assert known_gap.gaps_from_envs("sm120") == [] and known_gap.gaps_from_envs("sm89") == []
    p = _run(tmp_path, [("torch", "passed"), (GAP, "failed")])  # no names given: envs/ says sm90's gap
    assert p.returncode == 0, p.stderr


def test_an_arch_without_a_gap_must_pass(tmp_path):
    report = tmp_path / "smoke.json"
    report.write_text(json.dumps({"arch": "sm120", "results": [
        {"tier": "import", "name": GAP, "status": "failed", "evidence": "x", "remedy": ""}]}))
    p = subprocess.run([sys.executable, str(SCRIPT), str(report)], capture_output=True, text=True)
    assert p.returncode == 1 and "failed besides the known gap" in p.stderr


def test_ci_runs_the_gap_check_for_sm120_and_sm90():
    run = (REPO / ".ci" / "run").read_text()
    assert "for arch in sm120 sm90; do" in run and '.ci/known_gap.py "$smoke/$arch.json"' in run
    wf = (REPO / ".github" / "workflows" / "envs.yml").read_text()
    assert "python .ci/known_gap.py smoke.json" in wf
