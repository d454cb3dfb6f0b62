"""Drive one probes/kt_tune.py process per kt-kernel variant and take interleaved samples.

kt-kernel reads KT_KERNEL_CPU_VARIANT once, at import, so each variant needs
its own process. All of them stay alive (idle ones sleep; measured: 0.02 CPU
seconds in 5 s), and every round asks each (variant, method) for one decode
and one prefill sample, starting the round at a different configuration each
time, so a load spike on a shared machine lands on all of them alike.

Public API:
  Timing                                         what one sample costs
  measure(python, variants, methods, shape, threads, timing, rounds, log_dir, progress, prefix=()) -> dict
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import KtenvError
from ..probe import MARK, PROBES, child_env

PROBE = PROBES / "kt_tune.py"


@dataclass(frozen=True)
class Timing:
    decode_qlen: int
    prefill_qlen: int
    decode_seconds: float
    decode_min_iters: int
    prefill_seconds: float
    prefill_min_iters: int
    # A decode forward is milliseconds: one untimed forward first brings the
    # thread and its caches in. A prefill forward is long enough not to need it.
    decode_warmup: int = 1
    prefill_warmup: int = 0


class Worker:
    """One probe process holding one variant."""

    def __init__(self, python: str, variant: str, methods: list[str], shape: dict, threads: int, max_len: int,
                 log_dir: Path, prefix: tuple[str, ...] = ()):
        self.variant = variant
        # KT_MXFP4_BACKEND would swap the MXFP4 class under every variant; measure kt-kernel's own choice.
        env = child_env({k: v for k, v in os.environ.items() if k != "KT_MXFP4_BACKEND"},
                        {"KT_KERNEL_CPU_VARIANT": variant})
        cmd = list(prefix) + [python, str(PROBE), "--experts", str(shape["experts"]), "--hidden", str(shape["hidden"]),
                              "--intermediate", str(shape["intermediate"]), "--topk", str(shape["topk"]),
                              "--threads", str(threads), "--max-len", str(max_len)]
        for m in methods:
            cmd += ["--method", m]
        self.log = log_dir / f"{variant}.log"
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1, env=env, cwd=tempfile.gettempdir())

    def read(self, timeout: float) -> dict:
        """The next KTENV-RESULT line, or a dict with `error` (timeout, death, signal)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return {"error": f"no answer within {timeout:.0f} s"}
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                why = f"killed by signal {-code}" if code < 0 else f"exited {code}"
                if code == -signal.SIGILL:
                    why += " (SIGILL: this build uses instructions the CPU lacks)"
                return {"error": f"the probe {why}; log: {self.log}: {self._tail()}", "dead": True}
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])

    def ask(self, cmd: dict, timeout: float) -> dict:
        if self.proc.poll() is not None:
            return {"error": f"the probe is no longer running (exit {self.proc.returncode}); log: {self.log}", "dead": True}
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"error": f"the probe closed its input; log: {self.log}: {self._tail()}", "dead": True}
        return self.read(timeout)

    def _tail(self) -> str:
        self._log.flush()
        try:
            return self.log.read_text(errors="replace").strip()[-400:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _tok_s(answer: dict, qlen: int) -> float | None:
    """Tokens/s of a sample's fastest-quarter forward (wall clock).

    Noise on a shared machine only ever adds time (a forward whose thread
    waited for a core: 1.1 ms forwards took 15-36 ms at load 6 on 2 cores),
    so the fast end of a sample is the kernel and the slow end the
    neighbours; the quartile rather than the minimum keeps one odd reading
    from deciding. A one-forward sample is that forward.
    """
    ms = sorted(answer.get("ms") or [])
    if not ms:
        return None
    fast = ms[len(ms) // 4]
    return round(qlen * 1000.0 / fast, 2) if fast > 0 else None


def measure(python: str, variants: list[str], methods: dict[str, list[str]], shape: dict, threads: int, timing: Timing,
            rounds: int, log_dir: Path, progress: Callable[[str], None] = print, prefix: tuple[str, ...] = (),
            timeout: float = 600) -> dict:
    """Samples for every (variant, method) that set up; failures and skipped methods with reasons.

    methods: {variant: [method, ...]} (kt-kernel's avx2 build has no AMXINT4 class).
    Returns {"rows": [...], "failed": {"variant/method": why}, "setup": {variant: ready report},
    "load": {"before", "after"}, "seconds"}.
    """
    t0 = time.monotonic()
    load_before = os.getloadavg()
    log_dir.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    setup: dict[str, dict] = {}
    configs: list[tuple[Worker, str]] = []
    started: list[Worker] = []

    def start(i: int) -> None:
        if i < len(variants):
            v = variants[i]
            started.append(Worker(python, v, methods[v], shape, threads, timing.prefill_qlen, log_dir, prefix))

    try:
        # Two set up at a time: one imports torch while the other draws and
        # quantizes its weights, without five processes' transient ~1 GB each.
        start(0)
        start(1)
        for i, v in enumerate(variants):
            t = time.monotonic()
            w = started[i]
            ready = w.read(timeout)
            start(i + 2)
            setup[v] = ready
            if not ready.get("ready"):
                failed.update({f"{v}/{m}": ready.get("error", "the probe did not start") for m in methods[v]})
                progress(f"variant {v}: failed to start: {ready.get('error')}")
                w.close()
                continue
            if ready.get("variant") != v:
                failed.update({f"{v}/{m}": f"kt-kernel loaded {ready.get('variant')} when {v} was forced" for m in methods[v]})
                progress(f"variant {v}: kt-kernel loaded {ready.get('variant')} instead; left out")
                w.close()
                continue
            for m in methods[v]:
                info = ready["methods"].get(m, {})
                if info.get("ok"):
                    configs.append((w, m))
                else:
                    failed[f"{v}/{m}"] = info.get("error", "not set up")
            progress(f"variant {v} ready ({i + 1}/{len(variants)}, {time.monotonic() - t:.0f} s): "
                     + ", ".join(f"{m} {ready['methods'][m].get('class') or 'failed'}" for m in methods[v]))
        if not configs:
            raise KtenvError("No kt-kernel variant could be set up for the benchmark in this env; the first "
                             f"error: {next(iter(failed.values()), 'unknown')}. Check the env with "
                             "`build.py smoke --tier kernel`.")
        samples = {(w.variant, m): {"decode": [], "prefill": []} for w, m in configs}
        for r in range(rounds):
            tr = time.monotonic()
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            if r % 2:
                order.reverse()
            line = []
            for w, m in order:
                got = {}
                for phase, qlen, secs, iters, warm in (
                        ("decode", timing.decode_qlen, timing.decode_seconds, timing.decode_min_iters, timing.decode_warmup),
                        ("prefill", timing.prefill_qlen, timing.prefill_seconds, timing.prefill_min_iters, timing.prefill_warmup)):
                    a = w.ask({"cmd": "time", "method": m, "qlen": qlen, "min_seconds": secs, "min_iters": iters,
                               "warmup": warm}, timeout)
                    if a.get("error"):
                        failed.setdefault(f"{w.variant}/{m}", a["error"])
                    got[phase] = _tok_s(a, qlen)
                    samples[(w.variant, m)][phase].append(got[phase])
                line.append(f"{w.variant}/{m} {_fmt(got['decode'])}/{_fmt(got['prefill'])}")
            progress(f"round {r + 1}/{rounds} ({time.monotonic() - tr:.0f} s, load {os.getloadavg()[0]:.1f}), "
                     f"decode/prefill tok/s: " + ", ".join(line))
    finally:
        for w in started:
            w.close()
    rows = [{"variant": v, "method": m, "samples": s} for (v, m), s in samples.items()]
    return {"rows": rows, "failed": failed, "setup": setup, "logs": str(log_dir),
            "load": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
            "seconds": round(time.monotonic() - t0, 1)}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"
