"""`env`: build an arch's environment from its lock, step by step (the modules beside this one).

One build, start to finish:
  lock      lock/<arch>/ is read and its requirements.txt checked against the
            hash lock.toml records (a hand-edited lock is refused).
  exclusive one build per prefix: an flock on a file beside the prefix. A
            second caller waits (saying for whom) or, with --no-wait, fails.
  no-op     the prefix's stamp (lock hashes, patches hash, kt-kernel config,
            installed distributions) matches: nothing to do, in milliseconds.
  prefix    the one backend-specific step (build/prefix.py), in a hidden
            sibling of the prefix (same filesystem, so the final step is a
            rename): uv: `uv venv --relocatable` with a Python the lock was
            made for (never downloaded); conda: the packages of
            conda-lock.yml, hash-checked and linked for the final prefix.
  disk      before anything is downloaded: the env, plus the 4 GB the
            sgl-kernel loader insists on, must fit; else say how much is missing.
  sync      `uv pip sync --require-hashes`: every artifact checked against the
            lock's sha256 before anything is installed.
  kt-kernel --kt-source: build from a checkout and install the wheel; always
            verify which CPU variant the env loads (build/ktkernel/).
  patches   the env's metadata made to agree with what the lock installs, and
            patches/*.toml applied (build/patches.py).
  payload   sgl-kernel's CUDA payload extracted once per content into
            ~/.cache/ktenv/payload and linked into the env (build/payload.py),
            then confirmed by the env's own loader.
  check     `uv pip check` must be clean; conda: no PyPI distribution
            overwrote or removed a conda file.
  swap      the finished env replaces the prefix in one rename (renameat2
            RENAME_EXCHANGE where the kernel has it). A build that fails or is
            killed leaves the previous env as it was; its leftovers are removed
            by the next build of the same prefix.
"""


from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import KtenvError
from ..progress import Progress, beat
from ..target import STAMP, STAMP_FORMAT, Target
from ..tools import uv_bin
from . import dists, flash_mla_env, patches as patches_mod, payload as payload_mod, repair, toolchain, verify
from .disk import DiskFull, preflight
from .envdir import BuildLock, check_relocated, check_replaceable, clean_stale, dist_infos, siblings, swap_in, up_to_date
from .ktkernel import install as ktinstall
from .prefix import backend as make_backend
from .sync import run as _run, sync, uv_version

REPO = Path(__file__).resolve().parents[2]
PATCHES_DIR = REPO / "patches"
GB = 1e9


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


@dataclass
class Options:
    python: str | None = None
    kt_source: str | None = None
    target_isa: str | None = None
    wait: bool = True
    patches_dir: Path = PATCHES_DIR
    payload_cache: Path | None = None
    cuda_home: str | None = None  # --cuda-home: the toolkit the env's JIT uses (recorded in the stamp)
    backend: str = "uv"          # uv | conda: how the prefix and its Python are made
    channel: str | None = None   # conda: the channel its lock was made against (a mirror)
    conda_cache: Path | None = None
    flash_mla_source: str | None = None  # --flash-mla-source: a FlashMLA checkout to build flash_mla from (sm90)
    cutlass_source: str | None = None    # --cutlass-source: CUTLASS at FlashMLA's submodule commit, if csrc/cutlass is empty
    cuobjdump: str | None = None         # for the flash_mla build's SASS audit (the check stage's pinned one)


