"""The one runner for code that runs inside an env: one report line, one clean environment, deaths named."""

from __future__ import annotations

import os
import sys

from ktenv import probe


def script(tmp_path, body: str):
    p = tmp_path / "p.py"
    p.write_text(body)
    return p


def test_the_last_report_line_wins_and_noise_is_ignored(tmp_path):
    s = script(tmp_path, "import json\nprint('library noise')\nprint('KTENV-RESULT ' + json.dumps({'n': 1}))\n"
                         "print('KTENV-RESULT ' + json.dumps({'n': 2}))\nprint('more noise')\n")
    run = probe.run(sys.executable, s)
    assert run.result == {"n": 2} and run.why == ""


def test_a_death_by_signal_is_named(tmp_path):
    s = script(tmp_path, "import os, signal, sys\nsys.stderr.write('about to abort')\nos.kill(os.getpid(), signal.SIGABRT)\n")
    run = probe.run(sys.executable, s)
    assert run.result is None and run.signal == "SIGABRT"
    assert run.why.startswith("was killed by SIGABRT") and "about to abort" in run.why


def test_no_report_and_a_timeout_are_reasons(tmp_path):
    run = probe.run(sys.executable, script(tmp_path, "raise SystemExit(3)\n"))
    assert run.result is None and "exited with status 3 without a report" in run.why
    run = probe.run(sys.executable, script(tmp_path, "import time\ntime.sleep(30)\n"), timeout=1)
    assert run.result is None and run.why == "did not finish within 1 s"
    run = probe.run(tmp_path / "no-env" / "bin" / "python", "kt_probe.py")
    assert run.result is None and "does not exist; build the environment first" in run.why


def test_the_child_environment_is_clean(tmp_path):
    s = script(tmp_path, "import json, os, sys\nprint('KTENV-RESULT ' + json.dumps({k: os.environ.get(k) for k in "
                         "('PYTHONPATH', 'PYTHONDONTWRITEBYTECODE', 'KEEP')}))\n")
    env = probe.child_env({**os.environ, "PYTHONPATH": "/ktenv/itself", "KEEP": "x"}, {"EXTRA": "y"})
    assert env["EXTRA"] == "y"
    run = probe.run(sys.executable, s, env=env)
    assert run.result == {"PYTHONPATH": None, "PYTHONDONTWRITEBYTECODE": "1", "KEEP": "x"}


def test_stream_passes_lines_on_as_they_come_and_keeps_the_report(tmp_path):
    s = script(tmp_path, "import json, sys\nfor i in range(3):\n    print(f'step {i}', flush=True)\n"
                         "sys.stderr.write('warn\\n')\nprint('KTENV-RESULT ' + json.dumps({'ok': True}))\n")
    seen = []
    run = probe.stream(sys.executable, s, on_line=seen.append)
    assert run.result == {"ok": True} and seen == ["step 0", "step 1", "step 2", "warn"] and run.tail == seen
    run = probe.stream(sys.executable, script(tmp_path, "print('half way')\nraise SystemExit(2)\n"))
    assert run.result is None and "exited with status 2 without a report; its output ends: half way" in run.why
