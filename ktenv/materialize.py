"""`python build.py env --arch X`: build an arch's environment from its lock.

One build, start to finish:
  lock      lock/<arch>/ is read and its requirements.txt checked against the
            hash lock.toml records (a hand-edited lock is refused).
  exclusive one build per prefix: an flock on a file beside the prefix. A
            second caller waits (saying for whom) or, with --no-wait, fails.
  no-op     the prefix's stamp (lock hashes, patches hash, kt-kernel config,
            installed distributions) matches: nothing to do, in milliseconds.
  venv      `uv venv --relocatable` in a hidden sibling of the prefix (same
            filesystem, so the final step is a rename), with a Python the lock
            was made for; uv never downloads one.
  disk      before anything is downloaded: the env, plus the 4 GB the
            sgl-kernel loader insists on, must fit; else say how much is missing.
  sync      `uv pip sync --require-hashes`: every artifact checked against the
            lock's sha256 before anything is installed.
  kt-kernel --kt-source: build from a checkout and install the wheel; always
            verify which CPU variant the env loads (ktenv.ktkernel).
  patches   the env's metadata made to agree with what the lock installs, and
            patches/*.toml applied (ktenv.patches).
  payload   sgl-kernel's CUDA payload extracted once per content into
            ~/.cache/ktenv/payload and linked into the env (ktenv.payload),
            then confirmed by the env's own loader.
  check     `uv pip check` must be clean.
  swap      the finished env replaces the prefix in one rename (renameat2
            RENAME_EXCHANGE where the kernel has it). A build that fails or is
            killed leaves the previous env as it was; its leftovers are removed
            by the next build of the same prefix.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import lockfile, patches as patches_mod, payload as payload_mod
from .errors import KtenvError
from .tools import cache_dir, uv_bin

STAMP = "ktenv-stamp.json"
STAMP_FORMAT = 1
REPO = Path(__file__).resolve().parent.parent
PATCHES_DIR = REPO / "patches"

# The 0.7.2 stack's env measured 9.9 GB on disk (FACTS.md); rounded up. Used
# when files must be downloaded or copied rather than hard-linked from uv's cache.
ENV_BYTES = 10_500_000_000
# An env linked from a warm uv cache on the same filesystem only adds
# directories, patched METADATA copies and the payload links.
LINKED_ENV_BYTES = 500_000_000
# sgl_kernel's payload loader skips any cache directory with less than 4 GB
# free (payload_runtime._cache_root), and the payload itself is 1.3 GB.
PAYLOAD_BYTES = 4_000_000_000
GB = 1e9


class BuildBusy(KtenvError):
    exit_code = 75  # EX_TEMPFAIL: try again later


class DiskFull(KtenvError):
    exit_code = 4


# ---------------------------------------------------------------- small helpers

class Progress:
    """Human progress lines with elapsed time, on stderr (stdout stays for the result)."""

    def __init__(self, stream=None, quiet: bool = False):
        self.t0 = time.monotonic()
        self.stream = stream or sys.stderr
        self.quiet = quiet

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed():6.1f}s] {msg}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def heartbeat(self, what: str, every: float = 15.0):
        """While a long step runs, say every `every` seconds that it still does."""
        stop = threading.Event()
        start = time.monotonic()

        def beat():
            while not stop.wait(every):
                self(f"{what}: still working ({time.monotonic() - start:.0f} s)")

        t = threading.Thread(target=beat, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()


try:
    _PRCTL = ctypes.CDLL(None).prctl  # looked up here: the child of a fork must not dlopen
except (AttributeError, OSError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    # A build killed with SIGKILL must not leave uv writing into a directory
    # the next build is about to delete. (The signal follows the thread that
    # started the child: _run and _sync are called from the main thread.)
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _uv_env() -> dict:
    env = dict(os.environ)
    env.update(UV_PYTHON_DOWNLOADS="never", UV_NO_PROGRESS="1")
    env.pop("VIRTUAL_ENV", None)  # never let an activated env stand in for the target
    return env


def _run(cmd: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_uv_env(), timeout=timeout, preexec_fn=_die_with_parent)


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


# ---------------------------------------------------------------- the lock

def read_lock(lock_dir: Path) -> lockfile.Lock:
    lock = lockfile.read(Path(lock_dir))
    actual = lockfile.sha256_file(lock.requirements)
    if actual != lock.requirements_sha256:
        raise KtenvError(
            f"{lock.requirements} does not match the hash lock.toml records for it ({lock.requirements_sha256[:19]}…, "
            f"the file has {actual[:19]}…): it was edited after locking. ktenv installs only what a lock vouches for; "
            f"regenerate it with `python build.py lock --arch {lock.arch}` (or restore it with git)."
        )
    return lock


# ---------------------------------------------------------------- exclusivity

def _siblings(prefix: Path) -> dict[str, Path]:
    name = prefix.name
    return {
        "lock": prefix.parent / f".{name}.ktenv.lock",
        "build": prefix.parent / f".{name}.ktenv-build-{os.getpid()}",
        "old": prefix.parent / f".{name}.ktenv-old-{os.getpid()}",
    }


class BuildLock:
    """An exclusive flock beside the prefix; the holder's pid and start time are written into it."""

    def __init__(self, prefix: Path, wait: bool = True, progress=lambda m: None):
        self.prefix = prefix
        self.path = _siblings(prefix)["lock"]
        self.wait = wait
        self.progress = progress
        self.f = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']}, started {time.strftime('%H:%M:%S', time.localtime(info['since']))}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            if not self.wait:
                self.f.close()
                raise BuildBusy(
                    f"Another build of {self.prefix} is running ({holder}); it holds {self.path}. "
                    "Wait for it to finish, or rerun without --no-wait to queue behind it."
                ) from None
            self.progress(f"waiting for another build of {self.prefix} ({holder}) to finish")
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX)
        self.f.seek(0)
        self.f.truncate()
        self.f.write(json.dumps({"pid": os.getpid(), "since": time.time()}))
        self.f.flush()
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.f.truncate(0)
        fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
        self.f.close()


