"""The interpreter an env is built with: a Python the lock was made for, found by
uv among the system's (never downloaded), and what identifies it in the stamp
(its base prefix), so that an env built by the host's Python never passes for
one built inside `nix develop`, or the reverse."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import KtenvError
from ..tools import uv_bin
from .sync import run as _run

def _python_version(python: str) -> str:
    proc = _run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def find_python(wanted: list[str], requested: str | None = None) -> tuple[str, str]:
    """(path, X.Y) of an interpreter the lock was made for; never downloaded."""
    uv = uv_bin()
    candidates = [requested] if requested else list(wanted)
    for c in candidates:
        proc = _run([uv, "python", "find", "--python-preference", "only-system", c], timeout=60)
        path = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ""
        if not path and requested and Path(requested).exists():
            path = requested
        if not path:
            continue
        version = _python_version(path)
        if version in wanted:
            return path, version
        if requested:
            raise KtenvError(
                f"--python {requested} is Python {version or '(unknown)'}, but this lock was made for Python "
                f"{' or '.join(wanted)}: its wheels (kt-kernel's are cp311/cp312 only) would not fit. "
                f"Pass an interpreter of one of those versions, or relock for another Python."
            )
    what = f"--python {requested}" if requested else f"Python {' or '.join(wanted)}"
    raise KtenvError(
        f"No interpreter found for {what}: the lock was made for Python {' or '.join(wanted)} and uv found none "
        "of them on PATH or among the Pythons it manages (ktenv does not let uv download one, so the "
        "interpreter is one you chose). Install one (e.g. `apt install python3.12`, `pyenv install 3.12`, "
        "`uv python install 3.12` on a machine with network) and pass --python /path/to/python3.X if it is not on PATH."
    )




def identity(python: str | Path) -> dict:
    """What the stamp records of the building interpreter: version and base prefix (a venv's python
    reports the interpreter it was made from)."""
    proc = _run([str(python), "-c", "import json, sys; print(json.dumps({'version': '%d.%d.%d' % sys.version_info[:3], "
                 "'base_prefix': sys.base_prefix, 'implementation': sys.implementation.name}))"], timeout=60)
    if proc.returncode != 0:
        raise KtenvError(f"{python} does not run: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
