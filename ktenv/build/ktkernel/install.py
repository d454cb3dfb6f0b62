"""kt-kernel in an env being built: which variant it is for, the source-built
wheel put in place of the PyPI one, and the proof of what loads.

Called by the build pipeline; the stamp records `stamp_config`'s answer so
another CPU, ISA or source commit means a rebuild.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

from packaging.version import InvalidVersion, Version

from ...errors import KtenvError
from ...host.cpu import cpu_info, isa_summary
from ...lock.model import Lock, sha256_file
from ...spec.model import KtKernel
from ...tools import cache_dir
from .. import dists, toolchain
from .prereq import arch_list_problems
from .source import build_from_source, source_identity
from .variants import best_variant, build_settings, check_isa_name, compiler_flags
from .verify import verify_prebuilt


def target(kt: KtKernel, target_isa: str | None) -> str | None:
    """The variant the env's kt-kernel is for: --target-isa, else the best this CPU runs (None without AVX2)."""
    return target_isa or best_variant(kt, cpu_info().flags)


def config(kt: KtKernel, kt_source: str | None, target_isa: str | None) -> dict:
    """What the stamp compares about kt-kernel: another CPU, ISA or source commit means a rebuild."""
    isa = target(kt, target_isa)
    path = "source" if kt_source else "prebuilt"
    if isa is None:  # no AVX2: verify_prebuilt explains during the build
        return {"path": path, "target_isa": None}
    cfg = stamp_config(kt, path, isa)
    if kt_source:
        ident = source_identity(kt_source)
        cfg["source"] = {k: v for k, v in ident.items() if k != "submodules_pinned"}
    return cfg


def source_version(source: str | Path) -> str | None:
    """The version a ktransformers checkout builds (its version.py, read as text: never executed)."""
    try:
        text = (Path(source) / "version.py").read_text()
    except OSError:
        return None
    m = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.M)
    return m.group(1) if m else None


def _same_release(a: str, b: str) -> bool:
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
    dist = dists.installed(site).get(dist_name)
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
        result = {"wheel": wheel.name, "wheel_sha256": sha256_file(wheel), "version": version, "replaced": tops}
        for top in tops:
            files = {n: z.read(n) for n in names if n.split("/")[0] == top}
            modes = {n: (z.getinfo(n).external_attr >> 16) & 0o777 or 0o644 for n in files}
            dists.replace_tree(dist, top, files, modes)
    return result


def check_kt_source(lock: Lock, kt_source: str) -> None:
    """Refuse, before anything is built, a checkout of another release than the lock's kt-kernel."""
    if not (Path(kt_source) / "kt-kernel").is_dir():
        raise KtenvError(f"--kt-source {kt_source} is not a ktransformers checkout (it has no kt-kernel/ directory). Pass the repository root.")
    want, have = lock.version_of("kt-kernel"), source_version(kt_source)
    if want and have and not _same_release(want, have):
        raise KtenvError(
            f"The ktransformers checkout at {kt_source} is version {have}, but this lock pins kt-kernel {want} "
            f"(released together with sglang-kt, which calls it). Check out the matching release there "
            f"(`git -C {kt_source} checkout v{want}`, with `git submodule update --init --recursive`) and rerun; nothing was built."
        )


def cuda_inputs(kt: KtKernel, env: Path, toolkit: dict | None, sm: int,
                environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], str, str]:
    """(environment, CPUINFER_CUDA_ARCHS, note) for building kt-kernel into the env at `env`.

    The build uses the toolkit the env's toolchain stage chose, through the
    same activation the server gets (CUDA_HOME, its bin/ first, the GCC that
    nvcc accepts), not whatever nvcc the shell happens to have. The arch list
    is upstream's, unless that toolkit is too old for one of its SMs (Debian's
    12.4 and sm_120): kt-kernel compiles no CUDA kernels of its own, the list
    only feeds CMake's CUDA compiler check, so the env's own SM is enough.
    """
    base = dict(os.environ if environ is None else environ)
    if not toolkit or not toolkit.get("cuda_home"):
        return base, kt.default_cuda_archs, ""
    env_vars = toolchain.build_env(toolkit, base, env)
    tk = toolchain.Toolkit(toolkit["cuda_home"], toolkit["nvcc"], toolkit["version"], toolkit.get("origin") or "")
    if "arch" not in arch_list_problems(tk, kt.default_cuda_archs, toolkit.get("torch_cuda")):
        return env_vars, kt.default_cuda_archs, ""
    return env_vars, str(sm), (f"CPUINFER_CUDA_ARCHS={sm} (the env's GPU), not upstream's {kt.default_cuda_archs}: "
                               f"nvcc {tk.version} cannot compile for every SM of it; kt-kernel has no device "
                               "code, the list only feeds CMake's CUDA check")