def clean_stale(prefix: Path, progress=lambda m: None) -> list[str]:
    """Remove what killed builds of this prefix left behind. Call only under BuildLock."""
    removed = []
    name = prefix.name
    olds = sorted(prefix.parent.glob(f".{name}.ktenv-old-*"))
    if not prefix.exists() and olds and (olds[-1] / STAMP).exists():
        # Killed between the two renames of the fallback swap: put the previous env back.
        os.rename(olds[-1], prefix)
        progress(f"restored the previous env at {prefix} from an interrupted swap")
        olds = olds[:-1]
    for p in olds + sorted(prefix.parent.glob(f".{name}.ktenv-build-*")):
        progress(f"removing {p.name}, left by an interrupted build")
        shutil.rmtree(p, ignore_errors=True)
        removed.append(str(p))
    return removed


# ---------------------------------------------------------------- python

def _python_version(python: str) -> str:
    proc = _run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], timeout=60)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def find_python(wanted: list[str], requested: str | None = None) -> tuple[str, str]:
    """(path, X.Y) of an interpreter the lock was made for; never downloaded."""
    uv = uv_bin()
    candidates = [requested] if requested else list(wanted)
    for c in candidates:
        proc = _run([uv, "python", "find", "--python-preference", "only-system", c], timeout=60)
        path = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ""
        if not path and requested and Path(requested).exists():
            path = requested
        if not path:
            continue
        version = _python_version(path)
        if version in wanted:
            return path, version
        if requested:
            raise KtenvError(
                f"--python {requested} is Python {version or '(unknown)'}, but this lock was made for Python "
                f"{' or '.join(wanted)}: its wheels (kt-kernel's are cp311/cp312 only) would not fit. "
                f"Pass an interpreter of one of those versions, or relock for another Python."
            )
    what = f"--python {requested}" if requested else f"Python {' or '.join(wanted)}"
    raise KtenvError(
        f"No interpreter found for {what}: the lock was made for Python {' or '.join(wanted)} and uv found none "
        "of them on PATH or among the Pythons it manages (ktenv does not let uv download one, so the "
        "interpreter is one you chose). Install one (e.g. `apt install python3.12`, `pyenv install 3.12`, "
        "`uv python install 3.12` on a machine with network) and pass --python /path/to/python3.X if it is not on PATH."
    )


