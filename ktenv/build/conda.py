"""The conda backend's own steps: the prefix and its Python from lock/<arch>/conda-lock.yml.

Only "make the prefix with its Python" differs between the backends; the
rest of a build (PyPI layer, kt-kernel, patches, payload, checks, stamp,
swap) is build/pipeline.py's, the same for both. What is conda-specific:

- every package is downloaded (or copied, for file:// channels) and checked
  against the lock's md5 and sha256 before anything is installed;
- py-rattler links them into the hidden build directory, but writes the
  FINAL prefix into every file that carries conda's prefix placeholder
  (`alternative_target_prefix`): conda prefixes are not relocatable, and the
  build is swapped into place with a rename;
- after the PyPI layer: no PyPI distribution may overwrite or remove a file a
  conda package installed (refused by name), and the console scripts uv wrote
  with the build directory in their shebang are pointed at the final prefix.
"""

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
from ..lock.conda import VIRTUAL_FILE, _yaml, channel_to_url
from ..lock.rattler import RattlerFailure
from ..lock.rattler import call as _rattler
from . import dists


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, md5: str, sha256: str) -> Path:
    """Download (or copy, for file://) one package and check both lock hashes.

    rattler checks sha256 on http(s) downloads but not on file:// channels,
    so ktenv checks every archive itself before handing it over."""
    if dest.is_file() and _digest(dest, "sha256") == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=120) as resp, tmp.open("wb") as f:
            shutil.copyfileobj(resp, f)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise KtenvError(
            f"Could not download {url}: {e}. The channel is unreachable from this machine (network, proxy or "
            "mirror down); nothing was installed. Fix the connection, or lock against a mirror you can reach "
            "(`build.py lock --conda --channel URL`) and build with the same --channel.") from None
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


def host_check(lock_dir: Path) -> None:
    """Refuse a host whose glibc or CUDA driver is older than the lock assumes."""
    vfile = lock_dir / VIRTUAL_FILE
    assumed: dict = {}
    if vfile.is_file():
        for sub in (_yaml().safe_load(vfile.read_text()) or {}).get("subdirs", {}).values():
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
                f"This host's {what} supports {host[name]}, but the conda lock in {lock_dir} was solved for "
                f"{name} {assumed[name]}: {harm}. {fix}, or build the environment on a host that has it."
            )


def conda_packages(doc: dict) -> list[dict]:
    return [p for p in doc["package"] if p.get("manager", "conda") == "conda"]


def fetch_all(doc: dict, cache: Path, progress) -> list[dict]:
    pkgs = conda_packages(doc)
    channels = [channel_to_url(c["url"]) for c in doc["metadata"].get("channels", [])]
    progress(f"conda: fetching {len(pkgs)} packages (checked against the lock's md5 and sha256)")
    fetched = []
    for p in pkgs:
        name = urllib.parse.urlsplit(p["url"]).path.rsplit("/", 1)[-1]
        # One folder per sha256: the same file name may come from two channels.
        path = _fetch(p["url"], cache / "downloads" / p["hash"]["sha256"][:16] / name, p["hash"]["md5"], p["hash"]["sha256"])
        channel = next((c for c in channels if p["url"].startswith(c + "/")), p["url"].rsplit("/", 2)[0])
        fetched.append({"path": str(path), "channel": channel, "url": p["url"]})
    return fetched


def install(fetched: list[dict], where: Path, final: Path, cache: Path, subdir: str, progress) -> None:
    """Link the fetched packages into `where`, with `final` written wherever a package carries the prefix."""
    progress(f"conda: linking {len(fetched)} packages (prefix {final})")
    try:
        _rattler("install", {"packages": fetched, "prefix": str(where), "final_prefix": str(final),
                             "cache": str(cache / "pkgs"), "subdir": subdir})
    except RattlerFailure as e:
        raise KtenvError(f"Installing the conda packages into {where} failed: {e.message}") from None
    # rattler records the local file it installed from; conda tools
    # (`conda list --explicit`) should see the channel URL the lock names.
    by_path = {Path(f["path"]).as_uri(): f["url"] for f in fetched}
    for meta in (where / "conda-meta").glob("*.json"):
        data = json.loads(meta.read_text())
        if data.get("url") in by_path:
            data["url"] = by_path[data["url"]]
            meta.write_text(json.dumps(data, indent=2) + "\n")


