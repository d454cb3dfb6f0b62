"""The fork server (probes/fork_server.py, fork_parent.py, check/forks.py) on its own.

It is standard library only, so these tests run it with this interpreter and
small real modules written for each test: one that aborts, one that raises,
one that hangs and starts a grandchild, one that needs a "preloaded" module,
one that misses a shared library unless that module came first. Each asserts
what a smoke report would say. The server in a real env (torch preloaded,
the stack's modules) is tested in test_smoke.py.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from conftest import gone
from ktenv import probe as proberun
from ktenv.check.forks import ForkServer

MODULES = {
    "heavy": "import time\nLOADED = time.time()\n",
    "uses_heavy": "import heavy\n",
    "hides_heavy": "try:\n    import heavy\nexcept Exception:\n    heavy = None\n",
    "plain": "X = 1\n",
    "broken": "raise ValueError('broken on purpose')\n",
    "aborts": "import os\nos.abort()\n",
    "needs_lib": ("import sys\nif 'heavy' not in sys.modules:\n"
                  "    raise ImportError('libheavy.so.1: cannot open shared object file: No such file or directory')\n"),
    "never_lib": "raise ImportError('libnothere.so.1: cannot open shared object file: No such file or directory')\n",
}


def start(tmp_path: Path, preload=(), workers=2, timeout=30, **extra) -> ForkServer:
    for name, code in {**MODULES, **extra}.items():
        (tmp_path / f"{name}.py").write_text(code)
    env = proberun.child_env()
    env["PYTHONPATH"] = str(tmp_path)
    return ForkServer(sys.executable, env, list(preload), workers, timeout)


def imp(server: ForkServer, module: str) -> dict:
    return server.submit({"kind": "import", "module": module}).result(timeout=120)


def test_each_import_is_its_own_process_and_its_failure_its_own(tmp_path):
    with start(tmp_path, ["heavy"]) as fs:
        ok, broken, aborts, plain = (imp(fs, m) for m in ("plain", "broken", "aborts", "plain"))
    assert ok["ok"] and ok["parent"] == "bare" and plain["ok"]
    assert not broken["ok"] and broken["error"] == "ValueError: broken on purpose" and "Traceback" in broken["traceback_tail"]
    assert not aborts["ok"] and aborts["died"].startswith("was killed by SIGABRT") and aborts["returncode"] == -signal.SIGABRT


def test_a_module_that_imports_a_preload_moves_to_the_warm_parent(tmp_path):
    with start(tmp_path, ["heavy"]) as fs:
        uses, hides, plain = imp(fs, "uses_heavy"), imp(fs, "hides_heavy"), imp(fs, "plain")
    # `except Exception` around the import does not swallow the guard: hides_heavy imports heavy for real.
    assert uses["ok"] and uses["parent"] == "warm" and hides["ok"] and hides["parent"] == "warm"
    assert plain["parent"] == "bare"


def test_a_missing_library_is_retried_after_the_first_preload(tmp_path):
    with start(tmp_path, ["heavy"]) as fs:
        lib, never = imp(fs, "needs_lib"), imp(fs, "never_lib")
    assert lib["ok"] and lib["after"] == ["heavy"]
    # The retry did not help: what importing it alone gives is reported.
    assert not never["ok"] and never["parent"] == "bare" and "libnothere.so.1" in never["error"] and "after" not in never


def test_a_preload_that_kills_the_warm_parent_is_dropped_and_fails_in_its_own_job(tmp_path):
    fs = start(tmp_path, ["heavy", "aborts"])
    uses, aborts = imp(fs, "uses_heavy"), imp(fs, "aborts")
    summary = fs.close()
    assert uses["ok"] and uses["parent"] == "warm"
    assert aborts["died"].startswith("was killed by SIGABRT")
    assert "the warm parent died (killed by SIGABRT while importing aborts)" in summary["notes"]
    assert list(summary["parents"]["warm"]["preload"]) == ["heavy"]


def test_a_job_past_its_timeout_is_killed_with_what_it_started(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    hangs = ("import subprocess, sys, time\n"
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
             f"open({str(pidfile)!r}, 'w').write(str(p.pid))\ntime.sleep(120)\n")
    with start(tmp_path, timeout=3, hangs=hangs) as fs:
        t = time.monotonic()
        r = imp(fs, "hangs")
    assert r["died"].startswith("did not finish within 3 s (killed)") and time.monotonic() - t < 30
    pid = int(pidfile.read_text())
    assert gone(pid, within=5), f"the hung job's own child {pid} outlived the timeout"


def test_no_more_than_workers_jobs_at_once(tmp_path):
    log = tmp_path / "spans.log"
    mods = {f"span{i}": (f"import os, time\nt = time.time()\ntime.sleep(0.4)\n"
                         f"open({str(log)!r}, 'a').write(f'{{t}} {{time.time()}}\\n')\n") for i in range(6)}
    with start(tmp_path, workers=2, **mods) as fs:
        futures = [fs.submit({"kind": "import", "module": m}) for m in mods]
        assert all(f.result(timeout=60)["ok"] for f in futures)
    spans = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert most == 2, spans


def test_a_script_job_is_what_running_the_script_gives(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import json, sys\nreq = json.loads(sys.stdin.read())\nprint('noise')\n"
                      "print('KTENV-RESULT ' + json.dumps({'argv': sys.argv[1:], 'req': req, 'main': __name__}))\n"
                      "sys.exit(int(req.get('exit', 0)))\n")
    crash = tmp_path / "crash.py"
    crash.write_text("import ctypes, sys\nprint('about to crash', file=sys.stderr, flush=True)\nctypes.string_at(0)\n")
    with start(tmp_path) as fs:
        run = fs.script(str(script), ["a", "b"], stdin={"x": 1})
        quits = fs.script(str(script), [], stdin={"exit": 3})
        died = fs.script(str(crash), [])
    assert run.result == {"argv": ["a", "b"], "req": {"x": 1}, "main": "__main__"} and run.returncode == 0
    assert quits.result["req"] == {"exit": 3} and quits.returncode == 3
    fresh = proberun.run(sys.executable, crash, [])
    assert died.result is None and died.signal == "SIGSEGV" == fresh.signal
    assert died.why.startswith("was killed by SIGSEGV") and "about to crash" in died.why


def test_the_server_reports_what_it_cost(tmp_path):
    fs = start(tmp_path, ["heavy"])
    assert imp(fs, "plain")["ok"]
    summary = fs.close()
    assert summary["workers"] == 2 and summary["cpu_seconds"] > 0 and summary["driver"] in (True, False)
    assert summary["parents"]["warm"]["preload"]["heavy"]["ok"]
    json.dumps(summary)  # the smoke report carries it


def test_closing_with_jobs_unanswered_stops_at_once(tmp_path):
    slow = {f"slow{i}": "import time\ntime.sleep(5)\n" for i in range(8)}
    fs = start(tmp_path, workers=1, **slow)
    futures = [fs.submit({"kind": "import", "module": m}) for m in slow]
    t = time.monotonic()
    fs.close()  # eight 5-s jobs one at a time would take 40 s
    assert time.monotonic() - t < 20
    assert all(f.result(timeout=5).get("died", "").startswith("the fork server") for f in futures[2:])
