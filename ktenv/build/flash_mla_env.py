"""flash_mla in `build.py env` and at `launch`: the build step, the stamp entry, the summary, the refusal.

An arch whose envs/ file has a [flash_mla] table (sm90) needs flash_mla to
serve DeepSeek-V4. With --flash-mla-source the env build compiles and
installs it (flash_mla.provide) with the toolkit the toolchain stage picks
for this env; without it the env still builds, its stamp says flash_mla is
missing, and the build's summary ends with missing_message(). `launch`
refuses such an env with the same message (launch_refusal).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..errors import KtenvError
from ..tools import cache_dir
from . import flash_mla as fm
from . import toolchain


def want(target, source: str | None, cutlass: str | None) -> dict:
    """The stamp's comparison entry: asking for flash_mla (or no longer) rebuilds the env."""
    pin = fm.pin_for(target.arch)
    if pin is None:
        return {}
    return {"flash_mla_config": {"commit": pin.commit, "source": os.path.abspath(source) if source else None,
                                 "cutlass": os.path.abspath(cutlass) if cutlass else None}}


def precheck(target, source: str | None, cutlass: str | None) -> None:
    """Before anything is built: refuse --flash-mla-source where it means nothing, or a wrong checkout."""
    if not source:
        return
    pin = fm.pin_for(target.arch)
    if pin is None:
        raise KtenvError(f"--flash-mla-source is for archs that need flash_mla (envs/ [flash_mla]: sm90); "
                         f"{target.arch.name} does not use it. Drop the option; nothing was built.")
    fm.check_source(source, pin)
    fm.find_cutlass(source, pin, cutlass)


def step(target, env_python: Path, tmp: Path, source: str | None, cutlass: str | None, toolkit: dict,
         cuobjdump: str | None, progress: Callable[[str], None]) -> dict | None:
    """Build and install flash_mla into the env being built (tmp), or record that it is missing.

    toolkit: the env's toolchain record (toolchain.env_record), the one kt-kernel's build used too."""
    pin = fm.pin_for(target.arch)
    if pin is None:
        return None
    if not source:
        progress(f"flash_mla: not provided (no --flash-mla-source); {target.arch.name} cannot serve DeepSeek-V4 without it")
        return {"path": "missing", "required": pin.required, "commit": pin.commit,
                "message": fm.missing_message(target.arch, pin, target.spec.stack)}
    if not toolkit.get("cuda_home"):
        raise KtenvError(toolkit["remedy"])
    return fm.provide(str(env_python), source, toolkit["cuda_home"], pin, cache_dir(), progress, cutlass=cutlass,
                      cuobjdump=cuobjdump, environ=toolchain.build_env(toolkit, None, tmp))


def summary_lines(entry: dict | None) -> list[str]:
    if not entry:
        return []
    if entry.get("path") == "source":
        return [f"  flash_mla {entry.get('version')}: {', '.join(entry.get('sass') or [])}, built from FlashMLA "
                f"{entry['commit'][:12]} ({entry.get('built_seconds')} s to build, cached)"]
    return [f"  flash_mla: MISSING -- {entry.get('message', '')}"]


def launch_refusal(target) -> str | None:
    """None when target's env can serve as far as flash_mla goes; else the message `launch` refuses with.

    The stamp says so for an env ktenv built; otherwise (an env from before,
    or flash_mla installed by hand) the probe decides.
    """
    pin = fm.pin_for(target.arch)
    if pin is None or not pin.required:
        return None
    if ((target.stamp or {}).get("flash_mla") or {}).get("path") == "source" or fm.verify(str(target.python)).get("ok"):
        return None
    return fm.missing_message(target.arch, pin, target.spec.stack)