def check_python(where: Path, doc: dict, requested: str | None) -> str:
    """The prefix's python runs as this prefix and is the lock's version; returns X.Y."""
    python = where / "bin" / "python"
    want = next((p["version"] for p in conda_packages(doc) if p["name"] == "python"), None)
    if want is None:
        raise KtenvError("The conda lock has no python package; the PyPI layer has nothing to install into. Relock.")
    try:
        out = subprocess.run([str(python), "-c", "import sys; print(sys.prefix); print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True, timeout=120).stdout.split("\n")
    except (OSError, subprocess.SubprocessError) as e:
        raise KtenvError(f"{python} does not run ({e}); the conda python package is broken. Relock or report it.") from None
    if Path(out[0]).resolve() != where.resolve():
        raise KtenvError(
            f"{python} reports sys.prefix {out[0]}, not {where}: uv would install the PyPI layer into "
            "another environment. The python package in the conda lock is not a usable interpreter for this prefix."
        )
    if not want.startswith(out[1] + "."):
        raise KtenvError(f"{python} is Python {out[1]}, but the conda lock pins python {want}. Relock.")
    check_requested_python(requested, out[1], want)
    return out[1]


def check_requested_python(requested: str | None, have: str, pinned: str) -> None:
    """--python with the conda backend: the conda lock decides the interpreter; a different one is refused."""
    if not requested:
        return
    asked = requested
    if os.sep in requested or Path(requested).exists():
        proc = subprocess.run([requested, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True)
        asked = proc.stdout.strip() if proc.returncode == 0 else "(does not run)"
    if asked != have and not asked.startswith(have + "."):
        raise KtenvError(
            f"--python {requested} asks for Python {asked}, but with --backend conda the interpreter is the conda "
            f"lock's python ({pinned}). Relock for that Python (`build.py lock --arch <arch> --conda --python "
            f"{asked}`), or leave --python out.")


# --- after the PyPI layer ---------------------------------------------------------

def conda_files(where: Path) -> dict[str, str]:
    """Every file a conda package installed (relative to the prefix) -> that package's name."""
    out = {}
    for meta in sorted((where / "conda-meta").glob("*.json")):
        data = json.loads(meta.read_text())
        for f in data.get("files", []):
            out[os.path.normpath(f)] = data.get("name", meta.stem)
    return out


def _installer(dist) -> str:
    try:
        return (dist.dist_info / "INSTALLER").read_text().strip()
    except OSError:
        return ""


def check_no_overlap(where: Path, before: dict[str, str]) -> None:
    """Refuse, by name, a PyPI distribution that overwrote or removed a file of a conda package."""
    site = dists.site_packages(where)
    site_rel = os.path.relpath(site, where)
    owners: dict[str, str] = {}
    # conda's own Python packages (pip) carry a RECORD too, with INSTALLER "conda";
    # a PyPI install over them rewrites INSTALLER, so they are told apart by it.
    # Every dist-info, not one per name: a PyPI install over a conda package can
    # leave the conda one's emptied dist-info folder beside its own.
    pypi = [d for d in map(dists.dist_of, sorted(site.glob("*.dist-info"))) if _installer(d) != "conda"]
    for dist, path, _ in dists.record_entries(pypi):
        owners[os.path.normpath(os.path.join(site_rel, path))] = f"{dist.name} {dist.version}"
    clashes = sorted((p, before[p], owners[p]) for p in set(before) & set(owners))
    gone = sorted(p for p in before if not os.path.lexists(where / p) and p not in owners)
    if not clashes and not gone:
        return
    lines = [f"{p}: conda package {c}, overwritten by PyPI {d}" for p, c, d in clashes[:8]]
    lines += [f"{p}: conda package {before[p]}, removed by the PyPI layer" for p in gone[:8]]
    who = sorted({d.split()[0] for _, _, d in clashes})
    raise KtenvError(
        f"The PyPI layer would replace files of the conda layer ({len(clashes)} overwritten, {len(gone)} removed; "
        f"PyPI distributions: {', '.join(who) or 'see below'}):\n  " + "\n  ".join(lines)
        + "\nTwo package managers owning one file leave an env neither can repair. Take the package out of one "
        "layer: drop it from envs/conda.toml, or from the PyPI lock with a rule in envs/rules.toml, and relock. "
        "The previous env (if any) is untouched.")


def relocate_scripts(where: Path, final: Path) -> list[str]:
    """Console scripts uv wrote name the build directory's python: point them at the final prefix (RECORD follows)."""
    old, new = os.fsencode(str(where)), os.fsencode(str(final))
    site = dists.site_packages(where)
    changed: dict[dists.Dist, dict[Path, bytes]] = {}
    for dist, path, _ in dists.record_entries(dists.installed(site).values()):
        full = Path(os.path.normpath(site / path))
        if full.parent != where / "bin" or full.is_symlink() or not full.is_file():
            continue
        data = full.read_bytes()
        if old in data[:4096]:
            data = data.replace(old, new)
            dists.write_replacing(full, data)
            changed.setdefault(dist, {})[full] = data
    for dist, files in changed.items():
        dists.update_record(dist, files)
    return sorted(p.name for files in changed.values() for p in files)
