"""A fork server for probes: runs INSIDE the environment under test (its python).

    python fork_server.py '{"workers": N, "timeout": S, "preload": ["torch", ...]}'
    stdin:  one job a line: {"id", "kind": "import", "module"} or {"id", "kind": "script", "script": PATH,
            "args", "stdin", "parent": "warm"|"bare", "timeout"}
    stdout: `KTENV-JOB {"id", "result"}` per job; `KTENV-RESULT {summary}` once stdin ends

Every job still runs in a process of its own (an abort or a poisoned import
fails that one job), but forked from one of two parents instead of started, so
python, torch and the stack's heavy shared imports load once per smoke:

    bare   the standard library only. An import job whose module imports a
           preloaded package hits a guard there and moves to the warm parent;
           one that fails on a missing shared library is retried there and, if
           it then imports, is marked "after torch" (some extensions find the
           CUDA runtime only once torch has loaded it, as in real use).
    warm   has imported `preload`. If a preload kills it, it starts again with
           the preloads before that one; the culprit fails in its own job.

A script job runs a probe as `python script args < stdin` would (runpy,
__main__) and reports its KTENV-RESULT. At most `workers` jobs run at once. A
job killed by a signal is reported by the signal's name with the end of its
output; one past its timeout is killed with its process group. Standard
library only.
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import signal
import sys
import tempfile
import time

import fork_parent

MARK, JOB = "KTENV-RESULT ", "KTENV-JOB "
MISSING_SO = re.compile(r"lib\S+\.so\S*: cannot open shared object")


# --- the coordinator: jobs in from the host, out to the two parents and back ------------

class Server:
    def __init__(self, cfg: dict):
        self.workers = max(1, int(cfg.get("workers") or os.cpu_count() or 1))
        self.timeout = float(cfg.get("timeout") or 600)
        self.preload = list(cfg.get("preload") or [])
        self.guard = sorted({m.partition(".")[0] for m in self.preload})
        self.work = tempfile.mkdtemp(prefix="ktenv-forks-")
        self.sel = selectors.DefaultSelector()
        self.mine: list[int] = []  # this process's ends of every parent's pipes
        self.queue: dict[str, list[dict]] = {"warm": [], "bare": []}
        self.by_seq: dict[int, tuple[dict, str]] = {}
        self.seq = 0
        self.notes: list[str] = []
        self.respawns = {"warm": 0, "bare": 0}
        self.driver = _has_driver()
        self.parents = {"bare": self.spawn("bare", []), "warm": self.spawn("warm", self.preload)}

    def spawn(self, name: str, preload: list[str]) -> dict:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            for fd in [to_w, from_r, *self.mine]:  # else a parent never sees the end of its input
                os.close(fd)
            try:
                fork_parent.parent(name, to_r, from_w, preload, self.guard if name == "bare" else [], self.work, self.driver)
            finally:
                os._exit(70)
        os.close(to_r)
        os.close(from_w)
        self.mine += [to_w, from_r]
        p = {"name": name, "pid": pid, "w": to_w, "r": from_r, "buf": b"", "ready": None, "preloading": None,
             "preload": preload, "inflight": set()}
        self.sel.register(from_r, selectors.EVENT_READ, p)
        return p

    def submit(self, job: dict) -> None:
        job.setdefault("timeout", self.timeout)
        where = job.get("parent") or ("bare" if job["kind"] == "import" else "warm")
        self.queue[where].append(job)

    def busy(self) -> int:
        return sum(len(p["inflight"]) for p in self.parents.values())

    def pump(self) -> None:
        while self.busy() < self.workers:
            # The warm parent first once it is ready: its jobs are the long ones.
            name = next((n for n in ("warm", "bare") if self.queue[n] and self.parents[n]["ready"]), None)
            if name is None:
                return
            job, p = self.queue[name].pop(0), self.parents[name]
            self.seq += 1
            self.by_seq[self.seq] = (job, name)
            p["inflight"].add(self.seq)
            os.write(p["w"], (json.dumps({**job, "seq": self.seq}) + "\n").encode())

    def reply(self, job: dict, result: dict) -> None:
        sys.stdout.write(JOB + json.dumps({"id": job["id"], "result": result}) + "\n")
        sys.stdout.flush()

    def on_message(self, p: dict, msg: dict) -> None:
        if "preloading" in msg:
            p["preloading"] = msg["preloading"]
            return
        if "unfit" in msg:
            p["unfit"] = msg["unfit"]
            self.note(f"{msg['unfit']} asks CUDA for its devices at import; with the NVIDIA driver here a child "
                      "forked after that could not use the GPU, so it is not preloaded")
            return
        if "ready" in msg:
            p["ready"] = msg
            took = ", ".join(f"{k} {v.get('seconds', 'failed')} s" for k, v in msg["preload"].items())
            self.note(f"{p['name']} parent ready" + (f" ({took})" if took else ""))
            return
        job, where = self.by_seq.pop(msg["seq"])
        p["inflight"].discard(msg["seq"])
        r = {**msg["result"], "parent": where}
        if job["kind"] == "import" and where == "bare" and job.get("guard", True):
            # Without a warm parent (it died too often) the bare one runs it unguarded.
            warm, retry = ("warm", {}) if not self.parents["warm"].get("gone") else ("bare", {"guard": False})
            if r.get("needs_preload") is not None:
                self.queue[warm].append({**job, **retry})  # it imports a preloaded package itself
                return
            if self.preload and not r.get("ok") and not r.get("needs_gpu") and MISSING_SO.search(r.get("error") or ""):
                # Alone it misses a shared library; in real use torch comes first and may load it.
                self.queue[warm].append({**job, **retry, "after": self.preload[:1], "first": r})
                return
        if job.get("first") is not None:
            if r.get("ok") or r.get("needs_gpu"):
                r["after"] = job["after"]
            else:  # the retry did not help: report what importing it alone gives
                r = job["first"]
        self.reply(job, r)

    def on_death(self, p: dict) -> None:
        _, status = os.waitpid(p["pid"], 0)
        why = (f"killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
               else f"exit status {os.waitstatus_to_exitcode(status)}")
        name = p["name"]
        if p["ready"] is None and p["preloading"]:
            why += f" while importing {p['preloading']}"
        if not p.get("unfit"):
            self.note(f"the {name} parent died ({why})")
            self.respawns[name] += 1
        for s in list(p["inflight"]):
            job, _ = self.by_seq.pop(s)
            self.reply(job, {"ok": False, "parent": name, "died": f"the {name} parent process died ({why}) while this ran"})
        if self.respawns[name] > 3:
            p["gone"] = True
            for job in self.queue[name]:
                self.reply(job, {"ok": False, "parent": name, "died": f"the {name} parent died {self.respawns[name]} times"})
            self.queue[name] = []
            return
        # Start it again without the import that killed it (or made it unfit); that module's
        # own job then fails, or imports, in a process of its own like any other.
        preload = [m for m in p["preload"] if p["ready"] is not None or m != p["preloading"]]
        self.parents[name] = self.spawn(name, preload)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        print(f"fork server: {msg}", file=sys.stderr, flush=True)

    def run(self) -> dict:
        t0 = time.monotonic()
        os.set_blocking(0, False)
        self.sel.register(0, selectors.EVENT_READ, "host")
        buf, eof = b"", False
        while not eof or self.busy() or any(self.queue.values()):
            self.pump()
            for key, _ in self.sel.select(60):
                if key.data == "host":
                    chunk = os.read(0, 1 << 20)
                    buf += chunk
                    if not chunk:
                        eof = True
                        self.sel.unregister(0)
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if line.strip():
                            self.submit(json.loads(line))
                    continue
                p = key.data
                chunk = os.read(p["r"], 1 << 20)
                if not chunk:
                    self.sel.unregister(p["r"])
                    self.on_death(p)
                    continue
                p["buf"] += chunk
                while b"\n" in p["buf"]:
                    line, p["buf"] = p["buf"].split(b"\n", 1)
                    self.on_message(p, json.loads(line))
        for p in self.parents.values():
            os.close(p["w"])
        for p in self.parents.values():
            os.waitpid(p["pid"], 0)  # each parent finishes its running jobs first
        for leftover in os.listdir(self.work):  # a killed job's half-written report
            os.unlink(os.path.join(self.work, leftover))
        os.rmdir(self.work)
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"workers": self.workers, "driver": self.driver, "parents": {n: p["ready"] for n, p in self.parents.items()},
                "notes": self.notes, "seconds": round(time.monotonic() - t0, 2),
                "cpu_seconds": round(me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, 2)}


def _has_driver() -> bool:
    """Is the NVIDIA driver's libcuda loadable here? Tried in a throwaway child, so that no
    parent has it mapped."""
    pid = os.fork()
    if pid == 0:
        try:
            import ctypes

            ctypes.CDLL("libcuda.so.1")
            os._exit(0)
        except OSError:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    if not fork_parent.POLL:
        try:
            os.close(os.pidfd_open(os.getpid()))
        except OSError:  # a kernel before 5.3
            fork_parent.POLL = True
    summary = Server(json.loads(argv[1])).run()
    sys.stdout.write(MARK + json.dumps(summary) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
