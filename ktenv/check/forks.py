"""The host side of probes/fork_server.py: one warm interpreter per smoke.

Starting the env's python and importing torch, transformers and sglang's
server args costs ~13 s of CPU; the import tier did it once per module that
imports torch, and each check and tier again. A ForkServer runs in the env's
python for the whole smoke; every job is still its own process (forked), so an
abort fails one job. `script()` runs any probe through it with the same
answer `ktenv.probe.run` gives; tiers reach it through `result.probe`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from .. import probe as proberun

JOB = "KTENV-JOB "


class ForkServer:
    def __init__(self, python: str | Path, env: dict, preload: list[str], workers: int, timeout: float = 600):
        self.env = dict(env)
        self.timeout = timeout
        self.stderr = tempfile.TemporaryFile()
        self.started = time.monotonic()
        cfg = json.dumps({"workers": workers, "timeout": timeout, "preload": preload})
        self.proc = subprocess.Popen([str(python), str(proberun.PROBES / "fork_server.py"), cfg], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=self.env, text=True, bufsize=1,
                                     cwd=tempfile.gettempdir())
        self.lock = threading.Lock()
        self.pending: dict[str, Future] = {}
        self.summary: dict | None = None
        self.n = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(JOB):
                msg = json.loads(line[len(JOB):])
                with self.lock:
                    fut = self.pending.pop(msg["id"], None)
                if fut is not None:
                    fut.set_result(msg["result"])
            elif line.startswith(proberun.MARK):
                self.summary = json.loads(line[len(proberun.MARK):])
        code = self.proc.wait()
        why = (f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
        with self.lock:
            left, self.pending = self.pending, {}
        for fut in left.values():
            fut.set_result({"ok": False, "died": f"the fork server {why}; stderr ends: {self.stderr_tail()}"})

    def stderr_tail(self, n: int = 600) -> str:
        try:
            self.stderr.seek(0)
            return proberun.tail_of(self.stderr.read().decode(errors="replace"), n)
        except (OSError, ValueError):
            return ""

    def submit(self, job: dict) -> Future:
        fut: Future = Future()
        with self.lock:
            self.n += 1
            job = {**job, "id": f"{self.n}:{job.get('module') or Path(job.get('script', '')).name}"}
            self.pending[job["id"]] = fut
            try:
                self.proc.stdin.write(json.dumps(job) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                self.pending.pop(job["id"], None)
                fut.set_result({"ok": False, "died": f"the fork server is gone; stderr ends: {self.stderr_tail()}"})
        return fut

    def serves(self, env: dict) -> bool:
        """Jobs run with the server's environment (libraries read some variables at import):
        a probe that wants another one needs a process of its own."""
        return self.proc.poll() is None and env == self.env

    def script(self, script: str, args: list[str] | tuple = (), *, stdin: dict | None = None, timeout: float | None = None,
               parent: str = "warm") -> proberun.ProbeRun:
        """Run probes/<script> in a forked child: what `ktenv.probe.run` would answer."""
        path = Path(script) if os.sep in str(script) else proberun.PROBES / script
        r = self.submit({"kind": "script", "script": str(path), "args": list(map(str, args)), "parent": parent,
                         "stdin": json.dumps(stdin or {}), "timeout": timeout or self.timeout}).result()
        tail = r.get("output_tail", "")
        if r.get("report") is not None:
            return proberun.ProbeRun(r["report"], "", r.get("exit", 0), tail, r.get("wall", 0.0))
        if r.get("died"):
            return proberun.ProbeRun(None, r["died"], r.get("returncode", 1), tail, r.get("wall", 0.0))
        return proberun.ProbeRun(None, f"exited with status {r.get('exit')} without a report; stderr ends: "
                                       f"{proberun.tail_of(tail)}", r.get("exit", 1), tail, r.get("wall", 0.0))

    def close(self) -> dict | None:
        """Stop the server once its jobs are answered; its summary (CPU seconds, preloads, notes).

        With jobs still unanswered (the caller gave up, e.g. on an exception) the server
        is stopped at once: its parents finish what runs and start nothing more."""
        with self.lock:
            abandoned = bool(self.pending)
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        if abandoned:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=self.timeout + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.reader.join(timeout=10)
        self.stderr.close()
        return self.summary

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
