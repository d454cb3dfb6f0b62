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
