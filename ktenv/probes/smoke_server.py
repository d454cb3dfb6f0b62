"""Start an sglang server, wait for it, ask it twice, stop it, read its log.

Standard library only, so ktenv imports it (smoke's launch-gpu tier) and it
also runs by hand on a GPU host:

    python smoke_server.py --port 30000 --log server.log --deadline 900 \
        [--kt-layers 0,1,2,3 --kt-experts 256] -- \
        <env>/bin/python -m sglang.launch_server --model ... --port 30000 ...

Steps, each with its time: start (own session and process group, output to
the log), health (GET /health until 200, while the process lives, before the
deadline), generate (POST /generate, greedy, logprobs) and chat (POST
/v1/chat/completions, greedy, logprobs), stop (SIGTERM to the whole group,
SIGKILL after a grace period, then the port must be free), and log (the KT
loader's lines for every layer). Any HTTP failure -- a status, a dropped
connection, a truncated body, a timeout -- fails its step; nothing raises.

With dummy weights the text is noise, so what passes is: as many tokens as
asked for, every logprob finite (orjson writes NaN as null; both fail), more
than one distinct token over the two answers (a model whose experts or
attention produce garbage repeats one token), and proof in the log that
kt-kernel loaded the CPU experts of every layer.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
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
HTTP_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError, UnicodeError)
# What kt-kernel 0.7.2 prints per layer when sglang's KT wrapper loads the CPU
# experts (--kt-method MXFP4): kt_kernel/utils/loader.py
# (MXFP4SafeTensorLoader.load_experts) and kt_kernel/utils/amx.py
# (NativeMoEWrapper.load_weights, called from sglang's kt_ep_wrapper.py
# process_weights_after_loading). print() goes through the scheduler's stdout,
# so the server must run with PYTHONUNBUFFERED=1 for the lines to reach the log.
KT_LOADED = re.compile(r"\[MXFP4SafeTensorLoader\] Loaded (\d+) experts from (?:model\.)?layers\.(\d+)\.")
KT_WRAPPED = re.compile(r"\[NativeMoEWrapper Layer (\d+)\] load_experts: .*total: [\d.]+ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal still exists
        return True


def kt_log_problems(text: str, layers: list[int], experts: int | None) -> list[str]:
    """What the log lacks to prove kt-kernel loaded the CPU experts of every layer ([] if nothing)."""
    loaded = {}
    for m in KT_LOADED.finditer(text):
        loaded.setdefault(int(m.group(2)), int(m.group(1)))
    wrapped = {int(m.group(1)) for m in KT_WRAPPED.finditer(text)}
    out = []
    missing = [layer for layer in layers if layer not in loaded]
    if missing:
        out.append(f"no '[MXFP4SafeTensorLoader] Loaded N experts from layers.L' line for layer(s) "
                   f"{', '.join(map(str, missing))}")
    short = [f"layer {layer}: {n}" for layer, n in sorted(loaded.items()) if experts and layer in layers and n != experts]
    if short:
        out.append(f"the loader read fewer or more experts than the model has ({experts}): {', '.join(short)}")
    unwrapped = [layer for layer in layers if layer not in wrapped]
    if unwrapped:
        out.append(f"no '[NativeMoEWrapper Layer L] load_experts ... total' line for layer(s) "
                   f"{', '.join(map(str, unwrapped))}")
    return out


def _not_finite(values) -> list:
    return [v for v in values if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))]


class ServerRun:
    def __init__(self, argv: list[str], env: dict, port: int, log: Path, host: str = "127.0.0.1",
                 kt_layers: list[int] | None = None, kt_experts: int | None = None):
        self.argv, self.env, self.port, self.log, self.host = list(argv), dict(env), port, Path(log), host
        self.kt_layers, self.kt_experts = list(kt_layers or []), kt_experts
        self.proc: subprocess.Popen | None = None
        self.steps: list[dict] = []
        self.tokens: dict[str, list[str]] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _step(self, name: str, t0: float, ok: bool, note: str) -> bool:
        self.steps.append({"step": name, "ok": ok, "seconds": round(time.monotonic() - t0, 1), "note": note})
        return ok

    def _http(self, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, str]:
        """(status, body). Raises one of HTTP_ERRORS for anything but an HTTP status."""
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
            except HTTP_ERRORS as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            time.sleep(poll)
        return self._step("health", t0, False, f"not healthy within {deadline:.0f} s (last: {last})")

    def _ask(self, step: str, path: str, body: dict) -> tuple[dict | None, float]:
        t0 = time.monotonic()
        try:
            status, text = self._http(path, body)
        except HTTP_ERRORS as e:
            self._step(step, t0, False, f"POST {path} failed: {type(e).__name__}: {e}")
            return None, t0
        if status != 200:
            self._step(step, t0, False, f"POST {path}: HTTP {status}: {text[:300]}")
            return None, t0
        try:
            r = json.loads(text)
            if not isinstance(r, dict):
                raise ValueError("not a JSON object")
            return r, t0
        except ValueError as e:
            self._step(step, t0, False, f"POST {path}: HTTP 200 but the body is not a JSON object ({e}): {text[:300]}")
            return None, t0

    def generate(self, prompt: str) -> bool:
        r, t0 = self._ask("generate", "/generate", {"text": prompt, "return_logprob": True,
                                                    "return_text_in_logprobs": True, "sampling_params": {
                                                        "max_new_tokens": NEW_TOKENS, "temperature": 0,
                                                        "ignore_eos": True}})
        if r is None:
            return False
        meta = r.get("meta_info") or {}
        n = meta.get("completion_tokens")
        lps = [e for e in (meta.get("output_token_logprobs") or []) if isinstance(e, (list, tuple)) and len(e) >= 2]
        self.tokens["generate"] = [str(e[2]) if len(e) > 2 and e[2] is not None else f"id {e[1]}" for e in lps]
        bad = _not_finite([e[0] for e in lps])
        problems = []
        if not isinstance(r.get("text"), str) or n != NEW_TOKENS:
            problems.append(f"{n} tokens back (asked {NEW_TOKENS})")
        if len(lps) != n:
            problems.append(f"{len(lps)} logprobs for {n} tokens")
        if bad:
            problems.append(f"non-finite logprobs {bad[:4]} (NaN/inf logits; null is how orjson writes NaN)")
        note = f"HTTP 200, {n} tokens back (asked {NEW_TOKENS}), logprobs finite" if not problems else "; ".join(problems)
        return self._step("generate", t0, not problems, note + ("" if not problems else f": {json.dumps(r)[:300]}"))

    def chat(self, prompt: str) -> bool:
        r, t0 = self._ask("chat", "/v1/chat/completions", {
            "model": "default", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": True})
        if r is None:
            return False
        n = (r.get("usage") or {}).get("completion_tokens")
        choice = (r.get("choices") or [{}])[0] or {}
        msg = choice.get("message") or {}
        content = ((choice.get("logprobs") or {}).get("content")) or []
        self.tokens["chat"] = [str(c.get("token")) for c in content if isinstance(c, dict)]
        bad = _not_finite([c.get("logprob") for c in content if isinstance(c, dict)])
        problems = []
        if not (isinstance(n, int) and 0 < n <= NEW_TOKENS):
            problems.append(f"{n} completion tokens (asked up to {NEW_TOKENS})")
        if not (isinstance(msg.get("content"), str) or isinstance(msg.get("reasoning_content"), str)):
            problems.append("no message content")
        if not content:
            problems.append("no logprobs in the answer")
        if bad:
            problems.append(f"non-finite logprobs {bad[:4]} (NaN/inf logits; null is how orjson writes NaN)")
        note = f"HTTP 200, {n} completion tokens, logprobs finite" if not problems else "; ".join(problems)
        return self._step("chat", t0, not problems, note + ("" if not problems else f": {json.dumps(r)[:300]}"))

    def distinct(self) -> bool:
        t0 = time.monotonic()
        every = self.tokens.get("generate", []) + self.tokens.get("chat", [])
        seen = sorted(set(every))
        ok = len(seen) > 1
        note = (f"{len(seen)} distinct tokens in {len(every)}" if ok else
                f"one token repeated ({seen[0]!r} x {len(every)}) over both answers" if seen else "no tokens to compare")
        if not ok:
            note += ": the model computes the same output whatever the input (broken experts, attention or NaNs)"
        return self._step("distinct tokens", t0, ok, note)

    def _wait(self, timeout: float) -> bool:
        """Reap the leader; True when it has exited (False: still there after timeout)."""
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _leader_running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 30, kill_wait: float = 30) -> bool:
        """SIGTERM to the whole group (also when the leader has already exited:
        its children keep the GPU and the port), SIGKILL after `grace`, then
        the group must be gone and the port free."""
        t0 = time.monotonic()
        if self.proc is None:
            return True
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        leader_gone = not self._leader_running()
        if leader_gone and not group_alive(pgid) and not port_in_use(self.port, self.host):
            return self._step("stop", t0, True, f"already exited ({self.proc.returncode}), nothing left of its group")
        how = "the leader had exited; the rest of its group " if leader_gone else ""
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        end = time.monotonic() + grace
        while time.monotonic() < end and (self._leader_running() or group_alive(pgid)):
            time.sleep(0.2)
        if self._leader_running() or group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            how += f"stopped by SIGKILL after {grace:.0f} s"
            end = time.monotonic() + kill_wait
            self._wait(kill_wait)
            while time.monotonic() < end and group_alive(pgid):
                time.sleep(0.2)
        else:
            how += "stopped by SIGTERM"
        if self._leader_running() and not self._wait(1):
            return self._step("stop", t0, False, f"pid {pgid} did not exit {kill_wait:.0f} s after SIGKILL (stuck in the "
                              "kernel, e.g. the GPU driver); it may still hold the GPU. Check nvidia-smi.")
        if group_alive(pgid):
            return self._step("stop", t0, False, f"processes of group {pgid} survived SIGKILL for {kill_wait:.0f} s; "
                              f"see `ps -g {pgid}`")
        if port_in_use(self.port, self.host):
            return self._step("stop", t0, False, f"port {self.port} still answers after the server's process group "
                              "is gone: a process outside the group holds it")
        return self._step("stop", t0, True, how)

    def check_log(self) -> bool:
        t0 = time.monotonic()
        if not self.kt_layers:
            return True
        try:
            text = self.log.read_text(errors="replace")
        except OSError as e:
            return self._step("KT loader", t0, False, f"cannot read the log {self.log}: {e}")
        problems = kt_log_problems(text, self.kt_layers, self.kt_experts)
        if problems:
            return self._step("KT loader", t0, False, "; ".join(problems) + " -- no proof the CPU experts were loaded "
                              "(kt-kernel's loader prints these lines; the server needs PYTHONUNBUFFERED=1)")
        return self._step("KT loader", t0, True, f"kt-kernel loaded {self.kt_experts or 'the'} experts of each of the "
                          f"{len(self.kt_layers)} layers on the CPU (loader and NativeMoEWrapper lines in the log)")

    def log_tail(self, n: int = 40) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []

    def check(self, deadline: float, prompt: str, chat_prompt: str | None = None, grace: float = 30) -> dict:
        t0 = time.monotonic()
        try:
            if self.start() and self.wait_healthy(deadline):
                # Both requests, even when the first fails: two symptoms tell more than one.
                if all([self.generate(prompt), self.chat(chat_prompt or prompt)]):
                    self.distinct()
        finally:
            self.stop(grace)
        if any(s["step"] == "generate" for s in self.steps):
            self.check_log()  # the log is complete once the group is gone
        failed = [s for s in self.steps if not s["ok"]]
        ok = not failed and any(s["step"] == "chat" for s in self.steps)
        summary = ("; ".join(f"{s['step']}: {s['note']} ({s['seconds']} s)" for s in self.steps if s["step"] != "stop")
                   if ok else f"{failed[0]['step']} failed: {failed[0]['note']}" if failed else "incomplete")
        return {"ok": ok, "summary": summary, "steps": self.steps, "tokens": self.tokens, "log": str(self.log),
                "log_tail": [] if ok else self.log_tail(), "seconds": round(time.monotonic() - t0, 1)}


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
    ap.add_argument("--kt-layers", default="", help="comma-separated layer ids whose KT loader lines must be in the log")
    ap.add_argument("--kt-experts", type=int, default=None)
    a = ap.parse_args(argv[:cut])
    layers = [int(x) for x in a.kt_layers.split(",") if x.strip()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    report = ServerRun(argv[cut + 1:], env, a.port, Path(a.log), kt_layers=layers,
                       kt_experts=a.kt_experts).check(a.deadline, a.prompt)
    sys.stdout.write("\n" + MARK + json.dumps(report) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
