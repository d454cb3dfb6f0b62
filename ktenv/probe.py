"""The one host-side runner for code that must run inside an environment.

ktenv never imports torch, sglang or kt_kernel itself: a native library that
aborts would take the tool down, and the tool's Python is not the env's.
Anything that needs them is a standalone script in ktenv/probes/, run with
the env's python in its own process. Every probe reports back the same way:
one line `KTENV-RESULT {json}` on stdout (the last such line wins; libraries
may print around it). The child gets one clean environment (no PYTHONPATH
from ktenv, no bytecode written into the env, no VIRTUAL_ENV of another env),
one timeout, and a death by signal is reported by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MARK = "KTENV-RESULT "
PROBES = Path(__file__).parent / "probes"


@dataclass
class ProbeRun:
    """What one probe run gave: its report (or None) and, when None, why not in a sentence."""
    result: dict | None
    why: str
    returncode: int
    stderr: str
    seconds: float
    tail: list[str] = field(default_factory=list)  # stream(): the last lines it printed besides the report

    @property
    def signal(self) -> str | None:
        return signal.Signals(-self.returncode).name if self.returncode < 0 else None


def child_env(base: dict | None = None, extra: dict | None = None) -> dict:
    """The environment a probe runs with: `base` (default os.environ) plus `extra`,
    made safe for running inside another env."""
    env = dict(os.environ if base is None else base)
    env.update(extra or {})
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # probing an env never writes into it
    env.pop("PYTHONPATH", None)  # ktenv's own path must not leak into the env's python
    env.pop("PYTHONHOME", None)
    return env


def tail_of(text: str, n: int = 600) -> str:
    """The end of a process's output on one line, for an error message."""
    text = " ".join(text.strip().split())
    return ("..." + text[-n:]) if len(text) > n else text


def parse(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return None


def run(python: str | Path, script: str | Path, args: list[str] | tuple = (), *, stdin: dict | None = None,
        timeout: float = 600, env: dict | None = None, cwd: str | Path | None = None) -> ProbeRun:
    """Run probes/<script> (or a path) with `python`. `env` is used as given (build it with child_env)."""
    path = Path(script) if os.sep in str(script) else PROBES / script
    cmd = [str(python), str(path), *map(str, args)]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, input=json.dumps(stdin or {}), capture_output=True, text=True, timeout=timeout,
                           env=env if env is not None else child_env(), cwd=cwd or tempfile.gettempdir())
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return ProbeRun(None, f"did not finish within {timeout:.0f} s", -signal.SIGKILL, err, time.monotonic() - t0)
    except FileNotFoundError:
        return ProbeRun(None, f"could not start: {python} does not exist; build the environment first", 127, "",
                        time.monotonic() - t0)
    seconds = time.monotonic() - t0
    try:
        result = parse(p.stdout)
    except ValueError as e:
        return ProbeRun(None, f"printed an unreadable report ({e})", p.returncode, p.stderr, seconds)
    if result is not None:
        return ProbeRun(result, "", p.returncode, p.stderr, seconds)
    if p.returncode < 0:
        name = signal.Signals(-p.returncode).name
        extra = " (SIGILL: code for instructions this CPU lacks)" if name == "SIGILL" else ""
        return ProbeRun(None, f"was killed by {name}{extra}; stderr ends: {tail_of(p.stderr)}", p.returncode, p.stderr, seconds)
    return ProbeRun(None, f"exited with status {p.returncode} without a report; stderr ends: {tail_of(p.stderr)}",
                    p.returncode, p.stderr, seconds)


def stream(python: str | Path, script: str | Path, args: list[str] | tuple = (), *, on_line=lambda line: None,
           timeout: float | None = None, env: dict | None = None, cwd: str | Path | None = None) -> ProbeRun:
    """run() for long probes: every line the child prints (stdout and stderr, merged) goes to
    on_line as it comes, so the caller can show progress; the report line is taken as in run()."""
    path = Path(script) if os.sep in str(script) else PROBES / script
    cmd = [str(python), str(path), *map(str, args)]
    t0 = time.monotonic()
    result, tail = None, []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env if env is not None else child_env(), cwd=cwd or tempfile.gettempdir())
    except FileNotFoundError:
        return ProbeRun(None, f"could not start: {python} does not exist; build the environment first", 127, "", 0.0)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(MARK):
                try:
                    result = json.loads(line[len(MARK):])
                except ValueError:
                    pass
            elif line.strip():
                tail = (tail + [line])[-15:]
                on_line(line)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return ProbeRun(None, f"did not finish within {timeout:.0f} s", proc.returncode, "\n".join(tail),
                        time.monotonic() - t0, tail)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - t0
    if result is not None:
        return ProbeRun(result, "", proc.returncode, "", seconds, tail)
    end = tail_of("\n".join(tail))
    if proc.returncode < 0:
        return ProbeRun(None, f"was killed by {signal.Signals(-proc.returncode).name}; its output ends: {end}",
                        proc.returncode, "", seconds, tail)
    return ProbeRun(None, f"exited with status {proc.returncode} without a report; its output ends: {end}",
                    proc.returncode, "", seconds, tail)
