"""The flash_mla build's own audit: the extension must carry exactly the pinned SASS (sm_90a) and no PTX.

A build whose arch flags were overridden (a user's TORCH_CUDA_ARCH_LIST, a
FlashMLA that ignores FLASH_MLA_DISABLE_SM100) would still import on a CPU
host and fail only on the GPU, or carry code for another arch; cuobjdump
tells before the wheel enters the cache.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import zipfile
from pathlib import Path

from ..errors import KtenvError
from .flash_mla_source import Pin

# cuobjdump -lelf/-lptx lines: "ELF file    1: cuda.1.sm_90a.cubin"
_CODE = re.compile(r"\b(ELF|PTX) file\s+\d+: \S*?\.(sm_\d+[af]?)\.(cubin|ptx)\b")


def _list_codes(cuobjdump: str, so: Path) -> tuple[list[str], list[str]]:
    """(SASS codes, PTX codes) in one shared object. A small twin of check/cuobjdump.list_codes, which the
    build stage may not import (it sits above build in the pipeline order)."""
    found: dict[str, set] = {"ELF": set(), "PTX": set()}
    for flag in ("-lelf", "-lptx"):
        try:
            p = subprocess.run([cuobjdump, flag, str(so)], capture_output=True, text=True, timeout=300)
        except OSError as e:
            raise KtenvError(f"cuobjdump ({cuobjdump}) does not run ({e}); the flash_mla build cannot be audited. "
                             "Set KTENV_CUOBJDUMP to a cuobjdump binary.") from None
        text = p.stdout + p.stderr
        if p.returncode and "No PTX file found" not in text and "No ELF file found" not in text:
            raise KtenvError(f"cuobjdump {flag} refused {so.name}: {' '.join(text.split())[-400:]}")
        for kind, code, _ in _CODE.findall(text):
            found[kind].add(code)
    return sorted(found["ELF"]), sorted(found["PTX"])


def audit_wheel(wheel: str | Path, pin: Pin, cuobjdump: str) -> dict:
    """The extension's SASS and PTX must be exactly the pin's SASS list (sm_90a), or KtenvError."""
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory(prefix="ktenv-flashmla-") as d:
        exts = [n for n in z.namelist() if re.fullmatch(r"flash_mla/cuda[^/]*\.so", n)]
        if len(exts) != 1:
            raise KtenvError(f"{Path(wheel).name} has {len(exts)} flash_mla/cuda*.so extensions, not one; it is not a "
                             "FlashMLA build ktenv knows.")
        sass, ptx = _list_codes(cuobjdump, Path(z.extract(exts[0], d)))
    if sass != sorted(pin.sass) or ptx:
        raise KtenvError(f"The flash_mla extension in {Path(wheel).name} carries SASS {sass or 'none'} and PTX "
                         f"{ptx or 'none'}, but ktenv builds exactly SASS {', '.join(pin.sass)} for Hopper "
                         "(check the arch flags in the build log).")
    return {"extension": exts[0], "sass": sass, "ptx": ptx, "cuobjdump": cuobjdump}
