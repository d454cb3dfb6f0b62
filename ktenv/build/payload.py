"""sgl-kernel's CUDA payload, materialized into the env when it is built.

The kvcache-ai sgl-kernel build is too large for PyPI's per-file limit, so its
CUDA objects travel as a tar.gz cut into parts, each part a `payload.part` in a
small package carried by a different wheel (kt-kernel, sglang-kt,
ktransformers, transformers-kt, accelerate-kt). `sgl_kernel/_payload_manifest.py`
lists the part modules in order, the archive's sha256 and each file's sha256;
`sgl_kernel/payload_runtime.py` joins and extracts them on first use, which
needs 4 GB of scratch and races when several server processes start at once.

Here the same work happens once, at build time: the parts are joined in a
stream (never written out whole), checked against ARCHIVE_SHA256, and the
files checked against their own hashes into a content-addressed cache
(~/.cache/ktenv/payload/<ARCHIVE_SHA256>/), then hard-linked into the env at
the first place the runtime loader looks
(sgl_kernel/_payload_cache/sgl-kernel-kt/<VERSION>/<sha[:16]>/). A second
env with the same payload (another arch, a rebuild) only links.
Finally probes/payload_probe.py asks the env's own loader where it would load
from, so the result is verified by the code that will use it.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from .. import probe
from ..errors import KtenvError
from ..tools import cache_dir
from .dists import Dist, installed, record_entries

MANIFEST = "sgl_kernel/_payload_manifest.py"
PART = "payload.part"
RUNTIME_DIR = ("sgl_kernel", "_payload_cache", "sgl-kernel-kt")
CARRIER_SUFFIX = "_sgl_kernel_payload"
BLOCK = 8 << 20


class PayloadError(KtenvError):
    """The sgl-kernel payload is missing, inconsistent or unusable."""


@dataclass(frozen=True)
class Manifest:
    version: str
    archive_sha256: str
    modules: tuple[str, ...]
    files: dict[str, str]
    binaries: dict[str, str]


def read_manifest(site: Path) -> Manifest | None:
    """The payload manifest of the env at site-packages `site`, or None if this stack has none.

    Read as data (literal assignments only), never imported: importing
    sgl_kernel runs its __init__, which needs torch and a CUDA driver.
    """
    path = site / MANIFEST
    if not path.is_file():
        return None
    values = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    try:
        return Manifest(
            version=str(values["VERSION"]),
            archive_sha256=str(values["ARCHIVE_SHA256"]),
            modules=tuple(values["PAYLOAD_MODULES"]),
            files=dict(values["FILES"]),
            binaries=dict(values.get("BINARIES", {})),
        )
    except KeyError as e:
        raise PayloadError(f"{path} lacks {e.args[0]}; this sgl-kernel payload format is not one ktenv knows. Report it with the file attached.") from None


def _owners(site: Path, dists: dict[str, Dist], top_levels: set[str]) -> dict[str, Dist]:
    """Which distribution's RECORD lists each of the given top-level names / paths."""
    out = {}
    for dist, path, _ in record_entries(dists.values()):
        for t in top_levels:
            if t not in out and (path == t or path.startswith(t + "/")):
                out[t] = dist
    return out


def expected_carrier(module: str, manifest_owner: str) -> str:
    """The distribution that should carry a part module, by the payload's naming.

    `<dist>_sgl_kernel_payload` travels in `<dist>` (ktransformers_sgl_kernel_payload
    in ktransformers); the core part travels with the manifest itself (kt-kernel).
    """
    if module.endswith(CARRIER_SUFFIX):
        return canonicalize_name(module[: -len(CARRIER_SUFFIX)])
    return manifest_owner


