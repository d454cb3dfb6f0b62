"""The conda backend: build a prefix from lock/<arch>/conda-lock.yml, then put
the arch's PyPI lock on top with uv."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

from packaging.version import Version

from ..errors import KtenvError
from ..lock.conda import (
    LOCK_FILE,
    STAMP,
    VIRTUAL_FILE,
    _write,
    _yaml,
    channel_to_url,
    check,
)
from ..lock.rattler import RattlerFailure
from ..lock.rattler import call as _rattler
from ..tools import uv_bin


def _fetch(url: str, dest: Path, md5: str, sha256: str) -> Path:
    """Download (or copy, for file://) one package and check both lock hashes.

    rattler checks sha256 on http(s) downloads but not on file:// channels,
    so ktenv checks every archive itself before handing it over."""
    if not (dest.is_file() and _digest(dest, "sha256") == sha256):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        try:
            with urllib.request.urlopen(url) as resp, tmp.open("wb") as f:
                shutil.copyfileobj(resp, f)
        except OSError as e:
            raise KtenvError(f"Could not download {url}: {e}. Is the channel reachable from this machine?") from None
        got_sha, got_md5 = _digest(tmp, "sha256"), _digest(tmp, "md5")
        if got_sha != sha256 or got_md5 != md5:
            tmp.unlink()
            raise KtenvError(
                f"{url} does not match the lock: sha256 {got_sha} (lock: {sha256}), md5 {got_md5} (lock: {md5}). "
                "The channel now serves a different file under the same name, so installing it would not be "
                "the environment that was locked. Nothing was installed. If the change is expected, relock."
            )
        tmp.replace(dest)
    return dest


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _host_check(doc: dict, lock_path: Path) -> None:
    """Refuse a host whose glibc or CUDA driver is older than the lock assumes."""
    vp = _yaml().safe_load((lock_path.parent / VIRTUAL_FILE).read_text()) if (lock_path.parent / VIRTUAL_FILE).is_file() else None
    assumed = {}
    if vp:
        for sub in vp.get("subdirs", {}).values():
            assumed.update(sub.get("packages", {}))
    host = _rattler("detect", {})["virtual"]
    for name, what, harm, fix in (
        ("__glibc", "glibc", "its packages and the manylinux wheels of the PyPI layer need that glibc to load",
         "Use a newer OS (or a container) for this environment"),
        ("__cuda", "CUDA driver", "CUDA code built for it (torch's wheels, what nvcc compiles) will not run on an older driver",
         "Update the NVIDIA driver"),
    ):
        if name in assumed and name in host and Version(host[name]) < Version(str(assumed[name]).split()[0]):
            raise KtenvError(
                f"This host's {what} supports {host[name]}, but the conda lock {lock_path} was solved for "
                f"{name} {assumed[name]}: {harm}. {fix}, or build the environment on a host that has it."
            )


def _clear_prefix(prefix: Path) -> None:
    if not prefix.exists():
        return
    if (prefix / STAMP).is_file():
        shutil.rmtree(prefix)
    elif prefix.is_dir() and not any(prefix.iterdir()):
        return
    else:
        raise KtenvError(
            f"{prefix} exists and was not made by ktenv's conda backend (no {STAMP} in it). ktenv replaces "
            "the prefixes it builds, so it will not delete this one. Choose another --prefix or remove it yourself."
        )


def build_conda_prefix(spec, arch: str, prefix: Path | str, channel_url: str | None = None, progress=print,
                       *, lock_dir: Path | str | None = None, requirements: Path | str | None = None,
                       cache_dir: Path | str | None = None, index_url: str | None = None,
                       pypi_layer=None) -> Path:
    """Build the conda prefix of lock/<arch>/conda-lock.yml at `prefix`, then
    install the arch's PyPI lock into its python with `uv pip sync`.

    `channel_url` is the channel the lock was made against when it is not the
    one in envs/conda.toml (a mirror); packages always come from the URLs in
    the lock, checked against its md5 and sha256. `pypi_layer(python, prefix)`,
    if given, installs the PyPI layer instead of the plain `uv pip sync` (so a
    caller can add its own steps: patches, payload, kt-kernel). Returns the prefix."""
    lock_dir = Path(lock_dir) if lock_dir else Path(spec.root).parent / "lock" / arch
    lock_path = lock_dir / LOCK_FILE
    requirements = Path(requirements) if requirements else lock_dir / "requirements.txt"
    doc = check(spec, arch, lock_dir, channel_url)
    names = {p["name"] for p in doc["package"]}
    if "python" not in names:
        raise KtenvError(f"{lock_path} has no python package; the PyPI layer has nothing to install into. Relock.")
    if not requirements.is_file():
        raise KtenvError(f"{requirements}: no PyPI lock for {arch}. Write it first: python build.py lock --arch {arch}")
    _host_check(doc, lock_path)

    prefix = Path(prefix).resolve()
    cache = Path(cache_dir) if cache_dir else Path(os.environ.get("KTENV_CONDA_CACHE", Path.home() / ".cache" / "ktenv" / "conda"))
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    meta = doc["metadata"]
    channels = [channel_to_url(c["url"]) for c in meta.get("channels", [])]

    progress(f"conda: fetching {len(doc['package'])} packages (checked against the lock's md5 and sha256)")
    fetched = []
    for p in doc["package"]:
        name = urllib.parse.urlsplit(p["url"]).path.rsplit("/", 1)[-1]
        # One folder per sha256: the same file name may come from two channels.
        path = _fetch(p["url"], downloads / p["hash"]["sha256"][:16] / name, p["hash"]["md5"], p["hash"]["sha256"])
        channel = next((c for c in channels if p["url"].startswith(c + "/")), p["url"].rsplit("/", 2)[0])
        fetched.append({"path": str(path), "channel": channel, "url": p["url"]})

    _clear_prefix(prefix)
    prefix.mkdir(parents=True, exist_ok=True)
    # Written first: a prefix that has it but says "building" was interrupted
    # and is rebuilt from scratch next time.
    _write(prefix / STAMP, json.dumps({"state": "building", "arch": arch}) + "\n")
    progress(f"conda: installing into {prefix}")
    try:
        _rattler("install", {"packages": fetched, "prefix": str(prefix), "cache": str(cache / "pkgs"), "subdir": meta["platforms"][0]})
    except RattlerFailure as e:
        raise KtenvError(f"Installing the conda packages into {prefix} failed: {e.message}") from None
    _restore_urls(prefix, fetched)

    python = prefix / "bin" / "python"
    _check_python(python, prefix, doc)
    if pypi_layer is not None:
        progress("conda: installing the PyPI layer")
        pypi_layer(python, prefix)
    else:
        progress(f"conda: installing the PyPI layer ({requirements}) with uv")
        _uv_sync(python, prefix, requirements, index_url or spec.stack.index_url)
    _write(prefix / STAMP, json.dumps({
        "state": "complete", "arch": arch, "conda_lock": meta.get("content_hash"),
        "requirements_sha256": _digest(requirements, "sha256"),
    }, indent=2) + "\n")
    progress(f"conda: {arch} environment ready at {prefix}")
    return prefix


def _uv_sync(python: Path, prefix: Path, requirements: Path, index_url: str | None) -> None:
    cmd = [uv_bin(), "pip", "sync", "--python", str(python), "--require-hashes", str(requirements)]
    if index_url:
        cmd[3:3] = ["--index-url", index_url]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KtenvError(
            f"uv could not install the PyPI layer {requirements} into {prefix} (exit {proc.returncode}). "
            f"The conda packages are in place; fix the cause and rerun.\nuv says:\n{proc.stderr[-3000:]}"
        )


def _restore_urls(prefix: Path, fetched: list[dict]) -> None:
    # rattler records the local file it installed from; conda tools
    # (`conda list --explicit`) should see the channel URL the lock names.
    by_path = {Path(f["path"]).as_uri(): f["url"] for f in fetched}
    for meta in (prefix / "conda-meta").glob("*.json"):
        data = json.loads(meta.read_text())
        if data.get("url") in by_path:
            data["url"] = by_path[data["url"]]
            meta.write_text(json.dumps(data, indent=2) + "\n")


def _check_python(python: Path, prefix: Path, doc: dict) -> None:
    want = next(p["version"] for p in doc["package"] if p["name"] == "python")
    try:
        out = subprocess.run([str(python), "-c", "import sys; print(sys.prefix); print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError) as e:
        raise KtenvError(f"{python} does not run ({e}); the conda python package is broken. Relock or report it.") from None
    if Path(out[0]).resolve() != prefix:
        raise KtenvError(
            f"{python} reports sys.prefix {out[0]}, not {prefix}: uv would install the PyPI layer into "
            "another environment. The python package in the conda lock is not a usable interpreter for this prefix."
        )
    if not want.startswith(out[1] + "."):
        raise KtenvError(f"{python} is Python {out[1]}, but the conda lock pins python {want}. Rebuild the prefix.")
