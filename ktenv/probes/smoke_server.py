"""Start an sglang server, wait for it, ask it twice, stop it, keep its log.

Standard library only, so ktenv imports it (smoke's launch-gpu tier) and it
also runs by hand on a GPU host:

    python smoke_server.py --port 30000 --log server.log --deadline 900 -- \
        <env>/bin/python -m sglang.launch_server --model ... --port 30000 ...

Steps, each with its time: start (own process group, output to the log),
health (GET /health until 200, while the process lives, before the
deadline), generate (POST /generate, greedy, a fixed number of new tokens)
and chat (POST /v1/chat/completions), then stop (SIGTERM to the group, SIGKILL
after a grace period). With dummy weights the text is noise; what is checked
is that tokens come back, as many as asked for unless the model stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

MARK = "KTENV-RESULT "
NEW_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerRun:
    def __init__(self, argv: list[str], env: dict, port: int, log: Path, host: str = "127.0.0.1"):
        self.argv, self.env, self.port, self.log, self.host = list(argv), dict(env), port, Path(log), host
        self.proc: subprocess.Popen | None = None
        self.steps: list[dict] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _step(self, name: str, t0: float, ok: bool, note: str) -> bool:
        self.steps.append({"step": name, "ok": ok, "seconds": round(time.monotonic() - t0, 1), "note": note})
        return ok

    def _http(self, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, str]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def start(self) -> bool:
        t0 = time.monotonic()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        try:
            # Own session: stop() signals the whole group (sglang forks scheduler
            # and detokenizer processes that must not outlive the check).
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True, stdin=subprocess.DEVNULL)
        except OSError as e:
            return self._step("start", t0, False, f"could not start {self.argv[0]}: {e}")
        finally:
            out.close()
        return self._step("start", t0, True, f"pid {self.proc.pid}, log {self.log}")

    def wait_healthy(self, deadline: float, poll: float = 2.0) -> bool:
        t0 = time.monotonic()
        last = "no answer yet"
        while time.monotonic() - t0 < deadline:
            code = self.proc.poll()
            if code is not None:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
                return self._step("health", t0, False, f"the server exited ({how}) before it was healthy")
            try:
                status, text = self._http("/health", timeout=5)
                if status == 200:
                    return self._step("health", t0, True, "GET /health answered 200")
                last = f"HTTP {status}: {text[:200]}"
            except (urllib.error.URLError, OSError) as e:
                last = str(getattr(e, "reason", e))
            time.sleep(poll)
        return self._step("health", t0, False, f"not healthy within {deadline:.0f} s (last: {last})")

    def generate(self, prompt: str) -> bool:
        t0 = time.monotonic()
        try:
            status, text = self._http("/generate", {"text": prompt, "sampling_params": {
                "max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}})
            r = json.loads(text) if status == 200 else {}
        except (urllib.error.URLError, OSError, ValueError) as e:
            return self._step("generate", t0, False, f"POST /generate failed: {e}")
        n = (r.get("meta_info") or {}).get("completion_tokens")
        ok = status == 200 and isinstance(r.get("text"), str) and n == NEW_TOKENS
        return self._step("generate", t0, ok, f"HTTP {status}, {n} tokens back (asked {NEW_TOKENS})"
                          + ("" if ok else f": {text[:300]}"))

    def chat(self, prompt: str) -> bool:
        t0 = time.monotonic()
        try:
            status, text = self._http("/v1/chat/completions", {
                "model": "default", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": NEW_TOKENS, "temperature": 0})
            r = json.loads(text) if status == 200 else {}
        except (urllib.error.URLError, OSError, ValueError) as e:
            return self._step("chat", t0, False, f"POST /v1/chat/completions failed: {e}")
        n = (r.get("usage") or {}).get("completion_tokens")
        msg = ((r.get("choices") or [{}])[0].get("message") or {})
        ok = status == 200 and isinstance(n, int) and 0 < n <= NEW_TOKENS and (
            isinstance(msg.get("content"), str) or isinstance(msg.get("reasoning_content"), str))
        return self._step("chat", t0, ok, f"HTTP {status}, {n} completion tokens" + ("" if ok else f": {text[:300]}"))

    def stop(self, grace: float = 30) -> bool:
        t0 = time.monotonic()
        if self.proc is None:
            return True
        if self.proc.poll() is not None:
            return self._step("stop", t0, True, f"already exited ({self.proc.returncode})")
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(grace)
            how = "SIGTERM"
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            how = f"SIGKILL after {grace:.0f} s"
        # Children that left the group's leader behind still hold the GPU.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self._step("stop", t0, True, f"stopped by {how}")

    def log_tail(self, n: int = 40) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []

    def check(self, deadline: float, prompt: str) -> dict:
        t0 = time.monotonic()
        ok = False
        try:
            ok = self.start() and self.wait_healthy(deadline)
            if ok:  # both requests, even when the first fails: two symptoms tell more than one
                ok = all([self.generate(prompt), self.chat(prompt)])
        finally:
            self.stop()
        failed = [s for s in self.steps if not s["ok"]]
        summary = ("; ".join(f"{s['step']}: {s['note']} ({s['seconds']} s)" for s in self.steps if s["step"] != "stop")
                   if not failed else f"{failed[0]['step']} failed: {failed[0]['note']}")
        return {"ok": ok and not failed, "summary": summary, "steps": self.steps, "log": str(self.log),
                "log_tail": [] if ok and not failed else self.log_tail(), "seconds": round(time.monotonic() - t0, 1)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--deadline", type=float, default=900)
    ap.add_argument("--prompt", default="What is the capital of France?")
    a = ap.parse_args(argv[:cut])
    report = ServerRun(argv[cut + 1:], dict(os.environ), a.port, Path(a.log)).check(a.deadline, a.prompt)
    sys.stdout.write("\n" + MARK + json.dumps(report) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
