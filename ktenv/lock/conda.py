"""The conda lock: envs/conda.toml solved per arch into lock/<arch>/conda-lock.yml,
with the PyPI layer (lock/<arch>/requirements.txt) as `manager: pip` entries.

Solving, indexing and installing conda packages is done by py-rattler (the
engine behind pixi), so no conda, mamba or micromamba executable is needed.
The lock is written in conda-lock's own format (version 1, the one
`conda-lock install` and `micromamba create -f` read: the conda packages, then
every PyPI package with `pip install --no-deps`), together with the
conda-lock inputs that reproduce it (`conda-environment.yml` and
`conda-virtual-packages.yml`, for `conda-lock --virtual-package-spec`).

A package both layers name (pip: conda-lock and micromamba need it in the
conda layer to install the pip entries, and the PyPI lock pins it because kt
doctor looks for it) comes from conda only, at the version the PyPI lock pins
(`{locked}` in envs/conda.toml): it is left out of the pip entries, and the
build's PyPI layer skips it (`pypi_layer`), so no file has two owners.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from ..errors import KtenvError, LockStale, ResolveError, SpecError
from .conda_pip import from_conda, pip_entries, pypi_layer, pypi_pin  # noqa: F401 (from_conda, pypi_layer: the build's)
from .rattler import RattlerFailure
from .rattler import call as _rattler

LOCK_FILE = "conda-lock.yml"
ENV_FILE = "conda-environment.yml"
VIRTUAL_FILE = "conda-virtual-packages.yml"
STAMP = ".ktenv-conda.json"
PLACEHOLDERS = ("python", "cuda", "locked")


@dataclass(frozen=True)
class CondaInputs:
    """Everything a conda lock for one arch depends on."""

    arch: str
    subdir: str
    channels: tuple[str, ...]
    specs: tuple[str, ...]
    virtual: dict[str, str]
    python: str
    cuda: str
    exclude_newer: str | None

    def digest(self) -> str:
        data = {
            "subdir": self.subdir,
            "channels": list(self.channels),
            "specs": list(self.specs),
            "virtual": dict(sorted(self.virtual.items())),
            "exclude_newer": self.exclude_newer,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _glibc_of(platform: str) -> str:
    # "x86_64-manylinux_2_35" -> "2.35": the wheels of the PyPI layer need
    # that glibc anyway, so the conda layer may assume it too.
    tag = platform.split("manylinux_", 1)
    if len(tag) != 2 or not all(p.isdigit() for p in tag[1].split("_")):
        raise SpecError(
            f"envs/stack.toml: platform {platform!r} carries no manylinux_X_Y tag, so ktenv cannot "
            "tell which glibc the conda lock may assume (__glibc). Use a tag like x86_64-manylinux_2_35."
        )
    return tag[1].replace("_", ".")


def _cuda_of(spec, arch) -> str:
    try:
        stack, need = Version(spec.stack.cuda), Version(arch.min_cuda or spec.stack.cuda)
    except InvalidVersion as e:
        raise SpecError(f"CUDA versions must look like 12.8: {e}.") from None
    if stack < need:
        raise SpecError(
            f"{arch.name} needs CUDA >= {arch.min_cuda} ({arch.source.name}: min_cuda), but the stack is "
            f"built for CUDA {spec.stack.cuda} (envs/stack.toml: cuda). A conda lock for {arch.name} "
            "would install an nvcc that cannot compile for this GPU. Raise `cuda` in envs/stack.toml "
            "(and torch_cuda with it) or lower min_cuda if the arch really works with the older CUDA."
        )
    return spec.stack.cuda


def load_inputs(spec, arch: str, python: str | None = None, stack_version: str | None = None,
                channel_url: str | None = None, exclude_newer: str | None = "stack",
                lock_dir: Path | str | None = None) -> CondaInputs:
    """Read envs/conda.toml and fill it in for one arch.

    `channel_url` replaces the channels of envs/conda.toml (a local mirror or
    test channel). `exclude_newer` is the solve's cut-off: "stack" (the
    default) takes the stack release's `exclude_newer`, None switches it off.
    `lock_dir` holds the PyPI lock `{locked}` reads (default lock/<arch>).
    """
    a = spec.arch(arch)
    path = Path(spec.root) / "conda.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found; the conda backend reads its package list from it.") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: malformed TOML: {e}. Fix the file and rerun.") from None
    unknown = set(data) - {"conda", "arch"}
    if unknown:
        raise SpecError(f"{path}: unknown top-level table(s) {', '.join(sorted(unknown))}; allowed: conda, arch.")
    conda = data.get("conda", {})
    unknown = set(conda) - {"channels", "subdir", "virtual", "packages"}
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} in [conda]; allowed: channels, subdir, virtual, packages.")
    for name in data.get("arch", {}):
        if name not in spec.archs:
            raise SpecError(f"{path}: [arch.{name}] names an arch that has no envs/{name}.toml.")
    virtual = {k: str(v) for k, v in conda.get("virtual", {}).items()}
    for fixed in ("__cuda", "__glibc"):
        if fixed in virtual:
            raise SpecError(
                f"{path}: [conda.virtual] sets {fixed}, which ktenv derives itself (__cuda from the arch's "
                "CUDA, __glibc from envs/stack.toml's manylinux tag) so that the conda and PyPI layers "
                "assume the same host. Remove it there and change envs/stack.toml or envs/sm*.toml instead."
            )
    cuda = _cuda_of(spec, a)
    virtual["__cuda"] = cuda
    virtual["__glibc"] = _glibc_of(spec.stack.platform)
    python = python or spec.stack.python[0]
    if python not in spec.stack.python:
        raise SpecError(f"Python {python} is not one the stack is built for ({', '.join(spec.stack.python)}; envs/stack.toml).")
    packages = dict(conda.get("packages", {}))
    packages.update(data.get("arch", {}).get(arch, {}).get("packages", {}))
    for needed, why in (("python", "the PyPI layer is installed into the conda prefix's python"),
                        ("pip", "`conda-lock install` and `micromamba create -f` install the lock's pip entries with it")):
        if needed not in packages:
            raise SpecError(f"{path}: [conda.packages] has no {needed}; {why}.")
    specs = []
    for name, version in sorted(packages.items()):
        locked = pypi_pin(spec, arch, lock_dir, name, path) if "{locked}" in str(version) else ""
        try:
            version = str(version).format(python=python, cuda=cuda, locked=locked)
        except (KeyError, IndexError, ValueError):
            raise SpecError(
                f"{path}: the spec of {name} ({version!r}) uses a placeholder other than "
                f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}."
            ) from None
        specs.append(name if version in ("", "*") else f"{name} {version}")
    if exclude_newer == "stack":
        exclude_newer = spec.stack.release(stack_version).exclude_newer
    channels = (channel_url,) if channel_url else tuple(conda.get("channels", ("conda-forge",)))
    return CondaInputs(a.name, conda.get("subdir", "linux-64"), channels, tuple(specs), virtual, python, cuda, exclude_newer)


def channel_to_url(channel: str) -> str:
    """conda's short names (conda-forge) -> a URL; paths -> file:// URLs."""
    if "://" in channel:
        return channel.rstrip("/")
    if channel.startswith("/") or channel.startswith("."):
        return Path(channel).resolve().as_uri()
    return f"https://conda.anaconda.org/{channel}"


