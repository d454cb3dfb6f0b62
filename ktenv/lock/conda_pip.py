"""The PyPI layer as `manager: pip` entries of a conda-lock file.

conda-lock's format carries PyPI packages beside the conda ones (name,
version, the URL of one artifact and its sha256); `conda-lock install` and
`micromamba create -f` install them with `pip install --no-deps`. So that the
conda lock alone gives the whole environment, every package of
lock/<arch>/requirements.txt becomes such an entry, except one the conda layer
provides itself (pip, pinned in envs/conda.toml to the PyPI lock's version
with `{locked}`: `pypi_pin`, `from_conda`, and `pypi_layer` for the build).

Which artifact: requirements.txt pins every file of a release by hash, but a
pip entry names one. uv lists the files of each pinned release that install on
the lock's Python and platform (`uv pip compile --format pylock.toml`, same
index and cut-off as the PyPI lock); ktenv takes the wheel whose tags come
first in the interpreter's priority order (what pip would pick), an sdist only
where no wheel fits, and refuses a file whose sha256 requirements.txt does not
list.
"""

from __future__ import annotations

import subprocess
import tempfile
import tomllib
from pathlib import Path

from packaging import tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from ..errors import KtenvError, ResolveError, SpecError
from ..tools import uv_bin
from . import model


def platform_tags(platform: str) -> list[str]:
    """x86_64-manylinux_2_35 -> manylinux_2_35_x86_64 ... manylinux_2_5_x86_64, the legacy aliases, linux_x86_64."""
    arch, _, tag = platform.partition("-")
    major, minor = (int(x) for x in tag.split("_")[1:3])
    out = []
    for m in range(minor, 4, -1):
        out.append(f"manylinux_{major}_{m}_{arch}")
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(m)
        if legacy and major == 2:
            out.append(f"{legacy}_{arch}")
    return out + [f"linux_{arch}"]


def tag_priority(python: str, platform: str) -> dict[tags.Tag, int]:
    """Every tag a CPython `python` on `platform` accepts -> its rank (0 = most preferred)."""
    version = tuple(int(x) for x in python.split("."))
    plats = platform_tags(platform)
    order = list(tags.cpython_tags(version, platforms=plats))
    order += list(tags.compatible_tags(version, interpreter=f"cp{version[0]}{version[1]}", platforms=plats))
    return {t: i for i, t in enumerate(dict.fromkeys(order))}


def _pick(pkg: dict, rank: dict, hashes: set[str]) -> tuple[str, str, str]:
    """(url, sha256, kind) of the best file of one pylock package whose sha256 the PyPI lock lists."""
    best = None
    for w in pkg.get("wheels", []):
        sha = (w.get("hashes") or {}).get("sha256", "")
        url = w.get("url") or Path(w["path"]).resolve().as_uri()
        name = url.rsplit("/", 1)[-1]
        try:
            wheel_tags = parse_wheel_filename(name)[3]
        except ValueError:
            continue
        r = min((rank[t] for t in wheel_tags if t in rank), default=None)
        if r is not None and sha in hashes and (best is None or r < best[0]):
            best = (r, url, sha, "wheel")
    if best:
        return best[1:]
    sdist = pkg.get("sdist")
    if sdist and (sdist.get("hashes") or {}).get("sha256", "") in hashes:
        return sdist.get("url") or Path(sdist["path"]).resolve().as_uri(), sdist["hashes"]["sha256"], "sdist"
    raise ResolveError(
        f"{pkg['name']} {pkg['version']}: no file the PyPI lock vouches for installs on this Python and platform "
        "(no wheel whose tags fit and whose sha256 requirements.txt lists, and no such sdist). The conda lock's "
        "pip entry would name a file the uv backend never installs. Relock the PyPI layer (build.py lock) first.")


def pylock(requirements: Path, python: str, platform: str, index_url: str | None, exclude_newer: str | None,
           offline: bool = False) -> dict:
    """uv's view of the files of every pinned release, for one Python and platform."""
    with tempfile.TemporaryDirectory(prefix="ktenv-pylock-") as d:
        out = Path(d) / "pylock.toml"
        cmd = [uv_bin(), "pip", "compile", str(requirements), "--format", "pylock.toml", "--no-deps", "--quiet",
               "--python-version", python, "--python-platform", platform, "--no-header", "-o", str(out)]
        if index_url:
            cmd += ["--index-url", index_url]
        if exclude_newer:
            cmd += ["--exclude-newer", exclude_newer]
        if offline:
            cmd += ["--offline"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_uv_env())
        if proc.returncode != 0:
            err = proc.stderr.strip()[-2000:]
            if any(s in err for s in ("Failed to fetch", "dns error", "Could not connect", "tcp connect", "error sending request")):
                raise ResolveError(
                    f"Cannot reach the package index ({index_url or 'from requirements.txt'}) to list the files of "
                    f"{requirements}: the network is unreachable from here. The conda lock's pip entries need each "
                    f"file's URL. Fix the connection (or rerun with --offline if uv's cache has them).\nuv says:\n{err}")
            raise ResolveError(f"uv could not list the files of {requirements} for Python {python} on {platform}:\n{err}")
        return tomllib.loads(out.read_text())


