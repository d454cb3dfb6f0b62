"""The two parents of fork_server.py and their workers: runs INSIDE the environment.

A parent preloads its imports, then forks one worker per job it is sent (one
JSON a line), reaps it, and answers with the worker's report, how it ended and
the CPU it used. A worker runs one import or one probe script and never
returns. Standard library only; see fork_server.py for the whole design.
"""

from __future__ import annotations

import io
import json
import os
import runpy
import selectors
import signal
import sys
import time
import traceback
import warnings

import smoke_import

MARK = "KTENV-RESULT "
POLL = not hasattr(os, "pidfd_open")  # before Linux 5.3: poll for exits instead


class NeedsPreload(BaseException):
    """Raised by the guard in the bare parent's children: not an Exception, so a
    library's `except Exception` around an optional import does not swallow it."""


class _Guard:
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise NeedsPreload(name)
        return None


# --- a worker: one job in one forked process ---------------------------------------

def _script(job: dict, log_path: str) -> dict:
    path = job["script"]
    sys.argv = [path, *map(str, job.get("args") or [])]
    sys.stdin = io.StringIO(job.get("stdin") or "")
    sys.path[0] = os.path.dirname(path)
    code = 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()  # what the interpreter prints for an uncaught exception
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, errors="replace") as f:
        report = None
        for line in f:
            if line.startswith(MARK):
                report = line[len(MARK):]
    return {"exit": code, "report": json.loads(report) if report else None}


def _run(job: dict, guard: list[str], log_path: str) -> dict:
    if job["kind"] == "script":
        return _script(job, log_path)
    if guard and job.get("guard", True):
        sys.meta_path.insert(0, _Guard(guard))
    try:
        return smoke_import.import_one(job["module"], job.get("after") or [], passthrough=(NeedsPreload,))
    except NeedsPreload as e:
        return {"module": job["module"], "needs_preload": str(e)}


def _worker(job: dict, guard: list[str], out_path: str, log_path: str, close: tuple) -> None:
    """In the forked child: never returns."""
    code = 0
    try:
        os.setpgid(0, 0)  # its own group: a timeout kills whatever it started too
        for fd in close:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        result = _run(job, guard, log_path)
        with open(out_path + ".tmp", "w") as f:
            json.dump(result, f)
        os.rename(out_path + ".tmp", out_path)
    except BaseException:
        code = 70
    finally:
        # No interpreter shutdown: exit handlers are not what is tested, and the
        # parent's buffers must not be flushed twice.
        os._exit(code)


# --- a parent: preloads, then forks a worker per job ---------------------------------

def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _finish(job: dict, status: int, ru, started: float, work: str, timed_out: bool) -> dict:
    out_path, log_path = (os.path.join(work, f"{job['seq']}.{x}") for x in ("json", "log"))
    result = None
    if os.path.exists(out_path):
        with open(out_path) as f:
            result = json.load(f)
    tail = _tail(log_path, 1500)
    if result is None:
        if timed_out:
            why = f"did not finish within {job['timeout']:.0f} s (killed)"
        elif os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            why = f"was killed by {name}" + (" (SIGILL: code for instructions this CPU lacks)" if name == "SIGILL" else "")
        else:
            why = f"exited with status {os.waitstatus_to_exitcode(status)} without a report"
        short = " ".join(tail[-600:].split())
        result = {"ok": False, "died": why + (f"; stderr ends: {short}" if short else ""),
                  "returncode": -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status)}
    if job["kind"] == "script" or not result.get("ok", True):
        result["output_tail"] = tail
    result.update(wall=round(time.monotonic() - started, 2), cpu=round(ru.ru_utime + ru.ru_stime, 2))
    for p in (out_path, log_path):
        try:
            os.unlink(p)
        except OSError:
            pass
    return result


def _poisoned() -> bool:
    """Could a child forked now not use CUDA? torch marks its children once the parent has
    asked CUDA for its devices (sglang's and flashinfer's imports do); a fork tells."""
    check = getattr(getattr(sys.modules.get("torch"), "cuda", None), "_is_in_bad_fork", None)
    if check is None:
        return False
    pid = os.fork()
    if pid == 0:
        os._exit(1 if check() else 0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 1


def parent(name: str, rfd: int, wfd: int, preload: list[str], guard: list[str], work: str, driver: bool) -> None:
    """Serve jobs from rfd (one JSON a line), answer on wfd. Never returns."""
    os.dup2(2, 1)  # what a preloaded library prints must not reach the job protocol
    warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)

    def say(msg: dict) -> None:
        os.write(wfd, (json.dumps(msg) + "\n").encode())

    loaded = {}
    for m in preload:
        say({"preloading": m})
        t = time.perf_counter()
        try:
            __import__(m)
            loaded[m] = {"ok": True, "seconds": round(time.perf_counter() - t, 2)}
        except BaseException as e:  # its jobs meet the same failure, each in its own process
            loaded[m] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:600]}
        if driver and _poisoned():  # with a GPU here, children must be able to use it: start again without m
            say({"unfit": m})
            os._exit(3)
    poisoned = _poisoned()
    if poisoned:  # no driver: CUDA could not start in any child anyway; say so in what they report
        os.environ["KTENV_FORK_WITHOUT_DRIVER"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    say({"ready": name, "preload": loaded, "cuda_in_children": not poisoned})
    running: dict[int, tuple[dict, float, int | None]] = {}  # pid -> (job, started, pidfd)
    sel = selectors.DefaultSelector()
    sel.register(rfd, selectors.EVENT_READ, None)
    buf, eof = b"", False
    try:
        while not eof or running:
            now = time.monotonic()
            wait = min((s + j["timeout"] - now for j, s, _ in running.values()), default=3600)
            for key, _ in sel.select(max(0.0, min(wait, 0.05 if POLL else 3600))):
                if key.data is None:
                    chunk = os.read(rfd, 65536)
                    buf += chunk
                    if not chunk:
                        eof = True
                        sel.unregister(rfd)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                job = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _worker(job, guard, *(os.path.join(work, f"{job['seq']}.{x}") for x in ("json", "log")), (rfd, wfd))
                try:
                    os.setpgid(pid, pid)  # also here: no window in which a timeout's kill misses it
                except OSError:
                    pass
                fd = None if POLL else os.pidfd_open(pid)
                if fd is not None:
                    sel.register(fd, selectors.EVENT_READ, pid)
                running[pid] = (job, time.monotonic(), fd)
            now = time.monotonic()
            for pid, (job, started, fd) in list(running.items()):
                timed_out = now - started > job["timeout"]
                if timed_out:
                    for kill in (os.killpg, os.kill):
                        try:
                            kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                got, status, ru = os.wait4(pid, 0 if timed_out else os.WNOHANG)
                if not got:
                    continue
                if fd is not None:
                    sel.unregister(fd)
                    os.close(fd)
                del running[pid]
                say({"seq": job["seq"], "result": _finish(job, status, ru, started, work, timed_out)})
    finally:
        for pid in running:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
    os._exit(0)