def build(target: Target, opts: Options | None = None, progress=None) -> dict:
    """Build target.prefix from target.lock_dir; a no-op (in milliseconds) when the stamp says it is current."""
    opts = opts or Options()
    progress = progress or Progress()
    t0 = time.monotonic()
    times: dict[str, float] = {}
    prefix = Path(os.path.abspath(target.prefix))
    lock = target.lock
    lock.check_hash()
    kt = target.kt
    patch_list = patches_mod.load_patches(opts.patches_dir)
    maker = make_backend(target, opts.backend, opts.python, opts.channel, opts.conda_cache)
    want = {
        "format": STAMP_FORMAT,
        "arch": lock.arch,
        "stack": lock.stack,
        "requirements_sha256": lock.requirements_sha256,
        "input_hash": lock.input_hash,
        "patches_hash": patches_mod.patches_hash(lock.departures, patch_list, lock.stack),
        "kt_kernel_config": ktinstall.config(kt, opts.kt_source, opts.target_isa),
        **maker.want(),
        **flash_mla_env.want(target, opts.flash_mla_source, opts.cutlass_source),
    }
    if opts.cuda_home:  # another explicit toolkit: rebuild, so the stamp records the new choice
        want["cuda_home_requested"] = os.path.abspath(opts.cuda_home)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with BuildLock(prefix, opts.wait, progress):
        cleaned = clean_stale(prefix, progress)
        fresh, why = up_to_date(prefix, want)
        if fresh:
            stamp = json.loads((prefix / STAMP).read_text())
            # Up to date by its stamp; the files themselves get the stat pass (build/verify.py).
            check = verify.check(prefix)
            if check["damaged"]:
                progress(f"{prefix} matches its lock but {len(check['damaged'])} distribution(s) are damaged; repairing "
                         "them (`env --check` only looks)")
                return repair.repair_locked(target, check, progress, opts.patches_dir)
            return {"status": "up-to-date", "prefix": str(prefix), "cleaned": cleaned, "seconds": round(time.monotonic() - t0, 3), "stamp": stamp,
                    "check": {k: check[k] for k in ("files", "hashed", "seconds")}}
        progress(f"building {prefix} from {lock.directory} ({why})")
        check_replaceable(prefix)
        if opts.kt_source:
            ktinstall.check_kt_source(lock, opts.kt_source)
        flash_mla_env.precheck(target, opts.flash_mla_source, opts.cutlass_source)
        tmp = siblings(prefix)["build"]
        uv = uv_bin()
        restore = _terminate_as_interrupt()
        try:
            return _build_into(tmp, prefix, target, opts, want, maker, uv, patch_list, progress, times, t0, cleaned)
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