# --- lock -------------------------------------------------------------------

def _yaml():
    try:
        import yaml
    except ImportError:
        raise KtenvError("The conda backend reads and writes conda-lock's YAML: pip install PyYAML.") from None
    return yaml


def solve(inputs: CondaInputs) -> list[dict]:
    """The packages rattler picks for these inputs, or a ResolveError that says why."""
    try:
        result = _rattler("solve", {
            "channels": [channel_to_url(c) for c in inputs.channels], "specs": list(inputs.specs),
            "virtual": inputs.virtual, "subdir": inputs.subdir, "exclude_newer": inputs.exclude_newer,
        })
    except RattlerFailure as e:
        raise _explain(inputs, e) from None
    return result["records"]


class ChannelUnreachable(ResolveError):
    """The channel could not be reached (network, DNS, proxy, a mirror down)."""


class CutoffExcluded(ResolveError):
    """The specs solve, but only with packages published after the cut-off."""


def _explain(inputs: CondaInputs, e: RattlerFailure) -> ResolveError:
    where = ", ".join(inputs.channels)
    if e.kind == "GatewayError" or "error sending request" in e.message:
        if any(s in e.message for s in ("error sending request", "dns error", "Connect", "timed out", "connection")):
            return ChannelUnreachable(
                f"Cannot reach the conda channel {where} from this machine: the network (or DNS, or a proxy) "
                f"is in the way, so nothing was solved and no lock was written. Fix the connection, or lock "
                f"against a mirror you can reach: build.py lock --arch {inputs.arch} --conda --channel URL "
                f"(with --exclude-newer none if the mirror's index carries no publication times).\n"
                f"rattler says:\n{e.message}")
        return ResolveError(f"The conda channel {where} answered, but not with a conda index (repodata): is it a "
                            f"conda channel URL (…/conda-forge, with linux-64/ and noarch/ below it)?\n{e.message}")
    if e.kind == "SolverError" and inputs.exclude_newer:
        # Solvable without the cut-off? Then the cut-off is what excluded it: name the packages.
        try:
            records = solve(CondaInputs(inputs.arch, inputs.subdir, inputs.channels, inputs.specs, inputs.virtual,
                                        inputs.python, inputs.cuda, None))
        except ResolveError:
            records = None
        if records is not None:
            late = sorted(f"{r['name']} {r['version']} ({r['timestamp'] or 'no publication time'})"
                          for r in records if not r.get("timestamp") or r["timestamp"] > _iso(inputs.exclude_newer))
            return CutoffExcluded(
                f"The conda packages of {inputs.arch} solve from {where}, but not with what was published before "
                f"the cut-off {inputs.exclude_newer}: the solution needs {', '.join(late) or 'packages published later'}. "
                "A local mirror indexed by rattler stamps every package with its indexing time, so nothing in it "
                "predates an older cut-off. Lift the cut-off for this lock (--exclude-newer none, or a later "
                "--exclude-newer DATE), or move the stack's exclude_newer in envs/stack.toml.")
    return ResolveError(
        f"The conda packages of {inputs.arch} cannot be solved from {where} for a host with "
        f"{_vp_text(inputs.virtual)}{f' (cut-off {inputs.exclude_newer})' if inputs.exclude_newer else ''}: "
        f"the specs contradict each other or the channel lacks a version they ask for.\nThe solver says:\n"
        f"{e.message}\nChange the specs in envs/conda.toml, or the CUDA/glibc the stack targets, and lock again.")