def install(kt: KtKernel, env: Path, lock: Lock, kt_source: str | None, target_isa: str | None, progress,
            toolkit: dict | None = None, sm: int | None = None) -> dict | None:
    """With --kt-source: build (or reuse) the wheel for the target ISA and put its kt_kernel/ in the env.

    toolkit: the env's toolchain record (toolchain.env_record); sm: the env's GPU (90 for sm90).
    """
    if not kt_source:
        return None
    isa = target(kt, target_isa)
    if isa is None:
        raise KtenvError("This CPU lacks AVX2 and no --target-isa was given: there is no kt-kernel variant to build for it. Pass --target-isa for the machine that will run the server.")
    check_kt_source(lock, kt_source)
    python = str(env / "bin" / "python")
    environ, cuda_archs = None, None
    if sm is not None:
        environ, cuda_archs, note = cuda_inputs(kt, env, toolkit, sm)
        if note:
            progress(f"kt-kernel: {note}")
    wheel = Path(build_from_source(kt, kt_source, isa, python, cache_dir(), progress,
                                   cuda_archs=cuda_archs, environ=environ))
    result = overlay_wheel(dists.site_packages(env), wheel)
    progress(f"kt-kernel: {', '.join(result['replaced'])} from {wheel.name} (built from {kt_source} for {isa})")
    return {**result, "path": wheel}


def verify(kt: KtKernel, env: Path, kt_source: str | None, target_isa: str | None, wheel: Path | None) -> dict:
    """Import kt_kernel in the env and check its CPU variant (verify.verify_prebuilt)."""
    flags = cpu_info().flags
    best = best_variant(kt, flags)
    isa = target(kt, target_isa)
    python = str(env / "bin" / "python")
    environ = None
    if target_isa and best and kt.variants.index(target_isa) < kt.variants.index(best):
        # Built for a bigger CPU than this one: loading it here could die with SIGILL.
        # What can be checked is that the build for it is there at all.
        pkg = dists.site_packages(env) / "kt_kernel"
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
        report = verify_prebuilt(kt, python, expected=target_isa, environ=environ)
        report["verified"] = True
    cfg = stamp_config(kt, "source" if kt_source else "prebuilt", isa, verified=report if report.get("verified") else None, build=wheel) if isa else {}
    return {**report, "config": cfg}


def stamp_config(kt: KtKernel, path: str, target_isa: str, *, verified: dict | None = None,
                 build: Path | None = None, flags: Iterable[str] | None = None) -> dict:
    """The kt-kernel part of an env's stamp and report.

    path: "prebuilt" (the PyPI wheel, verified) or "source" (built by ktenv).
    verified: verify_prebuilt's report; build: the wheel build_from_source returned.
    """
    if path not in ("prebuilt", "source"):
        raise ValueError(f"path must be 'prebuilt' or 'source', not {path!r}")
    target_isa = check_isa_name(kt, target_isa)
    host = cpu_info().flags if flags is None else frozenset(flags)
    stamp: dict = {
        "path": path,
        "target_isa": target_isa,
        "host_best": best_variant(kt, host),
        "host_isa": isa_summary(host),
        "compiler_flags": compiler_flags(kt, target_isa),
    }
    if verified:
        stamp.update({k: verified.get(k) for k in
                      ("variant", "kt_kernel_version", "cuda_stream", "extension_file", "override", "int8_kernel")})
    if path == "source":
        stamp["build_settings"] = build_settings(kt, target_isa)
        if build is not None:
            stamp["wheel"] = str(build)
            meta = Path(build).parent / "build.json"
            if meta.exists():
                m = json.loads(meta.read_text())
                stamp.update(cache_key=m["key"], source=m["inputs"]["source"], built_seconds=m["seconds"])
    return stamp