# ---------------------------------------------------------------- disk

def _device(path: Path) -> int:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.stat().st_dev


def _free(path: Path) -> int:
    try:
        from .hostinfo import disk_free
    except ImportError:  # pragma: no cover - hostinfo is part of ktenv
        p = path.absolute()
        while not p.exists():
            p = p.parent
        return shutil.disk_usage(p).free
    return disk_free(path)


def uv_cache_dir() -> Path:
    proc = _run([uv_bin(), "cache", "dir"], timeout=60)
    return Path(proc.stdout.strip() or os.path.expanduser("~/.cache/uv"))


def all_cached(python: Path, requirements: Path) -> tuple[bool, str]:
    """Would `uv pip sync` need the network? Asked of uv itself, offline and without installing."""
    proc = _run([uv_bin(), "pip", "sync", "--dry-run", "--offline", "--require-hashes", "--python", str(python), str(requirements)], timeout=300)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return False, "not all of the lock is in uv's cache"
    m = re.search(r"Would download (\d+) package", text)
    if m and int(m.group(1)) > 0:
        return False, f"{m.group(1)} package(s) to download"
    return True, "everything is in uv's cache"


def preflight(prefix: Path, python: Path, requirements: Path, cache: Path | None = None) -> dict:
    """Refuse, before any download, a build that cannot fit on the prefix's filesystem."""
    cache = cache or uv_cache_dir()
    same_fs = _device(prefix.parent) == _device(cache)
    if _free(prefix.parent) >= ENV_BYTES + PAYLOAD_BYTES and (same_fs or _free(cache) >= ENV_BYTES):
        # Room for the worst case: no need to ask uv what it would download.
        return {"cached": None, "why": "room for a full download", "same_filesystem_as_uv_cache": same_fs,
                "need": {str(prefix.parent): ENV_BYTES + PAYLOAD_BYTES}, "free": {str(prefix.parent): _free(prefix.parent)}}
    cached, why = all_cached(python, requirements)
    env_bytes = LINKED_ENV_BYTES if (cached and same_fs) else ENV_BYTES
    need = {prefix.parent: env_bytes + PAYLOAD_BYTES}
    if not cached and not same_fs:
        need[cache] = ENV_BYTES  # downloads land in uv's cache first
    report = {"cached": cached, "why": why, "same_filesystem_as_uv_cache": same_fs, "need": {}, "free": {}}
    for where, n in need.items():
        free = _free(where)
        report["need"][str(where)] = n
        report["free"][str(where)] = free
        if free < n:
            how = ("linked from uv's cache" if env_bytes == LINKED_ENV_BYTES else
                   f"{_gb(ENV_BYTES)} of packages ({why}" + (", and uv's cache is on another filesystem" if not same_fs else "") + ")")
            detail = f"the env ({how}) plus {_gb(PAYLOAD_BYTES)} for sgl-kernel's CUDA payload" if where == prefix.parent else \
                f"{_gb(ENV_BYTES)} of downloads into uv's cache ({cache})"
            raise DiskFull(
                f"Not enough disk space to build {prefix}: it needs about {_gb(n)} on the filesystem of {where} "
                f"for {detail}, and {_gb(free)} is free — {_gb(n - free)} missing. Nothing was downloaded or changed. "
                "Free space there, or pass --prefix on a larger filesystem (UV_CACHE_DIR moves uv's cache)."
            )
    return report


# ---------------------------------------------------------------- kt-kernel

def _host_flags() -> frozenset[str]:
    from .hostinfo import cpu_info

    return cpu_info().flags


def kt_target(target_isa: str | None) -> str | None:
    """The variant the env's kt-kernel is for: --target-isa, else the best this CPU runs (None without AVX2)."""
    from . import ktkernel

    return target_isa or ktkernel.best_variant(_host_flags())


def kt_config(kt_source: str | None, target_isa: str | None) -> dict:
    """What the stamp compares about kt-kernel: another CPU, ISA or source commit means a rebuild."""
    from . import ktkernel

    isa = kt_target(target_isa)
    path = "source" if kt_source else "prebuilt"
    if isa is None:  # no AVX2: verify_prebuilt explains during the build
        return {"path": path, "target_isa": None}
    cfg = ktkernel.stamp_config(path, isa)
    if kt_source:
        ident = ktkernel.source_identity(kt_source)
        cfg["source"] = {k: v for k, v in ident.items() if k != "submodules_pinned"}
    return cfg


