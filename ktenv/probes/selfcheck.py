"""Upstream's own self-checks, run INSIDE the environment under test (its python):
kt-kernel's `kt doctor -v` and `kt version`, sglang's `python -m sglang.check_env`,
and the names they read. Each reports what the tool printed, item by item;
ktenv (ktenv/check/selfcheck.py) decides, with envs/loaders.toml [[selfcheck]],
which warnings are known to be false.

Named checks for import_sweep.py (a forked child each), or by hand:

    python selfcheck.py kt_cli | sglang_check_env | upstream_names

Standard library only at module level.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import json
import os
import runpy
import shutil
import sys
import tempfile

MARK = "KTENV-RESULT "
# kt doctor's status column; its package sub-rows use marks instead of words.
_STATUS = {"ok": "ok", "warning": "warning", "error": "error", "✓": "ok", "○": "warning", "✗": "error"}


def _pip() -> str | None:
    try:
        return md.version("pip")
    except md.PackageNotFoundError:
        return None


def parse_table(text: str) -> list[dict]:
    """The rows of a rich table as kt doctor prints it (box characters, one row a line;
    a wrapped cell continues on lines whose first cell is empty)."""
    rows: list[dict] = []
    parent = ""
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if rows and not cells[0] and not cells[1]:  # a wrapped cell's continuation
            for key, extra in zip(("check", "status", "value", "notes"), cells):
                if extra:
                    rows[-1][key] = (rows[-1][key] + " " + extra).strip()
            continue
        name = cells[0]
        sub = name.startswith("└─")
        name = name.removeprefix("└─").strip()
        if not sub:
            parent = name
        rows.append({"check": name, "parent": parent if sub else "", "status": _STATUS.get(cells[1].lower(), cells[1]),
                     "value": cells[2] if len(cells) > 2 else "", "notes": cells[3] if len(cells) > 3 else ""})
    return rows


def _run_kt(argv: list[str]) -> tuple[str, int | str | None]:
    """Run kt-kernel's CLI entry point (what the env's `bin/kt` runs) with argv; its output and exit code."""
    from kt_kernel.cli.main import main

    buf = io.StringIO()
    old = sys.argv
    sys.argv = ["kt", *argv]
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return buf.getvalue(), code


def kt_cli(arg: dict) -> dict:
    """`kt doctor -v` and `kt version`, in English, as wide as needed, with a scratch HOME:
    kt writes its settings and a cache under ~/.ktransformers, and the user's own
    settings must not change what the env is judged by."""
    home = tempfile.mkdtemp(prefix="ktenv-kt-home-")
    os.environ.update({"HOME": home, "KT_LANG": "en", "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})
    try:
        return _kt_cli()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _kt_cli() -> dict:
    out = {"pip": _pip()}
    try:
        import kt_kernel.cli  # noqa: F401
    except ImportError as e:
        return {**out, "missing": f"{type(e).__name__}: {e}"}
    text, code = _run_kt(["doctor", "-v"])
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    out["doctor"] = {"exit": code, "rows": parse_table(text),
                     "summary": next((ln for ln in reversed(lines) if not ln.startswith(("│", "└", "┃", "┏", "┡"))), ""),
                     "text": text[-6000:]}
    text, code = _run_kt(["version"])
    rows, section = [], ""
    for ln in text.splitlines():
        s = ln.strip()
        if s.endswith(":") and " " not in s[:-1]:
            section = s[:-1]
        elif s and "  " in s and section == "Packages":
            name, _, value = s.partition(" ")
            rows.append({"check": name, "value": value.strip()})
    out["version"] = {"exit": code, "packages": rows, "text": text[-3000:]}
    return out


def sglang_check_env(arg: dict) -> dict:
    """`python -m sglang.check_env`: its `key: value` lines, or how it crashed."""
    buf = io.StringIO()
    crashed = None
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_module("sglang.check_env", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        crashed = None if e.code in (0, None) else f"SystemExit: {e.code}"
    except Exception as e:  # FileNotFoundError for nvidia-smi on a host without the driver
        crashed = f"{type(e).__name__}: {e}"[:600]
    items = {}
    for ln in buf.getvalue().splitlines():
        key, sep, value = ln.partition(": ")
        if sep and key and not key.startswith(" "):
            items[key.strip()] = value.strip()
    return {"crashed": crashed, "items": items}


def upstream_names(arg: dict) -> dict:
    """What upstream code reads about the stack's own packages."""
    out = {}
    import sglang

    out["sglang.__version__"] = getattr(sglang, "__version__", None)
    try:
        from accelerate.utils import is_transformers_available

        out["accelerate is_transformers_available()"] = str(is_transformers_available())
    except ImportError as e:
        out["accelerate is_transformers_available()"] = f"not importable: {e}"
    return {"items": out}


CHECKS = {"kt_cli": kt_cli, "sglang_check_env": sglang_check_env, "upstream_names": upstream_names}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in CHECKS:
        print(__doc__, file=sys.stderr)
        return 2
    result = {"ok": True, **CHECKS[argv[1]]({})}
    sys.stdout.write("\n" + MARK + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