def carriers(site: Path, manifest: Manifest, dists: dict[str, Dist] | None = None) -> list[dict]:
    """Each part in manifest order: module, path, owning distribution. Raises PayloadError for a missing one."""
    dists = dists if dists is not None else installed(site)
    owners = _owners(site, dists, set(manifest.modules) | {MANIFEST})
    manifest_owner = owners[MANIFEST].name if MANIFEST in owners else "the distribution that installs sgl_kernel"
    out, missing = [], []
    for module in manifest.modules:
        part = site / module / PART
        if part.is_file():
            out.append({"module": module, "path": part, "distribution": owners[module].name if module in owners else None, "bytes": part.stat().st_size})
            continue
        dist = expected_carrier(module, manifest_owner)
        have = dists.get(dist)
        state = (f"{dist} {have.version} is installed but does not carry it (its version is out of step with "
                 f"{manifest_owner}, which wrote the manifest)") if have else f"{dist} is not installed"
        missing.append(f"`{module}` should come from the {dist} wheel, but {state}")
    if missing:
        raise PayloadError(
            f"sgl-kernel's CUDA payload ({manifest.version}) is split over {len(manifest.modules)} wheels and "
            f"{len(missing)} part(s) are missing: " + "; ".join(missing) + ". Without every part sgl_kernel cannot "
            "load its CUDA kernels (flash_ops, sm100 common_ops) and the server fails at start. The lock must "
            "contain all carriers at the versions released together; relock with `python build.py lock` from "
            "the stack root (ktransformers[sglang])."
        )
    return out


def cache_root() -> Path:
    return cache_dir() / "payload"


def runtime_dir(site: Path, manifest: Manifest) -> Path:
    """Where sgl_kernel/payload_runtime.py looks first for the extracted files."""
    return site.joinpath(*RUNTIME_DIR) / manifest.version / manifest.archive_sha256[:16]


class _Joined(io.RawIOBase):
    """The parts read back to back as one stream, hashed as they go by."""

    def __init__(self, paths: list[Path]):
        self._paths = list(paths)
        self._f = None
        self.digest = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            if self._f is None:
                if not self._paths:
                    return 0
                self._f = open(self._paths.pop(0), "rb")
            n = self._f.readinto(buf)
            if n:
                self.digest.update(memoryview(buf)[:n])
                self.bytes += n
                return n
            self._f.close()
            self._f = None

    def drain(self) -> None:
        buf = bytearray(BLOCK)
        while self.readinto(buf):
            pass


def _safe(name: str) -> bool:
    return not name.startswith("/") and ".." not in Path(name).parts


def _extract(parts: list[Path], manifest: Manifest, dest: Path) -> int:
    """Stream-extract the manifest's files into dest; verify archive and file hashes. Returns archive bytes."""
    stream = _Joined(parts)
    wanted = {n: h for n, h in manifest.files.items() if _safe(n)}
    if len(wanted) != len(manifest.files):
        raise PayloadError("The sgl-kernel payload manifest names files outside its own tree; refusing to extract it.")
    seen = set()
    with tarfile.open(fileobj=io.BufferedReader(stream, BLOCK), mode="r|gz") as tar:
        for member in tar:
            if member.name not in wanted or not member.isfile():
                continue
            out = dest / member.name
            out.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            src = tar.extractfile(member)
            with src, open(out, "wb") as f:
                for block in iter(lambda: src.read(BLOCK), b""):
                    h.update(block)
                    f.write(block)
            if h.hexdigest() != wanted[member.name]:
                raise PayloadError(f"{member.name} in the sgl-kernel payload does not match the sha256 its manifest records; the payload wheels are corrupt or mixed from different releases.")
            os.chmod(out, 0o444)  # hard-linked into envs: nobody should write through it
            seen.add(member.name)
    stream.drain()
    if stream.digest.hexdigest() != manifest.archive_sha256:
        raise PayloadError(
            f"The sgl-kernel payload parts joined give sha256 {stream.digest.hexdigest()[:16]}…, but the manifest expects "
            f"{manifest.archive_sha256[:16]}…. The carrier wheels are from different releases; relock so they are released together."
        )
    missing = sorted(set(wanted) - seen)
    if missing:
        raise PayloadError(f"The sgl-kernel payload archive lacks {', '.join(missing)}, which its manifest lists.")
    return stream.bytes


def _cached(entry: Path, manifest: Manifest) -> dict | None:
    try:
        info = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("files") != manifest.files:
        return None
    sizes = info.get("sizes", {})
    for name in manifest.files:
        p = entry / name
        if not p.is_file() or p.stat().st_size != sizes.get(name):
            return None
    return info