def _iso(stamp: str) -> str:
    from datetime import datetime, timezone

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(timezone.utc).isoformat()


def parse_exclude_newer(value: str | None) -> str | None:
    """`--exclude-newer`: None (flag absent) -> "stack"; "none" -> None; a date or time -> ISO 8601 UTC."""
    from datetime import datetime, timezone

    if value is None:
        return "stack"
    if value.lower() == "none":
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise KtenvError(f"--exclude-newer {value!r} is neither `none` nor a date (2026-11-20 or "
                         "2026-11-20T00:00:00Z).") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _vp_text(virtual: dict[str, str]) -> str:
    return ", ".join(f"{k} {virtual[k]}" for k in ("__cuda", "__glibc") if k in virtual)


def lock(spec, arch: str, out_dir: Path | str | None = None, channel_url: str | None = None,
         python: str | None = None, stack_version: str | None = None, exclude_newer: str | None = "stack",
         progress=print, offline: bool = False) -> Path:
    """Solve the arch's conda packages and write lock/<arch>/conda-lock.yml: the
    conda packages plus every package of the PyPI lock beside it as a pip entry
    (and the conda-lock inputs next to it). Returns the lock's path."""
    yaml = _yaml()
    out = Path(out_dir) if out_dir else Path(spec.root).parent / "lock" / arch
    if not (out / "requirements.txt").is_file():
        raise KtenvError(f"{out}/requirements.txt: no PyPI lock to put into the conda lock. Lock it first: "
                         f"python build.py lock --arch {arch}")
    inputs = load_inputs(spec, arch, python, stack_version, channel_url, exclude_newer, lock_dir=out)
    progress(f"conda: solving {len(inputs.specs)} specs for {arch} ({_vp_text(inputs.virtual)}) from {', '.join(inputs.channels)}")
    records = solve(inputs)
    packages = []
    for r in records:
        if not (r["md5"] and r["sha256"]):
            raise ResolveError(
                f"{r['url']}: the channel's index gives no md5 or no sha256 for this package. conda-lock files "
                "need the md5 and ktenv verifies both before installing; reindex the channel or pin another build."
            )
        packages.append({
            "name": r["name"], "version": r["version"], "manager": "conda", "platform": inputs.subdir,
            "dependencies": dict(sorted(r["dependencies"].items())), "url": r["url"],
            "hash": {"md5": r["md5"], "sha256": r["sha256"]}, "build": r["build"],
            "category": "main", "optional": False,
        })
    progress(f"conda: listing the files of {out / 'requirements.txt'} for Python {inputs.python} (pip entries)")
    pips = pip_entries(out, inputs.python, inputs.subdir, offline=offline)
    # A package both layers name comes from conda, at the PyPI lock's version.
    pins = {p["name"]: p["version"] for p in pips}
    both = {canonicalize_name(p["name"]): p["version"] for p in packages if canonicalize_name(p["name"]) in pins}
    differ = [f"{n} {v} (conda) vs {pins[n]} (PyPI lock)" for n, v in sorted(both.items()) if v != pins[n]]
    if differ:
        raise ResolveError(
            f"The conda layer and the PyPI lock both install {', '.join(differ)}; one file cannot have two owners "
            "at two versions. Pin it in envs/conda.toml to the PyPI lock's version (`=={locked}`), or drop it there.")
    pips = [p for p in pips if p["name"] not in both]
    digest = inputs.digest()
    req_sha = _sha256(out / "requirements.txt")
    doc = {
        "version": 1,
        "metadata": {
            "content_hash": {inputs.subdir: digest},
            "channels": [{"url": c, "used_env_vars": []} for c in inputs.channels],
            "platforms": [inputs.subdir],
            "sources": [ENV_FILE],
            "custom_metadata": {
                "ktenv_arch": arch, "ktenv_inputs": digest, "ktenv_python": inputs.python,
                "ktenv_cuda": inputs.cuda, "ktenv_stack": stack_version or spec.stack.default,
                "ktenv_exclude_newer": inputs.exclude_newer or "",
                "ktenv_exclude_newer_from": "stack" if exclude_newer == "stack" else ("none" if exclude_newer is None else "explicit"),
                "ktenv_solver": f"py-rattler {_rattler_version()}",
                "ktenv_requirements_sha256": req_sha,
            },
        },
        "package": packages + pips,
    }
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# conda lock for {arch}, written by ktenv (solved with py-rattler; conda-lock's format, version 1).\n"
        f"# Do not edit: `build.py lock --arch {arch} --conda` rewrites it from envs/conda.toml.\n"
        f"# Solved for a host with {_vp_text(inputs.virtual)}; the same solve with conda-lock itself:\n"
        f"#   conda-lock lock -f {ENV_FILE} --virtual-package-spec {VIRTUAL_FILE} -p {inputs.subdir} --lockfile {LOCK_FILE}\n"
        f"# content_hash is ktenv's input digest, not conda-lock's (conda-lock would relock on --check-input-hash).\n"
    )
    _write(out / LOCK_FILE, header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
    _write(out / ENV_FILE, yaml.safe_dump({
        "channels": list(inputs.channels), "platforms": [inputs.subdir], "dependencies": list(inputs.specs),
    }, sort_keys=False))
    _write(out / VIRTUAL_FILE, yaml.safe_dump({"subdirs": {inputs.subdir: {"packages": dict(sorted(inputs.virtual.items()))}}}, sort_keys=False))
    progress(f"conda: locked {len(packages)} conda packages and {len(pips)} pip packages -> {out / LOCK_FILE}")
    return out / LOCK_FILE


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def pip_packages(doc: dict) -> list[dict]:
    return [p for p in doc["package"] if p.get("manager") == "pip"]


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _rattler_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("py-rattler")
    except PackageNotFoundError:
        raise KtenvError("The conda backend needs py-rattler: pip install py-rattler.") from None


def read_lock(path: Path | str) -> dict:
    """Parse and sanity-check a conda-lock.yml; KtenvError with the reason if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise KtenvError(f"{path}: no conda lock. Write it with `python build.py lock --arch <arch> --conda`.")
    try:
        doc = _yaml().safe_load(path.read_text())
    except Exception as e:
        raise KtenvError(f"{path}: not readable YAML ({e}). Relock instead of editing the file.") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("package"), list):
        raise KtenvError(f"{path}: not a conda-lock version 1 file. Relock it with ktenv.")
    for p in doc["package"]:
        missing = [k for k in ("name", "version", "url", "platform") if not p.get(k)]
        h = p.get("hash") or {}
        # conda packages: md5 (conda-lock requires it) and sha256; pip entries: sha256.
        hashed = h.get("sha256") and (h.get("md5") or p.get("manager") == "pip")
        if missing or not hashed:
            raise KtenvError(
                f"{path}: the entry for {p.get('name', '?')} lacks {', '.join(missing) or 'an md5 and sha256'}. "
                "ktenv installs only hash-pinned packages; relock."
            )
    return doc


def check(spec, arch: str, lock_dir: Path | str | None = None, channel_url: str | None = None) -> dict:
    """Offline: raise LockStale unless the conda lock matches envs/ as it is now."""
    lock_dir = Path(lock_dir) if lock_dir else Path(spec.root).parent / "lock" / arch
    doc = read_lock(lock_dir / LOCK_FILE)
    meta = doc.get("metadata", {}).get("custom_metadata", {}) or {}
    # Relock with the same choices the lock was made with; only envs/ may differ.
    source = meta.get("ktenv_exclude_newer_from", "stack")
    cutoff = {"stack": "stack", "none": None}.get(source, meta.get("ktenv_exclude_newer") or None)
    inputs = load_inputs(spec, arch, meta.get("ktenv_python"), meta.get("ktenv_stack") or None, channel_url, cutoff,
                         lock_dir=lock_dir)
    req = lock_dir / "requirements.txt"
    if req.is_file() and meta.get("ktenv_requirements_sha256") != _sha256(req):
        raise LockStale(
            f"{lock_dir / LOCK_FILE} is out of date: its pip entries were made from another {req} (the PyPI lock "
            f"was relocked since). A conda-lock install from it would not be the PyPI lock's packages. Relock: "
            f"python build.py lock --arch {arch} --conda")
    if meta.get("ktenv_inputs") != inputs.digest():
        raise LockStale(
            f"{lock_dir / LOCK_FILE} is out of date: envs/conda.toml, the arch's CUDA, the stack's glibc or "
            f"cut-off, or the channel ({', '.join(inputs.channels)}) changed since it was written. Building "
            f"from it would install packages envs/ no longer asks for. Relock: python build.py lock --arch {arch} --conda"
        )
    return doc