def _uv_env() -> dict:
    import os

    env = dict(os.environ)
    env.update(UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")
    env.pop("VIRTUAL_ENV", None)
    return env


def pip_entries(lock_dir: Path, python: str, subdir: str, offline: bool = False) -> list[dict]:
    """conda-lock `manager: pip` entries for every package of lock_dir's PyPI lock, for one Python."""
    lock = model.read(lock_dir)
    if python not in lock.python:
        raise KtenvError(f"The PyPI lock in {lock_dir} was made for Python {' or '.join(lock.python)}, not {python}; "
                         f"the conda lock's python must be one of them. Relock with --python {lock.python[0]}.")
    lock.check_hash()
    hashes = {e.name: {h.split(":", 1)[1] for h in e.hashes} for e in lock.entries()}
    pins = {e.name: e.version for e in lock.entries()}
    doc = pylock(lock.requirements, python, lock.platform, lock.inputs.get("index_url") or _index_of(lock_dir),
                 lock.exclude_newer, offline)
    rank = tag_priority(python, lock.platform)
    out = []
    for pkg in doc.get("packages", []):
        name = canonicalize_name(pkg["name"])
        if pins.get(name) != pkg["version"]:
            raise ResolveError(f"uv listed {name} {pkg['version']}, but the PyPI lock pins {pins.get(name)}. Relock both.")
        url, sha, kind = _pick(pkg, rank, hashes.get(name, set()))
        out.append({
            "name": name, "version": pkg["version"], "manager": "pip", "platform": subdir,
            "dependencies": {}, "url": url, "hash": {"sha256": sha}, "category": "main", "optional": False,
        })
    missing = sorted(set(pins) - {p["name"] for p in out} - _not_for(lock, python))
    if missing:
        raise ResolveError(f"uv listed no files for {', '.join(missing)} of {lock.requirements}; the conda lock would "
                           "lack them. Relock the PyPI layer (build.py lock) and then the conda lock.")
    return sorted(out, key=lambda p: p["name"])


def _index_of(lock_dir: Path) -> str | None:
    text = (lock_dir / model.METADATA).read_text()
    return tomllib.loads(text).get("index_url")


def _not_for(lock, python: str) -> set[str]:
    """Pinned packages whose marker excludes this Python (they have no entry, rightly)."""
    from packaging.markers import Marker

    env = {"python_version": python, "python_full_version": python + ".0", "sys_platform": "linux",
           "platform_machine": lock.platform.split("-")[0], "platform_system": "Linux", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    return {e.name for e in lock.entries() if e.marker and not Marker(e.marker).evaluate(env)}


# --- a package both layers name (pip) -----------------------------------------------

def pypi_pin(spec, arch: str, lock_dir, name: str, path: Path) -> str:
    """The version the PyPI lock pins for `name` (the `{locked}` placeholder)."""
    lock_dir = Path(lock_dir) if lock_dir else Path(spec.root).parent / "lock" / arch
    req = lock_dir / "requirements.txt"
    if not req.is_file():
        raise KtenvError(f"{path}: the spec of {name} is `{{locked}}`, the version {req} pins, and there is no such "
                         f"file. Lock the PyPI layer first: python build.py lock --arch {arch}")
    pins = {e.name: e.version for e in model.parse_requirements(req.read_text())}
    if canonicalize_name(name) not in pins:
        raise SpecError(f"{path}: the spec of {name} is `{{locked}}`, but {req} pins no {name}. Give it a version "
                        "of its own, or add it to the PyPI layer's roots (envs/stack.toml).")
    return pins[canonicalize_name(name)]


def from_conda(doc: dict, requirements: Path) -> dict[str, str]:
    """The PyPI lock's packages the conda layer provides: {name: version} (the same in both)."""
    pins = {e.name: e.version for e in model.parse_requirements(requirements.read_text())}
    return {canonicalize_name(p["name"]): p["version"] for p in doc["package"]
            if p.get("manager") == "conda" and canonicalize_name(p["name"]) in pins}


def pypi_layer(doc: dict, requirements: Path) -> str:
    """requirements.txt without the packages the conda layer provides: what uv installs on top."""
    skip = from_conda(doc, requirements)
    out, keep = [], True
    for line in requirements.read_text().splitlines(keepends=True):
        if line.strip() and not line.startswith((" ", "#", "-")):  # an entry's first line
            keep = canonicalize_name(model.ENTRY.match(line.strip()).group(1)) not in skip
        elif not line.startswith(" "):  # a header comment: not part of an entry
            keep = True
        if keep:
            out.append(line)
    return "".join(out)
