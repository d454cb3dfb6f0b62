"""The conda layer: lock envs/conda.toml per arch, build a conda prefix from
the lock, then put the arch's PyPI lock on top with uv.

Solving, indexing and installing conda packages is done by py-rattler (the
engine behind pixi), so no conda, mamba or micromamba executable is needed.
The lock is written in conda-lock's own format (version 1, the one
`conda-lock install` and `micromamba create -f` read), together with the
conda-lock inputs that reproduce it (`conda-environment.yml` and
`conda-virtual-packages.yml`, for `conda-lock --virtual-package-spec`).

py-rattler runs Rust worker threads that can crash the interpreter when it
shuts down (an abort in PyGILState_Release, about one run in ten here), so
every rattler call runs in a child process that leaves with os._exit; the
caller only sees JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from .errors import KtenvError, LockStale, ResolveError, SpecError
from .tools import uv_bin

LOCK_FILE = "conda-lock.yml"
ENV_FILE = "conda-environment.yml"
VIRTUAL_FILE = "conda-virtual-packages.yml"
STAMP = ".ktenv-conda.json"
PLACEHOLDERS = ("python", "cuda")


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
                channel_url: str | None = None, exclude_newer: str | None = "stack") -> CondaInputs:
    """Read envs/conda.toml and fill it in for one arch.

    `channel_url` replaces the channels of envs/conda.toml (a local mirror or
    test channel). `exclude_newer` is the solve's cut-off: "stack" (the
    default) takes the stack release's `exclude_newer`, None switches it off.
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
    if "python" not in packages:
        raise SpecError(f"{path}: [conda.packages] has no python; the PyPI layer is installed into the conda prefix's python.")
    specs = []
    for name, version in sorted(packages.items()):
        try:
            version = str(version).format(python=python, cuda=cuda)
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


# --- the rattler worker -----------------------------------------------------

def _rattler(op: str, payload: dict) -> dict:
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", "from ktenv.conda import _worker_main; _worker_main()", op],
        input=json.dumps(payload), capture_output=True, text=True, env=env,
    )
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise KtenvError(
            f"The conda worker (py-rattler, step {op!r}) died without an answer (exit {proc.returncode}). "
            f"Its output:\n{(proc.stderr or proc.stdout)[-3000:]}\nThat is a crash inside py-rattler; rerun, and "
            "report it with this output if it happens again."
        ) from None
    if "error" in answer:
        kind, message = answer["error"]["kind"], answer["error"]["message"]
        if kind in ("ModuleNotFoundError", "ImportError"):
            raise KtenvError(
                f"The conda backend needs py-rattler, which {sys.executable} cannot import ({message}). "
                "Install it into the Python that runs ktenv: pip install py-rattler"
            )
        raise _RattlerFailure(op, kind, message)
    return answer["result"]


class _RattlerFailure(KtenvError):
    def __init__(self, op: str, kind: str, message: str):
        super().__init__(f"py-rattler failed at step {op!r} ({kind}): {message}")
        self.kind, self.message = kind, message


def _worker_main() -> None:
    op = sys.argv[1]
    try:
        import asyncio

        result = asyncio.run(_WORKER_OPS[op](json.loads(sys.stdin.read())))
        out = {"result": result}
    except Exception as e:  # every failure goes back to the parent as data
        out = {"error": {"kind": type(e).__name__, "message": str(e)}}
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)


async def _op_index(p: dict) -> dict:
    from rattler.index import index_fs

    root = Path(p["channel"])
    (root / "noarch").mkdir(parents=True, exist_ok=True)  # conda channels always have noarch
    await index_fs(root, write_zst=False, write_shards=False, force=p.get("force", False))
    return {}


def _record_dict(r) -> dict:
    from rattler import MatchSpec

    deps: dict[str, list[str]] = {}
    for d in r.depends:
        m = MatchSpec(d)
        deps.setdefault(m.name.normalized, [])
        if m.version is not None:
            deps[m.name.normalized].append(str(m.version))
    return {
        "name": r.name.normalized, "version": str(r.version), "build": str(r.build), "subdir": r.subdir,
        "url": r.url, "file_name": r.file_name, "channel": r.channel,
        "md5": r.md5.hex() if r.md5 else None, "sha256": r.sha256.hex() if r.sha256 else None,
        "dependencies": {k: ",".join(v) for k, v in deps.items()}, "depends": list(r.depends),
    }


