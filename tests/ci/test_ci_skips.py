""".ci/run's skip gate: a skip whose reason is not on .ci/allowed-skips.txt fails CI."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / ".ci" / "check_skips.py"


def report(tmp_path, *messages: str):
    cases = "".join(f'<testcase classname="t" name="c{i}"><skipped message="{m}"/></testcase>' for i, m in enumerate(messages))
    p = tmp_path / "r.xml"
    p.write_text(f'<testsuites><testsuite name="pytest">{cases}<testcase classname="t" name="ok"/></testsuite></testsuites>')
    return p


def run(path):
    return subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True)


def test_a_genuinely_absent_thing_may_skip(tmp_path):
    p = run(report(tmp_path, "needs a visible Hopper (H100 / H200) GPU (compute capability 9.0); no GPU",
                   "KTENV_KT_SOURCE does not name a ktransformers checkout"))
    assert p.returncode == 0, p.stderr


def test_a_skip_for_something_ktenv_installs_fails(tmp_path):
    p = run(report(tmp_path, "uv is not on PATH", "actionlint is not installed"))
    assert p.returncode == 1
    assert "2 test(s) skipped for a reason that is not on .ci/allowed-skips.txt" in p.stderr
    assert "uv is not on PATH" in p.stderr and "actionlint is not installed" in p.stderr


def test_the_readme_command_collects_every_test_file():
    """`pytest -ra` from the root must reach every tests/**/test_*.py: pytest's default
    norecursedirs include "build", which once left tests/build/ out without a word."""
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    collected = {line.split("::", 1)[0] for line in p.stdout.splitlines() if "::" in line}
    files = {str(f.relative_to(REPO)) for f in (REPO / "tests").rglob("test_*.py") if "fixtures" not in f.parts}
    assert files - collected == set()