def locked_version(requirements: Path, name: str) -> str | None:
    m = re.search(rf"^{re.escape(name)}==([^\s;\\]+)", requirements.read_text(), re.M)
    return m.group(1) if m else None


def source_version(source: str | Path) -> str | None:
    """The version a ktransformers checkout builds (its version.py, read as text: never executed)."""
    try:
        text = (Path(source) / "version.py").read_text()
    except OSError:
        return None
    m = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.M)
    return m.group(1) if m else None


def _same_release(a: str, b: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(a).public == Version(b).public
    except InvalidVersion:
        return a == b


def overlay_wheel(site: Path, wheel: Path, dist_name: str = "kt-kernel") -> dict:
    """Put a source-built wheel's packages in place of the installed distribution's, keeping the rest of it.

    kt-kernel's PyPI wheel carries more than kt_kernel/: sgl_kernel/ (with the
    payload loader), triton_kernels/ and a payload part, none of which a source
    build of kt-kernel produces. Reinstalling the distribution would delete
    them, so only the top-level packages the built wheel has are replaced.
    """
    import zipfile

    dist = patches_mod.installed(site).get(dist_name)
    if dist is None:
        raise KtenvError(f"{dist_name} is not installed in the env, so there is nothing for the source build to replace; the lock must include it.")
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        meta = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        version = re.search(r"^Version: (.+)$", z.read(meta).decode(), re.M).group(1).strip() if meta else "?"
        if not _same_release(version, dist.version):
            raise KtenvError(
                f"The kt-kernel wheel built from source is version {version}, but the lock installs {dist.version}, which sglang-kt "
                f"was released against. Check out the matching release in the ktransformers checkout (e.g. `git checkout v{dist.version}`) and rerun."
            )
        tops = sorted({n.split("/")[0] for n in names if ".dist-info/" not in n and ".data/" not in n})
        result = {"wheel": wheel.name, "wheel_sha256": lockfile.sha256_file(wheel), "version": version, "replaced": tops}
        for top in tops:
            files = {n: z.read(n) for n in names if n.split("/")[0] == top}
            modes = {n: (z.getinfo(n).external_attr >> 16) & 0o777 or 0o644 for n in files}
            patches_mod.replace_tree(dist, top, files, modes)
    return result


def check_kt_source(requirements: Path, kt_source: str) -> None:
    """Refuse, before anything is built, a checkout of another release than the lock's kt-kernel."""
    if not (Path(kt_source) / "kt-kernel").is_dir():
        raise KtenvError(f"--kt-source {kt_source} is not a ktransformers checkout (it has no kt-kernel/ directory). Pass the repository root.")
    want, have = locked_version(requirements, "kt-kernel"), source_version(kt_source)
    if want and have and not _same_release(want, have):
        raise KtenvError(
            f"The ktransformers checkout at {kt_source} is version {have}, but this lock pins kt-kernel {want} "
            f"(released together with sglang-kt, which calls it). Check out the matching release there "
            f"(`git -C {kt_source} checkout v{want}`, with `git submodule update --init --recursive`) and rerun; nothing was built."
        )


def kt_install(env: Path, requirements: Path, kt_source: str | None, target_isa: str | None, progress) -> dict | None:
    """With --kt-source: build (or reuse) the wheel for the target ISA and put its kt_kernel/ in the env."""
    if not kt_source:
        return None
    from . import ktkernel

    isa = kt_target(target_isa)
    if isa is None:
        raise KtenvError("This CPU lacks AVX2 and no --target-isa was given: there is no kt-kernel variant to build for it. Pass --target-isa for the machine that will run the server.")
    check_kt_source(requirements, kt_source)
    python = str(env / "bin" / "python")
    wheel = Path(ktkernel.build_from_source(kt_source, isa, python, cache_dir(), progress))
    result = overlay_wheel(patches_mod.site_packages(env), wheel)
    progress(f"kt-kernel: {', '.join(result['replaced'])} from {wheel.name} (built from {kt_source} for {isa})")
    return {**result, "path": wheel}


def kt_verify(env: Path, kt_source: str | None, target_isa: str | None, wheel: Path | None) -> dict:
    """Import kt_kernel in the env and check its CPU variant (ktenv.ktkernel.verify_prebuilt)."""
    from . import ktkernel

    flags = _host_flags()
    best = ktkernel.best_variant(flags)
    isa = kt_target(target_isa)
    python = str(env / "bin" / "python")
    environ = None
    if target_isa and best and ktkernel.VARIANTS.index(target_isa) < ktkernel.VARIANTS.index(best):
        # Built for a bigger CPU than this one: loading it here could die with SIGILL.
        # What can be checked is that the build for it is there at all.
        pkg = patches_mod.site_packages(env) / "kt_kernel"
        shipped = sorted(pkg.glob(f"_kt_kernel_ext_{target_isa}.*.so")) or sorted(pkg.glob("kt_kernel_ext.*.so"))
        if not shipped:
            raise KtenvError(
                f"The env's kt-kernel has no {target_isa} build (no kt_kernel/_kt_kernel_ext_{target_isa}.*.so), so the "
                f"machine it is for would fall back to a slower variant. Install a kt-kernel that ships it, or build one "
                f"with --kt-source PATH --target-isa {target_isa}."
            )
        report = {"verified": False, "variant": target_isa, "extension_file": str(shipped[0]),
                  "why": f"--target-isa {target_isa} is above this CPU ({best}); its build is present but cannot be loaded here"}
    else:
        if target_isa and not kt_source and target_isa != best:
            # The wheel picks the best variant for this host; make it load the one the target will.
            environ = dict(os.environ, KT_KERNEL_CPU_VARIANT=target_isa)
        report = ktkernel.verify_prebuilt(python, expected=target_isa, environ=environ)
        report["verified"] = True
    config = ktkernel.stamp_config("source" if kt_source else "prebuilt", isa, verified=report if report.get("verified") else None, build=wheel) if isa else {}
    return {**report, "config": config}


# ---------------------------------------------------------------- stamp

def _dists(env: Path) -> list[str]:
    try:
        site = patches_mod.site_packages(env)
    except KtenvError:
        return []
    return sorted(p.name for p in site.glob("*.dist-info"))


def up_to_date(prefix: Path, want: dict) -> tuple[bool, str]:
    """Whether the env at prefix is what `want` describes; and if not, why not (for the log)."""
    try:
        stamp = json.loads((prefix / STAMP).read_text())
    except FileNotFoundError:
        return False, "no env yet" if not prefix.exists() else f"{prefix} has no {STAMP}"
    except ValueError:
        return False, f"{STAMP} is unreadable"
    for key, value in want.items():
        if stamp.get(key) != value:
            return False, f"{key} changed"
    if not (prefix / "bin" / "python").exists():
        return False, "bin/python is missing"
    if _dists(prefix) != stamp.get("dists"):
        return False, "the installed distributions differ from the ones it was built with"
    return True, "up to date"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in(tmp: Path, prefix: Path) -> str:
    """Make tmp the env at prefix in one step; the previous env (if any) is deleted afterwards."""
    if not prefix.exists():
        os.rename(tmp, prefix)
        return "rename"
    if _exchange(tmp, prefix):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous env
        return "exchange"
    old = _siblings(prefix)["old"]
    os.rename(prefix, old)
    os.rename(tmp, prefix)
    shutil.rmtree(old, ignore_errors=True)
    return "rename-pair"


def _check_replaceable(prefix: Path) -> None:
    if not prefix.exists():
        return
    if not prefix.is_dir() or (not (prefix / STAMP).exists() and any(prefix.iterdir())):
        raise KtenvError(
            f"{prefix} exists and is not an env ktenv built (it has no {STAMP}). ktenv replaces the whole "
            "directory when it builds, so it will not touch this one. Choose another --prefix, or move it away."
        )


def _check_relocated(prefix: Path, tmp: Path) -> None:
    """After the rename, nothing in the env may still point at the build directory."""
    needle = os.fsencode(str(tmp))
    for p in list((prefix / "bin").iterdir()) + [prefix / "pyvenv.cfg"]:
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                if needle in f.read(1 << 20):
                    raise KtenvError(f"{p} still refers to the build directory {tmp}; uv did not make the env relocatable. Report this with your uv version.")
    proc = subprocess.run([str(prefix / "bin" / "python"), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    if proc.returncode != 0 or Path(proc.stdout.strip()) != prefix:
        raise KtenvError(f"{prefix}/bin/python does not run as this env after the swap: {proc.stdout.strip()} {proc.stderr.strip()[-400:]}")


# ---------------------------------------------------------------- the build

@dataclass
class Options:
    python: str | None = None
    kt_source: str | None = None
    target_isa: str | None = None
    wait: bool = True
    patches_dir: Path = PATCHES_DIR
    payload_cache: Path | None = None


def build(lock_dir: Path, prefix: Path, opts: Options | None = None, progress: Progress | None = None) -> dict:
    opts = opts or Options()
    progress = progress or Progress()
    t0 = time.monotonic()
    times: dict[str, float] = {}
    prefix = Path(os.path.abspath(prefix))
    lock = read_lock(Path(lock_dir))
    patch_list = patches_mod.load_patches(opts.patches_dir)
    departs = patches_mod.departures(lock.departures)
    want = {
        "format": STAMP_FORMAT,
        "arch": lock.arch,
        "stack": lock.stack,
        "requirements_sha256": lock.requirements_sha256,
        "input_hash": lock.input_hash,
        "patches_hash": patches_mod.patches_hash(departs, patch_list, lock.stack),
        "kt_kernel_config": kt_config(opts.kt_source, opts.target_isa),
    }
    if opts.python:
        want["python_requested"] = opts.python
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with BuildLock(prefix, opts.wait, progress):
        cleaned = clean_stale(prefix, progress)
        fresh, why = up_to_date(prefix, want)
        if fresh:
            stamp = json.loads((prefix / STAMP).read_text())
            return {"status": "up-to-date", "prefix": str(prefix), "cleaned": cleaned, "seconds": round(time.monotonic() - t0, 3), "stamp": stamp}
        progress(f"building {prefix} from {lock.directory} ({why})")
        _check_replaceable(prefix)
        if opts.kt_source:
            check_kt_source(lock.requirements, opts.kt_source)
        python, pyver = find_python(lock.python, opts.python)
        tmp = _siblings(prefix)["build"]
        uv = uv_bin()
        restore = _terminate_as_interrupt()
        try:
            return _build_into(tmp, prefix, lock, opts, want, python, pyver, uv, patch_list, progress, times, t0, cleaned)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            restore()


def _terminate_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so the build directory is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _step(times: dict, name: str):
    start = time.monotonic()

    @contextlib.contextmanager
    def cm():
        yield
        times[name] = round(time.monotonic() - start, 3)

    return cm()


def _build_into(tmp, prefix, lock, opts, want, python, pyver, uv, patch_list, progress, times, t0, cleaned) -> dict:
    env_python = tmp / "bin" / "python"
    with _step(times, "venv"):
        proc = _run([uv, "venv", "--relocatable", "--no-project", "--python", python, "--python-preference", "only-system", str(tmp)])
        if proc.returncode != 0:
            raise KtenvError(f"`uv venv` failed for {python}:\n{proc.stderr.strip()[-1500:]}")
    with _step(times, "preflight"):
        disk = preflight(prefix, env_python, lock.requirements)
    progress(f"python {pyver} ({python}); disk ok ({disk['why']})")

    with _step(times, "sync"):
        _sync(uv, env_python, lock.requirements, progress)

    with _step(times, "kt_install"):
        kt_built = kt_install(tmp, lock.requirements, opts.kt_source, opts.target_isa, progress)
        kt_wheel = kt_built["path"] if kt_built else None

    # Importing kt_kernel (and torch) in a fresh env takes seconds; it does not
    # depend on the metadata patches or the payload, so it runs beside them.
    pool = ThreadPoolExecutor(max_workers=1)
    kt_future = pool.submit(kt_verify, tmp, opts.kt_source, opts.target_isa, kt_wheel)
    try:
        site = patches_mod.site_packages(tmp)
        with _step(times, "patches"):
            patch_report = patches_mod.apply(site, lock.departures, patch_list, lock.stack)
        progress(f"patches: {len(patch_report['changes'])} change(s), {len(patch_report['skipped'])} skipped")

        with _step(times, "payload"), _beat(progress, "payload"):
            try:
                payload_report = payload_mod.materialize(site, cache=opts.payload_cache, progress=progress)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DiskFull(f"Ran out of disk space while extracting sgl-kernel's CUDA payload ({e}). Free space on {e.filename or 'the cache filesystem'} (KTENV_CACHE_DIR moves ktenv's cache) and rerun.") from None
                raise
        if payload_report.get("present"):
            progress(f"payload: sgl-kernel {payload_report['version']} {_gb(payload_report['bytes'])} "
                     f"({'from cache' if payload_report['cache_hit'] else 'extracted'}, {payload_report['placed_by']})")

        with _step(times, "verify"), _beat(progress, "checks (kt-kernel import, payload loader, uv pip check)"):
            payload_check = payload_mod.verify_in_env(env_python, site)
            check = _run([uv, "pip", "check", "--python", str(env_python)])
            kt_report = kt_future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if check.returncode != 0:
        problems = [l for l in check.stdout.splitlines() + check.stderr.splitlines() if l.startswith("The package")]
        raise KtenvError(
            "The built env is not self-consistent after patching (`uv pip check`):\n  " + "\n  ".join(problems or [check.stdout + check.stderr])
            + "\nEvery departure from upstream must be a rule whose metadata edit ktenv applies; this one was not. "
            "Relock (`python build.py lock`) or add a patch to patches/ with its reason."
        )
    progress(f"checks: uv pip check clean; kt-kernel variant {kt_report.get('variant', '?')}; payload loads from the env")

    stamp = dict(want)
    stamp.update(
        python=pyver,
        python_path=python,
        uv_version=_uv_version(uv),
        lock_dir=str(lock.directory),
        dists=_dists(tmp),
        kt_kernel=dict({k: kt_report.get(k) for k in ("verified", "variant", "kt_kernel_version", "best", "expected", "cuda_stream", "why", "config") if k in kt_report},
                       **({"source_build": {k: str(v) if isinstance(v, Path) else v for k, v in kt_built.items()}} if kt_built else {})),
        payload={k: payload_report.get(k) for k in ("present", "version", "archive_sha256", "bytes", "files")},
        patches=patch_report["changes"],
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    stamp = _relocate(stamp, tmp, prefix)
    (tmp / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")

    with _step(times, "swap"):
        how = swap_in(tmp, prefix)
        _check_relocated(prefix, tmp)
    times["total"] = round(time.monotonic() - t0, 3)
    progress(f"done: {prefix} ({how}) in {times['total']:.1f} s")
    return _relocate({
        "status": "built",
        "prefix": str(prefix),
        "arch": lock.arch,
        "stack": lock.stack,
        "python": pyver,
        "python_path": python,
        "lock": {"dir": str(lock.directory), "requirements_sha256": lock.requirements_sha256, "input_hash": lock.input_hash},
        "disk": disk,
        "kt_kernel": stamp["kt_kernel"],
        "payload": payload_report,
        "payload_check": payload_check,
        "patches": patch_report,
        "pip_check": "clean",
        "cleaned": cleaned,
        "swap": how,
        "seconds": times,
    }, tmp, prefix)


def _relocate(obj, tmp: Path, prefix: Path):
    """Paths measured inside the build directory, as they are after the swap."""
    if isinstance(obj, dict):
        return {k: _relocate(v, tmp, prefix) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relocate(v, tmp, prefix) for v in obj]
    if isinstance(obj, str) and obj.startswith(str(tmp)):
        return str(prefix) + obj[len(str(tmp)):]
    return obj


def _beat(progress, what: str):
    return progress.heartbeat(what) if hasattr(progress, "heartbeat") else contextlib.nullcontext()


def _uv_version(uv: str) -> str:
    proc = _run([uv, "--version"])
    return proc.stdout.split()[1] if proc.returncode == 0 and len(proc.stdout.split()) > 1 else ""


def _sync(uv: str, python: Path, requirements: Path, progress: Progress) -> None:
    """uv pip sync with hash checking; uv's own summary lines are relayed as they come."""
    cmd = [uv, "pip", "sync", "--require-hashes", "--python", str(python), str(requirements)]
    progress(f"sync: installing {requirements} (hash-checked)")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_uv_env(), preexec_fn=_die_with_parent)
    tail: list[str] = []
    try:
        with _beat(progress, "sync (downloading and installing)"):
            for line in proc.stdout:
                line = line.rstrip()
                tail = (tail + [line])[-40:]
                if re.match(r"^(Resolved|Prepared|Installed|Uninstalled|Audited) ", line):
                    progress(f"sync: {line}")
            rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        text = "\n".join(tail)
        if "Hash mismatch" in text:
            raise KtenvError(
                "An artifact does not match the sha256 the lock records, so nothing was installed and the previous "
                f"env (if any) is untouched:\n{text}\nEither the lock was tampered with or the index served a different "
                "file. Do not work around this; regenerate the lock from a trusted index with `python build.py lock`."
            )
        raise KtenvError(f"`uv pip sync` failed; the previous env (if any) is untouched:\n{text}")


# ---------------------------------------------------------------- CLI

def _summary(r: dict) -> str:
    if r["status"] == "up-to-date":
        s = r["stamp"]
        return (f"env {s['arch']}: {r['prefix']} is up to date (stack {s['stack']}, Python {s['python']}, "
                f"kt-kernel {s.get('kt_kernel', {}).get('variant', '?')}); nothing to do ({r['seconds'] * 1000:.0f} ms).")
    kt, pay, pat = r["kt_kernel"], r["payload"], r["patches"]
    meta = [c for c in pat["changes"] if c["file"].endswith("METADATA")]
    src = [c for c in pat["changes"] if not c["file"].endswith("METADATA")]
    lines = [
        f"env {r['arch']}: built {r['prefix']} in {r['seconds']['total']:.1f} s (sync {r['seconds']['sync']:.1f} s)",
        f"  python {r['python']} ({r['python_path']}), stack {r['stack']}, lock {r['lock']['dir']}",
        f"  kt-kernel {kt.get('kt_kernel_version') or ''}: CPU variant {kt.get('variant', '?')} "
        f"({(kt.get('config') or {}).get('path', 'prebuilt')}{'' if kt.get('verified', True) else ', not loadable on this CPU: ' + kt.get('why', '')})",
    ]
    if pay.get("present"):
        lines.append(f"  sgl-kernel payload {pay['version']}: {_gb(pay['bytes'])} in the env ({'shared from cache' if pay['cache_hit'] else 'extracted'}, {pay['placed_by']})")
    lines.append(f"  patches: {len(meta)} metadata edit(s), {len(src)} source patch(es); uv pip check: clean")
    if pat.get("shared_files"):
        lines.append(f"  shared files (accepted): {', '.join(s['path'] for s in pat['shared_files'])}")
    lines.append(f"  use: {r['prefix']}/bin/python, or `python build.py smoke --arch {r['arch']} --prefix {r['prefix']}`")
    return "\n".join(lines)


def run(args) -> int:
    from . import spec as spec_mod

    spec = spec_mod.load(args.envs)
    arch = spec.arch(args.arch)
    stack = args.stack or spec.stack.default
    spec.stack.release(stack)
    lock_dir = lockfile.lock_dir(Path(args.lock_dir), arch.name, stack, spec.stack.default)
    prefix = Path(args.prefix or Path(".envs") / arch.name)
    if getattr(args, "backend", "uv") == "conda":
        # The conda prefix brings the system layer (nvcc, compilers, hwloc);
        # the PyPI layer goes into its python from the same hashed lock.
        from . import conda

        conda.build_conda_prefix(spec, arch.name, prefix, channel_url=args.channel, lock_dir=lock_dir, progress=print)
        return 0
    opts = Options(python=args.python, kt_source=args.kt_source, target_isa=args.target_isa, wait=not args.no_wait)
    result = build(lock_dir, prefix, opts, Progress())
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True, default=str))
    else:
        print(_summary(result))
    return 0