async def _op_solve(p: dict) -> dict:
    import datetime

    import rattler
    from rattler import BuildString, GenericVirtualPackage, PackageName

    virtual = []
    for name, value in p["virtual"].items():
        version, _, build = value.partition(" ")
        virtual.append(GenericVirtualPackage(PackageName(name), rattler.Version(version), BuildString(build or "0")))
    cutoff = None
    if p.get("exclude_newer"):
        cutoff = datetime.datetime.fromisoformat(p["exclude_newer"].replace("Z", "+00:00"))
    records = await rattler.solve(
        p["channels"], p["specs"], platforms=[p["subdir"], "noarch"], virtual_packages=virtual,
        exclude_newer=cutoff, timestamp_policy="allow-missing",
    )
    return {"records": sorted((_record_dict(r) for r in records), key=lambda r: r["name"])}


async def _op_install(p: dict) -> dict:
    import rattler
    from rattler import RepoDataRecord

    records = []
    for item in p["packages"]:
        # The metadata comes from the (hash-checked) archive itself, as with
        # micromamba: the lock carries no noarch type or build number.
        rec = await RepoDataRecord.from_package_archive(item["path"])
        rec.url = Path(item["path"]).as_uri()
        rec.channel = item["channel"]
        records.append(rec)
    await rattler.install(
        records, p["prefix"], cache_dir=p["cache"], installed_packages=[], show_progress=False,
        execute_link_scripts=False, platform=rattler.Subdir(p["subdir"]),
    )
    return {"installed": len(records)}


async def _op_detect(p: dict) -> dict:
    from rattler import VirtualPackage, VirtualPackageOverrides

    found = {}
    for vp in VirtualPackage.detect(VirtualPackageOverrides.from_env()):
        g = vp.into_generic()
        found[g.name.normalized] = str(g.version)
    return {"virtual": found}


_WORKER_OPS = {"index": _op_index, "solve": _op_solve, "install": _op_install, "detect": _op_detect}


def index_channel(path: Path | str, force: bool = False) -> None:
    """Write repodata.json for a directory of .conda packages (linux-64/, noarch/).

    Packages already in the index keep their indexed_timestamp (CEP 47), so
    a package added later is newer than a cut-off set in between."""
    try:
        _rattler("index", {"channel": str(Path(path).resolve()), "force": force})
    except _RattlerFailure as e:
        raise KtenvError(f"Indexing the conda channel {path} failed: {e.message}") from None


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
    except _RattlerFailure as e:
        hint = ""
        if e.kind == "SolverError" and inputs.exclude_newer:
            hint = (
                f" The solve only considered packages published before the stack's cut-off "
                f"{inputs.exclude_newer} (envs/stack.toml); a channel indexed by rattler after that date "
                "(a local mirror) stamps every package with its indexing time, so nothing qualifies."
            )
        raise ResolveError(
            f"The conda packages of {inputs.arch} cannot be solved from {', '.join(inputs.channels)} "
            f"for a host with {_vp_text(inputs.virtual)}.{hint}\nThe solver says:\n{e.message}\n"
            "Change the specs in envs/conda.toml, or the CUDA/glibc the stack targets, and lock again."
        ) from None
    return result["records"]


def _vp_text(virtual: dict[str, str]) -> str:
    return ", ".join(f"{k} {virtual[k]}" for k in ("__cuda", "__glibc") if k in virtual)


def lock(spec, arch: str, out_dir: Path | str | None = None, channel_url: str | None = None,
         python: str | None = None, stack_version: str | None = None, exclude_newer: str | None = "stack",
         progress=print) -> Path:
    """Solve the arch's conda packages and write lock/<arch>/conda-lock.yml
    (plus the conda-lock inputs next to it). Returns the lock's path."""
    yaml = _yaml()
    inputs = load_inputs(spec, arch, python, stack_version, channel_url, exclude_newer)
    out = Path(out_dir) if out_dir else Path(spec.root).parent / "lock" / arch
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
    digest = inputs.digest()
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
            },
        },
        "package": packages,
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
    progress(f"conda: locked {len(packages)} packages -> {out / LOCK_FILE}")
    return out / LOCK_FILE


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
        if missing or not (p.get("hash") or {}).get("md5") or not (p.get("hash") or {}).get("sha256"):
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
    inputs = load_inputs(spec, arch, meta.get("ktenv_python"), meta.get("ktenv_stack") or None, channel_url, cutoff)
    if meta.get("ktenv_inputs") != inputs.digest():
        raise LockStale(
            f"{lock_dir / LOCK_FILE} is out of date: envs/conda.toml, the arch's CUDA, the stack's glibc or "
            f"cut-off, or the channel ({', '.join(inputs.channels)}) changed since it was written. Building "
            f"from it would install packages envs/ no longer asks for. Relock: python build.py lock --arch {arch} --conda"
        )
    return doc


# --- build --------------------------------------------------------------------

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
    except _RattlerFailure as e:
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
