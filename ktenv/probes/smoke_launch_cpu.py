"""Launch-tier probe (no GPU): does the installed sglang accept the launch command?

    <env>/bin/python smoke_launch_cpu.py  < {"argv": ["--model", "...", ...]}

Runs INSIDE the environment. Builds sglang's own argument parser
(`ServerArgs.add_cli_args`) and parses the server arguments exactly as
`python -m sglang.launch_server` would, so a flag the installed sglang does
not know, or a value outside its choices, fails here and not after the
minutes a real start takes. Then tries `ServerArgs.from_cli_args`, whose
post-init checks need an accelerator on most paths; a failure for want of one
is reported as such, not as a broken command.

Prints `KTENV-RESULT {json}` last on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import time
import traceback

MARK = "KTENV-RESULT "
NEEDS_GPU = re.compile(r"No accelerator|libcuda\.so|NVML|no CUDA-capable device|Found no NVIDIA driver|cuInit")


def parse(argv: list[str]) -> dict:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang.launch_server")
    ServerArgs.add_cli_args(parser)
    err = io.StringIO()
    out: dict = {"ok": False}
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(argv)
    except SystemExit:
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "argparse exited"
        out["error"] = message
        m = re.search(r"unrecognized arguments: (.*)$", message)
        out["unknown"] = [t for t in m.group(1).split() if t.startswith("-")] if m else []
        m = re.search(r"argument (\S+): (.*)$", message)
        if m:
            out["bad_argument"] = {"flag": m.group(1).split("/")[0], "why": m.group(2)}
        return out
    out["ok"] = True
    known = {a.dest: a.option_strings for a in parser._actions}
    given = [t.split("=", 1)[0] for t in argv if t.startswith("--")]
    out["given_flags"] = given
    out["parsed"] = {k: v for k, v in sorted(vars(ns).items())
                     if any(o in given for o in known.get(k, ()))}
    # Full validation (device, memory, backend choices) runs in ServerArgs'
    # post-init; most of it asks the accelerator first.
    t = time.perf_counter()
    try:
        ServerArgs.from_cli_args(ns)
        out["server_args"] = {"ok": True}
    except BaseException as e:  # SystemExit, ValueError, RuntimeError, AssertionError ...
        tb = traceback.format_exc()
        out["server_args"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1500],
                              "needs_gpu": bool(NEEDS_GPU.search(tb)), "traceback_tail": tb[-1200:]}
    out["server_args"]["seconds"] = round(time.perf_counter() - t, 2)
    return out


def main() -> int:
    req = json.loads(sys.stdin.read() or "{}")
    t = time.perf_counter()
    try:
        result = parse([str(a) for a in req.get("argv", [])])
    except BaseException as e:
        result = {"ok": False, "import_error": f"{type(e).__name__}: {e}"[:1500],
                  "traceback_tail": traceback.format_exc()[-1500:]}
    result["seconds"] = round(time.perf_counter() - t, 2)
    sys.stdout.write("\n" + MARK + json.dumps(result, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