def _build_into(tmp, prefix, target, opts, want, maker, uv, patch_list, progress, times, t0, cleaned) -> dict:
    lock, kt = target.lock, target.kt
    with _step(times, "prefix"):
        made = maker.make(tmp, prefix, uv, progress)
    env_python, pyver, python = made.python, made.version, made.python_path
    with _step(times, "preflight"):
        disk = preflight(target.spec.stack.sizes, prefix, env_python, lock.requirements)
    progress(f"python {pyver} ({python}); disk ok ({disk['why']})")

    with _step(times, "sync"), tempfile.TemporaryDirectory(prefix="ktenv-pypi-") as work:
        sync(uv, env_python, maker.pypi_requirements(Path(work)), progress, mode=maker.sync_mode)

    # Before kt-kernel: the source builds (kt-kernel, flash_mla) compile with the toolkit chosen here.
    tc_record = toolchain.env_record(target.spec.root, lock.arch, lock.cuda, tmp, cuda_home=opts.cuda_home, progress=progress)
    with _step(times, "kt_install"):
        kt_built = ktinstall.install(kt, tmp, lock, opts.kt_source, opts.target_isa, progress,
                                     toolkit=tc_record, sm=target.arch.sm_number)
        kt_wheel = kt_built["path"] if kt_built else None
    # Before anything edits the env: the PyPI layer left the prefix's own files alone.
    maker.after_pypi(tmp)

    # Importing kt_kernel (and torch) in a fresh env takes seconds; it does not
    # depend on the metadata patches or the payload, so it runs beside them.
    pool = ThreadPoolExecutor(max_workers=1)
    kt_future = pool.submit(ktinstall.verify, kt, tmp, opts.kt_source, opts.target_isa, kt_wheel)
    try:
        site = dists.site_packages(tmp)
        with _step(times, "patches"):
            patch_report = patches_mod.apply(site, lock.departures, patch_list, lock.stack)
        progress(f"patches: {len(patch_report['changes'])} change(s), {len(patch_report['skipped'])} skipped")

        with _step(times, "payload"), beat(progress, "payload"):
            try:
                payload_report = payload_mod.materialize(site, cache=opts.payload_cache, progress=progress)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DiskFull(f"Ran out of disk space while extracting sgl-kernel's CUDA payload ({e}). Free space on {e.filename or 'the cache filesystem'} (KTENV_CACHE_DIR moves ktenv's cache) and rerun.") from None
                raise
        if payload_report.get("present"):
            progress(f"payload: sgl-kernel {payload_report['version']} {_gb(payload_report['bytes'])} "
                     f"({'from cache' if payload_report['cache_hit'] else 'extracted'}, {payload_report['placed_by']})")

        with _step(times, "verify"), beat(progress, "checks (kt-kernel import, payload loader, uv pip check)"):
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
    with _step(times, "flash_mla"):
        fm_entry = flash_mla_env.step(target, env_python, tmp, opts.flash_mla_source, opts.cutlass_source,
                                      tc_record, opts.cuobjdump, progress)

    backend_report = maker.before_swap(tmp, prefix)
    stamp = dict(want)
    stamp.update(
        **backend_report,
        python=pyver,
        python_path=python,
        uv_version=uv_version(uv),
        lock_dir=os.path.abspath(lock.directory),
        dists=dist_infos(tmp),
        kt_kernel=dict({k: kt_report.get(k) for k in ("verified", "variant", "kt_kernel_version", "best", "expected", "cuda_stream", "why", "config") if k in kt_report},
                       **({"source_build": {k: str(v) if isinstance(v, Path) else v for k, v in kt_built.items()}} if kt_built else {})),
        payload={k: payload_report.get(k) for k in ("present", "version", "archive_sha256", "bytes", "files")},
        patches=patch_report["changes"],
        toolchain=tc_record,
        **({"flash_mla": fm_entry} if fm_entry else {}),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    stamp = _relocate(stamp, tmp, prefix)
    (tmp / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    verify.write_index(tmp)  # what `env --check` and the no-op compare the files with

    with _step(times, "swap"):
        how = swap_in(tmp, prefix)
        check_relocated(prefix, tmp)
    times["total"] = round(time.monotonic() - t0, 3)
    progress(f"done: {prefix} ({how}) in {times['total']:.1f} s")
    return _relocate({
        "status": "built",
        "backend": maker.name,
        **backend_report,
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
        "toolchain": stamp["toolchain"],
        "flash_mla": stamp.get("flash_mla"),
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


def summary(r: dict) -> str:
    """The human report of a build (the --json output is the dict itself)."""
    if r["status"] == "repaired":
        return repair.render(r)
    if r["status"] == "up-to-date":
        s = r["stamp"]
        return (f"env {s['arch']}: {r['prefix']} is up to date (stack {s['stack']}, Python {s['python']}, "
                f"kt-kernel {s.get('kt_kernel', {}).get('variant', '?')}; {r['check']['files']} files stat-checked); "
                f"nothing to do ({r['seconds'] * 1000:.0f} ms).")
    kt, pay, pat = r["kt_kernel"], r["payload"], r["patches"]
    meta = [c for c in pat["changes"] if c["file"].endswith("METADATA")]
    src = [c for c in pat["changes"] if not c["file"].endswith("METADATA")]
    lines = [
        f"env {r['arch']}: built {r['prefix']} ({r.get('backend', 'uv')} backend) in {r['seconds']['total']:.1f} s (sync {r['seconds']['sync']:.1f} s)",
        f"  python {r['python']} ({r['python_path']}), stack {r['stack']}, lock {r['lock']['dir']}",
        f"  kt-kernel {kt.get('kt_kernel_version') or ''}: CPU variant {kt.get('variant', '?')} "
        f"({(kt.get('config') or {}).get('path', 'prebuilt')}{'' if kt.get('verified', True) else ', not loadable on this CPU: ' + kt.get('why', '')})",
    ]
    if pay.get("present"):
        lines.append(f"  sgl-kernel payload {pay['version']}: {_gb(pay['bytes'])} in the env ({'shared from cache' if pay['cache_hit'] else 'extracted'}, {pay['placed_by']})")
    if r.get("conda"):
        c = r["conda"]
        lines.append(f"  conda layer: {c['packages']} packages from {c['lock']} ({', '.join(c['channels'])}); "
                     f"no PyPI file over a conda file; {c['relocated_scripts']} script(s) pointed at the prefix")
    lines.append(f"  patches: {len(meta)} metadata edit(s), {len(src)} source patch(es); uv pip check: clean")
    if pat.get("shared_files"):
        lines.append(f"  shared files (accepted): {', '.join(s['path'] for s in pat['shared_files'])}")
    tc = r.get("toolchain") or {}
    lines.append(f"  CUDA toolchain for JIT: {tc['version']} at {tc['cuda_home']} ({tc['origin']})" if tc.get("cuda_home")
                 else f"  CUDA toolchain for JIT: NONE -- the env cannot JIT-compile. {tc.get('remedy', '')}")
    lines.append(f"  use: {r['prefix']}/bin/python, or `python build.py smoke --arch {r['arch']} --prefix {r['prefix']}`")
    lines += flash_mla_env.summary_lines(r.get("flash_mla"))  # last: an env that cannot serve says so at the end
    return "\n".join(lines)
