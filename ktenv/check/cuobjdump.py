"""NVIDIA's cuobjdump: which SASS and PTX each binary carries, cached by content.

cuobjdump comes from PyPI (nvidia-cuda-cuobjdump, a ktenv dependency; or a
small tool venv under ktenv's cache), a CUDA toolkit on PATH, or
$KTENV_CUOBJDUMP. The CUDA 13 tool reads CUDA 12 fatbins (compressed ones
included); nvidia-cuda-cuobjdump-cu12 is not published.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import KtenvError
from ..tools import cache_dir, uv_bin

CUOBJDUMP_REQ = "nvidia-cuda-cuobjdump==13.5.37"
CUOBJDUMP_HASHES = (
    "sha256:31c582f5ef4d5eeb86e08dcd30b48031e4892140f523145ba18edd3a6375be43",
    "sha256:38780fee50863252a0b8926357faa91615ca1c8346490563f33a06100cd73f58",
    "sha256:b65a561d917fb5e42ff53080b995208f2dba17498964f70aa1d8c48ec5feaba4",
    "sha256:f48e3148535365161a268547b285fd01d92c80e4b457275375933825b5fc26b2",
)
# Files are hashed and listed on os.cpu_count() threads (cuobjdump runs in a child).
WORKERS = os.cpu_count() or 2
BINARY = re.compile(r"\.(so(\.\d+)*|cubin|fatbin)$")
CODE = re.compile(r"\b(ELF|PTX) file\s+\d+: \S*?\.(sm_\d+[af]?)\.(cubin|ptx)\b")


class AuditError(KtenvError):
    """cuobjdump is missing or refuses a file."""


def _find_in(root: Path) -> Path | None:
    hits = sorted(root.glob("**/nvidia/*/bin/cuobjdump")) + sorted(root.glob("**/nvidia/cuda_cuobjdump/bin/cuobjdump"))
    return hits[0] if hits else None


def find_cuobjdump(install: bool = True) -> tuple[str, str]:
    """(path, where it came from). Installs the pinned wheel into a tool venv if needed."""
    env = os.environ.get("KTENV_CUOBJDUMP")
    if env:
        if not os.access(env, os.X_OK):
            raise AuditError(f"KTENV_CUOBJDUMP={env} is not an executable file. Unset it to let ktenv install "
                             f"{CUOBJDUMP_REQ} from PyPI, or point it at a cuobjdump binary.")
        return env, "$KTENV_CUOBJDUMP"
    for entry in sys.path:  # installed as a ktenv dependency
        found = sorted(Path(entry).glob("nvidia/*/bin/cuobjdump")) if entry else []
        if found:
            return str(found[0]), f"ktenv's environment ({entry})"
    on_path = shutil.which("cuobjdump")
    if on_path:  # a CUDA toolkit's (nix develop gives cudaPackages.cuda_cuobjdump)
        return on_path, f"PATH ({on_path})"
    venv = cache_dir() / "tools" / CUOBJDUMP_REQ.replace("==", "-")
    hit = _find_in(venv)
    if hit:
        return str(hit), f"tool venv {venv}"
    if not install:
        raise AuditError(f"No cuobjdump: ktenv installs {CUOBJDUMP_REQ} into {venv} on first use.")
    uv = uv_bin()
    reqs = venv.parent / f"{venv.name}.txt"
    venv.parent.mkdir(parents=True, exist_ok=True)
    reqs.write_text(CUOBJDUMP_REQ + " " + " ".join(f"--hash={h}" for h in CUOBJDUMP_HASHES) + "\n")
    for cmd in ([uv, "venv", "--quiet", str(venv)],
                [uv, "pip", "install", "--quiet", "--require-hashes", "--python", str(venv / "bin" / "python"), "-r", str(reqs)]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise AuditError(f"Installing {CUOBJDUMP_REQ} (NVIDIA's fat-binary lister) into {venv} failed: "
                             f"{p.stderr.strip()[-600:]}. The audit needs it once; check that PyPI is reachable, or set "
                             "KTENV_CUOBJDUMP to an existing cuobjdump.")
    hit = _find_in(venv)
    if not hit:
        raise AuditError(f"{CUOBJDUMP_REQ} installed into {venv} but has no bin/cuobjdump; the wheel's layout changed. "
                         "Set KTENV_CUOBJDUMP to a cuobjdump binary.")
    return str(hit), f"tool venv {venv} (installed now)"


def tool_version(cuobjdump: str) -> str:
    out = subprocess.run([cuobjdump, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def parse_listing(text: str) -> dict:
    """cuobjdump -lelf / -lptx output -> {"sass": {code: count}, "ptx": {code: count}}."""
    out: dict = {"sass": {}, "ptx": {}}
    for kind, code, _ in CODE.findall(text):
        key = "sass" if kind == "ELF" else "ptx"
        out[key][code] = out[key].get(code, 0) + 1
    return out


def list_codes(cuobjdump: str, path: Path) -> dict:
    """SASS and PTX targets in one file. device_code False when it has none."""
    result: dict = {"sass": {}, "ptx": {}, "device_code": False}
    flags = ["-lelf"] if path.suffix == ".cubin" else ["-lelf", "-lptx"]
    for flag in flags:
        p = subprocess.run([cuobjdump, flag, str(path)], capture_output=True, text=True)
        text = p.stdout + p.stderr
        if "does not contain device code" in text:
            return result
        if p.returncode and "No PTX file found" not in text and "No ELF file found" not in text:
            result["error"] = " ".join(text.split())[-400:]
            return result
        part = parse_listing(text)
        for k in ("sass", "ptx"):
            result[k].update(part[k])
    result["device_code"] = bool(result["sass"] or result["ptx"])
    return result


class Cache:
    """sha256 -> listing, plus (device, inode, size, mtime) -> sha256 so unchanged files are not re-hashed."""

    def __init__(self, path: Path):
        self.path = path
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        self.listings: dict = data.get("listings", {})
        self.hashes: dict = data.get("hashes", {})
        self.hits = self.misses = 0

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        if key not in self.hashes:
            with open(path, "rb") as f:
                self.hashes[key] = hashlib.file_digest(f, "sha256").hexdigest()
        return self.hashes[key]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"listings": self.listings, "hashes": self.hashes}))
        os.replace(tmp, self.path)


def scan(roots: list[Path], cuobjdump: str, cache: Cache, workers: int = WORKERS) -> tuple[list[dict], dict]:
    """Every binary under roots with its listing. Returns (entries, timings)."""
    t0 = time.monotonic()
    files, seen = [], set()
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = Path(dirpath, n)
                if BINARY.search(n) and not p.is_symlink() and p.is_file():
                    real = p.resolve()
                    if real not in seen:
                        seen.add(real)
                        files.append(p)
    t1 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(cache.sha256, files))
    t2 = time.monotonic()
    todo = sorted({(d, f) for d, f in zip(digests, files) if d not in cache.listings}, key=lambda x: str(x[1]))
    todo = list({d: f for d, f in todo}.items())
    cache.hits, cache.misses = len(files) - len(todo), len(todo)

    def one(item):
        d, f = item
        cache.listings[d] = list_codes(cuobjdump, f)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, todo))
    t3 = time.monotonic()
    entries = [{"path": str(f), "bytes": f.stat().st_size, "sha256": d, **cache.listings[d]} for d, f in zip(digests, files)]
    return entries, {"files": len(files), "walk_s": round(t1 - t0, 1), "hash_s": round(t2 - t1, 1),
                     "cuobjdump_s": round(t3 - t2, 1), "listed": len(todo), "cached": len(files) - len(todo)}