def _fill_cache(parts: list[Path], manifest: Manifest, root: Path, progress) -> tuple[Path, bool]:
    """The cache entry for this archive, extracting it if needed. Returns (entry, was_hit)."""
    root.mkdir(parents=True, exist_ok=True)
    entry = root / manifest.archive_sha256
    if _cached(entry, manifest):
        return entry, True
    with open(root / f".{manifest.archive_sha256[:16]}.lock", "a+b") as lockf:
        fcntl.flock(lockf.fileno(), fcntl.LOCK_EX)  # another build may be extracting the same payload
        if _cached(entry, manifest):
            return entry, True
        for stale in root.glob(f".tmp-{manifest.archive_sha256[:16]}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a build killed mid-extraction
        if entry.exists():
            shutil.rmtree(entry)  # incomplete or damaged: rebuilt below
        tmp = root / f".tmp-{manifest.archive_sha256[:16]}-{os.getpid()}"
        tmp.mkdir()
        try:
            progress(f"payload: extracting sgl-kernel {manifest.version} CUDA objects ({len(parts)} parts) into {root}")
            n = _extract(parts, manifest, tmp)
            sizes = {name: (tmp / name).stat().st_size for name in manifest.files}
            info = {"version": manifest.version, "archive_sha256": manifest.archive_sha256, "archive_bytes": n, "files": manifest.files, "sizes": sizes}
            (tmp / "manifest.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry, False


def verify_parts(parts: list[Path], manifest: Manifest) -> None:
    """The joined parts must hash to ARCHIVE_SHA256 (a cheap ~0.3 s check that the carriers belong together)."""
    stream = _Joined(parts)
    stream.drain()
    if stream.digest.hexdigest() != manifest.archive_sha256:
        raise PayloadError(
            f"The sgl-kernel payload parts installed in this env join to sha256 {stream.digest.hexdigest()[:16]}…, "
            f"not the {manifest.archive_sha256[:16]}… the manifest expects: the carrier wheels come from different "
            "releases. Relock so that kt-kernel, sglang-kt, ktransformers, transformers-kt and accelerate-kt are released together."
        )


def materialize(site: Path, cache: Path | None = None, progress=lambda msg: None) -> dict:
    """Put the verified payload into the env at `site` (site-packages). Returns what was done."""
    t0 = time.monotonic()
    manifest = read_manifest(site)
    if manifest is None:
        return {"present": False}
    parts = carriers(site, manifest)
    paths = [p["path"] for p in parts]
    cache = cache or cache_root()
    entry, hit = _fill_cache(paths, manifest, cache, progress)
    if hit:
        verify_parts(paths, manifest)
    dest = runtime_dir(site, manifest)
    if dest.exists():
        shutil.rmtree(dest)
    mode = "hardlink"
    for name in sorted(manifest.files):
        src, out = entry / name, dest / name
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, out)
        except OSError:
            # another filesystem than the cache, or links refused: a copy works anywhere
            shutil.copyfile(src, out)
            os.chmod(out, 0o444)
            mode = "copy"
    return {
        "present": True,
        "version": manifest.version,
        "archive_sha256": manifest.archive_sha256,
        "parts": [{"module": p["module"], "distribution": p["distribution"], "bytes": p["bytes"]} for p in parts],
        "files": sorted(manifest.files),
        "bytes": sum((entry / n).stat().st_size for n in manifest.files),
        "cache": str(entry),
        "cache_hit": hit,
        "placed_by": mode,
        "dir": str(dest),
        "seconds": round(time.monotonic() - t0, 2),
    }


def verify_in_env(env_python: Path, site: Path, timeout: float = 300) -> dict:
    """Ask the env's own sgl_kernel loader where it loads the payload from; it must be the packaged copy."""
    manifest = read_manifest(site)
    if manifest is None:
        return {"present": False}
    run = probe.run(env_python, "payload_probe.py", [str(site)], timeout=timeout)
    if run.result is None:
        raise PayloadError(f"The payload probe {run.why}")
    result = run.result
    expected = runtime_dir(site, manifest)
    if not result.get("ok") or Path(result.get("root", "")).resolve() != expected.resolve():
        raise PayloadError(
            f"sgl_kernel's loader in this env would not use the payload ktenv placed in {expected}: "
            f"{result.get('error') or 'it chose ' + str(result.get('root'))}. The first server start would extract "
            "1.3 GB again (needing 4 GB free where it lands). Free space on the env's filesystem or report this."
        )
    return result
