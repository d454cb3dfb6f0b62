"""Progress lines for long work: elapsed time first, on stderr (stdout stays for the result)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time


class Progress:
    """Human progress lines with elapsed time, on stderr (stdout stays for the result)."""

    def __init__(self, stream=None, quiet: bool = False):
        self.t0 = time.monotonic()
        self.stream = stream or sys.stderr
        self.quiet = quiet

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed():6.1f}s] {msg}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def heartbeat(self, what: str, every: float = 15.0):
        """While a long step runs, say every `every` seconds that it still does."""
        stop = threading.Event()
        start = time.monotonic()

        def beat():
            while not stop.wait(every):
                self(f"{what}: still working ({time.monotonic() - start:.0f} s)")

        t = threading.Thread(target=beat, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()


def beat(progress, what: str):
    """progress.heartbeat(what) for a Progress; nothing for a plain callable (print, a test's list.append)."""
    return progress.heartbeat(what) if hasattr(progress, "heartbeat") else contextlib.nullcontext()
